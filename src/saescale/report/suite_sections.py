"""Template context of the evaluation-suite sections: probe loss, N2G explanations, explanation
reconstruction, ablation sparsity (Gao §4.2–4.5, method §C.4–C.7), latent geometry (Michaud Figs 4, 7;
F.3, F.4), LLM autointerp and the feature-dashboard index.

Headline numbers come from metrics.csv (the suite columns `scaling.collect` merges in); distributions from
the per-SAE files `render.load_suite` reads. Verdicts are pure functions of those (`suite_verdicts`), built on
`comparison.Verdict`. A metric that did not run gets a note naming the config key that turns it on.
"""

from __future__ import annotations

import os
from urllib.parse import quote

import pandas as pd

from saescale import paths
from saescale.report import comparison as cmp
from saescale.report import suite_figures as sf
from saescale.report.arch_sections import verdict_view
from saescale.report.suite_verdicts import (
    _finite_rows,
    _name,
    _span,
    ablation_verdict,
    frequency_verdict,
    n2g_verdict,
    nn_verdict,
    probe_verdict,
    reconstruction_verdict,
)
from saescale.report.tables import _col, _isnum, num, pct, table, text

SELECTOR = {"probes": "evaluate.probes", "ablation": "evaluate.ablation", "geometry": "evaluate.geometry",
            "interpret": "interpret", "reconstruction": "interpret.reconstruction.n"}  # what selects SAEs


def headline(title: str, v: cmp.Verdict) -> str:
    """The line of the summary of findings for one suite section."""
    if v.agrees is None and not v.tally:
        return f"{title}: cannot tell. {v.note}"
    fails = f"; fails: {'; '.join(v.failed)}" if v.failed else ""
    label = "cannot tell" if v.agrees is None else f"{v.label} with the paper"
    return f"{title}: {label} ({v.tally}{fails})."


def not_run(what: str, stage: str, config: dict, suite: dict) -> str:
    """Why a metric has no numbers for this layer, naming the config key that turns it on."""
    base = "interpret" if stage in ("interpret", "reconstruction") else f"evaluate.{stage}"
    settings = config["interpret"] if base == "interpret" else config["evaluate"][stage]
    selected, key = suite["selected"], SELECTOR[stage]
    if not settings["enabled"]:
        return f"{what} did not run: {base}.enabled is false in this configuration (true runs it)."
    if stage == "reconstruction" and settings["reconstruction"]["n"] == []:
        return f"{what} did not run: {key} is [] in this configuration (null: every SAE interpret runs on)."
    if not selected["interpret" if base == "interpret" else stage]:
        return (f"{what} did not run: {base}.archs / {base}.n select none of this layer's "
                f"{len(suite['jobs'])} SAEs (null selects all).")
    if not selected[stage]:
        return f"{what} did not run: {key} selects none of the SAEs interpret runs on (null: all)."
    return (f"{what} did not run yet: {key} is on for {len(selected[stage])} of this layer's SAEs, but no "
            "result was found (rerun the workflow; the Files section lists what is missing).")


# ---- tables --------------------------------------------------------------------------------------------

def dashboard_href(job: dict, report_dir: str) -> str:
    """The dashboard page of one SAE, relative to the report's folder and URL-quoted."""
    return quote(os.path.relpath(paths.fmt(paths.DASHBOARD, **job), report_dir).replace(os.sep, "/"))


def dashboard_rows(dashboards: list[dict], m: pd.DataFrame, report_dir: str) -> list[dict]:
    """One row per SAE interpret ran on: name, link (None when the page is missing), N2G F1, cards."""
    f1 = {(str(r.arch), int(r.n), int(r.k)): r.f1 for r in m.assign(f1=_col(m, "n2g_f1")).itertuples()}
    return [{"name": f"{d['arch']} n = {num(d['n'])} k = {num(d['k'])}",
             "href": dashboard_href(d, report_dir) if d["exists"] else None,
             "f1": num(f1.get((str(d["arch"]), int(d["n"]), int(d["k"])))),
             "shown": num(d["shown"]) if d["shown"] is not None else "—"} for d in dashboards]


