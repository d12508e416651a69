"""What a machine has and what a job needs of it, answered without importing torch.

The workflow asks once per `snakemake` start whether the machine has a GPU torch can use, to give GPU rules
`resources: gpu=1`; `import torch` there cost ~1 s of every start, dry runs included. Reading torch's build
record and the driver's device nodes answers the same question in microseconds. `torch.cuda.is_available()`
stays the authority inside jobs (`saescale.subject.pick_device`); a driver that exposes devices torch then
refuses only makes a job fall back to the CPU.

It also sizes training jobs for a scheduler (workflow/rules/common.smk): the GPU memory a step holds and the
host memory the job holds, from the SAE's width, the batch and the activation store's metadata. The model and
its measurements are in shared/notes/audits/scale.md ("Training in detail").
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from pathlib import Path


def torch_build(torch_dir: Path | None = None) -> dict[str, str | None]:
    """The accelerator versions torch was built for ({"cuda": "12.4", "hip": None}), from torch/version.py."""
    if torch_dir is None:
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.origin is None:
            return {"cuda": None, "hip": None}
        torch_dir = Path(spec.origin).parent
    try:
        text = (torch_dir / "version.py").read_text()
    except OSError:
        return {"cuda": None, "hip": None}
    out: dict[str, str | None] = {}
    for name in ("cuda", "hip"):
        match = re.search(rf"^{name}\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
        out[name] = match[1] if match else None
    return out


def gpu_present(torch_dir: Path | None = None, root: Path = Path("/"),
                environ: dict[str, str] | None = None) -> bool:
    """True when torch is a CUDA (or ROCm) build and the driver exposes a device that CUDA_VISIBLE_DEVICES
    (or HIP_VISIBLE_DEVICES) does not hide."""
    env = os.environ if environ is None else environ
    build = torch_build(torch_dir)
    if build["cuda"]:
        hidden = env.get("CUDA_VISIBLE_DEVICES")
        nodes = list((root / "dev").glob("nvidia[0-9]*"))
    elif build["hip"]:
        hidden = env.get("HIP_VISIBLE_DEVICES", env.get("CUDA_VISIBLE_DEVICES"))
        nodes = [root / "dev/kfd"] if (root / "dev/kfd").exists() else []
    else:
        return False
    if hidden is not None and hidden.strip() in ("", "-1"):
        return False
    return bool(nodes)


# ---- sizing training jobs -----------------------------------------------------------------------------

GIB = 2**30
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
READ_ROWS_PEAK = 2.1  # store.read_rows concatenates a list of chunks: peak RSS 2.03x the data (measured)
STREAM_RING = 3  # saescale.loader.RING: batch buffers in the store's dtype (held, ready, being gathered)
STREAM_GROUPS = 2  # chunk groups the streamed loader maps at once: the one gathered from and the one read ahead
SELECTION_ROWS = 32_768  # sae.train.SELECTION_ROWS: training rows held to choose EMA or raw weights
PREACT_FACTOR = 1.19  # a step's peak over rows * n * (bytes of the forward's dtype), measured (bench_step.py)
ROW_BYTES = 20_000  # the rest of a step's peak per batch row (selections, gradients of x), fitted the same way
STATE_FLOATS = 10  # per weight: W_enc and W_dec, their gradients, Adam's two moments and the EMA, float32
SAVED_FLOATS = 4  # per weight, on the host while an SAE is saved: W_enc and W_dec, and the file safetensors builds
# train.distributed gathers the shards' top-k candidates in chunks of rows of at most this many bytes
# (sae.distributed.global_topk), so S * k_aux candidates per row never take more, whatever the batch
GATHER_BYTES = 2**28
CUDA_CONTEXT_GIB = 2.5  # the CUDA context, the batch on the GPU and kernels' scratch (scale.md)
PROCESS_GIB = {"cuda": 3.0, "cpu": 1.0}  # python, torch (and the CUDA libraries) before any data


def store_attrs(store: str) -> dict:
    """An activation store's root attributes (d_model, dtype, n_train, chunk_rows) from its zarr.json, without
    zarr. Before extraction has written the store, FileNotFoundError names the store itself: a Snakemake
    resource that raises it waits (<TBD>) until the job's input exists."""
    try:
        return json.loads((Path(store) / "zarr.json").read_text())["attributes"]
    except FileNotFoundError:
        raise FileNotFoundError(2, "the activation store is not written yet", store) from None


def forward_bytes(precision: str, device: str) -> int:
    """Bytes per element of the [batch, n] pre-activations: train.precision, whose auto is bf16 on CUDA."""
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "float32"
    return 2 if precision == "bf16" else 4


def train_step_gib(widths: list[int], d_model: int, batch_size: int, act_bytes: int,
                   microbatch: int | None = None) -> float:
    """Peak memory of a training step of the SAEs of one job (one, or a train.pack's members, which step one
    after another on each batch): the widest one's [rows, n] pre-activations, rows being train.microbatch or the
    batch, whatever the dead fraction (AuxK masks them in place; benchmarks/bench_step.py), a per-row term for the
    whole batch, and every member's weights and optimizer state."""
    rows = min(microbatch or batch_size, batch_size)
    pre_acts = PREACT_FACTOR * rows * max(widths) * act_bytes
    state = sum(STATE_FLOATS * n * d_model * 4 for n in widths)
    return (pre_acts + ROW_BYTES * batch_size + state) / GIB


