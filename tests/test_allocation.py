"""Tests for saescale.scaling.allocation (Michaud et al. 2025 capacity allocation; method §F.2, F.5) and its
figures: fast solvers against a heap and exhaustive search, closed-form scaling, settings, JSON safety."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from scipy.special import zeta

from saescale.report import allocation_figures as af
from saescale.scaling import allocation as al
from saescale.scaling.allocation import (
    allocation_study,
    frequencies,
    manifold_loss,
    marginal_gain,
    phase_diagram,
    slope,
    solve_discrete,
    solve_explicit,
    solve_homogeneous,
    solve_single_manifold,
    study_settings,
    sweep_homogeneous,
    sweep_single_manifold,
)

SMALL = {"alpha": 0.5, "betas": [0.1, 1.0], "N_min": 10, "N_max": 1000, "points_per_decade": 1,
         "phase": {"alphas": [0.3, 0.6], "betas": [0.2, 1.0], "N_lo": 1e3, "N_hi": 1e4, "points": 3}}


def _homogeneous_gain(beta):
    return lambda i, m: float(marginal_gain(m, beta))


def _single_gain(beta):
    return lambda i, m: float(marginal_gain(m, beta)) if i == 0 else float(m == 1)


def _explicit(case, N, alpha, beta, M):
    """The heap on enough features: an optimum never skips a more frequent feature with the same curve, so
    features beyond N+1 stay empty and the infinite model's first N+1 frequencies suffice."""
    count = M if M is not None else N + 2
    p = frequencies(alpha, count, M)
    gain = _homogeneous_gain(beta) if case == "homogeneous" else _single_gain(beta)
    return p, solve_explicit(p, gain, N)


def _fast(case, N, alpha, beta, M):
    return (solve_homogeneous if case == "homogeneous" else solve_single_manifold)(N, alpha, beta, M)


@pytest.fixture(params=["default", "tiny_head"])
def split(request, monkeypatch):
    """Also run with a head of 3 features and a bracket of 5 items, so small instances use the tail sums
    over m and the tie-breaking of the final bracket."""
    if request.param == "tiny_head":
        monkeypatch.setattr(al, "HEAD", 3)
        monkeypatch.setattr(al, "SLACK", 5)
    return request.param


@pytest.mark.parametrize("case", ["homogeneous", "single"])
@pytest.mark.parametrize("alpha,beta", [(0.5, 0.1), (0.5, 0.5), (1.0, 1.0), (0.3, 2.0), (0.8, 0.05)])
@pytest.mark.parametrize("M", [None, 40])
def test_fast_solvers_equal_the_heap(case, alpha, beta, M, split):
    for N in (0, 1, 2, 7, 39, 300, 2000):
        p, ref = _explicit(case, N, alpha, beta, M)
        a = _fast(case, N, alpha, beta, M)
        np.testing.assert_array_equal(a.n(np.arange(1, len(p) + 1)), ref.head, err_msg=f"N={N}")
        assert (a.D, a.n_1, a.total) == (ref.D, ref.n_1, N)
        tail = 0.0 if M is not None else float(zeta(1 + alpha, len(p) + 1) / zeta(1 + alpha))
        assert a.loss == pytest.approx(ref.loss + tail, rel=1e-11, abs=1e-15)


def _compositions(N, k):
    """Every (n_1..n_k) of non-negative integers summing to N (stars and bars)."""
    for bars in itertools.combinations(range(N + k - 1), k - 1):
        edges = (-1, *bars, N + k - 1)
        yield tuple(edges[j + 1] - edges[j] - 1 for j in range(k))


@pytest.mark.parametrize("case", ["homogeneous", "single", "discrete"])
@pytest.mark.parametrize("alpha,beta", [(0.5, 0.1), (0.2, 1.5), (1.0, 0.5)])
def test_fast_solvers_reach_the_exhaustive_optimum(case, alpha, beta):
    M = 4
    p = frequencies(alpha, M, M)
    for N in range(9 if case != "discrete" else M + 1):
        def loss(n):
            n = np.asarray(n)
            curve = manifold_loss(n, beta) if case != "discrete" else (n == 0).astype(float)
            if case == "single":
                curve[1:] = n[1:] == 0
            return float(np.sum(p * curve))

        best = min(loss(n) for n in _compositions(N, M))
        a = solve_discrete(N, alpha, M) if case == "discrete" else _fast(case, N, alpha, beta, M)
        n = a.n(np.arange(1, M + 1))
        assert n.sum() == N and a.total == N
        assert a.loss == pytest.approx(best, rel=1e-12)
        assert loss(n) == pytest.approx(a.loss, rel=1e-12)  # the reported loss is the allocation's


