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
from saescale.config import analysed, recipe, sae_jobs, validate
from saescale.report import comparison as cmp
from saescale.report import figures
from saescale.report.render import num, render_report
from saescale.report.tables import pct

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
                                              "downstream": {"kl_div_with_ablation": 0.75}})


def _metrics_row(job: dict, nan_downstream: bool, weights: str) -> dict:
    fvu = _fvu(job["n"], job["k"])
    dce, kl = (math.nan, math.nan) if nan_downstream else (0.2 * fvu, 0.05 * fvu)
    return {**job, "d_model": 16, "fvu": fvu, "l0": job["k"], "dead_fraction": 1 / job["n"], "delta_ce": dce,
            "kl_div_with_sae": kl, "ce_loss_without_sae": 5.0, "ce_loss_with_sae": 5.0 + dce,
            "ce_loss_with_ablation": 6.0, "delta_ce_zero_ablation": 1.0, "kl_div_with_ablation": 0.75,
            "dead_latents": 1, "ce_loss_score": 1 - dce, "kl_div_score": 1 - kl / 0.75, "eval_tokens": 512,
            "downstream_tokens": 480, "lr": 1e-3, "train_tokens": 4096, "train_seconds": 0.5,
            "tokens_per_s": 8192.0, "weights": weights, "device": "cpu"}


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


def test_grid_and_references_read_the_saebench_named_columns(tmp_path, monkeypatch):
    """KL, loss recovered (ce_loss_score) and the zero-ablation references come from metrics.csv's columns
    under SAEBench's names: a report still reading the old names would show dashes here."""
    _skip_png_encoding(monkeypatch)
    html = render(tmp_path, monkeypatch, _config())
    grid = html.split('id="grid-tiny-L0"')[1].split("</table>")[0]
    for n in (32, 64):
        for k in (4, 8):
            fvu = _fvu(n, k)
            assert f"<td>{num(0.05 * fvu)}</td>" in grid  # kl_div_with_sae
            assert f"<td>{pct(1 - 0.2 * fvu)}</td>" in grid  # ce_loss_score
    assert "clean CE 5 nats/token" in html and "KL 0.75 nats" in html


def test_a_metrics_csv_of_an_earlier_version_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _config()
    write_run(cfg)
    path = Path(paths.fmt(paths.METRICS, subject="tiny", layer=0))
    pd.read_csv(path).rename(columns={"kl_div_with_sae": "kl"}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"metrics\.csv.*kl -> kl_div_with_sae.*rerun its scaling job"):
        render_report(cfg, "reports/report.html")


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
                          "kl_div_with_sae": [np.nan]})
    assert figures.grid_heatmap(empty, "fvu", "FVU") is None
    assert figures.downstream_vs_fvu(empty, {}) is None
    assert figures.scaling_laws(empty, {"fvu": None}, {}) is None
    assert figures.training_curves(pd.DataFrame(), "fvu", "FVU") is None


# ---- architecture comparison: known answers for the pure functions ------------------------------------


def test_loglog_interpolation_is_linear_in_log_l0_and_log_fvu():
    assert cmp.loglog_interp([4, 16], [0.2, 0.05], 8) == pytest.approx(0.1)  # sqrt(0.2 * 0.05)
    assert cmp.loglog_interp([16, 4], [0.05, 0.2], 16) == pytest.approx(0.05)  # an end point, any order
    assert math.isnan(cmp.loglog_interp([4, 16], [0.2, 0.05], 32))  # never extrapolated
    assert math.isnan(cmp.loglog_interp([4, 16], [0.2, 0.05], 2))


def test_matched_value_falls_back_to_the_nearest_sae_only_within_15_percent():
    assert cmp.matched_value([4, 16], [0.2, 0.05], 8) == (pytest.approx(0.1), "interpolated")
    assert cmp.matched_value([7.6], [0.21], 8) == (0.21, "nearest")  # 5% below the target
    value, how = cmp.matched_value([6.25], [0.1], 8)  # 22% below: no match
    assert math.isnan(value) and how is None


