"""Config sections of the method family beyond POISE: group-statistic options (validity masking,
analytic-variance scaling), the learned critic, Hista and Numca. Defaults are the published
settings (RELATED.md, POISE.md); options marked "reconstruction" follow formulas the sources
only describe in words, and are configurable for that reason (docs/estimators.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from poise_probe.config_fields import above, choice, nonneg, opt, positive, unit

GROUP_VARIANCES = ("empirical", "analytic", "smoothed")
INVALID_MODES = ("mask", "penalty")
CRITIC_INITS = ("policy", "random")
EMA_INITS = ("first", "zero")
DISTANCES = ("normalised", "sum")
SCALE_REWARDS = ("group", "none")


@dataclass
class GroupConfig:
    validity_mask: bool = opt(
        False, "VM (reconstruction): group statistics over format-valid rollouts only (the "
               "task's answer extractor found an answer); grpo, dr_grpo, rloo")
    invalid: str = opt("mask", "VM: an invalid rollout's advantage: mask (0) | penalty")
    invalid_penalty: float = opt(-1.0, "VM: the advantage of an invalid rollout (invalid: penalty)")
    variance: str = opt(
        "empirical", "group scale of grpo: empirical (sample std, GRPO) | analytic "
                     "(sqrt(p(1-p)), AV, reconstruction) | smoothed (p=(k+a)/(G+2a) in mean and "
                     "variance, speculative)")
    smoothing: float = opt(1.0, "a of the smoothed variance: pseudo-successes and -failures")
    gamma: float = opt(1.0, "reinforce_plus_plus: discount of the token-level returns of the "
                            "outcome reward (verl algorithm.gamma)")

    def __post_init__(self):
        choice("group.invalid", self.invalid, INVALID_MODES)
        choice("group.variance", self.variance, GROUP_VARIANCES)
        above("group.smoothing", self.smoothing)
        if not math.isfinite(self.invalid_penalty):
            raise ValueError(f"group.invalid_penalty must be a finite number (the advantage of "
                             f"an invalid rollout); got {self.invalid_penalty}.")
        unit("group.gamma", self.gamma)


@dataclass
class CriticConfig:
    init: str = opt("policy", "critic backbone: a copy of the policy (paper) | random init")
    lr: float = opt(1e-5, "critic AdamW learning rate")
    weight_decay: float = opt(0.0, "critic AdamW weight decay")
    epochs: int = opt(1, "critic passes over each step's batch")
    gamma: float = opt(1.0, "ppo_gae: discount of the token-level returns")
    lam: float = opt(0.95, "ppo_gae: GAE lambda")
    value_clip: float | None = opt(0.2, "ppo_gae: clip of the value update (verl cliprange_value); "
                                        "None: no clipping")
    warmup_steps: int = opt(0, "steps the critic trains before its values are used (RLOO before)")
    mini_batch_prompts: int | None = opt(
        None, "prompts per critic optimizer step; None: optim.mini_batch_prompts (verl's critic "
              "shares the actor's ppo_mini_batch_size)")
    micro_batch_size: int | None = opt(
        None, "rows per critic forward (prompts for ppo_critic, rollouts for ppo_gae); "
              "gradients accumulate over a mini-batch; None: optim.micro_batch_size")
    max_grad_norm: float = opt(1.0, "critic gradient-norm clip (verl critic grad_clip)")

    def __post_init__(self):
        choice("critic.init", self.init, CRITIC_INITS)
        above("critic.lr", self.lr)
        nonneg("critic.weight_decay", self.weight_decay)
        positive("critic.epochs", self.epochs)
        if self.mini_batch_prompts is not None:
            positive("critic.mini_batch_prompts", self.mini_batch_prompts)
        if self.micro_batch_size is not None:
            positive("critic.micro_batch_size", self.micro_batch_size)
        above("critic.max_grad_norm", self.max_grad_norm)
        if self.value_clip is not None and not self.value_clip > 0:
            raise ValueError(f"critic.value_clip must be > 0 or None (no clipping); got "
                             f"{self.value_clip}.")
        unit("critic.gamma", self.gamma)
        unit("critic.lam", self.lam)
        nonneg("critic.warmup_steps", self.warmup_steps)


@dataclass
class HistaConfig:
    alpha: float = opt(0.7, "EMA factor over positions (hista_alpha; dataclass default 0.97)")
    mean_window: int = opt(5, "subsample the EMA every W positions (hista_mean_window)")
    min_interval: int = opt(50, "tokens between state boundaries, m (hista_min_interval)")
    min_d: float = opt(5.0, "distances are clamped below at this (hista_min_d)")
    max_k: int = opt(66, "neighbours of the earliest state (hista_max_k)")
    min_k: int = opt(6, "the k schedule's lower end (hista_min_k)")
    gae_lambda: float = opt(1.0, "lambda of the segment GAE (1: A_j = r - V_j)")
    ema_init: str = opt("first", "EMA start: first (the official code: e_0 = h_0) | zero")
    distance: str = opt("normalised", "MinDistance: normalised (the code: / longer length) | sum "
                                      "(the paper)")
    exclude_self: bool = opt(False, "leave the rollout's own prefixes out of its pool (clean "
                                    "variant; the official code keeps them)")
    zero_last_token: bool = opt(True, "the official code's zero advantage on the last token")
    scale_rewards: str = opt("group", "divide by the group's reward std + 1e-4 (TRL) | none")
    pool_chunk: int = opt(8, "pool rollouts measured against one query rollout at a time: peak "
                             "memory ~ 40 B x pool_chunk x (L/W)^2; the values do not depend on it")

    def __post_init__(self):
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"hista.alpha must lie in [0, 1) (the bias correction divides by "
                             f"1 - alpha^(k+1)); got {self.alpha}.")
        positive("hista.mean_window", self.mean_window)
        positive("hista.min_interval", self.min_interval)
        above("hista.min_d", self.min_d)
        positive("hista.min_k", self.min_k)
        if self.max_k < self.min_k:
            raise ValueError(f"hista.max_k ({self.max_k}) must be >= hista.min_k ({self.min_k}).")
        unit("hista.gae_lambda", self.gae_lambda)
        choice("hista.ema_init", self.ema_init, EMA_INITS)
        choice("hista.distance", self.distance, DISTANCES)
        choice("hista.scale_rewards", self.scale_rewards, SCALE_REWARDS)
        positive("hista.pool_chunk", self.pool_chunk)


@dataclass
class NumcaConfig:
    merge_distance: int = opt(50, "milestones closer than this many tokens merge into the later")
    gae_lambda: float = opt(1.0, "lambda of the segment GAE (1: A_j = r - V(state at j))")
    scale_rewards: str = opt("group", "divide by the group's reward std + 1e-4 (TRL) | none")

    def __post_init__(self):
        nonneg("numca.merge_distance", self.merge_distance)
        unit("numca.gae_lambda", self.gae_lambda)
        choice("numca.scale_rewards", self.scale_rewards, SCALE_REWARDS)
