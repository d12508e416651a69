"""Figures of the scaling studies (Gao et al. §3, method §D.1/D.2: Figs 1a, 1b, 3, 4, 11) from studies.json,
the training logs and the metrics tables. Pure functions to base64 PNGs, None when nothing is drawable."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from saescale.report.figures import _finite, _log, _palette, _panels, _style, to_base64_png
from saescale.scaling.fits import predict_power_law


def _ok(fit: dict | None) -> bool:
    return bool(fit) and bool(fit.get("ok"))


def compute_frontier(logs: pd.DataFrame, compute: list[dict]) -> str | None:
    """Fig. 1a: loss against training FLOPs per n (thin), the frontier's points (black) and its L(C) fit."""
    entries = [c for c in compute if c.get("points")]
    if not entries or logs.empty:
        return None
    colours = _palette(logs["n"].astype(int), "viridis")
    with _style():
        fig, axes = _panels(len(entries))
        for ax, entry in zip(axes, entries):
            loss = entry["loss"]
            g = _finite(logs[(logs["arch"].astype(str) == entry["arch"]) & (logs["k"] == entry["k"])],
                        ["flops", loss, "n"], positive=["flops", loss])
            for n, run in g.groupby("n"):
                run = run.sort_values("flops")
                ax.plot(run["flops"], run[loss], color=colours[n], lw=1, alpha=0.8)
            pts = pd.DataFrame(entry["points"])
            ax.plot(pts["flops"], pts["loss"], "o", color="black", ms=3.5)
            fit = entry["fit"]
            if _ok(fit):
                c = np.logspace(np.log10(pts["flops"].min()), np.log10(pts["flops"].max()), 100)
                ax.plot(c, predict_power_law(fit, c), ls="--", color="crimson",
                        label=f"b = {fit['b']:.3f}, e = {fit['e']:.3g}")
                ax.legend(loc="upper right", fontsize=8)
            _log(ax)
            ax.set_title(f"{entry['arch']}, k = {entry['k']}")
            ax.set_xlabel("training FLOPs (6·tokens·n·d)")
        axes[0].set_ylabel({"heldout_fvu_best": "held-out FVU, min(EMA, raw)", "heldout_fvu": "held-out FVU"}
                           .get(entries[0]["loss"], "training FVU"))
        handles = [Line2D([], [], color=c, lw=2, label=f"n = {n}") for n, c in colours.items()]
        handles += [Line2D([], [], color="black", marker="o", ls="none", label="frontier"),
                    Line2D([], [], color="crimson", ls="--", label="a·C^−b + e")]
        fig.legend(handles=handles, loc="outside right upper", frameon=False)
    return to_base64_png(fig)


def tokens_to_convergence(convergence: list[dict]) -> str | None:
    """Fig. 11: tokens to convergence vs n per (arch, k), a panel per tolerance; open markers at the budget
    for runs that did not converge (censored), and the fitted exponent where there is one."""
    entries = [c for c in convergence if c.get("points")]
    if not entries:
        return None
    tols = sorted({c["tolerance"] for c in entries})
    colours = _palette([c["k"] for c in entries], "flare")
    with _style():
        fig, axes = _panels(len(tols))
        for ax, tol in zip(axes, tols):
            for c in (c for c in entries if c["tolerance"] == tol):
                col = colours[c["k"]]
                done = [(p["n"], p["tokens"]) for p in c["points"] if p["tokens"]]
                cens = [(p["n"], p["censored_at"]) for p in c["points"] if not p["tokens"]]
                fit = c["fit"]
                label = f"{c['arch']} k = {c['k']}" + (f": n^{fit['slope']:.2f}" if _ok(fit) else "")
                if done:
                    ax.plot(*zip(*done), "o-", color=col, label=label)
                if cens:
                    ax.plot(*zip(*cens), "^", mfc="none", color=col, label=None if done else label)
            _log(ax)
            ax.set_xlabel("n (latents)")
            ax.set_title(f"converged: < {tol:g} gain per doubling")
            ax.legend(fontsize=7)
        axes[0].set_ylabel("tokens to convergence (△: not by the budget)")
    return to_base64_png(fig)


