"""Architecture comparisons of Gao et al. (Figs 2, 5a, 9, 10; App. C), as pure functions with verdicts.

Every function takes the frames and dicts the report loads (metrics.csv rows, analysis JSONs) and returns
numbers or a `Verdict`: a sentence stating what this run measured and whether that agrees with the paper's
claim. Nothing here reads files or formats HTML.

Conventions. For penalty archs the grid's k is a *target* L0 and `l0` is the achieved one, so archs are
compared at matched achieved L0 (interpolated in log-log), never at equal k. Variants (arch != base_arch, e.g.
the method §A.8 ablations) are kept out of the activation-function comparison.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

# Every threshold a verdict uses, with where it comes from ("paper", "released code" or "our choice"); the
# rendered verdict lists the ones it used (`Verdict.thresholds`).
L0_TOLERANCE = 0.15  # our choice: |L0 / target - 1| above this, the penalty calibration missed its target
COMPARABLE = 0.10  # our choice: "comparable" FVU (Fig. 2a: TopK "comparable to Gated") = within 10%
CURVE_TOLERANCE = 0.02  # our choice: FVU within 2% of a curve's minimum counts as still at the minimum
SYSTEMATIC = 0.6  # our choice: refinement raises activations "systematically" when > 60% of them grow
Z = 2.0  # our choice: a sign claim holds when value ± 2σ (≈ 95%) excludes the other sign
POWER_LAW_R2 = 0.95  # our choice: a "clean power law" (Fig. 5b) explains >= 95% of the log-log variance
PROGRESSIVE_REACH = 2  # our choice: "progressive up to k" (Fig. 10) = the TopK(k') curve's best k' <= 2k

THRESHOLDS = {  # name: the provenance line a rendered verdict shows
    "matched": f"matched L0: interpolated in log L0, or the nearest SAE within {L0_TOLERANCE:.0%} of the target "
               "(our choice)",
    "comparable": f"comparable = FVU within {COMPARABLE:.0%} (our choice; the paper gives no number)",
    "z": f"a sign or ordering holds when the ±{Z:g}σ interval excludes the other sign; straddles: cannot tell "
         "(our choice)",
    "point": "single SAEs without a measured spread are compared on their point values (our choice)",
    "curve": f"at a curve's minimum = within {CURVE_TOLERANCE:.0%} of it (our choice)",
    "reach": f"progressive only up to ~k = best test-time k' <= {PROGRESSIVE_REACH}k and the curve turns up "
             "(our choice)",
    "systematic": f"systematic increase = mean relative change > 0 and > {SYSTEMATIC:.0%} of activations grow "
                  "(our choice)",
    "power_law": f"clean power law = r² >= {POWER_LAW_R2:g} of log ΔCE on log FVU with >= 3 values of n at one k, "
                 "slope > 0 beyond ±2σ (our choice)",
    "dead_window": "dead = no activation above the firing threshold within train.dead_tokens training tokens "
                   "(paper: typically 10 million tokens)",
    "dead_window_eval": "dead = never fired over the evaluated tokens (dead_window_tokens in metrics.csv; the "
                        "paper's window is ~10 million tokens, so shorter windows count more latents dead)",
}

# method §B: the activation functions Gao et al. compared (Figs 2a, 5a); later archs are shown, not judged.
PAPER_ARCHS = ("topk", "gated", "prolu", "relu")
RELU_FAMILY = ("relu", "relu_dn")


@dataclass(frozen=True)
class Verdict:
    """One claim of the paper against this run: `agrees` is None when the run cannot tell; `held` and
    `failed` are the measured sub-claims, `note` what is missing or extra context."""

    agrees: bool | None
    paper: str
    held: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    note: str = ""
    unsure: tuple[str, ...] = ()  # sub-claims whose interval straddles the other sign: cannot tell
    # The scorecard's columns (the report's opening table): the claim in the paper's own words with its
    # place ("Gao et al. §3.1, Fig. 3"), the paper's number, this run's number with its uncertainty, the
    # report section that holds the evidence, and where every threshold the verdict uses comes from
    # ("paper", "released code" or "our choice", each with the value).
    quote: str = ""
    source: str = ""
    paper_value: str = ""
    run_value: str = ""
    anchor: str = ""
    thresholds: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return {True: "agrees", False: "does not agree", None: "cannot tell"}[self.agrees]

    @property
    def evidence(self) -> str:
        parts = ([f"holds: {'; '.join(self.held)}"] if self.held else []) + \
                ([f"fails: {'; '.join(self.failed)}"] if self.failed else []) + \
                ([f"cannot tell: {'; '.join(self.unsure)}"] if self.unsure else [])
        return " — ".join(parts)

    @property
    def tally(self) -> str:
        """'3 of 4 checks hold, 1 cannot tell': the scorecard's short account of the sub-claims."""
        total = len(self.held) + len(self.failed) + len(self.unsure)
        if not total:
            return ""
        unsure = f", {len(self.unsure)} cannot tell" if self.unsure else ""
        return f"{len(self.held)} of {total} checks hold{unsure}"

    @property
    def text(self) -> str:
        """The paper's claim and what this run measured, without the conclusion."""
        here = f"Here, {self.evidence}." if self.evidence else ""
        return " ".join(x for x in (f"Paper: {self.paper}", here, self.note) if x)

    @property
    def short(self) -> str:
        """The paper's claim and the conclusion, for a figure caption."""
        said = "cannot tell" if self.agrees is None else f"{self.label} with the paper"
        return f"Paper: {self.paper} This run {said}."


