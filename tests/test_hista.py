"""Hista (poise_probe.methods.hista): RELATED.md test vectors T1-T6, the own-rollout rule, the
memory-chunked distances against an unchunked reference, the value method, a tiny run."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from poise_probe.config import load_config
from poise_probe.methods.hista import (
    GroupRollout, Hista, boundaries, broadcast_segments, ema, k_schedule, knn_values,
    min_distance, own_prefix_allowed, prefix_min_distances, segment_gae, state_values)
from poise_probe.rundir import RunReader
from poise_probe.value_methods import StepContext, make_value_method
from run_helpers import run

INF = float("inf")


# --- T1: MinDistance ---------------------------------------------------------------------------

X1 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [4.0, 0.0]])
X2 = torch.tensor([[0.0, 0.0], [3.0, 0.0]])


def test_t1_min_distance_paper_sum_and_code_normalised_in_either_order():
    assert min_distance(X1, X2, "sum") == pytest.approx(2.0)
    assert min_distance(X1, X2, "normalised") == pytest.approx(2.0 / 3, abs=1e-6)
    assert min_distance(X2, X1, "sum") == pytest.approx(2.0)
    assert min_distance(X2, X1, "normalised") == pytest.approx(2.0 / 3, abs=1e-6)


def brute_md(x, y, a, b, normalised):
    """MinDistance of x[:a], y[:b] by its definition, in float64."""
    d = torch.cdist(x[:a].double(), y[:b].double())
    s = d.min(1).values.sum() if a >= b else d.min(0).values.sum()
    return float(s / max(a, b)) if normalised else float(s)


@pytest.mark.parametrize("distance", ["normalised", "sum"])
def test_prefix_min_distances_equal_the_definition_and_are_symmetric(distance):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 4, generator=g), torch.randn(7, 4, generator=g)
    xl, yl = [1, 3, 6, 9], [2, 3, 7]
    got = prefix_min_distances(x, y, xl, yl, distance)                       # (4, 3)
    want = [[brute_md(x, y, a, b, distance == "normalised") for b in yl] for a in xl]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    swapped = prefix_min_distances(y, x, yl, xl, distance).T
    unequal = torch.tensor(xl)[:, None] != torch.tensor(yl)[None, :]
    np.testing.assert_allclose(got[unequal].numpy(), swapped[unequal].numpy(), rtol=1e-5)


def test_prefix_lengths_out_of_range_and_unknown_forms_are_refused():
    with pytest.raises(ValueError, match="x_lens must lie in"):
        prefix_min_distances(X1, X2, [4], [1])
    with pytest.raises(ValueError, match="distance must be"):
        prefix_min_distances(X1, X2, [1], [1], "cosine")


# --- T2: weighted kNN value ----------------------------------------------------------------------

def test_t2_weighted_knn_value():
    d = torch.tensor([[0.5, 2.0, 4.0, 10.0]])
    r = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert float(knn_values(d, r, [3], min_d=1.0)) == pytest.approx(6 / 7, abs=1e-6)


def test_t2_nan_is_never_selected_and_tiny_weights_give_zero():
    r = torch.tensor([1.0, 1.0, 0.0, 0.0])
    # the NaN node (reward 1) is +inf: the 3 nearest are 2, 4, 10 -> (1/2) / (1/2 + 1/4 + 1/10)
    d = torch.tensor([[math.nan, 2.0, 4.0, 10.0]])
    assert float(knn_values(d, r, [3], 1.0)) == pytest.approx(0.5 / 0.85, abs=1e-6)
    assert float(knn_values(torch.tensor([[math.nan, INF, INF, INF]]), r, [3], 1.0)) == 0.0
    far = torch.full((1, 4), 1e9)                                            # sum w = 3e-9
    assert float(knn_values(far, r, [3], 1.0)) == 0.0


# --- T3: k schedule ------------------------------------------------------------------------------

def test_t3_k_schedule():
    assert k_schedule(4, 66, 6) == [66, 51, 36, 21]
    assert k_schedule(0, 66, 6) == []


# --- T4: segment GAE -----------------------------------------------------------------------------

T4_VALUES = torch.tensor([0.5, 6 / 7, 0.25, 1.0], dtype=torch.float64)


def test_t4_segment_gae_lambda_one_is_r_minus_v():
    np.testing.assert_allclose(segment_gae(T4_VALUES, 1.0), [0.5, 1 / 7, 0.75], atol=1e-9)


def test_t4_segment_gae_lambda_half():
    np.testing.assert_allclose(segment_gae(T4_VALUES, 0.5),
                               [0.241071, -0.232143, 0.75], atol=1e-6)


def test_t4_broadcast_over_boundaries():
    p = 120
    a = torch.as_tensor(segment_gae(T4_VALUES, 0.5))
    tok = broadcast_segments(a, [p, p + 50, p + 100, p + 130], response_len=131, fill=0.0)
    np.testing.assert_allclose(tok[:50].numpy(), a[0].item())
    np.testing.assert_allclose(tok[50:100].numpy(), a[1].item())
    np.testing.assert_allclose(tok[100:130].numpy(), a[2].item())
    assert tok[130] == 0.0                                  # the last token, zero-filled


# --- T5: EMA -------------------------------------------------------------------------------------

def test_t5_ema_code_quirk_and_textbook():
    h = torch.tensor([[2.0], [4.0], [8.0]])
    np.testing.assert_allclose(ema(h, 0.5, "first").flatten().numpy(), [4.0, 4.0, 6.285714],
                               atol=1e-6)
    np.testing.assert_allclose(ema(h, 0.5, "zero").flatten().numpy(), [2.0, 3.333333, 6.0],
                               atol=1e-6)


@pytest.mark.parametrize("init", ["first", "zero"])
@pytest.mark.parametrize("alpha", [0.0, 0.7, 0.97])
def test_blocked_ema_equals_the_position_loop(init, alpha):
    h = torch.randn(2, 150, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    e = h[:, 0] if init == "first" else torch.zeros_like(h[:, 0])
    want = []
    for k in range(h.shape[1]):
        e = alpha * e + (1 - alpha) * h[:, k]
        want.append(e / (1 - alpha ** (k + 1)))
    np.testing.assert_allclose(ema(h, alpha, init).numpy(), torch.stack(want, 1).numpy(),
                               rtol=1e-10, atol=1e-10)


def test_ema_refuses_alpha_one():
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\)"):
        ema(torch.ones(3, 2), 1.0)


# --- T6: boundaries --------------------------------------------------------------------------------

def test_t6_boundaries_rep_indices_and_online_nodes():
    b, rep, online = boundaries(120, 300, 50, 5)
    assert b == [120, 150, 200, 250, 299]
    assert rep == [24, 30, 40, 50, 59]
    assert online == [31, 41, 51]


@pytest.mark.parametrize("zero_last, lengths", [(True, [30, 50, 50, 49, 1]),
                                                (False, [30, 50, 50, 50])])
def test_t6_segment_lengths_and_the_zero_filled_last_token(zero_last, lengths):
    b, _, online = boundaries(120, 300, 50, 5)
    seg = torch.arange(1.0, len(online) + 2)                          # 4 segments: 1, 2, 3, 4
    tok = broadcast_segments(seg, b, response_len=180, fill=0.0, zero_last_token=zero_last)
    _, counts = torch.unique_consecutive(tok, return_counts=True)
    assert counts.tolist() == lengths
    assert tok[-1] == (0.0 if zero_last else 4.0)


def test_one_token_response_has_a_single_boundary():
    assert boundaries(100, 101, 50, 5) == ([100], [20], [])
    seg = torch.tensor([0.5])                                          # values [mean, r]
    assert broadcast_segments(seg, [100], 1, 0.0).tolist() == [0.0]
    assert broadcast_segments(seg, [100], 1, 0.0, zero_last_token=False).tolist() == [0.5]


def test_boundaries_need_a_response():
    with pytest.raises(ValueError, match="at least one response token"):
        boundaries(10, 10, 50, 5)


# --- the own-rollout rule and the pool -------------------------------------------------------------

def test_own_prefixes_no_longer_than_the_query_are_allowed_unless_exclude_self():
    allowed = own_prefix_allowed([3, 5], [2, 3, 5, 7])
    assert allowed.tolist() == [[True, True, False, False], [True, True, True, False]]
    assert not own_prefix_allowed([3, 5], [2, 3, 5, 7], exclude_self=True).any()


def random_group(seed, lengths, rewards, h=6, node_lens=None):
    g = torch.Generator().manual_seed(seed)
    group = []
    for i, (n, r) in enumerate(zip(lengths, rewards)):
        nl = node_lens[i] if node_lens else sorted({2, n // 3, n // 2, (2 * n) // 3, n})
        group.append(GroupRollout(torch.randn(n, h, generator=g), nl, float(r)))
    return group


def test_exclude_self_changes_the_value_when_the_own_prefix_is_nearest():
    group = random_group(0, [12, 12], [1.0, 0.0])
    group[1].reps += 50.0                     # the sibling is far: the own prefixes are nearest
    kw = dict(min_d=1e-3, max_k=4, min_k=2)
    v_off, share_off = state_values(group, **kw)
    v_on, share_on = state_values(group, exclude_self=True, **kw)
    assert (v_off[0] > 0.99).all() and (share_off[0] > 0.99).all()   # own reward 1 leaks in
    assert (v_on[0] == 0.0).all() and (share_on[0] == 0.0).all()     # only the sibling's 0


def reference_values(group, min_d, max_k, min_k, distance, exclude_self):
    """V at every online node from the whole group's (sum L)^2 distance matrix, node by node."""
    full = torch.cdist(torch.cat([g.reps for g in group]).double(),
                       torch.cat([g.reps for g in group]).double())
    offs = np.cumsum([0] + [g.reps.shape[0] for g in group])
    pool = [(j, b) for j, g in enumerate(group) for b in g.node_lens]
    out = []
    for q, g in enumerate(group):
        online = g.node_lens[1:-1]
        vals = []
        for a, k in zip(online, k_schedule(len(online), max_k, min_k)):
            ds = []
            for j, b in pool:
                if j == q and (exclude_self or b > a):
                    ds.append(INF)
                    continue
                sub = full[offs[q]:offs[q] + a, offs[j]:offs[j] + b]
                s = float(sub.min(1).values.sum() if a >= b else sub.min(0).values.sum())
                ds.append(s / max(a, b) if distance == "normalised" else s)
            d = np.maximum(np.array(ds), min_d)
            near = np.argsort(d, kind="stable")[:k]
            w = 1.0 / d[near]
            r = np.array([group[pool[i][0]].reward for i in near])
            vals.append(float((w * r).sum() / w.sum()) if w.sum() >= 1e-8 else 0.0)
        out.append(vals)
    return out


