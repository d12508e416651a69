"""Downstream loss: splice the SAE reconstruction into the LM at all positions (method §C.3)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

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
    log-softmax over the vocabulary is computed once and shared by its CE and KL.
    """
    sums = {"ce_clean": 0.0, "ce_spliced": 0.0, "ce_zero": 0.0, "kl": 0.0, "kl_zero": 0.0}
    count = 0
    reconstruct = reconstruct or (lambda x_norm, _tokens: sae(x_norm)[0])

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
        sums["ce_clean"] += float(_ce(clean, toks))
        sums["ce_spliced"] += float(_ce(spliced, toks))
        sums["ce_zero"] += float(_ce(zeroed, toks))
        sums["kl"] += float(_kl(clean, spliced))
        sums["kl_zero"] += float(_kl(clean, zeroed))
        count += toks.shape[0] * (toks.shape[1] - 1)
        progress.update(toks.shape[0])
    m = {key: value / count for key, value in sums.items()}
    delta, delta_zero = m["ce_spliced"] - m["ce_clean"], m["ce_zero"] - m["ce_clean"]
    return {
        "windows": len(windows),
        "tokens": count,
        "ce_clean": m["ce_clean"],
        "ce_spliced": m["ce_spliced"],
        "delta_ce": delta,
        "kl": m["kl"],
        "ce_zero_ablation": m["ce_zero"],
        "delta_ce_zero_ablation": delta_zero,
        "kl_zero_ablation": m["kl_zero"],
        # method §C.3: reported, though the paper argues against it as a headline number
        "loss_recovered": 1 - delta / delta_zero if delta_zero else float("nan"),
    }