def test_compare_n_is_configured_or_the_n_with_most_archs():
    m = pd.DataFrame({"arch": ["topk", "topk", "relu", "gated", "topk_untied", "topk_noauxk"],
                      "base_arch": ["topk", "topk", "relu", "gated", "topk", "topk"],
                      "n": [64, 128, 64, 64, 128, 128], "k": 8})
    assert cmp.pick_compare_n(m) == 64  # variants do not count as archs
    assert cmp.pick_compare_n(m, 128) == 128
    tie = pd.DataFrame({"arch": ["topk", "relu", "topk", "relu"], "n": [64, 64, 128, 128], "k": 8})
    assert cmp.pick_compare_n(tie) == 128
    assert cmp.scaling_archs(m) == ["topk"]
    assert cmp.scaling_archs(m[m["n"] == 64]) == ["gated", "relu", "topk"]  # nobody spans n: show all


def test_ordering_verdict_tests_only_the_fig_2a_claim():
    good = cmp.ordering_verdict({"topk": 0.10, "gated": 0.105, "prolu": 0.14, "relu": 0.16}, 8)
    assert good.agrees is True and good.label == "agrees" and "relu 0.16" in good.text
    assert good.quote.startswith("At a fixed number of latents") and "Fig. 2a" in good.source
    assert any("our choice" in t for t in good.thresholds) and "topk 0.1 < gated" in good.run_value
    # ProLU worse than ReLU and Gated worse than ProLU: the paper orders neither pair, so both still agree
    assert cmp.ordering_verdict({"topk": 0.10, "gated": 0.105, "prolu": 0.2, "relu": 0.16}, 8).agrees is True
    assert cmp.ordering_verdict({"topk": 0.10, "gated": 0.105, "prolu": 0.103, "relu": 0.16}, 8).agrees is True
    bad = cmp.ordering_verdict({"topk": 0.10, "gated": 0.13, "prolu": 0.09, "relu": 0.16}, 8)
    assert bad.agrees is False and bad.label == "does not agree"
    assert any("Gated +30%" in f for f in bad.failed)
    assert any("topk" in f and "prolu" in f for f in bad.failed) and len(bad.failed) == 2
    assert cmp.ordering_verdict({"topk": 0.1, "jumprelu": 0.09}, 8).agrees is None


def test_lowest_delta_ce_verdict():
    assert cmp.lowest_verdict({"topk": 0.01, "relu": 0.05, "gated": 0.012}, 8).agrees is True
    assert cmp.lowest_verdict({"topk": 0.02, "relu": 0.05, "gated": 0.012}, 8).agrees is False
    assert cmp.lowest_verdict({"topk": 0.02}, 8).agrees is None


def test_topk_relu_slopes_and_steeper_verdict():
    ns = [256, 512, 1024]
    rows = [{"arch": "topk", "n": n, "k": 8, "fvu": n ** -0.3} for n in ns]
    rows += [{"arch": "relu", "n": n, "k": 8, "fvu": 2 * n ** -0.1} for n in ns]
    rows += [{"arch": "relu", "n": 256, "k": 16, "fvu": 0.1}]  # one n only at k = 16: no pair there
    slopes = cmp.n_slopes(pd.DataFrame(rows))
    assert [s["k"] for s in slopes] == [8]
    assert slopes[0]["topk"] == pytest.approx(-0.3) and slopes[0]["relu"] == pytest.approx(-0.1)
    assert cmp.steeper_verdict(slopes).agrees is True
    assert cmp.steeper_verdict([{"k": 8, "topk": -0.1, "relu": -0.3}]).agrees is False
    assert cmp.steeper_verdict([]).agrees is None


def _ablation(dead_noauxk: float, dead_untied: float) -> pd.DataFrame:
    return pd.DataFrame({"arch": ["topk", "topk_noauxk", "topk_untied", "topk"],
                         "base_arch": ["topk", "topk", "topk", "topk"], "n": [128, 128, 128, 64], "k": 8,
                         "auxk": [True, False, True, True], "tied_init": [True, True, False, True],
                         "dead_fraction": [0.01, dead_noauxk, dead_untied, 0.0]})


