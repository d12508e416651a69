"""Tests for the report's evaluation-suite sections (Gao §4.2–4.5, Michaud Figs 4, 7; method §C.4–C.7,
F.3, F.4).

Each test writes a small synthetic run (test_report's files plus the suite's metrics.csv columns and per-SAE
JSONs) into tmp_path and renders it, or calls a verdict function directly on a hand-made table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from test_report import XSS, XSS_ESCAPED, _config, _skip_png_encoding, _write, write_run

from saescale import paths
from saescale.config import validate
from saescale.report import suite_sections as ss
from saescale.report import suite_verdicts as sv
from saescale.report.render import num, render_report

TASKS = {"in_string": 0.125, "digit": 0.25, "never_true": 0.0}  # positive rates; the last is not probed
FILES = ("probes", "ablation", "geometry", "interpret", "reconstruction", "dashboard")
# metrics.csv columns by the file they are merged from (first matching prefix)
COLUMN_FILES = {"probe": "probes", "ablation": "ablation", "freq": "geometry", "alpha": "geometry",
                "nn": "geometry", "average_max_decoder": "geometry", "n2g_delta_ce": "reconstruction",
                "bigram": "reconstruction", "sae_delta_ce": "reconstruction", "n2g": "interpret"}


def _suite_numbers(n: int, k: int, flip: bool = False) -> dict:
    """metrics.csv suite columns that follow the papers: better with n, N2G easier and ablations sparser at
    small k ... `flip` reverses every trend with n."""
    g = math.log2(n / 32) * (-1 if flip else 1)
    return {"probe_loss": 0.4 - 0.05 * g, "probe_loss_post": 0.41 - 0.05 * g, "probe_loss_resid": 0.45,
            "ablation_sparsity": 0.12 * (k / 4) ** -0.2 * 2 ** (-0.1 * g), "ablation_sparsity_resid": 0.4,
            "n2g_precision": 0.6, "n2g_recall": 0.3 + 0.05 * g - 0.02 * math.log2(k / 4),
            "n2g_f1": 0.35 + 0.05 * g - 0.05 * math.log2(k / 4),
            "n2g_delta_ce": 0.2 * 2 ** (-0.3 * g) * (k / 4) ** 0.3, "bigram_delta_ce": 0.1,
            "sae_delta_ce_c6": 0.01, "freq_slope": -0.7, "alpha_paper": 0.7, "alpha_model": -0.3,
            "average_max_decoder_cosine_sim": 0.4, "nn_random_mean": 0.3, "nn_above_0.9": 1,
            "nn_above_0.97": 0}


def _hist(values, lo: float, hi: float, bins: int) -> dict:
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def _probes(s: dict) -> dict:
    cols = {"pre": "probe_loss", "post": "probe_loss_post", "resid": "probe_loss_resid"}
    tasks = {name: {t: {"loss": s[col] - 0.01 * i, "column": 3 + i, "train_loss": 0.3, "baseline": 0.5}
                    for i, t in enumerate(["in_string", "digit"])} for name, col in cols.items()}
    return {"feature_sets": {name: {"mean_loss": s[col], "n_tasks": 2, "tasks": tasks[name]}
                             for name, col in cols.items()}, "positive_rate": TASKS}


def _ablation(s: dict) -> dict:
    def part(mean: float, sem: float) -> dict:
        return {"mean": mean, "sem": sem, "n_pairs": 64, "histogram": _hist([mean] * 64, 0, 1, 50)}
    return {"horizon": 16, "vocab": 300, "latents": part(s["ablation_sparsity"], 0.002),
            "channels": part(s["ablation_sparsity_resid"], 0.01)}


def _geometry(n: int) -> dict:
    ranks = np.arange(1, n + 1)
    fit = {"slope": -0.7, "intercept": -1.0, "alpha_paper": 0.7, "alpha_model": -0.3,
           "rank_range": [4, n // 2], "r2": 0.98, "flagged": True, "n_alive": n}
    near = {"count": 0, "fraction": 0.0, "latent_alive_neighbour_alive": 0, "latent_alive_neighbour_dead": 0}
    return {"frequency_fit": fit,
            "frequency_curve": {"rank": ranks.tolist(), "frequency": (0.3 * ranks ** -0.7).tolist()},
            "nn": {"mean": 0.4, "histogram": _hist(np.linspace(0.2, 0.95, n), -1, 1, 200),
                   "thresholds": {"0.9": {"count": 1, "fraction": 1 / n}, "0.97": near}},
            "nn_random": {"mean": 0.3, "expected_mean": 0.31,
                          "histogram": _hist(np.linspace(0.2, 0.4, n), -1, 1, 200)}}


def _interpret(s: dict, n: int, reconstruction: bool) -> dict:
    out = {"latents_sampled": 16, "n2g_never_fires": 2,
           "n2g": {c: s[f"n2g_{c}"] for c in ("precision", "recall", "f1")}}
    if reconstruction:
        out["reconstruction"] = {**{part: {"delta_ce": s[col]} for part, col in (
            ("sae", "sae_delta_ce_c6"), ("n2g", "n2g_delta_ce"), ("bigram", "bigram_delta_ce"))},
            "delta_ce_zero_ablation": 1.5, "latents_explained": n}
    return out


def write_suite(cfg: dict, flip: bool = False, columns: bool = True, files=FILES) -> None:
    """The suite's `files` for every SAE of `cfg` (a test_report run must be written first) and, when
    `columns`, the metrics.csv columns merged from them."""
    where = {"subject": "tiny", "layer": 0}
    rows = []
    for r in pd.read_csv(paths.fmt(paths.METRICS, **where)).to_dict("records"):
        job = {**where, "arch": r["arch"], "n": int(r["n"]), "k": int(r["k"])}
        s = _suite_numbers(job["n"], job["k"], flip)
        owner = {c: next(f for prefix, f in COLUMN_FILES.items() if c.startswith(prefix)) for c in s}
        rows.append({**r, **{c: v for c, v in s.items() if columns and owner[c] in files}})
        ident = {**job, "base_arch": job["arch"]}
        out = {"probes": (paths.fmt(paths.METRIC, **job, metric="probes"), _probes(s)),
               "ablation": (paths.fmt(paths.METRIC, **job, metric="ablation"), _ablation(s)),
               "geometry": (paths.fmt(paths.METRIC, **job, metric="geometry"), _geometry(job["n"])),
               "interpret": (paths.fmt(paths.INTERPRET, **job),
                             _interpret(s, job["n"], "reconstruction" in files))}
        for name, (path, data) in out.items():
            if name in files:
                _write(path, {**ident, **data})
        if "dashboard" in files:
            records = [json.dumps({**ident, "latent": i, "dashboard": i < 5}) for i in range(16)]
            Path(paths.fmt(paths.INTERPRET_RECORDS, **job)).write_text("\n".join(records) + "\n")
            _write(paths.fmt(paths.DASHBOARD, **job), {})
    _write(paths.fmt(paths.METRICS, **where), pd.DataFrame(rows))


def render(tmp_path: Path, monkeypatch, cfg: dict | None = None, out: str = "reports/report.html",
           **suite) -> str:
    cfg = cfg or _config()
    monkeypatch.chdir(tmp_path)
    write_run(cfg)
    write_suite(cfg, **suite)
    render_report(cfg, out, figures_dir="reports/figures")
    return Path(out).read_text()


def _config_with(**settings) -> dict:
    base = _config()
    return validate({**{k: base[k] for k in ("subjects", "sweep", "train", "report")}, **settings})


def _section(html: str, name: str) -> str:
    start = html.index(f'<section id="{name}">')
    return html[start:html.index("</section>", start)]


# ---- the report --------------------------------------------------------------------------------------

def test_suite_sections_render_with_figures_numbers_and_verdicts(tmp_path, monkeypatch):
    html = render(tmp_path, monkeypatch)
    for name, number in (("probes", 11), ("n2g", 12), ("reconstruction", 13), ("ablation", 14),
                         ("geometry", 15), ("autointerp", 16), ("dashboards", 17)):
        assert f'href="#{name}"' in html and f"<h2>{number}. " in _section(html, name)
    assert "<h2>20. Files</h2>" in html
    s = _suite_numbers(64, 8)
    assert f"<td>{num(s['probe_loss'])}</td>" in _section(html, "probes")
    assert "<td>12.5%</td>" in _section(html, "probes")  # positive rate from probes.json
    assert f"<td>{num(s['n2g_delta_ce'])}</td>" in _section(html, "reconstruction")
    assert "2 (12.5%)" in _section(html, "n2g")  # explanations that never fire, of 16 sampled
    # probe loss, N2G, reconstruction, ablation, frequency-rank, nearest neighbours
    assert html.count('class="verdict agrees"') == 6 and 'class="verdict disagrees"' not in html
    assert "Probe loss (C.4): agrees with the paper" in html  # the summary of findings
    assert "Flagged fits" in _section(html, "geometry")
    assert "LLM autointerp is off (interpret.autointerp.backend: none)" in html
    for fig in ("probes", "n2g", "reconstruction", "ablation", "ablation_hist", "frequency", "nn"):
        png = tmp_path / "reports" / "figures" / f"tiny-L0_suite_{fig}.png"
        assert png.read_bytes().startswith(b"\x89PNG")
    sae = {"subject": "tiny", "layer": 0, "arch": "{arch}", "n": "{n}", "k": "{k}"}
    assert paths.fmt(paths.METRIC, **sae, metric="probes") in html  # listed under Files


def test_reversed_trends_make_the_verdicts_disagree(tmp_path, monkeypatch):
    _skip_png_encoding(monkeypatch)
    html = render(tmp_path, monkeypatch, flip=True)
    for name in ("probes", "n2g", "reconstruction", "ablation"):
        assert 'class="verdict disagrees"' in _section(html, name)
    assert "Probe loss (C.4): does not agree with the paper" in html


def test_metrics_that_did_not_run_name_the_config_key(tmp_path, monkeypatch):
    _skip_png_encoding(monkeypatch)
    cfg = _config_with(evaluate={"probes": {"enabled": False}, "geometry": {"archs": ["relu"]}},
                       interpret={"reconstruction": {"n": []}})
    html = render(tmp_path, monkeypatch, cfg, files=("ablation", "interpret"))
    assert "evaluate.probes.enabled is false" in _section(html, "probes")
    assert "evaluate.geometry.archs / evaluate.geometry.n select none" in _section(html, "geometry")
    assert "interpret.reconstruction.n is []" in _section(html, "reconstruction")
    assert "page missing" in _section(html, "dashboards")  # interpret ran, the dashboard rule did not
    assert 'class="verdict agrees"' in _section(html, "ablation")
    assert "No numbers for Probe loss (C.4)" in html


def test_result_files_without_metrics_columns_are_reported(tmp_path, monkeypatch):
    _skip_png_encoding(monkeypatch)
    html = render(tmp_path, monkeypatch, columns=False, files=("probes",))
    assert "metrics.csv has no probe_loss values" in _section(html, "probes")
    assert "did not run yet: evaluate.ablation is on for 4" in _section(html, "ablation")


def test_dashboard_links_are_relative_to_the_report(tmp_path, monkeypatch):
    _skip_png_encoding(monkeypatch)
    html = render(tmp_path, monkeypatch, out="out/deep/report.html")
    assert 'href="../../reports/latents/tiny/L0/topk/n32_k4.html"' in _section(html, "dashboards")
    assert "<td>5</td>" in _section(html, "dashboards")  # records with dashboard: true
    job = {"subject": "tiny", "layer": 0, "arch": "topk", "n": 32, "k": 4}
    assert ss.dashboard_href(job, "reports") == "latents/tiny/L0/topk/n32_k4.html"
    odd = ss.dashboard_href({**job, "subject": 'a b"&<c>'}, "reports")
    assert odd == "latents/a%20b%22%26%3Cc%3E/L0/topk/n32_k4.html"


def test_autointerp_numbers_and_text_from_files_are_escaped(tmp_path, monkeypatch):
    _skip_png_encoding(monkeypatch)
    cfg = _config_with(interpret={"autointerp": {"backend": "openai", "model": XSS, "base_url": "http://localhost:1/v1"}})
    monkeypatch.chdir(tmp_path)
    write_run(cfg)
    write_suite(cfg)
    job = {"subject": "tiny", "layer": 0, "arch": "topk", "n": 64, "k": 8}
    _write(paths.fmt(paths.AUTOINTERP, **job), {**job, "n_latents": 16, "n_ok": 15, "n_failed": 1,
                                                "mean_accuracy": 0.8125, "mean_auroc": 0.875})
    probes = json.loads(Path(paths.fmt(paths.METRIC, **job, metric="probes")).read_text())
    probes["positive_rate"][XSS] = 0.5  # a user task name
    _write(paths.fmt(paths.METRIC, **job, metric="probes"), probes)
    render_report(cfg, "reports/report.html")
    html = Path("reports/report.html").read_text()
    section = _section(html, "autointerp")
    assert "<td>15</td>" in section and "<td>0.812</td>" in section and "<td>0.875</td>" in section
    assert XSS not in html and XSS_ESCAPED in section and XSS_ESCAPED in _section(html, "probes")


# ---- verdicts ----------------------------------------------------------------------------------------

def _grid(col: str, f, archs=("topk",), ns=(32, 64, 128), ks=(4, 8)) -> pd.DataFrame:
    return pd.DataFrame([{"arch": a, "n": n, "k": k, "l0": k, col: f(a, n, k)}
                         for a in archs for n in ns for k in ks])


def test_probe_loss_must_fall_with_n_and_topk_beat_relu():
    falls = _grid("probe_loss", lambda a, n, k: 0.5 - 0.01 * math.log2(n) + (0.05 if a == "relu" else 0),
                  archs=("topk", "relu"))
    assert sv.probe_verdict(falls).agrees is True
    assert sv.probe_verdict(falls.assign(probe_loss=1 - falls["probe_loss"])).agrees is False
    flat = falls[falls["arch"] == "topk"].assign(probe_loss=0.4)
    v = sv.probe_verdict(flat)
    assert v.agrees is False and "flat" in v.text  # a flat trend is not an improvement
    assert sv.probe_verdict(flat[flat["n"] == 32]).agrees is None


def _probed(losses: dict[str, list[float]]) -> pd.DataFrame:
    """TopK and ReLU at one n and L0 with per-task probe losses (metrics.csv's probe_task_losses)."""
    rows = [{"arch": arch, "n": 64, "k": 8, "l0": 8.0, "probe_loss": sum(v) / len(v),
             "probe_task_losses": json.dumps({f"t{i}": x for i, x in enumerate(v)})} for arch, v in losses.items()]
    return pd.DataFrame(rows)


def test_topk_below_relu_in_probe_loss_is_judged_on_the_paired_task_differences():
    """Tasks differ in difficulty far more than the SAEs do; pairing by task removes that. The same two means can
    agree (every task a little lower) or say nothing (the tasks disagree)."""
    relu = [0.20, 0.45, 0.30, 0.60, 0.35, 0.50]
    consistent = _probed({"topk": [x - 0.02 for x in relu], "relu": relu})
    v = sv.probe_verdict(consistent)
    assert v.agrees is True and "difference ±" in " ".join(v.held)
    noisy = _probed({"topk": [x + d for x, d in zip(relu, (-0.10, 0.08, -0.09, 0.07, -0.06, -0.02))], "relu": relu})
    assert sv.probe_verdict(noisy).agrees is None  # the mean is 0.02 lower, within the per-task noise
    worse = _probed({"topk": [x + 0.03 for x in relu], "relu": relu})
    assert sv.probe_verdict(worse).agrees is False
    without_tasks = consistent.drop(columns="probe_task_losses")
    assert sv.probe_verdict(without_tasks).agrees is True  # the point values, as before


def test_n2g_judges_the_papers_words_higher_recall_worse_precision_better_f1():
    m = pd.DataFrame({"arch": ["topk", "relu"], "n": 64, "k": 8, "l0": 8.0, "n2g_precision": [0.6, 0.62],
                      "n2g_recall": [0.4, 0.25], "n2g_f1": [0.48, 0.35]})
    v = sv.n2g_verdict(m)
    assert v.agrees is True and "recall × 1.6" in v.text and "Figs. 24 and 25" in v.source
    assert v.quote.startswith("TopK beats ReLU on N2G F1 score")
    # recall only 1.2× ReLU's is still "higher": the paper gives no ratio (the 1.5× was not the paper's)
    assert sv.n2g_verdict(m.assign(n2g_recall=[0.3, 0.25])).agrees is True
    lower_recall = sv.n2g_verdict(m.assign(n2g_recall=[0.2, 0.25]))
    assert lower_recall.agrees is False and any("recall" in f for f in lower_recall.failed)
    better_precision = sv.n2g_verdict(m.assign(n2g_precision=[0.7, 0.62]))
    assert better_precision.agrees is False and any("precision" in f for f in better_precision.failed)


def test_ablation_sparsity_ignores_k_near_d_model_and_compares_with_channels():
    m = _grid("ablation_sparsity", lambda a, n, k: 0.2 * k ** -0.3 * n ** -0.05, ks=(4, 8, 64)).assign(
        d_model=32, ablation_sparsity_resid=0.5)
    m.loc[m["k"] == 64, "ablation_sparsity"] = 0.9  # k = 2 d_model: dense, left out of the k trend ...
    assert sv.ablation_verdict(m).agrees is False  # ... but not of the comparison with channels
    assert sv.ablation_verdict(m[m["k"] < 64]).agrees is True
    assert sv.ablation_verdict(m[m["k"] < 64].assign(ablation_sparsity_resid=0.01)).agrees is False


def test_reconstruction_delta_ce_must_fall_with_n_and_rise_with_k():
    m = _grid("n2g_delta_ce", lambda a, n, k: 0.3 * n ** -0.2 * k ** 0.2)
    assert sv.reconstruction_verdict(m).agrees is True
    assert sv.reconstruction_verdict(m.assign(n2g_delta_ce=1 / m["n2g_delta_ce"])).agrees is False


def _geo(slope: float, r2: float = 0.95, above: float = 0.001, alive_dead=(0, 0), nn=0.4) -> dict:
    near = {"fraction": above, "latent_alive_neighbour_alive": alive_dead[0],
            "latent_alive_neighbour_dead": alive_dead[1]}
    return {"arch": "topk", "n": 4096, "k": 8, "frequency_fit": {"slope": slope, "r2": r2},
            "nn": {"mean": nn, "thresholds": {"0.97": near}}, "nn_random": {"mean": 0.13}}


def test_frequency_rank_slope_must_be_a_power_law_shallower_than_minus_one():
    assert sv.frequency_verdict([_geo(-0.74)]).agrees is True
    assert sv.frequency_verdict([_geo(-1.3)]).agrees is False
    assert sv.frequency_verdict([_geo(-0.6, r2=0.5)]).agrees is False
    assert sv.frequency_verdict([]).agrees is None


def test_nearest_neighbours_above_random_few_near_one_with_dead_neighbours():
    v = sv.nn_verdict([_geo(-0.7)])
    assert v.agrees is True and "cannot be checked" in v.note
    assert sv.nn_verdict([_geo(-0.7, alive_dead=(1, 3))]).agrees is True
    assert sv.nn_verdict([_geo(-0.7, alive_dead=(3, 1))]).agrees is False
    assert sv.nn_verdict([_geo(-0.7, above=0.05)]).agrees is False
    assert sv.nn_verdict([_geo(-0.7, nn=0.1)]).agrees is False


def test_not_run_notes_name_the_key_that_selects_each_metric():
    def note(stage: str, **settings) -> str:
        cfg = _config_with(**settings)
        jobs = [{"subject": "tiny", "layer": 0, "arch": "topk", "n": n, "k": 8} for n in (32, 64)]
        recon = cfg["interpret"]["reconstruction"]["n"]
        interpret = jobs if cfg["interpret"]["enabled"] else []
        selected = {"probes": [], "ablation": [], "geometry": [], "interpret": interpret,
                    "reconstruction": [j for j in interpret if recon is None or j["n"] in recon]}
        return ss.not_run("X", stage, cfg, {"jobs": jobs, "selected": selected})
    assert "interpret.enabled is false" in note("reconstruction", interpret={"enabled": False})
    assert "interpret.reconstruction.n selects none" in note("reconstruction",
                                                             interpret={"reconstruction": {"n": [128]}})
    assert "did not run yet: interpret.reconstruction.n is on for 2" in note("reconstruction")
    assert "evaluate.ablation.archs / evaluate.ablation.n select none of this layer's 2" in note(
        "ablation", evaluate={"ablation": {"n": [4096]}})


def test_the_real_sae_geometry_row_reads_the_saebench_named_nn_column():
    """metrics.csv's average_max_decoder_cosine_sim (SAEBench's name for the mean nearest-neighbour decoder
    cosine) fills the 'nn cosine mean' cell of the manifolds section's table of this run's SAEs."""
    from saescale.report.manifold_sections import real_sae_rows

    s = _suite_numbers(64, 8)
    m = pd.DataFrame([{"arch": "topk", "n": 64, "k": 8, **s}])
    out = real_sae_rows([{"subject": "tiny", "layer": 0, "metrics_all": m}], beta=None)
    row = dict(zip(out["columns"], out["rows"][0]))
    assert row["nn cosine mean"] == num(s["average_max_decoder_cosine_sim"], 3) == "0.4"
    assert row["random"] == "0.3"
