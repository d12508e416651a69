"""The scaling stage's studies beyond the per-k L(n) fits (REFERENCE D.1): L(C), tokens to convergence, lr vs
n, and the joint L(N, K) law set beside Gao et al.'s GPT-4 constants. Reads training logs; writes studies.json.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from saescale import paths
from saescale.files import read_json
from saescale.scaling.compute import compute_study, loss_column
from saescale.scaling.convergence import converged_at, convergence_study
from saescale.scaling.fits import JOINT_PARAMS, predict_joint_law
from saescale.scaling.lr import lr_study

# REFERENCE D.1 eq. 3, fitted by Gao et al. on GPT-4 (Fig. 1b)
GPT4_JOINT = {"alpha": -0.50, "beta_k": 0.26, "beta_n": -0.017, "gamma": -0.042, "zeta": -1.32, "eta": -0.085}


def read_logs(jobs: list[dict]) -> pd.DataFrame:
    """The training logs of `jobs` (subject, layer, arch, n, k), stacked with their identity columns."""
    frames = []
    for job in jobs:
        path = Path(paths.fmt(paths.SAE_LOG, **job))
        frames.append(pd.read_csv(path).assign(arch=job["arch"], n=int(job["n"]), k=int(job["k"])))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["arch", "n", "k", "tokens"])


def lr_points(jobs: list[dict], tolerance: float, smoothing: float) -> list[dict]:
    """One point per lr-sweep SAE: its lr, multiple of the lr rule, final held-out FVU (training FVU when
    the log has none) and tokens to convergence by the same rule as the grid."""
    out = []
    for job in jobs:
        log = pd.read_csv(paths.fmt(paths.SAE_LOG, **job))
        cfg = read_json(paths.fmt(paths.SAE_CFG, **job))
        loss = loss_column(log)
        values = pd.to_numeric(log[loss], errors="coerce")
        out.append({"n": int(job["n"]), "k": int(job["k"]), "arch": job["arch"], "multiple": float(job["multiple"]),
                    "lr": float(cfg["train_spec"]["lr"]), "loss": float(values.iloc[-1]), "loss_column": loss,
                    "tokens": int(log["tokens"].iloc[-1]),
                    "tokens_to_convergence": converged_at(log["tokens"], values, tolerance, smoothing)})
    return out


def joint_comparison(table: pd.DataFrame, fits: dict, metric: str = "fvu") -> list[dict]:
    """Per arch with a joint fit: its constants beside GPT-4's, the effective n-exponent -(beta_n + gamma ln k)
    at each trained k for both, and the residuals log L - log L_fit per SAE (REFERENCE D.1)."""
    out = []
    for joint in fits.get(metric, {}).get("joint", []):
        if not joint.get("ok"):
            continue
        rows = table[table["arch"].astype(str) == str(joint["arch"])]
        rows = rows[np.isfinite(pd.to_numeric(rows[metric], errors="coerce")) & (rows[metric] > 0)]
        pred = predict_joint_law(joint, rows["n"].to_numpy(float), rows["k"].to_numpy(float))
        resid = np.log(rows[metric].to_numpy(float)) - np.log(pred)
        ks = sorted({int(k) for k in rows["k"]})
        out.append({
            "arch": joint["arch"], "metric": metric,
            "constants": [{"name": p, "fit": joint[p], "err": joint.get(f"{p}_err"), "gpt4": GPT4_JOINT[p]}
                          for p in JOINT_PARAMS],
            "exponents": [{"k": k, "fit": -(joint["beta_n"] + joint["gamma"] * math.log(k)),
                           "gpt4": -(GPT4_JOINT["beta_n"] + GPT4_JOINT["gamma"] * math.log(k))} for k in ks],
            "residuals": [{"n": int(n), "k": int(k), "observed": float(y), "fit": float(p), "log_residual": float(r)}
                          for n, k, y, p, r in zip(rows["n"], rows["k"], rows[metric], pred, resid)],
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
        lr = {**lr_study(lr_points(lr_jobs, min(conv["tolerances"]), conv["smoothing"])),
              "arch": settings["lr_sweep"]["arch"], "k": int(lr_jobs[0]["k"])}
    return {
        "compute": compute_study(logs, settings["compute"]["per_decade"], settings["compute"]["bootstrap"]),
        "convergence": [entry for tol in sorted(conv["tolerances"])
                        for entry in convergence_study(logs, loss, tol, conv["smoothing"])],
        "lr_sweep": lr,
        "joint": joint_comparison(table, fits),
    }
