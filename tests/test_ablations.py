"""POISE's one-rollout ablations: the same-rollout baseline is biased, the prompt-only one is not.

The statistical tests reuse `test_unbiasedness`'s tabular policy with its exact gradient: the
same-rollout baseline b_i = g(phi(x_i, y_i)) (a probe that sees the rollout's own outcome)
misses the exact gradient by exactly -p(x) pi (g - E_pi g), while the prompt-only baseline,
from the real `poise_prompt` probe bank fitted on the prompt block of the features, matches it.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import chi2
from test_unbiasedness import (PROMPT_PROBS, batch_gradients, hotelling_t2, make_problem,
                               sample_rollouts, z_scores)

from poise_probe.config import load_config
from poise_probe.methods.ablations import PoisePrompt, PoiseSelf, own_prediction_advantage
from poise_probe.value_methods import VALUE_METHODS, StepContext

F64 = torch.float64
HIDDEN = 3          # the synthetic "hidden size": the prompt block is onehot(x) over 3 prompts


def ablation_cfg(**extra):
    over = {"probe.bootstrap_steps": 0, "probe.min_steps_to_fit": 1,
            "probe.buffer_caps": "{all: 200000}", **extra}
    return load_config(None, [f"{k}={v}" for k, v in over.items()])


def tiny_model(hidden=HIDDEN):
    return SimpleNamespace(config=SimpleNamespace(hidden_size=hidden))


def synthetic_features(x: torch.Tensor, rewards: torch.Tensor, seed: int) -> np.ndarray:
    """phi = [prompt onehot(x) (3); reasoning block that sees the outcome (3); entropies (3)]."""
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    prompt = torch.nn.functional.one_hot(x, HIDDEN).to(F64)
    reasoning = rewards[:, None].to(F64) + 0.3 * torch.randn(n, HIDDEN, generator=gen, dtype=F64)
    entropies = torch.rand(n, 3, generator=gen, dtype=F64) + 0.5 * rewards[:, None].to(F64)
    return torch.cat([prompt, reasoning, entropies], 1).numpy()


def context(cfg, step, rewards, group_ids, features, preds=None, fitted=None):
    n = len(rewards)
    batch = SimpleNamespace(domains=["math"] * n, scores=rewards.float())
    return StepContext(cfg, step, batch, rewards, group_ids, torch.ones(n, 1),
                       torch.zeros(n, 1), None, features,
                       np.full(n, np.nan) if preds is None else preds,
                       np.zeros(n, bool) if fitted is None else fitted)


# ------------------------------------------------------------------ bias and its absence

@pytest.fixture(scope="module")
def mc():
    """The tabular problem, 20 000 Monte-Carlo batches of 4 prompts x 2 rollouts, and a
    poise_prompt bank fitted on an independent sample's features."""
    problem = make_problem("good")
    ro = sample_rollouts(problem, k=2, seed=11)
    train = sample_rollouts(problem, k=2, seed=12)
    method = PoisePrompt(ablation_cfg(), tiny_model())
    method.bank.update(method.prompt_block(synthetic_features(train.x, train.rewards, 0)),
                       train.rewards.numpy(), train.group_ids.numpy(), ["math"] * len(train.x),
                       step=1)
    return problem, ro, method


def test_same_rollout_baseline_is_biased(mc):
    problem, ro, _ = mc
    ready = torch.ones(len(ro.x), dtype=torch.bool)
    adv, used = own_prediction_advantage(ro.rewards, ro.group_ids, ro.preds, ready)
    assert used.all()
    torch.testing.assert_close(adv.baselines, ro.preds)                 # b_i = g(phi_i)
    grads = batch_gradients(problem, ro, adv.advantages)
    z = z_scores(grads, problem.exact_grad)
    assert z.abs().max() > 8.0, f"expected a clear bias, max |z| = {z.abs().max():.2f}"
    t2, dof = hotelling_t2(grads, problem.exact_grad)
    assert t2 > 10 * chi2.ppf(0.999, dof)
    # the bias is exactly the gradient of the probe's own value, -p(x) pi (g - E_pi g)
    pi, g = problem.pi, problem.probe
    biased = problem.exact_grad - PROMPT_PROBS[:, None] * pi * (g - (pi * g).sum(-1, keepdim=True))
    assert z_scores(grads, biased).abs().max() < 4.0


