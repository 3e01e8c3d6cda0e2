"""Runs made elsewhere (`poise_probe.rundir.external`): TRL GRPOTrainer output folders and verl
rollout dumps read through RunReader's interface; discovery, derived columns and metrics, live
growth, read-only access and every malformed input; plus a real 2-step TRL run."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pandas as pd
import pytest
from external_fixtures import (tree_state, trl_table, verl_rows, write_trl_run, write_verl_dump,
                               write_verl_step)

from poise_probe.rundir import (RunReader, RunWriter, TrlRun, VerlDumpRun, find_all_runs,
                                find_runs, open_run, run_source)
from poise_probe.rundir.external import TRL_METRIC_NAMES, table_metrics

# --------------------------------------------------------------------------------------------
# TRL


def test_trl_run_reads_like_a_run_directory(tmp_path):
    run = write_trl_run(tmp_path / "trl_out", steps=3)
    r = open_run(run)
    assert isinstance(r, TrlRun) and run_source(run) == "trl"
    meta = r.meta
    assert (meta["source"], meta["algorithm"], meta["model"]) == ("trl", "grpo", "Qwen/Qwen3-0.6B")
    assert meta["reward_functions"] == ["correct", "format"] and meta["run_name"] == "trl_out"
    assert r.inferred_status() == "finished" and r.status["last_step"] == 3
    assert r.config["trainer_state"]["max_steps"] == 3
    assert r.config["model_config"]["model_type"] == "qwen3"
    assert r.rollout_steps() == [1, 2, 3]
    assert [s for s, _ in r.checkpoints()] == [1, 2, 3]
    assert r.probe_snapshot_steps() == [] and r.eval_steps() == []


def test_trl_metrics_get_project_names_and_keep_the_originals(tmp_path):
    r = open_run(write_trl_run(tmp_path / "trl_out", steps=3))
    frame = r.metrics_frame()
    assert frame["step"].tolist() == [1, 2, 3, 3]       # the final train summary is a 4th line
    train = frame[frame["reward"].notna()]
    for original, ours in TRL_METRIC_NAMES.items():
        if original in train:
            np.testing.assert_array_equal(train[ours], train[original])
    assert train["reward/mean"].tolist() == train["reward"].tolist()
    assert train["actor/grad_norm"].tolist() == pytest.approx([1.0, 0.5, 1 / 3])
    assert "train_runtime" in frame and "rewards/correct/mean" in frame


def test_trl_rollouts_get_the_contract_columns(tmp_path):
    r = open_run(write_trl_run(tmp_path / "trl_out", steps=2))
    df = r.rollouts(2)
    table = trl_table(2)
    assert list(df.columns[:9]) == ["step", "prompt_id", "group_id", "rollout_idx", "prompt",
                                    "completion", "reward", "advantage", "reward/correct"]
    assert (df["step"] == 2).all() and df["step"].dtype == "int64"
    assert df["prompt"].tolist() == table["prompt"]
    assert df["group_id"].tolist() == [0, 0, 1, 1, 2, 2]           # identical prompts
    assert df["rollout_idx"].tolist() == [0, 1, 0, 1, 0, 1]
    # reward = the sum of the reward functions (TRL's weights default to 1)
    np.testing.assert_allclose(df["reward"], np.add(table["correct"], table["format"]))
    np.testing.assert_allclose(df["reward/format"], 0.5)
    np.testing.assert_allclose(df["advantage"], table["advantage"])
    # the same prompt keeps its id across steps
    assert r.rollouts(1)["prompt_id"].tolist() == df["prompt_id"].tolist()
    assert r.rollouts().equals(df)                                    # latest by default
    assert r.rollouts(2, columns=["reward", "group_id"]).columns.tolist() == ["reward",
                                                                             "group_id"]
    with pytest.raises(KeyError, match="probe_pred"):
        r.rollouts(2, columns=["probe_pred"])
    with pytest.raises(FileNotFoundError, match="available steps: 1, 2"):
        r.rollouts(7)
    both = r.all_rollouts(columns=["step", "reward"])
    assert both["step"].tolist() == [1] * 6 + [2] * 6


def test_trl_groups_are_runs_of_one_prompt(tmp_path):
    """TRL logs a group's rollouts side by side and never the group: the same prompt drawn twice
    into one batch is two groups when its runs are apart (verl, which scatters a group, is
    grouped by text: test_verl_dump_becomes_a_run)."""
    out = write_trl_run(tmp_path / "trl_out", steps=1)
    table = trl_table(1)
    table["prompt"] = ["a", "a", "b", "b", "a", "a"]
    pd.DataFrame(table).to_parquet(out / "completions" / "completions_00001.parquet")
    df = open_run(out).rollouts(1)
    assert df["group_id"].tolist() == [0, 0, 1, 1, 2, 2]
    assert df["rollout_idx"].tolist() == [0, 1, 0, 1, 0, 1]
    assert df["prompt_id"][0] == df["prompt_id"][4] != df["prompt_id"][2]


def test_trl_chat_messages_become_role_lines(tmp_path):
    r = open_run(write_trl_run(tmp_path / "chat", steps=1, chat=True))
    row = r.rollouts(1).iloc[0]
    assert row["prompt"] == "system: Be brief.\nuser: What is 2+3?"
    assert row["completion"] == "answer 0 to What is 2+3?"        # one assistant message: its text
    assert r.rollouts(1)["group_id"].tolist() == [0, 0, 1, 1, 2, 2]


def test_trl_run_with_probe_columns_is_a_poise_run(tmp_path):
    r = open_run(write_trl_run(tmp_path / "poise_trl", steps=2, poise=True))
    df = r.rollouts(2)
    table = trl_table(2, poise=True)
    assert r.meta["algorithm"] == "poise"
    np.testing.assert_allclose(df["probe_pred"], table["probe_pred"])
    np.testing.assert_allclose(df["baseline"], table["baseline"])
    assert "probe_pred" not in r.meta["reward_functions"]
    np.testing.assert_allclose(df["reward"], np.add(table["correct"], table["format"]))


def test_trl_without_trainer_state_derives_metrics_from_the_completion_logs(tmp_path):
    r = open_run(write_trl_run(tmp_path / "early", steps=2, state=False))
    assert r.meta["reward_functions"] == []
    frame = r.metrics_frame()
    assert frame["step"].tolist() == [1, 2]
    rewards = np.add(trl_table(1)["correct"], trl_table(1)["format"])
    assert frame["reward/mean"].iloc[0] == pytest.approx(rewards.mean())
    assert frame["reward/std"].iloc[0] == pytest.approx(rewards.std())
    assert frame["batch/prompts"].iloc[0] == 3
    assert "computed from the completion logs" in " ".join(r.notes)
    # the guessed reward functions are the numeric columns before `advantage`
    assert [c for c in r.rollouts(1) if c.startswith("reward/")] == ["reward/correct",
                                                                    "reward/format"]


def test_trl_reads_the_newest_trainer_state(tmp_path):
    run = write_trl_run(tmp_path / "live", steps=3, max_steps=10, save_state=False)
    r = open_run(run)
    assert r.metrics_frame()["step"].tolist() == [1, 2, 3]       # checkpoint-3's history
    assert r.inferred_status() == "running"                       # files just written
    old = time.time() - 3600
    for dirpath, dirnames, filenames in os.walk(run):
        for name in dirnames + filenames + [""]:
            os.utime(os.path.join(dirpath, name), (old, old))
    assert r.inferred_status() == "ended"                         # not at max_steps, idle
    assert r.inferred_status(stale_after=7200) == "running"


def test_empty_reward_table_metrics_are_null_not_nan():
    df = pd.DataFrame({"reward": [np.nan, np.nan], "group_id": [0, 0]})
    m = table_metrics(df)
    assert m["reward/mean"] is None and m["batch/rollouts"] == 2


# --------------------------------------------------------------------------------------------
# verl


def test_verl_dump_reads_like_a_run_directory(tmp_path):
    dump = write_verl_dump(tmp_path / "rollout_data", steps=3)
    r = open_run(dump)
    assert isinstance(r, VerlDumpRun) and run_source(dump) == "verl"
    assert r.meta["source"] == "verl" and r.meta["algorithm"] == ""
    assert r.rollout_steps() == [1, 2, 3]
    inputs, outputs, gts, scores, extra = verl_rows(2)
    df = r.rollouts(2)
    assert df["prompt"].tolist() == inputs and df["completion"].tolist() == outputs
    np.testing.assert_allclose(df["reward"], scores)
    np.testing.assert_allclose(df["score"], scores)
    assert df["ground_truth"].tolist() == ["0", "1", '{"target": ["red", "blue"]}'] * 2
    assert df["acc"].tolist() == extra["acc"] and df["pred"].tolist() == extra["pred"]
    assert "too_short" not in df and "advantage" not in df and "input" not in df
    # rows of one prompt are not adjacent in verl's dump: groups come from identical inputs
    assert df["group_id"].tolist() == [0, 1, 2, 0, 1, 2]
    assert df["rollout_idx"].tolist() == [0, 0, 0, 1, 1, 1]


def test_verl_metrics_are_computed_from_the_dumps(tmp_path):
    r = open_run(write_verl_dump(tmp_path / "rollout_data", steps=3))
    frame = r.metrics_frame()
    assert frame["step"].tolist() == [1, 2, 3]
    scores = np.asarray(verl_rows(1)[3])
    assert frame["reward/mean"].iloc[0] == pytest.approx(scores.mean())
    assert frame["reward/std"].iloc[0] == pytest.approx(scores.std())
    by_group = scores.reshape(2, 3)                  # (rollout, group) in the dump's order
    same = (by_group[0] == by_group[1]).mean()
    assert frame["batch/frac_reward_zero_std"].iloc[0] == pytest.approx(same)
    assert frame["batch/prompts"].tolist() == [3, 3, 3]
    assert frame["time"].notna().all()               # each file's modification time
    assert "no training metrics" in r.notes[0]


def test_verl_validation_dump_uses_its_reward_and_probe_columns(tmp_path):
    r = open_run(write_verl_dump(tmp_path / "val", steps=1, validation=True, poise=True))
    _, _, _, scores, extra = verl_rows(1, validation=True, poise=True)
    df = r.rollouts(1)
    np.testing.assert_allclose(df["reward"], extra["reward"])
    np.testing.assert_allclose(df["probe_pred"], extra["probe_pred"])
    assert df["probe_pred"].dtype == "float64" and r.meta["algorithm"] == "poise"


def test_new_metrics_follow_a_growing_dump(tmp_path):
    dump = write_verl_dump(tmp_path / "live", steps=2)
    r = open_run(dump)
    assert [m["step"] for m in r.new_metrics()] == [1, 2]
    assert r.new_metrics() == [] and not r.metrics_restarted
    write_verl_step(dump, 3, *verl_rows(3))
    assert [m["step"] for m in r.new_metrics()] == [3]
    write_verl_step(dump, 1, *verl_rows(1, seed=5))               # a step rewritten
    assert [m["step"] for m in r.new_metrics()] == [1, 2, 3] and r.metrics_restarted


# --------------------------------------------------------------------------------------------
# discovery and read-only access


def test_find_all_runs_lists_every_source(tmp_path):
    root = tmp_path / "runs"
    RunWriter(root / "native", config={"a": 1}, meta={"model": "m", "device": "cpu",
                                                      "algorithm": "poise"}).close("finished")
    trl = write_trl_run(root / "trl_out", steps=2)
    # POISE through TRL writes this project's run directory under <output_dir>/poise
    RunWriter(trl / "poise", config={}, meta={"model": "m", "device": "cpu",
                                               "algorithm": "poise"}).close("finished")
    write_verl_dump(root / "verl" / "rollout_data", steps=2)
    other = root / "notes"
    other.mkdir()
    (other / "1.jsonl").write_text('{"loss": 1.0}\n')               # a numbered log, not verl
    found = {p.relative_to(root).as_posix(): s for p, s in find_all_runs(root)}
    assert found == {"native": "poise", "trl_out": "trl", "trl_out/poise": "poise",
                     "verl/rollout_data": "verl"}
    assert find_runs(root) == [root / "native", trl / "poise"]      # unchanged: meta.json only
    assert isinstance(open_run(root / "native"), RunReader)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        find_all_runs(tmp_path / "missing")


def test_reading_never_writes_into_the_foreign_folder(tmp_path):
    trl = write_trl_run(tmp_path / "trl_out", steps=2, poise=True)
    verl = write_verl_dump(tmp_path / "verl", steps=2)
    before = tree_state(tmp_path)
    for run in (trl, verl):
        r = open_run(run)
        r.meta, r.config, r.status, r.notes
        r.metrics_frame(), r.new_metrics(), r.all_rollouts()
        [r.rollouts(s) for s in r.rollout_steps()]
    find_all_runs(tmp_path)
    assert tree_state(tmp_path) == before


# --------------------------------------------------------------------------------------------
# malformed inputs: each error names the file, the line or field, and a fix


def test_empty_folder_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        open_run(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "meta.json" in msg
    assert "log_completions=True" in msg and "rollout_data_dir" in msg
    assert find_all_runs(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_run(tmp_path / "nope")


def test_truncated_verl_line_names_file_line_and_fix(tmp_path):
    dump = write_verl_dump(tmp_path / "d", steps=2)
    path = dump / "2.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 40])                           # cut mid-line
    n_lines = data.count(b"\n")
    r = open_run(dump)
    with pytest.raises(ValueError) as err:
        r.rollouts(2)
    msg = str(err.value)
    assert f"{path}:{n_lines}:" in msg and "cut off" in msg and f"delete line {n_lines}" in msg
    assert len(r.rollouts(1)) == 6                                    # other steps still read
    with pytest.raises(ValueError, match="cut off"):
        r.metrics()
    assert [m["step"] for m in r.metrics(errors="skip")] == [1]
    assert "step 2 left out" in r.warnings[0]


def test_corrupt_verl_line_in_the_middle(tmp_path):
    dump = write_verl_dump(tmp_path / "d", steps=1)
    lines = (dump / "1.jsonl").read_text().splitlines(keepends=True)
    lines[2] = "{not json\n"
    (dump / "1.jsonl").write_text("".join(lines))
    with pytest.raises(ValueError, match=r"1\.jsonl:3: not valid JSON .*delete line 3"):
        open_run(dump).rollouts(1)


def test_verl_line_without_a_field(tmp_path):
    dump = tmp_path / "d"
    write_verl_step(dump, 1, *verl_rows(1))
    lines = (dump / "1.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    del row["output"]
    lines[1] = json.dumps(row)
    (dump / "1.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"1\.jsonl:2: no field\(s\) \['output'\].*"
                                         r"rollout_data_dir"):
        open_run(dump).rollouts(1)


def test_verl_line_of_another_step(tmp_path):
    dump = tmp_path / "d"
    write_verl_step(dump, 1, *verl_rows(1))
    os.replace(dump / "1.jsonl", dump / "4.jsonl")
    with pytest.raises(ValueError, match=r"4\.jsonl:1: field 'step' is 1 in the dump of step 4"):
        open_run(dump).rollouts(4)


def test_trl_parquet_without_completion_column(tmp_path):
    run = write_trl_run(tmp_path / "trl_out", steps=1)
    path = run / "completions" / "completions_00001.parquet"
    pd.DataFrame(trl_table(1)).drop(columns=["completion"]).to_parquet(path)
    with pytest.raises(ValueError) as err:
        open_run(run).rollouts(1)
    msg = str(err.value)
    assert str(path) in msg and "no 'completion' column" in msg and "log_completions=True" in msg


def test_trl_parquet_without_reward_column(tmp_path):
    run = write_trl_run(tmp_path / "trl_out", steps=1, state=False)
    path = run / "completions" / "completions_00001.parquet"
    pd.DataFrame({"step": [1], "prompt": ["p"], "completion": ["c"],
                  "advantage": [0.0]}).to_parquet(path)
    with pytest.raises(ValueError, match="no reward column"):
        open_run(run).rollouts(1)


def test_trl_parquet_that_is_not_parquet(tmp_path):
    run = write_trl_run(tmp_path / "trl_out", steps=1)
    path = run / "completions" / "completions_00001.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(ValueError, match="cannot read parquet"):
        open_run(run).rollouts(1)


def test_damaged_trainer_state(tmp_path):
    run = write_trl_run(tmp_path / "trl_out", steps=1)
    (run / "trainer_state.json").write_text('{"global_step": 1, "log_hist')
    with pytest.raises(ValueError, match=r"trainer_state\.json: invalid JSON.*checkpoint"):
        open_run(run).metrics()
    (run / "trainer_state.json").write_text('{"global_step": 1, "log_history": {}}')
    with pytest.raises(ValueError, match="field 'log_history' must be a list"):
        open_run(run).metrics()


# --------------------------------------------------------------------------------------------
# the real thing: TRL's GRPOTrainer, 2 steps on the tiny model


@pytest.mark.slow
def test_real_trl_grpo_run_opens(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from poise_probe.models import build_char_tokenizer

    def even_len(completions, **kw):
        return [float(len(c) % 2 == 0) for c in completions]

    def has_digit(completions, **kw):
        return [float(any(ch.isdigit() for ch in c)) for c in completions]

    out = tmp_path / "trl_out"
    args = GRPOConfig(output_dir=str(out), use_cpu=True, per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=8, max_steps=2, logging_steps=1,
                      log_completions=True, report_to=[], save_strategy="steps", save_steps=1,
                      learning_rate=1e-3, seed=0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_funcs=[even_len, has_digit],
                          args=args, processing_class=build_char_tokenizer(),
                          train_dataset=Dataset.from_dict({"prompt": [f"{i}+{i}=" for i in range(8)]}))
    trainer.train()
    r = open_run(out)
    assert isinstance(r, TrlRun) and r.rollout_steps() == [1, 2]
    assert r.inferred_status() == "finished" and r.meta["reward_functions"] == ["even_len",
                                                                                "has_digit"]
    frame = r.metrics_frame()
    assert frame["step"].tolist()[:2] == [1, 2]
    assert {"reward/mean", "reward", "actor/grad_norm", "response/entropy_mean"} <= set(frame)
    df = r.rollouts(2)
    assert len(df) == 4 and df["group_id"].tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(df["reward"], df["reward/even_len"] + df["reward/has_digit"])
    logged = frame.set_index("step")["reward/mean"].dropna()
    assert df["reward"].mean() == pytest.approx(logged.loc[2])   # the step's table is the log's
    assert df["advantage"].notna().all()

