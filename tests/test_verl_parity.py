"""verl parity of the token-level REINFORCE++ estimators.

The references below follow verl's code line by line (volcengine/verl,
verl/trainer/ppo/core_algos.py: compute_reinforce_plus_plus_outcome_advantage and
compute_reinforce_plus_plus_baseline_outcome_advantage; verl/utils/torch_functional.py:
masked_sum, masked_mean, masked_var, masked_whiten; the reward managers put the score on the
last response token, `reward_tensor[i, valid_response_length - 1] = score`), including the
1e-8 of masked_mean's denominator, the unbiased masked_var and whiten's rsqrt(var + 1e-8).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

from poise_probe.advantages import TOKEN_LEVEL, compute_advantages

F64 = torch.float64


# ------------------------------------------------------------------ verl, line by line

def verl_masked_sum(values, mask, axis=None):
    valid_values = torch.where(mask.bool(), values, 0.0)
    return (valid_values * mask).sum(axis=axis)


def verl_masked_mean(values, mask, axis=None):
    s = verl_masked_sum(values, mask, axis)
    return s / (mask.sum(axis=axis) + 1e-8)


def verl_masked_var(values, mask, unbiased=True):
    mean = verl_masked_mean(values, mask)
    centered_values = values - mean
    variance = verl_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError("At least one element in the mask has to be 1.")
        if mask_sum == 1:
            raise ValueError("The sum of the mask is one, which can cause a division by zero.")
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def verl_masked_whiten(values, mask, shift_mean=True):
    mean, var = verl_masked_mean(values, mask), verl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def verl_reinforce_plus_plus(token_level_rewards, response_mask, gamma):
    with torch.no_grad():
        returns = torch.zeros_like(token_level_rewards)
        running_return = 0

        for t in reversed(range(token_level_rewards.shape[1])):
            running_return = token_level_rewards[:, t] + gamma * running_return
            returns[:, t] = running_return
            # Reset after EOS
            running_return = running_return * response_mask[:, t]

        advantages = verl_masked_whiten(returns, response_mask)
        advantages = advantages * response_mask

    return advantages, returns


def verl_reinforce_plus_plus_baseline(token_level_rewards, response_mask, index):
    response_length = token_level_rewards.shape[-1]
    scores = token_level_rewards.sum(dim=-1)

    id2score = defaultdict(list)
    id2mean = {}

    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx] = torch.tensor(0.0)
            elif len(id2score[idx]) > 1:
                id2mean[idx] = torch.mean(torch.stack(id2score[idx]))
            else:
                raise ValueError(f"no score in prompt index: {idx}")
        for i in range(bsz):
            scores[i] = scores[i] - id2mean[index[i]]

        scores = scores.unsqueeze(-1).tile([1, response_length]) * response_mask
        scores = verl_masked_whiten(scores, response_mask) * response_mask

    return scores, scores


def verl_token_level_rewards(scores, response_mask):
    """verl's naive reward manager: the score on the last valid response token."""
    reward_tensor = torch.zeros_like(response_mask, dtype=scores.dtype)
    valid_response_length = response_mask.sum(-1).long()
    for i in range(len(scores)):
        reward_tensor[i, valid_response_length[i] - 1] = scores[i]
    return reward_tensor


# ------------------------------------------------------------------ the batch

def interleaved_batch(seed: int, dtype=F64, sizes=(4, 4, 3, 5, 1, 2), width: int = 13):
    """Shuffled rows of groups of unequal sizes (a lone one included), non-consecutive uids,
    0/1 and partial-credit scores, right-padded ragged masks of lengths 1..width."""
    gen = torch.Generator().manual_seed(seed)
    uids = torch.cat([torch.full((k,), 7 * i + 5, dtype=torch.long) for i, k in enumerate(sizes)])
    n = len(uids)
    perm = torch.randperm(n, generator=gen)
    uids = uids[perm]
    assert not all(uids[i] <= uids[i + 1] for i in range(n - 1)), "groups must interleave"
    scores = (torch.rand(n, generator=gen) < 0.5).to(dtype)
    scores[::3] = torch.rand(n, generator=gen).to(dtype)[::3]
    lengths = torch.randint(1, width + 1, (n,), generator=gen)
    lengths[0] = width                                         # one full-width row
    mask = (torch.arange(width)[None, :] < lengths[:, None]).to(dtype)   # (N, T)
    return scores, uids, mask


# ------------------------------------------------------------------ tests

