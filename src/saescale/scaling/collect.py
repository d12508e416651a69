"""Collect eval JSONs into one metrics table (CSV) and fit the scaling laws on it (fits.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from saescale.files import read_json, write_json_atomic, write_text_atomic

COLUMNS = ["subject", "layer", "arch", "base_arch", "n", "k", "d_model", "fvu", "l0", "dead_fraction", "dead_latents", "delta_ce",
           "kl", "ce_clean", "ce_spliced", "delta_ce_zero_ablation", "kl_zero_ablation", "loss_recovered",
           "eval_tokens", "downstream_tokens",
           "lr", "penalty", "train_l0", "train_tokens", "train_seconds", "tokens_per_s", "weights", "device"]


def flatten(ev: dict) -> dict:
    down, train = ev["downstream"], ev["train"]
    return {
        **{key: ev[key] for key in ("subject", "layer", "arch", "n", "k", "d_model", "fvu", "l0", "dead_fraction",
                                    "dead_latents", "eval_tokens", "lr", "device")},
        **{key: down[key] for key in ("delta_ce", "kl", "ce_clean", "ce_spliced", "delta_ce_zero_ablation",
                                      "kl_zero_ablation", "loss_recovered")},
        "downstream_tokens": down["tokens"],
        "train_tokens": train["tokens"],
        "train_seconds": train["train_seconds"],
        "tokens_per_s": train["tokens_per_s"],
        "weights": train["weights"],
        # penalty archs: k is the target L0, `l0` the achieved one, `penalty` the calibrated lambda
        "base_arch": ev.get("base_arch", ev["arch"]),
        "penalty": train.get("penalty"),
        "train_l0": train.get("final_train_l0"),
    }


def collect(eval_paths: list[str]) -> pd.DataFrame:
    rows = [flatten(read_json(p)) for p in eval_paths]
    return pd.DataFrame(rows, columns=COLUMNS).sort_values(["arch", "k", "n"]).reset_index(drop=True)


def write_scaling(table: pd.DataFrame, metrics_path: str | Path, fits_path: str | Path) -> dict:
    from saescale.scaling.fits import fit_all, to_jsonable

    write_text_atomic(metrics_path, table.to_csv(index=False))
    fits = {"fvu": fit_all(table, "fvu"), "delta_ce": fit_all(table, "delta_ce")}
    fits = to_jsonable(fits)
    json.dumps(fits, allow_nan=False)  # checked before writing: the file must stay strict JSON for other tools
    write_json_atomic(fits_path, fits)
    return fits
