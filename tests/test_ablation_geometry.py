"""Ablation sparsity (method §C.7) and latent geometry (method §F.3, F.4) against hand-checked cases."""

import math

import numpy as np
import pytest
import torch

from saescale.evaluate.ablation import (
    ResidPatch,
    ablation_effects,
    ablation_sparsity,
    channel_ablation_delta,
    latent_ablation_delta,
    sample_pairs,
    sparsity_summary,
)
from saescale.evaluate.geometry import (
    expected_random_nn_cosine,
    firing_frequencies,
    nearest_neighbour_cosines,
    nn_summary,
    random_reference,
    rank_frequency_fit,
)

# --- ablation sparsity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("T,V", [(1, 7), (16, 50), (4, 10)])
def test_one_hot_logit_effect_has_sparsity_one_over_VT(T, V):
    delta = torch.zeros(T, V)
    delta[T // 2, 3] = -2.5
    assert ablation_sparsity(delta).item() == pytest.approx(1 / (V * T), rel=1e-12)


def test_constant_logit_shift_is_no_effect_after_median_centring():
    delta = torch.full((3, 16, 101), 4.0)
    delta[1] = -0.7  # a different constant per effect
    delta[2] = torch.arange(16.0)[:, None]  # a different constant per position
    assert ablation_sparsity(delta).isnan().all()


def test_median_centring_removes_a_shift_added_to_a_real_effect():
    T, V = 8, 64
    effect = torch.zeros(T, V, dtype=torch.float64)
    effect[0, 5], effect[3, 9] = 1.0, -2.0
    shifted = (
        effect + torch.linspace(-3, 3, T, dtype=torch.float64)[:, None]
    )  # per-position constant: invisible to softmax
    assert ablation_sparsity(shifted).item() == pytest.approx(ablation_sparsity(effect).item(), rel=1e-9)
    # (1 + 2)^2 / (1 + 4) = 9/5 effective entries
    assert ablation_sparsity(effect).item() == pytest.approx(9 / 5 / (V * T), rel=1e-12)


def test_dense_gaussian_effect_has_sparsity_two_over_pi():
    # E|x|^2 / E[x^2] = 2/pi. With N = T*V = 804k entries the relative standard error of the ratio is below
    # (2*0.95 + 1.41)/sqrt(N) ~ 0.4%, and centring by a median ~ N(0, 1/V) shifts it by O(1/V): a 1.5%
    # tolerance is > 4 sigma, while a one-off error (e.g. no square, 0.80) falls far outside.
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(2, 16, 50257, generator=g) * 3.0 + 1.5
    s = ablation_sparsity(delta)
    assert s.shape == (2,)
    assert torch.allclose(s, torch.full_like(s, 2 / math.pi), rtol=0.015)


def test_ablation_sparsity_ignores_changes_below_atol():
    delta = torch.zeros(2, 4, 9)
    delta[0, 1, 2] = 1e-7
    delta[1, 1, 2] = 1.0
    s = ablation_sparsity(delta, atol=1e-5)
    assert s[0].isnan() and s[1].item() == pytest.approx(1 / 36)


def test_sparsity_summary_averages_over_pairs_and_counts_no_effect_ones():
    summary = sparsity_summary(torch.tensor([0.1, float("nan"), 0.3]))
    assert summary["mean"] == pytest.approx(0.2) and summary["n_pairs"] == 3 and summary["n_no_effect"] == 1


# --- sampling pairs ------------------------------------------------------------------------------------


def test_sample_pairs_returns_only_active_pairs_inside_the_horizon():
    g = torch.Generator().manual_seed(0)
    B, S, n, T = 3, 20, 50, 4
    codes = torch.rand(B, S, n, generator=g) * (torch.rand(B, S, n, generator=g) < 0.05)
    pairs = sample_pairs(codes, count=40, generator=g, horizon=T)
    assert len(pairs.window) == 40
    assert (codes[pairs.window, pairs.position, pairs.unit] > 0).all()
    assert torch.equal(pairs.value, codes[pairs.window, pairs.position, pairs.unit])
    assert (pairs.position <= S - T).all()
    triples = set(zip(pairs.window.tolist(), pairs.position.tolist(), pairs.unit.tolist()))
    assert len(triples) == 40  # without replacement


def test_sample_pairs_from_sparse_codes_skips_zero_slots_and_maps_slots_to_latents():
    values = torch.tensor([[[0.5, 0.0], [0.0, 0.0], [2.0, 3.0]]])  # [1, 3, 2]
    indices = torch.tensor([[[7, 1], [4, 5], [2, 9]]])
    pairs = sample_pairs((values, indices), count=100, horizon=1)
    got = sorted(zip(pairs.position.tolist(), pairs.unit.tolist(), pairs.value.tolist()))
    assert got == [(0, 7, 0.5), (2, 2, 2.0), (2, 9, 3.0)]


# --- ablation effects through a callable model -----------------------------------------------------------


def toy_linear_model(U: torch.Tensor, A: torch.Tensor, embed: torch.Tensor):
    """resid[b, s] = embed[tokens[b, s]] (+ patch at its position) and
    logits[b, t] = U @ sum_{s<=t} A[t-s] resid[b, s] (a causal linear mixer), so a residual edit e at p moves logits at t >= p by U A[t-p] e."""

    def run_logits(tokens: torch.Tensor, patch: ResidPatch) -> torch.Tensor:
        resid = embed[tokens].clone()  # [P, S, d]
        resid[torch.arange(len(tokens)), patch.position] += patch.delta
        S = tokens.shape[1]
        lag = torch.arange(S)[:, None] - torch.arange(S)[None, :]  # t - s
        mix = torch.where(lag[..., None, None] >= 0, A[lag.clamp(0, S - 1)], torch.zeros(()))  # [S, S, d, d]
        mixed = torch.einsum("tsij,bsj->bti", mix, resid)
        return mixed @ U.T

    return run_logits


def test_ablation_effects_of_toy_linear_model_match_the_analytic_deltas():
    g = torch.Generator().manual_seed(2)
    P, S, d, n, V, T = 3, 8, 5, 6, 11, 3
    U = torch.randn(V, d, generator=g, dtype=torch.float64)
    A = torch.randn(S, d, d, generator=g, dtype=torch.float64)
    embed = torch.randn(20, d, generator=g, dtype=torch.float64)
    W_dec = torch.randn(n, d, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 20, (P, S), generator=g)
    position, latents = torch.tensor([0, 5, 2]), torch.tensor([1, 4, 4])
    values = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    scale = torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)

    delta = latent_ablation_delta(values, latents, W_dec, scale)
    effects = ablation_effects(toy_linear_model(U, A, embed), tokens, position, delta, horizon=T)

    assert effects.shape == (P, T, V)
    for b in range(P):
        e = -values[b] * scale[b] * W_dec[latents[b]]
        expected = torch.stack([U @ A[lag] @ e for lag in range(T)])
        torch.testing.assert_close(effects[b], expected.float(), rtol=1e-5, atol=1e-5)


