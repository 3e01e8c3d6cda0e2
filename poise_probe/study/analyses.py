"""Probe studies on a capture: layer x pooling sweep, input ablation, calibration, transfer.

Every analysis fits the trainer's probe (StandardScaler -> Ridge, clipped to [0, 1]) on the
trainer's target, the leave-one-out mean reward of a rollout's siblings, with cross-validation
grouped by prompt (`ridge.prompt_groups`: rollouts of one prompt, or of one prompt text, never
straddle folds). Predictions are scored against the LOO target and against Avg@K, the mean of the
prompt's K rollouts (POISE.md's value-estimation target), and calibration against the individual
rewards (TOOLING.md 2.2). Each function returns tidy pandas tables; `figures.py` draws them.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from poise_probe import stats
from poise_probe.capture.dataset import FEATURE_SETS, CaptureDataset
from poise_probe.study import metrics as M
from poise_probe.study.ridge import (
    cross_val_predict,
    fit_predict,
    grouped_folds,
    prompt_groups,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ALPHAS",
    "PAPER_ABLATION",
    "ablation",
    "best_setting",
    "calibration",
    "calibration_over_steps",
    "study_targets",
    "sweep",
    "transfer",
]

#: 20 ridge strengths, 1e-2 .. 1e5 evenly in log: the nested grouped CV picks one per fold. One
#: eigendecomposition serves them all (study.ridge.RidgePath), so a fine grid costs about what
#: four alphas do (benchmarks/bench_ridge.py).
DEFAULT_ALPHAS = tuple(float(f"{a:.3g}") for a in np.logspace(-2, 5, 20))
#: POISE.md "Published results": Qwen3-4B DAPO-Math, MAE / Pearson r against Avg@8.
PAPER_ABLATION = {"full": (0.126, 0.838), "reasoning": (0.132, 0.821),
                  "entropy": (0.152, 0.780), "prompt": (0.234, 0.569),
                  "length": (0.251, 0.494)}
REASONING_POOLINGS = ("reasoning_last", "response_mean", "response_last")


def study_targets(index: pd.DataFrame) -> pd.DataFrame:
    """Per row: `loo` (mean reward of the other rollouts of its group), `avg_k` (group mean),
    `k` (group size), `cv_group` (prompt group code for CV). Groups need >= 2 rollouts."""
    g = index["group"].astype(str).to_numpy()
    r = index["reward"].to_numpy(dtype=float)
    codes, uniq = pd.factorize(g)
    sizes = np.bincount(codes)
    if (sizes < 2).any():
        lone = uniq[int(np.argmax(sizes < 2))]
        raise ValueError(f"group {lone!r} has a single rollout; leave-one-out targets need >= 2 "
                         f"rollouts per prompt (capture with --samples >= 2).")
    sums = np.bincount(codes, weights=r)
    out = pd.DataFrame({
        "loo": stats.loo_mean(r, codes),
        "avg_k": sums[codes] / sizes[codes],
        "k": sizes[codes],
        "cv_group": prompt_groups(index["prompt_id"].astype(str).to_numpy(),
                                  index["prompt"].astype(str).to_numpy()),
    })
    return out


def _score(pred: np.ndarray, t: pd.DataFrame, reward: np.ndarray) -> dict[str, float]:
    """MAE/RMSE/r/Brier skill against Avg@K and LOO; explained variance of individual rewards."""
    out: dict[str, float] = {}
    for name in ("avg_k", "loo"):
        m = M.regression_metrics(pred, t[name].to_numpy())
        for k in ("mae", "rmse", "pearson", "spearman", "brier_skill"):
            out[f"{k}_{name}"] = m[k]
    rm = M.regression_metrics(pred, reward)
    out["explained_var_reward"] = rm["explained_var"]
    out["mse_reward"] = rm["rmse"] ** 2
    return out


def sweep(ds: CaptureDataset, *, layers: Sequence[int] | None = None,
          windows: Sequence[int] | None = None, poolings: Sequence[str] = REASONING_POOLINGS,
          alphas: Sequence[float] = DEFAULT_ALPHAS, n_splits: int = 5, seed: int = 0,
          progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """Grouped-CV quality of the full POISE input for every layer x window x reasoning pooling.

    One row per setting: layer, window, pooling, alpha (median chosen), n, and `_score` columns.
    """
    t = study_targets(ds.index)
    reward = ds.index["reward"].to_numpy(dtype=float)
    layers = list(ds.layers if layers is None else layers)
    windows = list(ds.windows() if windows is None else windows)
    folds = grouped_folds(t["cv_group"].to_numpy(), n_splits, seed)
    rows = []
    for layer in layers:
        for window in windows:
            for pooling in poolings:
                if pooling != "reasoning_last" and pooling not in ds.poolings:
                    continue
                X = ds.poise_features(layer, window, pooling)
                cv = cross_val_predict(X, t["loo"].to_numpy(), t["cv_group"].to_numpy(), alphas,
                                       seed=seed, folds=folds)
                rows.append({"layer": layer, "window": window, "pooling": pooling,
                             "alpha": float(np.median(cv.alpha)), "n": len(X),
                             **_score(cv.pred, t, reward)})
                if progress:
                    progress(1)
    return pd.DataFrame(rows)


def best_setting(table: pd.DataFrame, metric: str = "pearson_avg_k") -> dict:
    """The sweep row with the best `metric` (lowest for errors, highest otherwise)."""
    lower = metric.startswith(("mae", "rmse", "mse"))
    row = table.sort_values(metric, ascending=lower).iloc[0]
    return {"layer": int(row["layer"]), "window": int(row["window"]),
            "pooling": str(row["pooling"]), "alpha": float(row["alpha"]), metric: float(row[metric])}


def ablation(ds: CaptureDataset, layer: int, window: int, *, pooling: str = "reasoning_last",
             alphas: Sequence[float] = DEFAULT_ALPHAS, n_splits: int = 5, seed: int = 0
             ) -> pd.DataFrame:
    """The paper's input ablation on the same folds: full, reasoning state only, entropy only,
    prompt state only, response length only; with the published Qwen3-4B numbers beside."""
    t = study_targets(ds.index)
    reward = ds.index["reward"].to_numpy(dtype=float)
    folds = grouped_folds(t["cv_group"].to_numpy(), n_splits, seed)
    rows = []
    for fs in FEATURE_SETS:
        X = ds.design(fs, layer, window, pooling)
        cv = cross_val_predict(X, t["loo"].to_numpy(), t["cv_group"].to_numpy(), alphas,
                               seed=seed, folds=folds)
        paper = PAPER_ABLATION[fs]
        rows.append({"feature_set": fs, "n_features": X.shape[1],
                     "alpha": float(np.median(cv.alpha)), **_score(cv.pred, t, reward),
                     "paper_mae": paper[0], "paper_pearson": paper[1]})
    const = np.full(len(t), float(t["loo"].mean()))     # reference: one number for every prompt
    rows.append({"feature_set": "constant", "n_features": 0, "alpha": np.nan,
                 **_score(const, t, reward), "paper_mae": np.nan, "paper_pearson": np.nan})
    return pd.DataFrame(rows)


def oof_predictions(ds: CaptureDataset, layer: int, window: int, *,
                    pooling: str = "reasoning_last", alphas: Sequence[float] = DEFAULT_ALPHAS,
                    n_splits: int = 5, seed: int = 0) -> pd.DataFrame:
    """Out-of-fold probe predictions (clipped and raw) with rewards and targets, one row each."""
    t = study_targets(ds.index)
    X = ds.poise_features(layer, window, pooling)
    cv = cross_val_predict(X, t["loo"].to_numpy(), t["cv_group"].to_numpy(), alphas,
                           n_splits=n_splits, seed=seed)
    idx = ds.index
    return pd.DataFrame({
        "row": idx["row"].to_numpy(), "group": idx["group"].astype(str).to_numpy(),
        "prompt_id": idx["prompt_id"].astype(str).to_numpy(),
        "domain": idx["domain"].astype(str).to_numpy(),
        "data_source": idx["data_source"].astype(str).to_numpy(),
        "step": idx["step"].to_numpy(), "reward": idx["reward"].to_numpy(dtype=float),
        "num_response_tokens": idx["num_response_tokens"].to_numpy(),
        "loo": t["loo"].to_numpy(), "avg_k": t["avg_k"].to_numpy(),
        "cv_group": t["cv_group"].to_numpy(), "fold": cv.fold,
        "pred": cv.pred, "raw_pred": cv.raw_pred})


def calibration(oof: pd.DataFrame, *, methods: Sequence[str] = ("linear", "platt", "isotonic"),
                n_bins: int | None = None, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Calibration of out-of-fold predictions against individual rewards, raw and recalibrated.

    Recalibrators are cross-fitted by prompt group (each row mapped by a calibrator that never
    saw its prompt). Returns tables `summary` (one row per method), `reliability` (bins per
    method and strategy), `by_domain` and `by_length` (raw predictions per group), and `preds`.
    """
    r = oof["reward"].to_numpy(dtype=float)
    groups = oof["cv_group"].to_numpy()
    preds = {"raw": oof["pred"].to_numpy(dtype=float)}
    quiet = logging.getLogger(M.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # one line below instead of a warning per fold
    try:
        for method in methods:
            preds[method] = M.cross_fit_recalibrate(preds["raw"], r, groups, method=method,
                                                    seed=seed)
    finally:
        quiet.setLevel(level)
    if "isotonic" in preds:
        log.warning("isotonic recalibration keeps %d distinct values of %d: it trades resolution "
                    "(what a baseline is for) for calibration; prefer linear",
                    np.unique(preds["isotonic"]).size, np.unique(preds["raw"]).size)
    summary, rel = [], []
    for name, p in preds.items():
        rep = M.calibration_report(p, r, groups=groups,
                                   raw_pred=oof["raw_pred"].to_numpy() if name == "raw" else None,
                                   n_bins=n_bins)
        lo, hi = M.bootstrap_ci(lambda a, b: M.ece(a, b, n_bins, "quantile"), p, r, groups,
                                n_boot=100, seed=seed)
        summary.append({"method": name, **rep, "ece_quantile_ci_low": lo,
                        "ece_quantile_ci_high": hi,
                        "n_distinct_preds": int(np.unique(np.round(p, 9)).size)})
        for strategy in ("uniform", "quantile"):
            tab = M.reliability_table(p, r, n_bins, strategy)
            tab.insert(0, "strategy", strategy)
            tab.insert(0, "method", name)
            rel.append(tab)
    frame = oof.assign(pred=preds["raw"])
    frame["length_bucket"] = pd.qcut(frame["num_response_tokens"].rank(method="first"), 4,
                                     labels=["q1 (shortest)", "q2", "q3", "q4 (longest)"])
    by_domain = M.grouped_report(frame, "domain", group_col="cv_group", raw_col="raw_pred")
    by_length = M.grouped_report(frame, "length_bucket", group_col="cv_group",
                                 raw_col="raw_pred")
    out_preds = oof[["row", "domain", "reward", "avg_k"]].copy()
    for name, p in preds.items():
        out_preds[f"pred_{name}"] = p
    return {"summary": pd.DataFrame(summary), "reliability": pd.concat(rel, ignore_index=True),
            "by_domain": by_domain, "by_length": by_length, "preds": out_preds}


def calibration_over_steps(rollouts: pd.DataFrame, *, window: int = 5,
                           n_bins: int | None = None) -> pd.DataFrame:
    """Calibration of a run's online probe (its logged `probe_pred`) over training steps.

    rollouts: `RunReader.all_rollouts()`; steps are pooled in windows of `window` steps so each
    point has enough rows. Target: the verifier score (`score`, else `reward`).
    """
    need = {"step", "probe_pred", "group_id"}
    if not need <= set(rollouts.columns):
        raise ValueError(f"rollouts lack column(s) {sorted(need - set(rollouts.columns))}; pass "
                         f"RunReader(run).all_rollouts().")
    y_col = "score" if "score" in rollouts.columns else "reward"
    f = rollouts[np.isfinite(rollouts["probe_pred"].to_numpy(dtype=float))].copy()
    if f.empty:
        raise ValueError("the run logged no probe predictions (probe_pred is NaN on every row): "
                         "no probe was fitted yet.")
    f["window_start"] = (f["step"] // window) * window
    f["cal_group"] = f["step"].astype(str) + ":" + f["group_id"].astype(str)
    rows = []
    for start, part in f.groupby("window_start"):
        p = part["probe_pred"].to_numpy(dtype=float)
        y = part[y_col].to_numpy(dtype=float)
        if len(p) < 10:
            continue
        rep = M.calibration_report(np.clip(p, 0, 1), y, groups=part["cal_group"].to_numpy(),
                                   n_bins=n_bins)
        rows.append({"step_start": int(start), "step_end": int(part["step"].max()),
                     "n": len(p), **{k: rep[k] for k in ("mae", "ece_uniform", "ece_quantile",
                                                          "brier", "reliability", "resolution",
                                                          "uncertainty", "explained_var",
                                                          "calib_slope", "calib_intercept",
                                                          "pearson")}})
    return pd.DataFrame(rows)


def transfer(ds: CaptureDataset, layer: int, window: int, *, pooling: str = "reasoning_last",
             alpha: float = 10.0, domain_col: str = "domain",
             sizes: Sequence[int] = (0, 4, 8, 16, 32, 64), repeats: int = 5, seed: int = 0,
             n_splits: int = 5) -> dict[str, pd.DataFrame]:
    """Fit on domain A, evaluate on domain B, for every pair; and how many B prompts recover
    in-domain quality.

    `matrix`: one row per (source, target, feature_set); the diagonal is grouped out-of-fold
    (in-domain), off-diagonal cells fit on all of A and predict all of B. Surface baselines
    (length, entropy, prompt) sit beside the full input. `recovery`: for each A != B, B's prompts
    are split in half (adaptation pool / test); with m pool prompts the source probe is
    recalibrated (linear), refit on A + m prompts of B, or fit on the m prompts alone; scored
    on the test half against Avg@K, with the in-domain probe (fit on the whole pool) as ceiling.
    """
    idx = ds.index
    t = study_targets(idx)
    dom = idx[domain_col].astype(str).to_numpy()
    domains = sorted(set(dom))
    if len(domains) < 2:
        raise ValueError(f"transfer needs >= 2 values of {domain_col!r}; the dataset has "
                         f"{domains}. Capture several task families (e.g. --tasks "
                         f"arith,boolean,code_output).")
    reward = idx["reward"].to_numpy(dtype=float)
    loo, groups = t["loo"].to_numpy(), t["cv_group"].to_numpy()
    sets = {fs: (ds.poise_features(layer, window, pooling) if fs == "full"
                 else ds.design(fs, layer, window, pooling))
            for fs in ("full", "prompt", "entropy", "length")}
    rows = []
    for fs, X in sets.items():
        for a in domains:
            ia = dom == a
            for b in domains:
                ib = dom == b
                if a == b:
                    cv = cross_val_predict(X[ib], loo[ib], groups[ib], [alpha],
                                           n_splits=min(n_splits, len(set(groups[ib]))),
                                           seed=seed)
                    pred = cv.pred
                else:
                    pred = fit_predict(X[ia], loo[ia], X[ib], alpha)
                sc = _score(pred, t[ib].reset_index(drop=True), reward[ib])
                sc["ece_quantile"] = M.ece(pred, reward[ib], None, "quantile")
                rows.append({"source": a, "target": b, "feature_set": fs, "n_train": int(ia.sum()),
                             "n_test": int(ib.sum()), **sc})
    matrix = pd.DataFrame(rows)
    rec = _recovery(sets["full"], t, dom, domains, reward, alpha, sizes, repeats, seed)
    return {"matrix": matrix, "recovery": rec}


def _recovery(X, t, dom, domains, reward, alpha, sizes, repeats, seed) -> pd.DataFrame:
    from poise_probe.study.metrics import LinearCalibrator

    loo, avg, groups = t["loo"].to_numpy(), t["avg_k"].to_numpy(), t["cv_group"].to_numpy()
    rows = []
    rng = np.random.default_rng(seed)
    for b in domains:
        ib = np.flatnonzero(dom == b)
        gb = np.unique(groups[ib])
        for rep in range(repeats):
            perm = rng.permutation(gb)
            pool_g, test_g = perm[: len(perm) // 2], perm[len(perm) // 2:]
            test = ib[np.isin(groups[ib], test_g)]
            in_dom = fit_predict(X[ib[np.isin(groups[ib], pool_g)]],
                                 loo[ib[np.isin(groups[ib], pool_g)]], X[test], alpha)
            ceiling = M.regression_metrics(in_dom, avg[test])
            for a in domains:
                if a == b:
                    continue
                ia = np.flatnonzero(dom == a)
                src_test = fit_predict(X[ia], loo[ia], X[test], alpha)
                for m in sizes:
                    if m > len(pool_g):
                        continue
                    adapt = ib[np.isin(groups[ib], pool_g[:m])]
                    preds = {"source only": src_test}
                    if m > 0:
                        src_adapt = fit_predict(X[ia], loo[ia], X[adapt], alpha)
                        cal = LinearCalibrator().fit(src_adapt, loo[adapt])
                        preds["recalibrate"] = cal.predict(src_test)
                        both = np.concatenate([ia, adapt])
                        preds["refit source+target"] = fit_predict(X[both], loo[both], X[test],
                                                                   alpha)
                        preds["target only"] = fit_predict(X[adapt], loo[adapt], X[test], alpha)
                    for method, p in preds.items():
                        sc = M.regression_metrics(p, avg[test])
                        rows.append({"source": a, "target": b, "target_prompts": m,
                                     "method": method, "repeat": rep, "mae": sc["mae"],
                                     "pearson": sc["pearson"],
                                     "explained_var_reward": M.regression_metrics(
                                         p, reward[test])["explained_var"],
                                     "in_domain_mae": ceiling["mae"],
                                     "in_domain_pearson": ceiling["pearson"]})
    return pd.DataFrame(rows)
