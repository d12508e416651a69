"""Training throughput of saescale against sae-lens and EleutherAI's sparsify: one TopK SAE, same inputs.

    python -m venv benchmarks/.venv-peers
    benchmarks/.venv-peers/bin/pip install torch==2.13.0 sae-lens eai-sparsify   # the peers, kept apart
    python benchmarks/train_throughput.py                                         # ~20 min on 2 cores

One worker process per tool (`throughput_worker.py`; peers run under the peers' venv python) stays alive
for the whole run; for each size the driver asks every tool in turn for a timed measurement, `--repeats`
times, rotating which tool goes first, so drift in the machine's speed hits all tools alike. It reports the
median tokens/s per tool, saescale's ratio to the faster peer, the measured GEMM peak (the encoder's own
[batch, d] x [d, n] product, timed in this process with the same threads) and the achieved rate of each step
in model FLOPs: 2·B·n·d for the dense encoder plus 10·B·k·d for the five products that a sparse
implementation restricts to the k selected latents (method §A.9), the same count for every tool, so a
dense implementation shows a lower rate. Results go to `--out` (JSON) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_PEERS = HERE / ".venv-peers" / "bin" / "python"
DEFAULT_SIZES = ["256:4096", "256:16384", "256:32768", "768:4096", "768:16384", "768:32768"]


class Worker:
    def __init__(self, tool: str, python: str, threads: int, device: str):
        self.tool = tool
        self.proc = subprocess.Popen([python, str(HERE / "throughput_worker.py"), "--tool", tool,
                                      "--threads", str(threads), "--device", device],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        while True:  # skip what a package prints on import (sparsify announces its decoder kernel)
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the {self.tool} worker exited (code {self.proc.wait()}); its error is above")
            if line.startswith("{"):
                return json.loads(line)

    def measure(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def gemm_peak(batch: int, d: int, n: int, device: torch.device, seconds: float = 2.0,
              dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of the encoder's forward product x @ W^T at this shape and dtype (bf16 for autocast runs), best
    of repeated timings, written into one reused output (a fresh [batch, n] output costs page faults that are
    not the GEMM's)."""
    x = torch.randn(batch, d, device=device, dtype=dtype)
    w = torch.randn(n, d, device=device, dtype=dtype)
    out = torch.empty(batch, n, device=device, dtype=dtype)
    best = float("inf")
    torch.mm(x, w.T, out=out)  # warm-up
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(x, w.T, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * batch * d * n / best / 1e9


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def model_flops(batch: int, d: int, n: int, k: int) -> int:
    return 2 * batch * n * d + 10 * batch * k * d


def markdown(rows: list[dict], tools: list[str]) -> str:
    peers = [t for t in tools if t != "saescale"]
    head = ["d", "n"] + [f"{t} tok/s" for t in tools]
    if peers and "saescale" in tools:
        head.append("ratio vs faster peer")
    head += ["GEMM peak GFLOP/s", "saescale GFLOP/s (% of peak)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["d"]), str(r["n"])] + [f"{r['median'][t]:,.0f}" if t in r["median"] else "–" for t in tools]
        if peers and "saescale" in tools:
            cells.append(f"{r['ratio']:.2f}×" if r.get("ratio") else "–")
        ours = r["gflops"].get("saescale")
        cells += [f"{r['gemm_peak_gflops']:.0f}", f"{ours:.0f} ({100 * ours / r['gemm_peak_gflops']:.0f}%)" if ours
                  else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, help="d:n pairs")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="at least this many timed steps per measurement ...")
    p.add_argument("--seconds", type=float, default=4.0, help="... and at least this long")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dead", type=float, default=0.0, help="fraction of latents marked dead, so AuxK runs")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (on CPU too: fast where the CPU has AMX)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tools", nargs="+", default=["saescale", "sparsify", "sae-lens"])
    p.add_argument("--peer-python", default=str(DEFAULT_PEERS),
                   help="python of the venv holding sae-lens and eai-sparsify")
    p.add_argument("--out", default=str(HERE / "out" / "train_throughput.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if any(t != "saescale" for t in a.tools) and not Path(a.peer_python).exists():
        sys.exit(f"--peer-python {a.peer_python} does not exist: create the peers' venv as this file's docstring "
                 "says, or pass --tools saescale")
    workers = {t: Worker(t, sys.executable if t == "saescale" else a.peer_python, a.threads, a.device)
               for t in a.tools}
    rows = []
    try:
        for size in a.sizes:
            d, n = (int(v) for v in size.split(":"))
            req = {"d": d, "n": n, "k": a.k, "batch": a.batch, "dead": a.dead, "bf16": a.bf16, "seed": 0,
                   "warmup": a.warmup, "steps": a.steps, "seconds": a.seconds}
            runs: dict[str, list[float]] = {t: [] for t in a.tools}
            for rep in range(a.repeats):
                order = a.tools[rep % len(a.tools):] + a.tools[:rep % len(a.tools)]
                for tool in order:
                    runs[tool].append(workers[tool].measure(req)["tokens_per_s"])
                    print(f"d={d} n={n} repeat {rep}: {tool} {runs[tool][-1]:,.0f} tok/s", file=sys.stderr)
            median = {t: statistics.median(v) for t, v in runs.items()}
            peers = [median[t] for t in a.tools if t != "saescale"]
            flops = model_flops(a.batch, d, n, a.k)
            rows.append({"d": d, "n": n, "k": a.k, "batch": a.batch, "runs": runs, "median": median,
                         "ratio": median["saescale"] / max(peers) if peers and "saescale" in median else None,
                         "gemm_peak_gflops": gemm_peak(a.batch, d, n, device,
                                                       dtype=torch.bfloat16 if a.bf16 else torch.float32),
                         "gflops": {t: m * flops / a.batch / 1e9 for t, m in median.items()}})
    finally:
        for w in workers.values():
            w.close()
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
            "threads": a.threads, "dtype": "bf16 autocast" if a.bf16 else "fp32", "dead_fraction": a.dead,
            "versions": {t: w.info["version"] for t, w in workers.items()}, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(json.dumps(meta))
    print(markdown(rows, a.tools))


if __name__ == "__main__":
    main()