def _fmt(x: float) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) and math.isfinite(x) else "—"


def sign_claim(value: float, se: float | None, z: float = Z) -> bool | None:
    """Is `value` > 0? True when value − z·se > 0, False when value + z·se < 0, None (cannot tell) when the
    interval straddles 0. Without a finite se the point value decides (single SAEs, see THRESHOLDS["point"])."""
    value = float(value) if isinstance(value, (int, float, np.number)) else math.nan
    se = float(se) if isinstance(se, (int, float, np.number)) else math.nan
    if not math.isfinite(value):
        return None
    if not math.isfinite(se):
        return value > 0
    if value - z * se > 0:
        return True
    if value + z * se < 0:
        return False
    return None


def _lower(a: str, va: float, b: str, vb: float, se: float | None = None) -> tuple[bool | None, str]:
    """(va < vb, 'a 0.1 < b 0.2'): one 'lower is better' sub-claim; with `se`, the standard error of
    va − vb, it holds only when vb − va > Z·se (None: the interval straddles 0)."""
    ok = sign_claim(vb - va, se)
    sym = {True: "<", False: ">", None: "≈"}[ok] if se is not None and math.isfinite(se) else \
        ("<" if va < vb else "≥")
    spread = f" (difference ± {_fmt(se)})" if se is not None and math.isfinite(se) else ""
    return ok, f"{a} {_fmt(va)} {sym} {b} {_fmt(vb)}{spread}"


def _combine(claims: list[tuple[bool | None, str]], paper: str, missing: str, **fields) -> Verdict:
    """All sub-claims that could be checked must hold: any that fails → does not agree; else any whose
    interval straddles (None) → cannot tell; none checkable → cannot tell. `fields`: the scorecard's."""
    if not claims:
        return Verdict(None, paper, note=missing, **fields)
    claims = [(None if ok is None else bool(ok), t) for ok, t in claims]  # numpy bools are not `True`
    held = tuple(t for ok, t in claims if ok is True)
    failed = tuple(t for ok, t in claims if ok is False)
    unsure = tuple(t for ok, t in claims if ok is None)
    agrees = False if failed else (None if unsure else True)
    return Verdict(agrees, paper, held, failed, unsure=unsure, **fields)


def with_run_value(v: Verdict, value: str = "") -> Verdict:
    """`v` with its scorecard run value: `value` (the headline number) and the tally of its checks."""
    parts = [x for x in (value, v.tally) if x]
    return replace(v, run_value="; ".join(parts) or "not measured")


