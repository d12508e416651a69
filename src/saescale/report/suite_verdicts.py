"""Verdicts of the evaluation-suite sections: pure functions of metrics.csv rows and the per-SAE metric
JSONs, each returning a `comparison.Verdict` whose sub-claims name what held and what failed against the
paper's expectation (Gao §4.2-4.5, method §C.4-C.7; Michaud, method §F.3, F.4). Each verdict carries the
paper's words (`quote`, `source`) and the provenance of every threshold it uses (`THRESHOLDS`).
"""

from __future__ import annotations

import json

import math
from dataclasses import replace

import numpy as np
import pandas as pd

from saescale.report import comparison as cmp
from saescale.report.tables import _col, num, pct

FLAT = 0.01  # our choice: a 2-point trend must move the metric by more than 1% of its mean
FEW_NEAR_ONE = 0.01  # our choice: F.4's "no large mass near 1" = at most 1% of latents with nn cosine > 0.97
R2_POWER_LAW = 0.9  # our choice: the sorted frequency curve counts as a power law on its fit range
NEAR_ONE = 0.97  # paper (Michaud App.): "cosine similarity > 0.97 with their nearest neighbor"

THRESHOLDS = {
    "trend": f"a trend over >= 3 values of n holds when the least-squares slope ± {cmp.Z:g}σ excludes 0 "
             f"(our choice); over 2 values it must move the metric by > {FLAT:.0%} of its mean (our choice)",
    "k_pair": f"a k trend compares the smallest and largest k; changes within {FLAT:.0%} count as flat (our "
              "choice)",
    "dense": "k trends stop at k <= d_model / 2: the paper's trends break as L0 nears d_model (Gao et al. §4, "
             "App. E.5)",
    "near_one": f"near 1 = nearest-neighbour cosine > {NEAR_ONE} (paper, Michaud App.); 'no large mass' = at "
                f"most {FEW_NEAR_ONE:.0%} of latents (our choice)",
    "paired_tasks": "probe loss, TopK vs ReLU: the mean over tasks of the per-task difference ± its standard error "
                    "(std / √tasks; both SAEs are probed on the same tasks), matched per task at the L0 target (our "
                    "choice); without per-task losses, the point values",
    "n2g_se": "TopK vs ReLU: the mean over sampled latents ± its standard error (std / √latents, from the "
              "per-latent interpret records; without them, the point values)",
    "power_law": f"power law = R² >= {R2_POWER_LAW} on the fitted rank range (our choice); the slope must lie "
                 "in (−1, 0), a band around the paper's −0.57 to −0.74 (our choice)",
}


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


