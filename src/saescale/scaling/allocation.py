"""The capacity-allocation model of SAE scaling (Michaud, Gorton & McGrath 2025 §2.3–2.6, App. B; method §F.0,
F.2, F.5), solved exactly and fast.

Model. Feature i = 1, 2, ... occurs with p_i = i^-(1+α) / Z, where Z = ζ(1+α) (Z is the partial sum for a finite
feature count M). Feature i has a loss curve L_i(n) of the latents n it gets, and an SAE of N latents is the
allocation that minimises Σ_i p_i L_i(n_i) subject to Σ_i n_i = N. Curves:
- discrete feature, L(n) = 1[n = 0];
- power-law manifold, L(n) = (1+n)^-β. The paper writes n^-β, which makes L(0) infinite and the first latent
  worthless; (1+n)^-β keeps L(0) = 1 like a discrete feature (method §F.2, our recorded choice).

Solver. Every curve is convex on the integers (marginal gains Δ_i(m) = L_i(m-1) - L_i(m) decrease in m), so the
greedy choice of the N largest items p_i Δ_i(m) is optimal. They are the items above a threshold λ,
n_i(λ) = #{m ≥ 1 : p_i Δ_i(m) ≥ λ}. We bracket λ on a log scale (Illinois regula falsi) until at most SLACK items
lie in the bracket, then take those by gain, ties broken by (feature, m) exactly as the heap of `solve_explicit`.
Nothing of size N is ever enumerated: features are counted by inverting p_i (#{i : p_i d ≥ λ} from
(p_1 d / λ)^(1/(1+α)), then corrected to the exact float comparison the heap makes). With every feature a manifold,
the few head features with more than HEAD latents are enumerated and the rest are summed over m as
#{i : n_i ≥ m}; the split keeps both parts near 4096 terms up to N = 10^8 (O(√items) beyond). The loss of the tail is a sum of Hurwitz zeta values
(`scipy.special.zeta(s, q)`), so L(N) is exact up to float rounding, for infinitely many features too.

Runtime: the default `allocation_study({})` (8 β × 15 N per case, an 8 × 8 phase grid of 5 N each, the checks:
about 660 solves up to N = 10^8) took 2.9–3.3 s (3 runs) on the 2-core CPU it was written on; one solve at
N = 10^8 takes 1–15 ms.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
from scipy.special import zeta

from saescale.scaling.fits import loglog_slope

HEAD = 4096  # enumerate features with more latents than this one by one; sum the rest over m (at least HEAD)
SLACK = 4096  # the final bracket holds at most this many items, sorted by gain
LOSS_CURVE = "(1+n)^-beta"
_INT_CAP = 2**53  # counts stay exact integers in float64


def manifold_loss(n, beta: float) -> np.ndarray:
    """L(n) = (1+n)^-β: the per-feature loss of a power-law manifold, with L(0) = 1 like a discrete feature."""
    return (1.0 + np.asarray(n, dtype=float)) ** -beta


def marginal_gain(m, beta: float) -> np.ndarray:
    """Δ(m) = L(m-1) - L(m) = m^-β (1 - (1 + 1/m)^-β) for m >= 1, via expm1/log1p: the plain difference of two
    powers cancels to ~6 digits at m ~ 10^8, and the threshold search compares these values exactly."""
    m = np.asarray(m, dtype=float)
    return m**-beta * -np.expm1(-beta * np.log1p(1.0 / m))


def normalizer(alpha: float, M: int | None = None) -> float:
    """Z = Σ_{i<=M} i^-(1+α): ζ(1+α) for infinitely many features, summed directly for small M (more precise)."""
    s = 1.0 + alpha
    if M is not None and M <= 100_000:
        return float(np.sum(np.arange(M, 0, -1, dtype=float) ** -s))  # smallest terms first
    z = float(zeta(s, 1.0))
    return z if M is None else z - float(zeta(s, M + 1.0))


def frequencies(alpha: float, count: int, M: int | None = None) -> np.ndarray:
    """p_i for i = 1..count of the model with M features (None: infinitely many), as the fast solvers compute it."""
    p1 = 1.0 / normalizer(alpha, M)
    return p1 * np.arange(1, count + 1, dtype=float) ** -(1.0 + alpha)


@dataclass(frozen=True)
class Allocation:
    """A solved allocation. Features 1..I (I = len(head)) carry their n_i explicitly; beyond them the n_i are
    non-increasing, so they are stored as tail[m-1] = the last feature with n_i >= m (tail[m-1] <= I: none)."""

    case: str
    N: int
    D: int  # features discovered: #{i : n_i >= 1}
    n_1: int  # latents on the most frequent feature
    loss: float  # Σ_i p_i L_i(n_i)
    head: np.ndarray = field(repr=False)  # [I] int64
    tail: np.ndarray = field(repr=False)  # [m_max] int64, non-increasing, >= I
    alpha: float | None = None
    beta: float | None = None
    M: int | None = None
    allocation_exponent: float | None = None  # measured γ in n_i ∝ i^-γ (homogeneous case)

    def n(self, i) -> np.ndarray:
        """n_i for 1-based feature indices i (scalar or array)."""
        i = np.asarray(i, dtype=np.int64)
        I = len(self.head)
        in_tail = np.searchsorted(-self.tail, -i, side="right")  # #{m : tail[m-1] >= i}
        return np.where(i <= I, self.head[np.clip(i - 1, 0, max(I - 1, 0))] if I else 0, in_tail)

    @property
    def total(self) -> int:
        """Σ_i n_i, from the stored representation (equals N for every solve)."""
        return int(self.head.sum() + np.sum(self.tail - len(self.head)))

    def record(self) -> dict[str, Any]:
        """The JSON-ready summary: N, D, n_1, their ratios to N, the loss and (homogeneous) the exponent."""
        return {"case": self.case, "alpha": self.alpha, "beta": self.beta, "M": self.M, "N": self.N,
                "D": self.D, "n_1": self.n_1, "D_frac": self.D / self.N if self.N else None,
                "n_1_frac": self.n_1 / self.N if self.N else None, "loss": self.loss,
                "allocation_exponent": self.allocation_exponent}


# ---------------------------------------------------------------------------------------------------------------
# The threshold solver. A model is "the first `manifolds` features are power-law manifolds, the rest discrete";
# manifolds=None means all of them (homogeneous), and then the head of enumerated features is chosen per λ.


@dataclass(frozen=True)
class _Level:
    lam: float
    head: np.ndarray  # [I] n_i(λ) of features 1..I
    tail: np.ndarray  # [m_max] max(I, #{i : p_i d_m >= λ}), d_m the tail features' Δ(m)

    @property
    def total(self) -> int:
        return int(self.head.sum() + np.sum(self.tail - len(self.head)))


@dataclass(frozen=True)
class _Model:
    alpha: float
    beta: float
    M: int | None
    manifolds: int | None  # leading manifold features; None: all

    @property
    def s(self) -> float:
        return 1.0 + self.alpha

    @cached_property
    def p1(self) -> float:
        return 1.0 / normalizer(self.alpha, self.M)

    @property
    def cap(self) -> int:
        return _INT_CAP if self.M is None else self.M

    def p(self, i: np.ndarray) -> np.ndarray:
        return self.p1 * np.asarray(i, dtype=float) ** -self.s

    def tail_gain(self, m: np.ndarray) -> np.ndarray:
        """Δ(m) of the features beyond the head: a manifold's, or 1[m = 1] for a discrete feature."""
        if self.manifolds is None:
            return marginal_gain(m, self.beta)
        return (np.asarray(m) == 1).astype(float)

    def latents(self, p: np.ndarray, lam: float) -> np.ndarray:
        """#{m >= 1 : p Δ(m) >= λ} per manifold frequency p: invert Δ(m) ≈ β (m + 1/2)^-(1+β), then step."""
        p = np.asarray(p, dtype=float)
        b = self.beta
        m = np.floor(np.minimum((b * p / lam) ** (1.0 / (1.0 + b)) - 0.5, _INT_CAP))
        m = np.maximum(m, 0).astype(np.int64)
        while True:
            up = p * marginal_gain(m + 1, b) >= lam
            m += up
            down = (m >= 1) & (p * marginal_gain(np.maximum(m, 1), b) < lam)
            m -= down
            if not (up.any() or down.any()):
                return m

    def features(self, lam: float, d: np.ndarray) -> np.ndarray:
        """#{i >= 1 : p_i d >= λ} per gain factor d, capped at M: invert p_i, then step to the exact comparison."""
        d = np.asarray(d, dtype=float)
        with np.errstate(divide="ignore", over="ignore"):
            x = (self.p1 * d / lam) ** (1.0 / self.s)
        k = np.floor(np.minimum(x, self.cap)).astype(np.int64)
        while True:
            up = (k < self.cap) & (self.p(k + 1) * d >= lam)
            k += up
            down = (k >= 1) & (self.p(np.maximum(k, 1)) * d < lam)
            k -= down
            if not (up.any() or down.any()):
                return k

    def head_size(self, lam: float) -> int:
        if self.manifolds is not None:
            return min(self.manifolds, self.cap)
        discovered = int(self.features(lam, marginal_gain(1, self.beta))[()])
        # head: the features with more than `split` latents; the tail then needs m <= split. Grow the split
        # until both parts are about equal, so the work is O(sqrt(items)) even when n_i ∝ 1/i (α = β).
        split = HEAD
        while (crowded := int(self.features(lam, marginal_gain(split + 1, self.beta))[()])) > split:
            split *= 4
        return max(crowded, min(discovered, HEAD))

    def level(self, lam: float, I: int | None = None) -> _Level:
        I = self.head_size(lam) if I is None else I
        head = self.latents(self.p(np.arange(1, I + 1)), lam) if I else np.zeros(0, np.int64)
        if I >= self.cap:
            m_max = 0
        elif self.manifolds is None:
            m_max = int(self.latents(self.p(np.array([I + 1])), lam)[0])  # tail n_i <= n_{I+1}
        else:
            m_max = 1
        m = np.arange(1, m_max + 1)
        return _Level(lam, head, np.maximum(I, self.features(lam, self.tail_gain(m))))

    def max_gain(self) -> float:
        """An upper bound on every item's gain: p_1 times the largest first-latent gain of either curve."""
        return self.p1 * max(float(marginal_gain(1, self.beta)), float(self.tail_gain(np.array([1]))[0]))

    def low_start(self, N: int) -> float:
        """A λ with at least N items above it: feature 1 alone takes N latents, or N features get one each."""
        lam = self.p1 * float(marginal_gain(N, self.beta)) if self.manifolds != 0 else 0.0
        first_tail = 1 if self.manifolds is None else self.manifolds + 1
        if first_tail + N - 1 <= self.cap:  # N tail features exist
            lam = max(lam, float(self.p(np.array([first_tail + N - 1]))[0] * self.tail_gain(np.array([1]))[0]))
        return lam


