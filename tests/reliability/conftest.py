"""The reliability suite's shared fixture: one uninterrupted run that killed, stopped and
resumed runs are compared with."""
from __future__ import annotations

import os

import pytest
from rel_helpers import EXTRA, STEPS, run_cmd, run_state, train_cmd


@pytest.fixture(scope="session")
def reference(tiny_model_dir, tmp_path_factory):
    """`run_state` of an uninterrupted `poise train` (fresh process) of STEPS steps."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = run_cmd(train_cmd(tiny_model_dir, out, steps=STEPS, extra=EXTRA))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_state(out)


# CI runs the property tests derandomized (the same examples every run: a red CI is a real
# change, not a new random draw); locally each run explores new examples.
if os.environ.get("CI"):
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, database=None)
    settings.load_profile("ci")
