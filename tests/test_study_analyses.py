"""Probe studies: planted signals are found, leaks are not rewarded, transfer sees domain shift."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from poise_probe.capture.dataset import CaptureDataset
from poise_probe.study import analyses as A
from poise_probe.study import report as R


def make_dataset(n_prompts=120, k=4, hidden=8, layers=(0, 1, 2), windows=(1, 5),
                 signal=(1, 5), seed=0, domains=("math", "code"), shift=False):
    """Rewards ~ Bernoulli(p(prompt)); only layer/window `signal` carries p (prompt vector)."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.05, 0.95, n_prompts)
    dom = np.array([domains[i % len(domains)] for i in range(n_prompts)])
    rows = n_prompts * k
    g = np.repeat(np.arange(n_prompts), k)
    reward = (rng.uniform(size=rows) < p[g]).astype(float)
    index = pd.DataFrame({
        "row": np.arange(rows), "prompt_id": [f"p{i}" for i in g],
        "prompt": [f"question {i}" for i in g], "group": [f"g{i}" for i in g],
        "domain": dom[g], "data_source": dom[g], "step": -1, "reward": reward,
        "num_response_tokens": rng.integers(5, 50, rows)})
    tensors = {}
    for layer in layers:
        for w in windows:
            for kind in ("prompt_last", "reasoning_last"):
                x = rng.normal(size=(rows, hidden)).astype(np.float32)
                if (layer, w) == signal and kind == "prompt_last":
                    direction = np.where(dom[g] == domains[0], 1.0, -1.0) if shift else 1.0
                    x[:, 0] = 3 * direction * (p[g] - 0.5) + 0.05 * rng.normal(size=rows)
                tensors[f"layers.{layer}.resid_post.{kind}_{w}"] = x
        for extra in ("response_mean", "response_last"):
            tensors[f"layers.{layer}.resid_post.{extra}"] = rng.normal(
                size=(rows, hidden)).astype(np.float32)
    tensors["entropy_stats"] = rng.normal(size=(rows, 3)).astype(np.float32)
    tensors["seq_stats"] = rng.normal(size=(rows, 5)).astype(np.float32)
    poolings = ([f"prompt_last_{w}" for w in windows] + [f"reasoning_last_{w}" for w in windows]
                + ["response_mean", "response_last"])
    return CaptureDataset.from_arrays(index, tensors, layers=layers, poolings=poolings,
                                      hidden_size=hidden), p


