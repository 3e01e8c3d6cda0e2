"""Metric suite for expected-reward predictors against hand-computed values on tiny vectors."""
from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score

from poise_probe.study.metrics import (
    REPORT_KEYS,
    IsotonicCalibrator,
    LinearCalibrator,
    PlattCalibrator,
    auroc,
    bootstrap_ci,
    calibration_report,
    calibration_slope_intercept,
    cross_fit_recalibrate,
    ece,
    explained_variance_ceiling,
    grouped_report,
    make_calibrator,
    murphy_decomposition,
    out_of_range_fraction,
    regression_metrics,
    reliability_table,
)

# Hand example 1 (uniform, 2 bins): bin [0, .5) holds {.1, .2} -> mean_pred .15, mean_outcome .5,
# gap .35, weight 2/5; bin [.5, 1] holds {.7, .8, .9} -> .8 vs 2/3, gap 2/15, weight 3/5.
# ECE = .4 * .35 + .6 * 2/15 = .22; RMSCE = sqrt(.4 * .1225 + .6 * 4/225); MCE = .35.
P1 = [0.1, 0.2, 0.7, 0.8, 0.9]
Y1 = [0, 1, 1, 1, 0]
# Hand example 2: quantile bins (by rank) {.1, .2, .3} (.2 vs 1/3) and {.4, .9, .95} (.75 vs 2/3):
# ECE = .5 * 2/15 + .5 * 1/12 = .108333...; uniform bins {.1..,.4} (.25 vs .25) and {.9, .95}
# (.925 vs 1): ECE = 4/6 * 0 + 2/6 * .075 = .025.
P2 = [0.1, 0.2, 0.3, 0.4, 0.9, 0.95]
Y2 = [0, 0, 1, 0, 1, 1]


# -- regression metrics --------------------------------------------------------------------

def test_regression_metrics_hand_values():
    # target [0, 0, 1, 1], pred [.25, .25, .5, .5]: target - pred = [-.25, -.25, .5, .5],
    # variance .140625; Var(target) = .25 -> EV = 1 - .5625 = .4375; MSE = .15625 -> skill .375.
    m = regression_metrics([0.25, 0.25, 0.5, 0.5], [0, 0, 1, 1])
    assert m["n"] == 4.0
    assert m["mae"] == pytest.approx(0.375)
    assert m["rmse"] == pytest.approx(math.sqrt(0.15625))
    assert m["bias"] == pytest.approx(-0.125)
    assert m["pearson"] == pytest.approx(1.0)
    assert m["spearman"] == pytest.approx(1.0)
    assert m["brier_skill"] == pytest.approx(0.375)
    assert m["explained_var"] == pytest.approx(0.4375)


def test_regression_metrics_argument_order_matters():
    # stable-baselines3#225: swapping gives 1 - Var(p - t) / Var(p) = 1 - .140625 / .015625 = -8.
    swapped = regression_metrics([0, 0, 1, 1], [0.25, 0.25, 0.5, 0.5])
    assert swapped["explained_var"] == pytest.approx(-8.0)
    assert swapped["bias"] == pytest.approx(0.125)


def test_regression_metrics_constant_fractional_target_is_nan():
    # np.var([0.1] * 3) is 1.9e-34, not 0: skills must still be NaN, not a huge negative number.
    assert np.var([0.1] * 3) > 0
    m = regression_metrics([0.0, 0.1, 0.3], [0.1] * 3)
    assert math.isnan(m["brier_skill"]) and math.isnan(m["explained_var"])
    assert math.isnan(m["pearson"]) and math.isnan(m["spearman"])
    assert m["mae"] == pytest.approx(0.1)


# -- Murphy decomposition ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["binary", "fractional"])
def test_murphy_identity_on_random_data(kind):
    rng = np.random.default_rng(1)
    p = rng.uniform(size=500)
    y = rng.binomial(1, p ** 2) if kind == "binary" else rng.beta(2, 3, size=500)
    m = murphy_decomposition(np.round(p, 2), y)  # rounding adds ties for PAV to pool
    assert m["mse"] == pytest.approx(np.mean((np.round(p, 2) - y) ** 2), abs=1e-12)
    assert m["reliability"] - m["resolution"] + m["uncertainty"] == pytest.approx(m["mse"],
                                                                                 abs=1e-12)
    assert m["reliability"] > 1e-3 and m["resolution"] >= -1e-12
    assert m["uncertainty"] == pytest.approx(np.var(y), abs=1e-12)


