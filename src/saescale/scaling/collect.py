"""Collect eval JSONs into one metrics table (CSV) and fit the scaling laws on it (fits.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from saescale import paths
from saescale.files import read_json, write_json_atomic, write_text_atomic
from saescale.scaling.fits import convergence_status

# Downstream columns (method §C.3) under SAEBench's `core` names where the quantity is the same
# (docs/metrics.md); the two deltas are Gao et al.'s and keep our names.
DOWNSTREAM = ["delta_ce", "kl_div_with_sae", "ce_loss_without_sae", "ce_loss_with_sae",
              "ce_loss_with_ablation", "delta_ce_zero_ablation", "kl_div_with_ablation", "ce_loss_score",
              "kl_div_score"]
# The names saescale used before it took SAEBench's, for the same quantities: a record or table that still has
# one was written by an earlier version and is refused with a message saying what to rerun.
RENAMED = {"ce_clean": "ce_loss_without_sae", "ce_spliced": "ce_loss_with_sae",
           "ce_zero_ablation": "ce_loss_with_ablation", "kl": "kl_div_with_sae",
           "kl_zero_ablation": "kl_div_with_ablation", "loss_recovered": "ce_loss_score",
           "nn_mean": "average_max_decoder_cosine_sim"}
COLUMNS = ["subject", "layer", "arch", "base_arch", "n", "k", "d_model", "fvu", "l0", "dead_fraction", "dead_latents",
           "dead_window_tokens", *DOWNSTREAM, "eval_tokens", "downstream_tokens",
           "lr", "penalty", "train_l0", "train_tokens", "train_seconds", "tokens_per_s", "weights", "device",
           # L(N) needs converged SAEs (method §D.1): the trainer's convergence record and the status it gives
           "convergence_tolerance", "converged_at_tokens", "token_cap", "convergence"]
# The evaluation suite (issue 4), from the files beside each eval record; empty where a metric is off.
SUITE_COLUMNS = ["probe_loss", "probe_loss_post", "probe_loss_resid", "probe_task_losses", "ablation_sparsity",
                 "ablation_sparsity_resid", "freq_slope", "alpha_paper", "alpha_model",
                 "average_max_decoder_cosine_sim", "nn_above_0.9", "nn_above_0.97", "nn_random_mean",
                 "n2g_precision", "n2g_recall", "n2g_f1", "n2g_delta_ce", "bigram_delta_ce",
                 "sae_delta_ce_c6", "autointerp_accuracy", "autointerp_auroc"]
COLUMNS += SUITE_COLUMNS


def flatten(ev: dict) -> dict:
    down, train = ev["downstream"], ev["train"]
    return {
        **{key: ev[key] for key in ("subject", "layer", "arch", "n", "k", "d_model", "fvu", "l0", "dead_fraction",
                                    "dead_latents", "eval_tokens", "lr", "device")},
        **{key: down[key] for key in DOWNSTREAM},
        "downstream_tokens": down["tokens"],
        "train_tokens": train["tokens"],
        "train_seconds": train["train_seconds"],
        "tokens_per_s": train["tokens_per_s"],
        "weights": train["weights"],
        # penalty archs: k is the target L0, `l0` the achieved one, `penalty` the calibrated lambda
        "base_arch": ev.get("base_arch", ev["arch"]),
        "penalty": train.get("penalty"),
        "train_l0": train.get("final_train_l0"),
        "convergence_tolerance": train.get("convergence_tolerance"),
        "converged_at_tokens": train.get("converged_at_tokens"),
        "dead_window_tokens": ev.get("dead_window_tokens"),  # the tokens dead_fraction was counted over
        "token_cap": train.get("max_tokens"),
        "convergence": convergence_status(train.get("converged_at_tokens"), train.get("convergence_tolerance")),
    }


def refuse_old_names(names, where: str, rerun: str) -> None:
    """Raise if `names` (a record's keys or a table's columns) holds a name saescale used before it took
    SAEBench's: the file was written by an earlier version, and reading it would leave those columns empty."""
    old = [name for name in RENAMED if name in names]
    if old:
        pairs = ", ".join(f"{name} -> {RENAMED[name]}" for name in old)
        raise ValueError(f"{where} was written by an earlier saescale, before its metrics took SAEBench's "
                         f"names ({pairs}; docs/metrics.md): rerun {rerun}. Snakemake reruns it on its own "
                         "after an upgrade unless --rerun-triggers leaves out code; else delete the file.")


