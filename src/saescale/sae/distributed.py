"""One SAE across several processes: data parallelism times sharding of the latent dimension, with an exact
global TopK (method §A.7b; the released code's n_replicas x n_op_shards).

World = D replicas x S shards; rank = replica * S + shard. A rank holds latents [shard * n/S, (shard+1) * n/S) of
W_enc, b_enc and W_dec (their Adam state, EMA and dead-latent counters too) and a copy of b_pre, and trains on
rows [replica * B/D, (replica+1) * B/D) of every global batch of B rows. Per token:

- selection: each shard's local top-k candidates are all-gathered over the S shards of its replica and the
  global top-k is the top-k of the S*k candidates. It is exact: every latent of the global top-k is in its own
  shard's top-k. AuxK selects the same way among the dead latents of every shard;
- decode: each shard decodes the selected latents it owns (the others are zero slots of the same fixed shape, so
  no host sync) and the partial sums are all-reduced over the shards; the loss, computed on every shard from the
  same sum, then sends each shard the full gradient of the reconstruction (the all-reduce's backward is the
  identity: Megatron's "reduce from the model-parallel region");
- b_pre enters the reconstruction with its gradient on shard 0 only, so summing b_pre's gradient over the shards
  counts the loss's part once and each shard's encoder part once;
- gradients: sharded parameters are averaged over the D replicas (each replica's loss is a mean over its rows,
  the global loss the mean over replicas); b_pre is summed over all ranks and divided by D. The AuxK loss divides
  by the global batch's error variance, gathered over the replicas, as a single device divides by its batch's.

Collectives per training step (B/D rows per replica, d wide, m = k [+ k_aux] slots): an all-gather of the
candidates (B/D x S*m values and indices), an all-reduce of the [B/D, bags, d] partial reconstructions over the
shards (float32), an all-reduce of the sharded gradients over the replicas (2 x n/S x d + n/S floats) and of
b_pre's over the world (d floats), and small ones for dead-latent bookkeeping (n/S firing counts over the
replicas, one flag over the shards). With S = D = 1 every one is skipped and the step is the single-device one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from saescale.config import SHARDED_ARCHS
from saescale.hardware import GATHER_BYTES
from saescale.sae.activations import Latents, Selection, dead_topk
from saescale.sae.archs import ARCHS, Mse, TrainOutput


@dataclass
class Mesh:
    """This process's place in a D x S layout and the process groups it reduces over (None: single process)."""

    data: int = 1
    latent: int = 1
    rank: int = 0
    latent_group: Any = None  # the S ranks of this replica
    data_group: Any = None  # the D ranks that hold this shard

    @property
    def single(self) -> bool:
        return self.data * self.latent == 1

    @property
    def replica(self) -> int:
        return self.rank // self.latent

    @property
    def shard(self) -> int:
        return self.rank % self.latent

    def latents(self, n: int) -> tuple[int, int]:
        """[start, stop) of this shard's latents."""
        if n % self.latent:
            raise ValueError(f"train.distributed.latent: {self.latent} does not divide n = {n}; choose a divisor")
        size = n // self.latent
        return self.shard * size, (self.shard + 1) * size

    def rows(self, batch: int) -> slice:
        """This replica's rows of a global batch."""
        if batch % self.data:
            raise ValueError(f"train.distributed.data: {self.data} does not divide train.batch_size = {batch}")
        size = batch // self.data
        return slice(self.replica * size, (self.replica + 1) * size)

    # ---- collectives (no-ops over a group of one) -------------------------------------------------------
    def gather_shards(self, t: torch.Tensor) -> torch.Tensor:
        """[rows, m] from every shard of this replica -> [rows, S*m], shard order."""
        if self.latent == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.latent)]
        dist.all_gather(parts, t.contiguous(), group=self.latent_group)
        return torch.cat(parts, dim=1)

    def sum_shards(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over this replica's shards; differentiable, with the identity as backward (every shard
        computes the same loss from the sum, so each already holds the full gradient)."""
        return t if self.latent == 1 else _SumShards.apply(t, self.latent_group)

    def sum_shards_(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.latent > 1:
            dist.all_reduce(t, op=op, group=self.latent_group)
        return t

    def sum_replicas_(self, t: torch.Tensor) -> torch.Tensor:
        if self.data > 1:
            dist.all_reduce(t, group=self.data_group)
        return t

    def mean_replicas_(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum_replicas_(t).div_(self.data) if self.data > 1 else t

    def agree(self, value):
        """Rank 0's value on every rank (a host-side decision, e.g. to checkpoint now)."""
        if self.single:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if not self.single:
            dist.barrier()


