"""Tests for saescale.report: the HTML report renders from a run directory into one safe, self-contained file.

Each test writes a small synthetic run (the JSON/CSV files the pipeline would leave under data/) into
tmp_path, chdirs there, and renders it with the real config validation and template.
"""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from saescale import paths
from saescale.config import validate
from saescale.report import figures
from saescale.report.render import num, render_report

XSS = "<script>alert(1)</script>"
XSS_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
SHA = "e555aef97fa1e22433ccf57d064078d04c5180fad88bb1e63982bbb9a6d6d209"


def _fvu(n: int, k: int) -> float:
    return 0.9 * n ** -0.3 * k ** -0.25 + 0.02


def _config(n=(32, 64), k=(4, 8), layers=(0,), subjects=("tiny",), model="builtin", dataset="builtin",
            title="test report") -> dict:
    subj = {"model": model, "layers": list(layers), "ctx_len": 16, "train_tokens": 2048, "eval_tokens": 512,
            "dataset": {"path": dataset}, "builtin": {"n_layer": 2, "n_embd": 16, "n_head": 2}}
    return validate({"subjects": {s: dict(subj) for s in subjects}, "sweep": {"n": list(n), "k": list(k)},
                     "train": {"tokens": 4096, "batch_size": 1024}, "report": {"title": title}})


def _power_fit(k: int, ok: bool = True) -> dict:
    if not ok:
        return {"arch": "topk", "k": k, "ok": False, "n_points": 2,
                "reason": "2 points; need at least 4 distinct n"}
    return {"arch": "topk", "k": k, "form": "a*n^-b + e", "a": 0.9 * k ** -0.25, "b": 0.3, "e": 0.02,
            "a_err": 0.01, "b_err": 0.02, "e_err": None, "n_points": 2, "rmse_log": 0.001, "ok": True}


def _write(path: str, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, pd.DataFrame):
        obj.to_csv(path, index=False)
    else:
        Path(path).write_text(json.dumps(obj))


def _write_subject(name: str, subj: dict) -> None:
    if subj["model"] == "builtin":
        history = [{"step": s, "tokens": 512 * (s + 1), "train_loss": 6 - s / 10, "val_loss": 6.1 - s / 10,
                    "lr": 1e-3, "elapsed_s": s} for s in range(5)]
        lm_config = {"n_layer": 2, "n_embd": 16, "n_head": 2, "vocab_size": 300, "n_positions": 16}
        _write(paths.fmt(paths.MODEL, subject=name) + "/training.json",
               {"n_params": 12345, "config": lm_config, "train_tokens": 2560, "train_seconds": 1.5,
                "tokens_per_s": 1706.0, "final_val_loss": 5.7, "device": "cpu", "history": history})
    if subj["dataset"]["path"] == "builtin":
        _write(paths.CORPUS_INFO, {"source": "CPython stdlib", "python_version": "3.11.7", "n_files": 3,
                                   "n_bytes": 1000, "sha256": SHA})
    stats = {"n_rows": 2048, "d_model": 16, "baseline_mse": 0.4343, "raw_norm_mean": 1.2, "raw_norm_max": 2.0}
    _write(paths.fmt(paths.NORM, subject=name), {"layers": {str(layer): stats for layer in subj["layers"]}})


def _write_sae(job: dict, evals: bool) -> None:
    """train_log.csv + cfg.json (+ eval JSON) of one SAE whose training FVU falls as 1/tokens to _fvu."""
    n, k, fvu = job["n"], job["k"], _fvu(job["n"], job["k"])
    tokens = np.arange(1, 5) * 1024
    _write(paths.fmt(paths.SAE_LOG, **job), pd.DataFrame({
        "step": np.arange(1, 5), "tokens": tokens, "loss": fvu * 4096 / tokens, "fvu": fvu * 4096 / tokens,
        "auxk_loss": 0.0, "l0": k, "dead_fraction": [0, 0, 0, 1 / n], "lr": 1e-3, "elapsed_s": tokens / 8192,
        "flops": 6.0 * tokens * n * 16}))
    _write(paths.fmt(paths.SAE_CFG, **job), {"train_spec": {"lr": 1e-3, "k_aux": 8},
                                             "train": {"device": "cpu", "dtype": "float32"},
                                             "versions": {"python": "3.11.7", "torch": "2.3.0"}})
    if evals:
        _write(paths.fmt(paths.EVAL, **job), {"fvu": fvu, "dead_latents": 1,
                                              "downstream": {"kl_zero_ablation": 0.75}})