def slope_se(x: Iterable, y: Iterable) -> tuple[float, float, float]:
    """(slope, its standard error, r²) of the least-squares line of log y on log x; se NaN with < 3 points
    (a line through 2 points has no residual to measure a spread from)."""
    x, y = _floats(x), _floats(y)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    lx, ly = np.log(x[keep]), np.log(y[keep])
    if len(np.unique(lx)) < 2:
        return math.nan, math.nan, math.nan
    slope, icpt = np.polyfit(lx, ly, 1)
    resid = ly - (icpt + slope * lx)
    sxx = float(np.sum((lx - lx.mean()) ** 2))
    sst = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1 - float(np.sum(resid**2)) / sst if sst > 0 else math.nan
    se = math.sqrt(float(np.sum(resid**2)) / (len(lx) - 2) / sxx) if len(lx) > 2 else math.nan
    return float(slope), se, r2


def ranking(values: dict[str, float]) -> str:
    """'a 0.1 < b 0.2 < ...' from lowest to highest."""
    return " < ".join(f"{a} {_fmt(v)}" for a, v in sorted(values.items(), key=lambda kv: kv[1]))


# ---- which SAEs go where ----------------------------------------------------------------------------

def base_arch(m: pd.DataFrame) -> pd.Series:
    """The trained architecture of each row (a variant's base arch; the arch itself otherwise)."""
    if "base_arch" not in m.columns:
        return m["arch"].astype(str)
    return m["base_arch"].where(m["base_arch"].notna() & (m["base_arch"].astype(str) != ""),
                                m["arch"]).astype(str)


def is_variant(m: pd.DataFrame) -> pd.Series:
    """Rows whose arch wildcard names a variant (a base arch with changed training settings)."""
    return m["arch"].astype(str) != base_arch(m)


def scaling_archs(m: pd.DataFrame) -> list[str]:
    """Archs with SAEs at >= 2 values of n (the ones with an L(N) to show); all archs when none has."""
    if m.empty:
        return []
    spans = m.groupby(m["arch"].astype(str))["n"].nunique()
    archs = sorted(spans[spans >= 2].index)
    return archs or sorted(spans.index)


def pick_compare_n(m: pd.DataFrame, configured: int | None = None) -> int | None:
    """report.compare_n, else the n with the most distinct (non-variant) archs, the largest on a tie."""
    if configured is not None:
        return int(configured)
    plain = m[~is_variant(m)] if not m.empty else m
    if plain.empty:
        return None
    counts = plain.groupby("n")["arch"].nunique()
    return int(max(counts.index, key=lambda n: (counts[n], n)))


# ---- matched sparsity (Figs 2a, 5a) ----------------------------------------------------------------------

def _floats(x: Iterable) -> np.ndarray:
    """Any iterable as a float array, unparseable entries NaN."""
    return pd.to_numeric(pd.Series(list(x)), errors="coerce").to_numpy(dtype=float)


def loglog_interp(l0: Iterable, y: Iterable, at: float) -> float:
    """y at L0 = `at`, linear in log L0 and log y between the two bracketing points; NaN outside the
    measured L0 range (no extrapolation: a penalty SAE's curve may bend beyond what was trained)."""
    l0, y = _floats(l0), _floats(y)
    keep = np.isfinite(l0) & np.isfinite(y) & (l0 > 0) & (y > 0)
    l0, y = l0[keep], y[keep]
    if not len(l0) or not (at > 0):
        return math.nan
    order = np.argsort(l0)
    l0, y = l0[order], y[order]
    lo, hi = l0[0] * (1 - 1e-9), l0[-1] * (1 + 1e-9)  # an exact hit at either end counts as inside
    if not lo <= at <= hi:
        return math.nan
    return float(np.exp(np.interp(np.log(at), np.log(l0), np.log(y))))


def matched_value(l0: Iterable, y: Iterable, at: float,
                  tol: float = L0_TOLERANCE) -> tuple[float, str | None]:
    """(value, how): interpolated inside the achieved-L0 range ('interpolated'); else the SAE whose L0 is
    nearest `at`, if within `tol` of it ('nearest'); else (NaN, None)."""
    value = loglog_interp(l0, y, at)
    if math.isfinite(value):
        return value, "interpolated"
    l0, y = _floats(l0), _floats(y)
    keep = np.isfinite(l0) & np.isfinite(y) & (l0 > 0) & (y > 0)
    if not keep.any() or not (at > 0):
        return math.nan, None
    dist = np.abs(np.log(l0[keep] / at))
    i = int(np.argmin(dist))
    if dist[i] <= math.log1p(tol):
        return float(y[keep][i]), "nearest"
    return math.nan, None


