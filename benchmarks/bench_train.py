"""Training throughput of the TopK SAE step (tokens/s) over n, on synthetic unit-norm inputs.

    python benchmarks/bench_train.py --d 128 --n 256 512 1024 2048 --k 32 --batch 4096 --steps 30

Prints one JSON line per n: the numbers behind the README's "Measured" table. Uses CUDA when present.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch
from throughput_worker import dead_mask, saescale_step, time_steps


def bench(d: int, n: int, k: int, batch: int, steps: int, device: torch.device, dead_fraction: float = 0.0) -> dict:
    """The step `train_sae` runs (its Adam and allocator settings included), on one fixed unit-norm batch."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    step = saescale_step(d, n, k, batch, dead_mask(n, dead_fraction, device), device, autocast)  # AuxK on dead
    x = torch.randn(batch, d, device=device)
    x = x / x.norm(dim=1, keepdim=True)
    time_steps(step, [x], 3, 0.0, device)  # warm-up
    done, dt, _ = time_steps(step, [x], steps, 0.0, device)
    return {"d": d, "n": n, "k": k, "batch": batch, "device": str(device), "threads": torch.get_num_threads(),
            "dead_fraction": dead_fraction, "tokens_per_s": batch * done / dt, "ms_per_step": 1000 * dt / done}


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
