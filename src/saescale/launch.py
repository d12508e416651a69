"""Starting the processes of a train.distributed job: `saescale train` given a layout of data x latent > 1
re-runs itself under torchrun, one process per GPU (or per CPU share, with gloo), so the workflow's rule and a
user's hand-run command stay the same single command.

- one node: torchrun's standalone rendezvous on a free local port;
- several nodes (train.distributed.nodes > 1) inside a SLURM allocation: `srun` starts one torchrun per node,
  which meet at a c10d rendezvous on the allocation's first node (port from the job id, so two jobs sharing a
  node do not collide);
- on a machine with several GPUs and no SLURM, the launcher leases data x latent of them first (saescale.devices),
  as a one-GPU job leases one.

torchrun stops every process when one fails and exits non-zero: the job fails, and its rerun resumes from the
last complete sharded checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

log = logging.getLogger("saescale.launch")

WORKER_ENV = "LOCAL_RANK"  # set by torchrun in every process it starts: this process is a worker, not the launcher
# the workers' `saescale` arguments, as JSON: torchrun's own parser would take `--n 64` for an abbreviation of
# its options, so nothing follows the worker module on its command line
ARGV_ENV = "SAESCALE_WORKER_ARGV"
RDZV_PORT_BASE = 29500


def is_worker(environ: Mapping[str, str] | None = None) -> bool:
    return WORKER_ENV in (os.environ if environ is None else environ)


def torchrun_command(procs: int, nodes: int, environ: Mapping[str, str]) -> list[str]:
    """The command that starts `procs` processes over `nodes` nodes, each running this module (which runs
    `saescale` with the arguments in ARGV_ENV)."""
    if procs % nodes:
        raise ValueError(f"train.distributed.nodes: {nodes} nodes cannot share {procs} processes evenly")
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs // nodes)]
    worker = ["-m", "saescale.launch"]
    if nodes == 1:
        return [*run, "--standalone", "--nnodes", "1", *worker]
    job = environ.get("SLURM_JOB_ID")
    if job is None:
        raise ValueError(f"train.distributed.nodes: {nodes} nodes need a SLURM allocation (run the workflow with "
                         "--workflow-profile profiles/slurm), or start torchrun on each node yourself with the "
                         "command in the README")
    head = _first_host(environ["SLURM_JOB_NODELIST"])
    port = RDZV_PORT_BASE + int(job) % 10000
    srun = ["srun", "--overlap", f"--nodes={nodes}", "--ntasks-per-node=1", f"--ntasks={nodes}"]
    return [*srun, *run, "--nnodes", str(nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{head}:{port}",
            "--rdzv-id", f"saescale-{job}", *worker]


def _first_host(nodelist: str) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def launch(procs: int, nodes: int, argv: Sequence[str], threads: int, use_gpus: bool) -> None:
    """Run `saescale <argv>` as `procs` torchrun processes and wait; raise naming the failure if any failed.
    Workers share the job's `threads` (OMP_NUM_THREADS, which also quiets torchrun's warning about it)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(max(1, threads // (procs // nodes)))
    if use_gpus and "SLURM_JOB_ID" not in env:
        from saescale.devices import lease_gpus

        leases = lease_gpus(procs, env)
        if leases:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(lease.device for lease in leases)
    env[ARGV_ENV] = json.dumps(list(argv))
    cmd = torchrun_command(procs, nodes, env)
    log.info("starting %d training processes: %s", procs, " ".join(cmd))
    rc = subprocess.run(cmd, env=env).returncode
    if rc:
        raise RuntimeError(f"a training process of the {procs} failed (torchrun exit {rc}; each rank's traceback "
                           "is in this log); a rerun resumes from the last sharded checkpoint")


if __name__ == "__main__":  # a torchrun worker
    from saescale.cli import main

    sys.exit(main(json.loads(os.environ[ARGV_ENV])))
