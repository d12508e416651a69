"""The real loading path: from_pretrained on a saved random GPT-2, local text through datasets, Zarr store."""

import numpy as np
import pytest
import torch
import zarr

from saescale.store import extract, open_store, read_rows
from saescale.subject import load_model, record_resid

from helpers import tokenized_subject


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    root = tmp_path_factory.mktemp("subject")
    model_dir, _, tokens = tokenized_subject(root)
    return root, model_dir, tokens


def run_extract(model, tokens, out, layers=(0, 1), dtype="float16"):
    return extract(model, tokens, list(layers), 256, dtype, 4, 4, out, "test", torch.device("cpu"))


def test_tokenize_windows_and_split(subject):
    _, _, tokens = subject
    t = zarr.open_group(tokens, mode="r")
    assert t.attrs["complete"] and t.attrs["ctx_len"] == 16
    assert t["windows"].shape[1] == 16
    train, ev = set(t["train_ids"][:].tolist()), set(t["eval_ids"][:].tolist())
    assert not train & ev and len(ev) == 4 and len(train | ev) == t.attrs["n_windows"]


def test_extraction_matches_a_direct_forward_pass(subject):
    root_dir, model_dir, tokens = subject
    model = load_model(model_dir)
    out = str(root_dir / "acts.zarr")
    attrs = run_extract(model, tokens, out, dtype="float32")
    store = open_store(out)
    assert attrs["complete"] and attrs["n_train"] == 256 and attrs["n_eval"] == 64
    assert store["L1/x"].shape == (320, 32) and store["L1/x"].dtype == np.float32
    # row r is token `position` of window `window`: recompute it directly
    w, pos = int(store["window"][37]), int(store["position"][37])
    toks = zarr.open_group(tokens, mode="r")["windows"][w]
    assert int(store["token"][37]) == toks[pos]
    with torch.no_grad(), record_resid(model, [1]) as cap:
        model(input_ids=torch.from_numpy(toks[None]).long())
    assert np.allclose(store["L1/x"][37], cap[1][0, pos].numpy(), atol=1e-5)
    assert read_rows(store, 1, "eval").shape == (64, 32)


class Killed(Exception):
    pass


class DiesAfter(torch.nn.Module):
    """The model, but the process 'dies' after `calls` forward passes (as a killed job would)."""

    def __init__(self, model, calls):
        super().__init__()
        self.model, self.calls, self.config = model, calls, model.config
        self.transformer = model.transformer

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, **kw):
        self.calls -= 1
        if self.calls < 0:
            raise Killed
        return self.model(**kw)


def test_killed_extraction_resumes_and_never_looks_complete(subject, tmp_path):
    _, model_dir, tokens = subject
    model = load_model(model_dir)
    reference = str(tmp_path / "ref.zarr")
    run_extract(model, tokens, reference)
    out = str(tmp_path / "acts.zarr")
    with pytest.raises(Killed):
        run_extract(DiesAfter(model, 2), tokens, out)
    assert not (tmp_path / "acts.zarr").exists()
    partial = zarr.open_group(out + ".partial", mode="r")
    assert partial.attrs["complete"] is False and partial.attrs["chunks_done"] >= 1
    with pytest.raises(RuntimeError, match="not a complete"):
        open_store(out + ".partial")
    run_extract(model, tokens, out)
    a, b = open_store(out), open_store(reference)
    for name in ("L0/x", "L1/x", "token", "window", "position"):
        assert np.array_equal(a[name][:], b[name][:]), name


def test_a_partial_store_of_another_configuration_is_discarded(subject, tmp_path):
    _, model_dir, tokens = subject
    model = load_model(model_dir)
    out = str(tmp_path / "acts.zarr")
    with pytest.raises(Killed):
        run_extract(DiesAfter(model, 2), tokens, out, layers=(0,))
    run_extract(model, tokens, out, layers=(1,))
    assert open_store(out).attrs["layers"] == [1]


def test_overflowing_float16_is_refused_with_advice(subject, tmp_path):
    _, model_dir, tokens = subject
    model = load_model(model_dir)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1e8)  # |x| ~ 1e6, far past float16 max 65504
    with pytest.raises(ValueError, match="float32"):
        run_extract(model, tokens, str(tmp_path / "acts.zarr"))
    assert not (tmp_path / "acts.zarr").exists()


@pytest.mark.parametrize("in_memory_gb", [8.0, 0.0])  # in RAM, and streamed by chunks
def test_training_batches_cover_each_row_once_per_epoch_and_resume_exactly(subject, tmp_path, in_memory_gb):
    from saescale.store import batch_stream

    _, model_dir, tokens = subject
    out = str(tmp_path / "acts.zarr")
    run_extract(load_model(model_dir), tokens, out, dtype="float32")
    store = open_store(out)
    stream = batch_stream(store, 1, 32, seed=3, in_memory_max_gb=in_memory_gb, shuffle_chunks=2)
    assert stream.in_memory == (in_memory_gb > 0)
    it = stream.batches()
    epoch = np.concatenate([next(it) for _ in range(stream.steps_per_epoch)])
    rows = read_rows(store, 1, "train")
    assert epoch.dtype == np.float32 and epoch.shape == rows.shape
    # a permutation of the stored rows: every row exactly once
    assert np.array_equal(np.sort(epoch.view(np.uint32), axis=0), np.sort(rows.view(np.uint32), axis=0))
    assert not np.array_equal(epoch, rows)  # and shuffled
    later = [next(it) for _ in range(3)]
    resumed = stream.batches(start_step=stream.steps_per_epoch)
    for expected in later:
        assert np.array_equal(next(resumed), expected)


