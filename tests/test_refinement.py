"""Refinement of activation values on a fixed support (method §C.9) against per-token NNLS and known answers."""

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from saescale.evaluate.refinement import refine_values, refinement_summary, support_from_dense

EXACT = {"iters": 5000, "tol": 1e-12}  # run to convergence when comparing against a reference solver


def unit_rows(n: int, d: int) -> torch.Tensor:
    W = torch.randn(n, d, dtype=torch.float64)
    return W / W.norm(dim=1, keepdim=True)


def padded_supports(B: int, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random supports of size 0..m padded to m; padding has zero or negative values and indices that
    repeat a support index, which refine_values must ignore."""
    indices = torch.stack([torch.randperm(n)[:m] for _ in range(B)])
    values = torch.rand(B, m, dtype=torch.float64) + 0.1
    sizes = torch.randint(0, m + 1, (B,))
    sizes[0], sizes[1] = 0, m  # always cover an empty and a full support
    pad = torch.arange(m) >= sizes[:, None]
    values[pad] = -0.3 * torch.rand(int(pad.sum()), dtype=torch.float64) * (torch.rand(int(pad.sum())) < 0.5)
    indices[pad] = indices[:, :1].expand(-1, m)[pad]
    return values, indices


def objective(target, W_dec, values, indices):
    z = values.clamp_min(0).double()
    return ((target - (z.unsqueeze(-1) * W_dec[indices]).sum(1)) ** 2).sum(-1)


def test_matches_scipy_nnls_per_token_on_the_support():
    d, n, m, B = 16, 40, 6, 64
    W_dec = unit_rows(n, d)
    values, indices = padded_supports(B, n, m)
    target = torch.randn(B, d, dtype=torch.float64)
    refined = refine_values(target, W_dec, values, indices, **EXACT)
    for b in range(B):
        on = values[b] > 0
        expected = np.zeros(m)
        if on.any():
            expected[on.numpy()] = nnls(W_dec[indices[b, on]].T.numpy(), target[b].numpy())[0]
        np.testing.assert_allclose(refined[b].numpy(), expected, atol=1e-4)


def test_positive_least_squares_solution_is_returned_unchanged_by_the_constraint():
    d, n, m, B = 16, 40, 6, 32
    W_dec = unit_rows(n, d)
    indices = torch.stack([torch.randperm(n)[:m] for _ in range(B)])
    D = W_dec[indices]  # [B, m, d]
    z_true = 1 + torch.rand(B, m, dtype=torch.float64)
    target = (z_true.unsqueeze(-1) * D).sum(1) + 0.01 * torch.randn(B, d, dtype=torch.float64)
    lstsq = torch.linalg.lstsq(D.transpose(1, 2), target.unsqueeze(-1)).solution.squeeze(-1)  # [B, m]
    assert (lstsq > 0).all()  # the premise: the unconstrained optimum is strictly feasible
    refined = refine_values(target, W_dec, torch.rand(B, m, dtype=torch.float64) + 0.1, indices, **EXACT)
    torch.testing.assert_close(refined, lstsq, atol=1e-6, rtol=0)


@pytest.mark.parametrize("iters", [1, 3, 200])
def test_padding_is_zero_values_non_negative_and_objective_never_increases(iters):
    d, n, m, B = 16, 40, 6, 256
    W_dec = unit_rows(n, d)
    values, indices = padded_supports(B, n, m)
    target = torch.randn(B, d, dtype=torch.float64)
    refined = refine_values(target, W_dec, values, indices, iters=iters)
    assert (refined[values <= 0] == 0).all()
    assert (refined >= 0).all()
    before, after = objective(target, W_dec, values, indices), objective(target, W_dec, refined, indices)
    assert (after <= before + 1e-12).all()


def test_a_token_that_ends_above_its_start_keeps_its_start_values(monkeypatch):
    """The step size comes from power iteration, not a proven bound; if it were too large and a token
    diverged, refinement must fall back to the encoder's values rather than make the fit worse."""
    import saescale.evaluate.refinement as refinement

    true_lipschitz = refinement._lipschitz
    monkeypatch.setattr(refinement, "_lipschitz", lambda G: 0.2 * true_lipschitz(G))  # step ~5x too large
    W_dec = unit_rows(40, 16)
    values, indices = padded_supports(16, 40, 6)
    target = torch.randn(16, 16, dtype=torch.float64)
    refined = refinement.refine_values(target, W_dec, values, indices, iters=50)
    kept_start = (refined == values.clamp_min(0)).all(-1) & (values > 0).any(-1)
    assert kept_start.any()  # some tokens did diverge under the bad step and were reset
    assert (objective(target, W_dec, refined, indices) <= objective(target, W_dec, values, indices)).all()


def test_float32_inputs_give_float32_values_close_to_the_float64_solution():
    W_dec = unit_rows(40, 16)
    values, indices = padded_supports(64, 40, 6)
    target = torch.randn(64, 16, dtype=torch.float64)
    exact = refine_values(target, W_dec, values, indices, **EXACT)
    refined = refine_values(target.float(), W_dec.float(), values.float(), indices, **EXACT)
    assert refined.dtype == torch.float32
    torch.testing.assert_close(refined.double(), exact, atol=1e-3, rtol=0)


def test_uniformly_shrunk_codes_of_an_exact_reconstruction_are_recovered():
    d, n, k, B, shrink = 256, 512, 8, 128, 0.7
    W_dec = unit_rows(n, d)  # nearly orthogonal in d=256
    indices = torch.stack([torch.randperm(n)[:k] for _ in range(B)])
    z_true = 0.5 + torch.rand(B, k, dtype=torch.float64)
    target = (z_true.unsqueeze(-1) * W_dec[indices]).sum(1)  # exact sparse reconstruction
    refined = refine_values(target, W_dec, shrink * z_true, indices, **EXACT)
    torch.testing.assert_close(refined, z_true, atol=1e-6, rtol=0)

    summary = refinement_summary(shrink * z_true, refined)
    assert summary["fraction_increased"] == 1.0
    assert summary["mean_change"] > 0
    assert summary["mean_relative_change"] == pytest.approx(1 / shrink - 1, abs=1e-5)
    assert summary["mean_activation_after"] == pytest.approx(float(z_true.mean()), abs=1e-6)


def test_summary_counts_only_support_entries():
    before = torch.tensor([[1.0, 2.0, 0.0], [4.0, 3.0, 0.0]])
    after = torch.tensor([[2.0, 1.0, 5.0], [6.0, 3.0, 0.0]])  # the 5.0 is off support: ignored
    assert refinement_summary(before, after) == pytest.approx({
        "mean_change": (1 - 1 + 2 + 0) / 4,
        "mean_relative_change": (1.0 - 0.5 + 0.5 + 0) / 4,
        "fraction_increased": 2 / 4,  # an unchanged value is not an increase
        "mean_activation_before": 10 / 4,
        "mean_activation_after": 12 / 4,
    })


def test_support_from_dense_round_trips_to_the_dense_code():
    codes = torch.rand(10, 30) * (torch.rand(10, 30) < 0.2)
    codes[0] = 0  # a token with no active latent
    codes[1, :7] = torch.rand(7) + 0.1  # at least 7 nonzeros somewhere
    values, indices = support_from_dense(codes)
    assert values.shape[1] == int((codes > 0).sum(1).max())
    assert (values[values > 0].numel()) == int((codes > 0).sum())
    dense = torch.zeros_like(codes).scatter_add_(1, indices, values)
    assert torch.equal(dense, codes)


def test_support_from_dense_keeps_one_slot_when_nothing_fires():
    values, indices = support_from_dense(torch.zeros(3, 5))
    assert values.shape == indices.shape == (3, 1)
    assert (values == 0).all()
