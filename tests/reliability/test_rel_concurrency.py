"""Reading a run while the trainer writes it: the run reader, the dashboard's data layer and the
probe-study commands' run sources poll a live run for as long as it trains, with no exception
and no torn record; two trainers on one folder, one refused (a fresh process each).

By default the trainer runs ~10 steps; POISE_RELIABILITY_FULL=1 makes it a few minutes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rel_helpers import FULL, run_cmd, train_cmd

from poise_probe.rundir import ROLLOUT_COLUMNS, RunReader

APPS = Path(__file__).resolve().parents[2] / "apps"
if str(APPS) not in sys.path:
    sys.path.insert(0, str(APPS))

LIVE = {"trainer.save_every": 2, "data.eval_every": 2, "trainer.keep_checkpoints": 2}


def _start(model_dir, out: Path, steps: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("POISE_KILL", None)
    return subprocess.Popen(train_cmd(model_dir, out, steps=steps, extra=LIVE), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _read_everything(run: Path, reader: RunReader, live_rows: list[dict], seen: dict) -> None:
    """One poll of everything a reader of a live run touches; asserts each record is whole."""
    from poise_dash import data

    from poise_probe.capture.sources import plan_from_run, run_model_path

    if not (run / "meta.json").exists():
        return
    new = reader.new_metrics()
    if reader.metrics_restarted:
        live_rows.clear()
    live_rows.extend(new)
    for m in new:
        assert isinstance(m["step"], int) and isinstance(m["time"], float), m
    full = reader.metrics()
    assert [m["step"] for m in full] == [m["step"] for m in live_rows]
    assert reader.inferred_status() in ("running", "finished")
    for step in reader.rollout_steps():
        if step not in seen:
            table = reader.rollouts(step)
            assert set(ROLLOUT_COLUMNS) <= set(table.columns) and len(table) > 0
            seen[step] = len(table)
    probes = sorted((run / "probes").glob("step_*"))
    if probes:
        tensors, meta = reader.probe_snapshot()
        assert tensors and meta["step"] >= 1
    for step in reader.eval_steps():
        assert "overall" in reader.eval_report(step)
    for step, folder in reader.checkpoints():
        assert folder.name == f"step_{step:06d}"
    t = data.tail(str(run))
    # before the first line is logged the tail says so; anything else would be a torn record
    assert not [w for w in t.warnings if "does not exist yet" not in w], t.warnings
    frame, warnings = data.load_rollouts(str(run))
    assert not warnings, warnings
    assert frame.empty or frame["step"].notna().all()
    data.eval_reports(str(run))
    if seen:
        plan, source = plan_from_run(run)
        assert len(plan) >= 1 and source
    run_model_path(run)


@pytest.mark.slow
def test_readers_never_see_a_torn_record_while_the_trainer_writes(tiny_model_dir, tmp_path):
    steps = 60 if FULL else 10
    run = tmp_path / "live"
    proc = _start(tiny_model_dir, run, steps)
    live_rows: list[dict] = []
    seen: dict[int, int] = {}
    polls = 0
    try:
        deadline = time.time() + 900
        while proc.poll() is None:
            assert time.time() < deadline
            if (run / "meta.json").exists():
                reader = getattr(_read_everything, "reader", None) or RunReader(run)
                _read_everything.reader = reader
                _read_everything(run, reader, live_rows, seen)
                polls += 1
            time.sleep(0.1)
        assert proc.returncode == 0, proc.stderr.read()[-2000:]
        _read_everything(run, _read_everything.reader, live_rows, seen)
    finally:
        if proc.poll() is None:
            proc.kill()
        _read_everything.reader = None
    assert polls >= 10, f"only {polls} polls while it trained"
    assert [m["step"] for m in live_rows] == [m["step"] for m in RunReader(run).metrics()]
    assert sorted(seen) == list(range(1, steps + 1))


@pytest.mark.slow
def test_two_trainers_on_one_folder_one_is_refused(tiny_model_dir, tmp_path):
    run = tmp_path / "contested"
    first = _start(tiny_model_dir, run, steps=500)     # stopped below, once the others tried
    try:
        deadline = time.time() + 300
        while not (run / "meta.json").exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        second = run_cmd(train_cmd(tiny_model_dir, run, steps=6, extra=LIVE, resume=True))
        assert second.returncode == 2
        assert "is being written by another process" in second.stderr.strip().splitlines()[-1]
        fresh = run_cmd(train_cmd(tiny_model_dir, run, steps=6, extra=LIVE))
        assert fresh.returncode == 2 and "is being written by another process" in fresh.stderr
        assert first.poll() is None, "the first trainer ended before the others were refused"
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 143, first.stderr.read()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert RunReader(run).inferred_status() == "stopped"
    steps = [m["step"] for m in RunReader(run).metrics() if "reward/mean" in m]
    assert steps == list(range(1, len(steps) + 1))          # one writer: no step twice
