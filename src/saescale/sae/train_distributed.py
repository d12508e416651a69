"""The Trainer of one SAE spread over D x S processes (sae/distributed.py): what differs from a single device is
initialization (the same draws, each shard keeping its rows), the step, the dead-latent bookkeeping and log values
(reduced over shards and replicas), the checkpoint (a file per shard under one manifest) and the end, where the
shards are consolidated into one ordinary SAE on rank 0.

Every rank runs the same loop on the same global batches, so every collective is entered by every rank in the same
order; host-side decisions (checkpoint now?) are rank 0's, broadcast at log steps.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from saescale.files import replace_when_done, write_json_atomic
from saescale.sae.activations import Latents
from saescale.sae.distributed import Mesh, ShardedStep, firing_counts, selection_slots, sharded_reconstruct
from saescale.sae.losses import normalized_mse
from saescale.sae.model import ENCODER_RESCALE_SAMPLES, SparseAutoencoder
from saescale.sae.train import FIRING_THRESHOLD, Trainer, training_step

log = logging.getLogger("saescale.train")

SHARDED_PARAMS = ("W_enc", "b_enc", "W_dec")


def draw_shard_rows(draw: Callable[[int], torch.Tensor], n: int, mesh: Mesh) -> torch.Tensor:
    """This shard's rows of an [n, d] random draw, drawn shard-block by shard-block from the same generator so
    the numbers equal one [n, d] draw (torch's CPU uniform_ and normal_ fill in order; normal_ in groups of 16,
    so n/S * d must be a multiple of 16 for randn: tested), holding one block at a time."""
    start, stop = mesh.latents(n)
    mine = None
    for block in range(mesh.latent):
        rows = draw(stop - start)
        if block == mesh.shard:
            mine = rows
    return mine


class ShardedTrainer(Trainer):
    """Trainer over this process's shard of the SAE; `mesh` from sae.distributed.mesh_from_env."""

    def __init__(self, mesh: Mesh, b_pre, baseline_mse: float, spec, checkpoint_path: str | Path, *args, **kwargs):
        selection_slots(spec.arch, spec.k, spec.n, spec.arch_params)  # refuses a non-TopK arch by name
        self.mesh = mesh
        self.start, self.stop = mesh.latents(spec.n)
        mesh.rows(spec.batch_size)  # refuses a batch the replicas cannot split evenly
        self.shard_step = ShardedStep(mesh, spec.n)
        super().__init__(b_pre, baseline_mse, spec, checkpoint_path, *args, **kwargs)

    # ---- initialization: the single device's draws, this shard's rows ----------------------------------
    def _new_sae(self, b_pre: torch.Tensor) -> SparseAutoencoder:
        spec, mesh = self.spec, self.mesh
        d, n = spec.d_model, spec.n
        sae = SparseAutoencoder(d, self.stop - self.start, spec.arch, spec.k, spec.arch_params)
        torch.manual_seed(spec.seed)  # as SparseAutoencoder(d, n) draws W_enc, with nn.Linear's init
        w_enc = draw_shard_rows(lambda rows: nn.init.kaiming_uniform_(torch.empty(rows, d), a=5**0.5), n, mesh)
        gen = torch.Generator(device="cpu").manual_seed(spec.seed)
        with torch.no_grad():
            sae.W_enc.copy_(w_enc)
            sae.b_pre.copy_(b_pre)
            sae.W_dec.copy_(w_enc if spec.tied_init else
                            draw_shard_rows(lambda rows: torch.randn(rows, d, generator=gen), n, mesh))
            sae.normalize_decoder_()
            sae.to(self.device)
            if sae.family.rescale_encoder:  # method §A.4 (4), with the global TopK of the unit inputs
                u = torch.randn(ENCODER_RESCALE_SAMPLES, d, generator=gen)
                u = (u / u.norm(dim=1, keepdim=True)).to(self.device)
                x_hat = sharded_reconstruct(sae, mesh, n, u + sae.b_pre)
                sae.W_enc.div_((x_hat - sae.b_pre).norm(dim=1).mean().clamp_min(1e-12))
        return sae

    # ---- the step and its bookkeeping ----------------------------------------------------------------
    def _step(self, x: torch.Tensor, dead: torch.Tensor, auxk: bool) -> tuple[dict, Latents]:
        x = x[self.mesh.rows(len(x))]
        return training_step(self.sae, self.opt, x, self.baseline_mse, dead, self.spec, self.autocast, auxk=auxk,
                             k_aux=self.aux_slots, shard=self.shard_step)

    def _update_dead(self, latents: Latents) -> None:
        counts = self.mesh.sum_replicas_(firing_counts(latents, self.start, self.sae.n_latents, FIRING_THRESHOLD))
        self.tokens_since_fired.add_(self.spec.batch_size).masked_fill_(counts > 0, 0)

    def _all_shards(self, value: torch.Tensor, how: str) -> int:
        op = dist.ReduceOp.MAX if how == "max" else dist.ReduceOp.SUM
        return int(self.mesh.sum_shards_(value.reshape(1).clone(), op)[0])

    def _checkpoint_due(self, logged: bool) -> bool:
        """At log steps only, on rank 0's clock: every rank must enter the checkpoint's barriers together."""
        return logged and self.mesh.agree(super()._checkpoint_due(logged))

    def _fvu(self, sae: SparseAutoencoder, x: torch.Tensor, batch: int = 4096) -> float:
        total = sum(float(normalized_mse(sharded_reconstruct(sae, self.mesh, self.spec.n, xb), xb, self.baseline_mse))
                    * len(xb) for xb in x.split(batch))
        return total / len(x)

    def _log_values(self, metrics: dict, latents: Latents) -> dict[str, float]:
        keys = list(metrics)
        values = torch.stack([metrics[k].float() for k in keys] + [latents.l0().float().mean()])
        values = self.mesh.mean_replicas_(values).tolist()
        dead = self._all_shards((self.tokens_since_fired >= self.spec.dead_tokens).sum(), "sum")
        return {**dict(zip(keys, values[:-1])), "l0": values[-1], "dead_fraction": dead / self.spec.n}

    # ---- checkpoints: a file per shard, one manifest --------------------------------------------------
    @property
    def _manifest(self) -> Path:
        return self.checkpoint_path.with_suffix(".json")

    def _shard_file(self, step: int) -> Path:
        mesh = self.mesh
        return self.checkpoint_path.with_name(f"{self.checkpoint_path.stem}.shard{mesh.shard}of{mesh.latent}"
                                              f".step{step}.pt")

    def save_checkpoint(self) -> None:
        """Replica 0's ranks write their shards, then rank 0 the manifest naming the step: a run killed in
        between resumes from the previous manifest's files, which are deleted only after the new one is written."""
        mesh, step = self.mesh, self.step
        if mesh.replica == 0:
            with replace_when_done(self._shard_file(step)) as tmp:
                torch.save(self._checkpoint_state(), tmp)
        mesh.barrier()
        previous = self._manifest_step()
        mesh.barrier()  # every rank has read the old manifest before rank 0 replaces it
        if mesh.rank == 0:
            write_json_atomic(self._manifest, {"fingerprint": self.spec.fingerprint(), "step": step,
                                               "layout": {"data": mesh.data, "latent": mesh.latent}})
        mesh.barrier()
        if mesh.replica == 0 and previous is not None and previous != step:
            self._shard_file(previous).unlink(missing_ok=True)
        log.info("checkpoint at step %d -> %s (%d shards)", step, self._manifest, mesh.latent)

    def _manifest_step(self) -> int | None:
        if not self._manifest.exists():
            return None
        manifest = json.loads(self._manifest.read_text())
        layout = manifest.get("layout", {})
        if manifest.get("fingerprint") != self.spec.fingerprint() or layout != {"data": self.mesh.data,
                                                                               "latent": self.mesh.latent}:
            return None
        return manifest["step"]

    def _resume(self) -> None:
        step = self._manifest_step()
        if step is None:
            if self._manifest.exists():
                log.info("ignoring checkpoint of a different configuration or layout: %s", self._manifest)
            return
        ck = torch.load(self._shard_file(step), map_location=self.device, weights_only=True)
        self._load_checkpoint_state(ck)
        log.info("resumed from %s at step %d/%d", self._manifest, self.step, self.steps)

    def remove_checkpoint(self) -> None:
        """The job's outputs are written: its shard files go, and any a run of another layout or configuration
        left in this folder (they could never be resumed by this one), then the manifest."""
        self.mesh.barrier()
        if self.mesh.rank == 0:
            for stale in self.checkpoint_path.parent.glob(f"{self.checkpoint_path.stem}.shard*of*.step*.pt"):
                stale.unlink(missing_ok=True)
            self._manifest.unlink(missing_ok=True)

    # ---- the end: one SAE on rank 0 -------------------------------------------------------------------
    def finish(self) -> tuple[SparseAutoencoder | None, list[dict], dict]:
        """Trainer.finish over the shards (EMA or raw chosen on the global reconstruction), then the chosen
        shards gathered into one SparseAutoencoder on rank 0's host (None on the other ranks)."""
        sae, rows, summary = super().finish()
        summary["distributed"] = {"data": self.mesh.data, "latent": self.mesh.latent}
        return consolidate(sae, self.mesh, self.spec.n), rows, summary


def consolidate(sae: SparseAutoencoder, mesh: Mesh, n: int) -> SparseAutoencoder | None:
    """The whole SAE on rank 0 (CPU), from replica 0's shards, one shard's tensors in flight at a time (a GPU
    rank 0 never holds more than its own shard plus one other)."""
    if mesh.replica != 0:
        return None
    state = sae.state_dict()
    full = {name: t.detach().cpu() for name, t in state.items() if name not in SHARDED_PARAMS}
    for name in SHARDED_PARAMS:
        t = state[name].detach().contiguous()
        if mesh.rank == 0:
            parts = [t.cpu()]
            for shard in range(1, mesh.latent):
                buf = torch.empty_like(t)
                dist.recv(buf, src=shard)
                parts.append(buf.cpu())
            full[name] = torch.cat(parts)
        else:
            dist.send(t, dst=0)
    if mesh.rank != 0:
        return None
    whole = SparseAutoencoder(sae.d_model, n, sae.arch, sae.k, sae.family.params)
    whole.load_state_dict(full)
    return whole