def _suite(job: dict) -> dict:
    """The suite's headline numbers for one SAE from whichever of its metric files exist."""
    def load(pattern: str, **extra) -> dict | None:
        path = Path(paths.fmt(pattern, **job, **extra))
        return read_json(path) if path.exists() else None

    out: dict = {}
    if probes := load(paths.METRIC, metric="probes"):
        sets = probes["feature_sets"]
        out.update(probe_loss=sets.get("pre", {}).get("mean_loss"), probe_loss_post=sets.get("post", {}).get("mean_loss"),
                   probe_loss_resid=sets["resid"]["mean_loss"])
        if "pre" in sets:  # per task, for the paired uncertainty of TopK vs ReLU (report/suite_verdicts.py)
            out["probe_task_losses"] = json.dumps({t: r["loss"] for t, r in sets["pre"]["tasks"].items()},
                                                  sort_keys=True)
    if ablation := load(paths.METRIC, metric="ablation"):
        out.update(ablation_sparsity=ablation["latents"]["mean"], ablation_sparsity_resid=ablation["channels"]["mean"])
    if geo := load(paths.METRIC, metric="geometry"):
        fit, nn = geo["frequency_fit"], geo["nn"]
        out.update(freq_slope=fit.get("slope"), alpha_paper=fit.get("alpha_paper"), alpha_model=fit.get("alpha_model"),
                   average_max_decoder_cosine_sim=nn["mean"], nn_random_mean=geo["nn_random"]["mean"],
                   **{f"nn_above_{th}": nn["thresholds"][th]["count"] for th in ("0.9", "0.97")})
    if interp := load(paths.INTERPRET):
        out.update({f"n2g_{key}": interp["n2g"][key] for key in ("precision", "recall", "f1")})
        if rec := interp.get("reconstruction"):
            out.update(n2g_delta_ce=rec["n2g"]["delta_ce"], bigram_delta_ce=rec["bigram"]["delta_ce"],
                       sae_delta_ce_c6=rec["sae"]["delta_ce"])
    if auto := load(paths.AUTOINTERP):
        out.update(autointerp_accuracy=auto.get("mean_accuracy"), autointerp_auroc=auto.get("mean_auroc"))
    return out


def collect(eval_paths: list[str]) -> pd.DataFrame:
    """The metrics table: one row per eval record, with the suite's files found beside it by the SAE's
    identity (paths.METRIC, paths.INTERPRET, ...)."""
    rows = []
    for p in eval_paths:
        ev = read_json(p)
        refuse_old_names(ev["downstream"], f"{p} (downstream)", "its evaluate job")
        job = {key: ev[key] for key in ("subject", "layer", "arch", "n", "k")}
        rows.append({**flatten(ev), **_suite(job)})
    return pd.DataFrame(rows, columns=COLUMNS).sort_values(["arch", "k", "n"]).reset_index(drop=True)


def _strict(obj) -> dict:
    from saescale.scaling.fits import to_jsonable

    obj = to_jsonable(obj)
    json.dumps(obj, allow_nan=False)  # checked before writing: the file must stay strict JSON for other tools
    return obj


def write_scaling(table: pd.DataFrame, metrics_path: str | Path, fits_path: str | Path,
                  studies_path: str | Path | None = None, grid_jobs: list[dict] | None = None,
                  lr_jobs: list[dict] | None = None, settings: dict | None = None) -> dict:
    """metrics.csv, fits.json (per-k and joint L(n) laws) and, given `studies_path`, studies.json (L(C),
    tokens to convergence, lr vs n, joint law vs GPT-4). Each file is written whole or not at all."""
    from saescale.scaling.fits import fit_all
    from saescale.scaling.studies import scaling_studies

    fits = _strict({"fvu": fit_all(table, "fvu"), "delta_ce": fit_all(table, "delta_ce")})
    studies = None
    if studies_path is not None:
        studies = _strict(scaling_studies(table, fits, grid_jobs or [], lr_jobs or [], settings))
    write_text_atomic(metrics_path, table.to_csv(index=False))
    write_json_atomic(fits_path, fits)
    if studies is not None:
        write_json_atomic(studies_path, studies)
    return fits
