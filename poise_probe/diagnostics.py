"""Per-step diagnostics of the value probe and the advantages it produces (metrics.jsonl scalars).

What to log follows POISE ("Diagnostics worth logging every step") and TOOLING.md section 2.2:
explained variance on individual rewards, computed globally over the step (never averaged over
micro-batches), against the cross-rollout baseline the advantage actually uses.
Every function returns plain Python floats; a quantity with no defined value (zero variance,
no usable pairs) is ``float('nan')`` and the run-dir writer turns it into JSON ``null``.
"""
from __future__ import annotations

import math

import numpy as np

from poise_probe.probe import _as_id_list, _group_index

__all__ = ["probe_diagnostics", "advantage_diagnostics"]

NAN = float("nan")


def _vec(name: str, a, n: int | None = None) -> np.ndarray:
    """1-D finite float64 array of length n, else ValueError naming the argument."""
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


def _ratio_skill(num: float, den: float) -> float:
    """1 - num/den, NaN when den is 0 (nothing to explain)."""
    return 1.0 - num / den if den > 0 else NAN


def _var(x: np.ndarray) -> float:
    """Population variance, exactly 0 for constant values: np.var([0.3] * 3) is ~1e-34 (the mean
    rounds), which would turn 1 - num/den into a huge number instead of NaN."""
    return 0.0 if x.size == 0 or np.ptp(x) == 0 else float(np.var(x))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return NAN
    da, db = a - a.mean(), b - b.mean()
    den = math.sqrt(float(da @ da) * float(db @ db))
    return float(da @ db) / den if den > 0 else NAN


