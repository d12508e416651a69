"""Per-token input normalization (method §A.2) and the per-layer dataset statistics written once.

Every SAE sees x_norm = (x - mean_j x_j) / ||x - mean_j x_j||_2 (per token), and all MSE metrics live
in that space. `normalize` also returns each token's (mu, scale) so reconstructions map back to the
residual stream: x_raw = x_norm * scale + mu.
"""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
import torch

from saescale.progress import Progress

log = logging.getLogger("saescale.normalize")

GEOMETRIC_MEDIAN_SAMPLES = 32768  # method §A.4: b_pre from the geometric median of 32,768 activations
EPS = 1e-8
DESCRIPTION = "per-token: subtract mean over d, scale to unit L2 norm (method §A.2)"  # recorded in saescale_sae.json



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


class MeanAndBaseline:
    """Streaming sums for the mean of normalized rows and the FVU baseline sum ||x - mean||^2 (method §C.1)
    in one pass, using sum ||x - mean||^2 = sum ||x||^2 - N ||mean||^2 (float64 sums)."""

    def __init__(self) -> None:
        self.sum_x: torch.Tensor | float = 0.0
        self.sum_sq, self.n = 0.0, 0

    def add(self, x: torch.Tensor) -> None:
        x64 = x.double()
        self.sum_x = self.sum_x + x64.sum(dim=0)
        self.sum_sq += float((x64**2).sum())
        self.n += len(x)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum_x / self.n

    def baseline_sum(self) -> float:
        return self.sum_sq - float((self.sum_x**2).sum()) / self.n


def layer_stats(chunks: Iterable[np.ndarray], n_rows: int, seed: int = 0, what: str = "normalize") -> dict:
    """Statistics of one layer's training rows, streamed chunk by chunk (memory bounded by one chunk).

    All in normalized space but the norms. Because every normalized row has unit norm, the FVU
    baseline E||x - E[x]||^2 (method §C.1) is 1 - ||E[x]||^2; it is computed from the sums anyway.
    """
    rng = np.random.default_rng(seed)
    m = min(GEOMETRIC_MEDIAN_SAMPLES, n_rows)
    picks = np.sort(rng.choice(n_rows, size=m, replace=False))
    acc = MeanAndBaseline()
    norm_sum, norm_max, seen = 0.0, 0.0, 0
    sample = []
    progress = Progress(log, what, n_rows, "rows")
    for chunk in chunks:
        x_norm, _mu, scale = normalize(torch.from_numpy(np.asarray(chunk, dtype=np.float32)))
        acc.add(x_norm)
        norm_sum += float(scale.double().sum())
        norm_max = max(norm_max, float(scale.max()))
        lo, hi = np.searchsorted(picks, [seen, seen + len(chunk)])
        sample.append(x_norm[torch.from_numpy(picks[lo:hi] - seen)])
        seen += len(chunk)
        progress.update(len(chunk))
    if seen != n_rows:
        raise ValueError(f"expected {n_rows} rows, read {seen}")
    mean = acc.mean
    baseline_mse = acc.baseline_sum() / seen
    gm = geometric_median(torch.cat(sample))
    return {
        "n_rows": int(seen),
        "d_model": int(mean.shape[0]),
        "mean": mean.float().tolist(),
        "geometric_median": gm.tolist(),
        "geometric_median_samples": m,
        "baseline_mse": float(baseline_mse),
        "raw_norm_mean": norm_sum / seen,
        "raw_norm_max": norm_max,
    }
