"""The workflow on a real SLURM cluster: a throw-away single-node one (tests/slurm_cluster.py: munged,
slurmctld and slurmd for this host, two fake GPUs), driven by `--executor slurm --workflow-profile
profiles/slurm` as the README says (with its gpu_constraints line filled in for this cluster's node features),
so every non-local job goes through sbatch with the profile's resources and training's own sizes.

What runs is the quick preset cut to the path every cluster run takes, at smaller token budgets: the builtin
corpus, tokenizer and LM, extract, normalize, four SAEs at n = 64 (TopK k = 4 and 8 trained as one pack,
`train.pack: [k]`, rule train_pack_*; ReLU k = 8 through the `train` rule; TopK k = 4 again with
train.distributed {latent: 2}, a two-GPU job of two torchrun processes), evaluate on each, then scaling and
the report, which are localrules and run on this node. The setup chain is submitted as two group jobs
(corpus + tokenizer + tokenize on CPUs, lm + extract + normalize with a GPU). Here every SLURM job costs ~10 s
of Snakemake start-up (once for the job, once for its step) plus up to ~20 s until the plugin's status check,
whose interval grows by 10 s while nothing finishes, notices it: 14 jobs (5 SAEs, one GPU, no groups) at the
preset's budgets took 7.4 min, so the rest of its 72 is left out: the evaluation suite, analyses, lr sweep, other archs and toy
studies. They are submitted the same way as the rules kept; only what they compute differs. Measured on 2
shared cores: 2.7-3.9 min, plus ~25 s for apt and the venv on a fresh machine.

Needs root and apt (it installs Debian's slurmctld, slurmd, slurm-client and munge when absent) and skips
without them. The SLURM plugin goes into a venv of its own, built once with `--system-site-packages`: installed
in the main environment, it makes every `snakemake` start wait ~10 s whenever a slurm.conf is present but no
controller is (notes section 4.6). Set SAESCALE_SLURM_PYTHON to use an existing interpreter with the plugin.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

import slurm_cluster
from helpers import side_venv

ROOT = Path(__file__).resolve().parents[1]
QUICK = yaml.safe_load((ROOT / "workflow/configs/quick.yaml").read_text())
PLUGIN = "snakemake-executor-plugin-slurm==2.8.0"  # with snakemake-executor-plugin-slurm-jobstep 0.6.1
VENV = Path(os.environ.get("SAESCALE_SLURM_VENV", Path.home() / ".cache/saescale/slurm-venv"))

# Settings for this cluster only, passed on the command line, not in the profile: without slurmdbd the
# plugin's default status command (sacct) waits forever and account guessing fails; status checks start
# after 2 s instead of 40; successful jobs keep their logs, which the test reads.
LOCAL_CLUSTER_FLAGS = ("--slurm-status-command", "squeue", "--slurm-no-account",
                       "--slurm-init-seconds-before-status-checks", "2", "--slurm-keep-successful-logs",
                       "--cores", "2")  # this machine's cores: caps each job's threads (the profile says 4)
# The setup chain as two SLURM jobs instead of six, as a user would where every job is expensive (see above).
GROUPS = {"prep": ("corpus", "tokenizer", "tokenize"), "subject": ("lm", "extract", "normalize")}
GROUP_FLAGS = ("--groups", *(f"{rule}={group}" for group, rules in GROUPS.items() for rule in rules))
# What each SLURM job ran, named as the plugin's --comment starts (rule_<rule or group>), and whether it asks
# for a GPU: every one but the CPU-only group.
SUBMITTED = {"prep": (1, False), "subject": (1, True), "train": (2, True), "train_pack": (1, True),
             "evaluate": (4, True)}
RUN_TIMEOUT_S = 900
# The cards of this cluster by memory (node features of tests/slurm_cluster.py), as a user fills in the profile
GPU_CONSTRAINTS = "40:gpu40gb, 80:gpu80gb"

pytestmark = pytest.mark.slow


def cluster_config() -> dict:
    """The quick preset cut to the path every cluster run takes (see the module docstring)."""
    cfg = copy.deepcopy(QUICK)
    subject = cfg["subjects"]["tiny"]
    subject.update(train_tokens=16384, eval_tokens=4096)
    subject["dataset"]["max_tokens"] = 100_000
    subject["builtin"]["train_tokens"] = 16384
    cfg["sweep"] = {"archs": ["topk"], "n": [64], "k": [4, 8], "extra": [{"archs": ["relu"], "n": [64], "k": [8]},
                                                                         {"archs": ["topk_s2"], "n": [64], "k": [4]}],
                    "variants": {"topk_s2": {"arch": "topk", "train": {"distributed": {"latent": 2}}}}}
    cfg["train"].update(pack=["k"], tokens=32768)
    cfg["analysis"] = {"progressive": {"archs": []}, "refinement": {"archs": []}}
    cfg["evaluate"] = {"downstream_windows": 16, **{m: {"enabled": False} for m in ("probes", "ablation", "geometry")}}
    cfg["interpret"] = {"enabled": False}
    cfg["scaling"] = {"lr_sweep": {"enabled": False}, "compute": {"bootstrap": 20}}
    cfg["toy"] = {study: {"enabled": False} for study in ("allocation", "manifolds", "groundtruth")}
    return cfg


@pytest.fixture(scope="module")
def slurm_python() -> str:
    return side_venv(VENV, [PLUGIN], "snakemake_executor_plugin_slurm, saescale", "SAESCALE_SLURM_PYTHON")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_cluster.unavailable() or slurm_cluster.install()
    if reason:
        print(f"skipping the SLURM test: {reason}")
        pytest.skip(reason)
    running = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    try:
        yield running
    finally:
        slurm_cluster.stop(running)


def run_snakemake(python: str, wdir: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Snakemake from the plugin's venv, with this environment's scripts (`saescale`) on PATH for the jobs;
    interrupted with SIGINT (SIGTERM does not stop the SLURM executor) when it overruns."""
    cmd = [python, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(wdir), *args]
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(python).parent), str(Path(sys.executable).parent),
                                                  os.environ.get("PATH", "")])}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        raise AssertionError(f"snakemake on SLURM overran {RUN_TIMEOUT_S} s:\n{out[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, ""), time.monotonic() - start


def cluster_profile(directory: Path) -> Path:
    """profiles/slurm with its commented gpu_constraints line filled in for this cluster's features."""
    text = (ROOT / "profiles/slurm/config.yaml").read_text()
    line = re.search(r"^( +)# gpu_constraints: .*$", text, re.M)
    assert line, "profiles/slurm/config.yaml no longer shows how to set gpu_constraints"
    (directory / "config.yaml").write_text(text.replace(line[0], f'{line[1]}gpu_constraints: "{GPU_CONSTRAINTS}"'))
    return directory


@pytest.fixture(scope="module")
def slurm_run(cluster, slurm_python, tmp_path_factory) -> tuple[Path, list[dict[str, str]]]:
    """The cut quick preset through sbatch; the working directory and every SLURM job it submitted."""
    wdir = tmp_path_factory.mktemp("slurm_quick")
    (wdir / "config.yaml").write_text(yaml.safe_dump(cluster_config()))
    profile = cluster_profile(tmp_path_factory.mktemp("profile"))
    res, seconds = run_snakemake(slurm_python, wdir, "--executor", "slurm", "--workflow-profile",
                                 str(profile), *LOCAL_CLUSTER_FLAGS, *GROUP_FLAGS)
    print(f"snakemake --executor slurm: {seconds:.0f} s")
    if res.returncode != 0:
        logs = "\n".join(f"--- {p}:\n{p.read_text()[-2000:]}" for p in (wdir / ".snakemake/slurm_logs").rglob("*.log"))
        raise AssertionError(f"snakemake on SLURM failed:\n{res.stdout[-6000:]}\n{logs[-8000:]}")
    return wdir, slurm_cluster.jobs()


def submitted_as(job: dict[str, str]) -> str:
    """The SUBMITTED key of a SLURM job, from the plugin's --comment rule_<rule or group>[_...]."""
    comment = job.get("Comment", "").removeprefix("rule_")
    return next((name for name in sorted(SUBMITTED, key=len, reverse=True) if comment.startswith(name)), comment)


def test_the_cut_quick_preset_runs_through_sbatch_and_renders_the_report(slurm_run):
    wdir, jobs = slurm_run
    report = (wdir / "reports/report.html").read_text()
    assert "<html" in report.lower() and len(report) > 1000
    metrics = pd.read_csv(wdir / "data/scaling/tiny/L1/metrics.csv")
    assert sorted(zip(metrics["arch"], metrics["n"], metrics["k"])) == [("relu", 64, 8), ("topk", 64, 4), ("topk", 64, 8),
                                                                       ("topk_s2", 64, 4)]
    assert metrics["fvu"].between(0, 1).all()
    assert {job["JobState"] for job in jobs} == {"COMPLETED"}
    counts = pd.Series([submitted_as(job) for job in jobs]).value_counts().to_dict()
    assert counts == {name: count for name, (count, _) in SUBMITTED.items()}  # scaling, report: localrules
    logs = {p.name for p in (wdir / ".snakemake/slurm_logs").iterdir()}
    assert {"rule_train", "rule_evaluate"} <= logs and any(name.startswith("group_subject") for name in logs)


def test_gpu_rules_ask_slurm_for_a_gpu_and_cpu_rules_do_not(slurm_run):
    _, jobs = slurm_run
    for job in jobs:
        distributed = "topk_s2" in job["Comment"]  # train.distributed latent 2: a GPU per process
        asks_gpu = job.get("TresPerJob") == f"gres:gpu:{2 if distributed and submitted_as(job) == 'train' else 1}"
        assert asks_gpu == SUBMITTED[submitted_as(job)][1], f"{job['Comment']}: TresPerJob={job.get('TresPerJob')}"


def test_a_distributed_sae_trains_on_two_processes_of_its_two_gpu_job(slurm_run):
    """train.distributed {latent: 2}: one sbatch job with two GPUs, whose torchrun processes (gloo here: the GPUs
    are fake) train the SAE the packed single-device job trained, up to float summation order."""
    import torch
    from safetensors.torch import load_file

    wdir, jobs = slurm_run
    job = next(job for job in jobs if submitted_as(job) == "train" and "topk_s2" in job["Comment"])
    assert job["TresPerJob"] == "gres:gpu:2" and job["NumNodes"] == "1"
    sae, alone = (load_file(wdir / f"data/saes/tiny/L1/{arch}/n64_k4/saescale_sae.safetensors")
                  for arch in ("topk_s2", "topk"))
    for key in alone:
        torch.testing.assert_close(sae[key], alone[key], atol=1e-5, rtol=0, msg=key)
    log = (wdir / "logs/train/tiny_L1_topk_s2_n64_k4.log").read_text()
    assert "starting 2 training processes" in log and "[rank 1]" in log


def slurm_time(minutes: int) -> str:
    """A runtime in minutes as `scontrol show job` prints TimeLimit: [days-]hh:mm:ss."""
    days, rest = divmod(minutes, 24 * 60)
    clock = f"{rest // 60:02d}:{rest % 60:02d}:00"
    return f"{days}-{clock}" if days else clock


def test_a_packed_training_job_asks_for_what_the_profile_gives_train(slurm_run):
    _, jobs = slurm_run
    train = yaml.safe_load((ROOT / "profiles/slurm/config.yaml").read_text())["set-resources"]["train"]
    expected = {"TresPerJob": f"gres:gpu:{train['gpu']}", "TimeLimit": slurm_time(train["runtime"]),
                "Features": "gpu40gb"}  # the smallest card of GPU_CONSTRAINTS: n = 64 needs ~3 GB
    for name in ("train", "train_pack"):
        job = next(job for job in jobs if submitted_as(job) == name and "topk_s2" not in job["Comment"])
        assert {key: job[key] for key in expected} == expected, job["Comment"]


def slurm_mib(memory: str) -> int:
    """A memory as `scontrol show job` prints it (4096M, or 4G when whole GiB) in MiB."""
    return int(memory[:-1]) * {"M": 1, "G": 1024, "T": 1024**2}[memory[-1]]


def test_training_jobs_ask_for_the_memory_they_hold(slurm_run):
    """Not a fixed figure from the profile: what each job computed from the store (saescale.hardware), a
    whole number of GiB; here the 16,384 rows are held in RAM, beside the ~3 GB of a CUDA process."""
    _, jobs = slurm_run
    for job in jobs:
        if submitted_as(job) in ("train", "train_pack"):
            mem = slurm_mib(job["MinMemoryNode"])
            procs = 2 if "topk_s2" in job["Comment"] else 1  # each process of a distributed job holds as much
            assert mem % 1024 == 0 and 3 * 1024 * procs < mem <= 6 * 1024 * procs, (job["Comment"], mem)
        else:
            assert job.get("Features") in (None, "(null)"), job["Comment"]  # only training names a card
