"""The pipeline's own costs: time per stage of a finished run, and how long Snakemake takes to plan a large grid.

    python benchmarks/pipeline.py stages --run .            # after `snakemake --cores all` in this directory
    python benchmarks/pipeline.py dryrun --archs 4 --n 7 --k 6   # plans the default grid widened to ~700 jobs

`stages` sums Snakemake's per-job benchmark files (`benchmarks/results/{rule}/*.tsv`: wall seconds and peak
memory of each job) by rule. `dryrun` copies the workflow to a temporary directory, writes a config with a wide
grid on top of the default, and times `snakemake -n` from a cold start. The run has no data, so the dry-run plans
every job from the corpus on. Each (arch, n, k) adds train, evaluate, probes, ablation, geometry, interpret and
dashboard jobs. The target is under 5 s for 200 jobs.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ["Snakefile", "config.yaml", "envs", "workflow", "profiles"]
ARCHS = ["topk", "batchtopk", "multitopk", "relu", "gated", "jumprelu", "prolu", "relu_dn", "jumprelu_tanh"]


def stages(run: Path) -> list[dict]:
    rows: dict[str, list[tuple[float, float]]] = {}
    for f in sorted((run / "benchmarks" / "results").rglob("*.tsv")):
        rule = f.relative_to(run / "benchmarks" / "results").parts[0]
        with f.open() as fh:
            rec = next(csv.DictReader(fh, delimiter="\t"))
        rss = float(rec["max_rss"]) if rec.get("max_rss") not in (None, "", "-") else float("nan")
        rows.setdefault(rule, []).append((float(rec["s"]), rss))
    out = [{"rule": r, "jobs": len(v), "total_s": sum(s for s, _ in v), "min_s": min(s for s, _ in v),
            "max_s": max(s for s, _ in v), "max_rss_mb": max(m for _, m in v)} for r, v in rows.items()]
    return sorted(out, key=lambda r: -r["total_s"])


def dryrun(archs: int, n: int, k: int) -> dict:
    grid_n = [2 ** (7 + i) for i in range(n)]
    grid_k = [2 ** (2 + i) for i in range(k)]
    with tempfile.TemporaryDirectory() as tmp:
        for name in WORKFLOW:
            src = ROOT / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, Path(tmp) / name)
        cfg = Path(tmp) / "wide.yaml"
        cfg.write_text(json.dumps({"base": "config.yaml",  # a preset replaces config.yaml unless it extends it
                                   "sweep": {"archs": ARCHS[:archs], "n": grid_n, "k": grid_k},
                                   "evaluate": {"probes": {"archs": None, "n": None},
                                                "ablation": {"archs": None, "n": None},
                                                "geometry": {"archs": None, "n": None}},
                                   "interpret": {"archs": None, "n": None}}))
        t0 = time.perf_counter()
        proc = subprocess.run(["snakemake", "-n", "--configfile", str(cfg)], cwd=tmp, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"snakemake -n failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    total = re.search(r"^total\s+(\d+)", proc.stdout, re.MULTILINE)
    return {"archs": ARCHS[:archs], "n": grid_n, "k": grid_k, "saes": archs * n * k,
            "jobs": int(total.group(1)) if total else None, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("stages")
    s.add_argument("--run", default=".")
    d = sub.add_parser("dryrun")
    d.add_argument("--archs", type=int, default=4)
    d.add_argument("--n", type=int, default=7)
    d.add_argument("--k", type=int, default=6)
    a = p.parse_args()
    if a.what == "stages":
        rows = stages(Path(a.run))
        print("| rule | jobs | job time | each | peak memory |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['rule']} | {r['jobs']} | {r['total_s']:.0f} s | {r['min_s']:.1f}–{r['max_s']:.1f} s | "
                  f"{r['max_rss_mb']:.0f} MB |")
        print(f"\ntotal job time {sum(r['total_s'] for r in rows):.0f} s over {sum(r['jobs'] for r in rows)} jobs")
    else:
        r = dryrun(a.archs, a.n, a.k)
        print(json.dumps(r))
        print(f"\n| SAEs | jobs planned | `snakemake -n` |\n|---|---|---|\n| {r['saes']} | {r['jobs']} | {r['seconds']:.1f} s |")


if __name__ == "__main__":
    main()
