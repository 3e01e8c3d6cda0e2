"""POISE's sibling baseline keeps the policy gradient unbiased; a same-rollout baseline does not.

A tabular softmax policy over a few prompts x and actions y, with known 0/1 rewards r(x, y),
has the exact gradient of J(theta) = sum_x p(x) sum_y pi(y|x) r(x, y) in closed form:
    dJ/dtheta[x] = p(x) * pi(.|x) * (r(x, .) - V(x)),   V(x) = sum_y pi(y|x) r(x, y).
Each rollout has features phi(x, y) = [onehot(x); r(x, y); noise(x, y)] -- they "see" the
rollout's own outcome, as a real reasoning state can -- and a fixed linear probe
g(phi) = clip(w . phi, 0, 1). Thousands of independent batches (B prompts x K rollouts) are
sampled at once; each gives the estimate mean_i A_i grad log pi(y_i|x_i) with A from
`compute_advantages`. The Monte-Carlo mean must sit within a few standard errors of the exact
gradient (POISE, RLOO, REINFORCE), and must not for the same-rollout baseline
A_i = r_i - g(phi_i). POISE Sec. 3 (the one-rollout ablation: same-rollout features, biased).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from scipy.stats import chi2

from poise_probe.advantages import compute_advantages

F64 = torch.float64
NUM_BATCHES = 20_000  # Monte-Carlo batches, all sampled at once
PROMPTS_PER_BATCH = 4
REWARD = torch.tensor([[1.0, 0.0, 0.0, 1.0],
                       [0.0, 1.0, 0.0, 0.0],
                       [1.0, 1.0, 0.0, 1.0]], dtype=F64)  # (P, Y) r(x, y), mixed in every prompt
PROMPT_PROBS = torch.tensor([0.5, 0.3, 0.2], dtype=F64)  # (P,) p(x)


@dataclass
class Problem:
    """A tabular policy with rewards, the exact gradient and a fixed probe's value per (x, y)."""

    pi: torch.Tensor  # (P, Y) pi(y|x)
    reward: torch.Tensor  # (P, Y)
    exact_grad: torch.Tensor  # (P, Y) dJ/dtheta
    probe: torch.Tensor  # (P, Y) g(phi(x, y)) in [0, 1]


def make_problem(probe_kind: str = "good") -> Problem:
    """The policy, its exact gradient (checked against autograd) and a linear probe on phi(x, y)."""
    gen = torch.Generator().manual_seed(0)
    P, Y = REWARD.shape
    theta = (0.8 * torch.randn(P, Y, generator=gen, dtype=F64)).requires_grad_()
    pi = torch.softmax(theta, -1)
    J = (PROMPT_PROBS[:, None] * pi * REWARD).sum()
    (autograd_grad,) = torch.autograd.grad(J, theta)
    pi = pi.detach()
    value = (pi * REWARD).sum(-1)  # (P,) V(x)
    exact = PROMPT_PROBS[:, None] * pi * (REWARD - value[:, None])  # closed form
    torch.testing.assert_close(exact, autograd_grad)

    # phi(x, y) = [onehot(x) (P); r(x, y); noise(x, y)] -> g = clip(w . phi, 0, 1)
    noise = torch.randn(P, Y, generator=gen, dtype=F64)
    phi = torch.cat([torch.eye(P, dtype=F64)[:, None, :].expand(P, Y, P),
                     REWARD[..., None], noise[..., None]], dim=-1)  # (P, Y, P + 2)
    if probe_kind == "good":  # mostly the prompt value, partly the rollout's own outcome
        w = torch.cat([0.7 * value, torch.tensor([0.3, 0.05], dtype=F64)])
    elif probe_kind == "bad":  # anti-correlated with the prompt value and the outcome
        w = torch.cat([1.0 - value, torch.tensor([-0.4, 0.2], dtype=F64)])
    else:
        raise ValueError(probe_kind)
    probe = (phi @ w).clamp(0.0, 1.0)  # (P, Y)
    return Problem(pi=pi, reward=REWARD, exact_grad=exact, probe=probe)


