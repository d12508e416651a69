"""Losses and reconstruction metrics, all in the normalized input space (method §A.2, A.5, C.1)."""

from __future__ import annotations

import torch


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 autocast outputs are widened; float64 stays float64 for gradient checks)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def normalized_mse(x_hat: torch.Tensor, x: torch.Tensor, baseline_mse: float) -> torch.Tensor:
    """method §A.5: the main loss is the MSE divided by a constant computed once, the error of
    predicting the dataset mean (so a batch's value estimates its FVU)."""
    return ((_wide(x_hat) - _wide(x)) ** 2).sum(dim=-1).mean() / baseline_mse


def auxk_loss(e_hat: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """method §A.5: AuxK reconstruction of the main error e, normalized per batch by the error's own
    variance (its scale shrinks as training proceeds); NaN (seen at scale) counts as 0."""
    e = e.float()
    num = ((e_hat.float() - e) ** 2).sum(dim=-1).mean()
    den = ((e - e.mean(dim=0, keepdim=True)) ** 2).sum(dim=-1).mean()
    return (num / den).nan_to_num(0.0)


def fvu(x: torch.Tensor, x_hat: torch.Tensor, mean: torch.Tensor) -> float:
    """method §C.1: fraction of variance unexplained against the dataset-mean predictor (ratio of sums)."""
    x = x.float()
    return float(((x - x_hat.float()) ** 2).sum()) / float(((x - mean) ** 2).sum())
