"""poise_probe.stats: hand-computed vectors, identities, and one number per name across the
project (advantages, probe targets, diagnostics, studies and the dashboard agree)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from poise_probe import stats
from poise_probe.advantages import compute_advantages
from poise_probe.diagnostics import probe_diagnostics
from poise_probe.probe import loo_targets
from poise_probe.study import analyses
from poise_probe.study import metrics as M

APPS = Path(__file__).resolve().parents[1] / "apps"
if str(APPS) not in sys.path:
    sys.path.insert(0, str(APPS))

from poise_dash import analysis  # noqa: E402


# -- leave-one-out ----------------------------------------------------------------------------

def test_loo_mean_hand_values_and_groups_in_any_order():
    v = np.array([0.0, 1.0, 0.5, 3.0, 1.0, 7.0])
    codes = np.array([0, 1, 0, 1, 0, 2])       # sizes 3, 2, 1
    out = stats.loo_mean(v, codes)
    assert out[[0, 2, 4]].tolist() == pytest.approx([0.75, 0.5, 0.25])
    assert out[[1, 3]].tolist() == [3.0, 1.0]   # two rollouts: the sibling, exactly
    assert math.isnan(out[5])                   # a lone rollout has no siblings


def test_loo_mean_of_two_is_the_sibling_bit_for_bit():
    rng = np.random.default_rng(0)
    v = rng.random(2000)
    codes = np.repeat(np.arange(1000), 2)
    out = stats.loo_mean(v, codes)
    assert np.array_equal(out, v.reshape(-1, 2)[:, ::-1].reshape(-1))


def test_loo_mean_leaves_missing_values_out():
    out = stats.loo_mean([1.0, np.nan, 0.0, np.nan], [0, 0, 0, 1])
    assert out[0] == 0.0 and out[2] == 1.0 and out[1] == 0.5
    assert math.isnan(out[3])


def test_loo_mean_identity_with_the_group_mean():
    """k * mean - (k - 1) * loo_i = v_i for every row of a group of k."""
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 30, size=300)
    codes = codes[np.bincount(codes)[codes] >= 2]
    v = rng.normal(size=codes.size)
    k = np.bincount(codes)[codes]
    mean = np.bincount(codes, weights=v)[codes] / k
    assert np.allclose(k * mean - (k - 1) * stats.loo_mean(v, codes), v, atol=1e-12)


def test_every_leave_one_out_in_the_project_is_this_one():
    rng = np.random.default_rng(2)
    ids = np.repeat(np.arange(40), 4)
    rng.shuffle(ids)
    r = rng.integers(0, 2, size=ids.size).astype(float)
    preds = rng.random(ids.size)
    codes, _ = stats.group_codes(ids)
    ref = stats.loo_mean(r, codes)
    assert np.array_equal(loo_targets(r, ids), ref)                                  # probe
    adv = compute_advantages("rloo", torch.tensor(r), torch.tensor(ids))            # advantages
    assert np.array_equal(adv.baselines.numpy(), ref)
    poise = compute_advantages("poise", torch.tensor(r), torch.tensor(ids),
                               preds=torch.tensor(preds))
    assert np.array_equal(poise.baselines.numpy(), stats.loo_mean(preds, codes))
    index = pd.DataFrame({"group": ids, "reward": r, "prompt_id": ids,                # studies
                          "prompt": [f"p{i}" for i in ids]})
    assert np.array_equal(analyses.study_targets(index)["loo"].to_numpy(), ref)
    df = pd.DataFrame({"step": 3, "group_id": ids, "reward": r})                     # dashboard
    assert np.array_equal(analysis.sibling_mean(df, "reward").to_numpy(), ref)


def test_require_siblings_names_the_lone_groups():
    codes, uniq = stats.group_codes(["a", "a", "b", "c", "c"])
    with pytest.raises(ValueError, match=r"1 group\(s\) have 1: 'b'.*num_generations >= 2"):
        stats.require_siblings(codes, uniq, "rloo")
    with pytest.raises(ValueError, match=r"group_ids has a missing id \(None\) at index 1"):
        stats.group_codes(["a", None])


# -- point statistics and identities ----------------------------------------------------------

def test_explained_variance_is_the_advantage_variance_identity():
    rng = np.random.default_rng(3)
    r, b = rng.random(500), rng.random(500)
    ev = stats.explained_variance(r, b)
    assert np.var(r - b) == pytest.approx(np.var(r) * (1 - ev))
    assert math.isnan(stats.explained_variance(np.full(4, 0.3), b[:4]))  # nothing to explain


def test_brier_skill_slope_and_pearson_hand_values():
    p, y = np.array([0.2, 0.4, 0.6, 0.8]), np.array([0.0, 0.0, 1.0, 1.0])
    assert stats.brier_skill(p, y) == pytest.approx(1 - np.mean((p - y) ** 2) / 0.25)
    slope, intercept = stats.calibration_slope_intercept(p, y)
    assert (slope, intercept) == pytest.approx((2.0, -0.5))     # y ~ 2p - 0.5 by least squares
    assert stats.pearson(p, y) == pytest.approx(np.corrcoef(p, y)[0, 1])
    assert math.isnan(stats.pearson(np.ones(4), y))


def test_pair_sign_accuracy_hand_values():
    # group 0: rewards 1 > 0 with preds .9 > .2 (right); group 1: 0 < 1 with .8 > .3 (wrong);
    # group 2: equal rewards (no pair); group 3: a tie in the predictions (one half)
    p = [0.9, 0.2, 0.8, 0.3, 0.5, 0.1, 0.4, 0.4]
    y = [1, 0, 0, 1, 1, 1, 1, 0]
    assert stats.pair_sign_accuracy(p, y, [0, 0, 1, 1, 2, 2, 3, 3]) == (0.5, 3)
    assert math.isnan(stats.pair_sign_accuracy([0.1, 0.2], [1, 1], [0, 0])[0])


def test_ev_ceiling_hand_value():
    # groups {1, 0} and {1, 1}: s^2 = 0.5 and 0, mean over rows 0.25; Var(r) = 3/16
    assert stats.explained_variance_ceiling([1, 0, 1, 1], [0, 0, 1, 1]) == \
        pytest.approx(1 - 0.25 / (3 / 16))


def test_auroc_is_scikit_learns():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 200).astype(float)
    p = np.round(rng.random(200), 1)            # many ties
    assert stats.auroc(p, y) == roc_auc_score(y, p)
    assert math.isnan(stats.auroc(p, np.ones(200)))
    assert math.isnan(stats.auroc(p, np.full(200, 0.5)))


def test_wilson_interval_hand_value():
    lo, hi = stats.wilson_interval(3, 10)
    assert (lo, hi) == pytest.approx((0.1078, 0.6032), abs=1e-4)


# -- one ECE ----------------------------------------------------------------------------------

def _oof(n_prompts=60, k=4, seed=5):
    rng = np.random.default_rng(seed)
    value = rng.random(n_prompts)
    groups = np.repeat(np.arange(n_prompts), k)
    reward = (rng.random(groups.size) < value[groups]).astype(float)
    raw = value[groups] + rng.normal(0, 0.15, groups.size)
    return pd.DataFrame({
        "row": np.arange(groups.size), "domain": np.where(groups % 2, "math", "code"),
        "reward": reward, "avg_k": value[groups], "cv_group": groups, "raw_pred": raw,
        "pred": np.clip(raw, 0, 1), "num_response_tokens": rng.integers(10, 300, groups.size),
    })


def test_probe_page_and_calibration_study_report_the_same_ece():
    oof = _oof()
    study = analyses.calibration(oof, methods=("linear",))["summary"].set_index("method")
    page = analysis.calibration_summary(oof["pred"].to_numpy(), oof["reward"].to_numpy())
    assert page["ece"] == study.loc["raw", "ece_quantile"]
    assert page["ece"] == stats.ece(oof["pred"], oof["reward"])        # the documented default
    assert page["slope"] == study.loc["raw", "calib_slope"]
    assert page["brier_skill"] == study.loc["raw", "brier_skill"]
    assert page["pearson"] == pytest.approx(study.loc["raw", "pearson"], rel=1e-12)
    # the same bins, too, under either binning and any bin count
    for strategy in stats.STRATEGIES:
        for n_bins in (None, 7):
            bins = analysis.reliability_bins(oof["pred"], oof["reward"], n_bins, strategy)
            assert analysis.expected_calibration_error(bins) == \
                M.ece(oof["pred"], oof["reward"], n_bins, strategy)


def test_ece_norms_and_strategies_hand_values():
    p, y = [0.1, 0.2, 0.7, 0.8, 0.9], [0, 1, 1, 1, 0]
    # uniform, 2 bins: [0.1, 0.2] -> gap |0.15 - 0.5| = 0.35; [0.7..0.9] -> |0.8 - 2/3| = 2/15
    assert stats.ece(p, y, 2, "uniform") == pytest.approx(0.4 * 0.35 + 0.6 * 2 / 15)
    assert stats.ece(p, y, 2, "uniform", "max") == pytest.approx(0.35)
    with pytest.raises(ValueError, match="strategy must be one of"):
        stats.ece(p, y, 2, "kmeans")
    with pytest.raises(ValueError, match=r"outcome must lie in \[0, 1\]; got 2.0 at index 0"):
        stats.ece([0.5], [2.0])


def test_diagnostics_use_the_same_statistics():
    rng = np.random.default_rng(6)
    ids = np.repeat(np.arange(30), 3)
    r = rng.integers(0, 2, ids.size).astype(float)
    p = rng.random(ids.size)
    codes, _ = stats.group_codes(ids)
    d = probe_diagnostics(p, loo_targets(r, ids), r, ids)
    b = stats.loo_mean(p, codes)
    assert d["probe/explained_var"] == stats.explained_variance(r, b)
    assert d["probe/pair_sign_acc"] == stats.pair_sign_accuracy(p, r, codes)[0]
    assert d["probe/calib_slope"] == stats.calibration_slope_intercept(b, r)[0]
    assert d["probe/ev_ceiling"] == M.explained_variance_ceiling(r, ids)
