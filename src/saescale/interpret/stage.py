"""The interpret rule for one SAE: N2G explanations scored by precision / recall (method §C.5), the
explanation-reconstruction delta CE against a bigram baseline (C.6), the decoder logit lens, and the
per-latent records the dashboards and LLM autointerp read.

Examples come from the train split (as the paper builds explanations on training tokens); precision and
the reconstruction delta CE are measured on the eval split.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from torch import nn

from saescale.evaluate.downstream import downstream_metrics
from saescale.evaluate.memory import forward_rows
from saescale.interpret.examples import (
    Codes,
    dense_column,
    encode_split,
    latent_card,
    n2g_examples,
    sample_latents,
)
from saescale.interpret.n2g import (
    BigramBaseline,
    build_explanations,
    predict_codes,
    scale_factors,
    score_explanation,
)
from saescale.normalize import normalize
from saescale.progress import Progress
from saescale.subject import record_resid, run_until_recorded

log = logging.getLogger("saescale.interpret")
LOGIT_TOKENS = 10


def make_act_fn(model: nn.Module, layer: int, sae, device: torch.device):
    """N2G's activation callback: the latent's value at each row's last real token, each row run on its own
    from position 0 (right padding cannot reach earlier positions in a causal LM). The SAE encodes the rows in
    blocks of memory.forward_rows, so interpret.batch rows never hold [batch, n] at once."""

    @torch.no_grad()
    def act_fn(tokens: torch.Tensor, lengths: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        with record_resid(model, [layer], stop=True) as captured:
            run_until_recorded(model, tokens.to(device))
        resid = captured[layer]
        rows = torch.arange(resid.shape[0], device=resid.device)
        x = normalize(resid[rows, lengths.to(device) - 1].float())[0]
        lat = latents.to(device)
        step = forward_rows(sae.n_latents, len(x))
        out = []
        for start in range(0, len(x), step):
            codes, want = sae.encode(x[start:start + step]), lat[start:start + step]
            if codes.indices is None:
                out.append(codes.values[torch.arange(len(want), device=want.device), want])
            else:
                out.append((codes.values * (codes.indices == want[:, None])).sum(-1))
        return torch.cat(out).cpu()

    return act_fn


PAD_CANDIDATES = (" _", "_", " ")  # method §C.5: GPT-2's " _" (id 4808) first


def pad_token_id(tokenizer, text: str | None) -> int:
    """N2G's padding token: `text` when given (it must be one token), else the first of PAD_CANDIDATES
    that is one token for this tokenizer, else its end-of-text token."""
    for candidate in (text,) if text is not None else PAD_CANDIDATES:
        ids = tokenizer(candidate, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return int(ids[0])
        if text is not None:
            raise ValueError(f"config.interpret.pad_token: {text!r} is {len(ids)} tokens for this tokenizer; "
                             "choose a string that is exactly one token, or null to pick one automatically")
    if tokenizer.eos_token_id is None:
        raise ValueError("config.interpret.pad_token: none of ' _', '_', ' ' is one token and the tokenizer "
                         "has no end-of-text token; set a one-token string")
    return int(tokenizer.eos_token_id)


@torch.no_grad()
def logit_lens(model: nn.Module, W_dec: torch.Tensor, latents: np.ndarray, strings) -> dict[int, dict]:
    """Tokens whose logits each decoder direction most raises and lowers, through the unembedding alone
    (the final LayerNorm is left out: a direction, not an activation)."""
    W_U = model.get_output_embeddings().weight  # [V, d]
    effect = W_dec[torch.as_tensor(latents, device=W_dec.device)].to(W_U.dtype) @ W_U.T  # [m, V]
    up, down = effect.topk(LOGIT_TOKENS, dim=1), (-effect).topk(LOGIT_TOKENS, dim=1)
    out = {}
    for j, latent in enumerate(latents):
        out[int(latent)] = {
            "up": [[strings(int(t)), round(float(v), 4)] for t, v in zip(up.indices[j], up.values[j])],
            "down": [[strings(int(t)), round(-float(v), 4)] for t, v in zip(down.indices[j], down.values[j])],
        }
    return out


def _nanmean(values: list[float]) -> float:
    ok = [v for v in values if not math.isnan(v)]
    return float(np.mean(ok)) if ok else float("nan")


def _decode_from(codes_fn, sae):
    """x_norm, tokens -> the decoder applied to simulated codes of those tokens (C.6)."""

    def reconstruct(x_norm: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        sim = codes_fn(tokens.cpu().numpy())  # csr [B*S, n]
        step = forward_rows(sae.n_latents, sim.shape[0])  # dense [rows, n] blocks, on the host and the device
        out = [torch.from_numpy(sim[i:i + step].toarray()).to(x_norm.device, sae.W_dec.dtype) @ sae.W_dec
               for i in range(0, sim.shape[0], step)]
        return torch.cat(out) + sae.b_pre

    return reconstruct


def explanation_reconstruction(model, layer: int, sae, explanations: dict, train: Codes, windows: np.ndarray,
                               batch: int, device) -> dict:
    """delta CE with every latent replaced by its N2G-simulated activation scaled by the least-squares
    c_i (fit on training tokens), with the bigram baseline and the SAE itself on the same windows (C.6)."""
    n = sae.n_latents
    c = scale_factors(predict_codes(explanations, train.windows, n), train.acts)
    bigram = BigramBaseline.fit(train.windows, train.acts)
    runs = {
        "sae": None,
        "n2g": _decode_from(lambda w: predict_codes(explanations, w, n, scale=c), sae),
        "bigram": _decode_from(bigram.predict, sae),
    }
    out = {}
    for name, reconstruct in runs.items():
        down = downstream_metrics(model, layer, sae, windows, batch, device, reconstruct=reconstruct)
        out[name] = {key: down[key] for key in ("delta_ce", "kl_div_with_sae", "ce_loss_score")}
    out["ce_loss_without_sae"] = down["ce_loss_without_sae"]
    out["delta_ce_zero_ablation"] = down["delta_ce_zero_ablation"]
    out["windows"], out["latents_explained"] = len(windows), len(explanations)
    return out


def interpret_sae(model, layer: int, sae, root, tokenizer, spec: dict, device) -> tuple[list[dict], dict]:
    """(per-latent records for the sampled latents, summary) of one SAE."""
    rng = np.random.default_rng(spec["seed"])
    batch_rows = max(256, 2 ** 24 // sae.n_latents)
    train = encode_split(sae, root, layer, "train", spec["example_windows"], batch_rows, device)
    evals = encode_split(sae, root, layer, "eval", spec["eval_windows"], batch_rows, device)
    vocab = {}

    def strings(t: int) -> str:
        if t not in vocab:
            vocab[t] = tokenizer.decode([t])
        return vocab[t]

    sampled = sample_latents(train.acts, spec["latents"], spec["seed"])
    alive = np.flatnonzero(np.diff(train.acts.indptr) > 0)
    explain = alive if spec["reconstruction"] else sampled
    build, holdout = {}, {}
    sampling = spec.get("sampling", "random")  # the paper's random sample unless the config asks otherwise
    for latent in explain:
        build[int(latent)], holdout[int(latent)] = n2g_examples(train, latent, spec["examples"], spec["holdout"], rng,
                                                                sampling)
    act_fn = make_act_fn(model, layer, sae, device)
    log.info("building N2G explanations for %d latents", len(build))
    pad = pad_token_id(tokenizer, spec["pad_token"])
    started = time.monotonic()
    explanations = build_explanations(act_fn, build, pad, max_suffix=spec["max_suffix"], batch_size=spec["batch"])
    log.info("built %d N2G explanations in %.1f s", len(explanations), time.monotonic() - started)
    lens = logit_lens(model, sae.W_dec.detach(), sampled, strings)
    records = []
    progress = Progress(log, "interpret: scoring and cards", len(sampled), "latents")
    for latent in sampled:
        progress.update()
        latent = int(latent)
        expl = explanations[latent]
        score = score_explanation(expl, evals.windows, dense_column(evals, latent), holdout[latent])
        card = latent_card(train, latent, strings, spec["top_examples"], tuple(spec["context"]), rng)
        patterns = expl.to_json(strings)
        for p in patterns["patterns"]:
            p["text"] = " ".join(t if t in ("^", "*") else repr(t) for t in p["tokens"])
        records.append({**card, "n2g": {**patterns, **score, "n_skipped": expl.n_skipped}, "logits": lens[latent],
                        "dashboard": len(records) < spec["dashboard_latents"]})
    scores = [r["n2g"] for r in records]
    summary = {
        "latents_sampled": len(records), "alive_latents": int(alive.size), "n_latents": sae.n_latents,
        "example_tokens": int(train.windows.size), "eval_tokens": int(evals.windows.size),
        "pad_token": {"id": pad, "text": strings(pad)}, "n2g_sampling": sampling,
        "n2g": {key: _nanmean([s[key] for s in scores]) for key in ("precision", "recall", "f1")},
        "n2g_never_fires": sum(s["n_predicted"] == 0 for s in scores),
    }
    if spec["reconstruction"]:
        ev_windows = evals.windows[:spec["reconstruction_windows"]]  # the eval split's windows are shuffled
        summary["reconstruction"] = explanation_reconstruction(model, layer, sae, explanations, train, ev_windows,
                                                               32, device)
    return records, summary
