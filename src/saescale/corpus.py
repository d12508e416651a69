"""Text datasets -> fixed-length token windows (Zarr), split into train/eval by window.

The builtin corpus is the CPython standard library's own source (present wherever Python is), written
once as JSON lines and then loaded through `datasets.load_dataset("json", ...)`: the same code path as a
user's local files or a hub dataset.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from saescale.files import atomic_dir, replace_when_done, write_json_atomic
from saescale.integrity import CHECKSUM, open_checked, writing_every_chunk

from saescale.progress import Progress

log = logging.getLogger("saescale.corpus")

EOS_TOKEN = "<|endoftext|>"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "lib2to3", "turtledemo"}


def stdlib_files(root: Path | None = None) -> list[Path]:
    """CPython standard-library .py sources, without tests and installed packages, in a stable order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for p in root.rglob("*.py"):
        parts = p.relative_to(root).parts
        if any(part in _SKIP_DIRS or part.startswith("test") for part in parts[:-1]):
            continue
        if parts[-1].startswith("test_"):
            continue
        out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def build_builtin_corpus(out_jsonl: str | Path, out_info: str | Path) -> dict:
    """Write the stdlib corpus as JSON lines {"text", "path"} plus provenance (Python version, hash)."""
    import json

    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    digest = hashlib.sha256()
    n_bytes = 0
    with replace_when_done(out_jsonl) as tmp, tmp.open("w") as f:
        for p in files:
            text = p.read_text(encoding="utf-8", errors="replace")
            rel = p.relative_to(root).as_posix()
            digest.update(rel.encode() + b"\0" + text.encode())
            n_bytes += len(text.encode())
            f.write(json.dumps({"text": text, "path": rel}) + "\n")
    info = {
        "source": "CPython standard library (no tests, no site-packages)",
        "python_version": platform.python_version(),
        "stdlib_root": str(root),
        "n_files": len(files),
        "n_bytes": n_bytes,
        "sha256": digest.hexdigest(),
    }
    write_json_atomic(out_info, info)
    log.info("builtin corpus: %d files, %.1f MB, sha256 %s", len(files), n_bytes / 1e6, info["sha256"][:12])
    return info


def load_texts(dataset: dict, builtin_jsonl: str | None = None, where: str = "config.subjects.<name>"
               ) -> Iterable[str]:
    """Documents of the configured dataset, through `datasets.load_dataset` in every case."""
    import datasets

    if dataset["path"] == "builtin":
        if builtin_jsonl is None:
            raise ValueError("the builtin dataset needs the corpus file built by the 'corpus' rule")
        ds = datasets.load_dataset("json", data_files=str(builtin_jsonl), split="train")
    else:
        kwargs = {"name": dataset.get("name"), "split": dataset.get("split", "train")}
        if dataset.get("data_files") is not None:
            kwargs["data_files"] = dataset["data_files"]
        if dataset.get("streaming"):
            kwargs["streaming"] = True
        try:
            ds = datasets.load_dataset(dataset["path"], **kwargs)
        except Exception as exc:  # noqa: BLE001 -- datasets raises many types; all mean the same to a user
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"{where}.dataset: load_dataset({dataset['path']!r}, ...) failed ({type(exc).__name__}: {reason}). "
                "Offline, a hub dataset loads only from the local cache (HF_HOME); local files go in "
                "dataset.data_files with path 'text', 'json' or 'parquet'"
            ) from exc
    field = dataset.get("text_field", "text")
    cols = ds.column_names if not dataset.get("streaming") else None
    if cols is not None and field not in cols:
        raise ValueError(f"{where}.dataset.text_field: column '{field}' not in the dataset (columns: {cols})")
    return (row[field] for row in ds)


