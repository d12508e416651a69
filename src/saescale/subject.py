"""The subject language model: load it (transformers), record and replace a block's residual output,
and train the builtin tiny GPT-2 that makes the default pipeline run offline.

Layer L means the output of transformer block L (0-indexed), i.e. TransformerLens
`blocks.L.hook_resid_post` (method §A.1; Gao et al. §2.1 use GPT-2 small's layer 8). In Hugging Face terms it is
`output_hidden_states=True`'s `hidden_states[L + 1]` (index 0 is the embedding output) for every block but the
last; for the last block, `hidden_states[-1]` is the final norm applied to it (GPT-2's `ln_f`, Llama's `norm`,
...), so we hook the block module instead of reading hidden_states. Verified per family in
tests/test_model_families.py.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from saescale.config import ConfigError
from saescale.corpus import EOS_TOKEN
from saescale.devices import lease_gpu
from saescale.files import write_json_atomic

log = logging.getLogger("saescale.subject")


def pick_device(requested: str = "auto") -> torch.device:
    """The device a job runs on. "auto" and "cuda" first lease this job a GPU of its own where several are
    visible (saescale.devices), before anything initialises CUDA: a GPU job sees only its GPU, as cuda."""
    lease = lease_gpu() if requested in ("auto", "cuda") else None
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available on this machine")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if lease is not None and device.type == "cuda" and torch.cuda.device_count() > 1:
        # CUDA started before CUDA_VISIBLE_DEVICES was set (the GPUs were counted without NVML): select by index
        torch.cuda.set_device(lease.index)
    return device


TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")


def from_pretrained_kwargs(revision: str | None = None, torch_dtype: str = "auto", device_map=None,
                           trust_remote_code: bool = False) -> dict:
    """The keyword arguments of the model's from_pretrained for a subject's loading keys
    (config.subjects.<name>: revision, torch_dtype, device_map, trust_remote_code)."""
    import transformers

    if torch_dtype not in TORCH_DTYPES:
        raise ValueError(f"torch_dtype must be one of {', '.join(TORCH_DTYPES)}, not {torch_dtype!r}")
    # transformers 4.56 renamed torch_dtype to dtype (the old name still works, with a deprecation warning)
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    kwargs = {"revision": revision, dtype_key: torch_dtype if torch_dtype == "auto" else getattr(torch, torch_dtype),
              "trust_remote_code": bool(trust_remote_code)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    return kwargs


def load_model(path: str, revision: str | None = None, device: torch.device | str = "cpu",
               where: str | None = None, *, torch_dtype: str = "auto", device_map=None,
               trust_remote_code: bool = False) -> nn.Module:
    """AutoModelForCausalLM.from_pretrained, in eval mode: the same call for 'gpt2' and the builtin model.

    `torch_dtype` 'auto' is the checkpoint's own dtype (transformers 5's default, so the same on 4.x). With a
    `device_map` (accelerate places the weights) the model is not moved to `device`. The model's blocks are
    looked up here, so an unsupported family fails at load time, naming `<where>.model`."""
    from transformers import AutoModelForCausalLM

    key = where or "config.subjects.<name>"
    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError as exc:
            raise ModelLoadError(f"{key}.device_map: {device_map!r} needs the accelerate package (pip install "
                                 "accelerate); or remove device_map to load onto the job's device") from exc
    kwargs = from_pretrained_kwargs(revision, torch_dtype, device_map, trust_remote_code)
    with _explained_load_errors(path, where), _unsupported_family(path, key):
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    transformer_blocks(model, key)
    if device_map is None:
        model = model.to(device)
    return model.eval()


def load_tokenizer(path: str, revision: str | None = None, where: str | None = None,
                   trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    with _explained_load_errors(path, where):
        return AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)


class ModelLoadError(OSError):
    """A model or tokenizer from_pretrained cannot load, with what to do about it."""


@contextlib.contextmanager
def _explained_load_errors(path: str, where: str | None) -> Iterator[None]:
    """transformers' OSError for an unreachable hub id or a bad folder, said in terms of the config key."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, ModelLoadError):
            raise
        key = f"{where}.model: " if where else ""
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"{key}cannot load '{path}' with from_pretrained ({reason}). A hub id loads from the hub or, offline, "
            "from the local cache (HF_HOME): download it where the hub is reachable "
            f"(`huggingface-cli download {path}`) or point the model at a folder written by save_pretrained"
        ) from exc


