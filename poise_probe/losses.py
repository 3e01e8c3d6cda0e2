"""Token-level policy losses: masked reductions, the PPO clipped surrogate, KL estimators, entropies.

Conventions follow verl's `core_algos.py` (`compute_policy_loss_vanilla`, `agg_loss`,
`kl_penalty`). A `mask` is 1 where a token counts; values at masked positions (padding,
prompt tokens) never change a result or a gradient, even when they are NaN or inf.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "AGG_MODES",
    "KL_KINDS",
    "agg_loss",
    "entropy_from_logits",
    "kl_penalty",
    "logprob_mismatch",
    "masked_mean",
    "masked_sum",
    "policy_loss",
    "token_log_probs",
    "truncated_is_weights",
]

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
KL_KINDS = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """x * mask with masked-out entries set to exactly 0 (so NaN/inf there cannot leak)."""
    m = mask.to(x.dtype)
    return torch.where(mask != 0, x * m, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x * mask over `dim` (all dims when None); x and mask share a shape."""
    if x.shape != mask.shape:
        raise ValueError(f"mask must have x's shape {tuple(x.shape)}; got {tuple(mask.shape)}.")
    xm = _masked(x, mask)
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) / sum(mask) over `dim`; a slice with no counted token gives 0, not NaN."""
    total = masked_sum(x, mask, dim)
    count = mask.to(total.dtype)
    count = count.sum() if dim is None else count.sum(dim)
    return torch.where(count != 0, total / torch.where(count != 0, count, torch.ones_like(count)),
                       torch.zeros_like(total))


def _check_count(name: str, value: float | None) -> None:
    """A micro-batch normaliser must be a positive finite number (or None)."""
    if value is not None and not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{name} must be a positive count (the whole mini-batch's, for gradient "
                         f"accumulation) or None; got {value}.")


def agg_loss(loss_mat: Tensor, mask: Tensor, mode: str, *, num_tokens: float | None = None,
             num_seqs: float | None = None) -> Tensor:
    """Reduce a (B, T) token-loss matrix to a scalar by `mode` (verl's `agg_loss`); DAPO Sec. 3.3.

    token-mean: sum(loss * mask) / (num_tokens or mask.sum()).
    seq-mean-token-sum: sum over sequences of per-sequence token sums / (num_seqs or B).
    seq-mean-token-mean: sum over sequences of per-sequence token means / (num_seqs or B);
    a sequence with no counted token contributes 0 but still counts in B.
    Pass the mini-batch's num_tokens / num_seqs when accumulating gradients over micro-batches
    so that the summed micro-batch losses equal the full mini-batch loss.
    """
    if loss_mat.ndim != 2:
        raise ValueError(f"loss_mat must be (B, T); got shape {tuple(loss_mat.shape)}.")
    if mask.shape != loss_mat.shape:
        raise ValueError(f"mask must have loss_mat's shape {tuple(loss_mat.shape)}; got {tuple(mask.shape)}.")
    _check_count("num_tokens", num_tokens)
    _check_count("num_seqs", num_seqs)
    if mode == "token-mean":
        total = masked_sum(loss_mat, mask)
        if num_tokens is not None:
            return total / num_tokens
        count = mask.to(total.dtype).sum()
        return total / count if bool(count != 0) else total * 0.0
    if mode == "seq-mean-token-sum":
        per_seq = masked_sum(loss_mat, mask, dim=-1)  # (B,)
    elif mode == "seq-mean-token-mean":
        per_seq = masked_mean(loss_mat, mask, dim=-1)  # (B,)
    else:
        raise ValueError(f"loss_agg_mode {mode!r} is unknown; choose one of {list(AGG_MODES)}.")
    return per_seq.sum() / (num_seqs if num_seqs is not None else loss_mat.shape[0])


def policy_loss(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, mask: Tensor, *,
                clip_ratio_low: float = 0.2, clip_ratio_high: float = 0.28, clip_ratio_c: float = 10.0,
                log_ratio_clamp: float = 20.0, loss_agg_mode: str = "token-mean",
                num_tokens: float | None = None, num_seqs: float | None = None,
                token_weights: Tensor | None = None,
                ) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate with clip-higher and dual clip; log-probs (B, T), advantages (B,) or (B, T).

    ratio = exp(clamp(logp - logp_old, +-log_ratio_clamp)); per token
    loss = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high)), and for A < 0 also
    min(that, -A * c) (dual clip, Ye et al. 2020). Clip-higher: DAPO Sec. 3.1; POISE uses
    eps_low 0.2, eps_high 0.28, c 10, token-mean. Returns (loss, metrics); metrics are floats:
    actor/pg_loss, actor/clip_frac (tokens whose clip bound was active, either side),
    actor/clip_frac_higher (at 1 + eps_high, A > 0), actor/clip_frac_lower (at 1 - eps_low,
    A < 0), actor/dual_clip_frac (A < 0 capped at c * |A|; verl calls this pg_clipfrac_lower),
    actor/approx_kl (k1: mean of logp_old - logp over counted tokens, an estimate of
    KL(pi_old || pi) on old-policy samples; verl's ppo_kl), actor/approx_kl_k3 (k3 of the same),
    actor/ratio_mean, actor/ratio_max. An empty mask gives 0 for every metric.
    `token_weights` (B, T), if given, multiply each token's loss before aggregation (no
    gradient flows into them): the rollout correction of `truncated_is_weights`.
    """
    if not (0.0 < clip_ratio_low < 1.0):
        raise ValueError(f"clip_ratio_low must be in (0, 1) (the ratio floor is 1 - clip_ratio_low); "
                         f"got {clip_ratio_low}.")
    if not clip_ratio_high > 0.0:
        raise ValueError(f"clip_ratio_high must be > 0; got {clip_ratio_high}.")
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual-clip cap c * |A| for A < 0); got {clip_ratio_c}.")
    if not log_ratio_clamp > 0.0:
        raise ValueError(f"log_ratio_clamp must be > 0; got {log_ratio_clamp}.")
    if log_probs.ndim != 2:
        raise ValueError(f"log_probs must be (B, T); got shape {tuple(log_probs.shape)}.")
    for name, t in (("old_log_probs", old_log_probs), ("mask", mask)):
        if t.shape != log_probs.shape:
            raise ValueError(f"{name} must have log_probs' shape {tuple(log_probs.shape)}; got {tuple(t.shape)}.")
    if advantages.shape == log_probs.shape[:1]:
        advantages = advantages.unsqueeze(-1).expand_as(log_probs)  # one scalar per rollout -> every token
    elif advantages.shape != log_probs.shape:
        raise ValueError(f"advantages must be (B,) = {tuple(log_probs.shape[:1])} or (B, T) = "
                         f"{tuple(log_probs.shape)}; got {tuple(advantages.shape)}.")
    counted = mask != 0
    zero = torch.zeros((), dtype=log_probs.dtype, device=log_probs.device)
    # Zero masked entries before any arithmetic so garbage there cannot reach the loss or its gradient.
    log_probs = torch.where(counted, log_probs, zero)
    old_log_probs = torch.where(counted, old_log_probs.to(log_probs.dtype), zero)
    adv = torch.where(counted, advantages.to(log_probs.dtype), zero)

    log_ratio = torch.clamp(log_probs - old_log_probs, -log_ratio_clamp, log_ratio_clamp)  # (B, T)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)
    loss_dual = torch.minimum(loss_ppo, -adv * clip_ratio_c)
    loss_mat = torch.where(adv < 0, loss_dual, loss_ppo)  # (B, T)
    if token_weights is not None:
        if token_weights.shape != log_probs.shape:
            raise ValueError(f"token_weights must have log_probs' shape {tuple(log_probs.shape)}; "
                             f"got {tuple(token_weights.shape)}.")
        w = torch.where(counted, token_weights.detach().to(loss_mat.dtype), zero)
        loss_mat = loss_mat * w
    loss = agg_loss(loss_mat, mask, loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs)

    with torch.no_grad():
        clip_active = loss_clipped > loss_unclipped
        dual_active = (adv < 0) & (loss_ppo > -adv * clip_ratio_c)
        lr, r = log_ratio.detach(), ratio.detach()

        def frac(b: Tensor) -> float:
            return float(masked_mean(b.to(lr.dtype), mask))

        metrics = {
            "actor/pg_loss": float(loss.detach()),
            "actor/clip_frac": frac(clip_active),
            "actor/clip_frac_higher": frac(clip_active & (adv > 0)),
            "actor/clip_frac_lower": frac(clip_active & (adv < 0)),
            "actor/dual_clip_frac": frac(dual_active),
            "actor/approx_kl": float(masked_mean(-lr, mask)),
            "actor/approx_kl_k3": float(masked_mean(torch.exp(-lr) - 1.0 + lr, mask)),
            "actor/ratio_mean": float(masked_mean(r, mask)),
            "actor/ratio_max": float(torch.where(counted, r, zero).max()) if bool(counted.any()) else 0.0,
        }
    return loss, metrics


