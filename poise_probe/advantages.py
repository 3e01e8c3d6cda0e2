"""Advantage estimators: pure functions from rewards (and probe predictions) to advantages.

Most estimators map one scalar reward per rollout to one scalar advantage per rollout,
`A_i = (r_i - b_i) / scale_i`, which the loss applies to every response token. Estimators
registered with `token_level=True` (critics, segment methods) receive the response mask and
return (N, T) advantages, one per token. Rows belong to
prompts through `group_ids` (groups may differ in size and need not be contiguous). Names and
conventions follow verl's `core_algos.py`; where this module differs, the docstring says so.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from poise_probe import stats

logger = logging.getLogger(__name__)

__all__ = [
    "ADV_ESTIMATORS",
    "AdvantageResult",
    "check_rewards",
    "compute_advantages",
    "filter_groups",
    "masked_whiten",
    "masked_whiten_scale",
    "get_adv_estimator",
    "group_index",
    "overlong_reward_shaping",
    "poise_with_bootstrap",
    "register_adv_est",
]


@dataclass
class AdvantageResult:
    """Per-rollout advantages with the baseline and scale that produced them: A = (r - b) / scale."""

    advantages: Tensor  # (N,) A_i for every response token of rollout i, or (N, T) per token
    baselines: Tensor  # (N,) b_i, or (N, T)
    scale: Tensor  # advantages' shape; ones when the estimator does not normalise

    @property
    def token_level(self) -> bool:
        return self.advantages.ndim == 2

    def per_token(self, mask: Tensor) -> Tensor:
        """(N, T) advantages, zero where `mask` is 0 (per-rollout ones broadcast over tokens)."""
        a = self.advantages if self.token_level else self.advantages[:, None].expand(mask.shape)
        if a.shape != mask.shape:
            raise ValueError(f"mask must be {tuple(a.shape)} for these advantages; got "
                             f"{tuple(mask.shape)}.")
        return torch.where(mask != 0, a, torch.zeros((), dtype=a.dtype, device=a.device))

    def per_sequence(self, mask: Tensor | None = None) -> Tensor:
        """(N,) advantages: as they are, or the mean over each rollout's counted tokens."""
        if not self.token_level:
            return self.advantages
        if mask is None:
            raise ValueError("token-level advantages need the response mask to average per rollout.")
        m = mask.to(self.advantages.dtype)
        return (self.per_token(mask) * m).sum(-1) / m.sum(-1).clamp_min(1)

    def identity_max_abs_err(self, rewards: Tensor) -> float:
        """max_i |A_i * scale_i + b_i - r_i|: the advantage identity check, ~0 up to rounding."""
        r = torch.as_tensor(rewards).to(device=self.advantages.device, dtype=self.advantages.dtype)
        if r.shape != self.advantages.shape:
            raise ValueError(f"rewards must have the advantages' shape {tuple(self.advantages.shape)}; "
                             f"got {tuple(r.shape)}.")
        if r.numel() == 0:
            return 0.0
        return float((self.advantages * self.scale + self.baselines - r).abs().max())


ADV_ESTIMATORS: dict[str, Callable[..., AdvantageResult]] = {}
TOKEN_LEVEL: set[str] = set()  # estimators that take `response_mask` and return (N, T)


def register_adv_est(name: str, *, token_level: bool = False):
    """Decorator adding an estimator `fn(rewards, group_ids, *, preds=None, epsilon=1e-6)` to the
    registry; a `token_level` one also takes `response_mask` (N, T) and returns (N, T)."""

    def deco(fn: Callable[..., AdvantageResult]) -> Callable[..., AdvantageResult]:
        if name in ADV_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered "
                             f"({ADV_ESTIMATORS[name].__qualname__}); pick another name.")
        ADV_ESTIMATORS[name] = fn
        if token_level:
            TOKEN_LEVEL.add(name)
        return fn

    return deco


def get_adv_estimator(name: str) -> Callable[..., AdvantageResult]:
    """The registered estimator called `name`; unknown names raise KeyError listing the known ones."""
    try:
        return ADV_ESTIMATORS[name]
    except KeyError:
        raise KeyError(f"unknown adv_estimator {name!r}; known: {sorted(ADV_ESTIMATORS)}.") from None


