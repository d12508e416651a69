"""Verdicts of the evaluation-suite sections: pure functions of metrics.csv rows and the per-SAE metric
JSONs, each returning a `comparison.Verdict` whose sub-claims name what held and what failed against the
paper's expectation (Gao §4.2-4.5, REFERENCE C.4-C.7; Michaud F.3, F.4). The thresholds are ours, not the
papers'.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd

from saescale.report import comparison as cmp
from saescale.report.tables import _col, num, pct

FLAT = 0.01  # a trend must move the metric by more than 1% of its mean over the measured range
FEW_NEAR_ONE = 0.01  # F.4: "no large mass near 1": at most 1% of latents with nn cosine > 0.97
R2_POWER_LAW = 0.9  # F.3: the sorted frequency curve counts as a power law on its fit range


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