def kl_penalty(log_probs: Tensor, ref_log_probs: Tensor, kind: str = "low_var_kl") -> Tensor:
    """Per-token estimate (B, T) of KL(pi || pi_ref) from sampled-token log-probs (Schulman 2020, verl).

    kl / k1: logp - logp_ref; abs: |logp - logp_ref|; mse / k2: 0.5 (logp - logp_ref)^2;
    low_var_kl / k3: exp(logp_ref - logp) - (logp_ref - logp) - 1, log-ratio clamped to
    [-20, 20] and the result to [-10, 10] as in verl.
    """
    if ref_log_probs.shape != log_probs.shape:
        raise ValueError(f"ref_log_probs must have log_probs' shape {tuple(log_probs.shape)}; "
                         f"got {tuple(ref_log_probs.shape)}.")
    diff = log_probs - ref_log_probs
    if kind in ("kl", "k1"):
        return diff
    if kind == "abs":
        return diff.abs()
    if kind in ("mse", "k2"):
        return 0.5 * diff.square()
    if kind in ("low_var_kl", "k3"):
        kl = torch.clamp(-diff, -20.0, 20.0)
        return torch.clamp(torch.exp(kl) - kl - 1.0, -10.0, 10.0)
    raise ValueError(f"kl_penalty kind {kind!r} is unknown; choose one of {list(KL_KINDS)}.")


