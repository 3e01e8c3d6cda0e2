"""Task protocol: deterministic example sampling and verifiable scoring in [0, 1]."""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

DOMAINS = ("math", "code", "logic")

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Example:
    """One prompt with its verifiable ground truth.

    `prompt` is a user string or a chat list (verl's row format); `ground_truth` is what the
    task's scorer compares against (a string, or for HumanEval the test program).
    """

    prompt: str | Messages
    ground_truth: str
    domain: str
    data_source: str
    extra_info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"Example.domain must be one of {DOMAINS}; got {self.domain!r}. "
                             f"Map the task to math, code or logic.")

    @property
    def messages(self) -> Messages:
        """The prompt as a chat list, ready for `apply_chat_template`."""
        return as_messages(self.prompt)

    @property
    def prompt_id(self) -> str:
        """A stable id: data source plus a hash of the prompt text."""
        text = self.prompt if isinstance(self.prompt, str) else repr(self.prompt)
        return f"{self.data_source}/{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def as_messages(prompt: str | Messages) -> Messages:
    """Turn a bare user string into a one-turn chat; a chat list passes through."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


class Task:
    """Base class: `sample(n, seed, split)` is deterministic; `score` maps a completion to [0, 1].

    Subclasses set `name`, `domain` and implement `_generate(rng)` (one candidate example) or
    override `sample`; they implement `score` (and may override `score_many` to parallelise).
    """

    name: str = "task"
    domain: str = "math"

    def sample(self, n: int, seed: int = 0, split: str = "train") -> list[Example]:
        """`n` distinct examples of `split` ("train" or "test"), the same for the same seed.

        Train and test are disjoint by construction: an example belongs to "test" iff a hash of
        its prompt falls in the held-out tenth, so no held-out prompt is ever trained on.
        """
        check_split(split)
        rng = random.Random(f"{self.name}|{split}|{seed}")
        out: list[Example] = []
        seen: set[str] = set()
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 200 * n + 1000:
                raise RuntimeError(f"task {self.name!r} could only find {len(out)} distinct "
                                   f"{split} examples of {n} asked for; lower n or raise the "
                                   f"difficulty knobs.")
            ex = self._generate(rng)
            key = ex.prompt if isinstance(ex.prompt, str) else repr(ex.prompt)
            if key in seen or is_heldout(key) != (split == "test"):
                continue
            seen.add(key)
            out.append(ex)
        return self._finalize(out)

    def _generate(self, rng: random.Random) -> Example:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement _generate or sample")

    def _finalize(self, examples: list[Example]) -> list[Example]:
        """Hook to fill ground truths in bulk (the code task runs its programs here)."""
        return examples

    def score(self, completion: str, example: Example) -> float:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement score")

    def has_answer(self, completion: str, example: Example) -> bool:
        """Whether the task's answer extractor finds an answer in `completion` (format-valid).

        Validity masking (docs/methods/group_options.md) reads it. This default cannot tell,
        so every completion counts as valid; tasks that extract an answer override it.
        """
        return True

    def score_many(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """Score aligned lists of completions and examples."""
        if len(completions) != len(examples):
            raise ValueError(f"score_many needs as many completions as examples; got "
                             f"{len(completions)} and {len(examples)}.")
        return [float(self.score(c, e)) for c, e in zip(completions, examples)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, domain={self.domain!r})"


def check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")


def is_heldout(key: str) -> bool:
    """True for the tenth of prompts reserved for held-out evaluation."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 10 == 0


# --- answer extraction ------------------------------------------------------------------

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: last `<answer>…</answer>`, else last `\\boxed{}`.

    A boxed expression inside the answer tags is unwrapped. An unterminated `<answer>` at the
    very end (generation stopped at `</answer>`) also counts.
    """
    found = _ANSWER_RE.findall(text)
    if found:
        inner = found[-1].strip()
    else:
        k = text.rfind("<answer>")
        inner = text[k + len("<answer>"):].strip() if k >= 0 and "</answer>" not in text[k:] else None
        if inner is None or inner == "":
            return extract_boxed(text)
    boxed = extract_boxed(inner)
    return boxed if boxed is not None else inner


def normalize_answer(ans: str) -> str:
    """Whitespace-insensitive, case-insensitive comparison form."""
    return re.sub(r"\s+", "", ans).lower()


def exact_match(completion: str, ground_truth: str,
                normalize: Callable[[str], str] = normalize_answer) -> float:
    """1.0 if the extracted answer equals the ground truth after normalisation, else 0.0."""
    ans = extract_answer(completion)
    if ans is None:
        return 0.0
    return float(normalize(ans) == normalize(ground_truth))
