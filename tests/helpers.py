"""Builders for tests: a random GPT-2 saved in Hugging Face format, with a tokenizer trained on local text."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "import os\nprint(os.getcwd())\n",
    "Sparse autoencoders find features in superposition. " * 4,
]


def write_text_files(folder: Path, copies: int = 40) -> list[str]:
    return write_texts(folder, TEXT, copies)


def random_gpt2(folder: Path, text_files: list[str], n_layer: int = 2, n_embd: int = 32) -> str:
    """A randomly initialized GPT2LMHeadModel + byte-level BPE tokenizer, saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from saescale.subject import load_tokenizer, train_tokenizer

    corpus = folder / "corpus.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    corpus.write_text("".join(json.dumps({"text": Path(f).read_text()}) + "\n" for f in text_files))
    train_tokenizer(str(corpus), 300, str(folder))
    tok = load_tokenizer(str(folder))
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=n_embd, n_layer=n_layer, n_head=2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return str(folder)


def write_texts(folder: Path, texts: list[str], copies: int = 40) -> list[str]:
    """One file per text, the text repeated `copies` times: a local corpus for the `text` loader."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, t in enumerate(texts):
        p = folder / f"doc{i}.txt"
        p.write_text((t + "\n") * copies)
        files.append(str(p))
    return files


def record_authorization(server) -> list[str | None]:
    """The Authorization header of every POST the test LLM endpoint (test_autointerp.serving) received."""
    return server.authorizations


def tokenized_subject(root: Path, ctx_len: int = 16, eval_tokens: int = 64) -> tuple[str, list[str], str]:
    """A saved random GPT-2 on local text files and its token store: (model folder, text files, token store)."""
    from saescale.corpus import tokenize

    files = write_text_files(root / "text")
    model_dir = random_gpt2(root / "model", files)
    tokens = str(root / "tokens.zarr")
    dataset = {"path": "text", "name": None, "split": "train", "text_field": "text", "streaming": False,
               "max_tokens": None, "seed": 0, "data_files": files}
    tokenize(dataset, model_dir, ctx_len, eval_tokens, tokens)
    return model_dir, files, tokens


def side_venv(venv: Path, packages: list[str], imports: str, override_env: str) -> str:
    """The python of a venv that sees this environment (--system-site-packages) plus `packages` from PyPI,
    built once and reused while `imports` still imports; `$override_env` names another python instead.
    Skips the test, saying why, when PyPI cannot be reached."""
    import os
    import subprocess
    import sys

    import pytest

    if os.environ.get(override_env):
        return os.environ[override_env]
    python = venv / "bin/python"
    check = [str(python), "-c", f"import {imports}"]
    if not python.exists() or subprocess.run(check, capture_output=True).returncode != 0:
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--clear", str(venv)], check=True)
        res = subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"could not install {packages} from PyPI into {venv}: {res.stderr[-500:]}")
    return str(python)
