"""External task sources: reasoning-gym adapter, math-verify scoring, verl-format task files."""
from __future__ import annotations

import json
import sys
import threading
import types
from dataclasses import dataclass

import pytest

from poise_probe.tasks.base import Example, is_heldout
from poise_probe.tasks.files import FileTask, test_program, to_jsonable, write_rows
from poise_probe.tasks.mathverify import score_math
from poise_probe.tasks.rg import (ANSWER_INSTRUCTION, ReasoningGymTask, dataset_category,
                                  list_datasets)


# --- reasoning-gym ----------------------------------------------------------------------

RG_CASES = [  # (dataset, reasoning-gym category, expected domain)
    ("basic_arithmetic", "arithmetic", "math"),
    ("simple_equations", "algebra", "math"),
    ("knights_knaves", "logic", "logic"),
    ("bf", "code", "code"),
]


@pytest.fixture(scope="module")
def rg_tasks():
    return {name: ReasoningGymTask(name) for name, _, _ in RG_CASES}


def test_list_datasets_has_the_registry():
    names = list_datasets()
    assert names == sorted(names) and len(names) > 50
    assert {"basic_arithmetic", "knights_knaves", "bf"} <= set(names)


@pytest.mark.parametrize("name,category,domain", RG_CASES)
def test_rg_domain_follows_category(rg_tasks, name, category, domain):
    task = rg_tasks[name]
    assert dataset_category(name) == category
    assert task.domain == domain and task.name == f"rg:{name}"


@pytest.mark.parametrize("name", [c[0] for c in RG_CASES])
def test_rg_sample_is_deterministic_and_splits_are_disjoint(rg_tasks, name):
    task = rg_tasks[name]
    train = task.sample(12, seed=3)
    test = task.sample(4, seed=3, split="test")
    again = ReasoningGymTask(name).sample(12, seed=3)
    assert [e.prompt for e in train] == [e.prompt for e in again]
    assert [e.prompt for e in task.sample(5, seed=3)] == [e.prompt for e in train[:5]]
    assert [e.prompt for e in task.sample(12, seed=4)] != [e.prompt for e in train]
    assert len({e.prompt for e in train}) == 12
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert not any(is_heldout(e.prompt) for e in train)
    assert all(is_heldout(e.prompt) for e in test)
    for e in train + test:
        assert e.prompt.endswith(ANSWER_INSTRUCTION)
        assert e.prompt.startswith(e.extra_info["entry"]["question"])
        assert e.data_source == f"rg:{name}" and e.domain == task.domain
        assert json.loads(json.dumps(e.extra_info)) == e.extra_info  # JSON-serialisable
    assert {e.extra_info["split"] for e in test} == {"test"}


@pytest.mark.parametrize("name", [c[0] for c in RG_CASES])
def test_rg_scores_own_answer_one_and_wrong_answer_less(rg_tasks, name):
    task = rg_tasks[name]
    for e in task.sample(8, seed=0):
        assert e.ground_truth == str(e.extra_info["entry"]["answer"])
        assert task.score(f"<think>hm</think><answer>{e.ground_truth}</answer>", e) == 1.0
        assert task.score("<answer>certainly not this 123</answer>", e) < 1.0
        assert task.score("no answer given", e) == 0.0


def test_rg_score_without_cache_regenerates_or_uses_stored_entry():
    # ARC grids are tuples: the JSON copy (lists) would not compare equal, regeneration does.
    examples = ReasoningGymTask("arc_agi").sample(3, seed=0)
    fresh = ReasoningGymTask("arc_agi")
    assert [fresh.score(f"<answer>{e.ground_truth}</answer>", e) for e in examples] == [1.0] * 3
    ex = ReasoningGymTask("basic_arithmetic").sample(3, seed=0)
    stored_only = [Example(e.prompt, e.ground_truth, e.domain, e.data_source,
                           {"entry": e.extra_info["entry"]}) for e in ex]
    fresh = ReasoningGymTask("basic_arithmetic")
    assert all(fresh.score(f"<answer>{e.ground_truth}</answer>", e) == 1.0 for e in stored_only)
    with pytest.raises(ValueError, match="extra_info\\['entry'\\]"):
        fresh.score("<answer>1</answer>", Example("q", "1", "math", "rg:basic_arithmetic"))


