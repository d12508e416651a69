"""Figures of the ground-truth superposition study (`saescale.toy.superposition.groundtruth_study`): the
features an SAE discovers against its number of latents, D(N), on a purely discrete dictionary and on one
whose most frequent features are manifolds (Michaud et al. 2025, method §F.0), and the latents those
manifolds absorb. Pure functions from the study dict to base64 PNGs; None when nothing is drawable.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from saescale.report.figures import _log, _style, to_base64_png
from saescale.report.suite_figures import _finite_num, _n_axis

COLOURS = {"discrete": "C0", "manifolds": "C3"}
MARKERS = {"discrete": "o", "manifolds": "s"}


def _series(study: dict | None, key: str, positive: bool = False) -> list[tuple[dict, np.ndarray, np.ndarray]]:
    """(dictionary, n, value) per dictionary of the study, keeping finite (and, for log axes, positive)
    points, sorted by n; dictionaries with nothing left are dropped."""
    out = []
    for dic in (study or {}).get("dictionaries") or []:
        pts = [(r.get("n"), r.get(key)) for r in dic.get("runs") or []]
        pts = sorted((float(n), float(v)) for n, v in pts if _finite_num(n) and _finite_num(v) and n > 0
                     and (v > 0 or not positive))
        if pts:
            n, v = np.array(pts).T
            out.append((dic, n, v))
    return out


def _label(dic: dict) -> str:
    ranks = dic.get("manifold_ranks") or []
    if not ranks:
        return str(dic.get("name", "discrete"))
    dim = dic.get("manifold_dim")
    shown = ", ".join(str(r) for r in ranks[:6]) + (", ..." if len(ranks) > 6 else "")
    return f"{dic.get('name', 'manifolds')} (ranks {shown}" + (f"; $S^{{{dim - 1}}}$)" if dim else ")")


def discovered_vs_latents(study: dict | None) -> str | None:
    """D(N) against N, log-log, for each dictionary; dashed: D = N, the allocation model's prediction for
    discrete features; dash-dot: the number of features m; dotted (manifold dictionary): the same model
    given the latents the manifolds took."""
    series = _series(study, "D", positive=True)
    if not series:
        return None
    m = (study or {}).get("m")
    with _style():
        fig = Figure(figsize=(6.4, 3.6), layout="constrained")
        ax = fig.subplots()
        ns = np.unique(np.concatenate([n for _, n, _ in series]))
        ax.plot(ns, ns, color="grey", ls="--", lw=1, label="D = N (allocation model, discrete)")
        if _finite_num(m) and m > 0:
            ax.axhline(m, color="black", ls="-.", lw=1, label=f"m = {int(m):,} features")
        for dic, n, d in series:
            name = str(dic.get("name"))
            colour = COLOURS.get(name, "C2")
            ax.plot(n, d, color=colour, marker=MARKERS.get(name, "D"), ms=5, lw=1.5, label=_label(dic))
            if dic.get("manifold_ranks"):
                for _, pn, pv in _series({"dictionaries": [dic]}, "D_pred_given_manifolds", positive=True):
                    ax.plot(pn, pv, color=colour, ls=":", lw=1.2, label="model, given the manifolds' latents")
        _log(ax, "y")
        _n_axis(ax, ns)
        ax.set_ylabel("features discovered D(N)")
        thr = (study or {}).get("threshold")
        ax.set_title("discovered features vs latents" + (f" (cos ≥ {thr:g})" if _finite_num(thr) else ""))
        ax.legend(fontsize=7, loc="upper left")
    return to_base64_png(fig)


def manifold_latents(study: dict | None) -> str | None:
    """Latents lying in the manifold subspaces (projection norm of the unit decoder row >= threshold)
    against N, total and per manifold rank, for the dictionaries that have manifolds."""
    series = [(dic, n, v) for dic, n, v in _series(study, "latents_on_manifolds") if dic.get("manifold_ranks")]
    if not series:
        return None
    with _style():
        fig = Figure(figsize=(6.4, 3.4), layout="constrained")
        ax = fig.subplots()
        ns = np.unique(np.concatenate([n for _, n, _ in series]))
        handles = [Line2D([], [], color="black", marker="s", lw=1.5, label="all manifolds")]
        for dic, n, v in series:
            ax.plot(n, v, color="black", marker="s", ms=5, lw=1.5)
            ranks = dic.get("manifold_ranks") or []
            runs = sorted((r for r in dic.get("runs") or [] if _finite_num(r.get("n"))), key=lambda r: r["n"])
            for j, rank in enumerate(ranks[:8]):
                pts = [(r["n"], (r.get("latents_per_manifold") or [None] * len(ranks))[j]) for r in runs
                       if len(r.get("latents_per_manifold") or []) == len(ranks)]
                pts = [(a, b) for a, b in pts if _finite_num(b)]
                if pts:
                    a, b = np.array(pts, float).T
                    ax.plot(a, b, color=f"C{j}", lw=1, alpha=0.8)
                    handles.append(Line2D([], [], color=f"C{j}", lw=1, label=f"rank {rank}"))
        top = max(float(np.max(v)) for _, _, v in series)
        ax.set_ylim(0, max(1.0, 1.5 * top))
        _n_axis(ax, ns)
        ax.set_ylabel("latents in manifold subspaces")
        ax.set_title("latents absorbed by manifold features")
        ax.legend(handles=handles, fontsize=7, loc="upper left")
    return to_base64_png(fig)
