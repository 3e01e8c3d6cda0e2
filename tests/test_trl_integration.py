"""POISE inside TRL's GRPOTrainer (poise_probe.integrations.trl), on the CPU.

Fast: the layout and chunked pooling the adapter adds to `features`, the features captured inside
TRL's own old-log-prob forward equal to `features.policy_forward`, settings and bad input.
Slow: the tiny reasoner trains with TRL and POISE and leaves a run directory the dashboard reads;
`accelerate launch --num_processes 2` gives both processes the same predictions and advantages,
equal to one process replaying the same global batch; a resume from a TRL checkpoint restores
the probe and ends bitwise equal to the uninterrupted run.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402

from poise_probe.advantages import poise_with_bootstrap  # noqa: E402
from poise_probe.config import ProbeConfig  # noqa: E402
from poise_probe.features import (TagIds, pack_rollouts, packed_from_split,  # noqa: E402
                                  policy_forward, pooled_block_output, pooled_block_rows,
                                  pooling_weights, response_spans)
from poise_probe.integrations.task_data import TaskReward, task_rows  # noqa: E402
from poise_probe.integrations.trl import PoiseGRPOConfig, PoiseGRPOTrainer  # noqa: E402
from poise_probe.integrations.trl_recipe import probe_settings  # noqa: E402
from poise_probe.models import TINY_REASONER_PATH  # noqa: E402
from poise_probe.probe import ProbeBank  # noqa: E402
from poise_probe.rundir import RunReader  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "trl_record.py"
RECIPE = ["--max-completion-length", "32", "--prompts-per-step", "8", "--probe",
          "bootstrap_steps=1", "--probe", "min_steps_to_fit=1", "--probe", "snapshot_every=2"]


def _rows(n=3):
    prompts = [[5, 6, 7], [8, 9], [4, 5, 6, 7]][:n]
    responses = [[10, 11, 12, 13], [14, 15], [16]][:n]
    return prompts, responses


# ------------------------------------------------------------------ layout and pooling


def test_packed_from_split_equals_pack_rollouts():
    prompts, responses = _rows()
    ref = pack_rollouts(prompts, responses, pad_id=0, layout="verl")
    got = packed_from_split(ref.input_ids, ref.attention_mask, ref.resp_ids.shape[1])
    for name in ("input_ids", "attention_mask", "position_ids", "resp_ids", "resp_pos",
                 "resp_mask", "prompt_start", "prompt_len"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert got.response_ids == ref.response_ids


def test_packed_from_split_refuses_bad_shapes():
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="response_width must be in 1..4"):
        packed_from_split(ids, torch.ones_like(ids), 5)
    with pytest.raises(ValueError, match="both be"):
        packed_from_split(ids, torch.ones(2, 4), 2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="prompt part is all padding"):
        packed_from_split(ids, mask, 2)


def test_pooled_block_rows_equals_one_forward(tiny_model_dir):
    from poise_probe.models import load_policy

    model, _ = load_policy(tiny_model_dir)
    prompts, responses = _rows()
    b = pack_rollouts(prompts, responses, pad_id=0)
    spans = [response_spans(r, TagIds(None, None, None, None), 2) for r in b.response_ids]
    weights = pooling_weights(b, spans, 2)
    kw = dict(attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False)
    with torch.no_grad():
        with pooled_block_output(model, 1, weights) as whole:
            model(input_ids=b.input_ids, **kw)
        with pooled_block_rows(model, 1, weights) as chunked:
            for s in range(0, 3, 2):   # micro-batches of 2 rows, as TRL's batch_size
                model(input_ids=b.input_ids[s:s + 2], attention_mask=b.attention_mask[s:s + 2],
                      position_ids=b.position_ids[s:s + 2], use_cache=False)
    for w, c in zip(whole, chunked):
        torch.testing.assert_close(c, w, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="pooled 2 of 3 rows"):
        with torch.no_grad(), pooled_block_rows(model, 1, weights):
            model(input_ids=b.input_ids[:2], attention_mask=b.attention_mask[:2],
                  position_ids=b.position_ids[:2], use_cache=False)


# ------------------------------------------------------------------ data, reward, settings


def test_task_rows_and_reward_score_with_the_tasks():
    rows = task_rows(["arith", "boolean"], 3)
    assert [r["task"] for r in rows[:4]] == ["arith", "boolean", "arith", "boolean"]
    assert {r["domain"] for r in rows} == {"math", "logic"}
    reward = TaskReward()
    cols = {c: [r[c] for r in rows] for c in ("task", "ground_truth", "domain", "data_source",
                                            "extra_info")}
    right = [f"<think>x</think><answer>{r['ground_truth']}</answer>" for r in rows]
    wrong = [[{"role": "assistant", "content": "<answer>nope</answer>"}] for _ in rows]
    prompts = [r["prompt"] for r in rows]
    assert reward(prompts, right, **cols) == [1.0] * len(rows)
    assert reward(prompts, wrong, **cols) == [0.0] * len(rows)
    with pytest.raises(KeyError, match="column 'task'"):
        reward(prompts, right, ground_truth=cols["ground_truth"])
    with pytest.raises(ValueError, match="at least one task"):
        task_rows([], 3)


def test_probe_settings_are_the_probe_section():
    cfg = PoiseGRPOConfig(output_dir="unused", use_cpu=True, poise_probe={"layer": 1, "alpha": 3.0})
    assert cfg.probe_config() == ProbeConfig(layer=1, alpha=3.0)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['alfa'\]"):
        PoiseGRPOConfig(output_dir="unused", use_cpu=True, poise_probe={"alfa": 1}).probe_config()
    with pytest.raises(ValueError, match="probe.alpha must be > 0"):
        PoiseGRPOConfig(output_dir="unused", use_cpu=True, poise_probe={"alpha": -1}).probe_config()
    assert probe_settings(["layer=1", "buffer_caps={all: 64}"])["buffer_caps"] == {"all": 64}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        probe_settings(["layer"])


def _trainer(tmp_path, model_dir, **overrides):
    kw = dict(output_dir=str(tmp_path / "out"), num_generations=2, per_device_train_batch_size=4,
              max_completion_length=8, max_steps=1, report_to=[], use_cpu=True, bf16=False,
              beta=0.0,
              poise_probe={"layer": 1})
    kw.update(overrides)
    return PoiseGRPOTrainer(model=str(model_dir), reward_funcs=[TaskReward()],
                            args=PoiseGRPOConfig(**kw),
                            train_dataset=Dataset.from_list(task_rows(["arith"], 4)))


def test_trainer_refuses_bad_settings(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="poise_target_reward='nope' is not a reward function"):
        _trainer(tmp_path, tiny_model_dir, poise_target_reward="nope")
    with pytest.raises(ValueError, match="probe.layer=5 is out of range"):
        _trainer(tmp_path, tiny_model_dir, poise_probe={"layer": 5})
    with pytest.raises(ValueError, match="poise_log_rollouts_every must be >= 1"):
        _trainer(tmp_path, tiny_model_dir, poise_log_rollouts_every=0)


def test_features_come_from_trls_forward_and_equal_policy_forward(tmp_path, tiny_model_dir):
    """The forward TRL runs (its fused LM head, its micro-batches, no position ids) with the
    pooling hook gives `policy_forward`'s features on the same rows and positions."""
    tr = _trainer(tmp_path, tiny_model_dir, per_device_train_batch_size=2)
    prompts, responses = _rows()
    b = pack_rollouts(prompts, responses, pad_id=0, layout="verl")
    r = b.resp_ids.shape[1]
    p = b.input_ids.shape[1] - r
    out = {"prompt_ids": b.input_ids[:, :p], "prompt_mask": b.attention_mask[:, :p],
           "completion_ids": b.input_ids[:, p:], "completion_mask": b.attention_mask[:, p:]}
    cap = tr._old_policy_pass(out)
    assert out["old_per_token_logps"].shape == (3, r)
    # TRL passes no position ids: the model numbers the padded row 0..T-1
    b.position_ids = torch.arange(b.input_ids.shape[1]).expand_as(b.input_ids).clone()
    spans = [response_spans(x, tr.tags, tr.probe_cfg.reasoning_window) for x in b.response_ids]
    model = tr._policy()
    with torch.no_grad():
        ref = policy_forward(model, b, temperature=tr.temperature, capture_layer=1, spans=spans,
                             prompt_window=tr.probe_cfg.prompt_window)
    torch.testing.assert_close(cap.features, ref.features.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["old_per_token_logps"] * b.resp_mask,
                               ref.log_probs * b.resp_mask, rtol=1e-4, atol=1e-5)