@pytest.mark.parametrize("distance", ["normalised", "sum"])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_chunked_pool_equals_the_unchunked_reference(distance, exclude_self):
    group = random_group(3, [9, 14, 5, 11, 14], [1, 0, 0, 1, 1], h=8)
    kw = dict(min_d=0.5, max_k=7, min_k=2, distance=distance, exclude_self=exclude_self)
    want = reference_values(group, **kw)
    for chunk in (1, 2, 5, 100):
        got, _ = state_values(group, pool_chunk=chunk, **kw)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-6)


# --- the value method ------------------------------------------------------------------------------

def hista_cfg(**over):
    base = {"algorithm.adv_estimator": "hista", "rollout.num_generations": 3,
            "hista.min_interval": 4, "hista.mean_window": 2, "hista.min_d": 0.05,
            "hista.max_k": 6, "hista.min_k": 2}
    base.update(over)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def make_ctx(cfg, prompt_lens, resp_lens, rewards, gids, width=None, seed=0, h=8):
    g = torch.Generator().manual_seed(seed)
    width = width or max(resp_lens)
    mask = (torch.arange(width)[None] < torch.tensor(resp_lens)[:, None]).float()
    hidden, prompts = [], {}
    for p, r, gid in zip(prompt_lens, resp_lens, gids):
        prompts.setdefault(gid, torch.randn(p, h, generator=g))   # a group shares its prompt
        hidden.append(torch.cat([prompts[gid], torch.randn(r, h, generator=g)]))
    n = len(rewards)
    return StepContext(cfg, 1, None, torch.tensor(rewards, dtype=torch.float32),
                       torch.tensor(gids), mask, torch.zeros(n, width), None, None,
                       np.zeros(n), np.zeros(n, dtype=bool), hidden)