def test_explicit_solver_takes_loss_tables_and_refuses_non_convex_ones():
    p = frequencies(0.5, 3, 3)
    table = np.array([manifold_loss(np.arange(6), 0.3)] * 3)
    by_table = solve_explicit(p, table, 5)
    by_gain = solve_explicit(p, _homogeneous_gain(0.3), 5)
    np.testing.assert_array_equal(by_table.head, by_gain.head)
    assert by_table.loss == pytest.approx(by_gain.loss, rel=1e-12)
    table[0] = [1.0, 0.9, 0.5, 0.4, 0.3, 0.2]  # gains 0.1 then 0.4: not convex
    with pytest.raises(ValueError, match="convex"):
        solve_explicit(p, table, 5)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 2.0])
def test_discrete_features_discover_exactly_N(alpha):
    for N in (0, 1, 10, 12345, 10**8, 10**12):
        a = solve_discrete(N, alpha)
        assert a.D == N and a.total == N and a.n_1 == (N > 0)
        assert a.loss == pytest.approx(zeta(1 + alpha, N + 1) / zeta(1 + alpha), rel=1e-12)
    with pytest.raises(ValueError, match="M = 5"):
        solve_discrete(6, alpha, M=5)


def test_discrete_loss_decays_as_N_to_the_minus_alpha():
    Ns = [10**6, 10**7, 10**8]
    fit = slope(Ns, [solve_discrete(N, 0.5).loss for N in Ns])
    assert fit["slope"] == pytest.approx(-0.5, abs=1e-3)


def test_loss_equals_the_direct_sum():
    alpha, beta, M, N = 0.7, 0.4, 300, 5000
    p = frequencies(alpha, M, M)
    for a, curve in ((solve_homogeneous(N, alpha, beta, M), lambda n: manifold_loss(n, beta)),
                     (solve_single_manifold(N, alpha, beta, M), None)):
        n = a.n(np.arange(1, M + 1))
        losses = manifold_loss(n, beta) if curve else np.r_[manifold_loss(n[:1], beta), n[1:] == 0]
        assert n.sum() == N
        assert a.loss == pytest.approx(float(np.sum(p * losses)), rel=1e-12)
    # infinitely many features: the discovered ones summed, the rest a Hurwitz zeta tail
    a = solve_homogeneous(20000, alpha, beta)
    n = a.n(np.arange(1, a.D + 1))
    direct = np.sum(frequencies(alpha, a.D) * manifold_loss(n, beta)) + zeta(1 + alpha, a.D + 1) / zeta(1 + alpha)
    assert a.loss == pytest.approx(float(direct), rel=1e-12)


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.1), (0.5, 0.25), (0.3, 1.0), (0.5, 2.0)])
def test_homogeneous_scaling_matches_theory(alpha, beta):
    Ns = [int(v) for v in np.geomspace(1e6, 1e8, 5)]
    sols = [solve_homogeneous(N, alpha, beta) for N in Ns]
    assert all(s.total == s.N for s in sols)
    assert slope(Ns, [s.D for s in sols])["slope"] == pytest.approx(min(1, (1 + beta) / (1 + alpha)), abs=0.05)
    assert slope(Ns, [s.loss for s in sols])["slope"] == pytest.approx(-min(alpha, beta), abs=0.05)
    assert sols[-1].allocation_exponent == pytest.approx((1 + alpha) / (1 + beta), abs=0.02)


def test_single_manifold_reproduces_figure_2_right():
    fig2 = solve_single_manifold(10**8, 0.5, 0.1)  # caption: 100M latents discover only ~3M features
    assert 2e6 <= fig2.D <= 5e6 and fig2.n_1 / fig2.N > 0.9 and fig2.total == 10**8
    assert fig2.D == pytest.approx(3.33e6, rel=0.01) and fig2.n_1 / fig2.N == pytest.approx(0.967, abs=1e-3)
    benign = solve_single_manifold(10**8, 0.5, 1.0)
    assert benign.D / benign.N > 0.95
    edge = solve_single_manifold(10**8, 0.5, 0.5)
    assert edge.n_1 / edge.N == pytest.approx(0.386, abs=0.02)


