"""How aligned tokens are drawn: the colour scales, the hover texts and a completion as HTML.

Tokens can be coloured by one of the quantities in `SCALES`, each offered only when the run
stores what it needs: entropy (nats, 0..vmax white to red); the sampled token's log-prob under
the trainer's old-policy forward (`token_logprobs`, by surprisal -log p, white to blue) or its
probability; the rollout engine's own log-prob (`engine_logprobs`) and its gap to the trainer's,
|engine - trainer| (white to purple); and the per-token advantage (`token_advantages`,
diverging: red below zero, green above). Every token's tooltip shows its piece (whitespace
made visible), its id, and every value the run stored for it.

Which token is which piece of the text, and where the spans are, is `poise_dash.tokens`'s.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np

from poise_dash.tokens import TAGS, Alignment

#: Box colours of the spans; the probe window is underlined (it overlaps the think span).
SPAN_COLOURS = {"think": "#6f42c1", "answer": "#1a7f37", "probe window": "#d97706"}


def _ramp(t: float, rgb_light: tuple[int, int, int], rgb_full: tuple[int, int, int]) -> str:
    """A colour `t` of the way (0..1) from faint `rgb_light` to strong `rgb_full`."""
    t = min(max(t, 0.0), 1.0)
    r, g, b = (int(lo + (hi - lo) * t) for lo, hi in zip(rgb_light, rgb_full))
    return f"rgba({r},{g},{b},{0.08 + 0.82 * t:.2f})"


MISSING_COLOUR = "rgba(128,128,128,0.25)"
_BLUE = ((200, 210, 240), (50, 110, 240))
_PURPLE = ((225, 205, 240), (150, 40, 200))
_GREEN = ((200, 235, 205), (30, 150, 60))
_RED = ((245, 205, 200), (215, 45, 35))


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


def gap_colour(value: float, vmax: float) -> str:
    """|engine - trainer| log-prob: white (they agree) to purple (>= vmax nats apart)."""
    if not math.isfinite(value):
        return MISSING_COLOUR
    return _ramp(abs(value) / vmax if vmax > 0 else 0.0, *_PURPLE)


def advantage_colour(value: float, vmax: float) -> str:
    """Diverging: white at 0, red down to -vmax, green up to +vmax; grey for a missing value."""
    if not math.isfinite(value):
        return MISSING_COLOUR
    t = abs(value) / vmax if vmax > 0 else 0.0
    return _ramp(t, *(_GREEN if value > 0 else _RED))


@dataclass(frozen=True)
class Scale:
    """One quantity tokens can be coloured by."""

    key: str                        # see SCALES
    name: str                       # entropy, log-prob, probability, ...
    unit: str                       # "nats" or ""
    symbol: str                     # in hover texts: H, log p, p, ...
    uses_vmax: bool                 # False: a fixed 0..1 scale (probability)
    needs: tuple[str, ...] = ()     # the Alignment fields it needs (stored columns)
    legend: str = ""                # the colour key's title
    at_least: float = 1.0           # the vmax slider reaches at least this
    slider_min: float = 0.1         # and starts here, in steps of
    slider_step: float = 0.05

    @property
    def label(self) -> str:
        """The control's option and the strip chart's y axis title, unit included."""
        return f"{self.name} ({self.unit})" if self.unit else self.name

    @property
    def slider_label(self) -> str:
        """The vmax slider's label: what reaches full colour, in which unit."""
        at = {"logprob": "−log p ≥ ", "engine_logprob": "−log p ≥ ", "logprob_gap": "≥ ",
              "advantage": "|A| ≥ "}.get(self.key, "")
        unit = f"({self.unit})" if self.unit else ""
        return f"{self.name} colour scale: full colour at {at}{unit}".rstrip()

    @property
    def slider_key(self) -> str:
        """The session key of this scale's vmax slider (entropy's keeps its old name)."""
        return {"entropy": "ro_vmax", "logprob": "ro_lpmax"}.get(self.key, f"ro_{self.key}_max")

    def values(self, al: Alignment) -> np.ndarray:
        """This quantity per token of `al` (NaN where missing, all NaN when not stored)."""
        n = len(al.entropies)
        if self.key == "entropy":
            return np.asarray(al.entropies, float)
        stored = [getattr(al, name) for name in self.needs]
        if any(v is None for v in stored):
            return np.full(n, np.nan)
        if self.key == "prob":
            return np.exp(np.asarray(al.log_probs, float))
        if self.key == "logprob_gap":
            return np.abs(np.asarray(al.engine_log_probs, float) - np.asarray(al.log_probs,
                                                                                float))
        return np.asarray(stored[0], float)

    def magnitude(self, values: np.ndarray) -> np.ndarray:
        """How far each value is along the colour scale (what vmax is compared with)."""
        v = np.asarray(values, float)
        if self.key in ("logprob", "engine_logprob"):
            return -v
        return np.abs(v) if self.key == "advantage" else v

    def colour(self, value: float, vmax: float) -> str:
        return COLOURS[self.key](value, vmax)

    def legend_values(self, vmax: float) -> list[float]:
        """Five values from no colour to full colour (advantage: -vmax through 0 to +vmax)."""
        if self.key == "prob":
            return [1.0 - t / 4 for t in range(5)]
        if self.key == "advantage":
            return [vmax * (t - 2) / 2 + 0.0 for t in range(5)]
        sign = -1.0 if self.key in ("logprob", "engine_logprob") else 1.0
        return [sign * vmax * t / 4 + 0.0 for t in range(5)]          # + 0.0: no "-0.00"

    def y_range(self, values: np.ndarray, vmax: float) -> list[float]:
        """The strip chart's y range: 0..max for entropy and gaps, min..0 for log-probs, 0..1
        for p, symmetric about 0 for advantages."""
        finite = np.asarray(values, float)
        finite = finite[np.isfinite(finite)]
        if self.key == "prob":
            return [0.0, 1.05]
        if self.key in ("logprob", "engine_logprob"):
            low = float(finite.min()) if len(finite) else 0.0
            return [min(-vmax, low) * 1.1, 0.0]
        if self.key == "advantage":
            top = max(vmax, float(np.abs(finite).max()) if len(finite) else 0.0) * 1.1
            return [-top, top]
        return [0.0, max(vmax, float(finite.max()) if len(finite) else 1.0) * 1.1]


