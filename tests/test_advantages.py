"""Advantage estimators: hand-computed cases, identities, loop == vectorized, bad inputs."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from poise_probe.advantages import (
    ADV_ESTIMATORS,
    AdvantageResult,
    compute_advantages,
    filter_groups,
    get_adv_estimator,
    overlong_reward_shaping,
    register_adv_est,
)

ALL = ["poise", "rloo", "grpo", "dr_grpo", "reinforce_pp", "dapo"]


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def ids(x):
    return torch.tensor(x, dtype=torch.long)


def random_batch(seed: int = 0, sizes=(2, 3, 5, 2, 4, 7)):
    """Shuffled rows of groups with unequal sizes (>= 2), non-contiguous, non-consecutive ids."""
    g = torch.Generator().manual_seed(seed)
    group_ids = torch.cat([torch.full((k,), 10 * i + 3, dtype=torch.long) for i, k in enumerate(sizes)])
    n = len(group_ids)
    perm = torch.randperm(n, generator=g)
    rewards = (torch.rand(n, generator=g, dtype=torch.float64) < 0.5).to(torch.float64)
    rewards[::4] = torch.rand(n, generator=g, dtype=torch.float64)[::4]  # some partial credit
    preds = torch.rand(n, generator=g, dtype=torch.float64)
    return rewards[perm], group_ids[perm], preds[perm]


def loop_reference(name, rewards, group_ids, preds, eps=1e-6):
    """Plain-Python per-row implementation of each estimator, the slow obvious way."""
    r, gid = rewards.tolist(), group_ids.tolist()
    p = preds.tolist() if preds is not None else None
    n = len(r)
    adv, base, scale = [0.0] * n, [0.0] * n, [1.0] * n
    for i in range(n):
        sib = [j for j in range(n) if gid[j] == gid[i] and j != i]
        grp = [j for j in range(n) if gid[j] == gid[i]]
        if name == "poise":
            base[i] = sum(p[j] for j in sib) / len(sib)
        elif name == "rloo":
            base[i] = sum(r[j] for j in sib) / len(sib)
        elif name in ("grpo", "dapo", "dr_grpo"):
            m = sum(r[j] for j in grp) / len(grp)
            sd = math.sqrt(sum((r[j] - m) ** 2 for j in grp) / (len(grp) - 1)) if len(grp) > 1 else 1.0
            base[i] = m if len(grp) > 1 else 0.0
            if name != "dr_grpo":
                scale[i] = sd + eps
        elif name == "reinforce_pp":
            m = sum(r) / n
            base[i] = m
            scale[i] = math.sqrt(sum((x - m) ** 2 for x in r) / (n - 1)) + eps
        adv[i] = (r[i] - base[i]) / scale[i]
    return adv, base, scale


# ------------------------------------------------------------------ hand-computed cases


def test_poise_spec_vector_k3():
    res = compute_advantages("poise", t([0.0, 0.5, 1.0]), ids([7, 7, 7]), preds=t([0.2, 0.4, 0.9]))
    torch.testing.assert_close(res.baselines, t([0.65, 0.55, 0.30]))
    torch.testing.assert_close(res.advantages, t([-0.65, -0.05, 0.70]))
    torch.testing.assert_close(res.scale, t([1.0, 1.0, 1.0]))


def test_poise_spec_vector_k2_uses_sibling_prediction():
    res = compute_advantages("poise", t([1.0, 0.0]), ids([0, 0]), preds=t([0.1, 0.2]))
    torch.testing.assert_close(res.baselines, t([0.2, 0.1]))
    torch.testing.assert_close(res.advantages, t([0.8, -0.1]))


def test_poise_keeps_equal_reward_groups():
    """Both-correct pairs get 1 - g > 0 and both-wrong pairs -g: no dynamic-sampling drop."""
    res = compute_advantages("poise", t([1.0, 1.0, 0.0, 0.0]), ids([0, 0, 1, 1]), preds=t([0.7, 0.6, 0.3, 0.1]))
    torch.testing.assert_close(res.advantages, t([0.4, 0.3, -0.1, -0.3]))


def test_poise_interleaved_groups():
    res = compute_advantages("poise", t([1.0, 0.0, 0.0, 1.0]), ids([5, 9, 5, 9]), preds=t([0.1, 0.2, 0.3, 0.4]))
    torch.testing.assert_close(res.baselines, t([0.3, 0.4, 0.1, 0.2]))


def test_rloo_hand():
    res = compute_advantages("rloo", t([1.0, 0.0, 0.0, 1.0, 1.0]), ids([0, 0, 0, 1, 1]))
    torch.testing.assert_close(res.baselines, t([0.0, 0.5, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(res.advantages, t([1.0, -0.5, -0.5, 0.0, 0.0]))


def test_grpo_hand():
    # group 0: [1, 0] mean .5, unbiased std sqrt(.5); group 1: [1, 1, 1] std 0 -> A = 0
    res = compute_advantages("grpo", t([1.0, 0.0, 1.0, 1.0, 1.0]), ids([0, 0, 1, 1, 1]), epsilon=1e-6)
    s = math.sqrt(0.5) + 1e-6
    torch.testing.assert_close(res.advantages, t([0.5 / s, -0.5 / s, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(res.baselines, t([0.5, 0.5, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(res.scale, t([s, s, 1e-6, 1e-6, 1e-6]))


def test_grpo_lone_rollout_mean0_std1_like_verl(caplog):
    with caplog.at_level(logging.WARNING, logger="poise_probe.advantages"):
        res = compute_advantages("grpo", t([1.0, 0.0, 1.0]), ids([0, 0, 4]), epsilon=1e-6)
    assert res.advantages[2].item() == pytest.approx(1.0 / (1.0 + 1e-6))
    assert res.baselines[2].item() == 0.0 and res.scale[2].item() == pytest.approx(1.0 + 1e-6)
    assert "single rollout" in caplog.text and "4" in caplog.text
    assert res.identity_max_abs_err(t([1.0, 0.0, 1.0])) < 1e-6


def test_dr_grpo_hand():
    res = compute_advantages("dr_grpo", t([1.0, 0.0, 0.0, 1.0]), ids([0, 0, 0, 1]))
    torch.testing.assert_close(res.advantages, t([2 / 3, -1 / 3, -1 / 3, 1.0]))  # lone rollout: mean 0
    torch.testing.assert_close(res.scale, torch.ones(4))


def test_reinforce_pp_hand():
    r = t([1.0, 0.0, 0.0, 1.0, 1.0])
    res = compute_advantages("reinforce_pp", r, ids([0, 0, 1, 1, 2]), epsilon=0.0)
    sd = math.sqrt(sum((x - 0.6) ** 2 for x in r.tolist()) / 4)
    torch.testing.assert_close(res.advantages, (r - 0.6) / sd)
    assert res.advantages.mean().abs() < 1e-6 and res.advantages.std().item() == pytest.approx(1.0)


def test_dapo_equals_grpo():
    r, g, _ = random_batch(3)
    a, b = compute_advantages("dapo", r, g), compute_advantages("grpo", r, g)
    torch.testing.assert_close(a.advantages, b.advantages)


# ------------------------------------------------------------------ identities


@pytest.mark.parametrize("name", ALL)
def test_identity_a_times_scale_plus_b_equals_r(name):
    r, g, p = random_batch(1)
    res = compute_advantages(name, r, g, preds=p)
    assert isinstance(res, AdvantageResult)
    assert res.advantages.shape == res.baselines.shape == res.scale.shape == r.shape
    assert res.advantages.dtype == torch.float64
    assert res.identity_max_abs_err(r) < 1e-12


@pytest.mark.parametrize("name", ALL)
def test_vectorized_equals_loop(name):
    r, g, p = random_batch(2)
    res = compute_advantages(name, r, g, preds=p)
    adv, base, scale = loop_reference(name, r, g, p)
    torch.testing.assert_close(res.advantages, torch.tensor(adv, dtype=torch.float64))
    torch.testing.assert_close(res.baselines, torch.tensor(base, dtype=torch.float64))
    torch.testing.assert_close(res.scale, torch.tensor(scale, dtype=torch.float64))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo"])
def test_vectorized_equals_loop_with_lone_rollouts(name):
    r, g, p = random_batch(5, sizes=(1, 3, 1, 2))
    res = compute_advantages(name, r, g)
    adv, base, _ = loop_reference(name, r, g, p)
    torch.testing.assert_close(res.advantages, torch.tensor(adv, dtype=torch.float64))
    torch.testing.assert_close(res.baselines, torch.tensor(base, dtype=torch.float64))


@pytest.mark.parametrize("name", ALL)
def test_permuting_rows_permutes_outputs(name):
    r, g, p = random_batch(4)
    perm = torch.randperm(len(r), generator=torch.Generator().manual_seed(9))
    a, b = compute_advantages(name, r, g, preds=p), compute_advantages(name, r[perm], g[perm], preds=p[perm])
    torch.testing.assert_close(b.advantages, a.advantages[perm])
    torch.testing.assert_close(b.baselines, a.baselines[perm])
    torch.testing.assert_close(b.scale, a.scale[perm])


def test_poise_baseline_ignores_own_prediction():
    """Changing g(phi_i) moves every sibling's baseline but never b_i itself."""
    r, g, p = random_batch(6)
    p2 = p.clone()
    p2[0] += 0.3
    a, b = compute_advantages("poise", r, g, preds=p), compute_advantages("poise", r, g, preds=p2)
    assert b.baselines[0] == a.baselines[0]
    sib = (g == g[0]) & (torch.arange(len(g)) != 0)
    assert bool((b.baselines[sib] > a.baselines[sib]).all())