def test_murphy_hand_values():
    # Calibrated two-level forecast: the isotonic map is the identity, so REL = 0 and
    # RES = Var(pred) = .0625; UNC = .5 * .5 = .25; MSE = (3 * .0625 + .5625) / 4 = .1875.
    m = murphy_decomposition([0.25] * 4 + [0.75] * 4, [0, 0, 0, 1, 1, 1, 1, 0])
    assert m == pytest.approx({"mse": 0.1875, "reliability": 0.0, "resolution": 0.0625,
                               "uncertainty": 0.25}, abs=1e-12)
    # Constant forecast .4, outcome mean .6: no resolution, REL = (.4 - .6)^2 = .04, UNC = .24.
    m = murphy_decomposition([0.4] * 5, [0, 1, 1, 0, 1])
    assert m == pytest.approx({"mse": 0.28, "reliability": 0.04, "resolution": 0.0,
                               "uncertainty": 0.24}, abs=1e-12)


# -- reliability table and ECE ---------------------------------------------------------------

def test_reliability_table_uniform_contents():
    t = reliability_table(P1, Y1, n_bins=2, strategy="uniform")
    assert list(t.columns) == ["bin", "lo", "hi", "pred_min", "pred_max", "n", "mean_pred",
                               "mean_outcome", "ci_low", "ci_high"]
    assert t["bin"].tolist() == [0, 1] and t["n"].tolist() == [2, 3]
    np.testing.assert_allclose(t[["lo", "hi"]].to_numpy(), [[0.0, 0.5], [0.5, 1.0]])
    np.testing.assert_allclose(t["mean_pred"], [0.15, 0.8])
    np.testing.assert_allclose(t["mean_outcome"], [0.5, 2 / 3])
    assert (t["ci_low"] < t["mean_outcome"]).all() and (t["mean_outcome"] < t["ci_high"]).all()


def test_reliability_table_uniform_edges_and_empty_bins():
    # 0.5 sits on the inner edge of 2 bins and belongs to the upper one; p = 1 joins the last
    # bin. With 4 bins, [.25, .5) is empty and omitted.
    t = reliability_table([0.0, 0.1, 0.5, 1.0], [0, 0, 1, 1], n_bins=4, strategy="uniform")
    assert t["bin"].tolist() == [0, 2, 3] and t["n"].tolist() == [2, 1, 1]
    t2 = reliability_table([0.0, 0.1, 0.5, 1.0], [0, 0, 1, 1], n_bins=2, strategy="uniform")
    assert t2["n"].tolist() == [2, 2]


def test_wilson_interval_known_case():
    # 3 successes in 10 trials: Wilson 95% interval (0.1078, 0.6032) (Newcombe 1998, table I).
    t = reliability_table([0.3] * 10, [1, 1, 1] + [0] * 7, n_bins=2, strategy="uniform")
    assert len(t) == 1
    assert t.loc[0, "ci_low"] == pytest.approx(0.1078, abs=1e-4)
    assert t.loc[0, "ci_high"] == pytest.approx(0.6032, abs=1e-4)


def test_fractional_ci_is_normal_and_clipped():
    # [.2, .4, .6]: mean .4, sd .2 (ddof 1), half-width 1.96 * .2 / sqrt(3) = .226317.
    t = reliability_table([0.3] * 3, [0.2, 0.4, 0.6], n_bins=2, strategy="uniform")
    assert (t.loc[0, "ci_low"], t.loc[0, "ci_high"]) == pytest.approx((0.173683, 0.626317),
                                                                      abs=1e-6)
    # [0, .1, .9]: mean 1/3, sd .493288, half-width .558198 -> low clipped to 0.
    t = reliability_table([0.3] * 3, [0.0, 0.1, 0.9], n_bins=2, strategy="uniform")
    assert t.loc[0, "ci_low"] == 0.0
    assert t.loc[0, "ci_high"] == pytest.approx(0.891531, abs=1e-6)