# where each family keeps its list of residual blocks; block L's output (its first element when it returns a
# tuple) is resid_post of layer L. Each family named here is built and checked in tests/test_model_families.py.
BLOCK_PATHS = {
    "transformer.h": "GPT-2, GPT-Neo, GPT-J, CodeGen, BLOOM, Falcon",
    "model.layers": "Llama, Mistral, Qwen2/Qwen3, Gemma/Gemma 2, Phi/Phi-3, OLMo, StableLM",
    "gpt_neox.layers": "GPT-NeoX/Pythia",
    "model.decoder.layers": "OPT",
    "transformer.blocks": "MPT",
    "transformer.layers": "remote-code models that keep their blocks there",
}
SUPPORTED_FAMILIES = "; ".join(f"{families} ({path})" for path, families in BLOCK_PATHS.items())


class UnsupportedModelError(ConfigError):
    """The subject model is not a causal LM of a family whose residual blocks saescale knows how to hook."""


def transformer_blocks(model: nn.Module, where: str = "config.subjects.<name>") -> nn.ModuleList:
    """The list of residual blocks of a Hugging Face causal LM (BLOCK_PATHS)."""
    for attr in BLOCK_PATHS:
        obj = model
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise UnsupportedModelError(
        f"{where}.model: cannot find the transformer blocks of {type(model).__name__} to hook its residual stream; "
        f"supported families (and where their blocks live): {SUPPORTED_FAMILIES}")


@contextlib.contextmanager
def _unsupported_family(path: str, key: str) -> Iterator[None]:
    """AutoModelForCausalLM's ValueError for a model that is no causal LM (T5, a BERT encoder, ...), said in
    terms of the config key and the families that work."""
    try:
        yield
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise
        raise UnsupportedModelError(
            f"{key}.model: '{path}' is not a causal language model transformers can load with "
            f"AutoModelForCausalLM ({str(exc).splitlines()[0][:200]}); supported families: {SUPPORTED_FAMILIES}"
        ) from exc


def _home_device(model: nn.Module) -> torch.device:
    """Where the model's inputs (and the job's SAE) live: the input embeddings' device. A model spread over
    devices (device_map) may run a block elsewhere; hooks bring its residual here and back."""
    return model.get_input_embeddings().weight.device


def run_until_recorded(model: nn.Module, input_ids: torch.Tensor) -> None:
    try:
        model(input_ids=input_ids)
    except StopForward:
        pass


