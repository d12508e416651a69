"""Michaud et al.'s toy feature-manifold experiments (method §F.1): generators, toy SAE training at a
fixed lambda, the beta fit, the shell plateau, circle firing arcs, settings validation, figures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from saescale.report.toy_figures import beta_vs_dimension, circle_figure, toy_loss_curves
from saescale.toy.manifolds import (
    ToySpec,
    arc_summary,
    evaluate_toy_sae,
    firing_arcs,
    fit_beta,
    init_toy_sae,
    plateau,
    reference_loss,
    sample,
    toy_curve,
    toy_study,
    train_toy_sae,
    validate_settings,
)

FAST = {"steps": 800, "batch": 512, "lr": 1e-2, "lr_decay": 0.5, "eval_samples": 8192}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- generators --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,d", [("circle", 2), ("sphere", 2), ("sphere", 3), ("sphere", 6)])
def test_sphere_and_circle_points_have_unit_norm_and_zero_mean(kind, d):
    x = sample(kind, d, 8192, _gen())
    assert x.shape == (8192, d)
    torch.testing.assert_close(x.norm(dim=1), torch.ones(8192), atol=1e-5, rtol=0)
    assert x.mean(dim=0).abs().max() < 0.05


def test_shell_radius_is_uniform_between_half_and_two_by_default():
    x = sample("shell", 3, 8192, _gen())
    r = x.norm(dim=1).numpy()
    assert x.shape == (8192, 3) and r.min() > 0.5 and r.max() < 2.0
    assert x.mean(dim=0).abs().max() < 0.05
    assert stats.kstest(r, stats.uniform(0.5, 1.5).cdf).pvalue > 1e-3


def test_volume_uniform_shell_radius_has_density_proportional_to_r_to_the_d_minus_1():
    d = 3
    r = sample("shell", d, 8192, _gen(), radius="volume").norm(dim=1).numpy()
    assert r.min() > 0.5 and r.max() < 2.0
    volume_cdf = lambda t: (t**d - 0.5**d) / (2.0**d - 0.5**d)
    assert stats.kstest(r, volume_cdf).pvalue > 1e-3
    assert stats.kstest(r, stats.uniform(0.5, 1.5).cdf).pvalue < 1e-6


def test_reference_loss_is_the_mean_squared_norm():
    for kind, d, radius in [("sphere", 4, "uniform"), ("shell", 3, "uniform"), ("shell", 3, "volume")]:
        x = sample(kind, d, 1 << 16, _gen(), radius)
        assert reference_loss(kind, d, radius) == pytest.approx(float(x.pow(2).sum(1).mean()), rel=0.02)


def test_generators_reject_bad_kind_dimension_and_radius():
    with pytest.raises(ValueError, match="torus"):
        sample("torus", 3, 4, _gen())
    with pytest.raises(ValueError, match="d = 2"):
        sample("circle", 3, 4, _gen())
    with pytest.raises(ValueError, match="gaussian"):
        sample("shell", 3, 4, _gen(), radius="gaussian")


# ---- init and the fixed lambda ---------------------------------------------------------------------

@pytest.mark.parametrize("arch,penalty", [("relu_dn", 0.1), ("jumprelu_tanh", 1.0)])
def test_init_ties_encoder_to_unit_decoder_rows_with_zero_biases(arch, penalty):
    sae = init_toy_sae(ToySpec("sphere", 5, 12, arch))
    assert torch.equal(sae.W_enc, sae.W_dec)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(12))
    assert not sae.b_enc.any() and not sae.b_pre.any()
    assert float(sae.family.penalty) == pytest.approx(penalty)


def test_jumprelu_tanh_effective_constant_is_c_on_unit_scale_inputs():
    for d in (2, 3, 8):
        family = init_toy_sae(ToySpec("shell", d, 4, "jumprelu_tanh", tanh_c=0.1)).family
        assert family.params["tanh_scale"] * math.sqrt(d) == pytest.approx(0.1)  # the arch rescales by sqrt(d)


@pytest.mark.parametrize("arch", ["relu_dn", "jumprelu_tanh"])
def test_training_never_changes_lambda(arch):
    spec = ToySpec("shell", 2, 4, arch, steps=60, batch=256, lr=1e-2)
    init = init_toy_sae(spec)
    sae = train_toy_sae(spec)
    assert float(sae.family.penalty) == float(init.family.penalty) == pytest.approx(spec.penalty)
    assert not torch.equal(sae.W_dec, init.W_dec)  # it did train
    ev = evaluate_toy_sae(sae, "shell", 2, 4096)
    assert math.isfinite(ev["loss"]) and ev["loss"] == pytest.approx(ev["mse"] + ev["sparsity"])
    assert ev["loss"] < reference_loss("shell", 2)


# ---- the L(n) curves ---------------------------------------------------------------------------------

def test_shell_with_2d_latents_reaches_the_basis_solution_plateau():
    d = 2
    points = toy_curve({"kind": "shell", "d": d, "n": [1, 2 * d, 4 * d], "seeds": 3, **FAST})
    loss = {p["n"]: p["loss_min"] for p in points}
    assert loss[2 * d] < 0.3 * loss[1]
    assert loss[2 * d] <= 1.1 * loss[4 * d]
    # the +/- basis solution: 0.1 E|x|_1 = 0.1 * 1.25 * 4/pi ~ 0.159 (slightly less with shrinkage)
    assert loss[2 * d] < 0.17
    assert all(p["loss_min"] <= p["loss_mean"] for p in points) and len(points[0]["seeds"]) == 3


def test_circle_loss_decreases_with_n_for_small_n():
    points = toy_curve({"kind": "circle", "n": [1, 2, 4], **FAST})
    losses = [p["loss_min"] for p in points]
    assert losses[0] > losses[1] > losses[2]
    assert all(0 <= p["dead_fraction"] <= 1 and p["l0"] >= 0 for p in points)
    assert points[-1]["arc_length_tiling"] == pytest.approx(2 * math.pi / 4)


def test_fit_beta_recovers_a_planted_power_law():
    ns = np.geomspace(100, 10_000, 9)
    rng = np.random.default_rng(0)
    losses = 3.0 * ns**-0.05 * np.exp(rng.normal(0, 1e-3, ns.size))
    fit = fit_beta(ns, losses, 100, 10_000)
    assert fit["ok"] and fit["n_points"] == 9 and not fit["truncated"]
    assert fit["beta"] == pytest.approx(0.05, abs=3e-3)
    assert 0 < fit["stderr"] < 3e-3


def test_fit_beta_refuses_with_fewer_than_three_points_and_flags_truncation():
    fit = fit_beta([10, 50, 100, 200], [1.0, 0.9, 0.8, 0.7], 100, 10_000)
    assert not fit["ok"] and fit["beta"] is None and fit["n_points"] == 2
    assert "3" in fit["reason"] and fit["truncated"]
    fit = fit_beta([100, 200, 400], [1.0, 0.9, 0.8], 100, 10_000)
    assert fit["ok"] and fit["truncated"] and fit["range"] == [100, 400]


def test_plateau_is_the_first_n_within_tolerance_of_the_final_loss():
    ns = [1, 2, 3, 4, 6, 8, 16]
    losses = [1.0, 0.8, 0.4, 0.16, 0.158, 0.155, 0.154]
    p = plateau(ns, losses, d=2, tol=0.05)
    assert p["plateau_n"] == 4 and p["two_d"] == 4 and p["ratio"] == 1.0 and p["final_n"] == 16


# ---- circle firing arcs ------------------------------------------------------------------------------

def _tiling_circle_sae(n: int, offset: float = 0.0):
    """Latent i points at angle offset + 2 pi i / n and fires within pi / n of it: an exact tiling."""
    sae = init_toy_sae(ToySpec("circle", 2, n))
    phi = offset + 2 * math.pi * torch.arange(n) / n
    with torch.no_grad():
        sae.W_enc.copy_(torch.stack((phi.cos(), phi.sin()), dim=1))
        sae.b_enc.fill_(-math.cos(math.pi / n))
    return sae


def test_hand_built_tiling_gives_arcs_of_two_pi_over_n_covering_the_circle():
    n = 8
    arcs = firing_arcs(_tiling_circle_sae(n, offset=0.1))
    for i, latent in enumerate(arcs):
        assert len(latent) == 1
        start, end = latent[0]
        assert end - start == pytest.approx(2 * math.pi / n, abs=2 * 2 * math.pi / 3600)
        centre = (0.1 + 2 * math.pi * i / n) % (2 * math.pi)
        assert (start + end) / 2 % (2 * math.pi) == pytest.approx(centre, abs=1e-2)
    summary = arc_summary(arcs)
    assert summary["arc_coverage"] > 0.995
    assert summary["arc_length_sum"] == pytest.approx(2 * math.pi, rel=0.01)
    assert summary["arc_length_mean"] == pytest.approx(summary["arc_length_tiling"], rel=0.01)


def test_arc_through_angle_zero_is_one_arc_ending_past_two_pi():
    arcs = firing_arcs(_tiling_circle_sae(4))  # latent 0 points at angle 0
    (start, end), = arcs[0]
    assert start == pytest.approx(2 * math.pi - math.pi / 4, abs=2e-3) and end > 2 * math.pi
    assert end - start == pytest.approx(math.pi / 2, abs=4e-3)


def test_silent_and_always_on_latents():
    sae = _tiling_circle_sae(2)
    with torch.no_grad():
        sae.b_enc.copy_(torch.tensor([-2.0, 2.0]))  # never fires; always fires
    assert firing_arcs(sae) == [[], [[0.0, 2 * math.pi]]]


def test_trained_circle_arcs_are_valid_and_tile_when_alive():
    sae = train_toy_sae(ToySpec("circle", 2, 8, steps=600, batch=512, lr=1e-2))
    arcs = firing_arcs(sae)
    lengths = [sum(e - s for s, e in a) for a in arcs]
    assert all(0 <= length <= 2 * math.pi + 1e-9 for length in lengths)
    assert all(s < e for a in arcs for s, e in a)
    summary = arc_summary(arcs)
    assert summary["arc_coverage"] > 0.99  # every point of the circle is reconstructed by someone
    assert summary["arc_length_sum"] >= 2 * math.pi * 0.99


# ---- settings ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,key", [
    ({"kinds": ["torus"]}, "kinds"),
    ({"dims": {"sphere": [1]}}, "dims.sphere"),
    ({"dims": {"sphere": []}}, "dims.sphere"),
    ({"n": []}, "n"),
    ({"n": {"circle": [4], "sphere": [0], "shell": [4]}}, "n.sphere"),
    ({"steps": 0}, "steps"),
    ({"batch": -1}, "batch"),
    ({"lr": 0}, "lr"),
    ({"seeds": 0}, "seeds"),
    ({"beta_range": [100, 10]}, "beta_range"),
    ({"archs": ["topk"]}, "archs"),
    ({"shell_radius": "gaussian"}, "shell_radius"),
    ({"stepz": 10}, "stepz"),
])
def test_bad_settings_raise_naming_the_key(bad, key):
    with pytest.raises(ValueError, match=rf"toy\.{key}\b"):
        validate_settings(bad)


def test_toy_curve_validates_kind_and_d():
    with pytest.raises(ValueError, match=r"toy\.kind"):
        toy_curve({"kind": "torus", "d": 3})
    with pytest.raises(ValueError, match=r"toy\.d\b"):
        toy_curve({"kind": "sphere", "d": 1})


# ---- the study and its figures -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_study():
    return toy_study({"kinds": ["circle", "sphere", "shell"], "dims": {"sphere": [3], "shell": [2]},
                      "n": [1, 2, 4], "steps": 40, "batch": 256, "eval_samples": 2048, "beta_range": [1, 4],
                      "circle_panels": [2, 4], "device": "cpu"})


def test_study_is_strict_json_with_fits_plateau_and_panels(tiny_study):
    text = json.dumps(tiny_study, allow_nan=False)
    assert json.loads(text)["settings"]["steps"] == 40
    kinds = [(c["kind"], c["d"]) for c in tiny_study["curves"]]
    assert kinds == [("circle", 2), ("sphere", 3), ("shell", 2)]
    assert all(c["beta_fit"]["ok"] for c in tiny_study["curves"])
    shell = tiny_study["curves"][2]
    assert shell["plateau"]["two_d"] == 4 and shell["plateau"]["plateau_n"] in (1, 2, 4)
    panels = tiny_study["circle_panels"]
    assert [p["n"] for p in panels] == [2, 4]
    assert all(len(p["decoder"]) == len(p["arcs"]) == p["n"] for p in panels)
    assert len(panels[0]["points"]) == len(panels[0]["reconstructions"])


@pytest.mark.parametrize("figure", [toy_loss_curves, circle_figure, beta_vs_dimension])
def test_figures_draw_a_tiny_study_and_nothing_from_an_empty_one(figure, tiny_study):
    png = figure(tiny_study)
    assert isinstance(png, str) and len(png) > 1000
    assert figure({}) is None
    assert figure({"curves": [], "circle_panels": []}) is None
