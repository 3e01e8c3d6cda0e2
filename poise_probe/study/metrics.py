"""Metric suite for an expected-reward predictor b(x) ~ E[R | x], R in [0, 1] (TOOLING.md 2.2).

Pure numpy / pandas / scikit-learn. Every metric takes the predictions first and the rewards
second (`metric(pred, outcome)`), the order stable-baselines3#225 got wrong. `pred` is what the
advantage uses (clipped to [0, 1]); `raw_pred` is the unclipped ridge output. Rewards are the
individual rollout rewards, binary or fractional, never a group's empirical mean (TOOLING.md 2.2.1).
A quantity with no defined value (constant targets, one class only) is ``float('nan')``, as in
`poise_probe.diagnostics`; bad input raises ValueError naming the argument.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from numbers import Integral

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import expit, logit
from scipy.stats import rankdata
from sklearn.base import BaseEstimator, clone
from sklearn.isotonic import IsotonicRegression
from sklearn.utils.validation import check_is_fitted

from poise_probe import stats
from poise_probe.stats import (NAN, NORMS, STRATEGIES, Z95, auroc, calibration_slope_intercept,
                               ece, murphy_decomposition, pearson, ratio_skill,
                               reliability_table, spread_var)
from poise_probe.stats import checked as _check
from poise_probe.stats import unit_pair as _pair

__all__ = [
    "CALIBRATORS",
    "REPORT_KEYS",
    "IsotonicCalibrator",
    "LinearCalibrator",
    "PlattCalibrator",
    "auroc",
    "bootstrap_ci",
    "calibration_report",
    "calibration_slope_intercept",
    "cross_fit_recalibrate",
    "ece",
    "explained_variance_ceiling",
    "grouped_report",
    "make_calibrator",
    "murphy_decomposition",
    "out_of_range_fraction",
    "regression_metrics",
    "reliability_table",
]

logger = logging.getLogger(__name__)

# the point and binned statistics are poise_probe.stats', re-exported here for the studies
__all__ += ["NAN", "NORMS", "STRATEGIES", "Z95"]

# calibration_report keys, in order; "ev_ceiling" follows with groups, "frac_low"/"frac_high"
# with raw_pred.
REPORT_KEYS = ("n", "mae", "rmse", "bias", "pearson", "spearman", "brier_skill", "explained_var",
               "ece_uniform", "ece_quantile", "mce", "brier", "reliability", "resolution",
               "uncertainty", "calib_slope", "calib_intercept", "auroc")


# -- point metrics ----------------------------------------------------------------------------

def regression_metrics(pred, target) -> dict[str, float]:
    """Error, skill and correlation of pred against target. pred (n,), target (n,).

    Keys: ``n``; ``mae``; ``rmse``; ``bias`` = mean(pred - target) (> 0: over-predicts);
    ``pearson``; ``spearman`` (average ranks for ties); ``brier_skill`` = 1 - MSE / Var(target);
    ``explained_var`` = 1 - Var(target - pred) / Var(target), the share of reward variance the
    baseline removes from the advantage target - pred (POISE; TOOLING.md 2.2.3). Skills are
    NaN when target is constant, correlations when either side is. Population variances.
    """
    p = _check("pred", pred)
    t = _check("target", target, p.shape[0])
    err = p - t  # (n,)
    mse = float(np.mean(err ** 2))
    var_t = spread_var(t)
    return {
        "n": float(p.shape[0]),
        "mae": float(np.mean(np.abs(err))),
        "rmse": math.sqrt(mse),
        "bias": float(np.mean(err)),
        "pearson": pearson(p, t),
        "spearman": pearson(rankdata(p), rankdata(t)),
        "brier_skill": ratio_skill(mse, var_t),
        "explained_var": ratio_skill(spread_var(t - p), var_t),
    }


def explained_variance_ceiling(rewards, group_ids) -> float:
    """Explained variance of the oracle baseline b = E[R | x]: 1 - mean_i s^2(g_i) / Var(R).

    rewards (n,), group_ids (n,). s^2 is the unbiased within-prompt variance (Bernoulli noise
    p(1 - p) for 0/1 rewards) that no baseline can remove. Uses the rows of prompts with >= 2
    rollouts only (Var(R) too); NaN when there are none or their rewards are constant.
    The estimator of ``probe/ev_ceiling`` (`poise_probe.stats.explained_variance_ceiling`).
    """
    r = _check("rewards", rewards)
    codes, _ = stats.group_codes(group_ids, r.shape[0], "group_ids")
    return stats.explained_variance_ceiling(r, codes)


def out_of_range_fraction(raw_pred, lo: float = 0.0, hi: float = 1.0) -> dict[str, float]:
    """Share of raw (unclipped) predictions below lo and above hi. raw_pred (n,).

    Keys: ``frac_low``, ``frac_high``.
    """
    if not float(lo) < float(hi):
        raise ValueError(f"out_of_range_fraction needs lo < hi; got lo={lo!r}, hi={hi!r}.")
    raw = _check("raw_pred", raw_pred)
    return {"frac_low": float(np.mean(raw < lo)), "frac_high": float(np.mean(raw > hi))}


# -- recalibrators ----------------------------------------------------------------------------

class LinearCalibrator(BaseEstimator):
    """Recalibrate as intercept_ + slope_ * pred (least squares), clipped to [0, 1]; the default.

    Attributes
    ----------
    slope_, intercept_ : the fitted line. With constant predictions the slope is undefined; the
        least-squares solution with the smallest slope (0, intercept = mean outcome) is used
        and a warning logged.
    """

    def fit(self, pred, outcome) -> LinearCalibrator:
        """Fit on held-out rows. pred (n,) raw or clipped, outcome (n,) in [0, 1]."""
        p, y = _pair(pred, outcome, unit_pred=False)
        slope, intercept = calibration_slope_intercept(p, y)
        if math.isnan(slope):
            logger.warning("LinearCalibrator: constant predictions (%r); fitting the mean "
                           "outcome %.4g with slope 0.", float(p[0]), float(y.mean()))
            slope, intercept = 0.0, float(y.mean())
        self.slope_, self.intercept_ = slope, intercept
        return self

    def predict(self, pred) -> np.ndarray:
        """Recalibrated predictions in [0, 1]. (n,) -> (n,)."""
        check_is_fitted(self)
        p = _check("pred", pred)
        return np.clip(self.intercept_ + self.slope_ * p, 0.0, 1.0)


class PlattCalibrator(BaseEstimator):
    """Recalibrate as sigmoid(intercept_ + slope_ * logit(clip(pred, eps, 1 - eps))) (Platt 1999).

    Fitted by minimising the mean cross-entropy, which accepts fractional outcomes in [0, 1]
    (its minimiser is still the conditional mean). Slope < 1 shrinks over-confident
    predictions toward 1/2.

    Parameters
    ----------
    eps : predictions are clipped to [eps, 1 - eps] before the logit.
    max_iter : iteration cap of the L-BFGS-B fit; a fit that stops early logs a warning.

    Attributes
    ----------
    slope_, intercept_ : fitted logit-scale line. n_iter_ : optimiser iterations.
    """

    def __init__(self, eps: float = 1e-6, max_iter: int = 1000):
        self.eps = eps
        self.max_iter = max_iter

    def _logit(self, p: np.ndarray) -> np.ndarray:
        return logit(np.clip(p, self.eps, 1.0 - self.eps))

    def fit(self, pred, outcome) -> PlattCalibrator:
        """Fit on held-out rows. pred (n,), outcome (n,) in [0, 1], binary or fractional."""
        if not 0.0 < float(self.eps) < 0.5:
            raise ValueError(f"eps must lie in (0, 0.5); got {self.eps!r}.")
        p, y = _pair(pred, outcome, unit_pred=False)
        x = self._logit(p)  # (n,)

        def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            z = theta[0] + theta[1] * x
            # mean of -[y log s + (1 - y) log(1 - s)] with s = sigmoid(z), written stably
            loss = float(np.mean(np.logaddexp(0.0, z) - y * z))
            d = expit(z) - y
            return loss, np.array([d.mean(), (d * x).mean()])

        res = minimize(loss_grad, np.array([0.0, 1.0]), jac=True, method="L-BFGS-B",
                       options={"maxiter": int(self.max_iter), "gtol": 1e-10, "ftol": 1e-15})
        if not res.success:
            logger.warning("PlattCalibrator: fit did not converge (%s); separable data push the "
                           "slope to infinity.", res.message)
        self.intercept_, self.slope_ = float(res.x[0]), float(res.x[1])
        self.n_iter_ = int(res.nit)
        return self

    def predict(self, pred) -> np.ndarray:
        """Recalibrated predictions in [0, 1]. (n,) -> (n,)."""
        check_is_fitted(self)
        p = _check("pred", pred)
        return np.clip(expit(self.intercept_ + self.slope_ * self._logit(p)), 0.0, 1.0)


class IsotonicCalibrator(BaseEstimator):
    """Recalibrate by the isotonic (PAV) map of outcome on pred, clipped to [0, 1].

    Pooling adjacent violators merges distinct predictions into one value, and a baseline's
    worth lies in its resolution (calibre: "2,000 distinct scores into 82"), so ``fit`` logs a
    warning with the number of distinct values kept whenever it loses any.

    Attributes
    ----------
    isotonic_ : fitted sklearn IsotonicRegression. n_distinct_in_, n_distinct_out_ : distinct
        predictions in the fit data, and distinct values they map to.
    """

    def fit(self, pred, outcome) -> IsotonicCalibrator:
        """Fit on held-out rows. pred (n,), outcome (n,) in [0, 1]."""
        p, y = _pair(pred, outcome, unit_pred=False)
        self.isotonic_ = IsotonicRegression(increasing=True, out_of_bounds="clip",
                                            y_min=0.0, y_max=1.0).fit(p, y)
        self.n_distinct_in_ = int(np.unique(p).size)
        self.n_distinct_out_ = int(np.unique(self.isotonic_.predict(p)).size)
        if self.n_distinct_out_ < self.n_distinct_in_:
            logger.warning("IsotonicCalibrator: %d distinct predictions map to %d distinct values "
                           "(lost resolution); prefer the linear calibrator for a baseline.",
                           self.n_distinct_in_, self.n_distinct_out_)
        return self

    def predict(self, pred) -> np.ndarray:
        """Recalibrated predictions in [0, 1]. (n,) -> (n,)."""
        check_is_fitted(self)
        return np.clip(self.isotonic_.predict(_check("pred", pred)), 0.0, 1.0)


CALIBRATORS: dict[str, type[BaseEstimator]] = {
    "linear": LinearCalibrator,
    "platt": PlattCalibrator,
    "isotonic": IsotonicCalibrator,
}


def make_calibrator(name: str, **params) -> BaseEstimator:
    """A new unfitted calibrator by name ("linear", "platt", "isotonic"); params go to __init__."""
    if name not in CALIBRATORS:
        raise ValueError(f"unknown calibrator {name!r}; known: {sorted(CALIBRATORS)}.")
    return CALIBRATORS[name](**params)


def cross_fit_recalibrate(pred, outcome, groups, method="linear", n_splits: int = 5,
                          seed: int = 0) -> np.ndarray:
    """Out-of-fold recalibration: each fold's rows mapped by a calibrator fit on the other folds.

    pred (n,), outcome (n,) in [0, 1], groups (n,) prompt ids: a prompt's rollouts share one fold,
    so no calibrator sees a sibling of a row it maps. method: a CALIBRATORS name or an unfitted
    calibrator (cloned per fold). Prompts go to folds round-robin after a seeded shuffle.
    Compute metrics on the result, not on pred (aaanalysis#480). -> (n,) in [0, 1].
    """
    p, y = _pair(pred, outcome, unit_pred=False)
    codes, uniq = stats.group_codes(groups, p.shape[0], "groups")
    G = len(uniq)
    if isinstance(n_splits, bool) or not isinstance(n_splits, Integral) or n_splits < 2:
        raise ValueError(f"n_splits must be an int >= 2; got {n_splits!r}.")
    if G < n_splits:
        raise ValueError(f"n_splits={n_splits} folds need at least as many prompt groups; got "
                         f"{G}; lower n_splits.")
    proto = make_calibrator(method) if isinstance(method, str) else method
    fold_of_group = np.empty(G, dtype=np.int64)
    fold_of_group[np.random.default_rng(seed).permutation(G)] = np.arange(G) % n_splits
    fold = fold_of_group[codes]  # (n,)
    out = np.empty_like(p)
    for k in range(n_splits):
        held = fold == k
        cal = clone(proto).fit(p[~held], y[~held])
        out[held] = cal.predict(p[held])
    return out


def bootstrap_ci(stat_fn: Callable[[np.ndarray, np.ndarray], float], pred, outcome, groups,
                 n_boot: int = 200, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of stat_fn(pred, outcome) under a cluster bootstrap over prompt groups.

    pred (n,), outcome (n,), groups (n,). Each replicate draws G prompts with replacement and
    keeps all their rollouts, since rollouts of one prompt are correlated. Replicates where the
    statistic is NaN (e.g. AUROC with one class) are dropped with a warning; (NaN, NaN) if all are.
    """
    p = _check("pred", pred)
    y = _check("outcome", outcome, p.shape[0])
    codes, uniq = stats.group_codes(groups, p.shape[0], "groups")
    G = len(uniq)
    if G < 2:
        raise ValueError(f"bootstrap_ci resamples prompt groups and needs at least 2; got {G}.")
    if isinstance(n_boot, bool) or not isinstance(n_boot, Integral) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int; got {n_boot!r}.")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), e.g. 0.95; got {level!r}.")
    order = np.argsort(codes, kind="stable")  # rows sorted by group
    sizes = np.bincount(codes, minlength=G)
    starts = np.cumsum(sizes) - sizes
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for b in range(n_boot):
        s = rng.integers(0, G, size=G)  # (G,) sampled groups
        sz = sizes[s]
        # position j of the replicate -> row starts[s_j] + (j - first position of group j)
        offs = np.arange(int(sz.sum())) + np.repeat(starts[s] - (np.cumsum(sz) - sz), sz)
        rows = order[offs]
        reps[b] = float(stat_fn(p[rows], y[rows]))
    ok = np.isfinite(reps)
    if not ok.any():
        return NAN, NAN
    if not ok.all():
        logger.warning("bootstrap_ci: %d of %d replicates gave a non-finite statistic and were "
                       "dropped.", int((~ok).sum()), n_boot)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps[ok], [alpha, 1.0 - alpha])
    return float(lo), float(hi)