def compute_advantages(name: str, rewards: Tensor, group_ids: Tensor, *, preds: Tensor | None = None,
                       epsilon: float = 1e-6, response_mask: Tensor | None = None,
                       **options) -> AdvantageResult:
    """Run estimator `name` on rewards (N,) grouped by prompt ids (N,); preds (N,) only for poise;
    `response_mask` (N, T) is passed to token-level estimators (and required by them);
    `options` are the estimator's own keywords (reinforce_plus_plus: gamma)."""
    fn = get_adv_estimator(name)
    if name not in TOKEN_LEVEL:
        return fn(rewards, group_ids, preds=preds, epsilon=epsilon, **options)
    if response_mask is None or response_mask.ndim != 2 or response_mask.shape[0] != rewards.shape[0]:
        got = None if response_mask is None else tuple(response_mask.shape)
        raise ValueError(f"{name} gives one advantage per token and needs response_mask of shape "
                         f"(N={rewards.shape[0]}, T); got {got}.")
    out = fn(rewards, group_ids, preds=preds, epsilon=epsilon, response_mask=response_mask,
             **options)
    if out.advantages.shape != response_mask.shape:
        raise ValueError(f"token-level estimator {name} returned advantages of shape "
                         f"{tuple(out.advantages.shape)}; expected {tuple(response_mask.shape)}.")
    return out


def poise_with_bootstrap(rewards: Tensor, group_ids: Tensor, preds: Tensor,
                         probe_ready: Tensor) -> tuple[AdvantageResult, Tensor]:
    """POISE advantages where the probe may be used, RLOO's sibling-reward baseline elsewhere.

    `probe_ready` (N,) bool is true where the rollout's probe is fitted and the bootstrap period
    is over. A prompt group uses POISE only when every rollout in it is ready (the baseline of
    rollout i comes from its siblings, so a group is one kind); other groups use RLOO, the
    spec's bootstrap (POISE.md, "Bootstrap"). Predictions of groups not using the probe are
    ignored (they may be NaN). Returns (advantages, used (N,) bool).
    Example: rewards [1, 0 | 1, 1], preds [.2, .4 | .3, .5], ready [T, T | T, F]
    -> baselines [.4, .2 | 1, 1] (group 2 falls back to the sibling's reward), used [T, T | F, F].
    """
    rewards, group_ids = check_rewards(rewards, group_ids, 0.0)
    ready = torch.as_tensor(probe_ready, dtype=torch.bool, device=rewards.device)
    if ready.shape != rewards.shape:
        raise ValueError(f"probe_ready must have the rewards' shape {tuple(rewards.shape)}; got "
                         f"{tuple(ready.shape)}.")
    _, inverse, _ = group_index(group_ids)
    n_groups = int(inverse.max()) + 1
    not_ready = torch.zeros(n_groups, dtype=torch.long, device=rewards.device)
    not_ready.index_add_(0, inverse, (~ready).long())
    used = not_ready[inverse] == 0                                       # (N,)
    out = rloo_advantage(rewards, group_ids)
    if bool(used.any()):
        p = torch.as_tensor(preds, device=rewards.device).to(rewards.dtype)
        pz = poise_advantage(rewards[used], group_ids[used], preds=p[used])
        out.advantages[used] = pz.advantages
        out.baselines[used] = pz.baselines
        out.scale[used] = pz.scale
    return out, used


# ---------------------------------------------------------------------------------------------
# Boundary checks and group bookkeeping
# ---------------------------------------------------------------------------------------------

def check_rewards(rewards: Tensor, group_ids: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """Validate (rewards (N,), group_ids (N,)); return rewards as floats and ids as int64."""
    if not isinstance(rewards, Tensor):
        raise TypeError(f"rewards must be a torch.Tensor of shape (N,); got {type(rewards).__name__}.")
    if not isinstance(group_ids, Tensor):
        raise TypeError(f"group_ids must be a torch.Tensor of shape (N,); got {type(group_ids).__name__}.")
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D (one scalar per rollout); got shape {tuple(rewards.shape)}. "
                         f"Sum token-level rewards over the response first.")
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids must have the rewards' shape {tuple(rewards.shape)}; "
                         f"got {tuple(group_ids.shape)}.")
    if rewards.numel() == 0:
        raise ValueError("rewards is empty; an advantage estimator needs at least one rollout.")
    if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor (one prompt id per rollout); "
                         f"got dtype {group_ids.dtype}. Map prompt uids to integers first.")
    if not rewards.dtype.is_floating_point:
        rewards = rewards.to(torch.get_default_dtype())
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"rewards must be finite; rewards[{i}] = {float(rewards[i])} "
                         f"({int(bad.sum())} non-finite values). Fix the verifier output.")
    if not (epsilon >= 0.0):
        raise ValueError(f"epsilon must be >= 0 (added to the std); got {epsilon}.")
    return rewards, group_ids.to(device=rewards.device, dtype=torch.long)