def test_ablation_rows_keep_the_cells_with_variants_baseline_first():
    rows = cmp.ablation_rows(_ablation(0.2, 0.3))
    assert list(rows["arch"]) == ["topk", "topk_noauxk", "topk_untied"]
    assert cmp.ablation_rows(_ablation(0.2, 0.3).iloc[[0, 3]]).empty


def test_ablation_verdict_needs_both_ingredients_to_matter():
    assert cmp.ablation_verdict(cmp.ablation_rows(_ablation(0.2, 0.3))).agrees is True
    v = cmp.ablation_verdict(cmp.ablation_rows(_ablation(0.01, 0.3)))
    assert v.agrees is False and "without AuxK" in v.failed[0] and "without tied init" in v.held[0]
    assert cmp.ablation_verdict(cmp.ablation_rows(_ablation(0.2, 0.3)).iloc[0:0]).agrees is None


def _progressive(fvus: list[float], jump: list[float], k: int = 8) -> dict:
    ks = [k // 4, k // 2, k, 2 * k, 4 * k, 8 * k][:len(fvus)]
    topk = [{"k": kp, "fvu": f, "l0": kp} for kp, f in zip(ks, fvus)]
    jumprelu = [{"threshold": 1 / (i + 1), "fvu": f, "l0": i + 1} for i, f in enumerate(jump)]
    return {"trained": {"fvu": fvus[2], "l0": k}, "curves": {"topk": topk, "jumprelu": jumprelu}}


def test_progressive_summary_finds_where_the_topk_sweep_stops_improving():
    s = cmp.progressive_summary(_progressive([0.5, 0.3, 0.1, 0.12, 0.2, 0.3], [0.4, 0.2, 0.3]), 8)
    assert s["best_k"] == 8 and s["fvu_at_k"] == 0.1 and s["last_k"] == 64
    assert s["gain_beyond_k"] == pytest.approx(1 - 0.3 / 0.1)
    assert s["keeps_falling"] is False and s["jump_keeps_falling"] is False


def _summ(arch: str, fvus: list[float], jump: list[float]) -> dict:
    return {"arch": arch, "base_arch": arch, **cmp.progressive_summary(_progressive(fvus, jump), 8)}


def test_progressive_verdict_topk_only_to_k_multitopk_and_relu_all_the_way():
    rise, fall = [0.5, 0.3, 0.1, 0.12, 0.2, 0.3], [0.5, 0.3, 0.1, 0.08, 0.07, 0.069]
    good = [_summ("topk", rise, rise), _summ("multitopk", fall, fall), _summ("relu", rise, fall)]
    assert cmp.progressive_verdict(good).agrees is True
    bad = [_summ("topk", fall, fall), _summ("multitopk", rise, rise), _summ("relu", fall, rise)]
    v = cmp.progressive_verdict(bad)
    assert v.agrees is False and len(v.failed) == 3
    assert cmp.progressive_verdict([]).agrees is None


def _refined(arch: str, rel: float, frac: float, before: float, after: float) -> dict:
    return {"arch": arch, "base_arch": arch, "n": 128, "k": 8, "mean_relative_change": rel,
            "fraction_increased": frac, "fvu_before": before, "fvu_after": after}


def test_refinement_verdict_shrinkage_for_relu_only_and_a_partly_closed_gap():
    good = [_refined("topk", 0.01, 0.5, 0.10, 0.09), _refined("relu", 0.4, 0.8, 0.30, 0.20)]
    v = cmp.refinement_verdict(good)
    assert v.agrees is True and any("closes 50%" in h for h in v.held)  # (0.3 - 0.2) / (0.3 - 0.1)
    bad = [_refined("topk", 0.3, 0.9, 0.10, 0.09), _refined("relu", -0.1, 0.3, 0.30, 0.05)]
    v = cmp.refinement_verdict(bad)
    assert v.agrees is False and len(v.failed) == 3  # TopK shrinks, ReLU does not, the gap is overclosed
    assert cmp.refinement_verdict([]).agrees is None


# ---- architecture comparison: the rendered sections -----------------------------------------------------

ARCH_FACTOR = {"topk": 1.0, "multitopk": 0.95, "gated": 1.05, "prolu": 1.3, "relu": 1.5, "topk_noauxk": 1.01,
               "topk_untied": 1.1}
PENALTY = {"gated", "prolu", "relu"}


def _arch_config() -> dict:
    return validate({
        "subjects": {"tiny": {"model": "gpt2", "layers": [0], "ctx_len": 16, "train_tokens": 2048,
                              "eval_tokens": 512, "dataset": {"path": "text"}}},
        "sweep": {"archs": ["topk"], "n": [32, 64], "k": [4, 8],
                  "extra": [{"archs": ["multitopk", "gated", "prolu", "relu", "topk_noauxk", "topk_untied"],
                             "n": [64], "k": [8]},
                            {"archs": ["relu"], "n": [32, 64], "k": [4, 8]}],
                  "variants": {"topk_noauxk": {"arch": "topk", "train": {"auxk": False}},
                               "topk_untied": {"arch": "topk", "train": {"tied_init": False}}}},
        "train": {"tokens": 4096, "batch_size": 1024},
        "analysis": {"progressive": {"archs": ["topk", "multitopk", "relu"], "n": [64]},
                     "refinement": {"archs": ["topk", "relu"], "n": [64]}}})


def write_arch_run(cfg: dict) -> None:
    """A run with every arch of `_arch_config`: penalty archs reach 95% of their target L0."""
    rows = []
    for job in sae_jobs(cfg):
        base, train = recipe(cfg, job["arch"])
        _write_sae(job, evals=True)
        cfg_json = json.loads(Path(paths.fmt(paths.SAE_CFG, **job)).read_text())
        dead = 0.3 if not train["tied_init"] else 0.2 if not train["auxk"] else 0.0
        cfg_json["train_spec"].update(auxk=train["auxk"], tied_init=train["tied_init"])
        cfg_json["train"].update(final_dead_fraction=dead, penalty=0.5 if base in PENALTY else None)
        _write(paths.fmt(paths.SAE_CFG, **job), cfg_json)
        row = _metrics_row(job, nan_downstream=False, weights="raw")
        shallower = (job["n"] / 32) ** 0.15 if base == "relu" else 1  # ReLU gains less from n (Fig. 2b)
        fvu = row["fvu"] * ARCH_FACTOR[job["arch"]] * shallower
        rows.append({**row, "base_arch": base, "fvu": fvu, "delta_ce": 0.2 * fvu, "dead_fraction": dead,
                     "l0": 0.95 * job["k"] if base in PENALTY else job["k"],
                     "penalty": 0.5 if base in PENALTY else math.nan})
        for experiment in ("progressive", "refinement"):
            if not analysed(cfg, experiment, job):
                continue
            if experiment == "progressive":  # TopK: worse past k; the others: still improving
                later = [2 * fvu, 3 * fvu] if base == "topk" else [0.9 * fvu, 0.8 * fvu]
                data = _progressive([0.5, 0.3, fvu, *later], [0.5, 0.3, fvu, *later], job["k"])
            else:  # ReLU: activations grow (shrinkage), and refinement closes part of the gap
                rel, frac = (0.4, 0.8) if base == "relu" else (0.0, 0.5)
                data = {**_refined(job["arch"], rel, frac, fvu, fvu * (0.8 if base == "relu" else 0.98)),
                        "delta_ce_before": 0.2 * fvu, "delta_ce_after": 0.18 * fvu, "mean_change": 0.01,
                        "log2_ratio_hist": {"edges": [-1, 0, 1, 3], "counts": [5, 50, 10]},
                        "median_log2_ratio": 0.2, "fraction_zeroed": 0.01}
            _write(paths.fmt(paths.ANALYSIS, **job, experiment=experiment),
                   {**data, **job, "base_arch": base, "tokens": 512})
    _write(paths.fmt(paths.METRICS, subject="tiny", layer=0), pd.DataFrame(rows))
    _write(paths.fmt(paths.FITS, subject="tiny", layer=0), {})


def test_architecture_sections_render_with_verdicts_and_sources(tmp_path, monkeypatch):
    cfg = _arch_config()
    monkeypatch.chdir(tmp_path)
    write_arch_run(cfg)
    render_report(cfg, "reports/report.html", figures_dir="reports/figures")
    html = Path("reports/report.html").read_text()
    for section in ("archs", "topk-relu", "dead", "progressive", "refinement"):
        assert f'id="{section}-tiny-L0"' in html and f'href="#{section}"' in html
    assert "Not run in this configuration" not in html
    # FVU order, ΔCE, TopK vs ReLU slopes, the ablation, progressive recovery, refinement
    assert html.count('class="verdict agrees"') == 6
    assert "Architectures at n = 64, L0 = 8" in html  # the summary line
    assert "≈" in html and "7.6 / 8 (-5%)" in html  # penalty archs: nearest SAE, achieved vs target L0
    assert paths.fmt(paths.ANALYSIS, subject="tiny", layer=0, arch="{arch}", n="{n}", k="{k}",
                     experiment="progressive") in html
    assert "5 of 5" in html and "4 of 4" in html  # progressive.json (+ multitopk), refinement.json at n = 64
    for name in ("arch_matched", "arch_fvu_vs_n", "arch_dead_curves", "arch_progressive", "arch_refinement"):
        assert (tmp_path / "reports" / "figures" / f"tiny-L0_{name}.png").read_bytes().startswith(b"\x89PNG")


def test_architecture_verdicts_can_disagree_in_the_report(tmp_path, monkeypatch):
    _skip_png_encoding(monkeypatch)
    cfg = _arch_config()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(ARCH_FACTOR, "prolu", 0.9)  # ProLU better than TopK: Figs. 2a and 5a fail
    write_arch_run(cfg)
    render_report(cfg, "reports/report.html")
    html = Path("reports/report.html").read_text()
    assert html.count('class="verdict disagrees"') == 2
    assert "(Fig. 2a): does not agree (fails: topk" in html  # and the summary says so
    assert html.count('class="badge disagrees"') == 2  # so does the scorecard


def test_a_topk_only_run_says_which_sections_were_not_run(tmp_path, monkeypatch):
    _skip_png_encoding(monkeypatch)
    html = render(tmp_path, monkeypatch, _config())
    # matched L0, TopK vs ReLU, progressive recovery, refinement
    assert html.count("Not run in this configuration") == 4
    assert "ablation was not run in this configuration" in html
    assert "sections 6–10" not in html  # nothing outside the main grid


def test_scaling_figure_handles_any_number_of_archs():
    archs = [f"arch{i}" for i in range(15)]
    m = pd.DataFrame([{"arch": a, "n": n, "k": 8, "fvu": 0.1 * (i + 1) / n} for i, a in enumerate(archs)
                      for n in (32, 64)])
    assert figures.scaling_laws(m, {"fvu": None}, {}).startswith("iVBOR")


def test_fit_tables_say_which_law_and_which_saes_each_fit_used():
    from saescale.report.tables import fit_tables

    fit = {"arch": "topk", "k": 8, "ok": True, "a": 1.0, "a_err": 0.1, "b": 0.5, "b_err": 0.05, "e": 0.01,
           "e_err": 0.001, "rmse_log": 0.01, "n_points": 5, "label": "L(N), converged",
           "counts": {"converged": 3, "censored": 2, "fixed-budget": 0}}
    row = fit_tables({"fvu": {"per_k": [fit], "joint": []}})[0]["per_k"]["rows"][0]
    assert row[2:4] == ["L(N), converged", "5 (3 converged, 2 censored)"]