def task_table(record: dict) -> dict:
    """Per probe task of one SAE: positive rate, entropy baseline, best loss (and column) per feature set."""
    sets = {s: (record.get("feature_sets") or {}).get(s) for s in ("pre", "post", "resid")}
    sets = {s: fs.get("tasks") or {} for s, fs in sets.items() if fs}
    rate = record.get("positive_rate") or {}
    rows = []
    for t in sorted(set(rate) | {t for tasks in sets.values() for t in tasks}):
        fits = [tasks.get(t) for tasks in sets.values()]
        base = next((f.get("baseline") for f in fits if f), None)
        rows.append([text(t), pct(rate.get(t)), num(base),
                     *(f"{num(f.get('loss'))} (#{text(f.get('column'))})" if f else "—" for f in fits)])
    label = {"pre": "SAE pre-activations", "post": "SAE latents (post)", "resid": "residual channels"}
    return table(["task", "positive rate", "entropy baseline", *(label[s] for s in sets)], rows)


def _split(t: dict) -> str:
    """Latents above an nn threshold, split by latent → neighbour alive (a) or dead (d)."""
    parts = [f"{a[0]}→{b[0]} {num(t[f'latent_{a}_neighbour_{b}'])}"
             for a in ("alive", "dead") for b in ("alive", "dead") if t.get(f"latent_{a}_neighbour_{b}")]
    return num(t.get("count")) + (f" ({', '.join(parts)})" if parts else "")


# ---- sections -------------------------------------------------------------------------------------------

def _rows(m: pd.DataFrame, col: str, what: str, stage: str, suite: dict, config: dict,
          found: int) -> tuple[pd.DataFrame, str | None]:
    """metrics.csv rows with a finite `col`, or a note saying why there are none."""
    rows = _finite_rows(m, col) if col in m.columns else m.iloc[0:0]
    if not rows.empty:
        return rows, None
    if found:
        return rows, (f"{what}: {found} result file(s) were found but metrics.csv has no {col} values "
                      "(rerun the scaling rule, which merges them).")
    return rows, not_run(what, stage, config, suite)


