"""The TopK training step on the GPU path (issue 18), measured on this machine's CPU:

    nice -n 5 python benchmarks/bench_step.py                 # ~5 min on 2 busy cores
    python benchmarks/bench_step.py --quick                   # smaller shapes, ~1 min
    python benchmarks/bench_step.py --only ratio              # one part: ratio|memory|microbatch|gathers

- ratio: step time with 0% and 50% of latents dead (AuxK idle as the trainer runs it when no latent can be dead
  yet; AuxK running over an empty dead set; AuxK over half the latents), interleaved, median of repeats;
  d = 768, n = 32768, k = 32, k_aux = 256, batch 4096 by default.
- memory: the peak resident memory a step adds (a fresh process per point, glibc returning freed memory),
  against the dead fraction and train.microbatch, in float32 and under bf16 autocast; and the model that
  extrapolates it to batch 131,072, n = 2^17, bf16.
- microbatch: time of a step with train.microbatch = batch / 4 against the whole batch, and the largest weight
  difference after a few steps from the same start.
- gathers: bf16 autocast steps (train.precision: bf16) whose sparse passes gather bf16 rows against the same
  steps gathering float32 rows (as before bf16 gathers), with 0% dead (AuxK idle) and 50% dead, interleaved;
  wall and CPU time (the CPU time of this process is less disturbed by other jobs on a loaded machine).

Prints JSON lines and a summary; writes every number to benchmarks/out/bench_step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "out"
GIB = 2**30


def build(d: int, n: int, k: int, batch: int, dead_fraction: float, microbatch: int | None = None,
          retain: bool = True, seed: int = 0):
    """The step `train_sae` runs (Adam, allocator settings, k_aux as cmd_train derives it)."""
    from saescale.config import k_aux_for
    from saescale.sae.model import SparseAutoencoder
    from saescale.sae.train import TrainSpec, adam, retain_freed_memory, training_step

    torch.manual_seed(seed)
    sae = SparseAutoencoder(d, n, "topk", k)
    sae.init_from_data_(torch.zeros(d))
    opt = adam(sae.parameters(), 1e-4, eps=6.25e-10)
    if retain:
        retain_freed_memory()
    spec = TrainSpec("topk", n, k, d, 1e-4, batch, batch, 6.25e-10, (0.9, 0.999), 1 / 32,
                     min(k_aux_for({"k_aux": None}, d), n), 10**9, 0.0, 1, 0, 0, "cpu")
    if "microbatch" in TrainSpec.__dataclass_fields__:
        spec = dataclasses.replace(spec, microbatch=microbatch)
    dead = torch.arange(n) < int(dead_fraction * n)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d, generator=g)
    x = x / x.norm(dim=1, keepdim=True)
    has_flag = "auxk" in inspect.signature(training_step).parameters

    def step(autocast=contextlib.nullcontext(), auxk: bool = True):
        kwargs = {"auxk": auxk} if has_flag else {}
        if not has_flag and not auxk:  # before issue 18 an all-live mask skipped AuxK by itself
            dead_used = torch.zeros_like(dead)
        else:
            dead_used = dead
        training_step(sae, opt, x, 1.0, dead_used, spec, autocast, **kwargs)

    return sae, step


def timed(step, **kwargs) -> float:
    t = time.perf_counter()
    step(**kwargs)
    return time.perf_counter() - t


def ratio(d: int, n: int, k: int, batch: int, repeats: int) -> dict:
    """Three steps on one SAE per case, interleaved round by round so load swings hit every case alike."""
    cases = {"0% dead, AuxK idle": (0.0, False), "0% dead, AuxK on": (0.0, True), "50% dead": (0.5, True)}
    steps = {name: build(d, n, k, batch, frac)[1] for name, (frac, _) in cases.items()}
    for name, (_, auxk) in cases.items():
        steps[name](auxk=auxk)  # warm-up: Adam state, allocator
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (_, auxk) in cases.items():
            times[name].append(timed(steps[name], auxk=auxk))
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"d": d, "n": n, "k": k, "batch": batch,
            "ms": {name: [round(1000 * t) for t in ts] for name, ts in times.items()},
            "median_ms": {name: round(1000 * t) for name, t in med.items()},
            "ratio_50_dead": med["50% dead"] / med["0% dead, AuxK idle"],
            "ratio_50_dead_vs_auxk_on": med["50% dead"] / med["0% dead, AuxK on"]}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_point(d: int, n: int, k: int, batch: int, dead: float, microbatch: int | None, bf16: bool) -> dict:
    """In a fresh process: the peak resident memory of the second step above the memory before it (the first
    step allocates the Adam state); glibc's default thresholds return freed blocks, so the peak is real."""
    _, step = build(d, n, k, batch, dead, microbatch, retain=False)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    step(autocast=autocast)
    before = _rss()
    with open("/proc/self/clear_refs", "w") as f:  # resets the high-water mark VmHWM (Linux >= 4.0)
        f.write("5")
    step(autocast=autocast)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    return {"d": d, "n": n, "k": k, "batch": batch, "dead": dead, "microbatch": microbatch, "bf16": bf16,
            "peak_step_gib": (hwm - before) / GIB}


def memory(d: int, n: int, k: int, batch: int) -> list[dict]:
    points = []
    for bf16 in (False, True):
        for micro in (None, batch // 4):
            for dead in (0.0, 0.5, 1.0):
                args = json.dumps([d, n, k, batch, dead, micro, bf16])
                out = subprocess.run([sys.executable, __file__, "--memory-point", args], capture_output=True,
                                     text=True, check=True)
                points.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(points[-1]), flush=True)
    return points


