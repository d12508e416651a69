"""A full-shape rehearsal of the paper preset on CPU: workflow/configs/rehearsal.yaml end to end, timed.

    python benchmarks/rehearsal.py                  # builds the model, runs in /tmp/rehearsal-run, ~25 min
    python benchmarks/rehearsal.py --dry-run        # builds the model, plans the jobs
    python benchmarks/rehearsal.py --workdir DIR --out-md table.md --out-json table.json

1. Builds the subject if its folder is missing: a randomly initialised `GPT2Config()` (12 blocks, d = 768,
   n_positions 1024) and a byte-level BPE tokenizer of exactly 50,257 tokens trained on the builtin
   CPython-stdlib corpus, both saved with `save_pretrained` into the preset's `model:` folder (relative to the
   working directory), so `from_pretrained(folder)` loads either. No hub access is needed.
2. Runs the workflow through its real rules in the working directory, with the preset as config.yaml
   (`--keep-going`: a failing stage does not hide the cost of the others), under a memory watchdog that stops
   the run when its processes together hold more than --max-rss-gb.
3. Reads Snakemake's `benchmark:` files (benchmarks/results/{rule}/*.tsv in the working directory: wall
   seconds `s`, peak resident memory `max_rss` in MB, `cpu_time`) and prints and writes them per job, with
   the machine, the date and the load average sampled during the run (other users' jobs inflate wall times).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "workflow/configs/rehearsal.yaml"
GPT2_VOCAB = 50257


# --------------------------------------------------------------------------- the subject


def build_subject(folder: Path, vocab_size: int = GPT2_VOCAB, n_layer: int = 12, n_embd: int = 768,
                  n_head: int = 12, n_positions: int = 1024, seed: int = 0) -> dict:
    """A random GPT2LMHeadModel (GPT2Config() shapes by default) and a byte-level BPE tokenizer of exactly
    `vocab_size` tokens trained on the builtin stdlib corpus, saved together in `folder`. Returns what was
    built."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from saescale.corpus import build_builtin_corpus
    from saescale.subject import load_tokenizer, train_tokenizer

    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder.parent / "corpus.jsonl"
    build_builtin_corpus(corpus, folder.parent / "corpus.json")
    # min_frequency 1: at 2 the stdlib corpus runs out of pairs at 40,446 tokens
    train_tokenizer(str(corpus), vocab_size, str(folder), min_frequency=1)
    tok = load_tokenizer(str(folder))
    if len(tok) != vocab_size:
        raise SystemExit(f"the tokenizer has {len(tok)} tokens, not {vocab_size}: the corpus is too small")
    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(folder)
    return {"folder": str(folder), "vocab_size": len(tok), "n_layer": n_layer, "n_embd": n_embd,
            "n_positions": n_positions, "n_params": sum(p.numel() for p in model.parameters()),
            "seconds": time.perf_counter() - t0}


def subject_folder(cfg: dict, wdir: Path) -> Path:
    """The one local model folder of the preset, as the run's working directory resolves it."""
    (subject,) = cfg["subjects"].values()
    return (wdir / subject["model"]).resolve()


def ensure_subject(cfg: dict, wdir: Path, **shape) -> dict | None:
    folder = subject_folder(cfg, wdir)
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return None
    return build_subject(folder, **shape)


# --------------------------------------------------------------------------- the run


def snakemake_cmd(wdir: Path, cores: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
            "--directory", str(wdir), "--cores", str(cores), "--workflow-profile", "none", *args]


def prepare(wdir: Path, config: str | dict) -> dict:
    """The preset (its text, or a config mapping) as the working directory's config.yaml: the run plans
    exactly what it declares, whether or not the Snakefile merges --configfile presets into config.yaml."""
    wdir.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
    (wdir / "config.yaml").write_text(text)
    return yaml.safe_load(text)


