"""PPO's learned critics (ppo_critic, ppo_gae): GAE and whitening by hand, the critic's training,
the order that keeps baselines unbiased, exact resume, and short runs on the tiny model."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from poise_probe.config import load_config
from poise_probe.data import Prompt
from poise_probe.methods.critic import CriticMethod, PromptCritic, build_value_model
from poise_probe.advantages import masked_whiten
from poise_probe.methods.critic_gae import (TokenCritic, clipped_value_loss,
                                            gae_advantage_return, token_level_rewards)
from poise_probe.models import load_policy
from poise_probe.rollout.collect import Rollouts
from poise_probe.rundir import RunReader
from poise_probe.tasks import get_task
from poise_probe.tasks.base import Example
from poise_probe.update import response_mask
from poise_probe.value_methods import VALUE_METHODS, StepContext, make_value_method
from run_helpers import run, tiny_overrides


def t(x):
    return torch.tensor(x, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# GAE, whitening and the value loss by hand (verl core_algos)
# ---------------------------------------------------------------------------------------------

def test_gae_with_gamma_1_lam_1_gives_returns_r_and_advantages_r_minus_v():
    values = t([[.5, .2, .9, 0.], [.3, .6, .1, .4]])
    mask = t([[1, 1, 1, 0], [1, 1, 1, 1]])
    rewards = t([1., 0.])
    adv, ret = gae_advantage_return(token_level_rewards(rewards, mask), values, mask, 1.0, 1.0)
    m = mask.bool()
    torch.testing.assert_close(ret[m], rewards[:, None].expand(2, 4)[m])
    torch.testing.assert_close(adv[m], (rewards[:, None] - values)[m])


def test_gae_three_tokens_lam_half_by_hand():
    # t2: delta = 1 - .9 = .1, A = .1; t1: delta = .9 - .2 = .7, A = .7 + .5 * .1 = .75;
    # t0: delta = .2 - .5 = -.3, A = -.3 + .5 * .75 = .075; returns = A + V
    # row 2, two tokens then padding: t1: delta = 0 - .6, A = -.6; t0: delta = .6 - .3 = .3,
    # A = .3 + .5 * -.6 = 0; the padded position passes the running values through (0)
    values = t([[.5, .2, .9], [.3, .6, 0.]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae_advantage_return(token_level_rewards(t([1., 0.]), mask), values, mask,
                                    1.0, 0.5)
    torch.testing.assert_close(adv, t([[.075, .75, .1], [0., -.6, 0.]]))
    torch.testing.assert_close(ret, t([[.575, .95, 1.], [.3, 0., 0.]]))


def test_gae_discount_by_hand():
    # gamma .5, lam 1: A_t = gamma^(T-1-t) r - V_t: A0 = .25 - .5, A1 = .5 - .2, A2 = 1 - .9
    values, mask = t([[.5, .2, .9]]), t([[1, 1, 1]])
    adv, ret = gae_advantage_return(t([[0., 0., 1.]]), values, mask, 0.5, 1.0)
    torch.testing.assert_close(adv, t([[-.25, .3, .1]]))
    torch.testing.assert_close(ret, t([[.25, .5, 1.]]))


def test_gae_loop_equals_the_sum_of_discounted_deltas_per_row():
    g = torch.Generator().manual_seed(0)
    n, width, gamma, lam = 5, 7, 0.9, 0.8
    lens = [7, 3, 1, 5, 6]
    mask = (torch.arange(width)[None] < torch.tensor(lens)[:, None]).double()
    values = torch.rand((n, width), generator=g, dtype=torch.float64) * mask
    rewards = torch.rand(n, generator=g, dtype=torch.float64)
    adv, _ = gae_advantage_return(token_level_rewards(rewards, mask), values, mask, gamma, lam)
    for i, L in enumerate(lens):
        v = values[i, :L].tolist() + [0.0]
        r = [0.0] * (L - 1) + [float(rewards[i])]
        delta = [r[k] + gamma * v[k + 1] - v[k] for k in range(L)]
        want = [sum((gamma * lam) ** j * delta[k + j] for j in range(L - k)) for k in range(L)]
        np.testing.assert_allclose(adv[i, :L].numpy(), want, rtol=1e-12)


def test_token_level_rewards_sit_on_the_last_response_token():
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(token_level_rewards(t([.5, 1., 1.]), mask),
                               t([[0, 0, .5, 0], [1, 0, 0, 0], [0, 0, 0, 0]]))


def test_masked_whiten_by_hand_and_padding_changes_nothing():
    # mean 2, unbiased variance (1 + 0 + 1) / 2 = 1
    out = masked_whiten(t([[1., 2., 3., 100.]]), t([[1, 1, 1, 0]]))
    torch.testing.assert_close(out[0, :3], t([-1., 0., 1.]), rtol=0, atol=1e-7)
    other = masked_whiten(t([[1., 2., 3., -7.]]), t([[1, 1, 1, 0]]))
    torch.testing.assert_close(out[0, :3], other[0, :3])


def test_masked_whiten_uses_the_whole_batch_like_verl():
    g = torch.Generator().manual_seed(1)
    x = torch.randn((3, 5), generator=g, dtype=torch.float64)
    mask = t([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]).double()
    out = masked_whiten(x, mask)[mask.bool()]
    vals = x[mask.bool()]
    np.testing.assert_allclose(out.numpy(), ((vals - vals.mean()) / vals.std(unbiased=True)
                                             ).numpy(), rtol=1e-6)
    # verl divides by (count + 1e-8): the mean is 0 up to that
    assert abs(float(out.mean())) < 1e-8 and abs(float(out.std(unbiased=True)) - 1) < 1e-7
    with pytest.raises(ValueError, match=">= 2 counted response tokens"):
        masked_whiten(t([[1., 2.]]), t([[1, 0]]))


def test_clipped_value_loss_by_hand():
    # v .5, V_old .2, R 1, c .2: clip(v) = .4; max((.5-1)^2, (.4-1)^2) = .36; 0.5 * .36 = .18
    loss, n_clipped = clipped_value_loss(t([[.5]]), t([[1.]]), t([[.2]]), t([[1]]), 0.2, 1)
    torch.testing.assert_close(loss, torch.tensor(.18))
    assert float(n_clipped) == 1
    # inside the clip range the clipped term changes nothing; no clip: the plain half MSE
    loss, n_clipped = clipped_value_loss(t([[.3, 9.]]), t([[1., 0.]]), t([[.2, 0.]]), t([[1, 0]]),
                                         0.2, 1)
    torch.testing.assert_close(loss, torch.tensor(.5 * .49))
    assert float(n_clipped) == 0
    loss, _ = clipped_value_loss(t([[.5]]), t([[1.]]), t([[.2]]), t([[1]]), None, 1)
    torch.testing.assert_close(loss, torch.tensor(.125))


# ---------------------------------------------------------------------------------------------
# The methods on a fixed batch
# ---------------------------------------------------------------------------------------------

PROMPTS = ["12+30=", "7*8=", "100-1="]
RESPONSES = [[40, 41, 42], [43, 44, 45, 46, 47], [48], [49, 50, 51, 52], [53, 54], [55] * 6]
SCORES = [1., 0., 1., 1., 0., 0.]


def method_and_ctx(model_dir, estimator: str, step: int = 1, **critic):
    """A value method on the tiny model and a 3-prompt x 2-rollout StepContext."""
    extra = {f"critic.{k}": v for k, v in critic.items()}
    cfg = load_config(None, tiny_overrides(model_dir, **{"algorithm.adv_estimator": estimator,
                                                         "optim.micro_batch_size": 2, **extra}))
    model, tok = load_policy(model_dir)
    method = make_value_method(cfg, model, tok, "cpu")
    return method, make_ctx(cfg, tok, step)


def make_ctx(cfg, tok, step: int) -> StepContext:
    task = get_task("arith")
    prompts = [Prompt(Example(prompt=p, ground_truth="0", domain="math", data_source="test"),
                      task) for p in PROMPTS]
    prompt_ids = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    gids = torch.tensor([0, 0, 1, 1, 2, 2])
    r = t(SCORES)
    batch = Rollouts(prompts, prompt_ids, RESPONSES, ["x"] * 6, [False] * 6, gids, r, r.clone(),
                     pad_id=tok.pad_token_id)
    mask = response_mask(batch, 7)                        # one column past the longest
    return StepContext(cfg, step, batch, r, gids, mask, torch.zeros(mask.shape), None, None,
                       np.zeros(6), np.zeros(6, dtype=bool))


def prompt_bce(method: PromptCritic, ctx) -> float:
    """The critic's BCE on the batch, each rollout's score against its prompt's V(x)."""
    with torch.no_grad():
        logits = method.prompt_logits([0, 1, 2], ctx.batch)[ctx.group_ids]
    return float(torch.nn.functional.binary_cross_entropy_with_logits(logits, ctx.batch.scores))


