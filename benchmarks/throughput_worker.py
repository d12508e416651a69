"""One trainer's side of `train_throughput.py`: a long-lived process that times training steps on request.

The driver starts one worker per tool (saescale in this environment; sae-lens and sparsify in the peers'
venv, so their pins never touch ours) and sends it one JSON request per line; the worker answers one JSON
line per request. Keeping the process alive lets the driver alternate tools between repeats without paying
each package's import time again, and builds every model once per size.

Every tool trains the same thing: a TopK SAE with AuxK on the same inputs (a bank of unit-norm Gaussian
batches drawn from one seed, identical across processes because the torch build is the same), with
torch.optim.Adam, decoder rows kept at unit norm the way the tool itself does it, in fp32 (or under bf16
autocast when asked, on CPU or CUDA). The request says how many latents to mark dead, so the AuxK path runs
in every tool.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable

import torch

BANK = 4  # distinct input batches cycled through the timed steps


def data_bank(d: int, batch: int, seed: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(BANK):
        x = torch.randn(batch, d, generator=g)
        out.append((x / x.norm(dim=1, keepdim=True)).to(device))
    return out


def dead_mask(n: int, fraction: float, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device) < int(fraction * n)


# ---- one step function per tool: build(d, n, k, batch, dead, device) -> step(x) ---------------------------
def saescale_step(d: int, n: int, k: int, batch: int, dead: torch.Tensor, device: torch.device,
                  autocast) -> Callable[[torch.Tensor], None]:
    from saescale.config import k_aux_for
    from saescale.sae.model import SparseAutoencoder
    from saescale.sae.train import TrainSpec, adam, retain_freed_memory, training_step

    sae = SparseAutoencoder(d, n, "topk", k)
    sae.init_from_data_(torch.zeros(d))
    sae.to(device)
    opt = adam(sae.parameters(), 1e-4, eps=6.25e-10)  # as train_sae builds them
    if device.type == "cpu":
        retain_freed_memory()
    sae.project_decoder_grad_ = labelled(sae.project_decoder_grad_, "projection")
    sae.normalize_decoder_ = labelled(sae.normalize_decoder_, "projection")
    k_aux = min(k_aux_for({"k_aux": None}, d), n)  # as cmd_train derives it (method §A.5)
    spec = TrainSpec("topk", n, k, d, 1e-4, batch, batch, 6.25e-10, (0.9, 0.999), 1 / 32, k_aux, 10**9, 0.0,
                     1, 0, 0, str(device))

    auxk = bool(dead.any())  # the trainer skips AuxK while it knows (host-side) that no latent is dead

    def step(x: torch.Tensor) -> None:
        training_step(sae, opt, x, 1.0, dead, spec, autocast, auxk=auxk)

    return step


def sparsify_step(d: int, n: int, k: int, batch: int, dead: torch.Tensor, device: torch.device,
                  autocast) -> Callable[[torch.Tensor], None]:
    """sparsify's own trainer body (sparsify/trainer.py): fvu + auxk_alpha * auxk_loss, gradient projection,
    step, renormalize. Its default optimizer is signum; Adam here so every tool does the same update."""
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device=device, dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, eps=6.25e-10)

    def step(x: torch.Tensor) -> None:
        with autocast:
            out = sae(x, dead_mask=dead)
            loss = out.fvu + (1 / 32) * out.auxk_loss
        loss.backward()
        with torch.profiler.record_function("phase: projection"):
            sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.profiler.record_function("phase: projection"):
            sae.set_decoder_norm_to_unit_norm()

    return step


def saelens_step(d: int, n: int, k: int, batch: int, dead: torch.Tensor, device: torch.device,
                 autocast) -> Callable[[torch.Tensor], None]:
    """sae-lens's training SAE with its defaults (TopKTrainingSAE.training_forward_pass: MSE + AuxK) and the
    body of SAETrainer._train_step around it: backward, gradient-norm clip, step."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    cfg = TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, device=str(device), dtype="float32")
    sae = TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, eps=6.25e-10)

    def step(x: torch.Tensor) -> None:
        with autocast:
            out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                           n_training_steps=0, is_logging_step=False))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)  # SAETrainer._train_step does this every step
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def retain_heap() -> None:
    """glibc keeps freed memory instead of unmapping every block over 32 MB (saescale.sae.train.
    retain_freed_memory, which the peers' venv cannot import): fresh [B, n] tensors then cost no page
    faults."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-4, 0)  # M_MMAP_MAX
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD


def sparsify_heap_step(*args) -> Callable[[torch.Tensor], None]:
    """sparsify's step in a process whose heap keeps freed memory, as saescale's does: what sparsify's step
    costs without the page faults of its fresh [B, n] and [n, d] tensors (a diagnostic, not sparsify's
    default)."""
    retain_heap()
    return sparsify_step(*args)


TOOLS = {"saescale": saescale_step, "sparsify": sparsify_step, "sae-lens": saelens_step,
         "sparsify-heap": sparsify_heap_step}


def time_steps(step: Callable[[torch.Tensor], None], bank: list[torch.Tensor], min_steps: int,
               min_seconds: float, device: torch.device) -> tuple[int, float, float]:
    """Run at least `min_steps` steps and at least `min_seconds`; return (steps, seconds, CPU seconds of this
    process: on a loaded machine its threads wait for a core, which wall time counts and CPU time does
    not)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0, steps = time.perf_counter(), time.process_time(), 0
    while steps < min_steps or time.perf_counter() - t0 < min_seconds:
        step(bank[steps % len(bank)])
        steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return steps, time.perf_counter() - t0, time.process_time() - c0


