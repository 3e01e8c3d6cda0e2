"""Group and calibration statistics: the one definition of each, shared by the whole project.

The advantage estimators, the probe's targets, the per-step diagnostics, the probe studies and the
dashboard all call these functions, so a number with one name means one thing everywhere (the
dashboard's Probe page and a study report give the same ECE for the same predictions).

Pure numpy, pandas and scikit-learn: no torch, nothing from the trainer, so the dashboard may
import it. Conventions:
- Arrays are 1-D, one entry per rollout; `codes` are prompt-group codes 0..G-1 (`group_codes`).
- Predictions come first, outcomes second (`metric(pred, outcome)`).
- Variances are population variances (ddof 0) unless a docstring says otherwise.
- A quantity with no defined value (constant targets, no usable pairs, one class) is
  ``float('nan')``; bad input raises ValueError naming the argument, the value and the fix.

Calibration binning has one default, `DEFAULT_STRATEGY` = "quantile": B equal-mass bins of the
sorted predictions that never split tied ones, so every bin's mean has a comparable standard
error, with `n_bins=None` meaning B = max(2, round(n^(1/3))) (scikit-learn#33890). "uniform"
gives equal-width bins [k/B, (k+1)/B) over [0, 1]. The studies' ``ece_quantile`` and the
dashboard's Probe page use the default.
"""
from __future__ import annotations

import math
from collections.abc import Hashable
from numbers import Integral

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import roc_auc_score

__all__ = [
    "DEFAULT_STRATEGY", "NAN", "NORMS", "STRATEGIES", "Z95",
    "as_id_list", "auroc", "checked", "brier_skill", "calibration_slope_intercept", "cross_mean", "ece", "ece_of_table",
    "explained_variance", "explained_variance_ceiling", "group_codes", "group_sizes",
    "loo_mean", "mean_interval", "murphy_decomposition", "n_bins_for", "pair_sign_accuracy",
    "pearson", "ratio_skill", "reliability_table", "require_siblings", "spread_var",
    "unit_pair", "vec", "wilson_interval",
]

NAN = float("nan")
Z95 = 1.959963984540054  # standard normal 0.975 quantile: two-sided 95% intervals
STRATEGIES = ("uniform", "quantile")
DEFAULT_STRATEGY = "quantile"
NORMS = ("l1", "l2", "max")


# -- input checks -----------------------------------------------------------------------------