def test_ablation_effects_reuses_given_clean_logits_and_rejects_positions_past_the_window():
    calls = []

    def run_logits(tokens, patch):
        calls.append(patch)
        logits = torch.zeros(*tokens.shape, 4)
        logits[torch.arange(len(tokens)), patch.position, 0] = patch.delta[:, 0]
        return logits

    tokens, delta = torch.zeros(2, 6, dtype=torch.long), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    clean = torch.zeros(2, 6, 4)
    effects = ablation_effects(run_logits, tokens, torch.tensor([1, 3]), delta, horizon=2, clean_logits=clean)
    assert len(calls) == 1
    assert effects[0, 0, 0] == 1.0 and effects.abs().sum() == 1.0
    with pytest.raises(ValueError, match="runs past the window"):
        ablation_effects(run_logits, tokens, torch.tensor([1, 5]), delta, horizon=2)


def test_channel_ablation_delta_zeroes_exactly_that_channel():
    resid = torch.tensor([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]])
    channels = torch.tensor([1, 2])
    delta = channel_ablation_delta(resid[torch.arange(2), channels], channels, d=3)
    assert torch.equal(resid + delta, torch.tensor([[1.0, 0.0, 3.0], [4.0, 5.0, 0.0]]))


# --- firing frequencies and the rank-frequency slope -----------------------------------------------------


def test_rank_frequency_fit_recovers_the_exponent_of_sampled_zipf_firings():
    # each latent fires independently with p_i = 0.3 i^-0.7; counts over 10^6 tokens carry >= 3.5% noise at
    # rank 10^4 (E count ~ 480), which moves an OLS slope over two decades by well under 0.02
    rng = np.random.default_rng(0)
    n, s, n_tokens = 20_000, 0.7, 1_000_000
    p = 0.3 * np.arange(1, n + 1) ** -s
    counts = rng.binomial(n_tokens, p)
    counts = np.concatenate(
        [rng.permutation(counts), np.zeros(500, dtype=int)]
    )  # unsorted, with dead latents
    fit = rank_frequency_fit(firing_frequencies(counts, n_tokens), (100, 10_000))
    assert fit["slope"] == pytest.approx(-s, abs=0.02)
    assert fit["alpha_paper"] == pytest.approx(s, abs=0.02)
    assert fit["alpha_model"] == pytest.approx(s - 1, abs=0.02)
    assert fit["n_dead"] == 500 and fit["n_points"] == 9901 and not fit["clipped"]


