"""Template context of the architecture sections: matched sparsity, TopK vs ReLU scaling, the dead-latent
ablation, progressive recovery and refinement (Gao Figs 2, 5a, 9, 10; App. C).

Numbers and verdicts come from `comparison`, figures from `arch_figures`; this module only picks the SAEs
of each section, formats cells and writes the captions. A section without data gets a `note` saying which
config key would produce it, never an error.
"""

from __future__ import annotations

import math

import pandas as pd

from saescale import paths
from saescale.report import arch_figures as af
from saescale.report import comparison as cmp
from saescale.evaluate.dead_window import paper_comparison, window_text
from saescale.report.tables import _col, _isnum, dead_windows, num, pct, table, text

MAX_PANELS = 12  # more analysed SAEs than this: show those at compare_n only


CSS_CLASS = {True: "agrees", False: "disagrees", None: "unknown"}


def verdict_view(v: cmp.Verdict) -> dict:
    """A verdict for the template and the scorecard: its label and CSS class, the claim with this run's
    evidence (`text`), the paper's words and place, the paper's and this run's numbers, where its thresholds
    come from, and the section id it belongs to (`anchor`; render.py adds a unique element `id`)."""
    return {"label": v.label, "text": v.text, "cls": CSS_CLASS[v.agrees], "paper": v.paper, "quote": v.quote,
            "source": v.source, "paper_value": v.paper_value, "run_value": v.run_value or v.tally or "—",
            "thresholds": list(v.thresholds), "anchor": v.anchor}


def _cell(value: float, how: str | None) -> str:
    """A matched-L0 value: plain when interpolated, '≈' when it is the nearest SAE's (L0 within 15%)."""
    return "—" if how is None else ("≈" if how == "nearest" else "") + num(value)


def _l0_cell(l0: float, k: int) -> str:
    off = cmp.l0_offset(l0, k)
    if not math.isfinite(off):
        return f"— / {k}"
    flag = " ⚠" if abs(off) > cmp.L0_TOLERANCE else ""
    return f"{num(l0, 3)} / {k} ({off:+.0%}){flag}"


def matched_section(m: pd.DataFrame, n: int | None, styles: dict, src: dict) -> dict:
    """Figs 2a/5a: FVU and ΔCE against achieved L0 at n, the matched-L0 table and the ordering verdicts."""
    plain = m[~cmp.is_variant(m)]
    m_n = plain[plain["n"] == n] if n is not None else plain.iloc[0:0]
    if m_n["arch"].nunique() < 2:
        return {"note": f"Not run in this configuration: fewer than two architectures at n = {num(n)} (set "
                        "sweep.extra, e.g. {archs: [relu, gated, prolu], n: [...], k: [...]}, or "
                        "report.compare_n; workflow/configs/archs.yaml runs the full comparison)."}
    targets = sorted(int(k) for k in m_n["k"].unique())
    fvu = cmp.matched_table(m_n, "fvu", targets)
    dce = cmp.matched_table(m_n, "delta_ce", targets)
    l0 = cmp.best_covered_l0(fvu)
    l0_dce = cmp.best_covered_l0(dce)
    order = cmp.ordering_verdict(cmp.values_at(fvu, l0) if l0 else {}, l0 or math.nan)
    lowest = cmp.lowest_verdict(cmp.values_at(dce, l0_dce) if l0_dce else {}, l0_dce or math.nan)
    rows = []
    for arch, g in m_n.assign(l0=_col(m_n, "l0"), penalty=_col(m_n, "penalty")).groupby("arch"):
        g = g.sort_values("k")
        penalty = "; ".join(num(p) for p in g["penalty"]) if g["penalty"].notna().any() else "—"
        rows.append([arch, "; ".join(_l0_cell(r.l0, int(r.k)) for r in g.itertuples()), penalty,
                     *(_cell(*fvu[arch][t]) for t in targets)])
    finding = None
    if l0 is not None:
        failed = f" (fails: {'; '.join(order.failed)})" if order.failed else ""
        finding = (f"Architectures at n = {num(n)}, L0 = {num(l0)}: "
                   f"FVU {cmp.ranking(cmp.values_at(fvu, l0))}. "
                   f"Paper's TopK below ProLU and ReLU, ≈ Gated (Fig. 2a): {order.label}{failed}; "
                   f"TopK lowest ΔCE (Fig. 5a): {lowest.label}.")
    return {
        "note": None, "n": num(n), "finding": finding,
        "table": table(["arch", "achieved L0 / target (miss)", "λ (calibrated)",
                        *(f"FVU @ L0 = {t}" for t in targets)], rows),
        "order": verdict_view(order), "lowest": verdict_view(lowest),
        "fig": af.matched_sparsity(m_n, styles, targets),
        "caption": f"Fig. 2a / 5a analogue at n = {num(n)}: eval FVU (left) and ΔCE (right) against the "
                   "achieved L0, one line per architecture (variants left out); dotted: the target L0s. "
                   f"{order.short} {lowest.short}",
        "src": src["metrics"],
    }