def identity_sae(d):
    """n = 2d latents [I; -I] with k = d: exactly one of x_i, -x_i is positive, so x_hat = x."""
    from saescale.sae.model import SparseAutoencoder

    sae = SparseAutoencoder(d, 2 * d, "topk", d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
    return sae


@pytest.fixture(scope="module")
def store32(subject, tmp_path_factory):
    _, model_dir, tokens = subject
    out = str(tmp_path_factory.mktemp("acts") / "acts.zarr")
    run_extract(load_model(model_dir), tokens, out, dtype="float32")
    return open_store(out)


def test_reconstruction_metrics_of_known_reconstructions(store32):
    from saescale.evaluate.reconstruction import reconstruction_metrics
    from saescale.normalize import normalize

    perfect = reconstruction_metrics(identity_sae(32), store32, 1, 50, torch.device("cpu"))
    assert perfect["fvu"] < 1e-10 and perfect["l0"] == pytest.approx(32, abs=0.01) and perfect["eval_tokens"] == 64
    assert perfect["dead_window_tokens"] == 64  # the dead count's window: every eval token (method §A.8)
    # an SAE that always outputs the eval mean (no latent ever active) scores FVU = 1 and is all dead
    mean_sae = identity_sae(32)
    x = normalize(torch.from_numpy(read_rows(store32, 1, "eval")))[0]
    with torch.no_grad():
        mean_sae.W_dec.zero_()
        mean_sae.b_enc.fill_(-1e6)
        mean_sae.b_pre.copy_(x.mean(dim=0))
    m = reconstruction_metrics(mean_sae, store32, 1, 50, torch.device("cpu"))
    assert m["fvu"] == pytest.approx(1.0, abs=1e-5) and m["dead_fraction"] == 1.0 and m["l0"] == 0


def test_splicing_a_perfect_reconstruction_leaves_the_loss_unchanged(subject, store32):
    from saescale.evaluate.downstream import downstream_metrics

    _, model_dir, _ = subject
    rows = slice(store32.attrs["n_train"], store32.attrs["n_train"] + store32.attrs["n_eval"])
    windows = store32["token"][rows].reshape(-1, 16)
    m = downstream_metrics(load_model(model_dir), 1, identity_sae(32), windows, 2, torch.device("cpu"))
    assert abs(m["delta_ce"]) < 1e-4 and m["kl_div_with_sae"] < 1e-6
    # a random model barely depends on its residual stream, but zeroing it must still change the output
    assert m["delta_ce_zero_ablation"] > 1e-4 and m["kl_div_with_ablation"] > 1e-4
    assert m["tokens"] == 4 * 15 and m["ce_loss_score"] == pytest.approx(1.0, abs=1e-3)


def test_the_builtin_lms_fused_gelu_is_gpt2s_tanh_gelu():
    # the builtin subject uses activation_function="gelu_pytorch_tanh" for speed; it must be GPT-2's gelu_new
    from transformers.activations import ACT2FN

    x = torch.linspace(-8, 8, 10001)
    assert torch.allclose(ACT2FN["gelu_pytorch_tanh"](x), ACT2FN["gelu_new"](x), atol=1e-6)


def test_prefetch_keeps_order_raises_the_producers_error_and_stops_when_abandoned():
    import threading

    from saescale.loader import prefetch

    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise OSError("chunk 7 unreadable")

    got = prefetch(failing())
    assert next(got) == 1
    with pytest.raises(OSError, match="chunk 7"):
        next(got)

    pulled = []

    def endless():
        i = 0
        while True:
            pulled.append(i)
            yield i
            i += 1

    it = prefetch(endless(), depth=2)
    assert next(it) == 0
    it.close()
    for t in threading.enumerate():
        if t.name == "saescale-prefetch":
            t.join(timeout=2)
    assert not any(t.name == "saescale-prefetch" for t in threading.enumerate())
    assert len(pulled) <= 5  # it ran at most `depth` (+ one in hand) ahead, then stopped


def test_the_cli_passes_the_subjects_loading_keys_and_bos(subject, tmp_path):
    """`saescale tokenize` / `extract` as the workflow calls them: prepend_bos reaches the windows, torch_dtype
    the model (bfloat16 activations differ from float32 ones, within bfloat16's precision)."""
    import json

    from saescale import cli

    root_dir, model_dir, tokens = subject
    dataset = {"path": "text", "data_files": [str(p) for p in sorted((root_dir / "text").glob("*.txt"))], "seed": 0}
    bos_tokens = str(tmp_path / "bos.zarr")
    cli.main(["tokenize", "--tokenizer", model_dir, "--out", bos_tokens, "--spec",
              json.dumps({"dataset": dataset, "ctx_len": 16, "eval_tokens": 64, "prepend_bos": True})])
    windows, plain = zarr.open_group(bos_tokens)["windows"][:], zarr.open_group(tokens)["windows"][:]
    bos = zarr.open_group(bos_tokens).attrs["bos_token_id"]
    assert (windows[:, 0] == bos).all() and not (plain[:, 0] == bos).all()
    assert np.array_equal(windows[:, 1:].reshape(-1)[:60], plain.reshape(-1)[:60])

    spec = {"model": "test", "revision": None, "layers": [1], "train_tokens": 256, "dtype": "float32",
            "batch_windows": 4, "chunk_windows": 4}
    for name, torch_dtype in (("f32", "float32"), ("bf16", "bfloat16")):
        cli.main(["extract", "--model", model_dir, "--tokens", tokens, "--out", str(tmp_path / f"{name}.zarr"),
                  "--spec", json.dumps({**spec, "torch_dtype": torch_dtype})])
    f32, bf16 = (open_store(str(tmp_path / f"{name}.zarr"))["L1/x"][:] for name in ("f32", "bf16"))
    assert not np.array_equal(f32, bf16)
    np.testing.assert_allclose(bf16, f32, atol=0.1 * np.abs(f32).max())
