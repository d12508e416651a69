"""The report's figures: pure functions from DataFrames to inline base64 PNG strings.

Figures are built on `matplotlib.figure.Figure` objects, not pyplot: no backend is switched and no figure
is registered in pyplot's global list, so the report renders headless and leaks nothing between calls.
Every function returns None when there is nothing finite to draw, so the template can say so instead.
Log axes drop non-positive and non-finite values (they have no place on them).
"""

from __future__ import annotations

import base64
import io
from typing import Iterable

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from saescale.scaling.fits import predict_joint_law, predict_power_law

DPI = 110
PANEL = (3.7, 2.9)  # inches per panel
MAX_COLS = 4
MARKERS = "osD^vP*Xph<>"  # one per arch, cycled when there are more archs than markers


def to_base64_png(fig: Figure) -> str:
    """Encode a figure for an <img src="data:image/png;base64,..."> so the report needs no side files."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # constrained layout already fits labels and legends
    fig.clear()
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _style():
    """Seaborn styling as a context, so importing this module never changes global rcParams."""
    return sns.axes_style("whitegrid", {"grid.linestyle": ":"})


def _panels(n_panels: int, sharey: bool = True) -> tuple[Figure, np.ndarray]:
    cols = min(n_panels, MAX_COLS)
    rows = -(-n_panels // cols)
    fig = Figure(figsize=(PANEL[0] * cols, PANEL[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, sharey=sharey, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _finite(df: pd.DataFrame, cols: Iterable[str], positive: Iterable[str] = ()) -> pd.DataFrame:
    """Rows whose `cols` are finite numbers and whose `positive` columns are > 0 (for log axes)."""
    cols, positive = list(cols), set(positive)
    if df.empty or not set(cols) <= set(df.columns):
        return df.iloc[0:0]
    num = df[cols].apply(pd.to_numeric, errors="coerce")
    keep = np.isfinite(num.to_numpy(dtype=float)).all(axis=1)
    for c in positive:
        keep &= num[c].to_numpy(dtype=float) > 0
    out = df.loc[keep].assign(**{c: num.loc[keep, c].astype(float) for c in cols})
    return out.astype({c: int for c in ("n", "k") if c in cols})  # grid axes are integers; label them so


def _short(v: float, _pos: object = None) -> str:
    """Tick labels a reader parses at a glance: 20k, 1.5M, 0.2, 1e-05."""
    for div, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def _log(ax, axis: str = "both") -> None:
    """Log scale labelled at 1-2-5 steps (matplotlib's default minor labels collide on short ranges), or at
    decades alone when the plotted data already span more than two decades (1-2-5 labels would collide)."""
    for name in ("x", "y") if axis == "both" else (axis,):
        getattr(ax, f"set_{name}scale")("log")
        a = getattr(ax, f"{name}axis")
        lo, hi = getattr(ax, f"get_{name}lim")() if ax.has_data() else (1.0, 1.0)
        wide = lo > 0 and hi / lo > 10**2.2
        a.set_major_locator(LogLocator(base=10, subs=(1.0,) if wide else (1.0, 2.0, 5.0), numticks=7))
        a.set_major_formatter(FuncFormatter(_short))
        a.set_minor_formatter(NullFormatter())


def _palette(values: Iterable, name: str) -> dict:
    """One colour per sorted distinct value (n or k are ordinal, so a sequential palette)."""
    vals = sorted(set(values))
    colours = sns.color_palette(name, max(len(vals), 2))
    return {v: colours[i] for i, v in enumerate(vals)}


def _dots(colours: dict, name: str) -> list[Line2D]:
    """Legend entries for a colour-coded grid axis (k or n)."""
    return [Line2D([], [], color=c, marker="o", ls="none", label=f"{name} = {v}") for v, c in colours.items()]


def _group_title(arch: str, k: int, n_archs: int) -> str:
    return f"{arch}, k = {k}" if n_archs > 1 else f"k = {k}"


def lm_training_curve(history: pd.DataFrame) -> str | None:
    """Subject-model (builtin LM) train and validation cross-entropy against tokens seen."""
    df = _finite(history, ["tokens", "train_loss", "val_loss"], positive=["tokens"])
    if df.empty:
        return None
    with _style():
        fig = Figure(figsize=(5.2, 3.2), layout="constrained")
        ax = fig.subplots()
        ax.plot(df["tokens"], df["train_loss"], marker=".", label="train")
        ax.plot(df["tokens"], df["val_loss"], marker="o", label="validation")
        _log(ax, "x")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title("builtin subject LM training")
        ax.legend()
    return to_base64_png(fig)


def training_curves(logs: pd.DataFrame, y: str, ylabel: str, log_y: bool = True, x: str = "tokens",
                    xlabel: str = "training tokens", envelope: bool = False) -> str | None:
    """One panel per (arch, k), one line per n coloured by n: `y` against `x` from the SAE train logs.

    `envelope` adds the lower envelope over n (Gao Fig. 1a: the compute-optimal frontier).
    """
    df = _finite(logs, [x, y, "n", "k"], positive=[x, y] if log_y else [x])
    if df.empty:
        return None
    groups = sorted(df.groupby(["arch", "k"]), key=lambda g: (str(g[0][0]), g[0][1]))
    colours = _palette(df["n"], "viridis")
    n_archs = df["arch"].nunique()
    with _style():
        fig, axes = _panels(len(groups))
        for ax, ((arch, k), g) in zip(axes, groups):
            for n, run in g.groupby("n"):
                run = run.sort_values(x)
                ax.plot(run[x], run[y], color=colours[n], marker="." if len(run) < 30 else None, lw=1.3,
                        label=f"n = {n}")
            if envelope:
                pts = g.sort_values(x)
                ax.plot(pts[x], pts[y].cummin(), color="black", lw=1, ls="--", label="lower envelope")
            _log(ax, "both" if log_y else "x")
            ax.set_title(_group_title(arch, k, n_archs))
            ax.set_xlabel(xlabel)
        axes[0].set_ylabel(ylabel)
        handles = [Line2D([], [], color=c, lw=2, label=f"n = {n}") for n, c in colours.items()]
        if envelope:
            handles.append(Line2D([], [], color="black", ls="--", label="lower envelope"))
        fig.legend(handles=handles, loc="outside right upper", frameon=False)
    return to_base64_png(fig)


def grid_heatmap(metrics: pd.DataFrame, value: str, title: str, fmt: str = "{:.3f}", scale: float = 1.0,
                 cmap: str = "viridis_r", annot_extra: str | None = None) -> str | None:
    """A heatmap over the (n, k) grid, n in rows, k in columns, each cell annotated with its value.

    `annot_extra` names a column shown in brackets under the value (e.g. the dead-latent count).
    """
    df = _finite(metrics, ["n", "k", value])
    if df.empty:
        return None
    archs = sorted(df["arch"].astype(str).unique())
    with _style():
        fig, axes = _panels(len(archs), sharey=False)
        for ax, arch in zip(axes, archs):
            g = df[df["arch"].astype(str) == arch]
            grid = g.pivot_table(index="n", columns="k", values=value, aggfunc="mean").sort_index()
            text = grid.apply(lambda c: c.map(lambda v: fmt.format(v * scale) if np.isfinite(v) else ""))
            if annot_extra and annot_extra in g.columns:
                extra = g.pivot_table(index="n", columns="k", values=annot_extra, aggfunc="first")
                extra = extra.reindex(index=grid.index, columns=grid.columns)
                text = text + extra.apply(lambda c: c.map(lambda v: f"\n({v:.0f})" if np.isfinite(v) else ""))
            sns.heatmap(grid * scale, annot=text.to_numpy(), fmt="", cmap=cmap, ax=ax, cbar=True,
                        linewidths=0.5, annot_kws={"fontsize": 8})
            ax.set_title(title if len(archs) == 1 else f"{title} ({arch})")
            ax.set_xlabel("k (active latents)")
            ax.set_ylabel("n (latents)")
            ax.tick_params(axis="y", rotation=0)
        fig.set_size_inches(max(3.2, 0.9 * df["k"].nunique() + 1.8) * len(archs),
                            max(2.4, 0.5 * df["n"].nunique() + 1.2))
    return to_base64_png(fig)


def _fits_by_key(fits: dict | None, key: str) -> dict:
    if not fits:
        return {}
    if key == "per_k":
        return {(str(f.get("arch")), f.get("k")): f for f in fits.get("per_k", [])}
    return {str(f.get("arch")): f for f in fits.get("joint", [])}


def scaling_laws(metrics: pd.DataFrame, fits: dict[str, dict | None], labels: dict[str, str]) -> str | None:
    """Gao Fig. 1b analogue: `metric` against n per k (points), per-k L(n) = a n^-b + e (dashed) and the
    joint eq. 3 law (dotted); one panel per metric in `fits` ({"fvu": fits_json["fvu"], ...})."""
    panels = [m for m in fits if not _finite(metrics, ["n", "k", m], positive=["n", m]).empty]
    if not panels:
        return None
    colours = _palette(metrics["k"].dropna(), "flare")
    archs = sorted(metrics["arch"].astype(str).unique())
    markers = {a: MARKERS[i % len(MARKERS)] for i, a in enumerate(archs)}
    with _style():
        fig, axes = _panels(len(panels), sharey=False)
        for ax, metric in zip(axes, panels):
            df = _finite(metrics, ["n", "k", metric], positive=["n", metric])
            per_k, joint = _fits_by_key(fits[metric], "per_k"), _fits_by_key(fits[metric], "joint")
            # fitted curves only over the measured n: a law extrapolated past its data can swing wildly
            n_line = np.geomspace(df["n"].min(), df["n"].max(), 100)
            for (arch, k), g in df.groupby([df["arch"].astype(str), "k"]):
                g = g.sort_values("n")
                c = colours[k]
                ax.plot(g["n"], g[metric], ls="none", marker=markers[arch], color=c, ms=6)
                fit = per_k.get((arch, k))
                if fit and fit.get("ok"):
                    ax.plot(n_line, predict_power_law(fit, n_line), color=c, ls="--", lw=1.2)
                jfit = joint.get(arch)
                if jfit and jfit.get("ok"):
                    ax.plot(n_line, predict_joint_law(jfit, n_line, k), color=c, ls=":", lw=1.5)
            _log(ax, "y")
            lo, hi = df[metric].min(), df[metric].max()
            ax.set_ylim(lo / 1.25, hi * 1.25)  # the data set the scale, not a poorly constrained fit
            ax.set_xscale("log", base=2)
            ns = sorted(df["n"].unique())
            ax.set_xticks(ns, labels=[f"{n:,}" for n in ns], rotation=30 if len(ns) > 5 else 0)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("n (latents)")
            ax.set_ylabel(labels.get(metric, metric))
            ax.set_title(f"{labels.get(metric, metric)} vs n")
        handles = _dots(colours, "k")
        handles += [Line2D([], [], color="grey", ls="--", label=r"per-k fit $a\,n^{-b} + e$"),
                    Line2D([], [], color="grey", ls=":", lw=1.5, label="joint law (eq. 3)")]
        if len(markers) > 1:
            handles += [Line2D([], [], color="grey", marker=m, ls="none", label=a)
                        for a, m in markers.items()]
        fig.legend(handles=handles, loc="outside right upper", frameon=False)
    return to_base64_png(fig)


def downstream_vs_fvu(metrics: pd.DataFrame, references: dict[str, float | None]) -> str | None:
    """Gao Fig. 5b analogue: ΔCE and KL against FVU on log-log axes, coloured by k, sized by n.

    `references` maps a column to its zero-ablation value, drawn as a horizontal line for scale.
    """
    ys = [("delta_ce", "ΔCE (nats/token)"), ("kl_div_with_sae", "KL (nats/token)")]
    ys = [(c, lab) for c, lab in ys if not _finite(metrics, ["fvu", c, "n", "k"], positive=["fvu", c]).empty]
    if not ys:
        return None
    colours = _palette(metrics["k"].dropna(), "flare")
    ns = sorted(metrics["n"].dropna().unique())
    sizes = dict(zip(ns, np.linspace(25, 110, max(len(ns), 1))))
    with _style():
        fig, axes = _panels(len(ys), sharey=False)
        for ax, (col, label) in zip(axes, ys):
            df = _finite(metrics, ["fvu", col, "n", "k"], positive=["fvu", col])
            for (arch, k), g in df.groupby([df["arch"].astype(str), "k"]):
                g = g.sort_values("n")  # a line per k traces n at fixed L0, as in Fig. 5b
                ax.plot(g["fvu"], g[col], color=colours[k], lw=0.8, alpha=0.6, zorder=2)
                ax.scatter(g["fvu"], g[col], color=colours[k], s=[sizes[n] for n in g["n"]],
                           edgecolor="white", linewidth=0.5, zorder=3)
            ref = references.get(col)
            if ref is not None and np.isfinite(ref) and ref > 0:
                # A far-off reference would squash the data into a corner: then state it, don't draw it.
                drawn = ref <= 3 * df[col].max()
                if drawn:
                    ax.axhline(ref, color="black", ls="--", lw=1)
                # Bottom right: ΔCE and KL grow with FVU, so that corner is the one the points leave empty.
                ax.text(0.98, 0.03, f"zero ablation: {ref:.3g}" + ("" if drawn else " (off scale)"),
                        transform=ax.transAxes, ha="right", va="bottom", fontsize=8)
            _log(ax)
            ax.set_xlabel("FVU (normalized MSE)")
            ax.set_ylabel(label)
            ax.set_title(f"{label.split(' ')[0]} vs FVU")
        handles = _dots(colours, "k")
        handles += [Line2D([], [], color="grey", marker="o", ls="none", ms=np.sqrt(s) * 0.8, label=f"n = {n}")
                    for n, s in sizes.items()]
        fig.legend(handles=handles, loc="outside right upper", frameon=False)
    return to_base64_png(fig)
