"""Trains one small SAE, on one process or (under torchrun) on data x latent gloo processes, and writes what
tests/test_distributed.py compares: the latents selected at every step (main code and AuxK) and, on rank 0, the
final weights and log. Run directly it trains the single-process reference.

    torchrun --standalone --nproc-per-node 4 tests/distributed_worker.py --data 2 --latent 2 --out DIR

`launch` runs it that way for the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from saescale.normalize import normalize
from saescale.sae import distributed as sharded
from saescale.sae.archs import TopKArch
from saescale.sae.train import Trainer, TrainSpec, train_together
from saescale.store import InMemoryBatches

D_MODEL, N, BATCH = 32, 256, 128


def launch(out: Path, data: int = 1, latent: int = 1, *extra: str, check: bool = True) -> Path:
    """Run the worker: directly for the single-process reference, else under torchrun with data x latent
    processes (standalone rendezvous on a free port)."""
    procs = data * latent
    args = [str(Path(__file__)), "--out", str(out), "--data", str(data), "--latent", str(latent), *extra]
    cmd = ([sys.executable, *args] if procs == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *args])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert (proc.returncode == 0) == check, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def problem(rows: int = 4096, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """(raw rows, b_pre, baseline MSE, selection rows): sparse sums of 512 random directions, so a TopK SAE
    has something to find and many latents die early (AuxK at work)."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((512, D_MODEL)).astype(np.float32)
    codes = rng.exponential(1.0, (rows, 512)).astype(np.float32) * (rng.random((rows, 512)) < 0.01)
    x = codes @ dirs + 0.05 * rng.standard_normal((rows, D_MODEL)).astype(np.float32)
    xn = normalize(torch.from_numpy(x))[0]
    b_pre = xn.median(dim=0).values.numpy()
    baseline = float(((xn - xn.mean(dim=0)) ** 2).sum(dim=1).mean())
    return x, b_pre, baseline, xn[:1024].numpy()


def make_spec(arch: str = "topk", steps: int = 30, data: int = 1, latent: int = 1, **kw) -> TrainSpec:
    base = dict(arch=arch, n=N, k=4, d_model=D_MODEL, lr=3e-3, batch_size=BATCH, tokens=BATCH * steps,
                adam_eps=6.25e-10, adam_betas=(0.9, 0.999), auxk_coef=1 / 32, k_aux=16, dead_tokens=4 * BATCH,
                ema_decay=0.9, log_every=5, checkpoint_seconds=0, seed=3, device="cpu", distributed=(data, latent))
    return TrainSpec(**{**base, **kw})


def record_selections(store: list) -> None:
    """Append each training step's selections to `store`: (main code's global latents [rows, k], AuxK's
    (values, global latents) [rows, k_aux] or None). Patches the single-device and the sharded forward."""
    import saescale.sae.archs as archs

    single, shard, dead_topk, global_topk = (TopKArch._train_selected, sharded.sharded_forward_train,
                                             archs.dead_topk, sharded.global_topk)
    aux: list = []

    def single_dead_topk(pre, dead, k_aux, in_place=False):
        values, indices = dead_topk(pre, dead, k_aux, in_place)
        aux.append((values.clone(), indices.clone()))
        return values, indices

    def shard_global_topk(values, indices, k, mesh, sorted=False):
        out = global_topk(values, indices, k, mesh, sorted)
        aux.append((out[0].clone(), out[1].clone()))
        return out

    def single_step(self, sae, x, mse, dead, k_aux):
        aux.clear()
        archs.dead_topk = single_dead_topk
        try:
            out = single(self, sae, x, mse, dead, k_aux)
        finally:
            archs.dead_topk = dead_topk
        store.append((out.latents.indices.clone(), aux[0] if aux else None))
        return out

    def shard_step(sae, mesh, n, x, mse, dead, k_aux):
        aux.clear()
        sharded.global_topk = shard_global_topk
        try:
            out = shard(sae, mesh, n, x, mse, dead, k_aux)
        finally:
            sharded.global_topk = global_topk
        store.append((out.latents.indices.clone(), aux[1] if len(aux) > 1 else None))  # [0]: the main selection
        return out

    TopKArch._train_selected = single_step
    sharded.sharded_forward_train = shard_step


