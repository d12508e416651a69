"""Ablation sparsity (method §C.7, Gao et al. 2024 §4.5): how many vocabulary logits one latent moves.

For a sampled (window, position p, active latent i) we remove the latent's contribution to the residual at
p only, run the LM on, and compare the logits at positions p..p+T-1 with the clean run. The per-effect
statistic is ablation_sparsity; the same machinery with raw residual channels in place of latents gives the
reference ("latents are sparse in an absolute sense" compared with channels).

The model-specific splicing stays with the caller: ablation_effects only needs a `run_logits` callable
(contract in its docstring), so everything here is testable with a toy model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class ResidPatch(NamedTuple):
    """An additive change to the layer's residual: row b gets `delta[b]` [d] added at `position[b]` only."""

    position: Tensor  # [P] long
    delta: Tensor  # [P, d]


RunLogits = Callable[[Tensor, ResidPatch], Tensor]  # (tokens [P, S], patch) -> logits [P, S, V]


class Pairs(NamedTuple):
    """Sampled (window, position, unit) triples with the unit's value there; all [P]."""

    window: Tensor
    position: Tensor
    unit: Tensor  # latent index, or residual channel for the reference
    value: Tensor


def _median_last(x: Tensor) -> Tensor:
    """Median over the last axis, averaging the two middle values when the axis is even (torch.median
    returns the lower one, which would leave a one-hot effect off-centre at V = 2)."""
    V = x.shape[-1]
    if V % 2:
        return x.median(dim=-1).values
    lo = x.kthvalue(V // 2, dim=-1).values
    hi = x.kthvalue(V // 2 + 1, dim=-1).values
    return 0.5 * (lo + hi)


def ablation_sparsity(delta_logits: Tensor, atol: float = 0.0) -> Tensor:
    """(||v||_1 / ||v||_2)^2 / (V*T) per effect, in (0, 1]; delta_logits [..., T, V] -> [...] (float64).

    method §C.7: at each affected position t, Delta_t in R^V has its median over the vocabulary
    subtracted (a constant logit shift does not change probabilities), then the T centred vectors are
    concatenated into v in R^{V*T}. 1/(V*T) means a single logit moved; a dense Gaussian effect gives 2/pi.

    An effect with no change left after centring (every |v| <= atol, e.g. a pure constant shift) has no
    defined sparsity and returns NaN; average with nanmean and report how many were NaN. Logits from two
    separate forward passes differ by rounding noise, which looks dense: pass atol ~ that noise level.
    """
    if delta_logits.dim() < 2:
        raise ValueError(
            f"ablation_sparsity: delta_logits must be [..., T, V], got shape {tuple(delta_logits.shape)}"
        )
    T, V = delta_logits.shape[-2:]
    x = delta_logits.double()
    # method §C.7: Delta_t <- Delta_t - median over the vocabulary, per position t, then concatenate over t
    v = (x - _median_last(x).unsqueeze(-1)).flatten(-2)  # [..., T*V]
    l1 = v.abs().sum(-1)
    l2 = v.norm(dim=-1)
    s = (l1 / l2) ** 2 / (V * T)
    no_effect = v.abs().amax(-1) <= atol
    return torch.where(no_effect, torch.full_like(s, float("nan")), s)


def sparsity_summary(sparsity: Tensor) -> dict:
    """Mean ablation sparsity over pairs with its standard error, skipping and counting the no-effect
    (NaN) pairs (method §C.7: average S over (position, latent) pairs)."""
    s = sparsity.detach().double().flatten().cpu()
    ok = s[~s.isnan()]
    m = ok.numel()
    return {
        "mean": float(ok.mean()) if m else float("nan"),
        "sem": float(ok.std() / m**0.5) if m > 1 else float("nan"),
        "median": float(ok.median()) if m else float("nan"),
        "n_pairs": int(s.numel()),
        "n_no_effect": int(s.numel() - m),
    }


def sample_pairs(
    codes: Tensor | tuple[Tensor, Tensor],
    count: int,
    generator: torch.Generator | None = None,
    horizon: int = 1,
) -> Pairs:
    """Up to `count` (window, position, unit) triples drawn uniformly without replacement from the active
    ones, so their mean sparsity estimates the mean over all active pairs (method §C.7).

    codes: dense [B, S, n] (active where != 0; a bool mask gives value 1) or sparse (values, indices), both
    [B, S, k], active where values != 0 (TopK padding slots hold 0). Passing the raw residual [B, S, d]
    samples channels for the reference. Only positions p <= S - horizon are used, so the T = horizon
    positions p..p+T-1 stay inside the window. Returns fewer than `count` when fewer pairs are active.
    """
    if isinstance(codes, Tensor):
        values, indices = codes, None
    else:
        values, indices = codes
        if values.shape != indices.shape:
            raise ValueError(
                f"sample_pairs: values {tuple(values.shape)} and indices {tuple(indices.shape)} differ"
            )
    if values.dim() != 3:
        raise ValueError(
            f"sample_pairs: codes must be [windows, positions, units], got {tuple(values.shape)}"
        )
    S = values.shape[1]
    if not 1 <= horizon <= S:
        raise ValueError(f"sample_pairs: horizon {horizon} must be in [1, window length {S}]")
    active = values != 0
    active[:, S - horizon + 1 :] = False
    hits = active.nonzero()  # [m, 3]: window, position, unit or slot
    pick = torch.randperm(hits.shape[0], generator=generator)[:count].to(hits.device)
    w, p, j = hits[pick].unbind(-1)
    unit = j if indices is None else indices[w, p, j]
    value = values[w, p, j].to(torch.float32 if values.dtype == torch.bool else values.dtype)
    return Pairs(window=w, position=p, unit=unit.long(), value=value)


def latent_ablation_delta(
    values: Tensor, latents: Tensor, W_dec: Tensor, scale: Tensor | float = 1.0
) -> Tensor:
    """Residual change [P, d] that removes latent i's decoder term at its position: -z_i * d_i * scale.

    method §C.7 [I], error-preserving: x_abl = x - z_i d_i mapped back to raw space, i.e. scaled by the
    token's normalization scale ||x - mu|| (A.2; mu is additive and cancels). values, latents: [P];
    W_dec: [n, d] (decoder directions as rows); scale: [P] or [P, 1] or a float.
    """
    scale = torch.as_tensor(scale, dtype=W_dec.dtype, device=W_dec.device).reshape(-1, 1)
    return -(values.to(W_dec.dtype)[:, None] * scale) * W_dec[latents]


def channel_ablation_delta(values: Tensor, channels: Tensor, d: int) -> Tensor:
    """Residual change [P, d] that zeroes raw channel c (value x_c) at its position: -x_c e_c; the
    reference against which latent effects are compared (method §C.7)."""
    delta = torch.zeros(values.shape[0], d, dtype=values.dtype, device=values.device)
    return delta.scatter_(1, channels[:, None], -values[:, None])


@torch.no_grad()
def ablation_effects(
    run_logits: RunLogits,
    tokens: Tensor,
    position: Tensor,
    delta: Tensor,
    horizon: int,
    clean_logits: Tensor | None = None,
) -> Tensor:
    """Logit changes [P, T, V] (T = horizon, float32) from one residual edit per row (method §C.7).

    tokens [P, S]: row b is the window of pair b; position [P]: where its edit goes; delta [P, d]: what is
    added to the residual there (latent_ablation_delta or channel_ablation_delta). Row b of the result is
    logits'[b, p:p+T] - logits[b, p:p+T] with p = position[b].

    Contract for run_logits(tokens, patch): run the LM on tokens [P, S] with patch.delta[b] added to the
    residual at the SAE's site (the layer output the SAE was trained on) at patch.position[b] of row b
    only, every other position untouched, and return logits [P, S, V]. With an all-zero delta it must give
    the clean logits; that call is made here unless clean_logits [P, S, V] are passed (reuse them when many
    pairs share a window). Memory is P * T * V floats in and out: chunk P at the caller.
    """
    P, S = tokens.shape
    if position.shape != (P,) or delta.shape[0] != P:
        raise ValueError(
            f"ablation_effects: tokens {tuple(tokens.shape)}, position {tuple(position.shape)} and "
            f"delta {tuple(delta.shape)} must agree on the number of pairs"
        )
    if int(position.max()) + horizon > S:
        raise ValueError(
            f"ablation_effects: position {int(position.max())} + horizon {horizon} runs past the "
            f"window length {S}; sample with sample_pairs(..., horizon={horizon})"
        )
    if clean_logits is None:
        clean_logits = run_logits(tokens, ResidPatch(position, torch.zeros_like(delta)))
    patched = run_logits(tokens, ResidPatch(position, delta))
    rows = torch.arange(P, device=tokens.device)[:, None]
    cols = position[:, None] + torch.arange(horizon, device=tokens.device)  # [P, T]
    return (patched[rows, cols] - clean_logits[rows, cols]).float()


# --------------------------------------------------------------------------- the ablation rule

HIST_EDGES = torch.linspace(0.0, 1.0, 51)


def _histogram(s: Tensor) -> dict:
    ok = s[~s.isnan()].float().cpu()
    return {"edges": HIST_EDGES.tolist(), "counts": torch.histc(ok, bins=50, min=0.0, max=1.0).long().tolist()}


@torch.no_grad()
def ablation_record(model, layer: int, sae, windows: Tensor, spec: dict) -> dict:
    """Mean ablation sparsity of `spec['pairs']` sampled (position, active latent) pairs of one SAE, and
    of as many (position, residual channel) pairs, the reference (method §C.7).

    windows [W, S] long on the model's device. A latent is removed in raw space, -z_i d_i ||x - mu||
    (error-preserving); a channel is set to 0.
    """
    from saescale.evaluate.memory import encode_slots
    from saescale.normalize import normalize
    from saescale.subject import add_at_positions, record_resid, run_until_recorded

    W, S = windows.shape
    T = min(spec["horizon"], S)
    gen = torch.Generator().manual_seed(spec["seed"])
    resid = []
    with record_resid(model, [layer], stop=True) as captured:
        for i in range(0, W, spec["batch"]):
            run_until_recorded(model, windows[i:i + spec["batch"]])
            resid.append(captured[layer].float())
    x = torch.cat(resid)  # [W, S, d]
    d = x.shape[-1]
    x_norm, _, scale = normalize(x.reshape(-1, d))
    # encoded in row blocks, kept as slots in latent order (memory.encode_slots): the pairs drawn are the
    # dense code's, without a [W*S, n] code (64 GiB at 256 windows of 64 tokens, n = 2^20)
    lat = encode_slots(sae, x_norm)
    codes = (lat.values.reshape(W, S, -1), lat.indices.reshape(W, S, -1))
    latent_pairs = sample_pairs(codes, spec["pairs"], gen, horizon=T)
    channel_pairs = sample_pairs(x, spec["pairs"], gen, horizon=T)
    scale = scale.reshape(W, S)

    def run_logits(tokens: Tensor, patch: ResidPatch) -> Tensor:
        with add_at_positions(model, layer, patch.position, patch.delta):
            return model(input_ids=tokens).logits.float()

    def sparsities(pairs: Pairs, delta: Tensor) -> Tensor:
        out = []
        for i in range(0, len(pairs.window), spec["batch"]):
            sl = slice(i, i + spec["batch"])
            effects = ablation_effects(run_logits, windows[pairs.window[sl]], pairs.position[sl], delta[sl], T)
            out.append(ablation_sparsity(effects, atol=spec["atol"]).cpu())
        return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)

    W_dec = sae.W_dec.float()
    lat_delta = latent_ablation_delta(latent_pairs.value, latent_pairs.unit, W_dec,
                                      scale[latent_pairs.window, latent_pairs.position])
    ch_delta = channel_ablation_delta(channel_pairs.value, channel_pairs.unit, d)
    s_lat, s_ch = sparsities(latent_pairs, lat_delta), sparsities(channel_pairs, ch_delta)
    V = model.get_output_embeddings().weight.shape[0]
    return {"horizon": T, "vocab": int(V), "windows": int(W),
            "latents": {**sparsity_summary(s_lat), "histogram": _histogram(s_lat)},
            "channels": {**sparsity_summary(s_ch), "histogram": _histogram(s_ch)}}
