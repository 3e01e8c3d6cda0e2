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

Newer runs also store `token_logprobs`, the log-probability of each sampled token under the
policy that sampled it. The tokens can be coloured by one of three quantities (`SCALES`):
entropy (nats, 0..vmax white to red), log-prob (coloured by surprisal -log p in nats, 0..vmax
white to blue) and probability (p = exp(log p), 1 white to 0 blue). Every token's tooltip shows
its id (when known), its entropy and its log-prob and probability (when stored).
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
    log_probs: np.ndarray | None = None   # (T,) nats, NaN where missing; None: not stored
    log_probs_stored: int = 0       # how many log-probs the row had (!= T: padded or cut)

    @property
    def coloured(self) -> bool:
        return self.mode != "strip"

    @property
    def num_tokens(self) -> int:
        return len(self.entropies)

    def values(self, scale: str | Scale = "entropy") -> np.ndarray:
        """The per-token values `scale` colours by (NaN where a value is missing)."""
        return get_scale(scale).values(self)

    def describe(self) -> str:
        n = len(self.entropies)
        if self.mode == "chars":
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
        if self.log_probs is not None and self.log_probs_stored != n:
            text += (f"; {self.log_probs_stored} log-probs for {n} tokens (the missing ones are "
                     f"grey, the extra ones dropped)")
        return text


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


def _as_values(values) -> np.ndarray | None:
    """A row's list/array of floats as a float array; None for a missing value (an old run's
    absent column reads as None or NaN)."""
    if values is None or (isinstance(values, float) and math.isnan(values)):
        return None
    return np.asarray(values, dtype=float).ravel()


def _fit(values: np.ndarray, n: int) -> np.ndarray:
    """`values` padded with NaN or cut to `n`."""
    out = np.full(n, np.nan)
    out[:min(n, len(values))] = values[:n]
    return out


def align(completion: str, entropies, token_ids=None, log_probs=None) -> Alignment:
    """Decide how `entropies` (T,) map onto `completion` (see the module docstring).

    `log_probs` (T,) go with the same tokens. The token count is the entropies' (the log-probs'
    when a row has no entropies); log-probs of another length are padded with NaN or cut, and
    `describe()` says so. `token_ids` are kept for the tooltips when their count matches.
    """
    ent = _as_values(entropies)
    lp = _as_values(log_probs)
    if (ent is None or not len(ent)) and lp is not None and len(lp):
        ent = np.full(len(lp), np.nan)   # no entropies stored: the log-probs give the count
    if ent is None:
        ent = np.zeros(0)
    n = len(ent)
    ids = [int(t) for t in token_ids] if token_ids is not None and len(token_ids) == n and n \
        else None
    extra = {"token_ids": ids, "log_probs": None if lp is None else _fit(lp, n),
             "log_probs_stored": 0 if lp is None else len(lp)}
    if n and len(completion) in (n, n - 1):
        return Alignment("chars", list(completion), ent, char_spans(completion),
                         extra_tokens=n - len(completion), **extra)
    pieces = split_pieces(completion)
    if n and len(pieces) in (n, n - 1) and any(p in TAGS for p in pieces):
        return Alignment("chars+tags", pieces, ent, tag_spans(pieces),
                         extra_tokens=n - len(pieces), **extra)
    if ids is not None:
        return Alignment("token_ids", [], ent, [], **extra)
    return Alignment("strip", pieces, ent, [], **extra)


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


def _ramp(t: float, rgb_light: tuple[int, int, int], rgb_full: tuple[int, int, int]) -> str:
    """A colour `t` of the way (0..1) from faint `rgb_light` to strong `rgb_full`."""
    t = min(max(t, 0.0), 1.0)
    r, g, b = (int(lo + (hi - lo) * t) for lo, hi in zip(rgb_light, rgb_full))
    return f"rgba({r},{g},{b},{0.08 + 0.82 * t:.2f})"


MISSING_COLOUR = "rgba(128,128,128,0.25)"
_BLUE = ((200, 210, 240), (50, 110, 240))


def entropy_colour(value: float, vmax: float) -> str:
    """White (0 nats) to orange-red (>= vmax nats); grey for a missing value."""
    if not math.isfinite(value):
        return MISSING_COLOUR
    t = min(max(value / vmax, 0.0), 1.0) if vmax > 0 else 0.0
    return f"rgba(230,{int(120 - 80 * t)},{int(40 * (1 - t))},{0.08 + 0.82 * t:.2f})"


