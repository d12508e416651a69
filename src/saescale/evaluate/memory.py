"""Device memory of the stages that hold a trained SAE (evaluate, probes, ablation, geometry, interpret,
analyses) when the SAE is large, e.g. one trained across several GPUs (method §A.7b) and consolidated into one
ordinary SAE folder that each later stage loads whole onto one device.

Beside the float32 weights, 8·n·d bytes (W_enc and W_dec, method §A.3), what grows with n is a forward's
[rows, n] pre-activations and the activation's temporaries. Every stage therefore runs its SAE forwards in
blocks of rows (`row_blocks`) so that no [rows, n] tensor holds more than FORWARD_ELEMENTS elements, and keeps
codes as (value, latent) slots (`encode_slots`), never as a dense [rows, n] matrix across blocks. A row's code
does not depend on the other rows, so blocking changes no code; sums over rows change only by float summation
order. `stage_bytes` gives each stage's peak as a formula (the README's table of large SAEs).
"""

from __future__ import annotations

import torch

from saescale.sae.activations import Latents

# Largest [rows, n] tensor one SAE forward of an evaluation stage makes: 2^30 elements, 4 GiB in float32. At
# n <= 2^17 the default batches (evaluate.batch_size 8192) stay whole; at n = 2^20 a forward takes 1024 rows.
FORWARD_ELEMENTS = 2**30

# Peak bytes per element of [rows, n] while one evaluation forward runs with its per-row statistics: the
# pre-activations, the activation's temporaries (gated: both paths and their product) and, for codes of
# varying support, Latents.l0's bool-to-int64 count over [rows, n]. Measured on the CPU with torch 2.13 (the
# reconstruction metrics at rows = 512, n = 8192; tests/test_large_sae_stages.py measures them again).
FORWARD_BYTES = {"topk": 4.5, "multitopk": 4.5, "batchtopk": 17.5, "relu": 12.5, "relu_dn": 12.5,
                 "prolu": 14.5, "gated": 21.5, "jumprelu": 13.5, "jumprelu_tanh": 13.5}
JUMP_CODE_BYTES = 4 + 1 + 8  # progressive's test-time JumpReLU code of ReLU'd scores, its mask, its L0 count
SLOT_BYTES = 12  # a code slot: a float32 value and an int64 latent index
NN_BLOCK_ELEMENTS = 2**25  # evaluate.geometry.nearest_neighbour_cosines' default block of cosines


