"""Progressive recovery (method §C.8, Gao et al. Fig 10): swap a trained SAE's activation at test time for
TopK(k') over a range of k', and for JumpReLU(theta) over a range of thresholds, and trace FVU against L0.

A code is progressive when FVU keeps falling as k' (or L0) grows. The paper: TopK-trained SAEs are
progressive only up to about their training k, Multi-TopK ones over all k', ReLU ones up to all positive
latents.
"""

from __future__ import annotations

import numpy as np
import torch

from saescale.evaluate.memory import forward_rows
from saescale.sae.activations import Latents, jump, topk
from saescale.sae.model import SparseAutoencoder

BATCH = 4096  # rows per encoder pass: scores are [batch, n], fewer rows at large n (memory.forward_rows)


def threshold_grid(scores: torch.Tensor, l0_targets: np.ndarray) -> np.ndarray:
    """Thresholds whose expected L0 over `scores` [rows, n] are `l0_targets`: theta = the (1 - L0/n)
    quantile of all scores, so the JumpReLU curve spans the same L0 range as the TopK one."""
    n = scores.shape[1]
    q = np.clip(1.0 - np.asarray(l0_targets, dtype=float) / n, 0.0, 1.0)
    return np.quantile(scores.flatten().float().cpu().numpy(), q).clip(min=0.0)


@torch.no_grad()
def progressive_curves(sae: SparseAutoencoder, x: torch.Tensor, k_values: list[int], thresholds: np.ndarray,
                       mean: torch.Tensor) -> dict:
    """FVU (against `mean`, method §C.1) and mean L0 of the trained activation, of TopK(k') for each
    k', and of JumpReLU(theta) on the ReLU'd scores for each theta, over the normalized rows `x`."""

    def code_fns():
        yield ("trained", None), lambda s, xb: sae.encode(xb)
        for kp in k_values:
            yield ("topk", kp), lambda s, xb, kp=kp: topk(s, min(kp, sae.n_latents))
        for theta in thresholds:
            yield ("jumprelu", float(theta)), lambda s, xb, t=float(theta): jump(torch.relu(s), t)

    fns = list(code_fns())
    err = np.zeros(len(fns))
    l0 = np.zeros(len(fns))
    base = 0.0
    for xb in x.split(forward_rows(sae.n_latents, BATCH)):
        scores = sae.family.scores(sae, xb)
        base += float(((xb - mean) ** 2).sum())
        for i, (_, fn) in enumerate(fns):
            latents: Latents = fn(scores, xb)
            err[i] += float(((sae.decode(latents) - xb) ** 2).sum())
            l0[i] += float(latents.l0().sum())
    rows = len(x)
    curves: dict[str, list[dict]] = {"topk": [], "jumprelu": []}
    out = {"tokens": rows, "trained": None, "curves": curves}
    for ((kind, param), _), e, n_active in zip(fns, err, l0):
        point = {"fvu": e / base, "l0": n_active / rows}
        if kind == "trained":
            out["trained"] = point
        else:
            curves[kind].append({("k" if kind == "topk" else "threshold"): param, **point})
    return out


def k_grid(k: int, factors: list[float], n: int) -> list[int]:
    """k' = factor * k, rounded, at least 1, at most n, without repeats."""
    return sorted({min(max(1, round(f * k)), n) for f in factors})
