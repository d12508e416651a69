"""GPU leases (saescale.devices) on a CPU machine, with made-up GPU counts: concurrent jobs get distinct GPUs, a
lease dies with its process (kill -9 included), a job that finds every GPU leased waits and then fails saying
why, and pick_device takes the lease before CUDA starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saescale import devices
from saescale.devices import NoFreeDevice, acquire, lease_gpu, visible_devices
from saescale.subject import pick_device

# A job: lease one of `count` made-up GPUs, print what it got, hold it until stdin closes.
JOB = """
import os, sys
from saescale.devices import lease_gpu
count = int(sys.argv[1])
try:
    lease = lease_gpu(count=lambda: count)
except Exception as exc:
    print(f"error {type(exc).__name__}: {exc}", flush=True)
    sys.exit(3)
print("leased", lease.device, os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
sys.stdin.read()
"""


def start_job(lease_dir: Path, count: int, timeout_s: float = 30) -> subprocess.Popen:
    env = {key: v for key, v in os.environ.items() if key not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")}
    env.update({devices.LEASE_DIR_ENV: str(lease_dir), devices.TIMEOUT_ENV: str(timeout_s)})
    return subprocess.Popen([sys.executable, "-c", JOB, str(count)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def leased(job: subprocess.Popen) -> str:
    """The GPU a started job holds (and sees as its only CUDA_VISIBLE_DEVICES)."""
    line = job.stdout.readline().split()
    assert line[:1] == ["leased"], f"{line} / {job.stderr.read() if job.poll() is not None else ''}"
    assert line[1] == line[2]
    return line[1]


def end(*jobs: subprocess.Popen) -> None:
    for job in jobs:
        if job.poll() is None:
            job.stdin.close()
            job.wait(timeout=30)


@pytest.fixture
def jobs():
    started: list[subprocess.Popen] = []
    yield started
    for job in started:
        if job.poll() is None:
            job.kill()
            job.wait()


@pytest.mark.parametrize("listed, expected", [
    (None, ["0", "1", "2"]),
    ("2,3", ["2", "3"]),
    (" 1 , 0 ", ["1", "0"]),
    ("0,-1,2", ["0"]),  # CUDA stops at the first invalid entry
    ("", []),
    ("GPU-8a1b,GPU-77ce", ["GPU-8a1b", "GPU-77ce"]),
])
def test_visible_devices_follow_cuda_visible_devices_else_the_count(listed, expected):
    env = {} if listed is None else {"CUDA_VISIBLE_DEVICES": listed}
    assert visible_devices(env, lambda: 3) == expected


def test_concurrent_jobs_lease_distinct_gpus_and_a_fourth_waits_then_fails_naming_the_holders(tmp_path, jobs):
    jobs += [start_job(tmp_path, 3) for _ in range(3)]
    got = [leased(job) for job in jobs]
    assert sorted(got) == ["0", "1", "2"]
    extra = start_job(tmp_path, 3, timeout_s=1.5)
    jobs.append(extra)
    t0 = time.monotonic()
    out, err = extra.communicate(timeout=30)
    assert extra.returncode == 3 and time.monotonic() - t0 >= 1.5
    assert "NoFreeDevice: all 3 GPUs (0, 1, 2) stayed leased" in out
    for job in jobs[:3]:
        assert f"pid {job.pid}" in out  # who holds each GPU
    assert "--resources gpu=3" in out
    end(*jobs[:3])


def test_a_killed_jobs_gpu_is_leased_again_and_a_waiting_job_gets_it(tmp_path, jobs):
    jobs += [start_job(tmp_path, 2) for _ in range(2)]
    got = {leased(job): job for job in jobs}
    assert set(got) == {"0", "1"}
    waiting = start_job(tmp_path, 2, timeout_s=60)
    jobs.append(waiting)
    time.sleep(1.0)
    assert waiting.poll() is None  # both GPUs taken: it waits
    os.kill(got["1"].pid, signal.SIGKILL)  # no cleanup runs: the kernel drops the flock
    got["1"].wait()
    assert leased(waiting) == "1"
    end(got["0"])
    again = start_job(tmp_path, 2)
    jobs.append(again)
    assert leased(again) == "0"  # a job that exited normally frees its GPU too
    end(waiting, again)


def test_no_lease_under_slurm_or_with_one_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "_held", None)
    monkeypatch.setenv(devices.LEASE_DIR_ENV, str(tmp_path))
    assert lease_gpu({"SLURM_JOB_ID": "7", devices.LEASE_DIR_ENV: str(tmp_path)}, lambda: 4) is None
    env = {devices.LEASE_DIR_ENV: str(tmp_path)}
    assert lease_gpu(env, lambda: 1) is None and "CUDA_VISIBLE_DEVICES" not in env
    assert lease_gpu({"CUDA_VISIBLE_DEVICES": "3", devices.LEASE_DIR_ENV: str(tmp_path)}, lambda: 8) is None
    assert not list(tmp_path.iterdir())


def test_leases_among_the_gpus_cuda_visible_devices_allows(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "_held", None)
    first = acquire(["2", "3"], tmp_path, timeout_s=0)  # another process's lease, held by this one's fd
    env = {"CUDA_VISIBLE_DEVICES": "2,3", devices.LEASE_DIR_ENV: str(tmp_path)}
    lease = lease_gpu(env, lambda: 8)
    assert (first.device, lease.device, lease.index, env["CUDA_VISIBLE_DEVICES"]) == ("2", "3", 1, "3")
    assert lease_gpu(env, lambda: 8) is lease  # one lease per process
    os.close(first.fd)


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """A fresh lease state and an environment without CUDA_VISIBLE_DEVICES, both restored afterwards."""
    monkeypatch.setattr(devices, "_held", None)
    monkeypatch.setenv(devices.LEASE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "unset")  # recorded as absent, so removed again on teardown
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    return tmp_path


def test_pick_device_leases_a_gpu_before_cuda_starts(clean_env, monkeypatch):
    calls = []
    # NVML counts the GPUs CUDA_VISIBLE_DEVICES leaves: 2, then 1 once the lease has set it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if "CUDA_VISIBLE_DEVICES" in os.environ else 2)
    monkeypatch.setattr(torch.cuda, "is_available",
                        lambda: calls.append(os.environ.get("CUDA_VISIBLE_DEVICES")) or True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    assert pick_device("auto") == torch.device("cuda")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0" and calls == ["0"]  # set before CUDA was asked anything
    other = acquire(["0", "1"], clean_env, timeout_s=0)  # the next job on this machine gets the other GPU
    assert other.device == "1"
    os.close(other.fd)


def test_pick_device_selects_the_leased_gpu_where_cuda_started_first(clean_env, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)  # the runtime already saw all three
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(index))
    acquire(["0"], clean_env, timeout_s=0)  # GPU 0 is another job's
    assert pick_device("cuda") == torch.device("cuda")
    assert calls == [1] and os.environ["CUDA_VISIBLE_DEVICES"] == "1"


def test_pick_device_on_the_cpu_takes_no_lease(clean_env, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cpu") == torch.device("cpu")
    assert devices._held is None and "CUDA_VISIBLE_DEVICES" not in os.environ


def test_pick_device_here_needs_no_lease(clean_env):
    """This machine's torch (a CPU build, or one GPU) takes no lease and picks as before."""
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("auto") == expected
    if torch.cuda.device_count() <= 1:
        assert devices._held is None


def test_waiting_is_bounded_by_the_timeout(tmp_path):
    held = acquire(["0"], tmp_path, timeout_s=0)
    t0 = time.monotonic()
    with pytest.raises(NoFreeDevice, match=r"all 1 GPUs \(0\) stayed leased .*GPU 0: pid \d+"):
        acquire(["0"], tmp_path, timeout_s=0.6, poll_s=0.1)
    assert 0.6 <= time.monotonic() - t0 < 5
    os.close(held.fd)
    assert acquire(["0"], tmp_path, timeout_s=0).device == "0"
