"""Latent geometry (method §F.3, F.4, Michaud et al. 2025 Figs 4, 7, 8): the sorted firing-frequency curve
and its slope, and the nearest-neighbour cosine of decoder directions against a random-direction reference.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from scipy import integrate, stats
from torch import Tensor

log = logging.getLogger("saescale.geometry")

NN_THRESHOLDS = (0.9, 0.97)  # method §F.4: near-duplicates; Gemma Scope shows 10-100 latents above 0.97
PAPER_RANK_RANGE = (100, 10_000)  # method §F.3: slope between ranks 10^2 and 10^4
MIN_N_FOR_PAPER_RANGE = 20_000


def firing_frequencies(counts: Tensor | np.ndarray, n_tokens: int) -> np.ndarray:
    """Fraction of eval tokens on which each latent fired (f_j > 0), float64 [n] (method §F.3)."""
    counts = np.asarray(counts.cpu() if isinstance(counts, Tensor) else counts, dtype=np.float64)
    if n_tokens <= 0:
        raise ValueError(f"firing_frequencies: n_tokens must be positive, got {n_tokens}")
    if (counts < 0).any() or (counts > n_tokens).any():
        raise ValueError(
            f"firing_frequencies: counts must lie in [0, n_tokens={n_tokens}], "
            f"got range [{counts.min()}, {counts.max()}]"
        )
    return counts / n_tokens


def default_rank_range(n: int) -> tuple[tuple[int, int], bool]:
    """(rank range, flagged): the paper's [10^2, 10^4] for n >= 2*10^4, else [10^2, n/2] flagged as not
    comparable with the paper (method §F.3 [I]); below n = 800 the range starts at n/8 instead of 100
    so that it still spans a factor of 4."""
    if n >= MIN_N_FOR_PAPER_RANGE:
        return PAPER_RANK_RANGE, False
    return (min(PAPER_RANK_RANGE[0], max(1, n // 8)), n // 2), True


def rank_frequency_fit(freqs: Tensor | np.ndarray, rank_range: tuple[int, int] = PAPER_RANK_RANGE) -> dict:
    """OLS slope of log frequency vs log rank over ranks [lo, hi] (1-based, inclusive) of the alive latents
    sorted by decreasing frequency (method §F.3).

    Both readings of alpha are reported because the paper's mapping is inconsistent with its own model:
    `alpha_paper` = |slope| (how the paper reads Fig 4: slope -0.74 / -0.57 -> alpha ~ 0.5-0.7) and
    `alpha_model` = -slope - 1 (p_i ~ i^-(1+alpha) implies slope = -(1+alpha); negative for the paper's
    slopes). Dead latents (frequency 0) are dropped; if fewer than hi are alive the range is clipped to
    the alive count and `clipped` is set.
    """
    f = np.asarray(freqs.cpu() if isinstance(freqs, Tensor) else freqs, dtype=np.float64)
    lo, hi = rank_range
    if not 1 <= lo < hi:
        raise ValueError(f"rank_frequency_fit: rank_range {rank_range} must satisfy 1 <= lo < hi")
    alive = np.sort(f[f > 0])[::-1]
    hi_used = min(hi, alive.size)
    if hi_used - lo + 1 < 2:
        raise ValueError(
            f"rank_frequency_fit: only {alive.size} alive latents, too few to fit ranks {rank_range}"
        )
    ranks = np.arange(lo, hi_used + 1)
    log_r, log_f = np.log(ranks), np.log(alive[lo - 1 : hi_used])
    slope, intercept = np.polyfit(log_r, log_f, 1)
    resid = log_f - (slope * log_r + intercept)
    r2 = 1.0 - resid.var() / log_f.var() if log_f.var() > 0 else float("nan")
    return {
        "slope": float(slope),
        "intercept": float(intercept),
        "alpha_paper": float(-slope),
        "alpha_model": float(-slope - 1.0),
        "rank_range": [int(lo), int(hi_used)],
        "clipped": hi_used < hi,
        "n_points": int(ranks.size),
        "n_alive": int(alive.size),
        "n_dead": int(f.size - alive.size),
        "r2": float(r2),
    }


def nearest_neighbour_cosines(
    W_dec: Tensor, max_block_elements: int = 1 << 25, dtype: torch.dtype = torch.float32,
    in_place: bool = False,
) -> tuple[Tensor, Tensor]:
    """(nn_i = max_{j != i} cos(d_i, d_j) [n], argmax j [n]) for decoder directions = rows of W_dec [n, d]
    (method §F.4). Rows are processed in blocks so that a block's similarity matrix [b, n] holds at most
    max_block_elements entries (2^25 floats = 128 MB; never the full n x n). Runs on W_dec's device.
    A zero row has cosine 0 with everything. Duplicated rows give exactly 1 (clamped against rounding).
    Memory beside W_dec: a unit-norm copy [n, d] (16 GiB at n = 2^20, d = 4096), none with `in_place`, which
    normalizes W_dec's own rows (for directions the caller owns, e.g. the random reference).
    """
    n = W_dec.shape[0]
    if n < 2:
        raise ValueError(f"nearest_neighbour_cosines: need at least 2 decoder directions, got {n}")
    unit = W_dec.to(dtype)
    norms = unit.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    unit = unit.div_(norms) if in_place else unit / norms
    block = max(1, min(n, max_block_elements // n))
    max_cos = torch.empty(n, dtype=dtype, device=W_dec.device)
    neighbour = torch.empty(n, dtype=torch.long, device=W_dec.device)
    t0, told = time.monotonic(), 0
    for start in range(0, n, block):
        stop = min(start + block, n)
        sims = unit[start:stop] @ unit.T  # [b, n]
        rows = torch.arange(stop - start, device=W_dec.device)
        sims[rows, rows + start] = -math.inf  # j != i
        max_cos[start:stop], neighbour[start:stop] = sims.max(dim=1)
        if 10 * stop // n > told:  # n^2 d products: minutes on a CPU at n = 2^17, so say how far it is
            told = 10 * stop // n
            log.info("nearest neighbours of %d directions: %d%% (%.0f s)", n, 10 * told, time.monotonic() - t0)
    return max_cos.clamp_(-1.0, 1.0), neighbour


def random_reference(
    n: int, d: int, generator: torch.Generator | None = None, max_block_elements: int = 1 << 25,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """nearest_neighbour_cosines of n random unit directions in R^d (isotropic Gaussian rows): the
    reference histogram for a decoder of the same shape (method §F.4). The directions are drawn on the CPU
    (the same ones on any device, for a given generator) and compared on `device`: the n^2 d products are
    what costs (7 min on one CPU thread at n = 2^17, d = 768; about a second on a GPU). They are normalized in
    place: no second [n, d] copy on the device beside the SAE's weights."""
    directions = torch.randn(n, d, generator=generator).to(device)
    return nearest_neighbour_cosines(directions, max_block_elements, in_place=True)


