"""`poise train` with the vLLM engine: a few steps of the tiny recipe run end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from poise_probe.rundir import RunReader

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_recipe_trains_with_vllm(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "poise_probe", "train",
           "--config", str(ROOT / "training/configs/poise_tiny.yaml"), "--output", str(out),
           "rollout.engine=vllm", "trainer.total_steps=3"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "status.json").read_text())["status"] == "finished"
    r = RunReader(out)
    metrics = [m for m in r.metrics() if "reward/mean" in m]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    # the whole run directory, as with the hf engine
    assert r.meta["rollout_engine"] == "vllm" and r.meta["schema_version"] == 2
    assert r.rollout_steps() == [1, 2, 3] and r.eval_steps() == [0, 3]
    assert r.probe_snapshot_steps() and r.checkpoints()[-1][0] == 3
    for m in metrics:
        # weights pushed after every update: the engine samples the trainer's policy (fp32)
        assert m["rollout/logprob_abs_diff_max"] < 1e-3, m["step"]
        assert m["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)   # on for vllm
        assert "timing_s/sync" in m
    t = r.rollouts(3)
    for row in t.itertuples():
        assert len(row.engine_logprobs) == len(row.token_ids) == row.num_tokens
        assert "".join(row.token_pieces) == row.completion