def test_rank_frequency_fit_clips_the_range_to_the_alive_latents():
    freqs = np.arange(1, 301, dtype=float)[::-1] ** -1.0  # exact power law, slope -1 in rank
    fit = rank_frequency_fit(np.concatenate([freqs, np.zeros(10)]), (10, 1000))
    assert fit["clipped"] and fit["rank_range"] == [10, 300]
    assert fit["slope"] == pytest.approx(-1.0, abs=1e-10)


def test_firing_frequencies_reject_counts_above_the_token_count():
    assert firing_frequencies(torch.tensor([0, 5, 10]), 10).tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="n_tokens=10"):
        firing_frequencies(np.array([11]), 10)


# --- decoder nearest-neighbour cosines -------------------------------------------------------------------


def test_duplicated_decoder_directions_have_nn_cosine_one_and_point_at_each_other():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(10, 64, generator=g)
    W_dec = torch.cat([base, 2.5 * base[[2, 7]]])  # rows 10, 11 duplicate rows 2, 7 up to scale
    max_cos, neighbour = nearest_neighbour_cosines(W_dec, max_block_elements=24)  # 2-row blocks
    torch.testing.assert_close(max_cos[[2, 7, 10, 11]], torch.ones(4), rtol=0, atol=1e-6)
    assert neighbour[[2, 7, 10, 11]].tolist() == [10, 11, 2, 7]
    assert (max_cos[[0, 1, 3, 4, 5, 6, 8, 9]] < 0.9).all()


@pytest.mark.parametrize("block_elements", [1, 200, 10_000])
def test_blocked_nearest_neighbour_matches_brute_force(block_elements):
    g = torch.Generator().manual_seed(4)
    W_dec = torch.randn(97, 16, generator=g, dtype=torch.float64)
    max_cos, neighbour = nearest_neighbour_cosines(
        W_dec, max_block_elements=block_elements, dtype=torch.float64
    )
    unit = W_dec / W_dec.norm(dim=1, keepdim=True)
    sims = unit @ unit.T
    sims.fill_diagonal_(-2.0)
    expected_cos, expected_nb = sims.max(dim=1)
    torch.testing.assert_close(max_cos, expected_cos)
    assert torch.equal(neighbour, expected_nb)


def test_random_reference_matches_the_exact_expected_max_cosine():
    # E[nn] from the Beta distribution of random cosines; the per-latent sd is ~0.011 at (4096, 768), so
    # the mean of 4096 (weakly dependent) values is within 0.002 of it; method §F.4 quotes ~0.13
    expected = expected_random_nn_cosine(4096, 768)
    assert expected == pytest.approx(0.13, abs=0.005)
    assert expected < math.sqrt(2 * math.log(4096) / 768)
    max_cos, _ = random_reference(4096, 768, torch.Generator().manual_seed(5))
    assert max_cos.mean().item() == pytest.approx(expected, abs=0.002)
    small, _ = random_reference(500, 8, torch.Generator().manual_seed(6))  # a very different regime
    assert small.mean().item() == pytest.approx(expected_random_nn_cosine(500, 8), abs=0.01)


def test_nn_summary_splits_near_duplicates_by_alive_and_dead_neighbours():
    max_cos = torch.tensor([0.95, 0.99, 0.5, 0.98, 0.2])
    neighbour = torch.tensor([2, 3, 0, 1, 0])
    alive = torch.tensor([True, True, True, False, False])
    summary = nn_summary(max_cos, neighbour, alive)
    above_090, above_097 = summary["thresholds"]["0.9"], summary["thresholds"]["0.97"]
    assert above_090["count"] == 3 and above_097["count"] == 2
    assert above_090["latent_alive_neighbour_alive"] == 1  # latent 0 -> 2
    assert above_090["latent_alive_neighbour_dead"] == 1  # latent 1 -> 3
    assert above_090["latent_dead_neighbour_alive"] == 1  # latent 3 -> 1
    assert above_097["latent_alive_neighbour_dead"] == 1 and above_097["latent_dead_neighbour_alive"] == 1
    assert sum(summary["histogram"]["counts"]) == 5 and len(summary["histogram"]["edges"]) == 201
    assert "latent_alive_neighbour_alive" not in nn_summary(max_cos, neighbour)["thresholds"]["0.9"]