def expected_random_nn_cosine(n: int, d: int) -> float:
    """E[nn_i] for n random unit vectors in R^d, exactly: given d_i, its n-1 cosines are i.i.d. with
    (1 + t)/2 ~ Beta((d-1)/2, (d-1)/2), so E[max] = int_{-1}^{1} (1 - F(t)^(n-1)) dt - 1.
    About 0.13 at n = 4096, d = 768 (method §F.4 [SIM]); sqrt(2 ln n / d) slightly overestimates it."""
    a = (d - 1) / 2

    def tail(t: float) -> float:
        return -math.expm1((n - 1) * stats.beta.logcdf((1 + t) / 2, a, a))

    value, _ = integrate.quad(tail, -1.0, 1.0, points=[0.0, math.sqrt(2 * math.log(n) / d)], limit=200)
    return value - 1.0


def nn_summary(
    max_cos: Tensor,
    neighbour: Tensor,
    alive: Tensor | None = None,
    thresholds: tuple[float, ...] = NN_THRESHOLDS,
    bins: int = 200,
) -> dict:
    """JSON-ready summary of nearest-neighbour cosines (method §F.4): mean/median, count and fraction
    above each threshold, split by whether the latent and its neighbour are alive (Gemma Scope's
    near-duplicates had dead neighbours), and a histogram on [-1, 1] (plot with log counts).
    alive [n] bool: latents that fired on the eval tokens; None (e.g. the random reference) skips the split.
    """
    c = max_cos.detach().double().cpu()
    out = {"n": int(c.numel()), "mean": float(c.mean()), "median": float(c.median()), "thresholds": {}}
    if alive is not None:
        alive = alive.bool().cpu()
        nb_alive = alive[neighbour.cpu()]
        out["n_alive"] = int(alive.sum())
    for th in thresholds:
        above = c > th
        entry = {"count": int(above.sum()), "fraction": float(above.double().mean())}
        if alive is not None:
            for self_name, self_mask in (("alive", alive), ("dead", ~alive)):
                for nb_name, nb_mask in (("alive", nb_alive), ("dead", ~nb_alive)):
                    entry[f"latent_{self_name}_neighbour_{nb_name}"] = int(
                        (above & self_mask & nb_mask).sum()
                    )
        out["thresholds"][str(th)] = entry
    counts = torch.histc(c, bins=bins, min=-1.0, max=1.0)
    out["histogram"] = {
        "edges": torch.linspace(-1.0, 1.0, bins + 1).tolist(),
        "counts": counts.long().tolist(),
    }
    return out


# --------------------------------------------------------------------------- the geometry rule

CURVE_POINTS = 256  # log-spaced ranks stored for the frequency-rank figure


def _curve(freqs: np.ndarray) -> dict:
    alive = np.sort(freqs[freqs > 0])[::-1]
    if alive.size == 0:
        return {"rank": [], "frequency": []}
    ranks = np.unique(np.geomspace(1, alive.size, min(CURVE_POINTS, alive.size)).round().astype(int))
    return {"rank": ranks.tolist(), "frequency": alive[ranks - 1].tolist()}


def geometry_record(W_dec: Tensor, counts: np.ndarray, n_tokens: int, spec: dict) -> dict:
    """Frequency-rank curve and fit (F.3) and decoder nearest-neighbour cosines with the random-direction
    reference (F.4) of one SAE, from its decoder [n, d] and per-latent firing counts on the eval tokens."""
    n, d = W_dec.shape
    freqs = firing_frequencies(counts, n_tokens)
    if spec["rank_range"] is None:
        rank_range, flagged = default_rank_range(n)
    else:
        rank_range, flagged = tuple(spec["rank_range"]), False
    try:
        fit = {**rank_frequency_fit(freqs, rank_range), "flagged": flagged, "error": None}
    except ValueError as exc:
        fit = {"error": str(exc), "flagged": flagged}
    alive = torch.from_numpy(freqs > 0)
    max_cos, neighbour = nearest_neighbour_cosines(W_dec.detach().float())
    gen = torch.Generator().manual_seed(spec["seed"])
    ref_cos, ref_nb = random_reference(n, d, gen, device=W_dec.device)
    return {"eval_tokens": int(n_tokens), "frequency_fit": fit, "frequency_curve": _curve(freqs),
            "nn": nn_summary(max_cos.cpu(), neighbour.cpu(), alive),
            "nn_random": {**nn_summary(ref_cos.cpu(), ref_nb.cpu()), "expected_mean": expected_random_nn_cosine(n, d)}}
