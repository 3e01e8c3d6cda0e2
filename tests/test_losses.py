"""Policy losses: hand-computed clip cases, aggregation modes, masking, KL kinds, entropies, log-probs."""
from __future__ import annotations

import math

import pytest
import torch

from poise_probe.losses import (
    agg_loss,
    entropy_from_logits,
    kl_penalty,
    masked_mean,
    masked_sum,
    policy_loss,
    token_log_probs,
)

F64 = torch.float64


def one_token(ratio: float, adv: float, **kw):
    """policy_loss on a single token with the given ratio and advantage; returns (loss, metrics, logp)."""
    logp = torch.tensor([[math.log(ratio)]], dtype=F64, requires_grad=True)
    loss, metrics = policy_loss(logp, torch.zeros(1, 1, dtype=F64), torch.tensor([adv], dtype=F64),
                                torch.ones(1, 1), **kw)
    return loss, metrics, logp


# ------------------------------------------------------------------ masked reductions


def test_masked_sum_and_mean_ignore_garbage():
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), -float("inf")]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_sum(x, m).item() == 6.0
    assert masked_mean(x, m).item() == 2.0
    torch.testing.assert_close(masked_mean(x, m, dim=-1), torch.tensor([1.5, 3.0]))
    torch.testing.assert_close(masked_sum(x, m, dim=0), torch.tensor([4.0, 2.0, 0.0]))


def test_masked_mean_empty_slice_is_zero_not_nan():
    x = torch.tensor([[1.0, 2.0], [5.0, 7.0]])
    m = torch.tensor([[1, 1], [0, 0]])
    torch.testing.assert_close(masked_mean(x, m, dim=-1), torch.tensor([1.5, 0.0]))
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0


def test_masked_sum_shape_mismatch():
    with pytest.raises(ValueError, match="mask must have x's shape"):
        masked_sum(torch.ones(2, 3), torch.ones(2, 2))


# ------------------------------------------------------------------ agg_loss

LOSS = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -7.0, float("nan")]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_agg_token_mean_hand():
    assert agg_loss(LOSS, MASK, "token-mean").item() == pytest.approx(15.0 / 5)


def test_agg_seq_mean_token_sum_hand():
    assert agg_loss(LOSS, MASK, "seq-mean-token-sum").item() == pytest.approx((6.0 + 9.0) / 2)


def test_agg_seq_mean_token_mean_hand():
    assert agg_loss(LOSS, MASK, "seq-mean-token-mean").item() == pytest.approx((2.0 + 4.5) / 2)


