"""Rollout correction: truncated importance weights, the log-prob mismatch, weighted PPO loss."""
from __future__ import annotations

import math

import pytest
import torch

from poise_probe.losses import logprob_mismatch, policy_loss, truncated_is_weights

F64 = torch.float64


def test_truncated_is_weights_hand_vector():
    # ratios exp(old - engine): [e^0.5, e^-1, e^2 (capped at 2), masked]
    old = torch.tensor([[0.5, -1.0, 2.0, 9.0]])
    eng = torch.zeros(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    w, m = truncated_is_weights(old, eng, mask, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.5), math.exp(-1.0), 2.0, 0.0]]))
    assert m["rollout/is_clip_frac"] == pytest.approx(1 / 3)
    assert m["rollout/is_weight_max"] == pytest.approx(math.exp(2.0))
    assert m["rollout/is_weight_mean"] == pytest.approx((math.exp(0.5) + math.exp(-1) + 2) / 3)
    assert not w.requires_grad


def test_equal_log_probs_give_unit_weights_and_zero_mismatch():
    lp = -torch.rand(3, 5)
    mask = torch.ones(3, 5)
    w, m = truncated_is_weights(lp, lp.clone(), mask, cap=2.0)
    assert torch.equal(w, torch.ones(3, 5))
    assert m["rollout/is_clip_frac"] == 0.0
    mm = logprob_mismatch(lp, lp.clone(), mask)
    assert mm["rollout/logprob_abs_diff_mean"] == 0.0 == mm["rollout/logprob_abs_diff_max"]


def test_mismatch_counts_only_masked_tokens():
    a = torch.tensor([[-1.0, -2.0, 0.0]])
    b = torch.tensor([[-1.5, -2.0, -50.0]])
    m = logprob_mismatch(a, b, torch.tensor([[1, 1, 0]]))
    assert m["rollout/logprob_abs_diff_mean"] == pytest.approx(0.25)
    assert m["rollout/logprob_abs_diff_max"] == pytest.approx(0.5)
    assert m["rollout/prob_abs_diff_mean"] == pytest.approx(abs(math.exp(-1) - math.exp(-1.5)) / 2)
    empty = logprob_mismatch(a, b, torch.zeros(1, 3))
    assert empty["rollout/logprob_abs_diff_max"] == 0.0


def test_policy_loss_with_token_weights_is_the_weighted_sum():
    torch.manual_seed(0)
    lp = (-torch.rand(2, 4, dtype=F64)).requires_grad_()
    old = lp.detach() + 0.05 * torch.randn(2, 4, dtype=F64)
    adv = torch.tensor([1.0, -0.5], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = torch.tensor([[0.5, 1.0, 2.0, 7.0], [1.5, 0.25, 3.0, 3.0]], dtype=F64)
    weighted, _ = policy_loss(lp, old, adv, mask, token_weights=w)
    # per-token losses from single-token calls, weighted and token-averaged by hand
    total = 0.0
    for i in range(2):
        for j in range(4):
            if mask[i, j]:
                one, _ = policy_loss(lp[i:i + 1, j:j + 1], old[i:i + 1, j:j + 1], adv[i:i + 1],
                                     torch.ones(1, 1))
                total = total + w[i, j] * one
    torch.testing.assert_close(weighted, total / 5)
    plain, _ = policy_loss(lp, old, adv, mask)
    ones, _ = policy_loss(lp, old, adv, mask, token_weights=torch.ones(2, 4, dtype=F64))
    torch.testing.assert_close(plain, ones)
    weighted.backward()
    assert torch.isfinite(lp.grad).all()


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="rollout.is_cap"):
        truncated_is_weights(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), cap=0.0)
    with pytest.raises(ValueError, match="rollout_log_probs"):
        truncated_is_weights(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2))
    with pytest.raises(ValueError, match="token_weights"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2),
                    token_weights=torch.ones(1, 3))
    with pytest.raises(ValueError, match="engine_log_probs"):
        logprob_mismatch(torch.zeros(1, 2), torch.zeros(2, 2), torch.ones(1, 2))
