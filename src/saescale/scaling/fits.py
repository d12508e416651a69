"""Scaling-law fits of SAE loss against n (method §D.1, Gao et al. 2024 §3.1.2-§3.1.4).

Per k:      L(n) = a * n^-b + e                     (power law plus irreducible loss e >= 0)
Joint (eq. 3): L(n, k) = exp(alpha + beta_k log k + beta_n log n + gamma log k log n) + exp(zeta + eta log k)
GPT-4 constants in the paper: alpha=-0.50, beta_k=0.26, beta_n=-0.017, gamma=-0.042, zeta=-1.32, eta=-0.085.

The paper fits L(N) to SAEs trained *to convergence*. Each row of the metrics table therefore carries a
`convergence` status (`convergence_status`): "converged" (met the rule), "censored" (trained in convergence mode
but stopped at its token cap first) or "fixed-budget" (trained for a set budget). A group trained in
convergence mode is fitted as L(N): converged SAEs are exact points and censored ones upper bounds (more
training only lowers the loss, so the converged loss lies at or below the capped one; the fit pays only when it
passes above them). A group trained for a fixed budget is fitted as it is and labelled "fixed-budget L(n)":
larger n are further from convergence there, which biases b toward 0 and e upward.

Fits minimise residuals of log L (losses span orders of magnitude, so relative error is the right scale),
use several starting points and keep the best, and never raise on bad data: they return ok=False + reason.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from scipy.optimize import least_squares

CONVERGED, CENSORED, FIXED = "converged", "censored", "fixed-budget"
LABELS = {CONVERGED: "L(N), converged", FIXED: "fixed-budget L(n)"}
# "including an irreducible loss term substantially improves the quality of our fits" (Gao et al. §3.1.3):
# "substantially" read as an AICc gain of at least 10 for the 1 extra parameter, the point above which the
# simpler model has "essentially no support" (Burnham & Anderson 2002, §2.6). Our choice of threshold.
AIC_SUBSTANTIAL = 10.0
# With few points AICc's small-sample penalty is so large that no realistic fit can reach AIC_SUBSTANTIAL: at 5
# points +e must cut the residual sum of squares 403-fold. A comparison is called resolvable only when the
# threshold needs at most this factor (our choice: the pure law's rmse 10x the other's); 6 points need 28x.
MAX_RSS_RATIO = 100.0

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


def one_sided(resid: np.ndarray, bound: np.ndarray | None) -> np.ndarray:
    """Residuals (observed - model, in logs) with bounds: `bound` +1 marks an upper bound on the true value
    (penalised only when the model lies above it), -1 a lower bound (only when below), 0 an exact point."""
    if bound is None:
        return resid
    return np.where(bound > 0, np.minimum(resid, 0.0), np.where(bound < 0, np.maximum(resid, 0.0), resid))


def _best_fit(f, xdata, logy, starts, bounds=None, bound: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, float] | str:
    """Least squares of log y from each start (one-sided residuals where `bound` says so); return (popt,
    pcov, rmse_log) of the lowest RMSE over the exact points, or a reason. pcov is (J^T J)^-1 s^2 over the
    residuals that bind at the optimum (exact points and violated bounds), as curve_fit computes it."""
    best, last_err = None, "no starting point converged"
    exact = np.ones(logy.size, bool) if bound is None else bound == 0
    lo, hi = bounds if bounds is not None else (-np.inf, np.inf)
    for p0 in starts:
        p0 = np.clip(np.asarray(p0, float), np.asarray(lo, float) + 1e-12, np.asarray(hi, float) - 1e-12) \
            if bounds is not None else np.asarray(p0, float)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                res = least_squares(lambda p: one_sided(logy - f(xdata, *p), bound), p0, bounds=(lo, hi),
                                    method="trf", max_nfev=20000, x_scale="jac")
            popt = res.x
            r = logy - f(xdata, *popt)
            rmse = float(np.sqrt(np.mean(r[exact] ** 2))) if exact.any() else math.nan
        except (RuntimeError, ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:
            last_err = f"optimization failed: {exc}"
            continue
        if np.all(np.isfinite(popt)) and math.isfinite(rmse) and (best is None or rmse < best[2]):
            active = one_sided(r, bound) != 0
            active |= exact
            dof = int(active.sum()) - popt.size
            jac = res.jac[active]
            try:
                s2 = float((res.fun[active] ** 2).sum()) / dof if dof > 0 else math.inf
                pcov = np.linalg.pinv(jac.T @ jac) * s2
            except (np.linalg.LinAlgError, ValueError):
                pcov = np.full((popt.size, popt.size), np.inf)
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


def fit_power_law(x: np.ndarray, y: np.ndarray, upper: np.ndarray | None = None) -> dict[str, Any]:
    """Fit y = a*n^-b + e (method §D.1, per k) on log y; a = exp(log_a) keeps a > 0, bounds keep e >= 0.
    `upper` (bool per point): the point is an upper bound on the loss (a censored SAE), not a measurement;
    at least 4 distinct n must be exact."""
    cens = np.zeros(np.size(x)) if upper is None else np.asarray(upper, float).ravel()
    (x, y, c1), err = _clean(x, y, cens + 1)  # +1: _clean keeps positive values only
    if err:
        return {"ok": False, "reason": err, "n_points": int(x.size)}
    up = c1 > 1
    n_distinct = int(np.unique(x[~up]).size)
    if n_distinct < 4:
        what = f"converged points ({int(up.sum())} censored)" if up.any() else "points"
        reason = f"{n_distinct} {what}; need at least 4 distinct n"
        return {"ok": False, "reason": reason, "n_points": int(x.size), "n_censored": int(up.sum())}
    bound = up.astype(float) if up.any() else None
    logy, logx = np.log(y), np.log(x)
    xe, ye = x[~up], y[~up]
    starts = []
    for frac in (0.0, 0.5, 0.9):  # irreducible term as a fraction of the smallest loss
        e0 = frac * ye.min()
        slope, icept = np.polyfit(np.log(xe), np.log(ye - e0), 1)
        starts.append((icept, float(np.clip(-slope, 1e-3, 4.9)), e0))
    starts += [(logy.max() + 0.3 * logx.min(), 0.3, 0.0), (logy.max() + logx.min(), 1.0, 0.5 * ye.min())]
    bounds = ([-100.0, 0.0, 0.0], [100.0, 5.0, float(y.max())])
    res = _best_fit(_power_log_model, x, logy, starts, bounds=bounds, bound=bound)
    if isinstance(res, str):
        return {"ok": False, "reason": res, "n_points": int(x.size)}
    (log_a, b, e), pcov, rmse = res
    errs = _errors(pcov, 3)
    a = float(np.exp(log_a))
    above = up & (_power_log_model(x, log_a, b, e) > logy + 1e-9)
    return {"form": POWER_FORM, "a": a, "b": float(b), "e": float(e),
            "a_err": float(a * errs[0]), "b_err": float(errs[1]), "e_err": float(errs[2]),
            "n_points": int(x.size), "n_censored": int(up.sum()), "censored_binding": int(above.sum()),
            "rmse_log": rmse, "ok": True,
            # b pinned at 0 means the data show no decrease with n: a fit, but not a scaling law
            "at_bound": bool(b <= bounds[0][1] + 1e-9 or b >= bounds[1][1] - 1e-9)}


def predict_power_law(fit: dict[str, Any], x) -> np.ndarray:
    """Evaluate a fit_power_law result at n = x."""
    x = np.asarray(x, dtype=float)
    return fit["a"] * x ** (-fit["b"]) + fit["e"]


def _joint_log_model(nk, alpha, beta_k, beta_n, gamma, zeta, eta):
    ln, lk = np.log(nk[0]), np.log(nk[1])
    # method §D.1 eq. 3, in log space: log(exp(A) + exp(B)) computed stably with logaddexp.
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


def fit_joint_law(n, k, y, upper=None) -> dict[str, Any]:
    """Fit method §D.1 eq. 3 (6 params) to log L; needs >= 7 exact points over >= 2 distinct k and n.
    `upper` as in fit_power_law: censored SAEs are upper bounds."""
    cens = np.zeros(np.size(n)) if upper is None else np.asarray(upper, float).ravel()
    (n, k, y, c1), err = _clean(n, k, y, cens + 1)
    if err:
        return {"ok": False, "reason": err, "n_points": int(n.size)}
    up = c1 > 1
    ne, ke, ye = n[~up], k[~up], y[~up]
    nk_, nn_ = int(np.unique(ke).size), int(np.unique(ne).size)
    if ne.size < 7 or nk_ < 2 or nn_ < 2:
        what = "converged " if up.any() else ""
        return {"ok": False, "n_points": int(n.size), "n_censored": int(up.sum()),
                "reason": f"{ne.size} {what}points over {nk_} k and {nn_} n; need >= 7 points, >= 2 distinct k, n"}
    logy = np.log(y)
    ly0 = float(np.median(np.log(ye)))
    starts = [(ly0, 0.0, -0.1, 0.0, ly0 - 1.0, 0.0), (-0.5, 0.26, -0.017, -0.042, -1.32, -0.085),
              (ly0 + 1.0, 0.2, -0.3, 0.0, float(np.log(ye).min()) - 0.5, 0.0)]
    seed = _joint_seed(ne, ke, ye)
    if seed is not None and np.all(np.isfinite(seed)):
        starts.insert(0, seed)
    res = _best_fit(_joint_log_model, np.vstack([n, k]), logy, starts,
                    bound=up.astype(float) if up.any() else None)
    if isinstance(res, str):
        return {"ok": False, "reason": res, "n_points": int(n.size)}
    popt, pcov, rmse = res
    errs = _errors(pcov, 6)
    out: dict[str, Any] = {"form": JOINT_FORM}
    for name, v, s in zip(JOINT_PARAMS, popt, errs):
        out[name], out[f"{name}_err"] = float(v), float(s)
    above = up & (_joint_log_model(np.vstack([n, k]), *popt) > logy + 1e-9)
    out.update(n_points=int(n.size), n_censored=int(up.sum()), censored_binding=int(above.sum()),
               rmse_log=rmse, ok=True)
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


def censored_slope(x, y, bound=None) -> dict[str, Any]:
    """loglog_slope where some points are bounds, not measurements (`bound` per point: 0 exact, -1 a lower
    bound, +1 an upper bound): an SAE that hit its token cap needs *more* than its cap to converge (-1); an
    lr sweep whose largest lr still converged has a largest converging lr above it (-1). The line is fitted
    by least squares on the exact points, and a bound costs only when the line passes on its wrong side, so
    censored points are neither dropped (which biases the slope toward the uncensored, usually the small n)
    nor taken at face value. Needs 3 distinct exact x."""
    bnd = np.zeros(np.size(x)) if bound is None else np.asarray(bound, float).ravel()
    (x, y, b1), err = _clean(x, y, bnd + 2)
    if err:
        return {"ok": False, "reason": err, "n_points": int(x.size)}
    b = b1 - 2
    exact = b == 0
    if np.unique(x[exact]).size < 3:
        return {"ok": False, "n_points": int(x.size), "n_censored": int((~exact).sum()),
                "reason": f"{np.unique(x[exact]).size} distinct x measured exactly ({int((~exact).sum())} "
                          "censored); need at least 3 for a slope with an error"}
    if not (~exact).any():
        return {**loglog_slope(x, y), "n_censored": 0, "censored_binding": 0}
    lx, ly = np.log(x), np.log(y)
    start = np.polyfit(lx[exact], ly[exact], 1)
    res = _best_fit(lambda t, s_, c: s_ * t + c, lx, ly, [tuple(start)], bound=b)
    if isinstance(res, str):
        return {"ok": False, "reason": res, "n_points": int(x.size)}
    (slope, icept), pcov, rmse = res
    r = ly - (slope * lx + icept)
    binding = int((one_sided(r, b) != 0)[~exact].sum())
    return {"ok": True, "slope": float(slope), "slope_err": float(_errors(pcov, 2)[0]), "intercept": float(icept),
            "rmse_log": rmse, "n_points": int(x.size), "n_censored": int((~exact).sum()),
            "censored_binding": binding, "x_min": float(x.min()), "x_max": float(x.max())}


def _aicc_penalty(m: int, p: int) -> float:
    """AICc's charge for p parameters fitted to m points: 2p + 2p(p+1)/(m-p-1)."""
    return 2 * p + 2 * p * (p + 1) / (m - p - 1)