def test_agg_fully_masked_row_counts_in_b():
    loss = torch.tensor([[2.0, 4.0], [9.0, 9.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    assert agg_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(1.5)
    assert agg_loss(loss, mask, "token-mean").item() == pytest.approx(3.0)
    assert agg_loss(loss, torch.zeros_like(mask), "token-mean").item() == 0.0


def test_agg_unknown_mode_lists_modes():
    with pytest.raises(ValueError, match="loss_agg_mode 'seq-sum'.*token-mean.*seq-mean-token-sum"):
        agg_loss(LOSS, MASK, "seq-sum")


@pytest.mark.parametrize("kw", [dict(num_tokens=0), dict(num_tokens=-3.0), dict(num_seqs=0),
                                dict(num_tokens=float("nan"))])
def test_agg_bad_counts(kw):
    with pytest.raises(ValueError, match="must be a positive count"):
        agg_loss(LOSS, MASK, "token-mean", **kw)


def test_agg_shape_checks():
    with pytest.raises(ValueError, match=r"loss_mat must be \(B, T\)"):
        agg_loss(torch.ones(3), torch.ones(3), "token-mean")
    with pytest.raises(ValueError, match="mask must have loss_mat's shape"):
        agg_loss(torch.ones(2, 3), torch.ones(2, 2), "token-mean")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_micro_batch_accumulation_equals_full_batch(mode):
    """Summing micro-batch losses normalised by mini-batch counts gives the full loss and gradient."""
    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    logp = (-torch.rand(B, T, generator=g, dtype=F64)).requires_grad_()
    old = -torch.rand(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, generator=g, dtype=F64)
    mask = (torch.rand(B, T, generator=g) < 0.7).to(F64)
    mask[:, 0] = 1
    full, _ = policy_loss(logp, old, adv, mask, loss_agg_mode=mode)
    (full_grad,) = torch.autograd.grad(full, logp)

    n_tok, n_seq = float(mask.sum()), float(B)
    acc = torch.zeros((), dtype=F64)
    for sl in (slice(0, 2), slice(2, 3), slice(3, 6)):
        part, _ = policy_loss(logp[sl], old[sl], adv[sl], mask[sl], loss_agg_mode=mode,
                              num_tokens=n_tok, num_seqs=n_seq)
        acc = acc + part
    (acc_grad,) = torch.autograd.grad(acc, logp)
    torch.testing.assert_close(acc, full)
    torch.testing.assert_close(acc_grad, full_grad)


def test_token_mean_without_num_tokens_differs_across_micro_batches():
    """Guard for the test above: plain per-micro-batch means do not add up to the full mean."""
    loss = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    full = agg_loss(loss, mask, "token-mean")
    parts = sum(agg_loss(loss[i:i + 1], mask[i:i + 1], "token-mean") / 2 for i in range(2))
    assert full.item() == pytest.approx(7 / 4) and parts.item() == pytest.approx(2.5)


# ------------------------------------------------------------------ policy_loss hand cases


@pytest.mark.parametrize("ratio, adv, expected, case", [
    (1.5, +1.0, -1.28, "A>0 ratio above 1+eps_high: clipped at 1.28"),
    (1.1, +1.0, -1.1, "A>0 inside the trust region: unclipped"),
    (0.5, +1.0, -0.5, "A>0 ratio below 1-eps_low: unclipped (pessimistic min)"),
    (0.5, -1.0, 0.8, "A<0 ratio below 1-eps_low: clipped at 0.8"),
    (1.5, -1.0, 1.5, "A<0 ratio above 1+eps_high: unclipped"),
    (20.0, -1.0, 10.0, "A<0 huge ratio: dual clip caps at c*|A| = 10"),
    (20.0, -0.5, 5.0, "dual clip scales with |A|"),
    (5.0, -1.0, 5.0, "A<0 ratio below c: dual clip inactive"),
    (20.0, +2.0, -2.56, "A>0 huge ratio: 1.28 * A"),
    (1.7, 0.0, 0.0, "A=0 contributes nothing"),
])
def test_policy_loss_single_token(ratio, adv, expected, case):
    loss, _, _ = one_token(ratio, adv)
    assert loss.item() == pytest.approx(expected, rel=1e-9), case


@pytest.mark.parametrize("ratio, adv, active", [
    (1.5, +1.0, False), (0.5, -1.0, False), (20.0, -1.0, False), (20.0, +1.0, False),
    (0.5, +1.0, True), (1.1, +1.0, True), (1.1, -1.0, True), (1.5, -1.0, True), (5.0, -1.0, True),
])
def test_gradient_zero_exactly_where_clipped(ratio, adv, active):
    loss, _, logp = one_token(ratio, adv)
    (grad,) = torch.autograd.grad(loss, logp)
    expected = -adv * ratio if active else 0.0  # d(-A * exp(logp)) / dlogp
    assert grad.item() == pytest.approx(expected, rel=1e-9, abs=0.0)


def test_log_ratio_clamp():
    """logp - old = 30 is clamped to 20 before exp; a huge c shows the clamped ratio in the loss."""
    logp = torch.tensor([[30.0]], dtype=F64)
    loss, m = policy_loss(logp, torch.zeros(1, 1, dtype=F64), torch.tensor([-1.0], dtype=F64),
                          torch.ones(1, 1), clip_ratio_c=1e12)
    assert loss.item() == pytest.approx(math.exp(20.0))
    assert m["actor/ratio_max"] == pytest.approx(math.exp(20.0))
    loss, _ = policy_loss(logp, torch.zeros(1, 1, dtype=F64), torch.tensor([-1.0], dtype=F64),
                          torch.ones(1, 1), clip_ratio_c=1e12, log_ratio_clamp=5.0)
    assert loss.item() == pytest.approx(math.exp(5.0))


def test_policy_loss_metrics_hand():
    # tokens: (ratio, A): (1.5,+1) clip-high, (0.5,-1) clip-low, (20,-1) dual, (1.0,+1) none, masked garbage
    ratios = torch.tensor([[1.5, 0.5, 20.0, 1.0, 3.0]], dtype=F64)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 5.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    old = torch.zeros(1, 5, dtype=F64)
    old[0, 4] = float("nan")
    loss, m = policy_loss(ratios.log(), old, adv, mask)
    assert loss.item() == pytest.approx((-1.28 + 0.8 + 10.0 - 1.0) / 4)
    assert m["actor/pg_loss"] == pytest.approx(loss.item())
    assert m["actor/clip_frac"] == pytest.approx(2 / 4)
    assert m["actor/clip_frac_higher"] == pytest.approx(1 / 4)
    assert m["actor/clip_frac_lower"] == pytest.approx(1 / 4)
    assert m["actor/dual_clip_frac"] == pytest.approx(1 / 4)
    lr = [math.log(1.5), math.log(0.5), math.log(20.0), 0.0]
    assert m["actor/approx_kl"] == pytest.approx(sum(-x for x in lr) / 4)  # k1: mean(old - new)
    assert m["actor/approx_kl_k3"] == pytest.approx(sum(math.exp(-x) - 1 + x for x in lr) / 4)
    assert m["actor/ratio_mean"] == pytest.approx((1.5 + 0.5 + 20.0 + 1.0) / 4)
    assert m["actor/ratio_max"] == pytest.approx(20.0)
    assert all(isinstance(v, float) for v in m.values())


def test_advantages_per_rollout_broadcast_equals_per_token():
    g = torch.Generator().manual_seed(1)
    logp, old = -torch.rand(3, 4, generator=g), -torch.rand(3, 4, generator=g)
    adv = torch.randn(3, generator=g)
    mask = torch.ones(3, 4)
    a, ma = policy_loss(logp, old, adv, mask)
    b, mb = policy_loss(logp, old, adv[:, None].expand(3, 4), mask)
    torch.testing.assert_close(a, b)
    assert ma == mb


def test_masked_positions_change_nothing():
    g = torch.Generator().manual_seed(2)
    B, T = 4, 6
    logp = -torch.rand(B, T, generator=g, dtype=F64)
    old = -torch.rand(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, T, generator=g, dtype=F64)
    mask = (torch.rand(B, T, generator=g) < 0.6).to(torch.long)
    mask[:, 0] = 1
    junk_logp, junk_old, junk_adv = logp.clone(), old.clone(), adv.clone()
    off = mask == 0
    junk_logp[off] = float("nan")
    junk_old[off] = float("inf")
    junk_adv[off] = 1e30
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        x1 = logp.clone().requires_grad_()
        x2 = junk_logp.clone().requires_grad_()
        l1, m1 = policy_loss(x1, old, adv, mask, loss_agg_mode=mode)
        l2, m2 = policy_loss(x2, junk_old, junk_adv, mask, loss_agg_mode=mode)
        (g1,), (g2,) = torch.autograd.grad(l1, x1), torch.autograd.grad(l2, x2)
        torch.testing.assert_close(l1, l2)
        torch.testing.assert_close(g1, g2)
        assert torch.isfinite(g2).all() and (g2[off] == 0).all()
        assert m1 == pytest.approx(m2)


def test_policy_loss_empty_mask_is_zero():
    loss, m = policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3))
    assert loss.item() == 0.0 and all(v == 0.0 for v in m.values())


@pytest.mark.parametrize("kw, match", [
    (dict(clip_ratio_low=0.0), "clip_ratio_low must be in"),
    (dict(clip_ratio_low=1.0), "clip_ratio_low must be in"),
    (dict(clip_ratio_high=0.0), "clip_ratio_high must be > 0"),
    (dict(clip_ratio_c=1.0), "clip_ratio_c must be > 1"),
    (dict(log_ratio_clamp=0.0), "log_ratio_clamp must be > 0"),
    (dict(loss_agg_mode="sum"), "loss_agg_mode 'sum' is unknown"),
])
def test_policy_loss_bad_params(kw, match):
    with pytest.raises(ValueError, match=match):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2), **kw)


