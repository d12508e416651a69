"""Modeled wall time of a preset (default workflow/configs/gpt2-small.yaml) on one H100 SXM 80 GB.

    nice -n 5 python benchmarks/h100_model.py            # ~3-4 min on 2 cores: measures, then models
    python benchmarks/h100_model.py --quick              # smaller measurements, ~1 min
    python benchmarks/h100_model.py --cpu-smoke          # tiny measurements: checks the script (~15 s)

Nothing here ran on a GPU. Each stage's time is FLOP and byte counts at the preset's shapes divided by the
stated H100 rates (ASSUMED), plus host work that this script measures on this machine at scaled-down shapes
through the pipeline's own code (the streamed loader, layer_stats, the token-store reads of extraction, the
geometry random reference, the CSR conversion of interpret, N2G's host side), divided by --host-speedup.
The code is modeled as it is now. The preset is read as a complete config (`load_config`: the preset plus
the schema defaults, nothing from config.yaml). Writes a Markdown table and benchmarks/out/h100_model.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CHUNK_ROWS = 32768  # the preset's chunk_windows 512 x ctx_len 64: one stored chunk of the activation store
TOKEN_CHUNK = 4096  # windows per chunk of the token store (corpus.write_token_store)


@dataclass(frozen=True)
class H100:
    """ASSUMED device and host rates (none measured on a GPU)."""
    bf16_tflops: float = 400.0  # dense bf16 GEMM, effective (989 peak)
    fp32_tflops: float = 40.0  # fp32 GEMM: TF32 is off in PyTorch by default and nothing here turns it on
    hbm_gbs: float = 2000.0  # streaming / row-gather kernels, effective (3350 peak)
    h2d_pageable_gbs: float = 12.0  # from pageable host memory: staged by the driver, serialized with the step
    h2d_pinned_gbs: float = 40.0  # PCIe Gen5 x16 from pinned memory (not used by the code today)
    d2h_gbs: float = 12.0  # .cpu() into pageable memory
    launch_ms: float = 3.0  # kernel launches + the per-step dead.nonzero() sync of a training step
    job_start_s: float = 8.0  # CUDA context + GPT-2 weights from the local HF cache, on top of measured imports
    disk_gbs: float = 2.0  # local NVMe: the 154 GB store does not stay in the page cache
    download_mbs: float = 50.0  # streaming OpenWebText from the hub


GPT2 = {"d": 768, "blocks": 12, "vocab": 50257}


def gpt2_flops_per_token(blocks: int, head: bool, ctx: int = 64) -> float:
    d = GPT2["d"]
    per_block = 24 * d * d + 4 * ctx * d  # 12 d^2 weights x 2, plus attention scores and mixing
    return blocks * per_block + (2 * d * GPT2["vocab"] if head else 0)


# ---- host measurements (this machine, the pipeline's own code) ---------------------------------------


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def make_store(path: Path, n_chunks: int, d: int = 768, eval_chunks: int = 1, layer: int = 8,
               chunk_rows: int = CHUNK_ROWS) -> list[float]:
    """A complete float16 activation store in the pipeline's layout (store._create_store), `n_chunks` train
    chunks + `eval_chunks` eval chunks of `chunk_rows` rows (the preset's: CHUNK_ROWS). Returns the seconds per chunk of the extract
    writer's work (cast to float16, isfinite, checksummed write of x, token, window, position)."""
    from saescale.integrity import writing_every_chunk
    from saescale.store import _create_store

    n_rows = (n_chunks + eval_chunks) * chunk_rows
    params = {"model": "synthetic", "tokens": {"ctx_len": 64}, "n_train": n_chunks * chunk_rows,
              "n_eval": eval_chunks * chunk_rows}
    rng = np.random.default_rng(0)
    block = rng.standard_normal((chunk_rows, d), dtype=np.float32) * 3
    seconds = []
    with writing_every_chunk():
        root = _create_store(path, params, "synthetic", [layer], n_rows, d, chunk_rows, "float16")
        for c in range(n_chunks + eval_chunks):
            rows = slice(c * chunk_rows, (c + 1) * chunk_rows)
            t0 = time.perf_counter()
            x = (block + c).astype(np.float16)
            assert np.isfinite(x).all()
            root[f"L{layer}/x"][rows] = x
            root["token"][rows] = np.zeros(chunk_rows, np.int32)
            root["window"][rows] = np.repeat(np.arange(chunk_rows // 64, dtype=np.int32), 64)
            root["position"][rows] = np.tile(np.arange(64, dtype=np.int16), chunk_rows // 64)
            seconds.append(time.perf_counter() - t0)
        root.attrs.update({"complete": True})
    return seconds


def measure_loader(store: Path, batch: int, epochs: int, layer: int = 8) -> dict:
    """Chunk reads through integrity.Checked and the streamed loader (ChunkShuffledBatches, its prefetch
    thread) of the preset: in_memory_max_gb is exceeded, so it streams."""
    from saescale.store import batch_stream, open_store

    root = open_store(store)
    x = root[f"L{layer}/x"]
    rows = x.chunks[0]
    scale = CHUNK_ROWS / rows  # per-chunk costs are reported for the preset's 32,768-row chunk
    n = x.shape[0] // rows
    for c in range(n):  # page cache warm: the disk is modeled separately
        x._node[c * rows:(c + 1) * rows]
    starts = [c * rows for c in range(min(n, 4))]
    checked = timed(lambda: [x[s:s + rows] for s in starts], 2)
    raw = timed(lambda: [x._node[s:s + rows] for s in starts], 2)
    chunk = x._node[0:rows]
    finite = timed(lambda: np.isfinite(chunk).all(), 3)
    stream = batch_stream(root, layer, batch, 0, 0.0, 8)
    assert not stream.in_memory
    it = stream.batches(0)
    next(it)  # fills the first shuffle buffer
    per_batch = []
    for _ in range(stream.steps_per_epoch * epochs - 1):
        t0 = time.perf_counter()
        next(it)
        per_batch.append(time.perf_counter() - t0)
    del it
    per_batch.sort()
    median = per_batch[len(per_batch) // 2]
    return {"batch": batch, "batches_timed": len(per_batch), "s_per_batch": per_batch,
            "rows_per_s": batch * len(per_batch) / sum(per_batch), "median_rows_per_s": batch / median,
            "chunk_read_checked_s": scale * min(checked) / len(starts),
            "chunk_read_raw_s": scale * min(raw) / len(starts), "isfinite_s": scale * min(finite)}


def measure_normalize(store: Path, chunks: int, layer: int = 8) -> dict:
    """normalize's layer_stats per stored chunk (read, normalize, float64 sums), apart from its one-off
    geometric median: the slope between a run over 1 chunk and one over `chunks` chunks."""
    from saescale.normalize import layer_stats
    from saescale.store import iter_chunks, open_store

    root = open_store(store)
    chunk_rows = root[f"L{layer}/x"].chunks[0]

    def run(c: int) -> float:
        rows = c * chunk_rows
        return min(timed(lambda: layer_stats(iter_chunks(root, layer, "train", limit=rows), rows), 2))

    one, many = run(1), run(chunks)
    per_chunk = (many - one) / (chunks - 1)
    return {"chunks": chunks, "s_per_chunk": per_chunk * CHUNK_ROWS / chunk_rows, "fixed_s": max(0.0, one - per_chunk)}


def measure_token_reads(tmp: Path, n_windows: int, repeats: int) -> dict:
    """Extraction's token read: 512 window ids in random order, sorted, through oindex of the token store."""
    from saescale.corpus import open_token_store, write_token_store

    rng = np.random.default_rng(0)
    windows = np.minimum(rng.zipf(1.2, size=(n_windows, 64)), 50256).astype(np.int32)  # token-like entropy
    perm = rng.permutation(n_windows)
    write_token_store(tmp / "tok.zarr", windows, perm[1024:].astype(np.int64), perm[:1024].astype(np.int64),
                      {"ctx_len": 64})
    tok = open_token_store(tmp / "tok.zarr")
    all_windows, train_ids = tok["windows"], tok["train_ids"][:]
    per_touched = []
    for c in range(repeats):
        ids = train_ids[c * 512:(c + 1) * 512]
        order = np.argsort(ids)
        t0 = time.perf_counter()
        out = np.empty((len(ids), 64), np.int32)
        out[order] = all_windows.oindex[ids[order], :]
        per_touched.append((time.perf_counter() - t0) / len(np.unique(ids // TOKEN_CHUNK)))
    return {"token_windows": n_windows, "s_per_token_chunk": float(np.median(per_touched)),
            "samples": per_touched}


def measure_geometry_block(n: int, repeats: int) -> dict:
    """One block of geometry.random_reference on one CPU thread (the cli default --threads 1): a [2^25/n, n]
    similarity block; every block holds the same 2^25 entries whatever n is."""
    from saescale.evaluate.geometry import nearest_neighbour_cosines

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        t_randn = timed(lambda: torch.randn(n, 768, generator=g), 1)[0]
        unit = torch.randn(n, 768, generator=g)
        block = min(n, (1 << 25) // n)
        part = unit[:block * repeats]
        # nearest_neighbour_cosines on the first rows against all n: block the same way, time per block
        t0 = time.perf_counter()
        for start in range(0, repeats * block, block):
            sims = part[start:start + block] @ unit.T
            sims.max(dim=1)
        per_block = (time.perf_counter() - t0) / repeats
        t_small = timed(lambda: nearest_neighbour_cosines(unit[:2048]), 1)[0]
    finally:
        torch.set_num_threads(threads)
    return {"n": n, "block_rows": block, "s_per_block": per_block * (1 << 25) / (block * n),
            "randn_s_per_element": t_randn / (n * 768), "nn_2048_s": t_small}


def measure_csr(n: int, k: int, repeats: int) -> dict:
    """interpret.examples.encode_split's host side: scipy.sparse.csr_matrix of each dense [256, n] float32
    code batch, then vstack + tocsc of all batches (per stored nonzero)."""
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    dense = np.zeros((256, n), np.float32)
    for r in range(256):
        dense[r, rng.choice(n, k, replace=False)] = 1.0
    t = timed(lambda: sp.csr_matrix(dense), repeats)
    parts = [sp.csr_matrix(dense)] * 16
    t_csc = min(timed(lambda: sp.vstack(parts).tocsc(), 2))
    return {"shape": [256, n], "k": k, "s_per_element": min(t) / dense.size,
            "tocsc_s_per_nonzero": t_csc / (16 * 256 * k), "repeats_s": t}


def measure_n2g(latents: int, windows: int) -> dict:
    """N2G's host side at the preset's settings (16 examples, max_suffix 16, batch 1024) with a stand-in act_fn
    (full activation from suffix length 3): queries per example and host seconds per query; and C.6's
    predict_codes per explanation and window."""
    from saescale.interpret.n2g import build_explanations, predict_codes

    rng = np.random.default_rng(0)
    toks = np.minimum(rng.zipf(1.2, size=(windows, 64)), 50256).astype(np.int64)
    examples = {lat: [(toks[rng.integers(windows)], int(rng.integers(8, 64)), 1.0) for _ in range(16)]
                for lat in range(latents)}
    rows = {"queries": 0, "tokens": 0, "batches": 0}

    def act_fn(tokens, lengths, lat):
        rows["queries"] += len(lengths)
        rows["tokens"] += tokens.numel()
        rows["batches"] += 1
        return torch.where(lengths >= 3, 1.0, 0.1).float()

    t0 = time.perf_counter()
    expl = build_explanations(act_fn, examples, 0, max_suffix=16, batch_size=1024)
    host = time.perf_counter() - t0
    t0 = time.perf_counter()
    predict_codes(expl, toks, latents)
    pred = time.perf_counter() - t0
    examples_n = 16 * latents
    return {"latents": latents, "queries_per_example": rows["queries"] / examples_n,
            "tokens_per_query": rows["tokens"] / rows["queries"], "host_s_per_query": host / rows["queries"],
            "predict_s_per_latent_window": pred / (latents * windows)}


def measure_quantile(elements: int) -> dict:
    """progressive.threshold_grid: np.quantile of 16 levels over [2048, n] scores on the host."""
    x = np.random.default_rng(0).standard_normal(elements).astype(np.float32)
    q = np.linspace(0.9, 0.9999, 16)
    t = timed(lambda: np.quantile(x, q), 2)
    return {"elements": elements, "s_per_element": min(t) / elements}


def measure_tokenizer(tmp: Path, max_bytes: int) -> dict:
    """corpus.token_stream_windows with a byte-level BPE (the builtin tokenizer's kind, vocab 4096) over
    Python sources: a stand-in for GPT-2's BPE on OpenWebText (no hub here)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from saescale.corpus import token_stream_windows

    texts, size = [], 0
    for p in sorted(Path(os.path.dirname(json.__file__)).parent.glob("*.py")):
        t = p.read_text(errors="ignore")
        texts.append(t)
        size += len(t.encode())
        if size > max_bytes:
            break
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts[:20], vocab_size=4096, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    t0 = time.perf_counter()
    w = token_stream_windows(texts, tok, 64)
    dt = time.perf_counter() - t0
    return {"bytes": size, "tokens": int(w.size), "tokens_per_s": w.size / dt, "bytes_per_token": size / w.size}


def measure_imports(runs: int) -> float:
    """Python start-up and imports of a GPU job (torch, transformers, scipy, zarr, the saescale stages)."""
    code = ("import torch, transformers, scipy.sparse, zarr; from transformers import AutoModelForCausalLM; "
            "import saescale.cli, saescale.store, saescale.interpret.stage, saescale.evaluate.probes")
    best = math.inf
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        best = min(best, time.perf_counter() - t0)
    return best


SIZES = {  # (store chunks, chunk rows, batch, epochs, normalize chunks, token windows, token repeats, geometry n,
    #  geometry blocks, CSR n, CSR repeats, N2G latents, N2G windows, quantile elements, BPE bytes, import runs)
    "full": (12, CHUNK_ROWS, 131072, 3, 6, 400_000, 6, 1 << 15, 3, 1 << 16, 4, 128, 2048, 1 << 24, 4 << 20, 2),
    "quick": (4, CHUNK_ROWS, 65536, 2, 3, 60_000, 3, 1 << 15, 1, 1 << 14, 2, 32, 256, 1 << 21, 1 << 20, 1),
    "smoke": (6, 2048, 4096, 2, 3, 12_000, 2, 1 << 11, 1, 1 << 12, 1, 8, 64, 1 << 16, 1 << 18, 1),
}


def measure(mode: str) -> dict:
    """Every host measurement the model rests on, at the shapes of SIZES[mode] (smoke: only checks the script)."""
    (chunks, chunk_rows, batch, epochs, norm_chunks, tok_windows, tok_repeats, geo_n, geo_blocks, csr_n,
     csr_repeats, n2g_latents, n2g_windows, q_elements, bpe_bytes, import_runs) = SIZES[mode]
    tmp = Path(tempfile.mkdtemp(prefix="h100_model_"))
    try:
        m = {"mode": mode, "threads": torch.get_num_threads(), "load_before": os.getloadavg()}
        writer = make_store(tmp / "act.zarr", chunks, chunk_rows=chunk_rows)
        m["extract_writer_s_per_chunk"] = float(np.median(writer)) * CHUNK_ROWS / chunk_rows
        m["loader"] = measure_loader(tmp / "act.zarr", batch, epochs)
        m["normalize"] = measure_normalize(tmp / "act.zarr", norm_chunks)
        shutil.rmtree(tmp / "act.zarr")
        m["token_reads"] = measure_token_reads(tmp, tok_windows, tok_repeats)
        m["geometry"] = measure_geometry_block(geo_n, geo_blocks)
        m["csr"] = measure_csr(csr_n, 32, csr_repeats)
        m["n2g"] = measure_n2g(n2g_latents, n2g_windows)
        m["quantile"] = measure_quantile(q_elements)
        m["tokenizer"] = measure_tokenizer(tmp, bpe_bytes)
        m["imports_s"] = measure_imports(import_runs)
        m["load_after"] = os.getloadavg()
        return m
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- the model ---------------------------------------------------------------------------------------
# Every function returns seconds; `m` are the measurements above, `dev` the ASSUMED H100 rates, `hs` the
# host speed-up over this machine. "bound" names what sets a stage's pace.


def sae_pass_s(rows: int, n: int, d: int, dev: H100) -> float:
    """An fp32 encode of `rows` rows outside training (evaluation stages use no autocast): the GEMM and a
    top-k over [rows, n] float32 (radix select: ~3 reads)."""
    return 2 * rows * n * d / (dev.fp32_tflops * 1e12) + 3 * rows * n * 4 / (dev.hbm_gbs * 1e9)


def lm_s(tokens: int, blocks: int, head: bool, dev: H100, ctx: int = 64) -> float:
    """GPT-2 small forward, fp32 (load_model keeps the checkpoint's float32), plus its logits' passes."""
    t = tokens * gpt2_flops_per_token(blocks, head, ctx) / (dev.fp32_tflops * 1e12)
    return t + (tokens * GPT2["vocab"] * 4 * 4 / (dev.hbm_gbs * 1e9) if head else 0.0)


def train_step(n: int, k: int, d: int, B: int, k_aux: int, n_dead: int, dev: H100) -> dict:
    """GPU seconds of one training_step + bookkeeping under bf16 autocast, by term."""
    hbm = dev.hbm_gbs * 1e9

    def sparse(kk: int) -> float:
        # embedding_bag passes over B*kk rows of d float32 (autocast leaves them in fp32): decode, its recomputed
        # forward, the values' gradient, W_dec's gradient, x's gradient, W_enc's gradient; two stable sorts
        # of B*kk int64 indices (radix, ~8 passes of key + value)
        return 6 * B * kk * d * 4 / hbm + 2 * 8 * B * kk * 16 / hbm

    t = {"encoder_gemm": max(2 * B * n * d / (dev.bf16_tflops * 1e12), B * n * 2 / hbm),
         "topk": 3 * B * n * 2 / hbm,
         "sparse_k": sparse(k),
         "optimizer_ema_projection": n * d * 4 * 26 / hbm,
         "normalize_batch": 5 * B * d * 4 / hbm,
         "heldout_fvu_every_10": 2 * 4096 * n * d / (dev.fp32_tflops * 1e12) / 10,
         "launch_sync": dev.launch_ms / 1000}
    if n_dead:
        ka = min(k_aux, n_dead)
        t["auxk_copy_topk"] = 2 * B * n_dead * 2 / hbm + 3 * B * n_dead * 2 / hbm
        t["auxk_sparse"] = sparse(ka)
    return t


def train_sae(n: int, k: int, cfg: dict, m: dict, dev: H100, hs: float, dead_fraction: float) -> dict:
    from saescale.config import k_aux_for

    tr, d = cfg["train"], GPT2["d"]
    B, steps = tr["batch_size"], tr["tokens"] // tr["batch_size"]
    k_aux = min(k_aux_for(tr, d), n)
    n_dead = int(dead_fraction * n) if tr["auxk"] else 0
    terms = train_step(n, k, d, B, k_aux, n_dead, dev)
    gpu = sum(terms.values())
    h2d = B * d * 4 / (dev.h2d_pageable_gbs * 1e9)  # float32 batch, pageable: serialized with the step
    loader = B / (m["loader"]["rows_per_s"] * hs)
    disk = B * d * 2 / (dev.disk_gbs * 1e9)
    step = max(loader, disk, gpu + h2d)
    params_bytes = 2 * n * d * 4
    checkpoint = params_bytes * 4 / (dev.disk_gbs * 1e9) / tr["checkpoint_seconds"]  # weights, Adam x2, EMA
    start = m["imports_s"] / hs + dev.job_start_s
    total = steps * step * (1 + checkpoint) + start + 2 * m["loader"]["chunk_read_checked_s"] / hs
    bound = "host loader" if loader >= gpu + h2d else "GPU"
    peak = B * n * 2 * (1 + (n_dead / n if n_dead else 0)) + params_bytes * 4 + 2.5e9
    return {"n": n, "k": k, "steps": steps, "dead_fraction": dead_fraction, "step_s": step, "gpu_s": gpu,
            "h2d_s": h2d, "loader_s": loader, "terms_s": terms, "total_s": total, "bound": bound,
            "peak_gpu_gib": peak / 2**30,
            "issue18_loader_s": steps * (step - (gpu + B * d * 2 / (dev.h2d_pinned_gbs * 1e9))),
            "issue18_auxk_s": steps * terms.get("auxk_sparse", 0.0)}


def model_stages(cfg: dict, m: dict, dev: H100, hs: float) -> tuple[list[dict], dict]:
    """One row per stage of the preset on one H100: jobs, seconds per job (a range where it varies), total."""
    from saescale.config import evaluated, trained_saes

    (name, subj), = cfg["subjects"].items()  # the preset has one subject
    d, ctx, ev, it = GPT2["d"], subj["ctx_len"], cfg["evaluate"], cfg["interpret"]
    saes = trained_saes(cfg)
    start = m["imports_s"] / hs + dev.job_start_s
    chunk_read = m["loader"]["chunk_read_checked_s"] / hs
    rows = []

    def row(stage, jobs, per_job, bound, inputs, note=""):
        per = per_job if isinstance(per_job, list) else [per_job] * jobs
        rows.append({"stage": stage, "jobs": jobs, "per_job_s": [min(per), max(per)] if per else [0, 0],
                     "total_s": float(sum(per)), "bound": bound, "measured_inputs": inputs, "note": note})

    # tokenize: stream the dataset, BPE, windows, split, the token store
    tokens = subj["dataset"]["max_tokens"] or subj["train_tokens"]
    bpt = 4.4  # bytes of English web text per GPT-2 token (ASSUMED; the stand-in corpus is code)
    t_bpe = tokens / (m["tokenizer"]["tokens_per_s"] * hs)
    t_dl = tokens * bpt / (dev.download_mbs * 1e6)
    row("tokenize", 1, start - dev.job_start_s + t_bpe + t_dl, "host (BPE from Python) + network",
        f"BPE stand-in {m['tokenizer']['tokens_per_s'] / 1e6:.2f} M tok/s",
        "dataset load is blocker 3 of the audit (datasets>=4 refuses openwebtext.py)")

    # extract: per chunk, token read (main thread) -> forward to block `layer` -> D2H; writer overlaps
    n_windows = tokens // ctx
    train_w, eval_w = -(-subj["train_tokens"] // ctx), subj["eval_tokens"] // ctx
    chunks = -(-(train_w + eval_w) // subj["chunk_windows"])
    C = -(-n_windows // TOKEN_CHUNK)
    touched = C * (1 - (1 - 1 / C) ** subj["chunk_windows"])
    rows_chunk = subj["chunk_windows"] * ctx
    layer = max(subj["layers"])
    t_read = touched * m["token_reads"]["s_per_token_chunk"] / hs
    t_fwd = lm_s(rows_chunk, layer + 1, False, dev) + rows_chunk * d * 4 / (dev.d2h_gbs * 1e9)
    t_write = max(m["extract_writer_s_per_chunk"] / hs, rows_chunk * d * 2 / (dev.disk_gbs * 1e9))
    per_chunk = max(t_read + t_fwd, t_write)
    row("extract", 1, start + chunks * per_chunk,
        "host (token-store reads)" if t_read > t_fwd else "GPU forward",
        f"token read {m['token_reads']['s_per_token_chunk'] * 1e3:.2f} ms per token chunk x {touched:.0f} touched; "
        f"writer {m['extract_writer_s_per_chunk']:.2f} s/chunk",
        f"{chunks} chunks: read {t_read:.2f} + forward {t_fwd:.3f} s, writer {t_write:.2f} s (overlapped)")

    # normalize: one pass over the train split, chunk by chunk (CPU)
    n_chunks = -(-subj["train_tokens"] // rows_chunk)
    per = max(m["normalize"]["s_per_chunk"] / hs, rows_chunk * d * 2 / (dev.disk_gbs * 1e9))
    row("normalize", 1, m["imports_s"] / hs + m["normalize"]["fixed_s"] / hs + n_chunks * per,
        "host (1 thread: read, CRC, isfinite, float64 sums)", f"{m['normalize']['s_per_chunk']:.3f} s/chunk")

    # train: every SAE, two scenarios for AuxK
    idle = [train_sae(j["n"], j["k"], cfg, m, dev, hs, 0.0) for j in saes]
    active = [train_sae(j["n"], j["k"], cfg, m, dev, hs, 0.01) for j in saes]
    bound = sorted({r["bound"] for r in idle + active})
    row("train (per SAE, AuxK idle)", len(idle), [r["total_s"] for r in idle], " / ".join(bound),
        f"loader {m['loader']['rows_per_s'] / 1e6:.3f} M rows/s here")
    row("train (per SAE, AuxK active: 1% dead)", len(active), [r["total_s"] for r in active], " / ".join(bound),
        f"loader {m['loader']['rows_per_s'] / 1e6:.3f} M rows/s here", "counted in the total instead of the idle row")

    # evaluate: FVU/L0/dead over the eval split, then delta CE and KL (3 forwards per batch)
    eval_rows = subj["eval_tokens"]
    n_b = -(-eval_rows // ev["batch_size"])
    win = min(ev["downstream_windows"], eval_w)

    def recon(n):
        return n_b * (chunk_read + ev["batch_size"] * d * 4 / (dev.h2d_pageable_gbs * 1e9)) + sae_pass_s(eval_rows, n, d, dev)

    def evaluate(n):
        return start + recon(n) + 3 * lm_s(win * ctx, 12, True, dev) + sae_pass_s(win * ctx, n, d, dev)

    row("evaluate", len(saes), [evaluate(j["n"]) for j in saes], "GPU fp32 + job start", "chunk read, imports")

    # probes: encode 2 x windows rows for pre and post, float64 screening of every column
    def probes(n):
        r = ev["probes"]["windows"] * ctx
        return start + 4 * sae_pass_s(r, n, d, dev) + r * n * 8 * 4 / (dev.hbm_gbs * 1e9) + 5.0 / hs

    jobs = [j for j in saes if evaluated(cfg, "probes", j)]
    row("probes", len(jobs), [probes(j["n"]) for j in jobs], "job start", "imports",
        "5 s of host labelling ASSUMED (device mismatch fixed in ce97f83; tests/test_fake_cuda.py)")

    # ablation: resid of `windows`, encode, 2 x pairs/batch batches of 2 full forwards with logits
    ab = ev["ablation"]

    def ablation(n):
        r = ab["windows"] * ctx
        batches = 2 * -(-ab["pairs"] // ab["batch"])
        return (start + lm_s(r, max(subj["layers"]) + 1, False, dev) + sae_pass_s(r, n, d, dev)
                + batches * 2 * lm_s(ab["batch"] * ctx, 12, True, dev))

    jobs = [j for j in saes if evaluated(cfg, "ablation", j)]
    row("ablation", len(jobs), [ablation(j["n"]) for j in jobs], "GPU fp32 + job start", "imports")

    # geometry: evaluate's FVU pass again, decoder cosines on the GPU, random reference on 1 CPU thread
    g = m["geometry"]

    def geometry(n):
        ref = (n * n / (1 << 25)) * g["s_per_block"] / hs + n * d * g["randn_s_per_element"] / hs
        dec = 2 * n * n * d / (dev.fp32_tflops * 1e12) + 3 * n * n * 4 / (dev.hbm_gbs * 1e9)
        return start + recon(n) + dec + ref

    jobs = [j for j in saes if evaluated(cfg, "geometry", j)]
    row("geometry", len(jobs), [geometry(j["n"]) for j in jobs], "host (random reference, 1 CPU thread)",
        f"{g['s_per_block']:.2f} s per 2^25-entry block")

    # interpret: encode_split (dense codes to the host, CSR), N2G, scoring; C.6 for reconstruction.n
    c, nq = m["csr"], m["n2g"]

    def interpret(n, k):
        r = (it["example_windows"] + it["eval_windows"]) * ctx
        batch = max(256, 2**24 // n)
        reads = -(-r // batch) if batch < CHUNK_ROWS else -(-r // CHUNK_ROWS)
        enc = (reads * m["loader"]["chunk_read_raw_s"] / hs + sae_pass_s(r, n, d, dev)
               + r * n * 4 / (dev.d2h_gbs * 1e9) + r * n * c["s_per_element"] / hs
               + r * k * c["tocsc_s_per_nonzero"] / hs)
        c6 = n in it["reconstruction"]["n"]
        latents = n if c6 else min(it["latents"], n)  # C.6 explains every alive latent: all n ASSUMED alive
        queries = latents * it["examples"] * nq["queries_per_example"]
        batches = queries / it["batch"]
        n2g = (queries * nq["tokens_per_query"] * gpt2_flops_per_token(layer + 1, False, 16) / (dev.fp32_tflops * 1e12)
               + batches * (sae_pass_s(it["batch"], n, d, dev) + dev.launch_ms / 1000)
               + queries * nq["host_s_per_query"] / hs)
        score = min(it["latents"], n) * it["eval_windows"] * nq["predict_s_per_latent_window"] / hs
        extra = 0.0
        if c6:
            w = it["reconstruction"]["windows"]
            extra = latents * (it["example_windows"] + w) * nq["predict_s_per_latent_window"] / hs + 3 * lm_s(w * ctx, 12, True, dev)
        return start + enc + n2g + score + extra

    jobs = [j for j in saes if evaluated(cfg, "interpret", j)]
    row("interpret", len(jobs), [interpret(j["n"], j["k"]) for j in jobs], "host (scipy CSR, N2G Python, C.6)",
        f"CSR {c['s_per_element'] * 1e9:.2f} ns/element, N2G {nq['host_s_per_query'] * 1e6:.0f} us/query host, "
        f"predict {nq['predict_s_per_latent_window'] * 1e6:.1f} us/latent/window")

    # analyze: progressive (24 decodes per batch, a host quantile) and refinement (FISTA, delta CE)
    an = cfg["analysis"]
    eval_read = (eval_rows // CHUNK_ROWS) * m["normalize"]["s_per_chunk"] / hs

    def progressive(n):
        rows_ = an["progressive"]["tokens"]
        batches = -(-rows_ // 4096)
        dense = an["progressive"]["thresholds"] * (2 * 4096 * n * d / (dev.fp32_tflops * 1e12) + 3 * 4096 * n * 4 / (dev.hbm_gbs * 1e9))
        quant = 2048 * n * (m["quantile"]["s_per_element"] / hs + 4 / (dev.d2h_gbs * 1e9))
        return start + eval_read + batches * (sae_pass_s(4096, n, d, dev) * (1 + len(an["progressive"]["k_factors"])) + dense) + quant

    def refinement(n):
        solves = an["refinement"]["tokens"] // 1024 + an["refinement"]["downstream_windows"] * ctx // 1024
        fista = solves * an["refinement"]["iters"] * 0.3e-3  # ~15 small kernels + one sync per iteration (ASSUMED)
        return (start + eval_read + fista + sae_pass_s(an["refinement"]["tokens"], n, d, dev)
                + 2 * 3 * lm_s(an["refinement"]["downstream_windows"] * ctx, 12, True, dev))

    from saescale.config import analysed
    per = ([progressive(j["n"]) for j in saes if analysed(cfg, "progressive", j)]
           + [refinement(j["n"]) for j in saes if analysed(cfg, "refinement", j)])
    row("analyze", len(per), per, "job start + host (quantile, eval read)", "quantile, normalize per chunk",
        f"progressive n {an['progressive']['n']}, refinement n {an['refinement']['n']} (null: every SAE)")

    # scaling, dashboards, report, toy studies: the README's measured default run (15 SAEs), scaled by SAEs
    scale = len(saes) / 15
    row("scaling / dashboard / report", 1, (7 + 9) * scale + 2 * len(saes), "host",
        "README 'Measured on this machine' (not re-measured)")
    toy = cfg["toy"]
    if any(toy[s]["enabled"] for s in ("manifolds", "groundtruth", "allocation")):
        row("toy studies (schema defaults: on)", 8, 76 / 8, "host / small GPU", "README (not re-measured)")

    totals = {}
    counted = [r for r in rows if r["stage"] != "train (per SAE, AuxK idle)"]
    totals["total_h"] = sum(r["total_s"] for r in counted) / 3600
    totals["total_h_auxk_idle"] = sum(r["total_s"] for r in rows if r["stage"] != "train (per SAE, AuxK active: 1% dead)") / 3600
    totals["train_h"] = sum(r["total_s"] for r in active) / 3600
    totals["train_h_auxk_idle"] = sum(r["total_s"] for r in idle) / 3600
    totals["train_gpu_only_h"] = sum(r["steps"] * (r["gpu_s"] + r["h2d_s"]) for r in active) / 3600
    totals["issue18_loader_h"] = sum(r["issue18_loader_s"] for r in active) / 3600
    totals["issue18_auxk_h"] = sum(r["issue18_auxk_s"] for r in active) / 3600
    totals["per_sae"] = [{key: r[key] for key in ("n", "k", "step_s", "gpu_s", "h2d_s", "loader_s", "bound",
                                                   "peak_gpu_gib", "total_s")} | {"auxk": r["dead_fraction"]}
                         for r in idle + active]
    return rows, totals


def _dur(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def render(out: dict) -> str:
    dev, m, t = out["assumptions"], out["measured"], out["totals"]
    lines = [f"# Modeled time on one H100 SXM 80 GB: {Path(out['config']).name} (MODELED, not measured on a GPU)", "",
             "| stage | jobs | per job | total | bound by | measured inputs |", "|---|---|---|---|---|---|"]
    for r in out["stages"]:
        lo, hi = r["per_job_s"]
        per = _dur(lo) if abs(hi - lo) < 0.05 * hi + 1 else f"{_dur(lo)} – {_dur(hi)}"
        tot = _dur(r["total_s"]) + (" (not in total)" if r["stage"] == "train (per SAE, AuxK idle)" else "")
        lines.append(f"| {r['stage']} | {r['jobs']} | {per} | {tot} | {r['bound']} | {r['measured_inputs']} |")
    lines.append(f"| **total** | | | **{t['total_h']:.1f} h** (AuxK idle: {t['total_h_auxk_idle']:.1f} h) | | |")
    lines += ["", "Notes:"] + [f"- {r['stage']}: {r['note']}" for r in out["stages"] if r["note"]]
    lines += ["", f"Training: {t['train_h']:.1f} h with AuxK active, {t['train_h_auxk_idle']:.1f} h idle; the GPU alone "
              f"(step + pageable H2D) would need {t['train_gpu_only_h']:.1f} h. What issue 18 would remove: the loader "
              f"wait and pageable float32 H2D, {t['issue18_loader_h']:.1f} h (down to the GPU step + a pinned float16 "
              f"copy); AuxK's k_aux sparse float32 passes, {t['issue18_auxk_h']:.1f} h (all of them; bf16 and the O(n d) "
              "b_pre reduction would remove part).", "",
              "Per-step model at the largest and smallest n (AuxK active, 1% dead):", "",
              "| n | k | GPU step | pageable H2D | loader | step | bound | peak GPU GiB (est.) |", "|---|---|---|---|---|---|---|---|"]
    act = [r for r in t["per_sae"] if r["auxk"] > 0]
    for r in [act[0], act[len(act) // 2], act[-6], act[-1]]:
        lines.append(f"| {r['n']} | {r['k']} | {r['gpu_s'] * 1e3:.0f} ms | {r['h2d_s'] * 1e3:.0f} ms | "
                     f"{r['loader_s'] * 1e3:.0f} ms | {r['step_s'] * 1e3:.0f} ms | {r['bound']} | {r['peak_gpu_gib']:.0f} |")
    lines += ["", f"Total by host speed-up (host of the H100 vs this machine): "
              + ", ".join(f"{k}x: {v:.1f} h" for k, v in out["total_h_by_host_speedup"].items()), "",
              "ASSUMED (H100 and its host): " + ", ".join(f"{k} = {v}" for k, v in dev.items())
              + f"; host speed-up {out['host_speedup']}x over the measured rates below.", "",
              f"MEASURED here ({m['threads']} torch threads, load average {m['load_before'][0]:.2f} before, "
              f"{m['load_after'][0]:.2f} after, {m['mode']} measurements):",
              f"- streamed loader (ChunkShuffledBatches, float16 d = 768 store in page cache, batch {m['loader']['batch']}): "
              f"{m['loader']['rows_per_s'] / 1e6:.3f} M rows/s ({m['loader']['batch'] / m['loader']['rows_per_s']:.2f} s per batch); "
              f"chunk read through Checked {m['loader']['chunk_read_checked_s'] * 1e3:.0f} ms, raw {m['loader']['chunk_read_raw_s'] * 1e3:.0f} ms, "
              f"isfinite {m['loader']['isfinite_s'] * 1e3:.0f} ms per 50 MB chunk",
              f"- normalize layer_stats: {m['normalize']['s_per_chunk']:.3f} s per 32,768-row chunk",
              f"- extract token reads: {m['token_reads']['s_per_token_chunk'] * 1e3:.2f} ms per token-store chunk touched; "
              f"extract writer {m['extract_writer_s_per_chunk']:.3f} s per chunk",
              f"- geometry random reference: {m['geometry']['s_per_block']:.2f} s per 2^25-entry block (1 thread)",
              f"- interpret CSR: {m['csr']['s_per_element'] * 1e9:.2f} ns per dense element; tocsc "
              f"{m['csr']['tocsc_s_per_nonzero'] * 1e9:.0f} ns per nonzero",
              f"- N2G: {m['n2g']['queries_per_example']:.1f} queries per example, {m['n2g']['tokens_per_query']:.1f} tokens "
              f"each, {m['n2g']['host_s_per_query'] * 1e6:.0f} us host per query; predict_codes "
              f"{m['n2g']['predict_s_per_latent_window'] * 1e6:.2f} us per latent and window",
              f"- np.quantile: {m['quantile']['s_per_element'] * 1e9:.1f} ns per element; BPE stand-in "
              f"{m['tokenizer']['tokens_per_s'] / 1e6:.2f} M tok/s; job imports {m['imports_s']:.1f} s"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "workflow/configs/gpt2-small.yaml"))
    p.add_argument("--quick", action="store_true", help="smaller measurements (~40 s)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny measurements: checks the script, numbers meaningless")
    p.add_argument("--host-speedup", type=float, default=2.0,
                   help="host of the H100 against this machine's measured rates (ASSUMED; the audit's 2x)")
    p.add_argument("--measurements", help="reuse the measurements of an earlier JSON instead of measuring")
    p.add_argument("--out", default=str(ROOT / "benchmarks/out/h100_model.json"))
    a = p.parse_args()
    from saescale.config import load_config

    cfg = load_config(a.config)
    mode = "smoke" if a.cpu_smoke else "quick" if a.quick else "full"
    meas = json.loads(Path(a.measurements).read_text())["measured"] if a.measurements else measure(mode)
    dev = H100()
    stages, totals = model_stages(cfg, meas, dev, a.host_speedup)
    sensitivity = {str(s): model_stages(cfg, meas, dev, s)[1]["total_h"] for s in (1.0, 2.0, 4.0)}
    out = {"config": a.config, "mode": meas["mode"], "host_speedup": a.host_speedup, "assumptions": asdict(dev),
           "measured": meas, "stages": stages, "totals": totals, "total_h_by_host_speedup": sensitivity,
           "modeled": "not measured on a GPU"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(render(out))
    print(f"\nJSON: {a.out}")


if __name__ == "__main__":
    main()
