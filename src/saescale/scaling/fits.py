"""Scaling-law fits of converged SAE loss (REFERENCE D.1, Gao et al. 2024).

Per k:      L(n) = a * n^-b + e                     (power law plus irreducible loss e >= 0)
Joint (eq. 3): L(n, k) = exp(alpha + beta_k log k + beta_n log n + gamma log k log n) + exp(zeta + eta log k)
GPT-4 constants in the paper: alpha=-0.50, beta_k=0.26, beta_n=-0.017, gamma=-0.042, zeta=-1.32, eta=-0.085.

Fits minimise residuals of log L (losses span orders of magnitude, so relative error is the right scale),
use several starting points and keep the best, and never raise on bad data: they return ok=False + reason.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import OptimizeWarning, curve_fit

POWER_FORM = "a*n^-b + e"
JOINT_FORM = "exp(alpha + beta_k*log k + beta_n*log n + gamma*log k*log n) + exp(zeta + eta*log k)"
JOINT_PARAMS = ("alpha", "beta_k", "beta_n", "gamma", "zeta", "eta")


def _errors(pcov: np.ndarray, n: int) -> np.ndarray:
    """1-sigma errors from the covariance; NaN where it is not estimable (singular / inf)."""
    pcov = np.asarray(pcov, dtype=float)
    if pcov.shape != (n, n) or not np.all(np.isfinite(pcov)):
        return np.full(n, np.nan)
    d = np.diag(pcov)
    return np.where(d >= 0, np.sqrt(np.abs(d)), np.nan)


def _best_fit(f, xdata, logy, starts, **kw) -> tuple[np.ndarray, np.ndarray, float] | str:
    """Run curve_fit from each start; return (popt, pcov, rmse_log) of the lowest log-RMSE, or a reason."""
    best, last_err = None, "no starting point converged"
    for p0 in starts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                warnings.simplefilter("ignore", RuntimeWarning)
                popt, pcov = curve_fit(f, xdata, logy, p0=p0, maxfev=20000, **kw)
            r = logy - f(xdata, *popt)
            rmse = float(np.sqrt(np.mean(r**2)))
        except (RuntimeError, ValueError, FloatingPointError) as exc:
            last_err = f"optimization failed: {exc}"
            continue
        if np.all(np.isfinite(popt)) and math.isfinite(rmse) and (best is None or rmse < best[2]):
            best = (popt, pcov, rmse)
    return best if best is not None else last_err


def _clean(*arrays) -> tuple[list[np.ndarray], str | None]:
    """Float 1-D arrays with non-finite / non-positive rows removed (logs need positive values)."""
    arrs = [np.asarray(a, dtype=float).ravel() for a in arrays]
    if len({a.size for a in arrs}) != 1:
        return arrs, "input arrays have different lengths"
    mask = np.all([np.isfinite(a) & (a > 0) for a in arrs], axis=0)
    return [a[mask] for a in arrs], None


def _power_log_model(x, log_a, b, e):
    return np.log(np.exp(log_a) * x ** (-b) + e)


def fit_power_law(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Fit y = a*n^-b + e (REFERENCE D.1, per k) on log y; a = exp(log_a) keeps a > 0, bounds keep e >= 0."""
    (x, y), err = _clean(x, y)
    if err:
        return {"ok": False, "reason": err, "n_points": int(x.size)}
    n_distinct = int(np.unique(x).size)
    if n_distinct < 4:
        reason = f"{n_distinct} points; need at least 4 distinct n"
        return {"ok": False, "reason": reason, "n_points": int(x.size)}
    logy, logx = np.log(y), np.log(x)
    starts = []
    for frac in (0.0, 0.5, 0.9):  # irreducible term as a fraction of the smallest loss
        e0 = frac * y.min()
        slope, icept = np.polyfit(logx, np.log(y - e0), 1)
        starts.append((icept, float(np.clip(-slope, 1e-3, 4.9)), e0))
    starts += [(logy.max() + 0.3 * logx.min(), 0.3, 0.0), (logy.max() + logx.min(), 1.0, 0.5 * y.min())]
    bounds = ([-100.0, 0.0, 0.0], [100.0, 5.0, float(y.max())])
    res = _best_fit(_power_log_model, x, logy, starts, bounds=bounds)
    if isinstance(res, str):
        return {"ok": False, "reason": res, "n_points": int(x.size)}
    (log_a, b, e), pcov, rmse = res
    errs = _errors(pcov, 3)
    a = float(np.exp(log_a))
    return {"form": POWER_FORM, "a": a, "b": float(b), "e": float(e),
            "a_err": float(a * errs[0]), "b_err": float(errs[1]), "e_err": float(errs[2]),
            "n_points": int(x.size), "rmse_log": rmse, "ok": True,
            # b pinned at 0 means the data show no decrease with n: a fit, but not a scaling law
            "at_bound": bool(b <= bounds[0][1] + 1e-9 or b >= bounds[1][1] - 1e-9)}