def test_quantile_bins_keep_ties_together_without_empty_bins():
    # Six tied .5s (average rank 2.5 of 0..7 -> bin floor(4 * 2.5 / 8) = 1) and two .9s (bin 3).
    t = reliability_table([0.5] * 6 + [0.9, 0.9], [0, 1] * 4, n_bins=4, strategy="quantile")
    assert t["bin"].tolist() == [1, 3] and t["n"].tolist() == [6, 2]
    np.testing.assert_allclose(t[["lo", "hi"]].to_numpy(), [[0.5, 0.5], [0.9, 0.9]])
    # Row order cannot change quantile bins.
    rng = np.random.default_rng(0)
    p = np.round(rng.uniform(size=60), 1)
    y = rng.integers(0, 2, 60)
    perm = rng.permutation(60)
    assert ece(p, y, 5, "quantile") == pytest.approx(ece(p[perm], y[perm], 5, "quantile"))


def test_default_bin_count_is_cube_root():
    p = np.linspace(0, 1, 125)  # round(125 ** (1/3)) = 5 bins, all non-empty
    assert len(reliability_table(p, np.zeros(125))) == 5
    assert len(reliability_table([0.1, 0.9, 0.2, 0.8, 0.5], [0] * 5)) == 2  # max(2, round(1.7))


def test_ece_uniform_hand_values():
    assert ece(P1, Y1, n_bins=2, strategy="uniform") == pytest.approx(0.22)
    assert ece(P1, Y1, n_bins=2, strategy="uniform", norm="l2") == pytest.approx(math.sqrt(0.049 + 0.6 * 4 / 225))
    assert ece(P1, Y1, n_bins=2, strategy="uniform", norm="max") == pytest.approx(0.35)


def test_ece_quantile_hand_values():
    assert ece(P2, Y2, n_bins=2, strategy="quantile") == pytest.approx(0.5 * 2 / 15 + 0.5 / 12)
    assert ece(P2, Y2, n_bins=2, strategy="uniform") == pytest.approx(0.025)


@pytest.mark.parametrize("kwargs, match", [
    ({"norm": "l3"}, "norm"), ({"strategy": "kmeans"}, "strategy"),
    ({"n_bins": 0}, "n_bins"), ({"n_bins": 2.5}, "n_bins"),
])
def test_ece_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ece(P1, Y1, **kwargs)


# -- slope, AUROC, ceiling, range ----------------------------------------------------------------

def test_calibration_slope_intercept_hand_values():
    # pred [0, .5, 1], outcome [.2, .5, .6]: cov = .2 / 3, var = .5 / 3 -> slope .4,
    # intercept 1.3 / 3 - .4 * .5 = .23333.
    slope, intercept = calibration_slope_intercept([0, 0.5, 1], [0.2, 0.5, 0.6])
    assert slope == pytest.approx(0.4) and intercept == pytest.approx(0.7 / 3)
    assert all(math.isnan(v) for v in calibration_slope_intercept([0.3] * 3, [0, 1, 1]))


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(3)
    p = np.round(rng.uniform(size=300), 1)  # many ties across classes
    y = rng.binomial(1, p)
    assert auroc(p, y) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    # Hand: positives .35, .8 vs negatives .1, .4: pairs won 1 + 0 + 1 + 1 = 3 of 4.
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.2, 0.7], [1, 0]) == pytest.approx(0.0)
    assert auroc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)


def test_auroc_nan_without_two_binary_classes():
    assert math.isnan(auroc([0.1, 0.4, 0.8], [1, 1, 1]))
    assert math.isnan(auroc([0.1, 0.4, 0.8], [0, 0.5, 1]))


def test_explained_variance_ceiling_hand_example():
    # Prompt a: [0, 0, 0, 1] (s^2 = .25), prompt b: [1, 1, 1, 1] (s^2 = 0); prompt c has one
    # rollout and is dropped. Var of the 8 rewards = .625 * .375 = .234375; mean s^2 over rows
    # = .125 -> ceiling = 1 - .125 / .234375 = .466667.
    r = [0, 0, 0, 1, 1, 1, 1, 1, 0]
    g = ["a"] * 4 + ["b"] * 4 + ["c"]
    assert explained_variance_ceiling(r, g) == pytest.approx(1 - 0.125 / 0.234375)
    assert math.isnan(explained_variance_ceiling([0, 1, 1], ["a", "b", "c"]))
    assert math.isnan(explained_variance_ceiling([0.1] * 6, ["a"] * 3 + ["b"] * 3))


