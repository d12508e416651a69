"""Damaged data and unusable inputs: each is refused with a message naming the file or config key and what to
do, and the stage that refused writes nothing a later run could take for complete.

The malformed-config cases live in test_config.py; these are the ones only running a stage can find.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from saescale import cli
from saescale.corpus import tokenize
from saescale.integrity import DamagedStoreError
from saescale.sae.model import SparseAutoencoder
from saescale.store import extract, open_store, read_rows
from saescale.subject import ModelLoadError, load_model

from helpers import tokenized_subject

DATASET = {"path": "text", "name": None, "split": "train", "text_field": "text", "streaming": False,
           "max_tokens": None, "seed": 0}
WHERE = "config.subjects.tiny"


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """A saved random GPT-2 (n_positions 64), its token store, and a complete activation store."""
    root = tmp_path_factory.mktemp("bad_input")
    model_dir, files, tokens = tokenized_subject(root)
    acts = str(root / "acts.zarr")
    extract(load_model(model_dir), tokens, [1], 256, "float16", 4, 4, acts, "test", torch.device("cpu"))
    return root, model_dir, files, tokens, acts


def copy_store(src: str, tmp_path: Path) -> Path:
    dst = tmp_path / Path(src).name
    shutil.copytree(src, dst)
    return dst


def chunk_file(store: Path, array: str, index: int) -> Path:
    """The file of one row-chunk of a 1- or 2-d array (zarr v3 default chunk keys: c/<i>[/0])."""
    ndim = len(json.loads((store / array / "zarr.json").read_text())["shape"])
    return store / array / "c" / str(index) / Path(*["0"] * (ndim - 1))


def normalize_cli(store: Path, tmp_path: Path) -> Path:
    out = tmp_path / "norm.json"
    with pytest.raises(DamagedStoreError) as err:
        cli.main(["normalize", "--activations", str(store), "--out", str(out)])
    assert not out.exists()  # the stage failed before writing anything
    return err


# ---- damaged activation stores -------------------------------------------------------------------


def test_truncated_chunk_names_the_store_and_the_rule_to_rerun(subject, tmp_path):
    store = copy_store(subject[4], tmp_path)
    f = chunk_file(store, "L1/x", 1)
    f.write_bytes(f.read_bytes()[:100])
    err = normalize_cli(store, tmp_path)
    assert str(store) in str(err.value) and "L1/x" in str(err.value)
    assert "delete" in str(err.value) and "'extract' rule" in str(err.value)


def test_corrupted_chunk_is_caught_by_its_checksum(subject, tmp_path):
    store = copy_store(subject[4], tmp_path)
    f = chunk_file(store, "L1/x", 2)
    data = bytearray(f.read_bytes())
    data[40] ^= 0x01  # one flipped bit of a float16: a plausible value without the checksum
    f.write_bytes(bytes(data))
    err = normalize_cli(store, tmp_path)
    assert "checksum" in str(err.value) and "delete" in str(err.value)


def test_missing_chunk_file_is_not_read_as_zeros(subject, tmp_path):
    store = copy_store(subject[4], tmp_path)
    chunk_file(store, "L1/x", 0).unlink()
    with pytest.raises(DamagedStoreError, match=r"chunk files are missing \(L1/x: \d+/\d+ chunks\)"):
        open_store(store)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_activations_are_refused(subject, tmp_path, bad):
    store = copy_store(subject[4], tmp_path)
    x = zarr.open_array(str(store / "L1/x"), mode="r+")
    row = x[5]
    row[3] = bad
    x[5] = row  # rewritten through zarr: the checksum is valid, the value is not
    err = normalize_cli(store, tmp_path)
    assert "1 NaN/Inf values" in str(err.value) and "L1/x" in str(err.value)
    with pytest.raises(DamagedStoreError):
        read_rows(open_store(store), 1, "train")


def test_damaged_token_store_names_the_tokenize_rule(subject, tmp_path):
    _, model_dir, _, tokens, _ = subject
    store = copy_store(tokens, tmp_path)
    f = chunk_file(store, "windows", 0)
    f.write_bytes(f.read_bytes()[:-3])
    out = tmp_path / "acts.zarr"
    with pytest.raises(DamagedStoreError, match="'tokenize' rule"):
        extract(load_model(model_dir), str(store), [1], 256, "float16", 4, 4, str(out), "test", torch.device("cpu"))
    assert not out.exists()


def test_an_intact_store_reads_as_written(subject):
    """The checks cost no false alarms: the untouched store opens and reads every row."""
    rows = read_rows(open_store(subject[4]), 1, "train")
    assert rows.shape == (256, 32) and np.isfinite(rows).all()


# ---- SAE weights ------------------------------------------------------------------------------------


def saved_sae(folder: Path, n: int = 64, d: int = 32) -> Path:
    sae = SparseAutoencoder(d, n, "topk", 4)
    folder.mkdir(parents=True, exist_ok=True)
    sae.save(folder / "saescale_sae.safetensors")
    (folder / "saescale_sae.json").write_text(json.dumps(sae.config()))
    return folder


def test_sae_weights_of_the_wrong_shape_name_the_file_and_the_shapes(tmp_path):
    folder = saved_sae(tmp_path / "sae")
    cfg = json.loads((folder / "saescale_sae.json").read_text())
    (folder / "saescale_sae.json").write_text(json.dumps({**cfg, "n_latents": 128}))  # weights of another SAE
    with pytest.raises(ValueError) as err:
        SparseAutoencoder.load(folder / "saescale_sae.safetensors")
    msg = str(err.value)
    assert str(folder / "saescale_sae.safetensors") in msg and "W_enc: shape (64, 32), saescale_sae.json implies (128, 32)" in msg


def test_truncated_sae_weights_are_refused_by_name(tmp_path):
    folder = saved_sae(tmp_path / "sae")
    f = folder / "saescale_sae.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        SparseAutoencoder.load(f)


def test_an_sae_of_another_width_is_refused_before_evaluating(subject, tmp_path):
    """An SAE for another model's residual stream (an imported one, say) against this subject's activations."""
    _, model_dir, _, _, acts = subject
    folder = saved_sae(tmp_path / "wide", d=48)  # the subject is 32 wide
    out = tmp_path / "eval.json"
    with pytest.raises(ValueError, match=r"an SAE of d_model 48, but .* holds activations of width 32"):
        cli.main(["evaluate", "--sae-dir", str(folder), "--activations", acts, "--model", model_dir, "--layer", "1",
                  "--spec", "{}", "--out", str(out)])
    assert not out.exists()


# ---- models, tokenizers and datasets --------------------------------------------------------------


def test_unreachable_hub_model_offline_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "tokens.zarr"
    with pytest.raises(ModelLoadError) as err:
        tokenize({**DATASET, "data_files": []}, "saescale-test/not-on-this-machine", 16, 64, str(out), where=WHERE)
    assert f"{WHERE}.model" in str(err.value) and "save_pretrained" in str(err.value)
    assert not out.exists()


def test_unreachable_hub_dataset_offline_names_the_key(subject, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=rf"{WHERE}\.dataset: load_dataset\('saescale-test/no-such-dataset'"):
        tokenize({**DATASET, "path": "saescale-test/no-such-dataset"}, subject[1], 16, 64,
                 str(tmp_path / "tokens.zarr"), where=WHERE)


def test_ctx_len_longer_than_the_model_takes_names_ctx_len(subject, tmp_path):
    _, model_dir, files, _, _ = subject
    out = tmp_path / "tokens.zarr"
    with pytest.raises(ValueError, match=rf"{WHERE}\.ctx_len: 128 tokens per window, .* at most 64 positions"):
        tokenize({**DATASET, "data_files": files}, model_dir, 128, 256, str(out), where=WHERE)
    assert not out.exists()


def test_empty_dataset_is_refused(subject, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("\n\n")
    with pytest.raises(ValueError, match=rf"{WHERE}\.dataset: the dataset holds no text"):
        tokenize({**DATASET, "data_files": [str(empty / "a.txt")]}, subject[1], 16, 64, str(tmp_path / "t.zarr"),
                 where=WHERE)


def test_tokenizer_of_another_model_is_refused_before_extracting(subject, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, model_dir, _, tokens, _ = subject
    small = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    out = tmp_path / "acts.zarr"
    with pytest.raises(ValueError, match=rf"{WHERE}\.model: the token store holds token ids up to \d+, but the "
                                         r"model has embeddings for 100 tokens"):
        extract(small, tokens, [1], 256, "float16", 4, 4, str(out), "test", torch.device("cpu"), where=WHERE)
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_a_peers_folder_given_as_a_saescale_sae_names_the_import_command(tmp_path):
    """sparsify's layout (and saescale's before its own file names): cfg.json beside sae.safetensors."""
    from saescale.sae.model import sae_folder

    folder = tmp_path / "layers.2"
    folder.mkdir()
    (folder / "cfg.json").write_text("{}")
    (folder / "sae.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=f"a sparsify SAE folder .*`saescale import --src {folder} "
                                                "--format sparsify"):
        sae_folder(folder)
    (folder / "sae_weights.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="a saelens SAE folder"):
        sae_folder(folder)
    config, weights = sae_folder(saved_sae(tmp_path / "ours"))
    assert config["n_latents"] == 64 and weights.name == "saescale_sae.safetensors"