def _cross_baseline(preds: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """b_i = mean over j != i in i's group of preds_j: the baseline POISE subtracts from r_i."""
    sizes = np.bincount(codes, minlength=n_groups)
    if (sizes < 2).any():
        raise ValueError("every prompt needs >= 2 rollouts: the baseline of a rollout is the "
                         "mean prediction from its siblings' features.")
    sums = np.bincount(codes, weights=preds, minlength=n_groups)
    return (sums[codes] - preds) / (sizes[codes] - 1)


def _pair_sign_accuracy(preds: np.ndarray, rewards: np.ndarray, codes: np.ndarray,
                        n_groups: int) -> float:
    """Share of (higher-, lower-reward) rollout pairs of one prompt with pred(higher) > pred(lower).

    Ties in prediction count 1/2 (a constant probe scores 0.5); NaN without any such pair.
    """
    hits, pairs = 0.0, 0
    for g in range(n_groups):
        idx = np.flatnonzero(codes == g)
        r, p = rewards[idx], preds[idx]
        hi = r[:, None] > r[None, :]  # (k, k): row rollout earned more than column rollout
        n = int(hi.sum())
        if n:
            dp = p[:, None] - p[None, :]
            hits += float((dp[hi] > 0).sum()) + 0.5 * float((dp[hi] == 0).sum())
            pairs += n
    return hits / pairs if pairs else NAN


def probe_diagnostics(preds, targets, rewards, group_ids, *, raw_preds=None,
                      prefix: str = "probe") -> dict[str, float]:
    """Probe quality on one step's rollouts, before this step's rows are added to the buffer.

    preds (n,): probe predictions g(phi_i) (clipped); targets (n,): leave-one-out targets (mean
    reward of the other rollouts of i's prompt, `loo_targets`); rewards (n,): individual
    rewards r_i; group_ids (n,): prompt ids, >= 2 rollouts each; raw_preds (n,): unclipped
    ridge output, optional. Variances are population variances (ddof 0) over the whole step.

    Keys (``<prefix>/...``):
    - ``mae``, ``rmse``: mean absolute / root mean squared error of preds against targets.
    - ``bias``: mean(pred - target); > 0 means the probe over-predicts the prompt value.
    - ``pearson``: Pearson r of preds and targets; NaN when either is constant.
    - ``brier_skill``: 1 - MSE(pred, target) / Var(target) (the Brier score for 0/1 rewards);
      NaN when the targets are constant.
    - ``explained_var``: 1 - Var(r - b) / Var(r) on individual rewards r_i, where
      b_i = mean_{j != i} pred_j is the cross-rollout baseline the advantage uses (with two
      rollouts, the sibling's prediction). Var(A) = Var(r) (1 - explained_var) for A = r - b.
      NaN when the rewards are constant.
    - ``ev_ceiling``: explained variance of the oracle baseline b = E[R | x], estimated as
      1 - mean_i s^2(group of i) / Var(r) with s^2 the unbiased within-prompt reward variance
      (the Bernoulli noise E[p(1 - p)] for 0/1 rewards). Noisy for small steps; can be < 0.
    - ``calib_slope``, ``calib_intercept``: least-squares fit r ~ intercept + slope * b (b as
      above); slope < 1 means over-confident predictions. NaN when b is constant.
    - ``pred_p10``, ``pred_p50``, ``pred_p90``: percentiles of preds (linear interpolation).
    - ``pair_sign_acc``: over prompts whose rollouts got different rewards, the share of
      (higher-reward, lower-reward) rollout pairs whose prediction from the higher-reward
      rollout's features is higher; ties count 1/2; NaN when no prompt has mixed rewards.
      The targets are the siblings' rewards, so a probe that reads only the prompt value
      scores about 0.5; above 0.5 means its predictions also track this trajectory's outcome.
    - ``n``: number of rollouts.
    With raw_preds also: ``frac_clipped_low`` / ``frac_clipped_high`` (share of raw < 0 /
    > 1), ``raw_mae`` and ``raw_explained_var`` (mae / explained_var before clipping).
    """
    p = _vec("preds", preds)
    n = p.shape[0]
    if n == 0:
        raise ValueError("probe_diagnostics needs at least one rollout.")
    t = _vec("targets", targets, n)
    r = _vec("rewards", rewards, n)
    ids = _as_id_list(group_ids)
    if len(ids) != n:
        raise ValueError(f"group_ids has {len(ids)} values; expected {n}.")
    codes, uniq = _group_index(ids)
    G = len(uniq)

    err = p - t
    mse = float(np.mean(err ** 2))
    var_r = _var(r)
    b = _cross_baseline(p, codes, G)
    sizes = np.bincount(codes, minlength=G)
    gmean = np.bincount(codes, weights=r, minlength=G) / sizes
    s2 = np.bincount(codes, weights=(r - gmean[codes]) ** 2, minlength=G) / (sizes - 1)
    var_b = _var(b)
    slope = float(np.mean((b - b.mean()) * (r - r.mean()))) / var_b if var_b > 0 else NAN
    p10, p50, p90 = np.percentile(p, [10, 50, 90])

    k = f"{prefix}/"
    out = {
        k + "mae": float(np.mean(np.abs(err))),
        k + "rmse": math.sqrt(mse),
        k + "bias": float(np.mean(err)),
        k + "pearson": _pearson(p, t),
        k + "brier_skill": _ratio_skill(mse, _var(t)),
        k + "explained_var": _ratio_skill(float(np.var(r - b)), var_r),
        k + "ev_ceiling": _ratio_skill(float(np.mean(s2[codes])), var_r),
        k + "calib_slope": slope,
        k + "calib_intercept": float(r.mean() - slope * b.mean()) if var_b > 0 else NAN,
        k + "pred_p10": float(p10),
        k + "pred_p50": float(p50),
        k + "pred_p90": float(p90),
        k + "pair_sign_acc": _pair_sign_accuracy(p, r, codes, G),
        k + "n": float(n),
    }
    if raw_preds is not None:
        raw = _vec("raw_preds", raw_preds, n)
        b_raw = _cross_baseline(raw, codes, G)
        out[k + "frac_clipped_low"] = float(np.mean(raw < 0.0))
        out[k + "frac_clipped_high"] = float(np.mean(raw > 1.0))
        out[k + "raw_mae"] = float(np.mean(np.abs(raw - t)))
        out[k + "raw_explained_var"] = _ratio_skill(float(np.var(r - b_raw)), var_r)
    return out


def advantage_diagnostics(advantages, baselines, rewards, scale=None,
                          prefix: str = "adv") -> dict[str, float]:
    """Health of one step's advantages A_i = (r_i - b_i) / scale_i, over the whole step.

    advantages, baselines, rewards: (n,); scale: None (1, as in POISE and RLOO), a scalar, or
    (n,) (e.g. GRPO's per-group std), so that A * scale + b = r. Population variances (ddof 0).

    Keys (``<prefix>/...``):
    - ``mean``, ``std``, ``abs_mean``: of A as the loss sees it.
    - ``frac_pos``: share of A > 0.
    - ``var_reduction``: 1 - Var(A * scale) / Var(r); the paper reports about 0.3 for POISE
      after the first phase. NaN when the rewards are constant.
    - ``identity_max_abs_err``: max_i |A_i * scale_i + b_i - r_i|; about 1e-7 or less when the
      advantage was built from these baselines.
    - ``baseline_mean``: mean of b.
    """
    a = _vec("advantages", advantages)
    n = a.shape[0]
    if n == 0:
        raise ValueError("advantage_diagnostics needs at least one rollout.")
    b = _vec("baselines", baselines, n)
    r = _vec("rewards", rewards, n)
    if scale is None:
        s = np.ones(n)
    else:
        s = np.asarray(scale, dtype=np.float64)
        s = np.full(n, float(s)) if s.ndim == 0 else _vec("scale", s, n)
    unscaled = a * s  # (n,) = r - b
    k = f"{prefix}/"
    return {
        k + "mean": float(a.mean()),
        k + "std": float(a.std()),
        k + "abs_mean": float(np.abs(a).mean()),
        k + "frac_pos": float(np.mean(a > 0)),
        k + "var_reduction": _ratio_skill(_var(unscaled), _var(r)),
        k + "identity_max_abs_err": float(np.max(np.abs(unscaled + b - r))),
        k + "baseline_mean": float(b.mean()),
    }
