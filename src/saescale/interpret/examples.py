"""Activating examples of SAE latents, read from the activation store: the material N2G explanations,
LLM autointerp and the feature dashboards are built from (method §C.5).

Codes are kept as one sparse [tokens, n] matrix, so every latent's activations are a column slice and
examples for all n latents (needed by the explanation reconstruction, C.6) cost one pass.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
import zarr

from saescale.normalize import normalize
from saescale.store import split_rows

HIST_BINS = 30


class Codes(NamedTuple):
    """Token windows [W, S] of one split and the SAE's codes on them as CSC [W*S, n] (row-major)."""

    windows: np.ndarray
    acts: sp.csc_matrix


@torch.no_grad()
def encode_split(sae, root: zarr.Group, layer: int, split: str, n_windows: int, batch_rows: int,
                 device: torch.device) -> Codes:
    """The first `n_windows` whole windows of a split (the splits hold windows in random order) and their
    codes, encoded in batches; only nonzero activations are kept."""
    ctx = root.attrs["ctx_len"]
    rows = split_rows(root, split)
    W = min(n_windows, (rows.stop - rows.start) // ctx)
    stop = rows.start + W * ctx
    x, parts = root[f"L{layer}/x"], []
    for i in range(rows.start, stop, batch_rows):
        raw = torch.from_numpy(x[i:min(i + batch_rows, stop)].astype(np.float32)).to(device)
        parts.append(_sparse_rows(sae.encode(normalize(raw)[0]), sae.n_latents))
    acts = sp.vstack(parts).tocsc() if parts else sp.csc_matrix((0, sae.n_latents), dtype=np.float32)
    windows = root["token"][rows.start:stop].reshape(W, ctx).astype(np.int64)
    return Codes(windows, acts)


def _sparse_rows(latents, n: int) -> sp.csr_matrix:
    """CSR [rows, n] of an SAE code (`Latents`) with only its nonzeros leaving the device: the TopK family's
    k (index, value) pairs per row as they are, a dense code's nonzeros found where it lives. Copying the dense
    block to the host and converting it there moved 128 MB per 256 rows at n = 2^17 for k = 32 nonzeros a row."""
    if latents.indices is None:
        rows, cols = latents.values.nonzero().unbind(1)
    else:
        rows = torch.arange(latents.values.shape[0], device=latents.values.device)[:, None].expand_as(latents.indices)
        cols = latents.indices
    values = latents.values if latents.indices is not None else latents.values[rows, cols]
    keep = values != 0  # a selected latent whose ReLU is 0 is inactive
    if latents.indices is not None:
        rows, cols, values = rows[keep], cols[keep], values[keep]
    shape = (latents.values.shape[0], n)
    return sp.csr_matrix((values.float().cpu().numpy(), (rows.cpu().numpy(), cols.cpu().numpy())), shape=shape)


def column(acts: sp.csc_matrix, latent: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, values) where the latent fires."""
    lo, hi = acts.indptr[latent], acts.indptr[latent + 1]
    return acts.indices[lo:hi], acts.data[lo:hi]


def dense_column(codes: Codes, latent: int) -> np.ndarray:
    """The latent's activation at every token, [W, S] float32."""
    out = np.zeros(codes.windows.size, dtype=np.float32)
    rows, vals = column(codes.acts, latent)
    out[rows] = vals
    return out.reshape(codes.windows.shape)


def sample_latents(acts: sp.csc_matrix, count: int, seed: int) -> np.ndarray:
    """Up to `count` alive latents (fired at least once), uniformly, sorted."""
    alive = np.flatnonzero(np.diff(acts.indptr) > 0)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(alive, size=min(count, alive.size), replace=False))


SAMPLINGS = ("random", "top_and_random")


