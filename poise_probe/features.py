"""POISE features from the old-policy log-prob forward: pooled hidden states and entropy statistics.

phi(x, y) = [prompt vector; reasoning vector; H_all, H_reasoning, H_answer] (POISE.md, "Features"):
- prompt vector: mean of decoder block L's output over the last n prompt tokens (padding excluded);
- reasoning vector: mean over the last n response tokens ending at the last `</think>` (inclusive);
  no `</think>`: the last n response tokens; fewer than n: all of them; none: zeros;
- entropies: mean per-token entropy (full vocabulary, logits / sampling temperature) over all
  response tokens, the reasoning span and the answer span; an empty span gives 0.

Pooling happens inside a forward hook on block L, as a weighted sum with per-row weights, so the
full hidden states are never stored and no second forward is run. The probe-study code reuses the
span and weight functions here, so capture and training pool identically.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from poise_probe.losses import entropy_from_logits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TagIds:
    """Token ids of the think/answer tags (None where the tokenizer has no such single token)."""

    think_open: int | None
    think_close: int | None
    answer_open: int | None
    answer_close: int | None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TagIds":
        """The tags' ids in `tokenizer`; a tag that is not one token of its own is None.

        A tag counts only if it encodes to a single id that decodes back to the tag: a
        tokenizer that maps an unknown word to its unknown token must not make every unknown
        token a tag. Missing think tags are a documented fallback, not an error (see
        `response_spans` and the module docstring): the reasoning vector pools the last n
        response tokens and the whole response is the reasoning span; a warning says so.
        """
        def one(tag: str) -> int | None:
            ids = tokenizer(tag, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                return None
            return ids[0] if tokenizer.decode(ids).strip() == tag else None
        tags = cls(one("<think>"), one("</think>"), one("<answer>"), one("</answer>"))
        missing = [tag for tag, tid in (("<think>", tags.think_open),
                                        ("</think>", tags.think_close)) if tid is None]
        if missing:
            logger.warning(
                "tokenizer %s has no single token for %s: POISE features fall back to the last "
                "n response tokens for the reasoning vector and the whole response as the "
                "reasoning span (answer span: inside <answer>...</answer>, else empty). Add the "
                "tags as tokens (tokenizer.add_tokens) for think-aware features.",
                type(tokenizer).__name__, " and ".join(missing))
        return tags


@dataclass(frozen=True)
class Spans:
    """Half-open response-token ranges of one rollout (indices into its response ids)."""

    reasoning_vec: tuple[int, int]  # window pooled for the reasoning vector
    reasoning: tuple[int, int]      # entropy span (b)
    answer: tuple[int, int]         # entropy span (c)


def _last(ids: Sequence[int], tok: int | None) -> int:
    if tok is None:
        return -1
    for j in range(len(ids) - 1, -1, -1):
        if ids[j] == tok:
            return j
    return -1


def _first(ids: Sequence[int], tok: int | None, start: int = 0) -> int:
    if tok is None:
        return -1
    for j in range(start, len(ids)):
        if ids[j] == tok:
            return j
    return -1


def response_spans(response_ids: Sequence[int], tags: TagIds, window: int) -> Spans:
    """The reasoning window and the reasoning/answer entropy spans of one response.

    Reasoning span: tokens strictly inside `<think>…</think>` (to the end if never closed); a
    response without any think tag counts as all reasoning. Answer span: tokens strictly inside
    the last `<answer>…</answer>` (to the end if unclosed), else the tokens after `</think>`.
    """
    n = len(response_ids)
    close = _last(response_ids, tags.think_close)
    end = close + 1 if close >= 0 else n                      # window ends at </think> inclusive
    reasoning_vec = (max(0, end - window), end)
    open_ = _first(response_ids, tags.think_open)
    if open_ >= 0:
        reasoning = (open_ + 1, close if close > open_ else n)
    elif close >= 0:
        reasoning = (0, close)                                 # template opened <think> for us
    else:
        reasoning = (0, n)
    a_open = _last(response_ids, tags.answer_open)
    if a_open >= 0:
        a_close = _first(response_ids, tags.answer_close, a_open + 1)
        answer = (a_open + 1, a_close if a_close >= 0 else n)
    elif close >= 0:
        answer = (close + 1, n)
    else:
        answer = (0, 0)
    return Spans(reasoning_vec, reasoning, answer)


@dataclass
class PackedBatch:
    """Prompt+response rows packed into one padded batch for a teacher-forced forward.

    `prompt_pos`/`resp_pos` give, per row, the sequence index of each prompt/response token;
    `resp_mask` is 1 where a response token exists. Layout-agnostic: left, right or verl's
    (left-padded prompt | right-padded response) packing all work.
    """

    input_ids: Tensor        # (B, T)
    attention_mask: Tensor   # (B, T)
    position_ids: Tensor     # (B, T)
    resp_ids: Tensor         # (B, R) response token ids, pad where resp_mask == 0
    resp_pos: Tensor         # (B, R) sequence index of each response token (0 where masked)
    resp_mask: Tensor        # (B, R)
    prompt_start: Tensor     # (B,) sequence index of the first prompt token
    prompt_len: Tensor       # (B,)
    response_ids: list[list[int]]

    @property
    def resp_len(self) -> Tensor:
        return self.resp_mask.sum(-1)


def pack_rollouts(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                  pad_id: int, layout: str = "verl") -> PackedBatch:
    """Pack rows as `verl` (prompt left-padded, response right-padded), `left` or `right`."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"pack_rollouts needs one response per prompt; got {len(prompt_ids)} "
                         f"prompts and {len(response_ids)} responses.")
    if layout not in ("verl", "left", "right"):
        raise ValueError(f"layout must be 'verl', 'left' or 'right'; got {layout!r}.")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (the chat template's).")
    b = len(prompt_ids)
    pmax = max(len(p) for p in prompt_ids)
    rmax = max(1, max(len(r) for r in response_ids))
    tot = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    width = pmax + rmax if layout == "verl" else max(tot)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    resp_ids = torch.full((b, rmax), pad_id, dtype=torch.long)
    resp_pos = torch.zeros((b, rmax), dtype=torch.long)
    resp_mask = torch.zeros((b, rmax), dtype=torch.long)
    pstart = torch.zeros(b, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if layout == "verl":
            s = pmax - len(p)
        elif layout == "left":
            s = width - tot[i]
        else:
            s = 0
        row = list(p) + list(r)
        input_ids[i, s:s + len(row)] = torch.tensor(row, dtype=torch.long)
        attn[i, s:s + len(row)] = 1
        pstart[i] = s
        if r:
            resp_ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
            resp_pos[i, :len(r)] = torch.arange(s + len(p), s + len(p) + len(r))
            resp_mask[i, :len(r)] = 1
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    return PackedBatch(input_ids, attn, position_ids, resp_ids, resp_pos, resp_mask, pstart,
                       torch.tensor([len(p) for p in prompt_ids]),
                       [list(r) for r in response_ids])


def packed_from_split(input_ids: Tensor, attention_mask: Tensor, response_width: int
                      ) -> PackedBatch:
    """The PackedBatch of rows already laid out as (left-padded prompt | right-padded response).

    That is the layout TRL's GRPOTrainer and verl feed their log-prob forwards: the last
    `response_width` columns are the response, the ones before it the prompt. Position ids
    follow the attention mask (as generation numbered the tokens).
    """
    if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
        raise ValueError(f"input_ids and attention_mask must both be (B, T); got "
                         f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}.")
    b, t = input_ids.shape
    if not 0 < response_width < t:
        raise ValueError(f"response_width must be in 1..{t - 1} for rows of {t} tokens; got "
                         f"{response_width}.")
    ids, attn = input_ids.detach().cpu().long(), attention_mask.detach().cpu().long()
    p = t - response_width
    prompt_len = attn[:, :p].sum(-1)
    resp_mask = attn[:, p:]
    if bool((prompt_len == 0).any()):
        raise ValueError("every row needs at least one prompt token (the chat template's); a "
                         "row's prompt part is all padding.")
    resp_ids = ids[:, p:]
    resp_pos = torch.arange(p, t).expand(b, -1) * resp_mask
    response_ids = [resp_ids[i, :int(n)].tolist() for i, n in enumerate(resp_mask.sum(-1))]
    return PackedBatch(ids, attn, (attn.cumsum(-1) - 1).clamp(min=0), resp_ids, resp_pos,
                       resp_mask, p - prompt_len, prompt_len, response_ids)


def pooling_weights(batch: PackedBatch, spans: Sequence[Spans],
                    prompt_window: int) -> tuple[Tensor, Tensor]:
    """(B, T) weights whose product with block-L states gives prompt and reasoning vectors."""
    b, t = batch.input_ids.shape
    wp = torch.zeros((b, t))
    wr = torch.zeros((b, t))
    for i, sp in enumerate(spans):
        pl = int(batch.prompt_len[i])
        ps = int(batch.prompt_start[i])
        k = min(prompt_window, pl)
        wp[i, ps + pl - k:ps + pl] = 1.0 / k
        lo, hi = sp.reasoning_vec
        if hi > lo:  # no response tokens: zero vector
            pos = batch.resp_pos[i, lo:hi]
            wr[i, pos] = 1.0 / (hi - lo)
    return wp, wr


def span_mask(batch: PackedBatch, spans: Sequence[Spans], which: str) -> Tensor:
    """(B, R) mask of the `reasoning` or `answer` entropy span over response tokens."""
    m = torch.zeros(batch.resp_mask.shape)
    for i, sp in enumerate(spans):
        lo, hi = getattr(sp, which)
        m[i, lo:hi] = 1.0
    return m * batch.resp_mask


def entropy_stats(entropies: Tensor, batch: PackedBatch, spans: Sequence[Spans]) -> Tensor:
    """(B, 3): mean entropy over all response tokens, the reasoning span, the answer span."""
    out = []
    for mask in (batch.resp_mask.float(), span_mask(batch, spans, "reasoning"),
                 span_mask(batch, spans, "answer")):
        mask = mask.to(entropies.device)
        denom = mask.sum(-1)
        out.append(torch.where(denom > 0, (entropies * mask).sum(-1) / denom.clamp(min=1),
                               torch.zeros_like(denom)))
    return torch.stack(out, dim=-1)


def find_decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (Llama/Qwen/Mistral/OLMo/GPT-2 layouts)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers",
                 "model.language_model.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    n = getattr(model.config, "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if lists:
        return lists[0]
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}; POISE hooks "
                     f"the output of one block (model.layers[L]); please report the layout.")