def logprob_colour(value: float, vmax: float) -> str:
    """By surprisal -log p: white (log p = 0, a certain token) to blue (log p <= -vmax nats);
    grey for a missing value."""
    if not math.isfinite(value):
        return MISSING_COLOUR
    return _ramp(-value / vmax if vmax > 0 else 0.0, *_BLUE)


def prob_colour(value: float, vmax: float = 1.0) -> str:
    """White (p = 1) to blue (p = 0); grey for a missing value. `vmax` is unused (the scale is
    always 0..1), taken so every scale colours with the same call."""
    del vmax
    if not math.isfinite(value):
        return MISSING_COLOUR
    return _ramp(1.0 - value, *_BLUE)


@dataclass(frozen=True)
class Scale:
    """One quantity tokens can be coloured by."""

    key: str                        # entropy | logprob | prob
    name: str                       # entropy, log-prob, probability
    unit: str                       # "nats" or ""
    symbol: str                     # in hover texts: H, log p, p
    uses_vmax: bool                 # False: a fixed 0..1 scale (probability)
    needs_log_probs: bool           # only for runs that store `token_logprobs`

    @property
    def label(self) -> str:
        """The control's option and the strip chart's y axis title, unit included."""
        return f"{self.name} ({self.unit})" if self.unit else self.name

    def values(self, al: Alignment) -> np.ndarray:
        """This quantity per token of `al` (NaN where missing, all NaN without log-probs)."""
        if not self.needs_log_probs:
            return np.asarray(al.entropies, float)
        if al.log_probs is None:
            return np.full(len(al.entropies), np.nan)
        lp = np.asarray(al.log_probs, float)
        return np.exp(lp) if self.key == "prob" else lp

    def colour(self, value: float, vmax: float) -> str:
        return COLOURS[self.key](value, vmax)

    def legend_values(self, vmax: float) -> list[float]:
        """Five values from no colour to full colour."""
        if self.key == "prob":
            return [1.0 - t / 4 for t in range(5)]
        sign = -1.0 if self.key == "logprob" else 1.0
        return [sign * vmax * t / 4 + 0.0 for t in range(5)]          # + 0.0: no "-0.00"

    def y_range(self, values: np.ndarray, vmax: float) -> list[float]:
        """The strip chart's y range: 0..max for entropy, min..0 for log-prob, 0..1 for p."""
        finite = np.asarray(values, float)
        finite = finite[np.isfinite(finite)]
        if self.key == "prob":
            return [0.0, 1.05]
        if self.key == "logprob":
            low = float(finite.min()) if len(finite) else 0.0
            return [min(-vmax, low) * 1.1, 0.0]
        return [0.0, max(vmax, float(finite.max()) if len(finite) else 1.0) * 1.1]


COLOURS = {"entropy": entropy_colour, "logprob": logprob_colour, "prob": prob_colour}
SCALES = {
    "entropy": Scale("entropy", "entropy", "nats", "H", uses_vmax=True, needs_log_probs=False),
    "logprob": Scale("logprob", "log-prob", "nats", "log p", uses_vmax=True,
                     needs_log_probs=True),
    "prob": Scale("prob", "probability", "", "p", uses_vmax=False, needs_log_probs=True),
}


def get_scale(scale: str | Scale) -> Scale:
    """A `Scale` from itself, its key (entropy, logprob, prob), name or label."""
    if isinstance(scale, Scale):
        return scale
    for s in SCALES.values():
        if scale in (s.key, s.name, s.label):
            return s
    raise ValueError(f"unknown colour scale {scale!r}; one of {list(SCALES)}")


def available_scales(has_log_probs: bool) -> list[Scale]:
    """The scales a table can be coloured by: entropy only without `token_logprobs`."""
    return [s for s in SCALES.values() if has_log_probs or not s.needs_log_probs]


