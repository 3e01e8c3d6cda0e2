"""Bad inputs get a clear error and lose nothing (reliability suite, inputs).

One test per kind of bad input: each asserts the part of the message that names the field, the
value and the fix, and, where something was already on disk (a task file, a run folder, a model
directory) or in memory (the probe bank), that nothing of it changed. Cases:

1. verl-format task files: invalid JSON mid-file, a cut-off last line, bytes that are not UTF-8,
   a truncated / corrupt / empty Parquet file, rows missing a required field, fields of the wrong
   type, an empty prompt, an empty file;
2. unknown task names and unknown knobs of built-in tasks;
3. NaN, inf and beyond-float32 rewards from a custom verifier (`score_rollouts`);
4. NaN and beyond-float32 features given to `ProbeBank.update`;
5. degenerate probe fits (one row, constant targets, constant features): a well-defined fit
   that predicts the mean target, finite and without warnings (see `RidgeProbe.fit`);
6. model directories: not a causal LM, truncated weights, a tokenizer without think tags (a
   documented fallback with a warning; a tag read as the unknown token is not a tag);
7. a run directory from a newer format version: `RunReader` and `RunWriter(resume=True)`.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import warnings

import numpy as np
import pytest
from rel_helpers import tree_hash

from poise_probe.tasks import TASKS, get_task, register_task
from poise_probe.tasks.base import Example
from poise_probe.tasks.builtin import ArithTask
from poise_probe.tasks.files import write_rows


# --------------------------------------------------------------------------------------------
# 1. Task data files
# --------------------------------------------------------------------------------------------

def _row(i: int = 0, **fields) -> dict:
    row = {"data_source": "toy", "prompt": f"Compute {i}+1.", "ability": "math",
           "reward_model": {"style": "rule", "ground_truth": str(i + 1)}, "extra_info": {}}
    row.update(fields)
    return row


def _line(row) -> str:
    return (row if isinstance(row, str) else json.dumps(row)) + "\n"


def _without(key: str) -> dict:
    return {k: v for k, v in _row(2).items() if k != key}


# (name, JSONL text, the exact message part: file + line + field/value/fix)
JSONL_CASES = [
    ("broken_line_mid_file",
     _line(_row(0)) + _line(_row(1)) + '{"data_source": "toy", "prompt" "x"}\n' + _line(_row(3)),
     r"data\.jsonl line 3: invalid JSON \(Expecting ':' delimiter at column \d+\); each line "
     r"must be one JSON object\.$"),
    ("truncated_last_line",
     _line(_row(0)) + _line(_row(1)) + _line(_row(2))[:25],
     r"data\.jsonl line 3: invalid JSON .*The last line has no newline at its end, so the file "
     r"looks cut off .*restore the whole file or delete that partial line\."),
    ("not_utf8",
     _line(_row(0)) + "\udcff" + _line(_row(1)),
     r"data\.jsonl line 2: not UTF-8 text \(byte 0xff at character 1\); save the task file as "
     r"UTF-8\."),
    ("missing_prompt",
     _line(_row(0)) + _line(_without("prompt")),
     r"data\.jsonl line 2: field 'prompt' is missing; each row needs a prompt"),
    ("missing_reward_model",
     _line(_row(0)) + _line(_without("reward_model")),
     r"data\.jsonl line 2: field 'reward_model' is missing; each row needs reward_model: "
     r"\{style: 'rule', ground_truth: \.\.\.\}"),
    ("missing_ground_truth",
     _line(_row(0)) + _line(_row(2, reward_model={"style": "rule"})),
     r"data\.jsonl line 2: field 'reward_model\.ground_truth' is missing"),
    ("prompt_is_a_number",
     _line(_row(0)) + _line(_row(2, prompt=5)),
     r"data\.jsonl line 2: field 'prompt' is a int \(5\); prompt must be a string or a chat "
     r"list"),
    ("reward_model_not_a_dict",
     _line(_row(0)) + _line(_row(2, reward_model="4")),
     r"data\.jsonl line 2: field 'reward_model' is a str; each row needs reward_model: "),
    ("ground_truth_a_list",
     _line(_row(0)) + _line(_row(2, reward_model={"ground_truth": ["4"]})),
     r"data\.jsonl line 2: field 'reward_model\.ground_truth' is \['4'\]; it must be a string "
     r"or a finite number\."),
    ("empty_prompt",
     _line(_row(0)) + _line(_row(2, prompt="")),
     r"data\.jsonl line 2: field 'prompt' is '', a blank string; each row needs the question "
     r"for the model to answer\."),
    ("blank_prompt",
     _line(_row(0)) + _line(_row(2, prompt="  \n ")),
     r"data\.jsonl line 2: field 'prompt' is '  \\n ', a blank string"),
    ("chat_prompt_without_text",
     _line(_row(0)) + _line(_row(2, prompt=[{"role": "user", "content": ""}])),
     r"data\.jsonl line 2: field 'prompt' is \[\{'role': 'user', 'content': ''\}\]: every "
     r"message's content is empty"),
    ("empty_file", "",
     r"task file '.*data\.jsonl' has no rows; add verl-format rows \(data_source, prompt, "
     r"reward_model\.ground_truth\)\."),
]


@pytest.mark.parametrize("text,match", [c[1:] for c in JSONL_CASES],
                         ids=[c[0] for c in JSONL_CASES])
def test_bad_jsonl_task_file_names_file_line_and_field_and_is_unchanged(tmp_path, text, match):
    path = tmp_path / "data.jsonl"
    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))
    before = tree_hash(tmp_path)
    with pytest.raises(ValueError, match=match) as info:
        get_task(str(path))
    assert str(path) in str(info.value)  # the full path, so the user can find the file
    assert tree_hash(tmp_path) == before  # nothing written, renamed or removed


def _examples(n: int = 12) -> list[Example]:
    return [Example(prompt=f"Compute {i}+1.", ground_truth=str(i + 1), domain="math",
                    data_source="toy") for i in range(n)]


@pytest.mark.parametrize("damage", ["truncated", "corrupt_footer", "zero_bytes"])
def test_damaged_parquet_task_file_names_file_and_fix_and_is_unchanged(tmp_path, damage):
    path = write_rows(tmp_path / "data.parquet", _examples())
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2],
                      "corrupt_footer": data[:-12] + b"\x00" * 8 + data[-4:],
                      "zero_bytes": b""}[damage])
    before = tree_hash(tmp_path)
    with pytest.raises(ValueError, match=r"(?s)data\.parquet: not a readable Parquet file "
                                         r"\(.*\); it is truncated, corrupt or not Parquet: "
                                         r"write it again \(write_rows, or pandas "
                                         r"DataFrame\.to_parquet\) or copy it anew\.$"):
        get_task(str(path))
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("column,values,match", [
    # a Parquet column has one type: a number-typed prompt column fails at its first row
    ("prompt", [7, 8, 9], r"data\.parquet row 0: field 'prompt' is a int \(7\); prompt must be "
                          r"a string or a chat list"),
    ("prompt", ["Compute 1+1.", "", "Compute 3+1."],
     r"data\.parquet row 1: field 'prompt' is '', a blank string; each row needs the question"),
    ("reward_model", [{"ground_truth": "2"}, None, {"ground_truth": "4"}],
     r"data\.parquet row 1: field 'reward_model' is missing; each row needs reward_model: "),
    ("reward_model", ["2", "3", "4"],
     r"data\.parquet row 0: field 'reward_model' is a str; each row needs reward_model: "),
], ids=["prompt_is_a_number", "empty_prompt", "missing_reward_model", "reward_model_a_str"])
def test_bad_parquet_rows_name_file_row_and_field(tmp_path, column, values, match):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    rows = [{**_without("extra_info"), column: v} for v in values]  # ({} cannot be a struct)
    pq.write_table(pa.Table.from_pylist(rows), path)
    before = tree_hash(tmp_path)
    with pytest.raises(ValueError, match=match):
        get_task(str(path))
    assert tree_hash(tmp_path) == before


def test_empty_parquet_file_has_no_rows(tmp_path):
    path = write_rows(tmp_path / "empty.parquet", [])
    before = tree_hash(tmp_path)
    with pytest.raises(ValueError, match=r"task file '.*empty\.parquet' has no rows; add "
                                         r"verl-format rows"):
        get_task(str(path))
    assert tree_hash(tmp_path) == before


# --------------------------------------------------------------------------------------------
# 2. Unknown task names and knobs
# --------------------------------------------------------------------------------------------

def test_unknown_task_name_lists_the_known_ones():
    with pytest.raises(KeyError, match=r"unknown task 'nope'; known: \[.*'arith'.*\], "
                                       r"'rg:<reasoning-gym dataset>', or a \.jsonl/\.parquet "
                                       r"path"):
        get_task("nope")


def test_unknown_knob_of_a_builtin_task_names_it_and_the_accepted_ones():
    with pytest.raises(ValueError, match=r"data\.task_kwargs\.arith: unknown knob\(s\) \['nope'\]; "
                                         r"task 'arith' takes \['min_terms', 'max_terms', "
                                         r"'max_operand', 'ops'\]\. Fix the key"):
        get_task("arith", nope=1)


# --------------------------------------------------------------------------------------------
# 3. NaN / inf rewards from a custom verifier
# --------------------------------------------------------------------------------------------

class _BadRewardTask(ArithTask):
    """Scores the second completion of each prompt with `bad`, the others with 0."""

    bad = float("nan")

    def score(self, completion, example):
        return self.bad if completion == "second" else 0.0


class _NanRewardTask(_BadRewardTask):
    name = "rel_inputs_nan_reward"


class _InfRewardTask(_BadRewardTask):
    name = "rel_inputs_inf_reward"
    bad = float("inf")


class _HugeRewardTask(_BadRewardTask):
    name = "rel_inputs_huge_reward"
    bad = 1e39  # finite as a Python float, inf as the float32 the rewards are stored in


for _cls in (_NanRewardTask, _InfRewardTask, _HugeRewardTask):
    if _cls.name not in TASKS:
        register_task(_cls.name)(_cls)


@pytest.mark.parametrize("name,shown", [("rel_inputs_nan_reward", "nan"),
                                        ("rel_inputs_inf_reward", "inf"),
                                        ("rel_inputs_huge_reward", "1e+39")])
def test_non_finite_reward_names_task_value_and_fix(name, shown):
    from poise_probe.data import Prompt
    from poise_probe.rollout.collect import score_rollouts

    task = get_task(name)
    examples = task.sample(2, seed=0)
    prompts = [Prompt(example=ex, task=task) for ex in examples]
    with pytest.raises(ValueError, match=(
            rf"task '{name}' returned NaN or inf rewards \(reward {re.escape(shown)} for prompt "
            rf"{examples[0].prompt_id}, completion 1\); a verifier must return numbers in "
            rf"\[0, 1\]\. Fix the task's score function\.")):
        score_rollouts(prompts, [["first", "second"], ["first", "second"]])


# --------------------------------------------------------------------------------------------
# 4. NaN and beyond-float32 features in the probe bank
# --------------------------------------------------------------------------------------------

def _bank_state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k], equal_nan=True) for k in a)


@pytest.mark.parametrize("bad,match", [
    (np.nan, r"features contains NaN or inf \(first bad row: 2\); the probe needs finite "
             r"features and rewards\. Check the feature capture"),
    (1e39, r"features row 2 holds 1e\+39, beyond float32 \(max 3\.4e\+38\), the dtype the "
           r"probe buffer stores; the features are broken \(check the capture\), or build the "
           r"bank with dtype=np\.float64\."),
], ids=["nan", "beyond_float32"])
def test_bad_feature_row_is_named_and_the_bank_is_unchanged(bad, match):
    from poise_probe.probe import ProbeBank

    rng = np.random.default_rng(0)
    bank = ProbeBank({"math": 32, "other": 32}, min_steps_to_fit=1)
    X = rng.normal(size=(4, 6))  # float64, as the capture hands it over
    bank.update(X, [0.0, 1.0, 1.0, 0.0], [0, 0, 1, 1], ["math", "math", "code", "code"], step=0)
    before = bank.state_dict()
    probes_before = dict(bank.probes)
    X2 = rng.normal(size=(4, 6))
    X2[2, 3] = bad  # row 2 goes to the "other" bucket; rows 0-1 ("math") are fine
    with pytest.raises(ValueError, match=match):
        bank.update(X2, [1.0, 0.0, 0.0, 1.0], [5, 5, 6, 6], ["math", "math", "code", "code"],
                    step=1)
    assert _bank_state_equal(bank.state_dict(), before)  # no bucket got rows, none was refit
    assert bank.probes == probes_before  # the same probe objects: no refit either


def test_beyond_float32_feature_row_is_numbered_in_the_callers_batch():
    from poise_probe.probe import ProbeBank

    bank = ProbeBank({"math": 32, "other": 32}, min_steps_to_fit=1)
    X = np.random.default_rng(0).normal(size=(4, 6))
    X[2, 3] = 1e39
    with pytest.raises(ValueError, match=r"features row 2 holds 1e\+39"):
        bank.update(X, [1.0, 0.0, 0.0, 1.0], [5, 5, 6, 6], ["math", "math", "code", "code"],
                    step=0)


# --------------------------------------------------------------------------------------------
# 5. Degenerate probe fits
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pca", [None, 2], ids=["no_pca", "pca"])
@pytest.mark.parametrize("case", ["one_row", "constant_targets", "constant_features"])
def test_degenerate_probe_fit_predicts_the_mean_target(case, pca):
    from poise_probe.probe import RidgeProbe

    rng = np.random.default_rng(1)
    X = rng.normal(size=(6, 5))
    fit_X, fit_y = {"one_row": (X[:1], np.array([0.75])),
                    "constant_targets": (X, np.full(6, 0.25)),
                    "constant_features": (np.ones((6, 5)), np.array([0, 1, 0, 1, 1, 0.5]))}[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from a 0/0 in the PCA
        probe = RidgeProbe(pca_components=pca).fit(fit_X, fit_y)
        preds = probe.predict(X)
    np.testing.assert_allclose(preds, np.full(6, fit_y.mean()), atol=1e-12)
    arrays = probe.to_arrays()  # the snapshot a run saves holds no NaN
    assert all(np.isfinite(v).all() for k, v in arrays.items() if k != "hyper.clip")
    again = RidgeProbe.from_arrays(arrays).predict(X)
    np.testing.assert_array_equal(again, preds)


def test_probe_fit_on_zero_rows_is_refused():
    from poise_probe.probe import RidgeProbe

    with pytest.raises(ValueError, match=r"Found array with 0 sample\(s\) \(shape=\(0, 5\)\) "
                                         r"while a minimum of 1 is required by RidgeProbe"):
        RidgeProbe().fit(np.zeros((0, 5)), np.zeros(0))


# --------------------------------------------------------------------------------------------
# 6. Model directories and tokenizers
# --------------------------------------------------------------------------------------------

def test_model_dir_that_is_not_a_causal_lm_is_refused(tmp_path):
    import torch
    from transformers import BertConfig, BertModel

    from poise_probe.models import build_char_tokenizer, load_policy

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    path = tmp_path / "bert"
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    before = tree_hash(path)
    with pytest.raises(ValueError, match=r"holds a 'bert' model \(BertModel\), which is not a "
                                         r"causal LM; POISE needs a decoder that generates text "
                                         r"\(AutoModelForCausalLM\)"):
        load_policy(path)
    assert tree_hash(path) == before


def test_model_dir_with_truncated_weights_is_refused(tmp_path, tiny_model_dir):
    from poise_probe.models import load_policy

    path = tmp_path / "model"
    shutil.copytree(tiny_model_dir, path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    before = tree_hash(path)
    with pytest.raises(ValueError, match=r"the weights could not be loaded \(SafetensorError: "
                                         r".*\); a weights file is truncated or corrupted: save "
                                         r"the model again"):
        load_policy(path)
    assert tree_hash(path) == before


def _word_tokenizer(vocab: list[str], split_chars: bool):
    """A tokenizer without think tags: characters (the tags become several tokens) or whole
    words (the tags become the unknown token)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = (pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
                          if split_chars else pre_tokenizers.WhitespaceSplit())
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")


