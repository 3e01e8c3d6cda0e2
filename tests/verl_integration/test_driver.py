"""The driver's order (predict -> advantages -> refit), the run directory, the Parquet converter."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
from conftest import make_batch

from poise_probe.integrations.verl.driver import PoiseDriver, RunDirLogger, rollout_rows
from poise_probe.probe import ProbeBank
from poise_probe.rundir import RunReader


def _step_batch(rng, step, d=4, prompts=6):
    n = 2 * prompts
    uids = [f"{step}-{i // 2}" for i in range(n)]
    sources = ["math" if i < n // 2 else "logic" for i in range(n)]
    phi = rng.normal(size=(n, d))
    rewards = (phi[:, 0] + rng.normal(scale=0.5, size=n) > 0).astype(float)
    data = make_batch(rewards.tolist(), uids, sources, phi, [2 + i % 3 for i in range(n)])
    data.batch["entropy"] = data.batch["response_mask"] * 0.5
    data.batch["responses"] = data.batch["response_mask"].long() * 7
    return data


def test_baselines_never_see_their_own_step(estimator):
    """At every step the staged predictions equal a bank that only saw earlier steps' rows; a
    control that refits on the step first gives different predictions (the test can fail)."""
    rng = np.random.default_rng(0)
    bank = ProbeBank({"math": 512, "other": 512}, alpha=1.0, min_steps_to_fit=1)
    driver = PoiseDriver(bank, estimator=estimator, bootstrap_steps=1)
    for step in range(1, 5):
        data = _step_batch(rng, step)
        phi = data.batch["poise_features"].double().numpy()
        doms = list(data.non_tensor_batch["data_source"])
        before = copy.deepcopy(bank)
        data, metrics = driver.compute_advantage(data, step)
        staged = driver.last_rows[0].preds
        if step == 1:
            assert np.isnan(staged).all() and metrics["probe/used_frac"] == 0.0
            continue
        np.testing.assert_array_equal(staged, before.predict(phi.astype(np.float32), doms)[0])
        leaky = copy.deepcopy(before)
        leaky.update(phi, data.batch["token_level_rewards"].sum(-1).numpy(),
                     list(data.non_tensor_batch["uid"]), doms, step)
        assert not np.allclose(staged, leaky.predict(phi.astype(np.float32), doms)[0])
        assert metrics["probe/used_frac"] == 1.0 and metrics["probe/math/refit"] == 1.0
        assert "probe/mae" in metrics and "adv/var_reduction" in metrics
        assert bank.buffers["math"].steps[-1] == step  # the rows went in after the advantages


def test_update_without_stage_is_refused(estimator):
    driver = PoiseDriver(ProbeBank({"math": 64}), estimator=estimator)
    with pytest.raises(RuntimeError, match="stage -> compute_advantage -> update"):
        driver.update(_step_batch(np.random.default_rng(0), 1), 1)


def test_run_dir_opens_in_the_reader(tmp_path, estimator):
    rng = np.random.default_rng(0)
    driver = PoiseDriver(ProbeBank({"math": 512, "other": 512}, min_steps_to_fit=1),
                         estimator=estimator, bootstrap_steps=0)
    log = RunDirLogger(tmp_path / "run", config={"algorithm": {"adv_estimator": "poise"}},
                       model="tiny", device="cpu")
    for step in (1, 2):
        data = _step_batch(rng, step)
        data, metrics = driver.compute_advantage(data, step)
        log.log({**metrics, "actor/pg_loss": 0.1, "note": "skipped"}, step)
        log.write_rollouts(step, rollout_rows(data, driver, step))
    log.finish()
    run = RunReader(tmp_path / "run")
    assert [m["step"] for m in run.metrics()] == [1, 2]
    assert run.metrics()[1]["actor/pg_loss"] == pytest.approx(0.1)
    assert run.rollout_steps() == [1, 2]
    rows = run.rollouts(2)
    assert len(rows) == 12 and set(rows["domain"]) == {"math", "other"}
    np.testing.assert_allclose(rows["advantage"] + rows["baseline"], rows["reward"])
    assert run.status["status"] == "finished"


def test_converter_writes_verl_parquet(tmp_path):
    from poise_probe.integrations.verl.data import main
    main(["--tasks", "arith,boolean", "--out", str(tmp_path), "--train", "5", "--test", "2"])
    train = pd.read_parquet(tmp_path / "train.parquet")
    assert len(train) == 10 and len(pd.read_parquet(tmp_path / "test.parquet")) == 4
    # the columns verl's RLHFDataset and reward managers read
    assert {"data_source", "prompt", "ability", "reward_model", "extra_info"} <= set(train.columns)
    assert all(isinstance(r["ground_truth"], str) for r in train["reward_model"])


def test_converter_refuses_no_tasks(tmp_path):
    from poise_probe.integrations.verl.data import write_verl_parquet
    with pytest.raises(ValueError, match="at least one task"):
        write_verl_parquet([], tmp_path)
