"""One SAE on data x latent processes (train.distributed, method §A.7b) equals the single-device run: the same
latents selected at every step (main code and AuxK), the same weights up to float summation order (bf16: within its
own noise), shards consolidated into one ordinary SAE, each holding its share of the state; the layout's checks.
CPU processes with the gloo backend, launched by torchrun as the workflow launches them
(tests/distributed_worker.py; faults and the communication model: tests/test_distributed_faults.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed_worker import BATCH, launch
from saescale.config import ConfigError, validate
from saescale.sae.distributed import Mesh, owned, selection_slots
from saescale.sae.train_distributed import draw_shard_rows

pytestmark = pytest.mark.slow  # torchrun launches: ~1 min on 2 cores

# measured: 1.2e-7 (S = 2, D = 2, D = S = 2; 30 steps, weights of magnitude 0.3-0.4); float32 summation order only
WEIGHT_ATOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return launch(tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def reference_multitopk(tmp_path_factory) -> Path:
    return launch(tmp_path_factory.mktemp("single_multitopk"), 1, 1, "--arch", "multitopk")


def selections(out: Path, rank: int) -> list:
    return torch.load(out / f"selections.rank{rank}.pt")["selections"]


def same_latents(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.sort(dim=1).values, b.sort(dim=1).values)


def live_slots(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """AuxK's slots that hold a dead latent (the rest are live latents at -inf, zeroed by ReLU)."""
    return torch.where(torch.isfinite(values), indices, torch.full_like(indices, -1))