def test_registered_token_level_under_verls_names():
    assert {"reinforce_plus_plus", "reinforce_plus_plus_baseline"} <= TOKEN_LEVEL
    assert "reinforce_pp" not in TOKEN_LEVEL                     # the per-rollout one stays


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reinforce_plus_plus_equals_verl(seed, gamma):
    scores, uids, mask = interleaved_batch(seed)
    want, returns = verl_reinforce_plus_plus(verl_token_level_rewards(scores, mask), mask, gamma)
    got = compute_advantages("reinforce_plus_plus", scores, uids, response_mask=mask, gamma=gamma)
    torch.testing.assert_close(got.advantages, want, rtol=1e-12, atol=1e-12)
    # A * scale + b is the token's return
    torch.testing.assert_close(got.advantages * got.scale + got.baselines, returns,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reinforce_plus_plus_baseline_equals_verl(seed):
    scores, uids, mask = interleaved_batch(seed)
    index = np.array([f"uid-{u}" for u in uids.tolist()], dtype=object)   # verl's string uids
    want, _ = verl_reinforce_plus_plus_baseline(verl_token_level_rewards(scores, mask), mask,
                                                index)
    got = compute_advantages("reinforce_plus_plus_baseline", scores, uids, response_mask=mask)
    torch.testing.assert_close(got.advantages, want, rtol=1e-12, atol=1e-12)
    on = mask.bool()
    torch.testing.assert_close((got.advantages * got.scale + got.baselines)[on],
                               scores[:, None].expand_as(mask)[on], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["reinforce_plus_plus", "reinforce_plus_plus_baseline"])
def test_float32_equals_verl(name):
    scores, uids, mask = interleaved_batch(5, dtype=torch.float32)
    trl = verl_token_level_rewards(scores, mask)
    if name == "reinforce_plus_plus":
        want, _ = verl_reinforce_plus_plus(trl, mask, 1.0)
    else:
        want, _ = verl_reinforce_plus_plus_baseline(trl, mask, uids.tolist())
    got = compute_advantages(name, scores, uids, response_mask=mask)
    torch.testing.assert_close(got.advantages, want, rtol=1e-5, atol=1e-6)


def test_longer_rollouts_weigh_more_in_the_whitening():
    """Unlike reinforce_pp (one vote per rollout), a rollout's tokens each count: two rollouts
    with rewards 1 and 0, lengths 3 and 1 -> token mean 0.75, not 0.5."""
    r, g = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0, 1])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=F64)
    res = compute_advantages("reinforce_plus_plus", r, g, response_mask=mask)
    torch.testing.assert_close(res.baselines[0, 0], torch.tensor(0.75, dtype=F64), rtol=1e-7,
                               atol=0)
    per_rollout = compute_advantages("reinforce_pp", r, g)
    torch.testing.assert_close(per_rollout.baselines, torch.tensor([0.5, 0.5], dtype=F64))


def test_discount_reaches_earlier_tokens_with_gamma_powers():
    """One rollout of 4 tokens, gamma 0.5: returns r * [1/8, 1/4, 1/2, 1] before whitening."""
    r, g = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0, 0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=F64)
    res = compute_advantages("reinforce_plus_plus", r, g, response_mask=mask, gamma=0.5)
    returns = res.advantages * res.scale + res.baselines
    torch.testing.assert_close(returns, torch.tensor([[0.125, 0.25, 0.5, 1.0], [0, 0, 0, 0]],
                                                     dtype=F64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["reinforce_plus_plus", "reinforce_plus_plus_baseline"])
def test_bad_inputs_raise(name):
    r, g = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    with pytest.raises(ValueError, match="response_mask"):
        compute_advantages(name, r, g)
    with pytest.raises(ValueError, match=">= 2 counted response tokens"):
        compute_advantages(name, r, g, response_mask=torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    if name == "reinforce_plus_plus":
        with pytest.raises(ValueError, match="gamma"):
            compute_advantages(name, r, g, response_mask=torch.ones(2, 2), gamma=1.5)


def test_reinforce_plus_plus_trains_through_the_trainer(tiny_model_dir, tmp_path):
    """Two steps with adv_estimator=reinforce_plus_plus, gamma 0.9 from the config."""
    from poise_probe.rundir import RunReader
    from run_helpers import run

    out = run(tiny_model_dir, tmp_path / "rfpp", **{
        "algorithm.adv_estimator": "reinforce_plus_plus", "group.gamma": 0.9,
        "trainer.total_steps": 2})
    r = RunReader(out)
    steps = [m for m in r.metrics() if "reward/mean" in m]
    assert len(steps) == 2 and all(m["adv/identity_max_abs_err"] < 1e-6 for m in steps)
    table = r.rollouts(2)
    assert all(a is not None and len(a) == n for a, n in zip(table.token_advantages,
                                                              table.num_tokens))
