"""poise value-bench: ground-truth helpers with hand values, the score table, bad input, and an
end-to-end run on the tiny reasoner that writes a study the dashboard reads."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from poise_probe.valuebench.data import cut_points, noise_reference
from poise_probe.valuebench.estimators import ESTIMATORS
from poise_probe.valuebench.report import PAPER_ROWS, score_table


def test_cut_points_are_tokens_starting_with_whitespace():
    assert cut_points(["So", " x", "=", " 3", "\n", "ok"]) == [1, 3, 4]
    assert cut_points([" a"]) == []              # position 0 keeps an empty prefix: never


def test_noise_reference_draws_without_replacement():
    mc = np.array([[1, 0, 0, 1], [1, 1, 1, 1.0]])
    ref = noise_reference(mc, 4)
    assert ref.tolist() == [0.5, 1.0]            # all of them: exactly the mean
    one = noise_reference(mc, 1, seed=3)
    assert set(one[:1]) <= {0.0, 1.0} and one[1] == 1.0
    with pytest.raises(ValueError, match=r"MCS@5 needs 1 <= n <= 4"):
        noise_reference(mc, 5)


def test_score_table_hand_values():
    target = np.array([0.5, 0.0, 1.0, 0.25])
    values = {"prompt": {"a": np.array([0.5, 0.2, 0.9, 0.25]),
                         "none": np.full(4, np.nan)}}          # not offered: no row
    mc = {"prompt": np.array([[1, 0], [0, 0], [1, 1], [0, 1.0]])}
    t = score_table(values, {"prompt": target}, mc, n_boot=50)
    a = t[t["estimator"] == "a"].iloc[0]
    assert a["mae"] == pytest.approx((0 + 0.2 + 0.1 + 0) / 4)
    assert a["pearson"] == pytest.approx(np.corrcoef(values["prompt"]["a"], target)[0, 1])
    assert a["mae_lo"] <= a["mae"] <= a["mae_hi"]
    assert "none" not in set(t["estimator"])
    assert "MCS@1 (noise)" in set(t["estimator"])              # M = 2 > 1
    assert len(t[t["estimator"].str.startswith("paper")]) == len(PAPER_ROWS)


def test_every_estimator_is_registered_with_a_docstring():
    assert {"constant", "group_mean_2", "group_mean_4", "group_mean_8", "poise_probe",
            "prompt_probe"} <= set(ESTIMATORS)
    for name, factory in ESTIMATORS.items():
        assert (type(factory()).__doc__ or "").strip(), name


def test_bad_arguments_name_the_fix(tmp_path):
    from poise_probe.config import load_config
    from poise_probe.valuebench import run_value_bench

    cfg = load_config(None, ["model.path=tiny-reasoner"])
    with pytest.raises(ValueError, match=r"unknown value-bench estimator\(s\) \['nope'\]"):
        run_value_bench(cfg, tmp_path, tasks=["arith"], n_train=2, n_eval=2, pool=2, mc=2,
                        estimators=["nope"])
    with pytest.raises(ValueError, match=r"--pool and --mc must be >= 2"):
        run_value_bench(cfg, tmp_path, tasks=["arith"], n_train=2, n_eval=2, pool=1, mc=2)


@pytest.mark.slow
def test_value_bench_end_to_end_writes_a_study(tmp_path):
    out = tmp_path / "vb"
    proc = subprocess.run(
        [sys.executable, "-m", "poise_probe.cli", "value-bench", "--out", str(out),
         "--tasks", "arith,boolean", "--train-prompts", "12", "--eval-prompts", "6",
         "--pool", "4", "--mc", "4", "--bootstrap", "30", "--no-png"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = pd.read_parquet(out / "value_bench" / "scores.parquet")
    ours = scores[~scores["estimator"].str.startswith("paper")]
    assert set(ours["level"]) == {"prompt", "state"}
    assert {"constant", "group_mean_2", "poise_probe", "MCS@2 (noise)"} <= set(ours["estimator"])
    assert ours["mae"].between(0, 1).all() and (ours["n"] == 12).all()
    study = json.loads((out / "study.json").read_text())
    assert study["kind"] == "poise-probe-study" and "value_bench" in study["analyses"]
    for name in ("mae", "scatter_prompt", "scatter_state"):
        assert (out / "value_bench" / f"{name}.json").is_file()
    values = pd.read_parquet(out / "value_bench" / "values_state.parquet")
    assert len(values) == 12 and values["target"].between(0, 1).all()