@pytest.mark.parametrize("split_chars", [True, False], ids=["tags_split", "tags_unknown"])
def test_tokenizer_without_think_tags_falls_back_with_a_warning(caplog, split_chars):
    from poise_probe.features import TagIds, response_spans

    chars = [chr(i) for i in range(32, 127)]
    tok = _word_tokenizer(["<pad>", "<unk>", *chars], split_chars)
    with caplog.at_level(logging.WARNING, logger="poise_probe.features"):
        tags = TagIds.from_tokenizer(tok)
    # the unknown token (id 1) must not be taken for a tag: it is in every unknown word
    assert tags == TagIds(None, None, None, None)
    assert ("has no single token for <think> and </think>: POISE features fall back to the "
            "last n response tokens" in caplog.text)
    assert "Add the tags as tokens (tokenizer.add_tokens)" in caplog.text
    # the documented fallback: window = last n tokens, reasoning = all, answer = empty
    spans = response_spans([1, 40, 41, 42, 43, 1], tags, window=4)
    assert (spans.reasoning_vec, spans.reasoning, spans.answer) == ((2, 6), (0, 6), (0, 0))


def test_tokenizer_with_think_tags_finds_them_without_a_warning(caplog):
    from poise_probe.features import TagIds
    from poise_probe.models import build_char_tokenizer

    tok = build_char_tokenizer()
    with caplog.at_level(logging.WARNING, logger="poise_probe.features"):
        tags = TagIds.from_tokenizer(tok)
    assert tags == TagIds(*tok.convert_tokens_to_ids(["<think>", "</think>", "<answer>",
                                                      "</answer>"]))
    assert None not in (tags.think_open, tags.think_close) and "no single token" not in caplog.text


