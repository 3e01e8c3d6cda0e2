"""Evaluation metrics on hand-computed reward matrices, and the eval loop on a tiny model."""
from __future__ import annotations

import numpy as np
import pytest

from poise_probe.evaluation import evaluate, summarize_rewards


def test_summarize_hand_computed():
    r = np.array([[1, 0, 1, 1],    # mixed, passes
                  [0, 0, 0, 0],    # all wrong
                  [1, 1, 1, 1]])   # all right
    s = summarize_rewards(r)
    assert s["accuracy"] == pytest.approx(7 / 12)
    assert s["avg_at_k"] == pytest.approx((0.75 + 0 + 1) / 3)
    assert s["pass_at_k"] == pytest.approx(2 / 3)
    assert s["mixed_fraction"] == pytest.approx(1 / 3)
    assert s["n_prompts"] == 3 and s["k"] == 4


def test_partial_rewards_count_as_mixed_and_not_as_pass():
    s = summarize_rewards(np.array([[0.5, 0.5], [0.5, 1.0]]))
    assert s["mixed_fraction"] == 0.5
    assert s["pass_at_k"] == 0.5


@pytest.mark.parametrize("bad", [np.array([[np.nan, 1.0]]), np.zeros((0, 2)), np.zeros(3)])
def test_bad_reward_matrices_are_refused(bad):
    with pytest.raises(ValueError):
        summarize_rewards(bad)


def test_evaluate_runs_on_a_random_model(tiny_model_dir):
    from poise_probe.models import load_policy

    model, tok = load_policy(tiny_model_dir)
    done = []
    report = evaluate(model, tok, ["arith", "boolean"], n=3, samples=2, max_new_tokens=8,
                      progress=done.append)
    assert set(report["tasks"]) == {"arith", "boolean"}
    assert set(report["domains"]) == {"math", "logic"}
    assert sum(done) == 12
    for s in [report["overall"], *report["tasks"].values()]:
        assert {"accuracy", "avg_at_k", "pass_at_k", "mixed_fraction"} <= set(s)
        assert 0.0 <= s["accuracy"] <= 1.0
    assert report["overall"]["n_prompts"] == 6
