"""Figures of the evaluation suite (Gao §4.2–4.5, Michaud Figs 4, 7): pure functions to base64 PNGs.

Like `figures`, each function returns None when there is nothing finite to draw. Across the grid, colour is k
(the `flare` palette of the scaling figures) and marker is arch; within one k, colour is n (`viridis`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import LogLocator, NullFormatter

from saescale.report.figures import MARKERS, _dots, _finite, _log, _palette, _panels, _style, to_base64_png

MAX_PANELS = 12


def _n_axis(ax, ns) -> None:
    """n on a log2 axis labelled at the trained values."""
    ax.set_xscale("log", base=2)
    ns = sorted({int(n) for n in ns})
    ax.set_xticks(ns, labels=[f"{n:,}" for n in ns], rotation=30 if len(ns) > 5 else 0)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("n (latents)")


def _finite_num(x) -> bool:
    numeric = isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
    return numeric and math.isfinite(x)


def metric_vs_n(m: pd.DataFrame, panels: list[dict], log_y: bool = False) -> str | None:
    """Metrics against n, a line per (arch, k) coloured by k, one panel per entry of `panels`:
    {"title", "ylabel", "series": [(column, linestyle, label)], "err": {column: sem column},
     "ref": (value, label) drawn as a horizontal line}."""
    def rows(col: str) -> pd.DataFrame:
        return _finite(m, ["n", "k", col], positive=["n", col] if log_y else ["n"])

    drawable = [p for p in panels if any(not rows(c).empty for c, _, _ in p["series"])]
    if not drawable:
        return None
    colours = _palette(m["k"].dropna().astype(int), "flare")
    archs = sorted(m["arch"].astype(str).unique())
    markers = {a: MARKERS[i % len(MARKERS)] for i, a in enumerate(archs)}
    styles: dict[str, str] = {}
    with _style():
        fig, axes = _panels(len(drawable), sharey=False)
        if len(drawable) == 1:  # room for the legend beside a single panel
            fig.set_size_inches(6.4, 3.2)
        for ax, p in zip(axes, drawable):
            ns = set()
            for col, ls, label in p["series"]:
                df = rows(col)
                styles.setdefault(label, ls)
                for (arch, k), g in df.groupby([df["arch"].astype(str), "k"]):
                    g = g.sort_values("n")
                    err = p.get("err", {}).get(col)
                    yerr = pd.to_numeric(g[err], errors="coerce") if err in g.columns else None
                    ax.errorbar(g["n"], g[col], yerr=yerr, color=colours[k], marker=markers[arch], ms=5,
                                ls=ls, lw=1.3, capsize=2)
                    ns |= set(g["n"])
            ref = p.get("ref")
            if ref and _finite_num(ref[0]):
                ax.axhline(ref[0], color="black", ls="-.", lw=1)
                styles.setdefault(ref[1], "-.")
            if log_y:
                _log(ax, "y")
            _n_axis(ax, ns)
            ax.set_ylabel(p["ylabel"])
            ax.set_title(p["title"])
        handles = _dots(colours, "k")
        if len(styles) > 1:  # one kind of line needs no key
            handles += [Line2D([], [], color="black" if ls == "-." else "grey", ls=ls, label=label)
                        for label, ls in styles.items()]
        if len(markers) > 1:
            handles += [Line2D([], [], color="grey", marker=mk, ls="none", label=a)
                        for a, mk in markers.items()]
        fig.legend(handles=handles, loc="outside right upper", frameon=False)
    return to_base64_png(fig)


def _hist(h: dict | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(edges, counts) of a {"edges", "counts"} histogram, or None when it is empty or malformed."""
    edges = np.asarray((h or {}).get("edges") or [], float)
    counts = np.asarray((h or {}).get("counts") or [], float)
    if len(edges) != len(counts) + 1 or not len(counts) or counts.sum() <= 0 or not np.isfinite(edges).all():
        return None
    return edges, counts


def ablation_histograms(record: dict) -> str | None:
    """Gao §4.5: the distribution of ablation sparsity over (position, latent) pairs against the same for
    (position, residual channel) pairs, as the share of pairs per bin; dashed: the means."""
    kinds = (("latents", "SAE latents", "C0"), ("channels", "residual channels", "C1"))
    parts = [(key, label, colour, _hist((record.get(key) or {}).get("histogram")))
             for key, label, colour in kinds]
    parts = [p for p in parts if p[3] is not None]
    if not parts:
        return None
    with _style():
        fig, axes = _panels(1)
        ax = axes[0]
        fig.set_size_inches(6.2, 3.1)
        lo, hi = 1.0, 0.0
        for key, label, colour, (edges, counts) in parts:
            ax.stairs(counts / counts.sum(), edges, fill=True, alpha=0.45, color=colour, label=label)
            mean = (record.get(key) or {}).get("mean")
            if _finite_num(mean):
                ax.axvline(mean, color=colour, ls="--", lw=1.2)
            nz = np.nonzero(counts)[0]
            lo, hi = min(lo, edges[nz[0]]), max(hi, edges[nz[-1] + 1])
        pad = 0.1 * (hi - lo)
        ax.set_xlim(max(0.0, lo - pad), min(1.0, hi + pad))
        ax.set_xlabel("ablation sparsity (‖v‖₁/‖v‖₂)² / (V·T)")
        ax.set_ylabel("share of pairs")
        ax.set_title(f"{record['arch']}, n = {record['n']}, k = {record['k']}")
        ax.legend(fontsize=8)
    return to_base64_png(fig)