def n2g_picks(vals: np.ndarray, n_build: int, n_holdout: int, rng: np.random.Generator, sampling: str = "random"
              ) -> tuple[np.ndarray, np.ndarray]:
    """(build, holdout) indices into a latent's nonzero activations `vals`, disjoint.

    "random" (default): a uniformly random sample of up to n_build nonzero activations builds the explanation
    and up to n_holdout others measure recall (Gao et al. §4.3; method §C.5: "a random sample of up to 16
    nonzero activations to build the graph, and another 16 as true positives for computing recall").
    "top_and_random": the top n_build // 2 activations plus random others build it, the reading of the released
    `explanations.py` (method §C.5); max-activating contexts give more specific patterns, so precision rises
    and recall on random positives falls. Both sample per activation, not per document.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"config.interpret.sampling: {sampling!r} is not one of {', '.join(SAMPLINGS)}")
    if sampling == "random":
        order = rng.permutation(vals.size)
        return order[:n_build], order[n_build:n_build + n_holdout]
    order = np.argsort(-vals, kind="stable")
    n_top = n_build // 2
    top, rest = order[:n_top], rng.permutation(order[n_top:])
    return np.concatenate([top, rest[:n_build - n_top]]), rest[n_build - n_top:n_build - n_top + n_holdout]


def n2g_examples(codes: Codes, latent: int, n_build: int, n_holdout: int, rng: np.random.Generator,
                 sampling: str = "random") -> tuple[list, list]:
    """(build, holdout) lists of (window tokens [S], position, activation) for N2G (method §C.5), chosen by
    `n2g_picks`: the holdout examples, on which recall is measured, never built the explanation."""
    rows, vals = column(codes.acts, latent)
    build, holdout = n2g_picks(vals, n_build, n_holdout, rng, sampling)
    S = codes.windows.shape[1]

    def as_examples(picks: np.ndarray) -> list:
        return [(codes.windows[rows[i] // S], int(rows[i] % S), float(vals[i])) for i in picks]

    return as_examples(build), as_examples(holdout)


def _context(codes: Codes, acts_w: np.ndarray, row: int, before: int, after: int, strings) -> dict:
    S = codes.windows.shape[1]
    w, p = divmod(int(row), S)
    lo, hi = max(0, p - before), min(S, p + after + 1)
    return {"tokens": [strings(int(t)) for t in codes.windows[w, lo:hi]],
            "acts": [round(float(a), 4) for a in acts_w[w, lo:hi]], "center": p - lo,
            "activation": round(float(acts_w[w, p]), 4), "window": w, "position": p}


def latent_card(codes: Codes, latent: int, strings, n_top: int, context: tuple[int, int],
                rng: np.random.Generator) -> dict:
    """A latent's dashboard material: frequency, activation statistics and histogram, top / random
    activating contexts and contexts where it does not fire (autointerp's negatives)."""
    rows, vals = column(codes.acts, latent)
    dense = dense_column(codes, latent)
    before, after = context
    top = rows[np.argsort(-vals, kind="stable")[:n_top]]
    rand = rng.choice(rows, size=min(n_top, rows.size), replace=False) if rows.size else rows
    quiet = np.flatnonzero(dense.max(axis=1) == 0)  # windows where it never fires
    neg_w = rng.choice(quiet, size=min(n_top, quiet.size), replace=False) if quiet.size else quiet
    S = codes.windows.shape[1]
    neg_rows = neg_w * S + rng.integers(min(before, S - 1), S, size=neg_w.size)  # a full context before it
    counts, edges = np.histogram(vals, bins=HIST_BINS) if vals.size else (np.zeros(0), np.zeros(1))
    return {
        "latent": int(latent),
        "frequency": float(rows.size / codes.windows.size),
        "max_activation": float(vals.max()) if vals.size else 0.0,
        "mean_activation": float(vals.mean()) if vals.size else 0.0,
        "histogram": {"edges": edges.tolist(), "counts": counts.astype(int).tolist()},
        "top_examples": [_context(codes, dense, r, before, after, strings) for r in top],
        "random_examples": [_context(codes, dense, r, before, after, strings) for r in rand],
        "negative_examples": [_context(codes, dense, r, before, after, strings) for r in neg_rows],
    }