def vec(name: str, a, n: int | None = None) -> np.ndarray:
    """1-D finite float64 array (of length n), else ValueError naming the argument."""
    v = np.asarray(a, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {v.shape}.")
    if n is not None and v.shape[0] != n:
        raise ValueError(f"{name} has {v.shape[0]} values; expected {n}.")
    bad = ~np.isfinite(v)
    if bad.any():
        raise ValueError(f"{name} contains NaN or inf (first at index {int(np.argmax(bad))}); "
                         f"pass only rows with a fitted probe (ProbeBank.predict's mask).")
    return v


def checked(name: str, a, n: int | None = None, unit: bool = False) -> np.ndarray:
    """Non-empty 1-D finite float64 array (of length n; inside [0, 1] if unit), else ValueError."""
    v = vec(name, a, n)
    if v.shape[0] == 0:
        raise ValueError(f"{name} is empty; pass at least one value.")
    if unit:
        bad = (v < 0.0) | (v > 1.0)
        if bad.any():
            i = int(np.argmax(bad))
            fix = ("rewards must lie in [0, 1]: rescale them" if name == "outcome" else
                   "clip raw probe outputs with np.clip(pred, 0, 1) and report the raw ones "
                   "through raw_pred / out_of_range_fraction")
            raise ValueError(f"{name} must lie in [0, 1]; got {float(v[i])!r} at index {i}; "
                             f"{fix}.")
    return v


def unit_pair(pred, outcome, unit_pred: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Checked (pred, outcome), both (n,); outcome (and pred if unit_pred) inside [0, 1]."""
    p = checked("pred", pred, unit=unit_pred)
    return p, checked("outcome", outcome, p.shape[0], unit=True)


def as_id_list(group_ids) -> list[Hashable]:
    """Prompt ids (list, array, Series) as a list of hashables."""
    if isinstance(group_ids, (pd.Series, pd.Index)):
        group_ids = group_ids.to_numpy()
    return group_ids.tolist() if isinstance(group_ids, np.ndarray) else list(group_ids)


def group_codes(group_ids, n: int | None = None, name: str = "group_ids"
                ) -> tuple[np.ndarray, list[Hashable]]:
    """Prompt ids -> (codes (n,) in 0..G-1 by first appearance, unique ids (G,)).

    ValueError when there are not n ids or one is missing (None or NaN)."""
    ids = as_id_list(group_ids)
    if n is not None and len(ids) != n:
        raise ValueError(f"{name} has {len(ids)} values; expected {n}, one prompt id per row.")
    code_of: dict[Hashable, int] = {}
    codes = np.empty(len(ids), dtype=np.int64)
    for i, g in enumerate(ids):
        if g is None or (isinstance(g, float) and math.isnan(g)):
            raise ValueError(f"{name} has a missing id ({g!r}) at index {i}; every rollout needs "
                             f"its prompt id.")
        codes[i] = code_of.setdefault(g, len(code_of))
    return codes, list(code_of)


def group_sizes(codes: np.ndarray) -> np.ndarray:
    """Rollouts per group (G,) from codes (n,)."""
    return np.bincount(np.asarray(codes, dtype=np.int64))


def require_siblings(codes: np.ndarray, uniq: list[Hashable], what: str) -> None:
    """ValueError naming the lone groups unless every group has >= 2 rollouts."""
    sizes = group_sizes(codes)
    if (sizes < 2).any():
        lone = [uniq[g] for g in np.flatnonzero(sizes < 2)]
        shown = ", ".join(repr(g) for g in lone[:5]) + (", ..." if len(lone) > 5 else "")
        raise ValueError(f"{what} needs >= 2 rollouts per prompt (it uses the sibling "
                         f"rollouts); {len(lone)} group(s) have 1: {shown}. Sample "
                         f"num_generations >= 2 per prompt.")


# -- leave-one-out ----------------------------------------------------------------------------

def loo_mean(values, codes) -> np.ndarray:
    """Mean of `values` over the OTHER rows of each row's group. values (n,), codes (n,) -> (n,).

    NaN values are left out of their siblings' means; a row with no other non-NaN value in its
    group gets NaN (check `require_siblings` first where that is an error). The sums use 0/1
    weights over each group's rows, so with two rollouts the result is the sibling's value bit
    for bit. Example: [0, .5, 1] in one group -> [.75, .5, .25].
    """
    v = np.asarray(values, dtype=np.float64)
    c = np.asarray(codes, dtype=np.int64)
    if v.ndim != 1 or c.shape != v.shape:
        raise ValueError(f"values and codes must be 1-D of one length; got {v.shape} and "
                         f"{c.shape}.")
    out = np.full(v.shape, NAN)
    if v.size == 0:
        return out
    sizes = np.bincount(c)
    order = np.argsort(c, kind="stable")             # rows grouped, groups in code order
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    for k in np.unique(sizes[sizes > 1]):             # all groups of one size at once
        groups = np.flatnonzero(sizes == k)
        rows = order[starts[groups][:, None] + np.arange(k)]   # (m, k)
        block = v[rows]
        ok = np.isfinite(block)
        others = 1.0 - np.eye(k)
        total = np.where(ok, block, 0.0) @ others
        count = ok.astype(np.float64) @ others
        with np.errstate(invalid="ignore", divide="ignore"):
            out[rows] = np.where(count > 0, total / count, NAN)
    return out


def cross_mean(values, codes) -> np.ndarray:
    """`loo_mean` of finite values in groups of >= 2 (ValueError otherwise): the baseline
    b_i = mean_{j != i} pred_j that POISE subtracts from r_i. (n,) -> (n,)."""
    v = vec("values", values)
    c = np.asarray(codes, dtype=np.int64)
    if (group_sizes(c) < 2).any():
        raise ValueError("every prompt needs >= 2 rollouts: the baseline of a rollout is the "
                         "mean prediction from its siblings' features.")
    return loo_mean(v, c)


# -- point statistics -------------------------------------------------------------------------

def spread_var(x: np.ndarray) -> float:
    """Population variance, exactly 0 for constant values: np.var([0.3] * 3) is ~1e-34 (the mean
    rounds), which would turn 1 - num/den into a huge number instead of NaN."""
    x = np.asarray(x, dtype=np.float64)
    return 0.0 if x.size == 0 or np.ptp(x) == 0 else float(np.var(x))


def ratio_skill(num: float, den: float) -> float:
    """1 - num/den, NaN when den is 0 (nothing to explain)."""
    return 1.0 - num / den if den > 0 else NAN


def pearson(a, b) -> float:
    """Pearson r, NaN when either side is constant or empty."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size == 0 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return NAN
    da, db = a - a.mean(), b - b.mean()
    den = math.sqrt(float(da @ da) * float(db @ db))
    return float(da @ db) / den if den > 0 else NAN


def brier_skill(pred, target) -> float:
    """1 - MSE(pred, target) / Var(target): the Brier skill score for 0/1 targets, R^2 otherwise.
    NaN when the targets are constant."""
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    return ratio_skill(float(np.mean((p - t) ** 2)), spread_var(t))


def explained_variance(target, baseline) -> float:
    """1 - Var(target - baseline) / Var(target): the share of reward variance a baseline removes
    from the advantage A = r - b (Var(A) = Var(r) (1 - EV)). NaN when the targets are constant."""
    t, b = np.asarray(target, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    return ratio_skill(spread_var(t - b), spread_var(t))


def explained_variance_ceiling(rewards, codes) -> float:
    """Explained variance of the oracle baseline b = E[R | x]: 1 - mean_i s^2(g_i) / Var(R).

    rewards (n,), codes (n,). s^2 is the unbiased within-prompt variance (Bernoulli noise
    p(1 - p) for 0/1 rewards) that no baseline can remove. Uses the rows of prompts with >= 2
    rollouts only (Var(R) too); NaN when there are none or their rewards are constant.
    Noisy for small steps; can be < 0.
    """
    r = np.asarray(rewards, dtype=np.float64)
    c = np.asarray(codes, dtype=np.int64)
    sizes = np.bincount(c, minlength=int(c.max()) + 1 if c.size else 0)
    keep = sizes[c] >= 2 if c.size else np.zeros(0, bool)
    r, c = r[keep], c[keep]
    if r.size == 0 or np.ptp(r) == 0:
        return NAN
    G = sizes.shape[0]
    sizes_k = np.bincount(c, minlength=G)
    with np.errstate(invalid="ignore", divide="ignore"):
        gmean = np.bincount(c, weights=r, minlength=G) / sizes_k
        s2 = np.bincount(c, weights=(r - gmean[c]) ** 2, minlength=G) / (sizes_k - 1)
    return ratio_skill(float(np.mean(s2[c])), spread_var(r))


def calibration_slope_intercept(pred, outcome) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line outcome ~ intercept + slope * pred.

    pred (n,), outcome (n,), finite. Slope < 1: over-confident (predictions spread more than the rewards
    they track). (NaN, NaN) when pred is constant.
    """
    p = checked("pred", pred)
    y = checked("outcome", outcome, p.shape[0])
    var_p = spread_var(p)
    if var_p == 0:
        return NAN, NAN
    slope = float(np.mean((p - p.mean()) * (y - y.mean()))) / var_p
    return slope, float(y.mean() - slope * p.mean())


def pair_sign_accuracy(pred, outcome, codes) -> tuple[float, int]:
    """Share of (higher-, lower-outcome) rollout pairs of one prompt with pred(higher) >
    pred(lower), and the number of such pairs. pred, outcome, codes (n,).

    Ties in prediction count 1/2 (a constant probe scores 0.5); NaN without any such pair.
    """
    p, y = np.asarray(pred, dtype=np.float64), np.asarray(outcome, dtype=np.float64)
    c = np.asarray(codes, dtype=np.int64)
    hits, pairs = 0.0, 0
    order = np.argsort(c, kind="stable")
    bounds = np.flatnonzero(np.diff(c[order])) + 1
    for idx in np.split(order, bounds):
        r, q = y[idx], p[idx]
        hi = r[:, None] > r[None, :]  # (k, k): row rollout earned more than column rollout
        n = int(hi.sum())
        if n:
            dp = q[:, None] - q[None, :]
            hits += float((dp[hi] > 0).sum()) + 0.5 * float((dp[hi] == 0).sum())
            pairs += n
    return (hits / pairs if pairs else NAN), pairs


def auroc(pred, outcome) -> float:
    """Area under the ROC curve, scikit-learn's roc_auc_score: P(pred of a 1 > pred of a 0),
    ties 1/2. pred (n,), outcome (n,). NaN unless every outcome is 0 or 1 and both occur."""
    p, y = unit_pair(pred, outcome, unit_pred=False)
    if not np.isin(y, (0.0, 1.0)).all() or np.unique(y).size < 2:
        return NAN
    return float(roc_auc_score(y, p))


def murphy_decomposition(pred, outcome) -> dict[str, float]:
    """MSE = REL - RES + UNC with CORP's isotonic recalibration (Dimitriadis et al. 2021).

    pred (n,), outcome (n,) in [0, 1]. iso = PAV fit of outcome on pred (ties pooled), then
    REL = MSE(pred) - MSE(iso) (miscalibration), RES = UNC - MSE(iso) (discrimination),
    UNC = MSE(mean outcome) = Var(outcome). For 0/1 outcomes MSE is the Brier score. Both REL
    and RES are >= 0 (identity and constant maps are isotonic); the identity is exact.
    Keys: ``mse``, ``reliability``, ``resolution``, ``uncertainty``.
    """
    p, y = unit_pair(pred, outcome, unit_pred=False)
    iso = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(p, y).predict(p)
    mse = float(np.mean((p - y) ** 2))
    mse_iso = float(np.mean((iso - y) ** 2))
    unc = float(np.mean((y.mean() - y) ** 2))
    return {"mse": mse, "reliability": mse - mse_iso, "resolution": unc - mse_iso,
            "uncertainty": unc}


# -- intervals --------------------------------------------------------------------------------

def t95(n: int) -> float:
    """Two-sided 95% Student-t quantile for a mean of n values (n - 1 degrees of freedom); NaN
    below two values."""
    from scipy.stats import t
    return float(t.ppf(0.975, n - 1)) if n > 1 else math.nan


def wilson_interval(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n Bernoulli trials."""
    phat = k / n
    den = 1.0 + z * z / n
    centre = (phat + z * z / (2 * n)) / den
    half = z * math.sqrt(phat * (1.0 - phat) / n + z * z / (4.0 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values, z: float = Z95, lo: float = 0.0, hi: float = 1.0
                  ) -> tuple[float, float]:
    """mean +- z SE (SE from the ddof=1 std) clipped to [lo, hi]; (NaN, NaN) for one value."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return NAN, NAN
    m = float(v.mean())
    half = z * float(np.std(v, ddof=1)) / math.sqrt(v.size)
    return max(lo, m - half), min(hi, m + half)


# -- binned calibration -----------------------------------------------------------------------

def n_bins_for(n_bins, n: int) -> int:
    """The number of bins: n_bins, or max(2, round(n^(1/3))) for None."""
    if n_bins is None:
        return max(2, int(round(n ** (1.0 / 3.0))))
    if isinstance(n_bins, bool) or not isinstance(n_bins, Integral) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int or None (about n^(1/3)); got {n_bins!r}.")
    return int(n_bins)


def _bin_codes(p: np.ndarray, n_bins: int, strategy: str) -> np.ndarray:
    """Bin index of each prediction in 0..n_bins-1. (n,) -> (n,)."""
    if strategy == "uniform":
        # bin k holds k/B <= p < (k+1)/B; p = 1 joins the last bin
        return np.minimum(np.floor(p * n_bins).astype(np.int64), n_bins - 1)
    if strategy == "quantile":
        # Equal mass by sorted position; a run of tied predictions goes, whole, to the bin of its
        # average rank, so bins never split ties (row order cannot matter) and may come out empty.
        twice_rank = (2.0 * rankdata(p, method="average") - 2.0).astype(np.int64)  # 2 * 0-based
        return (n_bins * twice_rank) // (2 * p.shape[0])
    raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}.")


def reliability_table(pred, outcome, n_bins=None, strategy: str = DEFAULT_STRATEGY
                      ) -> pd.DataFrame:
    """Binned reliability diagram E[R | b in bin] against mean b, with 95% CIs. pred, outcome (n,)
    in [0, 1].

    n_bins: default max(2, round(n^(1/3))). strategy "uniform": bins [k/B, (k+1)/B) over [0, 1];
    "quantile": equal mass by sorted prediction, ties kept in one bin. Empty bins are omitted.
    Columns: ``bin`` (index among n_bins), ``lo``, ``hi`` (uniform: bin edges; quantile: smallest
    and largest prediction in the bin), ``pred_min``, ``pred_max``, ``n``, ``mean_pred``,
    ``mean_outcome``, ``ci_low``, ``ci_high``: Wilson 95% when every outcome is 0 or 1, else
    `mean_interval` (NaN for a one-row bin).
    """
    p, y = unit_pair(pred, outcome)
    B = n_bins_for(n_bins, p.shape[0])
    codes = _bin_codes(p, B, strategy)  # (n,)
    binary = bool(np.isin(y, (0.0, 1.0)).all())
    rows = []
    for k in np.unique(codes):
        m = codes == k
        pk, yk = p[m], y[m]
        nk = int(m.sum())
        ci = wilson_interval(float(yk.sum()), nk) if binary else mean_interval(yk)
        lo, hi = (k / B, (k + 1) / B) if strategy == "uniform" else (pk.min(), pk.max())
        rows.append((int(k), float(lo), float(hi), float(pk.min()), float(pk.max()), nk,
                     float(pk.mean()), float(yk.mean()), *ci))
    cols = ["bin", "lo", "hi", "pred_min", "pred_max", "n", "mean_pred", "mean_outcome",
            "ci_low", "ci_high"]
    return pd.DataFrame(rows, columns=cols).astype({"bin": np.int64, "n": np.int64})


def ece(pred, outcome, n_bins=None, strategy: str = DEFAULT_STRATEGY, norm: str = "l1") -> float:
    """Binned calibration error: count-weighted |mean_pred - mean_outcome| over bins.

    pred, outcome (n,) in [0, 1]. norm "l1": ECE = sum_k w_k gap_k; "l2": RMSCE =
    sqrt(sum_k w_k gap_k^2); "max": MCE = max_k gap_k over non-empty bins (torchmetrics' norms).
    Bins: `reliability_table` (default: equal-mass, about n^(1/3) of them).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}; got {norm!r}.")
    t = reliability_table(pred, outcome, n_bins=n_bins, strategy=strategy)
    return ece_of_table(t, norm)


def ece_of_table(table: pd.DataFrame, norm: str = "l1") -> float:
    """`ece` from a `reliability_table` already computed (NaN for an empty table)."""
    if table.empty:
        return NAN
    w = table["n"].to_numpy() / table["n"].sum()
    gap = np.abs(table["mean_pred"].to_numpy() - table["mean_outcome"].to_numpy())
    if norm == "l1":
        return float(w @ gap)
    if norm == "l2":
        return math.sqrt(float(w @ gap ** 2))
    return float(gap.max())
