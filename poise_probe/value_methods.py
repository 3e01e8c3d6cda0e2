"""Stateful value methods: advantage estimators that need more than rewards and probe predictions.

The pure estimators of `poise_probe.advantages` map (rewards, group ids, predictions) to
advantages. The rest of the method family needs the step's context: a learned critic (its own
model, optimizer and training), Hista (the policy's last-layer hidden states from the old-policy
pass), Numca (the completions' text and a per-prompt table kept across steps), the ablation
probes (a second probe bank). Each is a `ValueMethod`, registered by name beside the pure
estimators, so `algorithm.adv_estimator` selects either kind and the trainer runs every one of
them on the same rollouts.

The trainer calls, once per step and in this order:
1. `hidden_states_wanted` decides whether the old-policy pass keeps the last-layer states;
2. `advantages(ctx)` -> AdvantageResult, frozen before anything learns from this batch;
3. `update(ctx)` -> metrics: fit on this batch (critic step, table update, probe refit);
and `state_dict()` / `load_state_dict()` travel with the checkpoint (`TrainState`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from poise_probe.advantages import ADV_ESTIMATORS, AdvantageResult

__all__ = ["StepContext", "ValueMethod", "VALUE_METHODS", "make_value_method",
           "register_value_method"]


@dataclass
class StepContext:
    """What one step knows when its advantages are computed (tensors on CPU).

    batch: the step's `Rollouts` (prompt and response ids, texts, domains, scores);
    rewards, group_ids (N,); mask (N, T) response tokens; old_log_probs, entropies (N, T);
    features (N, F) the probe's inputs, preds / fitted (N,) the probe bank's predictions;
    hidden: per rollout, the last decoder layer's (final-norm) states over prompt + response,
    (P_i + R_i, H), when the method asked for them, else None.
    """

    cfg: Any
    step: int
    batch: Any
    rewards: torch.Tensor
    group_ids: torch.Tensor
    mask: torch.Tensor
    old_log_probs: torch.Tensor
    entropies: torch.Tensor | None
    features: np.ndarray | None
    preds: np.ndarray
    fitted: np.ndarray
    hidden: list[torch.Tensor] | None = None
    extra: dict = field(default_factory=dict)


class ValueMethod:
    """Base of a stateful estimator; subclasses set `token_level` and implement `advantages`."""

    name: str = ""
    token_level: bool = False            # (N, T) advantages
    hidden_states_wanted: bool = False   # keep the last-layer states of the old-policy pass
    #: (N,) bool set by `advantages`: where a probe prediction made the baseline (the
    #: trainer's probe/used_frac and the rollout table's flag); None: nowhere
    used: torch.Tensor | None = None

    def advantages(self, ctx: StepContext) -> AdvantageResult:
        raise NotImplementedError

    def update(self, ctx: StepContext) -> dict[str, float]:
        """Learn from this step's batch after its advantages are frozen; returns metrics."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state; the checkpoint has {sorted(state)}.")


#: name -> factory(cfg, model, tokenizer, device) -> ValueMethod
VALUE_METHODS: dict[str, Callable[..., ValueMethod]] = {}


def register_value_method(name: str):
    """Decorator adding a ValueMethod factory (often the class itself) under `name`."""

    def deco(factory):
        if name in VALUE_METHODS or name in ADV_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered; pick another "
                             f"name.")
        VALUE_METHODS[name] = factory
        return factory

    return deco


def make_value_method(cfg, model, tokenizer, device) -> ValueMethod | None:
    """The configured stateful method, or None when `algorithm.adv_estimator` is a pure one."""
    factory = VALUE_METHODS.get(cfg.algorithm.adv_estimator)
    if factory is None:
        return None
    method = factory(cfg, model, tokenizer, device)
    method.name = cfg.algorithm.adv_estimator
    return method