def _metrics_row(job: dict, nan_downstream: bool, weights: str) -> dict:
    fvu = _fvu(job["n"], job["k"])
    dce, kl = (math.nan, math.nan) if nan_downstream else (0.2 * fvu, 0.05 * fvu)
    return {**job, "d_model": 16, "fvu": fvu, "l0": job["k"], "dead_fraction": 1 / job["n"], "delta_ce": dce,
            "kl": kl, "ce_clean": 5.0, "ce_spliced": 5.0 + dce, "delta_ce_zero_ablation": 1.0,
            "kl_zero_ablation": 0.75, "dead_latents": 1,
            "loss_recovered": 1 - dce, "eval_tokens": 512, "downstream_tokens": 480, "lr": 1e-3,
            "train_tokens": 4096, "train_seconds": 0.5, "tokens_per_s": 8192.0, "weights": weights,
            "device": "cpu"}


def write_run(cfg: dict, fits_ok: bool = True, nan_downstream: bool = False, evals: bool = True,
              weights: str = "raw") -> None:
    """The files a finished run leaves behind, for every subject, layer and (n, k) of `cfg`."""
    ks = cfg["sweep"]["k"]
    for name, subj in cfg["subjects"].items():
        _write_subject(name, subj)
        for layer in subj["layers"]:
            rows = []
            for n in cfg["sweep"]["n"]:
                for k in ks:
                    job = dict(subject=name, layer=layer, arch="topk", n=n, k=k)
                    _write_sae(job, evals)
                    rows.append(_metrics_row(job, nan_downstream, weights))
            _write(paths.fmt(paths.METRICS, subject=name, layer=layer), pd.DataFrame(rows))
            joint = {"arch": "topk", "ok": False, "n_points": len(rows),
                     "reason": f"{len(rows)} points over {len(ks)} k; need >= 7 points"}
            fits = {"metric": "fvu", "dropped_rows": 0, "per_k": [_power_fit(k, fits_ok) for k in ks],
                    "joint": [joint]}
            _write(paths.fmt(paths.FITS, subject=name, layer=layer),
                   {"fvu": fits, "delta_ce": dict(fits, metric="delta_ce")})


def render(tmp_path: Path, monkeypatch, cfg: dict, **run) -> str:
    monkeypatch.chdir(tmp_path)
    write_run(cfg, **run)
    render_report(cfg, "reports/report.html")
    return (tmp_path / "reports" / "report.html").read_text()


def test_report_is_one_self_contained_html_file(tmp_path, monkeypatch):
    html = render(tmp_path, monkeypatch, _config())
    assert html.lstrip().startswith("<!DOCTYPE html>")
    assert "data:image/png;base64," in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "the report must open offline"
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert not list((tmp_path / "reports").glob("*.tmp")), "the write must be atomic (temp file renamed)"


def test_every_inline_figure_is_a_png(tmp_path, monkeypatch):
    html = render(tmp_path, monkeypatch, _config())
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) >= 8  # LM curve, 3 training-curve figures, 2 heatmaps, scaling, downstream
    assert all(base64.b64decode(b).startswith(b"\x89PNG") for b in images)


def test_grid_table_shows_the_metrics_numbers(tmp_path, monkeypatch):
    html = render(tmp_path, monkeypatch, _config())
    for n in (32, 64):
        for k in (4, 8):
            assert f"<td>{_fvu(n, k):.4g}</td>" in html
    assert "<td>0.4343</td>" in html  # baseline MSE from the norm stats
    assert SHA in html and "3.11.7" in html  # corpus provenance and software version
    assert "12,345" in html  # builtin LM parameter count
    assert "Fig. 1b" in html and "Fig. 5b" in html


def test_text_from_config_and_data_files_is_escaped(tmp_path, monkeypatch):
    cfg = _config(title=XSS, dataset=XSS, model=f"org/{XSS}")
    html = render(tmp_path, monkeypatch, cfg, weights=XSS)
    assert XSS not in html
    assert "<script" not in html.lower()
    assert html.count(XSS_ESCAPED) >= 4  # <title>, <h1>, the model, the dataset, the weights column