def _row_chunks(n_rows: int, chunk_size: int | None) -> list[slice]:
    """Slices covering range(n_rows) in blocks of chunk_size rows (one block when None)."""
    if chunk_size is None:
        return [slice(0, n_rows)]
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer number of rows or None; got {chunk_size}.")
    return [slice(i, min(i + chunk_size, n_rows)) for i in range(0, n_rows, chunk_size)]


def _check_temperature(temperature: float) -> None:
    """Sampling temperature must be a positive finite number."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0 (the sampling temperature); got {temperature}.")


def entropy_from_logits(logits: Tensor, *, temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """Entropy (..., ) of softmax(logits / temperature) over the last dim (..., V), in float32 or wider.

    H = logsumexp(z) - sum(softmax(z) * z) on z shifted by its max, stable for large logits and
    -inf entries (banned tokens). With chunk_size, rows
    (all leading dims flattened) are processed in blocks, bounding the (rows, V) temporaries.
    """
    _check_temperature(temperature)
    if logits.ndim < 1:
        raise ValueError("logits must have a vocabulary dimension; got a scalar.")
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    parts = []
    for sl in _row_chunks(flat.shape[0], chunk_size):
        z = flat[sl].to(out_dtype) / temperature
        z = z - z.amax(dim=-1, keepdim=True).detach()  # shift so large logits do not cancel in float32
        p = torch.softmax(z, dim=-1)
        z_safe = torch.where(p > 0, z, torch.zeros((), dtype=z.dtype, device=z.device))  # 0 * -inf := 0
        parts.append(torch.logsumexp(z, dim=-1) - (p * z_safe).sum(-1))
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=out_dtype)
    return out.reshape(lead)


def token_log_probs(logits: Tensor, labels: Tensor, temperature: float = 1.0, *,
                    chunk_size: int | None = None) -> Tensor:
    """log softmax(logits / temperature) at labels: logits (..., V), labels (...) -> (...), float32 or wider.

    Uses z[label] - logsumexp(z) so the full (rows, V) log-softmax is never stored; with
    chunk_size rows are processed in blocks. Labels must be valid token ids (0 <= id < V).
    """
    _check_temperature(temperature)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels must have logits' leading shape {tuple(logits.shape[:-1])}; "
                         f"got {tuple(labels.shape)}.")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids; got dtype {labels.dtype}.")
    vocab = logits.shape[-1]
    if labels.numel() and bool((labels < 0).any() or (labels >= vocab).any()):
        raise ValueError(f"labels must be token ids in [0, {vocab}); got min {int(labels.min())}, "
                         f"max {int(labels.max())}. Replace ignore indices (e.g. -100) by a valid id "
                         f"and mask those positions instead.")
    flat = logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1, 1).to(torch.long)
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    parts = []
    for sl in _row_chunks(flat.shape[0], chunk_size):
        z = flat[sl].to(out_dtype) / temperature
        z = z - z.amax(dim=-1, keepdim=True).detach()  # shift so large logits do not cancel in float32
        parts.append(z.gather(-1, flat_labels[sl]).squeeze(-1) - torch.logsumexp(z, dim=-1))
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=out_dtype)
    return out.reshape(labels.shape)


def truncated_is_weights(old_log_probs: Tensor, rollout_log_probs: Tensor, mask: Tensor, *,
                         cap: float = 2.0) -> tuple[Tensor, dict[str, float]]:
    """Per-token truncated importance weights min(pi_trainer / pi_engine, cap), (B, T), no grad.

    The rollout engine (vLLM, other kernels or precision) samples from a slightly different
    distribution than the trainer scores; weighting each token's PPO loss by the trainer/engine
    ratio, truncated at `cap`, corrects that bias with bounded variance (verl's token-level TIS,
    TRL's `vllm_importance_sampling_correction`; Yao et al. 2025). Masked tokens get weight 0.
    Metrics: rollout/is_weight_mean, rollout/is_weight_max (before truncation) and
    rollout/is_clip_frac (share of counted tokens at the cap).
    """
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"rollout.is_cap must be a positive number (the importance-weight "
                         f"ceiling, e.g. 2.0); got {cap}.")
    for name, t in (("rollout_log_probs", rollout_log_probs), ("mask", mask)):
        if t.shape != old_log_probs.shape:
            raise ValueError(f"{name} must have old_log_probs' shape "
                             f"{tuple(old_log_probs.shape)}; got {tuple(t.shape)}.")
    counted = mask != 0
    with torch.no_grad():
        diff = torch.where(counted, old_log_probs.float() - rollout_log_probs.float(), 0.0)
        raw = torch.exp(diff.clamp(-20.0, 20.0))
        w = torch.where(counted, raw.clamp(max=cap), 0.0)
        any_counted = bool(counted.any())
        metrics = {
            "rollout/is_weight_mean": float(masked_mean(w, mask)),
            "rollout/is_weight_max": float(raw[counted].max()) if any_counted else 0.0,
            "rollout/is_clip_frac": float(masked_mean((raw > cap).float(), mask)),
        }
    return w, metrics


def logprob_mismatch(trainer_log_probs: Tensor, engine_log_probs: Tensor,
                     mask: Tensor) -> dict[str, float]:
    """How far the engine's sampled-token log-probs are from the trainer's, over counted tokens.

    rollout/logprob_abs_diff_mean and _max: |log pi_trainer - log pi_engine|; verl users watch
    these to catch a broken weight sync (a jump to O(1) means the engine samples another
    policy). rollout/prob_abs_diff_mean: the same in probabilities.
    """
    if engine_log_probs.shape != trainer_log_probs.shape or mask.shape != trainer_log_probs.shape:
        raise ValueError(f"engine_log_probs and mask must have the trainer log-probs' shape "
                         f"{tuple(trainer_log_probs.shape)}; got {tuple(engine_log_probs.shape)} "
                         f"and {tuple(mask.shape)}.")
    counted = mask != 0
    if not bool(counted.any()):
        return {"rollout/logprob_abs_diff_mean": 0.0, "rollout/logprob_abs_diff_max": 0.0,
                "rollout/prob_abs_diff_mean": 0.0}
    a, b = trainer_log_probs.detach().float(), engine_log_probs.detach().float()
    d = (a - b).abs()
    return {"rollout/logprob_abs_diff_mean": float(masked_mean(d, mask)),
            "rollout/logprob_abs_diff_max": float(d[counted].max()),
            "rollout/prob_abs_diff_mean": float(masked_mean((a.exp() - b.exp()).abs(), mask))}
