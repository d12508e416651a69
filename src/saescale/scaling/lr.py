"""Learning rate vs n (REFERENCE D.1, Gao et al. Fig. 3): the loss-minimising lr at each n from a sweep of
multiples of the 1/sqrt(n) rule, and the exponent of best lr vs n (paper: the largest converging lr scales as
n^-0.5, and the L(N)-optimal lr is about the L(C)-optimal one divided by 4).

The best lr is the vertex of a parabola in log lr through the lowest point and its two neighbours, so the
exponent is not quantised to the sweep's grid; a minimum at the edge of the sweep is reported as a bound.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from saescale.scaling.fits import loglog_slope

PAPER_EXPONENT = -0.5


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
           "at_edge": i in (0, lr.size - 1)}
    if not out["at_edge"]:
        x3, y3 = np.log(lr[i - 1:i + 2]), y[i - 1:i + 2]
        c2, c1, c0 = np.polyfit(x3, y3, 2)
        vertex = -c1 / (2 * c2) if c2 > 0 else math.nan
        if math.isfinite(vertex) and x3[0] <= vertex <= x3[2]:
            out.update(lr=float(math.exp(vertex)), loss=float(c0 + c1 * vertex + c2 * vertex**2), method="parabola")
    return out


def lr_study(points: list[dict]) -> dict[str, Any]:
    """`points`: {n, lr, multiple, loss, tokens_to_convergence?} per trained SAE of the sweep (one arch, k).
    Returns per-n sweeps with their best lr and the fit of best lr vs n (edge minima excluded)."""
    per_n = []
    for n in sorted({int(p["n"]) for p in points}):
        sweep = sorted((p for p in points if int(p["n"]) == n), key=lambda p: p["lr"])
        best = best_lr([p["lr"] for p in sweep], [p["loss"] for p in sweep])
        per_n.append({"n": n, "sweep": sweep, "best": best})
    usable = [r for r in per_n if r["best"].get("ok") and not r["best"]["at_edge"]]
    fit = loglog_slope([r["n"] for r in usable], [r["best"]["lr"] for r in usable])
    if not fit["ok"]:
        edges = sum(1 for r in per_n if r["best"].get("at_edge"))
        fit["reason"] = f"{len(usable)} n with an interior optimum ({edges} at the sweep's edge); " + fit["reason"]
    return {"per_n": per_n, "fit": fit, "paper_exponent": PAPER_EXPONENT}