def planned_jobs(wdir: Path, cores: int = 2) -> dict[str, int]:
    """{rule: jobs} of a dry run ({} when nothing is left to do)."""
    res = subprocess.run(snakemake_cmd(wdir, cores, "-n"), capture_output=True, text=True)
    text = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"snakemake -n failed:\n{text[-4000:]}")
    if "Job stats:" not in text:
        return {}
    table = text.split("Job stats:")[1].split("Reasons:")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M) if m[1] != "total"}


class Watch:
    """Samples the load average and the summed RSS of a process tree every `period` s; kills the tree once the
    RSS exceeds `limit_gb` (a blown-up stage must not take the shared machine's memory)."""

    def __init__(self, proc: subprocess.Popen, limit_gb: float, period: float = 2.0):
        self.proc, self.limit, self.period = proc, limit_gb * 2**30, period
        self.load: list[float] = []
        self.peak_tree_rss = 0
        self.killed_for_memory = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _tree_rss(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.period):
            self.load.append(os.getloadavg()[0])
            rss = self._tree_rss()
            self.peak_tree_rss = max(self.peak_tree_rss, rss)
            if rss > self.limit and not self.killed_for_memory:
                self.killed_for_memory = True
                print(f"rehearsal: the run holds {rss / 2**30:.1f} GiB > {self.limit / 2**30:.1f} GiB; "
                      "stopping it", file=sys.stderr, flush=True)
                try:
                    for p in psutil.Process(self.proc.pid).children(recursive=True):
                        p.kill()
                    self.proc.kill()
                except psutil.NoSuchProcess:
                    pass


def run_workflow(wdir: Path, cores: int, max_rss_gb: float, log_path: Path) -> dict:
    """Runs snakemake to the report; its output goes to `log_path`. Returns wall time, exit code and load."""
    cmd = snakemake_cmd(wdir, cores, "--keep-going", "--rerun-incomplete", "--show-failed-logs")
    t0 = time.perf_counter()
    with log_path.open("w") as log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT) as proc:
        with Watch(proc, max_rss_gb) as watch:
            rc = proc.wait()
    load = watch.load or [os.getloadavg()[0]]
    return {"returncode": rc, "wall_s": time.perf_counter() - t0,
            "killed_for_memory": watch.killed_for_memory,
            "peak_run_rss_gb": watch.peak_tree_rss / 2**30,
            "load_1min": {"min": min(load), "mean": sum(load) / len(load), "max": max(load)}}


# --------------------------------------------------------------------------- the table


def read_benchmarks(wdir: Path) -> list[dict]:
    """One row per job from benchmarks/results/{rule}/{job}.tsv: wall s, peak RSS (MB), CPU s."""
    rows = []
    for f in sorted((wdir / "benchmarks" / "results").rglob("*.tsv")):
        with f.open() as fh:
            rec = next(csv.DictReader(fh, delimiter="\t"))

        def num(key: str) -> float | None:
            value = rec.get(key)
            return float(value) if value not in (None, "", "-", "NA") else None

        rows.append({"rule": f.parent.name, "job": f.stem, "wall_s": num("s"), "max_rss_mb": num("max_rss"),
                     "cpu_s": num("cpu_time")})
    return rows


STAGE_ORDER = ["corpus", "tokenize", "extract", "normalize", "train", "evaluate", "probes", "ablation",
               "geometry", "interpret", "dashboard", "analyze", "scaling", "report"]


def ordered(rows: list[dict]) -> list[dict]:
    rank = {rule: i for i, rule in enumerate(STAGE_ORDER)}
    return sorted(rows, key=lambda r: (rank.get(r["rule"], len(rank)), r["job"]))