def _aicc(rss: float, m: int, p: int) -> float:
    """Corrected AIC of a least-squares fit with Gaussian residuals: m log(RSS/m) + _aicc_penalty(m, p)."""
    if m - p - 1 <= 0 or rss <= 0:
        return math.nan
    return m * math.log(rss / m) + _aicc_penalty(m, p)


def irreducible_test(x, y, threshold: float = AIC_SUBSTANTIAL) -> dict[str, Any]:
    """Does the irreducible term e "substantially improve" the fit (Gao et al. §3.1.3)? The two models are
    nested (e = 0 is a*n^-b), so the bigger one always fits at least as well; the comparison is the AICc gain
    of a*x^-b + e over a*x^-b (positive: +e is better after the penalty for its parameter), and an F-test of
    the 1 extra parameter. `substantial`: the gain reaches `threshold` (AIC_SUBSTANTIAL, our choice)."""
    (x, y), err = _clean(x, y)
    if err or np.unique(x).size < 5:
        return {"ok": False, "reason": err or f"{np.unique(x).size} distinct x; a comparison of a 3- with a "
                                               "2-parameter model needs at least 5"}
    with_e = fit_power_law(x, y)
    pure = loglog_slope(x, y)
    if not with_e.get("ok") or not pure.get("ok"):
        return {"ok": False, "reason": with_e.get("reason") or pure.get("reason")}
    ly, lx = np.log(y), np.log(x)
    rss0 = float(((ly - (pure["intercept"] + pure["slope"] * lx)) ** 2).sum())
    rss1 = float(((ly - np.log(predict_power_law(with_e, x))) ** 2).sum())
    rss1 = min(rss1, rss0)  # nested: the optimum with e cannot be worse (guards a local optimum)
    m = int(x.size)
    gain = _aicc(rss0, m, 2) - _aicc(rss1, m, 3) if rss1 > 0 else math.inf
    f_stat = (rss0 - rss1) / (rss1 / (m - 3)) if rss1 > 0 else math.inf
    p_value = float(stats.f.sf(f_stat, 1, m - 3)) if math.isfinite(f_stat) else 0.0
    # the gain is m log(rss0 / rss1) minus the extra parameter's penalty, so the threshold needs this ratio
    needed = math.exp((threshold + _aicc_penalty(m, 3) - _aicc_penalty(m, 2)) / m)
    return {"ok": True, "aicc_gain": float(gain), "f_stat": float(f_stat), "p_value": p_value,
            "rmse_pure": math.sqrt(rss0 / m), "rmse_with_e": math.sqrt(rss1 / m), "e": with_e["e"],
            "threshold": threshold, "substantial": bool(gain >= threshold), "n_points": m,
            "rss_ratio_needed": needed, "resolvable": bool(needed <= MAX_RSS_RATIO)}


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