def test_out_of_range_fraction_hand_values():
    assert out_of_range_fraction([-0.1, 0.5, 1.2, 1.0, 0.0]) == {"frac_low": 0.2,
                                                                 "frac_high": 0.2}
    assert out_of_range_fraction([0.1, 0.5], lo=0.2, hi=0.4) == {"frac_low": 0.5,
                                                                 "frac_high": 0.5}
    with pytest.raises(ValueError, match="lo < hi"):
        out_of_range_fraction([0.5], lo=1.0, hi=0.0)


# -- calibrators -----------------------------------------------------------------------------

def _calibrated(n=20000, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.05, 0.95, size=n)
    return p, rng.binomial(1, p).astype(float)


def test_linear_calibrator_identity_on_calibrated_and_fixes_shrunk():
    p, y = _calibrated()
    cal = LinearCalibrator().fit(p, y)
    assert cal.slope_ == pytest.approx(1.0, abs=0.05)
    assert cal.intercept_ == pytest.approx(0.0, abs=0.03)
    shrunk = 0.5 * p + 0.25  # under-confident: the outcome line has slope 2, intercept -.5
    cal = LinearCalibrator().fit(shrunk, y)
    assert (cal.slope_, cal.intercept_) == pytest.approx((2.0, -0.5), abs=0.06)
    out = cal.predict([0.0, 0.5, 1.0])
    assert out[0] == 0.0 and out[2] == 1.0  # clipped


def test_platt_recovers_known_parameters():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.02, 0.98, size=20000)
    a, b = 0.5, 1.5
    frac = expit(a + b * logit(p))  # fractional targets, noise free: exact recovery
    cal = PlattCalibrator().fit(p, frac)
    assert (cal.intercept_, cal.slope_) == pytest.approx((a, b), abs=1e-4)
    np.testing.assert_allclose(cal.predict(p), frac, atol=1e-4)
    cal = PlattCalibrator().fit(p, rng.binomial(1, frac))  # Bernoulli draws: close
    assert (cal.intercept_, cal.slope_) == pytest.approx((a, b), abs=0.1)


def test_platt_identity_on_calibrated_data():
    p, y = _calibrated()
    cal = PlattCalibrator().fit(p, y)
    assert (cal.intercept_, cal.slope_) == pytest.approx((0.0, 1.0), abs=0.1)


def test_isotonic_calibrator_warns_about_lost_resolution(caplog):
    p, y = _calibrated(n=2000)
    with caplog.at_level(logging.WARNING, logger="poise_probe.study.metrics"):
        cal = IsotonicCalibrator().fit(p, y)
    assert "lost resolution" in caplog.text
    assert cal.n_distinct_in_ == 2000 and cal.n_distinct_out_ < 200
    assert np.mean(np.abs(cal.predict(p) - p)) < 0.05  # close to identity on calibrated data
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="poise_probe.study.metrics"):
        IsotonicCalibrator().fit([0.1, 0.2, 0.3], [0.0, 0.5, 1.0])  # nothing to pool
    assert "lost resolution" not in caplog.text


@pytest.mark.parametrize("name", ["linear", "platt", "isotonic"])
def test_calibrators_need_fit(name):
    cal = make_calibrator(name)
    with pytest.raises(NotFittedError):
        cal.predict([0.5])
    assert cal.fit([0.1, 0.4, 0.6, 0.9], [0, 0, 1, 1]) is cal
    out = cal.predict([-0.5, 0.5, 1.5])
    assert ((out >= 0) & (out <= 1)).all()


def test_make_calibrator_unknown_name_lists_known():
    with pytest.raises(ValueError, match=r"unknown calibrator 'beta'.*isotonic.*linear.*platt"):
        make_calibrator("beta")


# -- cross-fitting and bootstrap ----------------------------------------------------------------

def _grouped(G=60, K=4, seed=0):
    """G prompts x K rollouts; the probe is under-confident: pred = .5 p + .25."""
    rng = np.random.default_rng(seed)
    p = np.repeat(rng.uniform(0.05, 0.95, size=G), K)
    y = rng.binomial(1, p).astype(float)
    return 0.5 * p + 0.25, y, np.repeat(np.arange(G), K)


