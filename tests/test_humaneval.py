"""HumanEval task: deterministic disjoint splits, code extraction, tests run in the sandbox."""
from __future__ import annotations

import time

import pytest

from poise_probe.sandbox import SandboxLimits
from poise_probe.tasks.base import is_heldout
from poise_probe.tasks.humaneval import (HumanEvalTask, build_program, extract_code,
                                         load_problems)

PROBLEMS = {p["task_id"]: p for p in load_problems()}
# HumanEval/10 and /38 call helpers defined in their prompts; /0 needs the prompt's imports.
CHOSEN = ["HumanEval/0", "HumanEval/2", "HumanEval/10", "HumanEval/38", "HumanEval/53",
          "HumanEval/120"]


@pytest.fixture(scope="module")
def task() -> HumanEvalTask:
    return HumanEvalTask(timeout_s=5.0)


def example(task_id: str):
    return HumanEvalTask.to_example(PROBLEMS[task_id])


def test_problems_load():
    assert len(PROBLEMS) == 164
    assert list(PROBLEMS)[:2] == ["HumanEval/0", "HumanEval/1"]


def test_splits_are_disjoint_and_cover_everything(task):
    train = {e.extra_info["task_id"] for e in task.sample(len(task.problems("train")))}
    test = {e.extra_info["task_id"] for e in task.sample(len(task.problems("test")), split="test")}
    assert not train & test and len(train | test) == 164
    assert test == {t for t in PROBLEMS if is_heldout(t)}


def test_sample_is_deterministic(task):
    ids = lambda exs: [e.extra_info["task_id"] for e in exs]
    assert ids(task.sample(10, seed=1)) == ids(task.sample(10, seed=1))
    assert ids(task.sample(10, seed=1)) != ids(task.sample(10, seed=2))
    assert len(set(ids(task.sample(20, seed=3)))) == 20


def test_sample_rejects_too_many(task):
    n_test = len(task.problems("test"))
    with pytest.raises(ValueError, match=rf"{n_test} test problems.*n={n_test + 1}"):
        task.sample(n_test + 1, split="test")
    with pytest.raises(ValueError, match="split must be"):
        task.sample(1, split="dev")


def test_example_fields():
    ex = example("HumanEval/0")
    p = PROBLEMS["HumanEval/0"]
    assert (ex.domain, ex.data_source) == ("code", "openai_humaneval")
    assert p["prompt"] in ex.prompt and "<answer>" in ex.prompt
    assert ex.ground_truth.strip().endswith("check(has_close_elements)")
    assert ex.extra_info == {"task_id": "HumanEval/0", "entry_point": "has_close_elements",
                             "prompt": p["prompt"]}


def test_get_task_builds_it():
    from poise_probe.tasks import get_task

    assert isinstance(get_task("humaneval", timeout_s=2.0), HumanEvalTask)


@pytest.mark.parametrize("completion, expected", [
    ("<answer>```python\ndef f():\n    return 1\n```</answer>", "def f():\n    return 1\n"),
    ("text\n```python\nA = 1\n```\nmore\n```python\nB = 2\n```", "B = 2\n"),
    ("```\nC = 3\n```", "C = 3\n"),
    ("<answer>D = 4</answer>", "D = 4"),
    ("    return 5\n", "    return 5\n"),
    ("<think>...</think><answer>```py\nE = 6\n```", "E = 6\n"),  # stopped at </answer>
])
def test_extract_code(completion, expected):
    assert extract_code(completion) == expected


def test_canonical_solutions_pass(task):
    exs = [example(t) for t in CHOSEN]
    body_only = [PROBLEMS[t]["canonical_solution"] for t in CHOSEN]
    full = [f"<think>easy</think><answer>```python\n{PROBLEMS[t]['prompt']}"
            f"{PROBLEMS[t]['canonical_solution']}```</answer>" for t in CHOSEN]
    assert task.score_many(body_only, exs) == [1.0] * len(CHOSEN)
    assert task.score_many(full, exs) == [1.0] * len(CHOSEN)
    assert task.score(body_only[0], exs[0]) == 1.0


def test_full_function_without_imports_passes(task):
    """The prompt's `from typing import List` is supplied even if the answer omits it."""
    ex = example("HumanEval/0")
    answer = ("<answer>```python\ndef has_close_elements(numbers: List[float], threshold: float)"
              " -> bool:\n    s = sorted(numbers)\n"
              "    return any(b - a < threshold for a, b in zip(s, s[1:]))\n```</answer>")
    assert "from typing" not in build_program(answer, ex).split("def has_close_elements")[2]
    assert task.score(answer, ex) == 1.0


def test_wrong_and_broken_solutions_fail(task):
    ex = example("HumanEval/2")  # truncate_number
    assert task.score("<answer>```python\ndef truncate_number(number):\n    return number\n```"
                      "</answer>", ex) == 0.0
    assert task.score("    return (", ex) == 0.0
    assert task.score("", ex) == 0.0


def test_infinite_loop_scores_zero_quickly():
    task = HumanEvalTask(limits=SandboxLimits(wall_time_s=1.0, cpu_time_s=1))
    ex = example("HumanEval/2")
    t0 = time.monotonic()
    assert task.score("    while True:\n        pass\n", ex) == 0.0
    assert time.monotonic() - t0 < 3.0


def test_score_many_rejects_misaligned(task):
    with pytest.raises(ValueError, match="as many completions as examples"):
        task.score_many(["x"], [])


def test_bad_constructor_args():
    with pytest.raises(ValueError, match="timeout_s"):
        HumanEvalTask(timeout_s=0)
    with pytest.raises(TypeError, match="SandboxLimits"):
        HumanEvalTask(limits={"wall_time_s": 1})