def convergence_status(converged_at: Any, tolerance: Any) -> str:
    """One SAE's status for the L(N) fits: trained in convergence mode (tolerance > 0) and stopped by the
    rule (converged), or stopped at its token cap first (censored); else trained for a fixed budget."""
    tol = pd.to_numeric(pd.Series([tolerance]), errors="coerce").iloc[0]
    if not (np.isfinite(tol) and tol > 0):
        return FIXED
    done = pd.to_numeric(pd.Series([converged_at]), errors="coerce").iloc[0]
    return CONVERGED if np.isfinite(done) and done > 0 else CENSORED


def _regime(status: pd.Series) -> tuple[str, pd.Series, pd.Series, str]:
    """(regime, use, upper, note) of one group: a group with any SAE trained in convergence mode is an L(N)
    fit over those SAEs (converged exact, censored upper bounds; fixed-budget SAEs left out, said so); else a
    fixed-budget fit over all."""
    if (status == FIXED).all():
        return FIXED, status == FIXED, status != status, ""
    use = status != FIXED
    left = int((~use).sum())
    note = f"{left} fixed-budget SAE(s) left out of the converged fit" if left else ""
    return CONVERGED, use, status == CENSORED, note


def _group_fit(g: pd.DataFrame, joint: bool) -> dict[str, Any]:
    regime, use, upper, note = _regime(g["_status"])
    h = g[use]
    up = upper[use].to_numpy(bool)
    fit = (fit_joint_law(h["n"].to_numpy(), h["k"].to_numpy(), h["_y"].to_numpy(), up) if joint
           else fit_power_law(h["n"].to_numpy(), h["_y"].to_numpy(), up))
    counts = {s: int((g["_status"] == s).sum()) for s in (CONVERGED, CENSORED, FIXED)}
    points = [{"n": _plain(n), "k": _plain(k), "y": float(y), "status": st, "used": bool(u)}
              for n, k, y, st, u in zip(g["n"], g["k"], g["_y"], g["_status"], use)]
    return {**fit, "regime": regime, "label": LABELS[regime], "counts": counts,
            **({"excluded": note} if note else {}), "points": points}