def n_trend(m: pd.DataFrame, col: str, falls: bool) -> list[tuple[bool | None, str]]:
    """Per (arch, k) with >= 2 values of n: does `col` fall (rise) with n? The least-squares line of `col`
    on log2 n: with >= 3 values of n its slope ± Z·se must exclude 0 (None when it straddles); with 2, the
    change along the line must exceed FLAT of the mean."""
    claims = []
    df = _finite_rows(m, col)
    for (arch, k), g in df.groupby([df["arch"].astype(str), "k"]):
        g = g.sort_values("n")
        if g["n"].nunique() < 2:
            continue
        x, y = np.log2(g["n"].to_numpy(float)), g[col].to_numpy(float)
        slope, icpt = np.polyfit(x, y, 1)
        change = slope * np.ptp(x) / max(abs(y.mean()), 1e-12)
        sxx = float(np.sum((x - x.mean()) ** 2))
        se = (math.sqrt(float(np.sum((y - icpt - slope * x) ** 2)) / (len(x) - 2) / sxx)
              if len(x) > 2 and sxx > 0 else math.nan)
        if math.isfinite(se):
            ok = cmp.sign_claim(-slope if falls else slope, se)
            spread = cmp.Z * se * np.ptp(x) / max(abs(y.mean()), 1e-12)
            if ok is None and abs(change) + spread <= FLAT:  # resolved as flat: no trend of more than FLAT
                ok = False
            how = f"slope {num(slope, 3)} ± {num(se, 2)} per doubling of n{_flat(change, '; ', '')}"
        else:
            ok = bool(change < -FLAT if falls else change > FLAT)
            how = f"2 values of n{_flat(change, '; ', '')}"
        said = (f"{arch} k = {k}: {num(y[0])} → {num(y[-1])} over n = {num(g['n'].iloc[0])} → "
                f"{num(g['n'].iloc[-1])} ({change:+.1%} along the fitted line; {how})")
        claims.append((ok, said))
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
    interpolated at that achieved L0 (comparison.matched_table); columns ending "_se" (standard errors) may be
    NaN, the others must be finite. [{"n", "l0", col: (value a, value b)}]"""
    out = []
    for n, m_n in m[m["arch"].astype(str).isin((a, b))].groupby("n"):
        if m_n["arch"].nunique() < 2:
            continue
        targets = sorted(int(k) for k in m_n.loc[m_n["arch"] == a, "k"])
        tables = {c: cmp.matched_table(m_n.assign(**{c: _col(m_n, c)}), c, targets) for c in cols}
        for t in targets:
            vals = {c: tuple(tables[c].get(arch, {}).get(t, (math.nan,))[0] for arch in (a, b)) for c in cols}
            if all(math.isfinite(x) for c, pair in vals.items() if not c.endswith("_se") for x in pair):
                out.append({"n": int(n), "l0": t, **vals})
    return out


FIG6 = ("More total latents (higher n) generally improves all metrics (yellow = better). Both metrics are worse "
        "at L_0 = 512, a regime in which solutions are dense")


def _d_model(m: pd.DataFrame) -> float:
    d = _col(m, "d_model").median()
    return d if math.isfinite(d) else math.inf


def task_columns(m: pd.DataFrame, col: str = "probe_task_losses") -> tuple[pd.DataFrame, list[str]]:
    """`m` with one column per probe task (from the JSON of per-task losses), and their names."""
    if col not in m.columns:
        return m, []
    parsed = m[col].map(lambda s: json.loads(s) if isinstance(s, str) and s else {})
    tasks = sorted(set().union(*parsed)) if len(parsed) else []
    cols = {f"task::{t}": parsed.map(lambda d, t=t: d.get(t, math.nan)).astype(float) for t in tasks}
    return m.assign(**cols), list(cols)


def paired_task_se(pair: dict, task_cols: list[str]) -> float | None:
    """The standard error of the mean per-task difference of a matched pair (both SAEs probed on the same tasks):
    std over tasks of (a's loss − b's loss) / √tasks. Pairing removes how much harder one task is than another, which
    dwarfs the SAEs' difference. None with fewer than 2 tasks."""
    diffs = [pair[c][0] - pair[c][1] for c in task_cols if c in pair]
    return float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))) if len(diffs) >= 2 else None


def probe_verdict(m: pd.DataFrame) -> cmp.Verdict:
    """§4.2 / Fig. 6a: probe loss falls with n; TopK below ReLU at matched L0, by more than Z standard errors of
    the paired per-task difference where the tasks' losses are known."""
    claims = n_trend(m, "probe_loss", falls=True)
    with_tasks, tasks = task_columns(m)
    for p in matched_pairs(with_tasks, ("probe_loss", *tasks)) or matched_pairs(m, ("probe_loss",)):
        ok, said = cmp._lower("topk", p["probe_loss"][0], "relu", p["probe_loss"][1], paired_task_se(p, tasks))
        claims.append((ok, f"n = {num(p['n'])}, L0 = {p['l0']}: {said}"))
    v = cmp._combine(claims, "the best single latent's probe loss falls as n grows, and TopK's is below "
                             "ReLU's at matched L0 (§4.2, Fig. 6a).", "Needs SAEs at >= 2 values of n.",
                     quote=FIG6, source="Gao et al. Fig. 6 caption (TopK vs ReLU: §4.2, method §C.4; its text "
                                        "is not in our sources)", anchor="probes",
                     paper_value="probe loss falls with n; TopK < ReLU",
                     thresholds=(THRESHOLDS["trend"], cmp.THRESHOLDS["matched"], THRESHOLDS["paired_tasks"],
                                 cmp.THRESHOLDS["z"]))
    loss = _col(m, "probe_loss").dropna()
    return cmp.with_run_value(v, f"probe loss {_span(loss, 4)}" if len(loss) else "")