def test_rg_boxed_answer_counts(rg_tasks):
    task = rg_tasks["basic_arithmetic"]
    e = task.sample(1, seed=1)[0]
    assert task.score(f"so \\boxed{{{e.ground_truth}}}", e) == 1.0


def test_rg_verifier_only_dataset_has_empty_ground_truth():
    task = ReasoningGymTask("propositional_logic")
    e = task.sample(1)[0]
    assert e.ground_truth == ""
    assert 0.0 <= task.score("<answer>P</answer>", e) <= 1.0


def test_rg_config_and_domain_override():
    task = ReasoningGymTask("basic_arithmetic", domain="logic", min_terms=2, max_terms=2,
                            operators=("+",), allow_negation=False)
    assert task.domain == "logic"
    for e in task.sample(5):
        question = e.extra_info["entry"]["question"]
        assert e.domain == "logic" and question.count("+") == 1
        assert not any(op in question for op in "*/")


def test_rg_composite_examples_take_their_source_domain():
    specs = [{"name": "basic_arithmetic", "weight": 1, "config": {}},
             {"name": "knights_knaves", "weight": 1, "config": {}}]
    task = ReasoningGymTask("composite", datasets=specs)
    examples = task.sample(16)
    domains = {e.extra_info["entry"]["metadata"]["source_dataset"]: e.domain for e in examples}
    assert domains == {"basic_arithmetic": "math", "knights_knaves": "logic"}
    assert all(task.score(f"<answer>{e.ground_truth}</answer>", e) == 1.0 for e in examples)


@pytest.mark.parametrize("kwargs,match", [
    ({"no_such_knob": 1}, "no_such_knob.*min_terms"),
    ({"seed": 1}, "'seed' is set by sample"),
    ({"size": 10}, "'size' is set by sample"),
    ({"domain": "poetry"}, "domain must be one of"),
])
def test_rg_bad_config_fails_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReasoningGymTask("basic_arithmetic", **kwargs)


def test_rg_unknown_name_lists_close_names():
    with pytest.raises(KeyError) as info:
        ReasoningGymTask("basic_arithmatic")
    msg = str(info.value)
    assert "basic_arithmetic" in msg and "list_datasets()" in msg


def test_get_task_resolves_rg_names():
    from poise_probe.tasks import get_task

    task = get_task("rg:knights_knaves")
    assert isinstance(task, ReasoningGymTask) and task.domain == "logic"
    with pytest.raises(KeyError, match="knights_knaves"):
        get_task("rg:knight_knaves")


# --- math-verify ----------------------------------------------------------------------

@pytest.mark.parametrize("completion,truth", [
    ("<answer>0.5</answer>", "\\frac{1}{2}"),
    ("<answer>\\frac{1}{2}</answer>", "0.5"),
    ("The result is \\boxed{1+2x}.", "2x+1"),
    ("<answer>$(x+1)^2$</answer>", "x^2+2x+1"),
    ("First $x=2$, so the answer is $\\frac{\\sqrt{3}}{2}$", "\\frac{\\sqrt3}{2}"),
    ("<answer>\\boxed{1,000}</answer>", "1000"),
    ("<answer>x = 3</answer>", "3"),
    ("<answer>\\{2, 1\\}</answer>", "\\{1,2\\}"),
    ("<answer>7</answer>", "$7$"),
    ("<answer>7</answer>", "\\boxed{7}"),
    ("<answer>Yes</answer>", "yes"),
    ("0.25", "1/4"),
])
def test_score_math_accepts_equivalent_forms(completion, truth):
    assert score_math(completion, truth) == 1.0


@pytest.mark.parametrize("completion,truth", [
    ("<answer>0.51</answer>", "\\frac{1}{2}"),
    ("\\boxed{2x-1}", "2x+1"),
    ("The answer is 3 apples", "3"),  # prose without tags or math is not an answer
    ("<answer>4</answer>", "3"),
])
def test_score_math_rejects_different_values(completion, truth):
    assert score_math(completion, truth) == 0.0


@pytest.mark.parametrize("completion", [
    "", "   ", "<answer></answer>", "\\boxed{", "<answer>}}}{{\\frac</answer>", "\x00\x01",
    "<answer>" + "(" * 60 + "</answer>", "<answer>" + "9" * 5000 + "</answer>", "$$$$",
    "\\boxed{\\frac{1}{0}}", "<answer>\\sqrt{-1}^{\\infty}</answer>",
])
def test_score_math_never_raises_on_garbage(completion):
    assert score_math(completion, "3") == 0.0
    assert score_math("<answer>3</answer>", completion) in (0.0, 1.0)