def lr_sweep(lr: dict | None) -> str | None:
    """Fig. 3: held-out loss against lr per n (left; filled: the run converges by lr.converges, open: it does
    not; ★ the L(N)-optimal lr, ◆ the L(C)-optimal one) and the largest converging lr against n (right; a
    triangle where it is a bound: ▲ the largest lr tried still converged, ▼ none did) with its fit."""
    if not lr or not lr.get("per_n"):
        return None
    colours = _palette([r["n"] for r in lr["per_n"]], "viridis")
    with _style():
        fig, axes = _panels(2, sharey=False)
        for r in lr["per_n"]:
            sweep = pd.DataFrame(r["sweep"]).sort_values("lr")
            col = colours[r["n"]]
            axes[0].plot(sweep["lr"], sweep["loss"], "-", color=col, label=f"n = {r['n']}")
            ok = sweep.get("converges", pd.Series(True, index=sweep.index)).astype(bool)
            axes[0].plot(sweep["lr"][ok], sweep["loss"][ok], "o", color=col)
            axes[0].plot(sweep["lr"][~ok], sweep["loss"][~ok], "o", mfc="none", color=col)
            opt = r.get("optima") or {}
            for key, marker in (("ln", "*"), ("lc", "D")):
                o = opt.get(key) or {}
                if o.get("ok"):
                    axes[0].plot([o["lr"]], [o["loss"]], marker, color=col, ms=10 if marker == "*" else 6, mec="black")
        _log(axes[0])
        axes[0].set_xlabel("learning rate")
        axes[0].set_ylabel("final held-out FVU")
        axes[0].set_title(f"{lr.get('arch', '')} k = {lr.get('k', '')}: ★ L(N)-opt, ◆ L(C)-opt")
        axes[0].legend(fontsize=8)
        rows = [r for r in lr["per_n"] if (r.get("largest") or {}).get("ok")]
        for r in rows:
            big, col = r["largest"], colours[r["n"]]
            marker = {0: "o", -1: "^", 1: "v"}[big["bound"]]
            axes[1].plot([r["n"]], [big["lr"]], marker, color=col, mfc=col if big["bound"] == 0 else "none")
            lo, hi = big["interval"]
            if lo and hi:
                axes[1].plot([r["n"], r["n"]], [lo, hi], "-", color=col, lw=1)
        fit = lr["fit"]
        if _ok(fit) and rows:
            ns = np.array([fit["x_min"], fit["x_max"]])
            axes[1].plot(ns, np.exp(fit["intercept"]) * ns ** fit["slope"], "--", color="crimson",
                         label=f"fit: n^{fit['slope']:.2f} ± {fit['slope_err']:.2f}")
            mid = np.sqrt(ns.prod())
            axes[1].plot(ns, np.exp(fit["intercept"]) * mid ** fit["slope"] * (ns / mid) ** -0.5, ":", color="grey",
                         label="paper: n^−0.5")
            axes[1].legend(fontsize=8)
        _log(axes[1])
        axes[1].set_xlabel("n (latents)")
        axes[1].set_ylabel("largest converging lr")
        axes[1].set_title("bar: between the largest converging and the next lr")
    return to_base64_png(fig)


_STATUS_MARKER = {"converged": dict(marker="o"), "censored": dict(marker="v", mfc="none"),
                  "fixed-budget": dict(marker="s", mfc="none")}  # an SAE's convergence status (scaling.fits)


