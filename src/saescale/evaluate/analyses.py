"""Gao et al. section 5 experiments on one trained SAE: progressive recovery (C.8) and refinement (C.9).

Glue between a trained SAE, eval rows and the pure math in `progressive` and `refinement`.
"""

from __future__ import annotations

import numpy as np
import torch
import zarr
from torch import nn

from saescale.evaluate.downstream import downstream_metrics
from saescale.evaluate.memory import forward_rows
from saescale.evaluate.progressive import k_grid, progressive_curves, threshold_grid
from saescale.evaluate.refinement import refine_values, refinement_summary, support_from_dense
from saescale.normalize import MeanAndBaseline, normalize
from saescale.sae.activations import Latents
from saescale.sae.model import SparseAutoencoder
from saescale.store import iter_chunks

REFINE_BATCH = 1024  # tokens per refinement solve (Gram matrices [batch, m, m]); fewer at n > 2^20
HIST_BINS = 40


def eval_sample(root: zarr.Group, layer: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`tokens` normalized eval rows spread evenly over the whole eval split (its rows are grouped by
    window, so the first rows would cover few documents), and the mean of the whole split, the FVU
    baseline the evaluate rule uses (method §C.1), so both report FVU on the same scale."""
    stats, picked = MeanAndBaseline(), []
    n_eval = root.attrs["n_eval"]
    stride = max(1, n_eval // tokens)
    seen = 0
    for chunk in iter_chunks(root, layer, "eval"):
        x = normalize(torch.from_numpy(chunk.astype(np.float32)))[0]
        stats.add(x)
        first = (-seen) % stride  # index within this chunk of the next row on the global stride
        picked.append(x[first::stride])
        seen += len(x)
    return torch.cat(picked)[:tokens], stats.mean.float()


@torch.no_grad()
def progressive(sae: SparseAutoencoder, x: torch.Tensor, spec: dict, mean: torch.Tensor | None = None) -> dict:
    k_values = k_grid(sae.k, spec["k_factors"], sae.n_latents)
    sample = sae.family.scores(sae, x[:2048])  # [2048, n]: 8 GiB at n = 2^20, less than the curves' blocks
    l0_targets = np.geomspace(min(k_values), max(k_values), spec["thresholds"])
    thresholds = threshold_grid(sample, l0_targets)
    return progressive_curves(sae, x, k_values, thresholds, x.mean(dim=0) if mean is None else mean)


def _support(sae: SparseAutoencoder, x: torch.Tensor) -> Latents:
    latents = sae.encode(x)
    if latents.indices is None:
        return Latents(*support_from_dense(latents.values))
    return latents


def refined_reconstruction(sae: SparseAutoencoder, iters: int):
    """x_norm -> the SAE's reconstruction with each token's values re-optimized on its own support."""

    @torch.no_grad()
    def reconstruct(x: torch.Tensor, _tokens: torch.Tensor | None = None) -> torch.Tensor:
        out = []
        for xb in x.split(forward_rows(sae.n_latents, REFINE_BATCH)):
            lat = _support(sae, xb)
            values = refine_values(xb - sae.b_pre, sae.W_dec, lat.values, lat.indices, iters=iters)
            out.append(sae.decode(Latents(values, lat.indices)))
        return torch.cat(out)

    return reconstruct


@torch.no_grad()
def refinement(sae: SparseAutoencoder, x: torch.Tensor, spec: dict, model: nn.Module | None = None,
               layer: int | None = None, windows: np.ndarray | None = None, batch_size: int = 32,
               device: torch.device | None = None, mean: torch.Tensor | None = None) -> dict:
    """FVU before/after refinement and the change of the nonzero activations (Fig 9a, b); with a model,
    also delta CE before/after (Fig 9c). The histogram is of log2(after / before) over activations that
    stay nonzero (ratios span orders of magnitude for ReLU's near-zero activations); the share that
    refinement sets to zero is reported beside it."""
    mean = x.mean(dim=0) if mean is None else mean
    base = float(((x - mean) ** 2).sum())
    err_before = err_after = 0.0
    before, after = [], []
    for xb in x.split(forward_rows(sae.n_latents, REFINE_BATCH)):
        lat = _support(sae, xb)
        values = refine_values(xb - sae.b_pre, sae.W_dec, lat.values, lat.indices, iters=spec["iters"])
        err_before += float(((sae.decode(lat) - xb) ** 2).sum())
        err_after += float(((sae.decode(Latents(values, lat.indices)) - xb) ** 2).sum())
        keep = lat.values > 0
        before.append(lat.values[keep])
        after.append(values[keep])
    v0, v1 = torch.cat(before), torch.cat(after)
    alive = v1 > 0
    log_ratio = torch.log2(v1[alive] / v0[alive]).cpu().numpy()
    lo, hi = np.quantile(log_ratio, [0.005, 0.995]) if len(log_ratio) else (0.0, 0.0)
    counts, edges = np.histogram(np.clip(log_ratio, lo, hi), bins=HIST_BINS, range=(lo, max(hi, lo + 1e-6)))
    out = {"tokens": len(x), "iters": spec["iters"], "fvu_before": err_before / base, "fvu_after": err_after / base,
           **refinement_summary(v0[:, None], v1[:, None]),
           "fraction_zeroed": float((~alive).float().mean()),
           "median_log2_ratio": float(np.median(log_ratio)) if len(log_ratio) else float("nan"),
           "log2_ratio_hist": {"edges": edges.tolist(), "counts": counts.tolist()}}
    if model is not None:
        plain = downstream_metrics(model, layer, sae, windows, batch_size, device)
        refined = downstream_metrics(model, layer, sae, windows, batch_size, device,
                                     reconstruct=refined_reconstruction(sae, spec["iters"]))
        out.update(delta_ce_before=plain["delta_ce"], delta_ce_after=refined["delta_ce"],
                   kl_before=plain["kl_div_with_sae"], kl_after=refined["kl_div_with_sae"],
                   downstream_tokens=plain["tokens"])
    return out
