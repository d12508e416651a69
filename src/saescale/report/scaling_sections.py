"""Template context of the "Scaling studies" section (Gao et al. §3, REFERENCE D.1): L(C), tokens to
convergence, lr vs n, the joint L(N, K) law beside the GPT-4 constants, and L(N) per subject model.

Per layer everything comes from studies.json (written by the scaling rule from the training logs); subject
size compares the subjects' metrics.csv / fits.json. Verdicts use `comparison.Verdict`; a study that did not
run names the config key or preset that runs it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from saescale.report import comparison as cmp
from saescale.report import scaling_figures as sfig
from saescale.report.arch_sections import verdict_view
from saescale.report.suite_sections import headline
from saescale.report.tables import num, pm, table, text
from saescale.scaling.fits import fit_power_law, loglog_slope

EXPONENT_SLACK = 0.15  # an exponent "agrees" within max(2 sigma, 0.15) of the paper's value
GOOD_FIT = 0.05  # rmse of log L below this: the functional form describes the points


def _close(fit: dict, target: float) -> tuple[bool, str]:
    slack = max(2 * (fit.get("slope_err") or 0), EXPONENT_SLACK)
    ok = abs(fit["slope"] - target) <= slack
    return ok, f"exponent {pm(fit['slope'], fit.get('slope_err'))} vs {target:g} (within {num(slack, 2)}: {'yes' if ok else 'no'})"


# ---- L(C) -------------------------------------------------------------------------------------------------

def compute_verdict(compute: list[dict]) -> cmp.Verdict:
    paper = ("Fig. 1a: the compute-optimal MSE follows L(C) = a·C^−b + e, and the irreducible term e improves "
             "the fit; the smallest SAEs are off-trend.")
    held, failed = [], []
    for c in compute:
        fit, pts = c["fit"], pd.DataFrame(c["points"])
        if not fit.get("ok"):
            continue
        where = f"{c['arch']} k = {c['k']}"
        (held if fit["rmse_log"] <= GOOD_FIT and fit["b"] > 0 else failed).append(
            f"{where}: b = {num(fit['b'], 3)}, log-rmse {num(fit['rmse_log'], 2)}")
        pure = loglog_slope(pts["flops"], pts["loss"])
        if pure.get("ok"):
            resid = np.log(pts["loss"]) - (pure["intercept"] + pure["slope"] * np.log(pts["flops"]))
            rmse_pure = float(np.sqrt(np.mean(resid**2)))
            (held if fit["rmse_log"] < rmse_pure else failed).append(
                f"{where}: +e log-rmse {num(fit['rmse_log'], 2)} vs pure power law {num(rmse_pure, 2)}")
    if not held and not failed:
        return cmp.Verdict(None, paper, note="No L(C) fit: the grid needs at least 2 values of n per k.")
    return cmp.Verdict(not failed, paper, tuple(held), tuple(failed))


def _interval(fit: dict, param: str) -> str:
    ci = fit.get(f"{param}_ci")
    return f" [{num(ci[0], 3)}, {num(ci[1], 3)}]" if ci else ""


def compute_table(compute: list[dict]) -> dict:
    rows = []
    for c in compute:
        f = c["fit"]
        if not f.get("ok"):
            rows.append([f"{c['arch']}", c["k"], text(f.get("reason")), "—", "—", "—", "—", "—"])
            continue
        on = sorted({p["n"] for p in c["points"]})
        rows.append([c["arch"], c["k"], *(num(f[p], 3) + _interval(f, p) for p in "abe"),
                     num(f["rmse_log"], 2), len(c["points"]), ", ".join(num(n) for n in on)])
    return table(["arch", "k", "a [16–84%]", "b [16–84%]", "e [16–84%]", "log-rmse", "points", "n on the frontier"],
                 rows)


# ---- tokens to convergence -----------------------------------------------------------------------------------

def convergence_verdict(conv: list[dict]) -> cmp.Verdict:
    paper = "Fig. 11: tokens to convergence grow as a power of n, ≈ n^0.6 for GPT-2 small (n^0.65 for GPT-4)."
    held, failed = [], []
    for c in conv:
        if c["fit"].get("ok"):
            ok, what = _close(c["fit"], 0.6)
            (held if ok else failed).append(f"{c['arch']} k = {c['k']}, tolerance {c['tolerance']:g}: {what}")
    counts = {}
    for c in conv:
        done, total = counts.get(c["tolerance"], (0, 0))
        counts[c["tolerance"]] = (done + sum(bool(p["tokens"]) for p in c["points"]), total + len(c["points"]))
    note = ("SAEs converged within their budget: " + "; ".join(f"{d} of {t} at tolerance {tol:g}"
                                                              for tol, (d, t) in sorted(counts.items()))
            + ". An exponent needs 3 converged n at one (arch, k)." if counts else "No training logs.")
    if not held and not failed:
        return cmp.Verdict(None, paper, note=note)
    return cmp.Verdict(not failed, paper, tuple(held), tuple(failed), note)


def convergence_table(conv: list[dict]) -> dict:
    rows = []
    for c in conv:
        cells = [f"{num(p['n'])}: {num(p['tokens'])}" if p["tokens"] else f"{num(p['n'])}: > {num(p['censored_at'])}"
                 for p in c["points"]]
        fit = c["fit"]
        rows.append([c["arch"], c["k"], num(c["tolerance"]), "; ".join(cells),
                     pm(fit["slope"], fit["slope_err"]) if fit.get("ok") else text(fit.get("reason"))])
    return table(["arch", "k", "tolerance", "n: tokens to convergence (> budget: not converged)", "exponent"], rows)


# ---- lr vs n -----------------------------------------------------------------------------------------------------

def lr_verdict(lr: dict | None) -> cmp.Verdict:
    paper = "Fig. 3: the best learning rate falls with n roughly as n^−0.5 (the 1/√n rule the grid uses)."
    if not lr:
        return cmp.Verdict(None, paper, note="The lr sweep did not run: scaling.lr_sweep.enabled is false.")
    fit = lr["fit"]
    if not fit.get("ok"):
        return cmp.Verdict(None, paper, note=text(fit.get("reason")))
    ok, what = _close(fit, -0.5)
    return cmp.Verdict(ok, paper, (what,) if ok else (), () if ok else (what,))


def lr_table(lr: dict | None) -> dict | None:
    if not lr:
        return None
    rows = []
    for r in lr["per_n"]:
        sweep = "; ".join(f"×{num(p['multiple'], 3)}: {num(p['loss'], 4)}" for p in r["sweep"])
        b = r["best"]
        best = (f"{num(b['lr'], 3)} ({b['method']}{', at the edge' if b['at_edge'] else ''})" if b.get("ok")
                else text(b.get("reason")))
        conv = [num(p["tokens_to_convergence"]) for p in r["sweep"] if p.get("tokens_to_convergence")]
        rows.append([r["n"], sweep, best, ", ".join(conv) or "none converged"])
    return table(["n", "final loss per lr multiple", "best lr", "tokens to convergence"], rows)


# ---- joint law ---------------------------------------------------------------------------------------------------

def joint_verdict(joint: list[dict]) -> cmp.Verdict:
    paper = ("Eq. 3: γ < 0 (L(N) steeper for larger k) and η < 0 (the irreducible loss falls with k); the GPT-4 "
             "constants themselves are not expected to transfer.")
    held, failed = [], []
    for j in joint:
        c = {x["name"]: x for x in j["constants"]}
        for name, why in (("gamma", "steeper in n at larger k"), ("eta", "irreducible loss falls with k")):
            claim = f"{j['arch']}: {name} = {pm(c[name]['fit'], c[name]['err'])} ({why})"
            (held if c[name]["fit"] < 0 else failed).append(claim)
    if not held and not failed:
        return cmp.Verdict(None, paper, note="No joint fit: it needs >= 7 SAEs over >= 2 values of k and n.")
    return cmp.Verdict(not failed, paper, tuple(held), tuple(failed))


def joint_tables(joint: list[dict]) -> list[dict]:
    out = []
    for j in joint:
        consts = table(["parameter", "this run", "GPT-4 (Gao eq. 3)"],
                       [[c["name"], pm(c["fit"], c["err"]), num(c["gpt4"])] for c in j["constants"]])
        exps = table(["k", "effective n-exponent −(β_n + γ ln k): this run", "GPT-4"],
                     [[e["k"], num(e["fit"], 3), num(e["gpt4"], 3)] for e in j["exponents"]])
        out.append({"arch": j["arch"], "constants": consts, "exponents": exps,
                    "rmse": num(j.get("rmse_log"), 3), "max_residual": num(j.get("max_abs_log_residual"), 3)})
    return out


# ---- subject size ------------------------------------------------------------------------------------------------

def subject_curves(layers: list[dict], config: dict) -> list[dict]:
    """Per subject (its first layer): FVU vs n of scaling.subject_size's (arch, k) and its L(n) fit."""
    ss = config["scaling"]["subject_size"]
    k = ss["k"] if ss["k"] is not None else min(config["sweep"]["k"])
    seen, out = set(), []
    for lay in layers:
        if lay["subject"] in seen:
            continue
        seen.add(lay["subject"])
        m = lay["metrics_all"]
        rows = m[(m["arch"].astype(str) == ss["arch"]) & (m["k"] == k)]
        rows = rows[np.isfinite(pd.to_numeric(rows["fvu"], errors="coerce"))]
        if rows.empty:
            continue
        d = pd.to_numeric(rows.get("d_model"), errors="coerce").dropna()
        out.append({"subject": lay["subject"], "layer": lay["layer"], "arch": ss["arch"], "k": k,
                    "d_model": int(d.iloc[0]) if len(d) else 0, "n_params": lay.get("n_params"),
                    "points": rows[["n", "fvu"]].to_dict("records"),
                    "fit": fit_power_law(rows["n"].to_numpy(float), rows["fvu"].to_numpy(float))})
    return sorted(out, key=lambda c: (c["d_model"], c["subject"]))


