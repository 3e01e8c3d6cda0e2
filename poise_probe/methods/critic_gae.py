"""PPO with a token-level critic and GAE ("ppo_gae"), as verl runs it (`core_algos.py`).

V(s_t) at every response position comes from the same kind of critic as `ppo_critic` (the
policy's decoder under a scalar head, `critic.ValueModel`), without a sigmoid: the state
before response token t is the sequence up to token t - 1, so V(s_t) is the head on that
position's hidden state (V(s_0) sits on the last prompt token, where ppo_critic reads).
The verifier's reward sits on the last response token; GAE(gamma, lam) gives (N, T) advantages
and the returns the critic regresses on with verl's clipped value loss.
Like verl, the advantages are whitened over the batch's response tokens (`masked_whiten`);
POISE and ppo_critic do not normalise.
"""
from __future__ import annotations

import torch
from torch import Tensor

from poise_probe import stats
from poise_probe.advantages import AdvantageResult, masked_whiten, rloo_advantage
from poise_probe.features import pack_rollouts
from poise_probe.methods.critic import CriticMethod
from poise_probe.value_methods import StepContext, register_value_method

__all__ = ["TokenCritic", "clipped_value_loss", "gae_advantage_return",
           "token_level_rewards"]


def token_level_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """(N, T): each rollout's reward on its last response token, 0 elsewhere (verl's layout).

    rewards (N,), mask (N, T) right-padded. A rollout without response tokens gets no reward
    token; its row has no advantage for the loss to use.
    """
    out = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    lens = mask.sum(-1).long()                                                  # (N,)
    has = lens > 0
    out[has, lens[has] - 1] = rewards[has]
    return out


def gae_advantage_return(token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float,
                         lam: float) -> tuple[Tensor, Tensor]:
    """GAE advantages and returns (N, T), before whitening; verl compute_gae_advantage_return.

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, returns = A + V.
    Positions where `mask` is 0 are skipped: the next value and running advantage pass
    through them unchanged (0 after a right-padded response). Schulman et al. 2016, Eq. 16.
    Example: V [.5, .2, .9], reward 1 on the last token, gamma 1, lam .5
    -> A [.075, .75, .1], returns [.575, .95, 1.].
    """
    m = mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])
    last = torch.zeros_like(values[:, 0])
    out = []
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * last
        next_value = values[:, t] * m[:, t] + (1 - m[:, t]) * next_value
        last = a * m[:, t] + (1 - m[:, t]) * last
        out.append(last)
    advantages = torch.stack(out[::-1], dim=1)
    return advantages, advantages + values


def clipped_value_loss(vpreds: Tensor, returns: Tensor, old_values: Tensor, mask: Tensor,
                       clip: float | None, num_tokens: int) -> tuple[Tensor, Tensor]:
    """0.5 * token-sum of max((v - R)^2, (clip(v, V_old +- c) - R)^2) / num_tokens, and how
    many tokens the clipped term decided; verl compute_value_loss (token-mean), shapes (N, T).
    `clip` None: the plain 0.5 * squared error. `num_tokens` is the mini-batch's token count, so
    micro-batch losses add up to the mini-batch's token mean.
    Example: v .5, V_old .2, R 1, c .2 -> clip(v) .4; max(.25, .36) -> loss .18, clipped.
    """
    m = mask.to(vpreds.dtype)
    loss1 = (vpreds - returns) ** 2
    if clip is None:
        return 0.5 * (loss1 * m).sum() / num_tokens, torch.zeros(())
    clipped = torch.clamp(vpreds, old_values - clip, old_values + clip)
    loss2 = (clipped - returns) ** 2
    loss = 0.5 * (torch.maximum(loss1, loss2) * m).sum() / num_tokens
    return loss, ((loss2 > loss1).to(m.dtype) * m).sum()


