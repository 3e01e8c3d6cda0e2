"""One padded forward per batch of rollouts: pooled residual streams of many layers and token stats.

The forward runs under nnsight (`TransformersModel` wrapping the already-loaded model) or plain
torch hooks (`backend="hooks"`, for equivalence checks). Pooling happens inside the trace as a
(B, P, T) x (B, T, d) product, so only (B, P, d) per layer leaves the model, moved to the CPU at
once. The pooling weights come from `poise_probe.features` (`response_spans`, `pooling_weights`),
the same code the trainer's hook uses, so a captured `prompt_last_n` / `reasoning_last_n` at the
trainer's layer and window is the trainer's feature.

Token statistics follow the trainer's log-prob pass: logits only at response positions, from the
final hidden states through the output embedding in float32, divided by the sampling temperature.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from poise_probe.features import (
    PackedBatch,
    Spans,
    TagIds,
    _base_and_head,
    entropy_stats,
    find_decoder_layers,
    pack_rollouts,
    pooling_weights,
    response_spans,
)
from poise_probe.losses import entropy_from_logits

__all__ = [
    "BACKENDS",
    "TOKEN_STATS",
    "CaptureSpec",
    "Capturer",
    "parse_pooling",
    "pooling_matrix",
    "token_statistics",
]

BACKENDS = ("nnsight", "hooks")
#: Per-sequence means of per-token statistics, stored beside the POISE entropy statistics.
TOKEN_STATS = ("entropy", "varentropy", "logprob", "top1_prob", "top1_margin")
_POOLING = re.compile(r"^(prompt_last|reasoning_last)_(\d+)$|^(response_mean|response_last)$")


def parse_pooling(name: str) -> tuple[str, int | None]:
    """`prompt_last_10` -> ("prompt_last", 10); `response_mean` -> ("response_mean", None)."""
    m = _POOLING.match(name)
    if not m:
        raise ValueError(f"unknown pooling {name!r}; use prompt_last_<n>, reasoning_last_<n>, "
                         f"response_mean or response_last.")
    if m.group(3):
        return m.group(3), None
    n = int(m.group(2))
    if n < 1:
        raise ValueError(f"pooling window must be >= 1; got {name!r}.")
    return m.group(1), n


@dataclass(frozen=True)
class CaptureSpec:
    """What to capture: layers (0-based decoder blocks), pooling windows, dtype, temperature."""

    layers: tuple[int, ...]
    prompt_windows: tuple[int, ...] = (1, 5, 10, 32)
    reasoning_windows: tuple[int, ...] = (1, 5, 10, 32)
    extra_poolings: tuple[str, ...] = ("response_mean", "response_last")
    temperature: float = 1.0
    dtype: str = "float32"
    poolings: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        if not self.layers:
            raise ValueError("capture needs at least one layer.")
        if sorted(set(self.layers)) != list(self.layers):
            object.__setattr__(self, "layers", tuple(sorted({int(x) for x in self.layers})))
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}.")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16; got {self.dtype!r}.")
        names = ([f"prompt_last_{n}" for n in self.prompt_windows]
                 + [f"reasoning_last_{n}" for n in self.reasoning_windows]
                 + list(self.extra_poolings))
        for name in names:
            parse_pooling(name)
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate pooling in {names}.")
        object.__setattr__(self, "poolings", tuple(names))


def pooling_matrix(batch: PackedBatch, tags: TagIds, poolings: Sequence[str]
                   ) -> tuple[Tensor, list[Spans]]:
    """(B, P, T) pooling weights for every named pooling, and the entropy spans of each row.

    prompt_last_n / reasoning_last_n use the trainer's `pooling_weights` with window n, so they
    are exactly its prompt and reasoning vectors; response_mean averages every response token and
    response_last takes the last one (zero vector for an empty response).
    """
    b, t = batch.input_ids.shape
    out = torch.zeros((b, len(poolings), t))
    cache: dict[int, tuple[Tensor, Tensor]] = {}
    spans = [response_spans(r, tags, 1) for r in batch.response_ids]
    for j, name in enumerate(poolings):
        kind, n = parse_pooling(name)
        if kind in ("prompt_last", "reasoning_last"):
            if n not in cache:
                sp = [response_spans(r, tags, n) for r in batch.response_ids]
                cache[n] = pooling_weights(batch, sp, n)
            out[:, j] = cache[n][0 if kind == "prompt_last" else 1]
            continue
        for i in range(b):
            m = int(batch.resp_mask[i].sum())
            if m == 0:
                continue
            pos = batch.resp_pos[i, :m]
            if kind == "response_mean":
                out[i, j, pos] = 1.0 / m
            else:
                out[i, j, pos[-1]] = 1.0
    return out, spans


def _pool(h: Tensor, weights: Tensor) -> Tensor:
    """(B, P, d) float32 = weights (B, P, T) @ hidden (B, T, d); zero weights mask NaN padding."""
    h = h[0] if isinstance(h, tuple) else h
    hf = h.float()
    w = weights.to(hf.device)
    keep = (w != 0).any(1)[..., None]                      # (B, T, 1)
    return torch.einsum("bpt,btd->bpd", w, torch.where(keep, hf, 0.0))


def token_statistics(hidden: Tensor, head, rows: Tensor, pos: Tensor, targets: Tensor, *,
                     temperature: float, softcap: float | None = None,
                     chunk_tokens: int = 4096) -> Tensor:
    """(M, 5) per response token: entropy, varentropy, log-prob of the sampled token, top-1
    probability and top-1 minus top-2 probability, from logits / temperature.

    hidden (B, T, d) final hidden states; rows/pos (M,) the positions whose state predicts
    `targets` (M,). Logits are built in float32 chunks like the trainer's `_ChunkHead`.
    """
    out = []
    w = head.weight
    bias = getattr(head, "bias", None)
    for s in range(0, rows.shape[0], chunk_tokens):
        h = hidden[rows[s:s + chunk_tokens], pos[s:s + chunk_tokens]]
        with torch.autocast(h.device.type, enabled=False):
            z = torch.nn.functional.linear(h.to(w.dtype), w, bias).float()
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        z = z / temperature
        logp = torch.log_softmax(z, dim=-1)
        p = logp.exp()
        ent = entropy_from_logits(z)
        plogp2 = (p * torch.where(p > 0, logp, 0.0) ** 2).sum(-1)
        varent = (plogp2 - ent ** 2).clamp(min=0.0)
        lp = logp.gather(-1, targets[s:s + chunk_tokens, None].to(z.device)).squeeze(-1)
        top = p.topk(min(2, p.shape[-1]), dim=-1).values
        margin = top[:, 0] - top[:, 1] if top.shape[-1] > 1 else top[:, 0]
        out.append(torch.stack([ent, varent, lp, top[:, 0], margin], dim=-1))
    if not out:
        return torch.zeros((0, len(TOKEN_STATS)))
    return torch.cat(out)


def _module_path(model, target: torch.nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise ValueError(f"module {type(target).__name__} is not part of {type(model).__name__}.")


def _envoy(root, path: str):
    obj = root
    for part in path.split(".") if path else []:
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


class Capturer:
    """Runs the capture forward on batches of (prompt ids, response ids) for one model."""

    def __init__(self, model, tokenizer, spec: CaptureSpec, *, backend: str = "nnsight"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
        self.model, self.tokenizer, self.spec, self.backend = model, tokenizer, spec, backend
        blocks = find_decoder_layers(model)
        self.num_layers = len(blocks)
        bad = [x for x in spec.layers if not 0 <= x < self.num_layers]
        if bad:
            raise ValueError(f"layer(s) {bad} out of range: the model has {self.num_layers} "
                             f"decoder blocks; choose from 0..{self.num_layers - 1}.")
        self.blocks = blocks
        self.base, self.head = _base_and_head(model)
        self.tags = TagIds.from_tokenizer(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self._nn = None
        if backend == "nnsight":
            from nnsight.modeling.transformers import TransformersModel

            self._nn = TransformersModel(model, tokenizer=tokenizer)
            self._blocks_path = _module_path(model, blocks)
            self._base_path = _module_path(model, self.base)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward_nnsight(self, batch: PackedBatch, weights: Tensor):
        nn = self._nn
        blocks = _envoy(nn, self._blocks_path)
        base = _envoy(nn, self._base_path)
        dev = self.device
        pooled: dict[int, Tensor] = {}
        with nn.trace(input_ids=batch.input_ids.to(dev),
                      attention_mask=batch.attention_mask.to(dev),
                      position_ids=batch.position_ids.to(dev), use_cache=False,
                      logits_to_keep=1):
            for layer in self.spec.layers:               # forward order: ascending blocks
                pooled[layer] = _pool(blocks[layer].output, weights).cpu().save()
            out = base.output
            last = (out[0] if isinstance(out, tuple) else out.last_hidden_state).save()
        return pooled, last

    def _forward_hooks(self, batch: PackedBatch, weights: Tensor):
        pooled: dict[int, Tensor] = {}
        with ExitStack() as stack:
            for layer in self.spec.layers:
                def hook(_m, _i, output, layer=layer):
                    pooled[layer] = _pool(output, weights).cpu()
                stack.callback(self.blocks[layer].register_forward_hook(hook).remove)
            dev = self.device
            last = self.base(input_ids=batch.input_ids.to(dev),
                             attention_mask=batch.attention_mask.to(dev),
                             position_ids=batch.position_ids.to(dev),
                             use_cache=False).last_hidden_state
        return pooled, last

    @torch.no_grad()
    def run(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
            ) -> dict:
        """Capture one batch, one row per rollout:

        `pooled[layer]` (B, P, d) CPU tensor in spec.dtype, P in the order of spec.poolings; `entropy_stats` (B, 3)
        (the POISE statistics) and `seq_stats` (B, 5) per-sequence means of TOKEN_STATS, both
        float32 numpy; and per-row float32 numpy arrays `token_entropy` and `token_logprob`.
        """
        batch = pack_rollouts(prompt_ids, response_ids, self.pad_id)
        weights, spans = pooling_matrix(batch, self.tags, self.spec.poolings)
        if self.backend == "nnsight":
            pooled, last = self._forward_nnsight(batch, weights)
        else:
            pooled, last = self._forward_hooks(batch, weights)
        mask = batch.resp_mask.to(last.device)
        rows, cols = torch.nonzero(mask, as_tuple=True)
        pos = (batch.resp_pos.to(last.device)[rows, cols] - 1).clamp(min=0)
        targets = batch.resp_ids.to(last.device)[rows, cols]
        stats = token_statistics(last, self.head, rows, pos, targets,
                                 temperature=self.spec.temperature, softcap=self.softcap).cpu()
        b, r = batch.resp_mask.shape
        per_tok = torch.zeros((b, r, stats.shape[-1]))
        per_tok[rows.cpu(), cols.cpu()] = stats.float()
        ent = per_tok[..., 0]
        poise = entropy_stats(ent, batch, spans)                            # (B, 3)
        m = batch.resp_mask.float()
        denom = m.sum(-1, keepdim=True)
        seq = torch.where(denom > 0, (per_tok * m[..., None]).sum(1) / denom.clamp(min=1), 0.0)
        dtype = getattr(torch, self.spec.dtype)
        out_pooled = {layer: v.to(dtype).contiguous() for layer, v in pooled.items()}
        lens = batch.resp_len.tolist()
        return {
            "pooled": out_pooled,
            "entropy_stats": poise.numpy().astype(np.float32),
            "seq_stats": seq.numpy().astype(np.float32),
            "token_entropy": [per_tok[i, :lens[i], 0].numpy().astype(np.float32)
                              for i in range(b)],
            "token_logprob": [per_tok[i, :lens[i], 2].numpy().astype(np.float32)
                              for i in range(b)],
        }
