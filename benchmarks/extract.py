"""Extraction throughput against the bare forward pass that it cannot avoid.

    snakemake --cores all                     # the default run: a subject model and its token store
    python benchmarks/extract.py --model data/subjects/tiny/model --tokens data/tokens/tiny.zarr --layers 2

Both sides run the same windows, in the same batches, with the same threads. The bare side runs the forward pass
only as far as the deepest recorded block (what any extractor must compute) and keeps nothing. The extract side is
`saescale.store.extract` writing a real store to a temporary directory: it reads the windows, runs the same
truncated forward, casts to the store's dtype, checks for overflow and writes Zarr chunks. Overhead =
bare tokens/s / extract tokens/s - 1.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saescale.corpus import open_token_store
from saescale.store import extract, plan_windows
from saescale.subject import load_model, record_resid, run_until_recorded


def bare_forward(model, windows: np.ndarray, layers: list[int], batch: int) -> float:
    """Seconds for the truncated forward over `windows`, nothing kept."""
    t0 = time.perf_counter()
    with torch.no_grad(), record_resid(model, layers, stop=True):
        for b in range(0, len(windows), batch):
            run_until_recorded(model, torch.from_numpy(windows[b:b + batch]).long())
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="data/subjects/tiny/model")
    p.add_argument("--tokens", default="data/tokens/tiny.zarr")
    p.add_argument("--layers", type=int, nargs="+", default=[2])
    p.add_argument("--train-tokens", type=int, default=262144, help="rows to extract (plus the eval split)")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--batch-windows", type=int, default=64)
    p.add_argument("--chunk-windows", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.model)
    tokens = open_token_store(a.tokens)
    ids, _, _ = plan_windows(tokens, a.train_tokens)
    windows = tokens["windows"].oindex[np.sort(ids), :]
    n_tok = windows.size
    bare, full = [], []
    for _ in range(a.repeats):  # alternate, so drift hits both
        bare.append(n_tok / bare_forward(model, windows, a.layers, a.batch_windows))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            extract(model, a.tokens, a.layers, a.train_tokens, a.dtype, a.batch_windows, a.chunk_windows,
                    str(Path(tmp) / "acts.zarr"), model_name=a.model, device=torch.device("cpu"))
            full.append(n_tok / (time.perf_counter() - t0))
    b, f = float(np.median(bare)), float(np.median(full))
    result = {"model": a.model, "layers": a.layers, "tokens": n_tok, "dtype": a.dtype, "threads": a.threads,
              "bare_forward_tokens_per_s": bare, "extract_tokens_per_s": full, "overhead": b / f - 1}
    print(json.dumps(result, indent=1))
    print(f"\n| tokens | bare forward | extract | overhead |\n|---|---|---|---|\n"
          f"| {n_tok:,} | {b:,.0f} tok/s | {f:,.0f} tok/s | {100 * (b / f - 1):.0f}% |")


if __name__ == "__main__":
    main()
