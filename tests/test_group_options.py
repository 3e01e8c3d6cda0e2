"""Validity masking (VM) and analytic-variance scaling (AV) of grpo, dr_grpo and rloo: the
RELATED.md B.3 vectors, identities, loop == vectorized, the valid flags and the trainer wiring."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from poise_probe.advantages import compute_advantages
from poise_probe.group_norm import GROUP_ESTIMATORS, bernoulli_advantage, group_advantages

F64 = torch.float64
ONE_OF_EIGHT = [1.0, 0, 0, 0, 0, 0, 0, 0]


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def ids(x):
    return torch.tensor(x, dtype=torch.long)


def flags(x):
    return torch.tensor(x, dtype=torch.bool)


# ------------------------------------------------------------------ RELATED.md B.3 vectors

def test_b3_grpo_one_success_of_eight():
    """p = 0.125, sample std sqrt(0.125): 2.474874 / -0.353553; with TRL's 1e-4: 2.474174."""
    r, g = t(ONE_OF_EIGHT), ids([0] * 8)
    plain = group_advantages("grpo", r, g, epsilon=0.0).advantages
    torch.testing.assert_close(plain[0], t(2.474874), atol=1e-6, rtol=0)
    torch.testing.assert_close(plain[1:], t([-0.353553] * 7), atol=1e-6, rtol=0)
    trl = group_advantages("grpo", r, g, epsilon=1e-4).advantages
    torch.testing.assert_close(trl[0], t(2.474174), atol=1e-6, rtol=0)


def test_b3_analytic_variance():
    """sqrt(p(1-p)) = 0.330719: success sqrt(7) = 2.645751, failures -1/sqrt(7) = -0.377964."""
    res = group_advantages("grpo", t(ONE_OF_EIGHT), ids([0] * 8), variance="analytic",
                           epsilon=0.0)
    torch.testing.assert_close(res.advantages[0], t(2.645751), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.advantages[1:], t([-0.377964] * 7), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.scale, t([0.330719] * 8), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.baselines, t([0.125] * 8))


@pytest.mark.parametrize("k", range(1, 8))
def test_b3_plain_analytic_variance_is_grpo_times_sqrt_g_over_g_minus_1(k):
    """B.3's remark: without smoothing, AV is GRPO rescaled by sqrt(G/(G-1)) = 1.0690 for every k."""
    r = t([1.0] * k + [0.0] * (8 - k))
    av = group_advantages("grpo", r, ids([0] * 8), variance="analytic", epsilon=0.0).advantages
    grpo = group_advantages("grpo", r, ids([0] * 8), epsilon=0.0).advantages
    torch.testing.assert_close(av / grpo, torch.full((8,), math.sqrt(8 / 7), dtype=F64))


def test_b3_validity_mask_with_analytic_variance():
    """Valid set k = 1 of 6: sqrt(5) = 2.236068, valid failures -1/sqrt(5), invalid masked (0)."""
    res = group_advantages("grpo", t(ONE_OF_EIGHT), ids([0] * 8),
                           valid=flags([1, 1, 1, 1, 1, 1, 0, 0]), validity_mask=True,
                           variance="analytic", epsilon=0.0)
    torch.testing.assert_close(res.advantages, t([2.236068] + [-0.447214] * 5 + [0.0, 0.0]),
                               atol=1e-6, rtol=0)
    assert res.identity_max_abs_err(t(ONE_OF_EIGHT)) < 1e-12