@register_value_method("ppo_gae")
class TokenCritic(CriticMethod):
    """verl's PPO critic: V(s_t) per response token, GAE(critic.gamma, critic.lam) advantages
    whitened over the batch, returns as value targets; baselines (N, T) are the values.
    During `critic.warmup_steps` the advantages are RLOO's, the same on every token.
    """

    name = "ppo_gae"
    token_level = True

    def token_values(self, rows: list[int], batch, width: int) -> Tensor:
        """(len(rows), width) V(s_t) of each rollout's response tokens, 0 past its end."""
        packed = pack_rollouts([batch.prompt_ids[int(batch.group_ids[n])] for n in rows],
                               [batch.response_ids[n] for n in rows], batch.pad_id)
        out = self.critic(packed, self.autocast)                                # (B, L)
        mask = packed.resp_mask.to(out.device)
        # the state before token t ends at token t - 1: that position's hidden state
        pos = (packed.resp_pos.to(out.device) - 1).clamp(min=0)                 # (B, R)
        v = out.gather(1, pos) * mask
        return torch.nn.functional.pad(v, (0, width - v.shape[1]))

    def _values(self, ctx: StepContext) -> Tensor:
        """(N, T) values, float32 on the CPU."""
        n, mb, width = len(ctx.batch.response_ids), self.micro_batch_size, ctx.mask.shape[1]
        return torch.cat([self.token_values(list(range(s, min(s + mb, n))), ctx.batch,
                                            width).cpu() for s in range(0, n, mb)])

    def _advantages(self, ctx: StepContext, values: Tensor, warmup: bool) -> AdvantageResult:
        c, mask = self.cfg.critic, ctx.mask
        v = values.to(ctx.rewards.dtype)
        adv, returns = gae_advantage_return(token_level_rewards(ctx.rewards, mask), v, mask,
                                            c.gamma, c.lam)
        ctx.extra["critic_returns"] = returns                     # the update's targets
        ones = torch.ones_like(v)
        if warmup:
            r = rloo_advantage(ctx.rewards, ctx.group_ids)
            return AdvantageResult(r.advantages[:, None] * mask,
                                   r.baselines[:, None].expand(mask.shape).clone(), ones)
        # padded positions are set to 0 (verl leaves them; the loss masks them either way)
        return AdvantageResult(masked_whiten(adv, mask) * mask, v.clone(), ones)

    def _rows(self, ctx: StepContext, prompts: list[int]) -> tuple[list[int], int]:
        """The mini-batch's rollouts; the value loss is a mean over their response tokens."""
        chosen = set(prompts)
        rows = [n for n, g in enumerate(ctx.group_ids.tolist()) if g in chosen]
        return rows, max(1, int(ctx.mask[rows].sum()))

    def _loss(self, ctx: StepContext, rows: list[int], denom: int
              ) -> tuple[Tensor, dict[str, float]]:
        width = ctx.mask.shape[1]
        vpreds = self.token_values(rows, ctx.batch, width)                      # (B, T)
        dev = vpreds.device
        loss, n_clipped = clipped_value_loss(
            vpreds, ctx.extra["critic_returns"][rows].to(dev, torch.float32),
            ctx.extra["critic_values"][rows].to(dev, torch.float32), ctx.mask[rows].to(dev),
            self.cfg.critic.value_clip, denom)
        return loss, {"loss": float(loss.detach()), "vf_clipfrac": float(n_clipped) / denom}

    def _value_metrics(self, ctx: StepContext, values: Tensor) -> dict[str, float]:
        """V(s_0) against the rewards (comparable with ppo_critic's V(x)), and verl's token-level
        explained variance of the returns."""
        mask = ctx.mask.bool()
        has = mask[:, 0]
        r = ctx.rewards.double().numpy()[has.numpy()]
        v0 = values[:, 0].double().numpy()[has.numpy()]
        ret = ctx.extra["critic_returns"]
        return {"critic/value_mean": float(v0.mean()) if v0.size else float("nan"),
                "critic/explained_var": stats.explained_variance(r, v0),
                "critic/value_token_mean": float(values[mask].mean()),
                "critic/returns_mean": float(ret[mask].mean()),
                "critic/vf_explained_var": stats.explained_variance(ret[mask].double().numpy(),
                                                                    values[mask].double().numpy())}
