"""Sparsifying activations and their custom gradients (method §A.3, B.3, B.5, B.6, C.8).

Codes come in two layouts: TopK-style codes keep `k` (value, index) slots per token, so decoding gathers
only k decoder rows; codes whose support size varies per token (ReLU, JumpReLU, BatchTopK) are dense
[batch, n] tensors (`indices is None`).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Latents(NamedTuple):
    """A sparse code: `values` [batch, k] at latent `indices` [batch, k], or, when `indices` is None, the
    dense code `values` [batch, n]. Zeros are allowed and mean inactive."""

    values: torch.Tensor
    indices: torch.Tensor | None = None

    def dense(self, n: int) -> torch.Tensor:
        if self.indices is None:
            return self.values
        out = torch.zeros(self.values.shape[0], n, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_(1, self.indices, self.values)

    def l0(self) -> torch.Tensor:
        """Active latents per token [batch]."""
        return (self.values > 0).sum(dim=-1)

    def firing_counts(self, n: int, threshold: float = 0.0) -> torch.Tensor:
        """Tokens on which each latent's value exceeds `threshold` [n], with fixed-shape ops only (boolean
        indexing would force a GPU-to-host sync)."""
        fired = (self.values > threshold).to(torch.float32)
        if self.indices is None:
            return fired.sum(dim=0)
        out = torch.zeros(n, dtype=torch.float32, device=self.values.device)
        return out.index_add_(0, self.indices.flatten(), fired.flatten())


def topk(pre_acts: torch.Tensor, k: int) -> Latents:
    """method §A.3: the k largest pre-activations per token, then ReLU (as openai/sparse_autoencoder), so
    L0 <= k and is below k only when fewer than k pre-activations are positive."""
    values, indices = pre_acts.topk(k, dim=-1, sorted=False)
    return Latents(torch.relu(values), indices)


def dead_topk(pre_acts: torch.Tensor, dead: torch.Tensor, k_aux: int, in_place: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """AuxK's selection (Gao et al. 2024, App. A.2): the k_aux largest pre-activations among dead latents,
    as (values, indices) [batch, k_aux], with fixed shapes and no host sync: live latents are masked to -inf
    and one top-k runs over all n. Where fewer than k_aux latents are dead the rest of the slots hold live
    latents at -inf, which ReLU zeroes (so a live latent is never used). `in_place` masks a graph-free
    `pre_acts` whose values are not read again, sparing a [batch, n] copy."""
    fill = torch.tensor(float("-inf"), dtype=pre_acts.dtype, device=pre_acts.device)
    masked = pre_acts.masked_fill_(~dead, fill) if in_place else torch.where(dead, pre_acts.detach(), fill)
    return masked.topk(min(k_aux, pre_acts.shape[1]), dim=-1, sorted=False)


class Selection:
    """The latent indices [batch, m] of a sparse code, with their grouping by latent computed at most once and
    shared by every backward that needs it: the encoder and the decoder weight gradients of one step sort the
    same indices (the main k and the AuxK k_aux slots together: Gao et al. 2024, App. A.2, and their sparse
    kernels).

    `bounds` split each token's slots into consecutive bags, decoded by one pass over the decoder: e.g. (k,)
    gives the main reconstruction (slots [0, k)) and AuxK's reconstruction of the residual (slots [k, m))."""

    def __init__(self, indices: torch.Tensor, n: int, bounds: tuple[int, ...] = ()):
        self.indices, self.n, self.bounds = indices, n, tuple(bounds)
        self._by_latent: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def bags(self) -> int:
        return len(self.bounds) + 1

    def bag_of_slot(self, slot: torch.Tensor, by_bag: bool = True) -> torch.Tensor:
        """The output row (token * bags + bag; the token alone if not `by_bag`) of flat slot numbers."""
        m = self.indices.shape[1]
        token = torch.div(slot, m, rounding_mode="floor")
        if not self.bounds or not by_bag:
            return token
        j = slot - token * m
        return self.bags * token + sum((j >= b).long() for b in self.bounds)

    def bag_offsets(self) -> torch.Tensor:
        """embedding_bag offsets of the flat slots: `bags` per token."""
        batch, m = self.indices.shape
        starts = torch.arange(batch, device=self.indices.device) * m
        if not self.bounds:
            return starts
        return torch.stack([starts] + [starts + b for b in self.bounds], dim=1).flatten()

    def by_latent(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, offsets): flat slot numbers sorted by latent (stable), and where each latent's run starts
        [n + 1]. int32 keys sort 1.8x faster than int64 on CPU; `searchsorted` rather than `bincount` for the
        offsets, so CUDA needs no host sync."""
        if self._by_latent is None:
            keys = self.indices.flatten()
            keys = keys.to(torch.int32) if self.n < 2**31 else keys
            latent, order = keys.sort(stable=True)
            bounds = torch.arange(self.n + 1, device=keys.device, dtype=keys.dtype)
            self._by_latent = order, torch.searchsorted(latent, bounds)
        return self._by_latent


def scatter_rows_t(sel: Selection, weights: torch.Tensor, dense: torch.Tensor, by_bag: bool = False,
                   method: str = "auto") -> torch.Tensor:
    """S^T @ dense [n, d] for the sparse [rows, n] matrix S with S[row(s), latent(s)] = weights(s) over the
    flat slots s of `sel` (repeats add); row(s) is the slot's token, or with `by_bag` its bag (dense is then
    [batch * bags, d]).

    The weight gradients of a sparse code (as in Gao et al. 2024's sparse kernels): only rows of W that some
    token selected get a nonzero row, at O(batch * m * d). Two kernels, chosen by device ("auto"):
    - "bag" (CPU): an `embedding_bag` over `dense` with one bag per latent: 1.8x faster on CPU than the CSR
      product, 3x faster than COO, 4.7x faster than batch * k outer products added with index_add
      (batch 4096, k = 32, d = 768, n = 32768). On CUDA its sum kernel walks a bag in one thread, so a latent
      that many tokens select becomes a serial path of up to `batch` rows;
    - "csr" (CUDA): the same product as a CSR [n, rows] @ dense matmul (cuSPARSE), which splits the work
      over the nonzeros rather than one thread per latent.
    """
    order, offsets = sel.by_latent()
    rows = sel.bag_of_slot(order, by_bag)
    w = weights.flatten()[order].to(dense.dtype)
    if method == "auto":
        method = "csr" if dense.is_cuda else "bag"
    if method == "csr":
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            s_t = torch.sparse_csr_tensor(offsets.long(), rows, w, size=(sel.n, dense.shape[0]))
        return s_t @ dense
    return F.embedding_bag(rows, dense, offsets.long(), per_sample_weights=w, mode="sum", include_last_offset=True)


def gather_dtype(device_type: str) -> torch.dtype | None:
    """The dtype the sparse passes gather rows in: bf16 under bf16 autocast (train.precision: bf16, or auto on
    CUDA), so each gathered row is half the bytes; None (the weights' own float32) otherwise, so float32 and
    float32-strict steps are unchanged. The kernels accumulate in float32 and round each output once
    (embedding_bag and its per-sample-weights backward on CPU and CUDA, cuSPARSE's bf16 SpMM), as a bf16
    matmul under autocast does."""
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16:
        return torch.bfloat16
    return None


def gather_dot(sel: Selection, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """grad[row(s)] . weight[latent(s)] for every slot s [batch, m]: the gradient of a decoded code's values,
    by embedding_bag's own backward kernel (2x faster on CPU than gathering the [batch, m, d] rows)."""
    idx = sel.indices.flatten()
    slots = torch.arange(idx.numel(), device=idx.device)
    out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad, weight, idx, sel.bag_offsets(), sel.bag_of_slot(slots), 0)
    return out.view_as(sel.indices)


class SelectedPreActs(torch.autograd.Function):
    """pre[b, j] = (x[b] - b_pre) . W[idx[b, j]] + bias[idx[b, j]] for the selected latents only
    (the sparse encoder backward of Gao et al. 2024).

    The forward takes the values from pre-activations already computed without a graph (so they are exactly
    the ones the selection saw); the backward touches only the selected rows: the weight gradient is a sparse
    product over the selection, O(batch * m * d) instead of the two O(batch * n * d) products a dense backward
    through all n pre-activations costs. The pre-bias gradient reduces over the batch first, as Gao et al.'s
    kernels do: with c = sum_b grad[b, :] scattered to latents ([n], which is the b_enc gradient),
    d/d b_pre = -sum_b sum_j grad[b, j] W[idx[b, j]] = -c @ W, O(n * d) rather than a batch * m * d gather.
    `rows_dtype` (bf16: `gather_dtype`) is the dtype the weight gradient gathers the rows of x - b_pre in.
    """

    @staticmethod
    def forward(ctx, values, x, b_pre, weight, bias, sel: Selection, rows_dtype: torch.dtype | None = None):
        ctx.sel, ctx.rows_dtype = sel, rows_dtype
        ctx.save_for_backward(x, b_pre, weight)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        x, b_pre, weight = ctx.saved_tensors
        sel = ctx.sel
        g = grad.to(weight.dtype)
        grad_x = grad_b_pre = grad_w = grad_b = None
        per_latent = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        per_latent.index_add_(0, sel.indices.flatten(), g.flatten())
        if ctx.needs_input_grad[1]:
            grad_x = F.embedding_bag(sel.indices, weight, per_sample_weights=g, mode="sum").to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_b_pre = -(per_latent @ weight).to(b_pre.dtype)
        if ctx.needs_input_grad[3]:
            low = ctx.rows_dtype or weight.dtype
            grad_w = scatter_rows_t(sel, grad.to(low), (x - b_pre).to(low)).to(weight.dtype)
        if ctx.needs_input_grad[4]:
            grad_b = per_latent
        return None, grad_x, grad_b_pre, grad_w, grad_b, None, None


class SparseDecode(torch.autograd.Function):
    """x_hat[b] = sum_j values[b, j] * W_dec[idx[b, j]]: the decoder of a slot code (Gao et al. 2024), one
    `embedding_bag` pass; with `sel.bounds` the output is [batch, bags, d] (e.g. the main and the AuxK bags).

    The backward replaces embedding_bag's decoder gradient (a dense, sort-based kernel that cost more than the
    forward on CPU) with the sparse product S^T @ grad the encoder uses too (sharing its sort), and reads the
    values' gradient from embedding_bag's own per-sample-weights kernel without recomputing the forward.

    `rows`: the weight's rows to gather, when they are a lower-precision copy of `weight` (bf16: see
    `gather_dtype` and `SparseAutoencoder.decoder_rows`); the output and every row the backward gathers (the
    copy's, the gradient's) are then in that dtype, and the weight's gradient is returned in the weight's own.
    """

    @staticmethod
    def forward(ctx, values, weight, sel: Selection, rows: torch.Tensor | None = None):
        rows = weight.detach() if rows is None else rows
        ctx.sel, ctx.weight_dtype = sel, weight.dtype
        ctx.save_for_backward(values, rows)
        out = F.embedding_bag(sel.indices.flatten(), rows, sel.bag_offsets(),
                              per_sample_weights=values.flatten().to(rows.dtype), mode="sum")
        return out if not sel.bounds else out.view(-1, sel.bags, rows.shape[1])

    @staticmethod
    def backward(ctx, grad):
        values, rows = ctx.saved_tensors
        sel = ctx.sel
        g = grad.reshape(-1, rows.shape[1]).to(rows.dtype).contiguous()
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_values = gather_dot(sel, rows, g).to(values.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = scatter_rows_t(sel, values, g, by_bag=True).to(ctx.weight_dtype)
        return grad_values, grad_w, None, None


def batch_topk(acts: torch.Tensor, k: int) -> tuple[Latents, torch.Tensor]:
    """method §B.6: keep the batch * k largest entries of the (non-negative) batch of activations, so the
    mean L0 over the batch is k while each token's varies. Also returns the smallest kept positive value,
    from which inference estimates its single threshold."""
    flat = acts.flatten()
    values, idx = flat.topk(min(acts.shape[0] * k, flat.numel()), sorted=False)
    dense = torch.zeros_like(flat).scatter(0, idx, values).view_as(acts)
    kept_min = torch.where(values > 0, values, torch.full_like(values, float("inf"))).min()
    return Latents(dense), kept_min


def jump(pre_acts: torch.Tensor, threshold: torch.Tensor | float) -> Latents:
    """JumpReLU at inference: a * 1[a > theta] (method §B.5, and C.8's test-time sweep)."""
    return Latents(pre_acts * (pre_acts > threshold))


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel K(u) = 1[-1/2 < u < 1/2] of the JumpReLU pseudo-derivatives (method §B.5)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """f = pre * H(pre - theta) with straight-through pseudo-derivatives (method §B.5):
    df/dtheta := -(theta / eps) K((pre - theta) / eps); df/dpre := H(pre - theta), plus, for Anthropic's tanh
    variant ("the STE passes gradient to the input as well"), (theta / eps) K((pre - theta) / eps)."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth: float, input_grad: bool):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth, ctx.input_grad = bandwidth, input_grad
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = (theta / eps) * rectangle((pre - theta) / eps)
        grad_pre = grad * (pre > theta)
        if ctx.input_grad:
            grad_pre = grad_pre + grad * kernel
        grad_theta = -(grad * kernel).sum(dim=0)
        return grad_pre, grad_theta, None, None


class StepFunction(torch.autograd.Function):
    """H(pre - theta), the L0 count, with dH/dtheta := -(1/eps) K((pre - theta) / eps) and no gradient into
    pre (method §B.5): the penalty moves thresholds, not the encoder."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth: float):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(grad * rectangle((pre - theta) / eps) / eps).sum(dim=0)
        return None, grad_theta, None


class ProLUFunction(torch.autograd.Function):
    """ProLU (method §B.3): z = m * 1[m > 0 and m + b > 0]; the bias only gates, never shifts magnitudes.
    Its true gradient is zero a.e., so b gets the straight-through ProLU_STE gradient dz/db := m * 1[active]."""

    @staticmethod
    def forward(ctx, m, b):
        active = (m > 0) & (m + b > 0)
        ctx.save_for_backward(m, active)
        return m * active

    @staticmethod
    def backward(ctx, grad):
        m, active = ctx.saved_tensors
        g = grad * active
        return g, (g * m).sum(dim=0)
