"""Modeled wall time of a preset (default workflow/configs/gpt2-small.yaml) on one H100 SXM 80 GB.

    nice -n 5 python benchmarks/h100_model.py            # ~3-4 min on 2 cores: measures, then models
    python benchmarks/h100_model.py --quick              # smaller measurements, ~1 min
    python benchmarks/h100_model.py --cpu-smoke          # tiny measurements: checks the script (~15 s)

Nothing here ran on a GPU. Each stage's time is FLOP and byte counts at the preset's shapes divided by the
stated H100 rates (ASSUMED), plus host work that this script measures on this machine at scaled-down shapes
through the pipeline's own code (the streamed loader's `host_batches`, layer_stats, the token-store reads of
extraction, geometry's random directions, interpret's `_sparse_rows` and CSC conversion, N2G's host side),
divided by --host-speedup. The code is modeled as it is now (issue 18: streamed float16 loader, sync-free
single-pass AuxK, train.pack jobs, geometry's reference on the device, interpret's codes leaving the device as
their nonzeros). The preset is read as a complete config (`load_config`: the preset plus the schema defaults,
nothing from config.yaml). Writes a Markdown table, with the totals the model gave before issue 18 beside it,
and benchmarks/out/h100_model.json.
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
DEAD_FRACTION = 0.01  # ASSUMED: latents dead while AuxK runs (the scenario counted in the total)
AUX_MARGIN = 1.5  # ASSUMED: latents that can be dead by the next log step, per dead one (Trainer._bound_dead)
GATHER_BYTES = 2  # the sparse passes gather bf16 rows under bf16 autocast (sae/activations.gather_dtype)


@dataclass(frozen=True)
class H100:
    """ASSUMED device and host rates (none measured on a GPU)."""
    bf16_tflops: float = 400.0  # dense bf16 GEMM, effective (989 peak)
    fp32_tflops: float = 40.0  # fp32 GEMM without TF32: every stage but training (nothing else turns TF32 on)
    tf32_tflops: float = 200.0  # training's float32 matmuls (held-out FVU): the Trainer turns TF32 on (495 peak)
    hbm_gbs: float = 2000.0  # streaming / row-gather kernels, effective (3350 peak); also cuSPARSE CSR @ dense
    h2d_pageable_gbs: float = 12.0  # from pageable host memory (evaluation stages' float32 reads)
    h2d_pinned_gbs: float = 40.0  # PCIe Gen5 x16 from pinned memory: the loader's float16 ring (side stream)
    d2h_gbs: float = 12.0  # .cpu() into pageable memory
    launch_ms: float = 3.0  # host time to issue one training step's kernels (Python + ~200 launches), or one N2G batch
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
    """The training loader as a pack job runs it: `StreamedBatches.host_batches` (saescale.loader, through
    store.batch_stream: the preset's 145 GiB split exceeds in_memory_max_gb, so it streams) on a page-cached float16
    store, shuffle_chunks = 8 as in the preset; its reader thread maps and CRC32C-checks the chunks of the next
    group while its gather thread fills the ring. Unpinned here (no CUDA): on the H100's host the ring is
    page-locked and the copy to the device is the side stream's. Also the `Checked` zarr chunk read that the
    evaluation stages still do (iter_chunks, encode_split)."""
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
    it = stream.host_batches(0, pin=False)
    first = next(it)  # the ring's allocation and the first group's reads: a job's start, not a step
    assert first.dtype == torch.float16 and tuple(first.shape) == (batch, x.shape[1])
    per_batch = []
    for _ in range(stream.steps_per_epoch * epochs - 1):
        t0 = time.perf_counter()
        next(it)
        per_batch.append(time.perf_counter() - t0)
    it.close()
    first_epoch = per_batch[:stream.steps_per_epoch - 1]
    later = per_batch[stream.steps_per_epoch - 1:] or per_batch
    median = sorted(per_batch)[len(per_batch) // 2]
    return {"batch": batch, "batches_timed": len(per_batch), "steps_per_epoch": stream.steps_per_epoch,
            "s_per_batch": per_batch, "rows_per_s": batch * len(per_batch) / sum(per_batch),
            "median_rows_per_s": batch / median,
            "first_epoch_rows_per_s": batch * len(first_epoch) / sum(first_epoch) if first_epoch else math.nan,
            "later_epochs_rows_per_s": batch * len(later) / sum(later),
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


def measure_geometry_randn(n: int, repeats: int) -> dict:
    """geometry.random_reference's host part: n random directions drawn on the CPU with a seeded generator
    (one thread, the cli default --threads 1) before they move to the job's device; the n^2 d comparison runs
    there since 36a6801 and is modeled."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        t = min(timed(lambda: torch.randn(n, 768, generator=g), repeats))
    finally:
        torch.set_num_threads(threads)
    return {"n": n, "randn_s_per_element": t / (n * 768)}


def measure_sparse_rows(n: int, k: int, repeats: int) -> dict:
    """interpret.examples.encode_split's host side since b39727b: `_sparse_rows` (the k index/value pairs per row
    of a TopK code, copied to the host and built into a CSR [256, n]) per nonzero, then vstack + tocsc of all
    batches per nonzero. Here the code's tensors are on the CPU, so the .cpu() copies are free; the model adds
    the D2H."""
    import scipy.sparse as sp

    from saescale.interpret.examples import _sparse_rows
    from saescale.sae.activations import Latents

    g = torch.Generator().manual_seed(0)
    rows = 256
    indices = torch.rand(rows, n, generator=g).topk(k, dim=1).indices
    latents = Latents(torch.rand(rows, k, generator=g) + 0.1, indices)
    t = timed(lambda: _sparse_rows(latents, n), repeats)
    parts = [_sparse_rows(latents, n)] * 16
    t_csc = min(timed(lambda: sp.vstack(parts).tocsc(), 2))
    return {"shape": [rows, n], "k": k, "s_per_nonzero": min(t) / (rows * k),
            "tocsc_s_per_nonzero": t_csc / (16 * rows * k), "repeats_s": t}


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
    #  randn repeats, interpret n, interpret repeats, N2G latents, N2G windows, quantile elements, BPE bytes, import runs)
    "full": (16, CHUNK_ROWS, 131072, 4, 6, 400_000, 6, 1 << 17, 2, 1 << 17, 5, 128, 2048, 1 << 24, 4 << 20, 2),
    "quick": (8, CHUNK_ROWS, 65536, 3, 3, 60_000, 3, 1 << 15, 1, 1 << 15, 2, 32, 256, 1 << 21, 1 << 20, 1),
    "smoke": (6, 2048, 4096, 2, 3, 12_000, 2, 1 << 11, 1, 1 << 12, 1, 8, 64, 1 << 16, 1 << 18, 1),
}