def test_integer_rewards_become_float():
    res = compute_advantages("rloo", torch.tensor([1, 0, 1, 1]), ids([0, 0, 1, 1]))
    assert res.advantages.dtype == torch.get_default_dtype()
    torch.testing.assert_close(res.advantages, t([1.0, -1.0, 0.0, 0.0]))


# ------------------------------------------------------------------ registry


def test_registry_has_all_estimators():
    assert set(ALL) <= set(ADV_ESTIMATORS)
    assert get_adv_estimator("poise") is ADV_ESTIMATORS["poise"]


def test_unknown_estimator_lists_known_names():
    with pytest.raises(KeyError, match="unknown adv_estimator 'gae'.*poise"):
        compute_advantages("gae", t([1.0, 0.0]), ids([0, 0]))


def test_duplicate_registration_raises():
    name = "_test_dup_estimator"
    try:
        register_adv_est(name)(lambda *a, **k: None)
        with pytest.raises(ValueError, match="already registered"):
            register_adv_est(name)(lambda *a, **k: None)
        with pytest.raises(ValueError, match="already registered"):
            register_adv_est("poise")(lambda *a, **k: None)
    finally:
        ADV_ESTIMATORS.pop(name, None)


# ------------------------------------------------------------------ bad inputs


def test_poise_refuses_lone_rollout():
    with pytest.raises(ValueError, match=r"poise needs >= 2 rollouts per prompt \(baselines come from "
                                         r"sibling rollouts\); group 3 has 1"):
        compute_advantages("poise", t([1.0, 0.0, 1.0]), ids([0, 0, 3]), preds=t([0.5, 0.5, 0.5]))