CTX_ARGS = dict(prompt_lens=[5, 5, 5, 7, 7, 7], resp_lens=[12, 9, 15, 6, 13, 10],
                rewards=[1.0, 0.0, 1.0, 0.0, 0.0, 1.0], gids=[0, 0, 0, 1, 1, 1])


def test_hista_is_registered_token_level_and_wants_hidden_states():
    cfg = hista_cfg()
    method = make_value_method(cfg, None, None, None)
    assert isinstance(method, Hista) and method.name == "hista"
    assert method.token_level and method.hidden_states_wanted


def test_advantages_follow_the_chain_identity_and_group_std():
    cfg = hista_cfg()
    ctx = make_ctx(cfg, **CTX_ARGS, width=18)
    method = Hista(cfg)
    out = method.advantages(ctx)
    assert out.token_level and out.advantages.shape == (6, 18)
    r = ctx.rewards[:, None].expand(6, 18)
    assert out.identity_max_abs_err(r) < 1e-5                     # lambda = 1: A s + b = r
    for i, (gid, n) in enumerate(zip(CTX_ARGS["gids"], CTX_ARGS["resp_lens"])):
        grp = ctx.rewards[torch.tensor(CTX_ARGS["gids"]) == gid]
        np.testing.assert_allclose(out.scale[i].numpy(), float(grp.std()) + 1e-4, rtol=1e-6)
        assert float(out.baselines[i, 0]) == pytest.approx(float(grp.mean()))  # V_0 = mean
        assert out.advantages[i, n - 1] == 0.0 and (out.advantages[i, n:] == 0).all()
    assert torch.isfinite(out.advantages).all()
    metrics = method.update(ctx)
    assert metrics["hista/online_nodes_mean"] > 0
    assert 0.0 <= metrics["hista/self_weight_share"] <= 1.0


