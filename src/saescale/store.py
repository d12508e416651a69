"""The Zarr activation store: a resumable, chunk-aligned writer and fast readers for training.

Layout of data/activations/{subject}.zarr (one group per subject, rows aligned across layers):
    token [N] int32, window [N] int32, position [N] int16      which token each row is
    L{layer}/x [N, d] float16|float32                          resid_post of block `layer`
    attrs: model, layers, site, dtype, ctx_len, n_train, n_eval (train rows first), complete, ...

Rows are written a whole chunk at a time (concurrent or partial chunk writes lose data in zarr 3), to
`<store>.partial`; `chunks_done` records progress so a killed job resumes, and only a finished store is
renamed into place with complete=True. Every chunk carries a CRC32C checksum and readers check that
every chunk is present and every value finite (`saescale.integrity`), so a damaged store is reported by
name, never trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import zarr

from saescale.corpus import open_token_store
from saescale.files import atomic_dir
from saescale.integrity import CHECKSUM, open_checked, writing_every_chunk
from saescale.loader import InMemoryBatches, StreamedBatches

log = logging.getLogger("saescale.store")

SITE = "resid_post"


def _fingerprint(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_windows(tokens: zarr.Group, train_tokens: int, where: str = "config.subjects.<name>"
                 ) -> tuple[np.ndarray, int, int]:
    """Window ids to extract (train first, then eval) and the row counts of both splits."""
    ctx = tokens.attrs["ctx_len"]
    n_train_windows = -(-train_tokens // ctx)
    train_ids = tokens["train_ids"][:]
    if n_train_windows > len(train_ids):
        raise ValueError(
            f"{where}.train_tokens: {train_tokens} requested but the token store has only "
            f"{len(train_ids) * ctx} train tokens; lower it, or raise {where}.dataset.max_tokens / use a larger dataset"
        )
    eval_ids = tokens["eval_ids"][:]
    ids = np.concatenate([train_ids[:n_train_windows], eval_ids])
    return ids, n_train_windows * ctx, len(eval_ids) * ctx


def check_model_fits(model, tokens: zarr.Group, where: str) -> None:
    """Token ids past the embedding table or windows past the position table would fail (or, on GPU, read
    garbage) deep inside the forward pass: say which config key is wrong before extracting anything."""
    n_vocab = model.get_input_embeddings().num_embeddings
    if tokens.attrs.get("vocab_size", 0) > n_vocab:  # a tokenizer larger than the model: are ids out of range?
        top = max(int(chunk.max()) for chunk in _row_blocks(tokens["windows"]))
        if top >= n_vocab:
            raise ValueError(
                f"{where}.model: the token store holds token ids up to {top}, but the model has embeddings for "
                f"{n_vocab} tokens: the tokenizer ({tokens.attrs.get('tokenizer')}) does not belong to this model. "
                "Give the model folder its own tokenizer files (save_pretrained of both)"
            )
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and tokens.attrs["ctx_len"] > limit:
        raise ValueError(f"{where}.ctx_len: {tokens.attrs['ctx_len']} tokens per window, but the model takes at "
                         f"most {limit} positions; lower ctx_len")


def _row_blocks(array, rows: int = 1 << 16) -> Iterator[np.ndarray]:
    for i in range(0, array.shape[0], rows):
        yield array[i:i + rows]


def extract(model, tokens_path: str, layers: list[int], train_tokens: int, dtype: str, batch_windows: int,
            chunk_windows: int, out: str, model_name: str, device: torch.device, model_digest: str = "",
            where: str = "config.subjects.<name>", code: str = "") -> dict:
    """Record resid_post of every configured layer for the planned windows: one forward pass per batch, with
    a writer thread storing each chunk while the next one runs through the model.

    A `.partial` store is resumed only when model weights (`model_digest`), token windows, settings and the
    extraction `code` version all match, so a resumed store never mixes chunks of two models, datasets or
    versions of the code."""
    from saescale.subject import record_resid, run_until_recorded

    tokens = open_token_store(tokens_path)
    ctx = tokens.attrs["ctx_len"]
    check_model_fits(model, tokens, where)
    window_ids, n_train, n_eval = plan_windows(tokens, train_tokens, where)
    n_rows = n_train + n_eval
    d = model.config.hidden_size
    chunk_rows = chunk_windows * ctx
    params = {"model": model_name, "model_digest": model_digest, "code": code, "tokens": dict(tokens.attrs),
              "layers": layers, "dtype": dtype, "n_train": n_train, "n_eval": n_eval, "chunk_rows": chunk_rows, "d": d}
    fp = _fingerprint(params)

    with atomic_dir(out, keep_partial=True) as partial, writing_every_chunk():  # renamed into place when complete
        root = _open_partial(partial, fp)
        if root is None:
            root = _create_store(partial, params, fp, layers, n_rows, d, chunk_rows, dtype)
        start_chunk = root.attrs["chunks_done"]
        if start_chunk:
            log.info("resuming extraction at chunk %d", start_chunk)
        all_windows = tokens["windows"]
        n_chunks = -(-len(window_ids) // chunk_windows)
        np_dtype = np.dtype(dtype)

        def write(c: int, ids: np.ndarray, toks: np.ndarray, per_layer: dict[int, list[np.ndarray]]) -> None:
            """Cast, check and store one chunk, then record it as done (chunks are written in order)."""
            rows = slice(c * chunk_rows, c * chunk_rows + len(ids) * ctx)
            for layer in layers:
                x = np.concatenate(per_layer[layer]).astype(np_dtype)
                if not np.isfinite(x).all():
                    raise ValueError(
                        f"layer {layer}: activations overflow {dtype} (max |x| = "
                        f"{np.abs(np.concatenate(per_layer[layer])).max():.3g}); set {where}.dtype: float32"
                    )
                root[f"L{layer}/x"][rows] = x
            root["token"][rows] = toks.reshape(-1)
            root["window"][rows] = np.repeat(ids, ctx).astype(np.int32)
            root["position"][rows] = np.tile(np.arange(ctx, dtype=np.int16), len(ids))
            root.attrs["chunks_done"] = c + 1

        t0 = time.time()
        # one writer thread, one chunk behind: chunk c is cast, checked and written while chunk c + 1 runs
        # through the model (a write error surfaces at the next chunk or at the end)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="saescale-extract-writer") as writer:
            pending = None
            for c in range(start_chunk, n_chunks):
                ids = window_ids[c * chunk_windows:(c + 1) * chunk_windows]
                order = np.argsort(ids)  # zarr reads sorted indices fastest; restore the planned order after
                toks = np.empty((len(ids), ctx), dtype=np.int32)
                toks[order] = all_windows.oindex[ids[order], :]
                per_layer = {layer: [] for layer in layers}
                with torch.no_grad(), record_resid(model, layers, stop=True) as captured:
                    for b in range(0, len(ids), batch_windows):
                        run_until_recorded(model, torch.from_numpy(toks[b:b + batch_windows]).long().to(device))
                        for layer in layers:
                            per_layer[layer].append(captured[layer].float().reshape(-1, d).cpu().numpy())
                if pending is not None:
                    pending.result()
                pending = writer.submit(write, c, ids, toks, per_layer)
                done = (c + 1 - start_chunk) * chunk_rows
                log.info("extracted chunk %d/%d (%.0f tokens/s)", c + 1, n_chunks, done / max(time.time() - t0, 1e-9))
            if pending is not None:
                pending.result()
        elapsed = time.time() - t0
        root.attrs.update({"complete": True, "extract_seconds": elapsed})
        attrs = dict(root.attrs)
    return attrs


def _open_partial(partial: Path, fp: str) -> zarr.Group | None:
    """A partial store from a killed run with the same inputs is resumed; anything else is discarded."""
    if not partial.exists():
        return None
    try:
        root = zarr.open_group(str(partial), mode="r+")
        if root.attrs.get("fingerprint") == fp:
            return root
    except Exception:  # an unreadable leftover is just discarded
        pass
    log.info("discarding a partial store from a different configuration: %s", partial)
    shutil.rmtree(partial)
    return None


def _create_store(partial: Path, params: dict, fp: str, layers: list[int], n_rows: int, d: int,
                  chunk_rows: int, dtype: str) -> zarr.Group:
    root = zarr.open_group(str(partial), mode="w")
    for name, dt in (("token", "int32"), ("window", "int32"), ("position", "int16")):
        root.create_array(name, shape=(n_rows,), chunks=(chunk_rows,), dtype=dt, compressors=CHECKSUM)
    for layer in layers:
        # activations barely compress (notes/snakemake.md section 8): stored raw, with a checksum per chunk
        g = root.create_group(f"L{layer}")
        g.create_array("x", shape=(n_rows, d), chunks=(chunk_rows, d), dtype=dtype, compressors=CHECKSUM,
                       dimension_names=("token", "d_model"))
        g.attrs.update({"layer": layer, "site": SITE})
    root.attrs.update({"model": params["model"], "layers": layers, "site": SITE, "dtype": dtype,
                       "ctx_len": params["tokens"]["ctx_len"], "d_model": d, "n_train": params["n_train"],
                       "n_eval": params["n_eval"], "n_rows": n_rows, "chunk_rows": chunk_rows,
                       "dataset": params["tokens"].get("dataset"), "tokenizer": params["tokens"].get("tokenizer"),
                       "fingerprint": fp, "chunks_done": 0, "complete": False})
    return root


# ---- reading ---------------------------------------------------------------------------------------


def open_store(path: str | Path) -> zarr.Group:
    """A complete activation store whose reads are checked for damage (`saescale.integrity.Checked`)."""
    return open_checked(path, "extract", "activation store")


def split_rows(root: zarr.Group, split: str) -> slice:
    n_train, n_eval = root.attrs["n_train"], root.attrs["n_eval"]
    return slice(0, n_train) if split == "train" else slice(n_train, n_train + n_eval)


def iter_chunks(root: zarr.Group, layer: int, split: str, limit: int | None = None) -> Iterator[np.ndarray]:
    """Rows of one split for one layer, one stored chunk at a time (fast sequential reads)."""
    rows = split_rows(root, split)
    stop = rows.stop if limit is None else min(rows.stop, rows.start + limit)
    x = root[f"L{layer}/x"]
    step = x.chunks[0]
    for i in range(rows.start, stop, step):
        yield x[i:min(i + step, stop)]


def read_rows(root: zarr.Group, layer: int, split: str, limit: int | None = None) -> np.ndarray:
    """All rows of one split for one layer, in memory: only for splits known to fit."""
    return np.concatenate(list(iter_chunks(root, layer, split, limit)))


ChunkShuffledBatches = StreamedBatches  # the streamed loader's former name


def batch_stream(root: zarr.Group, layer: int, batch_size: int, seed: int, in_memory_max_gb: float,
                 shuffle_chunks: int) -> InMemoryBatches | StreamedBatches:
    """Training batches of one layer's train split (`saescale.loader`): in RAM when they fit under
    in_memory_max_gb, else streamed from the store."""
    array, rows = root[f"L{layer}/x"], split_rows(root, "train")
    # held in the store's dtype (float16 halves the RAM); the trainer casts each batch to float32
    nbytes = (rows.stop - rows.start) * array.shape[1] * array.dtype.itemsize
    if nbytes <= in_memory_max_gb * 2**30:
        return InMemoryBatches(read_rows(root, layer, "train"), batch_size, seed)
    return StreamedBatches(array, rows, batch_size, seed, shuffle_chunks)