def off_target(m: pd.DataFrame, tol: float = cmp.L0_TOLERANCE) -> pd.Series:
    """Penalty-arch SAEs (a calibrated λ) whose achieved L0 misses the target k by more than `tol`: compared
    at their k they would stand in for a sparsity they do not have (issue 19, item 6)."""
    penalized = _col(m, "penalty").notna()
    miss = (_col(m, "l0") / pd.to_numeric(m["k"], errors="coerce") - 1).abs() > tol
    return penalized & miss


def slopes_section(m: pd.DataFrame, styles: dict, src: dict) -> dict:
    """Fig 2b: FVU against n at each k shared by topk and relu, with log-log slopes. SAEs whose calibration
    missed its target L0 are left out (this figure compares at the target k, not at the achieved L0)."""
    miss = off_target(m) & m["arch"].astype(str).isin(["topk", "relu"])
    left_out = "; ".join(f"{r.arch} n = {num(r.n)}: L0 {num(r.l0, 3)} for target {num(r.k)}"
                         for r in m[miss].assign(l0=_col(m[miss], "l0")).itertuples())
    m = m[~miss]
    slopes = cmp.n_slopes(m, ("topk", "relu"))
    verdict = cmp.steeper_verdict(slopes)
    missed = (f" Left out, achieved L0 more than {cmp.L0_TOLERANCE:.0%} off its target: {left_out}."
              if left_out else "")
    if not slopes:
        return {"note": "Not run in this configuration: needs topk and relu each trained at >= 2 values of n "
                        "with a common k (add e.g. {archs: [relu], n: [...], k: [...]} to sweep.extra; "
                        "workflow/configs/archs.yaml does)." + missed}
    rows = [[num(s["k"]), num(s["topk"], 3), num(s["relu"], 3),
             "topk" if s["topk"] < s["relu"] else "relu"] for s in slopes]
    return {"note": None, "table": table(["k (target L0)", "slope topk", "slope relu", "steeper"], rows),
            "verdict": verdict_view(verdict), "fig": af.fvu_vs_n(m, slopes, styles),
            "caption": "Fig. 2b analogue: eval FVU against n at each target L0, topk and relu, log-log; the "
                       "legend gives the least-squares slope of log FVU on log n (relu's achieved L0 is "
                       f"within {cmp.L0_TOLERANCE:.0%} of its target, see the matched-L0 table).{missed} "
                       f"{verdict.short}",
            "src": src["metrics"]}