def test_targets_are_leave_one_out_and_avg_at_k():
    idx = pd.DataFrame({"group": ["a", "a", "a", "b", "b"], "reward": [0, 0.5, 1, 1, 0],
                        "prompt_id": ["x", "x", "x", "y", "y"],
                        "prompt": ["q1", "q1", "q1", "q2", "q2"]})
    t = A.study_targets(idx)
    np.testing.assert_allclose(t["loo"], [0.75, 0.5, 0.25, 0, 1])
    np.testing.assert_allclose(t["avg_k"], [0.5, 0.5, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="single rollout"):
        A.study_targets(idx.iloc[:4])


def test_duplicate_prompt_text_under_two_ids_shares_a_cv_group():
    idx = pd.DataFrame({"group": ["a", "a", "b", "b"], "reward": [0, 1, 1, 0],
                        "prompt_id": ["x", "x", "y", "y"], "prompt": ["same"] * 4})
    assert A.study_targets(idx)["cv_group"].nunique() == 1


def test_sweep_finds_the_planted_layer_and_window():
    ds, _ = make_dataset()
    table = A.sweep(ds, alphas=(1.0, 10.0))
    assert len(table) == 3 * 2 * 3
    best = A.best_setting(table)
    assert (best["layer"], best["window"]) == (1, 5)
    assert best["pearson_avg_k"] > 0.8
    assert table[(table.layer == 0)]["pearson_avg_k"].max() < 0.4


def test_grouped_cv_does_not_reward_memorising_prompts():
    """Per-prompt random features and per-prompt random values: a split that let one prompt's
    rollouts sit on both sides would fit them; grouped CV must score near zero."""
    rng = np.random.default_rng(1)
    ds, _ = make_dataset(n_prompts=60, k=4, hidden=40, layers=(0,), windows=(1,), signal=(9, 9))
    g = np.repeat(np.arange(60), 4)
    ds._cache["layers.0.resid_post.prompt_last_1"] = rng.normal(size=(60, 40))[g].astype(
        np.float32)
    ds.index["reward"] = rng.uniform(size=60)[g]           # every rollout of a prompt the same
    table = A.sweep(ds, alphas=(0.01,), poolings=("reasoning_last",))
    assert table["pearson_avg_k"].iloc[0] < 0.35
    from poise_probe.study.ridge import cross_val_predict
    X = ds.poise_features(0, 1)
    y = A.study_targets(ds.index)["loo"].to_numpy()
    leaky = [(np.flatnonzero(np.arange(240) % 5 != f), np.flatnonzero(np.arange(240) % 5 == f))
             for f in range(5)]                             # row-wise folds split every prompt
    # the leak would have paid: row-wise CV memorises each prompt's value from its siblings
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import KFold
    from sklearn.model_selection import cross_val_predict as sk_cvp
    leak_pred = sk_cvp(Ridge(alpha=0.01), X, y, cv=KFold(5, shuffle=True, random_state=0))
    assert np.corrcoef(leak_pred, A.study_targets(ds.index)["avg_k"])[0, 1] > 0.6
    with pytest.raises(ValueError, match="leaks across the split"):
        cross_val_predict(X, y, A.study_targets(ds.index)["cv_group"].to_numpy(), [0.01],
                          folds=leaky)


def test_ablation_orders_the_planted_inputs():
    ds, _ = make_dataset()
    abl = A.ablation(ds, 1, 5, alphas=(1.0, 10.0)).set_index("feature_set")
    assert list(abl.index) == ["full", "reasoning", "entropy", "prompt", "length", "constant"]
    assert abl.loc["prompt", "pearson_avg_k"] > 0.8
    assert abl.loc["full", "pearson_avg_k"] > 0.8
    assert abl.loc["entropy", "pearson_avg_k"] < 0.4
    assert abl.loc["full", "mae_avg_k"] < abl.loc["constant", "mae_avg_k"]
    assert abl.loc["full", "paper_mae"] == 0.126 and abl.loc["length", "paper_pearson"] == 0.494


def test_calibration_recalibrates_out_of_fold_and_reports_every_method():
    ds, _ = make_dataset()
    oof = A.oof_predictions(ds, 1, 5, alphas=(10.0,))
    oof["pred"] = np.clip(0.5 * oof["pred"] + 0.45, 0, 1)  # plant over-confidence and bias
    res = A.calibration(oof)
    s = res["summary"].set_index("method")
    assert list(s.index) == ["raw", "linear", "platt", "isotonic"]
    assert s.loc["linear", "ece_quantile"] < s.loc["raw", "ece_quantile"]
    assert not np.allclose(res["preds"]["pred_linear"], res["preds"]["pred_raw"])
    for _, row in s.iterrows():                               # Murphy identity per method
        assert row["brier"] == pytest.approx(row["reliability"] - row["resolution"]
                                             + row["uncertainty"], abs=1e-9)
    assert set(res["reliability"]["strategy"]) == {"uniform", "quantile"}
    assert set(res["by_domain"]["domain"]) == {"math", "code"}
    assert len(res["by_length"]) == 4


def test_calibration_over_steps_reads_the_runs_probe_predictions():
    rng = np.random.default_rng(0)
    steps = np.repeat(np.arange(20), 32)
    p = rng.uniform(size=len(steps))
    frame = pd.DataFrame({"step": steps, "group_id": np.tile(np.repeat(np.arange(16), 2), 20),
                          "probe_pred": np.where(steps < 3, np.nan, p),
                          "score": (rng.uniform(size=len(steps)) < p).astype(float)})
    frame["reward"] = frame["score"]
    t = A.calibration_over_steps(frame, window=5)
    assert t["step_start"].tolist() == [0, 5, 10, 15]
    assert t["n"].tolist() == [64, 160, 160, 160]          # steps 0-2 had no probe yet
    with pytest.raises(ValueError, match="no probe predictions"):
        A.calibration_over_steps(frame.assign(probe_pred=np.nan))


def test_transfer_matrix_sees_a_planted_domain_shift():
    ds, _ = make_dataset(n_prompts=160, shift=True)
    res = A.transfer(ds, 1, 5, alpha=1.0, sizes=(0, 8, 32), repeats=2)
    m = res["matrix"]
    full = m[m.feature_set == "full"].set_index(["source", "target"])
    for a, b in (("math", "code"), ("code", "math")):
        assert full.loc[(a, b), "pearson_avg_k"] < 0 < full.loc[(b, b), "pearson_avg_k"]
    assert set(m.feature_set) == {"full", "prompt", "entropy", "length"}
    rec = res["recovery"]
    mean = rec.groupby(["method", "target_prompts"])["mae"].mean()
    assert mean[("refit source+target", 32)] < mean[("source only", 0)]
    assert mean[("target only", 32)] < mean[("source only", 32)]
    with pytest.raises(ValueError, match="needs >= 2 values"):
        A.transfer(make_dataset(domains=("math",))[0], 1, 5)


def test_study_writer_writes_tables_figures_and_manifest(tmp_path):
    ds, _ = make_dataset(n_prompts=40, layers=(0, 1), windows=(5,), signal=(1, 5))
    table = A.sweep(ds, alphas=(1.0,))
    w = R.StudyWriter(tmp_path / "s", dataset="mem", png=False)
    w.table("sweep", "sweep", table)
    w.figure("sweep", "heatmap", R.sweep_heatmap(table))
    w.record("sweep", {"best": A.best_setting(table)})
    for f in ("sweep/sweep.parquet", "sweep/sweep.csv", "sweep/heatmap.json",
              "sweep/heatmap.html", "study.json"):
        assert (tmp_path / "s" / f).is_file(), f
    meta = json.loads((tmp_path / "s" / "study.json").read_text())
    assert meta["kind"] == "poise-probe-study" and meta["analyses"]["sweep"]["best"]["layer"] == 1
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "s/sweep/sweep.parquet"), table)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "study.json").write_text('{"kind": "other"}')
    with pytest.raises(ValueError, match="not a poise-probe study"):
        R.StudyWriter(tmp_path / "t")
