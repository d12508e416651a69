"""One GPU per job on a machine with several: a lease taken before CUDA starts.

`snakemake --cores all --resources gpu=4` starts up to four GPU jobs at once, but Snakemake does not tell a job
which GPU is its own (it sets no CUDA_VISIBLE_DEVICES), so every job would run on cuda:0. Instead each job,
before CUDA initialises, takes an exclusive `flock` on the first free `gpu<id>.lock` in a lease directory
shared by every saescale process on the machine, keeps it for its lifetime and restricts itself to that device
(CUDA_VISIBLE_DEVICES=<id>, so it sees it as cuda:0). The kernel releases a flock when its process ends, however
it ends (kill -9 and the OOM killer included), so a lease is never left stale. Snakemake's `gpu` resource keeps
the number of GPU jobs at or under the number of GPUs; a job that finds every GPU leased anyway (a second
snakemake run, or `--resources gpu=` above the GPU count) waits for one, up to a timeout, then fails saying so.

No lease is taken where the choice is not ours or there is none to make: under SLURM (it sets
CUDA_VISIBLE_DEVICES for the GPUs it allocated), or where at most one GPU is visible.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

log = logging.getLogger("saescale.devices")

LEASE_DIR_ENV = "SAESCALE_GPU_LEASES"  # the lease directory; default: <tmp>/saescale-gpu-leases
TIMEOUT_ENV = "SAESCALE_GPU_LEASE_TIMEOUT"  # seconds a job waits for a free GPU; default TIMEOUT_S
TIMEOUT_S = 600.0
POLL_S = 0.5


class NoFreeDevice(RuntimeError):
    """Every GPU stayed leased to other jobs for the whole timeout."""


@dataclass(frozen=True)
class Lease:
    device: str  # the id leased, as CUDA_VISIBLE_DEVICES names it: an index or a GPU UUID
    index: int  # its position among the GPUs that were visible (its cuda:<index> if CUDA had already started)
    path: Path  # its lock file
    fd: int  # the open file that holds the flock; closed only by the process ending


_held: Lease | None = None  # this process's lease: one per process, for its whole life


def lease_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where the lock files live: one directory per machine by default, because GPUs are the machine's, not a
    working directory's (two workflows in two directories share them)."""
    env = os.environ if environ is None else environ
    return Path(env.get(LEASE_DIR_ENV) or Path(tempfile.gettempdir()) / "saescale-gpu-leases")


def visible_devices(environ: Mapping[str, str], count: Callable[[], int]) -> list[str]:
    """The ids of the GPUs this process may use, in CUDA's order: the entries of CUDA_VISIBLE_DEVICES when it
    is set (CUDA stops at the first invalid one, e.g. -1), else 0 .. count() - 1."""
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count())]
    ids = []
    for entry in (e.strip() for e in listed.split(",")):
        if not entry or entry.startswith("-"):
            break
        ids.append(entry)
    return ids


def _lock_name(device: str) -> str:
    return "gpu" + "".join(c if c.isalnum() or c in "-_" else "_" for c in device) + ".lock"


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path`, or None while another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # non-inheritable: a child program gets no lease
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)  # who holds it, for people reading the directory and for the error below
    os.write(fd, f"pid {os.getpid()}\n".encode())
    return fd


def _holders(directory: Path, devices: Sequence[str]) -> str:
    out = []
    for device in devices:
        try:
            who = (directory / _lock_name(device)).read_text().strip() or "?"
        except OSError:
            who = "?"
        out.append(f"GPU {device}: {who}")
    return "; ".join(out)


def acquire(devices: Sequence[str], directory: Path, timeout_s: float = TIMEOUT_S,
            poll_s: float = POLL_S) -> Lease:
    """A lease on the first of `devices` no other process holds, waiting up to timeout_s for one to free up."""
    return acquire_many(devices, 1, directory, timeout_s, poll_s)[0]


def acquire_many(devices: Sequence[str], want: int, directory: Path, timeout_s: float = TIMEOUT_S,
                 poll_s: float = POLL_S) -> list[Lease]:
    """Leases on `want` of `devices` at once (a train.distributed job's GPUs), waiting up to timeout_s. Never holds
    some while waiting for the rest: two jobs each holding half the GPUs would wait for each other forever."""
    if want > len(devices):
        raise NoFreeDevice(f"{want} GPUs asked for (train.distributed data x latent) but {len(devices)} are visible "
                           f"({', '.join(devices) or 'none'}); lower the layout or run where more GPUs are")
    directory.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    waited = False
    while True:
        got: list[Lease] = []
        for index, device in enumerate(devices):
            path = directory / _lock_name(device)
            fd = _try_lock(path)
            if fd is not None:
                got.append(Lease(device, index, path, fd))
                if len(got) == want:
                    if waited:
                        log.info("GPU %s came free", ", ".join(lease.device for lease in got))
                    return got
        for lease in got:
            os.close(lease.fd)  # releases the flock
        if time.monotonic() >= deadline:
            raise NoFreeDevice(
                f"all {len(devices)} GPUs ({', '.join(devices)}) stayed leased to other saescale jobs for "
                f"{timeout_s:.0f} s ({_holders(directory, devices)}; lock files in {directory}). Give snakemake "
                f"--resources gpu={len(devices)} at most, wait for the other run, or raise {TIMEOUT_ENV}")
        if not waited:
            log.info("fewer than %d of the GPUs (%s) are free; waiting up to %.0f s", want, ", ".join(devices),
                     timeout_s)
            waited = True
        time.sleep(poll_s)


def lease_gpu(environ: dict[str, str] | None = None, count: Callable[[], int] | None = None) -> Lease | None:
    """Restrict this process to one GPU of its own when several are visible, before CUDA initialises: lease
    one and set CUDA_VISIBLE_DEVICES to it. Idempotent; None where no lease is taken (see the module doc)."""
    global _held
    env = os.environ if environ is None else environ
    if _held is not None:
        return _held
    if "SLURM_JOB_ID" in env or "LOCAL_RANK" in env:  # SLURM chose; or a torchrun worker, whose launcher leased
        return None
    if count is None:
        import torch

        count = torch.cuda.device_count  # from NVML, without initialising CUDA (0 on a CPU build)
    devices = visible_devices(env, count)
    if len(devices) <= 1:
        return None
    timeout_s = float(env.get(TIMEOUT_ENV) or TIMEOUT_S)
    _held = acquire(devices, lease_dir(env), timeout_s)
    env["CUDA_VISIBLE_DEVICES"] = _held.device
    log.info("GPU lease: device %s of %s (CUDA_VISIBLE_DEVICES=%s; %s)", _held.device, ",".join(devices),
             _held.device, _held.path)
    return _held


def lease_gpus(want: int, environ: dict[str, str], count: Callable[[], int] | None = None) -> list[Lease]:
    """`want` GPUs for a train.distributed job's processes, leased by its launcher before torchrun starts them
    (each worker then uses cuda:<LOCAL_RANK> of those). Empty where no lease is taken (module doc)."""
    if "SLURM_JOB_ID" in environ:
        return []
    if count is None:
        import torch

        count = torch.cuda.device_count
    devices = visible_devices(environ, count)
    timeout_s = float(environ.get(TIMEOUT_ENV) or TIMEOUT_S)
    leases = acquire_many(devices, want, lease_dir(environ), timeout_s)
    log.info("GPU leases: devices %s of %s", ",".join(lease.device for lease in leases), ",".join(devices))
    return leases
