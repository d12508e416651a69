"""Bring your own model: every family the residual hook supports, as a tiny random model saved with
save_pretrained and loaded the way the pipeline loads a subject (saescale.subject.load_model), checked against
transformers' own `output_hidden_states`.

The known answer (method §A.1): layer L is the output of block L, which is `hidden_states[L + 1]` for every block
but the last; the last block's `hidden_states[-1]` is the family's final norm applied to that output.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as tf
from torch import nn

from saescale import cli
from saescale.config import ConfigError, validate
from saescale.corpus import token_stream_windows, tokenize, window_bos, write_token_store
from saescale.store import extract, open_store
from saescale.subject import (BLOCK_PATHS, ModelLoadError, UnsupportedModelError, load_model, load_tokenizer,
                              record_resid, run_until_recorded, splice_resid)

V, D, LAYERS, CTX = 64, 16, 3, 8
SMALL = dict(vocab_size=V, num_hidden_layers=LAYERS, hidden_size=D, num_attention_heads=2, intermediate_size=32,
             max_position_embeddings=32)
GQA = dict(SMALL, num_key_value_heads=1)

# family -> (config, where its final norm lives: hidden_states[-1] = final_norm(block output))
FAMILIES = {
    "gpt2": (lambda: tf.GPT2Config(n_layer=LAYERS, n_embd=D, n_head=2, n_positions=32, vocab_size=V),
             "transformer.ln_f"),
    "gpt_neox": (lambda: tf.GPTNeoXConfig(**SMALL), "gpt_neox.final_layer_norm"),
    "llama": (lambda: tf.LlamaConfig(**GQA), "model.norm"),
    "opt": (lambda: tf.OPTConfig(num_hidden_layers=LAYERS, hidden_size=D, num_attention_heads=2, ffn_dim=32,
                                 max_position_embeddings=32, word_embed_proj_dim=D, vocab_size=V),
            "model.decoder.final_layer_norm"),
    "gpt_neo": (lambda: tf.GPTNeoConfig(num_layers=LAYERS, hidden_size=D, num_heads=2, vocab_size=V,
                                        attention_types=[[["global", "local"], 1], [["global"], 1]],
                                        max_position_embeddings=32), "transformer.ln_f"),
    "gptj": (lambda: tf.GPTJConfig(n_layer=LAYERS, n_embd=D, n_head=2, rotary_dim=4, n_positions=32, vocab_size=V),
             "transformer.ln_f"),
    "codegen": (lambda: tf.CodeGenConfig(n_layer=LAYERS, n_embd=D, n_head=2, rotary_dim=4, n_positions=32, n_ctx=32,
                                         vocab_size=V), "transformer.ln_f"),
    "bloom": (lambda: tf.BloomConfig(n_layer=LAYERS, hidden_size=D, n_head=2, vocab_size=V), "transformer.ln_f"),
    "falcon": (lambda: tf.FalconConfig(num_hidden_layers=LAYERS, hidden_size=D, num_attention_heads=2, vocab_size=V),
               "transformer.ln_f"),
    "mistral": (lambda: tf.MistralConfig(**GQA), "model.norm"),
    "qwen2": (lambda: tf.Qwen2Config(**GQA), "model.norm"),
    "qwen3": (lambda: tf.Qwen3Config(**GQA, head_dim=8), "model.norm"),
    "gemma": (lambda: tf.GemmaConfig(**GQA, head_dim=8), "model.norm"),
    "gemma2": (lambda: tf.Gemma2Config(**GQA, head_dim=8), "model.norm"),
    "phi": (lambda: tf.PhiConfig(**SMALL), "model.final_layernorm"),
    "phi3": (lambda: tf.Phi3Config(**GQA, pad_token_id=0), "model.norm"),
    "olmo": (lambda: tf.OlmoConfig(**GQA), "model.norm"),
    "stablelm": (lambda: tf.StableLmConfig(**GQA), "model.norm"),
    "mpt": (lambda: tf.MptConfig(n_layers=LAYERS, d_model=D, n_heads=2, max_seq_len=32, vocab_size=V),
            "transformer.norm_f"),
}
REQUIRED = ("gpt2", "gpt_neox", "llama", "opt")  # issue 20: these four at least, through extraction too


def save_random(folder, family: str, seed: int = 0) -> str:
    config = FAMILIES[family][0]()
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random init leaves some biases and norms at 0/1: perturb all, so no check is trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    return str(folder)


def module_at(model: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        model = getattr(model, part)
    return model


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (3, CTX), generator=torch.Generator().manual_seed(seed))


NAMES = {"gpt2": "GPT-2", "gpt_neox": "GPT-NeoX/Pythia", "llama": "Llama", "opt": "OPT", "gpt_neo": "GPT-Neo",
         "gptj": "GPT-J", "codegen": "CodeGen", "bloom": "BLOOM", "falcon": "Falcon", "mistral": "Mistral",
         "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma", "gemma2": "Gemma 2", "phi": "Phi", "phi3": "Phi-3",
         "olmo": "OLMo", "stablelm": "StableLM", "mpt": "MPT"}


def test_the_families_listed_are_the_families_tested():
    listed = {name for families in BLOCK_PATHS.values() for group in families.split(", ") for name in group.split("/")}
    listed.discard("remote-code models that keep their blocks there")
    tested = {name for family in FAMILIES for name in NAMES[family].split("/")}
    assert listed == tested


@pytest.mark.parametrize("family", FAMILIES)
def test_hooked_layer_is_the_output_of_block_l(tmp_path, family):
    model = load_model(save_random(tmp_path / family, family), where="config.subjects.x")
    ids = inputs()
    with torch.no_grad(), record_resid(model, list(range(LAYERS))) as cap:
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(hidden) == LAYERS + 1
    for layer in range(LAYERS - 1):  # hidden_states[0] is the embedding output: layer L is index L + 1
        torch.testing.assert_close(cap[layer], hidden[layer + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(cap[layer], hidden[layer], atol=1e-3)
    final_norm = module_at(model, FAMILIES[family][1])
    with torch.no_grad():  # the last hidden state is normed: the hook records the block's output before it
        torch.testing.assert_close(final_norm(cap[LAYERS - 1]), hidden[LAYERS], rtol=1e-5, atol=1e-5)
    # stopping the forward pass after the deepest recorded layer records the same values
    with torch.no_grad(), record_resid(model, [1], stop=True) as early:
        run_until_recorded(model, ids)
    torch.testing.assert_close(early[1], cap[1], rtol=0, atol=0)


@pytest.mark.parametrize("family", REQUIRED)
def test_extraction_and_splicing_per_family(tmp_path, family):
    model = load_model(save_random(tmp_path / "model", family), where="config.subjects.x")
    windows = np.asarray(torch.randint(0, V, (12, CTX), generator=torch.Generator().manual_seed(2)), dtype=np.int32)
    tokens = str(tmp_path / "tokens.zarr")
    write_token_store(tokens, windows, np.arange(8), np.arange(8, 12),
                      {"tokenizer": "none", "dataset": {}, "vocab_size": V, "eos_token_id": 0})
    out = str(tmp_path / "acts.zarr")
    extract(model, tokens, [0, 1], 8 * CTX, "float32", 3, 4, out, family, torch.device("cpu"))
    store = open_store(out)
    rows_window = store["window"][:]
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(windows).long(), output_hidden_states=True).hidden_states
    for layer in (0, 1):
        expected = hidden[layer + 1].numpy()[rows_window, store["position"][:]]
        np.testing.assert_allclose(store[f"L{layer}/x"][:], expected, rtol=0, atol=2e-6)
    assert store.attrs["d_model"] == D

    ids = torch.from_numpy(windows[:4]).long()
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with splice_resid(model, 1, lambda r: r.clone()):
            same = model(input_ids=ids).logits
        with splice_resid(model, 1, torch.zeros_like):
            zeroed = model(input_ids=ids).logits
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    assert (zeroed - clean).abs().max() > 1e-3


@pytest.mark.parametrize("family", ("gpt2", "llama"))
def test_torch_dtype_loads_and_hooks_in_float32(tmp_path, family):
    path = save_random(tmp_path / "model", family)
    full = load_model(path, torch_dtype="float32")
    half = load_model(path, torch_dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16 and next(full.parameters()).dtype == torch.float32
    ids = inputs()
    with torch.no_grad(), record_resid(full, [1]) as ref, record_resid(half, [1]) as got:
        full(input_ids=ids)
        half(input_ids=ids)
    assert got[1].dtype == torch.float32  # activations are float32 whatever the model runs in
    assert not torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[1], ref[1], rtol=0.05, atol=0.05)
    # a float32 replacement (the SAE) spliced into a bfloat16 model: cast back, not a dtype error
    weight = torch.eye(D) * 0.5
    with torch.no_grad(), splice_resid(half, 1, lambda r: r @ weight):
        assert torch.isfinite(half(input_ids=ids).logits).all()


def test_torch_dtype_auto_is_the_checkpoints_own(tmp_path):
    path = save_random(tmp_path / "model", "llama")
    load_model(path, torch_dtype="bfloat16").save_pretrained(tmp_path / "bf16")
    assert next(load_model(str(tmp_path / "bf16")).parameters()).dtype == torch.bfloat16  # default: auto
    assert next(load_model(str(tmp_path / "bf16"), torch_dtype="float32").parameters()).dtype == torch.float32


def test_loading_keys_reach_from_pretrained(tmp_path, monkeypatch):
    path = save_random(tmp_path / "model", "gpt2")
    seen = {}
    real = tf.AutoModelForCausalLM.from_pretrained

    def spy(name, **kwargs):
        seen.update(kwargs)
        return real(name, **{key: v for key, v in kwargs.items() if key != "revision"})

    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(path, "v1.0", torch_dtype="float16", trust_remote_code=True)
    assert seen["revision"] == "v1.0" and seen["trust_remote_code"] is True
    assert seen.get("dtype", seen.get("torch_dtype")) == torch.float16
    with pytest.raises(ValueError, match="torch_dtype must be one of"):
        load_model(path, torch_dtype="fp8")


def test_device_map_needs_accelerate_and_says_so(tmp_path):
    path = save_random(tmp_path / "model", "gpt2")
    try:
        import accelerate  # noqa: F401
    except ImportError:
        with pytest.raises(ModelLoadError, match=r"config\.subjects\.mine\.device_map: 'cpu' needs the accelerate"):
            load_model(path, where="config.subjects.mine", device_map="cpu")
    else:
        model = load_model(path, where="config.subjects.mine", device_map="cpu")
        assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("config", [
    lambda: tf.BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=32, is_decoder=True),  # a causal LM head whose blocks are elsewhere
    lambda: tf.T5Config(vocab_size=V, d_model=D, d_kv=8, d_ff=32, num_layers=2, num_heads=2),  # no causal LM
], ids=["bert", "t5"])
def test_unrecognized_blocks_name_the_key_and_list_the_families(tmp_path, config):
    cfg = config()
    model = (tf.AutoModelForCausalLM.from_config(cfg) if cfg.model_type == "bert"
             else tf.T5ForConditionalGeneration(cfg))
    model.save_pretrained(tmp_path / "model")
    with pytest.raises(UnsupportedModelError) as err:
        load_model(str(tmp_path / "model"), where="config.subjects.mine")
    text = str(err.value)
    assert text.startswith("config.subjects.mine.model: ")
    for family in ("GPT-2", "GPT-NeoX/Pythia", "Llama", "OPT"):
        assert family in text
    assert isinstance(err.value, ConfigError)


# ---- BOS handling (config.subjects.<name>.prepend_bos) ------------------------------------------------------


def word_tokenizer(folder, adds_bos: bool, bos: bool = True):
    """A word-level tokenizer whose own encoding starts with <s> (Llama-style) or not (GPT-2-style)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate("a b c d e f g h".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if bos else None, eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    return load_tokenizer(str(folder))


def test_window_bos_follows_the_setting_and_the_tokenizer(tmp_path):
    gpt2_like = word_tokenizer(tmp_path / "g", adds_bos=False)
    llama_like = word_tokenizer(tmp_path / "l", adds_bos=True)
    no_bos = word_tokenizer(tmp_path / "n", adds_bos=False, bos=False)
    assert window_bos(gpt2_like, False) is None and window_bos(llama_like, False) is None
    assert window_bos(gpt2_like, "auto") is None and window_bos(llama_like, "auto") == 1
    assert window_bos(gpt2_like, True) == 1 and window_bos(no_bos, "auto") is None
    with pytest.raises(ValueError, match=r"config\.subjects\.s\.prepend_bos: true, but the tokenizer has no bos"):
        window_bos(no_bos, True, "config.subjects.s")


def test_bos_windows_are_bos_then_the_stream(tmp_path):
    tok = word_tokenizer(tmp_path / "tok", adds_bos=True)
    texts = ["a b c d e f g h " * 3, "h g f e d c b a " * 2]
    plain = token_stream_windows(texts, tok, 6)
    with_bos = token_stream_windows(texts, tok, 6, bos=1)
    stream = np.concatenate([np.asarray(tok(t, add_special_tokens=False)["input_ids"] + [2]) for t in texts])
    assert plain.shape == (len(stream) // 6, 6) and with_bos.shape == (len(stream) // 5, 6)
    assert (with_bos[:, 0] == 1).all() and 1 not in plain
    np.testing.assert_array_equal(with_bos[:, 1:].reshape(-1), stream[: with_bos.shape[0] * 5])
    np.testing.assert_array_equal(plain.reshape(-1), stream[: plain.size])


def test_tokenize_records_prepend_bos(tmp_path):
    word_tokenizer(tmp_path / "tok", adds_bos=True)
    (tmp_path / "doc.txt").write_text("a b c d e f g h\n" * 40)
    dataset = {"path": "text", "data_files": [str(tmp_path / "doc.txt")], "seed": 0}
    for setting, expected in ((False, False), ("auto", True)):
        out = str(tmp_path / f"tokens_{setting}.zarr")
        attrs = tokenize(dataset, str(tmp_path / "tok"), 8, 16, out, prepend_bos=setting)
        assert attrs["prepend_bos"] is expected
        windows = open_store_windows(out)
        assert bool((windows[:, 0] == 1).all()) is expected


def open_store_windows(path: str) -> np.ndarray:
    from saescale.corpus import open_token_store

    return open_token_store(path)["windows"][:]


# ---- the keys in the config and on the command line --------------------------------------------------------


def test_subject_loading_keys_have_defaults_and_name_the_key():
    subj = validate({"subjects": {"s": {"model": "gpt2", "layers": [8]}}}, local_paths=False)["subjects"]["s"]
    assert (subj["torch_dtype"], subj["device_map"], subj["trust_remote_code"], subj["prepend_bos"]) == \
        ("auto", None, False, False)
    for key, bad in (("torch_dtype", "fp16"), ("prepend_bos", "yes"), ("trust_remote_code", 1), ("device_map", 3)):
        with pytest.raises(ConfigError, match=rf"config\.subjects\.s\.{key}: "):
            validate({"subjects": {"s": {"model": "gpt2", "layers": [8], key: bad}}}, local_paths=False)


def test_model_options_on_the_command_line():
    parser = cli.build_parser()
    base = ["evaluate", "--sae-dir", "s", "--activations", "a", "--model", "m", "--out", "o", "--layer", "1",
            "--spec", "{}"]
    args = parser.parse_args(base + ["--model-options", json.dumps({"torch_dtype": "bfloat16"})])
    assert cli.model_options(args.model_options) == {"torch_dtype": "bfloat16", "device_map": None,
                                                     "trust_remote_code": False}
    assert cli.model_options(parser.parse_args(base).model_options)["torch_dtype"] == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--model-options", '{"dtype": "bfloat16"}'])
