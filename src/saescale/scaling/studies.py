"""The scaling stage's studies beyond the per-k L(n) fits (method §D.1): L(C), tokens to convergence, lr vs n,
the joint L(N, K) law set beside Gao et al.'s GPT-4 constants, and the irreducible-term comparisons. Reads
training logs; writes studies.json.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from saescale import paths
from saescale.files import read_json
from saescale.scaling.compute import compute_study, loss_column, with_best
from saescale.scaling.convergence import converged_at, convergence_study
from saescale.scaling.fits import CONVERGED, FIXED, JOINT_PARAMS, LABELS, irreducible_test, predict_joint_law
from saescale.scaling.lr import converges, lr_study

# method §D.1 eq. 3, fitted by Gao et al. on GPT-4 (Fig. 1b)
GPT4_JOINT = {"alpha": -0.50, "beta_k": 0.26, "beta_n": -0.017, "gamma": -0.042, "zeta": -1.32, "eta": -0.085}


def read_logs(jobs: list[dict]) -> pd.DataFrame:
    """The training logs of `jobs` (subject, layer, arch, n, k), stacked with their identity columns."""
    frames = []
    for job in jobs:
        path = Path(paths.fmt(paths.SAE_LOG, **job))
        frames.append(pd.read_csv(path).assign(arch=job["arch"], n=int(job["n"]), k=int(job["k"])))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["arch", "n", "k", "tokens"])


def lr_points(jobs: list[dict], tolerance: float, smoothing: float) -> list[dict]:
    """One point per lr-sweep SAE: its lr, multiple of the lr rule, held-out curve (min of EMA and raw FVU,
    training FVU when the log has none), final loss, whether it converges (lr.converges, on the raw held-out
    curve) and its tokens to convergence: where the trainer stopped it in convergence mode, else the same rule
    applied to its log."""
    out = []
    for job in jobs:
        log = with_best(pd.read_csv(paths.fmt(paths.SAE_LOG, **job)))
        cfg = read_json(paths.fmt(paths.SAE_CFG, **job))
        loss = loss_column(log)
        raw_col = "heldout_fvu" if loss != "fvu" else "fvu"
        values = pd.to_numeric(log[loss], errors="coerce")
        raw = pd.to_numeric(log[raw_col], errors="coerce")
        trained = cfg.get("train") or {}
        conv_t = trained.get("converged_at_tokens")
        if conv_t is None and not (cfg.get("train_spec") or {}).get("convergence_tolerance"):
            conv_t = converged_at(log["tokens"], raw, tolerance, smoothing)
        out.append({"n": int(job["n"]), "k": int(job["k"]), "arch": job["arch"], "multiple": float(job["multiple"]),
                    "lr": float(cfg["train_spec"]["lr"]), "loss": float(values.iloc[-1]), "loss_column": loss,
                    "tokens": [int(t) for t in log["tokens"]], "loss_curve": [float(v) for v in values],
                    "final_tokens": int(log["tokens"].iloc[-1]), "tokens_to_convergence": conv_t,
                    **{"converges": (c := converges(raw.to_numpy(float)))["ok"], "converges_why": c["why"]}})
    return out


def irreducible(table: pd.DataFrame, fits: dict, compute: list[dict], metric: str = "fvu") -> list[dict]:
    """"Including an irreducible loss term substantially improves the quality of our fits for both L(C) and
    L(N)" (Gao et al. §3.1.3), tested per (arch, k) as a model comparison (fits.irreducible_test): on the L(C)
    frontier, and on the L(N) points where the fit is a converged one (only converged SAEs: censored points
    have no likelihood under a plain least-squares comparison)."""
    out = []
    for c in compute:
        pts = c.get("points") or []
        test = irreducible_test([p["flops"] for p in pts], [p["loss"] for p in pts]) if pts else \
            {"ok": False, "reason": "no frontier"}
        out.append({"law": "L(C)", "arch": c["arch"], "k": c["k"], **test})
    for f in (fits.get(metric) or {}).get("per_k", []):
        pts = [p for p in f.get("points", []) if p["used"] and p["status"] == CONVERGED]
        if f.get("regime") != CONVERGED:
            test = {"ok": False, "reason": "fixed-budget L(n): the paper's claim is about converged L(N)"}
        else:
            test = irreducible_test([p["n"] for p in pts], [p["y"] for p in pts])
        out.append({"law": "L(N)", "arch": f["arch"], "k": f["k"], **test})
    return out


def joint_comparison(table: pd.DataFrame, fits: dict, metric: str = "fvu") -> list[dict]:
    """Per arch with a joint fit: its constants beside GPT-4's, the effective n-exponent -(beta_n + gamma ln k)
    at each trained k for both, and the residuals log L - log L_fit per SAE (method §D.1), with the fit's regime
    (converged L(N) or fixed-budget L(n)) and each SAE's convergence status (a censored SAE may lie above the
    law: it is an upper bound)."""
    out = []
    for joint in fits.get(metric, {}).get("joint", []):
        if not joint.get("ok"):
            continue
        rows = table[table["arch"].astype(str) == str(joint["arch"])]
        rows = rows[np.isfinite(pd.to_numeric(rows[metric], errors="coerce")) & (rows[metric] > 0)]
        pred = predict_joint_law(joint, rows["n"].to_numpy(float), rows["k"].to_numpy(float))
        resid = np.log(rows[metric].to_numpy(float)) - np.log(pred)
        ks = sorted({int(k) for k in rows["k"]})
        status = rows["convergence"].fillna(FIXED).astype(str) if "convergence" in rows.columns else \
            pd.Series(FIXED, index=rows.index)
        out.append({
            "arch": joint["arch"], "metric": metric, "regime": joint.get("regime", FIXED),
            "label": joint.get("label", LABELS[FIXED]), "counts": joint.get("counts"),
            "n_censored": joint.get("n_censored", 0), "censored_binding": joint.get("censored_binding", 0),
            "constants": [{"name": p, "fit": joint[p], "err": joint.get(f"{p}_err"), "gpt4": GPT4_JOINT[p]}
                          for p in JOINT_PARAMS],
            "exponents": [{"k": k, "fit": -(joint["beta_n"] + joint["gamma"] * math.log(k)),
                           "gpt4": -(GPT4_JOINT["beta_n"] + GPT4_JOINT["gamma"] * math.log(k))} for k in ks],
            "residuals": [{"n": int(n), "k": int(k), "observed": float(y), "fit": float(p), "log_residual": float(r),
                           "status": st}
                          for n, k, y, p, r, st in zip(rows["n"], rows["k"], rows[metric], pred, resid, status)],
            "rmse_log": joint.get("rmse_log"),
            "max_abs_log_residual": float(np.abs(resid).max()) if resid.size else None,
        })
    return out


def scaling_studies(table: pd.DataFrame, fits: dict, grid_jobs: list[dict], lr_jobs: list[dict],
                    settings: dict) -> dict[str, Any]:
    """Everything studies.json holds, from the grid's logs and the lr sweep's."""
    logs = read_logs(grid_jobs)
    conv = settings["convergence"]
    loss = loss_column(logs) if not logs.empty else "fvu"
    lr = None
    if lr_jobs:
        sweep = settings["lr_sweep"]
        lr = {**lr_study(lr_points(lr_jobs, min(conv["tolerances"]), conv["smoothing"]), sweep.get("compute_tokens")),
              "arch": sweep["arch"], "k": int(lr_jobs[0]["k"])}
    compute = compute_study(logs, settings["compute"]["per_decade"], settings["compute"]["bootstrap"])
    return {
        "compute": compute,
        "convergence": [entry for tol in sorted(conv["tolerances"])
                        for entry in convergence_study(logs, loss, tol, conv["smoothing"])],
        "lr_sweep": lr,
        "joint": joint_comparison(table, fits),
        "ln": (fits.get("fvu") or {}).get("per_k", []),  # L(N) per k, each labelled converged or fixed-budget
        "irreducible": irreducible(table, fits, compute),
    }
