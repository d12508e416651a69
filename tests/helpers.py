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
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, t in enumerate(TEXT):
        p = folder / f"doc{i}.txt"
        p.write_text((t + "\n") * copies)
        files.append(str(p))
    return files


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
    """Makes a `saescale.interpret.server` ChatServer note the Authorization header of every POST, so a test
    can tell that a key was sent; returns the list it appends to."""
    from saescale.interpret.server import ChatHandler

    seen: list[str | None] = []

    class RecordingHandler(ChatHandler):
        def do_POST(self) -> None:
            seen.append(self.headers.get("Authorization"))
            super().do_POST()

    server.RequestHandlerClass = RecordingHandler
    return seen