def _bracket(model: _Model, N: int) -> tuple[_Level, _Level]:
    """(lo, hi) levels with C(hi) <= N <= C(lo), C(lo) - C(hi) <= SLACK (or λ_lo, λ_hi adjacent floats) and the
    same head, found by Illinois regula falsi on log C(λ) against log λ (nearly a straight line)."""
    lo = model.level(model.low_start(N))
    while lo.total < N:  # defensive: low_start is a guarantee in exact arithmetic only
        lo = model.level(lo.lam / 2)
    hi = model.level(math.nextafter(model.max_gain(), math.inf))
    target = math.log(N + 1.0)
    f_lo, f_hi = math.log(lo.total + 1.0) - target, math.log(hi.total + 1.0) - target
    side = 0
    while lo.total - hi.total > SLACK and lo.total != N:
        x_lo, x_hi = math.log(lo.lam), math.log(hi.lam)
        lam = math.exp(x_lo + f_lo * (x_hi - x_lo) / (f_lo - f_hi))
        if not lo.lam < lam < hi.lam:
            lam = math.sqrt(lo.lam * hi.lam)
            if not lo.lam < lam < hi.lam:
                break  # adjacent floats: the bracket holds exact ties only
        mid = model.level(lam)
        if mid.total >= N:
            lo, f_lo = mid, math.log(mid.total + 1.0) - target
            f_hi, side = (f_hi / 2 if side == 1 else f_hi), 1
        else:
            hi, f_hi = mid, math.log(mid.total + 1.0) - target
            f_lo, side = (f_lo / 2 if side == -1 else f_lo), -1
    if lo.total == N:
        return lo, lo
    return lo, model.level(hi.lam, I=len(lo.head))


