"""Faults, end to end: `kill -9` of real `snakemake` runs during extraction and training, two runs on one
directory, and why concurrent jobs never write the same Zarr chunk.

Each kill test starts `snakemake` in its own session and SIGKILLs the whole process group (snakemake runs
its jobs as child processes of that group), once a poll of the files shows the job has made durable progress
(a complete chunk, a checkpoint): no fixed sleeps, so the kill lands mid-job however loaded the machine is.
The subject is a small random GPT-2 on local text files, so no LM is trained here; all outputs are compared
with one uninterrupted run of the same config (the `reference` fixtures).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
import yaml
import zarr
from helpers import random_gpt2, write_text_files

from saescale.provenance import TRAIN_MODULES, code_version

ROOT = Path(__file__).resolve().parents[1]
QUICK = yaml.safe_load((ROOT / "workflow/configs/quick.yaml").read_text())

# Snakemake's `.snakemake_timestamp` inside a directory output is not part of the Zarr hierarchy
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Object at .snakemake_timestamp")]

TOKENS = "data/tokens/rand.zarr"
STORE = "data/activations/rand.zarr"
NORM = "data/activations/rand.norm.json"
SAE = "data/saes/rand/L1/topk/n256_k8"
TRAIN_STEPS = 800  # train.tokens / batch_size below: ~3 s at 1 thread, several 0.5 s checkpoints


def fault_config(model: str, text_files: list[str]) -> dict:
    """40 chunks of 128 rows (32 train + 8 eval), one SAE of 800 steps checkpointed every 0.5 s: small, yet
    both jobs run long enough after their first durable step for a kill to land inside them."""
    return {
        "subjects": {"rand": {"model": model, "layers": [1], "ctx_len": 16, "train_tokens": 4096,
                              "eval_tokens": 1024, "chunk_windows": 8, "batch_windows": 8,
                              "dataset": {"path": "text", "data_files": text_files}}},
        "sweep": {"archs": ["topk"], "n": [256], "k": [8]},
        "train": {"tokens": TRAIN_STEPS * 256, "batch_size": 256, "dead_tokens": 4096, "heldout_rows": 0,
                  "log_every": 50, "checkpoint_seconds": 0.5, "device": "cpu", "threads": 1},
    }


# ---- running snakemake ------------------------------------------------------------------------------


def snakemake_cmd(wdir: Path, *args: str) -> list[str]:
    # --workflow-profile none: independent of profiles/default, so --rerun-incomplete is passed explicitly.
    # One extraction thread: with two, a forward pass on a loaded machine (another pytest worker) differed from
    # the reference in the last float16 bit once; a fixed single thread is the documented exact setting.
    return [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(wdir),
            "--cores", "2", "--set-threads", "extract=1", "--workflow-profile", "none", *args]


def snakemake(wdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(snakemake_cmd(wdir, *args), capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


def resume(wdir: Path, *targets: str) -> subprocess.CompletedProcess:
    """What a user does after snakemake itself was killed: remove its stale lock (a SIGKILLed snakemake
    cannot), then rerun with --rerun-incomplete (set in profiles/default)."""
    snakemake(wdir, "--unlock", *targets)
    return snakemake(wdir, "--rerun-incomplete", *targets)


def planned_jobs(res: subprocess.CompletedProcess) -> dict[str, int]:
    """The 'Job stats' table of a dry run, as {rule: count}."""
    text = res.stdout + res.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:")[1].split("\n\n")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.MULTILINE) if m[1] != "total"}


class Run:
    """A `snakemake` run in the background, in a new session: its pid is the process group id of every
    job it starts, so one `killpg` reaches them all. Output goes to a file (a full pipe would block it)."""

    def __init__(self, wdir: Path, *args: str):
        self.output_path = wdir.with_name(wdir.name + f".run{time.monotonic_ns()}.log")
        with open(self.output_path, "w") as out:
            self.proc = subprocess.Popen(snakemake_cmd(wdir, *args), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.pgid = self.proc.pid

    def output(self) -> str:
        return self.output_path.read_text()

    def signal(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """kill -9 the whole group and wait until none of its processes is left."""
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        wait_for(lambda: not group_members(self.pgid), "the killed process group to exit", timeout=60)

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)


@contextmanager
def background(wdir: Path, *args: str) -> Iterator[Run]:
    """A Run that is killed (and continued first, should it be stopped) if the test fails midway."""
    run = Run(wdir, *args)
    try:
        yield run
    finally:
        if run.proc.poll() is None or group_members(run.pgid):
            run.signal(signal.SIGCONT)
            run.kill()


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, read from /proc/<pid>/stat."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, run: Run | None = None, timeout: float = 180) -> T:
    """Poll `condition` until it returns something truthy; fail if `run` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if run is not None and run.proc.poll() is not None:
            raise AssertionError(f"snakemake exited ({run.proc.returncode}) before {what}:\n{run.output()[-4000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def copy_workspace(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)  # keeps mtimes and .snakemake metadata: nothing done is redone
    return dst


# ---- fixtures: one uninterrupted run of the config ---------------------------------------------------


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    """A workflow directory whose token store is built (the model and text live outside it)."""
    root = tmp_path_factory.mktemp("faults")
    files = write_text_files(root / "text", copies=400)
    model = random_gpt2(root / "model", files, n_layer=2, n_embd=128)
    wdir = root / "tokenized"
    wdir.mkdir()
    (wdir / "config.yaml").write_text(yaml.safe_dump(fault_config(model, files)))
    snakemake(wdir, TOKENS)
    return wdir


@pytest.fixture(scope="module")
def extracted(tokenized: Path) -> Path:
    """The uninterrupted reference up to the activation store and its statistics."""
    wdir = copy_workspace(tokenized, tokenized.with_name("extracted"))
    snakemake(wdir, NORM)
    return wdir


@pytest.fixture(scope="module")
def reference(extracted: Path) -> Path:
    """The uninterrupted reference with the SAE trained."""
    wdir = copy_workspace(extracted, extracted.with_name("reference"))
    snakemake(wdir, f"{SAE}/saescale_sae.json")
    return wdir


# ---- comparing outputs -------------------------------------------------------------------------------


VOLATILE_ATTRS = {"extract_seconds"}  # wall time: the only store attribute allowed to differ


def assert_same_store(a: Path, b: Path) -> None:
    """Same arrays (shape, chunks, dtype and every bit) and the same attributes, group by group."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    arrays_a, arrays_b = dict(ga.arrays()), dict(gb.arrays())
    groups_a, groups_b = dict(ga.groups()), dict(gb.groups())
    assert arrays_a.keys() == arrays_b.keys() and groups_a.keys() == groups_b.keys()
    strip = lambda attrs: {k: v for k, v in attrs.items() if k not in VOLATILE_ATTRS}
    assert strip(dict(ga.attrs)) == strip(dict(gb.attrs))
    for name, x in arrays_a.items():
        y = arrays_b[name]
        assert (x.shape, x.chunks, x.dtype) == (y.shape, y.chunks, y.dtype), name
        assert x[...].tobytes() == y[...].tobytes(), f"{a}/{name} differs"
        assert dict(x.attrs) == dict(y.attrs), name
    for name in groups_a:
        assert_same_store(a / name, b / name)


def store_attrs(store: Path) -> dict:
    """The group attributes as last written (zarr writes metadata atomically: never a half file)."""
    try:
        return json.loads((store / "zarr.json").read_text())["attributes"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return {}


def chunk_files(store: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every chunk file, by path in the store: zarr replaces a rewritten chunk, so a new
    inode means it was written again."""
    files = (p for p in store.rglob("*") if p.is_file() and "c" in p.relative_to(store).parts)
    return {str(p.relative_to(store)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in files if ".partial" not in p.name}


def chunk_index(path: str) -> int:
    """The row-chunk index of a chunk file path such as 'L1/x/c/3/0' or 'token/c/3'."""
    return int(path.split("/c/")[1].split("/")[0])


# ---- 1. kill -9 during extraction --------------------------------------------------------------------


def test_extraction_killed_by_sigkill_resumes_from_its_complete_chunks_to_the_uninterrupted_store(
        tokenized, extracted, tmp_path):
    """The run is killed once the `.partial` store records a complete chunk. Then nothing is at the store's
    path, and the partial store says it is incomplete (readers refuse it); `snakemake -n` plans extract
    again. The next run resumes at the recorded chunk without rewriting the chunks before it, and its store
    equals the uninterrupted one bit for bit."""
    from saescale.store import open_store

    wdir = copy_workspace(tokenized, tmp_path / "w")
    final, partial = wdir / STORE, wdir / (STORE + ".partial")
    with background(wdir, STORE) as run:
        # either path: a store written in place must be seen, to be caught below
        wait_for(lambda: max(store_attrs(p).get("chunks_done", 0) for p in (partial, final)) >= 1,
                 "a complete chunk", run)
        run.kill()
    assert not final.exists(), ("killed too late: the extraction finished (raise subjects.rand.train_tokens)"
                                if store_attrs(final).get("complete") else "a killed extraction left its final path")
    attrs = store_attrs(partial)
    n_chunks = -(-attrs["n_rows"] // attrs["chunk_rows"])
    done = attrs["chunks_done"]
    assert attrs["complete"] is False and 1 <= done < n_chunks
    with pytest.raises(RuntimeError, match="not a complete activation store"):
        open_store(partial)
    assert planned_jobs(snakemake(wdir, "-n", STORE)) == {"extract": 1}
    before = {path: stat for path, stat in chunk_files(partial).items() if chunk_index(path) < done}
    assert len(before) == 4 * done  # the chunks of token, window, position and L1/x before `done`

    resume(wdir, STORE)
    assert f"resuming extraction at chunk {done}" in (wdir / "logs/extract/rand.log").read_text()
    after = chunk_files(wdir / STORE)
    assert {path: after[path] for path in before} == before, "a complete chunk was written again"
    assert not partial.exists()
    assert_same_store(wdir / STORE, extracted / STORE)
    assert open_store(wdir / STORE).attrs["complete"] is True


# ---- 2. kill -9 during training ----------------------------------------------------------------------


def checkpoint_step(path: Path) -> int:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["step"]


def assert_same_training(a: Path, b: Path) -> None:
    """The same weights file byte for byte, and the same log apart from wall times."""
    import pandas as pd

    assert (a / "saescale_sae.safetensors").read_bytes() == (b / "saescale_sae.safetensors").read_bytes(), "weights differ"
    log_a, log_b = (pd.read_csv(d / "train_log.csv").drop(columns="elapsed_s") for d in (a, b))
    pd.testing.assert_frame_equal(log_a, log_b, check_exact=True)
    cfg_a, cfg_b = (json.loads((d / "saescale_sae.json").read_text()) for d in (a, b))
    for key in ("steps", "weights", "selection_fvu", "final_dead_fraction"):
        assert cfg_a["train"][key] == cfg_b["train"][key], key


def test_training_killed_by_sigkill_resumes_from_its_checkpoint_to_the_uninterrupted_weights(
        extracted, reference, tmp_path):
    """The run is killed once `checkpoint.pt` exists (written by rename: never a half file). No output of the
    job exists then, and `snakemake -n` plans it again. The next run resumes at the checkpoint's step (its log
    says so) and ends with the uninterrupted run's `saescale_sae.safetensors`, byte for byte, on CPU with the
    settings of "When a job is killed" (README)."""
    wdir = copy_workspace(extracted, tmp_path / "w")
    sae = wdir / SAE
    with background(wdir, f"{SAE}/saescale_sae.json") as run:
        wait_for(lambda: (sae / "checkpoint.pt").exists(), "the first checkpoint", run)
        run.kill()
    step = checkpoint_step(sae / "checkpoint.pt")
    assert 0 < step < TRAIN_STEPS, "killed too late: raise train.tokens"
    assert not [p.name for p in sae.iterdir() if p.name != "checkpoint.pt"], "a killed job left an output"
    assert planned_jobs(snakemake(wdir, "-n", f"{SAE}/saescale_sae.json")) == {"train": 1}

    resume(wdir, f"{SAE}/saescale_sae.json")
    log = (wdir / "logs/train/rand_L1_topk_n256_k8.log").read_text()
    assert re.search(rf"resumed from \S+checkpoint.pt at step {step}/{TRAIN_STEPS}", log), log[-2000:]
    assert not (sae / "checkpoint.pt").exists()
    assert_same_training(sae, reference / SAE)
    cfg = json.loads((sae / "saescale_sae.json").read_text())
    assert cfg["train_spec"]["code"] == code_version("train", *TRAIN_MODULES)  # next test


class Killed(Exception):
    pass


def test_a_partial_store_or_checkpoint_of_other_code_is_never_resumed(tokenized, tmp_path, caplog, monkeypatch):
    """A job killed before the code was edited is rerun by Snakemake (the rule's code param changed); it
    must then start over, not finish the old code's work with the new code. The code version is part of
    what a `.partial` store and a checkpoint must match (`saescale extract` / `train` pass the rule's)."""
    import torch

    import saescale.subject
    from saescale.sae.train import TrainSpec
    from saescale.store import extract

    spec = yaml.safe_load((tokenized / "config.yaml").read_text())["subjects"]["rand"]
    model, out = saescale.subject.load_model(spec["model"]), str(tmp_path / "acts.zarr")
    run = lambda code: extract(model, str(tokenized / TOKENS), [1], 256, "float16", 8, 8, out, "rand",
                               torch.device("cpu"), code=code)
    forward, calls = saescale.subject.run_until_recorded, []

    def dies_at_the_third_batch(*args):
        calls.append(1)
        if len(calls) > 2:
            raise Killed
        return forward(*args)

    with monkeypatch.context() as patch, pytest.raises(Killed):
        patch.setattr(saescale.subject, "run_until_recorded", dies_at_the_third_batch)
        run("v1")
    assert store_attrs(Path(out + ".partial"))["chunks_done"] >= 1
    with caplog.at_level("INFO", logger="saescale.store"):
        run("v2")
    assert "discarding a partial store" in caplog.text and "resuming" not in caplog.text
    train = TrainSpec(arch="topk", n=64, k=4, d_model=32, lr=1e-3, batch_size=256, tokens=4096, adam_eps=1e-8,
                      adam_betas=(0.9, 0.999), auxk_coef=0, k_aux=16, dead_tokens=1024, ema_decay=0, log_every=1,
                      checkpoint_seconds=1, seed=0, device="cpu", code="v1")
    assert TrainSpec(**{**train.__dict__, "code": "v2"}).fingerprint() != train.fingerprint()


# ---- 3. two runs on one directory --------------------------------------------------------------------


def test_a_second_run_on_the_same_directory_is_refused_while_the_first_completes(extracted, reference, tmp_path):
    """Snakemake locks the files a run will write: a second run that would write them exits non-zero with
    its LockException, touching nothing, and the first run finishes with the uninterrupted run's weights.
    The first run is paused (SIGSTOP) while its job runs, so the second surely starts while it holds the
    lock, however slowly either starts; it is continued (SIGCONT) once the second has been refused."""
    wdir = copy_workspace(extracted, tmp_path / "w")
    target = f"{SAE}/saescale_sae.json"
    with background(wdir, target) as first:
        # the job has started, so the run holds its locks (written before any job runs)
        wait_for(lambda: (wdir / "logs/train/rand_L1_topk_n256_k8.log").exists(), "the first run's job", first)
        first.signal(signal.SIGSTOP)
        try:
            second = snakemake(wdir, target, check=False)
        finally:
            first.signal(signal.SIGCONT)
        text = second.stdout + second.stderr
        assert second.returncode != 0 and "LockException" in text and "Directory cannot be locked" in text, text
        assert first.wait() == 0, first.output()[-4000:]
    assert "rule train" not in text  # the second never started a job
    assert_same_training(wdir / SAE, reference / SAE)
    locks = wdir / ".snakemake/locks"
    assert not (locks.exists() and list(locks.iterdir())), "the first run left its lock"
    after = snakemake(wdir, "-n", target)
    assert planned_jobs(after) == {}, after.stdout[-3000:]


# ---- 4. concurrent jobs never write the same Zarr chunk ----------------------------------------------


def dry_run_jobs(res: subprocess.CompletedProcess) -> list[tuple[str, list[str]]]:
    """(rule, outputs) of every job a dry run lists."""
    text = (res.stdout + res.stderr).split("Reasons:")[0]
    blocks = re.split(r"^(?:local)?rule (\w+):$", text, flags=re.MULTILINE)[1:]
    jobs = []
    for rule, body in zip(blocks[::2], blocks[1::2]):
        fields = dict(re.findall(r"^    (\w+): (.*)$", body.split("\nJob stats:")[0], re.MULTILINE))
        jobs.append((rule, [p.strip() for p in fields["output"].split(",")] if "output" in fields else []))
    return jobs


def inside(path: Path, folder: Path) -> bool:
    return path != folder and path.is_relative_to(folder)


def test_every_zarr_store_is_written_by_exactly_one_job_of_the_dag(tmp_path):
    """Zarr 3 has no locking across processes: two writers of one chunk lose updates (notes/snakemake.md
    section 8). So no chunk may have two writers. Between jobs, that holds when every store is exactly one
    job's output and no other job writes inside it or inside its staging `<store>.partial`: checked over
    the whole DAG of the quick preset with a second subject (two extractions that may run side by side)
    and packed training. Snakemake's lock keeps a second run from running the same job at the same time
    (test above); within the job, the next test shows one thread writes each chunk once. A job's undeclared
    files (checkpoint.pt, `.tmp` names) sit beside its own outputs, outside every store."""
    subjects = {"tiny": QUICK["subjects"]["tiny"], "tiny2": {**QUICK["subjects"]["tiny"], "layers": [0, 1]}}
    cfg = {**QUICK, "subjects": subjects, "train": {**QUICK["train"], "pack": ["k"]}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = snakemake(tmp_path, "-n")
    jobs = dry_run_jobs(res)
    assert len(jobs) == sum(planned_jobs(res).values())
    written = Counter(Path(p) for _, outputs in jobs for p in outputs)
    assert [p for p, count in written.items() if count > 1] == []
    stores = {p for p in written if p.suffix == ".zarr"}
    assert {str(p) for p in stores} == {f"data/{kind}/{s}.zarr" for kind in ("tokens", "activations") for s in subjects}
    for store in stores:
        staging = store.with_name(store.name + ".partial")
        assert staging not in written
        assert [p for p in written if inside(p, store) or inside(p, staging) or inside(store, p)] == []
    assert {rule for rule, outputs in jobs if any(Path(p) in stores for p in outputs)} == {"tokenize", "extract"}


def test_extraction_writes_each_chunk_once_whole_from_one_writer_thread(tokenized, tmp_path, monkeypatch):
    """Within the extract job: every array write is whole, aligned chunks, each chunk of each array is
    written exactly once, all by the one writer thread, and `chunks_done` (what a resumed job trusts) is
    raised only after all of a chunk's arrays are written."""
    import torch

    from saescale.store import extract
    from saescale.subject import load_model

    events: list[tuple] = []
    set_item, set_attr = zarr.Array.__setitem__, zarr.core.attributes.Attributes.__setitem__

    def record_write(array, selection, value):
        events.append(("write", array.path, selection, threading.current_thread().name))
        return set_item(array, selection, value)

    def record_attr(attrs, key, value):
        if key == "chunks_done":
            events.append(("done", value))
        return set_attr(attrs, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", record_write)
    monkeypatch.setattr(zarr.core.attributes.Attributes, "__setitem__", record_attr)
    spec = yaml.safe_load((tokenized / "config.yaml").read_text())["subjects"]["rand"]
    attrs = extract(load_model(spec["model"]), str(tokenized / TOKENS), [1], spec["train_tokens"], "float16",
                    spec["batch_windows"], spec["chunk_windows"], str(tmp_path / "acts.zarr"), "rand",
                    torch.device("cpu"))
    n_rows, chunk = attrs["n_rows"], attrs["chunk_rows"]
    n_chunks = -(-n_rows // chunk)
    writes = [e for e in events if e[0] == "write"]
    assert {thread for *_, thread in writes} == {"saescale-extract-writer_0"}
    written: Counter = Counter()
    for _, array, rows, _ in writes:
        assert isinstance(rows, slice) and rows.start % chunk == 0 and rows.stop == min(rows.start + chunk, n_rows)
        written[array, rows.start // chunk] += 1
    arrays = ("token", "window", "position", "L1/x")
    assert written == Counter({(a, c): 1 for a in arrays for c in range(n_chunks)})
    seen: set = set()
    for event in events:
        if event[0] == "write":
            seen.add((event[1], event[2].start // chunk))
        elif event[1] > 0:
            assert {(a, event[1] - 1) for a in arrays} <= seen, f"chunks_done={event[1]} before its writes"
    assert [e[1] for e in events if e[0] == "done"] == list(range(n_chunks + 1))  # 0 at creation