def predict_power_law(fit: dict[str, Any], x) -> np.ndarray:
    """Evaluate a fit_power_law result at n = x."""
    x = np.asarray(x, dtype=float)
    return fit["a"] * x ** (-fit["b"]) + fit["e"]


def _joint_log_model(nk, alpha, beta_k, beta_n, gamma, zeta, eta):
    ln, lk = np.log(nk[0]), np.log(nk[1])
    # REFERENCE D.1 eq. 3, in log space: log(exp(A) + exp(B)) computed stably with logaddexp.
    return np.logaddexp(alpha + beta_k * lk + beta_n * ln + gamma * lk * ln, zeta + eta * lk)


def _joint_seed(n: np.ndarray, k: np.ndarray, y: np.ndarray) -> tuple | None:
    """Seed eq. 3 from per-k power laws: log a_k, -b_k, log e_k are each linear in log k."""
    lks, la, nb, le = [], [], [], []
    for kv in np.unique(k):
        f = fit_power_law(n[k == kv], y[k == kv])
        if f.get("ok") and f["e"] > 0:
            lks.append(np.log(kv)), la.append(np.log(f["a"])), nb.append(-f["b"]), le.append(np.log(f["e"]))
    if len(lks) < 2:
        return None
    beta_k, alpha = np.polyfit(lks, la, 1)
    gamma, beta_n = np.polyfit(lks, nb, 1)
    eta, zeta = np.polyfit(lks, le, 1)
    return (alpha, beta_k, beta_n, gamma, zeta, eta)


def fit_joint_law(n, k, y) -> dict[str, Any]:
    """Fit REFERENCE D.1 eq. 3 (6 params) to log L; needs >= 7 points over >= 2 distinct k and n."""
    (n, k, y), err = _clean(n, k, y)
    if err:
        return {"ok": False, "reason": err, "n_points": int(n.size)}
    nk_, nn_ = int(np.unique(k).size), int(np.unique(n).size)
    if n.size < 7 or nk_ < 2 or nn_ < 2:
        return {"ok": False, "n_points": int(n.size),
                "reason": f"{n.size} points over {nk_} k and {nn_} n; need >= 7 points, >= 2 distinct k, n"}
    logy = np.log(y)
    ly0 = float(np.median(logy))
    starts = [(ly0, 0.0, -0.1, 0.0, ly0 - 1.0, 0.0), (-0.5, 0.26, -0.017, -0.042, -1.32, -0.085),
              (ly0 + 1.0, 0.2, -0.3, 0.0, float(logy.min()) - 0.5, 0.0)]
    seed = _joint_seed(n, k, y)
    if seed is not None and np.all(np.isfinite(seed)):
        starts.insert(0, seed)
    res = _best_fit(_joint_log_model, np.vstack([n, k]), logy, starts)
    if isinstance(res, str):
        return {"ok": False, "reason": res, "n_points": int(n.size)}
    popt, pcov, rmse = res
    errs = _errors(pcov, 6)
    out: dict[str, Any] = {"form": JOINT_FORM}
    for name, v, s in zip(JOINT_PARAMS, popt, errs):
        out[name], out[f"{name}_err"] = float(v), float(s)
    out.update(n_points=int(n.size), rmse_log=rmse, ok=True)
    return out


def predict_joint_law(fit: dict[str, Any], n, k) -> np.ndarray:
    """Evaluate a fit_joint_law result at (n, k) (broadcast)."""
    n, k = np.broadcast_arrays(np.asarray(n, dtype=float), np.asarray(k, dtype=float))
    return np.exp(_joint_log_model(np.stack([n, k]), *(fit[p] for p in JOINT_PARAMS)))