# -- reports ----------------------------------------------------------------------------------

def calibration_report(pred, outcome, groups=None, raw_pred=None, n_bins=None) -> dict[str, float]:
    """All metrics of one evaluation set as one flat dict of floats (keys: REPORT_KEYS).

    pred (n,) in [0, 1] (clipped, or recalibrated out of fold), outcome (n,) individual rewards,
    groups (n,) prompt ids (adds ``ev_ceiling``), raw_pred (n,) unclipped outputs (adds
    ``frac_low``, ``frac_high``). ``ece_uniform``/``ece_quantile``: L1 ECE with equal-width /
    equal-mass bins; ``mce``: max error, equal-width bins; ``brier``, ``reliability``,
    ``resolution``, ``uncertainty``: murphy_decomposition; the rest as in regression_metrics
    (target = outcome), calibration_slope_intercept and auroc.
    """
    p, y = _pair(pred, outcome)
    out = regression_metrics(p, y)
    out["ece_uniform"] = ece(p, y, n_bins, "uniform")
    out["ece_quantile"] = ece(p, y, n_bins, "quantile")
    out["mce"] = ece(p, y, n_bins, "uniform", norm="max")
    m = murphy_decomposition(p, y)
    out["brier"] = m["mse"]
    for k in ("reliability", "resolution", "uncertainty"):
        out[k] = m[k]
    out["calib_slope"], out["calib_intercept"] = calibration_slope_intercept(p, y)
    out["auroc"] = auroc(p, y)
    if groups is not None:
        out["ev_ceiling"] = explained_variance_ceiling(y, groups)
    if raw_pred is not None:
        out.update(out_of_range_fraction(_check("raw_pred", raw_pred, p.shape[0])))
    return {k: float(v) for k, v in out.items()}