def forward_rows(n_latents: int, requested: int) -> int:
    """Rows per SAE forward: `requested`, unless [rows, n_latents] would exceed FORWARD_ELEMENTS."""
    return max(1, min(requested, FORWARD_ELEMENTS // n_latents))


def row_blocks(x: torch.Tensor, n_latents: int) -> tuple[torch.Tensor, ...]:
    """x [rows, d] split into blocks of `forward_rows` rows (views, no copy)."""
    return x.split(forward_rows(n_latents, max(len(x), 1)))


def coo_slots(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_rows: int) -> Latents:
    """The slot code [n_rows, m] of a code's nonzeros (rows, cols, values), given sorted by (row, col): each
    row's latents in increasing order, then padding slots of value 0, m being the widest row's count (at least
    1). Padding slots take latents below m that the row does not use, so no latent repeats within a row (a
    repeat would let `Latents.dense` overwrite a value with a padding zero)."""
    device = values.device
    count = torch.bincount(rows, minlength=n_rows)
    width = max(int(count.max()) if count.numel() else 0, 1)
    slot = torch.arange(rows.numel(), device=device) - (count.cumsum(0) - count)[rows]
    out_values = values.new_zeros(n_rows, width)
    out_values[rows, slot] = values
    # at most count[r] of the latents 0..m-1 are the row's own: at least m - count[r] are free for padding
    taken = torch.zeros(n_rows, width + 1, dtype=torch.bool, device=device)
    taken[rows, cols.clamp_max(width)] = True
    free = ~taken[:, :width]
    target = count[:, None] + free.cumsum(1) - 1  # each free latent's slot, by its rank among the free
    pad_rows, pad_latents = (free & (target < width)).nonzero().unbind(1)
    indices = torch.empty(n_rows, width, dtype=torch.long, device=device)
    indices[pad_rows, target[pad_rows, pad_latents]] = pad_latents
    indices[rows, slot] = cols
    return Latents(out_values, indices)


def _nonzeros(dense: torch.Tensor, first_row: int = 0) -> tuple[torch.Tensor, ...]:
    rows, cols = (dense != 0).nonzero().unbind(1)  # row-major: sorted by (row, col)
    return rows + first_row, cols, dense[rows, cols]


def slot_code(latents: Latents) -> Latents:
    """A code as (values, indices) slots: a TopK-style code as it is; a dense code's nonzeros per row in
    increasing latent order (`coo_slots`), so samplers that walk the nonzeros see them in the dense order."""
    if latents.indices is not None:
        return latents
    return coo_slots(*_nonzeros(latents.values), latents.values.shape[0])


@torch.no_grad()
def encode_slots(sae, x: torch.Tensor) -> Latents:
    """The SAE's code of x [rows, d] as slots [rows, m] (`slot_code`), encoded in `row_blocks`: at most one
    block's [rows, n] pre-activations exist at a time, and what is kept is rows * m slots, not rows * n
    values."""
    slots, nonzeros, start = [], [], 0
    for xb in row_blocks(x, sae.n_latents):
        latents = sae.encode(xb)
        if latents.indices is not None:
            slots.append(latents)
        else:
            nonzeros.append(_nonzeros(latents.values, start))
        start += len(xb)
    if slots:
        return Latents(torch.cat([s.values for s in slots]), torch.cat([s.indices for s in slots]))
    rows, cols, values = (torch.cat(part) for part in zip(*nonzeros))
    return coo_slots(rows, cols, values, len(x))


# ---- each stage's peak device memory ----------------------------------------------------------------------

def weight_bytes(n: int, d: int) -> int:
    """The float32 SAE on the device: W_enc, W_dec [n, d], b_enc [n], b_pre [d] (an arch's own [n] vectors,
    thresholds or gates, add a few n more)."""
    return 4 * (2 * n * d + n + d)


def forward_bytes(n: int, rows: int, arch: str = "topk") -> float:
    """Peak of one inference forward over `rows` rows, in blocks of `forward_rows`."""
    return FORWARD_BYTES[arch] * forward_rows(n, rows) * n


def stage_bytes(n: int, d: int, arch: str = "topk", l0: int = 32, ctx_len: int = 64,
                batch_size: int = 8192, downstream_batch: int = 32, probe_windows: int = 512,
                probe_texts: int = 0, ablation_windows: int = 256, interpret_batch: int = 1024,
                refine_support: int | None = None) -> dict[str, float]:
    """Peak device bytes of each stage holding one SAE of n latents on inputs of width d, beside the subject
    model and its logits (evaluate, ablation, interpret and the refinement's delta CE load it) and the CUDA
    context. Defaults are the schema's (tests/test_large_sae_stages.py checks them); `l0` is the code's width
    in slots (k for TopK; the widest row's L0 for a dense code), `refine_support` that of refinement's
    supports, `probe_texts` the texts of evaluate.probes.datasets (up to max_examples each; 0: none).

    The terms (method §C.1-C.9, F.3-F.4): the weights; one blocked forward (`forward_bytes`); codes kept as
    slots (SLOT_BYTES each); geometry's normalized copy of the decoder (or of the random reference, normalized
    in place) and two [block, n] blocks of cosines (the next is made while the last is still held); probes'
    float64 column blocks (6 temporaries of 2^24 elements, probes.py), the rows x_raw, x_norm and their train
    and test copies, and user tasks' pooled [texts, n] codes; the explanation reconstruction's dense
    simulated codes of one row block; progressive's thresholds sample [2048, n], or its scores beside the
    trained code or a test-time JumpReLU code; refinement's gathered [B, m, d] decoder rows and [B, m, m]
    float64 Grams."""
    w = weight_bytes(n, d)
    half = probe_windows * ctx_len // 2  # probe rows that fit (even windows), as many that test
    refine_rows = forward_rows(n, 1024)  # analyses.REFINE_BATCH
    m = refine_support or l0
    downstream = forward_bytes(n, downstream_batch * ctx_len, arch)
    return {
        "evaluate": w + max(forward_bytes(n, batch_size, arch), downstream),
        "probes": w + forward_bytes(n, half, arch) + 2 * half * l0 * SLOT_BYTES + 6 * 2**24 * 8
        + 4 * 2 * half * d * 4 + probe_texts * n * 4,
        "ablation": w + forward_bytes(n, ablation_windows * ctx_len, arch)
        + ablation_windows * ctx_len * (l0 * SLOT_BYTES + 3 * d * 4),
        "geometry": w + max(forward_bytes(n, batch_size, arch), 4 * n * d + 2 * 4 * NN_BLOCK_ELEMENTS),
        # interpret.stage: encode_split's blocks, N2G's act_fn batches, C.6's 32 windows a pass (the SAE's own
        # forward, or one block of dense simulated codes)
        "interpret": w + max(forward_bytes(n, max(256, 2**24 // n), arch),
                             forward_bytes(n, interpret_batch, arch), forward_bytes(n, 32 * ctx_len, arch),
                             4 * forward_rows(n, 32 * ctx_len) * n),
        "progressive": w + max(4 * 2048 * n,  # analyses.progressive's sample of scores for the thresholds
                               forward_rows(n, 4096) * n * (4 + max(FORWARD_BYTES[arch], JUMP_CODE_BYTES))),
        "refinement": w + max(downstream, forward_bytes(n, refine_rows, arch)
                              + refine_rows * m * (d * 4 + 4 * m * 8)),
    }