COLOURS = {"entropy": entropy_colour, "logprob": logprob_colour, "prob": prob_colour,
           "engine_logprob": logprob_colour, "logprob_gap": gap_colour,
           "advantage": advantage_colour}
SCALES = {
    "entropy": Scale("entropy", "entropy", "nats", "H", uses_vmax=True,
                     legend="entropy (nats)", at_least=5.0),
    "logprob": Scale("logprob", "log-prob", "nats", "log p", uses_vmax=True,
                     needs=("log_probs",), at_least=10.0,
                     legend="log-prob of the sampled token (nats; colour by surprisal −log p)"),
    "prob": Scale("prob", "probability", "", "p", uses_vmax=False, needs=("log_probs",),
                  legend="probability of the sampled token"),
    "engine_logprob": Scale("engine_logprob", "engine log-prob", "nats", "engine log p",
                            uses_vmax=True, needs=("engine_log_probs",), at_least=10.0,
                            legend="the rollout engine's log-prob of the sampled token (nats; "
                                   "colour by surprisal −log p)"),
    "logprob_gap": Scale("logprob_gap", "|engine − trainer| log-prob", "nats", "|Δ log p|",
                         uses_vmax=True, needs=("engine_log_probs", "log_probs"),
                         at_least=1.0, slider_min=0.001, slider_step=0.001,
                         legend="|engine − trainer| log-prob of the sampled token (nats)"),
    "advantage": Scale("advantage", "advantage", "", "A", uses_vmax=True,
                       needs=("advantages",), at_least=1.0, slider_min=0.01, slider_step=0.01,
                       legend="per-token advantage (red < 0 < green)"),
}


