"""The `poise` estimator called the way verl calls it equals this project's estimator."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_batch

from poise_probe.advantages import poise_with_bootstrap
from poise_probe.integrations.verl.driver import PoiseDriver
from poise_probe.integrations.verl.estimator import uid_codes
from poise_probe.probe import ProbeBank


def _verl_fn():
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn
    return get_adv_estimator_fn("poise")


def test_spec_vector_k2_through_verl_lookup(estimator):
    # POISE.md: K = 2, rewards [1, 0], predictions [.1, .2] -> baselines [.2, .1]
    data = make_batch([1.0, 0.0], ["a", "a"], ["math"] * 2, np.zeros((2, 3)), [3, 5])
    estimator.stage(["a", "a"], [0.1, 0.2], [True, True])
    adv, ret = _verl_fn()(token_level_rewards=data.batch["token_level_rewards"],
                          response_mask=data.batch["response_mask"],
                          index=data.non_tensor_batch["uid"], config=None)
    expect = torch.tensor([0.8, -0.1])[:, None] * data.batch["response_mask"]
    torch.testing.assert_close(adv, expect)
    torch.testing.assert_close(ret, expect)
    out, used = estimator.last
    torch.testing.assert_close(out.baselines.float(), torch.tensor([0.2, 0.1]))
    assert used.all()


def test_spec_vector_k3(estimator):
    # rewards [0, .5, 1], predictions [.2, .4, .9] -> baselines [.65, .55, .30]
    data = make_batch([0.0, 0.5, 1.0], ["p"] * 3, ["math"] * 3, np.zeros((3, 3)), [2, 2, 2])
    estimator.stage(["p"] * 3, [0.2, 0.4, 0.9], [True] * 3)
    adv, _ = _verl_fn()(data.batch["token_level_rewards"], data.batch["response_mask"],
                        index=data.non_tensor_batch["uid"])
    torch.testing.assert_close(adv[:, 0], torch.tensor([-0.65, -0.05, 0.70]))


def _fitted_bank(rng, d):
    """A bank with probes for math and other (logic routes there), fitted on 3 earlier steps."""
    bank = ProbeBank({"math": 256, "other": 256}, alpha=1.0, min_steps_to_fit=3)
    for step in range(1, 4):
        phi = rng.normal(size=(16, d))
        rewards = rng.integers(0, 2, size=16).astype(float)
        ids = [f"s{step}-{i // 2}" for i in range(16)]
        doms = ["math" if i < 8 else "logic" for i in range(16)]
        bank.update(phi, rewards, ids, doms, step)
    return bank


def test_equals_builtin_on_same_inputs_with_domain_routing(estimator):
    """verl lookup + verl's compute_advantage == poise_with_bootstrap on the same rows, with
    rows routed per data_source, groups non-contiguous, uneven lengths and one group not ready."""
    rng = np.random.default_rng(0)
    d = 5
    bank = _fitted_bank(rng, d)
    bank.probes["other"] = None  # "logic" rows fall back to RLOO (the bootstrap splice)
    uids = ["u1", "u2", "u1", "u3", "u2", "u3", "u4", "u4"]
    sources = ["math", "math", "math", "logic", "math", "logic", "math", "math"]
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    phi = rng.normal(size=(8, d))
    data = make_batch(rewards, uids, sources, phi, [1, 2, 3, 4, 5, 6, 6, 2])
    driver = PoiseDriver(bank, estimator=estimator, bootstrap_steps=0)
    preds, fitted, _ = bank.predict(phi.astype(np.float32), sources)

    from verl.trainer.ppo.ray_trainer import compute_advantage
    driver.stage(data, step=4)
    out = compute_advantage(data, adv_estimator="poise")

    ref, used = poise_with_bootstrap(torch.tensor(rewards), uid_codes(uids),
                                     torch.from_numpy(np.nan_to_num(preds)), torch.from_numpy(fitted))
    expect = ref.per_token(data.batch["response_mask"]).float()
    torch.testing.assert_close(out.batch["advantages"], expect)
    assert used.tolist() == [True, True, True, False, True, False, True, True]
    # no normalisation: the sequence advantage plus the baseline is the reward
    torch.testing.assert_close(ref.advantages + ref.baselines, torch.tensor(rewards, dtype=ref.advantages.dtype))


def test_bootstrap_steps_use_rloo(estimator):
    rng = np.random.default_rng(1)
    bank = _fitted_bank(rng, 4)
    data = make_batch([1.0, 0.0], ["a", "a"], ["math", "math"], rng.normal(size=(2, 4)), [2, 2])
    PoiseDriver(bank, estimator=estimator, bootstrap_steps=16).stage(data, step=4)
    adv, _ = _verl_fn()(data.batch["token_level_rewards"], data.batch["response_mask"],
                        index=data.non_tensor_batch["uid"])
    torch.testing.assert_close(adv[:, 0], torch.tensor([1.0, -1.0]))  # r1 - r2, r2 - r1


# ------------------------------------------------------------------ bad input

def test_nothing_staged_is_refused(estimator):
    data = make_batch([1.0, 0.0], ["a", "a"], ["math"] * 2, np.zeros((2, 3)), [2, 2])
    with pytest.raises(RuntimeError, match="no probe predictions were staged"):
        _verl_fn()(data.batch["token_level_rewards"], data.batch["response_mask"],
                   index=data.non_tensor_batch["uid"])


def test_staged_for_other_rows_is_refused(estimator):
    data = make_batch([1.0, 0.0], ["a", "a"], ["math"] * 2, np.zeros((2, 3)), [2, 2])
    estimator.stage(["b", "b"], [0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="belong to other rows"):
        _verl_fn()(data.batch["token_level_rewards"], data.batch["response_mask"],
                   index=data.non_tensor_batch["uid"])


def test_missing_uid_is_refused(estimator):
    estimator.stage(["a", "a"], [0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="prompt uids"):
        _verl_fn()(torch.zeros(2, 3), torch.ones(2, 3))


def test_lone_rollout_is_refused(estimator):
    data = make_batch([1.0, 0.0], ["a", "b"], ["math"] * 2, np.zeros((2, 3)), [2, 2])
    estimator.stage(["a", "b"], [0.1, 0.2], [True, True])
    with pytest.raises(ValueError):
        _verl_fn()(data.batch["token_level_rewards"], data.batch["response_mask"],
                   index=data.non_tensor_batch["uid"])


def test_missing_features_is_refused(estimator):
    data = make_batch([1.0, 0.0], ["a", "a"], ["math"] * 2, np.zeros((2, 3)), [2, 2])
    data.batch.pop("poise_features")
    driver = PoiseDriver(ProbeBank({"math": 64}), estimator=estimator)
    with pytest.raises(KeyError, match="poise_features"):
        driver.stage(data, step=1)


def test_nan_features_are_refused(estimator):
    phi = np.zeros((2, 3))
    phi[1, 2] = np.nan
    data = make_batch([1.0, 0.0], ["a", "a"], ["math"] * 2, phi, [2, 2])
    driver = PoiseDriver(ProbeBank({"math": 64}), estimator=estimator)
    with pytest.raises(ValueError, match=r"poise_features\[1, 2\] = nan"):
        driver.stage(data, step=1)


def test_missing_data_source_is_refused(estimator):
    data = make_batch([1.0, 0.0], ["a", "a"], ["math"] * 2, np.zeros((2, 3)), [2, 2])
    data.non_tensor_batch.pop("data_source")
    driver = PoiseDriver(ProbeBank({"math": 64}), estimator=estimator)
    with pytest.raises(KeyError, match="data_source"):
        driver.stage(data, step=1)