def extrapolate(points: list[dict], batch: int = 131072, n: int = 2**17, d: int = 768) -> dict:
    """A conservative model of a bf16 step's peak at the paper's scale:
    peak = 4 float32 copies of (W_enc, W_dec) kept between steps (weights, 2 Adam moments, EMA)
         + their 2 gradients
         + c * rows * n * 2 bytes (the [rows, n] bf16 pre-activations and the top-k scratch; rows = the batch,
           or train.microbatch), c = the largest measured whole-batch peak over rows * n * 2
         + r * batch (what every row keeps across blocks: indices and values of k + k_aux slots, [batch, d]
           rows), r fitted from the microbatched points after their block term.
    Measured peaks already hold the gradients, so both c and r overcount."""
    bf16 = [p for p in points if p["bf16"]]
    whole = [p for p in bf16 if not p["microbatch"]]
    c = max(p["peak_step_gib"] * GIB / (p["batch"] * p["n"] * 2) for p in whole)
    r = max(max(0.0, p["peak_step_gib"] * GIB - c * p["microbatch"] * p["n"] * 2) / p["batch"]
            for p in bf16 if p["microbatch"])
    fixed = 6 * 2 * n * d * 4 + r * batch
    out = {"c": c, "r_bytes_per_row": r, "fixed_gib": fixed / GIB,
           "peak_gib": {str(m or "none"): (fixed + c * (m or batch) * n * 2) / GIB
                        for m in (None, 65536, 32768, 16384)}}
    fits = [m for m in (batch, 65536, 32768, 16384, 8192) if fixed + c * m * n * 2 <= 40e9]
    out["largest_rows_per_block_under_40GB"] = fits[0] if fits else None
    return out


def microbatch(d: int, n: int, k: int, batch: int, repeats: int) -> dict:
    whole_sae, whole = build(d, n, k, batch, 0.5)
    micro_sae, micro = build(d, n, k, batch, 0.5, microbatch=batch // 4)
    times = {"whole": [], "micro": []}
    for _ in range(repeats):
        times["whole"].append(timed(whole))
        times["micro"].append(timed(micro))
    diff = max(float((a - b).abs().max()) for a, b in zip(whole_sae.state_dict().values(),
                                                          micro_sae.state_dict().values()))
    scale = max(float(a.abs().max()) for a in whole_sae.state_dict().values())
    return {"batch": batch, "microbatch": batch // 4, "n": n, "steps": repeats,
            "median_ms": {key: round(1000 * statistics.median(v)) for key, v in times.items()},
            "max_abs_weight_diff": diff, "max_abs_weight": scale}


def gathers(d: int, n: int, k: int, batch: int, repeats: int) -> dict:
    import saescale.sae.model as model

    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    native = model.gather_dtype
    cases = {f"{rows} rows, {int(100 * frac)}% dead": (frac, rows)
             for frac in (0.0, 0.5) for rows in ("bf16", "float32")}
    steps = {name: build(d, n, k, batch, frac)[1] for name, (frac, _) in cases.items()}

    def run(name: str) -> tuple[float, float]:
        frac, rows = cases[name]
        model.gather_dtype = native if rows == "bf16" else (lambda device_type: None)
        try:
            c = time.process_time()
            return timed(steps[name], autocast=bf16, auxk=frac > 0), time.process_time() - c
        finally:
            model.gather_dtype = native

    for name in cases:
        run(name)  # warm-up
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(repeats):
        for name in (list(cases) if rep % 2 == 0 else list(cases)[::-1]):
            w, c = run(name)
            wall[name].append(w)
            cpu[name].append(c)
    return {"d": d, "n": n, "k": k, "batch": batch, "load_average": os.getloadavg(),
            "wall_ms": {name: [round(1000 * t) for t in v] for name, v in wall.items()},
            "median_wall_ms": {name: round(1000 * statistics.median(v)) for name, v in wall.items()},
            "median_cpu_ms": {name: round(1000 * statistics.median(v)) for name, v in cpu.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="n = 8192, batch 2048, fewer repeats")
    p.add_argument("--only", choices=["ratio", "memory", "microbatch", "gathers"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-point", help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.memory_point:
        print(json.dumps(memory_point(*json.loads(a.memory_point))))
        return
    d, n, k, batch = (768, 8192, 32, 2048) if a.quick else (768, 32768, 32, 4096)
    repeats = 3 if a.quick else a.repeats
    result = {"load_average": os.getloadavg(), "threads": a.threads, "torch": torch.__version__}
    if a.only in (None, "ratio"):
        result["ratio"] = ratio(d, n, k, batch, repeats)
        print(json.dumps(result["ratio"]), flush=True)
    if a.only in (None, "memory"):
        result["memory"] = memory(d, n, k, batch)
        result["memory_model"] = extrapolate(result["memory"])
        print(json.dumps(result["memory_model"]), flush=True)
    if a.only in (None, "microbatch"):
        result["microbatch"] = microbatch(d, n, k, batch, repeats)
        print(json.dumps(result["microbatch"]), flush=True)
    if a.only in (None, "gathers"):
        result["gathers"] = gathers(d, n, k, batch, repeats)
        print(json.dumps(result["gathers"]), flush=True)
    result["load_average_after"] = os.getloadavg()
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_step.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