def test_slope_recovers_a_planted_power_law_and_refuses_too_few_points():
    x = np.geomspace(1, 1e4, 9)
    fit = slope(x, 3.0 * x**-0.37)
    assert fit["ok"] and fit["slope"] == pytest.approx(-0.37, abs=1e-12) and fit["slope_err"] < 1e-10
    noisy = slope(x, 3.0 * x**-0.37 * np.exp(np.random.default_rng(0).normal(0, 0.01, x.size)))
    assert noisy["slope"] == pytest.approx(-0.37, abs=3 * noisy["slope_err"] + 1e-3) and noisy["slope_err"] > 0
    assert slope(x, x, x_min=10, x_max=1000)["n_points"] == 5
    for bad in (slope([1, 2], [1, 2]), slope(x, x, x_min=5e3), slope([1, 2, 3], [0, -1, np.nan])):
        assert not bad["ok"] and "need at least 3" in bad["reason"]


def test_sweeps_and_phase_diagram_records():
    single = sweep_single_manifold(0.5, [0.1, 1.0], [10, 1000])
    assert [(r["beta"], r["N"]) for r in single] == [(0.1, 10), (0.1, 1000), (1.0, 10), (1.0, 1000)]
    homo = sweep_homogeneous(0.5, [0.2], [100, 10000])
    assert all(r["case"] == "homogeneous" and 0 < r["loss"] < 1 for r in homo)
    (rec,) = phase_diagram([0.5], [0.1], N_lo=1e4, N_hi=1e6, points=3)
    assert rec["regime"] == "pathological" and rec["D_slope_theory"] == pytest.approx(1.1 / 1.5)
    assert rec["D_slope"] == pytest.approx(rec["D_slope_theory"], abs=0.05) and rec["single_n_1_frac"] > 0.5


def test_settings_accept_yaml_numbers_and_fill_defaults():
    s = study_settings({"alpha": "0.5", "N_max": "1e6", "N_min": 10.0, "phase": {"N_hi": 1e7}})
    assert s["alpha"] == 0.5 and s["N_max"] == 10**6 and isinstance(s["N_max"], int)
    assert s["phase"]["N_hi"] == 10**7 and s["phase"]["N_lo"] == 10**6 and len(s["betas"]) == 8
    assert study_settings(None) == study_settings({})


@pytest.mark.parametrize("bad,key", [
    ({"alpha": 0}, "alpha"), ({"alpha": -1}, "alpha"), ({"alpha": "abc"}, "alpha"), ({"alpha": True}, "alpha"),
    ({"betas": [0.1, 0.0]}, r"betas\[1\]"), ({"betas": []}, "betas"), ({"betas": 0.1}, "betas"),
    ({"N_min": 100, "N_max": 10}, "N_max"), ({"N_min": 10.5}, "N_min"), ({"points_per_decade": 0}, "points_per_decade"),
    ({"phase": {"alphas": []}}, "phase.alphas"), ({"phase": {"N_lo": 1e8, "N_hi": 1e6}}, "phase.N_hi"),
    ({"phase": {"points": 2}}, "phase.points"), ({"phase": 3}, "phase"), ({"betaz": [1]}, "betaz"),
])
def test_bad_settings_raise_naming_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        study_settings(bad)


def test_study_is_json_ready_and_its_checks_pass():
    study = allocation_study(SMALL)
    text = json.dumps(study, allow_nan=False)
    assert json.loads(text) == study
    assert study["Ns"] == [10, 100, 1000]
    assert len(study["single_manifold"]) == len(study["homogeneous"]) == 6 and len(study["phase"]) == 4
    assert {"name", "value", "expected", "tolerance", "ok"} <= set(study["checks"][0])
    failed = [c for c in study["checks"] if not c["ok"]]
    assert not failed, failed


@pytest.fixture(scope="module")
def default_study():
    return allocation_study({})


@pytest.mark.parametrize("figure", [af.features_vs_latents, af.phase_diagram_figure, af.loss_vs_latents])
def test_figures_draw_the_default_study_and_skip_an_empty_one(figure, default_study):
    png = figure(default_study)
    assert isinstance(png, str) and len(png) > 1000
    assert figure({}) is None
    assert figure({"single_manifold": [], "homogeneous": [], "phase": []}) is None