def _num(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if math.isfinite(v) else "–"


def tooltip(al: Alignment, i: int, what: str) -> str:
    """The hover text of token `i`: position, `what` (its text), id, entropy, log-prob and
    probability (those the run stored), plain text (escape it for an attribute)."""
    parts = [f"token {i}"]
    if what:
        parts.append(what)
    if al.token_ids is not None and i < len(al.token_ids):
        parts.append(f"id {al.token_ids[i]}")
    h = float(al.entropies[i]) if i < len(al.entropies) else float("nan")
    parts.append(f"H={_num(h)} nats")
    if al.log_probs is not None:
        lp = float(al.log_probs[i]) if i < len(al.log_probs) else float("nan")
        parts.append(f"log p={_num(lp)}")
        parts.append(f"p={_num(math.exp(lp) if math.isfinite(lp) else lp)}")
    return " · ".join(parts)


def _show_piece(piece: str) -> str:
    if piece == "\n":
        return "&#8629;<br>"
    if piece == "\t":
        return "&#8677;"
    return html.escape(piece)


def render_html(al: Alignment, vmax: float, *, show_tags: bool = True,
                scale: str | Scale = "entropy") -> str:
    """The completion as HTML: each token a span coloured by `scale` (entropy, log-prob or
    probability; `vmax` is where entropy and surprisal reach full colour), its values in the
    tooltip; think/answer spans boxed and labelled."""
    sc = get_scale(scale)
    vals = sc.values(al)

    def colour(i: int) -> str:
        return sc.colour(float(vals[i]) if i < len(vals) else float("nan"), vmax)

    def title(i: int, what: str = "") -> str:
        return html.escape(tooltip(al, i, what), quote=True)

    style = ("font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.85rem; "
             "line-height: 1.9; white-space: pre-wrap; word-break: break-word;")
    if al.mode == "token_ids":
        chips = "".join(
            f'<span title="{title(i)}" style="background:'
            f'{colour(i)}; border:1px solid #ddd; border-radius:3px; '
            f'padding:0 3px; margin:1px">{tid}</span>'
            for i, tid in enumerate(al.token_ids or []))
        return f'<div style="{style}">{chips}</div>'
    if al.mode == "strip":
        return f'<div style="{style}">{html.escape("".join(al.pieces))}</div>'

    starts = {first: kind for kind, first, _last in al.spans}
    ends = {last for _kind, _first, last in al.spans}
    out = [f'<div style="{style}">']
    for i, piece in enumerate(al.pieces):
        if i in starts:
            kind = starts[i]
            span_colour = SPAN_COLOURS.get(kind, "#555")
            out.append(f'<span style="border:1.5px solid {span_colour}; border-radius:4px; '
                       f'padding:1px 2px; margin:0 1px">'
                       f'<sup style="color:{span_colour}; font-weight:600; '
                       f'font-family:sans-serif">{kind}</sup>')
        is_tag = piece in TAGS
        if is_tag and not show_tags:
            shown = ""
        else:
            shown = _show_piece(piece)
        weight = "font-weight:600; color:#555;" if is_tag else ""
        out.append(f'<span title="{title(i, repr(piece))}" '
                   f'style="background:{colour(i)}; {weight}">{shown}</span>')
        if i in ends:
            out.append("</span>")
    for j in range(len(al.pieces), len(al.entropies)):
        out.append(f'<span title="{title(j, "end of sequence")}" style="'
                   f'background:{colour(j)}; border:1px dashed #999; '
                   f'border-radius:3px; font-size:0.7rem; padding:0 2px">end</span>')
    out.append("</div>")
    return "".join(out)


def legend_html(vmax: float, scale: str | Scale = "entropy") -> str:
    """A small colour key for `scale` (entropy by default)."""
    sc = get_scale(scale)
    stops = "".join(
        f'<span style="background:{sc.colour(v, vmax)}; padding:0 10px; '
        f'font-size:0.7rem">{v:.2f}</span>' for v in sc.legend_values(vmax))
    boxes = " ".join(
        f'<span style="border:1.5px solid {c}; border-radius:4px; padding:0 4px; '
        f'font-size:0.75rem; color:{c}">{k}</span>' for k, c in SPAN_COLOURS.items())
    name = {"entropy": "entropy (nats)",
            "logprob": "log-prob of the sampled token (nats; colour by surprisal −log p)",
            "prob": "probability of the sampled token"}[sc.key]
    return (f'<div style="font-size:0.75rem">{name}: {stops} &nbsp; {boxes} '
            f'&nbsp; hover a token for its values</div>')