def test_both_critics_are_registered():
    assert VALUE_METHODS["ppo_critic"] is PromptCritic and not PromptCritic.token_level
    assert VALUE_METHODS["ppo_gae"] is TokenCritic and TokenCritic.token_level
    assert issubclass(TokenCritic, CriticMethod)


def test_bce_training_reduces_the_critics_loss_on_a_fixed_batch(tiny_model_dir):
    method, ctx = method_and_ctx(tiny_model_dir, "ppo_critic", lr=1e-2)
    before = prompt_bce(method, ctx)
    assert before == pytest.approx(np.log(2), abs=1e-6)   # zero head: V = 0.5 everywhere
    losses = []
    for step in range(1, 6):
        ctx.step, ctx.extra = step, {}
        method.advantages(ctx)
        losses.append(method.update(ctx)["critic/loss"])
    after = prompt_bce(method, ctx)
    assert after < before - 0.05, (before, after)
    assert losses[-1] < losses[0]


def test_value_loss_training_reduces_the_token_critics_loss(tiny_model_dir):
    method, ctx = method_and_ctx(tiny_model_dir, "ppo_gae", lr=1e-2, value_clip="null")
    losses = []
    for step in range(1, 6):
        ctx.step, ctx.extra = step, {}
        method.advantages(ctx)
        losses.append(method.update(ctx)["critic/loss"])
    assert losses[-1] < losses[0] - 0.02, losses