def test_prompt_only_baseline_is_unbiased(mc):
    problem, ro, method = mc
    features = synthetic_features(ro.x, ro.rewards, 1)
    ctx = context(method.cfg, 2, ro.rewards, ro.group_ids, features)
    adv = method.advantages(ctx)
    # the baseline is a function of the prompt alone: one value per prompt x
    for x in range(HIDDEN):
        b = adv.baselines[ro.x == x]
        assert float(b.max() - b.min()) < 1e-6
    grads = batch_gradients(problem, ro, adv.advantages)
    z = z_scores(grads, problem.exact_grad)
    assert z.abs().max() < 4.0, z
    t2, dof = hotelling_t2(grads, problem.exact_grad)
    assert t2 < chi2.ppf(0.999, dof), t2
    # ... and it learned the prompt value (the sibling-reward target's mean), so it is a baseline
    value = (problem.pi * problem.reward).sum(-1)
    learned = torch.stack([adv.baselines[ro.x == x][0] for x in range(HIDDEN)])
    torch.testing.assert_close(learned.to(F64), value, atol=0.02, rtol=0)


def test_prompt_only_baseline_ignores_the_rollout_dependent_columns(mc):
    _, ro, method = mc
    rows = ro.group_ids < 32                                            # whole groups
    r, g, n = ro.rewards[rows], ro.group_ids[rows], int(rows.sum())
    phi = synthetic_features(ro.x[rows], r, 2)
    other = phi.copy()
    other[:, HIDDEN:] = np.random.default_rng(0).normal(size=(n, HIDDEN + 3))
    a = method.advantages(context(method.cfg, 2, r, g, phi))
    b = method.advantages(context(method.cfg, 2, r, g, other))
    torch.testing.assert_close(a.baselines, b.baselines)


# ------------------------------------------------------------------ the value methods

def test_both_are_registered_value_methods():
    assert VALUE_METHODS["poise_self"] is PoiseSelf
    assert VALUE_METHODS["poise_prompt"] is PoisePrompt


def test_own_prediction_advantage_hand_vector_and_bootstrap():
    """Group 0 ready: b = own prediction; group 1 not: RLOO (the sibling's reward)."""
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    g = torch.tensor([0, 0, 1, 1])
    p = torch.tensor([0.7, 0.2, 0.3, float("nan")])
    adv, used = own_prediction_advantage(r, g, p, torch.tensor([True, True, True, False]))
    torch.testing.assert_close(adv.baselines, torch.tensor([0.7, 0.2, 1.0, 1.0]))
    torch.testing.assert_close(adv.advantages, torch.tensor([0.3, -0.2, 0.0, 0.0]))
    assert used.tolist() == [True, True, False, False]
    assert adv.identity_max_abs_err(r) < 1e-7


