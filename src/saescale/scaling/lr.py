"""Learning rate vs n (method §D.1, Gao et al. §3.1.2 and Fig. 3), as the paper states it: "the largest learning
rate that converges scales with 1/√n" and "the optimal learning rate for L(N) is about four times smaller than
the optimal learning rate for L(C)".

From one sweep of lr multiples at each n:
- the largest lr that converges (`converges` defines it) and its exponent against n (paper: -0.5). The true
  value lies between the largest converging lr and the next lr tried, so each n gives the interval's geometric
  middle with the grid's quantisation error; a sweep whose largest lr still converges (or whose smallest does
  not) gives a bound, which the fit keeps as one (fits.censored_slope);
- the L(N)-optimal lr: the lowest converged loss over the lrs that met the convergence rule;
- the L(C)-optimal lr: the lowest loss reached within a fixed compute, the same for every lr of that n
  (`compute_tokens`; by default the token count at which the first lr of that n converged, so every run is
  still compute-limited there);
- their ratio L(C)-optimal / L(N)-optimal (paper: about 4), its geometric mean over n with an error.

Optima are the vertex of a parabola in log lr through the lowest point and its two neighbours, so they are not
quantised to the grid; an optimum at the edge of the sweep is reported as a bound and kept out of the ratio.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from saescale.scaling.fits import censored_slope

PAPER_EXPONENT = -0.5
PAPER_RATIO = 4.0
# What "converges" means here (our choice; the paper does not define it): the held-out FVU is finite at every
# log step, ends at least DROP below where it was first logged (the run learned), and over the last WINDOW of
# its log never rises more than BLOWUP above the best it had reached (no blow-up or late oscillation).
DROP, WINDOW, BLOWUP = 0.1, 0.25, 0.1


def converges(loss, drop: float = DROP, window: float = WINDOW, blowup: float = BLOWUP) -> dict[str, Any]:
    """{"ok": bool, "why": str} for one run's held-out loss curve (in log order), by the rule above."""
    y = np.asarray(loss, float)
    if y.size < 3:
        return {"ok": False, "why": f"{y.size} logged points; need 3"}
    if not np.all(np.isfinite(y)):
        return {"ok": False, "why": f"non-finite held-out loss at log point {int(np.argmin(np.isfinite(y)))}"}
    if not y[-1] <= (1 - drop) * y[0]:
        return {"ok": False, "why": f"final loss {y[-1]:.4g} not {drop:.0%} below the first logged {y[0]:.4g}"}
    tail = y[int(math.floor(y.size * (1 - window))):]
    best = np.minimum.accumulate(y)[-tail.size:]
    worst = float(np.max(tail / best - 1))
    if worst > blowup:
        return {"ok": False, "why": f"late blow-up: {worst:.0%} above the best loss in the last {window:.0%} of the log"}
    return {"ok": True, "why": "converges"}


def best_lr(lrs, losses) -> dict[str, Any]:
    """{"lr", "loss", "method": parabola|grid, "at_edge"} of one n's sweep; needs 2+ finite points."""
    lr, y = np.asarray(lrs, float), np.asarray(losses, float)
    keep = np.isfinite(lr) & np.isfinite(y) & (lr > 0)
    lr, y = lr[keep], y[keep]
    if lr.size < 2:
        return {"ok": False, "reason": f"{lr.size} finite points; a sweep needs at least 2"}
    order = np.argsort(lr)
    lr, y = lr[order], y[order]
    i = int(np.argmin(y))
    out = {"ok": True, "lr": float(lr[i]), "loss": float(y[i]), "method": "grid",
           "at_edge": i in (0, lr.size - 1), "edge": "low" if i == 0 else "high" if i == lr.size - 1 else None}
    if not out["at_edge"]:
        x3, y3 = np.log(lr[i - 1:i + 2]), y[i - 1:i + 2]
        c2, c1, c0 = np.polyfit(x3, y3, 2)
        vertex = -c1 / (2 * c2) if c2 > 0 else math.nan
        if math.isfinite(vertex) and x3[0] <= vertex <= x3[2]:
            out.update(lr=float(math.exp(vertex)), loss=float(c0 + c1 * vertex + c2 * vertex**2), method="parabola")
    return out


def largest_converging(sweep: list[dict]) -> dict[str, Any]:
    """From one n's sweep (each {"lr", "converges": bool}): the interval the largest converging lr lies in.
    `bound` 0: between the largest converging lr and the next lr tried (estimate: the geometric middle, error:
    the uniform spread over the interval in log lr); -1: the largest lr tried converged (a lower bound); +1:
    none converged (an upper bound at the smallest lr tried)."""
    pts = sorted((p for p in sweep if p["lr"] > 0), key=lambda p: p["lr"])
    if not pts:
        return {"ok": False, "reason": "no lr in the sweep"}
    good = [i for i, p in enumerate(pts) if p["converges"]]
    if not good:
        return {"ok": True, "lr": pts[0]["lr"], "bound": 1, "log_err": math.nan, "interval": [None, pts[0]["lr"]]}
    i = good[-1]
    if i == len(pts) - 1:
        return {"ok": True, "lr": pts[i]["lr"], "bound": -1, "log_err": math.nan, "interval": [pts[i]["lr"], None]}
    lo, hi = pts[i]["lr"], pts[i + 1]["lr"]
    return {"ok": True, "lr": math.sqrt(lo * hi), "bound": 0, "log_err": math.log(hi / lo) / (2 * math.sqrt(3)),
            "interval": [lo, hi]}