# --------------------------------------------------------------------------------------------
# 7. A run directory from a newer format version
# --------------------------------------------------------------------------------------------

def test_run_from_a_newer_format_is_refused_and_left_unchanged(tmp_path):
    from poise_probe.rundir import SCHEMA_VERSION, RunReader, RunWriter

    meta = {"model": "tiny-reasoner", "device": "cpu", "algorithm": "poise", "git_commit": None}
    config = {"algorithm": {"adv_estimator": "poise"}}
    run = tmp_path / "run"
    with RunWriter(run, config=config, meta=meta) as writer:
        writer.log_metrics(0, {"reward/mean": 0.5})
    meta_path = run / "meta.json"
    stored = json.loads(meta_path.read_text())
    assert stored["schema_version"] == SCHEMA_VERSION < 99
    meta_path.write_text(json.dumps({**stored, "schema_version": 99}))
    before = tree_hash(run)

    with pytest.raises(ValueError, match=rf"meta\.json: run written with schema_version 99, "
                                         rf"newer than this poise_probe .* reads \(<= "
                                         rf"{SCHEMA_VERSION}\); upgrade poise_probe to read it"):
        RunReader(run)
    with pytest.raises(ValueError, match=r"schema_version 99, newer than this poise_probe .*"
                                         r"upgrade poise_probe"):
        RunWriter(run, config=config, meta=meta, resume=True)
    assert tree_hash(run) == before
    with pytest.raises(FileExistsError, match=r"already holds a run \(it has meta\.json\); pass "
                                              r"--resume"):
        RunWriter(run, config=config, meta=meta)
    assert tree_hash(run) == before