def test_policy_loss_bad_shapes():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="old_log_probs must have log_probs' shape"):
        policy_loss(z, torch.zeros(2, 4), torch.ones(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask must have log_probs' shape"):
        policy_loss(z, z, torch.ones(2), torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"advantages must be \(B,\)"):
        policy_loss(z, z, torch.ones(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"log_probs must be \(B, T\)"):
        policy_loss(torch.zeros(3), torch.zeros(3), torch.ones(3), torch.ones(3))


# ------------------------------------------------------------------ KL estimators


def test_kl_penalty_kinds_hand():
    logp = torch.tensor([[-1.0, -2.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0]], dtype=F64)
    d = [0.5, -1.0]
    torch.testing.assert_close(kl_penalty(logp, ref, "kl"), torch.tensor([d], dtype=F64))
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([d], dtype=F64))
    torch.testing.assert_close(kl_penalty(logp, ref, "abs"), torch.tensor([[0.5, 1.0]], dtype=F64))
    torch.testing.assert_close(kl_penalty(logp, ref, "mse"), torch.tensor([[0.125, 0.5]], dtype=F64))
    k3 = [[math.exp(-x) + x - 1 for x in d]]
    torch.testing.assert_close(kl_penalty(logp, ref, "low_var_kl"), torch.tensor(k3, dtype=F64))
    torch.testing.assert_close(kl_penalty(logp, ref), torch.tensor(k3, dtype=F64))


def test_low_var_kl_clamped_to_10():
    logp = torch.tensor([[-30.0, 0.0]])
    ref = torch.tensor([[0.0, 0.0]])
    out = kl_penalty(logp, ref, "low_var_kl")
    assert out[0, 0].item() == 10.0 and out[0, 1].item() == 0.0


def test_kl_k3_is_unbiased_for_kl():
    """E_{y~pi}[k3] = KL(pi || ref) on a small categorical (checks the sign convention)."""
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    ref = torch.tensor([0.2, 0.2, 0.6], dtype=F64)
    exact = (pi * (pi / ref).log()).sum()
    for kind in ("k1", "k3"):
        est = (pi * kl_penalty(pi.log()[None], ref.log()[None], kind)[0]).sum()
        torch.testing.assert_close(est, exact)


def test_kl_unknown_kind():
    with pytest.raises(ValueError, match="kl_penalty kind 'full' is unknown.*low_var_kl"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "full")


# ------------------------------------------------------------------ entropy and token log-probs


def test_entropy_matches_definition():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 11, generator=g, dtype=F64) * 3
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=2), entropy_from_logits(logits))
    torch.testing.assert_close(entropy_from_logits(logits, temperature=0.7),
                               entropy_from_logits(logits / 0.7))


