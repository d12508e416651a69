"""Several SAEs on one activation stream (train.pack) against one job per SAE: wall time of the same SAEs
trained as separate `saescale train` processes, one after another, and as one `saescale train --members`.

    snakemake --cores all                                   # the default run: data/activations/tiny.zarr
    python benchmarks/pack.py --run . --n 512 --k 4 8 16    # in RAM (the default for stores under 8 GiB)
    python benchmarks/pack.py --run . --n 512 --k 4 8 16 --stream   # read from disk, as for a large store

The SAEs get the run's train settings (config.yaml, the arch's recipe). Separate jobs pay, each, the process
start, the imports, reading the store (or streaming it from disk) and normalizing every batch; a pack pays
them once. The weights must come out identical: the script checks it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from saescale import paths
from saescale.config import load_config, sae_settings


def train(args: list[str], threads: int, log: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "saescale.cli", "train", *args, "--threads", str(threads), "--log", str(log)],
                   check=True, capture_output=True)
    return time.perf_counter() - t0


def train_seconds(out: Path) -> float:
    return json.loads((out / paths.CFG_FILE).read_text())["train"]["train_seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("."), help="a finished run (its config.yaml and store)")
    p.add_argument("--subject", default="tiny")
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--arch", default="topk")
    p.add_argument("--n", type=int, nargs="+", default=[512])
    p.add_argument("--k", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stream", action="store_true", help="stream from disk (train.in_memory_max_gb = 0)")
    a = p.parse_args()

    cfg = load_config(a.run / "config.yaml")
    base, spec = sae_settings(cfg, a.arch)
    if a.stream:
        spec["in_memory_max_gb"] = 0
    common = ["--activations", str(a.run / f"data/activations/{a.subject}.zarr"),
              "--norm", str(a.run / f"data/activations/{a.subject}.norm.json"),
              "--subject", a.subject, "--layer", str(a.layer)]
    members = [{"arch": base, "name": a.arch, "n": n, "k": k, "spec": spec} for n in a.n for k in a.k]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        separate = 0.0
        for m in members:
            out = tmp / "separate" / f"n{m['n']}_k{m['k']}"
            separate += train([*common, "--arch", base, "--name", a.arch, "--n", str(m["n"]), "--k", str(m["k"]),
                               "--spec", json.dumps(spec), "--out-dir", str(out)], a.threads, tmp / "separate.log")
        separate_train = sum(train_seconds(tmp / "separate" / f"n{m['n']}_k{m['k']}") for m in members)
        packed_members = [{**m, "out_dir": str(tmp / "packed" / f"n{m['n']}_k{m['k']}")} for m in members]
        packed = train([*common, "--members", json.dumps(packed_members)], a.threads, tmp / "packed.log")
        packed_train = train_seconds(Path(packed_members[0]["out_dir"]))
        for m in packed_members:
            alone = load_file(tmp / "separate" / Path(m["out_dir"]).name / paths.WEIGHTS_FILE)
            together = load_file(Path(m["out_dir"]) / paths.WEIGHTS_FILE)
            if not all(alone[key].equal(together[key]) for key in alone):
                raise SystemExit(f"n={m['n']} k={m['k']}: packed weights differ from the lone job's")
    tokens = spec["tokens"] * len(members)
    print(json.dumps({"saes": [(m["n"], m["k"]) for m in members], "threads": a.threads,
                      "loader": "streamed" if a.stream else "in RAM", "tokens": tokens,
                      "separate_wall_s": round(separate, 2), "separate_train_loop_s": round(separate_train, 2),
                      "packed_wall_s": round(packed, 2), "packed_train_loop_s": round(packed_train, 2),
                      "speedup": round(separate / packed, 3), "weights_identical": True}))


if __name__ == "__main__":
    main()
