"""Built-in task families, answer extraction, held-out splits and reference traces."""
from __future__ import annotations

import random

import pytest

from poise_probe.tasks import DEFAULT_TASKS, get_task
from poise_probe.tasks.base import Example, extract_answer, extract_boxed, is_heldout


@pytest.mark.parametrize("text, expected", [
    ("<think>1+1=2</think><answer>2</answer>", "2"),
    ("<answer>1</answer> then <answer> 3 </answer>", "3"),          # last one wins
    ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),     # nested braces
    ("<answer>\\boxed{7}</answer>", "7"),                             # boxed inside tags
    ("<think>no answer here</think>", None),
    ("<think>x</think><answer>42", "42"),                             # stopped before </answer>
    ("\\boxed{unbalanced", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_boxed_takes_last():
    assert extract_boxed("\\boxed{1} and \\boxed{2}") == "2"


def test_example_rejects_unknown_domain():
    with pytest.raises(ValueError, match="domain must be one of"):
        Example(prompt="p", ground_truth="1", domain="chemistry", data_source="x")


def test_unknown_task_lists_known():
    with pytest.raises(KeyError, match="arith"):
        get_task("no_such_task")


@pytest.mark.parametrize("name", DEFAULT_TASKS)
def test_sampling_is_deterministic_and_splits_are_disjoint(name):
    task = get_task(name)
    a = task.sample(30, seed=3)
    assert [e.prompt for e in a] == [e.prompt for e in task.sample(30, seed=3)]
    assert [e.prompt for e in a] != [e.prompt for e in task.sample(30, seed=4)]
    test = task.sample(30, seed=3, split="test")
    assert all(is_heldout(e.prompt) for e in test)
    assert not any(is_heldout(e.prompt) for e in a)
    assert len({e.prompt for e in a}) == 30
    assert {e.domain for e in a} == {task.domain}


@pytest.mark.parametrize("name", DEFAULT_TASKS)
def test_reference_traces_score_one_and_corrupted_traces_zero(name):
    task = get_task(name)
    examples = task.sample(40, seed=0)
    good = [task.reference(e) for e in examples]
    assert task.score_many(good, examples) == [1.0] * 40
    assert all(g.startswith("<think>") and g.endswith("</answer>") for g in good)
    bad = [task.reference(e, rng=random.Random(i), error_rate=1.0)
           for i, e in enumerate(examples)]
    scores = task.score_many(bad, examples)
    assert sum(scores) <= 4  # a wrong step reaches the answer (rarely impossible for code)
    assert all(s in (0.0, 1.0) for s in scores)


def test_domains_of_default_mix():
    assert {get_task(n).domain for n in DEFAULT_TASKS} == {"math", "code", "logic"}


def test_arith_values_and_knobs():
    ex = get_task("arith", min_terms=3, max_terms=3, max_operand=5).sample(20, seed=1)
    for e in ex:
        expr = e.prompt.removeprefix("Compute ").removesuffix(".")
        assert int(e.ground_truth) == eval(expr)
        assert len(e.extra_info["terms"]) == 3
    with pytest.raises(ValueError, match="terms"):
        get_task("arith", min_terms=4, max_terms=2)
    with pytest.raises(ValueError, match="ops"):
        get_task("arith", ops="/")


def test_boolean_ground_truth_matches_python():
    for e in get_task("boolean", min_ops=3, max_ops=5).sample(50, seed=2):
        expr = e.prompt.removeprefix("Evaluate ").removesuffix(".")
        py = expr.replace("T", " True ").replace("F", " False ").replace("&", " and ") \
            .replace("|", " or ").replace("!", " not ")
        assert e.ground_truth == ("T" if eval(py) else "F")


def test_code_output_ground_truth_comes_from_execution():
    task = get_task("code_output")
    for e in task.sample(20, seed=5):
        program = e.extra_info["program"]
        assert e.prompt.endswith(program)
        import contextlib
        import io
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(program, {})  # our own generated straight-line arithmetic
        assert e.ground_truth == buf.getvalue().strip()


def test_scoring_is_whitespace_and_case_insensitive():
    task = get_task("boolean")
    e = task.sample(1, seed=0)[0]
    assert task.score(f"<answer> {e.ground_truth.lower()} </answer>", e) == 1.0
    assert task.score("no tags at all", e) == 0.0