def merge_blocks(selections: list, blocks: int) -> list:
    """One entry per step from train.microbatch's `blocks` forwards per step (rows in order)."""
    steps = [selections[i:i + blocks] for i in range(0, len(selections), blocks)]
    return [(torch.cat([main for main, _ in step]),
             None if step[0][1] is None else tuple(torch.cat(parts) for parts in zip(*(aux for _, aux in step))))
            for step in steps]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", default="topk")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--data", type=int, default=1)
    ap.add_argument("--latent", type=int, default=1)
    ap.add_argument("--stop-after", type=int, default=None, help="checkpoint at this step and exit (a kill)")
    ap.add_argument("--crash", default=None, metavar="RANK:STEP", help="that rank dies (exit 3) after that step")
    ap.add_argument("--spec", default="{}", help="TrainSpec overrides (JSON)")
    ap.add_argument("--gather-bytes", type=int, default=None, help="gather the shards' candidates in small chunks")
    a = ap.parse_args()
    if a.gather_bytes:
        sharded.GATHER_BYTES = a.gather_bytes
    torch.set_num_threads(1)
    x, b_pre, baseline, sel_rows = problem()
    spec = make_spec(a.arch, a.steps, a.data, a.latent, **json.loads(a.spec))
    selections: list[torch.Tensor] = []
    record_selections(selections)
    a.out.mkdir(parents=True, exist_ok=True)
    setup = (b_pre, baseline, spec, a.out / "checkpoint.pt", sel_rows, sel_rows[:256])
    if a.data * a.latent > 1:
        from saescale.sae.train_distributed import ShardedTrainer

        mesh = sharded.mesh_from_env(a.data, a.latent, torch.device("cpu"))
        trainer = ShardedTrainer(mesh, *setup)
        rank = mesh.rank
    else:
        trainer, rank = Trainer(*setup), 0
    first_step = trainer.step
    if a.crash is not None:
        crash_rank, crash_step = (int(v) for v in a.crash.split(":"))
        step_once = trainer.train_step

        def step_then_crash(batch):
            step_once(batch)
            if rank == crash_rank and trainer.step == crash_step:
                os._exit(3)  # no cleanup, no collective left hanging politely: what a dead GPU process does
        trainer.train_step = step_then_crash
    if a.stop_after is not None:
        original = trainer.train_step

        def step_then_maybe_die(batch):
            original(batch)
            if trainer.step == a.stop_after:
                trainer.save_checkpoint()
                raise SystemExit(0)
        trainer.train_step = step_then_maybe_die
    def save_selections() -> None:
        blocks = -(-(BATCH // a.data) // spec.microbatch) if spec.microbatch else 1
        torch.save({"selections": merge_blocks(selections, blocks), "first_step": first_step},
                   a.out / f"selections.rank{rank}.pt")
    try:
        train_together(InMemoryBatches(x, BATCH, spec.seed), [trainer])
    except SystemExit:
        save_selections()
        raise
    save_selections()
    sae, rows, summary = trainer.finish()
    # this rank's training state: parameters, Adam moments, EMA (what latent sharding divides)
    held = [*trainer.sae.parameters(), *(t for st in trainer.opt.state.values() for t in st.values()
                                         if torch.is_tensor(t) and t.dim() > 0), *trainer.ema.shadow.values()]
    held_bytes = sum(t.numel() * t.element_size() for t in held)
    torch.save({"held_bytes": held_bytes}, a.out / f"held.rank{rank}.pt")
    if sae is not None:
        torch.save({"state": sae.state_dict(), "rows": rows, "summary": summary}, a.out / "result.pt")
    trainer.remove_checkpoint()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main()
    sys.exit(0)

