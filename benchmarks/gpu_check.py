"""One prepared GPU check of the gpt2-small preset's training step, loader and H2D copy (< 5 min on an H100).

    python benchmarks/gpu_check.py                          # CUDA: writes benchmarks/out/gpu_check.{json,md}
    python benchmarks/gpu_check.py --rehearsal /tmp/rehearsal-run   # also reruns the rehearsal's GPU stages
    python benchmarks/gpu_check.py --cpu-smoke              # tiny shapes on CPU: checks the script (< 60 s)

What it measures, each through the pipeline's own code:
- `Trainer.train_step` (training_step + EMA + dead-latent bookkeeping, bf16 autocast as train.precision auto
  gives on CUDA, the preset's train settings via cli._train_spec) at B = 131,072, d = 768 for n = 2^17 with 0%
  and 50% of the latents forced dead (AuxK at k_aux = 256 over the dead columns) and a few smaller (n, k):
  ms per step (torch.cuda.Event around the timed steps only) and torch.cuda.max_memory_allocated;
- one float32 batch [B, d] host-to-device from pageable and from pinned memory, and a pinned float16 one;
- saescale.loader's streamed batches (device_batches: float16 ring, side-stream copy) on a synthetic float16 store
  of d = 768 in the preset's chunk layout, alone and feeding the real loop (to(device), normalize, step);
- with --rehearsal DIR (a finished benchmarks/rehearsal.py run): the rehearsal's train and per-SAE GPU stages
  rerun on CUDA through Snakemake, their benchmark: files read back.
Compare with the model of benchmarks/h100_model.py (modeled, not measured).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from h100_model import make_store  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "workflow/configs/gpt2-small.yaml"

# (n, k, dead fraction); the first two are the brief's headline points
CUDA_POINTS = [(131072, 32, 0.0), (131072, 32, 0.5), (131072, 256, 0.0), (131072, 256, 0.5),
               (2048, 8, 0.0), (2048, 8, 0.5), (8192, 32, 0.0), (32768, 32, 0.0), (32768, 32, 0.5), (65536, 64, 0.0)]
SMOKE_POINTS = [(1024, 8, 0.0), (1024, 8, 0.5)]


class Clock:
    """Seconds of a region: CUDA events on the current stream (no sync inside), or perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def region(self, out: list[float]):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            yield
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            yield
            out.append(time.perf_counter() - t0)


def make_trainer(n: int, k: int, dead_fraction: float, train: dict, device: torch.device, tmp: Path):
    """A Trainer as cmd_train builds one (cli._train_spec over the preset's train settings), with the first
    `dead_fraction` of the latents marked dead (tokens_since_fired at dead_tokens)."""
    from saescale.cli import _train_spec
    from saescale.sae.train import Trainer

    d = 768
    spec = _train_spec({"arch": "topk", "n": n, "k": k, "spec": train}, d, str(device), "synthetic")
    spec = dataclasses.replace(spec, log_every=10**9, checkpoint_seconds=0)  # no log row or checkpoint in the timing
    trainer = Trainer(np.zeros(d, np.float32), 1.0, spec, tmp / f"ck_{n}_{k}.pt", np.zeros((1, d), np.float32))
    trainer.n_forced_dead = int(dead_fraction * n)
    if trainer.n_forced_dead:  # the trainer's own bound on AuxK's slots, read as at a log step (one sync, untimed)
        trainer.tokens_since_fired[: trainer.n_forced_dead] = spec.dead_tokens
        trainer._bound_dead()
    return trainer


def train_step(trainer, x: torch.Tensor) -> None:
    """Trainer.train_step with the forced-dead latents kept dead: at B = 131,072 nearly every latent of a fresh
    SAE fires in the first step, which would otherwise switch AuxK off again (one fill, no host sync)."""
    trainer.tokens_since_fired[: trainer.n_forced_dead] = trainer.spec.dead_tokens
    trainer.train_step(x)


def unit_batch(B: int, d: int, device: torch.device) -> torch.Tensor:
    x = torch.randn(B, d, device=device)
    return x / x.norm(dim=1, keepdim=True)