@contextmanager
def pooled_block_output(model, layer: int, weights: Sequence[Tensor]):
    """Hook block `layer`; on the forward, store `weights[k] @ hidden` for each k (B, d) in a list.

    Only the pooled vectors are kept (no full hidden states), computed in float32.
    """
    layers = find_decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"probe layer {layer} is out of range for a model with {len(layers)} "
                         f"decoder blocks; choose 0..{len(layers) - 1}.")
    store: list[Tensor] = []

    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output   # (B, T, d)
        store.clear()
        hf = h.float()
        for w in weights:
            w = w.to(h.device, torch.float32)
            # zero weights must not let a padding position's NaN/inf through (0 * nan = nan)
            store.append(torch.einsum("bt,btd->bd", w, torch.where(w[..., None] != 0, hf, 0.0)))

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@contextmanager
def pooled_block_rows(model, layer: int, weights: Sequence[Tensor]):
    """`pooled_block_output` for a forward run in row chunks (TRL's and verl's micro-batches).

    `weights[k]` covers the whole batch (B, T); the hook's n-th call pools the next rows in
    order. Yields a list filled, after the forwards, with one (B, d) float32 tensor per weight;
    fewer rows than B (a forward skipped) raise on exit.
    """
    chunks: list[list[Tensor]] = [[] for _ in weights]
    total = weights[0].shape[0] if weights else 0
    cursor = [0]
    out: list[Tensor] = []
    layers = find_decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"probe layer {layer} is out of range for a model with {len(layers)} "
                         f"decoder blocks; choose 0..{len(layers) - 1}.")

    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output   # (b, T, d)
        lo, hi = cursor[0], cursor[0] + h.shape[0]
        if hi > total:
            raise RuntimeError(f"the hooked forwards saw more than the {total} rows pooled for")
        hf = h.float()
        for k, w in enumerate(weights):
            w = w[lo:hi].to(h.device, torch.float32)
            chunks[k].append(torch.einsum("bt,btd->bd", w,
                                          torch.where(w[..., None] != 0, hf, 0.0)))
        cursor[0] = hi

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield out
    finally:
        handle.remove()
    if cursor[0] != total:
        raise RuntimeError(f"the hooked forwards pooled {cursor[0]} of {total} rows; the forward "
                           f"must run over every row once")
    out.extend(torch.cat(c) for c in chunks)


