"""Template context of the evaluation-suite sections: probe loss, N2G explanations, explanation
reconstruction, ablation sparsity (Gao §4.2–4.5, REFERENCE C.4–C.7), latent geometry (Michaud Figs 4, 7;
F.3, F.4), LLM autointerp and the feature-dashboard index.

Headline numbers come from metrics.csv (the suite columns `scaling.collect` merges in); distributions from
the per-SAE files `render.load_suite` reads. Verdicts are pure functions of those (`*_verdict`), built on
`comparison.Verdict`. A metric that did not run gets a note naming the config key that turns it on.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from urllib.parse import quote

import numpy as np
import pandas as pd

from saescale import paths
from saescale.report import comparison as cmp
from saescale.report import suite_figures as sf
from saescale.report.arch_sections import verdict_view
from saescale.report.tables import _col, num, pct, table, text

FLAT = 0.01  # a trend must move the metric by more than 1% of its mean over the measured range
FEW_NEAR_ONE = 0.01  # F.4: "no large mass near 1": at most 1% of latents with nn cosine > 0.97
R2_POWER_LAW = 0.9  # F.3: the sorted frequency curve counts as a power law on its fit range
SELECTOR = {"probes": "evaluate.probes", "ablation": "evaluate.ablation", "geometry": "evaluate.geometry",
            "interpret": "interpret", "reconstruction": "interpret.reconstruction.n"}  # what selects SAEs


# ---- verdicts: pure functions of metrics.csv rows and metric JSONs ------------------------------------

def _finite_rows(m: pd.DataFrame, col: str) -> pd.DataFrame:
    return m.assign(**{col: _col(m, col)}).dropna(subset=[col])


def _name(r) -> str:
    return f"{r['arch']}, n = {num(r['n'])}, k = {num(r['k'])}"


def _flat(change: float, before: str = " (", after: str = ")") -> str:
    """A note on a change too small to count as a trend, or ''."""
    return f"{before}flat: within {FLAT:.0%}{after}" if abs(change) <= FLAT else ""


def _span(values, digits: int = 3) -> str:
    """'a–b' over the values ('a to b' when negative), or the one value when they are all equal."""
    lo, hi = num(min(values), digits), num(max(values), digits)
    return lo if lo == hi else f"{lo} to {hi}" if lo.startswith("-") else f"{lo}–{hi}"


def n_trend(m: pd.DataFrame, col: str, falls: bool) -> list[tuple[bool, str]]:
    """Per (arch, k) with >= 2 values of n: does `col` fall (rise) with n? The least-squares line of `col`
    on log2 n must change it by more than FLAT of its mean over the measured n."""
    claims = []
    df = _finite_rows(m, col)
    for (arch, k), g in df.groupby([df["arch"].astype(str), "k"]):
        g = g.sort_values("n")
        if g["n"].nunique() < 2:
            continue
        x, y = np.log2(g["n"].to_numpy(float)), g[col].to_numpy(float)
        change = np.polyfit(x, y, 1)[0] * np.ptp(x) / max(abs(y.mean()), 1e-12)
        said = (f"{arch} k = {k}: {num(y[0])} → {num(y[-1])} over n = {num(g['n'].iloc[0])} → "
                f"{num(g['n'].iloc[-1])} ({change:+.1%} along the fitted line{_flat(change, '; ', '')})")
        claims.append((change < -FLAT if falls else change > FLAT, said))
    return claims


def k_trend(m: pd.DataFrame, col: str, falls_with_k: bool, k_max: float = math.inf) -> list[tuple[bool, str]]:
    """Per (arch, n) with >= 2 values of k <= k_max: `col` at the largest k against the smallest k."""
    claims = []
    df = _finite_rows(m, col)
    df = df[df["k"] <= k_max]
    for (arch, n), g in df.groupby([df["arch"].astype(str), "n"]):
        if g["k"].nunique() < 2:
            continue
        small, large = g.sort_values("k").iloc[[0, -1]].to_dict("records")
        rel = large[col] / small[col] - 1 if small[col] else math.nan
        said = (f"{arch} n = {num(n)}: {num(small[col])} at k = {small['k']} vs {num(large[col])} at "
                f"k = {large['k']}{_flat(rel)}")
        claims.append((bool(rel < -FLAT if falls_with_k else rel > FLAT), said))
    return claims


def matched_pairs(m: pd.DataFrame, cols: tuple[str, ...], a: str = "topk", b: str = "relu") -> list[dict]:
    """At each n where archs `a` and `b` both have `cols`: their values at `a`'s k as the L0 target, `b`'s
    interpolated at that achieved L0 (comparison.matched_table). [{"n", "l0", col: (value a, value b)}]"""
    out = []
    for n, m_n in m[m["arch"].astype(str).isin((a, b))].groupby("n"):
        if m_n["arch"].nunique() < 2:
            continue
        targets = sorted(int(k) for k in m_n.loc[m_n["arch"] == a, "k"])
        tables = {c: cmp.matched_table(m_n.assign(**{c: _col(m_n, c)}), c, targets) for c in cols}
        for t in targets:
            vals = {c: tuple(tables[c].get(arch, {}).get(t, (math.nan,))[0] for arch in (a, b)) for c in cols}
            if all(math.isfinite(x) for pair in vals.values() for x in pair):
                out.append({"n": int(n), "l0": t, **vals})
    return out


def probe_verdict(m: pd.DataFrame) -> cmp.Verdict:
    """§4.2 / Fig. 6a: probe loss falls with n; TopK below ReLU at matched L0."""
    claims = n_trend(m, "probe_loss", falls=True)
    for p in matched_pairs(m, ("probe_loss",)):
        ok, said = cmp._lower("topk", p["probe_loss"][0], "relu", p["probe_loss"][1])
        claims.append((ok, f"n = {num(p['n'])}, L0 = {p['l0']}: {said}"))
    return cmp._combine(claims, "the best single latent's probe loss falls as n grows, and TopK's is below "
                                "ReLU's at matched L0 (§4.2, Fig. 6a).", "Needs SAEs at >= 2 values of n.")


def n2g_verdict(m: pd.DataFrame) -> cmp.Verdict:
    """§4.3 / Figs 24, 25: N2G F1 rises as n grows and as k falls; TopK beats ReLU (recall > 1.5x, precision
    > 0.9x) at the same n and L0."""
    claims = n_trend(m, "n2g_f1", falls=False) + k_trend(m, "n2g_f1", falls_with_k=True)
    for p in matched_pairs(m, ("n2g_recall", "n2g_precision", "n2g_f1")):
        (rt, rr), (pt, pr), (ft, fr) = p["n2g_recall"], p["n2g_precision"], p["n2g_f1"]
        where = f"n = {num(p['n'])}, L0 = {p['l0']}"
        claims += [(rt > 1.5 * rr, f"{where}: recall topk/relu = {num(rt / rr, 3)} (paper > 1.5)"),
                   (pt > 0.9 * pr, f"{where}: precision topk/relu = {num(pt / pr, 3)} (paper > 0.9)"),
                   (ft > fr, f"{where}: F1 topk {num(ft)} vs relu {num(fr)}")]
    return cmp._combine(claims, "N2G explanations get easier (higher F1) as k falls and as n grows; TopK "
                                "beats ReLU on F1, recall > 1.5× and precision > 0.9× (Figs. 24, 25).",
                        "Needs SAEs at >= 2 values of n or of k.")


def reconstruction_verdict(m: pd.DataFrame) -> cmp.Verdict:
    """§4.4 / Fig. 8: the ΔCE of N2G-simulated codes falls with n and as k falls."""
    claims = n_trend(m, "n2g_delta_ce", falls=True) + k_trend(m, "n2g_delta_ce", falls_with_k=False)
    return cmp._combine(claims, "splicing in the N2G-simulated codes costs less ΔCE for larger and sparser "
                                "SAEs (§4.4, Fig. 8).", "Needs the reconstruction at >= 2 values of n or k.")


def ablation_verdict(m: pd.DataFrame) -> cmp.Verdict:
    """§4.5 / Fig. 6b: larger k gives sparser effects (while k <= d_model / 2), larger n too; latents'
    effects sparser than residual channels'."""
    d = _col(m, "d_model").median()
    claims = k_trend(m, "ablation_sparsity", falls_with_k=True, k_max=d / 2 if math.isfinite(d) else math.inf)
    claims += n_trend(m, "ablation_sparsity", falls=True)
    df = _finite_rows(_finite_rows(m, "ablation_sparsity"), "ablation_sparsity_resid")
    for (arch, k), g in df.groupby([df["arch"].astype(str), "k"]):
        below = int((g["ablation_sparsity"] < g["ablation_sparsity_resid"]).sum())
        said = (f"{arch} k = {k}: latents sparser than channels in {below} of {len(g)} SAEs (median "
                f"{num(g['ablation_sparsity'].median())} vs {num(g['ablation_sparsity_resid'].median())})")
        claims.append((below == len(g), said))
    return cmp._combine(claims, "ablating a latent has sparser effects on the logits for larger k (until k "
                                "nears d_model) and larger n, and sparser than ablating a residual channel "
                                "(§4.5, Fig. 6b).", "Needs ablation.json for SAEs at >= 2 values of n or k.")