def _ranges(start: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, value) of all integers in (start[j], stop[j]] for each j, flattened."""
    counts = stop - start
    owner = np.repeat(np.arange(len(start)), counts)
    offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, np.repeat(start, counts) + offset + 1


def _solve(model: _Model, N: int, case: str) -> Allocation:
    """The exact optimum: all items above λ_hi, then the best N - C(λ_hi) of the bracket by (gain, i, m)."""
    if N == 0:
        head = np.zeros(0 if model.manifolds is None else min(model.manifolds, model.cap), np.int64)
        return _finish(model, N, case, head, np.zeros(0, np.int64))
    lo, hi = _bracket(model, N)
    I = len(lo.head)
    tail_hi = np.full(len(lo.tail), I, np.int64)
    tail_hi[: len(hi.tail)] = hi.tail
    # bracket items: head features (i, m) with m in (n_i(hi), n_i(lo)]; tail (i, m) with i in (T_m(hi), T_m(lo)]
    hi_idx, hi_m = _ranges(hi.head, lo.head)
    tm_idx, tm_i = _ranges(tail_hi, lo.tail)
    i = np.concatenate([hi_idx + 1, tm_i])
    m = np.concatenate([hi_m, tm_idx + 1])
    in_head = np.arange(len(i)) < len(hi_idx)
    d = np.where(in_head, marginal_gain(np.maximum(m, 1), model.beta), model.tail_gain(m))  # head: manifolds
    gain = model.p(i) * d
    take = np.lexsort((m, i, -gain))[: N - hi.total]
    head = hi.head + np.bincount(i[take][in_head[take]] - 1, minlength=I).astype(np.int64)
    tail = tail_hi + np.bincount(m[take][~in_head[take]] - 1, minlength=len(tail_hi)).astype(np.int64)
    return _finish(model, N, case, head, tail[tail > I])


def _mass_from(model: _Model, a) -> np.ndarray:
    """Σ_{i=a}^{M} p_i per start index a (Hurwitz zeta: the mass of infinitely many undiscovered features)."""
    a = np.asarray(a, dtype=float)
    z = zeta(model.s, a)
    if model.M is not None:
        z = np.where(a > model.M, 0.0, z - zeta(model.s, model.M + 1.0))
    return z * model.p1


def _finish(model: _Model, N: int, case: str, head: np.ndarray, tail: np.ndarray) -> Allocation:
    """Loss, D and n_1 of a solved allocation. Beyond the head L(n) = Σ_{m>n} Δ(m), so the tail loss is
    Σ_m Δ(m) · mass(features beyond tail[m-1]): positive terms only, no cancellation."""
    I = len(head)  # the head features are always manifolds
    loss = float(np.sum(model.p(np.arange(1, I + 1)) * manifold_loss(head, model.beta))) if I else 0.0
    m = np.arange(1, len(tail) + 1)
    loss += float(np.sum(model.tail_gain(m) * _mass_from(model, tail + 1)))
    beyond = manifold_loss(len(tail), model.beta) if model.manifolds is None else float(len(tail) == 0)
    if I < model.cap:  # Σ_{m > m_max} Δ(m) = L(m_max) over all tail features
        loss += float(beyond * _mass_from(model, I + 1))
    a = Allocation(case=case, N=int(N), D=0, n_1=0, loss=loss, head=head, tail=tail, alpha=model.alpha,
                   beta=None if model.manifolds == 0 else model.beta, M=model.M)
    D = int(np.count_nonzero(head)) + (int(tail[0]) - I if len(tail) else 0)
    return replace(a, D=D, n_1=int(a.n(1)))


def _check_n(N, M: int | None) -> int:
    if isinstance(N, bool) or not float(N).is_integer() or N < 0:
        raise ValueError(f"N = {N!r} must be a non-negative whole number")
    if M is not None and (isinstance(M, bool) or int(M) != M or M < 1):
        raise ValueError(f"M = {M!r} must be a positive whole number or None")
    return int(N)


def _check_exponent(name: str, v: float) -> None:
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
        raise ValueError(f"{name} = {v!r} must be a finite number > 0")


def solve_discrete(N: int, alpha: float, M: int | None = None) -> Allocation:
    """Discrete features only (F.5.1): one latent each to the N most frequent features, so D(N) = N exactly and
    L(N) = Σ_{i>N} p_i = ζ(1+α, N+1) / Z. No threshold needed: the p_i are strictly decreasing."""
    N = _check_n(N, M)
    _check_exponent("alpha", alpha)
    if M is not None and N > M:
        raise ValueError(f"N = {N} > M = {M}: discrete features have no use for more latents than features")
    model = _Model(float(alpha), 1.0, M, manifolds=0)
    return _finish(model, N, "discrete", np.zeros(0, np.int64), np.array([N] if N else [], np.int64))


def solve_single_manifold(N: int, alpha: float, beta: float, M: int | None = None) -> Allocation:
    """Paper Fig. 2 right (F.2): feature 1 is a manifold with L(n) = (1+n)^-β, every other feature discrete."""
    N = _check_n(N, M)
    _check_exponent("alpha", alpha)
    _check_exponent("beta", beta)
    return _solve(_Model(float(alpha), float(beta), M, manifolds=1), N, "single_manifold")


def solve_homogeneous(N: int, alpha: float, beta: float, M: int | None = None) -> Allocation:
    """Every feature a manifold with L(n) = (1+n)^-β (App. B, Brill's model): D ∝ N^min(1, (1+β)/(1+α)),
    L ∝ N^-min(α, β), n_i ∝ i^-(1+α)/(1+β); the last is measured into `allocation_exponent`."""
    N = _check_n(N, M)
    _check_exponent("alpha", alpha)
    _check_exponent("beta", beta)
    a = _solve(_Model(float(alpha), float(beta), M, manifolds=None), N, "homogeneous")
    return _with_exponent(a)


def _with_exponent(a: Allocation, n_min: int = 30) -> Allocation:
    """γ = -d log n_i / d log i over the features with n_i >= n_min (coarser n_i are rounding-dominated),
    sampled at log-spaced i so every decade weighs the same."""
    crowded = int(np.count_nonzero(a.head >= n_min))
    if len(a.tail) >= n_min:
        crowded = max(crowded, int(a.tail[n_min - 1]))
    i = np.unique(np.geomspace(1, max(crowded, 1), 40).astype(np.int64))
    fit = slope(i, a.n(i))
    gamma = -fit["slope"] if fit["ok"] and i[-1] >= 10 else None
    return replace(a, allocation_exponent=gamma)


def solve_explicit(p: Sequence[float] | np.ndarray, curves: Callable[[int, int], float] | np.ndarray,
                   N: int, loss0: float = 1.0) -> Allocation:
    """Brute force for small instances: a heap of marginal gains p_i Δ_i(m), N pops (ties: lower i first).

    `curves` is either gain(i, m) = L_i(m-1) - L_i(m) (i 0-based, m >= 1; L_i(0) = loss0) or an array
    [features, >= N+1] of L_i(n). Greedy is optimal only for convex curves, so arrays are checked for that.
    """
    p = np.asarray(p, dtype=float)
    N = _check_n(N, None)
    if callable(curves):
        gain = curves
    else:
        table = np.asarray(curves, dtype=float)
        if table.ndim != 2 or table.shape[0] != len(p) or table.shape[1] < N + 1:
            raise ValueError(f"curves: shape {table.shape} must be [{len(p)}, >= {N + 1}]")
        steps = table[:, :-1] - table[:, 1:]
        if np.any(steps < -1e-12) or np.any(np.diff(steps, axis=1) > 1e-12):
            raise ValueError("curves: each L_i(n) must be non-increasing and convex for greedy to be optimal")
        loss0 = table[:, 0]

        def gain(i: int, m: int) -> float:
            return steps[i, m - 1]

    heap = [(-(p[i] * gain(i, 1)), i, 1) for i in range(len(p))]
    heapq.heapify(heap)
    n = np.zeros(len(p), np.int64)
    gained = np.zeros(len(p))
    for _ in range(N):
        _, i, m = heapq.heappop(heap)
        n[i], gained[i] = m, gained[i] + gain(i, m)
        heapq.heappush(heap, (-(p[i] * gain(i, m + 1)), i, m + 1))
    losses = (loss0 - gained) if callable(curves) else table[np.arange(len(p)), n]
    return Allocation(case="explicit", N=N, D=int(np.count_nonzero(n)), n_1=int(n[0]) if len(n) else 0,
                      loss=float(np.sum(p * losses)), head=n, tail=np.zeros(0, np.int64))


# ---------------------------------------------------------------------------------------------------------------
# Measurements and sweeps.


def slope(x, y, x_min: float | None = None, x_max: float | None = None) -> dict[str, Any]:
    """OLS slope of log y on log x over [x_min, x_max] with its standard error (fits.loglog_slope)."""
    return loglog_slope(x, y, x_min, x_max)


def theory_D_slope(alpha: float, beta: float) -> float:
    """F.0: D ∝ N^min(1, (1+β)/(1+α)) (homogeneous manifolds; the single manifold's too)."""
    return min(1.0, (1.0 + beta) / (1.0 + alpha))


def theory_L_slope(alpha: float, beta: float) -> float:
    """F.0: L ∝ N^-min(α, β) (homogeneous manifolds)."""
    return -min(alpha, beta)


def regime(alpha: float, beta: float) -> str:
    """β < α: manifolds soak up latents and D/N → 0 (pathological); β > α: D/N → const (benign)."""
    return "pathological" if beta < alpha else "benign" if beta > alpha else "boundary"


def N_grid(N_min: float, N_max: float, points_per_decade: int) -> list[int]:
    """Log-spaced whole N from N_min to N_max, both ends included, duplicates (small N) dropped."""
    decades = math.log10(N_max / N_min)
    k = max(round(decades * points_per_decade) + 1, 2)
    return sorted({round(float(v)) for v in np.geomspace(N_min, N_max, k)})


def sweep_single_manifold(alpha: float, betas: Sequence[float], Ns: Sequence[int],
                          M: int | None = None) -> list[dict[str, Any]]:
    """Paper Fig. 2 right: D(N), n_1(N) and L(N) with one manifold feature, per β and N."""
    return [solve_single_manifold(N, alpha, b, M).record() for b in betas for N in Ns]


def sweep_homogeneous(alpha: float, betas: Sequence[float], Ns: Sequence[int],
                      M: int | None = None) -> list[dict[str, Any]]:
    """App. B: D(N), L(N) and the allocation exponent with every feature a manifold, per β and N."""
    return [solve_homogeneous(N, alpha, b, M).record() for b in betas for N in Ns]


def _slope_fields(prefix: str, fit: dict, theory: float) -> dict[str, Any]:
    return {f"{prefix}_slope": fit.get("slope"), f"{prefix}_slope_err": fit.get("slope_err"),
            f"{prefix}_slope_theory": theory}


def phase_diagram(alphas: Sequence[float], betas: Sequence[float], N_lo: float = 1e6, N_hi: float = 1e8,
                  points: int = 5, M: int | None = None) -> list[dict[str, Any]]:
    """Paper Fig. 2 left, simulated: per (α, β) the homogeneous D- and L-slopes over N in [N_lo, N_hi] beside
    theory, and the single-manifold n_1/N and D/N at N_hi."""
    Ns = sorted({round(float(v)) for v in np.geomspace(N_lo, N_hi, points)})
    out = []
    for a in alphas:
        for b in betas:
            sols = [solve_homogeneous(N, a, b, M) for N in Ns]
            single = solve_single_manifold(Ns[-1], a, b, M)
            out.append({"alpha": a, "beta": b, "regime": regime(a, b), "N_lo": Ns[0], "N_hi": Ns[-1],
                        **_slope_fields("D", slope(Ns, [s.D for s in sols]), theory_D_slope(a, b)),
                        **_slope_fields("L", slope(Ns, [s.loss for s in sols]), theory_L_slope(a, b)),
                        "allocation_exponent": sols[-1].allocation_exponent,
                        "allocation_exponent_theory": (1.0 + a) / (1.0 + b),
                        "single_n_1_frac": single.n_1 / single.N, "single_D_frac": single.D / single.N})
    return out


# ---------------------------------------------------------------------------------------------------------------
# The study: settings in (from YAML), a JSON-ready dict out.

DEFAULT_BETAS = [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0]
DEFAULTS: dict[str, Any] = {
    "alpha": 0.5, "betas": DEFAULT_BETAS, "N_min": 10, "N_max": 10**8, "points_per_decade": 2, "M": None,
    "phase": {"alphas": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0], "betas": DEFAULT_BETAS,
              "N_lo": 10**6, "N_hi": 10**8, "points": 5},
}
HOMOGENEOUS_CHECKS = [(0.5, 0.1), (0.5, 0.25), (0.3, 1.0), (0.5, 2.0)]  # both regimes (F.2, F.5.2)


def _number(key: str, v: Any, whole: bool = False, minimum: float | None = None,
            strict: bool = True) -> float | int:
    """A YAML scalar as a number: 1e8, "1e8", 100000000 all work; bools, NaN and junk are refused by key."""
    try:
        if isinstance(v, bool) or v is None:
            raise TypeError
        x = float(v.strip()) if isinstance(v, str) else float(v)
    except (TypeError, ValueError):
        raise ValueError(f"allocation settings: {key} = {v!r} is not a number") from None
    if not math.isfinite(x):
        raise ValueError(f"allocation settings: {key} = {v!r} must be finite")
    if whole and not x.is_integer():
        raise ValueError(f"allocation settings: {key} = {v!r} must be a whole number")
    if minimum is not None and (x <= minimum if strict else x < minimum):
        raise ValueError(f"allocation settings: {key} = {v!r} must be {'>' if strict else '>='} {minimum:g}")
    return int(x) if whole else x


def _numbers(key: str, v: Any) -> list[float]:
    values = list(v) if isinstance(v, (list, tuple)) else None
    if values is None:  # a YAML scalar where a list belongs: name the key rather than iterate a string
        raise ValueError(f"allocation settings: {key} = {v!r} must be a list of numbers")
    if not values:
        raise ValueError(f"allocation settings: {key} is empty; give at least one value")
    return [_number(f"{key}[{j}]", x, minimum=0.0) for j, x in enumerate(values)]


def study_settings(settings: dict | None) -> dict[str, Any]:
    """Validated settings with defaults filled in (None means default); ValueError names the bad key."""
    settings = dict(settings or {})
    phase = settings.pop("phase", None)
    if phase is not None and not isinstance(phase, dict):
        raise ValueError(f"allocation settings: phase = {phase!r} must be a mapping")
    unknown = set(settings) - set(DEFAULTS) | set(phase or {}) - set(DEFAULTS["phase"])
    if unknown:
        raise ValueError(f"allocation settings: unknown key(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}, "
                         f"phase.{sorted(DEFAULTS['phase'])}")
    s = {k: DEFAULTS[k] if settings.get(k) is None else settings[k] for k in DEFAULTS if k != "phase"}
    ph = {k: DEFAULTS["phase"][k] if (phase or {}).get(k) is None else phase[k] for k in DEFAULTS["phase"]}
    out: dict[str, Any] = {
        "alpha": _number("alpha", s["alpha"], minimum=0.0), "betas": _numbers("betas", s["betas"]),
        "N_min": _number("N_min", s["N_min"], whole=True, minimum=1, strict=False),
        "N_max": _number("N_max", s["N_max"], whole=True, minimum=1, strict=False),
        "points_per_decade": _number("points_per_decade", s["points_per_decade"], whole=True, minimum=1,
                                     strict=False),
        "M": None if s["M"] is None else _number("M", s["M"], whole=True, minimum=1, strict=False),
        "phase": {"alphas": _numbers("phase.alphas", ph["alphas"]), "betas": _numbers("phase.betas", ph["betas"]),
                  "N_lo": _number("phase.N_lo", ph["N_lo"], whole=True, minimum=1, strict=False),
                  "N_hi": _number("phase.N_hi", ph["N_hi"], whole=True, minimum=1, strict=False),
                  "points": _number("phase.points", ph["points"], whole=True, minimum=3, strict=False)},
    }
    if out["N_max"] < out["N_min"]:
        raise ValueError(f"allocation settings: N_max = {out['N_max']} is below N_min = {out['N_min']}")
    if out["phase"]["N_hi"] <= out["phase"]["N_lo"]:
        raise ValueError(f"allocation settings: phase.N_hi = {out['phase']['N_hi']} must exceed "
                         f"phase.N_lo = {out['phase']['N_lo']}")
    return out


def _check(name: str, value: float | None, expected: float, tolerance: float, source: str) -> dict[str, Any]:
    ok = value is not None and math.isfinite(value) and abs(value - expected) <= tolerance
    return {"name": name, "value": value, "expected": expected, "tolerance": tolerance, "ok": bool(ok),
            "source": source}


def closed_form_checks(Ns_discrete: Sequence[int]) -> list[dict[str, Any]]:
    """method §F.5 as pass/fail entries {name, value, expected, tolerance, ok}; fixed parameters, so every
    study checks the same things whatever its sweep settings."""
    checks = [_check("discrete: max |D(N) - N|", float(max(abs(solve_discrete(N, 0.5).D - N) for N in Ns_discrete)),
                     0.0, 0.0, "F.5.1")]
    Ns = [10**6, 10**7, 10**8]
    disc = slope(Ns, [solve_discrete(N, 0.5).loss for N in Ns])
    checks.append(_check("discrete α=0.5: L-slope, N 1e6→1e8", disc.get("slope"), -0.5, 0.01, "F.5.1"))
    Ns = [round(float(v)) for v in np.geomspace(1e6, 1e8, 5)]
    for a, b in HOMOGENEOUS_CHECKS:
        sols = [solve_homogeneous(N, a, b) for N in Ns]
        tag = f"homogeneous α={a:g} β={b:g}"
        checks += [_check(f"{tag}: D-slope, N 1e6→1e8", slope(Ns, [s.D for s in sols]).get("slope"),
                          theory_D_slope(a, b), 0.05, "F.5.2"),
                   _check(f"{tag}: L-slope, N 1e6→1e8", slope(Ns, [s.loss for s in sols]).get("slope"),
                          theory_L_slope(a, b), 0.05, "F.5.2"),
                   _check(f"{tag}: allocation exponent at N=1e8", sols[-1].allocation_exponent,
                          (1 + a) / (1 + b), 0.05, "F.5.2")]
    fig2 = solve_single_manifold(10**8, 0.5, 0.1)
    checks += [_check("single manifold α=0.5 β=0.1: D(1e8) (paper: ~3 million)", float(fig2.D), 3.5e6, 1.5e6,
                      "F.2, paper Fig. 2 caption"),
               _check("single manifold α=0.5 β=0.1: n_1/N at 1e8 (> 0.9)", fig2.n_1 / fig2.N, 0.95, 0.05,
                      "F.5.3")]
    benign = solve_single_manifold(10**8, 0.5, 1.0)
    edge = solve_single_manifold(10**8, 0.5, 0.5)
    checks += [_check("single manifold α=0.5 β=1: D/N at 1e8 (> 0.95)", benign.D / benign.N, 0.975, 0.025,
                      "F.5.3"),
               _check("single manifold α=β=0.5: n_1/N at 1e8", edge.n_1 / edge.N, 0.386, 0.02, "F.5.3 [SIM]")]
    return checks


def _jsonable(x: Any) -> Any:
    """Plain JSON types; NaN and ±inf become None."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def allocation_study(settings: dict | None = None) -> dict[str, Any]:
    """The whole study (F.2 sweeps, the phase diagram, F.5 checks) from a settings dict, as JSON-ready data."""
    cfg = study_settings(settings)
    t0 = time.perf_counter()
    alpha, betas, M = cfg["alpha"], cfg["betas"], cfg["M"]
    Ns = N_grid(cfg["N_min"], cfg["N_max"], cfg["points_per_decade"])
    ph = cfg["phase"]
    study = {
        "settings": cfg,
        "model": {"frequencies": "p_i = i^-(1+alpha) / Z", "manifold_loss": LOSS_CURVE,
                  "discrete_loss": "1[n = 0]", "objective": "min sum_i p_i L_i(n_i) s.t. sum_i n_i = N",
                  "note": "(1+n)^-beta keeps L(0) = 1; the paper's n^-beta makes the first latent worthless"},
        "Ns": Ns,
        "discrete": [solve_discrete(N, alpha, M).record() for N in Ns if M is None or N <= M],
        "single_manifold": sweep_single_manifold(alpha, betas, Ns, M),
        "homogeneous": sweep_homogeneous(alpha, betas, Ns, M),
        "phase": phase_diagram(ph["alphas"], ph["betas"], ph["N_lo"], ph["N_hi"], ph["points"], M),
        "checks": closed_form_checks(Ns),
    }
    study["runtime_s"] = time.perf_counter() - t0
    return _jsonable(study)
