"""SAE families: each plugs an activation and a sparsity objective into the one SparseAutoencoder.

An `Arch` owns what differs between the paper's baselines (method §B): how pre-activations become a
code, extra parameters (gates, thresholds), extra loss terms, and whether decoder rows are held at unit
norm. Everything else (b_pre, init, Adam, EMA, checkpoints) is shared by the trainer.

For penalty-based families the `k` of the grid is a target L0: the trainer calibrates the `penalty` buffer
(lambda) towards it and then freezes it (see `sae.train.PenaltyController`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from saescale.sae.activations import (JumpReLUFunction, Latents, ProLUFunction, Selection, StepFunction, batch_topk,
                                      dead_topk, jump, topk)

if TYPE_CHECKING:
    from saescale.sae.model import SparseAutoencoder

Mse = Callable[[torch.Tensor], torch.Tensor]  # x_hat -> normalized MSE against the batch being trained on


class TrainOutput(NamedTuple):
    latents: Latents  # the code inference would produce (dead-latent bookkeeping and L0 use it)
    x_hat: torch.Tensor  # the reconstruction whose normalized MSE is the main loss
    pre_acts: torch.Tensor  # AuxK selects dead latents from these
    terms: dict[str, torch.Tensor]  # extra loss terms, already weighted
    # with a graph-free pre_acts: the pre-activations at chosen latents, with gradients (SelectedPreActs)
    take: Callable[..., torch.Tensor] | None = None
    aux_x_hat: torch.Tensor | None = None  # AuxK's reconstruction of the residual (forward_train_auxk)


def auxk_latents(pre_acts: torch.Tensor, dead: torch.Tensor, k_aux: int,
                 take: Callable[..., torch.Tensor] | None = None) -> Latents:
    """AuxK's code (Gao et al. 2024, App. A.2): the top-k_aux pre-activations among dead latents, then ReLU;
    slots beyond the number of dead latents hold zeros. With `take` (a graph-free pre_acts) the values get
    their gradients through the selected latents only; otherwise they are read from pre_acts' own graph."""
    values, indices = dead_topk(pre_acts, dead, k_aux)
    if take is not None:
        values = take(Selection(indices, pre_acts.shape[1]), values)
    else:
        values = pre_acts.gather(1, indices) * dead[indices]
    return Latents(torch.relu(values), indices)


