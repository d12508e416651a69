"""Downstream loss: splice the SAE reconstruction into the LM at all positions (REFERENCE C.3)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from saescale.normalize import denormalize, normalize
from saescale.sae.model import SparseAutoencoder
from saescale.subject import next_token_ce, splice_resid


def sae_replacement(sae: SparseAutoencoder):
    """resid -> SAE reconstruction mapped back to raw space with each token's own (mu, scale) (REFERENCE A.2)."""

    def replace(resid: torch.Tensor) -> torch.Tensor:
        shape = resid.shape
        x_norm, mu, scale = normalize(resid.reshape(-1, shape[-1]))
        return denormalize(sae(x_norm)[0], mu, scale).reshape(shape)

    return replace


def zero_ablation(resid: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(resid)


def kl_per_position(clean_logits: torch.Tensor, patched_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_clean || p_patched) per position, [batch, ctx]."""
    lp = torch.log_softmax(clean_logits.float(), dim=-1)
    lq = torch.log_softmax(patched_logits.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(dim=-1)


@torch.no_grad()
def downstream_metrics(model: nn.Module, layer: int, sae: SparseAutoencoder, windows: np.ndarray,
                       batch_size: int, device: torch.device) -> dict:
    """Delta CE and KL of the spliced model against the clean one, with the zero-ablation baseline.

    Positions t = 0..ctx-2 (those with a next-token target inside the window) all count.
    """
    sums = {"ce_clean": 0.0, "ce_spliced": 0.0, "ce_zero": 0.0, "kl": 0.0, "kl_zero": 0.0}
    count = 0
    replace = sae_replacement(sae)
    for i in range(0, len(windows), batch_size):
        toks = torch.from_numpy(windows[i:i + batch_size]).long().to(device)
        clean = model(input_ids=toks).logits
        with splice_resid(model, layer, replace):
            spliced = model(input_ids=toks).logits
        with splice_resid(model, layer, zero_ablation):
            zeroed = model(input_ids=toks).logits
        sums["ce_clean"] += float(next_token_ce(clean, toks).sum())
        sums["ce_spliced"] += float(next_token_ce(spliced, toks).sum())
        sums["ce_zero"] += float(next_token_ce(zeroed, toks).sum())
        sums["kl"] += float(kl_per_position(clean, spliced)[:, :-1].sum())
        sums["kl_zero"] += float(kl_per_position(clean, zeroed)[:, :-1].sum())
        count += toks.shape[0] * (toks.shape[1] - 1)
    m = {key: value / count for key, value in sums.items()}
    delta, delta_zero = m["ce_spliced"] - m["ce_clean"], m["ce_zero"] - m["ce_clean"]
    return {
        "windows": int(len(windows)),
        "tokens": count,
        "ce_clean": m["ce_clean"],
        "ce_spliced": m["ce_spliced"],
        "delta_ce": delta,
        "kl": m["kl"],
        "ce_zero_ablation": m["ce_zero"],
        "delta_ce_zero_ablation": delta_zero,
        "kl_zero_ablation": m["kl_zero"],
        # REFERENCE C.3: reported, though the paper argues against it as a headline number
        "loss_recovered": 1 - delta / delta_zero if delta_zero else float("nan"),
    }