@pytest.mark.parametrize("estimator", ["ppo_critic", "ppo_gae"])
def test_baselines_come_from_the_critic_before_its_update(tiny_model_dir, estimator):
    """Unbiasedness ordering: step s's baselines are the values of the critic as it was after
    step s - 1; the update on this batch changes the critic only afterwards."""
    method, ctx = method_and_ctx(tiny_model_dir, estimator, lr=1e-2)
    for step in (1, 2):                                   # step 2: the critic has learned once
        ctx.step, ctx.extra = step, {}
        before = copy.deepcopy(method.critic)
        out = method.advantages(ctx)
        method.update(ctx)
        fresh = copy.deepcopy(method)                     # same critic, weights swapped in/out
        fresh.critic = before
        with torch.no_grad():
            want = fresh._values(ctx)
            after = method._values(ctx)
        m = ctx.mask.bool()
        if estimator == "ppo_critic":
            torch.testing.assert_close(out.baselines, want, rtol=0, atol=0)
            torch.testing.assert_close(out.advantages + out.baselines, ctx.rewards)
            assert not torch.allclose(out.baselines, after, atol=1e-6)
        else:
            torch.testing.assert_close(out.baselines, want, rtol=0, atol=0)
            assert not torch.allclose(out.baselines[m], after[m], atol=1e-6)


@pytest.mark.parametrize("estimator", ["ppo_critic", "ppo_gae"])
def test_warmup_uses_rloo_while_the_critic_trains(tiny_model_dir, estimator):
    method, ctx = method_and_ctx(tiny_model_dir, estimator, warmup_steps=1)
    out = method.advantages(ctx)
    m = method.update(ctx)
    assert m["critic/warmup"] == 1.0 and method.updates == 1
    seq = out.per_sequence(ctx.mask)
    torch.testing.assert_close(seq, t([1., -1., 0., 0., 0., 0.]))   # r_i - r_sibling
    ctx.step, ctx.extra = 2, {}
    out = method.advantages(ctx)
    assert method.update(ctx)["critic/warmup"] == 0.0
    if estimator == "ppo_critic":
        torch.testing.assert_close(out.baselines, ctx.extra["critic_values"])