def _base_and_head(model):
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    head = model.get_output_embeddings()
    if base is None or head is None:
        raise ValueError(f"{type(model).__name__} exposes no decoder/output embeddings; it is "
                         f"not a standard Hugging Face causal LM.")
    return base, head


@dataclass
class ForwardOutput:
    """Per-response-token log-probs and entropies, plus POISE features when captured."""

    log_probs: Tensor             # (B, R) log pi(y_t | x, y_<t) with logits / temperature
    entropies: Tensor | None      # (B, R) full-vocabulary entropy (no grad), if asked
    features: Tensor | None       # (B, 2d + 3) float32, if a capture layer was given
    hidden: list[Tensor] | None = None  # per row (P + R, d): final-norm states, keep_hidden


def policy_forward(model, batch: PackedBatch, *, temperature: float = 1.0,
                   with_entropy: bool = True, capture_layer: int | None = None,
                   spans: Sequence[Spans] | None = None, prompt_window: int = 10,
                   chunk_tokens: int = 8192, entropy_grad: bool = False,
                   keep_hidden: bool = False) -> ForwardOutput:
    """Teacher-forced forward giving response log-probs, entropies and (optionally) features.

    Logits are computed from the final hidden states only at response positions, in chunks of
    `chunk_tokens`, so memory stays bounded for large vocabularies. Gradients flow into
    `log_probs` when grad is enabled (the policy update uses the same function), and into
    `entropies` only with `entropy_grad` (an entropy bonus). `keep_hidden` also returns each
    row's last-layer (final-norm) states over its real prompt and response tokens, detached,
    float32 on the CPU (Hista's state representation).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs; got {temperature}.")
    base, head = _base_and_head(model)
    device = next(model.parameters()).device
    weights: list[Tensor] = []
    if capture_layer is not None:
        if spans is None:
            raise ValueError("capture_layer needs the response spans (response_spans).")
        weights = list(pooling_weights(batch, spans, prompt_window))
    ids = batch.input_ids.to(device)
    with (pooled_block_output(model, capture_layer, weights) if weights else _null()) as pooled:
        hidden = base(input_ids=ids, attention_mask=batch.attention_mask.to(device),
                      position_ids=batch.position_ids.to(device), use_cache=False
                      ).last_hidden_state                                   # (B, T, d)
    # the hidden state at position p predicts the token at p + 1; only real response tokens
    mask = batch.resp_mask.to(device)
    rows, cols = torch.nonzero(mask, as_tuple=True)
    pos = (batch.resp_pos.to(device)[rows, cols] - 1).clamp(min=0)
    h = hidden[rows, pos]                                                   # (M, d)
    y = batch.resp_ids.to(device)[rows, cols]                               # (M,)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    lps, ents = [], []
    for s in range(0, h.shape[0], chunk_tokens):
        args = (h[s:s + chunk_tokens], y[s:s + chunk_tokens])
        fn = _ChunkHead(head, temperature, softcap, with_entropy, entropy_grad)
        if torch.is_grad_enabled() and h.requires_grad:
            # recompute the chunk's logits in backward instead of keeping (chunk, V) floats
            lp, ent = torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        else:
            lp, ent = fn(*args)
        lps.append(lp)
        ents.append(ent)
    b, r = mask.shape
    log_probs = _scatter(lps, rows, cols, (b, r), hidden.dtype)
    entropies = _scatter(ents, rows, cols, (b, r), hidden.dtype) if with_entropy else None
    features = None
    if weights:
        if entropies is None:
            raise ValueError("features need entropies; call with with_entropy=True.")
        stats = entropy_stats(entropies.float(), batch, spans)
        features = torch.cat([pooled[0], pooled[1], stats.to(pooled[0].device)], dim=-1)
    kept = None
    if keep_hidden:
        real = batch.attention_mask.to(device).bool()
        kept = [hidden[b][real[b]].detach().float().cpu() for b in range(hidden.shape[0])]
    return ForwardOutput(log_probs, entropies, features, kept)


class _ChunkHead:
    """LM head on a chunk of positions in fp32 (no autocast): log-probs and entropies."""

    def __init__(self, head, temperature, softcap, with_entropy, entropy_grad):
        self.head, self.t, self.softcap = head, temperature, softcap
        self.with_entropy, self.entropy_grad = with_entropy, entropy_grad

    def __call__(self, h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        dev = h.device.type
        with torch.autocast(dev, enabled=False):
            w = self.head.weight
            logits = torch.nn.functional.linear(h.to(w.dtype), w, getattr(self.head, "bias", None))
            logits = logits.float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        logits = logits / self.t
        lp = logits.gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        if not self.with_entropy:
            return lp, torch.zeros_like(lp)
        ent = entropy_from_logits(logits if self.entropy_grad else logits.detach())
        return lp, ent


def _scatter(chunks: list[Tensor], rows: Tensor, cols: Tensor, shape, dtype) -> Tensor:
    """Put flat per-token values back into a zero (B, R) float32 tensor (grad flows)."""
    flat = torch.cat(chunks) if chunks else torch.zeros(0, device=rows.device)
    out = torch.zeros(shape, device=flat.device, dtype=torch.float32)
    return out.index_put((rows, cols), flat.float())


@contextmanager
def _null():
    yield None
