"""SAEs out to SAELens and sparsify, and in from SAELens, sparsify and openai/sparse_autoencoder
(layouts: shared/notes/peers.md section 3).

saescale SAEs read per-token normalized activations: x_n = (x - mean_d x) / ||x - mean_d x|| (method §A.2).
SAELens' `layer_norm` normalization, and the LayerNorm openai's TopK SAEs assume, are the same map up to one
constant: (x - mu) / std with the unbiased std, which is sqrt(d - 1) * x_n (up to their eps of 1e-5 added to
std). Folding c = sqrt(d - 1) into the weights (encoder / c, decoder and bias * c) makes the exported SAE, run
by SAELens with `normalize_activations: layer_norm`, reconstruct the raw activations as saescale does:
SAELens multiplies its output by std and adds mu back, and c * std = ||x - mu||. sparsify stores no
normalization at all: its export keeps saescale's normalized space and says so in cfg.json
(`saescale_input_normalization`); feed it x_n.

Weights are read only from safetensors, or from openai's torch files with `weights_only=True`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from saescale import normalize, paths
from saescale.files import replace_when_done, write_json_atomic
from saescale.sae.model import SparseAutoencoder, sae_folder

EXPORTS = ("saelens", "sparsify")
IMPORTS = ("saelens", "sparsify", "openai")

# saescale arch -> SAELens architecture with the same inference-time code (training-only terms drop out)
SAELENS_ARCH = {"topk": "topk", "multitopk": "topk", "relu": "standard", "relu_dn": "standard",
                "jumprelu": "jumprelu", "jumprelu_tanh": "jumprelu", "batchtopk": "jumprelu"}


class InteropError(ValueError):
    pass


def layer_norm_scale(d: int) -> float:
    """c with (x - mu) / std_unbiased = c * x_n."""
    return math.sqrt(d - 1)


def _threshold(sae: SparseAutoencoder) -> torch.Tensor:
    family = sae.family
    if sae.arch == "batchtopk":  # one global inference threshold (method §B.6); clamped at 0 as in encode
        return family.threshold.clamp_min(0).expand(sae.n_latents).clone()
    return family.threshold().detach().clone()


def to_saelens(sae: SparseAutoencoder, metadata: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg.json, state dict) of SAELens 6's inference SAE for this SAE, normalization folded in."""
    if sae.arch not in SAELENS_ARCH:
        raise InteropError(f"arch '{sae.arch}' has no SAELens equivalent; exportable: {sorted(SAELENS_ARCH)}")
    c = layer_norm_scale(sae.d_model)
    arch = SAELENS_ARCH[sae.arch]
    tensors = {"W_enc": (sae.W_enc.detach() / c).T.contiguous(), "b_enc": sae.b_enc.detach().clone(),
               "W_dec": (sae.W_dec.detach() * c).contiguous(), "b_dec": sae.b_pre.detach() * c}
    if arch == "jumprelu":
        tensors["threshold"] = _threshold(sae)  # compares pre-activations, which the fold leaves unchanged
    cfg = {"architecture": arch, "d_in": sae.d_model, "d_sae": sae.n_latents, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "layer_norm", "reshape_activations": "none",
           "metadata": {**(metadata or {}), "saescale_arch": sae.arch, "saescale_k": sae.k}}
    if arch == "topk":
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    return cfg, {k: v.float().cpu() for k, v in tensors.items()}


