"""Figures of the toy feature-manifold study (Michaud et al. 2025 Figs 1, 3, 5, 6): from the JSON-ready dict
of `saescale.toy.manifolds.toy_study` to base64 PNGs, or None when there is nothing finite to draw.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Arc

from saescale.report.figures import MARKERS, _log, _palette, _panels, _style, to_base64_png

ARC_RADIUS, ARC_STEP, ARC_LEVELS = 1.12, 0.05, 4  # overlapping firing arcs drawn on staggered rings


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _points(curve: dict, key: str = "loss_min") -> tuple[np.ndarray, np.ndarray]:
    """(n, L) of a curve where L is finite and positive (log axes), sorted by n."""
    pairs = sorted((p["n"], p[key]) for p in curve.get("points") or []
                   if _finite(p.get("n")) and _finite(p.get(key)) and p["n"] > 0 and p[key] > 0)
    return np.array([n for n, _ in pairs], float), np.array([v for _, v in pairs], float)


def _beta_label(fit: dict | None) -> str:
    fit = fit or {}
    if not fit.get("ok") or not _finite(fit.get("beta")):
        return ""
    lo, hi = fit.get("range") or (None, None)
    span = f", n {lo:g}–{hi:g}" if _finite(lo) and _finite(hi) else ""
    return f", β = {fit['beta']:.3f} ± {fit.get('stderr') or 0:.3f}{span}"


def toy_loss_curves(study: dict) -> str | None:
    """Figs 3/6: L(n) (min over seeds), log-log, one panel per (kind, arch), a line per d with its fitted
    beta in the legend; dotted verticals at n = 2d on shells (the +/- basis solution)."""
    curves = [c for c in study.get("curves") or [] if len(_points(c)[0])]
    if not curves:
        return None
    groups = sorted({(c["kind"], c["arch"]) for c in curves}, key=lambda g: (("circle", "sphere", "shell").index(
        g[0]) if g[0] in ("circle", "sphere", "shell") else 9, g[1]))
    colours = _palette([int(c["d"]) for c in curves], "viridis")
    n_archs = len({a for _, a in groups})
    with _style():
        fig, axes = _panels(len(groups), sharey=False)
        for ax, (kind, arch) in zip(axes, groups):
            for c in sorted((c for c in curves if (c["kind"], c["arch"]) == (kind, arch)), key=lambda c: c["d"]):
                ns, loss = _points(c)
                colour = colours[int(c["d"])]
                ax.plot(ns, loss, marker="o", ms=3.5, lw=1.3, color=colour,
                        label=f"d = {c['d']}{_beta_label(c.get('beta_fit'))}")
                if kind == "shell":
                    ax.axvline(2 * c["d"], color=colour, ls=":", lw=1.1)
            _log(ax)
            ax.set_xlabel("n (latents)")
            ax.set_ylabel("L(n) = MSE + sparsity")
            ax.set_title(f"{kind}, {arch}" if n_archs > 1 else kind)
            handles, _ = ax.get_legend_handles_labels()
            if kind == "shell":
                handles.append(Line2D([], [], color="grey", ls=":", label="n = 2d"))
            ax.legend(handles=handles, fontsize=7)
    return to_base64_png(fig)


def _circle_panel(ax, panel: dict) -> None:
    pts = np.asarray(panel.get("points") or [], float).reshape(-1, 2)
    rec = np.asarray(panel.get("reconstructions") or [], float).reshape(-1, 2)
    dec = np.asarray(panel.get("decoder") or [], float).reshape(-1, 2)
    if len(pts):
        ax.plot(*np.vstack([pts, pts[:1]]).T, color="0.7", lw=3, zorder=1)
    if len(rec):
        ax.plot(*np.vstack([rec, rec[:1]]).T, color="black", lw=1.2, zorder=2)
    palette = _palette(range(max(len(dec), 1)), "husl")
    unit = dec / np.maximum(np.linalg.norm(dec, axis=1, keepdims=True), 1e-12) if len(dec) else dec
    for i, (arcs, d) in enumerate(zip(panel.get("arcs") or [[]] * len(dec), unit)):
        colour = palette[i]  # arrows are unit directions: decoder-norm-trick rows have arbitrary norms
        ax.annotate("", xy=tuple(d), xytext=(0, 0), arrowprops={"arrowstyle": "->", "color": colour, "lw": 1.1})
        r = 2 * (ARC_RADIUS + ARC_STEP * (i % ARC_LEVELS))
        for start, end in arcs or []:
            ax.add_patch(Arc((0, 0), r, r, theta1=math.degrees(start), theta2=math.degrees(end), color=colour,
                             lw=2.2))
    lim = ARC_RADIUS + ARC_STEP * ARC_LEVELS + 0.08
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    loss = panel.get("loss")
    ax.set_title(f"n = {panel.get('n')}" + (f", L = {loss:.4f}" if _finite(loss) else ""))


def circle_figure(study: dict) -> str | None:
    """Fig 1: for each panel n, the circle (grey), its reconstruction (black), decoder directions (arrows)
    and each latent's firing arcs (coloured, on staggered rings where they overlap); last, the circle's L(n)."""
    panels = [p for p in study.get("circle_panels") or [] if p.get("points")]
    circle = [c for c in study.get("curves") or [] if c.get("kind") == "circle" and len(_points(c)[0])]
    if not panels and not circle:
        return None
    with _style():
        fig, axes = _panels(len(panels) + bool(circle), sharey=False)
        for ax, panel in zip(axes, panels):
            _circle_panel(ax, panel)
        if circle:
            ax = axes[len(panels)]
            for i, c in enumerate(circle):
                ns, loss = _points(c)
                ax.plot(ns, loss, marker=MARKERS[i % len(MARKERS)], ms=3.5, lw=1.3, label=c.get("arch"))
            marked = [p for p in panels if _finite(p.get("loss")) and p["loss"] > 0]
            if marked:
                ax.scatter([p["n"] for p in marked], [p["loss"] for p in marked], s=60, facecolors="none",
                           edgecolors="black", zorder=3, label="panels")
            _log(ax)
            ax.set_xlabel("n (latents)")
            ax.set_ylabel("L(n)")
            ax.set_title("circle: loss vs latents")
            ax.legend(fontsize=7)
    return to_base64_png(fig)


def beta_vs_dimension(study: dict) -> str | None:
    """Fig 5: the fitted beta (-slope of log L vs log n) of hypersphere curves against d, a line per arch
    (the circle counts as d = 2); error bars are the OLS standard errors."""
    rows = [(c["arch"], int(c["d"]), c["beta_fit"]) for c in study.get("curves") or []
            if c.get("kind") in ("sphere", "circle") and (c.get("beta_fit") or {}).get("ok")
            and _finite(c["beta_fit"].get("beta"))]
    if not rows:
        return None
    archs = sorted({a for a, _, _ in rows})
    with _style():
        fig = Figure(figsize=(4.8, 3.2), layout="constrained")
        ax = fig.subplots()
        for i, arch in enumerate(archs):
            pts = sorted({d: f for a, d, f in rows if a == arch}.items())
            ax.errorbar([d for d, _ in pts], [f["beta"] for _, f in pts],
                        yerr=[f.get("stderr") or 0 for _, f in pts], marker=MARKERS[i % len(MARKERS)], capsize=3,
                        lw=1.3, label=arch)
        ranges = {tuple(f.get("range") or ()) for _, _, f in rows}
        lo_hi = ranges.pop() if len(ranges) == 1 else ()
        span = f", fit over n in [{lo_hi[0]:g}, {lo_hi[1]:g}]" if len(lo_hi) == 2 else ""
        ax.set_xticks(sorted({d for _, d, _ in rows}))
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel("d (ambient dimension)")
        ax.set_ylabel("β = −slope of log L vs log n")
        ax.set_title(f"hyperspheres{span}")
        ax.legend(fontsize=8)
    return to_base64_png(fig)