def test_poise_self_reads_the_main_probe_and_waits_for_the_bootstrap():
    cfg = ablation_cfg(**{"probe.bootstrap_steps": 1})
    m = PoiseSelf(cfg)
    r, g = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([5, 5, 9, 9])
    preds, fitted = np.array([0.6, 0.4, 0.1, 0.9]), np.ones(4, bool)
    ctx = context(cfg, 1, r, g, None, preds, fitted)                    # step 1: bootstrap
    torch.testing.assert_close(m.advantages(ctx).baselines, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert m.update(ctx) == {"ablation/used_frac": 0.0}
    ctx = context(cfg, 2, r, g, None, preds, fitted)
    out = m.advantages(ctx)
    torch.testing.assert_close(out.baselines, torch.tensor(preds, dtype=torch.float32))
    assert m.update(ctx) == {"ablation/used_frac": 1.0}
    assert m.state_dict() == {}


def test_poise_prompt_bootstraps_then_fits_and_checkpoints():
    cfg = ablation_cfg()
    m = PoisePrompt(cfg, tiny_model())
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(8).repeat_interleave(2) % HIDDEN
    r = (torch.rand(16, generator=gen) < 0.5).float()
    g = torch.arange(8).repeat_interleave(2)
    phi = synthetic_features(x, r, 3)
    ctx = context(cfg, 1, r, g, phi)
    first = m.advantages(ctx)                                           # nothing fitted: RLOO
    torch.testing.assert_close(first.baselines, r.reshape(-1, 2).flip(1).reshape(-1))
    metrics = m.update(ctx)
    assert metrics["ablation/used_frac"] == 0.0
    assert metrics["prompt_probe/all/fitted"] == 1.0 and "probe/all/fitted" not in metrics
    second = m.advantages(context(cfg, 2, r, g, phi))
    assert not torch.equal(second.baselines, first.baselines)
    assert "prompt_probe/mae" in m.update(context(cfg, 2, r, g, phi))
    # a fresh method loaded from the state predicts the same baselines
    again = PoisePrompt(cfg, tiny_model())
    again.load_state_dict(m.state_dict())
    torch.testing.assert_close(again.advantages(context(cfg, 3, r, g, phi)).baselines,
                               m.advantages(context(cfg, 3, r, g, phi)).baselines)


def test_poise_prompt_bad_inputs():
    cfg = ablation_cfg()
    m = PoisePrompt(cfg, tiny_model())
    r, g = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    with pytest.raises(ValueError, match=r"2\*hidden \+ 3"):
        m.advantages(context(cfg, 1, r, g, np.zeros((2, 5))))
    with pytest.raises(RuntimeError, match="before advantages"):
        m.update(context(cfg, 1, r, g, np.zeros((2, 9))))
    with pytest.raises(ValueError, match="checkpoint has"):
        m.load_state_dict({"other": 1})
    with pytest.raises(ValueError, match="hidden size"):
        PoisePrompt(cfg, None)


@pytest.mark.parametrize("name", ["poise_self", "poise_prompt"])
def test_config_checks_apply_to_the_ablations(name):
    with pytest.raises(ValueError, match=f"num_generations must be >= 2 for {name}"):
        load_config(None, [f"adv_estimator={name}", "rollout.num_generations=1"])
    with pytest.raises(ValueError, match=f"must be false for {name}"):
        load_config(None, [f"adv_estimator={name}", "algorithm.dynamic_sampling=true"])


# ------------------------------------------------------------------ end to end

@pytest.mark.parametrize("name", ["poise_self", "poise_prompt"])
def test_two_step_training_uses_the_probe_from_step_two(tiny_model_dir, tmp_path, name):
    """`poise train` on the tiny model: RLOO at step 1 (nothing fitted), the ablation's probe at
    step 2; poise_self's baseline is the rollout's own prediction, poise_prompt's is one value
    per prompt."""
    from poise_probe.checkpoint import load_checkpoint
    from poise_probe.rundir import RunReader
    from run_helpers import run

    out = run(tiny_model_dir, tmp_path / name, **{
        "algorithm.adv_estimator": name, "trainer.total_steps": 2,
        "probe.bootstrap_steps": 0, "probe.min_steps_to_fit": 1})
    r = RunReader(out)
    steps = [m for m in r.metrics() if "reward/mean" in m]
    assert [m["ablation/used_frac"] for m in steps] == [0.0, 1.0]
    for m in steps:
        assert m["adv/identity_max_abs_err"] < 1e-6
    table = r.rollouts(2)
    np.testing.assert_allclose(table.baseline + table.advantage, table.reward, atol=1e-6)
    if name == "poise_self":
        np.testing.assert_allclose(table.baseline, table.probe_pred, atol=1e-6)
    else:
        assert steps[1]["prompt_probe/all/fitted"] == 1.0 and "prompt_probe/mae" in steps[1]
        for _, grp in table.groupby("group_id"):
            np.testing.assert_allclose(grp.baseline, grp.baseline.iloc[0], atol=1e-5)
        state = load_checkpoint(r.checkpoints()[-1][1])["value_method"]
        assert "all/buffer/X" in state["bank"] and state["bank"]["all/buffer/X"].shape[1] == 32


def test_step_tokens_counts_what_was_sampled():
    """tokens/sampled where logged; older runs: the kept tokens scaled by sampled/kept prompts."""
    import pandas as pd

    from poise_probe.ablate import step_tokens

    m = pd.DataFrame({"tokens/generated": [100.0, 100.0, 80.0, 50.0],
                      "tokens/sampled": [100.0, 250.0, None, None],
                      "batch/prompts_sampled": [8, 16, 16, None],
                      "batch/prompts": [8, 8, 8, None]})
    assert step_tokens(m).tolist() == [100.0, 250.0, 160.0, 50.0]
    assert step_tokens(pd.DataFrame({"tokens/generated": [3.0]})).tolist() == [3.0]
