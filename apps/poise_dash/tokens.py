"""Per-token values laid over a completion's text, with the think and answer spans marked.

How a completion's tokens map onto its text (`Alignment.mode`), best first:

- `pieces`: the run stores `token_pieces` (run-format schema 2), the text each token contributes,
  joining exactly to `completion`: exact for any tokenizer, byte-level BPE included (a token
  with no text of its own, such as EOS or the first bytes of a character the next token
  completes, has the piece "" and is drawn as a small marker);
- `chars`: one entropy per character (a character-level tokenizer), plus possibly one trailing
  end-of-sequence token;
- `chars+tags`: one per character, each `<think>`/`</think>`/`<answer>`/`</answer>` one token
  (as in Qwen3's tokenizer and the bundled tiny reasoner's), plus possibly one trailing
  end-of-sequence token that the text does not show;
- `token_ids`: a `token_ids` column of the same length: the ids are shown, coloured;
- `strip`: none of these hold (a subword tokenizer in a run without `token_pieces`): the text
  is shown plain and the values as a per-position strip chart.

The character modes are decided from the counts, never assumed, and serve only runs written
before `token_pieces` existed; the page says which mode it used. The think/answer spans come
from the run's `reasoning_span`/`answer_span` columns when stored (the token ranges the
trainer's entropy statistics used, tags excluded) together with `pooled_span`, the window the
probe pools; older runs get the spans found from the tags in the text (tags included).

How the tokens are coloured and drawn is `poise_dash.token_view`'s.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
#: The span columns of a schema-2 rollout table, by the kind the page draws.
SPAN_COLUMNS = {"think": "reasoning_span", "answer": "answer_span",
                "probe window": "pooled_span"}
#: Per-token columns of a rollout table, by the `Alignment` field that holds them.
VALUE_COLUMNS = {"log_probs": "token_logprobs", "engine_log_probs": "engine_logprobs",
                 "advantages": "token_advantages"}


@dataclass
class Alignment:
    """How a completion's per-token values map onto its text (see the module docstring)."""

    mode: str                       # pieces | chars | chars+tags | token_ids | strip
    pieces: list[str]               # text piece per token (empty for token_ids/strip)
    entropies: np.ndarray           # (T,) nats
    spans: list[tuple[str, int, int]] = field(default_factory=list)  # (kind, first, last) token
    extra_tokens: int = 0           # trailing tokens without text (end-of-sequence)
    token_ids: list[int] | None = None
    log_probs: np.ndarray | None = None   # (T,) nats, NaN where missing; None: not stored
    engine_log_probs: np.ndarray | None = None  # (T,) the rollout engine's; None: not stored
    advantages: np.ndarray | None = None        # (T,) per-token advantages; None: not stored
    pooled: tuple[int, int] | None = None       # [lo, hi) the probe's pooled window (stored)
    spans_stored: bool = False      # spans from the span columns, not found in the text
    notes: list[str] = field(default_factory=list)   # stored values that could not be used
    stored: dict[str, int] = field(default_factory=dict)  # per-token list lengths, by field

    @property
    def coloured(self) -> bool:
        return self.mode != "strip"

    @property
    def num_tokens(self) -> int:
        return len(self.entropies)

    def strip_spans(self) -> list[tuple[str, int, int]]:
        """The spans a strip chart shades: think/answer, plus the probe window when stored."""
        spans = list(self.spans)
        if self.pooled is not None and self.pooled[1] > self.pooled[0]:
            spans.append(("probe window", self.pooled[0], self.pooled[1] - 1))
        return spans

    def describe(self) -> str:
        n = len(self.entropies)
        if self.mode == "pieces":
            empty = sum(p == "" for p in self.pieces)
            text = f"{n} tokens with the text pieces the run stored (exact for any tokenizer)"
            if empty:
                text += (f"; {empty} without text of their own (a special token such as the end "
                         f"token, or the first bytes of a character the next token completes)")
        elif self.mode == "chars":
            tail = f" plus {self.extra_tokens} end token" if self.extra_tokens else ""
            text = f"{n} tokens, one per character{tail}"
        elif self.mode == "chars+tags":
            tail = f" plus {self.extra_tokens} end token" if self.extra_tokens else ""
            text = f"{n} tokens: one per character, tags as single tokens{tail}"
        elif self.mode == "token_ids":
            text = f"{n} tokens shown by id (token strings are not stored in the run)"
        else:
            text = (f"{n} entropies do not match the text's {len(self.pieces) or 'unknown'} "
                    f"pieces (a subword tokenizer): shown as a per-position strip")
        if self.spans_stored:
            text += "; spans as the trainer recorded them (think, answer, probe window)"
        for name, label in (("log_probs", "log-probs"), ("engine_log_probs", "engine log-probs"),
                            ("advantages", "token advantages")):
            if getattr(self, name) is not None and self.stored.get(name, n) != n:
                text += (f"; {self.stored[name]} {label} for {n} tokens (the missing ones are "
                         f"grey, the extra ones dropped)")
        return "; ".join([text] + self.notes)