def subject_verdict(curves: list[dict]) -> cmp.Verdict:
    paper = ("Fig. 4: at fixed k, larger subject models need more latents for the same MSE (higher FVU at "
             "equal n) and scale with a shallower exponent.")
    if len(curves) < 2:
        return cmp.Verdict(None, paper, note=(
            f"{len(curves)} subject model in this run; workflow/configs/subject-size.yaml trains several builtin "
            "LMs of increasing width."))
    held, failed = [], []
    common = set.intersection(*({int(p["n"]) for p in c["points"]} for c in curves))
    if common:
        n = max(common)
        fvu = [next(p["fvu"] for p in c["points"] if int(p["n"]) == n) for c in curves]
        claim = "FVU at n = {}: {}".format(num(n), ", ".join(f"{c['subject']} {num(v, 3)}" for c, v in zip(curves, fvu)))
        (held if all(np.diff(fvu) > 0) else failed).append(claim + " (rises with width)")
    bs = [c["fit"]["b"] for c in curves if c["fit"].get("ok")]
    if len(bs) == len(curves):
        claim = "b: " + ", ".join(f"{c['subject']} {num(c['fit']['b'], 3)}" for c in curves)
        (held if all(np.diff(bs) < 0) else failed).append(claim + " (falls with width)")
    return cmp.Verdict(not failed, paper, tuple(held), tuple(failed)) if held or failed else \
        cmp.Verdict(None, paper, note="The subjects share no n.")