class _SumShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        out = t.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def mesh_from_env(data: int, latent: int, device: torch.device) -> Mesh:
    """The Mesh of this process under torchrun (RANK, WORLD_SIZE, MASTER_ADDR... in the environment): joins the
    process group (NCCL on CUDA, gloo on CPU) and builds the replica and shard groups. Every rank creates every
    group, in the same order, as torch.distributed requires."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != data * latent:
        raise ValueError(f"train.distributed asks for data {data} x latent {latent} = {data * latent} processes, "
                         f"but {world} were started (WORLD_SIZE); launch with `saescale torchrun --procs "
                         f"{data * latent}` (the workflow does)")
    if world == 1:
        return Mesh()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    latent_groups = [dist.new_group(list(range(r * latent, (r + 1) * latent))) for r in range(data)]
    data_groups = [dist.new_group(list(range(s, world, latent))) for s in range(latent)]
    return Mesh(data, latent, rank, latent_groups[rank // latent], data_groups[rank % latent])


# ---- the sharded TopK step ----------------------------------------------------------------------------
def global_topk(values: torch.Tensor, indices: torch.Tensor, k: int, mesh: Mesh, sorted: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k over all shards of per-shard candidates (values [rows, m], global latent indices [rows, m]).
    Chunks of rows are gathered one after another, so the S*m candidates per row (S * k_aux can reach thousands)
    never occupy more than GATHER_BYTES whatever the batch; the selection is per row, so chunking changes nothing."""
    if mesh.latent == 1:
        return values, indices
    per_row = mesh.latent * values.shape[1] * (values.element_size() + indices.element_size())
    chunk = max(1, GATHER_BYTES // per_row)
    if len(values) <= chunk:
        return _topk_of_gathered(values, indices, k, mesh, sorted)
    parts = [_topk_of_gathered(v, i, k, mesh, sorted) for v, i in zip(values.split(chunk), indices.split(chunk))]
    return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])