def test_state_dict_round_trip_resumes_exactly(tiny_model_dir):
    a, ctx = method_and_ctx(tiny_model_dir, "ppo_gae", lr=1e-2)
    a.advantages(ctx)
    a.update(ctx)
    saved = copy.deepcopy(a.state_dict())                 # what torch.save / torch.load give
    b, _ = method_and_ctx(tiny_model_dir, "ppo_gae", lr=1e-2, init="random")
    b.load_state_dict(saved)
    assert b.updates == a.updates == 1
    for (k, x), y in zip(a.critic.state_dict().items(), b.critic.state_dict().values()):
        assert torch.equal(x, y), k
    for x, y in ((a, ctx), (b, ctx)):                     # the same next step on both
        y.step, y.extra = 2, {}
        x.advantages(y)
        x.update(y)
    for (k, x), y in zip(a.critic.state_dict().items(), b.critic.state_dict().values()):
        assert torch.equal(x, y), k
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    with pytest.raises(ValueError, match="lacks"):
        b.load_state_dict({"critic": saved["critic"]})


def test_policy_init_copies_the_decoder_and_random_init_leaves_the_run_rng_alone(tiny_model_dir):
    policy, _ = load_policy(tiny_model_dir)
    method, _ = method_and_ctx(tiny_model_dir, "ppo_critic")
    for (k, p), q in zip(policy.get_decoder().state_dict().items(),
                         method.critic.backbone.state_dict().values()):
        assert torch.equal(p, q), k
    assert method.critic.backbone.embed_tokens.weight.data_ptr() != \
        policy.get_decoder().embed_tokens.weight.data_ptr()
    cfg = load_config(None, tiny_overrides(tiny_model_dir, **{
        "algorithm.adv_estimator": "ppo_critic", "critic.init": "random"}))
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    rnd = build_value_model(cfg, policy, "cpu")
    assert torch.equal(torch.rand(3), expected)
    assert not torch.equal(rnd.backbone.embed_tokens.weight,
                           method.critic.backbone.embed_tokens.weight)
    again = build_value_model(cfg, policy, "cpu")        # seeded from trainer.seed
    assert torch.equal(rnd.backbone.embed_tokens.weight, again.backbone.embed_tokens.weight)


def test_cost_metrics_count_parameters_gradients_and_adamw_state(tiny_model_dir):
    method, ctx = method_and_ctx(tiny_model_dir, "ppo_critic")
    method.advantages(ctx)
    m = method.update(ctx)
    n = sum(p.numel() for p in method.critic.parameters())
    assert m["critic/params"] == n
    # fp32: 4 bytes of weights, 4 of gradient, 8 of AdamW moments per parameter (+ step counts)
    assert m["critic/param_bytes"] == m["critic/grad_bytes"] == 4 * n
    assert 8 * n <= m["critic/optimizer_bytes"] <= 8 * n + 8 * len(list(method.critic.parameters()))
    assert m["critic/memory_bytes"] == (m["critic/param_bytes"] + m["critic/grad_bytes"]
                                        + m["critic/optimizer_bytes"])
    assert m["timing_s/critic_values"] > 0 and m["timing_s/critic_update"] > 0
    assert all(p.grad is None for p in method.critic.parameters())   # freed after the update


def test_update_before_advantages_is_refused(tiny_model_dir):
    method, ctx = method_and_ctx(tiny_model_dir, "ppo_critic")
    with pytest.raises(RuntimeError, match="before advantages"):
        method.update(ctx)


@pytest.mark.parametrize("key, value, match", [
    ("critic.micro_batch_size", 0, "critic.micro_batch_size must be >= 1"),
    ("critic.mini_batch_prompts", 0, "critic.mini_batch_prompts must be >= 1"),
    ("critic.max_grad_norm", 0, "critic.max_grad_norm must be > 0"),
    ("critic.value_clip", 0, "critic.value_clip must be > 0 or None"),
])
def test_bad_critic_config_is_refused(key, value, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, ["algorithm.adv_estimator=ppo_gae", f"{key}={value}"])


def test_warmup_with_one_rollout_is_refused(tiny_model_dir):
    cfg = load_config(None, tiny_overrides(tiny_model_dir, **{
        "algorithm.adv_estimator": "ppo_critic", "rollout.num_generations": 1,
        "critic.warmup_steps": 2}))
    model, tok = load_policy(tiny_model_dir)
    with pytest.raises(ValueError, match="num_generations >= 2"):
        make_value_method(cfg, model, tok, "cpu")


# ---------------------------------------------------------------------------------------------
# End to end on the tiny model
# ---------------------------------------------------------------------------------------------

CRITIC_KEYS = {"critic/loss", "critic/value_mean", "critic/explained_var", "critic/params",
               "critic/memory_bytes", "timing_s/critic_update", "timing_s/critic_values",
               "reward/mean", "adv/identity_max_abs_err", "actor/pg_loss"}