def test_cross_fit_changes_values_and_metrics():
    pred, y, g = _grouped(G=200)
    out = cross_fit_recalibrate(pred, y, g, "linear")
    assert np.abs(out - pred).max() > 0.1
    raw, recal = calibration_report(pred, y), calibration_report(out, y)
    # aaanalysis#480: metrics computed on recalibrated values must move, here toward calibrated.
    assert recal["ece_quantile"] < raw["ece_quantile"] - 0.05
    assert recal["calib_slope"] == pytest.approx(1.0, abs=0.25)
    np.testing.assert_array_equal(out, cross_fit_recalibrate(pred, y, g, "linear"))  # seeded


class _SpyCalibrator(BaseEstimator):
    """Records which predictions each fold's calibrator was fit on and then asked to map."""

    log: list = []

    def fit(self, pred, outcome):
        self.seen_ = set(np.asarray(pred).tolist())
        return self

    def predict(self, pred):
        _SpyCalibrator.log.append((self.seen_, set(np.asarray(pred).tolist())))
        return np.asarray(pred)


def test_cross_fit_never_fits_on_its_own_rows_or_prompts():
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(25), 4)
    pred = rng.permutation(100) / 100.0  # unique values identify rows
    y = rng.integers(0, 2, 100).astype(float)
    _SpyCalibrator.log = []
    cross_fit_recalibrate(pred, y, g, _SpyCalibrator(), n_splits=5)
    assert len(_SpyCalibrator.log) == 5
    group_of = dict(zip(pred.tolist(), g.tolist()))
    mapped = set()
    for seen, asked in _SpyCalibrator.log:
        assert not seen & asked
        assert not {group_of[v] for v in seen} & {group_of[v] for v in asked}
        assert len(seen) + len(asked) == 100
        mapped |= asked
    assert mapped == set(pred.tolist())


def test_cross_fit_needs_enough_groups():
    with pytest.raises(ValueError, match="n_splits"):
        cross_fit_recalibrate([0.2, 0.4, 0.6], [0, 1, 1], ["a", "a", "b"], n_splits=5)


def test_bootstrap_ci_contains_point_estimate_and_is_seeded():
    pred, y, g = _grouped()
    point = auroc(pred, y)
    lo, hi = bootstrap_ci(auroc, pred, y, g, n_boot=200, seed=0)
    assert lo < point < hi and hi - lo < 0.5
    assert (lo, hi) == bootstrap_ci(auroc, pred, y, g, n_boot=200, seed=0)


def test_bootstrap_resamples_groups_not_rows():
    # 20 prompts x 10 identical rollouts: only 20 independent values, so the cluster CI of the
    # mean is about sqrt(10) times wider than a row bootstrap (each row its own group) claims.
    rng = np.random.default_rng(0)
    y = np.repeat(rng.uniform(size=20), 10)
    pred = np.full(200, 0.5)
    mean_y = lambda p, o: float(np.mean(o))
    lo_c, hi_c = bootstrap_ci(mean_y, pred, y, np.repeat(np.arange(20), 10), n_boot=300)
    lo_r, hi_r = bootstrap_ci(mean_y, pred, y, np.arange(200), n_boot=300)
    assert hi_c - lo_c > 2.0 * (hi_r - lo_r)


def test_bootstrap_drops_nan_replicates_with_warning(caplog):
    # One prompt holds every positive: replicates without it have one class (AUROC NaN).
    y = np.array([1, 1] + [0] * 18, dtype=float)
    pred = np.linspace(0.9, 0.1, 20)
    with caplog.at_level(logging.WARNING, logger="poise_probe.study.metrics"):
        lo, hi = bootstrap_ci(auroc, pred, y, np.repeat(np.arange(10), 2), n_boot=100)
    assert "dropped" in caplog.text and lo == hi == 1.0


# -- reports ---------------------------------------------------------------------------------

def test_calibration_report_keys_and_wiring():
    pred, y, g = _grouped()
    raw = pred * 1.6 - 0.3
    rep = calibration_report(pred, y, groups=g, raw_pred=raw, n_bins=4)
    assert list(rep) == list(REPORT_KEYS) + ["ev_ceiling", "frac_low", "frac_high"]
    assert all(type(v) is float for v in rep.values())
    assert rep["ece_quantile"] == pytest.approx(ece(pred, y, 4, "quantile"))
    assert rep["mce"] == pytest.approx(ece(pred, y, 4, "uniform", "max"))
    assert rep["brier"] == pytest.approx(np.mean((pred - y) ** 2))
    assert rep["explained_var"] == pytest.approx(1 - np.var(y - pred) / np.var(y))
    assert rep["frac_low"] == pytest.approx(np.mean(raw < 0))
    assert list(calibration_report(pred, y)) == list(REPORT_KEYS)