def matched_table(m_n: pd.DataFrame, metric: str, targets: Iterable[float],
                  tol: float = L0_TOLERANCE) -> dict[str, dict[float, tuple[float, str | None]]]:
    """{arch: {L0 target: (metric, how)}} over the SAEs of one n (see `matched_value`)."""
    out = {}
    for arch, g in m_n.groupby(m_n["arch"].astype(str)):
        if metric not in g.columns or "l0" not in g.columns:
            continue
        out[arch] = {t: matched_value(g["l0"], g[metric], t, tol) for t in targets}
    return out


def l0_offset(l0: float, target: float) -> float:
    """Relative miss of the achieved L0: L0 / target - 1."""
    return l0 / target - 1 if target and math.isfinite(l0) else math.nan


def best_covered_l0(table: dict[str, dict[float, tuple[float, str | None]]],
                    archs: Iterable[str] = PAPER_ARCHS) -> float | None:
    """The L0 target at which most of `archs` have a value (the larger L0 on a tie); None if no arch does."""
    archs = [a for a in archs if a in table]
    targets = sorted({t for a in table for t in table[a]})
    scored = [(sum(math.isfinite(table[a][t][0]) for a in archs), t) for t in targets]
    scored = [s for s in scored if s[0] > 0]
    return max(scored)[1] if scored else None


def values_at(table: dict[str, dict[float, tuple[float, str | None]]], l0: float) -> dict[str, float]:
    """{arch: value} at one L0 target, only where finite."""
    return {a: v[l0][0] for a, v in table.items() if l0 in v and math.isfinite(v[l0][0])}


FIG2A = ("At a fixed number of latents (n = 32768), TopK has a better reconstruction-sparsity trade off than "
         "ReLU and ProLU, and is comparable to Gated.")
FIG5A = ("For a fixed number of latents (n = 2^17 = 131072), the downstream-loss/sparsity trade-off is better for "
         "TopK autoencoders than for other activation functions.")


def ordering_verdict(fvu: dict[str, float], l0: float) -> Verdict:
    """Fig 2a, the paper's claim only: at equal L0, TopK has lower FVU than ProLU and than ReLU, and is within
    COMPARABLE of Gated. No order between ProLU, ReLU and Gated is claimed, so none is tested."""
    claims = []
    if "topk" in fvu and "gated" in fvu:
        r = fvu["gated"] / fvu["topk"] - 1
        claims.append((abs(r) <= COMPARABLE, f"Gated {r:+.0%} vs TopK (comparable: within {COMPARABLE:.0%})"))
    for worse in ("prolu", "relu"):
        if "topk" in fvu and worse in fvu:
            claims.append(_lower("topk", fvu["topk"], worse, fvu[worse]))
    v = _combine(claims, "at equal L0, TopK has lower FVU than ReLU and ProLU and is comparable to Gated "
                         "(Fig. 2a).", "Needs topk and one of gated, prolu, relu at a common L0.",
                 quote=FIG2A, source="Gao et al. Fig. 2a caption", anchor="archs",
                 paper_value="TopK < ProLU, TopK < ReLU; TopK ≈ Gated",
                 thresholds=(THRESHOLDS["matched"], THRESHOLDS["comparable"], THRESHOLDS["point"]))
    ranked = f"FVU at L0 = {_fmt(l0)}: {ranking(fvu)}." if fvu else ""
    v = replace(v, note=" ".join(x for x in (v.note, ranked) if x))
    return with_run_value(v, ranked.rstrip("."))


