"""Figures of the capacity-allocation study (Michaud et al. 2025, Fig. 2; method §F.2): pure functions from
the `saescale.scaling.allocation.allocation_study` dict to base64 PNGs.

Like `figures`, each function returns None when there is nothing finite to draw. Colour is β throughout (the
`viridis` palette: dark = small β = manifolds that keep absorbing latents).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.colors import BoundaryNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogLocator, NullFormatter

from saescale.report.figures import _log, _palette, _short, _style, to_base64_png


def _ok(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _series(records: list[dict] | None, y: str) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """{β: (N, y)} sorted by N, keeping rows with positive finite N and y (log axes)."""
    out: dict[float, list] = {}
    for r in records or []:
        if _ok(r.get("beta")) and _ok(r.get("N")) and _ok(r.get(y)) and r["N"] > 0 and r[y] > 0:
            out.setdefault(float(r["beta"]), []).append((float(r["N"]), float(r[y])))
    return {b: tuple(np.array(v).T) for b, v in ((b, sorted(v)) for b, v in sorted(out.items())) if len(v) > 1}


def _alpha(study: dict, records: list[dict]) -> float | None:
    a = (study.get("settings") or {}).get("alpha")
    a = a if _ok(a) else next((r["alpha"] for r in records if _ok(r.get("alpha"))), None)
    return float(a) if a is not None else None


def _decades(ax) -> None:
    """Log-log with a tick per decade: these axes span up to eight of them."""
    _log(ax)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, numticks=10))


def features_vs_latents(study: dict) -> str | None:
    """Paper Fig. 2 right: features discovered D(N) against latents N, one manifold feature with
    L(n) = (1+n)^-β among discrete ones; dashed D = N, dotted the β < α asymptote β^-1/(1+α) N^((1+β)/(1+α))."""
    records = study.get("single_manifold") or []
    series = _series(records, "D")
    if not series:
        return None
    alpha = _alpha(study, records)
    colours = _palette(series, "viridis")
    with _style():
        fig = Figure(figsize=(6.6, 4.2), layout="constrained")
        ax = fig.subplots()
        n_lo = min(n[0] for n, _ in series.values())
        n_hi = max(n[-1] for n, _ in series.values())
        ax.plot([n_lo, n_hi], [n_lo, n_hi], color="black", ls="--", lw=1)
        theory = False
        for beta, (n, d) in series.items():
            ax.plot(n, d, color=colours[beta], lw=1.6, marker=".", ms=4)
            if alpha is not None and beta < alpha:  # with n_1 ≈ N, the next discrete feature is worth p_1 Δ(N)
                x = np.geomspace(n_lo, n_hi, 60)
                t = beta ** (-1 / (1 + alpha)) * x ** ((1 + beta) / (1 + alpha))
                keep = t < x
                ax.plot(x[keep], t[keep], color=colours[beta], ls=":", lw=1.3)
                theory |= bool(keep.any())
        _decades(ax)
        ax.set_xlabel("N (latents)")
        ax.set_ylabel("D(N) (features discovered)")
        a_txt = f"α = {alpha:g}" if alpha is not None else "α"
        ax.set_title(f"One manifold feature among discrete ones ({a_txt})")
        handles = [Line2D([], [], color=c, lw=2, label=f"β = {b:g}") for b, c in colours.items()]
        handles.append(Line2D([], [], color="black", ls="--", label="D = N (all discrete)"))
        if theory:
            handles.append(Line2D([], [], color="grey", ls=":", label=r"$\beta^{-1/(1+\alpha)} N^{(1+\beta)/(1+\alpha)}$"))
        fig.legend(handles=handles, loc="outside right upper", frameon=False)
    return to_base64_png(fig)


def _edges(values: np.ndarray) -> np.ndarray:
    """Cell edges on a log axis: geometric midpoints, the ends mirrored."""
    lv = np.log(values)
    if len(lv) == 1:
        return np.exp(np.array([lv[0] - 0.2, lv[0] + 0.2]))
    mid = (lv[1:] + lv[:-1]) / 2
    return np.exp(np.concatenate([[2 * lv[0] - mid[0]], mid, [2 * lv[-1] - mid[-1]]]))


def phase_diagram_figure(study: dict) -> str | None:
    """Paper Fig. 2 left, simulated: the measured D-slope d log D / d log N of homogeneous manifolds over
    (β, α); α = β separates benign (slope 1, D/N → const) from pathological (slope (1+β)/(1+α) < 1, D/N → 0)."""
    rows = [r for r in study.get("phase") or []
            if _ok(r.get("alpha")) and _ok(r.get("beta")) and _ok(r.get("D_slope")) and r["alpha"] > 0
            and r["beta"] > 0]
    if not rows:
        return None
    alphas = np.array(sorted({float(r["alpha"]) for r in rows}))
    betas = np.array(sorted({float(r["beta"]) for r in rows}))
    grid = np.full((len(alphas), len(betas)), np.nan)
    for r in rows:
        grid[np.searchsorted(alphas, r["alpha"]), np.searchsorted(betas, r["beta"])] = r["D_slope"]
    lo = min(float(np.nanmin(grid)), 0.95)
    levels = np.linspace(math.floor(lo * 20) / 20, 1.0 + 1e-9, 11)
    with _style():
        fig = Figure(figsize=(6.4, 4.8), layout="constrained")
        ax = fig.subplots()
        mesh = ax.pcolormesh(_edges(betas), _edges(alphas), np.ma.masked_invalid(grid), cmap="viridis",
                             norm=BoundaryNorm(levels, 256), shading="flat")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(betas[j], alphas[i], f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < (levels[0] + 1) / 2 else "black")
        span = np.geomspace(min(alphas[0], betas[0]) / 2, max(alphas[-1], betas[-1]) * 2, 10)
        ax.plot(span, span, color="red", lw=2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(_edges(betas)[[0, -1]])
        ax.set_ylim(_edges(alphas)[[0, -1]])
        for axis, vals in ((ax.xaxis, betas), (ax.yaxis, alphas)):
            axis.set_ticks(vals, labels=[f"{v:g}" for v in vals])
            axis.set_minor_formatter(NullFormatter())
            axis.set_minor_locator(LogLocator(subs=()))
        ax.grid(False)
        ax.set_xlabel(r"β  (manifold loss $L(n) = (1+n)^{-\beta}$)")
        ax.set_ylabel(r"α  (feature frequency $p_i \propto i^{-(1+\alpha)}$)")
        n_lo, n_hi = rows[0].get("N_lo"), rows[0].get("N_hi")
        rng = f", N = {_short(n_lo)} → {_short(n_hi)}" if _ok(n_lo) and _ok(n_hi) else ""
        ax.set_title(f"Discovery exponent, every feature a manifold{rng}", fontsize=10)
        fig.colorbar(mesh, ax=ax, label=r"$d\log D / d\log N$   (theory: $\min(1, \frac{1+\beta}{1+\alpha})$)")
        key = Line2D([], [], color="red", lw=2,
                     label="α = β.  Above (β < α): pathological, D/N → 0.  Below (β > α): benign, D/N → const.")
        fig.legend(handles=[key], loc="outside lower center", frameon=False, fontsize=8)
    return to_base64_png(fig)


def loss_vs_latents(study: dict) -> str | None:
    """App. B: total loss L(N) against N with every feature a manifold, per β; dotted: the theory slope
    -min(α, β) through the largest N, over its last three decades."""
    records = study.get("homogeneous") or []
    series = _series(records, "loss")
    if not series:
        return None
    alpha = _alpha(study, records)
    colours = _palette(series, "viridis")
    with _style():
        fig = Figure(figsize=(6.6, 4.2), layout="constrained")
        ax = fig.subplots()
        for beta, (n, loss) in series.items():
            ax.plot(n, loss, color=colours[beta], lw=1.6, marker=".", ms=4)
            if alpha is not None:
                x = np.geomspace(max(n[0], n[-1] / 1e3), n[-1], 20)
                ax.plot(x, loss[-1] * (x / n[-1]) ** -min(alpha, beta), color="black", ls=":", lw=1)
        _decades(ax)
        ax.set_xlabel("N (latents)")
        ax.set_ylabel(r"$L(N) = \sum_i p_i (1+n_i)^{-\beta}$")
        a_txt = f"α = {alpha:g}" if alpha is not None else "α"
        ax.set_title(f"Loss with every feature a manifold ({a_txt})")
        handles = [Line2D([], [], color=c, lw=2, label=f"β = {b:g}") for b, c in colours.items()]
        if alpha is not None:
            handles.append(Line2D([], [], color="black", ls=":", label=r"theory $\propto N^{-\min(\alpha, \beta)}$"))
        fig.legend(handles=handles, loc="outside right upper", frameon=False)
    return to_base64_png(fig)
