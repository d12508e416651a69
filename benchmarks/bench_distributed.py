"""train.distributed on this machine and modeled for GPUs (issue 21).

Measured: tokens/s of one TopK SAE (d = 768, n = 32768, k = 32, batch 4096, float32, the paper's recipe without
dead latents unless --dead) on one process with 2 threads against 2 gloo processes with 1 thread each, latent-sharded
(S = 2) or data-parallel (D = 2); where a process's step goes (compute, and each collective: its wall time and the
bytes it moved); each rank's training state (parameters, Adam moments, EMA). Repeats alternate the layouts.

Modeled: for d in {768, 2304, 4096} at the paper's batch B = 131,072 in bf16, the largest power-of-two n whose
per-GPU memory (saescale.hardware.sharded_step_gib, the same model the workflow sizes jobs with) fits an 80 GB card
for 1..64 GPUs of latent sharding, and the bytes each GPU moves per step (sae.distributed.step_bytes).

    python benchmarks/bench_distributed.py                 # ~3 min on 2 cores
    python benchmarks/bench_distributed.py --model-only    # the GPU table alone
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).with_name("out")
LAYOUTS = {"1 process x 2 threads": (1, 1), "S = 2 (2 x 1 thread)": (1, 2), "D = 2 (2 x 1 thread)": (2, 1)}
CARD_GIB = 79.0  # an "80 GB" H100 as CUDA reports it, less nothing: hardware adds the CUDA context
GIB = 2**30


# ---- one measurement (a process of it) ------------------------------------------------------------------------
def worker(a) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from saescale.normalize import normalize
    from saescale.sae import distributed as sharded
    from saescale.sae.train import Trainer, TrainSpec
    from saescale.sae.train_distributed import ShardedTrainer
    from saescale.store import InMemoryBatches

    torch.set_num_threads(a.threads)
    data, latent = a.layout
    steps = a.warmup + a.steps
    rows = np.random.default_rng(0).standard_normal((a.batch * 4, a.d)).astype(np.float32)
    # one step more than run: no timed step is the last, which logs (and reduces its log values)
    spec = TrainSpec(arch="topk", n=a.n, k=32, d_model=a.d, lr=1e-4, batch_size=a.batch, tokens=a.batch * (steps + 1),
                     adam_eps=6.25e-10, adam_betas=(0.9, 0.999), auxk_coef=1 / 32, k_aux=512,
                     dead_tokens=a.batch if a.dead else 10**12, ema_decay=0.999, log_every=10**9,
                     checkpoint_seconds=0, seed=0, device="cpu", distributed=(data, latent))
    setup = (np.zeros(a.d, np.float32), 1.0, spec, Path(a.out).with_suffix(".ckpt"), rows[:1024])
    if data * latent > 1:
        mesh = sharded.mesh_from_env(data, latent, torch.device("cpu"))
        trainer, rank = ShardedTrainer(mesh, *setup), mesh.rank
    else:
        trainer, rank = Trainer(*setup), 0
    # time and bytes of every collective the step enters (distributed.py calls them through the module)
    spent: dict[str, list[float]] = {}
    moved: dict[str, int] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            spent.setdefault(name, []).append(time.perf_counter() - t0)
            tensor = args[1] if name == "all_gather" else args[0]
            moved[name] = moved.get(name, 0) + tensor.numel() * tensor.element_size()
            return out
        return wrapper
    dist.all_reduce, dist.all_gather = timed("all_reduce", dist.all_reduce), timed("all_gather", dist.all_gather)
    batches = InMemoryBatches(rows, a.batch, 0).device_batches(0, "cpu")
    times = []
    for step in range(steps):
        x = normalize(next(batches).float())[0]
        if step == a.warmup:
            spent.clear(), moved.clear()
        t0 = time.perf_counter()
        trainer.train_step(x)
        times.append(time.perf_counter() - t0)
    timed_steps = times[a.warmup:]
    held = [*trainer.sae.parameters(), *(t for st in trainer.opt.state.values() for t in st.values()
                                         if torch.is_tensor(t) and t.dim() > 0), *trainer.ema.shadow.values()]
    result = {"rank": rank, "step_s": statistics.median(timed_steps), "steps": a.steps,
              "collective_s": {k: sum(v) / a.steps for k, v in spent.items()},
              "collective_bytes": {k: v / a.steps for k, v in moved.items()},
              "held_bytes": sum(t.numel() * t.element_size() for t in held),
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if data * latent > 1:
        everyone = [None] * (data * latent)
        dist.all_gather_object(everyone, result)
        dist.destroy_process_group()
        result = {"ranks": everyone}
    else:
        result = {"ranks": [result]}
    if rank == 0:
        Path(a.out).write_text(json.dumps(result))


def measure(layout: tuple[int, int], a, out: Path) -> dict:
    data, latent = layout
    procs = data * latent
    args = [str(Path(__file__).resolve()), "--worker", "--layout", f"{data},{latent}", "--out", str(out),
            "--threads", str(2 if procs == 1 else 1), "--width", str(a.d), "--latents", str(a.n), "--batch", str(a.batch),
            "--steps", str(a.steps), "--warmup", str(a.warmup), *(["--dead"] if a.dead else [])]
    cmd = ([sys.executable, *args] if procs == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *args])
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    return json.loads(out.read_text())


# ---- the GPU model ---------------------------------------------------------------------------------------------
def layouts(gpus: int) -> list[tuple[int, int]]:
    return [(gpus // latent, latent) for latent in range(1, gpus + 1) if gpus % latent == 0]


def largest_n(d: int, gpus: int, batch: int = 131_072, k: int = 32, microbatch: int | None = None
              ) -> tuple[int, tuple[int, int], float]:
    """The largest power-of-two n whose per-GPU step fits CARD_GIB on `gpus` GPUs, over every data x latent layout
    (the one needing the least memory at that n), with its layout and GiB per GPU; (0, ..) if none fits."""
    from saescale.config import k_aux_for
    from saescale.hardware import CUDA_CONTEXT_GIB, sharded_step_gib, train_step_gib

    slots = k + k_aux_for({"k_aux": None}, d)
    best = (0, (1, 1), 0.0)
    for exp in range(10, 32):
        n = 2**exp
        fits = []
        for data, latent in layouts(gpus):
            if n % latent or batch % data:
                continue
            step = (train_step_gib([n], d, batch, 2, microbatch) if data * latent == 1 else
                    sharded_step_gib(n, d, batch, data, latent, slots, act_bytes=2, microbatch=microbatch))
            if step + CUDA_CONTEXT_GIB <= CARD_GIB:
                fits.append((step + CUDA_CONTEXT_GIB, (data, latent)))
        if not fits:
            break
        gib, layout = min(fits)
        best = (n, layout, gib)
    return best


def model_table() -> str:
    from saescale.config import k_aux_for
    from saescale.sae.distributed import step_bytes

    lines = ["| d | GPUs | largest n | layout (data x latent) | GiB per GPU | largest n, microbatch 16,384 | "
             "GB per GPU per step: candidates / decode / gradients |", "|---|---|---|---|---|---|---|"]
    for d in (768, 2304, 4096):
        for gpus in (1, 2, 4, 8, 16, 32, 64):
            n, (data, latent), gib = largest_n(d, gpus)
            n_mb, layout_mb, gib_mb = largest_n(d, gpus, microbatch=16_384)
            blocked = f"2^{n_mb.bit_length() - 1} ({layout_mb[0]} x {layout_mb[1]}, {gib_mb:.1f} GiB)" if n_mb else "-"
            if not n:
                lines.append(f"| {d} | {gpus} | does not fit | | | {blocked} | |")
                continue
            k_aux = k_aux_for({"k_aux": None}, d)
            t = step_bytes(n, d, 131_072, data, latent, 32, act_bytes=2, auxk_slots=k_aux)
            lines.append(f"| {d} | {gpus} | 2^{n.bit_length() - 1} | {data} x {latent} | {gib:.1f} | {blocked} | "
                         f"{t['candidates_all_gather'] / 1e9:.2f} / {t['decode_all_reduce'] / 1e9:.2f} / "
                         f"{t['gradient_all_reduce'] / 1e9:.2f} |")
    return "\n".join(lines)


def main() -> None:
    # no option is a prefix of one of torchrun's (it would take `--d` for its own --duplicate-...)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layout", type=lambda s: tuple(int(v) for v in s.split(",")), default=(1, 1),
                    help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(OUT / "bench_distributed_worker.json"), help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--width", dest="d", type=int, default=768, help="d_model")
    ap.add_argument("--latents", dest="n", type=int, default=32768, help="n")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dead", action="store_true", help="every latent dead from the second step: AuxK every step")
    ap.add_argument("--model-only", action="store_true")
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    OUT.mkdir(exist_ok=True)
    print(model_table())
    if a.model_only:
        return
    runs: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    for repeat in range(a.repeats):
        order = list(LAYOUTS)[repeat % len(LAYOUTS):] + list(LAYOUTS)[:repeat % len(LAYOUTS)]
        for name in order:
            runs[name].append(measure(LAYOUTS[name], a, OUT / "bench_distributed_run.json"))
    single_tps = statistics.median(a.batch / r["ranks"][0]["step_s"] for r in runs[next(iter(LAYOUTS))])
    print(f"\nd = {a.d}, n = {a.n}, k = 32, batch {a.batch}, float32, {'AuxK every step' if a.dead else 'no dead latents'}; "
          f"median of {a.repeats} runs x {a.steps} steps\n")
    print("| layout | tokens/s | vs 1 process | step s | in collectives (rank 0) | MB moved per step (rank 0) | "
          "training state per rank (MB) | peak RSS per rank (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, results in runs.items():
        step = statistics.median(max(r["step_s"] for r in res["ranks"]) for res in results)
        rank0 = results[-1]["ranks"][0]
        spent = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in rank0["collective_s"].items()) or "-"
        moved = sum(rank0["collective_bytes"].values()) / 1e6
        print(f"| {name} | {a.batch / step:,.0f} | {a.batch / step / single_tps:.2f}x | {step:.3f} | {spent} | "
              f"{moved:.1f} | {rank0['held_bytes'] / 1e6:.0f} | "
              f"{max(r['peak_rss_gib'] for r in results[-1]['ranks']):.2f} |")
    (OUT / "bench_distributed.json").write_text(json.dumps({"args": vars(a), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