def test_unscorable_completions_get_a_clear_error(tmp_path, tiny_model_dir):
    def none_reward(prompts, completions, **_):
        return [None] * len(completions)

    tr = PoiseGRPOTrainer(model=str(tiny_model_dir), reward_funcs=[none_reward],
                          args=PoiseGRPOConfig(output_dir=str(tmp_path / "o"), num_generations=2,
                                               per_device_train_batch_size=4,
                                               max_completion_length=4, max_steps=1,
                                               report_to=[], use_cpu=True,
                                               poise_probe={"layer": 1}),
                          train_dataset=Dataset.from_list(task_rows(["arith"], 4)))
    with pytest.raises(ValueError, match="every reward function returned None"):
        tr.train()


# ------------------------------------------------------------------ end to end (slow)


def _recipe(out: Path, *extra: str, steps: int = 4, launcher: list[str] | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [*(launcher or [sys.executable]), str(SCRIPT), "--output", str(out),
           "--max-steps", str(steps), "--save-steps", "2", *RECIPE, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def trl_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trl") / "run"
    _recipe(out)
    return out


def _records(out: Path, rank: int = 0) -> list[dict]:
    with open(out / f"record_rank{rank}.pkl", "rb") as f:
        return pickle.load(f)


@pytest.mark.slow
def test_trl_trains_the_tiny_reasoner_and_writes_a_run_directory(trl_run):
    reader = RunReader(trl_run / "poise")
    assert reader.meta["engine"] == "trl" and reader.meta["algorithm"] == "poise"
    assert reader.status["status"] == "finished"
    frame = reader.metrics_frame()
    poise_rows = frame.dropna(subset=["reward/mean"])
    assert poise_rows["step"].tolist() == [1, 2, 3, 4]
    for key in ("probe/used_frac", "adv/mean", "probe/math/n_rows", "tokens/generated",
                "timing_s/old_log_prob", "actor/pg_loss", "actor/grad_norm", "trl/reward"):
        assert key in frame.columns, key
    # bootstrap (RLOO) at step 1, the fitted probe afterwards
    used = poise_rows.set_index("step")["probe/used_frac"]
    assert used[1] == 0.0 and used[4] == 1.0
    table = reader.rollouts(4)
    assert len(table) == 16 and table["probe_pred"].notna().all()
    np.testing.assert_allclose(table["reward"] - table["baseline"], table["advantage"],
                               atol=1e-6)
    assert reader.probe_snapshot_steps() == [2, 4]
    rec = _records(trl_run)[-1]
    np.testing.assert_allclose(table["advantage"], rec["advantages"], atol=1e-6)
    # the policy moved
    from safetensors.torch import load_file
    before = load_file(str(TINY_REASONER_PATH / "model.safetensors"))
    after = load_file(str(trl_run / "checkpoint-4" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_two_processes_share_predictions_and_equal_one_process(tmp_path):
    out = tmp_path / "ddp"
    accelerate = Path(sys.executable).with_name("accelerate")
    _recipe(out, steps=3, launcher=[str(accelerate), "launch", "--multi_gpu",
                                    "--num_processes", "2", "--main_process_port", "29517"])
    r0, r1 = _records(out, 0), _records(out, 1)
    assert len(r0) == len(r1) == 3
    assert json.loads((out / "poise" / "meta.json").read_text())["num_processes"] == 2
    for a, b in zip(r0, r1):
        for key in ("features", "rewards", "preds", "fitted", "advantages", "used"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        # each process trains on its own slice of the shared advantages
        np.testing.assert_array_equal(
            np.concatenate([a["local_advantages"], b["local_advantages"]]),
            a["advantages"].astype(np.float32))
    assert any(r["used"].all() for r in r0)
    # one process with the same global batch: a fresh bank replays every step exactly
    cfg = ProbeConfig(**probe_settings(RECIPE[5::2]))
    bank = ProbeBank.from_config(cfg, hidden_size=(r0[0]["features"].shape[1] - 3) // 2)
    for rec in r0:
        preds, fitted, _ = bank.predict(rec["features"], rec["domains"])
        np.testing.assert_array_equal(preds, rec["preds"])
        ready = torch.from_numpy(fitted) & torch.tensor(rec["step"] > cfg.bootstrap_steps)
        adv, used = poise_with_bootstrap(torch.from_numpy(rec["rewards"]),
                                         torch.from_numpy(rec["group_ids"]),
                                         torch.from_numpy(np.nan_to_num(preds)), ready)
        np.testing.assert_array_equal(adv.advantages.numpy(), rec["advantages"])
        bank.update(rec["features"], rec["scores"], rec["group_ids"], rec["domains"],
                    rec["step"])


@pytest.mark.slow
def test_resume_from_a_trl_checkpoint_restores_the_probe(trl_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(trl_run, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    (resumed / "record_rank0.pkl").unlink()
    _recipe(resumed, "--resume")
    from safetensors.numpy import load_file
    a = load_file(str(trl_run / "checkpoint-4" / "poise_probe_bank.safetensors"))
    b = load_file(str(resumed / "checkpoint-4" / "poise_probe_bank.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # the first resumed step predicted with the bank restored from checkpoint-2
    first = _records(resumed)[0]
    assert first["step"] == 3
    np.testing.assert_array_equal(first["preds"], _records(trl_run)[2]["preds"])
    reader = RunReader(resumed / "poise")
    steps = reader.metrics_frame().dropna(subset=["reward/mean"])["step"].tolist()
    assert steps == [1, 2, 3, 4]
    assert len(reader.meta["resumes"]) == 1


def test_resume_from_a_plain_trl_checkpoint_is_refused(tmp_path, tiny_model_dir):
    tr = _trainer(tmp_path, tiny_model_dir)
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    with pytest.raises(FileNotFoundError, match="was not written by PoiseGRPOTrainer"):
        tr._restore_bank(ckpt)


@pytest.mark.slow
@pytest.mark.parametrize("page", ["runs", "training", "probe", "rollouts"])
def test_the_dashboard_opens_a_trl_run(trl_run, monkeypatch, page):
    """`poise dashboard OUTPUT_DIR` finds the run directory inside TRL's output and every page
    renders it."""
    from dashboard_fixtures import chart_titles, open_app

    at = open_app(monkeypatch, trl_run, page=page)
    if page in ("training", "probe"):
        assert chart_titles(at), f"the {page} page drew no chart"