def test_padding_width_changes_nothing_and_scale_none_divides_by_one():
    cfg = hista_cfg()
    a = Hista(cfg).advantages(make_ctx(cfg, **CTX_ARGS))
    b = Hista(cfg).advantages(make_ctx(cfg, **CTX_ARGS, width=30))
    torch.testing.assert_close(b.advantages[:, :a.advantages.shape[1]], a.advantages)
    cfg_none = hista_cfg(**{"hista.scale_rewards": "none"})
    c = Hista(cfg_none).advantages(make_ctx(cfg_none, **CTX_ARGS))
    assert (c.scale == 1).all()
    torch.testing.assert_close(c.advantages, a.advantages * a.scale)


def test_bad_inputs_fail_clearly():
    cfg = hista_cfg()
    ctx = make_ctx(cfg, **CTX_ARGS)
    ctx.hidden = None
    with pytest.raises(ValueError, match="hidden_states_wanted"):
        Hista(cfg).advantages(ctx)
    with pytest.raises(ValueError, match="num_generations must be >= 2 for hista"):
        Hista(hista_cfg(**{"rollout.num_generations": 1}))
    with pytest.raises(ValueError, match=r"hista.alpha must lie in \[0, 1\)"):
        hista_cfg(**{"hista.alpha": 1.0})
    with pytest.raises(ValueError, match="hista.pool_chunk must be >= 1"):
        hista_cfg(**{"hista.pool_chunk": 0})


def test_tiny_training_run_with_hista(tiny_model_dir, tmp_path):
    out = run(tiny_model_dir, tmp_path / "hista", **{
        "algorithm.adv_estimator": "hista", "rollout.num_generations": 4,
        "trainer.total_steps": 2, "hista.min_interval": 4, "hista.mean_window": 2,
        "hista.min_d": 0.01})
    r = RunReader(out)
    assert r.inferred_status() == "finished"
    steps = [m for m in r.metrics() if "reward/mean" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert m["hista/online_nodes_mean"] > 0 and math.isfinite(m["actor/pg_loss"])
    table = r.rollouts(2)
    assert len(table) == 16
    for adv, n in zip(table.token_advantages, table.num_tokens):
        assert adv is not None and len(adv) == n and np.isfinite(adv).all()