def _topk_of_gathered(values: torch.Tensor, indices: torch.Tensor, k: int, mesh: Mesh, sorted: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = mesh.gather_shards(values), mesh.gather_shards(indices)
    top, pos = values.topk(min(k, values.shape[1]), dim=1, sorted=sorted)
    return top, indices.gather(1, pos)


def selection_slots(arch: str, k: int, n: int, params: dict) -> tuple[int, bool, tuple[int, ...]]:
    """(slots selected per token, sorted, bag bounds) of a TopK-family arch's main selection over n latents:
    topk keeps k; multitopk keeps the top multiple*k, sorted, in two bags (the first k, the rest).
    `params`: the arch's parameters, all of them or only the configured overrides of its defaults."""
    if arch == "topk":
        return k, False, ()
    if arch == "multitopk":
        big = min({**ARCHS[arch].defaults, **params}["multiple"] * k, n)
        return big, True, (k,) if big > k else ()
    raise ValueError(f"train.distributed supports the archs {SHARDED_ARCHS}, not '{arch}': a code whose support "
                     "varies per token has no fixed-size global selection; train it on one device")


def owned(indices: torch.Tensor, start: int, n_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(local indices, mask) of the global `indices` this shard holds; other slots point at local latent 0 and
    must carry zero values (fixed shapes: no host sync)."""
    local = indices - start
    mine = (local >= 0) & (local < n_local)
    return torch.where(mine, local, torch.zeros_like(local)), mine


def sharded_forward_train(sae, mesh: Mesh, n: int, x: torch.Tensor, mse: Mse, dead: torch.Tensor,
                          k_aux: int) -> TrainOutput:
    """TopKArch._train_selected over a shard (module docstring): `sae` holds this shard's n/S latents, `dead`
    their dead flags; the returned x_hat and aux_x_hat are the full reconstructions, and `latents` the global
    code (values, global indices) the bookkeeping reads."""
    family, n_local = sae.family, sae.n_latents
    start = mesh.latents(n)[0]
    slots, sort, bounds = selection_slots(sae.arch, sae.k, n, family.params)
    pre, take = sae.selectable_pre_acts(x)
    values, indices = pre.topk(min(slots, n_local), dim=-1, sorted=sort)
    values, indices = global_topk(values, indices + start, slots, mesh, sort)
    main_slots = indices.shape[1]
    if k_aux:
        aux_values, aux_indices = dead_topk(pre, dead, k_aux, in_place=True)  # pre is not read again
        aux_values, aux_indices = global_topk(aux_values, aux_indices + start, k_aux, mesh)
        values, indices = torch.cat([values, aux_values], 1), torch.cat([indices, aux_indices], 1)
        bounds = (*bounds, main_slots)
    local, mine = owned(indices, start, n_local)
    sel = Selection(local, n_local, bounds)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    # the slots of other shards hold 0 and send no gradient to this shard's latent 0
    mine_values = torch.where(mine, torch.relu(take(sel, torch.where(mine, values, zero))), zero)
    decoded = mesh.sum_shards(sae.decode_selection(mine_values, sel).float())
    bags = decoded.unbind(1) if bounds else (decoded,)
    residual, aux_x_hat = (bags[:-1], bags[-1]) if k_aux else (bags, None)
    b_pre = sae.b_pre if mesh.shard == 0 else sae.b_pre.detach()
    terms = {}
    if sae.arch == "multitopk" and len(residual) > 1:
        terms["multitopk"] = family.params["coef"] * mse(sum(residual) + b_pre)
    code = Latents(torch.relu(values[:, :sae.k]).detach(), indices[:, :sae.k])
    return TrainOutput(code, residual[0] + b_pre, None, terms, None, aux_x_hat)


def sharded_auxk_loss(e_hat: torch.Tensor, e: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """auxk_loss with the normalization of the global batch: the mean of the error over all replicas' rows,
    then the mean squared deviation from it (two small all-reduces over the replicas). The numerator stays this
    replica's mean: the gradient average over replicas makes it the global one."""
    e = e.float()
    num = ((e_hat.float() - e) ** 2).sum(dim=-1).mean()
    rows = len(e) * mesh.data
    mean = mesh.sum_replicas_(e.sum(dim=0)) / rows
    den = mesh.sum_replicas_(((e - mean) ** 2).sum().reshape(1))[0] / rows
    return (num / den).nan_to_num(0.0)


def reduce_gradients(sae, mesh: Mesh) -> None:
    """Sharded parameters: mean over replicas. b_pre: sum over every rank (each shard's encoder part, shard 0's
    loss part, per replica), divided by D."""
    for p in (sae.W_enc, sae.b_enc, sae.W_dec):
        if p.grad is not None:
            mesh.mean_replicas_(p.grad)
    if sae.b_pre.grad is None:
        sae.b_pre.grad = torch.zeros_like(sae.b_pre)
    dist.all_reduce(sae.b_pre.grad)
    sae.b_pre.grad.div_(mesh.data)


def firing_counts(latents: Latents, start: int, n_local: int, threshold: float) -> torch.Tensor:
    """This shard's latents' firing counts [n_local] over a global code (other shards' slots count nowhere)."""
    local, mine = owned(latents.indices, start, n_local)
    fired = ((latents.values > threshold) & mine).to(torch.float32)
    return torch.zeros(n_local, dtype=torch.float32, device=fired.device).index_add_(0, local.flatten(),
                                                                                    fired.flatten())


@torch.no_grad()
def sharded_reconstruct(sae, mesh: Mesh, n: int, x: torch.Tensor) -> torch.Tensor:
    """Inference x_hat over a shard: the global TopK(k) code (multitopk too: its inference is TopK(k)), each
    shard decoding its own latents, the partial sums reduced."""
    start = mesh.latents(n)[0]
    pre = sae.pre_acts(x)
    values, indices = pre.topk(min(sae.k, sae.n_latents), dim=-1, sorted=False)
    values, indices = global_topk(values, indices + start, sae.k, mesh)
    local, mine = owned(indices, start, sae.n_latents)
    code = torch.where(mine, torch.relu(values), torch.zeros((), dtype=values.dtype, device=values.device))
    return mesh.sum_shards(sae.decode_selection(code, Selection(local, sae.n_latents)).float()) + sae.b_pre


@dataclass(frozen=True)
class ShardedStep:
    """What training_step does differently on a shard of an SAE of n latents (sae.train.training_step)."""

    mesh: Mesh
    n: int

    def forward(self, sae, x: torch.Tensor, mse: Mse, dead: torch.Tensor, k_aux: int) -> TrainOutput:
        return sharded_forward_train(sae, self.mesh, self.n, x, mse, dead, k_aux)

    def auxk_loss(self, e_hat: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return sharded_auxk_loss(e_hat, e, self.mesh)

    def any_dead(self, dead: torch.Tensor) -> torch.Tensor:
        """Whether a latent of any shard is dead (a device flag: no host sync)."""
        return self.mesh.sum_shards_(dead.any().to(torch.float32).reshape(1), dist.ReduceOp.MAX)[0]

    def reduce_gradients(self, sae) -> None:
        reduce_gradients(sae, self.mesh)


def step_bytes(n: int, d: int, batch: int, data: int, latent: int, slots: int, act_bytes: int = 4,
               auxk_slots: int = 0) -> dict[str, int]:
    """Bytes one process hands to collectives in a TopK training step (their payload; a ring all-reduce sends about
    twice its payload, an all-gather S - 1 times it): `slots` selected latents per token (k; 4k for multitopk),
    `auxk_slots` AuxK's (0 while no latent is dead), `act_bytes` the pre-activations' dtype (2 under bf16)."""
    rows, n_local = batch // data, n // latent
    out = {"candidates_all_gather": 0, "decode_all_reduce": 0, "gradient_all_reduce": 0, "bookkeeping": 0}
    if latent > 1:
        out["candidates_all_gather"] = rows * (min(slots, n_local) + min(auxk_slots, n_local)) * (act_bytes + 8)
        out["decode_all_reduce"] = rows * (2 if auxk_slots else 1) * d * 4
        out["bookkeeping"] += 4 if auxk_slots else 0  # whether any latent is dead
    if data > 1:
        out["gradient_all_reduce"] = (2 * n_local * d + n_local) * 4
        out["bookkeeping"] += n_local * 4 + ((d + 1) * 4 if auxk_slots else 0)  # firing counts, AuxK's norm
    if data * latent > 1:
        out["gradient_all_reduce"] += d * 4  # b_pre, over every rank
    return out
