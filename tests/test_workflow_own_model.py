"""A model and a dataset of the user's own (a local HF folder, local text files) run the whole workflow. Apart from
tests/test_workflow.py so that the two pytest workers share the end-to-end runs (--dist loadfile)."""

from __future__ import annotations

import json

import pytest

from helpers import random_gpt2, write_text_files
from test_workflow import snakemake

pytestmark = pytest.mark.slow


def test_a_local_hf_model_and_local_text_files_run_end_to_end(tmp_path):
    files = write_text_files(tmp_path / "text", copies=200)
    model = random_gpt2(tmp_path / "model", files)
    cfg = {
        "subjects": {"rand": {"model": model, "layers": [0, 1], "ctx_len": 16, "train_tokens": 4096,
                              "eval_tokens": 512, "chunk_windows": 32,
                              "dataset": {"path": "text", "data_files": files}}},
        "sweep": {"n": [32], "k": [4]},
        "train": {"tokens": 8192, "batch_size": 512, "dead_tokens": 2048},
        "evaluate": {"downstream_windows": 16},
        # the model-free studies never read the subject; the quick preset runs them
        "toy": {study: {"enabled": False} for study in ("allocation", "manifolds", "groundtruth")},
    }
    res = snakemake(tmp_path, config=cfg)
    assert "rule lm" not in res.stdout + res.stderr  # a given model is loaded, never trained
    for layer in (0, 1):
        ev = json.loads((tmp_path / f"data/eval/rand/L{layer}/topk/n32_k4.json").read_text())
        assert ev["d_model"] == 32 and 0 <= ev["fvu"] < 2
    assert (tmp_path / "reports/report.html").exists()