@pytest.mark.parametrize("variance", ["empirical", "analytic"])
@pytest.mark.parametrize("reward", [0.0, 1.0])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_b3_all_fail_and_all_pass_give_zero_without_nan(variance, reward, eps):
    r = torch.full((8,), reward, dtype=F64)
    for valid in (None, flags([1, 1, 1, 1, 1, 1, 0, 0])):
        if variance == "empirical" and eps == 0.0 and valid is None:
            continue    # the registry's plain GRPO: 0 / (0 + 0), its documented eps > 0 case
        res = group_advantages("grpo", r, ids([0] * 8), valid=valid,
                               validity_mask=valid is not None, variance=variance, epsilon=eps)
        assert torch.isfinite(res.advantages).all() and torch.isfinite(res.baselines).all()
        torch.testing.assert_close(res.advantages, torch.zeros(8, dtype=F64))
        assert res.identity_max_abs_err(r) < 1e-12


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_b3_smoothed_all_fail(eps):
    """a = 1, G = 8, all fail: p~ = 0.1, A = -0.1 / 0.3 = -0.3333 for every sample."""
    res = group_advantages("grpo", torch.zeros(8, dtype=F64), ids([0] * 8), variance="smoothed",
                           smoothing=1.0, epsilon=eps)
    torch.testing.assert_close(res.advantages, torch.full((8,), -1 / 3, dtype=F64),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(res.baselines, torch.full((8,), 0.1, dtype=F64))


def test_smoothed_all_pass_mirrors_all_fail():
    res = group_advantages("grpo", torch.ones(8, dtype=F64), ids([0] * 8), variance="smoothed",
                           epsilon=0.0)
    torch.testing.assert_close(res.advantages, torch.full((8,), 1 / 3, dtype=F64))


# ------------------------------------------------------------------ validity masking

def test_invalid_rollouts_get_the_penalty_and_keep_the_identity():
    r, v = t(ONE_OF_EIGHT), flags([1, 1, 1, 1, 1, 1, 0, 0])
    res = group_advantages("grpo", r, ids([0] * 8), valid=v, validity_mask=True,
                           variance="analytic", invalid="penalty", invalid_penalty=-0.5,
                           epsilon=0.0)
    torch.testing.assert_close(res.advantages[6:], t([-0.5, -0.5]))
    torch.testing.assert_close(res.advantages[0], t(math.sqrt(5)))
    assert res.identity_max_abs_err(r) < 1e-12


@pytest.mark.parametrize("name", GROUP_ESTIMATORS)
def test_validity_mask_hand_vectors(name):
    """Group 7: rewards [1, 0, 0, 1], the last invalid -> stats over [1, 0, 0] only.
    grpo: mean 1/3, sample std sqrt(1/3); dr_grpo: r - 1/3; rloo: r - mean of valid siblings."""
    r, g, v = t([1.0, 0.0, 0.0, 1.0]), ids([7] * 4), flags([1, 1, 1, 0])
    res = group_advantages(name, r, g, valid=v, validity_mask=True, epsilon=0.0)
    want = {"grpo": [(2 / 3) / math.sqrt(1 / 3), -(1 / 3) / math.sqrt(1 / 3),
                     -(1 / 3) / math.sqrt(1 / 3), 0.0],
            "dr_grpo": [2 / 3, -1 / 3, -1 / 3, 0.0],
            "rloo": [1.0, -0.5, -0.5, 0.0]}[name]
    torch.testing.assert_close(res.advantages, t(want))
    assert res.identity_max_abs_err(r) < 1e-12


@pytest.mark.parametrize("name", GROUP_ESTIMATORS)
def test_lone_valid_rollout_gets_zero_and_all_invalid_group_is_masked(name):
    """Group 1 has one valid rollout (nothing to compare with): A = 0; group 2 none: all 0."""
    r, g = t([1.0, 0.0, 1.0, 0.0, 1.0, 0.0]), ids([1, 1, 2, 2, 3, 3])
    v = flags([1, 0, 0, 0, 1, 1])
    res = group_advantages(name, r, g, valid=v, validity_mask=True)
    assert res.advantages[:4].abs().max() == 0
    assert res.advantages[4] > 0 > res.advantages[5]
    assert res.identity_max_abs_err(r) < 1e-12


@pytest.mark.parametrize("name", GROUP_ESTIMATORS)
def test_all_valid_equals_the_plain_estimator(name):
    """Masking with every flag set changes nothing (groups of >= 2, interleaved ids)."""
    gen = torch.Generator().manual_seed(0)
    g = ids([4, 9, 4, 2, 9, 2, 4, 9, 2, 2])
    r = (torch.rand(10, generator=gen, dtype=F64) < 0.5).to(F64)
    plain = compute_advantages(name, r, g)
    masked = group_advantages(name, r, g, valid=torch.ones(10, dtype=torch.bool),
                              validity_mask=True)
    torch.testing.assert_close(masked.advantages, plain.advantages)
    torch.testing.assert_close(masked.baselines, plain.baselines)


def test_invalid_rows_change_nothing_for_the_valid_ones():
    """An invalid rollout's reward never reaches a valid one's advantage."""
    r, g, v = t([1.0, 0.0, 0.0, 1.0]), ids([0] * 4), flags([1, 1, 1, 0])
    a = group_advantages("grpo", r, g, valid=v, validity_mask=True, variance="analytic")
    b = group_advantages("grpo", t([1.0, 0.0, 0.0, 0.0]), g, valid=v, validity_mask=True,
                         variance="analytic")
    torch.testing.assert_close(a.advantages[:3], b.advantages[:3])


def loop_av(rewards, group_ids, valid, smoothing, eps):
    """The slow obvious per-row VM + AV."""
    r, gid, v = rewards.tolist(), group_ids.tolist(), valid.tolist()
    out = []
    for i in range(len(r)):
        if not v[i]:
            out.append(0.0)
            continue
        grp = [r[j] for j in range(len(r)) if gid[j] == gid[i] and v[j]]
        k, n = sum(grp), len(grp)
        p = k / n if smoothing is None else (k + smoothing) / (n + 2 * smoothing)
        s = math.sqrt(p * (1 - p)) + eps
        out.append(0.0 if s == 0 else (r[i] - p) / s)
    return t(out)


@pytest.mark.parametrize("smoothing", [None, 0.5, 1.0])
def test_vectorized_equals_loop_vm_av(smoothing):
    gen = torch.Generator().manual_seed(3)
    sizes = (2, 3, 5, 8, 4)
    g = torch.cat([torch.full((k,), 10 * i + 1, dtype=torch.long) for i, k in enumerate(sizes)])
    perm = torch.randperm(len(g), generator=gen)
    g = g[perm]
    r = (torch.rand(len(g), generator=gen, dtype=F64) < 0.4).to(F64)
    r[::5] = torch.rand(len(g), generator=gen, dtype=F64)[::5]      # some partial credit
    v = torch.rand(len(g), generator=gen) < 0.7
    res = group_advantages("grpo", r, g, valid=v, validity_mask=True,
                           variance="analytic" if smoothing is None else "smoothed",
                           smoothing=smoothing or 1.0, epsilon=1e-6)
    torch.testing.assert_close(res.advantages, loop_av(r, g, v, smoothing, 1e-6))
    assert res.identity_max_abs_err(r) < 1e-12


def test_bernoulli_advantage_permutes_with_rows():
    r, g = t([1.0, 0.0, 0.0, 1.0, 1.0]), ids([3, 3, 5, 5, 3])
    v = torch.ones(5, dtype=torch.bool)
    perm = torch.tensor([4, 2, 0, 3, 1])
    a = bernoulli_advantage(r, g, v).advantages
    b = bernoulli_advantage(r[perm], g[perm], v).advantages
    torch.testing.assert_close(a[perm], b)


# ------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize("kwargs, err, match", [
    ({"validity_mask": True}, ValueError, "valid flags"),
    ({"validity_mask": True, "valid": torch.ones(3, dtype=torch.bool)}, ValueError, "shape"),
    ({"validity_mask": True, "valid": [1, 1]}, TypeError, "torch.Tensor"),
    ({"validity_mask": True, "valid": torch.tensor([2, 0])}, ValueError, "0/1"),
    ({"variance": "bayes"}, ValueError, "variance must be one of"),
    ({"invalid": "drop", "validity_mask": True, "valid": torch.ones(2, dtype=torch.bool)},
     ValueError, "invalid must be one of"),
    ({"variance": "smoothed", "smoothing": 0.0}, ValueError, "smoothing must be > 0"),
])
def test_bad_options_raise(kwargs, err, match):
    with pytest.raises(err, match=match):
        group_advantages("grpo", t([1.0, 0.0]), ids([0, 0]), **kwargs)


