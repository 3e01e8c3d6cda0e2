"""The two policy passes of a step: the old-policy forward and the PPO update.

`old_policy_pass` scores every rollout under the policy that sampled it (log-probs, token
entropies and, through a hook on one decoder block, the POISE features: one forward, no second
pass). `ppo_update` runs PPO epochs over mini-batches of whole prompt groups with gradient
accumulation over micro-batches; advantages may be per rollout (N,) or per token (N, T), and
per-token weights (the rollout correction) may scale each token's loss.
"""
from __future__ import annotations

import numpy as np
import torch

from poise_probe.config import Config
from poise_probe.features import TagIds, pack_rollouts, policy_forward, response_spans
from poise_probe.losses import agg_loss, kl_penalty, policy_loss
from poise_probe.rollout.collect import Rollouts
from poise_probe.state import derive_seed


@torch.no_grad()
def old_policy_pass(model, batch: Rollouts, cfg: Config, tags: TagIds, layer,
                    device, autocast, with_entropy: bool = True,
                    keep_hidden: bool = False) -> dict:
    """Log-probs and entropies (N, T) and, if `layer`, features (N, F) of every rollout; with
    `keep_hidden`, each rollout's last-layer states over prompt + response (a list)."""
    rows = [(batch.prompt_ids[g], batch.response_ids[n])
            for n, g in enumerate(batch.group_ids.tolist())]
    lps, ents, feats, hidden = [], [], [], []
    mb = cfg.optim.micro_batch_size
    was_training = model.training
    model.eval()
    for s in range(0, len(rows), mb):
        chunk = rows[s:s + mb]
        packed = pack_rollouts([p for p, _ in chunk], [r for _, r in chunk], batch.pad_id)
        spans = [response_spans(r, tags, cfg.probe.reasoning_window) for _, r in chunk]
        with autocast:
            out = policy_forward(model, packed, temperature=cfg.rollout.temperature,
                                 with_entropy=with_entropy, capture_layer=layer, spans=spans,
                                 prompt_window=cfg.probe.prompt_window,
                                 chunk_tokens=cfg.optim.logit_chunk_tokens,
                                 keep_hidden=keep_hidden)
        lps.append(out.log_probs.float().cpu())
        hidden.extend(out.hidden or [])
        if with_entropy:
            ents.append(out.entropies.float().cpu())
        if out.features is not None:
            feats.append(out.features.float().cpu())
    model.train(was_training)
    width = max(x.shape[1] for x in lps)
    return {"log_probs": torch.cat([_pad_to(x, width) for x in lps]),
            "entropies": torch.cat([_pad_to(x, width) for x in ents]) if ents else None,
            "features": torch.cat(feats) if feats else None,
            "hidden": hidden if keep_hidden else None}


def response_mask(batch: Rollouts, width: int) -> torch.Tensor:
    """(N, width) 1 where rollout n has a response token."""
    lens = torch.tensor([len(r) for r in batch.response_ids])
    return (torch.arange(width)[None, :] < lens[:, None]).float()


def ppo_update(model, batch: Rollouts, advantages, old_log_probs, ref_log_probs, cfg: Config,
               optimizer, scheduler, device, autocast, step, token_weights=None) -> dict:
    """PPO epochs over mini-batches of whole prompt groups; token-mean over the mini-batch.

    advantages (N,) or (N, T); old/ref log-probs and token_weights (N, T), right-padded.
    """
    a = cfg.algorithm
    n_prompts = len(batch.prompts)
    gen = torch.Generator().manual_seed(derive_seed(cfg.trainer.seed, step, "update"))
    logs: dict[str, list[float]] = {}
    model.train()
    for _epoch in range(cfg.optim.ppo_epochs):
        order = torch.randperm(n_prompts, generator=gen)
        for s in range(0, n_prompts, cfg.optim.mini_batch_prompts):
            groups = set(order[s:s + cfg.optim.mini_batch_prompts].tolist())
            rows = [n for n, g in enumerate(batch.group_ids.tolist()) if g in groups]
            n_tokens = sum(len(batch.response_ids[n]) for n in rows)
            optimizer.zero_grad(set_to_none=True)
            mb = {"actor/pg_loss": 0.0, "actor/kl_loss": 0.0, "actor/entropy_loss": 0.0}
            for m in range(0, len(rows), cfg.optim.micro_batch_size):
                micro = rows[m:m + cfg.optim.micro_batch_size]
                packed = pack_rollouts([batch.prompt_ids[batch.group_ids[n]] for n in micro],
                                       [batch.response_ids[n] for n in micro], batch.pad_id)
                r = packed.resp_mask.shape[1]
                mask = packed.resp_mask.to(device).float()
                with autocast:
                    out = policy_forward(model, packed, temperature=cfg.rollout.temperature,
                                         with_entropy=a.entropy_coeff > 0,
                                         entropy_grad=a.entropy_coeff > 0,
                                         chunk_tokens=cfg.optim.logit_chunk_tokens)
                old = old_log_probs[micro, :r].to(device)
                adv = advantages[micro]
                adv = (adv[:, :r] if adv.ndim == 2 else adv).to(device)
                loss, info = policy_loss(
                    out.log_probs.float(), old, adv, mask,
                    clip_ratio_low=a.epsilon, clip_ratio_high=a.epsilon_high,
                    clip_ratio_c=a.clip_ratio_c, loss_agg_mode=a.loss_agg_mode,
                    num_tokens=max(n_tokens, 1), num_seqs=len(rows),
                    token_weights=None if token_weights is None
                    else token_weights[micro, :r].to(device))
                if ref_log_probs is not None:
                    kl = kl_penalty(out.log_probs.float(), ref_log_probs[micro, :r].to(device),
                                    kind=a.kl_type)
                    kl_loss = agg_loss(kl, mask, a.loss_agg_mode, num_tokens=max(n_tokens, 1),
                                       num_seqs=len(rows))
                    loss = loss + a.kl_coef * kl_loss
                    mb["actor/kl_loss"] += float(kl_loss)
                if a.entropy_coeff > 0:
                    ent = agg_loss(out.entropies, mask, a.loss_agg_mode,
                                   num_tokens=max(n_tokens, 1), num_seqs=len(rows))
                    loss = loss - a.entropy_coeff * ent
                    mb["actor/entropy_loss"] += float(ent)
                loss.backward()
                # micro losses are already normalised by the mini-batch's token/sequence count,
                # so the mini-batch's loss is their sum
                mb["actor/pg_loss"] += info.pop("actor/pg_loss")
                for key, v in info.items():
                    logs.setdefault(key, []).append(v)
            for key, v in mb.items():
                if key == "actor/pg_loss" or v:
                    logs.setdefault(key, []).append(v)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       cfg.optim.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(f"step {step}: gradient norm is {float(grad_norm)}; "
                                         f"lower optim.lr or check the rewards.")
            optimizer.step()
            logs.setdefault("actor/grad_norm", []).append(float(grad_norm))
    scheduler.step()
    out = {k: float(np.mean(v)) for k, v in logs.items()}
    out["actor/lr"] = scheduler.get_last_lr()[0]
    return out


def _pad_to(x: torch.Tensor, width: int | None = None) -> torch.Tensor:
    if width is None or x.shape[1] == width:
        return x
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))