def lowest_verdict(values: dict[str, float], l0: float, metric: str = "ΔCE", arch: str = "topk",
                   rivals: Iterable[str] = ("relu", "prolu", "gated")) -> Verdict:
    """Fig 5a: at equal L0, `arch` has the lowest `metric` among the paper's activation functions."""
    rivals = [r for r in rivals if r in values]
    paper = f"TopK has the best {metric}-sparsity trade-off of the activation functions compared (Fig. 5a)."
    fields = dict(quote=FIG5A, source="Gao et al. Fig. 5a caption", anchor="archs",
                  paper_value=f"TopK lowest {metric} at equal L0",
                  thresholds=(THRESHOLDS["matched"], THRESHOLDS["point"]))
    if arch not in values or not rivals:
        return with_run_value(Verdict(None, paper, note=f"Needs {arch} and one of relu, prolu, gated at a "
                                                        "common L0.", **fields))
    claims = [_lower(arch, values[arch], r, values[r]) for r in rivals]
    ranked = f"{metric} at L0 = {_fmt(l0)}: {ranking(values)}"
    return with_run_value(replace(_combine(claims, paper, "", **fields), note=ranked + "."), ranked)


# ---- FVU vs n at fixed L0 (Fig 2b) ---------------------------------------------------------------------

def loglog_slope(x: Iterable, y: Iterable) -> float:
    """Least-squares slope of log y on log x; NaN with fewer than 2 distinct positive x."""
    return slope_se(x, y)[0]


def n_slopes(m: pd.DataFrame, archs: tuple[str, str] = ("topk", "relu"), metric: str = "fvu") -> list[dict]:
    """For each (target) k where every arch in `archs` has >= 2 values of n: the log-log slope of
    `metric` against n per arch, and its standard error (NaN below 3 values of n) as "<arch>_se"."""
    out = []
    for k in sorted(m["k"].unique()):
        at_k = m[m["k"] == k]
        groups = {a: at_k[at_k["arch"].astype(str) == a] for a in archs}
        if all(g["n"].nunique() >= 2 for g in groups.values()):
            fits = {a: slope_se(g["n"], g[metric]) for a, g in groups.items()}
            out.append({"k": int(k), **{a: f[0] for a, f in fits.items()},
                        **{f"{a}_se": f[1] for a, f in fits.items()}})
    return out


FIG2B = "At a fixed sparsity level (L0 = 128), scaling laws are steeper for TopK than ReLU."


def steeper_verdict(slopes: list[dict], steep: str = "topk", shallow: str = "relu") -> Verdict:
    """Fig 2b: FVU falls with n more steeply for TopK than for ReLU at the same L0 (slope more negative), per
    k; with >= 3 values of n the slope difference must exceed Z standard errors."""
    claims = []
    for s in slopes:
        if not (math.isfinite(s[steep]) and math.isfinite(s[shallow])):
            continue
        se = math.hypot(s.get(f"{steep}_se", math.nan), s.get(f"{shallow}_se", math.nan))
        ok = sign_claim(s[shallow] - s[steep], se)
        spread = f" (difference ± {_fmt(se)})" if math.isfinite(se) else " (2 values of n: no interval)"
        claims.append((ok, f"k = {s['k']}: slope {steep} {_fmt(s[steep])} vs {shallow} {_fmt(s[shallow])}"
                           f"{spread}"))
    v = _combine(claims, f"FVU vs n is steeper for {steep} than for {shallow} at fixed L0 (Fig. 2b).",
                 f"Needs {steep} and {shallow} trained at >= 2 values of n with a common k.",
                 quote=FIG2B, source="Gao et al. Fig. 2b caption", anchor="topk-relu",
                 paper_value="slope TopK < slope ReLU (more negative)",
                 thresholds=(THRESHOLDS["z"], THRESHOLDS["point"]))
    slopes_txt = "; ".join(f"k = {s['k']}: {_fmt(s[steep])} vs {_fmt(s[shallow])}" for s in slopes)
    return with_run_value(v, f"slopes {steep} vs {shallow}: {slopes_txt}" if slopes else "")


# ---- downstream loss vs FVU at fixed L0 (Fig 5b) ----------------------------------------------------------

FIG5B = ("We also find that MSE has a clean power law relationship with both KL divergence, and difference of "
         "cross entropy loss (Figure 5b), when keeping sparsity L_0 fixed and only varying autoencoder size.")