def assert_same_run(ref: Path, run: Path, data: int, latent: int) -> None:
    rows = BATCH // data
    expected = selections(ref, 0)
    auxk_steps = 0
    for rank in range(data * latent):
        got = selections(run, rank)
        assert len(got) == len(expected)
        part = slice((rank // latent) * rows, (rank // latent + 1) * rows)
        for step, ((main, aux), (main_d, aux_d)) in enumerate(zip(expected, got)):
            assert same_latents(main[part], main_d), f"rank {rank} step {step}: another main selection"
            assert (aux is None) == (aux_d is None), f"rank {rank} step {step}: AuxK ran on one side only"
            if aux is not None:
                assert same_latents(live_slots(*aux)[part], live_slots(*aux_d)), f"rank {rank} step {step}: AuxK"
                auxk_steps += bool(torch.isfinite(aux[0]).any())
    assert auxk_steps > 0, "no step selected a dead latent: the AuxK path was not exercised"
    single, dist = torch.load(ref / "result.pt"), torch.load(run / "result.pt")
    assert dist["state"].keys() == single["state"].keys()
    for name, t in single["state"].items():
        assert dist["state"][name].shape == t.shape, name  # consolidated to the whole SAE
        torch.testing.assert_close(dist["state"][name], t, atol=WEIGHT_ATOL, rtol=0, msg=name)
    for a, b in zip(single["rows"], dist["rows"]):
        for key in ("fvu", "heldout_fvu", "auxk_loss", "l0", "dead_fraction", "heldout_fvu_ema"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    assert dist["summary"]["weights"] == single["summary"]["weights"]
    assert dist["summary"]["distributed"] == {"data": data, "latent": latent}
    whole = torch.load(ref / "held.rank0.pt")["held_bytes"]
    for rank in range(data * latent):
        # each shard holds 1/S of W_enc, b_enc, W_dec with their Adam moments and EMA; b_pre (d floats x 4) is copied
        assert torch.load(run / f"held.rank{rank}.pt")["held_bytes"] == pytest.approx(whole / latent, rel=0.02)


CHUNKED = ("--gather-bytes", "4096", "--spec", '{"microbatch": 24}')


@pytest.mark.parametrize("data, latent, extra", [(1, 2, ()), (2, 1, ()), (2, 2, CHUNKED)],
                         ids=["S2", "D2", "D2xS2-microbatch-chunked-gathers"])
def test_a_distributed_run_selects_and_learns_what_one_process_does(reference, tmp_path, data, latent, extra):
    """D2xS2 also steps each replica's 64 rows in train.microbatch blocks of 24 and gathers the shards'
    candidates 10 rows at a time (global_topk's chunks)."""
    assert_same_run(reference, launch(tmp_path / "run", data, latent, *extra), data, latent)


def test_multitopk_shards_its_sorted_selection_and_two_bags(reference_multitopk, tmp_path):
    assert_same_run(reference_multitopk, launch(tmp_path / "run", 1, 2, "--arch", "multitopk"), 1, 2)


def test_under_bf16_a_sharded_run_stays_within_bf16s_own_noise(reference, tmp_path):
    """precision: bf16 (auto on CUDA): each shard rounds its partial reconstruction to bf16 before the sum, where
    one device rounds the whole sum once, and Adam's first, nearly sign-like steps amplify that. Measured here:
    weights 3e-2 apart after 30 steps, as far as one device's bf16 run is from its float32 run, and held-out FVU
    within 2e-3 at every log step. The test holds the sharded run to that noise floor."""
    bf16 = ("--spec", '{"precision": "bf16"}')
    single, sharded = launch(tmp_path / "single", 1, 1, *bf16), launch(tmp_path / "sharded", 1, 2, *bf16)
    fp32, one, two = (torch.load(run / "result.pt") for run in (reference, single, sharded))
    for name, t in one["state"].items():
        noise = float((t - fp32["state"][name]).abs().max())
        assert float((two["state"][name] - t).abs().max()) <= 2 * noise, name
    for a, b in zip(one["rows"], two["rows"]):
        assert b["heldout_fvu"] == pytest.approx(a["heldout_fvu"], abs=5e-3), a["step"]


# ---- pieces, without processes -------------------------------------------------------------------------
@pytest.mark.parametrize("latent", [2, 4])
def test_shard_draws_are_the_rows_of_one_draw(latent):
    """Initialization draws every shard's block in turn from one generator: W_enc (uniform) and the untied
    W_dec (normal) are the single device's rows."""
    n, d = 64, 24
    gen = torch.Generator().manual_seed(5)
    whole = torch.randn(n, d, generator=gen)
    torch.manual_seed(5)
    uniform = torch.nn.init.kaiming_uniform_(torch.empty(n, d), a=5**0.5)
    for shard in range(latent):
        mesh = Mesh(1, latent, shard)
        start, stop = mesh.latents(n)
        gen = torch.Generator().manual_seed(5)
        assert torch.equal(draw_shard_rows(lambda rows: torch.randn(rows, d, generator=gen), n, mesh),
                           whole[start:stop])
        torch.manual_seed(5)
        drawn = draw_shard_rows(lambda rows: torch.nn.init.kaiming_uniform_(torch.empty(rows, d), a=5**0.5), n, mesh)
        assert torch.equal(drawn, uniform[start:stop])


def test_owned_slots_point_home_and_the_rest_at_zero():
    local, mine = owned(torch.tensor([[0, 5, 9, 12]]), start=4, n_local=4)
    assert mine.tolist() == [[False, True, False, False]]
    assert local.tolist() == [[0, 1, 0, 0]]


def test_the_mesh_refuses_layouts_that_do_not_divide():
    with pytest.raises(ValueError, match="latent: 3 does not divide n = 64"):
        Mesh(1, 3, 0).latents(64)
    with pytest.raises(ValueError, match="data: 3 does not divide train.batch_size = 128"):
        Mesh(3, 1, 0).rows(128)
    with pytest.raises(ValueError, match="supports the archs"):
        selection_slots("relu", 4, 64, {})


def base_config(**train) -> dict:
    return {"subjects": {"s": {"model": "builtin", "layers": [1]}}, "sweep": {"archs": ["topk"], "n": [512],
            "k": [8]}, "train": train}


@pytest.mark.parametrize("train, sweep, message", [
    ({"distributed": {"latent": 3}}, {}, r"train.distributed.latent: 3 does not divide n = 512"),
    ({"distributed": {"data": 3}}, {}, r"train.distributed.data: 3 does not divide train.batch_size"),
    ({"distributed": {"latent": 2}}, {"archs": ["relu"]}, r"only topk, multitopk train distributed"),
    ({"distributed": {"latent": 2, "nodes": 3}}, {}, r"nodes: 3 nodes cannot share"),
    ({"distributed": {"replicas": 2}}, {}, r"train.distributed: Additional properties"),
])
def test_a_layout_that_cannot_train_is_refused_by_key(train, sweep, message):
    cfg = base_config(**train)
    cfg["sweep"].update(sweep)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, local_paths=False)


def test_a_distributed_variant_is_never_packed():
    from saescale.config import train_packs

    cfg = base_config(pack=["n"])
    cfg["sweep"].update({"n": [512, 1024], "archs": ["topk", "wide"]})
    cfg["sweep"]["variants"] = {"wide": {"arch": "topk", "train": {"distributed": {"latent": 2}}}}
    packs = train_packs(validate(cfg, local_paths=False))
    packed = {m["arch"] for p in packs for m in p["members"]}
    assert packed == {"topk"}