FIG24 = "TopK beats ReLU on N2G F1 score. Its N2G explanations have noticeably higher recall, but worse precision."
FIG25 = "The average autoencoder latent is generally easier to explain as k decreases and n increases."


def n2g_verdict(m: pd.DataFrame) -> cmp.Verdict:
    """§4.3 / Figs 24, 25: N2G F1 rises as n grows and as k falls (k <= d_model / 2: the trend breaks as L0
    nears d_model); at the same n and L0, TopK's F1 and recall are above ReLU's and its precision below.
    The ratios are shown, not judged: the paper's text gives no number for them."""
    claims = n_trend(m, "n2g_f1", falls=False) + k_trend(m, "n2g_f1", falls_with_k=True, k_max=_d_model(m) / 2)
    ratios = []
    keys = ("recall", "precision", "f1")
    with_se = all(f"n2g_{c}_se" in m.columns and _col(m, f"n2g_{c}_se").notna().any() for c in keys)
    cols = tuple(f"n2g_{c}" for c in keys) + (tuple(f"n2g_{c}_se" for c in keys) if with_se else ())
    for p in matched_pairs(m, cols):
        where = f"n = {num(p['n'])}, L0 = {p['l0']}"
        for c, higher in (("f1", True), ("recall", True), ("precision", False)):
            t, r = p[f"n2g_{c}"]
            se = float(np.hypot(*p[f"n2g_{c}_se"])) if with_se else math.nan
            ok = cmp.sign_claim(t - r if higher else r - t, se)
            spread = f" (difference ± {num(se, 2)})" if math.isfinite(se) else ""
            label = "F1" if c == "f1" else c
            claims.append((ok, f"{where}: {label} topk {num(t, 3)} vs relu {num(r, 3)} "
                               f"({'higher' if higher else 'lower'} in the paper){spread}"))
        (rt, rr), (pt, pr) = p["n2g_recall"], p["n2g_precision"]
        ratios.append(f"{where}: recall × {num(rt / rr, 3)}, precision × {num(pt / pr, 3)}")
    v = cmp._combine(claims, "N2G explanations get easier (higher F1) as k falls and as n grows; TopK beats ReLU "
                             "on F1 with higher recall and lower precision (Figs. 24, 25).",
                     "Needs SAEs at >= 2 values of n or of k.", quote=f"{FIG24} … {FIG25}",
                     source="Gao et al. Figs. 24 and 25 captions", anchor="n2g",
                     paper_value="F1 rises with n, falls with k; TopK: F1 and recall higher, precision lower",
                     thresholds=(THRESHOLDS["trend"], THRESHOLDS["k_pair"], THRESHOLDS["dense"],
                                 cmp.THRESHOLDS["matched"], THRESHOLDS["n2g_se"], cmp.THRESHOLDS["z"]))
    if ratios:
        v = replace(v, note=" ".join(x for x in (v.note, "TopK/ReLU: " + "; ".join(ratios) + ".") if x))
    f1 = _col(m, "n2g_f1").dropna()
    return cmp.with_run_value(v, "; ".join(x for x in ([f"F1 {_span(f1)}"] if len(f1) else []) + ratios))


def reconstruction_verdict(m: pd.DataFrame) -> cmp.Verdict:
    """§4.4 / Fig. 8: the ΔCE of N2G-simulated codes falls with n and as k falls."""
    claims = n_trend(m, "n2g_delta_ce", falls=True) + k_trend(m, "n2g_delta_ce", falls_with_k=False)
    v = cmp._combine(claims, "splicing in the N2G-simulated codes costs less ΔCE for larger and sparser SAEs "
                             "(§4.4, Fig. 8).", "Needs the reconstruction at >= 2 values of n or k.",
                     source="Gao et al. §4.4, Fig. 8 (paraphrase from method §C.6; the paper's text is not in "
                            "our sources)", anchor="reconstruction",
                     paper_value="ΔCE of simulated codes falls with n and as k falls",
                     thresholds=(THRESHOLDS["trend"], THRESHOLDS["k_pair"]))
    dce = _col(m, "n2g_delta_ce").dropna()
    return cmp.with_run_value(v, f"ΔCE {_span(dce, 4)} nats" if len(dce) else "")


