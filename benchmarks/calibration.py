"""Matched sparsity: does every penalty arch land on its target L0? (method §B, README "Dead latents, N2G and
matched sparsity").

    python benchmarks/calibration.py --run . --n 512 --targets 2 4 8 16 32 64 128   # after a default run
    python benchmarks/calibration.py --run . --configfile workflow/configs/quick.yaml --n 128 --targets 2 4 8 16 32

The penalty archs (ReLU, ReLU with decoder norms, ProLU, Gated, JumpReLU, JumpReLU-tanh) calibrate λ to a target
L0 (the grid's k) during the first `train.calibration.fraction` of training, then freeze it. This trains each of
them at every target through the workflow itself (Snakemake, the run's own config and activations, evaluation on
the eval split), then prints eval L0 / target per arch and target, marking with ⚠ every SAE more than
`report.comparison.L0_TOLERANCE` (15%) off, the tolerance the report flags. The grid goes into a config file under
`benchmarks/out/` that extends the run's config (`base:`), so the run's own SAEs and config are left alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from saescale import paths
from saescale.config import load_config
from saescale.report.comparison import L0_TOLERANCE, l0_offset

PENALTY_ARCHS = ["relu", "relu_dn", "prolu", "gated", "jumprelu", "jumprelu_tanh"]
OFF = {"evaluate": {"probes": {"enabled": False}, "ablation": {"enabled": False}, "geometry": {"enabled": False}},
       "interpret": {"enabled": False}, "analysis": {"progressive": {"n": []}, "refinement": {"n": []}},
       "scaling": {"lr_sweep": {"enabled": False}}}


def calibration_config(base: Path, archs: list[str], n: int, targets: list[int]) -> dict:
    """The run's config with its grid replaced by (archs × n × targets) and the suite off: only train + evaluate."""
    return {"base": str(base.resolve()), "sweep": {"archs": archs, "n": [n], "k": targets, "extra": [], "variants": {}},
            **OFF}


def table(evals: dict[tuple[str, int], float | None], archs: list[str], targets: list[int]) -> str:
    """Markdown: eval L0 / target, ⚠ beyond L0_TOLERANCE, blank where the SAE has no eval record."""
    lines = ["| arch | " + " | ".join(map(str, targets)) + " |", "|---|" + "---|" * len(targets)]
    for arch in archs:
        cells = []
        for k in targets:
            l0 = evals.get((arch, k))
            miss = l0 is not None and abs(l0_offset(l0, k)) > L0_TOLERANCE
            cells.append("" if l0 is None else f"{l0 / k:.2f}" + (" ⚠" if miss else ""))
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=Path("."), help="the run's directory (its activations are reused)")
    p.add_argument("--configfile", type=Path, help="the run's config (default: <run>/config.yaml)")
    p.add_argument("--n", type=int, default=512, help="latents of every SAE")
    p.add_argument("--targets", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 128], help="target L0 values")
    p.add_argument("--archs", nargs="+", default=PENALTY_ARCHS)
    p.add_argument("--cores", default="all")
    a = p.parse_args()
    run = a.run.resolve()
    base = (a.configfile or run / "config.yaml").resolve()
    out = run / "benchmarks/out"
    out.mkdir(parents=True, exist_ok=True)
    preset = out / "calibration.yaml"
    preset.write_text(yaml.safe_dump(calibration_config(base, a.archs, a.n, a.targets), sort_keys=False))
    cfg = load_config(preset, local_paths=False)
    subject = next(iter(cfg["subjects"]))
    layer = cfg["subjects"][subject]["layers"][0]
    jobs = [dict(subject=subject, layer=layer, arch=arch, n=a.n, k=k) for arch in a.archs for k in a.targets]
    targets = [paths.fmt(paths.EVAL, **job) for job in jobs]
    subprocess.run([sys.executable, "-m", "snakemake", *targets, "--cores", str(a.cores), "--configfile", str(preset)],
                   cwd=run, check=True)
    evals = {(job["arch"], job["k"]): json.loads((run / t).read_text())["l0"] for job, t in zip(jobs, targets)}
    md = table(evals, a.archs, a.targets)
    (out / "calibration.json").write_text(json.dumps(
        {"subject": subject, "layer": layer, "n": a.n, "config": str(base),
         "l0": [{"arch": arch, "k": k, "eval_l0": l0} for (arch, k), l0 in evals.items()]}, indent=1))
    print(f"eval L0 / target at n = {a.n} ({subject}, layer {layer}):\n{md}")


if __name__ == "__main__":
    main()