def _block_output(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_block_output(out, new: torch.Tensor):
    return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new


class StopForward(Exception):
    """Raised by a hook once the deepest recorded layer has run: later blocks and the LM head are skipped."""


@contextlib.contextmanager
def record_resid(model: nn.Module, layers: list[int], stop: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """Capture resid_post of each layer on every forward pass into the yielded dict, in float32 on the model's
    input device whatever dtype the model runs in (torch_dtype): SAEs and statistics work in float32.

    With stop=True the forward pass ends with StopForward after the deepest layer (catch it with
    `run_until_recorded`); for GPT-2 small at layer 8 that skips a quarter of the blocks and the 50k-way head.
    """
    blocks = transformer_blocks(model)
    home = _home_device(model)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    last = max(layers)
    for layer in layers:
        if layer >= len(blocks):
            raise ValueError(f"layer {layer} does not exist: the model has {len(blocks)} blocks (0-indexed)")

        def hook(_m, _inp, out, layer=layer):
            captured[layer] = _block_output(out).detach().to(home, torch.float32)
            if stop and layer == last:
                raise StopForward

        handles.append(blocks[layer].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def splice_resid(model: nn.Module, layer: int, replace: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace resid_post of `layer` at all positions by replace(resid) during forward passes (method §C.3)."""
    block = transformer_blocks(model)[layer]
    home = _home_device(model)

    def hook(_m, _inp, out):  # replace() sees float32 on the input device, like record_resid's activations
        resid = _block_output(out)
        return _replace_block_output(out, replace(resid.to(home, torch.float32)).to(resid.device, resid.dtype))

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def add_at_positions(model: nn.Module, layer: int, position: torch.Tensor, delta: torch.Tensor) -> Iterator[None]:
    """Add delta[b] [d] to resid_post of `layer` at position[b] of batch row b only, every other position
    untouched: one edit per row, the ablation of one latent or channel (method §C.7)."""
    block = transformer_blocks(model)[layer]

    def hook(_m, _inp, out):
        resid = _block_output(out).clone()
        rows = torch.arange(resid.shape[0], device=resid.device)
        resid[rows, position.to(resid.device)] += delta.to(resid.device, resid.dtype)
        return _replace_block_output(out, resid)

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---- the builtin tiny GPT-2 ----------------------------------------------------------------------


def train_tokenizer(corpus_jsonl: str, vocab_size: int, out_dir: str, min_frequency: int = 2) -> None:
    """A byte-level BPE tokenizer (GPT-2 style) trained on the builtin corpus, saved in HF format.

    BPE stops merging when no pair occurs `min_frequency` times, so a small corpus can end below vocab_size
    (the stdlib corpus reaches 40,446 tokens at 2, exactly 50,257 at 1: GPT-2's size, which
    benchmarks/rehearsal.py needs)."""
    import json

    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    def texts():
        with open(corpus_jsonl) as f:
            for line in f:
                yield json.loads(line)["text"]

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts(), vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=[EOS_TOKEN], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                  unk_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    tok.save_pretrained(out_dir)
    log.info("trained byte-level BPE tokenizer, vocab %d -> %s", len(tok), out_dir)
    if len(tok) < vocab_size:
        log.warning("the tokenizer has %d tokens, fewer than the %d asked for: the corpus has no more pairs "
                    "occurring %d times", len(tok), vocab_size, min_frequency)


def train_builtin_lm(tokens_store: str, tokenizer_dir: str, spec: dict, out_dir: str) -> dict:
    """Train a small GPT2LMHeadModel on the train windows; report validation loss on the eval windows."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from saescale.corpus import open_token_store
    from saescale.files import atomic_dir

    torch.manual_seed(spec["seed"])
    store = open_token_store(tokens_store)
    windows = store["windows"][:]
    train = torch.from_numpy(windows[store["train_ids"][:]]).long()
    val = torch.from_numpy(windows[store["eval_ids"][:]][:256]).long()
    tok = load_tokenizer(tokenizer_dir)
    ctx = windows.shape[1]
    # GPT-2's tanh GELU as torch's fused kernel: the same function as "gelu_new" (to 2e-7), and a training
    # step 10% faster on 2 CPU threads (batch 32, measured)
    config = GPT2Config(vocab_size=len(tok), n_positions=ctx, n_embd=spec["n_embd"], n_layer=spec["n_layer"],
                        n_head=spec["n_head"], activation_function="gelu_pytorch_tanh",
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config)
    device = pick_device("auto")
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    bs = spec["batch_size"]
    steps = max(1, math.ceil(spec["train_tokens"] / (bs * ctx)))
    warmup = max(1, steps // 20)
    rng = np.random.default_rng(spec["seed"])
    history = []
    t0 = time.time()
    for step in range(steps):
        # warmup then cosine decay to 10%: standard for small LMs, keeps a few-minute run stable
        frac = step / steps
        lr = spec["lr"] * (min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.integers(0, len(train), size=bs)
        batch = train[idx].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            val_loss = _eval_loss(model, val.to(device))
            elapsed = time.time() - t0
            history.append({"step": step, "tokens": (step + 1) * bs * ctx, "train_loss": loss.item(),
                            "val_loss": val_loss, "lr": lr, "elapsed_s": elapsed})
            log.info("LM step %d/%d  loss %.3f  val %.3f  %.0f tok/s", step, steps, loss.item(), val_loss,
                     (step + 1) * bs * ctx / max(elapsed, 1e-9))
    elapsed = time.time() - t0
    info = {"n_params": sum(p.numel() for p in model.parameters()), "config": config.to_dict(),
            "train_tokens": steps * bs * ctx, "train_seconds": elapsed,
            "tokens_per_s": steps * bs * ctx / elapsed, "final_val_loss": history[-1]["val_loss"],
            "history": history, "device": str(device)}
    with atomic_dir(out_dir) as tmp:
        model.eval().to("cpu").save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json_atomic(Path(tmp) / "training.json", info)
    return info


@torch.no_grad()
def _eval_loss(model: nn.Module, val: torch.Tensor) -> float:
    model.eval()
    losses = [float(model(input_ids=val[i:i + 64], labels=val[i:i + 64]).loss) for i in range(0, len(val), 64)]
    model.train()
    return float(np.mean(losses))
