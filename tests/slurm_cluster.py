"""A throw-away single-node SLURM cluster for tests: munged, slurmctld and slurmd for this host, with fake
GPUs, after the recipe of shared/notes/snakemake.md section 7.3 (Debian 12's Slurm 22.05, no systemd, gVisor).

The daemons run in the foreground as children of the test process, so they are stopped by the PIDs this module
started and by nothing broader. The configuration has to be written to /etc/slurm: `srun`, which the jobstep
plugin runs inside every job, reads only the compiled-in location and ignores SLURM_CONF. `stop` removes the
files it wrote, because with the SLURM plugin installed and a slurm.conf present but no controller, every
`snakemake` start waits ~10 s on `scontrol show config` (notes section 4.6).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")  # the minimal set; slurm-wlm pulls in many plugins
CONF_DIR = Path("/etc/slurm")
SYSTEM_TESTS = "SAESCALE_SYSTEM_TESTS"  # opt-in: without it a plain `pytest` installs and writes nothing system-wide
MARK = "# written by saescale tests/slurm_cluster.py; removed when the test ends"
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")

# SlurmdParameters=config_overrides: the node reports the CPUs, memory and GPUs written here, not what it
# has, so a real cluster's requests (cpus_per_gpu, tens of GB) are accepted on a 2-core machine. Nothing is
# enforced (no cgroups under gVisor: proctrack/linuxproc, task/none), and each "GPU" is a /dev file.
# MinJobAge=600 keeps finished jobs in `scontrol show job`, which is all there is without slurmdbd.
SLURM_CONF = """{mark}
ClusterName=saescale-test
SlurmctldHost={host}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation={state}/state
SlurmdSpoolDir={state}/spool
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
GresTypes=gpu
NodeName={host} CPUs={cpus} RealMemory={mem_mb} Gres=gpu:{gpus} Features={features} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
# A Count-only gres leaves the node INVALID ("count reported lower than configured"); each fake GPU needs a file.
FAKE_GPU_FILES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random")


@dataclass
class Cluster:
    """A running cluster: its state directory, the daemons this module started, the files it wrote."""

    state: Path
    daemons: list[subprocess.Popen] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)


def unavailable() -> str | None:
    """Why this machine cannot host the test cluster, or None when it can."""
    if os.environ.get(SYSTEM_TESTS) != "1":
        return (f"a system-level test: it installs SLURM with apt, writes {CONF_DIR} and starts daemons; "
                f"set {SYSTEM_TESTS}=1 to allow that (.ci/run does)")
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (apt-get, /etc/slurm, daemons)"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "SLURM is not installed and apt-get is not available to install it"
    conf = CONF_DIR / "slurm.conf"
    if conf.exists() and MARK not in conf.read_text(errors="replace"):
        return f"{conf} exists and is not ours; not overwriting a real SLURM configuration"
    if _running("slurmctld") or _running("slurmd"):
        return "a slurmctld or slurmd is already running on this machine"
    return None


def install() -> str | None:
    """apt-get install the SLURM and munge packages when a daemon is missing (~10-20 s); an error or None."""
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            return f"{' '.join(cmd)} failed: {res.stderr[-500:]}"
    return None


def start(state: Path, cpus: int = 8, gpus: int = 2, mem_mb: int = 256_000,
          features: str = "gpu40gb,gpu80gb") -> Cluster:
    """Write the configuration, start munged (unless one is serving), slurmctld and slurmd, and wait until
    the node is idle. The defaults let two GPU jobs of profiles/slurm (4 CPUs per GPU) run side by side; the
    node's features name the cards a job may ask for with sbatch --constraint. On failure the daemons already
    started are stopped before the error propagates."""
    host = socket.gethostname().split(".")[0]
    cluster = Cluster(state)
    for sub in ("state", "spool"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    try:
        _write(cluster, CONF_DIR / "slurm.conf", SLURM_CONF.format(mark=MARK, host=host, state=state, cpus=cpus,
                                                                    gpus=gpus, mem_mb=mem_mb, features=features))
        gres = [f"NodeName={host} Name=gpu File={file}" for file in FAKE_GPU_FILES[:gpus]]
        _write(cluster, CONF_DIR / "gres.conf", "\n".join([MARK, *gres, ""]))
        if not _munge_serving():
            _start_munged(cluster)
        cluster.daemons.append(_spawn(["slurmctld", "-D", "-c"], state / "slurmctld.out"))
        cluster.daemons.append(_spawn(["slurmd", "-D"], state / "slurmd.out"))
        _wait_idle(cluster)
    except BaseException:
        stop(cluster)
        raise
    return cluster


def stop(cluster: Cluster) -> None:
    """Cancel what is still queued, stop the daemons this cluster started (newest first) and remove the
    configuration files it wrote."""
    if any(d.poll() is None for d in cluster.daemons):
        subprocess.run(["scancel", "--user", pwd.getpwuid(os.geteuid()).pw_name], capture_output=True, timeout=30)
    for daemon in reversed(cluster.daemons):
        _terminate(daemon)
    for path in cluster.written:
        path.unlink(missing_ok=True)


def jobs() -> list[dict[str, str]]:
    """Every job slurmctld still remembers (MinJobAge=600 keeps finished ones), as `scontrol show job -o`
    key=value records; the plugin puts the rule name in Comment=rule_<name>_wildcards_... ."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True, timeout=30).stdout
    return [dict(item.split("=", 1) for item in line.split() if "=" in item) for line in out.splitlines() if line]


def _write(cluster: Cluster, path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    cluster.written.append(path)


def _spawn(cmd: list[str], log: Path, user: str | None = None) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, user=user, start_new_session=True)


def _start_munged(cluster: Cluster) -> None:
    """munged as user munge, in the foreground, with its socket in Debian's default directory (which
    systemd would create)."""
    MUNGE_SOCKET.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
    cluster.daemons.append(_spawn(["munged", "--foreground"], cluster.state / "munged.out", user="munge"))
    _wait(_munge_serving, 10, "munged did not answer", cluster.state / "munged.out")


def _munge_serving() -> bool:
    """Whether a munged answers on the default socket (`munge -n` encodes an empty credential)."""
    if not MUNGE_SOCKET.exists():
        return False
    return subprocess.run(["munge", "-n"], capture_output=True, timeout=10).returncode == 0


def _wait_idle(cluster: Cluster) -> None:
    def idle() -> bool:
        res = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
        return res.stdout.strip() == "idle"

    _wait(idle, 30, "the SLURM node did not become idle", cluster.state / "slurmctld.log",
          cluster.state / "slurmd.log")


def _wait(ready: Callable[[], bool], seconds: float, message: str, *logs: Path) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log}:\n{log.read_text()[-1500:]}" for log in logs if log.exists())
            raise RuntimeError(f"{message} within {seconds} s\n{tails}")
        time.sleep(0.3)


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


def _running(name: str) -> bool:
    return subprocess.run(["pgrep", "-x", name], capture_output=True).returncode == 0