def test_score_math_works_off_the_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(score_math("<answer>0.5</answer>", "1/2")))
    t.start()
    t.join()
    assert out == [1.0]


# --- verl-format files ------------------------------------------------------------------

def _row(prompt="What is 1+1?", truth="2", ability="math", **extra):
    row = {"data_source": "toy", "prompt": prompt, "ability": ability,
           "reward_model": {"style": "rule", "ground_truth": truth}}
    if extra:
        row["extra_info"] = extra
    return row


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _examples():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    return [
        Example("What is 1/2 as a decimal?", "0.5", "math", "toy_math", {"index": 0}),
        Example(chat, "4", "math", "toy_math", {"index": 1}),
        Example("Is P or not P true?", "True", "logic", "toy_logic", {"index": 2}),
        Example("Write f(x) returning x+1.", "assert f(1) == 2", "code", "toy_code",
                {"index": 3}),
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_write_rows_round_trips(tmp_path, suffix):
    examples = _examples()
    path = write_rows(tmp_path / f"rows{suffix}", examples)
    task = FileTask(path)
    assert task.name == f"file:rows{suffix}" and len(task) == 4
    assert [e.extra_info for e in task.examples] == [e.extra_info for e in examples]
    assert [e.domain for e in task.examples] == ["math", "math", "logic", "code"]
    if suffix == ".parquet":  # one column type: string prompts become one-turn chats
        assert [e.messages for e in task.examples] == [e.messages for e in examples]
    else:
        assert task.examples == examples


def test_write_rows_parquet_keeps_string_prompts_and_irregular_extra_info(tmp_path):
    examples = [Example("a?", "1", "logic", "s", {"meta": {"xs": [1, "two"]}}),
                Example("b?", "2", "logic", "s", {"other": None, "meta": {}})]
    task = FileTask(write_rows(tmp_path / "odd.parquet", examples))
    assert task.examples == examples
    assert [e.extra_info for e in task.examples] == [e.extra_info for e in examples]


def test_rg_examples_round_trip_through_files(tmp_path):
    rg = ReasoningGymTask("knights_knaves")
    examples = rg.sample(6) + rg.sample(2, split="test")
    for suffix in (".jsonl", ".parquet"):
        task = FileTask(write_rows(tmp_path / f"kk{suffix}", examples))
        assert task.examples == examples
        assert {e.prompt for e in task.sample(2, split="test")} == {e.prompt for e in examples[6:]}
        fresh = ReasoningGymTask("knights_knaves")
        assert all(fresh.score(f"<answer>{e.ground_truth}</answer>", e) == 1.0
                   for e in task.examples)


def test_file_prompts_may_be_strings_or_chat_lists(tmp_path):
    chat = [{"role": "user", "content": "1+1?"}]
    task = FileTask(_write_jsonl(tmp_path / "p.jsonl", [_row("1+1?"), _row(chat), _row(truth=2)]))
    assert task.examples[0].prompt == "1+1?"
    assert task.examples[1].prompt == chat and task.examples[1].messages == chat
    assert task.examples[2].ground_truth == "2"


@pytest.mark.parametrize("ability,domain", [
    ("math", "math"), ("MATH", "math"), ("code", "code"), ("coding", "code"),
    ("programming", "code"), ("logic", "logic"), ("reasoning", "logic"), ("chemistry", "logic"),
    (None, "logic"),
])
def test_file_domain_from_ability(tmp_path, ability, domain):
    task = FileTask(_write_jsonl(tmp_path / "d.jsonl", [_row(ability=ability)]))
    assert task.examples[0].domain == domain and task.domain == domain


def test_file_domain_override_order(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [_row(ability="math", domain="logic"),
                                               _row("x", ability="math")])
    assert [e.domain for e in FileTask(path).examples] == ["logic", "math"]
    assert [e.domain for e in FileTask(path, domain="code").examples] == ["code", "code"]
    with pytest.raises(ValueError, match="domain must be one of"):
        FileTask(path, domain="poetry")


def test_file_sample_is_deterministic_and_respects_splits(tmp_path):
    rows = [_row(f"q{i}", str(i)) for i in range(60)]
    rows += [_row(f"t{i}", "0", split="test") for i in range(3)]
    rows += [_row("v", "0", split="validation"), _row(f"q{0}x", "0", split="train")]
    task = FileTask(_write_jsonl(tmp_path / "s.jsonl", rows))
    test = task.sample(len([s for s in task.splits if s == "test"]), seed=0, split="test")
    assert {"t0", "t1", "t2", "v"} <= {e.prompt for e in test}
    hashed = {f"q{i}" for i in range(60) if is_heldout(f"q{i}")}
    assert {e.prompt for e in test} == {"t0", "t1", "t2", "v"} | hashed
    train = task.sample(20, seed=5)
    assert [e.prompt for e in train] == [e.prompt for e in task.sample(20, seed=5)]
    assert [e.prompt for e in train] != [e.prompt for e in task.sample(20, seed=6)]
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    n_train = task.splits.count("train")
    with pytest.raises(ValueError, match=f"n={n_train + 1} train.*only {n_train} train rows"):
        task.sample(n_train + 1)


def test_file_scoring_by_domain(tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [_row("half?", "\\frac{1}{2}"),
                                               _row("P?", "True", ability="logic")])
    task = FileTask(path)
    math_ex, logic_ex = task.examples
    assert task.score("<answer>0.5</answer>", math_ex) == 1.0
    assert task.score("<answer>0.6</answer>", math_ex) == 0.0
    assert task.score("<answer> true </answer>", logic_ex) == 1.0
    assert task.score("<answer>1</answer>", logic_ex) == 0.0  # logic is exact match


@dataclass
class _FakeResult:
    passed: bool


def test_file_code_rows_run_their_tests_in_the_sandbox(tmp_path, monkeypatch):
    """Dispatch to poise_probe.sandbox (faked here: it runs the program with exec)."""
    def run_python(code, *, stdin=None, limits=None):
        try:
            exec(compile(code, "<sandbox>", "exec"), {})
        except Exception:
            return _FakeResult(False)
        return _FakeResult(True)

    import poise_probe.sandbox as real

    fake = types.ModuleType("poise_probe.sandbox")
    fake.run_python = run_python
    fake.run_many = lambda codes, **kw: [run_python(c) for c in codes]
    fake.with_end_marker = real.with_end_marker
    fake.ran_to_the_end = lambda result, marker: result.passed   # exec prints to our stdout
    monkeypatch.setitem(sys.modules, "poise_probe.sandbox", fake)
    rows = [_row("inc", "assert inc(1) == 2", ability="code"),
            _row("dbl", "def check(candidate):\n    assert candidate(2) == 4\n",
                 ability="code", entry_point="dbl"),
            _row("out", "hello", ability="code")]
    task = FileTask(_write_jsonl(tmp_path / "c.jsonl", rows))
    good = ["```python\ndef inc(x):\n    return x + 1\n```",
            "<answer>```python\ndef dbl(x):\n    return 2 * x\n```</answer>",
            "<answer>hello</answer>"]
    bad = ["```python\ndef inc(x):\n    return x\n```", "def dbl(x):\n    return x", "hi"]
    assert [task.score(c, e) for c, e in zip(good, task.examples)] == [1.0, 1.0, 1.0]
    assert task.score_many(good, task.examples) == [1.0, 1.0, 1.0]
    assert task.score_many(bad, task.examples) == [0.0, 0.0, 0.0]
    assert test_program(bad[1], task.examples[1]).rstrip().endswith("check(dbl)")


def test_file_code_rows_with_the_real_sandbox(tmp_path):
    task = FileTask(_write_jsonl(tmp_path / "c.jsonl",
                                 [_row("inc", "assert inc(1) == 2", ability="code")]))
    ex = task.examples[0]
    assert task.score("```python\ndef inc(x):\n    return x + 1\n```", ex) == 1.0
    assert task.score("```python\ndef inc(x):\n    return x\n```", ex) == 0.0
    completions = ["def inc(x):\n    return x + 1", "syntax error("]
    assert task.score_many(completions, [ex, ex]) == [1.0, 0.0]


def test_humaneval_rows_exported_to_a_file_score_like_humaneval(tmp_path):
    from poise_probe.tasks.humaneval import HumanEvalTask, load_problems

    he = HumanEvalTask()
    examples = he.sample(2, seed=0)
    task = FileTask(write_rows(tmp_path / "he.parquet", examples))
    assert task.examples == examples and task.domain == "code"
    solutions = {p["task_id"]: p["canonical_solution"] for p in load_problems()}
    body_only = [solutions[e.extra_info["task_id"]] for e in examples]  # continues the stub
    assert task.score_many(body_only, task.examples) == he.score_many(body_only, examples)
    assert task.score_many(body_only, task.examples) == [1.0, 1.0]
    assert task.score_many(["    return None\n"] * 2, task.examples) == [0.0, 0.0]


BAD_ROWS = [  # (line 2 of the file, field the message must name)
    ('{"data_source": "toy", "prompt": ', "invalid JSON"),
    ("[1, 2]", "row is a list"),
    (_row() | {"data_source": None}, "'data_source'"),
    ({k: v for k, v in _row().items() if k != "data_source"}, "'data_source' is missing"),
    ({k: v for k, v in _row().items() if k != "prompt"}, "'prompt' is missing"),
    (_row(prompt=123), "'prompt'"),
    (_row(prompt=[]), "'prompt'"),
    (_row(prompt=[{"role": "user"}]), "'prompt[0]'"),
    (_row(prompt=[{"content": "hi"}]), "'prompt[0]'"),
    (_row(prompt=["hi"]), "'prompt[0]'"),
    ({k: v for k, v in _row().items() if k != "reward_model"}, "'reward_model' is missing"),
    (_row() | {"reward_model": "2"}, "'reward_model' is a str"),
    (_row() | {"reward_model": {"style": "rule"}}, "'reward_model.ground_truth' is missing"),
    (_row(truth=["2", "two"]), "'reward_model.ground_truth'"),
    (_row(truth=True), "'reward_model.ground_truth'"),
    (_row(truth={"a": 1}), "'reward_model.ground_truth'"),
    (_row() | {"extra_info": [1]}, "'extra_info'"),
    (_row(domain="poetry"), "'extra_info.domain'"),
    (_row(split="holdout"), "'extra_info.split'"),
    (_row(truth="def check(candidate):\n    assert candidate(1)", ability="code"),
     "'extra_info.entry_point'"),
]


@pytest.mark.parametrize("bad,field", BAD_ROWS, ids=[f for _, f in BAD_ROWS])
def test_malformed_jsonl_row_names_file_line_and_field(tmp_path, bad, field):
    path = _write_jsonl(tmp_path / "data.jsonl", [_row(), bad, _row("later")])
    with pytest.raises(ValueError) as info:
        FileTask(path)
    msg = str(info.value)
    assert f"{path} line 2" in msg and field in msg


def test_malformed_row_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(_row()) + "\n\n  \n" + json.dumps(_row(truth=None)) + "\n")
    with pytest.raises(ValueError, match="data.jsonl line 4: field 'reward_model.ground_truth'"):
        FileTask(path)


