"""POISE's one-rollout ablations: a baseline from the rollout's own probe prediction.

POISE (POISE.md, "Advantage and loss") takes b_i from the sibling rollouts' predictions. The
paper's ablation replaces it with a prediction on rollout i itself, two ways:
- "poise_self", same-rollout features (biased, 40.7% vs 50.1%): b_i = g(phi_i), the main probe's
  prediction on rollout i's own features. phi_i holds its reasoning state and entropies, so
  b_i depends on the sampled y_i and E[b_i grad log pi(y_i|x)] != 0: the gradient is biased.
- "poise_prompt", prompt-only features (unbiased, 47.5%): b_i = h(prompt vector of x), a second
  probe bank fitted only on the prompt block of phi (its first `hidden` columns; the trainer's
  blocks are (hidden, hidden, 3)). The prompt vector is pooled over prompt tokens only, so b_i
  does not depend on y_i and the gradient stays unbiased.
Both use RLOO (the sibling rewards' mean) in a group until their probe is fitted and
`probe.bootstrap_steps` have passed, as POISE does (`poise_with_bootstrap`).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from poise_probe.advantages import AdvantageResult, poise_with_bootstrap
from poise_probe.probe import ProbeBank, loo_targets
from poise_probe.value_methods import StepContext, ValueMethod, register_value_method

__all__ = ["PoisePrompt", "PoiseSelf", "own_prediction_advantage"]


def own_prediction_advantage(rewards: Tensor, group_ids: Tensor, preds: Tensor,
                             ready: Tensor) -> tuple[AdvantageResult, Tensor]:
    """A_i = r_i - preds_i (the rollout's own prediction) where its group is ready, RLOO elsewhere.

    rewards, group_ids, preds, ready (N,). The groups that use the prediction are the ones
    `poise_with_bootstrap` would give the probe (every rollout ready); the rest keep its RLOO
    baseline. Unbiased only if preds_i does not depend on rollout i's own sample.
    Returns (advantages, used (N,) bool).
    Example: rewards [1, 0], preds [.7, .2], ready [T, T] -> baselines [.7, .2].
    """
    out, used = poise_with_bootstrap(rewards, group_ids, preds, ready)  # checks preds where used
    if bool(used.any()):
        dtype, dev = out.advantages.dtype, out.advantages.device
        p = torch.as_tensor(preds, device=dev).to(dtype)[used]
        out.baselines[used] = p
        out.advantages[used] = torch.as_tensor(rewards, device=dev).to(dtype)[used] - p
    return out, used


def _ready(fitted: np.ndarray, step: int, cfg) -> Tensor:
    """(N,) bool: the probe is fitted for the rollout and the bootstrap period is over."""
    return torch.from_numpy(np.asarray(fitted, dtype=bool)) & torch.tensor(
        step > cfg.probe.bootstrap_steps)


@register_value_method("poise_self")
class PoiseSelf(ValueMethod):
    """b_i = g(phi_i): the main probe's prediction on rollout i's own features (biased)."""

    def __init__(self, cfg, model=None, tokenizer=None, device=None):
        del model, tokenizer, device
        self.cfg = cfg

    def advantages(self, ctx: StepContext) -> AdvantageResult:
        preds = torch.from_numpy(np.nan_to_num(np.asarray(ctx.preds, dtype=np.float64)))
        adv, self.used = own_prediction_advantage(ctx.rewards, ctx.group_ids, preds,
                                                   _ready(ctx.fitted, ctx.step, self.cfg))
        return adv

    def update(self, ctx: StepContext) -> dict[str, float]:
        """The main bank refits in the trainer; only the share of rollouts that used it."""
        return {} if self.used is None else {"ablation/used_frac": float(self.used.float().mean())}


@register_value_method("poise_prompt")
class PoisePrompt(ValueMethod):
    """b_i = h(prompt vector of x_i): its own probe bank, fitted on the prompt block only."""

    def __init__(self, cfg, model=None, tokenizer=None, device=None):
        del tokenizer, device
        if model is None:
            raise ValueError("poise_prompt needs the policy to know its hidden size (the width "
                             "of the prompt block of the features).")
        self.cfg = cfg
        self.hidden = int(model.config.hidden_size)
        p = cfg.probe
        self.bank = ProbeBank(dict(p.buffer_caps), alpha=p.alpha, blocks=(self.hidden,),
                              pca_components=(p.pca_prompt,), min_steps_to_fit=p.min_steps_to_fit)
        self._frozen: tuple[np.ndarray, np.ndarray, Tensor] | None = None

    def prompt_block(self, features) -> np.ndarray:
        """The first `hidden` columns of phi (N, 2 hidden + 3): the pooled prompt vector."""
        X = np.asarray(features)
        if X.ndim != 2 or X.shape[1] != 2 * self.hidden + 3:
            raise ValueError(f"poise_prompt expects features (N, 2*hidden + 3) = (N, "
                             f"{2 * self.hidden + 3}) laid out [prompt; reasoning; entropies]; "
                             f"got shape {X.shape}.")
        return X[:, :self.hidden]

    def advantages(self, ctx: StepContext) -> AdvantageResult:
        """Predictions of the prompt probe fitted on earlier steps only (frozen here)."""
        preds, fitted, _ = self.bank.predict(self.prompt_block(ctx.features), ctx.batch.domains)
        adv, used = own_prediction_advantage(ctx.rewards, ctx.group_ids,
                                             torch.from_numpy(np.nan_to_num(preds)),
                                             _ready(fitted, ctx.step, self.cfg))
        self._frozen = (preds, fitted, used)
        self.used = used
        return adv

    def update(self, ctx: StepContext) -> dict[str, float]:
        """This batch enters the prompt bank, which refits; its metrics under prompt_probe/."""
        if self._frozen is None:
            raise RuntimeError("poise_prompt.update(ctx) before advantages(ctx): the baselines "
                               "must come from the probe before it learns from the batch.")
        preds, fitted, used = self._frozen
        scores, gids = ctx.batch.scores.numpy(), ctx.group_ids.numpy()
        m = self.bank.update(self.prompt_block(ctx.features), scores, gids, ctx.batch.domains,
                             ctx.step)
        out = {"prompt_probe/" + k.removeprefix("probe/"): v for k, v in m.items()}
        out["ablation/used_frac"] = float(used.float().mean())
        if fitted.any():                # the error of the predictions this step's baselines used
            err = preds[fitted] - loo_targets(scores, gids)[fitted]
            out["prompt_probe/mae"] = float(np.abs(err).mean())
        self._frozen = None
        return out

    def state_dict(self) -> dict:
        return {"bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"bank"}:
            raise ValueError(f"poise_prompt's state is {{'bank': ...}}; the checkpoint has "
                             f"{sorted(state)}.")
        self.bank.load_state_dict(state["bank"])