def machine() -> dict:
    """The host, in the words a reader of the table needs."""
    import torch

    cpu = platform.processor()
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"^model name\s*:\s*(.+)$", info, re.M)[1]
        flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)[1]
    except (OSError, TypeError):
        pass
    mem_gb = None
    try:
        mem_gb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1]) / 2**20
    except (OSError, TypeError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores,
            "amx_bf16": "amx_bf16" in flags.split(), "memory_gb": round(mem_gb, 1) if mem_gb else None,
            "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.is_available()}


def markdown(result: dict) -> str:
    m, run = result["machine"], result.get("run", {})
    amx = "AMX bf16" if m["amx_bf16"] else "no AMX"
    gpu = "a GPU" if m["gpu"] else "no GPU"
    lines = [f"Rehearsal of `{result['preset']}` on {m['cpu']}, {m['cores']} cores ({amx}), "
             f"{m['memory_gb']} GB RAM, {gpu}; torch {m['torch']}; {result['date']}."]
    if run:
        load = run["load_1min"]
        lines.append(f"Whole run {run['wall_s'] / 60:.1f} min wall (exit code {run['returncode']}), load "
                     f"average {load['min']:.1f}–{load['max']:.1f} (mean {load['mean']:.1f}) on {m['cores']} "
                     f"cores; peak RSS of all its processes together {run['peak_run_rss_gb']:.1f} GiB.")
    if result.get("subject"):
        s = result["subject"]
        lines.append(f"Model folder built first in {s['seconds']:.0f} s (not a workflow stage): GPT-2, "
                     f"{s['n_layer']} blocks, d = {s['n_embd']}, vocabulary {s['vocab_size']}, "
                     f"{s['n_params'] / 1e6:.0f}M parameters.")
    lines += ["", "| stage | job | wall s | peak RSS | CPU s |", "|---|---|---|---|---|"]
    for r in result["jobs"]:
        rss = f"{r['max_rss_mb'] / 1024:.2f} GB" if r["max_rss_mb"] is not None else "–"
        cpu = f"{r['cpu_s']:.0f}" if r["cpu_s"] is not None else "–"
        lines.append(f"| {r['rule']} | {r['job']} | {r['wall_s']:.1f} | {rss} | {cpu} |")
    total = sum(r["wall_s"] for r in result["jobs"])
    lines += ["", f"Sum of job wall times {total:.0f} s over {len(result['jobs'])} jobs (several at once)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", type=Path, default=PRESET)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/rehearsal-run"))
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--max-rss-gb", type=float, default=16.0, help="stop the run when its processes hold more")
    p.add_argument("--out-json", type=Path, help="default: <workdir>/rehearsal.json")
    p.add_argument("--out-md", type=Path, help="default: <workdir>/rehearsal.md")
    p.add_argument("--dry-run", action="store_true", help="build the model, plan the jobs, run nothing")
    a = p.parse_args(argv)

    wdir = a.workdir.resolve()
    cfg = prepare(wdir, a.preset.read_text())
    subject = ensure_subject(cfg, wdir)
    if a.dry_run:
        print(json.dumps(planned_jobs(wdir, a.cores), indent=1))
        return 0
    result = {"preset": str(a.preset.resolve().relative_to(ROOT)) if a.preset.resolve().is_relative_to(ROOT)
              else str(a.preset), "date": dt.datetime.now().astimezone().isoformat(timespec="minutes"),
              "machine": machine(), "subject": subject, "workdir": str(wdir)}
    result["run"] = run_workflow(wdir, a.cores, a.max_rss_gb, wdir / "rehearsal.log")
    result["jobs"] = ordered(read_benchmarks(wdir))
    out_json, out_md = a.out_json or wdir / "rehearsal.json", a.out_md or wdir / "rehearsal.md"
    out_json.write_text(json.dumps(result, indent=1))
    out_md.write_text(markdown(result))
    print(markdown(result))
    if result["run"]["returncode"] != 0:
        print(f"the run failed: see {wdir / 'rehearsal.log'} and {wdir / 'logs'}", file=sys.stderr)
    return result["run"]["returncode"]


if __name__ == "__main__":
    sys.exit(main())