class Arch(nn.Module):
    name: ClassVar[str]
    penalized: ClassVar[bool] = False  # k is a target L0 reached by calibrating `penalty`
    unit_norm_decoder: ClassVar[bool] = True  # method §A.6; decoder-norm-weighted penalties leave it free
    auxk: ClassVar[bool] = False  # AuxK revival of dead latents (method §A.5)
    rescale_encoder: ClassVar[bool] = False  # method §A.4 (4): TopK models only; baselines keep torch's init
    # the step's graph holds no [batch, n] tensor (selected latents only), so train.microbatch bounds memory
    sparse_backward: ClassVar[bool] = False
    calibration_rate: ClassVar[float] = 0.05  # default of train.calibration.rate (measured, see README)
    defaults: ClassVar[dict] = {}

    def __init__(self, n: int, d: int, k: int, params: dict | None = None):
        super().__init__()
        unknown = set(params or {}) - set(self.defaults)
        if unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)} for arch '{self.name}'; "
                             f"known: {sorted(self.defaults)}")
        self.n, self.d, self.k = n, d, k
        self.params = {**self.defaults, **(params or {})}
        if self.penalized:
            self.register_buffer("penalty", torch.tensor(float(self.params["penalty_init"])))

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers for this arch's own parameters (by attribute name)."""
        return {}

    def scores(self, sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
        """The pre-activations a test-time TopK(k') or JumpReLU(theta) replaces this arch's activation on
        (method §C.8)."""
        return sae.pre_acts(x)

    def activate(self, pre_acts: torch.Tensor) -> Latents:
        raise NotImplementedError

    def encode(self, sae: SparseAutoencoder, x: torch.Tensor) -> Latents:
        return self.activate(self.scores(sae, x))

    def forward_train(self, sae: SparseAutoencoder, x: torch.Tensor, mse: Mse, dead: torch.Tensor) -> TrainOutput:
        pre = sae.pre_acts(x)
        latents = self.activate(pre)
        return TrainOutput(latents, sae.decode(latents), pre, self.sparsity_terms(sae, latents))

    def forward_train_auxk(self, sae: SparseAutoencoder, x: torch.Tensor, mse: Mse, dead: torch.Tensor,
                           k_aux: int) -> TrainOutput:
        """forward_train plus AuxK's reconstruction of the main error from k_aux dead latents (Gao et al. 2024,
        App. A.2), in `aux_x_hat`."""
        out = self.forward_train(sae, x, mse, dead)
        return out._replace(aux_x_hat=sae.decode_residual(auxk_latents(out.pre_acts, dead, k_aux, out.take)))

    def sparsity_terms(self, sae: SparseAutoencoder, latents: Latents) -> dict[str, torch.Tensor]:
        return {}


class TopKArch(Arch):
    """method §A.3: z = ReLU(TopK(W_enc (x - b_pre) + b_enc)); L0 = k exactly (when k values are positive)."""

    name = "topk"
    auxk = True
    rescale_encoder = True
    sparse_backward = True

    def activate(self, pre_acts: torch.Tensor) -> Latents:
        return topk(pre_acts, self.k)

    def forward_train(self, sae: SparseAutoencoder, x: torch.Tensor, mse: Mse, dead: torch.Tensor) -> TrainOutput:
        return self._train_selected(sae, x, mse, dead, 0)

    def forward_train_auxk(self, sae: SparseAutoencoder, x: torch.Tensor, mse: Mse, dead: torch.Tensor,
                           k_aux: int) -> TrainOutput:
        return self._train_selected(sae, x, mse, dead, k_aux)

    def _select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """(values, indices, bag bounds) of the main selection."""
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return values, indices, ()

    def _train_selected(self, sae: SparseAutoencoder, x: torch.Tensor, mse: Mse, dead: torch.Tensor,
                        k_aux: int) -> TrainOutput:
        """Select on graph-free pre-activations; only the selected latents carry gradients (Gao et al. 2024).
        AuxK's k_aux slots join the main ones: one gather of encoder rows, one sort and one decoder pass serve
        both (Gao et al. 2024, App. A.2: AuxK reuses the encoder forward)."""
        pre, take = sae.selectable_pre_acts(x)
        values, indices, bounds = self._select(pre)
        main_slots = indices.shape[1]
        if k_aux:
            aux_values, aux_indices = dead_topk(pre, dead, k_aux, in_place=True)  # pre is not read again
            values, indices = torch.cat([values, aux_values], 1), torch.cat([indices, aux_indices], 1)
            bounds = (*bounds, main_slots)
        sel = Selection(indices, self.n, bounds)
        values = torch.relu(take(sel, values))
        decoded = sae.decode_selection(values, sel)  # [batch, d] or [batch, bags, d]
        if bounds:
            bags = decoded.unbind(1)
            residual, aux_x_hat = bags[:-1] if k_aux else bags, bags[-1] if k_aux else None
        else:
            residual, aux_x_hat = (decoded,), None
        latents = Latents(values[:, :self.k], indices[:, :self.k])
        return TrainOutput(latents, residual[0] + sae.b_pre, pre, self._terms(sae, residual, mse), take, aux_x_hat)

    def _terms(self, sae: SparseAutoencoder, residual: tuple[torch.Tensor, ...], mse: Mse
               ) -> dict[str, torch.Tensor]:
        return {}


class MultiTopKArch(TopKArch):
    """method §A.5: L(k) + L(4k)/8 from one top-4k selection, for a code that stays progressive at k' > k.
    Inference uses TopK(k). The first k and the other 3k slots decode as two bags of one pass."""

    name = "multitopk"
    defaults = {"multiple": 4, "coef": 0.125}

    def _select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        k_big = min(self.params["multiple"] * self.k, self.n)
        values, indices = pre.topk(k_big, dim=-1, sorted=True)
        return values, indices, (self.k,) if k_big > self.k else ()

    def _terms(self, sae: SparseAutoencoder, residual: tuple[torch.Tensor, ...], mse: Mse
               ) -> dict[str, torch.Tensor]:
        x_hat_big = sum(residual) + sae.b_pre
        return {"multitopk": self.params["coef"] * mse(x_hat_big)}


class BatchTopKArch(Arch):
    """method §B.6: top B*k activations over the batch in training; at inference one global threshold,
    the running mean of the smallest kept activation per batch."""

    name = "batchtopk"
    auxk = True
    rescale_encoder = True
    defaults = {"threshold_momentum": 0.01}

    def __init__(self, n: int, d: int, k: int, params: dict | None = None):
        super().__init__(n, d, k, params)
        self.register_buffer("threshold", torch.tensor(-1.0))  # -1: not estimated yet

    def activate(self, pre_acts: torch.Tensor) -> Latents:
        return jump(torch.relu(pre_acts), self.threshold.clamp_min(0))

    def forward_train(self, sae: SparseAutoencoder, x: torch.Tensor, mse: Mse, dead: torch.Tensor) -> TrainOutput:
        pre = sae.pre_acts(x)
        latents, kept_min = batch_topk(torch.relu(pre), self.k)
        with torch.no_grad():  # tensor ops only: a Python `if` on a device value would sync every step
            kept_min = kept_min.detach().float()
            updated = torch.where(self.threshold < 0, kept_min,
                                  self.threshold.lerp(kept_min, self.params["threshold_momentum"]))
            self.threshold.copy_(torch.where(torch.isfinite(kept_min), updated, self.threshold))
        return TrainOutput(latents, sae.decode(latents), pre, {})


class ReLUArch(Arch):
    """method §B.1: z = ReLU(W_enc (x - b_pre) + b_enc), L = MSE + lambda * ||z||_1 with unit-norm decoder
    rows (so the L1 equals the decoder-norm-weighted L1)."""

    name = "relu"
    penalized = True
    defaults = {"penalty_init": 0.01}

    def activate(self, pre_acts: torch.Tensor) -> Latents:
        return Latents(torch.relu(pre_acts))

    def sparsity_terms(self, sae: SparseAutoencoder, latents: Latents) -> dict[str, torch.Tensor]:
        return {"sparsity": self.penalty * latents.values.sum(dim=-1).mean()}


class ReLUDecoderNormArch(ReLUArch):
    """method §B.2 (Anthropic, April 2024): unconstrained decoder, L1 weighted by each row's norm."""

    name = "relu_dn"
    unit_norm_decoder = False

    def sparsity_terms(self, sae: SparseAutoencoder, latents: Latents) -> dict[str, torch.Tensor]:
        return {"sparsity": self.penalty * (latents.values * sae.W_dec.norm(dim=1)).sum(dim=-1).mean()}


class ProLUArch(ReLUArch):
    """method §B.3: m = W_enc (x - b_pre); z = m * 1[m > 0 and m + b_enc > 0] with the ProLU_STE bias
    gradient; L1 penalty."""

    name = "prolu"

    def scores(self, sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x - sae.b_pre, sae.W_enc)

    def encode(self, sae: SparseAutoencoder, x: torch.Tensor) -> Latents:
        return Latents(ProLUFunction.apply(self.scores(sae, x), sae.b_enc))

    def forward_train(self, sae: SparseAutoencoder, x: torch.Tensor, mse: Mse, dead: torch.Tensor) -> TrainOutput:
        m = self.scores(sae, x)
        latents = Latents(ProLUFunction.apply(m, sae.b_enc))
        return TrainOutput(latents, sae.decode(latents), m + sae.b_enc, self.sparsity_terms(sae, latents))


class GatedArch(Arch):
    """method §B.4 (Rajamanoharan et al. 2024a) with weight sharing: the gate path is W_enc, b_enc; the
    magnitude path is exp(r_mag) * W_enc (x - b_pre) + b_mag. L = MSE + lambda ||ReLU(pi_gate)||_1 + the
    gate path's reconstruction through a frozen copy of the decoder (it trains the gate, never the decoder)."""

    name = "gated"
    penalized = True
    defaults = {"penalty_init": 0.01}

    def __init__(self, n: int, d: int, k: int, params: dict | None = None):
        super().__init__(n, d, k, params)
        self.r_mag = nn.Parameter(torch.zeros(n))
        self.b_mag = nn.Parameter(torch.zeros(n))

    def _paths(self, sae: SparseAutoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = F.linear(x - sae.b_pre, sae.W_enc)
        return m + sae.b_enc, m * self.r_mag.exp() + self.b_mag

    def scores(self, sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
        return self._paths(sae, x)[1]

    def encode(self, sae: SparseAutoencoder, x: torch.Tensor) -> Latents:
        gate, mag = self._paths(sae, x)
        return Latents((gate > 0) * torch.relu(mag))

    def forward_train(self, sae: SparseAutoencoder, x: torch.Tensor, mse: Mse, dead: torch.Tensor) -> TrainOutput:
        gate, mag = self._paths(sae, x)
        latents = Latents((gate > 0) * torch.relu(mag))
        gate_code = torch.relu(gate)
        x_hat_frozen = gate_code @ sae.W_dec.detach() + sae.b_pre.detach()
        terms = {"sparsity": self.penalty * gate_code.sum(dim=-1).mean(), "gate_aux": mse(x_hat_frozen)}
        return TrainOutput(latents, sae.decode(latents), gate, terms)


class JumpReLUArch(Arch):
    """method §B.5 (Rajamanoharan et al. 2024b): f = pre * H(pre - theta), learned log-thresholds, an L0
    penalty, rectangle-kernel pseudo-derivatives of bandwidth eps; unit-norm decoder as in Gemma Scope.
    GDM's eps = theta_init = 0.001 are for inputs of unit mean squared norm, which ours are (method §A.2)."""

    name = "jumprelu"
    penalized = True
    calibration_rate = 0.02  # its L0 lags lambda (thresholds learn only from samples within eps): a slower
    # controller lands within 2% of the target where 0.05 overshoots by 27% (n=256, k=8 on the default data)
    defaults = {"penalty_init": 0.001, "bandwidth": 0.001, "theta_init": 0.05, "threshold_lr_scale": 10.0}

    def __init__(self, n: int, d: int, k: int, params: dict | None = None):
        super().__init__(n, d, k, params)
        self.log_threshold = nn.Parameter(torch.full((n,), math.log(self.params["theta_init"])))

    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def lr_scales(self) -> dict[str, float]:
        # Adam moves log(theta) by about lr per step, so at the 1/sqrt(n) rule's lr a threshold needs
        # thousands of steps to change by a factor e, and L0 lags the calibrated lambda; a larger step for
        # the thresholds alone lets the L0 penalty act within a short run.
        return {"log_threshold": self.params["threshold_lr_scale"]}

    def activate(self, pre_acts: torch.Tensor) -> Latents:
        return jump(pre_acts, self.threshold())

    def forward_train(self, sae: SparseAutoencoder, x: torch.Tensor, mse: Mse, dead: torch.Tensor) -> TrainOutput:
        pre = sae.pre_acts(x)
        theta, eps = self.threshold(), self.params["bandwidth"]
        latents = Latents(JumpReLUFunction.apply(pre, theta, eps, False))
        l0 = StepFunction.apply(pre, theta, eps).sum(dim=-1).mean()
        return TrainOutput(latents, sae.decode(latents), pre, {"sparsity": self.penalty * l0})


class JumpReLUTanhArch(JumpReLUArch):
    """method §B.5, Anthropic's January 2025 variant: unconstrained decoder, the STE passes gradient to the
    input too, a tanh sparsity penalty sum_i tanh(c |f_i| ||d_i||), and a pre-activation term
    lambda_P sum_i ReLU(theta_i - pre_i) ||d_i|| on dead latents (as SAELens) that pulls them back. Constants
    are for our unit-norm inputs: Anthropic's c = 4 and bandwidth 2 are for E||x||^2 = d, i.e. activations
    sqrt(d) times ours, so c and eps scale by sqrt(d) (c_ours = c sqrt(d), eps_ours = eps / sqrt(d))."""

    name = "jumprelu_tanh"
    unit_norm_decoder = False
    calibration_rate = 0.05  # the input gradient and the tanh penalty make its L0 respond quickly
    defaults = {"penalty_init": 0.001, "tanh_scale": 4.0, "bandwidth": 2.0, "preact_coef": 3e-6, "theta_init": 0.05,
                "threshold_lr_scale": 10.0}

    def forward_train(self, sae: SparseAutoencoder, x: torch.Tensor, mse: Mse, dead: torch.Tensor) -> TrainOutput:
        pre = sae.pre_acts(x)
        theta, root_d = self.threshold(), math.sqrt(self.d)
        latents = Latents(JumpReLUFunction.apply(pre, theta, self.params["bandwidth"] / root_d, True))
        norms = sae.W_dec.norm(dim=1)
        c = self.params["tanh_scale"] * root_d
        sparsity = torch.tanh(c * latents.values.abs() * norms).sum(dim=-1).mean()
        preact = (torch.relu(theta - pre) * norms * dead).sum(dim=-1).mean()
        terms = {"sparsity": self.penalty * sparsity, "preact": self.params["preact_coef"] * preact}
        return TrainOutput(latents, sae.decode(latents), pre, terms)


ARCHS: dict[str, type[Arch]] = {cls.name: cls for cls in (TopKArch, MultiTopKArch, BatchTopKArch, ReLUArch,
                                                          ReLUDecoderNormArch, ProLUArch, GatedArch, JumpReLUArch,
                                                          JumpReLUTanhArch)}
