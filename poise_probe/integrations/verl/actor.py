"""POISE features from verl's old-log-prob forward, on verl's own batch layout.

verl's rollout batch holds `input_ids`/`attention_mask`/`position_ids` (bs, P + R) with the
prompt left-padded to P and the response right-padded to R, plus `responses` and
`response_mask` (bs, R). `packed_from_verl` reads that layout as a `PackedBatch` without
re-packing, and `old_log_prob_outputs` runs the project's one teacher-forced forward
(`poise_probe.features.policy_forward`, block-L pooling in a forward hook) and returns what
verl's actor returns from compute_log_prob (`log_probs`, `entropy`, both (bs, R)) plus the
per-row feature vector under `poise_features` (bs, 2d + 3), so no second forward is run.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from poise_probe.features import (PackedBatch, TagIds, policy_forward, response_spans)

__all__ = ["FEATURES_KEY", "VERL_KEYS", "old_log_prob_outputs", "packed_from_verl"]

FEATURES_KEY = "poise_features"
VERL_KEYS = ("input_ids", "attention_mask", "position_ids", "responses", "response_mask")


def packed_from_verl(batch: Mapping[str, Tensor]) -> PackedBatch:
    """verl's (left-padded prompt | right-padded response) tensors as a `PackedBatch`."""
    missing = [k for k in VERL_KEYS if k not in batch]
    if missing:
        raise KeyError(f"verl batch lacks {missing}; the old-log-prob batch must carry "
                       f"{list(VERL_KEYS)} (response_mask: 1 on real response tokens).")
    ids, attn, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    resp, rmask = batch["responses"], batch["response_mask"].long()
    if pos.ndim != 2:
        raise ValueError(f"position_ids must be (bs, P + R); got {tuple(pos.shape)} (multimodal "
                         f"rope position ids are not supported by the POISE features).")
    b, t = ids.shape
    r = resp.shape[1]
    p = t - r
    if rmask.shape != resp.shape or attn.shape != ids.shape or p < 1:
        raise ValueError(f"inconsistent verl batch: input_ids {tuple(ids.shape)}, attention_mask "
                         f"{tuple(attn.shape)}, responses {tuple(resp.shape)}, response_mask "
                         f"{tuple(rmask.shape)}.")
    prompt_attn = attn[:, :p].long()
    prompt_len = prompt_attn.sum(-1)                                         # (bs,)
    prompt_start = p - prompt_len
    left_padded = prompt_attn == (torch.arange(p)[None, :] >= prompt_start[:, None]).long()
    if not bool(left_padded.all()) or bool((prompt_len == 0).any()):
        raise ValueError("verl prompts must be left-padded and non-empty (attention_mask[:, :P] "
                         "= 0...0 1...1); got another layout.")
    if not torch.equal(attn[:, p:].long() * rmask, rmask):
        raise ValueError("response_mask marks tokens that attention_mask masks out.")
    resp_pos = torch.where(rmask.bool(), p + torch.arange(r)[None, :].expand(b, r),
                           torch.zeros((), dtype=torch.long))
    response_ids = [resp[i][rmask[i].bool()].tolist() for i in range(b)]
    return PackedBatch(ids, attn, pos, resp, resp_pos, rmask, prompt_start, prompt_len, response_ids)


@torch.no_grad()
def old_log_prob_outputs(model, batch: Mapping[str, Tensor], *, tags: TagIds, layer: int,
                         prompt_window: int = 10, temperature: float = 1.0) -> dict[str, Tensor]:
    """One forward: {"log_probs", "entropy"} (bs, R) and {"poise_features"} (bs, 2d + 3) float32.

    `tags` are the tokenizer's think/answer tag ids (`TagIds.from_tokenizer`); `layer` the
    0-based block whose output is pooled; the window n is `prompt_window` for both vectors.
    """
    packed = packed_from_verl(batch)
    spans = [response_spans(r, tags, prompt_window) for r in packed.response_ids]
    out = policy_forward(model, packed, temperature=temperature, with_entropy=True,
                         capture_layer=layer, spans=spans, prompt_window=prompt_window)
    return {"log_probs": out.log_probs, "entropy": out.entropies, FEATURES_KEY: out.features}
