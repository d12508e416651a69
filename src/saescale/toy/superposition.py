"""Synthetic superposition with ground truth (method §F.0, F.2): activations x = sum_i S_i f_i drawn from a
known dictionary, SAEs trained on them with the pipeline's own loop, and a count of the features they find.

The data model. m features in R^d (m > d: superposition). Feature i (rank i, most frequent first) is active
in a row independently with probability p_i ∝ i^-(1+alpha), scaled so that sum_i p_i is the chosen mean L0
(p_i clipped at 1; the scale is solved with the clip in place). A discrete feature contributes
a_i * u_i: a unit atom u_i times a magnitude a_i. A manifold feature (`manifold_ranks`) contributes
a_i * S_i f_i: S_i [d, d_i] an orthonormal basis of a random d_i-dimensional subspace, f_i uniform on the
unit sphere S^(d_i - 1). Magnitudes a_i: "uniform" U(0.5, 1.5) (the default, as tests/test_ground_truth.py:
bounded away from 0, so an active feature is never lost in the others' noise), "exponential" Exp(1) (a heavy
lower tail of faint activations), or "constant" 1 (manifold rows lie exactly on the sphere).

The pipeline normalizes every row (method §A.2: subtract the mean over d, scale to unit norm). Every
atom and every subspace is drawn inside the centred hyperplane sum_j x_j = 0, so a row's mean over d is
already 0 and normalization only rescales it: the directions an SAE can learn are the dictionary's own.

The allocation model (F.0) says an SAE of N latents gives one latent to each of the N most frequent
discrete features (D(N) = N), and that a manifold whose loss keeps falling as latents tile it takes
n_i > 1 latents away from rarer discrete features. `groundtruth_study` trains SAEs over a grid of N on a
purely discrete dictionary and on one whose most frequent features are manifolds, and compares.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from saescale.normalize import layer_stats, normalize
from saescale.sae.archs import ARCHS
from saescale.sae.losses import normalized_mse
from saescale.sae.model import SparseAutoencoder
from saescale.sae.train import TrainSpec, train_sae
from saescale.store import InMemoryBatches

log = logging.getLogger("saescale.toy.superposition")

MAGNITUDES = ("uniform", "exponential", "constant")
CHUNK_ROWS = 65536  # rows drawn per chunk: chunk c of stream s comes from rng(seed, s, c), whatever the total
TRAIN_STREAM, EVAL_STREAM = 0, 1  # training and held-out rows are independent draws of the same law


# ---- the dictionary ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSpec:
    d: int = 32  # ambient dimension
    m: int = 512  # number of features (m > d: superposition)
    alpha: float = 0.2  # p_i ∝ i^-(1+alpha); see DEFAULT_SETTINGS for why not Michaud's 0.5
    mean_active: float = 1.0  # expected number of active features per row (mean L0 of the data)
    manifold_ranks: tuple[int, ...] = ()  # 1-based frequency ranks that are manifolds; (1,): the most frequent
    manifold_dim: int = 3  # d_i of each manifold: f_i on S^(d_i - 1)
    magnitude: str = "uniform"  # "uniform" U(0.5, 1.5), "exponential" Exp(1), "constant" 1
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "manifold_ranks", tuple(int(r) for r in self.manifold_ranks))
        if self.d < 2:
            raise ValueError(f"d: {self.d} leaves no centred direction (need d >= 2)")
        if self.m < 1:
            raise ValueError(f"m: {self.m} must be at least 1")
        if self.alpha < 0:
            raise ValueError(f"alpha: {self.alpha} must be >= 0")
        if not 0 < self.mean_active <= self.m:
            raise ValueError(f"mean_active: {self.mean_active} must lie in (0, m={self.m}]")
        bad = [r for r in self.manifold_ranks if not 1 <= r <= self.m]
        if bad or len(set(self.manifold_ranks)) != len(self.manifold_ranks):
            raise ValueError(f"manifold_ranks: {list(self.manifold_ranks)} must be distinct ranks in 1..m={self.m}")
        if self.manifold_ranks and not 2 <= self.manifold_dim <= self.d - 1:
            raise ValueError(f"manifold_dim: {self.manifold_dim} must lie in 2..d-1={self.d - 1}")
        if self.magnitude not in MAGNITUDES:
            raise ValueError(f"magnitude: '{self.magnitude}' is not one of {list(MAGNITUDES)}")


@dataclass
class Dictionary:
    """Ground truth: frequencies p [m] (rank order), unit atoms [m, d] (the discrete features' directions;
    for a manifold feature the first column of its basis, unused), and the manifold bases by feature index
    (0-based) [d, d_i]. Everything lies in the centred hyperplane."""

    spec: SyntheticSpec
    p: np.ndarray  # [m]
    atoms: np.ndarray  # [m, d]
    subspaces: dict[int, np.ndarray] = field(default_factory=dict)  # feature index -> [d, d_i]

    @property
    def m(self) -> int:
        return len(self.p)

    @property
    def is_manifold(self) -> np.ndarray:  # [m] bool
        mask = np.zeros(self.m, dtype=bool)
        mask[list(self.subspaces)] = True
        return mask


def zipf_frequencies(m: int, alpha: float, mean_active: float) -> np.ndarray:
    """p_i = min(1, c i^-(1+alpha)) for i = 1..m with c chosen so that sum_i p_i = mean_active.

    sum_i min(1, c w_i) is continuous and increasing in c, so bisection on log c finds it; the clip only
    bites when mean_active is large for the alpha (the head would need p > 1)."""
    if not 0 < mean_active <= m:
        raise ValueError(f"mean_active: {mean_active} must lie in (0, m={m}]")
    w = np.arange(1, m + 1, dtype=np.float64) ** -(1.0 + alpha)
    if mean_active >= m:
        return np.ones(m)
    lo, hi = math.log(mean_active / w.sum()), math.log(1.0 / w[-1])  # sum at lo <= target; at hi it is m
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.minimum(1.0, math.exp(mid) * w).sum() < mean_active:
            lo = mid
        else:
            hi = mid
    return np.minimum(1.0, math.exp(hi) * w)


def _centred_gaussian(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Gaussian rows [.., d] projected onto the hyperplane sum_j x_j = 0 (normalization leaves it alone)."""
    g = rng.normal(size=shape)
    return g - g.mean(axis=1, keepdims=True)