@dataclass
class Rollouts:
    """NUM_BATCHES independent batches flattened to N = M * B * K rollouts."""

    x: torch.Tensor  # (N,) prompt of each rollout
    y: torch.Tensor  # (N,) sampled action
    batch: torch.Tensor  # (N,) which Monte-Carlo batch
    group_ids: torch.Tensor  # (N,) one id per (batch, prompt slot)
    rewards: torch.Tensor  # (N,)
    preds: torch.Tensor  # (N,) g(phi(x_i, y_i))
    k: int


def sample_rollouts(problem: Problem, k: int, seed: int) -> Rollouts:
    """Sample M batches of B prompts from p(x), each with k rollouts from pi(.|x)."""
    gen = torch.Generator().manual_seed(seed)
    M, B = NUM_BATCHES, PROMPTS_PER_BATCH
    x_slot = torch.multinomial(PROMPT_PROBS, M * B, replacement=True, generator=gen)  # (M*B,)
    y = torch.multinomial(problem.pi[x_slot], k, replacement=True, generator=gen)  # (M*B, k)
    x = x_slot.repeat_interleave(k)  # (N,)
    y = y.reshape(-1)
    slot = torch.arange(M * B).repeat_interleave(k)
    # Shuffle rows: the estimator must group by id, not by position.
    perm = torch.randperm(len(x), generator=gen)
    x, y, slot = x[perm], y[perm], slot[perm]
    return Rollouts(x=x, y=y, batch=slot // B, group_ids=slot, rewards=problem.reward[x, y],
                    preds=problem.probe[x, y], k=k)


def batch_gradients(problem: Problem, ro: Rollouts, adv: torch.Tensor) -> torch.Tensor:
    """Per-batch estimates (M, P, Y): mean over the batch's rollouts of A_i * grad log pi(y_i|x_i)."""
    P, Y = problem.pi.shape
    score = torch.nn.functional.one_hot(ro.y, Y).to(F64) - problem.pi[ro.x]  # (N, Y) d log pi / d theta[x]
    contrib = adv[:, None] * score / (PROMPTS_PER_BATCH * ro.k)
    out = torch.zeros(NUM_BATCHES * P, Y, dtype=F64)
    out.index_add_(0, ro.batch * P + ro.x, contrib)
    return out.reshape(NUM_BATCHES, P, Y)


