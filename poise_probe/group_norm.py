"""Group-statistic options of grpo, dr_grpo and rloo: validity masking (VM) and analytic-variance
scaling (AV), with its smoothed variant.

Both are reconstructions from words: the source (Fudan "POISE", arXiv 2603.23951, RELATED.md
B.2) describes VM-AV-GRPO only in prose, and the formulas here are ours (B.3 test vectors):
- AV: A_i = (r_i - p) / (sqrt(p (1 - p)) + eps), p = the group's mean reward (its success rate
  for 0/1 rewards): the Bernoulli std in place of GRPO's sample std;
- smoothed: p~ = (k + a) / (G + 2a), k the group's reward sum, in both the mean and the
  variance, so an all-fail or all-pass group still gets a signal (speculative);
- VM: the group statistics over format-valid rollouts only; an invalid rollout gets A = 0
  (`invalid="mask"`) or A = `invalid_penalty`.
With every option off, `group_advantages` is the registry's estimator, unchanged.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from poise_probe.advantages import (AdvantageResult, check_rewards, group_index,
                                    compute_advantages)
from poise_probe.config_methods import GROUP_VARIANCES, INVALID_MODES  # the config's choices

logger = logging.getLogger(__name__)

__all__ = ["GROUP_ESTIMATORS", "GROUP_VARIANCES", "INVALID_MODES", "bernoulli_advantage",
           "group_advantages"]

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")       # the estimators that take these options


def group_advantages(name: str, rewards: Tensor, group_ids: Tensor, *, valid: Tensor | None = None,
                     validity_mask: bool = False, invalid: str = "mask",
                     invalid_penalty: float = -1.0, variance: str = "empirical",
                     smoothing: float = 1.0, epsilon: float = 1e-6) -> AdvantageResult:
    """grpo, dr_grpo or rloo advantages (N,) with the VM and AV options; rewards, group_ids,
    valid (N,). RELATED.md B.2 (reconstruction).

    `variance` is grpo's scale: empirical (sample std, plain GRPO) | analytic | smoothed
    (`smoothing` = a). With `validity_mask`, only rows where `valid` is true enter the
    statistics; under the empirical variance a valid rollout without a valid sibling has
    nothing to compare with and gets A = 0 (rloo would have no baseline, grpo no std).
    Example (G = 8, eps = 0): rewards [1, 0, 0, 0, 0, 0, 0, 0], valid [1, 1, 1, 1, 1, 1, 0, 0],
    analytic -> [2.236068, -0.447214 x 5, 0, 0].
    """
    if name not in GROUP_ESTIMATORS:
        raise ValueError(f"group options apply to {list(GROUP_ESTIMATORS)}; got {name!r}.")
    if variance not in GROUP_VARIANCES:
        raise ValueError(f"variance must be one of {list(GROUP_VARIANCES)}; got {variance!r}.")
    if variance != "empirical" and name != "grpo":
        raise ValueError(f"variance={variance!r} sets grpo's scale; {name} does not divide by a "
                         f"std. Use adv_estimator=grpo or variance='empirical'.")
    if invalid not in INVALID_MODES:
        raise ValueError(f"invalid must be one of {list(INVALID_MODES)}; got {invalid!r}.")
    if not validity_mask and variance == "empirical":
        return compute_advantages(name, rewards, group_ids, epsilon=epsilon)
    rewards, group_ids = check_rewards(rewards, group_ids, epsilon)
    v = _check_valid(valid, rewards) if validity_mask else torch.ones_like(rewards, dtype=torch.bool)

    if variance == "empirical":                 # the registry's estimator on the valid rows
        _, inverse, _ = group_index(group_ids)
        n_valid = torch.zeros(int(inverse.max()) + 1, dtype=torch.long,
                              device=rewards.device).index_add_(0, inverse, v.long())
        rows = v & (n_valid[inverse] >= 2)
        lone = int((v & ~rows).sum())
        if lone:
            logger.debug("%d valid rollout(s) without a valid sibling get A = 0", lone)
        out = AdvantageResult(torch.zeros_like(rewards), rewards.clone(), torch.ones_like(rewards))
        if bool(rows.any()):
            sub = compute_advantages(name, rewards[rows], group_ids[rows], epsilon=epsilon)
            out.advantages[rows], out.baselines[rows], out.scale[rows] = (
                sub.advantages, sub.baselines, sub.scale)
            flat = rows & (out.scale == 0)      # grpo, eps = 0, all equal: 0, not 0/0
            out.advantages[flat], out.scale[flat] = 0.0, 1.0
    else:
        out = bernoulli_advantage(rewards, group_ids, v, smoothing=(
            smoothing if variance == "smoothed" else None), epsilon=epsilon)

    bad = ~v                                      # invalid rows: A = 0 or the penalty, A + b = r
    if bool(bad.any()):
        a = 0.0 if invalid == "mask" else float(invalid_penalty)
        out.advantages[bad] = a
        out.baselines[bad] = rewards[bad] - a
        out.scale[bad] = 1.0
    return out


def bernoulli_advantage(rewards: Tensor, group_ids: Tensor, valid: Tensor, *,
                        smoothing: float | None = None, epsilon: float = 1e-6) -> AdvantageResult:
    """A = (r - p) / (sqrt(p (1 - p)) + eps), p over each group's valid rows; (N,) -> (N,).

    p = k / G (AV), or p~ = (k + a) / (G + 2a) with a = `smoothing` (smoothed AV); k is the
    sum and G the count of the group's valid rewards. Rewards must lie in [0, 1] (p is a rate).
    A zero scale (eps = 0, all fail or all pass) gives A = 0, never 0/0. Rows where `valid` is
    false get the group's values too; `group_advantages` overwrites them. RELATED.md B.3:
    G = 8, one success, eps = 0 -> sqrt(7) = 2.645751 and -1/sqrt(7) = -0.377964; smoothed
    a = 1, all fail -> p~ = 0.1, A = -1/3.
    """
    rewards, group_ids = check_rewards(rewards, group_ids, epsilon)
    if smoothing is not None and not smoothing > 0:
        raise ValueError(f"smoothing must be > 0 (pseudo-successes and -failures); got {smoothing}.")
    lo, hi = float(rewards.min()), float(rewards.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"the analytic variance sqrt(p(1-p)) needs rewards in [0, 1] (a success "
                         f"rate); got rewards in [{lo}, {hi}]. Use variance='empirical' for "
                         f"shaped rewards (overlong shaping).")
    w = _check_valid(valid, rewards).to(rewards.dtype)
    _, inverse, _ = group_index(group_ids)
    n_groups = int(inverse.max()) + 1
    k = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device).index_add_(
        0, inverse, rewards * w)                                          # (G,) successes
    n = torch.zeros_like(k).index_add_(0, inverse, w)                     # (G,) valid rollouts
    if smoothing is None:
        p = k / n.clamp_min(1)                  # a group without valid rows: p = 0, unused
    else:
        p = (k + smoothing) / (n + 2 * smoothing)
    p = p[inverse]                                                        # (N,)
    scale = (p * (1 - p)).clamp_min(0).sqrt() + epsilon
    dev = rewards - p
    adv = torch.where(scale > 0, dev / torch.where(scale > 0, scale, torch.ones_like(scale)),
                      torch.zeros_like(dev))
    # a zero scale means p is 0 or 1, so every reward of the group equals p: A = 0 keeps A*s+b=r
    return AdvantageResult(adv, p.clone(), torch.where(scale > 0, scale, torch.ones_like(scale)))


def _check_valid(valid: Tensor | None, rewards: Tensor) -> Tensor:
    """Validate the format-validity flags (N,); return them as bool on the rewards' device."""
    if valid is None:
        raise ValueError("validity_mask needs valid flags (one per rollout: the task's answer "
                         "extractor found an answer); got None. Pass the batch's `valid`.")
    if not isinstance(valid, Tensor):
        raise TypeError(f"valid must be a torch.Tensor of shape (N,); got {type(valid).__name__}.")
    if valid.shape != rewards.shape:
        raise ValueError(f"valid must have the rewards' shape {tuple(rewards.shape)}; got "
                         f"{tuple(valid.shape)}.")
    if valid.dtype != torch.bool and bool(((valid != 0) & (valid != 1)).any()):
        raise ValueError("valid must hold booleans or 0/1 flags; got other values.")
    return valid.to(device=rewards.device, dtype=torch.bool)
