"""Cross-entropy and KL of the downstream metric against hand-computed answers (method §C.3)."""

import math

import torch

from saescale.evaluate.downstream import _ce, _kl


def test_uniform_prediction_costs_log_vocab_per_position():
    tokens = torch.tensor([[1, 2, 3, 0]])
    uniform = torch.log_softmax(torch.zeros(1, 4, 5), dim=-1)
    assert math.isclose(float(_ce(uniform, tokens)), 3 * math.log(5), rel_tol=1e-6)  # 3 targets in the window


def test_kl_is_zero_for_identical_and_known_for_two_point_distributions():
    lp = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    assert float(_kl(lp, lp)) == 0.0
    lq = torch.log(torch.tensor([[[0.25, 0.75], [0.5, 0.5]]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # only position 0 has a target
    assert math.isclose(float(_kl(lp, lq)), expected, rel_tol=1e-6)