def downstream_fits(m: pd.DataFrame, metric: str = "delta_ce") -> list[dict]:
    """Per (arch, k): slope ± se and r² of log `metric` on log FVU over the SAEs of different n (Fig. 5b holds
    L0 fixed, so k is never pooled). [{"arch", "k", "n_points", "slope", "se", "r2"}]"""
    out = []
    if metric not in m.columns or "fvu" not in m.columns:
        return out
    for (arch, k), g in m.groupby([m["arch"].astype(str), "k"]):
        x, y = _floats(g["fvu"]), _floats(g[metric])
        ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
        if len(np.unique(x[ok])) < 2:
            continue
        slope, se, r2 = slope_se(x[ok], y[ok])
        out.append({"arch": arch, "k": int(k), "n_points": int(ok.sum()), "slope": slope, "se": se, "r2": r2})
    return out


def power_law_verdict(fits: list[dict], metric: str = "ΔCE") -> Verdict:
    """Fig 5b / §4.1: at each fixed k, log metric is linear in log FVU as n varies (r² >= POWER_LAW_R2) with a
    positive slope beyond Z standard errors. Two values of n always fit a line: cannot tell."""
    claims = []
    for f in fits:
        where = f"{f['arch']} k = {f['k']} ({f['n_points']} SAEs)"
        if f["n_points"] < 3 or not math.isfinite(f["se"]):
            claims.append((None, f"{where}: slope {_fmt(f['slope'])}, 2 points fit any line"))
            continue
        rising = sign_claim(f["slope"], f["se"])
        clean = f["r2"] >= POWER_LAW_R2
        ok = False if rising is False or not clean else rising
        claims.append((ok, f"{where}: slope {_fmt(f['slope'])} ± {_fmt(f['se'])}, r² {f['r2']:.3f}"))
    v = _combine(claims, f"at fixed L0, {metric} follows a power law in FVU as n varies (Fig. 5b, §4.1).",
                 "Needs >= 2 values of n at one k with finite ΔCE.", quote=FIG5B, source="Gao et al. §4.1",
                 anchor="downstream", paper_value="a straight line on log-log axes at each fixed L0",
                 thresholds=(THRESHOLDS["power_law"], THRESHOLDS["z"]))
    fitted = "; ".join(f"{f['arch']} k = {f['k']}: slope {_fmt(f['slope'])}"
                       + (f" ± {_fmt(f['se'])}, r² {f['r2']:.3f}" if math.isfinite(f["se"]) else "")
                       for f in fits)
    return with_run_value(v, fitted)


# ---- dead latents: the AuxK x tied-init ablation (method §A.8) ------------------------------------------

def ablation_rows(m: pd.DataFrame, base: str = "topk") -> pd.DataFrame:
    """SAEs of base arch `base` (the arch itself and its variants) at the (n, k) where a variant was trained,
    sorted baseline first. Needs columns auxk, tied_init (from saescale_sae.json)."""
    rows = m[base_arch(m) == base]
    variants = rows[is_variant(rows)]
    if variants.empty:
        return rows.iloc[0:0]
    cells = set(zip(variants["n"], variants["k"]))
    rows = rows[[(n, k) in cells for n, k in zip(rows["n"], rows["k"])]]
    return rows.assign(_v=is_variant(rows)).sort_values(["n", "k", "_v", "arch"]).drop(columns="_v")


def bool_cell(x) -> bool | None:
    """A True/False cell (Python or numpy bool); None for anything else (no saescale_sae.json: NaN)."""
    return bool(x) if isinstance(x, (bool, np.bool_)) else None