def _context(name: str) -> str | None:
    if name.startswith("autograd::engine::evaluate_function:"):
        return name.split(": ", 1)[-1].strip()
    if name.startswith("Optimizer.step"):
        return "optimizer"
    if name.startswith("phase: "):
        return name[len("phase: "):]
    return None


def labelled(fn: Callable, label: str) -> Callable:
    """fn inside a profiler range "phase: label" (profile_steps sorts its ops under that label)."""
    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(f"phase: {label}"):
            return fn(*args, **kwargs)
    return wrapped


def profile_steps(step: Callable[[torch.Tensor], None], bank: list[torch.Tensor], steps: int) -> dict:
    """Self CPU time (ms per step) of every op of `steps` steps under torch.profiler, keyed by
    "context|op|big": context is the autograd backward node the op ran under (or "optimizer" inside
    Optimizer.step, else "forward"), big is 1 for products of >= 1 GFLOP (the encoder GEMM at the sizes
    benchmarked). The driver (`profile_step.py`) sorts these into the parts of a step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for i in range(steps):
            step(bank[i % len(bank)])
    out: dict[str, float] = {}
    for ev in prof.events():
        ctx, node = None, ev
        while ctx is None and node is not None:  # the innermost labelled range
            ctx, node = _context(node.name), node.cpu_parent
        ctx = ctx or "forward"
        key = f"{ctx}|{ev.name}|{int((ev.flops or 0) >= 1e9)}"
        out[key] = out.get(key, 0.0) + ev.self_cpu_time_total / 1e3 / steps
    return out


def version(tool: str) -> str:
    from importlib.metadata import version as v

    return v({"saescale": "saescale", "sparsify": "eai-sparsify", "sparsify-heap": "eai-sparsify",
              "sae-lens": "sae-lens"}[tool])


def serve(tool: str, threads: int, device: torch.device) -> None:
    torch.set_num_threads(threads)
    build = TOOLS[tool]
    built_for, step, bank = None, None, None
    print(json.dumps({"ready": tool, "version": version(tool), "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        key = (req["d"], req["n"], req["k"], req["batch"], req["dead"], req["bf16"], req["seed"])
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=req["bf16"])
        if key != built_for:
            step = bank = None  # free the previous size first: the largest SAE and its Adam state are ~1 GB
            bank = data_bank(req["d"], req["batch"], req["seed"], device)
            step = build(req["d"], req["n"], req["k"], req["batch"], dead_mask(req["n"], req["dead"], device),
                         device, autocast)
            time_steps(step, bank, req["warmup"], 0.0, device)
            built_for = key
        if req.get("profile"):
            profiled = profile_steps(step, bank, req["profile"])
            print(json.dumps({"tool": tool, "profile": profiled}), flush=True)
            continue
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        steps, seconds, cpu_seconds = time_steps(step, bank, req["steps"], req["seconds"], device)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults  # pages first touched
        print(json.dumps({"tool": tool, "steps": steps, "seconds": seconds, "cpu_seconds": cpu_seconds,
                          "page_faults_per_step": faults / steps,
                          "tokens_per_s": req["batch"] * steps / seconds}),
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tool", choices=sorted(TOOLS), required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    serve(a.tool, a.threads, torch.device(a.device))


if __name__ == "__main__":
    main()
