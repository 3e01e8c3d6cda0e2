"""Probe and advantage diagnostics against values computed by hand on tiny arrays."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from poise_probe.diagnostics import advantage_diagnostics, probe_diagnostics
from poise_probe.probe import loo_targets

# Two prompts x two rollouts. Prompt "a": rewards [1, 0] (mixed), prompt "b": [1, 1].
R = [1.0, 0.0, 1.0, 1.0]
G = ["a", "a", "b", "b"]
T = [0.0, 1.0, 1.0, 1.0]           # leave-one-out targets: each sibling's reward
P = [0.2, 0.6, 0.9, 0.5]           # probe predictions g(phi_i)
RAW = [-0.1, 0.6, 1.2, 0.5]        # unclipped ridge outputs; clip(RAW) would differ from P,
#                                     which is fine: only the clipped fractions come from RAW
B = [0.6, 0.2, 0.5, 0.9]           # cross-rollout baselines b_i = sibling's prediction
A = [0.4, -0.2, 0.5, 0.1]          # A = r - b


def test_fixture_is_consistent():
    np.testing.assert_array_equal(loo_targets(R, G), T)
    np.testing.assert_allclose(np.subtract(R, B), A)


@pytest.fixture()
def probe_metrics():
    return probe_diagnostics(P, T, R, G, raw_preds=RAW)


# Hand computations (n = 4):
#   err = P - T = [.2, -.4, -.1, -.5]; MAE = 1.2/4; MSE = (.04+.16+.01+.25)/4 = .115
#   Var(T) = .1875 -> brier skill 1 - .115/.1875
#   Pearson(P, T): dP = [-.35, .05, .35, -.05], dT = [-.75, .25, .25, .25];
#       sum dP dT = .35, sum dP^2 = .25, sum dT^2 = .75 -> .35 / sqrt(.1875)
#   r - b = [.4, -.2, .5, .1]: Var = .075; Var(r) = .1875 -> EV = 1 - .4 = .6
#   within-prompt unbiased variances: a -> .5, b -> 0; row mean .25 -> ceiling 1 - .25/.1875
#   r ~ b: cov sum .35, var sum .25 -> slope 1.4, intercept .75 - 1.4 * .55 = -.02
#   sorted P = [.2, .5, .6, .9]: p10 at .3 -> .29, p50 -> .55, p90 at 2.7 -> .81
#   pairs: prompt a only; higher-reward rollout 0 has pred .2 < .6 -> 0/1
#   RAW: one < 0, one > 1; raw MAE = (.1+.4+.2+.5)/4; raw baselines [.6, -.1, .5, 1.2],
#       r - b_raw = [.4, .1, .5, -.2]: Var = .075 -> raw EV .6
@pytest.mark.parametrize("key, value", [
    ("probe/mae", 0.3),
    ("probe/rmse", math.sqrt(0.115)),
    ("probe/bias", -0.2),
    ("probe/pearson", 0.35 / math.sqrt(0.1875)),
    ("probe/brier_skill", 1 - 0.115 / 0.1875),
    ("probe/explained_var", 0.6),
    ("probe/ev_ceiling", 1 - 0.25 / 0.1875),
    ("probe/calib_slope", 1.4),
    ("probe/calib_intercept", -0.02),
    ("probe/pred_p10", 0.29),
    ("probe/pred_p50", 0.55),
    ("probe/pred_p90", 0.81),
    ("probe/frac_clipped_low", 0.25),
    ("probe/frac_clipped_high", 0.25),
    ("probe/pair_sign_acc", 0.0),
    ("probe/n", 4.0),
    ("probe/raw_mae", 0.3),
    ("probe/raw_explained_var", 0.6),
])
def test_probe_diagnostics_hand_values(probe_metrics, key, value):
    assert probe_metrics[key] == pytest.approx(value, abs=1e-12)


def test_probe_diagnostics_keys_types_and_json(probe_metrics):
    assert all(type(v) is float for v in probe_metrics.values())
    json.dumps(probe_metrics, allow_nan=False)  # no NaN in this case
    no_raw = probe_diagnostics(P, T, R, G)
    assert "probe/frac_clipped_low" not in no_raw and "probe/raw_mae" not in no_raw
    assert set(probe_diagnostics(P, T, R, G, prefix="probe/math")) == \
        {k.replace("probe/", "probe/math/") for k in no_raw}


def test_explained_var_pairs_rewards_with_sibling_predictions():
    # Argument-order guard: EV is about Var(r - b), with b from the OTHER rollout's features.
    # A probe whose predictions equal each rollout's own reward explains nothing across siblings.
    r, g = [1.0, 0.0, 0.0, 1.0], [0, 0, 1, 1]
    m = probe_diagnostics(r, loo_targets(r, g), r, g)
    # b = [0, 1, 1, 0], r - b = [1, -1, -1, 1]: Var 1 vs Var(r) = .25 -> EV = -3
    assert m["probe/explained_var"] == pytest.approx(-3.0)
    assert m["probe/pair_sign_acc"] == 1.0  # but it ranks each prompt's rollouts perfectly


def test_pair_sign_accuracy_three_rollouts_with_a_tie():
    # rewards [1, 0, .5], preds [.7, .3, .7]: pairs (0>1) right, (0>2) tie -> 1/2, (2>1) right
    r, g, p = [1.0, 0.0, 0.5], [0, 0, 0], [0.7, 0.3, 0.7]
    m = probe_diagnostics(p, loo_targets(r, g), r, g)
    assert m["probe/pair_sign_acc"] == pytest.approx(2.5 / 3)


def test_degenerate_cases_return_nan():
    r, g = [1.0, 1.0, 0.0, 0.0], [0, 0, 1, 1]     # no prompt with mixed rewards
    m = probe_diagnostics([0.5] * 4, loo_targets(r, g), r, g)
    for key in ("probe/pearson", "probe/calib_slope", "probe/calib_intercept",
                "probe/pair_sign_acc"):
        assert math.isnan(m[key]), key
    assert m["probe/explained_var"] == pytest.approx(0.0)  # Var(r - .5) = Var(r)
    same = probe_diagnostics([0.3] * 4, [1.0] * 4, [1.0] * 4, g)  # constant rewards
    for key in ("probe/brier_skill", "probe/explained_var", "probe/ev_ceiling"):
        assert math.isnan(same[key]), key


def test_constant_fractional_rewards_give_nan_not_huge_skill():
    """np.var([0.7] * 6) is ~1e-32, not 0 (the mean rounds): a ratio over it must be NaN."""
    r, g = [0.7] * 6, [0, 0, 1, 1, 2, 2]
    assert np.var(r) != 0                              # the trap this guards against
    m = probe_diagnostics([0.6, 0.8, 0.65, 0.75, 0.7, 0.7], [0.7] * 6, r, g)
    for key in ("probe/brier_skill", "probe/explained_var", "probe/ev_ceiling",
                "probe/pearson"):
        assert math.isnan(m[key]), (key, m[key])
    flat = probe_diagnostics([0.7] * 6, loo_targets([1.0, 0.0] * 3, g), [1.0, 0.0] * 3, g)
    assert math.isnan(flat["probe/pearson"]) and math.isnan(flat["probe/calib_slope"])
    a = advantage_diagnostics([0.1, -0.1, 0.0, 0.0], [0.6, 0.8, 0.7, 0.7], [0.7] * 4)
    assert math.isnan(a["adv/var_reduction"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(preds=[0.1, np.nan, 0.3, 0.4]), r"preds contains NaN or inf \(first at index 1\)"),
    (dict(targets=[0.0, 1.0]), "targets has 2 values; expected 4"),
    (dict(group_ids=["a", "a", "b", "c"]), ">= 2 rollouts"),
    (dict(raw_preds=[0.0, np.inf, 0.0, 0.0]), "raw_preds contains NaN or inf"),
])
def test_probe_diagnostics_bad_inputs(kwargs, match):
    args = dict(preds=P, targets=T, rewards=R, group_ids=G) | kwargs
    raw = args.pop("raw_preds", None)
    with pytest.raises(ValueError, match=match):
        probe_diagnostics(**args, raw_preds=raw)


# --------------------------------------------------------------------------------------------
# advantage_diagnostics
# --------------------------------------------------------------------------------------------

def test_advantage_diagnostics_hand_values():
    # A = [.4, -.2, .5, .1]: mean .2, Var .075, |A| mean .3, 3 of 4 positive
    m = advantage_diagnostics(A, B, R)
    expected = {
        "adv/mean": 0.2,
        "adv/std": math.sqrt(0.075),
        "adv/abs_mean": 0.3,
        "adv/frac_pos": 0.75,
        "adv/var_reduction": 1 - 0.075 / 0.1875,
        "adv/identity_max_abs_err": 0.0,
        "adv/baseline_mean": 0.55,
    }
    assert set(m) == set(expected)
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key
    assert all(type(v) is float for v in m.values())


def test_advantage_diagnostics_with_scale_grpo_style():
    # GRPO on rewards [1, 0, 1, 1]: mean [.5, .5, 1, 1], std [.5, .5, 1(eps), 1]
    r = np.array(R)
    base = np.array([0.5, 0.5, 1.0, 1.0])
    scale = np.array([0.5, 0.5, 1.0, 1.0])
    a = (r - base) / scale                         # [1, -1, 0, 0]
    m = advantage_diagnostics(a, base, r, scale=scale, prefix="adv/grpo")
    assert m["adv/grpo/std"] == pytest.approx(math.sqrt(0.5))
    assert m["adv/grpo/frac_pos"] == 0.25
    # Var(A * scale) = Var([.5, -.5, 0, 0]) = .125 -> 1 - .125/.1875
    assert m["adv/grpo/var_reduction"] == pytest.approx(1 / 3)
    assert m["adv/grpo/identity_max_abs_err"] == 0.0
    scalar = advantage_diagnostics(np.subtract(R, B) / 2.0, B, R, scale=2.0)
    assert scalar["adv/identity_max_abs_err"] == pytest.approx(0.0, abs=1e-15)


def test_advantage_identity_error_is_reported():
    broken = np.array(A) + np.array([0.0, 0.1, 0.0, -0.05])
    m = advantage_diagnostics(broken, B, R)
    assert m["adv/identity_max_abs_err"] == pytest.approx(0.1)


def test_advantage_diagnostics_constant_rewards_and_bad_input():
    m = advantage_diagnostics([0.5, 0.5], [0.5, 0.5], [1.0, 1.0])
    assert math.isnan(m["adv/var_reduction"])
    with pytest.raises(ValueError, match="baselines contains NaN"):
        advantage_diagnostics(A, [0.1, np.nan, 0.2, 0.3], R)
    with pytest.raises(ValueError, match="scale has 2 values; expected 4"):
        advantage_diagnostics(A, B, R, scale=[1.0, 1.0])
