"""The activation store and the training loader: bytes per token against raw fp32, read throughput, and loader
supply against trainer consumption.

    snakemake --cores all                                   # writes data/activations/tiny.zarr
    python benchmarks/store.py --store data/activations/tiny.zarr --layer 2 --n 128 2048

Bytes per token count everything the store holds for a row (the layer's vector plus the token, window and
position columns), as on disk. Supply is what each loader yields with no consumer: the streamed one
(`ChunkShuffledBatches`, background prefetch, the path for stores larger than `train.in_memory_max_gb`) and
the in-RAM one. Consumption is saescale's TopK training step at the store's d for each `--n`, timed on
in-memory batches with the given threads. The loader never starves the trainer when supply/consumption > 1;
the target is 10x, so a loader thread sharing the cores with the trainer still keeps up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from saescale.store import (
    ChunkShuffledBatches,
    InMemoryBatches,
    iter_chunks,
    open_store,
    read_rows,
    split_rows,
)


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def supply(batches, n_batches: int, batch: int) -> float:
    """Tokens per second a loader yields (first batch excluded: it pays the start-up)."""
    it = batches.batches()
    next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch / (time.perf_counter() - t0)


def consumption(data: np.ndarray, n: int, k: int, batch: int, seconds: float) -> float:
    sys.path.insert(0, str(Path(__file__).parent))
    from throughput_worker import saescale_step, time_steps

    device = torch.device("cpu")
    step = saescale_step(data.shape[1], n, k, batch, torch.zeros(n, dtype=torch.bool), device,
                         contextlib.nullcontext())
    bank = [torch.from_numpy(data[i * batch:(i + 1) * batch].astype(np.float32)) for i in range(4)]
    time_steps(step, bank, 2, 0.0, device)
    steps, secs, _ = time_steps(step, bank, 2, seconds, device)
    return steps * batch / secs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default="data/activations/tiny.zarr")
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--n", type=int, nargs="+", default=[128, 2048], help="latents of the trainer steps timed")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=64, help="batches drawn per supply measurement")
    p.add_argument("--shuffle-chunks", type=int, default=8)
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    path = Path(a.store)
    if not path.exists():
        sys.exit(f"--store {path} does not exist: run the pipeline first (snakemake --cores all), or point "
                 "--store at a data/activations/<subject>.zarr")
    root = open_store(path)
    x = root[f"L{a.layer}/x"]
    n_rows, d = x.shape
    columns = [path / name for name in ("token", "window", "position")] + [path / f"L{a.layer}"]
    stored = sum(disk_bytes(c) for c in columns if c.exists())
    train = split_rows(root, "train")

    t0 = time.perf_counter()
    read = sum(len(c) for c in iter_chunks(root, a.layer, "train"))
    read_s = time.perf_counter() - t0

    streamed = ChunkShuffledBatches(x, train, a.batch, 0, a.shuffle_chunks)
    in_ram = InMemoryBatches(read_rows(root, a.layer, "train"), a.batch, 0)
    result = {
        "store": str(path), "layer": a.layer, "rows": n_rows, "d": d, "dtype": str(x.dtype), "chunk_rows": x.chunks[0],
        "bytes_per_token": stored / n_rows, "raw_fp32_bytes_per_token": 4 * d,
        "ratio_to_fp32": stored / n_rows / (4 * d),
        "sequential_read_rows_per_s": read / read_s, "sequential_read_mb_per_s": read * d * x.dtype.itemsize / read_s / 1e6,
        "supply_streamed_tokens_per_s": supply(streamed, a.batches, a.batch),
        "supply_in_memory_tokens_per_s": supply(in_ram, a.batches, a.batch),
        "threads": a.threads,
    }
    result["consumption"] = [{"n": n, "k": a.k, "tokens_per_s": consumption(in_ram.data, n, a.k, a.batch, a.seconds)}
                             for n in a.n]
    print(json.dumps(result, indent=1))
    print(f"\n| store | d | bytes/token | raw fp32 | ratio | sequential read | streamed supply | in-RAM supply |\n"
          f"|---|---|---|---|---|---|---|---|\n"
          f"| {path.name} ({x.dtype}) | {d} | {result['bytes_per_token']:.1f} | {4 * d} | "
          f"{result['ratio_to_fp32']:.3f} | {result['sequential_read_rows_per_s']:,.0f} rows/s "
          f"({result['sequential_read_mb_per_s']:,.0f} MB/s) | {result['supply_streamed_tokens_per_s']:,.0f} tok/s | "
          f"{result['supply_in_memory_tokens_per_s']:,.0f} tok/s |\n")
    print("| trainer (TopK) | consumes | streamed supply / consumption | in-RAM supply / consumption |\n|---|---|---|---|")
    for c in result["consumption"]:
        print(f"| n = {c['n']}, k = {c['k']} | {c['tokens_per_s']:,.0f} tok/s | "
              f"{result['supply_streamed_tokens_per_s'] / c['tokens_per_s']:.1f}× | "
              f"{result['supply_in_memory_tokens_per_s'] / c['tokens_per_s']:.1f}× |")


if __name__ == "__main__":
    main()