def ablation_verdict(rows: pd.DataFrame, dead: str = "dead_fraction") -> Verdict:
    """App. C / A.8: without AuxK, or without tied init, more latents die than with both."""
    claims, values = [], []
    for (n, k), g in rows.groupby(["n", "k"]):
        on = g[[bool_cell(a) is True and bool_cell(t) is True for a, t in zip(g["auxk"], g["tied_init"])]]
        if on.empty or not np.isfinite(pd.to_numeric(on[dead], errors="coerce")).any():
            continue
        ref = float(pd.to_numeric(on[dead], errors="coerce").iloc[0])
        for _, r in g.drop(on.index).iterrows():
            off = [name for name, col in (("AuxK", "auxk"), ("tied init", "tied_init"))
                   if bool_cell(r[col]) is False]
            value = pd.to_numeric(pd.Series([r[dead]]), errors="coerce").iloc[0]
            if not off or not np.isfinite(value):
                continue
            claims.append((value > ref, f"without {' and '.join(off)} ({r['arch']}, n = {n}, k = {k}) "
                                        f"{value:.1%} dead vs {ref:.1%} with both"))
            values.append(f"no {' or '.join(off)}: {value:.1%} vs {ref:.1%} dead (n = {n}, k = {k})")
    v = _combine(claims, "AuxK and tied init are the two ingredients that keep latents alive; removing "
                         "either leaves more dead latents (method §A.8).",
                 "Needs a variant without AuxK or tied init next to the TopK baseline (sweep.variants).",
                 quote="Additionally, we find modifications that result in few dead latents, even at the largest "
                       "scales we tried.",
                 source="Gao et al. abstract; the ablation itself is App. C (method §A.8; its text is not in "
                        "our sources)", anchor="dead",
                 paper_value="without AuxK or tied init: more dead latents",
                 thresholds=(THRESHOLDS["point"], f"dead column: {dead}",
                             THRESHOLDS["dead_window_eval" if dead == "dead_fraction" else "dead_window"]))
    return with_run_value(v, "; ".join(values))


# ---- progressive recovery (Fig 10, method §C.8) ----------------------------------------------------------

def progressive_summary(result: dict, k: int, tol: float = CURVE_TOLERANCE) -> dict:
    """Where a test-time sweep stops improving. From the TopK(k') curve: best_k (k' of lowest FVU), FVU at
    k' = k and at the largest k', gain_beyond_k = 1 - FVU(largest k') / FVU(k' = k), and `keeps_falling`
    (FVU at the largest k' within `tol` of the minimum). From the JumpReLU(theta) curve: whether FVU at
    the largest L0 (lowest theta: all positive latents) is within `tol` of its minimum."""
    curves = result.get("curves") or {}
    top = sorted((c for c in curves.get("topk") or [] if _ok(c.get("fvu"))), key=lambda c: c["k"])
    jump = sorted((c for c in curves.get("jumprelu") or [] if _ok(c.get("fvu")) and _ok(c.get("l0"))),
                  key=lambda c: c["l0"])
    out = {"k": k, "best_k": math.nan, "fvu_at_k": math.nan, "fvu_best": math.nan, "last_k": math.nan,
           "fvu_last": math.nan, "gain_beyond_k": math.nan, "keeps_falling": None, "jump_keeps_falling": None}
    if top:
        best = min(top, key=lambda c: c["fvu"])
        at_k = [c["fvu"] for c in top if c["k"] == k]
        out.update(best_k=best["k"], fvu_best=best["fvu"], last_k=top[-1]["k"], fvu_last=top[-1]["fvu"],
                   fvu_at_k=at_k[0] if at_k else math.nan,
                   keeps_falling=bool(top[-1]["fvu"] <= best["fvu"] * (1 + tol)))
        if at_k and at_k[0] > 0:
            out["gain_beyond_k"] = 1 - top[-1]["fvu"] / at_k[0]
    if jump:
        out["jump_keeps_falling"] = bool(jump[-1]["fvu"] <= min(c["fvu"] for c in jump) * (1 + tol))
    return out


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def progressive_verdict(summaries: list[dict]) -> Verdict:
    """Fig 10: TopK-trained SAEs are progressive only up to about k (FVU rises past ~2k); Multi-TopK ones over
    all k'; ReLU ones up to all positive latents (the JumpReLU curve keeps falling to theta = 0).

    `summaries`: `progressive_summary` dicts plus "arch" and "base_arch"."""
    claims = []
    for s in summaries:
        name = f"{s['arch']} k = {s['k']}"
        if s["base_arch"] == "topk" and s["keeps_falling"] is not None:
            ok = s["best_k"] <= PROGRESSIVE_REACH * s["k"] and not s["keeps_falling"]
            claims.append((ok, f"{name}: best k' = {s['best_k']}, FVU {_fmt(s['fvu_best'])} → "
                               f"{_fmt(s['fvu_last'])} at k' = {s['last_k']} (progressive only up to ~k)"))
        elif s["base_arch"] == "multitopk" and s["keeps_falling"] is not None:
            claims.append((s["keeps_falling"], f"{name}: FVU {_fmt(s['fvu_at_k'])} at k' = k → "
                                               f"{_fmt(s['fvu_last'])} at k' = {s['last_k']} "
                                               "(progressive over all k')"))
        elif s["base_arch"] in RELU_FAMILY and s["jump_keeps_falling"] is not None:
            claims.append((s["jump_keeps_falling"], f"{name}: JumpReLU FVU "
                           f"{'keeps falling' if s['jump_keeps_falling'] else 'turns up'} down to θ = 0 "
                           "(progressive up to all positive latents)"))
    v = _combine(claims, "TopK-trained SAEs are progressive only up to about their k, Multi-TopK over all "
                         "k', ReLU up to all positive latents (Fig. 10).",
                 "Needs progressive.json for topk, multitopk or relu (config analysis.progressive).",
                 quote="TopK tends to overfit to the value of k used during training, but using Multi-TopK "
                       "improves generalization to larger k.",
                 source="Gao et al. Fig. 10 caption (the ReLU part: §5.3, method §C.8; its text is not in our "
                        "sources)", anchor="progressive",
                 paper_value="TopK: best k' ≈ k; Multi-TopK and ReLU: still improving at large k'",
                 thresholds=(THRESHOLDS["reach"], THRESHOLDS["curve"], THRESHOLDS["point"]))
    best = [f"{s['arch']} k = {s['k']}: best k' {s['best_k']}" for s in summaries
            if s["base_arch"] in ("topk", "multitopk") and _ok(s.get("best_k"))]
    return with_run_value(v, "; ".join(best))


