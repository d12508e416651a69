"""config.imported: an SAE trained elsewhere is imported and evaluated by the pipeline like its own SAEs.

The known answer: one of this run's SAEs, exported to SAELens' format and imported back, must evaluate to the
metrics the pipeline computed for the original (the normalization is folded on export and unfolded on import).
"""

import json
import subprocess
import sys

import pytest

from helpers import random_gpt2, write_text_files
from test_workflow import planned_jobs, snakemake

pytestmark = pytest.mark.slow

SAE = "data/saes/rand/L1/topk/n32_k4"


def tiny_config(model: str, files: list[str]) -> dict:
    return {
        "subjects": {"rand": {"model": model, "layers": [1], "ctx_len": 16, "train_tokens": 4096, "eval_tokens": 512,
                              "chunk_windows": 32, "dataset": {"path": "text", "data_files": files}}},
        "sweep": {"n": [32], "k": [4]},
        "train": {"tokens": 8192, "batch_size": 512, "dead_tokens": 2048},
        "evaluate": {"downstream_windows": 16, **{m: {"enabled": False} for m in ("probes", "ablation", "geometry")}},
        "interpret": {"enabled": False},
        "analysis": {"progressive": {"archs": []}, "refinement": {"archs": []}},
        "toy": {study: {"enabled": False} for study in ("allocation", "manifolds", "groundtruth")},
    }


def test_an_exported_then_imported_sae_evaluates_to_the_original(tmp_path):
    files = write_text_files(tmp_path / "text", copies=200)
    cfg = tiny_config(random_gpt2(tmp_path / "model", files), files)
    original = "data/eval/rand/L1/topk/n32_k4.json"
    snakemake(tmp_path, original, config=cfg)
    subprocess.run([sys.executable, "-m", "saescale.cli", "export", "--sae-dir", str(tmp_path / SAE),
                    "--format", "saelens", "--out", str(tmp_path / "elsewhere/topk")], check=True)

    cfg["imported"] = {"roundtrip": {"path": "elsewhere/topk", "format": "saelens", "subject": "rand", "layer": 1}}
    target = "data/imported/roundtrip/eval.json"
    assert planned_jobs(snakemake(tmp_path, "-n", target, config=cfg)) == {"import_sae": 1, "evaluate_imported": 1}
    snakemake(tmp_path, target, config=cfg)

    mine, theirs = (json.loads((tmp_path / f).read_text()) for f in (original, target))
    assert theirs["imported_from"] == {"format": "saelens", "path": "elsewhere/topk"}
    assert theirs["n"] == 32 and theirs["k"] == 4 and theirs["l0"] == mine["l0"]
    assert theirs["fvu"] == pytest.approx(mine["fvu"], rel=1e-4)
    assert theirs["dead_fraction"] == mine["dead_fraction"]
    for key in ("delta_ce", "kl_div_with_sae"):
        assert theirs["downstream"][key] == pytest.approx(mine["downstream"][key], rel=1e-3, abs=1e-5), key
    assert planned_jobs(snakemake(tmp_path, "-n", target, config=cfg)) == {}

    snakemake(tmp_path, config=cfg)  # the report lists it beside the run's own SAE, outside the fits
    report = (tmp_path / "reports/report.html").read_text()
    section = report.split('id="grid-imported"')[1].split("</section>")[0]
    assert "roundtrip" in section and "saelens: elsewhere/topk" in section and "topk n=32 k=4: FVU" in section
    metrics = (tmp_path / "data/scaling/rand/L1/metrics.csv").read_text()
    assert "roundtrip" not in metrics