def sharded_step_gib(n: int, d_model: int, batch_size: int, data: int, latent: int, slots: int,
                     act_bytes: int, microbatch: int | None = None) -> float:
    """Peak memory of one process of a train.distributed step (sae/distributed.py): its B/D rows' pre-activations
    over its n/S latents, the per-row term for B/D rows, the candidates all-gathered from the S shards (`slots` =
    k + k_aux values and int64 indices per shard per row, gathered in chunks of rows of at most GATHER_BYTES, with
    the top-k's copy), the reduced decode (two bags, float32), the global batch every rank reads (raw and
    normalized, float32), and its shard of the training state."""
    rows, n_local = batch_size // data, n // latent
    pre_acts = PREACT_FACTOR * min(microbatch or rows, rows) * n_local * act_bytes  # train.microbatch: a block
    gathered = 2 * min(latent * slots * (act_bytes + 8) * rows, GATHER_BYTES) + 2 * 2 * d_model * 4 * rows
    return (pre_acts + ROW_BYTES * rows + gathered + 2 * batch_size * d_model * 4
            + STATE_FLOATS * n_local * d_model * 4) / GIB


def train_gpu_gib(widths: list[int], d_model: int, batch_size: int, act_bytes: int,
                  microbatch: int | None = None, layout: tuple[int, int] = (1, 1), slots: int = 0) -> int:
    """GPU memory a training job needs per GPU, in GiB (what GPU makers call GB: an "80 GB" card holds ~79.6
    GiB). gpt2-small's batch 131,072 at bf16: n = 2^17 needs 47 (an 80 GB card; 28 with train.microbatch 65536, a
    40 GB card), n = 2^16 26. `layout` (data, latent) > 1: one process of a train.distributed job, `slots` its
    k + k_aux."""
    if layout != (1, 1):
        step = sharded_step_gib(max(widths), d_model, batch_size, *layout, slots, act_bytes, microbatch)
    else:
        step = train_step_gib(widths, d_model, batch_size, act_bytes, microbatch)
    return math.ceil(step + CUDA_CONTEXT_GIB)


def in_memory(attrs: dict, in_memory_max_gb: float) -> bool:
    """Whether training holds the train split in RAM: store.batch_stream's rule."""
    return train_split_bytes(attrs) <= in_memory_max_gb * GIB


def train_split_bytes(attrs: dict) -> int:
    return attrs["n_train"] * attrs["d_model"] * DTYPE_BYTES[attrs["dtype"]]


def train_host_gib(attrs: dict, widths: list[int], train: dict, on_gpu: bool) -> float:
    """Host memory a training job holds at its peak, in GiB, for the store `attrs` and the job's train settings
    (batch_size, in_memory_max_gb, shuffle_chunks, heldout_rows, precision). The train split in RAM costs
    read_rows' peak; streamed, it costs the shuffle buffer and the prefetched batches. Without a GPU the
    step's tensors are in RAM too."""
    d, batch = attrs["d_model"], train["batch_size"]
    batch_bytes = batch * d * 4  # batches are float32
    if in_memory(attrs, train["in_memory_max_gb"]):
        stream = READ_ROWS_PEAK * train_split_bytes(attrs) + 2 * batch_bytes
    else:
        item = DTYPE_BYTES[attrs["dtype"]]  # the loader keeps rows in the store's dtype (saescale.loader)
        stream = (STREAM_GROUPS * attrs["chunk_rows"] * train["shuffle_chunks"] + STREAM_RING * batch) * d * item
    rows = 3 * (SELECTION_ROWS + train["heldout_rows"]) * d * 4  # read, cast to float32, normalized
    saving = SAVED_FLOATS * max(widths) * d * 4  # torch.save copies a checkpoint off the GPU a tensor at a time
    device = "cuda" if on_gpu else "cpu"
    step = 0 if on_gpu else train_step_gib(widths, d, batch, forward_bytes(train["precision"], device),
                                           train.get("microbatch"))
    return PROCESS_GIB[device] + step + (stream + rows + saving) / GIB


def mem_mb(gib: float) -> int:
    """A memory request for Snakemake's mem_mb (SLURM reads it as MiB), rounded up to whole GiB."""
    return math.ceil(gib) * 1024


def gpu_constraint(tiers: str, need_gib: float) -> str | None:
    """The node feature (sbatch --constraint) of the smallest card in `tiers` that holds need_gib, from a profile's
    "40:a100, 80:a100_80gb" (GB of the card: its feature); the largest where none does, None for no tiers."""
    table = []
    for entry in filter(None, (e.strip() for e in tiers.split(","))):
        size, sep, feature = entry.partition(":")
        if not sep or not size.strip().isdigit() or not feature.strip():
            raise ValueError(f"gpu_constraints: {entry!r} is not <GB of the card>:<node feature>, e.g. 80:a100_80gb")
        table.append((int(size), feature.strip()))
    if not table:
        return None
    table.sort()
    return next((feature for size, feature in table if size >= need_gib), table[-1][1])