def dead_section(m: pd.DataFrame, logs: pd.DataFrame, n: int | None, styles: dict, src: dict) -> dict:
    """Dead fraction over training per arch at n, and the AuxK x tied-init ablation table (method §A.8)."""
    variants = set(m.loc[cmp.is_variant(m), "arch"].astype(str))
    at_n = logs[logs["n"] == n] if n is not None and "n" in logs.columns else logs.iloc[0:0]
    at_n = at_n.assign(dead_pct=100 * _col(at_n, "dead_fraction"))
    curves = None
    if at_n["arch"].nunique() > 1:  # one arch at n: the training-curves section already shows it
        curves = af.arch_training_curves(at_n, "dead_pct", "dead latents (%)", styles, variants)
    windows = dead_windows(m)
    train_window = f"train.dead_tokens = {window_text(windows['train'])}" if _isnum(windows["train"]) else \
        "train.dead_tokens"
    out = {"curves": curves, "n": num(n), "log_src": src["log"],
           "windows": {"eval": window_text(windows["eval"]), "train": train_window,
                       "paper": "; ".join(f"{key} window: {paper_comparison(windows[key])}" for key in ("train", "eval")
                                          if _isnum(windows[key]))},
           "curves_caption": f"Dead latents (no activation within the last {train_window} tokens) against "
                             f"training tokens at n = {num(n)}, one line per architecture; variants dashed."}
    rows = cmp.ablation_rows(m)
    if rows.empty:
        return {**out, "note": "The AuxK × tied-init ablation was not run in this configuration (add "
                               "variants of topk with train.auxk: false / train.tied_init: false to "
                               "sweep.variants and sweep.extra)."}
    verdict = cmp.ablation_verdict(rows)
    yes = {True: "yes", False: "no", None: "—"}
    numeric = ("train_dead_fraction", "dead_fraction", "dead_latents", "fvu")
    numbers = rows.assign(**{c: _col(rows, c) for c in numeric})
    cells = [[text(r.arch), num(r.n), num(r.k), yes[cmp.bool_cell(r.auxk)], yes[cmp.bool_cell(r.tied_init)],
              pct(r.train_dead_fraction), pct(r.dead_fraction), num(r.dead_latents), num(r.fvu)]
             for r in numbers.itertuples()]
    columns = ["arch", "n", "k", "AuxK", "tied init", f"dead, end of training (last {train_window})",
               f"dead, eval ({window_text(windows['eval'])})", "dead latents, eval", "FVU"]
    return {**out, "note": None, "verdict": verdict_view(verdict), "table": table(columns, cells),
            "cfg_src": src["cfg"], "metrics_src": src["metrics"]}


def _analysis_panels(records: list[dict], n: int | None) -> list[dict]:
    records = sorted(records, key=lambda r: (r["arch"], r["n"], r["k"]))
    return records if len(records) <= MAX_PANELS else [r for r in records if r["n"] == n][:MAX_PANELS]


def progressive_section(records: list[dict], n: int | None, styles: dict, pattern: str) -> dict:
    """Fig 10: test-time TopK(k') / JumpReLU(theta) sweeps per analysed SAE; where each stops improving."""
    if not records:
        return {"note": "Not run in this configuration (set analysis.progressive.archs and .n to SAEs that "
                        "are trained, e.g. topk, multitopk, relu)."}
    summaries = [{"arch": r["arch"], "base_arch": r["base_arch"], "n": r["n"],
                  **cmp.progressive_summary(r, r["k"])} for r in records]
    verdict = cmp.progressive_verdict(summaries)
    yes = {True: "yes", False: "no", None: "—"}
    rows = [[s["arch"], num(s["n"]), num(s["k"]), num((r.get("trained") or {}).get("fvu")), num(s["best_k"]),
             num(s["fvu_at_k"]), f"{num(s['fvu_last'])} (k' = {num(s['last_k'])})", pct(s["gain_beyond_k"]),
             yes[s["keeps_falling"]], yes[s["jump_keeps_falling"]], num(r.get("tokens"))]
            for r, s in zip(records, summaries)]
    columns = ["arch", "n", "k", "FVU as trained", "best k'", "FVU at k' = k", "FVU at largest k'",
               "gain beyond k", "TopK(k') keeps falling", "JumpReLU keeps falling", "tokens"]
    return {"note": None, "verdict": verdict_view(verdict), "src": pattern, "table": table(columns, rows),
            "fig": af.progressive(_analysis_panels(records, n), styles),
            "caption": "Fig. 10 analogue: FVU against L0 when the trained activation is replaced at test "
                       "time by TopK(k') (solid) or JumpReLU(θ) on the ReLU'd scores (dashed); star: as "
                       f"trained; dotted: training k. Log-log. {verdict.short}"}