def get_scale(scale: str | Scale) -> Scale:
    """A `Scale` from itself, its key (entropy, logprob, prob, ...), name or label."""
    if isinstance(scale, Scale):
        return scale
    for s in SCALES.values():
        if scale in (s.key, s.name, s.label):
            return s
    raise ValueError(f"unknown colour scale {scale!r}; one of {list(SCALES)}")


def available_scales(has_log_probs: bool, has_engine_log_probs: bool = False,
                     has_advantages: bool = False) -> list[Scale]:
    """The scales a table can be coloured by: each needs its columns stored (entropy only for
    a run without `token_logprobs`, `engine_logprobs` or `token_advantages`)."""
    have = {"log_probs": has_log_probs, "engine_log_probs": has_engine_log_probs,
            "advantages": has_advantages}
    return [s for s in SCALES.values() if all(have[n] for n in s.needs)]


def _num(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if math.isfinite(v) else "–"


_VISIBLE = {" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍"}


def visible_piece(piece: str) -> str:
    """A token's text with its whitespace and control characters made visible, quoted
    ('␣the', '⏎'); "" for a token without text of its own is shown as ''."""
    shown = "".join(_VISIBLE.get(c, c if c.isprintable() else f"\\x{ord(c):02x}"
                                 if ord(c) < 256 else f"\\u{ord(c):04x}") for c in piece)
    return f"'{shown}'"


def tooltip(al: Alignment, i: int, what: str) -> str:
    """The hover text of token `i`: position, `what` (its text), id, entropy, log-prob and
    probability, engine log-prob and its gap, advantage (those the run stored), plain text
    (escape it for an attribute)."""
    parts = [f"token {i}"]
    if what:
        parts.append(what)
    if al.token_ids is not None and i < len(al.token_ids):
        parts.append(f"id {al.token_ids[i]}")

    def at(values: np.ndarray | None) -> float:
        return float(values[i]) if values is not None and i < len(values) else float("nan")

    parts.append(f"H={_num(at(al.entropies))} nats")
    lp = at(al.log_probs)
    if al.log_probs is not None:
        parts.append(f"log p={_num(lp)}")
        parts.append(f"p={_num(math.exp(lp) if math.isfinite(lp) else lp)}")
    if al.engine_log_probs is not None:
        elp = at(al.engine_log_probs)
        parts.append(f"engine log p={_num(elp)}")
        if al.log_probs is not None:
            parts.append(f"|Δ|={_num(abs(elp - lp), 4)}")
    if al.advantages is not None:
        parts.append(f"A={_num(at(al.advantages), 4)}")
    return " · ".join(parts)


def _show_piece(piece: str) -> str:
    if piece == "\n":
        return "&#8629;<br>"
    if piece == "\t":
        return "&#8677;"
    return html.escape(piece)


def _nested(spans: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """Spans sorted outer first, each cut to end inside the span enclosing its start, so the
    boxes nest as HTML must (a crossing span is drawn up to the enclosing one's end)."""
    out: list[tuple[str, int, int]] = []
    stack: list[tuple[str, int, int]] = []
    for kind, first, last in sorted(spans, key=lambda s: (s[1], -s[2])):
        while stack and stack[-1][2] < first:
            stack.pop()
        if stack:
            last = min(last, stack[-1][2])
        out.append((kind, first, last))
        stack.append((kind, first, last))
    return out


_CHIP = "border-radius:3px; font-size:0.7rem; padding:0 2px; color:#666"


def render_html(al: Alignment, vmax: float, *, show_tags: bool = True,
                scale: str | Scale = "entropy") -> str:
    """The completion as HTML: each token a span coloured by `scale` (see `SCALES`; `vmax` is
    where it reaches full colour), its values in the tooltip; think/answer spans boxed and
    labelled, the probe's pooled window underlined."""
    sc = get_scale(scale)
    vals = sc.values(al)

    def colour(i: int) -> str:
        return sc.colour(float(vals[i]) if i < len(vals) else float("nan"), vmax)

    def title(i: int, what: str = "") -> str:
        return html.escape(tooltip(al, i, what), quote=True)

    style = ("font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.85rem; "
             "line-height: 1.9; white-space: pre-wrap; word-break: break-word;")
    if al.mode == "strip":
        return f'<div style="{style}">{html.escape("".join(al.pieces))}</div>'

    n = len(al.entropies)
    spans = _nested(al.spans)
    opens: dict[int, list[str]] = {}
    closes: dict[int, int] = {}
    for kind, first, last in spans:
        opens.setdefault(first, []).append(kind)
        closes[last] = closes.get(last, 0) + 1
    lo, hi = al.pooled if al.pooled is not None else (0, 0)
    under = f"box-shadow: inset 0 -2px 0 {SPAN_COLOURS['probe window']};"
    out = [f'<div style="{style}">']
    for i in range(n):
        for kind in opens.get(i, []):
            span_colour = SPAN_COLOURS.get(kind, "#555")
            out.append(f'<span data-span="{kind}" style="border:1.5px solid {span_colour}; '
                       f'border-radius:4px; padding:1px 2px; margin:0 1px">'
                       f'<sup style="color:{span_colour}; font-weight:600; '
                       f'font-family:sans-serif">{kind}</sup>')
        pooled = under if lo <= i < hi else ""
        attrs = f'data-tok="{i}"'
        if al.mode == "token_ids":
            tid = al.token_ids[i] if al.token_ids is not None else "?"
            out.append(f'<span title="{title(i)}" {attrs} style="background:{colour(i)}; '
                       f'border:1px solid #ddd; border-radius:3px; padding:0 3px; margin:1px; '
                       f'{pooled}">{tid}</span>')
        elif i >= len(al.pieces) or al.pieces[i] == "":
            last = i == n - 1
            what = ("end of sequence" if i >= len(al.pieces) else
                    "'' (no text of its own: a special token such as the end token"
                    + (")" if last else ", or the first bytes of a character a later token "
                                        "completes)"))
            label = "end" if last else "·"
            out.append(f'<span title="{title(i, what)}" {attrs} style="background:'
                       f'{colour(i)}; border:1px dashed #999; {_CHIP}; {pooled}">{label}</span>')
        else:
            piece = al.pieces[i]
            is_tag = piece in TAGS
            shown = "" if is_tag and not show_tags else _show_piece(piece)
            weight = "font-weight:600; color:#555;" if is_tag else ""
            if al.mode == "pieces":   # mark token boundaries, as the pieces are not characters
                weight += " border-right:1px solid rgba(0,0,0,0.08);"
            out.append(f'<span title="{title(i, visible_piece(piece))}" {attrs} '
                       f'style="background:{colour(i)}; {weight} {pooled}">{shown}</span>')
        out.append("</span>" * closes.get(i, 0))
    out.append("</div>")
    return "".join(out)


def legend_html(vmax: float, scale: str | Scale = "entropy", *, pooled: bool = False) -> str:
    """A small colour key for `scale` (entropy by default), the span boxes and, when `pooled`,
    the probe window's underline."""
    sc = get_scale(scale)
    stops = "".join(
        f'<span style="background:{sc.colour(v, vmax)}; padding:0 10px; '
        f'font-size:0.7rem">{v:.2f}</span>' for v in sc.legend_values(vmax))
    boxes = " ".join(
        f'<span style="border:1.5px solid {c}; border-radius:4px; padding:0 4px; '
        f'font-size:0.75rem; color:{c}">{k}</span>' for k, c in SPAN_COLOURS.items()
        if k != "probe window")
    if pooled:
        c = SPAN_COLOURS["probe window"]
        boxes += (f' <span style="box-shadow: inset 0 -2px 0 {c}; font-size:0.75rem; '
                  f'color:{c}">probe window</span>')
    return (f'<div style="font-size:0.75rem">{sc.legend}: {stops} &nbsp; {boxes} '
            f'&nbsp; hover a token for its values</div>')
