"""Per-token entropies laid over a completion's text, with the think and answer spans marked.

A rollout table stores the completion as text and `token_entropies` in token order, but no
token strings. The text can be coloured per token only when the pieces are known:

- `chars`: one entropy per character (a character-level tokenizer), plus possibly one trailing
  end-of-sequence token;
- `chars+tags`: one per character, each `<think>`/`</think>`/`<answer>`/`</answer>` one token
  (as in Qwen3's tokenizer and the bundled tiny reasoner's), plus possibly one trailing
  end-of-sequence token that the text does not show;
- `token_ids`: a `token_ids` column of the same length: the ids are shown, coloured;
- `strip`: none of these hold (a BPE tokenizer): the text is shown plain and the entropies as a
  per-position strip chart.

The mode is decided from the counts, never assumed; the page says which one it used.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

import numpy as np

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
SPAN_COLOURS = {"think": "#6f42c1", "answer": "#1a7f37"}


@dataclass
class Alignment:
    """How a completion's entropies map onto its text (see the module docstring)."""

    mode: str                       # chars | chars+tags | token_ids | strip
    pieces: list[str]               # text piece per token (empty for token_ids/strip)
    entropies: np.ndarray           # (T,) nats
    spans: list[tuple[str, int, int]] = field(default_factory=list)  # (kind, first, last) token
    extra_tokens: int = 0           # trailing tokens without text (end-of-sequence)
    token_ids: list[int] | None = None

    @property
    def coloured(self) -> bool:
        return self.mode != "strip"

    def describe(self) -> str:
        n = len(self.entropies)
        if self.mode == "chars":
            tail = f" plus {self.extra_tokens} end token" if self.extra_tokens else ""
            return f"{n} tokens, one per character{tail}"
        if self.mode == "chars+tags":
            tail = f" plus {self.extra_tokens} end token" if self.extra_tokens else ""
            return f"{n} tokens: one per character, tags as single tokens{tail}"
        if self.mode == "token_ids":
            return f"{n} tokens shown by id (token strings are not stored in the run)"
        return (f"{n} entropies do not match the text's {len(self.pieces) or 'unknown'} pieces "
                f"(a subword tokenizer): shown as a per-position strip")


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


def align(completion: str, entropies, token_ids=None) -> Alignment:
    """Decide how `entropies` (T,) map onto `completion` (see the module docstring)."""
    ent = np.asarray(entropies if entropies is not None else [], dtype=float).ravel()
    n = len(ent)
    if n and len(completion) in (n, n - 1):
        return Alignment("chars", list(completion), ent, char_spans(completion),
                         extra_tokens=n - len(completion))
    pieces = split_pieces(completion)
    if n and len(pieces) in (n, n - 1) and any(p in TAGS for p in pieces):
        return Alignment("chars+tags", pieces, ent, tag_spans(pieces),
                         extra_tokens=n - len(pieces))
    if token_ids is not None and len(token_ids) == n and n:
        return Alignment("token_ids", [], ent, [], token_ids=[int(t) for t in token_ids])
    return Alignment("strip", pieces, ent, [])


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


def entropy_colour(value: float, vmax: float) -> str:
    """White (0 nats) to orange-red (>= vmax nats); grey for a missing value."""
    if not math.isfinite(value):
        return "rgba(128,128,128,0.25)"
    t = min(max(value / vmax, 0.0), 1.0) if vmax > 0 else 0.0
    return f"rgba(230,{int(120 - 80 * t)},{int(40 * (1 - t))},{0.08 + 0.82 * t:.2f})"


def _show_piece(piece: str) -> str:
    if piece == "\n":
        return "&#8629;<br>"
    if piece == "\t":
        return "&#8677;"
    return html.escape(piece)


def render_html(al: Alignment, vmax: float, *, show_tags: bool = True) -> str:
    """The completion as HTML: each token a span coloured by entropy, its value in the tooltip;
    think/answer spans boxed and labelled."""
    style = ("font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.85rem; "
             "line-height: 1.9; white-space: pre-wrap; word-break: break-word;")
    if al.mode == "token_ids":
        chips = "".join(
            f'<span title="token {i} · id {tid} · H={h:.3f} nats" style="background:'
            f'{entropy_colour(h, vmax)}; border:1px solid #ddd; border-radius:3px; '
            f'padding:0 3px; margin:1px">{tid}</span>'
            for i, (tid, h) in enumerate(zip(al.token_ids or [], al.entropies)))
        return f'<div style="{style}">{chips}</div>'
    if al.mode == "strip":
        return f'<div style="{style}">{html.escape("".join(al.pieces))}</div>'

    starts = {first: kind for kind, first, _last in al.spans}
    ends = {last for _kind, _first, last in al.spans}
    out = [f'<div style="{style}">']
    for i, piece in enumerate(al.pieces):
        if i in starts:
            kind = starts[i]
            colour = SPAN_COLOURS.get(kind, "#555")
            out.append(f'<span style="border:1.5px solid {colour}; border-radius:4px; '
                       f'padding:1px 2px; margin:0 1px">'
                       f'<sup style="color:{colour}; font-weight:600; font-family:sans-serif">'
                       f'{kind}</sup>')
        h = al.entropies[i] if i < len(al.entropies) else float("nan")
        is_tag = piece in TAGS
        if is_tag and not show_tags:
            shown = ""
        else:
            shown = _show_piece(piece)
        weight = "font-weight:600; color:#555;" if is_tag else ""
        out.append(f'<span title="token {i} · {html.escape(repr(piece))} · H={h:.3f} nats" '
                   f'style="background:{entropy_colour(h, vmax)}; {weight}">{shown}</span>')
        if i in ends:
            out.append("</span>")
    for j in range(len(al.pieces), len(al.entropies)):
        h = al.entropies[j]
        out.append(f'<span title="token {j} · end of sequence · H={h:.3f} nats" style="'
                   f'background:{entropy_colour(h, vmax)}; border:1px dashed #999; '
                   f'border-radius:3px; font-size:0.7rem; padding:0 2px">end</span>')
    out.append("</div>")
    return "".join(out)


def legend_html(vmax: float) -> str:
    """A small colour key for the entropy scale."""
    stops = "".join(
        f'<span style="background:{entropy_colour(vmax * t / 4, vmax)}; padding:0 10px; '
        f'font-size:0.7rem">{vmax * t / 4:.2f}</span>' for t in range(5))
    boxes = " ".join(
        f'<span style="border:1.5px solid {c}; border-radius:4px; padding:0 4px; '
        f'font-size:0.75rem; color:{c}">{k}</span>' for k, c in SPAN_COLOURS.items())
    return (f'<div style="font-size:0.75rem">entropy (nats): {stops} &nbsp; {boxes} '
            f'&nbsp; hover a token for its value</div>')