def _pick(records: list[dict]) -> dict | None:
    """The SAE a per-SAE figure shows: topk if there (else the arch with most files), middle k, largest n."""
    if not records:
        return None
    archs = [str(r["arch"]) for r in records]
    arch = "topk" if "topk" in archs else max(archs, key=archs.count)
    mine = [r for r in records if str(r["arch"]) == arch]
    ks = sorted({r["k"] for r in mine})
    return max((r for r in mine if r["k"] == ks[len(ks) // 2]), key=lambda r: r["n"])


def _merge(rows: pd.DataFrame, records: list[dict], **cols) -> pd.DataFrame:
    """Add per-SAE values from metric JSONs (`cols`: name -> function of the record) to metrics rows."""
    extra = pd.DataFrame([{"arch": str(r["arch"]), "n": int(r["n"]), "k": int(r["k"]),
                           **{c: f(r) for c, f in cols.items()}} for r in records],
                         columns=["arch", "n", "k", *cols])
    return rows.merge(extra, on=["arch", "n", "k"], how="left")


def _cells(rows: pd.DataFrame, *cols: tuple[str, int]) -> list[list[str]]:
    """arch, n, k, then each (column, significant digits) of every row."""
    return [[text(r["arch"]), num(r["n"]), num(r["k"]), *(num(r.get(c), d) for c, d in cols)]
            for _, r in rows.iterrows()]


def probes_section(m: pd.DataFrame, suite: dict, config: dict, src: dict) -> dict:
    records = suite["records"]["probes"]
    rows, note = _rows(m, "probe_loss", "Probe loss", "probes", suite, config, len(records))
    if note:
        return {"note": note}
    v = probe_verdict(rows)
    series = [("probe_loss", "-", "SAE pre-activations")]
    if _col(rows, "probe_loss_post").notna().any():
        series.append(("probe_loss_post", "--", "SAE latents (post)"))
    resid = _col(rows, "probe_loss_resid")
    chosen = _pick(records)
    panel = {"title": "probe loss vs n", "ylabel": "mean probe loss (BCE, nats)", "series": series,
             "ref": (resid.median(), "residual channels")}
    return {
        "note": None, "verdict": verdict_view(v), "src": src["metrics"],
        "finding": headline("Probe loss (C.4)", v),
        "fig": sf.metric_vs_n(rows, [panel]),
        "caption": "Gao Fig. 6a analogue: mean over tasks of the held-out loss of the best single-column 1-D "
                   "logistic probe, against n, a line per k; dash-dotted: the same on the residual channels "
                   f"(median over SAEs). {v.short}",
        "table": table(["arch", "n", "k", "L0", "pre-activations", "latents (post)", "residual channels"],
                       _cells(rows, ("l0", 3), ("probe_loss", 4), ("probe_loss_post", 4),
                              ("probe_loss_resid", 4))),
        "resid": f"The best SAE pre-activation beats the best residual channel in "
                 f"{int((rows['probe_loss'] < resid).sum())} of {len(rows)} SAEs (residual channels: "
                 f"{_span(resid, 4)}).",
        "chosen": chosen and {"name": _name(chosen), "table": task_table(chosen), "src": src["probes"]}}


def n2g_section(m: pd.DataFrame, suite: dict, config: dict, src: dict) -> dict:
    records = suite["records"]["interpret"]
    rows, note = _rows(m, "n2g_f1", "N2G explanations", "interpret", suite, config, len(records))
    if note:
        return {"note": note}
    rows = _merge(rows, records, sampled=lambda r: r.get("latents_sampled"),
                  never=lambda r: r.get("n2g_never_fires"))
    spread = {(str(d["arch"]), int(d["n"]), int(d["k"])): d.get("n2g_se") or {} for d in suite["dashboards"]}
    rows = _merge(rows, [{"arch": a, "n": n, "k": k} for a, n, k in spread],
                  **{f"n2g_{c}_se": (lambda r, c=c: spread[(r["arch"], r["n"], r["k"])].get(f"n2g_{c}_se"))
                     for c in ("precision", "recall", "f1")})
    rows["never_share"] = _col(rows, "never") / _col(rows, "sampled")
    v = n2g_verdict(rows)
    panels = [{"title": t, "ylabel": t, "series": [(c, "-", "N2G")]} for c, t in
              (("n2g_precision", "precision"), ("n2g_recall", "recall"), ("n2g_f1", "F1"),
               ("never_share", "share never firing"))]
    def with_se(r, c: str) -> str:
        se = r.get(f"{c}_se")
        return num(r.get(c), 3) + (f" ± {num(se, 2)}" if _isnum(se) else "")
    cells = [[text(r["arch"]), num(r["n"]), num(r["k"]), num(r.get("l0"), 3),
              *(with_se(r, c) for c in ("n2g_precision", "n2g_recall", "n2g_f1")), num(r.get("sampled"), 4),
              f"{num(r['never'])} ({pct(r['never_share'])})"] for _, r in rows.iterrows()]
    never = rows["never_share"].dropna()
    return {
        "note": None, "verdict": verdict_view(v), "src": src["interpret"],
        "finding": headline("N2G explanations (C.5)", v), "fig": sf.metric_vs_n(rows, panels),
        "caption": "Gao Figs. 24/25 analogue: N2G precision, recall and F1 against n, a line per k, and the "
                   "share of sampled latents whose explanation never fires on the eval tokens (their "
                   f"precision is undefined and left out of the mean, their F1 counts as 0). {v.short}",
        "table": table(["arch", "n", "k", "L0", "precision ± se", "recall ± se", "F1 ± se", "latents sampled",
                        "explanation never fires"], cells),
        "never": (f"Explanations that never fire: {_span([100 * x for x in never], 3)}% of the sampled "
                  "latents." if len(never) else "")}


def reconstruction_section(m: pd.DataFrame, suite: dict, config: dict, src: dict) -> dict:
    records = [r for r in suite["records"]["interpret"] if r.get("reconstruction")]
    rows, note = _rows(m, "n2g_delta_ce", "Explanation reconstruction", "reconstruction", suite, config,
                       len(records))
    if note:
        return {"note": note}
    rows = _merge(rows, records, zero=lambda r: r["reconstruction"].get("delta_ce_zero_ablation"),
                  explained=lambda r: r["reconstruction"].get("latents_explained"))
    v = reconstruction_verdict(rows)
    bigram = _col(rows, "bigram_delta_ce")
    better = int((rows["n2g_delta_ce"] < bigram).sum())
    lower = ["—" if not cmp._ok(b) else "N2G" if e < b else "bigram"
             for e, b in zip(rows["n2g_delta_ce"], bigram)]
    series = [("n2g_delta_ce", "-", "N2G-simulated codes"), ("bigram_delta_ce", "--", "bigram baseline"),
              ("sae_delta_ce_c6", ":", "the SAE itself")]
    panel = {"title": "ΔCE of simulated codes vs n", "ylabel": "ΔCE (nats/token)", "series": series}
    cells = _cells(rows, ("sae_delta_ce_c6", 4), ("n2g_delta_ce", 4), ("bigram_delta_ce", 4), ("zero", 4),
                   ("explained", 4))
    return {
        "note": None, "verdict": verdict_view(v), "src": src["interpret"],
        "finding": headline("Explanation reconstruction (C.6)", v),
        "fig": sf.metric_vs_n(rows, [panel], log_y=True),
        "caption": "Gao Fig. 8 analogue: ΔCE when the residual stream is replaced by the decoded "
                   "N2G-simulated codes (each latent's simulation scaled by its least-squares factor), by a "
                   f"bigram-only explanation, and by the SAE's own codes, against n, a line per k. {v.short}",
        "table": table(["arch", "n", "k", "ΔCE SAE", "ΔCE N2G", "ΔCE bigram", "ΔCE zero ablation",
                        "latents explained", "lower ΔCE"], [c + [w] for c, w in zip(cells, lower)]),
        "bigram": f"N2G explanations reconstruct better (lower ΔCE) than the bigram baseline in {better} of "
                  f"{len(rows)} SAEs" + (", so here the bigram baseline is the stronger explanation."
                                         if better * 2 < len(rows) else ".")}


def ablation_section(m: pd.DataFrame, suite: dict, config: dict, src: dict) -> dict:
    records = suite["records"]["ablation"]
    rows, note = _rows(m, "ablation_sparsity", "Ablation sparsity", "ablation", suite, config, len(records))
    if note:
        return {"note": note}
    rows = _merge(rows, records, sem=lambda r: r["latents"].get("sem"),
                  sem_ch=lambda r: r["channels"].get("sem"), pairs=lambda r: r["latents"].get("n_pairs"),
                  vt=lambda r: f"{r.get('vocab')} × {r.get('horizon')}")
    v = ablation_verdict(rows)
    s, ch = rows["ablation_sparsity"], _col(rows, "ablation_sparsity_resid")
    chosen = _pick(records)
    cells = [[text(r["arch"]), num(r["n"]), num(r["k"]),
              f"{num(r['ablation_sparsity'], 3)} ± {num(r['sem'], 2)}",
              f"{num(c, 3)} ± {num(r['sem_ch'], 2)}",
              num(r["ablation_sparsity"] / c, 3), num(r["pairs"]), text(r["vt"])]
             for (_, r), c in zip(rows.iterrows(), ch)]
    panel = {"title": "ablation sparsity vs n", "ylabel": "ablation sparsity S",
             "series": [("ablation_sparsity", "-", "SAE latents (± sem)")],
             "err": {"ablation_sparsity": "sem"}, "ref": (ch.median(), "residual channels")}
    return {
        "note": None, "verdict": verdict_view(v), "src": src["metrics"], "ablation_src": src["ablation"],
        "finding": headline("Ablation sparsity (C.7)", v), "fig": sf.metric_vs_n(rows, [panel]),
        "caption": "Gao Fig. 6b analogue: mean ablation sparsity S = (‖v‖₁/‖v‖₂)² / (V·T) of the "
                   "median-centred logit changes over T positions after removing one active latent, ± sem, "
                   "against n, a line per k; dash-dotted: one residual channel instead (median over SAEs). "
                   f"{v.short}",
        "table": table(["arch", "n", "k", "S latents ± sem", "S channels ± sem", "latents / channels",
                        "pairs", "V × T"], cells),
        "level": f"Latents' S here: {_span(s)}; channels' {_span(ch.dropna())} (paper, GPT-2: ≈ 0.10–0.14 "
                 "for latents [approximate], with V = 50257).",
        "hist": sf.ablation_histograms(chosen) if chosen else None,
        "hist_caption": chosen and f"Distribution of S over (position, latent) and (position, channel) pairs "
                                   f"for {_name(chosen)}; dashed: the means."}


def geometry_section(suite: dict, config: dict, src: dict) -> dict:
    records = sorted(suite["records"]["geometry"], key=lambda r: (str(r["arch"]), r["k"], r["n"]))
    if not records:
        return {"note": not_run("Latent geometry", "geometry", config, suite)}
    freq, nn = frequency_verdict(records), nn_verdict(records)
    cells, flagged = [], []
    for r in records:
        f, nn_r, rnd = r.get("frequency_fit") or {}, r.get("nn") or {}, r.get("nn_random") or {}
        ranks = "–".join(num(x) for x in f.get("rank_range") or [])
        if f.get("flagged") and f"{num(r['n'])} (ranks {ranks})" not in flagged:
            flagged.append(f"{num(r['n'])} (ranks {ranks})")
        cells.append([text(r["arch"]), num(r["n"]), num(r["k"]), num(f.get("n_alive")),
                      *(num(f.get(c), 3) for c in ("slope", "alpha_paper", "alpha_model")),
                      ranks + (" ⚑" if f.get("flagged") else ""), num(f.get("r2"), 3),
                      num(nn_r.get("mean"), 3),
                      f"{num(rnd.get('mean'), 3)} ({num(rnd.get('expected_mean'), 3)})",
                      *(_split((nn_r.get("thresholds") or {}).get(t) or {}) for t in ("0.9", "0.97"))])
    columns = ["arch", "n", "k", "alive", "slope", "α paper", "α model", "ranks", "R²", "nn mean",
               "random (expected)", "> 0.9", "> 0.97"]
    return {
        "note": None, "src": src["geometry"], "freq": verdict_view(freq), "nn": verdict_view(nn),
        "finding": f"{headline('Frequency–rank power law (F.3)', freq)} "
                   f"{headline('Decoder nearest neighbours (F.4)', nn)}",
        "table": table(columns, cells), "fig": sf.frequency_rank(records),
        "caption": "Michaud Fig. 4 analogue: firing frequency of each alive latent against its rank, "
                   f"log-log, a line per n; dashed: the fitted power law over its rank range. {freq.short}",
        "nn_fig": sf.nn_histograms(records),
        "nn_caption": "Michaud Fig. 7 analogue: histogram (log counts) of each latent's largest cosine with "
                      "another decoder direction, a line per k, against n random unit vectors in the same "
                      f"dimension (grey dashed); dotted: 0.9 and 0.97. {nn.short}",
        "flagged": (f"⚑ Flagged fits: n < 2·10⁴, so the slope is fitted on ranks other than the paper's "
                    f"[10², 10⁴]: n = {', '.join(flagged)}." if flagged else "")}


def autointerp_section(suite: dict, config: dict, src: dict) -> dict:
    ai = config["interpret"]["autointerp"]
    if ai["backend"] == "none":
        return {"off": True}
    records = sorted(suite["records"]["autointerp"], key=lambda r: (str(r["arch"]), r["k"], r["n"]))
    if not records:
        return {"off": False, "note": not_run("LLM autointerp", "interpret", config, suite)}
    cells = [[text(r["arch"]), num(r["n"]), num(r["k"]),
              *(num(r.get(c)) for c in ("n_latents", "n_ok", "n_failed")),
              num(r.get("mean_accuracy"), 3), num(r.get("mean_auroc"), 3)] for r in records]
    return {"off": False, "note": None, "backend": f"{ai['backend']}: {text(ai['model'])}",
            "src": src["autointerp"],
            "table": table(["arch", "n", "k", "latents", "ok", "failed", "mean detection accuracy",
                            "mean AUROC"], cells)}


def suite_context(m: pd.DataFrame, suite: dict, config: dict, where: dict, report_dir: str) -> dict:
    """Sections 11-17 of one layer, their figures by name and one summary line per judged section."""
    sae = dict(where, arch="{arch}", n="{n}", k="{k}")
    src = {"metrics": paths.fmt(paths.METRICS, **where), "interpret": paths.fmt(paths.INTERPRET, **sae),
           "autointerp": paths.fmt(paths.AUTOINTERP, **sae),
           **{s: paths.fmt(paths.METRIC, **sae, metric=s) for s in paths.METRIC_NAMES}}
    out = {"probes": probes_section(m, suite, config, src), "n2g": n2g_section(m, suite, config, src),
           "reconstruction": reconstruction_section(m, suite, config, src),
           "ablation": ablation_section(m, suite, config, src),
           "geometry": geometry_section(suite, config, src),
           "autointerp": autointerp_section(suite, config, src)}
    dash = dashboard_rows(suite["dashboards"], m, report_dir)
    out["dashboards"] = {"rows": dash, "src": paths.fmt(paths.DASHBOARD, **sae),
                         "note": None if dash else not_run("Feature dashboards", "interpret", config, suite)}
    titles = {"probes": "Probe loss (C.4)", "n2g": "N2G explanations (C.5)",
              "reconstruction": "Explanation reconstruction (C.6)", "ablation": "Ablation sparsity (C.7)",
              "geometry": "Latent geometry (F.3, F.4)"}
    out["findings"] = [out[key]["finding"] for key in titles if out[key].get("finding")]
    absent = [title for key, title in titles.items() if not out[key].get("finding")]
    if absent:
        out["findings"].append(f"No numbers for {', '.join(absent)}: sections 11–15 name the config key that "
                               "turns each on.")
    out["fig"] = {"probes": out["probes"].get("fig"), "n2g": out["n2g"].get("fig"),
                  "reconstruction": out["reconstruction"].get("fig"), "ablation": out["ablation"].get("fig"),
                  "ablation_hist": out["ablation"].get("hist"), "frequency": out["geometry"].get("fig"),
                  "nn": out["geometry"].get("nn_fig")}
    return out
