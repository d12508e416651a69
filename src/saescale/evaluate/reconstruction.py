"""Reconstruction metrics over the eval split: FVU, L0, dead fraction (method §C.1, C.2, A.8)."""

from __future__ import annotations

import numpy as np
import torch
import zarr

from saescale.evaluate.memory import row_blocks
from saescale.normalize import MeanAndBaseline, normalize
from saescale.sae.model import SparseAutoencoder
from saescale.store import split_rows


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, root: zarr.Group, layer: int, batch_size: int,
                           device: torch.device, rows: slice | None = None) -> dict:
    """FVU as a ratio of sums over the whole eval set against the eval set's own mean (method §C.1; not a
    mean of per-batch ratios), L0, and the fraction of latents that never fire on any eval token, with that
    window's length (`dead_window_tokens`: every token evaluated, the whole of `rows`; method §A.8)."""
    x_store = root[f"L{layer}/x"]
    rows = split_rows(root, "eval") if rows is None else rows  # cmd_evaluate: without the stopping rows
    err = l0_sum = 0.0
    baseline = MeanAndBaseline()
    fired = torch.zeros(sae.n_latents, dtype=torch.float64, device=device)
    for start in range(rows.start, rows.stop, batch_size):
        raw = torch.from_numpy(x_store[start:min(start + batch_size, rows.stop)].astype(np.float32)).to(device)
        x = normalize(raw)[0]
        baseline.add(x)
        for xb in row_blocks(x, sae.n_latents):  # one [rows, n] block at a time, whatever n (memory.py)
            x_hat, latents = sae(xb)
            err += float(((xb - x_hat) ** 2).sum())
            l0_sum += float(latents.l0().sum())
            fired += latents.firing_counts(sae.n_latents).double()
    n_tokens = rows.stop - rows.start
    base = baseline.baseline_sum()
    return {
        "eval_tokens": n_tokens,
        "fvu": err / base,
        "mse": err / n_tokens,
        "baseline_mse": base / n_tokens,
        "l0": l0_sum / n_tokens,
        "dead_fraction": float((fired == 0).float().mean()),
        "dead_latents": int((fired == 0).sum()),
        "dead_window_tokens": n_tokens,
        "latent_firing_counts": fired.cpu().numpy().astype(np.int64),
    }