def test_fits_that_are_not_ok_are_reported_and_not_drawn(tmp_path, monkeypatch):
    html = render(tmp_path, monkeypatch, _config(), fits_ok=False)
    assert "not ok: 2 points; need at least 4 distinct n" in html
    assert "joint fit not ok" in html
    assert "data:image/png;base64," in html  # the points are still plotted


def test_ok_fits_are_tabulated_with_errors(tmp_path, monkeypatch):
    html = render(tmp_path, monkeypatch, _config())
    assert "0.3 ± 0.02" in html  # b ± b_err of the per-k fit
    assert "± n/a" in html  # e_err is null in fits.json


def test_single_point_nan_metrics_and_no_optional_files(tmp_path, monkeypatch):
    cfg = _config(n=(64,), k=(8,), model="gpt2", dataset="text")
    html = render(tmp_path, monkeypatch, cfg, nan_downstream=True, evals=False)
    assert f"<td>{_fvu(64, 8):.4g}</td>" in html
    assert "Nothing to plot" in html  # ΔCE/KL vs FVU has no finite point
    assert "Builtin subject model" not in html and "Builtin corpus" not in html
    assert "<td>nan</td>" not in html.lower()


def _skip_png_encoding(monkeypatch) -> None:
    """For tests of the page's structure: drawing PNGs is most of the render time and not under test."""
    monkeypatch.setattr(figures, "to_base64_png", lambda fig: "iVBORw0KGgo=")


def test_multiple_subjects_and_layers_each_get_sections(tmp_path, monkeypatch):
    _skip_png_encoding(monkeypatch)
    cfg = _config(subjects=("alpha", "beta"), layers=(0, 1))
    html = render(tmp_path, monkeypatch, cfg)
    for s in ("alpha", "beta"):
        for layer in (0, 1):
            assert f'id="grid-{s}-L{layer}"' in html
            assert paths.fmt(paths.METRICS, subject=s, layer=layer) in html


def test_missing_sae_files_are_listed(tmp_path, monkeypatch):
    _skip_png_encoding(monkeypatch)
    cfg = _config()
    monkeypatch.chdir(tmp_path)
    write_run(cfg)
    Path(paths.fmt(paths.SAE_LOG, subject="tiny", layer=0, arch="topk", n=64, k=8)).unlink()
    render_report(cfg, "out/report.html")
    html = Path("out/report.html").read_text()
    assert "3 of 4" in html
    assert paths.fmt(paths.SAE_LOG, subject="tiny", layer=0, arch="topk", n=64, k=8) in html


def test_store_sizes_are_reported_when_the_stores_exist(tmp_path, monkeypatch):
    zarr = pytest.importorskip("zarr")
    _skip_png_encoding(monkeypatch)
    cfg = _config()
    monkeypatch.chdir(tmp_path)
    write_run(cfg)
    tok = zarr.open_group(paths.fmt(paths.TOKENS, subject="tiny"), mode="w")
    tok.attrs.update({"n_windows": 200, "ctx_len": 16, "n_train": 180, "n_eval": 20})
    act = zarr.open_group(paths.fmt(paths.ACTIVATIONS, subject="tiny"), mode="w")
    act.attrs.update({"n_rows": 2560, "n_train": 2048, "n_eval": 512, "d_model": 16, "dtype": "float16",
                      "layers": [0], "extract_seconds": 0.1})
    act.create_group("L0").create_array("x", shape=(2560, 16), dtype="float16")[:] = 1.0
    render_report(cfg, "reports/report.html")
    html = Path("reports/report.html").read_text()
    assert "200 windows × 16 = 3,200 tokens" in html
    assert "uncompressed 32 B/token" in html


def test_num_formats_missing_values_as_a_dash():
    assert num(float("nan")) == "—" and num(None) == "—"
    assert num(65536) == "65,536" and num(0.27337747) == "0.2734" and num(475753.33) == "475,753"


def test_figures_return_none_when_nothing_is_finite():
    empty = pd.DataFrame({"arch": ["topk"], "n": [32], "k": [4], "fvu": [np.nan], "delta_ce": [np.nan],
                          "kl": [np.nan]})
    assert figures.grid_heatmap(empty, "fvu", "FVU") is None
    assert figures.downstream_vs_fvu(empty, {}) is None
    assert figures.scaling_laws(empty, {"fvu": None}, {}) is None
    assert figures.training_curves(pd.DataFrame(), "fvu", "FVU") is None
