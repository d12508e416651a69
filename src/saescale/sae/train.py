"""The training loop (method §A.3-A.7), in plain sight: batch -> loss (+ the arch's terms, + AuxK) ->
backward -> project the decoder gradient -> Adam -> renormalize decoder rows -> calibrate the penalty ->
EMA -> dead-latent bookkeeping -> log/checkpoint. Every arch (sae/archs.py) shares it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from saescale.files import replace_when_done
from saescale.normalize import normalize
from saescale.sae.activations import Latents
from saescale.sae.archs import ARCHS, auxk_latents  # noqa: F401  (auxk_latents re-exported)
from saescale.sae.distributed import ShardedStep
from saescale.sae.losses import auxk_loss, normalized_mse
from saescale.sae.model import SparseAutoencoder
from saescale.scaling.convergence import converged_at

log = logging.getLogger("saescale.train")

FIRING_THRESHOLD = 1e-3  # method §A.5: a latent "fires" when selected with value > 1e-3
SELECTION_ROWS = 32768  # training rows used to choose EMA vs raw weights at the end (method §A.7)

LOG_COLUMNS = ["step", "tokens", "loss", "fvu", "heldout_fvu", "auxk_loss", "arch_loss", "penalty", "l0",
               "dead_fraction", "lr", "elapsed_s", "flops", "heldout_fvu_ema"]


@dataclass(frozen=True)
class TrainSpec:
    arch: str
    n: int
    k: int
    d_model: int
    lr: float
    batch_size: int
    tokens: int
    adam_eps: float
    adam_betas: tuple[float, float]
    auxk_coef: float
    k_aux: int
    dead_tokens: int
    ema_decay: float
    log_every: int
    checkpoint_seconds: float
    seed: int
    device: str
    data: str = ""  # digest of the activations and statistics trained on: a checkpoint never crosses datasets
    code: str = ""  # version of the training code (provenance.code_version): nor versions of the code
    auxk: bool = True  # the A.8 ablation switches AuxK off ...
    tied_init: bool = True  # ... and the tied encoder/decoder init
    arch_params: dict = field(default_factory=dict)  # constants of the arch (sae/archs.py defaults)
    calibrate_fraction: float = 0.9  # penalty archs: share of steps lambda is calibrated before it is frozen
    calibrate_rate: float | None = None  # step of log(lambda) per unit of log(L0 / k); None: the arch's own
    # convergence mode (method §D.1): stop once the held-out FVU improved by less than this fraction over the
    # last doubling of tokens; `tokens` is then a cap. 0: train the whole budget.
    convergence_tolerance: float = 0.0
    convergence_smoothing: float = 0.0  # EMA decay over log points of the held-out FVU the rule reads
    # bf16 autocast of the forward (weights, Adam state and losses stay float32); auto: on CUDA only. float32
    # matmuls use TF32 on CUDA unless float32-strict
    precision: str = "auto"
    # rows per block of the encoder and selection (None: the whole batch); it bounds the step's memory and
    # changes results only by float summation order, so a checkpoint resumes across it
    microbatch: int | None = None
    # a non-finite loss stops the run and is recorded (the lr sweep probes which lrs diverge) instead of failing
    # the job; a grid SAE that diverges is an error the user must fix (train.lr)
    stop_on_divergence: bool = False
    # (data, latent) processes of train.distributed (sae/distributed.py); (1, 1): one device
    distributed: tuple[int, int] = (1, 1)

    def fingerprint(self) -> str:
        skip = ("log_every", "checkpoint_seconds", "microbatch")
        keep = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


class Ema:
    """EMA of parameters with Adam-style bias correction (method §A.7, openai EmaModel)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.t = decay, 0
        self.shadow = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.t += 1
        for k, v in model.state_dict().items():
            self.shadow[k].lerp_(v, 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        correction = 1 - self.decay ** max(self.t, 1)
        return {k: v / correction for k, v in self.shadow.items()}


def training_step(sae: SparseAutoencoder, opt: torch.optim.Optimizer, x: torch.Tensor, baseline_mse: float,
                  dead: torch.Tensor, spec: TrainSpec, autocast: contextlib.AbstractContextManager,
                  auxk: bool = True, k_aux: int | None = None, shard: ShardedStep | None = None
                  ) -> tuple[dict, Latents]:
    """One optimizer step on the batch x, without a host sync (nothing reads a device value, and every shape
    is fixed by the spec). `auxk` False: the caller knows that no latent is dead (AuxK would add nothing) and
    the AuxK pass is skipped; otherwise it runs over `dead` whatever it holds, and its loss counts only when some
    latent is dead. `k_aux`: AuxK's slots, at least the number of latents `dead` can hold (Trainer's
    aux_slots); spec.k_aux when None.

    With `spec.microbatch`, the encoder and the selection run over row blocks, so the [rows, n]
    pre-activations exist for one block at a time (TopK family: their graph holds selected latents only);
    the losses, the AuxK normalization and the returned code are over the whole batch, as without it.

    `shard`: `sae` is one shard of a larger SAE and `x` its replica's rows (sae/distributed.py): the shard's
    forward, the global AuxK normalization and dead flag, and the gradient reduction replace the local ones."""
    family = sae.family
    use_auxk = auxk and family.auxk and spec.auxk and spec.auxk_coef > 0
    rows = len(x)
    blocks = x.split(spec.microbatch) if spec.microbatch and spec.microbatch < rows else (x,)
    outs = []
    with autocast:
        for xb in blocks:
            def mse(x_hat, xb=xb):
                return normalized_mse(x_hat, xb, baseline_mse)
            k = spec.k_aux if k_aux is None else k_aux
            if shard is not None:
                out = shard.forward(sae, xb, mse, dead, k if use_auxk else 0)
            else:
                out = (family.forward_train_auxk(sae, xb, mse, dead, k) if use_auxk
                       else family.forward_train(sae, xb, mse, dead))
            outs.append(out._replace(pre_acts=None, take=None))  # a block's [rows, n] pre-activations go now
            del out
        weights = [1.0] if len(outs) == 1 else [len(xb) / rows for xb in blocks]  # per-row means -> batch means
        x_hat = _cat([out.x_hat for out in outs])
        main = normalized_mse(x_hat, x, baseline_mse)
        arch_loss = sum((w * term for w, out in zip(weights, outs) for term in out.terms.values()),
                        torch.zeros((), device=x.device))
        aux = torch.zeros((), device=x.device)
        if use_auxk:
            # the target is the main model's error with its graph cut: only dead latents learn from it; its
            # normalization is the whole batch's (App. A.2), and it counts only once some latent is dead
            e_hat, e = _cat([out.aux_x_hat for out in outs]), x - x_hat.detach()
            aux = (auxk_loss(e_hat, e) * dead.any() if shard is None
                   else shard.auxk_loss(e_hat, e) * shard.any_dead(dead))
        loss = main + arch_loss + spec.auxk_coef * aux
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if shard is not None:
        shard.reduce_gradients(sae)
    if family.unit_norm_decoder:
        sae.project_decoder_grad_()
    opt.step()
    if family.unit_norm_decoder:
        sae.normalize_decoder_()
    sae.drop_decoder_rows()  # a bf16 step gathers from a copy of W_dec: the next step makes it afresh
    latents = outs[0].latents if len(outs) == 1 else Latents(
        _cat([o.latents.values for o in outs]),
        None if outs[0].latents.indices is None else _cat([o.latents.indices for o in outs]))
    # tensors, not floats: reading a value forces a GPU sync, so the loop does it only when it logs
    return {"loss": loss.detach(), "fvu": main.detach(), "auxk_loss": aux.detach(),
            "arch_loss": arch_loss.detach()}, latents


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def adam(params, lr: float, **kwargs) -> torch.optim.Adam:
    """Adam with the fused kernel where this torch has one (CUDA; CPU from torch 2.4): one pass over each
    parameter instead of a dozen elementwise ops, 6x faster on CPU for n = 32768, d = 768 (34 vs 197 ms a
    step, 2 threads), the same update to float rounding."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, **kwargs)


def retain_freed_memory() -> None:
    """Keep freed memory in the process heap (glibc): by default every block over 32 MB is mmap-ed and given
    back on free, so a CPU training step page-faults its [batch, n] pre-activations and [n, d] gradients in
    afresh each time (a 512 MB fresh product costs 170 ms more than one into reused memory at batch 4096, n =
    32768). The step then runs 10-20% faster; the price is that the process keeps its peak size. A no-op
    where glibc's mallopt is not there."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def param_groups(sae: SparseAutoencoder, lr: float) -> list[dict]:
    """One Adam group at `lr`, plus one per arch parameter with its own lr multiplier (JumpReLU thresholds)."""
    scales = sae.family.lr_scales()
    scaled = [{"params": [getattr(sae.family, name)], "lr": lr * scale} for name, scale in scales.items()]
    special = {id(g["params"][0]) for g in scaled}
    return [{"params": [p for p in sae.parameters() if id(p) not in special]}] + scaled


class PenaltyController:
    """Matched sparsity for penalty archs: the grid's k is a target L0. For the first `fraction` of the steps
    lambda is multiplied by exp(rate * log(L0_batch / k)) (an integral controller in log space; each step's
    change is bounded by exp(+-rate) so lambda cannot wind up while the code lags behind it), then frozen,
    so the rest of training (and the EMA weights evaluated) optimizes one fixed objective, as a lambda
    sweep would. Runs on the device: no host sync per step.

    Where it misses (issue 19, item 6): L0 answers lambda only after the weights move (tens of steps), and a
    gain too large for that lag makes lambda cycle around the target instead of settling; the freeze then
    keeps whatever phase the cycle is in. Measured at n = 32, target 2, 300 steps (relu_dn): lambda cycled
    over a factor of 7 and L0 between 0.3 and 7, frozen at 0.51x the target; at 600 steps it settled (0.95x).
    On the quick preset every penalty arch lands within 15% at targets 2..n/4 (README). Gain schedules that
    decay lambda's step were tried and rejected: they starve the slow archs (JumpReLU) of range. A miss is
    flagged in the report (comparison.L0_TOLERANCE), never compared at its target."""

    def __init__(self, sae: SparseAutoencoder, steps: int, fraction: float, rate: float | None):
        self.family = sae.family
        self.active = sae.family.penalized and fraction > 0
        self.freeze_step = int(math.ceil(steps * fraction))
        self.rate, self.log_k = rate or sae.family.calibration_rate, math.log(sae.k)

    @torch.no_grad()
    def update(self, step: int, latents: Latents) -> None:
        if not self.active or step >= self.freeze_step:
            return
        error = latents.l0().float().mean().clamp_min(0.1).log() - self.log_k
        self.family.penalty.mul_((self.rate * error.clamp(-1, 1)).exp())


def update_dead(tokens_since_fired: torch.Tensor, latents: Latents) -> None:
    """Count tokens since each latent last fired. Fixed-shape ops only: no boolean-mask indexing, which
    would force a GPU-to-host sync every step."""
    firings = latents.firing_counts(tokens_since_fired.shape[0], FIRING_THRESHOLD)
    tokens_since_fired.add_(latents.values.shape[0]).masked_fill_(firings > 0, 0)


class Trainer:
    """One SAE's training state, advanced a batch at a time, so that one loop can feed a single SAE
    (`train_sae`) or several on one shared batch stream (`train_together`, the train.pack option).

    Resumes from `checkpoint_path` when it holds a run of the same spec; `selection_rows` are normalized
    training rows; `heldout_rows` (normalized rows of the eval split) give the held-out FVU at every log step,
    which convergence mode stops on.
    """

    def __init__(self, b_pre: np.ndarray, baseline_mse: float, spec: TrainSpec, checkpoint_path: str | Path,
                 selection_rows: np.ndarray, heldout_rows: np.ndarray | None = None, name: str = ""):
        if spec.convergence_tolerance > 0 and heldout_rows is None:
            raise ValueError("convergence mode needs held-out rows (train.heldout_rows > 0)")
        if spec.microbatch and not ARCHS[spec.arch].sparse_backward:
            raise ValueError(f"train.microbatch: {spec.microbatch} needs an arch whose backward is sparse (topk, "
                             f"multitopk); {spec.arch}'s step keeps every block's [rows, n] graph, so set it to null")
        self.spec, self.baseline_mse, self.name = spec, baseline_mse, name
        self.device = device = torch.device(spec.device)
        self.sae = sae = self._new_sae(torch.as_tensor(b_pre, dtype=torch.float32)).to(device)
        self.opt = adam(param_groups(sae, spec.lr), spec.lr, betas=tuple(spec.adam_betas), eps=spec.adam_eps)
        if device.type == "cpu":
            retain_freed_memory()
        self.ema = Ema(sae, spec.ema_decay) if spec.ema_decay > 0 else None
        self.tokens_since_fired = torch.zeros(sae.n_latents, dtype=torch.long, device=device)
        self.rows: list[dict] = []
        self.step, self.elapsed_before = 0, 0.0
        self.steps = max(1, spec.tokens // spec.batch_size)
        self.controller = PenaltyController(sae, self.steps, spec.calibrate_fraction, spec.calibrate_rate)
        self.checkpoint_path = Path(checkpoint_path)
        self.aux_slots: int | None = None  # restored by _resume, else set by _bound_dead
        self._resume()
        use_bf16 = spec.precision == "bf16" or (spec.precision == "auto" and device.type == "cuda")
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16
                         else contextlib.nullcontext())
        strict = spec.precision == "float32-strict"
        self.dtype = "bf16-autocast" if use_bf16 else "float32-strict" if strict else "float32"
        if device.type == "cuda":  # TF32 for the float32 matmuls left (held-out FVU, a float32 run)
            torch.backends.cuda.matmul.allow_tf32 = not strict
        self.selection_rows = selection_rows
        self.heldout = torch.from_numpy(heldout_rows).to(device) if heldout_rows is not None else None
        self.converged = _converged(self.rows, spec)
        # a resumed run that had diverged stays stopped where it diverged
        self.diverged = next((r["step"] for r in self.rows if not np.isfinite(r["loss"])), None)
        self._bound_dead(keep_slots=self.aux_slots is not None)
        self.start_clock()

    def _new_sae(self, b_pre: torch.Tensor) -> SparseAutoencoder:
        """The initialized SAE (method §A.4), from the spec's seed: torch's global generator draws W_enc, a
        generator of its own the rest."""
        spec = self.spec
        torch.manual_seed(spec.seed)
        gen = torch.Generator(device="cpu").manual_seed(spec.seed)
        sae = SparseAutoencoder(spec.d_model, spec.n, spec.arch, spec.k, spec.arch_params)
        sae.init_from_data_(b_pre, generator=gen, tied=spec.tied_init)
        return sae

    def _bound_dead(self, keep_slots: bool = False) -> None:
        """Read the dead-latent counters (a host sync: only at construction and log steps) and bound what AuxK
        can meet before the next read, log_every steps on at most: a counter grows by at most a batch per step.
        `dead_possible_at`: the first step at which a latent can be dead; before it, steps skip AuxK.
        `aux_slots`: how many latents can be dead until then, capped at k_aux. AuxK selects only that many (its
        top-k over the dead is fixed-shape: without the bound every step would gather all k_aux slots, most of
        them empty while few latents are dead). The same latents are selected either way, so the bound changes
        cost, not the result. A resumed run keeps the bound its checkpoint was written under (`keep_slots`), so
        it steps exactly as the uninterrupted run did."""
        spec = self.spec
        oldest = self._all_shards(self.tokens_since_fired.max(), "max")
        self.dead_possible_at = self.step + max(0, -(-(spec.dead_tokens - oldest) // spec.batch_size))
        if not keep_slots:
            horizon = spec.log_every * spec.batch_size
            could_be_dead = self._all_shards((self.tokens_since_fired >= spec.dead_tokens - horizon).sum(), "sum")
            self.aux_slots = min(spec.k_aux, could_be_dead)

    def _all_shards(self, value: torch.Tensor, how: str) -> int:
        """A count over this SAE's latents, read to the host (a sharded run reduces it over its shards)."""
        return int(value)

    def _resume(self) -> None:
        if not self.checkpoint_path.exists():
            return
        # plain tensors and numbers: never unpickle code, even from our own checkpoint path
        ck = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        if ck.get("fingerprint") != self.spec.fingerprint():
            log.info("ignoring checkpoint of a different configuration: %s", self.checkpoint_path)
            return
        self._load_checkpoint_state(ck)
        log.info("%sresumed from %s at step %d/%d", self._tag, self.checkpoint_path, self.step, self.steps)

    def _load_checkpoint_state(self, ck: dict) -> None:
        self.sae.load_state_dict(ck["sae"])
        self.opt.load_state_dict(ck["opt"])
        if self.ema is not None:
            self.ema.shadow, self.ema.t = ck["ema_shadow"], ck["ema_t"]
        self.tokens_since_fired = ck["tokens_since_fired"]
        if ck.get("log_every") == self.spec.log_every:  # the bound holds until the next log step it planned for
            self.aux_slots = ck.get("aux_slots")
        self.rows, self.step, self.elapsed_before = ck["rows"], ck["step"], ck["elapsed_s"]

    @property
    def _tag(self) -> str:
        return f"{self.name}: " if self.name else ""

    @property
    def done(self) -> bool:
        return self.step >= self.steps or self.converged is not None or self.diverged is not None

    def start_clock(self) -> None:
        self.t_start = self.last_ck = time.time()

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t_start

    def train_step(self, x: torch.Tensor) -> None:
        """One optimizer step on a normalized batch x, then the bookkeeping: penalty, EMA, dead latents,
        the log row and the timed checkpoint."""
        spec, sae = self.spec, self.sae
        dead = self.tokens_since_fired >= spec.dead_tokens
        metrics, latents = self._step(x, dead, auxk=self.step >= self.dead_possible_at and self.aux_slots > 0)
        self.controller.update(self.step, latents)
        if self.ema is not None and self.controller.active and self.step + 1 == self.controller.freeze_step:
            self.ema = Ema(sae, spec.ema_decay)  # the evaluated average covers only the fixed-lambda phase
        if self.ema is not None:
            self.ema.update(sae)
        self._update_dead(latents)
        self.step += 1
        step = self.step
        logged = step % spec.log_every == 0 or step == self.steps
        if logged:
            self._log_row(metrics, latents)
        if self._checkpoint_due(logged):
            self.save_checkpoint()
            self.last_ck = time.time()

    def _step(self, x: torch.Tensor, dead: torch.Tensor, auxk: bool) -> tuple[dict, Latents]:
        return training_step(self.sae, self.opt, x, self.baseline_mse, dead, self.spec, self.autocast, auxk=auxk,
                             k_aux=self.aux_slots)

    def _update_dead(self, latents: Latents) -> None:
        update_dead(self.tokens_since_fired, latents)

    def _checkpoint_due(self, logged: bool) -> bool:
        seconds = self.spec.checkpoint_seconds
        return bool(seconds) and time.time() - self.last_ck >= seconds and not self.done

    def _fvu(self, sae: SparseAutoencoder, x: torch.Tensor) -> float:
        return _fvu_in_batches(sae, x, self.baseline_mse)

    def _log_values(self, metrics: dict, latents: Latents) -> dict[str, float]:
        """The step's losses, L0 and dead fraction as floats (the host sync of a log step)."""
        dead = (self.tokens_since_fired >= self.spec.dead_tokens).float().mean()
        return {**{key: float(v) for key, v in metrics.items()}, "l0": float(latents.l0().float().mean()),
                "dead_fraction": float(dead)}

    def _log_row(self, metrics: dict, latents: Latents) -> None:
        spec, sae, step = self.spec, self.sae, self.step
        tokens = step * spec.batch_size
        flops_per_token = 6 * spec.n * spec.d_model  # method §D.1: compute ~ 6 * tokens * n * d
        row = {"step": step, "tokens": tokens, **self._log_values(metrics, latents),
               "penalty": float(sae.family.penalty) if sae.family.penalized else float("nan"),
               "lr": spec.lr, "elapsed_s": self.elapsed(), "flops": float(flops_per_token) * tokens,
               "heldout_fvu": self._fvu(sae, self.heldout) if self.heldout is not None else math.nan,
               "heldout_fvu_ema": self._heldout_ema_fvu()}
        if not np.isfinite(row["loss"]):
            if not spec.stop_on_divergence:
                raise FloatingPointError(f"{self._tag}training diverged at step {step} (loss {row['loss']}); "
                                         "lower train.lr")
            self.rows.append(row)
            self.diverged = step
            log.warning("%sdiverged at step %d (loss %s): stopped, recorded as not converging", self._tag, step,
                        row["loss"])
            return
        self.rows.append(row)
        log.info("%sstep %d/%d  fvu %.4f  held-out %.4f  auxk %.3f  l0 %.1f  dead %.3f  %.0f tok/s", self._tag,
                 step, self.steps, row["fvu"], row["heldout_fvu"], row["auxk_loss"], row["l0"], row["dead_fraction"],
                 tokens / max(row["elapsed_s"], 1e-9))
        # a penalty arch stops only once lambda is frozen: before that it optimizes a moving objective
        if not self.controller.active or step >= self.controller.freeze_step:
            self.converged = _converged(self.rows, spec)
        self._bound_dead()

    def _heldout_ema_fvu(self) -> float:
        """Held-out FVU of the EMA weights (L(C) takes the min of EMA and raw, method §A.7); NaN without EMA or
        held-out rows. The EMA copy is kept between log steps, not rebuilt."""
        if self.ema is None or self.heldout is None:
            return math.nan
        if getattr(self, "_ema_sae", None) is None:
            self._ema_sae = self.sae.like()
        self._ema_sae.load_state_dict(self.ema.state_dict())
        if self.sae.family.penalized:
            self._ema_sae.family.penalty.copy_(self.sae.family.penalty)
        return self._fvu(self._ema_sae, self.heldout)

    def _checkpoint_state(self) -> dict:
        ema = self.ema
        return {"fingerprint": self.spec.fingerprint(), "sae": self.sae.state_dict(),
                "opt": self.opt.state_dict(), "ema_shadow": ema.shadow if ema else None,
                "ema_t": ema.t if ema else 0, "tokens_since_fired": self.tokens_since_fired,
                "rows": self.rows, "step": self.step, "elapsed_s": self.elapsed(),
                "aux_slots": self.aux_slots, "log_every": self.spec.log_every}

    def save_checkpoint(self) -> None:
        with replace_when_done(self.checkpoint_path) as tmp:
            torch.save(self._checkpoint_state(), tmp)
        log.info("%scheckpoint at step %d -> %s", self._tag, self.step, self.checkpoint_path)

    def remove_checkpoint(self) -> None:
        """The job's outputs are written: its checkpoint has served."""
        self.checkpoint_path.unlink(missing_ok=True)

    def finish(self) -> tuple[SparseAutoencoder, list[dict], dict]:
        """The SAE with the weights chosen for evaluation, the log rows, and a summary for saescale_sae.json."""
        spec, sae, rows, step = self.spec, self.sae, self.rows, self.step
        elapsed = self.elapsed()
        sae_eval, chosen, sel = choose_weights(sae, self.ema, self.selection_rows, self.baseline_mse, self.device,
                                               self._fvu)
        if self.converged is not None:
            log.info("%sconverged at %d tokens (held-out FVU gained < %g over the last doubling)", self._tag,
                     self.converged, spec.convergence_tolerance)
        controller = self.controller
        summary = {"steps": step, "tokens": step * spec.batch_size, "train_seconds": elapsed,
                   "tokens_per_s": step * spec.batch_size / max(elapsed, 1e-9), "device": str(self.device),
                   "dtype": self.dtype, "max_tokens": self.steps * spec.batch_size,
                   "converged_at_tokens": self.converged,
                   "diverged_at_step": self.diverged,
                   "convergence_tolerance": spec.convergence_tolerance,
                   "final_heldout_fvu": rows[-1]["heldout_fvu"] if rows else None,
                   "weights": chosen, "selection_fvu": sel,
                   "final_dead_fraction": rows[-1]["dead_fraction"] if rows else None,
                   "final_train_l0": rows[-1]["l0"] if rows else None,
                   "penalty": float(sae_eval.family.penalty) if sae.family.penalized else None,
                   "penalty_frozen_at_step": controller.freeze_step if controller.active else None}
        return sae_eval, rows, summary


def train_together(batch_source, trainers: list[Trainer],
                   on_finished: Callable[[Trainer], None] = lambda trainer: None) -> None:
    """Train several SAEs on one stream: each batch is read and normalized once and stepped by every SAE
    at that step, so an SAE trains on exactly the batches it would see alone and its weights equal a lone
    run's. SAEs may sit at different steps (resumed from checkpoints, or finished early in convergence
    mode); the stream starts at the earliest. `on_finished` is called for each SAE as it completes.

    `batch_source.device_batches(start_step, device)` (saescale.loader) yields raw activations [batch, d] on the
    device in the store's dtype, each valid until the next is drawn; they are cast and normalized here, on the
    device (method §A.2), so float16 rows cross to a GPU at half the bytes and the copy overlaps the step.
    """
    pending = []
    for trainer in trainers:
        (on_finished(trainer) if trainer.done else pending.append(trainer))
    if not pending:
        return
    device = pending[0].device
    step = min(trainer.step for trainer in pending)
    for trainer in pending:
        trainer.start_clock()
    batches = batch_source.device_batches(step, device)
    while pending:
        x = normalize(next(batches).float())[0]
        for trainer in pending:
            if trainer.step == step:
                trainer.train_step(x)
        step += 1
        for trainer in [t for t in pending if t.done]:
            pending.remove(trainer)
            on_finished(trainer)


def train_sae(batch_source, b_pre: np.ndarray, baseline_mse: float,
              spec: TrainSpec, checkpoint_path: str | Path,
              selection_rows: np.ndarray, heldout_rows: np.ndarray | None = None
              ) -> tuple[SparseAutoencoder, list[dict], dict]:
    """Train one SAE (see Trainer and train_together); returns Trainer.finish()'s weights, log and summary."""
    trainer = Trainer(b_pre, baseline_mse, spec, checkpoint_path, selection_rows, heldout_rows)
    train_together(batch_source, [trainer])
    return trainer.finish()


def _converged(rows: list[dict], spec: TrainSpec) -> float | None:
    """Convergence mode's stopping point so far (None: keep training, or the mode is off)."""
    if spec.convergence_tolerance <= 0 or not rows:
        return None
    return converged_at([r["tokens"] for r in rows], [r["heldout_fvu"] for r in rows], spec.convergence_tolerance,
                        spec.convergence_smoothing)


@torch.no_grad()
def choose_weights(sae: SparseAutoencoder, ema: Ema | None, rows: np.ndarray, baseline_mse: float,
                   device: torch.device, fvu: Callable[[SparseAutoencoder, torch.Tensor], float] | None = None
                   ) -> tuple[SparseAutoencoder, str, dict]:
    """Evaluate with EMA weights unless the raw weights reconstruct better (early EMA lags; method §A.7).
    Decided on training rows, never on the eval split. `fvu(sae, rows)`: how to measure (a sharded SAE's own)."""
    x = torch.from_numpy(rows).to(device)
    fvu = fvu or (lambda model, rows: _fvu_in_batches(model, rows, baseline_mse))
    raw_fvu = fvu(sae, x)
    if ema is None:
        return sae, "raw", {"raw": raw_fvu}
    ema_sae = sae.like()
    ema_sae.load_state_dict(ema.state_dict())
    if sae.family.penalized:  # lambda is a training constant, not a weight to average: keep the frozen value
        ema_sae.family.penalty.copy_(sae.family.penalty)
    ema_fvu = fvu(ema_sae, x)
    sel = {"raw": raw_fvu, "ema": ema_fvu}
    return (ema_sae, "ema", sel) if ema_fvu <= raw_fvu else (sae, "raw", sel)


@torch.no_grad()
def _fvu_in_batches(sae: SparseAutoencoder, x: torch.Tensor, baseline_mse: float, batch: int = 4096) -> float:
    """Mean normalized MSE over x, a batch at a time: pre-activations of 32k rows x 131k latents would
    not fit in GPU memory at once."""
    total = sum(float(normalized_mse(sae(xb)[0], xb, baseline_mse)) * len(xb) for xb in x.split(batch))
    return total / len(x)
