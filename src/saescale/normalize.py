"""Per-token input normalization (REFERENCE A.2) and the per-layer dataset statistics written once.

Every SAE sees x_norm = (x - mean_j x_j) / ||x - mean_j x_j||_2 (per token), and all MSE metrics live
in that space. `normalize` also returns each token's (mu, scale) so reconstructions map back to the
residual stream: x_raw = x_norm * scale + mu.
"""

from __future__ import annotations

import logging
from typing import TypeVar

import numpy as np
import torch

log = logging.getLogger("saescale.normalize")

GEOMETRIC_MEDIAN_SAMPLES = 32768  # REFERENCE A.4: b_pre from the geometric median of 32,768 activations
EPS = 1e-8

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def normalize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_norm, mu, scale) with mu [..., 1] the mean over d and scale [..., 1] the centred L2 norm."""
    x = x.float()
    mu = x.mean(dim=-1, keepdim=True)
    centred = x - mu
    scale = centred.norm(dim=-1, keepdim=True).clamp_min(EPS)
    return centred / scale, mu, scale


def denormalize(x_norm: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x_norm * scale + mu


def geometric_median(points: torch.Tensor, max_iter: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimizing the sum of Euclidean distances to `points` [m, d]."""
    points = points.double()
    median = points.mean(dim=0)
    for _ in range(max_iter):
        dist = (points - median).norm(dim=1).clamp_min(1e-12)
        w = 1.0 / dist
        new = (w[:, None] * points).sum(dim=0) / w.sum()
        if (new - median).norm() <= tol * max(1.0, float(median.norm())):
            median = new
            break
        median = new
    return median.float()


def layer_stats(x_raw: np.ndarray, seed: int = 0) -> dict:
    """Statistics of one layer's training rows (raw activations), all in normalized space but the norms."""
    x = torch.from_numpy(np.asarray(x_raw, dtype=np.float32))
    x_norm, _mu, scale = normalize(x)
    mean = x_norm.mean(dim=0)
    # FVU baseline (REFERENCE C.1): error of always predicting the dataset mean, per token
    baseline_mse = float(((x_norm - mean) ** 2).sum(dim=1).mean())
    rng = np.random.default_rng(seed)
    m = min(GEOMETRIC_MEDIAN_SAMPLES, len(x_norm))
    sample = x_norm[torch.from_numpy(np.sort(rng.choice(len(x_norm), size=m, replace=False)))]
    gm = geometric_median(sample)
    return {
        "n_rows": int(len(x_norm)),
        "d_model": int(x_norm.shape[1]),
        "mean": mean.tolist(),
        "geometric_median": gm.tolist(),
        "geometric_median_samples": m,
        "baseline_mse": baseline_mse,
        "raw_norm_mean": float(scale.mean()),
        "raw_norm_max": float(scale.max()),
    }