def largest_lr_fit(per_n: list[dict]) -> dict[str, Any]:
    """Exponent of the largest converging lr vs n (bounds kept as bounds), its error combining the fit's with
    the grid's quantisation (each n's log_err carried through the least-squares slope's weights)."""
    rows = [r for r in per_n if r["largest"].get("ok")]
    fit = censored_slope([r["n"] for r in rows], [r["largest"]["lr"] for r in rows],
                         [r["largest"]["bound"] for r in rows])
    if not fit.get("ok"):
        bounds = sum(1 for r in rows if r["largest"]["bound"] != 0)
        fit["reason"] = f"{len(rows) - bounds} n with the largest converging lr inside the sweep; " + fit["reason"]
        return fit
    exact = [r for r in rows if r["largest"]["bound"] == 0]
    lx = np.log([r["n"] for r in exact])
    w = (lx - lx.mean()) / ((lx - lx.mean()) ** 2).sum()
    quant = float(math.sqrt(sum((wi * r["largest"]["log_err"]) ** 2 for wi, r in zip(w, exact))))
    fit_err = fit["slope_err"] if math.isfinite(fit.get("slope_err", math.nan)) else 0.0
    return {**fit, "fit_err": fit_err, "quantisation_err": quant, "slope_err": math.hypot(fit_err, quant)}


def _loss_within(points: dict, tokens: float) -> float:
    """The best held-out loss a run reached within `tokens` (its min(EMA, raw) curve)."""
    t = np.asarray(points["tokens"], float)
    y = np.asarray(points["loss_curve"], float)
    keep = (t <= tokens * (1 + 1e-9)) & np.isfinite(y)
    return float(y[keep].min()) if keep.any() else math.nan


def optima(sweep: list[dict], compute_tokens: float | None) -> dict[str, Any]:
    """One n's L(N)- and L(C)-optimal lr (see the module docstring) and their ratio."""
    conv = [p for p in sweep if p.get("tokens_to_convergence") and p["converges"]]
    ln = best_lr([p["lr"] for p in conv], [p["loss"] for p in conv]) if len(conv) >= 2 else \
        {"ok": False, "reason": f"{len(conv)} lr met the convergence rule; need 2"}
    firsts = [p["tokens_to_convergence"] for p in sweep if p.get("tokens_to_convergence")]
    budget = compute_tokens or (min(firsts) if firsts else None)
    if budget is None:
        lc = {"ok": False, "reason": "no lr converged, so no compute budget to read L(C) at (scaling.lr_sweep.compute_tokens)"}
    else:
        lc = best_lr([p["lr"] for p in sweep], [_loss_within(p, budget) for p in sweep])
    out = {"ln": ln, "lc": lc, "compute_tokens": budget, "ratio": None}
    if ln.get("ok") and lc.get("ok") and not ln["at_edge"] and not lc["at_edge"]:
        out["ratio"] = lc["lr"] / ln["lr"]
    return out


def ratio_summary(per_n: list[dict]) -> dict[str, Any]:
    """Geometric mean over n of L(C)-optimal / L(N)-optimal lr, with the standard error of its log (the
    spread over n; with one n, the grid's quantisation: the sweep's log spacing / sqrt(12))."""
    ratios = [r["optima"]["ratio"] for r in per_n if r["optima"].get("ratio")]
    if not ratios:
        edges = [r["n"] for r in per_n if not r["optima"].get("ratio")]
        return {"ok": False, "reason": f"no n with both optima inside the sweep (n = {edges})"}
    logs = np.log(ratios)
    spacing = [np.diff(np.log(sorted(p["lr"] for p in r["sweep"]))).mean() for r in per_n if len(r["sweep"]) > 1]
    quant = float(np.mean(spacing) / math.sqrt(12)) if spacing else math.nan
    spread = float(logs.std(ddof=1) / math.sqrt(logs.size)) if logs.size > 1 else math.nan
    se = math.hypot(spread if math.isfinite(spread) else 0.0, quant / math.sqrt(logs.size))
    mean = float(logs.mean())
    return {"ok": True, "ratio": math.exp(mean), "log_err": se, "interval_2se": [math.exp(mean - 2 * se),
                                                                                 math.exp(mean + 2 * se)],
            "n_values": int(logs.size), "per_n": [float(r) for r in ratios], "paper": PAPER_RATIO}


def lr_study(points: list[dict], compute_tokens: float | None = None) -> dict[str, Any]:
    """`points`: one per trained SAE of the sweep (one arch, k): {n, lr, multiple, loss (final, converged
    runs' L(N) value), tokens_to_convergence (None: never met the rule), loss_curve and tokens (the min(EMA,
    raw) held-out curve), converges (see `converges`)}. Returns per-n sweeps with the largest converging lr,
    the L(N)/L(C) optima, and the fits of both claims; `fit` (the largest converging lr's exponent) is the
    headline."""
    per_n = []
    for n in sorted({int(p["n"]) for p in points}):
        sweep = sorted((p for p in points if int(p["n"]) == n), key=lambda p: p["lr"])
        per_n.append({"n": n, "sweep": sweep, "largest": largest_converging(sweep),
                      "optima": optima(sweep, compute_tokens)})
    return {"per_n": per_n, "fit": largest_lr_fit(per_n), "ratio": ratio_summary(per_n),
            "paper_exponent": PAPER_EXPONENT, "paper_ratio": PAPER_RATIO,
            "rule": {"drop": DROP, "window": WINDOW, "blowup": BLOWUP}}