def step_points(points, B: int, train: dict, device: torch.device, warmup: int, steps: int, tmp: Path) -> list[dict]:
    clock, out = Clock(device), []
    for n, k, dead in points:
        rec = {"n": n, "k": k, "dead_fraction": dead, "batch": B}
        trainer = x = None
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            trainer = make_trainer(n, k, dead, {**train, "batch_size": B}, device, tmp)
            x = unit_batch(B, 768, device)
            for _ in range(warmup):
                train_step(trainer, x)
            times: list[float] = []
            with clock.region(times):
                for _ in range(steps):
                    train_step(trainer, x)
            rec["ms_per_step"] = 1000 * times[0] / steps
            rec["tokens_per_s"] = B * steps / times[0]
            if device.type == "cuda":
                rec["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except torch.OutOfMemoryError as exc:
            rec["error"] = "OOM: " + str(exc).splitlines()[0][:200]
        except RuntimeError as exc:  # e.g. a kernel that refuses > 2^31 elements: recorded, the check goes on
            rec["error"] = f"{type(exc).__name__}: " + str(exc).splitlines()[0][:200]
        print(json.dumps(rec), flush=True)
        out.append(rec)
        del trainer, x
    return out


def h2d(B: int, d: int, device: torch.device, repeats: int) -> dict:
    """One batch host -> device: float32 pageable (what train_together does), float32 and float16 pinned."""
    clock, out = Clock(device), {}
    host = torch.randn(B, d)
    sources = {"float32_pageable": host, "float32_pinned": host.pin_memory() if device.type == "cuda" else host,
               "float16_pinned": (host.half().pin_memory() if device.type == "cuda" else host.half())}
    for name, src in sources.items():
        src.to(device, non_blocking=True)
        times: list[float] = []
        for _ in range(repeats):
            with clock.region(times):
                src.to(device, non_blocking=True)
        best = min(times)
        out[name] = {"bytes": src.numel() * src.element_size(), "ms": 1000 * best, "gb_per_s": src.numel() * src.element_size() / best / 1e9}
    return out


def loader(B: int, chunks: int, chunk_rows: int, train: dict, device: torch.device, tmp: Path,
           n: int, k: int, steps: int) -> dict:
    """saescale.loader's streamed batches alone (float16 on the device through the side-stream copy), then feeding
    the training loop as train_together does (cast and normalize on the device)."""
    from saescale.normalize import normalize
    from saescale.store import batch_stream, open_store

    writer = make_store(tmp / "act.zarr", chunks, chunk_rows=chunk_rows)
    root = open_store(tmp / "act.zarr")
    out = {"store_chunks": chunks, "chunk_rows": chunk_rows, "batch": B, "writer_s_per_chunk": float(np.median(writer))}
    stream = batch_stream(root, 8, B, 0, 0.0, train["shuffle_chunks"])
    assert not stream.in_memory
    it = stream.device_batches(0, device)
    next(it)
    clock, times = Clock(device), []
    with clock.region(times):
        for _ in range(steps):
            next(it).float()
    out["loader_alone_s_per_batch"] = times[0] / steps
    del it
    trainer = make_trainer(n, k, 0.0, {**train, "batch_size": B}, device, tmp)
    it = stream.device_batches(0, device)
    trainer.train_step(normalize(next(it).float())[0])
    times = []
    with clock.region(times):
        for _ in range(steps):
            trainer.train_step(normalize(next(it).float())[0])
    out["loop_s_per_batch"] = times[0] / steps
    x = unit_batch(B, 768, device)
    step_times: list[float] = []
    with clock.region(step_times):
        for _ in range(steps):
            trainer.train_step(x)
    out["step_alone_s"] = step_times[0] / steps
    out["loop_n_k"] = [n, k]
    out["bound"] = "loader" if out["loop_s_per_batch"] > 1.2 * out["step_alone_s"] else "step"
    del it, trainer
    shutil.rmtree(tmp / "act.zarr", ignore_errors=True)
    return out


def rehearsal(run_dir: Path, timeout_s: float) -> dict:
    """Rerun the rehearsal's train and per-SAE stages on CUDA: its config.yaml with train.device cuda and
    precision auto (bf16) makes Snakemake rerun train and everything after it; read the benchmark: files."""
    import yaml

    try:
        import rehearsal as reh
    except ImportError as exc:
        return {"skipped": f"benchmarks/rehearsal.py not importable: {exc}"}
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        return {"skipped": f"{cfg_path} does not exist (run benchmarks/rehearsal.py first)"}
    cfg = yaml.safe_load(cfg_path.read_text())
    shutil.copy(cfg_path, run_dir / "config.cpu.yaml")
    cfg.setdefault("train", {}).update({"device": "cuda", "precision": "auto"})
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    results = run_dir / "benchmarks" / "results"
    if results.exists():
        shutil.move(str(results), str(run_dir / "benchmarks" / f"results.cpu.{int(time.time())}"))
    cmd = reh.snakemake_cmd(run_dir, os.cpu_count() or 4, "--keep-going", "--rerun-incomplete", "--resources",
                            "gpu=1", "--rerun-triggers", "params", "mtime")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        rc, tail = None, f"stopped after {timeout_s:.0f} s"
    return {"returncode": rc, "wall_s": time.perf_counter() - t0, "jobs": reh.ordered(reh.read_benchmarks(run_dir)),
            "log_tail": tail}


def markdown(res: dict) -> str:
    lines = [f"# GPU check ({res['device']}, {res['date']})", "", "| n | k | dead | batch | ms/step | tokens/s | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in res["steps"]:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['k']} | {r['dead_fraction']:.0%} | {r['batch']} | {r['error']} | | |")
        else:
            peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
            lines.append(f"| {r['n']} | {r['k']} | {r['dead_fraction']:.0%} | {r['batch']} | {r['ms_per_step']:.1f} | "
                         f"{r['tokens_per_s']:,.0f} | {peak} |")
    lines += ["", "| H2D of one batch | MB | ms | GB/s |", "|---|---|---|---|"]
    for name, r in res["h2d"].items():
        lines.append(f"| {name} | {r['bytes'] / 1e6:.0f} | {r['ms']:.1f} | {r['gb_per_s']:.1f} |")
    ld = res["loader"]
    lines += ["", f"Streamed loader (batch {ld['batch']}, {ld['store_chunks']} chunks of {ld['chunk_rows']} rows, page "
              f"cache): {ld['loader_alone_s_per_batch'] * 1e3:.0f} ms per batch alone; the loop (loader -> to(device) -> "
              f"normalize -> train_step at n = {ld['loop_n_k'][0]}, k = {ld['loop_n_k'][1]}) {ld['loop_s_per_batch'] * 1e3:.0f} ms "
              f"per batch against {ld['step_alone_s'] * 1e3:.0f} ms for the step alone: bound by the {ld['bound']}."]
    if res.get("rehearsal"):
        r = res["rehearsal"]
        if "skipped" in r:
            lines += ["", f"Rehearsal: skipped ({r['skipped']})"]
        else:
            lines += ["", f"Rehearsal GPU stages (rc {r['returncode']}, {r['wall_s']:.0f} s):", "",
                      "| rule | job | wall s | max RSS MB |", "|---|---|---|---|"]
            lines += [f"| {j['rule']} | {j['job']} | {j['wall_s']} | {j['max_rss_mb']} |" for j in r["jobs"]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the script end to end")
    p.add_argument("--rehearsal", type=Path, help="a finished benchmarks/rehearsal.py run directory")
    p.add_argument("--rehearsal-timeout", type=float, default=150.0, help="seconds allowed for the rehearsal stages")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/out/gpu_check.json")
    a = p.parse_args()
    from saescale.config import load_config

    train = load_config(PRESET)["train"]
    smoke = a.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --cpu-smoke to check the script on CPU")
    device = torch.device("cpu" if smoke else "cuda")
    torch.manual_seed(0)
    res = {"device": "cpu (smoke)" if smoke else torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M"),
           "torch": torch.__version__, "host": platform.node(), "cpu_smoke": smoke, "load_before": os.getloadavg(),
           "timing": "torch.cuda.Event around the timed steps only" if not smoke else "perf_counter"}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        if smoke:
            res["steps"] = step_points(SMOKE_POINTS, 512, train, device, 1, 1, tmp)
            res["h2d"] = h2d(512, 768, device, 2)
            res["loader"] = loader(2048, 4, 1024, train, device, tmp, 1024, 8, 2)
        else:
            res["steps"] = step_points(CUDA_POINTS, train["batch_size"], train, device, 2, 3, tmp)
            res["h2d"] = h2d(train["batch_size"], 768, device, 5)
            res["loader"] = loader(train["batch_size"], 13, 32768, train, device, tmp, 32768, 32, 6)
        if a.rehearsal:
            res["rehearsal"] = rehearsal(a.rehearsal.resolve(), a.rehearsal_timeout)
    res["wall_s"] = time.perf_counter() - t0
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    md = markdown(res)
    a.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    print(f"\n{res['wall_s']:.0f} s; JSON: {a.out}")


if __name__ == "__main__":
    main()
