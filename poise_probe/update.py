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
    chunks = micro_batches([len(p) for p, _ in rows], [len(r) for _, r in rows],
                           cfg.optim.micro_batch_size, cfg.optim.micro_batch_tokens)
    was_training = model.training
    model.eval()
    for idx in chunks:
        chunk = [rows[i] for i in idx]
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
    back = torch.argsort(torch.tensor([i for idx in chunks for i in idx]))  # batch order again
    return {"log_probs": torch.cat([_pad_to(x, width) for x in lps])[back],
            "entropies": torch.cat([_pad_to(x, width) for x in ents])[back] if ents else None,
            "features": torch.cat(feats)[back] if feats else None,
            "hidden": [hidden[i] for i in back.tolist()] if keep_hidden else None}


def micro_batches(prompt_lens, response_lens, max_rows: int,
                  max_tokens: int | None = None) -> list[list[int]]:
    """Row indices (into the given lengths) of each forward's micro-batch, covering every row once.

    Without `max_tokens`: consecutive chunks of `max_rows`, in order. With it: rows longest first,
    and a micro-batch grows while it has at most `max_rows` rows and rows x (longest prompt +
    longest response) <= `max_tokens`, the padded (rows, P + R) layout a forward computes on
    (a row over the budget goes alone). Rows of like length share a forward, so less of the
    compute is padding; the gradient is the same, as micro-batch losses are summed.
    """
    n = len(prompt_lens)
    if max_tokens is None:
        return [list(range(s, min(s + max_rows, n))) for s in range(0, n, max_rows)]
    order = sorted(range(n), key=lambda i: (-(prompt_lens[i] + response_lens[i]), i))
    chunks: list[list[int]] = []
    cur: list[int] = []
    p_max = r_max = 0
    for i in order:
        p, r = max(p_max, prompt_lens[i]), max(r_max, response_lens[i])
        if cur and (len(cur) + 1 > max_rows or (len(cur) + 1) * (p + r) > max_tokens):
            chunks.append(cur)
            cur, p, r = [], prompt_lens[i], response_lens[i]
        cur.append(i)
        p_max, r_max = p, r
    if cur:
        chunks.append(cur)
    return chunks


def padded_tokens(chunks, prompt_lens, response_lens) -> int:
    """Tokens the forwards over `chunks` compute on: rows x (longest prompt + longest response)
    per micro-batch, the padded layout `pack_rollouts` builds."""
    return sum(len(c) * (max(prompt_lens[i] for i in c) + max(response_lens[i] for i in c))
               for c in chunks)


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
            chunks = micro_batches([len(batch.prompt_ids[batch.group_ids[n]]) for n in rows],
                                   [len(batch.response_ids[n]) for n in rows],
                                   cfg.optim.micro_batch_size, cfg.optim.micro_batch_tokens)
            for idx in chunks:
                micro = [rows[i] for i in idx]
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