def test_variance_is_grpo_only_and_estimator_names_are_checked():
    with pytest.raises(ValueError, match="sets grpo's scale"):
        group_advantages("rloo", t([1.0, 0.0]), ids([0, 0]), variance="analytic")
    with pytest.raises(ValueError, match="group options apply to"):
        group_advantages("poise", t([1.0, 0.0]), ids([0, 0]))


def test_analytic_variance_refuses_rewards_outside_unit_interval():
    with pytest.raises(ValueError, match=r"rewards in \[0, 1\]"):
        group_advantages("grpo", t([1.0, -0.5]), ids([0, 0]), variance="analytic")


@pytest.mark.parametrize("overrides, match", [
    (["group.validity_mask=true"], "options of"),                       # default poise
    (["adv_estimator=reinforce_pp", "group.variance=analytic"], "options of"),
    (["adv_estimator=dr_grpo", "group.variance=smoothed"], "sets grpo's scale"),
    (["adv_estimator=grpo", "group.variance=analytic", "algorithm.overlong_shaping=true",
      "algorithm.overlong_buffer_len=4"], "overlong_shaping"),
    (["group.invalid_penalty=.nan"], "finite"),
    (["group.gamma=1.5"], r"group.gamma must lie in \[0, 1\]"),
])
def test_config_refuses_options_its_estimator_ignores(overrides, match):
    from poise_probe.config import load_config
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_config_accepts_vm_av_grpo():
    from poise_probe.config import load_config
    cfg = load_config(None, ["adv_estimator=grpo", "rollout.num_generations=8",
                             "group.validity_mask=true", "group.variance=analytic"])
    assert cfg.group.validity_mask and cfg.group.variance == "analytic"