def frequency_rank(records: list[dict]) -> str | None:
    """Michaud Fig. 4 analogue: firing frequency against rank (alive latents sorted), log-log; one panel per
    (arch, k), a line per n, the fitted power law dashed over its rank range."""
    rows = []
    for r in records:
        c = r.get("frequency_curve") or {}
        rank, freq = np.asarray(c.get("rank") or [], float), np.asarray(c.get("frequency") or [], float)
        keep = (rank > 0) & (freq > 0) if len(rank) == len(freq) else np.zeros(0, bool)
        if keep.any():
            rows.append((r, rank[keep], freq[keep]))
    if not rows:
        return None
    groups = sorted({(str(r["arch"]), int(r["k"])) for r, _, _ in rows})[:MAX_PANELS]
    colours = _palette([int(r["n"]) for r, _, _ in rows], "viridis")
    with _style():
        fig, axes = _panels(len(groups))
        for ax, (arch, k) in zip(axes, groups):
            for r, rank, freq in sorted(rows, key=lambda x: x[0]["n"]):
                if (str(r["arch"]), int(r["k"])) != (arch, k):
                    continue
                colour = colours[int(r["n"])]
                ax.plot(rank, freq, color=colour, lw=1.4)
                fit = r.get("frequency_fit") or {}
                lo_hi = fit.get("rank_range") or []
                if len(lo_hi) == 2 and _finite_num(fit.get("slope")) and _finite_num(fit.get("intercept")):
                    x = np.geomspace(max(lo_hi[0], 1), max(lo_hi[1], 1), 20)
                    ax.plot(x, np.exp(fit["intercept"]) * x ** fit["slope"], color="black", ls="--", lw=0.9)
            _log(ax)
            for axis in (ax.xaxis, ax.yaxis):  # decades only: these axes span up to six of them
                axis.set_major_locator(LogLocator(base=10, numticks=8))
            ax.set_title(f"{arch}, k = {k}" if len({a for a, _ in groups}) > 1 else f"k = {k}")
            ax.set_xlabel("rank (alive latents, by frequency)")
        axes[0].set_ylabel("firing frequency")
        handles = [Line2D([], [], color=c, lw=2, label=f"n = {n}") for n, c in colours.items()]
        handles.append(Line2D([], [], color="black", ls="--", label="fitted slope (rank range)"))
        fig.legend(handles=handles, loc="outside right upper", frameon=False)
    return to_base64_png(fig)


def nn_histograms(records: list[dict]) -> str | None:
    """Michaud Fig. 7 analogue: histograms (log counts) of each latent's nearest-neighbour decoder cosine,
    one panel per (arch, n), a line per k, against the same for n random unit vectors (grey)."""
    rows = [(r, *(_hist((r.get(key) or {}).get("histogram")) for key in ("nn", "nn_random")))
            for r in records]
    rows = [x for x in rows if x[1] is not None]
    if not rows:
        return None
    groups = sorted({(str(r["arch"]), int(r["n"])) for r, _, _ in rows})[:MAX_PANELS]
    colours = _palette([int(r["k"]) for r, _, _ in rows], "flare")
    with _style():
        fig, axes = _panels(len(groups), sharey=False)
        for ax, (arch, n) in zip(axes, groups):
            lo = 1.0
            drawn_random = False
            for r, (edges, counts), rand in sorted(rows, key=lambda x: x[0]["k"]):
                if (str(r["arch"]), int(r["n"])) != (arch, n):
                    continue
                if rand is not None and not drawn_random:  # the reference depends on n and d only
                    ax.stairs(rand[1], rand[0], color="grey", lw=1.2, ls="--")
                    drawn_random = True
                    lo = min(lo, rand[0][np.nonzero(rand[1])[0][0]])
                ax.stairs(counts, edges, color=colours[int(r["k"])], lw=1.4)
                lo = min(lo, edges[np.nonzero(counts)[0][0]])
            for t in (0.9, 0.97):
                ax.axvline(t, color="black", ls=":", lw=0.8)
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.7)
            ax.set_xlim(max(-1.0, lo - 0.05), 1.0)
            ax.set_title(f"{arch}, n = {n:,}" if len({a for a, _ in groups}) > 1 else f"n = {n:,}")
            ax.set_xlabel("nearest-neighbour cosine")
        axes[0].set_ylabel("latents (log)")
        handles = _dots(colours, "k") + [Line2D([], [], color="grey", ls="--", label="random directions"),
                                         Line2D([], [], color="black", ls=":", label="0.9, 0.97")]
        fig.legend(handles=handles, loc="outside right upper", frameon=False)
    return to_base64_png(fig)