def _check_preds(preds: Tensor | None, rewards: Tensor) -> Tensor:
    """Validate probe predictions preds (N,) for poise; return them in the rewards' dtype."""
    if preds is None:
        raise ValueError("poise needs preds (the probe's predictions g(phi_i), one per rollout); got None. "
                         "Predict with the current probe before computing advantages.")
    if not isinstance(preds, Tensor):
        raise TypeError(f"preds must be a torch.Tensor of shape (N,); got {type(preds).__name__}.")
    if preds.shape != rewards.shape:
        raise ValueError(f"preds must have the rewards' shape {tuple(rewards.shape)}; got {tuple(preds.shape)}.")
    preds = preds.to(device=rewards.device, dtype=rewards.dtype)
    bad = ~torch.isfinite(preds)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"preds must be finite; preds[{i}] = {float(preds[i])} ({int(bad.sum())} "
                         f"non-finite values). Check the probe's features and fit.")
    return preds


def group_index(group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(unique ids (G,), row -> group position (N,), group sizes (G,))."""
    uniq, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return uniq, inverse, counts


def _group_sum(x: Tensor, inverse: Tensor, num_groups: int) -> Tensor:
    """Per-group sums (G,) of x (N,)."""
    return torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, inverse, x)


def _require_siblings(name: str, uniq: Tensor, counts: Tensor) -> None:
    """Raise if any group has a single rollout (leave-one-out baselines need a sibling)."""
    lone = counts < 2
    if bool(lone.any()):
        ids = uniq[lone].tolist()
        shown = ", ".join(str(g) for g in ids[:5]) + (", ..." if len(ids) > 5 else "")
        raise ValueError(f"{name} needs >= 2 rollouts per prompt (baselines come from sibling rollouts); "
                         f"group {ids[0]} has 1 ({len(ids)} such groups: {shown}). "
                         f"Sample num_generations >= 2 per prompt.")


def _group_mean_std(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row group mean and unbiased group std (N,); a 1-rollout group gets mean 0, std 1 (verl)."""
    uniq, inverse, counts = group_index(group_ids)
    n = counts.to(rewards.dtype)
    mean_g = _group_sum(rewards, inverse, len(uniq)) / n  # (G,)
    dev = rewards - mean_g[inverse]
    var_g = _group_sum(dev * dev, inverse, len(uniq)) / (n - 1).clamp_min(1)  # torch.std(unbiased=True)
    lone = counts == 1
    if bool(lone.any()):
        # verl's compute_grpo_outcome_advantage sets mean 0, std 1 for a lone rollout, so A = r / (1 + eps).
        logger.warning("%d prompt group(s) have a single rollout (e.g. group %s); using mean 0 and std 1 "
                       "for them as verl does.", int(lone.sum()), uniq[lone][0].item())
    # a group of equal rewards: its mean is that reward and its std 0 exactly (sum / k rounds,
    # and GRPO would divide the rounding error by a std made of the same error: |A| ~ 0.1)
    top = torch.full((len(uniq),), -torch.inf, dtype=rewards.dtype).scatter_reduce(
        0, inverse, rewards, "amax")
    low = torch.full((len(uniq),), torch.inf, dtype=rewards.dtype).scatter_reduce(
        0, inverse, rewards, "amin")
    constant = top == low
    mean_g = torch.where(constant, top, mean_g)
    var_g = torch.where(constant, torch.zeros_like(var_g), var_g)
    mean_g = torch.where(lone, torch.zeros_like(mean_g), mean_g)
    std_g = torch.where(lone, torch.ones_like(var_g), var_g.sqrt())
    return mean_g[inverse], std_g[inverse]


# ---------------------------------------------------------------------------------------------
# Estimators
# ---------------------------------------------------------------------------------------------

def _sibling_mean(name: str, values: Tensor, group_ids: Tensor) -> Tensor:
    """Mean of `values` over the *other* rows of each row's group; (N,) -> (N,)."""
    uniq, inverse, counts = group_index(group_ids)
    _require_siblings(name, uniq, counts)
    # stats.loo_mean sums in float64 with 0/1 weights: with two rollouts, the sibling bit for bit
    loo = stats.loo_mean(values.detach().cpu().double().numpy(), inverse.cpu().numpy())
    return torch.from_numpy(loo).to(dtype=values.dtype, device=values.device)


@register_adv_est("poise")
def poise_advantage(rewards: Tensor, group_ids: Tensor, *, preds: Tensor | None = None,
                    epsilon: float = 1e-6) -> AdvantageResult:
    """A_i = r_i - mean_{j != i, same prompt} g(phi_j), no normalisation; (N,) -> (N,). POISE Sec. 3."""
    del epsilon  # no normalisation, so nothing to stabilise
    rewards, group_ids = check_rewards(rewards, group_ids, 0.0)
    preds = _check_preds(preds, rewards)
    # Sibling predictions only: b_i does not depend on rollout i, which keeps the gradient unbiased.
    baselines = _sibling_mean("poise", preds, group_ids)
    return AdvantageResult(rewards - baselines, baselines, torch.ones_like(rewards))


@register_adv_est("rloo")
def rloo_advantage(rewards: Tensor, group_ids: Tensor, *, preds: Tensor | None = None,
                   epsilon: float = 1e-6) -> AdvantageResult:
    """A_i = r_i - mean_{j != i, same prompt} r_j; (N,) -> (N,). Ahmadian et al. 2024 (RLOO)."""
    del preds, epsilon
    rewards, group_ids = check_rewards(rewards, group_ids, 0.0)
    baselines = _sibling_mean("rloo", rewards, group_ids)
    return AdvantageResult(rewards - baselines, baselines, torch.ones_like(rewards))


def _group_centred(rewards: Tensor, group_ids: Tensor, epsilon: float, *, scaled: bool
                   ) -> AdvantageResult:
    """r - group mean, divided by (group std + eps) when scaled (GRPO) or not (Dr. GRPO)."""
    rewards, group_ids = check_rewards(rewards, group_ids, epsilon)
    mean, std = _group_mean_std(rewards, group_ids)
    scale = std + epsilon if scaled else torch.ones_like(rewards)
    return AdvantageResult((rewards - mean) / scale, mean, scale)


@register_adv_est("grpo")
def grpo_advantage(rewards: Tensor, group_ids: Tensor, *, preds: Tensor | None = None,
                   epsilon: float = 1e-6) -> AdvantageResult:
    """A = (r - group mean) / (group std + eps), std unbiased; lone rollouts: mean 0, std 1 (verl). Shao et al. 2024."""
    del preds
    return _group_centred(rewards, group_ids, epsilon, scaled=True)


@register_adv_est("dr_grpo")
def dr_grpo_advantage(rewards: Tensor, group_ids: Tensor, *, preds: Tensor | None = None,
                      epsilon: float = 1e-6) -> AdvantageResult:
    """A = r - group mean, no std division; lone rollouts: mean 0 (verl). Liu et al. 2025 (Dr. GRPO)."""
    del preds
    return _group_centred(rewards, group_ids, epsilon, scaled=False)


@register_adv_est("reinforce_pp")
def reinforce_pp_advantage(rewards: Tensor, group_ids: Tensor, *, preds: Tensor | None = None,
                           epsilon: float = 1e-6) -> AdvantageResult:
    """A = (r - batch mean) / (batch std + eps), std unbiased, group_ids unused. Hu 2025 (REINFORCE++).

    Per rollout: every rollout counts once in the batch statistics and its A applies to all its
    tokens. verl's `reinforce_plus_plus` (registered under that name below) whitens token-level
    returns instead, so each rollout is weighted by its length and the std gets verl's 1e-8.
    """
    del preds
    rewards, group_ids = check_rewards(rewards, group_ids, epsilon)
    if rewards.numel() < 2:
        raise ValueError(f"reinforce_pp normalises by the batch std and needs >= 2 rollouts; "
                         f"got {rewards.numel()}.")
    mean = rewards.mean().expand_as(rewards)
    scale = (rewards.std(unbiased=True) + epsilon).expand_as(rewards)
    return AdvantageResult((rewards - mean) / scale, mean.clone(), scale.clone())


@register_adv_est("dapo")
def dapo_advantage(rewards: Tensor, group_ids: Tensor, *, preds: Tensor | None = None,
                   epsilon: float = 1e-6) -> AdvantageResult:
    """The GRPO advantages; DAPO's dynamic sampling and overlong shaping live in the trainer. Yu et al. 2025."""
    return grpo_advantage(rewards, group_ids, preds=preds, epsilon=epsilon)


# ---------------------------------------------------------------------------------------------
# verl's token-level REINFORCE++ (verl/trainer/ppo/core_algos.py, verl/utils/torch_functional.py)
# ---------------------------------------------------------------------------------------------

def masked_whiten(values: Tensor, mask: Tensor) -> Tensor:
    """verl's masked_whiten (shift_mean=True): `masked_whiten_scale`'s whitened values. Example:
    [[1, 2, 3, 100]], mask [[1, 1, 1, 0]] -> [[-1, 0, 1, 98]] (padding carried, not counted)."""
    return masked_whiten_scale(values, mask)[0]


def masked_whiten_scale(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """verl_F.masked_whiten over every counted token of the batch: (whitened (N, T), scale ()).

    verl: mean = sum(x m) / (sum(m) + 1e-8); var = (sum((x - mean)^2 m) / (sum(m) + 1e-8))
    * n / (n - 1), n = sum(m) (unbiased); whitened = (x - mean) * rsqrt(var + 1e-8);
    scale = sqrt(var + 1e-8).
    """
    m = mask.to(values.dtype)
    n = m.sum()
    if n < 2:
        raise ValueError(f"whitening over tokens needs >= 2 counted response tokens for an "
                         f"unbiased variance (verl's masked_var); got {int(n)}.")
    mean = torch.where(m != 0, values, 0.0).mul(m).sum() / (n + 1e-8)
    var = torch.where(m != 0, (values - mean) ** 2, 0.0).mul(m).sum() / (n + 1e-8) * (n / (n - 1))
    return (values - mean) * torch.rsqrt(var + 1e-8), (var + 1e-8).sqrt()


def _token_result(rewards: Tensor, advantages: Tensor, scale: Tensor) -> AdvantageResult:
    """AdvantageResult of per-token A (N, T) for token "rewards" (N, T): b = r - A * scale."""
    s = scale.expand_as(advantages).clone()
    return AdvantageResult(advantages, rewards - advantages * s, s)


def _check_mask(name: str, response_mask: Tensor, rewards: Tensor) -> Tensor:
    """Validate the response mask (N, T); return it in the rewards' dtype."""
    if response_mask.ndim != 2 or response_mask.shape[0] != rewards.shape[0]:
        raise ValueError(f"{name} needs response_mask (N={rewards.shape[0]}, T); got "
                         f"{tuple(response_mask.shape)}.")
    return response_mask.to(device=rewards.device, dtype=rewards.dtype)


@register_adv_est("reinforce_plus_plus", token_level=True)
def reinforce_plus_plus_advantage(rewards: Tensor, group_ids: Tensor, *, preds: Tensor | None = None,
                                  epsilon: float = 1e-6, response_mask: Tensor | None = None,
                                  gamma: float = 1.0) -> AdvantageResult:
    """verl's REINFORCE++: whitened discounted returns of the outcome reward; (N,) -> (N, T).

    The reward r_i sits on rollout i's last counted token (verl's reward managers:
    `reward_tensor[i, valid_response_length - 1] = score`). Then, as verl's
    compute_reinforce_plus_plus_outcome_advantage:
        for t in reversed(range(T)):
            running_return = token_level_rewards[:, t] + gamma * running_return
            returns[:, t] = running_return
            running_return = running_return * response_mask[:, t]   # reset after EOS
        advantages = masked_whiten(returns, response_mask) * response_mask
    so the mean and std run over every response token of the batch (a rollout weighs by its
    length). group_ids and epsilon are unused (verl's whitening has its own 1e-8). The scale
    is sqrt(var + 1e-8) and A * scale + b = the token's return. Hu 2025 (REINFORCE++).
    """
    del preds
    rewards, group_ids = check_rewards(rewards, group_ids, epsilon)
    mask = _check_mask("reinforce_plus_plus", response_mask, rewards)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1] (the returns' discount); got {gamma}.")
    n, t_len = mask.shape
    cols = torch.arange(t_len, device=mask.device).expand(n, t_len)
    last = torch.where(mask != 0, cols, -1).amax(-1)                   # (N,) -1: no token
    token_rewards = torch.zeros_like(mask)                             # (N, T)
    has = last >= 0
    token_rewards[has, last[has]] = rewards[has]
    returns = torch.zeros_like(mask)
    running = torch.zeros(n, dtype=mask.dtype, device=mask.device)
    for t in reversed(range(t_len)):
        running = token_rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * mask[:, t]
    white, scale = masked_whiten_scale(returns, mask)
    return _token_result(returns, white * mask, scale)


@register_adv_est("reinforce_plus_plus_baseline", token_level=True)
def reinforce_plus_plus_baseline_advantage(rewards: Tensor, group_ids: Tensor, *,
                                           preds: Tensor | None = None, epsilon: float = 1e-6,
                                           response_mask: Tensor | None = None
                                           ) -> AdvantageResult:
    """verl's REINFORCE++-baseline: r minus its group mean, whitened over tokens; (N,) -> (N, T).

    As verl's compute_reinforce_plus_plus_baseline_outcome_advantage:
        scores[i] = scores[i] - id2mean[index[i]]       # a lone rollout: mean 0
        scores = scores.unsqueeze(-1).tile([1, T]) * response_mask
        scores = masked_whiten(scores, response_mask) * response_mask
    so the whitening runs over every response token of the batch. epsilon is unused, as in
    verl. A * scale + b = r on counted tokens. Hu 2025 (REINFORCE++-baseline).
    """
    del preds
    rewards, group_ids = check_rewards(rewards, group_ids, epsilon)
    mask = _check_mask("reinforce_plus_plus_baseline", response_mask, rewards)
    mean, _ = _group_mean_std(rewards, group_ids)                      # lone: 0, as verl
    scores = (rewards - mean)[:, None] * mask                          # (N, T)
    white, scale = masked_whiten_scale(scores, mask)
    r = rewards[:, None].expand_as(mask) * (mask != 0)                 # the reward on each token
    return _token_result(r, white * mask, scale)


# ---------------------------------------------------------------------------------------------
# DAPO helpers (used by the trainer)
# ---------------------------------------------------------------------------------------------

def filter_groups(rewards: Tensor, group_ids: Tensor, *, keep_singletons: bool = True) -> Tensor:
    """Keep-mask (N,) bool dropping prompt groups whose rewards are all equal. DAPO Sec. 3.2 dynamic sampling.

    Like verl's DAPO trainer (`std > 0 or len(group) == 1`), a lone rollout is kept unless
    `keep_singletons=False`.
    """
    rewards, group_ids = check_rewards(rewards, group_ids, 0.0)
    uniq, inverse, counts = group_index(group_ids)
    init = torch.full((len(uniq),), float("nan"), dtype=rewards.dtype, device=rewards.device)
    g_max = init.scatter_reduce(0, inverse, rewards, reduce="amax", include_self=False)
    g_min = init.scatter_reduce(0, inverse, rewards, reduce="amin", include_self=False)
    keep_g = g_max > g_min
    if keep_singletons:
        keep_g = keep_g | (counts == 1)
    return keep_g[inverse]


def overlong_reward_shaping(lengths: Tensor, max_len: int, buffer_len: int,
                            penalty_factor: float = 1.0) -> Tensor:
    """Soft overlong punishment, lengths' shape, to add to rewards: 0 up to max_len - buffer_len, linear to
    -penalty_factor at max_len, -penalty_factor beyond. DAPO Sec. 3.4, Eq. 13.

    verl's DAPO reward manager computes `min(-(len - (max_len - buffer)) / buffer * factor, 0)`,
    identical up to max_len (its responses never exceed it); beyond max_len this follows the paper.
    """
    if not isinstance(lengths, Tensor):
        lengths = torch.as_tensor(lengths)
    if int(max_len) != max_len or max_len <= 0:
        raise ValueError(f"max_len must be a positive integer (max response tokens); got {max_len}.")
    if int(buffer_len) != buffer_len or not 0 < buffer_len <= max_len:
        raise ValueError(f"buffer_len must be an integer in [1, max_len={max_len}]; got {buffer_len}.")
    if not penalty_factor >= 0:
        raise ValueError(f"penalty_factor must be >= 0; got {penalty_factor}.")
    if lengths.is_floating_point() and not bool(torch.isfinite(lengths).all()):
        raise ValueError("lengths must be finite response lengths in tokens; got NaN or inf.")
    if bool((lengths < 0).any()):
        raise ValueError(f"lengths must be >= 0 response tokens; got min {lengths.min().item()}.")
    dtype = lengths.dtype if lengths.is_floating_point() else torch.get_default_dtype()
    exceed = lengths.to(dtype) - (max_len - buffer_len)  # tokens into the buffer
    return -penalty_factor * (exceed / buffer_len).clamp(0.0, 1.0)
