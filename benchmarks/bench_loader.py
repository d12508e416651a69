"""The streamed training loader (issue 18): rows per second delivered to transfer-ready memory, old against new.

    nice -n 5 python benchmarks/bench_loader.py                  # ~3 min on 2 cores; builds a 1.9 GB store once
    python benchmarks/bench_loader.py --quick                    # fewer repeats, new loader only

The store is the pipeline's layout (`store._create_store`: float16, d = 768, chunks of 32,768 rows with a
CRC32C each, as the gpt2-small preset writes them), read from the page cache (it is read once before timing).
Each measurement runs in its own process, pinned to 1 or 2 cores (`sched_setaffinity`) with as many torch
threads, and draws batches of 131,072 rows with shuffle_chunks = 8 (the preset's):
- old: the loader before issue 18 (`OldChunkShuffledBatches` below, verbatim): every chunk read through zarr and
  `integrity.Checked` (CRC32C and an isfinite pass on every read), cast into a float32 buffer, each batch
  gathered into a fresh float32 array by a prefetch thread;
- new: `loader.StreamedBatches.host_batches(pin=True)`: float16 batches gathered from the mapped chunk files into a
  ring of preallocated (page-locked where CUDA exists) buffers; CRC32C on every read, the finite check on the
  first read of each chunk.
The first batch (it waits for the first shuffle group) is not timed; the new loader's first epoch (which pays
the finite checks) and its later epochs are reported apart. `--components` times the parts of a batch alone.
Raw numbers, every repeat, go to benchmarks/out/bench_loader.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

D, CHUNK_ROWS, BATCH, SHUFFLE, LAYER = 768, 32768, 131072, 8, 8
OUT = Path(__file__).parent / "out"


def make_store(path: Path, n_chunks: int) -> None:
    """`n_chunks` train chunks and one eval chunk of distinct float16 rows, written as extraction does."""
    from saescale.integrity import writing_every_chunk
    from saescale.store import _create_store

    n_rows = (n_chunks + 1) * CHUNK_ROWS
    params = {"model": "synthetic", "tokens": {"ctx_len": 64}, "n_train": n_chunks * CHUNK_ROWS, "n_eval": CHUNK_ROWS}
    block = np.random.default_rng(0).standard_normal((CHUNK_ROWS, D), dtype=np.float32)
    with writing_every_chunk():
        root = _create_store(path, params, "synthetic", [LAYER], n_rows, D, CHUNK_ROWS, "float16")
        for c in range(n_chunks + 1):
            rows = slice(c * CHUNK_ROWS, (c + 1) * CHUNK_ROWS)
            root[f"L{LAYER}/x"][rows] = (block + c).astype(np.float16)
            for name, dt in (("token", np.int32), ("window", np.int32), ("position", np.int16)):
                root[name][rows] = np.zeros(CHUNK_ROWS, dt)
        root.attrs["complete"] = True


class OldChunkShuffledBatches:
    """store.ChunkShuffledBatches before issue 18, kept here as the baseline."""

    def __init__(self, array, rows: slice, batch_size: int, seed: int, shuffle_chunks: int):
        self.array, self.rows, self.batch_size, self.seed = array, rows, batch_size, seed
        self.shuffle_chunks = shuffle_chunks
        self.steps_per_epoch = (rows.stop - rows.start) // batch_size

    def batches(self, start_step: int = 0) -> Iterator[np.ndarray]:
        from saescale.loader import prefetch

        def epochs():
            epoch, skip = divmod(start_step, self.steps_per_epoch)
            while True:
                yield from self._epoch(epoch, skip)
                epoch, skip = epoch + 1, 0
        return prefetch(epochs())

    def _epoch(self, epoch: int, skip: int) -> Iterator[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        bs, step = self.batch_size, self.array.chunks[0]
        starts = np.arange(self.rows.start, self.rows.stop, step)
        rng.shuffle(starts)
        buf = torch.empty(step * self.shuffle_chunks + bs, self.array.shape[1], dtype=torch.float32)
        fill, emitted = 0, 0
        for g in range(0, len(starts), self.shuffle_chunks):
            for s in starts[g:g + self.shuffle_chunks]:
                chunk = torch.from_numpy(self.array[s:min(s + step, self.rows.stop)])
                buf[fill:fill + len(chunk)] = chunk
                fill += len(chunk)
            perm = torch.from_numpy(rng.permutation(fill))
            n_full = fill // bs
            for i in range(n_full):
                if emitted == self.steps_per_epoch:
                    return
                emitted += 1
                if emitted > skip:
                    yield buf.index_select(0, perm[i * bs:(i + 1) * bs]).numpy()
            rest = perm[n_full * bs:]
            buf[:len(rest)] = buf.index_select(0, rest)
            fill = len(rest)


def measure(store: Path, which: str, epochs: int) -> dict:
    """In this process: seconds per batch over `epochs` epochs, first batch excluded."""
    from saescale.store import open_store, split_rows

    root = open_store(store)
    array, rows = root[f"L{LAYER}/x"], split_rows(root, "train")
    if which == "old":
        source = OldChunkShuffledBatches(array, rows, BATCH, 0, SHUFFLE)
        it = source.batches(0)
    else:
        from saescale.loader import StreamedBatches

        source = StreamedBatches(array, rows, BATCH, 0, SHUFFLE)
        it = source.host_batches(0, pin=True)
    first = next(it)
    seconds = []
    cpu0 = time.process_time()  # all of this process's threads: what the loader costs, whatever the contention
    for _ in range(epochs * source.steps_per_epoch - 1):
        t0 = time.perf_counter()
        next(it)
        seconds.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu0
    it.close()
    spe = source.steps_per_epoch
    return {"seconds": seconds, "steps_per_epoch": spe, "dtype": str(first.dtype),
            "pinned": bool(getattr(first, "is_pinned", lambda: False)()),
            "first_epoch_rows_per_s": BATCH * (spe - 1) / sum(seconds[:spe - 1]),
            "later_epochs_rows_per_s": (BATCH * len(seconds[spe - 1:]) / sum(seconds[spe - 1:])
                                        if len(seconds) >= spe else None),
            "all_rows_per_s": BATCH * len(seconds) / sum(seconds),
            "cpu_s_per_batch": cpu / len(seconds), "wall_s_per_batch": sum(seconds) / len(seconds)}


def components(store: Path) -> dict:
    """Milliseconds of each part of a batch, alone, best of 3: per 32,768-row chunk, and per 131,072-row batch."""
    import google_crc32c

    from saescale.integrity import all_finite
    from saescale.loader import ChunkReader, chunk_runs, chunk_shuffle
    from saescale.store import open_store

    x = open_store(store)[f"L{LAYER}/x"]
    reader = ChunkReader(x)

    def best(f, n=3) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return 1000 * min(times)

    raw = x.unwrapped
    chunk = reader._mapped(1, slice(CHUNK_ROWS, 2 * CHUNK_ROWS))
    data = chunk.reshape(-1).view(np.uint8)
    group = next(chunk_shuffle(0, x.shape[0] - CHUNK_ROWS, CHUNK_ROWS, BATCH, SHUFFLE, 0, 0))
    mapped = {c: reader.read(c) for c in group.chunks}
    out = torch.empty(BATCH, D, dtype=torch.float16)
    ids = group.batches[0]

    def gather():
        for c, a, b in chunk_runs(ids, CHUNK_ROWS):
            torch.index_select(mapped[c], 0, torch.from_numpy(ids[a:b] - c * CHUNK_ROWS), out=out[a:b])
    old_buf = torch.empty(SHUFFLE * CHUNK_ROWS, D, dtype=torch.float32)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(old_buf))[:BATCH])
    return {
        "old: zarr read through Checked (file read, CRC32C, copy, isfinite), per chunk": best(lambda: x[0:CHUNK_ROWS]),
        "old: zarr read alone (file read, CRC32C, copy), per chunk": best(lambda: raw[0:CHUNK_ROWS]),
        "old: np.isfinite, per chunk": best(lambda: np.isfinite(chunk).all()),
        "old: cast into the float32 buffer, per chunk": best(lambda: old_buf[:CHUNK_ROWS].copy_(mapped[group.chunks[0]])),
        "old: float32 gather into a fresh array, per batch": best(lambda: old_buf.index_select(0, perm)),
        "new: map the chunk file and verify its CRC32C, per chunk": best(lambda: reader._mapped(2, slice(0, 0))),
        "new: of which CRC32C over the mapped file": best(lambda: google_crc32c.value(data[:-4])),
        "new: finite check (exponent bits), per chunk, first read only": best(lambda: all_finite(chunk)),
        "new: float16 gather from the mapped chunks into a ring buffer, per batch": best(gather),
    }


def run_child(store: Path, which: str, threads: int, epochs: int) -> dict:
    cmd = [sys.executable, __file__, "--store", str(store), "--child", which, "--threads", str(threads),
           "--epochs", str(epochs)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, default=OUT / "bench_loader.zarr")
    p.add_argument("--chunks", type=int, default=36, help="train chunks of the store built when --store is missing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3, help="epochs drawn per new-loader measurement (old: 2)")
    p.add_argument("--quick", action="store_true", help="1 repeat, new loader only")
    p.add_argument("--components", action="store_true", help="only time the parts of a batch")
    p.add_argument("--child", choices=["old", "new"], help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.child:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:a.threads])
        torch.set_num_threads(a.threads)
        print(json.dumps({**measure(a.store, a.child, a.epochs), "loadavg_after": os.getloadavg()}))
        return
    if not a.store.exists():
        print(f"building {a.store} ({a.chunks + 1} chunks of {CHUNK_ROWS} x {D} float16)", file=sys.stderr)
        make_store(a.store, a.chunks)
    for f in sorted(a.store.rglob("*")):  # into the page cache
        if f.is_file():
            f.read_bytes()
    torch.set_num_threads(1)
    result = {"store": str(a.store), "batch": BATCH, "d": D, "chunk_rows": CHUNK_ROWS, "shuffle_chunks": SHUFFLE,
              "cuda": torch.cuda.is_available(), "loadavg_before": os.getloadavg(), "runs": []}
    if a.components:
        result["components_ms"] = components(a.store)
        for k, v in result["components_ms"].items():
            print(f"| {k} | {v:.1f} |")
        return
    plan = [("new", t) for t in (1, 2)] + ([] if a.quick else [("old", t) for t in (1, 2)])
    for r in range(1 if a.quick else a.repeats):
        for which, threads in plan:
            if which == "old" and r >= 2:
                continue  # ~1 s a batch: two repeats are enough to see it
            run = run_child(a.store, which, threads, a.epochs if which == "new" else 2)
            result["runs"].append({"loader": which, "threads": threads, "repeat": r, **run})
            print(f"{which} {threads} thread(s): first epoch {run['first_epoch_rows_per_s'] / 1e6:.2f}M rows/s, "
                  f"later {(run['later_epochs_rows_per_s'] or 0) / 1e6:.2f}M rows/s, "
                  f"{1000 * run['cpu_s_per_batch']:.0f} ms CPU / {1000 * run['wall_s_per_batch']:.0f} ms wall a batch "
                  f"(load {run['loadavg_after'][0]:.1f})", file=sys.stderr)
    result["components_ms"] = components(a.store)
    result["loadavg_after"] = os.getloadavg()
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_loader.json").write_text(json.dumps(result, indent=1))

    print("| loader | threads | first epoch, M rows/s (median) | later epochs, M rows/s (median) | best run, later "
          "epochs | CPU ms / wall ms a batch (median) | runs |\n|---|---|---|---|---|---|---|")
    for which, threads in [("old", 1), ("old", 2), ("new", 1), ("new", 2)]:
        runs = [r for r in result["runs"] if (r["loader"], r["threads"]) == (which, threads)]
        if runs:
            first = statistics.median(r["first_epoch_rows_per_s"] for r in runs) / 1e6
            later = statistics.median(r["later_epochs_rows_per_s"] for r in runs) / 1e6
            best = max(r["later_epochs_rows_per_s"] for r in runs) / 1e6
            cpu = 1000 * statistics.median(r["cpu_s_per_batch"] for r in runs)
            wall = 1000 * statistics.median(r["wall_s_per_batch"] for r in runs)
            print(f"| {which} | {threads} | {first:.2f} | {later:.2f} | {best:.2f} | {cpu:.0f} / {wall:.0f} | {len(runs)} |")
    print(f"\nload average {result['loadavg_before'][0]:.1f} before, {result['loadavg_after'][0]:.1f} after\n")
    print("| part | ms |\n|---|---|")
    for k, v in result["components_ms"].items():
        print(f"| {k} | {v:.1f} |")


if __name__ == "__main__":
    main()
