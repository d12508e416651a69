"""Tokens to convergence (REFERENCE D.1, Gao et al. Fig. 11): the first token count t at which the smoothed
held-out loss improved by less than a fraction `tolerance` over the last doubling of tokens, i.e.
1 - L(t) / L(t/2) < tolerance, and its power law in n (paper: ≈ n^0.6 for GPT-2 small, n^0.65 for GPT-4).

The trainer uses `converged_at` to stop a run in convergence mode (train.convergence); the scaling stage
applies the same rule to every logged curve, so SAEs trained for a fixed budget report whether and where
they would have stopped (censored at the budget when they would not).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from saescale.scaling.fits import loglog_slope

PAPER_EXPONENT = {"GPT-2 small": 0.6, "GPT-4": 0.65}


def smoothed(loss: np.ndarray, decay: float) -> np.ndarray:
    """Trailing EMA with bias correction (decay 0: the raw values)."""
    if decay <= 0:
        return np.asarray(loss, float)
    out, acc, weight = [], 0.0, 0.0
    for v in loss:
        acc, weight = decay * acc + (1 - decay) * v, decay * weight + (1 - decay)
        out.append(acc / weight)
    return np.array(out)


def converged_at(tokens, loss, tolerance: float, smoothing: float = 0.0, min_tokens: float = 0.0) -> float | None:
    """The first logged t >= min_tokens with 1 - L(t)/L(t/2) < tolerance (L(t/2) interpolated in log tokens);
    None if the curve never gets there. Points before twice the first logged token count have no half to
    compare with."""
    t, y = np.asarray(tokens, float), smoothed(np.asarray(loss, float), smoothing)
    keep = np.isfinite(t) & np.isfinite(y) & (t > 0) & (y > 0)
    t, y = t[keep], y[keep]
    if t.size < 2:
        return None
    log_t, log_y = np.log(t), np.log(y)
    for i in range(1, t.size):
        half = log_t[i] - np.log(2)
        if half < log_t[0] or t[i] < min_tokens:
            continue
        y_half = np.exp(np.interp(half, log_t[: i + 1], log_y[: i + 1]))
        if 1 - y[i] / y_half < tolerance:
            return float(t[i])
    return None


def objective_fixed_from(curve: pd.DataFrame) -> float:
    """Tokens from which a penalty arch's lambda is frozen (its log's `penalty` at its final value): before,
    the held-out FVU rises as the calibration raises lambda, which is not convergence. 0 for other archs."""
    penalty = pd.to_numeric(curve.get("penalty", pd.Series(dtype=float)), errors="coerce").to_numpy(float)
    if penalty.size == 0 or not np.isfinite(penalty[-1]):
        return 0.0
    moving = np.flatnonzero(penalty != penalty[-1])
    return float(curve["tokens"].iloc[moving[-1] + 1]) if moving.size else 0.0


def convergence_study(logs: pd.DataFrame, loss: str, tolerance: float, smoothing: float = 0.0) -> list[dict]:
    """Per (arch, k): every SAE's tokens to convergence (None: not converged by the end of its run, whose
    token count is `censored_at`) and the fitted exponent of tokens-to-convergence vs n on the converged."""
    out: list[dict[str, Any]] = []
    if logs.empty:
        return out
    for (arch, k), g in sorted(logs.groupby(["arch", "k"]), key=lambda t: (str(t[0][0]), t[0][1])):
        points = []
        for n, curve in sorted(g.groupby("n")):
            curve = curve.sort_values("tokens")
            t = converged_at(curve["tokens"], pd.to_numeric(curve[loss], errors="coerce"), tolerance, smoothing,
                             objective_fixed_from(curve))
            points.append({"n": int(n), "tokens": t, "censored_at": None if t else float(curve["tokens"].max())})
        done = [p for p in points if p["tokens"]]
        fit = loglog_slope([p["n"] for p in done], [p["tokens"] for p in done])
        if not fit["ok"]:
            fit["reason"] = (f"{len(done)} of {len(points)} SAEs converged (tolerance {tolerance:g} per doubling); "
                             + fit["reason"])
        out.append({"arch": str(arch), "k": int(k), "loss": loss, "tolerance": tolerance, "smoothing": smoothing,
                    "points": points, "fit": fit})
    return out
