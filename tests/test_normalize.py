"""Normalization, the geometric median and FVU against known answers (method §A.2, A.4, C.1)."""

import numpy as np
import pytest
import torch

from saescale.normalize import denormalize, geometric_median, layer_stats, normalize
from saescale.sae.losses import fvu


def test_normalize_gives_zero_mean_unit_norm_and_roundtrips():
    x = torch.randn(100, 32) * 7 + 3
    xn, mu, scale = normalize(x)
    assert torch.allclose(xn.mean(dim=1), torch.zeros(100), atol=1e-6)
    assert torch.allclose(xn.norm(dim=1), torch.ones(100), atol=1e-5)
    assert torch.allclose(denormalize(xn, mu, scale), x, atol=1e-4)


def test_geometric_median_of_square_corners_is_centre():
    pts = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    assert torch.allclose(geometric_median(pts), torch.tensor([1.0, 1.0]), atol=1e-5)


def test_geometric_median_resists_outliers_unlike_the_mean():
    # 1-D: the geometric median is the ordinary median
    pts = torch.tensor([[0.0], [1.0], [2.0], [3.0], [1000.0]])
    assert abs(float(geometric_median(pts)[0]) - 2.0) < 1e-3


def test_geometric_median_of_triangle_is_fermat_point():
    # equilateral triangle: the Fermat point is the centroid
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 3**0.5 / 2]])
    assert torch.allclose(geometric_median(pts), pts.mean(dim=0), atol=1e-4)


def test_fvu_of_the_mean_predictor_is_one():
    x = torch.randn(500, 16)
    mean = x.mean(dim=0)
    assert abs(fvu(x, mean.expand_as(x), mean) - 1.0) < 1e-6
    assert fvu(x, x, mean) == 0.0


def test_layer_stats_baseline_matches_fvu_denominator():
    raw = np.random.default_rng(0).normal(size=(2000, 16)).astype(np.float32) * 5 + 2
    st = layer_stats(np.array_split(raw, 7), len(raw))  # streamed in uneven chunks
    xn = normalize(torch.from_numpy(raw))[0]
    mean = torch.tensor(st["mean"])
    assert torch.allclose(mean, xn.mean(dim=0), atol=1e-6)
    assert abs(st["baseline_mse"] - float(((xn - mean) ** 2).sum(dim=1).mean())) < 1e-5
    assert len(st["geometric_median"]) == 16 and st["geometric_median_samples"] == 2000
    assert st["raw_norm_max"] == pytest.approx(float(normalize(torch.from_numpy(raw))[2].max()))