def z_scores(grads: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(mean - target) / standard error, per coordinate (P, Y)."""
    se = grads.std(0) / NUM_BATCHES ** 0.5
    return (grads.mean(0) - target) / se


def hotelling_t2(grads: torch.Tensor, target: torch.Tensor) -> tuple[float, int]:
    """Hotelling T^2 of the mean against target, dropping one action per prompt (rows sum to 0)."""
    g = grads[:, :, :-1].reshape(NUM_BATCHES, -1)  # (M, P*(Y-1)) full-rank coordinates
    d = g.mean(0) - target[:, :-1].reshape(-1)
    cov = torch.cov(g.T)
    return float(NUM_BATCHES * d @ torch.linalg.solve(cov, d)), d.numel()


def total_variance(grads: torch.Tensor) -> float:
    """Trace of the covariance of the per-batch gradient estimate."""
    return float(grads.reshape(NUM_BATCHES, -1).var(0).sum())


def advantages_of(kind: str, ro: Rollouts) -> torch.Tensor:
    """A (N,) for each estimator under test; poise and rloo come from the real code."""
    if kind == "poise":
        return compute_advantages("poise", ro.rewards, ro.group_ids, preds=ro.preds).advantages
    if kind == "rloo":
        return compute_advantages("rloo", ro.rewards, ro.group_ids).advantages
    if kind == "reinforce":  # no baseline
        return ro.rewards.clone()
    if kind == "same_rollout":  # the biased one-rollout ablation: the baseline sees its own outcome
        return ro.rewards - ro.preds
    raise ValueError(kind)


@pytest.fixture(scope="module")
def good():
    problem = make_problem("good")
    ro = sample_rollouts(problem, k=2, seed=1)
    grads = {kind: batch_gradients(problem, ro, advantages_of(kind, ro))
             for kind in ("poise", "rloo", "reinforce", "same_rollout")}
    return problem, ro, grads


@pytest.mark.parametrize("kind", ["poise", "rloo", "reinforce"])
def test_unbiased_estimators_match_exact_gradient(good, kind):
    problem, _, grads = good
    z = z_scores(grads[kind], problem.exact_grad)
    assert z.abs().max() < 4.0, f"{kind}: max |z| = {z.abs().max():.2f}\n{z}"
    t2, dof = hotelling_t2(grads[kind], problem.exact_grad)
    assert t2 < chi2.ppf(0.999, dof), f"{kind}: T^2 = {t2:.1f} on {dof} dof"


def test_poise_and_reinforce_have_the_same_expectation(good):
    """Mean of the per-batch difference POISE - REINFORCE (same samples) is zero within 4 SE."""
    problem, _, grads = good
    z = z_scores(grads["poise"] - grads["reinforce"], torch.zeros_like(problem.exact_grad))
    assert z.abs().max() < 4.0, z


def test_same_rollout_baseline_is_biased(good):
    problem, _, grads = good
    z = z_scores(grads["same_rollout"], problem.exact_grad)
    assert z.abs().max() > 8.0, f"expected a clear bias, max |z| = {z.abs().max():.2f}"
    t2, dof = hotelling_t2(grads["same_rollout"], problem.exact_grad)
    assert t2 > 10 * chi2.ppf(0.999, dof)
    # ... and the bias is exactly -p(x) pi (g - E_pi g): the gradient of the probe's own value.
    pi, g = problem.pi, problem.probe
    biased = problem.exact_grad - PROMPT_PROBS[:, None] * pi * (g - (pi * g).sum(-1, keepdim=True))
    assert z_scores(grads["same_rollout"], biased).abs().max() < 4.0


def test_good_probe_lowers_variance_below_reinforce(good):
    _, _, grads = good
    v_poise, v_reinforce = total_variance(grads["poise"]), total_variance(grads["reinforce"])
    assert v_poise < 0.8 * v_reinforce, (v_poise, v_reinforce)


def test_poise_baselines_are_sibling_predictions(good):
    """With K = 2 the real code's baseline is the sibling's g: b_i + b_j = g_i + g_j per pair."""
    _, ro, _ = good
    res = compute_advantages("poise", ro.rewards, ro.group_ids, preds=ro.preds)
    pair_b = torch.zeros(NUM_BATCHES * PROMPTS_PER_BATCH, dtype=F64).index_add_(0, ro.group_ids, res.baselines)
    pair_g = torch.zeros_like(pair_b).index_add_(0, ro.group_ids, ro.preds)
    torch.testing.assert_close(pair_b, pair_g)
    assert res.identity_max_abs_err(ro.rewards) < 1e-12


@pytest.mark.parametrize("probe_kind, k", [("bad", 2), ("good", 3)])
def test_poise_unbiased_for_any_probe_and_group_size(probe_kind, k):
    """Unbiasedness does not depend on probe quality (only on sibling features), nor on K."""
    problem = make_problem(probe_kind)
    ro = sample_rollouts(problem, k=k, seed=2)
    grads = batch_gradients(problem, ro, advantages_of("poise", ro))
    z = z_scores(grads, problem.exact_grad)
    assert z.abs().max() < 4.0, z
    t2, dof = hotelling_t2(grads, problem.exact_grad)
    assert t2 < chi2.ppf(0.999, dof), t2