def test_entropy_uniform_and_stable_for_huge_logits():
    assert entropy_from_logits(torch.zeros(1, 1, 50)).item() == pytest.approx(math.log(50))
    big = torch.tensor([[[1e4, 1e4, -1e4]]])
    out = entropy_from_logits(big)
    assert torch.isfinite(out).all() and out.item() == pytest.approx(math.log(2), abs=1e-5)
    half = entropy_from_logits(big.to(torch.bfloat16))
    assert half.dtype == torch.float32 and half.item() == pytest.approx(math.log(2), abs=1e-5)


def test_token_log_probs_matches_log_softmax():
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 5, 13, generator=g, dtype=F64) * 4).requires_grad_()
    labels = torch.randint(0, 13, (2, 5), generator=g)
    ref = torch.log_softmax(logits / 1.3, -1).gather(-1, labels[..., None])[..., 0]
    out = token_log_probs(logits, labels, temperature=1.3)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(token_log_probs(logits, labels, 1.3, chunk_size=3), ref)
    (g1,) = torch.autograd.grad(out.sum(), logits)
    (g2,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g1, g2)


def test_token_log_probs_stable_for_huge_logits():
    logits = torch.tensor([[[1e4, 0.0, -1e4]]])
    out = token_log_probs(logits, torch.tensor([[0]]))
    assert out.item() == pytest.approx(0.0, abs=1e-6)


def test_token_log_probs_bad_labels():
    with pytest.raises(ValueError, match=r"labels must be token ids in \[0, 3\).*-100"):
        token_log_probs(torch.zeros(1, 2, 3), torch.tensor([[0, -100]]))
    with pytest.raises(ValueError, match="labels must have logits' leading shape"):
        token_log_probs(torch.zeros(1, 2, 3), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_log_probs(torch.zeros(1, 2, 3), torch.tensor([[0, 1]]), temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size must be"):
        entropy_from_logits(torch.zeros(1, 2, 3), chunk_size=0)


def test_entropy_with_banned_tokens_has_finite_value_and_gradient():
    logits = torch.tensor([[[0.0, 0.0, -float("inf"), 0.0]]], requires_grad=True)
    out = entropy_from_logits(logits)
    assert out.item() == pytest.approx(math.log(3))
    (g,) = torch.autograd.grad(out.sum(), logits)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, torch.zeros_like(g), atol=1e-6, rtol=0)  # uniform: a maximum


def test_bool_and_float_masks_agree():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[True, False, True], [False, True, True]])
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        torch.testing.assert_close(agg_loss(x, m, mode), agg_loss(x, m.float(), mode))
    a, ma = policy_loss(-x, -x * 0.9, torch.tensor([1.0, -1.0]), m)
    b, mb = policy_loss(-x, -x * 0.9, torch.tensor([1.0, -1.0]), m.float())
    torch.testing.assert_close(a, b)
    assert ma == mb