def fit_all(table: pd.DataFrame, metric: str = "fvu") -> dict[str, Any]:
    """Per-(arch, k) power laws and per-arch joint laws of `metric` vs n; drops non-finite / <= 0 rows. Each
    fit is labelled by its regime (see the module docstring): the `convergence` column holds each SAE's
    status (convergence_status; absent: every SAE is fixed-budget)."""
    missing = {"arch", "n", "k", metric} - set(table.columns)
    if missing:
        raise KeyError(f"table lacks columns {sorted(missing)}")
    vals = pd.to_numeric(table[metric], errors="coerce").to_numpy(dtype=float)
    keep = np.isfinite(vals) & (vals > 0)
    status = table["convergence"].fillna(FIXED).astype(str) if "convergence" in table.columns else \
        pd.Series(FIXED, index=table.index)
    df = table.loc[keep, ["arch", "n", "k"]].assign(_y=vals[keep], _status=status[keep].to_numpy())
    per_k = [{"arch": _plain(arch), "k": _plain(kv), **_group_fit(g, joint=False)}
             for (arch, kv), g in sorted(df.groupby(["arch", "k"]), key=lambda t: (str(t[0][0]), t[0][1]))]
    joint = [{"arch": _plain(arch), **_group_fit(g, joint=True)}
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