def split_pieces(text: str) -> list[str]:
    """Characters, with each think/answer tag kept whole."""
    pieces, i = [], 0
    while i < len(text):
        for tag in TAGS:
            if text.startswith(tag, i):
                pieces.append(tag)
                i += len(tag)
                break
        else:
            pieces.append(text[i])
            i += 1
    return pieces


def tag_spans(pieces: list[str]) -> list[tuple[str, int, int]]:
    """(kind, first piece, last piece) of each think/answer span, tags included; an unclosed
    span runs to the end (a truncated completion)."""
    spans, open_at = [], {}
    for i, piece in enumerate(pieces):
        if piece in ("<think>", "<answer>"):
            open_at[piece[1:-1]] = i
        elif piece in ("</think>", "</answer>"):
            kind = piece[2:-1]
            if kind in open_at:
                spans.append((kind, open_at.pop(kind), i))
    for kind, start in open_at.items():
        spans.append((kind, start, len(pieces) - 1))
    return sorted(spans, key=lambda s: s[1])


def _missing(value) -> bool:
    """A row's absent value: None, or the NaN a column missing from some steps reads as."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_values(values) -> np.ndarray | None:
    """A row's list/array of floats as a float array; None for a missing value (an old run's
    absent column reads as None or NaN)."""
    if _missing(values):
        return None
    return np.asarray(values, dtype=float).ravel()


def _fit(values: np.ndarray, n: int) -> np.ndarray:
    """`values` padded with NaN or cut to `n`."""
    out = np.full(n, np.nan)
    out[:min(n, len(values))] = values[:n]
    return out


def stored_spans(spans: Mapping[str, object] | None,
                 n: int) -> tuple[list[tuple[str, int, int]], tuple[int, int] | None, list[str]]:
    """Stored `[lo, hi)` token ranges ({kind: range}, kinds of `SPAN_COLUMNS`) as
    ([(kind, first, last)] of the non-empty think/answer spans, the probe window or None, notes
    on ranges that do not fit `n` tokens)."""
    boxes, pooled, notes = [], None, []
    for kind, value in (spans or {}).items():
        if _missing(value):
            continue
        lo_hi = [int(v) for v in np.asarray(value).ravel()]
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1] <= n:
            notes.append(f"the stored {kind} span {lo_hi} does not fit {n} tokens (not drawn)")
            continue
        lo, hi = lo_hi
        if kind == "probe window":
            pooled = (lo, hi)
        elif hi > lo:
            boxes.append((kind, lo, hi - 1))
    return sorted(boxes, key=lambda s: (s[1], -s[2])), pooled, notes


def align(completion: str, entropies, token_ids=None, log_probs=None, *, token_pieces=None,
          spans: Mapping[str, object] | None = None, engine_log_probs=None,
          advantages=None) -> Alignment:
    """Decide how `entropies` (T,) map onto `completion` (see the module docstring).

    `log_probs`, `engine_log_probs` and `advantages` (T,) go with the same tokens. The token
    count is the entropies' (the log-probs' when a row has no entropies); per-token values of
    another length are padded with NaN or cut, and `describe()` says so. `token_ids` are kept
    for the tooltips when their count matches. `token_pieces` (T,) that join to `completion`
    give the `pieces` mode; `spans` ({"think" | "answer" | "probe window": [lo, hi)}) replace
    the spans found from the tags.
    """
    ent = _as_values(entropies)
    lp = _as_values(log_probs)
    if (ent is None or not len(ent)) and lp is not None and len(lp):
        ent = np.full(len(lp), np.nan)   # no entropies stored: the log-probs give the count
    if ent is None:
        ent = np.zeros(0)
    n = len(ent)
    ids = [int(t) for t in token_ids] if not _missing(token_ids) and token_ids is not None \
        and len(token_ids) == n and n else None
    extra: dict = {"token_ids": ids, "stored": {}}
    for name, raw in (("log_probs", lp), ("engine_log_probs", _as_values(engine_log_probs)),
                      ("advantages", _as_values(advantages))):
        extra[name] = None if raw is None else _fit(raw, n)
        extra["stored"][name] = 0 if raw is None else len(raw)
    boxes, pooled, notes = stored_spans(spans, n)
    have_spans = spans is not None and any(not _missing(v) for v in spans.values())
    extra.update(pooled=pooled, notes=notes, spans_stored=have_spans)

    def found(text_spans: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
        return boxes if have_spans else text_spans

    if not _missing(token_pieces) and token_pieces is not None:
        pieces = [str(p) for p in token_pieces]
        if len(pieces) == n and "".join(pieces) == completion:
            return Alignment("pieces", pieces, ent, found(tag_spans(pieces)), **extra)
        notes.append(f"the stored token pieces ({len(pieces)} for {n} tokens) do not join to "
                     f"the completion, so they are not used")
    if n and len(completion) in (n, n - 1):
        return Alignment("chars", list(completion), ent, found(char_spans(completion)),
                         extra_tokens=n - len(completion), **extra)
    pieces = split_pieces(completion)
    if n and len(pieces) in (n, n - 1) and any(p in TAGS for p in pieces):
        return Alignment("chars+tags", pieces, ent, found(tag_spans(pieces)),
                         extra_tokens=n - len(pieces), **extra)
    if ids is not None:
        return Alignment("token_ids", [], ent, found([]), **extra)
    return Alignment("strip", pieces, ent, found([]), **extra)


def align_row(row: Mapping) -> Alignment:
    """`align` on one rollout-table row, with whichever of the per-token columns it has."""
    get = row.get
    spans = {kind: get(col) for kind, col in SPAN_COLUMNS.items() if col in row}
    al = align(str(row["completion"]), get("token_entropies"), get("token_ids"),
               token_pieces=get("token_pieces"), spans=spans or None,
               **{name: get(col) for name, col in VALUE_COLUMNS.items()})
    if "token_pieces" in row and _missing(get("token_pieces")) and len(al.entropies):
        al.notes.append("the run stored no token pieces for this rollout (the trainer could "
                        "not split its text exactly)")
    return al


def char_spans(text: str) -> list[tuple[str, int, int]]:
    """(kind, first char, last char) of each think/answer span, tags included, in a text whose
    tags are spelled character by character; an unclosed span runs to the end."""
    spans = []
    for kind in ("think", "answer"):
        start = text.find(f"<{kind}>")
        while start >= 0:
            close = text.find(f"</{kind}>", start)
            end = close + len(kind) + 2 if close >= 0 else len(text) - 1
            spans.append((kind, start, end))
            start = text.find(f"<{kind}>", end + 1)
    return sorted(spans, key=lambda s: s[1])
