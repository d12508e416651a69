"""L(C) (method §D.1, Gao et al. Fig. 1a): the compute-optimal loss frontier over the SAEs of one k, fitted
with L(C) = a * C^-b + e.

Training compute is the log's `flops` column, 6 * tokens * n * d_model (FLOPS_FORMULA): forward and backward
of the encoder and decoder matmuls, as in the paper's "compute ∝ tokens × n × d". The frontier at budget C is
the lowest loss any SAE reached with at most C FLOPs (stopping a run early is allowed: Gao et al. train "to the
optimal MSE for a compute budget, disregarding convergence"), read on a log-spaced grid of C.

The loss at each logged point is the lower of the EMA weights' and the raw weights' held-out FVU (method §A.7:
"for L(C), take the min of EMA and raw"; early in a run the EMA lags), where the log has both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from saescale.scaling.fits import bootstrap_power_law

FLOPS_FORMULA = "6 * tokens * n * d_model"


BEST = "heldout_fvu_best"  # min(EMA, raw) held-out FVU, added by with_best


def _has(logs: pd.DataFrame, col: str) -> bool:
    return col in logs.columns and pd.to_numeric(logs[col], errors="coerce").notna().any()


def with_best(logs: pd.DataFrame) -> pd.DataFrame:
    """`logs` with BEST: per row the lower of heldout_fvu (raw weights) and heldout_fvu_ema (EMA weights),
    the raw value where the EMA's is missing (logs written before it was recorded, runs without EMA)."""
    if not _has(logs, "heldout_fvu"):
        return logs
    raw = pd.to_numeric(logs["heldout_fvu"], errors="coerce")
    ema = pd.to_numeric(logs["heldout_fvu_ema"], errors="coerce") if "heldout_fvu_ema" in logs.columns else raw
    return logs.assign(**{BEST: np.fmin(raw, ema)})


def loss_column(logs: pd.DataFrame) -> str:
    """The L(C) loss: min(EMA, raw) held-out FVU when the logs have the held-out FVU (fixed rows: no batch
    noise, no memorised rows; call with_best first), else training FVU."""
    if _has(logs, BEST):
        return BEST
    if _has(logs, "heldout_fvu"):
        return "heldout_fvu"
    return "fvu"


def _best_so_far(curve: pd.DataFrame, loss: str, smooth: int) -> tuple[np.ndarray, np.ndarray]:
    curve = curve[["flops", loss]].apply(pd.to_numeric, errors="coerce").dropna().sort_values("flops")
    y = curve[loss].rolling(smooth, min_periods=1).mean() if smooth > 1 else curve[loss]
    return curve["flops"].to_numpy(float), np.minimum.accumulate(y.to_numpy(float))


def frontier(logs: pd.DataFrame, loss: str, per_decade: int = 8, smooth: int = 1) -> pd.DataFrame:
    """Lower envelope over n of loss vs compute: the logged (C, loss) points no point of less compute beats
    (the Pareto front over every SAE's curve), thinned to the best one per 1/per_decade decade of C, each with
    the n that reached it. Points sit where they were measured, not on a grid, so the fit sees no staircase.
    `smooth` averages noisy training-loss rows first (a running minimum of raw batch losses would follow the
    noise down)."""
    parts = []
    for n, g in logs.groupby("n"):
        flops, best = _best_so_far(g, loss, smooth)
        parts.append(pd.DataFrame({"flops": flops, "loss": best, "n": int(n)}))
    pts = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["flops", "loss", "n"])
    pts = pts[(pts["flops"] > 0) & (pts["loss"] > 0)].sort_values(["flops", "loss"])
    if pts.empty:
        return pd.DataFrame(columns=["flops", "loss", "n"])
    front = pts[pts["loss"] < pts["loss"].cummin().shift(fill_value=np.inf)]
    bins = np.floor(np.log10(front["flops"].to_numpy(float)) * per_decade)
    return front.groupby(bins).tail(1).reset_index(drop=True).astype({"n": int})


def compute_study(logs: pd.DataFrame, per_decade: int = 8, reps: int = 200) -> list[dict[str, Any]]:
    """Per (arch, k) with at least two n: the frontier points and the bootstrap-errored fit of a*C^-b + e."""
    out = []
    if logs.empty or not {"arch", "n", "k", "flops"} <= set(logs.columns):
        return out
    logs = with_best(logs)
    loss = loss_column(logs)
    smooth = 1 if loss != "fvu" else 5
    for (arch, k), g in sorted(logs.groupby(["arch", "k"]), key=lambda t: (str(t[0][0]), t[0][1])):
        ns = sorted(int(n) for n in g["n"].unique())
        entry: dict[str, Any] = {"arch": str(arch), "k": int(k), "loss": loss, "n": ns,
                                 "flops_formula": FLOPS_FORMULA}
        if len(ns) < 2:
            entry.update(points=[], fit={"ok": False, "reason": f"one n ({ns[0]}); a frontier needs several"})
        else:
            pts = frontier(g, loss, per_decade, smooth)
            entry.update(points=pts.to_dict("records"),
                         fit=bootstrap_power_law(pts["flops"].to_numpy(), pts["loss"].to_numpy(), reps=reps))
        out.append(entry)
    return out