def _batched(it: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for x in it:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def window_bos(tokenizer, prepend_bos: bool | str, where: str = "config.subjects.<name>") -> int | None:
    """The token id put at position 0 of every window, or None (config.subjects.<name>.prepend_bos).

    false: none, windows are plain slices of the token stream (what Gao et al. do with GPT-2, method §A.1).
    true: the tokenizer's bos_token. auto: the bos_token only where the tokenizer itself starts every text with
    it (Llama, Mistral, Gemma, OPT), so the model sees inputs the way it was trained; not for GPT-2 or Pythia."""
    if prepend_bos is False:
        return None
    bos = tokenizer.bos_token_id
    if prepend_bos == "auto":
        first = tokenizer("a")["input_ids"][:1]
        return bos if bos is not None and first == [bos] else None
    if prepend_bos is not True:
        raise ValueError(f"{where}.prepend_bos: must be true, false or 'auto', not {prepend_bos!r}")
    if bos is None:
        raise ValueError(f"{where}.prepend_bos: true, but the tokenizer has no bos_token; set prepend_bos: false")
    return bos


def token_stream_windows(
    texts: Iterable[str], tokenizer, ctx_len: int, max_tokens: int | None = None,
    where: str = "config.subjects.<name>", bos: int | None = None,
) -> np.ndarray:
    """Concatenate documents separated by EOS and cut the stream into [n_windows, ctx_len] int32 windows.

    With a `bos` id (window_bos) each window is that token followed by the next ctx_len - 1 stream tokens:
    position 0 is then the BOS in every window, and `max_tokens` still counts stream tokens."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"{where}.model: the tokenizer has no eos_token; it is needed to separate documents")
    pieces: list[np.ndarray] = []
    total = text_tokens = 0
    progress = Progress(log, "tokenize", max_tokens or 0, "tokens")  # no total (no ETA) without max_tokens
    for batch in _batched(texts, 256):
        before = total
        for ids in tokenizer([t or "" for t in batch], add_special_tokens=False)["input_ids"]:
            arr = np.asarray(ids + [eos], dtype=np.int32)
            pieces.append(arr)
            total += len(arr)
            text_tokens += len(ids)
        progress.update(min(total, max_tokens or total) - min(before, max_tokens or before))
        if max_tokens is not None and total >= max_tokens:
            break
    if text_tokens == 0:
        raise ValueError(f"{where}.dataset: the dataset holds no text ({len(pieces)} documents, all empty); check "
                         "its data_files, split and text_field")
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    width = ctx_len - (bos is not None)
    n_windows = len(stream) // width
    windows = stream[: n_windows * width].reshape(n_windows, width)
    if bos is not None:
        windows = np.concatenate([np.full((n_windows, 1), bos, dtype=np.int32), windows], axis=1)
    return windows


def split_windows(n_windows: int, n_eval: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split by window: (train window ids, eval window ids), each in random order."""
    if n_eval >= n_windows:
        raise ValueError(f"eval_tokens asks for {n_eval} windows but the dataset has only {n_windows}; lower "
                         "the subject's eval_tokens or raise its dataset.max_tokens")
    perm = np.random.default_rng(seed).permutation(n_windows)
    return perm[n_eval:].astype(np.int64), perm[:n_eval].astype(np.int64)


def write_token_store(out: str | Path, windows: np.ndarray, train_ids: np.ndarray, eval_ids: np.ndarray,
                      attrs: dict) -> None:
    codecs = (ZstdCodec(level=0), *CHECKSUM)  # zarr's default compression, plus a checksum per chunk
    with atomic_dir(out) as tmp, writing_every_chunk():
        root = zarr.open_group(str(tmp), mode="w")
        root.create_array("windows", data=windows, chunks=(min(len(windows), 4096), windows.shape[1]),
                          compressors=codecs)
        root.create_array("train_ids", data=train_ids, compressors=codecs)
        root.create_array("eval_ids", data=eval_ids, compressors=codecs)
        root.attrs.update({**attrs, "windows_sha256": hashlib.sha256(windows.tobytes()).hexdigest(),
                           "n_windows": int(len(windows)), "n_train": int(len(train_ids)),
                           "n_eval": int(len(eval_ids)), "ctx_len": int(windows.shape[1]), "complete": True})


def context_limit(model_path: str, revision: str | None = None, trust_remote_code: bool = False) -> int | None:
    """The longest input the model at `model_path` takes (n_positions / max_position_embeddings), or None
    where there is no model config to read (the builtin tokenizer folder: its LM is trained at ctx_len)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return None


def open_token_store(path: str | Path) -> zarr.Group:
    """A complete token store whose reads are checked for damage (`saescale.integrity.Checked`)."""
    return open_checked(path, "tokenize", "token store")


def tokenize(dataset: dict, tokenizer_path: str, ctx_len: int, eval_tokens: int, out: str,
             builtin_jsonl: str | None = None, where: str = "config.subjects.<name>", prepend_bos: bool | str = False,
             revision: str | None = None, trust_remote_code: bool = False) -> dict:
    from saescale.subject import load_tokenizer

    tok = load_tokenizer(tokenizer_path, revision, where=where, trust_remote_code=trust_remote_code)
    bos = window_bos(tok, prepend_bos, where)
    limit = context_limit(tokenizer_path, revision, trust_remote_code)
    if limit is not None and ctx_len > limit:
        raise ValueError(f"{where}.ctx_len: {ctx_len} tokens per window, but the model {tokenizer_path} takes at "
                         f"most {limit} positions; lower ctx_len")
    windows = token_stream_windows(load_texts(dataset, builtin_jsonl, where), tok, ctx_len,
                                   dataset.get("max_tokens"), where, bos)
    n_eval = -(-eval_tokens // ctx_len)
    train_ids, eval_ids = split_windows(len(windows), n_eval, dataset.get("seed", 0))
    attrs = {"tokenizer": str(tokenizer_path), "dataset": dataset, "vocab_size": len(tok),
             "eos_token_id": tok.eos_token_id, "bos_token_id": bos, "prepend_bos": bos is not None}
    write_token_store(out, windows, train_ids, eval_ids, attrs)
    log.info("tokenized %d windows of %d tokens (%d train, %d eval)", len(windows), ctx_len,
             len(train_ids), len(eval_ids))
    return attrs
