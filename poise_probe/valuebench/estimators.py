"""Value estimators compared by `poise value-bench`, each fitted on the same train rollouts and
asked for the value of the same eval prompts and states.

An estimator gives a prompt-level value V(x) per eval prompt and a state-level value V(s) per
cut state; one that has no state-level notion (a prompt-only probe, the group mean) gives its
prompt value for the state too, which is exactly what using it as a baseline does to every
token of the rollout. NaN means "not offered" (left out of that level's table).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from poise_probe.probe import RidgeProbe, loo_targets
from poise_probe.valuebench.data import BenchSet

__all__ = ["BenchContext", "Estimator", "ESTIMATORS", "register", "default_estimators"]


@dataclass
class BenchContext:
    """What estimators may use besides the data: the config, the policy and its tokenizer."""

    cfg: Any
    model: Any
    tokenizer: Any
    device: Any
    autocast: Any
    hidden_size: int


class Estimator:
    """Fit on train rollouts; then values for eval prompts (P,) and states (S,)."""

    name = ""
    needs_hidden = False

    def fit(self, train: BenchSet, ctx: BenchContext) -> None:
        pass

    def prompt_values(self, ev: BenchSet, ctx: BenchContext) -> np.ndarray:
        raise NotImplementedError

    def state_values(self, ev: BenchSet, ctx: BenchContext) -> np.ndarray:
        """Default: the prompt value of each state's prompt."""
        return self.prompt_values(ev, ctx)[ev.states.prompt]


#: name -> factory() -> Estimator
ESTIMATORS: dict[str, Callable[[], Estimator]] = {}


def register(name: str):
    def deco(factory):
        if name in ESTIMATORS:
            raise ValueError(f"value-bench estimator {name!r} is already registered.")
        ESTIMATORS[name] = factory
        return factory
    return deco


def _pool_scores(ev: BenchSet) -> np.ndarray:
    return ev.scores.reshape(ev.n_prompts, ev.pool)


@register("constant")
class Constant(Estimator):
    """The train rollouts' mean reward for every prompt and state: the floor to beat."""

    def fit(self, train, ctx):
        self.value = float(train.scores.mean())

    def prompt_values(self, ev, ctx):
        return np.full(ev.n_prompts, self.value)


class GroupMean(Estimator):
    """GRPO's baseline: the mean reward of the prompt's first m pool rollouts (SVEB's GRPO
    estimate; the state's own rollout is among them, as in SVEB)."""

    def __init__(self, m: int):
        self.m = m

    def prompt_values(self, ev, ctx):
        if ev.pool < self.m:
            return np.full(ev.n_prompts, np.nan)
        return _pool_scores(ev)[:, :self.m].mean(axis=1)


for _m in (2, 4, 8):
    register(f"group_mean_{_m}")(lambda m=_m: GroupMean(m))


class _Probe(Estimator):
    """The trainer's RidgeProbe fitted on the train rollouts' leave-one-out targets."""

    columns: str = "all"

    def _x(self, features: np.ndarray, ctx) -> np.ndarray:
        return features[:, :ctx.hidden_size] if self.columns == "prompt" else features

    def fit(self, train, ctx):
        h = ctx.hidden_size
        blocks = (h,) if self.columns == "prompt" else (h, h, 3)
        pca = ((ctx.cfg.probe.pca_prompt,) if self.columns == "prompt" else
               (ctx.cfg.probe.pca_prompt, ctx.cfg.probe.pca_reasoning, None))
        self.probe = RidgeProbe(alpha=ctx.cfg.probe.alpha, blocks=blocks,
                                pca_components=None if all(c is None for c in pca) else pca)
        y = loo_targets(train.scores, train.rollouts.group_ids.numpy())
        self.probe.fit(self._x(train.features, ctx), y)

    def _g(self, ev, ctx) -> np.ndarray:
        return self.probe.predict(self._x(ev.features, ctx)).reshape(ev.n_prompts, ev.pool)


@register("poise_probe")
class PoiseProbe(_Probe):
    """POISE's cross-rollout probe with two rollouts: the prompt value is the mean of g over
    the first two pool rollouts; a state of rollout 0 gets its sibling's g (the baseline POISE
    gives every token of rollout 0)."""

    def prompt_values(self, ev, ctx):
        return self._g(ev, ctx)[:, :2].mean(axis=1) if ev.pool >= 2 else \
            np.full(ev.n_prompts, np.nan)

    def state_values(self, ev, ctx):
        g = self._g(ev, ctx)
        return g[ev.states.prompt, 1] if ev.pool >= 2 else np.full(len(ev.states.prompt), np.nan)


@register("prompt_probe")
class PromptProbe(_Probe):
    """The paper's prompt-only ablation: ridge on the prompt vector alone (the same for every
    rollout of a prompt, so any rollout's g is the prompt's value)."""

    columns = "prompt"

    def prompt_values(self, ev, ctx):
        return self._g(ev, ctx)[:, 0]


def default_estimators() -> list[str]:
    """Every registered estimator, in registration order."""
    return list(ESTIMATORS)
