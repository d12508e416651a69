"""Training throughput of the TopK SAE step (tokens/s) over n, on synthetic unit-norm inputs.

    python benchmarks/bench_train.py --d 128 --n 256 512 1024 2048 --k 32 --batch 4096 --steps 30

Prints one JSON line per n: the numbers behind the README's "Measured" table. Uses CUDA when present.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from saescale.sae.model import SparseAutoencoder
from saescale.sae.train import TrainSpec, training_step


def bench(d: int, n: int, k: int, batch: int, steps: int, device: torch.device, dead_fraction: float = 0.0) -> dict:
    sae = SparseAutoencoder(d, n, "topk", k)
    sae.init_from_data_(torch.zeros(d))
    sae.to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, eps=6.25e-10)
    spec = TrainSpec("topk", n, k, d, 1e-3, batch, batch * steps, 6.25e-10, (0.9, 0.999), 1 / 32,
                     min(n, 2 ** max(0, (d // 2).bit_length() - 1)), 10**9, 0.0, 1, 0, 0, str(device))
    dead = torch.arange(n, device=device) < int(dead_fraction * n)  # AuxK runs on these (REFERENCE A.5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    x = torch.randn(batch, d, device=device)
    x = x / x.norm(dim=1, keepdim=True)
    for _ in range(3):  # warm-up
        training_step(sae, opt, x, 1.0, dead, spec, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        training_step(sae, opt, x, 1.0, dead, spec, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"d": d, "n": n, "k": k, "batch": batch, "device": str(device), "threads": torch.get_num_threads(),
            "dead_fraction": dead_fraction, "tokens_per_s": batch * steps / dt, "ms_per_step": 1000 * dt / steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--n", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dead", type=float, default=0.0, help="fraction of latents marked dead, so AuxK runs")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for n in a.n:
        print(json.dumps(bench(a.d, n, a.k, a.batch, a.steps, device, a.dead)))


if __name__ == "__main__":
    main()