def test_rloo_refuses_lone_rollout():
    with pytest.raises(ValueError, match="rloo needs >= 2 rollouts per prompt.*group 1 has 1"):
        compute_advantages("rloo", t([1.0, 0.0, 1.0]), ids([0, 0, 1]))


def test_poise_needs_preds():
    with pytest.raises(ValueError, match="poise needs preds"):
        compute_advantages("poise", t([1.0, 0.0]), ids([0, 0]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_poise_refuses_nonfinite_preds(bad):
    with pytest.raises(ValueError, match=r"preds must be finite; preds\[1\]"):
        compute_advantages("poise", t([1.0, 0.0]), ids([0, 0]), preds=t([0.5, bad]))


def test_poise_preds_shape():
    with pytest.raises(ValueError, match="preds must have the rewards' shape"):
        compute_advantages("poise", t([1.0, 0.0]), ids([0, 0]), preds=t([0.5, 0.5, 0.5]))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_rewards_raise(name, bad):
    with pytest.raises(ValueError, match=r"rewards must be finite; rewards\[2\]"):
        compute_advantages(name, t([1.0, 0.0, bad, 1.0]), ids([0, 0, 1, 1]), preds=t([0.5] * 4))


@pytest.mark.parametrize("name", ALL)
def test_shape_mismatch_raises(name):
    with pytest.raises(ValueError, match="group_ids must have the rewards' shape"):
        compute_advantages(name, t([1.0, 0.0, 1.0]), ids([0, 0]), preds=t([0.5] * 3))


def test_two_dim_rewards_raise():
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        compute_advantages("grpo", t([[1.0, 0.0]]), ids([[0, 0]]))


def test_float_group_ids_raise():
    with pytest.raises(ValueError, match="group_ids must be an integer tensor"):
        compute_advantages("grpo", t([1.0, 0.0]), t([0.0, 0.0]))


def test_empty_rewards_raise():
    with pytest.raises(ValueError, match="rewards is empty"):
        compute_advantages("grpo", t([]), ids([]))


def test_non_tensor_rewards_raise():
    with pytest.raises(TypeError, match="rewards must be a torch.Tensor"):
        compute_advantages("grpo", [1.0, 0.0], ids([0, 0]))


def test_negative_epsilon_raises():
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        compute_advantages("grpo", t([1.0, 0.0]), ids([0, 0]), epsilon=-1.0)


def test_reinforce_pp_needs_two_rollouts():
    with pytest.raises(ValueError, match="reinforce_pp .* needs >= 2 rollouts; got 1"):
        compute_advantages("reinforce_pp", t([1.0]), ids([0]))


def test_identity_check_shape():
    res = compute_advantages("rloo", t([1.0, 0.0]), ids([0, 0]))
    with pytest.raises(ValueError, match="rewards must have the advantages' shape"):
        res.identity_max_abs_err(t([1.0]))


# ------------------------------------------------------------------ DAPO helpers


def test_filter_groups_drops_all_equal_groups():
    r = t([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5, 1.0])
    g = ids([0, 0, 1, 1, 2, 2, 3, 3, 4])
    keep = filter_groups(r, g)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, False, True, True, False, False, False, False, True]
    assert filter_groups(r, g, keep_singletons=False).tolist()[-1] is False


def test_filter_groups_interleaved_and_permuted():
    r = t([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    g = ids([0, 1, 0, 1, 2, 2])  # group 0 all 1, group 1 all 0, group 2 all 1
    assert not filter_groups(r, g).any()
    r[3] = 0.3
    assert filter_groups(r, g).tolist() == [False, True, False, True, False, False]


@pytest.mark.parametrize("length, expected", [(0, 0.0), (6, 0.0), (7, -0.25), (8, -0.5), (10, -1.0), (13, -1.0)])
def test_overlong_reward_shaping_hand(length, expected):
    out = overlong_reward_shaping(torch.tensor([length]), max_len=10, buffer_len=4)
    assert out.item() == pytest.approx(expected)


def test_overlong_reward_shaping_factor_and_matches_verl_up_to_max_len():
    lengths = torch.arange(0, 11)
    out = overlong_reward_shaping(lengths, max_len=10, buffer_len=4, penalty_factor=0.5)
    verl = [min(-(n - (10 - 4)) / 4 * 0.5, 0.0) for n in lengths.tolist()]
    torch.testing.assert_close(out, torch.tensor(verl, dtype=out.dtype))


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_len=10, buffer_len=0), "buffer_len must be"),
    (dict(max_len=10, buffer_len=11), "buffer_len must be"),
    (dict(max_len=0, buffer_len=1), "max_len must be"),
    (dict(max_len=10, buffer_len=4, penalty_factor=-1.0), "penalty_factor must be"),
])
def test_overlong_reward_shaping_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        overlong_reward_shaping(torch.tensor([5]), **kwargs)