def subject_table(curves: list[dict]) -> dict:
    rows = []
    for c in curves:
        f = c["fit"]
        rows.append([c["subject"], c["layer"], c["d_model"], num(c.get("n_params")),
                     len(c["points"]), pm(f["b"], f["b_err"]) if f.get("ok") else text(f.get("reason")),
                     num(f["e"], 3) if f.get("ok") else "—"])
    return table(["subject", "layer", "d_model", "LM parameters", "SAEs", "b", "e"], rows)


# ---- sections ------------------------------------------------------------------------------------------------

def studies_context(studies: dict | None, logs: pd.DataFrame, archs: list[str]) -> dict:
    """One layer's part of the Scaling-studies section, from its studies.json and training logs, for the
    `archs` trained at several n (the others are in the architecture sections)."""
    studies = studies or {}
    compute = [c for c in studies.get("compute") or [] if c["arch"] in archs]
    conv = [c for c in studies.get("convergence") or [] if c["arch"] in archs]
    lr, joint = studies.get("lr_sweep"), studies.get("joint") or []
    verdicts = {"compute": compute_verdict(compute), "convergence": convergence_verdict(conv),
                "lr": lr_verdict(lr), "joint": joint_verdict(joint)}
    titles = {"compute": "L(C) (Fig. 1a)", "convergence": "Tokens to convergence (Fig. 11)",
              "lr": "Learning rate vs n (Fig. 3)", "joint": "Joint L(N, K) (eq. 3)"}
    tols = ", ".join(num(t) for t in sorted({c["tolerance"] for c in conv}))
    return {
        "present": bool(studies),
        "verdicts": {k: verdict_view(v) for k, v in verdicts.items()},
        "findings": [headline(titles[k], v) for k, v in verdicts.items()],
        "compute": compute_table(compute), "convergence": convergence_table(conv), "tolerance": tols or "—",
        "loss": (compute[0]["loss"] if compute else "fvu"),
        "lr": lr_table(lr), "joint": joint_tables(joint),
        "fig": {"compute_fit": sfig.compute_frontier(logs, compute), "convergence": sfig.tokens_to_convergence(conv),
                "lr": sfig.lr_sweep(lr), "joint_residuals": sfig.joint_residuals(joint)},
    }


def subject_context(layers: list[dict], config: dict) -> dict:
    curves = subject_curves(layers, config)
    v = subject_verdict(curves)
    return {"verdict": verdict_view(v), "finding": headline("Subject size (Fig. 4)", v),
            "table": subject_table(curves) if curves else None, "fig": sfig.subject_size(curves),
            "arch": config["scaling"]["subject_size"]["arch"],
            "k": curves[0]["k"] if curves else None}