def test_ppo_critic_trains_end_to_end_in_the_right_order(tiny_model_dir, tmp_path, monkeypatch):
    events = []
    real_adv, real_update = CriticMethod.advantages, CriticMethod.update

    def fingerprint(method):
        return tuple(float(p.detach().double().sum()) for p in method.critic.parameters())

    def advantages(self, ctx):
        events.append(("adv", ctx.step, fingerprint(self)))
        return real_adv(self, ctx)

    def update(self, ctx):
        out = real_update(self, ctx)
        events.append(("update", ctx.step, fingerprint(self)))
        return out

    monkeypatch.setattr(CriticMethod, "advantages", advantages)
    monkeypatch.setattr(CriticMethod, "update", update)
    out = run(tiny_model_dir, tmp_path / "run", **{"algorithm.adv_estimator": "ppo_critic",
                                                   "trainer.total_steps": 2,
                                                   "critic.lr": 1e-2})
    r = RunReader(out)
    steps = [m for m in r.metrics() if "reward/mean" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert CRITIC_KEYS <= set(m), CRITIC_KEYS - set(m)
        assert m["adv/identity_max_abs_err"] < 1e-6
    table = r.rollouts(2)
    np.testing.assert_allclose(table.baseline + table.advantage, table.reward, atol=1e-6)
    # rollouts of a prompt share V(x)
    assert (table.groupby("group_id").baseline.nunique() == 1).all()
    assert [(k, s) for k, s, _ in events] == [("adv", 1), ("update", 1), ("adv", 2),
                                              ("update", 2)]
    assert events[2][2] == events[1][2]        # step 2 reads the critic step 1 left
    assert events[1][2] != events[0][2] and events[3][2] != events[2][2]


def test_ppo_gae_trains_end_to_end_from_the_cli(tiny_model_dir, tmp_path):
    from poise_probe.cli import main

    out = tmp_path / "run"
    assert main(["train", "--output", str(out)] + tiny_overrides(tiny_model_dir, **{
        "algorithm.adv_estimator": "ppo_gae", "trainer.total_steps": 2})) == 0
    r = RunReader(out)
    assert r.inferred_status() == "finished"
    steps = [m for m in r.metrics() if "reward/mean" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert CRITIC_KEYS | {"critic/vf_clipfrac", "critic/vf_explained_var"} <= set(m)
    table = r.rollouts(2)
    adv = np.concatenate(table.token_advantages.to_list())
    assert abs(adv.mean()) < 1e-5 and abs(adv.std(ddof=1) - 1) < 1e-3    # whitened


def _trained_state(run_dir):
    from safetensors.torch import load_file

    step, ckpt = RunReader(run_dir).checkpoints()[-1]
    weights = load_file(str(ckpt / "policy" / "model.safetensors"))
    vm = torch.load(ckpt / "trainer_state.pt", map_location="cpu",
                    weights_only=False)["value_method"]
    metrics = [{k: v for k, v in m.items() if not (k.startswith("timing_s/") or
                                                    k.endswith("fit_s") or k == "time")}
               for m in RunReader(run_dir).metrics()]
    return step, weights, vm, metrics


def test_stopped_then_resumed_run_matches_an_uninterrupted_one(tiny_model_dir, tmp_path):
    from poise_probe.trainer import train

    cfg = load_config(None, tiny_overrides(tiny_model_dir, **{
        "algorithm.adv_estimator": "ppo_critic", "trainer.total_steps": 2, "critic.lr": 1e-2}))
    train(cfg, tmp_path / "full")
    train(cfg, tmp_path / "cut", stop_after=1)
    train(cfg, tmp_path / "cut", resume=True)
    s_full, w_full, vm_full, m_full = _trained_state(tmp_path / "full")
    s_cut, w_cut, vm_cut, m_cut = _trained_state(tmp_path / "cut")
    assert s_full == s_cut == 2 and vm_full["updates"] == vm_cut["updates"] == 2
    for k in w_full:
        assert torch.equal(w_full[k], w_cut[k]), k
    for k in vm_full["critic"]:
        assert torch.equal(vm_full["critic"][k], vm_cut["critic"][k]), k
    for i, st in vm_full["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg"], vm_cut["optimizer"]["state"][i]["exp_avg"])
    assert m_full == m_cut