# ---- refinement (Fig 9, method §C.9) -------------------------------------------------------------------

def refinement_verdict(records: list[dict]) -> Verdict:
    """Fig 9: refinement raises ReLU activations systematically (shrinkage), TopK's not; and it closes only
    part of the ReLU-TopK FVU gap. `records`: refinement.json dicts with arch, base_arch, n, k."""
    claims = []
    for r in records:
        rel, frac = r.get("mean_relative_change"), r.get("fraction_increased")
        if not (_ok(rel) and _ok(frac)):
            continue
        systematic = rel > 0 and frac > SYSTEMATIC
        what = (f"{r['arch']} n = {r['n']} k = {r['k']}: {frac:.0%} of activations grow, mean relative "
                f"change {rel:+.3g}")
        if r["base_arch"] in RELU_FAMILY:
            claims.append((systematic, what + " (shrinkage)"))
        elif r["base_arch"] == "topk":
            claims.append((not systematic, what + " (no systematic increase)"))
    topk = {(r["n"], r["k"]): r for r in records if r["base_arch"] == "topk" and r["arch"] == "topk"}
    for r in records:
        t = topk.get((r["n"], r["k"]))
        fvus = (r.get("fvu_before"), r.get("fvu_after"), (t or {}).get("fvu_before"))
        if r["arch"] != "relu" or not all(_ok(x) for x in fvus):
            continue
        gap = r["fvu_before"] - t["fvu_before"]
        if gap <= 0:
            continue
        closed = (r["fvu_before"] - r["fvu_after"]) / gap
        claims.append((0 < closed < 1, f"n = {r['n']} k = {r['k']}: refinement closes {closed:.0%} of the "
                                       f"ReLU–TopK FVU gap ({_fmt(r['fvu_before'])} → {_fmt(r['fvu_after'])} "
                                       f"vs TopK {_fmt(t['fvu_before'])})"))
    v = _combine(claims, "refinement increases ReLU activations on average (shrinkage) but not TopK's "
                         "systematically, and closes only part of the ReLU–TopK gap (Fig. 9).",
                 "Needs refinement.json for topk or relu (config analysis.refinement).",
                 source="Gao et al. §5.1, Fig. 9 (paraphrase from method §C.9; the paper's text is not in our "
                        "sources)", anchor="refinement",
                 paper_value="ReLU activations grow, TopK's do not systematically; 0 < gap closed < 100%",
                 thresholds=(THRESHOLDS["systematic"], THRESHOLDS["point"]))
    return with_run_value(v)
