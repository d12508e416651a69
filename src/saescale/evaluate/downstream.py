"""Downstream loss: splice the SAE reconstruction into the LM at all positions (method §C.3)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from saescale.evaluate.memory import row_blocks
from saescale.normalize import denormalize, normalize
from saescale.sae.model import SparseAutoencoder
from saescale.progress import Progress
from saescale.subject import splice_resid

log = logging.getLogger("saescale.evaluate")

Reconstruct = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_norm [B*S, d], tokens [B, S]) -> x_hat


def sae_replacement(reconstruct: Reconstruct, tokens: torch.Tensor):
    """resid -> reconstruction of the normalized resid, mapped back to raw space with each token's own
    (mu, scale) (method §A.2). The batch's tokens are passed on for reconstructions that read them
    (N2G-simulated codes, method §C.6)."""

    def replace(resid: torch.Tensor) -> torch.Tensor:
        shape = resid.shape
        x_norm, mu, scale = normalize(resid.reshape(-1, shape[-1]))
        return denormalize(reconstruct(x_norm, tokens), mu, scale).reshape(shape)

    return replace


def sae_reconstruction(sae: SparseAutoencoder) -> Reconstruct:
    """The SAE's own reconstruction, in row blocks of at most FORWARD_ELEMENTS pre-activations (memory.py), so
    a batch of windows never holds [batch * ctx_len, n] at once."""

    def reconstruct(x_norm: torch.Tensor, _tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([sae(xb)[0] for xb in row_blocks(x_norm, sae.n_latents)])

    return reconstruct


def zero_ablation(resid: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(resid)


def _ce(logprobs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over positions 0..ctx-2 (targets inside the window)."""
    return -logprobs[:, :-1].gather(-1, tokens[:, 1:, None]).sum()


def _kl(lp_clean: torch.Tensor, lp_patched: torch.Tensor) -> torch.Tensor:
    """Sum over positions 0..ctx-2 of KL(p_clean || p_patched)."""
    return (lp_clean.exp() * (lp_clean - lp_patched))[:, :-1].sum()


@torch.no_grad()
def downstream_metrics(model: nn.Module, layer: int, sae: SparseAutoencoder, windows: np.ndarray,
                       batch_size: int, device: torch.device,
                       reconstruct: Reconstruct | None = None) -> dict:
    """Delta CE and KL of the spliced model against the clean one, with the zero-ablation baseline.

    Positions t = 0..ctx-2 (those with a next-token target inside the window) all count. Each run's
    log-softmax over the vocabulary is computed once and shared by its CE and KL. The quantities SAEBench's
    `core` eval also reports carry its names (docs/metrics.md); `delta_ce` and `delta_ce_zero_ablation` are
    Gao et al.'s differences and keep ours.
    """
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl_spliced": 0.0, "kl_zero": 0.0}
    count = 0
    reconstruct = reconstruct or sae_reconstruction(sae)

    def logprobs(toks: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(model(input_ids=toks).logits.float(), dim=-1)

    progress = Progress(log, "downstream: clean, spliced and zero-ablated passes", len(windows), "windows")
    for i in range(0, len(windows), batch_size):
        toks = torch.from_numpy(windows[i:i + batch_size]).long().to(device)
        clean = logprobs(toks)
        with splice_resid(model, layer, sae_replacement(reconstruct, toks)):
            spliced = logprobs(toks)
        with splice_resid(model, layer, zero_ablation):
            zeroed = logprobs(toks)
        sums["clean"] += float(_ce(clean, toks))
        sums["spliced"] += float(_ce(spliced, toks))
        sums["zero"] += float(_ce(zeroed, toks))
        sums["kl_spliced"] += float(_kl(clean, spliced))
        sums["kl_zero"] += float(_kl(clean, zeroed))
        count += toks.shape[0] * (toks.shape[1] - 1)
        progress.update(toks.shape[0])
    m = {key: value / count for key, value in sums.items()}
    return {"windows": len(windows), "tokens": count,
            **downstream_summary(m["clean"], m["spliced"], m["zero"], m["kl_spliced"], m["kl_zero"])}


def downstream_summary(ce_clean: float, ce_spliced: float, ce_zero: float, kl_spliced: float,
                       kl_zero: float) -> dict:
    """The downstream record from the five per-token means (nats/token), under SAEBench's `core` names where
    the quantity is the same (method §C.3; docs/metrics.md). Both scores are SAEBench's ratios of means:
    ce_loss_score = (CE_zero − CE_spliced) / (CE_zero − CE_clean) = 1 − ΔCE / ΔCE_zero, the "fraction of
    loss recovered" (reported, though Gao et al. §4.1 argue against it as a headline), and
    kl_div_score = (KL_zero − KL_spliced) / KL_zero. NaN where the zero-ablation baseline is 0."""
    delta, delta_zero = ce_spliced - ce_clean, ce_zero - ce_clean
    return {
        "ce_loss_without_sae": ce_clean,
        "ce_loss_with_sae": ce_spliced,
        "ce_loss_with_ablation": ce_zero,
        "delta_ce": delta,
        "delta_ce_zero_ablation": delta_zero,
        "ce_loss_score": 1 - delta / delta_zero if delta_zero else float("nan"),
        "kl_div_with_sae": kl_spliced,
        "kl_div_with_ablation": kl_zero,
        "kl_div_score": 1 - kl_spliced / kl_zero if kl_zero else float("nan"),
    }
