"""Math answer checking with math-verify: equivalent forms (1/2, 0.5, \\frac{1}{2}) score alike."""
from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

from poise_probe.tasks.base import extract_answer, extract_boxed, normalize_answer

logger = logging.getLogger(__name__)

#: Seconds allowed per parse / comparison. math-verify enforces it with SIGALRM, which only
#: works in the main thread; elsewhere it runs without a timeout (answers are length-capped).
TIMEOUT_S = 5

#: Longer answers skip symbolic parsing (sympy on huge strings can take minutes) and are
#: compared as normalised strings only.
MAX_ANSWER_CHARS = 500

_LATEX_ONLY = [LatexExtractionConfig()]
_LATEX_AND_EXPR = [LatexExtractionConfig(), ExprExtractionConfig()]
_DELIMS = re.compile(r"^\s*(\$\$|\$|\\\(|\\\[)(.*?)(\$\$|\$|\\\)|\\\])\s*$", re.DOTALL)


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _strip_delimiters(ans: str) -> str:
    """`$x$`, `$$x$$`, `\\(x\\)`, `\\[x\\]` -> `x`; a boxed answer -> its content."""
    m = _DELIMS.match(ans)
    if m:
        ans = m.group(2)
    boxed = extract_boxed(ans)
    return (boxed if boxed is not None else ans).strip()


def _parse(latex: str) -> list:
    """math-verify's parse of one answer string (boxed, so LaTeX and plain forms both parse)."""
    return parse("\\boxed{" + latex + "}", extraction_config=_LATEX_AND_EXPR,
                 parsing_timeout=_timeout())


@lru_cache(maxsize=4096)
def _parse_gold(ground_truth: str) -> tuple:
    return tuple(_parse(ground_truth))


def _final_answer(completion: str) -> str | None:
    """`<answer>…</answer>` or `\\boxed{}` content; else the last `$…$` math; else the text."""
    ans = extract_answer(completion)
    if ans is not None:
        return _strip_delimiters(ans)
    if len(completion) <= 20 * MAX_ANSWER_CHARS:
        found = parse(completion, extraction_config=_LATEX_ONLY, fallback_mode="first_match",
                      parsing_timeout=_timeout())
        latex = [f for f in found if isinstance(f, str)]  # the matched LaTeX text
        if latex:
            return latex[-1].strip()
    # A bare answer ("0.5") is its own final answer; prose never parses to an equal value.
    return completion.strip() or None


def score_math(completion: str, ground_truth: str) -> float:
    """1.0 if the completion's final answer equals `ground_truth` mathematically, else 0.0.

    The answer is taken from `<answer>…</answer>`, `\\boxed{}` or the last `$…$`; the ground truth
    may be plain (`0.5`), LaTeX (`\\frac{1}{2}`), delimited or boxed. Never raises: unparsable
    input scores 0.0 unless it matches the ground truth as a normalised string.
    """
    try:
        ans = _final_answer(completion)
        if ans is None:
            return 0.0
        gold = _strip_delimiters(str(ground_truth))
        if normalize_answer(ans) == normalize_answer(gold):
            return 1.0
        if len(ans) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
            return 0.0
        gold_parsed = list(_parse_gold(gold))
        ans_parsed = _parse(ans)
        if not gold_parsed or not ans_parsed:
            return 0.0
        return float(verify(gold_parsed, ans_parsed, timeout_seconds=_timeout()))
    except (Exception, TimeoutException):
        logger.debug("score_math failed on %r vs %r", completion[-200:], ground_truth,
                     exc_info=True)
        return 0.0


__all__ = ["MAX_ANSWER_CHARS", "TIMEOUT_S", "score_math"]