def build_dictionary(spec: SyntheticSpec) -> Dictionary:
    """Random centred unit atoms and, for each manifold rank, a random orthonormal centred subspace."""
    rng = np.random.default_rng([spec.seed, 0xD1C7])
    atoms = _centred_gaussian(rng, (spec.m, spec.d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    subspaces = {}
    for rank in spec.manifold_ranks:
        q, _ = np.linalg.qr(_centred_gaussian(rng, (spec.manifold_dim, spec.d)).T)  # [d, d_i], centred columns
        subspaces[rank - 1] = q
        atoms[rank - 1] = q[:, 0]
    return Dictionary(spec, zipf_frequencies(spec.m, spec.alpha, spec.mean_active), atoms, subspaces)


# ---- sampling ------------------------------------------------------------------------------------------


class Code(NamedTuple):
    """Which features are active in which rows, with their magnitudes (COO; one entry per active pair)."""

    row: np.ndarray  # [A] int64
    feature: np.ndarray  # [A] int64
    magnitude: np.ndarray  # [A] float64


def _magnitudes(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    if kind == "uniform":
        return rng.uniform(0.5, 1.5, size=size)
    if kind == "exponential":
        return rng.exponential(1.0, size=size)
    return np.ones(size)


def sample_chunk(dic: Dictionary, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, Code]:
    """`rows` activations [rows, d] float32 and their code. Feature i's active rows are a Binomial(rows, p_i)
    count placed uniformly without replacement: the same law as independent Bernoulli(p_i) per row, at a cost
    proportional to the number of active pairs instead of rows * m."""
    spec = dic.spec
    counts = rng.binomial(rows, dic.p)
    row = np.concatenate([rng.choice(rows, size=c, replace=False, shuffle=False) for c in counts])
    feature = np.repeat(np.arange(dic.m), counts)
    magnitude = _magnitudes(rng, spec.magnitude, len(row))
    direction = dic.atoms[feature].copy()  # [A, d]
    for i, basis in dic.subspaces.items():
        sel = feature == i
        u = rng.normal(size=(int(sel.sum()), basis.shape[1]))
        u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-300)  # uniform on S^(d_i - 1)
        direction[sel] = u @ basis.T
    x = torch.zeros(rows, spec.d, dtype=torch.float64)
    x.index_add_(0, torch.from_numpy(row), torch.from_numpy(direction * magnitude[:, None]))
    return x.numpy().astype(np.float32), Code(row, feature, magnitude)


def iter_chunks(dic: Dictionary, rows: int, stream: int = TRAIN_STREAM,
                chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[np.ndarray, Code]]:
    """Rows in chunks; chunk c of `stream` is drawn from rng(seed, stream, c) alone, so every draw of the same
    spec begins with the same full chunks, and the training and held-out streams never share a row."""
    for c, start in enumerate(range(0, rows, chunk_rows)):
        rng = np.random.default_rng([dic.spec.seed, stream, c])
        yield sample_chunk(dic, min(chunk_rows, rows - start), rng)


def generate(dic: Dictionary, rows: int, stream: int = TRAIN_STREAM, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """[rows, d] float32: a few million rows at d = 64 is ~1 GB."""
    out = np.empty((rows, dic.spec.d), dtype=np.float32)
    start = 0
    for x, _ in iter_chunks(dic, rows, stream, chunk_rows):
        out[start:start + len(x)] = x
        start += len(x)
    return out


# ---- matching decoder directions to the dictionary ------------------------------------------------------


@dataclass
class Match:
    """How an SAE's decoder directions [n, d] meet the dictionary.

    A discrete feature's score against a latent is the cosine of the latent's unit decoder row with the atom
    (signed: a latent's code is non-negative, so an anti-parallel row does not represent the feature); a
    manifold feature's score is the norm of the unit row's projection onto span(S_i). A latent belongs to a
    feature when the score reaches `threshold`; a feature is found when some latent belongs to it."""

    threshold: float
    best_score: np.ndarray  # [m] best cosine (discrete) or projection norm (manifold) over latents
    latents_per_feature: np.ndarray  # [m] int: the allocation n_i the model speaks of
    latent_best: np.ndarray  # [n] the latent's best score over features
    is_manifold: np.ndarray  # [m] bool
    on_manifold: np.ndarray  # [n] bool: the latent lies in some manifold subspace

    @property
    def found(self) -> np.ndarray:  # [m] bool
        return self.best_score >= self.threshold

    @property
    def discovered(self) -> int:
        """D(N) = |{i : n_i > 0}| (method §F.0)."""
        return int(self.found.sum())

    @property
    def discrete_found(self) -> int:
        return int((self.found & ~self.is_manifold).sum())

    @property
    def latents_on_manifolds(self) -> int:
        return int(self.on_manifold.sum())

    @property
    def unmatched_latents(self) -> int:
        return int((self.latent_best < self.threshold).sum())


def unit_rows(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def match_features(decoder: np.ndarray, dic: Dictionary, threshold: float = 0.9) -> Match:
    """Score every latent [n, d] against every feature; see `Match`."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold: {threshold} must lie in (0, 1]")
    dec = unit_rows(decoder)  # [n, d]
    scores = dec @ dic.atoms.T  # [n, m] cosines
    manifold = dic.is_manifold
    on_manifold = np.zeros(len(dec), dtype=bool)
    for i, basis in dic.subspaces.items():
        scores[:, i] = np.linalg.norm(dec @ basis, axis=1)  # |P_i d| for orthonormal columns
        on_manifold |= scores[:, i] >= threshold
    owned = scores >= threshold
    empty = len(dec) == 0
    return Match(threshold=threshold,
                 best_score=np.full(dic.m, -1.0) if empty else scores.max(axis=0),
                 latents_per_feature=owned.sum(axis=0).astype(np.int64),
                 latent_best=scores.max(axis=1) if dic.m else np.full(len(dec), -1.0),
                 is_manifold=manifold, on_manifold=on_manifold)


def frequency_rank_of_found(match: Match, n_latents: int) -> dict:
    """The allocation model's order of discovery, checked: the rank (1 = most frequent) of the rarest found
    feature, the median rank of those found, and the fraction of the min(N, m) most frequent features found
    (1.0 when the SAE finds exactly the top N, as the discrete model predicts)."""
    ranks = np.flatnonzero(match.found) + 1
    top = min(n_latents, len(match.found))
    return {"rarest_found_rank": int(ranks.max()) if len(ranks) else None,
            "median_found_rank": float(np.median(ranks)) if len(ranks) else None,
            "top_n_found_fraction": float(match.found[:top].mean()) if top else None}


# ---- training an SAE on generated rows ------------------------------------------------------------------


class SyntheticRun(NamedTuple):
    sae: SparseAutoencoder
    fvu: float  # on held-out generated rows, in the normalized space (method §C.1)
    summary: dict  # train_sae's summary (steps, seconds, dead fraction, ...)
    log: list[dict]  # train_sae's log rows


@torch.no_grad()
def heldout_fvu(sae: SparseAutoencoder, rows: np.ndarray, baseline_mse: float, batch: int = 8192) -> float:
    """Mean normalized MSE of normalized held-out rows against the training rows' baseline (C.1)."""
    total = 0.0
    for xb in torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).split(batch):
        x = normalize(xb)[0]
        total += float(normalized_mse(sae(x)[0], x, baseline_mse)) * len(x)
    return total / max(len(rows), 1)


def train_synthetic_sae(train_rows: np.ndarray, eval_rows: np.ndarray, *, n: int, k: int, arch: str = "topk",
                        tokens: int = 1 << 19, batch: int = 512, lr: float = 3e-3, seed: int = 0,
                        dead_tokens: int = 65536, ema_decay: float = 0.0, arch_params: dict | None = None,
                        stats: dict | None = None) -> SyntheticRun:
    """Train one SAE of the pipeline (`saescale.sae.train.train_sae`, any arch of `ARCHS`) on raw generated
    rows, normalized on the fly as in the pipeline; b_pre and the FVU baseline come from `layer_stats` of the
    training rows, as `saescale normalize` computes them for an LM layer (pass `stats` to reuse them across a
    grid). AuxK's k_aux is the power of two near d/2 (method §A.5). No EMA by default: toy runs are a few
    thousand steps, where a 0.999 average still lags. Nothing is checkpointed."""
    if arch not in ARCHS:
        raise ValueError(f"arch: '{arch}' is not one of {sorted(ARCHS)}")
    d = train_rows.shape[1]
    stats = stats or layer_stats([train_rows], len(train_rows), seed=seed)
    spec = TrainSpec(arch=arch, n=n, k=k, d_model=d, lr=lr, batch_size=batch, tokens=tokens,
                     adam_eps=6.25e-10, adam_betas=(0.9, 0.999), auxk_coef=1 / 32,
                     k_aux=int(2 ** math.floor(math.log2(max(d / 2, 1)))), dead_tokens=dead_tokens,
                     ema_decay=ema_decay, log_every=max(1, tokens // batch // 8), checkpoint_seconds=0, seed=seed,
                     device="cpu", arch_params=dict(arch_params or {}))
    selection = normalize(torch.from_numpy(train_rows[:8192]))[0].numpy()
    with tempfile.TemporaryDirectory() as tmp:
        sae, rows, summary = train_sae(InMemoryBatches(train_rows, batch, seed), np.asarray(stats["geometric_median"]),
                                       stats["baseline_mse"], spec, Path(tmp) / "ck.pt", selection)
    return SyntheticRun(sae, heldout_fvu(sae, eval_rows, stats["baseline_mse"]), summary, rows)


# ---- the study: D(N) on a discrete dictionary and on one with manifolds ---------------------------------

# The whole study at these values: 54 s of CPU on one thread (82 s wall on a shared 2-core box), 10 SAEs.
# Measured D(N) for N = 32..512: discrete 22, 49, 83, 204, 293; top-4 ranks as S^2 manifolds 13, 34, 70, 160,
# 270, with 17, 27, 35, 42, 53 latents in the manifold subspaces.
DEFAULT_SETTINGS: dict = {
    "d": 32, "m": 512, "alpha": 0.2, "mean_active": 1.0,  # alpha 0.2: p_1 = 0.24 (at 0.5, p_1 = 0.4 and the
    # geometric-median b_pre sits on the top atom, which bends every other decoder row towards it)
    "manifold_ranks": [1, 2, 3, 4], "manifold_dim": 3, "magnitude": "uniform",
    "n": [32, 64, 128, 256, 512], "k": 2, "arch": "topk",
    "tokens": 1 << 20, "batch": 512, "lr": 3e-3, "rows": 1 << 20, "eval_rows": 16384,
    "threshold": 0.9, "seed": 0,
    "threads": 1,  # torch intra-op threads: at these sizes a second thread only adds contention (measured:
    # 30x slower on 2 busy cores); run studies side by side instead
}
# Heavier: 4x the features, 2x d, 4x the tokens, N up to 2m: 1074 s of CPU on one thread (14 SAEs). Measured
# D(N) for N = 64..4096: discrete 49, 100, 212, 415, 868, 1833, 2038 (saturating at m = 2048); manifolds 35, 82,
# 185, 376, 813, 1638, 2028, with 28 -> 112 latents in the subspaces (64 on the rank-1 sphere at N = 4096).
HEAVY_SETTINGS: dict = {**DEFAULT_SETTINGS, "d": 64, "m": 2048, "n": [64, 128, 256, 512, 1024, 2048, 4096],
                        "tokens": 1 << 22, "rows": 1 << 22}

_INT_KEYS = ("d", "m", "manifold_dim", "k", "tokens", "batch", "rows", "eval_rows", "seed", "threads")
_NUM_KEYS = ("alpha", "mean_active", "lr", "threshold")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def validate_settings(settings: dict | None, where: str = "config.toy.groundtruth") -> dict:
    """DEFAULT_SETTINGS updated with `settings`, checked; every error names its key, e.g.
    `config.toy.groundtruth.n[0]: 1 is smaller than k=2`."""
    s = {**DEFAULT_SETTINGS, **(settings or {})}
    unknown = sorted(set(s) - set(DEFAULT_SETTINGS))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key; known: {sorted(DEFAULT_SETTINGS)}")

    def fail(key: str, msg: str):
        raise ValueError(f"{where}.{key}: {msg}")

    for key in _INT_KEYS:
        if not _is_int(s[key]):
            fail(key, f"{s[key]!r} is not an integer")
    for key in _NUM_KEYS:
        if not _is_num(s[key]):
            fail(key, f"{s[key]!r} is not a finite number")
    for key in ("d", "m", "k", "tokens", "batch", "rows", "eval_rows", "threads"):
        if s[key] < (2 if key == "d" else 1):
            fail(key, f"{s[key]} is too small")
    if s["alpha"] < 0:
        fail("alpha", f"{s['alpha']} must be >= 0")
    if not 0 < s["mean_active"] <= s["m"]:
        fail("mean_active", f"{s['mean_active']} must lie in (0, m={s['m']}]")
    if s["lr"] <= 0:
        fail("lr", f"{s['lr']} must be > 0")
    if not 0 < s["threshold"] <= 1:
        fail("threshold", f"{s['threshold']} must lie in (0, 1]")
    ranks = s["manifold_ranks"]
    if not isinstance(ranks, (list, tuple)) or not ranks:
        fail("manifold_ranks", f"{ranks!r} must be a non-empty list of frequency ranks (1 = most frequent)")
    for i, r in enumerate(ranks):
        if not _is_int(r) or not 1 <= r <= s["m"]:
            fail(f"manifold_ranks[{i}]", f"{r!r} is not a rank in 1..m={s['m']}")
    if len(set(ranks)) != len(ranks):
        fail("manifold_ranks", f"{list(ranks)} repeats a rank")
    if not 2 <= s["manifold_dim"] <= s["d"] - 1:
        fail("manifold_dim", f"{s['manifold_dim']} must lie in 2..d-1={s['d'] - 1}")
    if s["magnitude"] not in MAGNITUDES:
        fail("magnitude", f"{s['magnitude']!r} is not one of {list(MAGNITUDES)}")
    if s["arch"] not in ARCHS:
        fail("arch", f"{s['arch']!r} is not one of {sorted(ARCHS)}")
    ns = s["n"]
    if not isinstance(ns, (list, tuple)) or not ns:
        fail("n", f"{ns!r} must be a non-empty list of latent counts")
    for i, n in enumerate(ns):
        if not _is_int(n) or n < 1:
            fail(f"n[{i}]", f"{n!r} is not a positive integer")
        if n < s["k"]:
            fail(f"n[{i}]", f"{n} is smaller than k={s['k']}")
    if s["batch"] > s["tokens"]:
        fail("batch", f"{s['batch']} exceeds the token budget tokens={s['tokens']}")
    if s["batch"] > s["rows"]:
        fail("batch", f"{s['batch']} exceeds the number of generated rows={s['rows']}")
    return {**s, "manifold_ranks": [int(r) for r in ranks], "n": sorted(int(n) for n in ns)}


def spec_from_settings(s: dict, manifold: bool) -> SyntheticSpec:
    return SyntheticSpec(d=s["d"], m=s["m"], alpha=float(s["alpha"]), mean_active=float(s["mean_active"]),
                         manifold_ranks=tuple(s["manifold_ranks"]) if manifold else (),
                         manifold_dim=s["manifold_dim"], magnitude=s["magnitude"], seed=s["seed"])


def predicted_discovered(n_latents: int, dic: Dictionary, latents_on_manifolds: int, manifolds_found: int) -> int:
    """The allocation model (method §F.0) given the latents the manifolds took: each remaining latent
    discovers one new discrete feature, in frequency order. With no manifolds this is D(N) = min(N, m)."""
    n_manifolds = int(dic.is_manifold.sum())
    free = max(n_latents - latents_on_manifolds, 0)
    return int(min(free, dic.m - n_manifolds) + manifolds_found)


def study_run(dic: Dictionary, s: dict, n: int, train_rows: np.ndarray, eval_rows: np.ndarray,
              stats: dict) -> dict:
    """One SAE of the grid, trained and matched: a JSON-ready row (no NaN)."""
    cpu = time.process_time()
    run = train_synthetic_sae(train_rows, eval_rows, n=n, k=s["k"], arch=s["arch"], tokens=s["tokens"],
                              batch=s["batch"], lr=s["lr"], seed=s["seed"], stats=stats)
    match = match_features(run.sae.W_dec.detach().numpy(), dic, s["threshold"])
    manifold_idx = sorted(dic.subspaces)
    manifolds_found = int(match.found[manifold_idx].sum()) if manifold_idx else 0
    return {"n": n, "k": s["k"], "arch": s["arch"], "fvu": _finite_or_none(run.fvu),
            "D": match.discovered, "D_discrete": match.discrete_found, "D_pred": min(n, dic.m),
            "D_pred_given_manifolds": predicted_discovered(n, dic, match.latents_on_manifolds, manifolds_found),
            "latents_on_manifolds": match.latents_on_manifolds,
            "latents_per_manifold": [int(match.latents_per_feature[i]) for i in manifold_idx],
            "unmatched_latents": match.unmatched_latents,
            "frequency_rank_of_found": frequency_rank_of_found(match, n),
            "dead_fraction": _finite_or_none(run.summary.get("final_dead_fraction")),
            "train_seconds": round(float(run.summary["train_seconds"]), 2),
            "cpu_seconds": round(time.process_time() - cpu, 2)}


def _finite_or_none(v) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


def groundtruth_study(settings: dict | None = None) -> dict:
    """Train an SAE for every N of the grid on two dictionaries drawn from the same seed (the same atoms
    and frequencies): "discrete", and "manifolds", where the features at `manifold_ranks` are d_i-spheres.
    Per N: FVU, D(N), the allocation model's D_pred, latents lying in manifold subspaces, unmatched latents,
    and where in the frequency order the found features sit. JSON-ready: None where a value is undefined."""
    s = validate_settings(settings)
    with torch_threads(s["threads"]):
        return _study(s)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set for a block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _study(s: dict) -> dict:
    t0, cpu0 = time.time(), time.process_time()
    dictionaries = []
    for name, manifold in (("discrete", False), ("manifolds", True)):
        dic = build_dictionary(spec_from_settings(s, manifold))
        t = time.time()
        train_rows = generate(dic, s["rows"], TRAIN_STREAM)
        eval_rows = generate(dic, s["eval_rows"], EVAL_STREAM)
        stats = layer_stats([train_rows], len(train_rows), seed=s["seed"])
        log.info("%s dictionary: %d + %d rows generated in %.1f s", name, s["rows"], s["eval_rows"], time.time() - t)
        runs = []
        for n in s["n"]:
            row = study_run(dic, s, n, train_rows, eval_rows, stats)
            log.info("%s n=%d: fvu %s  D %d (pred %d)  on manifolds %d  unmatched %d  %.1f s", name, n, row["fvu"],
                     row["D"], row["D_pred_given_manifolds"], row["latents_on_manifolds"], row["unmatched_latents"],
                     row["train_seconds"])
            runs.append(row)
        dictionaries.append({"name": name, "manifold_ranks": sorted(r + 1 for r in dic.subspaces),
                             "manifold_dim": s["manifold_dim"] if manifold else None,
                             "p_head": [float(p) for p in dic.p[:8]], "p_min": float(dic.p.min()),
                             "runs": runs})
        del train_rows
    return {"settings": s, "m": s["m"], "threshold": s["threshold"], "dictionaries": dictionaries,
            "seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - cpu0, 1),
            "torch_threads": torch.get_num_threads(),
            "note": ("D_pred = min(N, m): the allocation model for discrete features (method §F.0). "
                     "D_pred_given_manifolds: the same model given the latents the manifolds took (each other "
                     "latent finds one new discrete feature); manifold features soaking up latents lower D.")}
