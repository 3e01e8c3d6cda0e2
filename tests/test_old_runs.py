"""Runs written by schema version 1 (before self-describing rollout records) stay readable and
resumable. tests/data/run_v1 was written by commit 70f3c5e's trainer (2 steps, tiny model)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from poise_probe.config import load_config
from poise_probe.rundir import RunReader

V1 = Path(__file__).parent / "data" / "run_v1"


def test_a_v1_run_reads(tmp_path):
    r = RunReader(V1)
    assert r.meta["schema_version"] == 1
    assert r.inferred_status() == "finished"
    t = r.rollouts(2)
    assert "token_pieces" not in t.columns and "token_ids" in t.columns
    assert [m["step"] for m in r.metrics() if "reward/mean" in m] == [1, 2]


@pytest.mark.slow
def test_a_v1_run_resumes_into_v2(tmp_path):
    from poise_probe.trainer import train

    run = tmp_path / "run"
    shutil.copytree(V1, run)
    cfg = load_config(None, [f"{k}={v}" for k, v in {
        "model.path": str(run / "checkpoints" / "step_000002" / "policy"),
        "data.tasks": "[arith]", "data.pool_size": 32, "data.eval_n": 3,
        "data.eval_samples": 2, "data.eval_every": 0, "rollout.prompts_per_step": 4,
        "rollout.num_generations": 2, "rollout.max_completion_length": 12, "optim.lr": 1e-3,
        "optim.warmup_steps": 0, "optim.mini_batch_prompts": 2, "optim.micro_batch_size": 3,
        "probe.layer": 0, "probe.bootstrap_steps": 1, "probe.min_steps_to_fit": 1,
        "probe.snapshot_every": 1, "probe.buffer_caps": "{all: 64}",
        "trainer.total_steps": 3, "trainer.save_every": 2, "trainer.keep_checkpoints": 1,
    }.items()])
    # the fixture's model (/tmp/v1model) is gone: it resumes from its own checkpoint's copy,
    # a model.path change the resume refuses unless allowed, and records
    with pytest.raises(ValueError, match="would change what the run is \\(model.path"):
        train(cfg, run, resume=True)
    train(cfg, run, resume=True, allow_change=True)
    r = RunReader(run)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["schema_version"] == 2 and meta["resumes"][-1]["schema_version_from"] == 1
    assert meta["resumes"][-1]["config_changes"]["model.path"][0] == "/tmp/v1model"
    assert "token_pieces" not in r.rollouts(2).columns
    new = r.rollouts(3)
    assert "token_pieces" in new.columns and "probe_target" in new.columns
    assert [m["step"] for m in r.metrics() if "reward/mean" in m] == [1, 2, 3]


@pytest.mark.parametrize("page", ["runs", "training", "probe", "rollouts"])
def test_the_dashboard_opens_a_v1_run(monkeypatch, page):
    import dashboard_fixtures as fx

    at = fx.open_app(monkeypatch, V1, page=page)
    fx.assert_ok(at)
    if page == "rollouts":   # v1 tables have no token pieces: the char-tokenizer fallback
        body = "\n".join(str(h.proto.body) for h in at.html)
        assert "H=" in body and "log p=" in body         # 70f3c5e stored token_logprobs
        assert "engine" not in body                      # but no engine log-probs
