"""Tokens to convergence (method §D.1, Gao et al. §3.1.2 and Fig. 11) and its power law in n (paper: "approximately
Θ(n^0.6) for GPT-2 small and Θ(n^0.65) for GPT-4").

The rule is ours: the paper trains "to convergence (within some ϵ)" and does not say how it decided. A run has
converged at the first token count t at which the smoothed held-out loss improved by less than a fraction
`tolerance` over the last doubling of tokens, 1 - L(t) / L(t/2) < tolerance (method §D.1 [I]; 0.01 by default).

The trainer uses `converged_at` to stop a run in convergence mode (train.convergence), within a token cap that
grows with n (`token_cap`); the scaling stage applies the same rule to every logged curve, so SAEs trained for
a fixed budget report whether and where they would have stopped. A run that never met the rule is censored:
its tokens to convergence exceed its last logged token count, a lower bound the exponent fit keeps
(fits.censored_slope), instead of dropping it (which would bias the exponent low: the censored are the large n).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from saescale.scaling.fits import censored_slope

PAPER_EXPONENT = {"GPT-2 small": 0.6, "GPT-4": 0.65}


def stopping_rows(eval_rows: slice, count: int, ctx_len: int) -> slice:
    """The store rows the held-out FVU is logged on and convergence mode stops on: the last `count` rows of the
    eval split, rounded up to whole windows and at most half of it. The final evaluation leaves them out
    (`final_eval_rows`), so the stopping decision never sees the rows the reported metrics use."""
    if count <= 0:
        return slice(eval_rows.stop, eval_rows.stop)
    size = eval_rows.stop - eval_rows.start
    windows = min(-(-count // ctx_len), (size // ctx_len) // 2)
    return slice(eval_rows.stop - windows * ctx_len, eval_rows.stop)


def final_eval_rows(eval_rows: slice, count: int, ctx_len: int) -> slice:
    """The eval split without its stopping rows (`stopping_rows`): what the final metrics are computed on."""
    return slice(eval_rows.start, stopping_rows(eval_rows, count, ctx_len).start)


def token_cap(train: dict, n: int) -> int:
    """The token budget of one SAE: train.tokens, or in convergence mode (train.convergence.tolerance > 0) a cap
    tokens * (n / cap_ref_n)^cap_exponent that grows with n, so that a larger SAE, which needs more tokens to
    converge (Θ(n^0.6), Gao et al. §3.1.2), is not stopped by a cap sized for a small one. The cap only bounds
    the run; where it binds the SAE is censored, never counted as converged."""
    conv = train.get("convergence") or {}
    tokens = int(train["tokens"])
    if not conv.get("tolerance") or not conv.get("cap_exponent"):
        return tokens
    ref = conv.get("cap_ref_n") or n
    return max(int(train.get("batch_size", 1)), int(round(tokens * (n / ref) ** float(conv["cap_exponent"]))))


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
    token count is `censored_at`) and the fitted exponent of tokens-to-convergence vs n, the censored SAEs
    entering as lower bounds (fits.censored_slope)."""
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
        fit = censored_slope([p["n"] for p in points], [p["tokens"] or p["censored_at"] for p in points],
                             [0 if p["tokens"] else -1 for p in points])
        if not fit["ok"]:
            fit["reason"] = (f"{len(done)} of {len(points)} SAEs converged (tolerance {tolerance:g} per doubling); "
                             + fit["reason"])
        out.append({"arch": str(arch), "k": int(k), "loss": loss, "tolerance": tolerance, "smoothing": smoothing,
                    "points": points, "fit": fit})
    return out