def loglog_slope(x, y, x_min: float | None = None, x_max: float | None = None) -> dict[str, Any]:
    """OLS slope of log y on log x over [x_min, x_max] with its standard error and R^2: the exponent of a
    pure power law y = c x^s (tokens to convergence vs n, best lr vs n). Refuses below 3 points."""
    (x, y), err = _clean(x, y)
    if err:
        return {"ok": False, "reason": err, "n_points": int(x.size)}
    keep = np.ones(x.size, bool)
    if x_min is not None:
        keep &= x >= x_min
    if x_max is not None:
        keep &= x <= x_max
    x, y = x[keep], y[keep]
    if np.unique(x).size < 3:
        return {"ok": False, "n_points": int(x.size),
                "reason": f"{np.unique(x).size} distinct x in range; need at least 3 for a slope with an error"}
    lx, ly = np.log(x), np.log(y)
    (slope, icept), cov = np.polyfit(lx, ly, 1, cov="unscaled")
    resid = ly - (slope * lx + icept)
    dof = x.size - 2
    sigma2 = float(resid @ resid) / dof if dof > 0 else math.nan
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    return {"ok": True, "slope": float(slope), "slope_err": float(math.sqrt(max(cov[0, 0] * sigma2, 0.0))),
            "intercept": float(icept), "r2": 1 - float(resid @ resid) / ss_tot if ss_tot > 0 else math.nan,
            "n_points": int(x.size), "x_min": float(x.min()), "x_max": float(x.max())}


def bootstrap_power_law(x, y, reps: int = 200, seed: int = 0) -> dict[str, Any]:
    """fit_power_law plus bootstrap 16th-84th percentile intervals of a, b, e (resampling points): the
    covariance errors assume a well-specified model, which a frontier with off-trend small SAEs is not."""
    fit = fit_power_law(x, y)
    if not fit.get("ok"):
        return fit
    (x, y), _ = _clean(x, y)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(reps):
        idx = rng.integers(0, x.size, x.size)
        if np.unique(x[idx]).size < 4:
            continue
        f = fit_power_law(x[idx], y[idx])
        if f.get("ok"):
            draws.append((f["a"], f["b"], f["e"]))
    if len(draws) >= max(10, reps // 4):
        lo, hi = np.percentile(np.array(draws), [16, 84], axis=0)
        fit.update({f"{p}_ci": [float(lo[i]), float(hi[i])] for i, p in enumerate("abe")}, bootstrap_reps=len(draws))
    else:
        fit["bootstrap_reps"] = len(draws)
    return fit


def _plain(v):
    """Numpy scalars -> Python int/float/str so group keys serialise."""
    v = v.item() if isinstance(v, np.generic) else v
    return int(v) if isinstance(v, float) and v.is_integer() else v


def fit_all(table: pd.DataFrame, metric: str = "fvu") -> dict[str, Any]:
    """Per-(arch, k) power laws and per-arch joint laws of `metric` vs n; drops non-finite / <= 0 rows."""
    missing = {"arch", "n", "k", metric} - set(table.columns)
    if missing:
        raise KeyError(f"table lacks columns {sorted(missing)}")
    vals = pd.to_numeric(table[metric], errors="coerce").to_numpy(dtype=float)
    keep = np.isfinite(vals) & (vals > 0)
    df = table.loc[keep, ["arch", "n", "k"]].assign(_y=vals[keep])
    per_k = [{"arch": _plain(arch), "k": _plain(kv), **fit_power_law(g["n"].to_numpy(), g["_y"].to_numpy())}
             for (arch, kv), g in sorted(df.groupby(["arch", "k"]), key=lambda t: (str(t[0][0]), t[0][1]))]
    joint = [{"arch": _plain(arch), **fit_joint_law(g["n"].to_numpy(), g["k"].to_numpy(), g["_y"].to_numpy())}
             for arch, g in sorted(df.groupby("arch"), key=lambda t: str(t[0]))]
    return {"metric": metric, "dropped_rows": int((~keep).sum()), "per_k": per_k, "joint": joint}


def to_jsonable(obj: Any) -> Any:
    """Recursively turn numpy types into Python ones and NaN/inf into None (safe for allow_nan=False)."""
    if isinstance(obj, dict):
        return {(k.item() if isinstance(k, np.generic) else k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