def test_overlong_reward_shaping_negative_length():
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        overlong_reward_shaping(torch.tensor([-1]), max_len=10, buffer_len=4)


# ------------------------------------------------------------------ POISE bootstrap splice

def test_poise_with_bootstrap_hand_vector():
    from poise_probe.advantages import poise_with_bootstrap

    r = t([1.0, 0.0, 1.0, 1.0])
    g = ids([0, 0, 1, 1])
    preds = t([0.2, 0.4, 0.3, float("nan")])          # NaN in a group that cannot use the probe
    ready = torch.tensor([True, True, True, False])
    out, used = poise_with_bootstrap(r, g, preds, ready)
    torch.testing.assert_close(out.baselines, t([0.4, 0.2, 1.0, 1.0]))
    torch.testing.assert_close(out.advantages, t([0.6, -0.2, 0.0, 0.0]))
    assert used.tolist() == [True, True, False, False]
    assert out.identity_max_abs_err(r) < 1e-6


def test_poise_with_bootstrap_limits_are_poise_and_rloo():
    from poise_probe.advantages import poise_with_bootstrap

    torch.manual_seed(1)
    r = torch.randint(0, 2, (12,)).float()
    g = ids([3, 0, 3, 1, 0, 1, 2, 2, 5, 5, 3, 0])      # interleaved, not contiguous
    p = torch.rand(12)
    full, used = poise_with_bootstrap(r, g, p, torch.ones(12, dtype=torch.bool))
    assert used.all()
    torch.testing.assert_close(full.advantages, compute_advantages("poise", r, g, preds=p).advantages)
    none, used = poise_with_bootstrap(r, g, p, torch.zeros(12, dtype=torch.bool))
    assert not used.any()
    torch.testing.assert_close(none.advantages, compute_advantages("rloo", r, g).advantages)
    # one unready rollout sends its whole group (id 3) to RLOO, and no other group
    ready = torch.ones(12, dtype=torch.bool)
    ready[2] = False
    mixed, used = poise_with_bootstrap(r, g, p, ready)
    assert used.tolist() == [x != 3 for x in g.tolist()]
    rloo = compute_advantages("rloo", r, g).advantages
    torch.testing.assert_close(mixed.advantages[~used], rloo[~used])
    torch.testing.assert_close(mixed.advantages[used], full.advantages[used])


