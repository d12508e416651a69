"""Where one training step's time goes, saescale against sparsify, and the floor that bounds their ratio.

    python benchmarks/profile_step.py              # d = 768, n in {16384, 32768}; ~10 min on 2 quiet cores
    python benchmarks/profile_step.py --sizes 768:32768 --repeats 2

The same workers as `train_throughput.py` (one long-lived process per tool, the peers under the peers' venv),
asked in turn, rotating which goes first, for (1) a timed measurement, (2) one step under torch.profiler,
and (3), in this process, the floor: the work every TopK implementation pays, i.e. the dense encoder product
[B, d] x [d, n] at the measured GEMM peak (best of repeated products into a reused output) plus the top-k over
its [B, n] result. The load average is read before each measurement: other jobs on a shared machine slow every
tool, and interleaving spreads that over all of them.

The best ratio any implementation can reach against sparsify is sparsify's step / the floor: if it is below
2, a 2x lead is out of reach at that size and precision on this CPU, whatever the rest of the step costs.
Profiles are self CPU times per op, sorted into the parts of a step by `part_of` (the ops differ between
the tools: sparsify's encoder backward is a [B, k, d] product and index_add, its decoder gradient
embedding_bag's dense backward, its Adam the single-tensor loop). Raw numbers go to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import DEFAULT_PEERS, HERE, Worker, cpu_name, gemm_peak  # noqa: E402

PARTS = ["encoder GEMM", "top-k", "sparse passes", "weight gradients", "Adam", "decoder projection + renorm",
         "other"]
SPARSE_OPS = {"aten::embedding_bag", "aten::_embedding_bag", "aten::_embedding_bag_forward_only",
              "aten::_embedding_bag_per_sample_weights_backward", "aten::gather", "aten::index_select"}


def part_of(context: str, op: str, big: bool) -> str:
    """The part of a step an op's self time belongs to. `context`: the backward node it ran under,
    "optimizer", "projection" (the decoder-gradient projection and the renormalization, labelled by the worker) or
    "forward"."""
    if context == "optimizer":
        return "Adam"
    if context == "projection":
        return "decoder projection + renorm"
    if op == "aten::topk":
        return "top-k"
    if big and op in {"aten::addmm", "aten::mm", "aten::linear", "aten::matmul"}:
        return "encoder GEMM"
    if context == "forward":
        return "sparse passes" if op in SPARSE_OPS else "other"
    # backward: the values' gradient is a sparse pass; [n, d] weight gradients are the rest of the big work
    if op in SPARSE_OPS and op != "aten::embedding_bag" and op != "aten::_embedding_bag":
        return "sparse passes"
    if op in {"aten::embedding_bag", "aten::_embedding_bag", "aten::_embedding_bag_backward",
              "aten::_embedding_bag_dense_backward", "aten::index_add_", "aten::sort", "aten::searchsorted",
              "aten::mul", "aten::zeros_like", "aten::zero_", "aten::fill_", "aten::index", "aten::clone",
              "aten::copy_", "aten::to", "aten::_to_copy", "aten::empty", "aten::sub"}:
        return "weight gradients"
    return "other"


def by_part(profile: dict[str, float]) -> dict[str, float]:
    out = dict.fromkeys(PARTS, 0.0)
    for key, ms in profile.items():
        context, op, big = key.split("|")
        out[part_of(context, op, big == "1")] += ms
    return out


def top_ops(profile: dict[str, float], count: int = 12) -> list[tuple[str, float]]:
    return sorted(profile.items(), key=lambda kv: -kv[1])[:count]


def topk_ms(batch: int, n: int, k: int, repeats: int = 3) -> float:
    """Best time of torch.topk(k) over a [batch, n] float32 matrix of Gaussian pre-activations (ms)."""
    pre = torch.randn(batch, n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        pre.topk(k, dim=-1, sorted=False)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["768:16384", "768:32768"], help="d:n pairs")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--tools", nargs="+", default=["saescale", "sparsify"],
                   help="sparsify-heap: sparsify in a process whose heap keeps freed memory (no page faults)")
    p.add_argument("--peer-python", default=str(DEFAULT_PEERS))
    p.add_argument("--out", default=str(HERE / "out" / "profile_step.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device("cpu")
    workers = {t: Worker(t, sys.executable if t == "saescale" else a.peer_python, a.threads, "cpu")
               for t in a.tools}
    rows = []
    try:
        for size in a.sizes:
            d, n = (int(v) for v in size.split(":"))
            req = {"d": d, "n": n, "k": a.k, "batch": a.batch, "dead": 0.0, "bf16": False, "seed": 0,
                   "warmup": 2, "steps": 2, "seconds": a.seconds}
            step_ms: dict[str, list[float]] = {t: [] for t in a.tools}
            cpu_ms: dict[str, list[float]] = {t: [] for t in a.tools}
            faults: dict[str, list[float]] = {t: [] for t in a.tools}
            parts: dict[str, list[dict]] = {t: [] for t in a.tools}
            raw: dict[str, list[dict]] = {t: [] for t in a.tools}
            floor, loads = [], []
            for rep in range(a.repeats):
                order = a.tools[rep % len(a.tools):] + a.tools[:rep % len(a.tools)]
                for tool in order:
                    loads.append(os.getloadavg()[0])
                    got = workers[tool].measure(req)
                    step_ms[tool].append(1e3 * got["seconds"] / got["steps"])
                    cpu_ms[tool].append(1e3 * got["cpu_seconds"] / got["steps"])
                    faults[tool].append(got["page_faults_per_step"])
                    prof = workers[tool].measure({**req, "profile": 1})["profile"]
                    raw[tool].append(prof)
                    parts[tool].append(by_part(prof))
                    print(f"d={d} n={n} repeat {rep}: {tool} {step_ms[tool][-1]:.0f} ms/step "
                          f"({cpu_ms[tool][-1]:.0f} ms CPU, {faults[tool][-1]:,.0f} page faults), load "
                          f"{loads[-1]:.1f}", file=sys.stderr)
                loads.append(os.getloadavg()[0])
                gemm = 2 * a.batch * d * n / (gemm_peak(a.batch, d, n, device, seconds=2.0) * 1e9) * 1e3
                floor.append({"gemm_ms": gemm, "topk_ms": topk_ms(a.batch, n, a.k)})
            med = {t: statistics.median(v) for t, v in step_ms.items()}
            floor_ms = statistics.median(f["gemm_ms"] + f["topk_ms"] for f in floor)
            cpu_med = {t: statistics.median(v) for t, v in cpu_ms.items()}
            rows.append({"d": d, "n": n, "step_ms": step_ms, "median_ms": med, "cpu_ms": cpu_ms,
                         "page_faults_per_step": faults,
                         "median_cpu_ms": cpu_med, "floor": floor, "floor_ms": floor_ms,
                         "loads": loads, "parts": {t: {k: statistics.median(p[k] for p in v) for k in PARTS}
                                                   for t, v in parts.items()},
                         "raw": raw,
                         "ratio": med.get("sparsify", float("nan")) / med.get("saescale", float("nan")),
                         "best_ratio": med.get("sparsify", float("nan")) / floor_ms})
    finally:
        for w in workers.values():
            w.close()
    meta = {"device": cpu_name(), "threads": a.threads, "batch": a.batch, "k": a.k, "torch": torch.__version__,
            "versions": {t: w.info["version"] for t, w in workers.items()},
            "date": time.strftime("%Y-%m-%d %H:%M")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(json.dumps(meta))
    for r in rows:
        loads = f"{min(r['loads']):.1f}-{max(r['loads']):.1f}"
        print(f"\n### d = {r['d']}, n = {r['n']} (load average {loads})\n")
        tools = list(r["median_ms"])
        print("| part (ms per step, profiled) | " + " | ".join(tools) + " |")
        print("|---|" + "---|" * len(tools))
        for part in PARTS:
            print(f"| {part} | " + " | ".join(f"{r['parts'][t][part]:.0f}" for t in tools) + " |")
        print("| **step, timed (median)** | " + " | ".join(f"{r['median_ms'][t]:.0f}" for t in tools) + " |")
        print("| step, CPU time of the process / 2 threads | "
              + " | ".join(f"{r['median_cpu_ms'][t] / 2:.0f}" for t in tools) + " |")
        print("| page faults per step | "
              + " | ".join(f"{statistics.median(r['page_faults_per_step'][t]):,.0f}" for t in tools) + " |")
        f = r["floor"]
        gemm = statistics.median(x["gemm_ms"] for x in f)
        print(f"\nfloor {r['floor_ms']:.0f} ms (GEMM at peak {gemm:.0f} + "
              f"top-k {statistics.median(x['topk_ms'] for x in f):.0f}); ratio sparsify/saescale "
              f"{r['ratio']:.2f}x; best achievable sparsify/floor {r['best_ratio']:.2f}x")
        for t in tools:
            print(f"{t} top ops: " + ", ".join(f"{k} {v:.0f}" for k, v in top_ops(r["raw"][t][-1], 10)))


if __name__ == "__main__":
    main()
