"""Sparsifying activation functions. Each maps pre-activations [batch, n] to a sparse code (values, indices)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Latents(NamedTuple):
    """A sparse code: `values` [batch, k] at latent `indices` [batch, k]; zeros are allowed (inactive)."""

    values: torch.Tensor
    indices: torch.Tensor

    def dense(self, n: int) -> torch.Tensor:
        out = torch.zeros(self.values.shape[0], n, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_(1, self.indices, self.values)


class TopK(nn.Module):
    """REFERENCE A.3: keep the k largest pre-activations per token, then ReLU (as openai/sparse_autoencoder),
    so L0 <= k and is below k only when fewer than k pre-activations are positive."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, pre_acts: torch.Tensor) -> Latents:
        values, indices = pre_acts.topk(self.k, dim=-1, sorted=False)
        return Latents(torch.relu(values), indices)


ACTIVATIONS = {"topk": TopK}