def grouped_report(frame: pd.DataFrame, by: str | Sequence[str], pred_col: str = "pred",
                   outcome_col: str = "reward", group_col: str | None = "group",
                   raw_col: str | None = None, min_rows: int = 10) -> pd.DataFrame:
    """calibration_report per value of `by` (data_source, length bucket, step window...).

    frame: one row per rollout. by: column name(s). group_col: prompt ids for ``ev_ceiling``
    (None: skip); raw_col: unclipped outputs for ``frac_low``/``frac_high`` (None: skip).
    Returns one row per value of `by` (sorted, NaN values kept as a group): the `by` columns,
    ``n`` (rows) and the report keys; slices with fewer than min_rows rows get NaN metrics.
    """
    by_cols = [by] if isinstance(by, str) else list(by)
    if not by_cols:
        raise ValueError("by must name at least one column, e.g. by='domain'.")
    needed = by_cols + [pred_col, outcome_col] + [c for c in (group_col, raw_col) if c is not None]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks column(s) {missing}; it has {list(frame.columns)} (pass "
                         f"group_col=None to skip ev_ceiling).")
    keys = list(REPORT_KEYS) + (["ev_ceiling"] if group_col is not None else []) + \
        (["frac_low", "frac_high"] if raw_col is not None else [])
    rows = []
    for value, sub in frame.groupby(by_cols, sort=True, dropna=False):
        value = value if isinstance(value, tuple) else (value,)
        if len(sub) < min_rows:
            metrics = dict.fromkeys(keys, NAN)
        else:
            try:
                metrics = calibration_report(
                    sub[pred_col].to_numpy(), sub[outcome_col].to_numpy(),
                    groups=None if group_col is None else sub[group_col].to_numpy(),
                    raw_pred=None if raw_col is None else sub[raw_col].to_numpy())
            except ValueError as e:
                raise ValueError(f"grouped_report slice {dict(zip(by_cols, value))}: {e}") from e
        metrics["n"] = len(sub)
        rows.append({**dict(zip(by_cols, value)), **metrics})
    out = pd.DataFrame(rows, columns=by_cols + keys)
    return out.astype({"n": np.int64})