def test_malformed_parquet_row_names_row_index(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    rows = [_row("a"), _row("b"), _row("c")]
    rows[2]["reward_model"] = {"style": "rule", "ground_truth": None}
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ValueError, match="data.parquet row 2: field 'reward_model.ground_truth'"):
        FileTask(path)


def test_malformed_json_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"rows": [_row()]}))
    with pytest.raises(ValueError, match="data.json: top level is a dict"):
        FileTask(path)
    path.write_text(json.dumps([_row(), _row(prompt=None)]))
    with pytest.raises(ValueError, match="data.json row 1: field 'prompt' is missing"):
        FileTask(path)
    path.write_text("[{")
    with pytest.raises(ValueError, match="data.json: invalid JSON"):
        FileTask(path)


def test_empty_missing_and_unsupported_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.jsonl' has no rows"):
        FileTask(empty)
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        FileTask(missing)
    csv = tmp_path / "rows.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported extension '.csv'"):
        FileTask(csv)
    with pytest.raises(ValueError, match="unsupported extension '.csv'"):
        write_rows(csv, _examples())


def test_to_jsonable_converts_sensibly():
    import numpy as np
    from fractions import Fraction

    value = {1: (1, 2), "s": {3, 1}, "f": Fraction(1, 2), "a": np.arange(2), "n": np.int64(5)}
    assert to_jsonable(value) == {"1": [1, 2], "s": [1, 3], "f": "1/2", "a": [0, 1], "n": 5}


def test_get_task_resolves_file_paths(tmp_path):
    from poise_probe.tasks import get_task

    path = write_rows(tmp_path / "rows.jsonl", _examples())
    assert isinstance(get_task(str(path)), FileTask)
    assert get_task(f"file:{path}", domain="logic").domain == "logic"
