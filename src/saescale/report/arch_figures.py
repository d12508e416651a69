"""Figures of the architecture comparison (Gao Figs 2, 5a, 9, 10; App. C): pure functions to base64 PNGs.

Each arch keeps one colour and marker across every figure (`arch_styles`), variants are drawn dashed. Like
`figures`, each function returns None when there is nothing finite to draw.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from saescale.report.figures import MARKERS, _finite, _log, _panels, _style, to_base64_png


def arch_styles(archs) -> dict[str, dict]:
    """{arch: {"color", "marker"}}: a categorical colour and a marker per arch, stable for a sorted list."""
    archs = sorted({str(a) for a in archs})
    colours = sns.color_palette("tab10" if len(archs) <= 10 else "husl", max(len(archs), 1))
    return {a: {"color": colours[i], "marker": MARKERS[i % len(MARKERS)]} for i, a in enumerate(archs)}


def _legend(fig, styles: dict, archs, dashed=()) -> None:
    handles = [Line2D([], [], color=styles[a]["color"], marker=styles[a]["marker"],
                      ls="--" if a in dashed else "-", label=a) for a in archs]
    fig.legend(handles=handles, loc="outside right upper", frameon=False)


def _l0_ticks(ax, l0: pd.Series, targets) -> None:
    """On a short L0 range the 1-2-5 log ticks crowd; label the target L0s (and the ends) instead."""
    lo, hi = float(l0.min()), float(l0.max())
    if hi / lo < 10 and len(targets):
        ticks = sorted({*(float(t) for t in targets)})
        ax.set_xlim(min(lo, ticks[0]) / 1.15, max(hi, ticks[-1]) * 1.15)
        ax.set_xticks(ticks, labels=[f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())


def matched_sparsity(m_n: pd.DataFrame, styles: dict, targets=()) -> str | None:
    """Figs 2a and 5a analogue at one n: FVU and ΔCE against achieved L0 (log-log), a line per arch."""
    ys = [(c, lab) for c, lab in (("fvu", "FVU (normalized MSE)"), ("delta_ce", "ΔCE (nats/token)"))
          if not _finite(m_n, ["l0", c], positive=["l0", c]).empty]
    if not ys:
        return None
    drawn = set()
    with _style():
        fig, axes = _panels(len(ys), sharey=False)
        for ax, (col, label) in zip(axes, ys):
            df = _finite(m_n, ["l0", col], positive=["l0", col])
            for arch, g in df.groupby(df["arch"].astype(str)):
                g = g.sort_values("l0")
                st = styles[arch]
                ax.plot(g["l0"], g[col], color=st["color"], marker=st["marker"], ms=6, lw=1.3)
                drawn.add(arch)
            for t in targets:  # the target L0s the penalty archs were calibrated to
                ax.axvline(t, color="grey", ls=":", lw=0.8, zorder=0)
            _log(ax)
            _l0_ticks(ax, df["l0"], targets)
            ax.set_xlabel("achieved L0 (eval)")
            ax.set_ylabel(label)
            ax.set_title(f"{label.split(' ')[0]} vs L0")
        _legend(fig, styles, sorted(drawn))
    return to_base64_png(fig)


def fvu_vs_n(m: pd.DataFrame, slopes: list[dict], styles: dict, archs=("topk", "relu")) -> str | None:
    """Fig 2b analogue: FVU against n per k (a panel each) for `archs`, the log-log slope in the legend."""
    if not slopes:
        return None
    with _style():
        fig, axes = _panels(len(slopes), sharey=False)
        for ax, s in zip(axes, slopes):
            at_k = _finite(m[m["k"] == s["k"]], ["n", "fvu"], positive=["n", "fvu"])
            for arch in archs:
                g = at_k[at_k["arch"].astype(str) == arch].sort_values("n")
                st = styles[arch]
                ax.plot(g["n"], g["fvu"], color=st["color"], marker=st["marker"], ms=6, lw=1.3,
                        label=f"{arch}: slope {s[arch]:.3g}")
            _log(ax, "y")
            ax.set_xscale("log", base=2)
            ns = sorted(at_k["n"].unique())
            ax.set_xticks(ns, labels=[f"{n:,}" for n in ns])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("n (latents)")
            ax.set_ylabel("FVU")
            ax.set_title(f"target L0 = {s['k']}")
            ax.legend(fontsize=8)
    return to_base64_png(fig)


def arch_training_curves(logs: pd.DataFrame, y: str, ylabel: str, styles: dict, variants=(),
                         log_y: bool = False) -> str | None:
    """One panel per k, one line per arch: `y` of the training logs against tokens (variants dashed)."""
    df = _finite(logs, ["tokens", y, "k"], positive=["tokens", y] if log_y else ["tokens"])
    if df.empty:
        return None
    ks = sorted(df["k"].unique())
    drawn = set()
    with _style():
        fig, axes = _panels(len(ks))
        for ax, k in zip(axes, ks):
            for arch, run in df[df["k"] == k].groupby(df["arch"].astype(str)):
                run = run.sort_values("tokens")
                ax.plot(run["tokens"], run[y], color=styles[arch]["color"], lw=1.3,
                        ls="--" if arch in variants else "-")
                drawn.add(arch)
            _log(ax, "both" if log_y else "x")
            ax.set_title(f"k = {k}")
            ax.set_xlabel("training tokens")
        axes[0].set_ylabel(ylabel)
        _legend(fig, styles, sorted(drawn), dashed=variants)
    return to_base64_png(fig)


def progressive(records: list[dict], styles: dict) -> str | None:
    """Fig 10 analogue: per analysed SAE, FVU against L0 of test-time TopK(k') (solid) and JumpReLU(theta)
    (dashed), the trained activation as a star and the training k as a dotted line."""
    panels = []
    for r in records:
        curves = {kind: _finite(pd.DataFrame((r.get("curves") or {}).get(kind) or []), ["l0", "fvu"],
                                positive=["l0", "fvu"]) for kind in ("topk", "jumprelu")}
        if any(not c.empty for c in curves.values()):
            panels.append((r, curves))
    if not panels:
        return None
    with _style():
        fig, axes = _panels(len(panels), sharey=False)
        for ax, (r, curves) in zip(axes, panels):
            colour = styles.get(r["arch"], {"color": "C0"})["color"]
            for kind, ls in (("topk", "-"), ("jumprelu", "--")):
                c = curves[kind].sort_values("l0")
                ax.plot(c["l0"], c["fvu"], color=colour, ls=ls, lw=1.3,
                        marker="." if kind == "topk" else None)
            t = r.get("trained") or {}
            if all(isinstance(t.get(x), (int, float)) and math.isfinite(t[x]) and t[x] > 0
                   for x in ("l0", "fvu")):
                ax.plot([t["l0"]], [t["fvu"]], marker="*", ms=13, color="black", ls="none")
            ax.axvline(r["k"], color="grey", ls=":", lw=0.8)
            _log(ax)
            ax.set_title(f"{r['arch']}, n = {r['n']}, k = {r['k']}")
            ax.set_xlabel("L0")
        axes[0].set_ylabel("FVU")
        fig.legend(handles=[Line2D([], [], color="grey", ls="-", marker=".", label="test-time TopK(k')"),
                            Line2D([], [], color="grey", ls="--", label="test-time JumpReLU(θ)"),
                            Line2D([], [], color="black", marker="*", ls="none", ms=10, label="as trained"),
                            Line2D([], [], color="grey", ls=":", label="training k")],
                   loc="outside right upper", frameon=False)
    return to_base64_png(fig)


def refinement_histograms(records: list[dict], styles: dict) -> str | None:
    """Fig 9a analogue: per analysed SAE, the distribution of log2(after / before) over the activations that
    stay nonzero, as the share of activations per bin (a ratio axis: ReLU's changes span decades)."""
    panels = []
    for r in records:
        h = r.get("log2_ratio_hist") or {}
        edges, counts = np.asarray(h.get("edges") or [], float), np.asarray(h.get("counts") or [], float)
        if len(edges) == len(counts) + 1 and len(counts) and counts.sum() > 0 and np.isfinite(edges).all():
            panels.append((r, edges, counts / counts.sum()))
    if not panels:
        return None
    with _style():
        fig, axes = _panels(len(panels), sharey=False)
        for ax, (r, edges, share) in zip(axes, panels):
            colour = styles.get(r["arch"], {"color": "C0"})["color"]
            ax.stairs(share, edges, fill=True, color=colour, alpha=0.6)
            ax.axvline(0, color="black", lw=0.8)
            med = r.get("median_log2_ratio")
            if isinstance(med, (int, float)) and math.isfinite(med):
                ax.axvline(med, color="black", ls="--", lw=1)
            ax.set_xlim(edges[0], edges[-1])
            ax.set_title(f"{r['arch']}, n = {r['n']}, k = {r['k']}")
            ax.set_xlabel("log2(after / before) of an activation")
        axes[0].set_ylabel("share of nonzero activations")
        fig.legend(handles=[Line2D([], [], color="black", lw=0.8, label="no change"),
                            Line2D([], [], color="black", ls="--", label="median")],
                   loc="outside right upper", frameon=False)
    return to_base64_png(fig)