ABLATION_QUOTE = ("Promisingly, models trained with larger k have latents with sparser effects. However, the trend "
                  "reverses at k=512, indicating that as k approaches d=768, the autoencoder learns latents with "
                  "less interpretable effects.")


def ablation_verdict(m: pd.DataFrame) -> cmp.Verdict:
    """§4.5 / Fig. 6b: larger k gives sparser effects (while k <= d_model / 2), larger n too; latents'
    effects sparser than residual channels' (beyond Z combined standard errors where sems are known)."""
    claims = k_trend(m, "ablation_sparsity", falls_with_k=True, k_max=_d_model(m) / 2)
    claims += n_trend(m, "ablation_sparsity", falls=True)
    df = _finite_rows(_finite_rows(m, "ablation_sparsity"), "ablation_sparsity_resid")
    for (arch, k), g in df.groupby([df["arch"].astype(str), "k"]):
        se = np.hypot(_col(g, "sem"), _col(g, "sem_ch")) if "sem" in g.columns else pd.Series(np.nan, g.index)
        each = [cmp.sign_claim(c - s, e) for s, c, e in zip(g["ablation_sparsity"], g["ablation_sparsity_resid"],
                                                            se)]
        below = sum(x is True for x in each)
        ok = False if any(x is False for x in each) else (True if below == len(g) else None)
        said = (f"{arch} k = {k}: latents sparser than channels in {below} of {len(g)} SAEs"
                f"{' beyond ±2 sem' if se.notna().all() else ''} (median "
                f"{num(g['ablation_sparsity'].median())} vs {num(g['ablation_sparsity_resid'].median())})")
        claims.append((ok, said))
    v = cmp._combine(claims, "ablating a latent has sparser effects on the logits for larger k (until k nears "
                             "d_model) and larger n, and sparser than ablating a residual channel (§4.5, "
                             "Fig. 6b).", "Needs ablation.json for SAEs at >= 2 values of n or k.",
                     quote=f"{ABLATION_QUOTE} … {FIG6}",
                     source="Gao et al. §4.5 and Fig. 6 caption (channels as the reference: method §C.7)",
                     anchor="ablation", paper_value="S falls with k (k < d_model) and with n; latents < channels",
                     thresholds=(THRESHOLDS["trend"], THRESHOLDS["k_pair"], THRESHOLDS["dense"],
                                 cmp.THRESHOLDS["z"]))
    sparsity = _col(m, "ablation_sparsity").dropna()
    return cmp.with_run_value(v, f"S {_span(sparsity)}" if len(sparsity) else "")


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
    v = cmp._combine(claims, "latent firing frequency against rank is a power law with slope −0.74 (16k) "
                             "and −0.57 (32k) for Gemma Scope, shallower than −1 (Michaud Fig. 4).",
                     "Needs geometry.json with a frequency fit.",
                     quote="We measure the power law decay exponent between latent 10^2 and 10^4 to be -0.74 for "
                           "an SAE with 16k latents and -0.57 for an SAE with 32k latents.",
                     source="Michaud et al. Fig. 4 caption", anchor="geometry",
                     paper_value="slope −0.74 (16k), −0.57 (32k)", thresholds=(THRESHOLDS["power_law"],))
    slopes = [f["slope"] for fits in groups.values() for f in fits]
    return cmp.with_run_value(v, f"slope {_span(slopes)}" if slopes else "")


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
    near = [(r, ((r.get("nn") or {}).get("thresholds") or {}).get(str(NEAR_ONE)) or {}) for r in rs]
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
                             "Fig. 7).", "Needs geometry.json.",
                     quote="While the distribution is skewed substantially higher than one would expect if all "
                           "latent decoder vectors were random (and thus approximately orthogonal), we do not "
                           "overall see a very large fraction of latents with extremely high cosine similarity to "
                           "their nearest neighbor. … for each of these latents, their nearest neighbor was dead",
                     source="Michaud et al. App. (Fig. 7)", anchor="geometry",
                     paper_value="nn cosines above random; few > 0.97, those with dead neighbours",
                     thresholds=(THRESHOLDS["near_one"], cmp.THRESHOLDS["point"]))
    v = replace(v, note=" ".join(x for x in (v.note, note) if x))
    return cmp.with_run_value(v, f"mean nn cosine {_span([a for a, _ in pairs])}" if pairs else "")