def refinement_section(records: list[dict], m: pd.DataFrame, n: int | None, styles: dict,
                       pattern: str) -> dict:
    """Fig 9: how refining the nonzero values on a fixed support changes activations, FVU and ΔCE."""
    if not records:
        return {"note": "Not run in this configuration (set analysis.refinement.archs and .n, e.g. topk and "
                        "relu)."}
    verdict = cmp.refinement_verdict(records)
    eval_fvu = {(str(r.arch), int(r.n), int(r.k)): r.fvu for r in m.assign(fvu=_col(m, "fvu")).itertuples()}
    rows = []
    for r in sorted(records, key=lambda r: (r["arch"], r["n"], r["k"])):
        g = r.get
        rows.append([r["arch"], num(r["n"]), num(r["k"]), num(eval_fvu.get((r["arch"], r["n"], r["k"]))),
                     *(num(g(c)) for c in ("fvu_before", "fvu_after", "delta_ce_before", "delta_ce_after")),
                     num(g("mean_relative_change"), 3), pct(g("fraction_increased")), pct(g("fraction_zeroed")),
                     num(g("mean_change"), 3),
                     f"{num(g('mean_activation_before'), 3)} → {num(g('mean_activation_after'), 3)}",
                     num(g("tokens"))])
    columns = ["arch", "n", "k", "eval FVU (metrics.csv)", "FVU before", "FVU after", "ΔCE before",
               "ΔCE after", "mean relative change", "share increased", "share set to 0", "mean change",
               "mean activation",
               "tokens"]
    return {"note": None, "verdict": verdict_view(verdict), "src": pattern, "table": table(columns, rows),
            "fig": af.refinement_histograms(_analysis_panels(records, n), styles),
            "caption": "Fig. 9a analogue: distribution of log2(after / before) of each nonzero activation "
                       "when its values are re-fitted by non-negative least squares on the encoder's support "
                       "(activations refinement sets to 0 are counted in the table, not the histogram); "
                       f"dashed: the median. {verdict.short}"}


def arch_context(m: pd.DataFrame, logs: pd.DataFrame, analyses: dict[str, list[dict]],
                 compare_n: int | None, where: dict) -> dict:
    """Sections 6-10 of one layer, plus one or two summary sentences (`findings`)."""
    n = cmp.pick_compare_n(m, compare_n)
    styles = af.arch_styles(m["arch"].astype(str))
    sae = dict(where, arch="{arch}", n="{n}", k="{k}")
    src = {"metrics": paths.fmt(paths.METRICS, **where), "log": paths.fmt(paths.SAE_LOG, **sae),
           "cfg": paths.fmt(paths.SAE_CFG, **sae)}
    pattern = {e: paths.fmt(paths.ANALYSIS, **sae, experiment=e) for e in ("progressive", "refinement")}
    matched = matched_section(m, n, styles, src)
    findings = [matched.pop("finding")] if matched.get("finding") else []
    progressive = analyses.get("progressive", [])
    refinement = analyses.get("refinement", [])
    return {"compare_n": num(n), "findings": findings, "matched": matched,
            "slopes": slopes_section(m, styles, src), "dead": dead_section(m, logs, n, styles, src),
            "progressive": progressive_section(progressive, n, styles, pattern["progressive"]),
            "refinement": refinement_section(refinement, m, n, styles, pattern["refinement"])}