def test_poise_with_bootstrap_rejects_bad_masks_and_nan_where_used():
    from poise_probe.advantages import poise_with_bootstrap

    with pytest.raises(ValueError, match="probe_ready"):
        poise_with_bootstrap(t([1.0, 0.0]), ids([0, 0]), t([0.1, 0.2]), torch.tensor([True]))
    with pytest.raises(ValueError, match="preds must be finite"):
        poise_with_bootstrap(t([1.0, 0.0]), ids([0, 0]), t([0.1, float("nan")]),
                             torch.tensor([True, True]))


# ------------------------------------------------------------------ token-level estimators

def _register_token_level():
    from poise_probe.advantages import TOKEN_LEVEL

    name = "test_token_decay"
    if name not in ADV_ESTIMATORS:
        @register_adv_est(name, token_level=True)
        def _decay(rewards, group_ids, *, preds=None, epsilon=1e-6, response_mask=None):
            """RLOO's advantage, halved at every later token: a per-token estimator for tests."""
            base = compute_advantages("rloo", rewards, group_ids)
            steps = torch.arange(response_mask.shape[1], dtype=rewards.dtype)
            decay = 0.5 ** steps                                          # (T,)
            a = base.advantages[:, None] * decay[None, :] * response_mask
            b = rewards[:, None] - a
            return AdvantageResult(a, b, torch.ones_like(a))
    assert name in TOKEN_LEVEL
    return name


def test_token_level_estimator_gets_the_mask_and_returns_per_token():
    name = _register_token_level()
    r, g = t([1.0, 0.0]), ids([0, 0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).float()
    out = compute_advantages(name, r, g, response_mask=mask)
    assert out.token_level and out.advantages.shape == (2, 3)
    torch.testing.assert_close(out.advantages, t([[1.0, 0.5, 0.25], [-1.0, -0.5, 0.0]]))
    torch.testing.assert_close(out.per_sequence(mask), t([1.75 / 3, -0.75]))
    torch.testing.assert_close(out.per_token(mask), out.advantages)
    with pytest.raises(ValueError, match="response_mask"):
        compute_advantages(name, r, g)


def test_per_rollout_advantages_broadcast_over_tokens():
    out = compute_advantages("rloo", t([1.0, 0.0]), ids([0, 0]))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).float()
    assert not out.token_level
    torch.testing.assert_close(out.per_token(mask), t([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]))
    assert out.per_sequence(mask) is out.advantages
