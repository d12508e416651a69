"""Tests for saescale.scaling.fits: planted-parameter recovery, guards, grouping, JSON safety."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from saescale.scaling.fits import (
    JOINT_PARAMS,
    fit_all,
    fit_joint_law,
    fit_power_law,
    predict_joint_law,
    predict_power_law,
    to_jsonable,
)

GPT4 = dict(alpha=-0.50, beta_k=0.26, beta_n=-0.017, gamma=-0.042, zeta=-1.32, eta=-0.085)
N = 2.0 ** np.arange(8, 17)


def _power(n, a, b, e):
    return a * n ** (-b) + e


def _joint(n, k, p):
    ln, lk = np.log(n), np.log(k)
    return np.exp(p["alpha"] + p["beta_k"] * lk + p["beta_n"] * ln + p["gamma"] * lk * ln) + np.exp(
        p["zeta"] + p["eta"] * lk
    )


def _noisy(y, sigma, seed):
    return y * np.exp(np.random.default_rng(seed).normal(0.0, sigma, size=np.shape(y)))


def test_power_law_recovers_planted_params():
    y = _noisy(_power(N, 2.0, 0.3, 0.05), 0.002, seed=0)
    f = fit_power_law(N, y)
    assert f["ok"] and f["form"] == "a*n^-b + e" and f["n_points"] == N.size
    assert f["a"] == pytest.approx(2.0, rel=0.05)
    assert f["b"] == pytest.approx(0.3, abs=0.01)
    assert f["e"] == pytest.approx(0.05, abs=0.005)
    assert f["rmse_log"] < 0.005
    assert all(np.isfinite(f[k]) and f[k] > 0 for k in ("a_err", "b_err", "e_err"))
    np.testing.assert_allclose(predict_power_law(f, N), _power(N, 2.0, 0.3, 0.05), rtol=0.01)


def test_power_law_noise_free_is_exact():
    f = fit_power_law(N, _power(N, 2.0, 0.3, 0.05))
    assert f["a"] == pytest.approx(2.0, rel=1e-4)
    assert f["b"] == pytest.approx(0.3, rel=1e-4)
    assert f["e"] == pytest.approx(0.05, rel=1e-4)


def test_power_law_zero_irreducible():
    y = _noisy(_power(N, 2.0, 0.3, 0.0), 0.002, seed=1)
    f = fit_power_law(N, y)
    assert f["ok"]
    assert 0.0 <= f["e"] < 2e-3
    assert f["b"] == pytest.approx(0.3, abs=0.02)


def test_wrong_planted_exponent_is_detected():
    y = _noisy(_power(N, 2.0, 0.6, 0.05), 0.002, seed=2)
    f = fit_power_law(N, y)
    assert f["ok"]
    assert f["b"] == pytest.approx(0.6, abs=0.02)
    assert abs(f["b"] - 0.3) > 0.2  # a fit that ignored the data (or had the sign wrong) would fail here


@pytest.mark.parametrize("m", [0, 1, 3])
def test_power_law_too_few_points(m):
    f = fit_power_law(N[:m], _power(N[:m], 2.0, 0.3, 0.05))
    assert f["ok"] is False and f["n_points"] == m
    assert "need at least 4 distinct n" in f["reason"]


def test_power_law_duplicate_n_counts_distinct():
    x = np.repeat(N[:3], 3)
    f = fit_power_law(x, _power(x, 2.0, 0.3, 0.05))
    assert f["ok"] is False and f["reason"].startswith("3 points")


def test_power_law_bad_input_does_not_raise():
    f = fit_power_law(N, np.full(N.size, np.nan))
    assert f["ok"] is False
    f = fit_power_law(N, np.ones(3))
    assert f["ok"] is False and "length" in f["reason"]


def _grid():
    n, k = np.meshgrid(2.0 ** np.arange(10, 18), np.array([8.0, 16, 32, 64, 128]))
    return n.ravel(), k.ravel()


def test_joint_law_recovers_gpt4_constants():
    n, k = _grid()
    y = _noisy(_joint(n, k, GPT4), 0.001, seed=3)
    f = fit_joint_law(n, k, y)
    assert f["ok"] and f["n_points"] == n.size and "gamma*log k*log n" in f["form"]
    np.testing.assert_allclose(predict_joint_law(f, n, k), _joint(n, k, GPT4), rtol=0.01)
    for p in JOINT_PARAMS:
        assert f[p] == pytest.approx(GPT4[p], abs=0.05), p
        assert math.isfinite(f[f"{p}_err"])
    # noise-free data: parameters exact
    g = fit_joint_law(n, k, _joint(n, k, GPT4))
    for p in JOINT_PARAMS:
        assert g[p] == pytest.approx(GPT4[p], abs=1e-4), p


def test_joint_law_detects_changed_exponent():
    n, k = _grid()
    planted = dict(GPT4, gamma=-0.1)
    f = fit_joint_law(n, k, _noisy(_joint(n, k, planted), 0.001, seed=4))
    assert f["gamma"] == pytest.approx(-0.1, abs=0.02)
    assert abs(f["gamma"] - GPT4["gamma"]) > 0.03


def test_joint_law_guards():
    n, k = _grid()
    y = _joint(n, k, GPT4)
    assert fit_joint_law(n[:6], k[:6], y[:6])["ok"] is False
    one_k = k == 32
    r = fit_joint_law(n[one_k], k[one_k], y[one_k])
    assert r["ok"] is False and "distinct" in r["reason"]
    one_n = n == 2.0**12
    assert fit_joint_law(n[one_n], k[one_n], y[one_n])["ok"] is False


def test_fit_all_groups_and_serialises():
    n, k = _grid()
    rows = []
    for arch, b_shift in (("topk", 0.0), ("relu", 0.01)):
        y = _noisy(_joint(n, k, dict(GPT4, beta_n=GPT4["beta_n"] - b_shift)), 0.001, seed=5)
        rows += [dict(arch=arch, n=int(nv), k=int(kv), fvu=float(yv), mse=1.0) for nv, kv, yv in zip(n, k, y)]
    rows += [dict(arch="topk", n=1024, k=8, fvu=float("nan"), mse=1.0),
             dict(arch="relu", n=2048, k=16, fvu=0.0, mse=1.0),
             dict(arch="relu", n=2048, k=16, fvu=-1.0, mse=1.0)]
    rows += [dict(arch="gated", n=1024, k=8, fvu=0.5, mse=1.0)]  # too few points: ok False, still JSON-able
    table = pd.DataFrame(rows).sample(frac=1.0, random_state=0)
    out = fit_all(table, metric="fvu")
    assert out["metric"] == "fvu" and out["dropped_rows"] == 3
    keys = [(r["arch"], r["k"]) for r in out["per_k"]]
    assert keys == [("gated", 8)] + [(a, kv) for a in ("relu", "topk") for kv in (8, 16, 32, 64, 128)]
    assert [r["arch"] for r in out["joint"]] == ["gated", "relu", "topk"]
    by = {(r["arch"], r["k"]): r for r in out["per_k"]}
    assert by[("gated", 8)]["ok"] is False and out["joint"][0]["ok"] is False
    fitted = [by[(a, kv)] for a in ("relu", "topk") for kv in (8, 16, 32, 64, 128)]
    assert all(r["ok"] and r["n_points"] == 8 for r in fitted)
    # per-k exponent must follow the planted law: b_k = -(beta_n + gamma*log k)
    for kv in (8, 128):
        b_planted = -(GPT4["beta_n"] + GPT4["gamma"] * np.log(kv))
        assert by[("topk", kv)]["b"] == pytest.approx(b_planted, abs=0.03)
    assert out["joint"][2]["beta_n"] == pytest.approx(GPT4["beta_n"], abs=0.05)
    text = json.dumps(to_jsonable(out), allow_nan=False)
    assert json.loads(text)["per_k"][1]["arch"] == "relu"


def test_fit_all_missing_metric_column():
    with pytest.raises(KeyError):
        fit_all(pd.DataFrame({"arch": ["a"], "n": [1], "k": [1]}), metric="fvu")


def test_to_jsonable_converts_nan_and_numpy():
    obj = {"a": np.float32(1.5), "b": [float("nan"), np.inf, np.int64(3)],
           "c": (np.bool_(True), np.array([1.0, np.nan]))}
    out = to_jsonable(obj)
    assert out == {"a": 1.5, "b": [None, None, 3], "c": [True, [1.0, None]]}
    assert isinstance(out["b"][2], int) and type(out["c"][0]) is bool
    json.dumps(out, allow_nan=False)