def test_calibration_report_refuses_unclipped_predictions():
    with pytest.raises(ValueError, match=r"pred must lie in \[0, 1\].*raw_pred"):
        calibration_report([-0.2, 0.5, 0.9], [0, 1, 1])


def test_grouped_report_by_domain_with_small_group():
    pred, y, g = _grouped(G=10, K=4)
    frame = pd.DataFrame({"pred": pred, "reward": y, "group": g,
                          "domain": ["math"] * 36 + ["code"] * 4,
                          "bucket": (["short", "long"] * 20)})
    rep = grouped_report(frame, "domain")
    assert rep["domain"].tolist() == ["code", "math"] and rep["n"].tolist() == [4, 36]
    assert rep.loc[0, list(REPORT_KEYS[1:]) + ["ev_ceiling"]].isna().all()
    expected = calibration_report(pred[:36], y[:36], groups=g[:36])
    got = rep.iloc[1].drop(["domain"]).astype(float).to_dict()
    assert got == pytest.approx(expected, nan_ok=True)
    two = grouped_report(frame, ["domain", "bucket"], group_col=None)
    assert len(two) == 4 and "ev_ceiling" not in two.columns
    assert two["n"].sum() == 40


def test_grouped_report_missing_column_lists_columns():
    frame = pd.DataFrame({"pred": [0.5], "reward": [1.0], "domain": ["math"]})
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['group'\].*group_col=None"):
        grouped_report(frame, "domain")


# -- bad input -------------------------------------------------------------------------------

BAD_CALLS = {
    "ece": lambda p, y: ece(p, y),
    "reliability_table": lambda p, y: reliability_table(p, y),
    "murphy": lambda p, y: murphy_decomposition(p, y),
    "auroc": lambda p, y: auroc(p, y),
    "slope": lambda p, y: calibration_slope_intercept(p, y),
    "report": lambda p, y: calibration_report(p, y),
    "linear_fit": lambda p, y: LinearCalibrator().fit(p, y),
    "platt_fit": lambda p, y: PlattCalibrator().fit(p, y),
    "isotonic_fit": lambda p, y: IsotonicCalibrator().fit(p, y),
}


@pytest.mark.parametrize("fn", BAD_CALLS.values(), ids=BAD_CALLS.keys())
@pytest.mark.parametrize("pred, outcome, match", [
    ([0.2, float("nan"), 0.5], [0, 1, 1], r"^pred contains NaN"),
    ([0.2, 0.4, 0.5], [0, float("inf"), 1], r"^outcome contains NaN or inf"),
    ([0.2, 0.4, 0.5], [0, 1], r"^outcome has 2 values; expected 3"),
    ([], [], r"^pred is empty"),
    ([0.2, 0.4, 0.5], [0, 2, 1], r"^outcome must lie in \[0, 1\]; got 2.0 at index 1"),
    ([[0.2, 0.4]], [[0, 1]], r"^pred must be 1-D"),
], ids=["nan_pred", "inf_outcome", "length", "empty", "outcome_range", "2d"])
def test_bad_input_names_the_argument(fn, pred, outcome, match):
    if fn is BAD_CALLS["slope"] and "lie in" in match:
        # a least-squares slope is defined for any finite outcome (the trainer's diagnostics
        # feed it rewards a float hair outside [0, 1]); it must not raise there
        assert math.isfinite(fn(pred, outcome)[0])
        return
    with pytest.raises(ValueError, match=match):
        fn(pred, outcome)


def test_bad_group_ids_name_the_argument():
    with pytest.raises(ValueError, match=r"^group_ids has 2 values; expected 3"):
        explained_variance_ceiling([0, 1, 1], ["a", "a"])
    with pytest.raises(ValueError, match=r"^groups has a missing id"):
        cross_fit_recalibrate([0.2, 0.4, 0.6], [0, 1, 1], ["a", None, "b"], n_splits=2)
    with pytest.raises(ValueError, match=r"^target contains NaN"):
        regression_metrics([0.1, 0.2], [0.1, float("nan")])
    with pytest.raises(ValueError, match=r"^raw_pred has 1 values; expected 2"):
        calibration_report([0.1, 0.2], [0, 1], raw_pred=[0.3])
