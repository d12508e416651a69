"""Gao et al. section 3 studies (method §D.1): L(C) frontier, tokens to convergence, lr vs n, joint law vs GPT-4,
and the trainer's convergence mode."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from saescale.config import LR_VARIANT, lr_for, lr_sweep_jobs, lr_variant, recipe, validate
from saescale.scaling.compute import compute_study, frontier
from saescale.scaling.convergence import converged_at, convergence_study
from saescale.scaling.fits import bootstrap_power_law, fit_all, loglog_slope
from saescale.scaling.lr import best_lr, lr_study
from saescale.scaling.studies import GPT4_JOINT, joint_comparison

MINIMAL = {"subjects": {"tiny": {"model": "builtin", "layers": [2]}}}


def _curves(ns, a=5.0, b=0.3, e=0.05, d=128, steps=60, batch=4096):
    """Training curves whose envelope follows L(C) = a C^-b + e: each n's curve decays from 1 towards its own
    floor, reached at a compute proportional to n (bigger SAEs win only with more compute)."""
    rows = []
    for n in ns:
        tokens = batch * np.arange(1, steps + 1) * (n / ns[0])
        flops = 6 * tokens * n * d
        floor = a * (6 * 4096 * 30 * n / ns[0] * n * d) ** (-b) + e
        loss = floor + (1 - floor) * np.exp(-tokens / (batch * 8 * n / ns[0]))
        rows.append(pd.DataFrame({"arch": "topk", "n": n, "k": 8, "tokens": tokens, "flops": flops, "heldout_fvu": loss}))
    return pd.concat(rows, ignore_index=True)


def test_frontier_is_the_lowest_loss_reached_within_each_budget():
    logs = _curves([128, 512, 2048])
    pts = frontier(logs, "heldout_fvu", per_decade=8)
    assert np.all(np.diff(pts["loss"]) <= 1e-12), "more compute never makes the frontier worse"
    for _, p in pts.iterrows():
        within = logs[logs["flops"] <= p["flops"] * (1 + 1e-9)]
        assert p["loss"] == pytest.approx(within["heldout_fvu"].min())
    assert pts["n"].iloc[0] == 128 and pts["n"].iloc[-1] == 2048, "small SAEs win at small compute, large at large"


def test_compute_fit_recovers_a_planted_frontier_with_intervals():
    c = np.logspace(9, 14, 30)
    rng = np.random.default_rng(0)
    loss = (40.0 * c ** (-0.2) + 0.02) * np.exp(rng.normal(0, 0.01, c.size))
    fit = bootstrap_power_law(c, loss, reps=100)
    assert fit["ok"] and abs(fit["b"] - 0.2) < 0.03 and abs(fit["e"] - 0.02) < 0.005
    lo, hi = fit["b_ci"]
    assert lo <= fit["b"] <= hi and hi - lo < 0.1


def test_compute_study_refuses_a_single_n():
    study = compute_study(_curves([256]), reps=10)
    assert study[0]["fit"]["ok"] is False and "one n" in study[0]["fit"]["reason"]


def test_converged_at_is_the_first_doubling_with_a_small_gain():
    tokens = 2.0 ** np.arange(10, 25)
    loss = 0.1 + 2.0 ** (-(np.arange(15)))  # gains shrink geometrically
    t = converged_at(tokens, loss, 0.01)
    i = int(np.where(tokens == t)[0][0])
    assert 1 - loss[i] / loss[i - 1] < 0.01 <= 1 - loss[i - 1] / loss[i - 2]


def test_converged_at_is_none_when_the_curve_still_improves():
    tokens = 2.0 ** np.arange(10, 20)
    assert converged_at(tokens, tokens ** -0.3, 0.01) is None  # a pure power law gains 19% per doubling forever


def test_tokens_to_convergence_exponent_is_recovered():
    rows = []
    for n in (128, 256, 512, 1024, 2048):
        tokens = 2.0 ** np.arange(8, 28, 0.25)
        t_c = 10 * n**0.6  # a power-law decay onto a floor, reached on a token scale proportional to n^0.6
        rows.append(pd.DataFrame({"arch": "topk", "k": 8, "n": n, "tokens": tokens,
                                  "heldout_fvu": 0.1 * (1 + (t_c / tokens) ** 0.5)}))
    study = convergence_study(pd.concat(rows), "heldout_fvu", 0.01)
    fit = study[0]["fit"]
    assert fit["ok"] and fit["slope"] == pytest.approx(0.6, abs=0.05)
    assert all(p["tokens"] for p in study[0]["points"])


def test_convergence_study_reports_censored_runs():
    logs = pd.DataFrame({"arch": "topk", "k": 8, "n": 128, "tokens": 2.0 ** np.arange(10, 20),
                         "heldout_fvu": 2.0 ** (-np.arange(10) * 0.5)})
    study = convergence_study(logs, "heldout_fvu", 0.01)
    assert study[0]["points"][0]["tokens"] is None and study[0]["points"][0]["censored_at"] == 2.0**19
    assert not study[0]["fit"]["ok"] and "0 of 1 SAEs converged" in study[0]["fit"]["reason"]


def test_best_lr_finds_the_vertex_between_grid_points():
    lrs = np.array([1, 2, 4, 8]) * 1e-4
    loss = (np.log(lrs) - np.log(3e-4)) ** 2 + 0.1
    best = best_lr(lrs, loss)
    assert best["method"] == "parabola" and best["lr"] == pytest.approx(3e-4, rel=1e-6)
    edge = best_lr(lrs, -np.log(lrs))
    assert edge["at_edge"] and edge["lr"] == lrs[-1]


def test_lr_study_recovers_the_inverse_square_root_rule():
    """The largest converging lr planted at 3x the 1/sqrt(n) rule, between grid points: its exponent is -0.5."""
    points = []
    for n in (128, 512, 2048, 8192):
        for m in (0.25, 0.5, 1, 2, 4, 8):
            rate = m * 1e-3 * (128 / n) ** 0.5
            points.append({"n": n, "lr": rate, "multiple": m, "loss": 0.05, "converges": m <= 3,
                           "tokens_to_convergence": None, "tokens": [1], "loss_curve": [0.05]})
    study = lr_study(points)
    assert study["fit"]["ok"] and study["fit"]["slope"] == pytest.approx(-0.5, abs=1e-6)
    assert all(r["largest"]["interval"] == pytest.approx([2e-3 * (128 / r["n"]) ** 0.5, 4e-3 * (128 / r["n"]) ** 0.5])
               for r in study["per_n"])


def test_lr_study_refuses_when_every_lr_converges():
    points = [{"n": n, "lr": m, "multiple": m, "loss": -m, "converges": True, "tokens_to_convergence": None,
               "tokens": [1], "loss_curve": [-m]} for n in (128, 256, 512) for m in (1, 2)]
    study = lr_study(points)
    assert not study["fit"]["ok"] and "0 n with the largest converging lr inside the sweep" in study["fit"]["reason"]
    assert not study["ratio"]["ok"]


def test_loglog_slope_has_an_error_and_refuses_two_points():
    x = np.array([1, 2, 4, 8, 16.0])
    fit = loglog_slope(x, 3 * x**-0.7 * np.exp([0.01, -0.01, 0.02, 0, -0.02]))
    assert fit["ok"] and abs(fit["slope"] + 0.7) < 0.02 and 0 < fit["slope_err"] < 0.05 and fit["r2"] > 0.99
    assert not loglog_slope([1, 2], [1, 2])["ok"]


def test_joint_comparison_reports_paper_constants_exponents_and_residuals():
    n = np.repeat([256, 512, 1024, 2048, 4096], 3)
    k = np.tile([8, 16, 32], 5)
    p = GPT4_JOINT
    y = np.exp(p["alpha"] + p["beta_k"] * np.log(k) + p["beta_n"] * np.log(n) + p["gamma"] * np.log(k) * np.log(n)) \
        + np.exp(p["zeta"] + p["eta"] * np.log(k))
    table = pd.DataFrame({"arch": "topk", "n": n, "k": k, "fvu": y, "delta_ce": y})
    out = joint_comparison(table, {"fvu": fit_all(table, "fvu")})
    assert len(out) == 1 and len(out[0]["residuals"]) == 15
    assert out[0]["max_abs_log_residual"] < 1e-3
    k32 = next(e for e in out[0]["exponents"] if e["k"] == 32)
    assert k32["gpt4"] == pytest.approx(0.017 + 0.042 * math.log(32))  # method §D.1: 0.163 at k = 32


def test_lr_variant_names_round_trip_and_scale_the_lr():
    cfg = validate({**MINIMAL, "scaling": {"lr_sweep": {"enabled": True, "n": [128, 256], "multiples": [0.5, 2]}},
                    "sweep": {"n": [128, 256], "k": [8]}})
    assert lr_variant("topk", 0.5) == "topk_lr0p5" and LR_VARIANT.fullmatch("topk_lr0p5")["multiple"] == "0p5"
    arch, train = recipe(cfg, "topk_lr0p5")
    assert arch == "topk" and lr_for(train, 128) == pytest.approx(0.5 * lr_for(cfg["train"], 128))
    jobs = lr_sweep_jobs(cfg)
    assert {(j["arch"], j["n"]) for j in jobs} == {(a, n) for a in ("topk_lr0p5", "topk", "topk_lr2") for n in (128, 256)}


def test_lr_sweep_config_errors_name_the_field():
    from saescale.config import ConfigError

    with pytest.raises(ConfigError, match="scaling.lr_sweep.arch"):
        validate({**MINIMAL, "scaling": {"lr_sweep": {"enabled": True, "arch": "nope"}}})
    with pytest.raises(ConfigError, match="scaling.lr_sweep.k"):
        validate({**MINIMAL, "scaling": {"lr_sweep": {"enabled": True, "k": 999}}})


def _spec(**kw):
    from saescale.sae.train import TrainSpec

    base = {"arch": "topk", "n": 64, "k": 4, "d_model": 16, "lr": 3e-3, "batch_size": 256, "tokens": 256 * 400,
            "adam_eps": 6.25e-10, "adam_betas": (0.9, 0.999), "auxk_coef": 1 / 32, "k_aux": 8, "dead_tokens": 8192,
            "ema_decay": 0.0, "log_every": 10, "checkpoint_seconds": 0, "seed": 0, "device": "cpu"}
    return TrainSpec(**{**base, **kw})


def _data(rows=20000, d=16, atoms=32, seed=0):
    rng = np.random.default_rng(seed)
    dictionary = rng.normal(size=(atoms, d))
    dictionary -= dictionary.mean(axis=1, keepdims=True)
    codes = rng.random((rows, atoms)) < 3 / atoms
    x = (codes * rng.uniform(0.5, 1.5, codes.shape)) @ dictionary
    x = x[np.linalg.norm(x, axis=1) > 0].astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_convergence_mode_stops_where_the_rule_says_and_logs_heldout_fvu(tmp_path):
    from saescale.normalize import layer_stats
    from saescale.sae.train import train_sae
    from saescale.store import InMemoryBatches

    x = _data(d=8, atoms=8)
    train, heldout = x[:16000], x[16000:]
    stats = layer_stats([train], len(train))
    # a loose tolerance, so this small problem converges well inside the cap
    spec = _spec(n=16, k=3, d_model=8, lr=1e-2, k_aux=4, convergence_tolerance=0.25)
    _, rows, summary = train_sae(InMemoryBatches(train, 256, 0), np.asarray(stats["geometric_median"]),
                                 stats["baseline_mse"], spec, tmp_path / "ck.pt", train[:2048], heldout)
    t = [r["tokens"] for r in rows]
    assert all(np.isfinite(r["heldout_fvu"]) for r in rows)
    assert summary["converged_at_tokens"] == converged_at(t, [r["heldout_fvu"] for r in rows], 0.25)
    assert summary["tokens"] == t[-1] == summary["converged_at_tokens"] < spec.tokens
    with pytest.raises(ValueError, match="heldout_rows"):
        train_sae(InMemoryBatches(train, 256, 0), np.asarray(stats["geometric_median"]), stats["baseline_mse"],
                  spec, tmp_path / "ck2.pt", train[:2048], None)


def test_a_penalty_arch_is_not_converged_while_lambda_still_moves():
    tokens = 2.0 ** np.arange(10, 20)
    rising = np.linspace(0.05, 0.2, 10)  # lambda calibration raises the held-out FVU: no improvement, no convergence
    penalty = np.r_[np.linspace(0.01, 0.09, 8), 0.1, 0.1]
    logs = pd.DataFrame({"arch": "relu", "k": 8, "n": 64, "tokens": tokens, "heldout_fvu": rising, "penalty": penalty})
    point = convergence_study(logs, "heldout_fvu", 0.01)[0]["points"][0]
    assert point["tokens"] == 2.0**18  # the first logged point once lambda is frozen, not the first point
    assert converged_at(tokens, rising, 0.01) == 2.0**11
