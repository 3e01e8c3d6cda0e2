"""The kill harness: SIGKILL a training run at random moments (startup, evaluation, generation,
scoring, the update, checkpoint writes and commits, metrics writes), sometimes the resume too,
then resume until it finishes; every such run must end identical to an uninterrupted one
(weights, optimizer, probe buffers and fits, metrics rows, rollout tables, probe snapshots,
evaluation reports) with no step duplicated or missing.

A few kills run by default (CI); POISE_RELIABILITY_FULL=1 runs twenty.
"""
from __future__ import annotations

import random

import pytest
from rel_helpers import EXTRA, FULL, STEPS, assert_same_run, run_cmd, run_state, train_cmd

from poise_probe.rundir import RunReader

#: how often each point is surely reached in a fresh 6-step run (so a kill always happens):
#: evaluations at steps 0, 3, 6; a generation per step (evaluations add theirs); two optimizer
#: steps per training step; checkpoints at steps 2, 4, 6; a metrics line per step and step 0.
REACHED = {"startup": 1, "eval": 3, "generation": STEPS, "scoring": STEPS, "update": 2 * STEPS,
           "checkpoint": 3, "commit": 3, "metrics": STEPS + 1}
#: points a resume surely reaches at least once (its last step evaluates and checkpoints)
RESUME_POINTS = tuple(REACHED)


def kill_plan(seed: int, n_kills: int) -> list[tuple[str, int, str | None]]:
    """`n_kills` (point, n, second kill of the resume or None), the points spread evenly."""
    rng = random.Random(seed)
    points = [p for _ in range(-(-n_kills // len(REACHED))) for p in REACHED][:n_kills]
    rng.shuffle(points)
    plan = []
    for point in points:
        second = f"{rng.choice(RESUME_POINTS)}:1" if rng.random() < 0.4 else None
        plan.append((point, rng.randint(1, REACHED[point]), second))
    return plan


def _killed_then_resumed(model_dir, out, point: str, n: int, second: str | None) -> list[str]:
    """Run with a kill at (point, n), optionally kill the resume too, resume to the end;
    returns what happened, for the failure message."""
    log = []
    first = run_cmd(train_cmd(model_dir, out, steps=STEPS, extra=EXTRA), kill=f"{point}:{n}")
    assert first.returncode == -9, f"{point}:{n} was not reached:\n{first.stderr[-2000:]}"
    log.append(f"killed at {point}:{n}")
    if second is not None:
        again = run_cmd(train_cmd(model_dir, out, steps=STEPS, extra=EXTRA, resume=True),
                        kill=second)
        assert again.returncode in (-9, 0), again.stderr[-2000:]
        log.append(f"resume killed at {second}" if again.returncode == -9
                   else f"resume finished before {second}")
    final = run_cmd(train_cmd(model_dir, out, steps=STEPS, extra=EXTRA, resume=True))
    assert final.returncode == 0, f"{log}: {final.stderr[-3000:]}"
    assert RunReader(out).inferred_status() == "finished"
    return log


def _harness(reference, model_dir, tmp_path, plan):
    for i, (point, n, second) in enumerate(plan):
        out = tmp_path / f"kill{i}"
        log = _killed_then_resumed(model_dir, out, point, n, second)
        try:
            assert_same_run(reference, run_state(out))
        except AssertionError as err:
            raise AssertionError(f"{log}: the resumed run differs: {err}") from err


@pytest.mark.slow
def test_kills_at_random_moments_end_identical_to_an_uninterrupted_run(
        reference, tiny_model_dir, tmp_path):
    # CI: three kills, one of them mid-checkpoint and one of the resume itself
    plan = kill_plan(seed=16, n_kills=20) if FULL else [
        ("checkpoint", 2, None), ("metrics", 4, "update:1"), ("eval", 1, None)]
    _harness(reference, tiny_model_dir, tmp_path, plan)


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="POISE_RELIABILITY_FULL=1: one kill at each point")
def test_a_kill_at_every_point(reference, tiny_model_dir, tmp_path):
    plan = [(p, random.Random(p).randint(1, k), None) for p, k in REACHED.items()]
    _harness(reference, tiny_model_dir, tmp_path, plan)


def test_the_plan_spreads_kills_over_every_point():
    plan = kill_plan(seed=16, n_kills=20)
    assert {p for p, _, _ in plan} == set(REACHED)
    assert all(1 <= n <= REACHED[p] for p, n, _ in plan)
    assert any(second for _, _, second in plan)
