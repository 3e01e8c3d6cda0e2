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


@register("numca")
class NumcaValue(Estimator):
    """Numca (RELATED.md A.2.4): the value of the abstract state at the cut (the set of numbers
    the prefix has shown), from the table of the prompt's pool rollouts (the cut rollout among
    them, as in SVEB); unseen state: 0. Its prompt value is V(empty set), the pool mean."""

    def prompt_values(self, ev, ctx):
        return _pool_scores(ev).mean(axis=1)

    def state_values(self, ev, ctx):
        from poise_probe.methods.numca import build_table, lookup_value, parse_milestones

        texts, scores, out = ev.rollouts.texts, ev.scores, []
        for s, (p, row) in enumerate(zip(ev.states.prompt, ev.states.rollout)):
            pool = range(p * ev.pool, (p + 1) * ev.pool)
            table = build_table((parse_milestones(texts[n])[0], float(scores[n])) for n in pool)
            numbers, offsets = parse_milestones(texts[row])
            cut = len(ev.states.prefix_text[s])
            out.append(lookup_value(table, [x for x, o in zip(numbers, offsets) if o < cut]))
        return np.array(out)


def _step_context(ev: BenchSet, ctx: BenchContext):
    """The eval pool as one trainer step (what the value methods read)."""
    import torch

    from poise_probe.update import response_mask
    from poise_probe.value_methods import StepContext

    roll = ev.rollouts
    mask = response_mask(roll, max(len(r) for r in roll.response_ids))        # (N, T)
    n = mask.shape[0]
    return StepContext(ctx.cfg, 1, roll, roll.scores.float(), roll.group_ids, mask,
                       torch.zeros_like(mask), None, ev.features, np.full(n, np.nan),
                       np.zeros(n, bool), ev.hidden)


@register("hista")
class HistaValue(Estimator):
    """Hista (RELATED.md A.2.2-A.2.3, the `hista.*` config): at a state, the value of the last
    boundary before the cut, from the inverse-MinDistance kNN over the pool's prefixes (the cut
    rollout's own prefixes in its pool as the official code has them, unless
    hista.exclude_self); its prompt value is the chain's first value, the pool mean."""

    needs_hidden = True

    def prompt_values(self, ev, ctx):
        return _pool_scores(ev).mean(axis=1)

    def state_values(self, ev, ctx):
        from poise_probe.methods.hista import Hista

        base = Hista(ctx.cfg).advantages(_step_context(ev, ctx)).baselines.numpy()
        out = []
        for row, cut in zip(ev.states.rollout, ev.states.cut):
            n = len(ev.rollouts.response_ids[row])
            # the last token is in no segment when hista.zero_last_token (its base is r)
            t = min(int(cut), n - 2 if ctx.cfg.hista.zero_last_token else n - 1)
            out.append(base[row, max(t, 0)])
        return np.array(out, dtype=float)


#: passes of a critic over the train rollouts (each `critic.epochs` epochs): the probe is fitted
#: to convergence in closed form on the same rows, so the critic gets enough passes to fit too
CRITIC_PASSES = 10


class _Critic(Estimator):
    """A learned critic (`poise_probe.methods.critic`), trained on the train rollouts with the
    trainer's own update (`critic.*` config) for CRITIC_PASSES passes."""

    method = ""

    def fit(self, train, ctx):
        from poise_probe.value_methods import VALUE_METHODS

        self.critic = VALUE_METHODS[self.method](ctx.cfg, ctx.model, ctx.tokenizer, ctx.device)
        step = _step_context(train, ctx)
        for _ in range(CRITIC_PASSES):
            self.critic.advantages(step)         # values before the pass (as in training)
            self.critic.update(step)

    def _baselines(self, ev, ctx) -> np.ndarray:
        return self.critic.advantages(_step_context(ev, ctx)).baselines.float().numpy()


@register("ppo_critic")
class PromptCriticValue(_Critic):
    """The paper's critic: a policy-sized copy with a scalar head on the last prompt token,
    BCE on the rewards (prompt-only, so a state gets its prompt's value)."""

    method = "ppo_critic"

    def prompt_values(self, ev, ctx):
        return self._baselines(ev, ctx).reshape(ev.n_prompts, ev.pool)[:, 0]


@register("ppo_gae")
class TokenCriticValue(_Critic):
    """A token-level critic (GAE's V(s_t)): the prompt value is V before the first response
    token, a state's value V after its prefix."""

    method = "ppo_gae"

    def prompt_values(self, ev, ctx):
        return self._baselines(ev, ctx)[np.arange(ev.n_prompts) * ev.pool, 0]

    def state_values(self, ev, ctx):
        return self._baselines(ev, ctx)[ev.states.rollout, ev.states.cut]


def default_estimators() -> list[str]:
    """Every registered estimator, in registration order."""
    return list(ESTIMATORS)