def to_sparsify(sae: SparseAutoencoder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg.json, state dict) of sparsify's SparseCoder: TopK only, in saescale's normalized input space."""
    if sae.arch not in ("topk", "multitopk"):
        raise InteropError(f"arch '{sae.arch}' has no sparsify equivalent: sparsify trains TopK SAEs only")
    cfg = {"activation": "topk", "expansion_factor": max(1, sae.n_latents // sae.d_model),
           "normalize_decoder": sae.family.unit_norm_decoder, "num_latents": sae.n_latents, "k": sae.k,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": sae.d_model,
           "saescale_input_normalization": normalize.DESCRIPTION, "saescale_arch": sae.arch}
    tensors = {"encoder.weight": sae.W_enc.detach(), "encoder.bias": sae.b_enc.detach(),
               "W_dec": sae.W_dec.detach(), "b_dec": sae.b_pre.detach()}
    return cfg, {k: v.float().cpu().contiguous() for k, v in tensors.items()}


def _sae(d: int, n: int, arch: str, k: int, tensors: dict[str, torch.Tensor]) -> SparseAutoencoder:
    sae = SparseAutoencoder(d, n, arch, k)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_pre"):
            param = getattr(sae, name)
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise InteropError(f"{name} has shape {tuple(tensors[name].shape)}; expected {tuple(param.shape)} "
                                   f"for d = {d}, n = {n}")
            param.copy_(tensors[name])
        if arch == "jumprelu":
            sae.family.log_threshold.copy_(tensors["threshold"].clamp_min(1e-30).log())
    return sae


def from_saelens(cfg: dict, tensors: dict[str, torch.Tensor]) -> SparseAutoencoder:
    """A SAELens SAE (topk, standard or jumprelu) trained on layer-normed activations, as a saescale SAE."""
    arch = cfg.get("architecture")
    ours = {"topk": "topk", "standard": "relu", "jumprelu": "jumprelu"}.get(arch)
    if ours is None:
        raise InteropError(f"cfg.json architecture '{arch}': importable SAELens architectures are topk, standard "
                           "and jumprelu")
    norm = cfg.get("normalize_activations", "none")
    if norm != "layer_norm":
        raise InteropError(f"cfg.json normalize_activations '{norm}': saescale evaluates SAEs on per-token "
                           "normalized activations (method §A.2), which only SAELens' 'layer_norm' maps onto "
                           "exactly; SAEs of raw activations cannot be imported yet")
    if not cfg.get("apply_b_dec_to_input", True):
        raise InteropError("cfg.json apply_b_dec_to_input false: saescale's encoder always subtracts the decoder "
                           "bias (method §A.3)")
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        raise InteropError("cfg.json rescale_acts_by_decoder_norm true: fold the decoder norms first "
                           "(SAELens: sae.fold_W_dec_norm())")
    d, n = int(cfg["d_in"]), int(cfg["d_sae"])
    c = layer_norm_scale(d)
    mapped = {"W_enc": tensors["W_enc"].float().T * c, "b_enc": tensors["b_enc"].float(),
              "W_dec": tensors["W_dec"].float() / c, "b_pre": tensors["b_dec"].float() / c}
    if ours == "jumprelu":
        mapped["threshold"] = tensors["threshold"].float()
    k = int(cfg.get("k") or cfg.get("metadata", {}).get("saescale_k") or 0)
    return _sae(d, n, ours, k if ours == "topk" else max(k, 1), mapped)


def from_sparsify(cfg: dict, tensors: dict[str, torch.Tensor], inputs_normalized: bool = False) -> SparseAutoencoder:
    """A sparsify TopK SAE whose inputs were saescale-normalized: our own export, or one the caller vouches
    for (`inputs_normalized`, `saescale import --inputs-normalized`)."""
    if cfg.get("activation", "topk") != "topk" or cfg.get("skip_connection") or cfg.get("transcode"):
        raise InteropError("sparsify cfg.json: only plain TopK SAEs (no groupmax, skip connection or transcoder) "
                           "can be imported")
    if "saescale_input_normalization" not in cfg and not inputs_normalized:
        raise InteropError("sparsify cfg.json has no saescale_input_normalization: sparsify records no input "
                           "normalization, and saescale evaluates on per-token normalized activations (method §"
                           "A.2); only SAEs trained on such inputs can be imported (saescale's own exports, or "
                           "--inputs-normalized when you know they were)")
    d = int(cfg["d_in"])
    n = int(cfg.get("num_latents") or d * int(cfg["expansion_factor"]))
    return _sae(d, n, "topk", int(cfg["k"]), {"W_enc": tensors["encoder.weight"], "b_enc": tensors["encoder.bias"],
                                               "W_dec": tensors["W_dec"], "b_pre": tensors["b_dec"]})


def from_openai(state: dict) -> SparseAutoencoder:
    """An openai/sparse_autoencoder TopK state dict (LayerNorm-ed inputs) as a saescale SAE."""
    if state.get("activation") != "TopK":
        raise InteropError(f"openai state dict activation '{state.get('activation')}': only TopK is importable")
    enc = state["encoder.weight"].float()  # [n, d]
    n, d = enc.shape
    c = layer_norm_scale(d)
    return _sae(d, n, "topk", int(state["activation_state_dict"]["k"]),
                {"W_enc": enc * c, "b_enc": state["latent_bias"].float(),
                 "W_dec": state["decoder.weight"].float().T / c, "b_pre": state["pre_bias"].float() / c})


# ---- files ------------------------------------------------------------------------------------------------
def export_sae(sae_dir: Path, fmt: str, out: Path) -> Path:
    """Write the saescale SAE in `sae_dir` to `out` in SAELens or sparsify layout."""
    cfg, weights_path = sae_folder(sae_dir)
    sae = SparseAutoencoder.from_config(cfg, weights_path)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "saelens":
        meta = {"hook_name": f"blocks.{cfg.get('layer')}.hook_resid_post", "model_name": cfg.get("subject"),
                "saescale_name": cfg.get("name")}
        out_cfg, tensors = to_saelens(sae, {k: v for k, v in meta.items() if v is not None})
        weights = out / "sae_weights.safetensors"
    elif fmt == "sparsify":
        out_cfg, tensors = to_sparsify(sae)
        weights = out / "sae.safetensors"
    else:
        raise InteropError(f"--format {fmt}: one of {', '.join(EXPORTS)}")
    with replace_when_done(weights) as tmp:
        save_file(tensors, str(tmp))
    write_json_atomic(out / "cfg.json", out_cfg)
    return out


def import_sae(src: Path, fmt: str, inputs_normalized: bool = False) -> SparseAutoencoder:
    """Read an SAE in a peer's layout: a SAELens or sparsify folder, or an openai .pt file."""
    if fmt == "openai":
        return from_openai(torch.load(src, map_location="cpu", weights_only=True))
    if fmt not in IMPORTS:
        raise InteropError(f"--format {fmt}: one of {', '.join(IMPORTS)}")
    cfg_path = src / "cfg.json"
    weights = src / ("sae_weights.safetensors" if fmt == "saelens" else "sae.safetensors")
    for path in (cfg_path, weights):
        if not path.is_file():
            raise InteropError(f"{path}: not found; a {fmt} SAE folder holds cfg.json and {weights.name}")
    cfg = json.loads(cfg_path.read_text())
    tensors = load_file(str(weights))
    return from_saelens(cfg, tensors) if fmt == "saelens" else from_sparsify(cfg, tensors, inputs_normalized)


def write_imported(sae: SparseAutoencoder, out: Path, source: str, fmt: str, layer: int | None = None,
                   subject: str | None = None) -> None:
    """A saescale SAE folder (the weights, then the config last, which marks it complete)."""
    out.mkdir(parents=True, exist_ok=True)
    sae.save(out / paths.WEIGHTS_FILE)
    cfg = {**sae.config(), "name": sae.arch, "subject": subject, "layer": layer, "normalization": normalize.DESCRIPTION,
           "imported_from": {"format": fmt, "path": source}}
    write_json_atomic(out / paths.CFG_FILE, cfg)
