"""A diverging run: the grid's SAEs fail loudly, the lr sweep's stop and are recorded as not converging."""

import dataclasses

import numpy as np
import pytest

from saescale.config import recipe, validate
from saescale.scaling.lr import converges
from saescale.store import InMemoryBatches

from test_train import run, setup


def diverging(stop: bool):
    x, stats, spec, sel = setup()
    return x, stats, dataclasses.replace(spec, lr=1e12, adam_eps=1e-30, stop_on_divergence=stop), sel


def test_a_grid_sae_that_diverges_fails_the_job(tmp_path):
    x, stats, spec, sel = diverging(stop=False)
    with pytest.raises(FloatingPointError, match="diverged"):
        run(InMemoryBatches(x, 256, 0), stats, spec, tmp_path / "a.pt", sel)


def test_an_lr_sweep_sae_that_diverges_stops_and_is_recorded(tmp_path):
    x, stats, spec, sel = diverging(stop=True)
    _, rows, summary = run(InMemoryBatches(x, 256, 0), stats, spec, tmp_path / "b.pt", sel)
    assert summary["diverged_at_step"] == rows[-1]["step"] < spec.tokens // spec.batch_size
    assert not np.isfinite(rows[-1]["loss"])
    assert not converges([r["heldout_fvu"] for r in rows])["ok"]  # what the lr study reads


def test_only_the_lr_sweeps_recipes_stop_on_divergence():
    cfg = validate({"subjects": {"s": {"model": "builtin", "layers": [1]}}}, local_paths=False)
    assert recipe(cfg, "topk")[1]["on_divergence"] == "fail"
    assert recipe(cfg, "topk_lr4")[1]["on_divergence"] == "stop"