def frequency_verdict(records: list[dict]) -> cmp.Verdict:
    """F.3 / Michaud Fig. 4: the sorted frequency curve is a power law (R² >= 0.9) shallower than −1."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in sorted(records, key=lambda r: (str(r["arch"]), r["k"], r["n"])):
        if cmp._ok((r.get("frequency_fit") or {}).get("slope")):
            groups.setdefault((str(r["arch"]), int(r["k"])), []).append(r["frequency_fit"])
    claims = []
    for (arch, k), fits in groups.items():
        slopes, r2 = [f["slope"] for f in fits], [f.get("r2") for f in fits]
        ok = all(-1 < s < 0 for s in slopes) and all(cmp._ok(x) and x >= R2_POWER_LAW for x in r2)
        r2_min = num(min((x for x in r2 if cmp._ok(x)), default=math.nan), 3)
        claims.append((ok, f"{arch} k = {k}: slope {_span(slopes)}, R² ≥ {r2_min} ({len(fits)} SAEs)"))
    return cmp._combine(claims, "latent firing frequency against rank is a power law with slope −0.74 (16k) "
                                "and −0.57 (32k) for Gemma Scope, shallower than −1 (Michaud Fig. 4).",
                        "Needs geometry.json with a frequency fit.")


def nn_verdict(records: list[dict]) -> cmp.Verdict:
    """F.4 / Michaud Fig. 7: nn cosines skewed above random, few above 0.97, those with dead neighbours."""
    claims, rs = [], sorted(records, key=lambda r: (str(r["arch"]), r["k"], r["n"]))
    pairs = [((r.get("nn") or {}).get("mean"), (r.get("nn_random") or {}).get("mean")) for r in rs]
    pairs = [(a, b) for a, b in pairs if cmp._ok(a) and cmp._ok(b)]
    if pairs:
        above = sum(a > b for a, b in pairs)
        said = (f"mean nn above random in {above} of {len(pairs)} SAEs ({_span([a for a, _ in pairs])} vs "
                f"{_span([b for _, b in pairs])})")
        claims.append((above == len(pairs), said))
    near = [(r, ((r.get("nn") or {}).get("thresholds") or {}).get("0.97") or {}) for r in rs]
    shares = [(t["fraction"], r) for r, t in near if cmp._ok(t.get("fraction"))]
    if shares:
        few = sum(s <= FEW_NEAR_ONE for s, _ in shares)
        top, r = max(shares, key=lambda x: x[0])
        largest = f"largest: {pct(top)}, {_name(r)}" if top > 0 else "none above 0.97 in any"
        said = f"at most {FEW_NEAR_ONE:.0%} of latents above 0.97 in {few} of {len(shares)} SAEs ({largest})"
        claims.append((few == len(shares), said))
    alive = sum(int(t.get("latent_alive_neighbour_alive") or 0) for _, t in near)
    dead = sum(int(t.get("latent_alive_neighbour_dead") or 0) for _, t in near)
    note = ""
    if alive + dead:
        said = f"{dead} of {alive + dead} alive latents above 0.97 have a dead nearest neighbour"
        claims.append((dead >= alive, said))
    elif claims:
        note = "No alive latent is above 0.97, so whether their neighbours are dead cannot be checked."
    v = cmp._combine(claims, "nearest-neighbour decoder cosines are skewed above random directions' but with "
                             "no large mass near 1; the few latents above 0.97 have dead neighbours (Michaud "
                             "Fig. 7).", "Needs geometry.json.")
    return replace(v, note=" ".join(x for x in (v.note, note) if x))


def headline(title: str, v: cmp.Verdict) -> str:
    """The line of the summary of findings for one suite section."""
    if v.agrees is None:
        return f"{title}: cannot tell. {v.note}"
    fails = f"; fails: {'; '.join(v.failed)}" if v.failed else ""
    checks = len(v.held) + len(v.failed)
    return f"{title}: {v.label} with the paper ({len(v.held)} of {checks} checks hold{fails})."


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
    rows["never_share"] = _col(rows, "never") / _col(rows, "sampled")
    v = n2g_verdict(rows)
    panels = [{"title": t, "ylabel": t, "series": [(c, "-", "N2G")]} for c, t in
              (("n2g_precision", "precision"), ("n2g_recall", "recall"), ("n2g_f1", "F1"),
               ("never_share", "share never firing"))]
    cells = [c + [f"{num(r['never'])} ({pct(r['never_share'])})"] for c, (_, r) in
             zip(_cells(rows, ("l0", 3), ("n2g_precision", 3), ("n2g_recall", 3), ("n2g_f1", 3),
                        ("sampled", 4)), rows.iterrows())]
    never = rows["never_share"].dropna()
    return {
        "note": None, "verdict": verdict_view(v), "src": src["interpret"],
        "finding": headline("N2G explanations (C.5)", v), "fig": sf.metric_vs_n(rows, panels),
        "caption": "Gao Figs. 24/25 analogue: N2G precision, recall and F1 against n, a line per k, and the "
                   "share of sampled latents whose explanation never fires on the eval tokens (their "
                   f"precision is undefined and left out of the mean, their F1 counts as 0). {v.short}",
        "table": table(["arch", "n", "k", "L0", "precision", "recall", "F1", "latents sampled",
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