def measure(mode: str) -> dict:
    """Every host measurement the model rests on, at the shapes of SIZES[mode] (smoke: only checks the script)."""
    (chunks, chunk_rows, batch, epochs, norm_chunks, tok_windows, tok_repeats, geo_n, geo_repeats, csr_n,
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
        m["geometry"] = measure_geometry_randn(geo_n, geo_repeats)
        m["sparse_rows"] = measure_sparse_rows(csr_n, 32, csr_repeats)
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


def train_step(n: int, k: int, d: int, B: int, k_aux: int, auxk: bool, dev: H100, log_every: int) -> dict:
    """GPU seconds of one member's training_step + Trainer bookkeeping under bf16 autocast (sae/, bff45aa), by term.
    AuxK, once the trainer cannot rule out a dead latent, costs the same at any dead fraction: live latents are
    masked to -inf in place and one top-k_aux runs over all n; its k_aux slots join the main k in one sparse pass."""
    hbm = dev.hbm_gbs * 1e9
    m = k + (k_aux if auxk else 0)  # slots per token of the one Selection

    def gathers(slots: int) -> float:
        # per slot, 4 row reads of d bf16 (embedding_bag kernels and cuSPARSE CSR @ dense, float32
        # accumulation; sae/activations.gather_dtype under bf16 autocast): the decoder forward (rows of W_dec's
        # bf16 copy), the values' gradient (the copy's rows against the bag's gradient row), W_dec's gradient
        # (rows of the [B*bags, d] gradient) and W_enc's gradient (rows of x - b_pre). No x gradient (the batch
        # needs none), b_pre's is O(n d). float32 rows (before bf16 gathers) would double this term.
        return 4 * B * slots * d * GATHER_BYTES / hbm

    def index_work(slots: int) -> float:
        # one stable radix sort of int32 keys with int64 order (4 passes, read + write) shared by both weight
        # gradients, the bag/row ids and weights[order] of two CSR builds, the values' clone and index_add
        return (4 * 2 * 12 + 100) * B * slots / hbm

    t = {"encoder_gemm": max(2 * B * n * d / (dev.bf16_tflops * 1e12), (B * n * 2 + n * d * 6) / hbm),
         "topk": 3 * B * n * 2 / hbm,
         "sparse_main": gathers(k) + index_work(k),
         "losses": 8 * B * d * 4 / hbm,
         # fused Adam 2 x 7, EMA lerp 2 x 3, decoder-gradient projection 3, renormalization 3, two weight
         # gradients written (zeroed + accumulated) 2 x 2 passes of [n, d] float32
         "optimizer_ema_projection": (26 + 4) * n * d * 4 / hbm,
         # the bf16 copy of W_dec the gathers read, made once per step (read float32, write bf16), and the
         # [B, d] rows of x - b_pre and of the decoder's gradient cast to bf16 (none with float32 gathers)
         "gather_copies": (n * d + 2 * B * d) * (4 + GATHER_BYTES) / hbm if GATHER_BYTES < 4 else 0.0,
         "heldout_fvu_every_log": (2 * 4096 * n * d / (dev.tf32_tflops * 1e12) + 3 * 4096 * n * 4 / hbm) / log_every}
    if auxk:
        t["auxk_mask_topk"] = 2 * B * n * 2 / hbm + 3 * B * n * 2 / hbm  # masked_fill_ in place, top-k_aux over n
        t["sparse_auxk"] = gathers(m) + index_work(m) - t["sparse_main"]
    device = sum(t.values())
    # no host sync in a step: the host issues kernels ahead of the GPU, which waits on it only where a step's
    # work is shorter than its issue; a log step's reads drain the queue once per log_every steps
    t["host_issue"] = max(0.0, dev.launch_ms / 1000 - device) + dev.launch_ms / 1000 / log_every
    return t


def train_pack(members: list[dict], cfg: dict, m: dict, dev: H100, hs: float, auxk: bool) -> dict:
    """One training job (a train.pack, or one SAE alone): a batch is read once, crosses as float16 on the
    loader's side stream, is cast and normalized once on the device, and every member steps on it in turn.
    Seconds per batch = max(loader, disk, H2D, sum of the members' GPU steps)."""
    from saescale.config import k_aux_for
    from saescale.hardware import train_gpu_gib

    tr, d = cfg["train"], GPT2["d"]

    def aux_slots(n: int) -> int:
        # the trainer selects only as many AuxK slots as latents can be dead before its next log step (Trainer.
        # _bound_dead): the dead ones and those close to it, modeled as AUX_MARGIN x DEAD_FRACTION of n
        return min(k_aux_for(tr, d), n, math.ceil(AUX_MARGIN * DEAD_FRACTION * n))

    B, steps = tr["batch_size"], tr["tokens"] // tr["batch_size"]
    n = max(j["n"] for j in members)
    per = []
    for j in members:
        terms = train_step(j["n"], j["k"], d, B, aux_slots(j["n"]), auxk and tr["auxk"], dev, tr["log_every"])
        per.append({"n": j["n"], "k": j["k"], "gpu_s": sum(terms.values()), "terms_s": terms})
    shared = 5 * B * d * 4 / (dev.hbm_gbs * 1e9)  # float16 -> float32 cast and normalize, once per batch
    gpu = shared + sum(r["gpu_s"] for r in per)
    h2d = B * d * 2 / (dev.h2d_pinned_gbs * 1e9)  # pinned float16 on a side stream, one batch ahead: overlapped
    loader = B / (m["loader"]["rows_per_s"] * hs)
    disk = B * d * 2 / (dev.disk_gbs * 1e9)  # the 154 GB split does not stay in the page cache
    step = max(loader, disk, h2d, gpu)
    bound = {loader: "host loader", disk: "disk", h2d: "H2D", gpu: "GPU"}[step]
    params_bytes = sum(2 * j["n"] * d * 4 for j in members)
    checkpoint = params_bytes * 4 / (dev.disk_gbs * 1e9) / tr["checkpoint_seconds"]  # weights, Adam x2, EMA
    start = m["imports_s"] / hs + dev.job_start_s + m["loader"]["s_per_batch"][0] / hs  # + the first group's reads
    total = steps * step * (1 + checkpoint) + start
    act_bytes = 2  # bf16 autocast on CUDA
    peak = train_gpu_gib([j["n"] for j in members], d, B, act_bytes, tr.get("microbatch"))
    for r in per:  # each member's share of the job's wall time, by its share of the GPU work
        r["total_s"] = total * (r["gpu_s"] + shared / len(per)) / gpu
    return {"n": n, "members": len(members), "ks": [j["k"] for j in members], "steps": steps, "auxk": auxk,
            "step_s": step, "gpu_s": gpu, "h2d_s": h2d, "loader_s": loader, "disk_s": disk, "bound": bound,
            "peak_gpu_gib": peak, "total_s": total, "start_s": start, "per_member": per}


def pack_jobs(cfg: dict) -> list[list[dict]]:
    """The training jobs of the config: each train.pack's members (config.train_packs), and every SAE outside a
    pack alone."""
    from saescale.config import train_packs, trained_saes

    saes = trained_saes(cfg)
    packs = [p["members"] for p in train_packs(cfg)]
    def key(j: dict) -> frozenset:
        return frozenset((a, str(b)) for a, b in j.items())

    packed = {key(j) for members in packs for j in members}
    return packs + [[j] for j in saes if key(j) not in packed]


# The model's totals before issue 18 (ca1f877, two full runs on 2026-12-06 at load 5.8-8.1, host speed-up 2x): the
# old loader (0.10-0.12 M rows/s), pageable float32 H2D, AuxK's per-step sync and separate sparse passes, geometry's
# reference on one CPU thread, interpret's dense D2H + scipy conversion. Quoted, not re-modeled: that code is gone.
BEFORE_ISSUE18 = {
    "tokenize": "4–5 min", "extract": "18 min", "normalize": "16–32 min", "train (per SAE, AuxK idle)": "–",
    "train (per SAE, AuxK active: 1% dead)": "50–61 h", "evaluate": "27 min", "probes": "9–11 min",
    "ablation": "9–10 min", "geometry": "41–53 min", "interpret": "1.3–2.1 h", "analyze": "5–7 min",
    "scaling / dashboard / report": "~3.5 min (with toy studies)", "toy studies (schema defaults: on)": "(above)",
    "total": "54–65 h"}


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
        "OpenWebText from the hub's parquet conversion (the download rate is ASSUMED)")

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

    # train: one job per train.pack (members step in turn on each batch), two scenarios for AuxK. Rows are per
    # SAE: its share of its job's wall time (by its share of the job's GPU work), so the rows add up to the jobs.
    jobs_ = pack_jobs(cfg)
    idle = [train_pack(members, cfg, m, dev, hs, False) for members in jobs_]
    active = [train_pack(members, cfg, m, dev, hs, True) for members in jobs_]
    loader_in = (f"loader {m['loader']['rows_per_s'] / 1e6:.2f} M rows/s here "
                 f"({m['loader']['batch'] / m['loader']['rows_per_s'] * 1e3:.0f} ms per batch)")
    for label, packs, note in (
            ("train (per SAE, AuxK idle)", idle, f"{len(jobs_)} jobs (train.pack); not in the total"),
            ("train (per SAE, AuxK active: 1% dead)", active,
             (f"{len(jobs_)} jobs (train.pack); AuxK runs every step with min(k_aux, {AUX_MARGIN} x "
              f"{DEAD_FRACTION:.0%} of n) slots (the trainer's bound on latents that can be dead); counted in the total"))):
        bound = sorted({r["bound"] for r in packs})
        row(label, sum(r["members"] for r in packs), [x["total_s"] for r in packs for x in r["per_member"]],
            " / ".join(bound) + f" ({len(packs)} pack jobs)", loader_in, note)

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

    # geometry: evaluate's FVU pass again; decoder cosines and (since 36a6801) the random reference on the GPU,
    # its n x d directions drawn on 1 CPU thread and copied over
    g = m["geometry"]

    def geometry(n):
        cos = 2 * n * n * d / (dev.fp32_tflops * 1e12) + 3 * n * n * 4 / (dev.hbm_gbs * 1e9)
        ref = n * d * g["randn_s_per_element"] / hs + n * d * 4 / (dev.h2d_pageable_gbs * 1e9) + cos
        return start + recon(n) + cos + ref

    jobs = [j for j in saes if evaluated(cfg, "geometry", j)]
    row("geometry", len(jobs), [geometry(j["n"]) for j in jobs], "GPU fp32 + job start",
        f"randn {g['randn_s_per_element'] * 1e9:.1f} ns/element (1 thread)")

    # interpret: encode_split (since b39727b each batch's k index/value pairs per row leave the device:
    # _sparse_rows), N2G, scoring; C.6 for reconstruction.n
    c, nq = m["sparse_rows"], m["n2g"]

    def interpret(n, k):
        r = (it["example_windows"] + it["eval_windows"]) * ctx
        batch = max(256, 2**24 // n)
        batches = -(-r // batch)
        reads = batches if batch < CHUNK_ROWS else -(-r // CHUNK_ROWS)
        enc = (reads * m["loader"]["chunk_read_raw_s"] / hs + r * d * 4 / (dev.h2d_pageable_gbs * 1e9)
               + sae_pass_s(r, n, d, dev) + batches * dev.launch_ms / 1000  # the keep mask's sync per batch
               + r * k * (4 + 8 + 8) / (dev.d2h_gbs * 1e9)  # float32 values, int64 rows and columns
               + r * k * (c["s_per_nonzero"] + c["tocsc_s_per_nonzero"]) / hs)
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
    row("interpret", len(jobs), [interpret(j["n"], j["k"]) for j in jobs], "host (N2G Python, C.6's predict_codes)",
        f"_sparse_rows {c['s_per_nonzero'] * 1e9:.0f} ns/nonzero, N2G {nq['host_s_per_query'] * 1e6:.0f} us/query host, "
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
    totals["train_gpu_only_h"] = sum(r["steps"] * r["gpu_s"] for r in active) / 3600
    totals["train_loader_only_h"] = sum(r["steps"] * r["loader_s"] for r in active) / 3600
    terms: dict[str, float] = {}
    for r in active:
        for x in r["per_member"]:
            for key, v in x["terms_s"].items():
                terms[key] = terms.get(key, 0.0) + r["steps"] * v / 3600
    totals["train_terms_h"] = dict(sorted(terms.items(), key=lambda kv: -kv[1]))
    totals["train_auxk_h"] = terms.get("auxk_mask_topk", 0.0) + terms.get("sparse_auxk", 0.0)
    totals["packs"] = [{key: r[key] for key in ("n", "members", "ks", "steps", "auxk", "step_s", "gpu_s", "h2d_s",
                                                 "loader_s", "disk_s", "bound", "peak_gpu_gib", "total_s")}
                       | {"member_gpu_s": [x["gpu_s"] for x in r["per_member"]]} for r in idle + active]
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
             "| stage | jobs | per job | total | before issue 18 | bound by | measured inputs |",
             "|---|---|---|---|---|---|---|"]
    for r in out["stages"]:
        lo, hi = r["per_job_s"]
        per = _dur(lo) if abs(hi - lo) < 0.05 * hi + 1 else f"{_dur(lo)} – {_dur(hi)}"
        tot = _dur(r["total_s"]) + (" (not in total)" if r["stage"] == "train (per SAE, AuxK idle)" else "")
        before = BEFORE_ISSUE18.get(r["stage"], "–")
        lines.append(f"| {r['stage']} | {r['jobs']} | {per} | {tot} | {before} | {r['bound']} | {r['measured_inputs']} |")
    lines.append(f"| **total** | | | **{t['total_h']:.1f} h** (AuxK idle: {t['total_h_auxk_idle']:.1f} h) | "
                 f"{BEFORE_ISSUE18['total']} | | |")
    lines += ["", "Notes:"] + [f"- {r['stage']}: {r['note']}" for r in out["stages"] if r["note"]]
    terms = ", ".join(f"{k} {v:.1f} h" for k, v in t["train_terms_h"].items() if v >= 0.05)
    lines += ["", f"Training: {t['train_h']:.1f} h with AuxK running, {t['train_h_auxk_idle']:.1f} h if it never "
              f"runs; the GPU steps alone {t['train_gpu_only_h']:.1f} h, the loader alone would need "
              f"{t['train_loader_only_h']:.1f} h. AuxK (mask + top-k_aux over n, its k_aux slots in the sparse pass): "
              f"{t['train_auxk_h']:.1f} h. GPU time by term, all packs: {terms}.", "",
              "Per pack job (one batch read, float16 pinned H2D overlapped, members step in turn):", "",
              "| n | SAEs | AuxK | GPU per batch (sum of members) | loader | disk | H2D | wall per batch | bound | "
              "job | peak GPU GiB (hardware.train_gpu_gib) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in t["packs"]:
        lines.append(f"| {r['n']} | {r['members']} | {'runs' if r['auxk'] else 'idle'} | {r['gpu_s'] * 1e3:.0f} ms | "
                     f"{r['loader_s'] * 1e3:.0f} ms | {r['disk_s'] * 1e3:.0f} ms | {r['h2d_s'] * 1e3:.0f} ms | "
                     f"{r['step_s'] * 1e3:.0f} ms | {r['bound']} | {_dur(r['total_s'])} | {r['peak_gpu_gib']} |")
    lines += ["", "Total by host speed-up (host of the H100 vs this machine): "
              + ", ".join(f"{k}x: {v:.1f} h" for k, v in out["total_h_by_host_speedup"].items()), "",
              "ASSUMED (H100 and its host): " + ", ".join(f"{k} = {v}" for k, v in dev.items())
              + f"; host speed-up {out['host_speedup']}x over the measured rates below.", "",
              f"MEASURED here ({m['threads']} torch threads, load average {m['load_before'][0]:.2f} before, "
              f"{m['load_after'][0]:.2f} after, {m['mode']} measurements):",
              f"- streamed loader (StreamedBatches.host_batches, unpinned, float16 d = 768 store in page cache, batch "
              f"{m['loader']['batch']}, {m['loader']['batches_timed']} batches timed): "
              f"{m['loader']['rows_per_s'] / 1e6:.2f} M rows/s ({m['loader']['batch'] / m['loader']['rows_per_s'] * 1e3:.0f} ms "
              f"per batch; first epoch {m['loader']['first_epoch_rows_per_s'] / 1e6:.2f}, later "
              f"{m['loader']['later_epochs_rows_per_s'] / 1e6:.2f}); evaluation's chunk read through Checked "
              f"{m['loader']['chunk_read_checked_s'] * 1e3:.0f} ms, raw {m['loader']['chunk_read_raw_s'] * 1e3:.0f} ms, "
              f"isfinite {m['loader']['isfinite_s'] * 1e3:.0f} ms per 50 MB chunk",
              f"- normalize layer_stats: {m['normalize']['s_per_chunk']:.3f} s per 32,768-row chunk",
              f"- extract token reads: {m['token_reads']['s_per_token_chunk'] * 1e3:.2f} ms per token-store chunk touched; "
              f"extract writer {m['extract_writer_s_per_chunk']:.3f} s per chunk",
              f"- geometry random directions: {m['geometry']['randn_s_per_element'] * 1e9:.1f} ns per element (1 thread, "
              f"n = {m['geometry']['n']})",
              f"- interpret _sparse_rows: {m['sparse_rows']['s_per_nonzero'] * 1e9:.0f} ns per nonzero; vstack + tocsc "
              f"{m['sparse_rows']['tocsc_s_per_nonzero'] * 1e9:.0f} ns per nonzero (n = {m['sparse_rows']['shape'][1]}, k = 32)",
              f"- N2G: {m['n2g']['queries_per_example']:.1f} queries per example, {m['n2g']['tokens_per_query']:.1f} tokens "
              f"each, {m['n2g']['host_s_per_query'] * 1e6:.0f} us host per query; predict_codes "
              f"{m['n2g']['predict_s_per_latent_window'] * 1e6:.2f} us per latent and window",
              f"- np.quantile: {m['quantile']['s_per_element'] * 1e9:.1f} ns per element; BPE stand-in "
              f"{m['tokenizer']['tokens_per_s'] / 1e6:.2f} M tok/s; job imports {m['imports_s']:.1f} s"]
    return "\n".join(lines)


def main() -> None:
    global GATHER_BYTES
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "workflow/configs/gpt2-small.yaml"))
    p.add_argument("--quick", action="store_true", help="smaller measurements (~40 s)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny measurements: checks the script, numbers meaningless")
    p.add_argument("--host-speedup", type=float, default=2.0,
                   help="host of the H100 against this machine's measured rates (ASSUMED; the audit's 2x)")
    p.add_argument("--measurements", help="reuse the measurements of an earlier JSON instead of measuring")
    p.add_argument("--gather-bytes", type=int, default=GATHER_BYTES, choices=[2, 4],
                   help="bytes per element the sparse passes gather: 2 (bf16 rows, the code now), "
                        "4 (float32, before)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/out/h100_model.json"))
    a = p.parse_args()
    GATHER_BYTES = a.gather_bytes
    from saescale.config import load_config

    cfg = load_config(a.config)
    mode = "smoke" if a.cpu_smoke else "quick" if a.quick else "full"
    meas = json.loads(Path(a.measurements).read_text())["measured"] if a.measurements else measure(mode)
    dev = H100()
    stages, totals = model_stages(cfg, meas, dev, a.host_speedup)
    sensitivity = {str(s): model_stages(cfg, meas, dev, s)[1]["total_h"] for s in (1.0, 2.0, 4.0)}
    out = {"config": a.config, "mode": meas["mode"], "host_speedup": a.host_speedup, "assumptions": asdict(dev),
           "gather_bytes": GATHER_BYTES,
           "measured": meas, "stages": stages, "totals": totals, "total_h_by_host_speedup": sensitivity,
           "modeled": "not measured on a GPU"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(render(out))
    print(f"\nJSON: {a.out}")


if __name__ == "__main__":
    main()
