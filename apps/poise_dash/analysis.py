"""Numbers behind the dashboard's charts: per-step frames, smoothing, calibration, pair metrics.

Pure pandas/numpy on frames read from a run directory (docs/run-format.md); no Streamlit here,
so every function is testable on its own.
"""
from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from poise_probe import stats

#: |advantage| below this counts as zero (float noise: r - b can be 6e-8 when r == b).
ZERO_ADVANTAGE = 1e-6

X_AXES = {"step": "step", "tokens": "generated tokens", "wall": "wall-clock (hours)"}


# --------------------------------------------------------------------------------------------
# metrics.jsonl


def numeric_frame(records: list[dict]) -> pd.DataFrame:
    """Metric records as a frame; a column of numbers (some null) is float64, as RunReader does."""
    if not records:
        return pd.DataFrame({"step": pd.Series([], dtype="int64")})
    frame = pd.DataFrame.from_records(records)
    for name in frame.columns:
        if frame[name].dtype == object:
            values = frame[name].dropna()
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                frame[name] = frame[name].astype("float64")
    return frame


def per_step(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per step (the last non-null value of each key) plus x-axis columns.

    `_x_step`, `_x_tokens` (cumulative `tokens/generated`) and `_x_wall` (hours since the first
    line) are added; a run resumed after a crash keeps its wall-clock gap, which is honest.
    """
    if frame.empty or "step" not in frame:
        return pd.DataFrame(columns=["step", "_x_step", "_x_tokens", "_x_wall"])
    merged = frame.groupby("step", sort=True).last().reset_index()
    merged["_x_step"] = merged["step"].astype(float)
    if "tokens/generated" in merged:
        tokens = pd.to_numeric(merged["tokens/generated"], errors="coerce")
        merged["_x_tokens"] = tokens.fillna(0).cumsum()
    else:  # nothing generated yet (only the step-0 evaluation is logged)
        merged["_x_tokens"] = 0.0
    if "time" in merged:
        t = pd.to_numeric(merged["time"], errors="coerce")
        merged["_x_wall"] = (t - t.min()) / 3600.0
    else:
        merged["_x_wall"] = np.nan
    return merged


def ema(values: Iterable[float], weight: float) -> np.ndarray:
    """TensorBoard's debiased exponential moving average; NaNs are skipped (and stay NaN).

    weight 0 returns the values; 0.9 averages over roughly the last 10 points.
    """
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1); got {weight}")
    if weight == 0.0:
        return x.copy()
    out = np.full_like(x, np.nan)
    last, num = 0.0, 0
    for i, v in enumerate(x):
        if not math.isfinite(v):
            continue
        last = last * weight + (1 - weight) * v
        num += 1
        out[i] = last / (1 - weight ** num)
    return out


def keys_matching(columns: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """Columns matching any glob pattern (`reward/*/mean`), in pattern order then name order."""
    columns = [c for c in columns if not c.startswith("_")]
    out: list[str] = []
    for pattern in patterns:
        for name in sorted(fnmatch.filter(columns, pattern)):
            if name not in out:
                out.append(name)
    return out


def domain_of(key: str) -> str:
    """`reward/math/mean` -> math, `eval/domain/code/accuracy` -> code, else the key itself."""
    parts = key.split("/")
    if len(parts) == 4 and parts[1] == "domain":
        return parts[2]
    if len(parts) == 3:
        return parts[1]
    return key


def stage_shares(steps: pd.DataFrame) -> pd.Series:
    """Mean share of each `timing_s/<stage>` in `timing_s/step` (eval excluded), summing to ~1."""
    if "timing_s/step" not in steps:
        return pd.Series(dtype=float)
    total = pd.to_numeric(steps["timing_s/step"], errors="coerce")
    shares = {}
    for key in steps.columns:
        if key.startswith("timing_s/") and key not in ("timing_s/step", "timing_s/eval"):
            share = pd.to_numeric(steps[key], errors="coerce") / total
            if share.notna().any():
                shares[key.removeprefix("timing_s/")] = float(share.mean())
    series = pd.Series(shares, dtype=float)
    other = 1.0 - series.sum()
    if len(series) and other > 1e-3:
        series["other"] = other
    return series


# --------------------------------------------------------------------------------------------
# config and run summaries


def flatten(mapping: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys: {"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    if not isinstance(mapping, Mapping):
        return {prefix: mapping} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def config_diff(a: Mapping, b: Mapping, *, show_all: bool = False) -> pd.DataFrame:
    """Keys of two configs with their values; only the differing ones unless `show_all`."""
    fa, fb = flatten(a), flatten(b)
    rows = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, "(absent)"), fb.get(key, "(absent)")
        differs = va != vb
        if differs or show_all:
            rows.append({"key": key, "A": _show(va), "B": _show(vb), "differs": differs})
    return pd.DataFrame(rows, columns=["key", "A", "B", "differs"])


def _show(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def best_eval(steps: pd.DataFrame, key: str = "eval/accuracy") -> tuple[float, int] | None:
    """(best value, its step) of a held-out metric, or None when never evaluated."""
    if key not in steps:
        return None
    values = pd.to_numeric(steps[key], errors="coerce")
    if values.notna().sum() == 0:
        return None
    i = values.idxmax()
    return float(values[i]), int(steps.loc[i, "step"])


# --------------------------------------------------------------------------------------------
# probe predictions against observed rewards


def target_column(df: pd.DataFrame) -> str:
    """What the probe predicts: the verifier's `score` when logged, else `reward`."""
    if "score" in df and pd.to_numeric(df["score"], errors="coerce").notna().any():
        return "score"
    return "reward"


def _finite_pair(pred, obs) -> tuple[np.ndarray, np.ndarray]:
    pred, obs = np.asarray(pred, float), np.asarray(obs, float)
    keep = np.isfinite(pred) & np.isfinite(obs)
    return pred[keep], obs[keep]


def reliability_bins(pred: np.ndarray, obs: np.ndarray, n_bins: int | None = None,
                     strategy: str = stats.DEFAULT_STRATEGY) -> pd.DataFrame:
    """`poise_probe.stats.reliability_table` of the finite (prediction, outcome) pairs, with the
    figure's column names: mean prediction and outcome per bin, a 95% interval on the outcome
    (Wilson for 0/1 outcomes) and the predictions' range. n_bins None: about n^(1/3) bins;
    strategy: equal-mass ("quantile", the project's default) or equal-width ("uniform")."""
    p, y = _finite_pair(pred, obs)
    cols = ["bin", "n", "pred_mean", "obs_mean", "obs_lo", "obs_hi", "pred_lo", "pred_hi"]
    if len(p) == 0:
        return pd.DataFrame(columns=cols)
    t = stats.reliability_table(p, y, n_bins, strategy).rename(columns={
        "mean_pred": "pred_mean", "mean_outcome": "obs_mean", "ci_low": "obs_lo",
        "ci_high": "obs_hi", "pred_min": "pred_lo", "pred_max": "pred_hi"})
    # a one-row bin of fractional outcomes has no interval: draw none
    t["obs_lo"] = t["obs_lo"].fillna(t["obs_mean"])
    t["obs_hi"] = t["obs_hi"].fillna(t["obs_mean"])
    return t[cols]


def expected_calibration_error(bins: pd.DataFrame) -> float:
    """ECE over `reliability_bins`: sum_b n_b/N |mean outcome_b - mean prediction_b|."""
    return stats.ece_of_table(bins.rename(columns={"pred_mean": "mean_pred",
                                                   "obs_mean": "mean_outcome"}))


def calibration_summary(pred: np.ndarray, obs: np.ndarray, n_bins: int | None = None,
                        strategy: str = stats.DEFAULT_STRATEGY) -> dict[str, float]:
    """MAE, bias, Pearson, Brier skill (1 - MSE/Var(y)), ECE and calibration slope/intercept of
    the finite pairs, each as `poise_probe.stats` defines it (the probe studies' numbers)."""
    p, y = _finite_pair(pred, obs)
    out = {"n": float(len(p))}
    if len(p) == 0:
        return out | {k: float("nan") for k in ("mae", "bias", "pearson", "brier_skill", "ece",
                                                "slope", "intercept")}
    err = p - y
    out["mae"] = float(np.abs(err).mean())
    out["bias"] = float(err.mean())
    out["pearson"] = stats.pearson(p, y)
    out["brier_skill"] = stats.brier_skill(p, y)
    out["ece"] = expected_calibration_error(reliability_bins(p, y, n_bins, strategy))
    # Slope of outcome on prediction: 1 is calibrated, < 1 over-confident.
    out["slope"], out["intercept"] = stats.calibration_slope_intercept(p, y)
    return out


def _group_codes(df: pd.DataFrame) -> np.ndarray:
    """One code per (step, group_id): a prompt's rollouts within one step."""
    return df.groupby(["step", "group_id"], sort=False).ngroup().to_numpy()


def pair_sign_accuracy(df: pd.DataFrame, target: str,
                       pred: str = "probe_pred") -> tuple[float, int]:
    """Share of within-group pairs with different outcomes that the probe orders correctly.

    Pairs come from rollouts of one prompt (same step and group_id); a tie in the predictions
    counts one half (`poise_probe.stats.pair_sign_accuracy`). Returns (accuracy, number of
    pairs); NaN when there are no such pairs.
    """
    cols = ["step", "group_id", target, pred]
    if any(c not in df for c in cols):
        return float("nan"), 0
    d = df[cols].dropna(subset=[target, pred])
    if d.empty:
        return float("nan"), 0
    return stats.pair_sign_accuracy(d[pred].to_numpy(float), d[target].to_numpy(float),
                                    _group_codes(d))


def sibling_mean(df: pd.DataFrame, column: str) -> pd.Series:
    """Leave-one-out mean of `column` over the other rollouts of each row's prompt (same step
    and group_id), `poise_probe.stats.loo_mean`: the trainer's `loo_targets`. NaN for a lone
    rollout; missing values are left out of their siblings' means."""
    if df.empty:
        return pd.Series([], index=df.index, dtype=float)
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(float)
    return pd.Series(stats.loo_mean(values, _group_codes(df)), index=df.index)


def probe_targets(df: pd.DataFrame) -> tuple[pd.Series, str]:
    """The probe's regression target per rollout and where it came from ("stored",
    "recomputed" or "stored and recomputed").

    Runs of run-format schema 2 store it (`probe_target`: what the trainer fitted, the
    leave-one-out mean of the siblings' scores; NaN where undefined). A step whose table lacks
    the column (an older run) gets `sibling_mean` of its outcomes (`target_column`) instead.
    """
    recomputed = sibling_mean(df, target_column(df))
    if "probe_target" not in df:
        return recomputed, "recomputed"
    stored = pd.to_numeric(df["probe_target"], errors="coerce")
    # a step with no stored value is a table without the column (concatenated as NaN)
    has = stored.notna().groupby(df["step"]).transform("any")
    if has.all():
        return stored, "stored"
    return stored.where(has, recomputed), "stored and recomputed" if has.any() else "recomputed"


def baseline_errors(df: pd.DataFrame, target: str) -> pd.DataFrame:
    """Mean squared error against the reward of each candidate baseline, per domain and overall.

    Candidates: the baseline the run used; the leave-one-out mean of the siblings' rewards (what
    RLOO uses, the group-average reference); the mean of the siblings' probe predictions (the
    POISE baseline); and the rollout's own probe prediction. The question of arXiv 2605.29782:
    is the value estimate better than the group average?
    """
    need = ["step", "group_id", "reward", "baseline", "probe_pred", "domain"]
    if any(c not in df for c in need) or df.empty:
        return pd.DataFrame(columns=["domain", "baseline", "mse", "n"])
    d = df[need].copy()
    cands = {"used by the run": d["baseline"],
             "sibling reward mean (RLOO)": sibling_mean(d, "reward"),
             "sibling probe mean (POISE)": sibling_mean(d, "probe_pred"),
             "own probe prediction": d["probe_pred"]}
    rows = []
    parts = [("all", d.index)] + list(d.groupby("domain").groups.items())
    for dom, sub in parts:
        for name, values in cands.items():
            v = values.loc[sub]
            r = d.loc[sub, "reward"]
            ok = v.notna() & r.notna()
            if ok.any():
                rows.append({"domain": dom, "baseline": name,
                             "mse": float(((r[ok] - v[ok]) ** 2).mean()), "n": int(ok.sum())})
    return pd.DataFrame(rows, columns=["domain", "baseline", "mse", "n"])


# --------------------------------------------------------------------------------------------
# rollout filtering


def advantage_sign(adv: pd.Series) -> pd.Series:
    """"positive" | "negative" | "zero" (|A| < 1e-6) | "none" (NaN) per rollout."""
    a = pd.to_numeric(adv, errors="coerce")
    out = np.where(a > ZERO_ADVANTAGE, "positive",
                   np.where(a < -ZERO_ADVANTAGE, "negative", "zero"))
    return pd.Series(np.where(a.isna(), "none", out), index=adv.index)


@dataclass
class RolloutFilter:
    """What the Rollouts page filters on; every field left at its default keeps every row."""

    domains: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    reward_range: tuple[float, float] | None = None
    advantage_signs: list[str] = field(default_factory=list)
    min_probe_error: float = 0.0
    text: str = ""
    regex: bool = False
    truncated_only: bool = False

    def apply(self, df: pd.DataFrame, target: str) -> pd.DataFrame:
        """Rows of `df` passing every filter (a bad regex raises ValueError naming it)."""
        keep = pd.Series(True, index=df.index)
        if self.domains and "domain" in df:
            keep &= df["domain"].isin(self.domains)
        if self.tasks and "task" in df:
            keep &= df["task"].isin(self.tasks)
        if self.reward_range is not None:
            lo, hi = self.reward_range
            keep &= df["reward"].between(lo, hi)
        if self.advantage_signs:
            keep &= advantage_sign(df["advantage"]).isin(self.advantage_signs)
        if self.min_probe_error > 0:
            err = (df[target] - df["probe_pred"]).abs()
            keep &= err >= self.min_probe_error
        if self.truncated_only and "truncated" in df:
            keep &= df["truncated"].astype(bool)
        if self.text:
            pattern = self.text if self.regex else re.escape(self.text)
            try:
                rx = re.compile(pattern, re.IGNORECASE)
            except re.error as err:
                raise ValueError(f"invalid regular expression {self.text!r}: {err}") from err
            hit = pd.Series(False, index=df.index)
            for col in ("completion", "prompt", "ground_truth", "prompt_id"):
                if col in df:
                    hit |= df[col].astype(str).str.contains(rx, na=False)
            keep &= hit
        return df[keep]


SORTS = {
    "worst probe miss first": ("_probe_err", False),
    "reward (high first)": ("reward", False),
    "reward (low first)": ("reward", True),
    "advantage (high first)": ("advantage", False),
    "advantage (low first)": ("advantage", True),
    "|advantage| (large first)": ("_abs_adv", False),
    "length (long first)": ("num_tokens", False),
    "step, group": (None, True),
}


def sort_rollouts(df: pd.DataFrame, how: str) -> pd.DataFrame:
    """Sort by one of SORTS (NaNs last), ties by step, group and rollout index."""
    col, ascending = SORTS[how]
    base = [c for c in ("step", "group_id", "rollout_idx") if c in df]
    if col is None:
        return df.sort_values(base, kind="stable")
    return df.sort_values([col] + base, ascending=[ascending] + [True] * len(base),
                          na_position="last", kind="stable")