def ln_points(fits: list[dict]) -> str | None:
    """L(N) per k (Fig. 1b analogue) from the per-k fits: converged SAEs filled, censored ones (hit their
    token cap before the rule) as open ▼ at their capped loss, an upper bound, fixed-budget ones as open
    squares; the fitted law, its label saying whether it is a converged L(N) or a fixed-budget L(n)."""
    entries = [f for f in fits if f.get("points")]
    if not entries:
        return None
    colours = _palette([f["k"] for f in entries], "flare")
    archs = sorted({str(f["arch"]) for f in entries})
    with _style():
        fig, axes = _panels(len(archs))
        for ax, arch in zip(axes, archs):
            for f in (f for f in entries if str(f["arch"]) == arch):
                col = colours[f["k"]]
                pts = pd.DataFrame(f["points"]).sort_values("n")
                for status, g in pts.groupby("status"):
                    ax.plot(g["n"], g["y"], ls="none", color=col, **_STATUS_MARKER.get(status, {"marker": "x"}))
                if _ok(f):
                    ns = np.geomspace(pts["n"].min(), pts["n"].max(), 50)
                    ax.plot(ns, predict_power_law(f, ns), "--", color=col,
                            label=f"k = {f['k']}: b = {f['b']:.3f}, e = {f['e']:.3g}")
                else:
                    ax.plot([], [], ls="none", color=col, marker="o", label=f"k = {f['k']}: not fitted")
            _log(ax)
            ax.set_xlabel("n (latents)")
            label = {f.get("label") for f in entries if str(f["arch"]) == arch}
            ax.set_title(f"{arch}: " + ", ".join(sorted(x for x in label if x)))
            ax.legend(fontsize=7)
        axes[0].set_ylabel("eval FVU")
        handles = [Line2D([], [], color="grey", ls="none", label=lab, **_STATUS_MARKER[st])
                   for st, lab in (("converged", "converged"), ("censored", "censored (≤: hit its cap)"),
                                   ("fixed-budget", "fixed budget"))]
        fig.legend(handles=handles, loc="outside right upper", frameon=False)
    return to_base64_png(fig)


def joint_residuals(joint: list[dict]) -> str | None:
    """Residuals log L − log L_fit of the joint law (eq. 3) per SAE against n, colour = k."""
    entries = [j for j in joint if j.get("residuals")]
    if not entries:
        return None
    with _style():
        fig, axes = _panels(len(entries))
        for ax, j in zip(axes, entries):
            res = pd.DataFrame(j["residuals"])
            colours = _palette(res["k"], "flare")
            for k, g in res.groupby("k"):
                g = g.sort_values("n")
                ax.plot(g["n"], g["log_residual"], "o-", color=colours[k], label=f"k = {k}")
            ax.axhline(0, color="black", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("n (latents)")
            ax.set_title(f"{j['arch']}: eq. 3 residuals")
            ax.legend(fontsize=8)
        axes[0].set_ylabel("log FVU − log fit")
    return to_base64_png(fig)


def subject_size(curves: list[dict]) -> str | None:
    """Fig. 4: FVU vs n at fixed k, one line per subject model (colour by width), with its law; markers as in
    ln_points (converged filled, censored ▼, fixed-budget open squares)."""
    curves = [c for c in curves if c["points"]]
    if len(curves) < 1:
        return None
    colours = _palette([c["d_model"] for c in curves], "crest")
    with _style():
        fig = Figure(figsize=(6.4, 3.6), layout="constrained")
        ax = fig.subplots()
        for c in curves:
            pts = pd.DataFrame(c["points"]).sort_values("n")
            col = colours[c["d_model"]]
            fit = c.get("fit")
            label = f"{c['subject']} (d = {c['d_model']})" + (f": b = {fit['b']:.3f}" if _ok(fit) else "")
            for st, g in pts.groupby("status"):
                ax.plot(g["n"], g["fvu"], ls="none", color=col, **_STATUS_MARKER.get(st, {"marker": "x"}))
            ax.plot([], [], ls="none", color=col, marker="o", label=label)
            if _ok(fit):
                ns = np.geomspace(pts["n"].min(), pts["n"].max(), 50)
                ax.plot(ns, predict_power_law(fit, ns), "--", color=col)
        shown = {p["status"] for c in curves for p in c["points"]} - {"converged"}
        for st, lab in (("censored", "censored (≤: hit its cap)"), ("fixed-budget", "fixed budget")):
            if st in shown:
                ax.plot([], [], ls="none", color="grey", label=lab, **_STATUS_MARKER[st])
        _log(ax)
        ax.set_xlabel("n (latents)")
        ax.set_ylabel("eval FVU")
        laws = sorted({(c.get("fit") or {}).get("label") or "" for c in curves} - {""})
        ax.set_title(f"{curves[0]['arch']}, k = {curves[0]['k']}" + (": " + ", ".join(laws) if laws else ""))
        ax.legend(fontsize=8)
    return to_base64_png(fig)