# ------------------------------------------------------------------ valid flags and the trainer

def test_tasks_say_whether_an_answer_was_found():
    from poise_probe.tasks import Task, get_task
    arith = get_task("arith")
    ex = arith.sample(1)[0]
    assert arith.has_answer("<think>1+1</think><answer>2</answer>", ex)
    assert arith.has_answer("so \\boxed{2}", ex)
    assert not arith.has_answer("<think>I am not sure", ex)
    assert Task().has_answer("anything", ex)          # a task that cannot tell: valid


def test_score_rollouts_gives_validity_and_a_rewarded_rollout_is_valid():
    from poise_probe.data import Prompt
    from poise_probe.rollout.collect import score_rollouts
    from poise_probe.tasks import get_task
    arith = get_task("arith")
    ex = arith.sample(1)[0]

    class BareAnswerArith(type(arith)):               # a verifier that accepts a bare answer
        def score(self, completion, example):
            return float(completion.strip() == example.ground_truth)

    bare = BareAnswerArith()
    texts = [[f"<answer>{ex.ground_truth}</answer>", "<answer>x</answer>", "no answer",
              ex.ground_truth]]
    for task, want_valid in ((arith, [True, True, False, False]),
                             (bare, [True, True, False, True])):   # the bare one: rewarded
        rewards, valid = score_rollouts([Prompt(example=ex, task=task)], texts)
        assert valid.dtype == torch.bool and valid.shape == (1, 4)
        assert valid[0].tolist() == want_valid, (task, rewards)


def test_rollouts_default_to_all_valid():
    from poise_probe.rollout.collect import Rollouts
    b = Rollouts([], [], [[1], [2, 3]], ["a", "b"], [False, False], ids([0, 0]), t([1.0, 0.0]),
                 t([1.0, 0.0]))
    assert b.valid.dtype == torch.bool and b.valid.tolist() == [True, True]


def test_step_advantages_passes_the_group_options_and_valid_flags():
    from poise_probe.config import load_config
    from poise_probe.trainer import step_advantages
    cfg = load_config(None, ["adv_estimator=grpo", "rollout.num_generations=8",
                             "group.validity_mask=true", "group.variance=analytic"])
    r, g = t(ONE_OF_EIGHT, torch.float32), ids([0] * 8)
    nan = np.full(8, np.nan)
    adv, used = step_advantages(cfg, 1, r, g, nan, np.zeros(8, bool), torch.ones(8, 3),
                                valid=flags([1, 1, 1, 1, 1, 1, 0, 0]))
    torch.testing.assert_close(adv.advantages, t([2.236068] + [-0.447214] * 5 + [0.0, 0.0],
                                                 torch.float32), atol=1e-5, rtol=0)
    assert not used.any()


def test_grpo_run_with_vm_av_masks_rollouts_without_an_answer(tiny_model_dir, tmp_path):
    """Two steps of VM-AV-GRPO on the tiny model: rollouts with no answer and no reward get A = 0."""
    from poise_probe.rundir import RunReader
    from poise_probe.tasks import extract_answer
    from run_helpers import run

    out = run(tiny_model_dir, tmp_path / "vm_av", **{
        "algorithm.adv_estimator": "grpo", "rollout.num_generations": 4,
        "group.validity_mask": "true", "group.variance": "analytic", "trainer.total_steps": 2})
    r = RunReader(out)
    steps = [m for m in r.metrics() if "reward/mean" in m]
    assert len(steps) == 2
    for m in steps:
        assert 0.0 <= m["batch/valid_frac"] <= 1.0
        assert m["adv/identity_max_abs_err"] < 1e-6
        table = r.rollouts(m["step"])
        invalid = [extract_answer(c) is None and rw == 0 for c, rw in
                   zip(table.completion, table.reward)]
        assert any(invalid), "no invalid rollout: the mask went untested"
        np.testing.assert_array_equal(table.advantage.to_numpy()[invalid], 0.0)
        assert np.isclose(m["batch/valid_frac"], 1 - np.mean(invalid))
