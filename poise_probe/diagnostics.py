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

from poise_probe import stats
from poise_probe.stats import cross_mean, pearson, ratio_skill, spread_var, vec

__all__ = ["probe_diagnostics", "advantage_diagnostics"]


def _vectors(what: str, **arrays) -> list[np.ndarray]:
    """The named arrays as finite float64 vectors of one non-zero length, else ValueError."""
    out: list[np.ndarray] = []
    for name, a in arrays.items():
        out.append(vec(name, a, out[0].shape[0] if out else None))
        if out[0].shape[0] == 0:
            raise ValueError(f"{what} needs at least one rollout.")
    return out


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
    p, t, r = _vectors("probe_diagnostics", preds=preds, targets=targets, rewards=rewards)
    n = p.shape[0]
    codes, _ = stats.group_codes(group_ids, n)
    err = p - t
    mse = float(np.mean(err ** 2))
    b = cross_mean(p, codes)  # the baseline the advantage uses
    slope, intercept = stats.calibration_slope_intercept(b, r)
    p10, p50, p90 = np.percentile(p, [10, 50, 90])

    k = f"{prefix}/"
    out = {
        k + "mae": float(np.mean(np.abs(err))),
        k + "rmse": math.sqrt(mse),
        k + "bias": float(np.mean(err)),
        k + "pearson": pearson(p, t),
        k + "brier_skill": ratio_skill(mse, spread_var(t)),
        k + "explained_var": stats.explained_variance(r, b),
        k + "ev_ceiling": stats.explained_variance_ceiling(r, codes),
        k + "calib_slope": slope,
        k + "calib_intercept": intercept,
        k + "pred_p10": float(p10),
        k + "pred_p50": float(p50),
        k + "pred_p90": float(p90),
        k + "pair_sign_acc": stats.pair_sign_accuracy(p, r, codes)[0],
        k + "n": float(n),
    }
    if raw_preds is not None:
        raw = vec("raw_preds", raw_preds, n)
        b_raw = cross_mean(raw, codes)
        out[k + "frac_clipped_low"] = float(np.mean(raw < 0.0))
        out[k + "frac_clipped_high"] = float(np.mean(raw > 1.0))
        out[k + "raw_mae"] = float(np.mean(np.abs(raw - t)))
        out[k + "raw_explained_var"] = stats.explained_variance(r, b_raw)
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
    a, b, r = _vectors("advantage_diagnostics", advantages=advantages, baselines=baselines,
                       rewards=rewards)
    n = a.shape[0]
    if scale is None:
        s = np.ones(n)
    else:
        s = np.asarray(scale, dtype=np.float64)
        s = np.full(n, float(s)) if s.ndim == 0 else vec("scale", s, n)
    unscaled = a * s  # (n,) = r - b
    k = f"{prefix}/"
    return {
        k + "mean": float(a.mean()),
        k + "std": float(a.std()),
        k + "abs_mean": float(np.abs(a).mean()),
        k + "frac_pos": float(np.mean(a > 0)),
        k + "var_reduction": ratio_skill(spread_var(unscaled), spread_var(r)),
        k + "identity_max_abs_err": float(np.max(np.abs(unscaled + b - r))),
        k + "baseline_mean": float(b.mean()),
    }
