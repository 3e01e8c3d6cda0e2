"""Length-sorted micro-batches (`optim.micro_batch_tokens`): every row once, the budget kept, and
the old-policy pass and the update give what fixed chunks give, in batch order."""
from __future__ import annotations

import random

import pytest
import torch

from poise_probe.update import micro_batches


def padded_cost(chunks, p, r) -> int:
    """Tokens the forwards compute on: rows x (longest prompt + longest response) per chunk."""
    return sum(len(c) * (max(p[i] for i in c) + max(r[i] for i in c)) for c in chunks)


def test_without_a_budget_chunks_are_consecutive_as_before():
    assert micro_batches([3] * 7, [5] * 7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert micro_batches([], [], 4) == []


def test_hand_case_groups_like_lengths():
    p = [2, 2, 2, 2]
    r = [10, 1, 9, 2]                       # totals 12, 3, 11, 4
    # budget 24: [0, 2] costs 2 x 12 = 24; adding row 3 would cost 3 x 12 = 36
    assert micro_batches(p, r, 8, 24) == [[0, 2], [3, 1]]
    assert padded_cost([[0, 2], [3, 1]], p, r) == 24 + 8
    assert padded_cost(micro_batches(p, r, 2), p, r) == 24 + 22   # batch order pads more


def test_a_row_over_the_budget_goes_alone():
    assert micro_batches([5, 1, 1], [50, 1, 1], 8, 10) == [[0], [1, 2]]


@pytest.mark.parametrize("seed", range(20))
def test_every_row_once_and_the_limits_kept(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 70)
    p = [rng.randint(1, 40) for _ in range(n)]
    r = [rng.randint(1, 96) for _ in range(n)]
    max_rows, budget = rng.randint(1, 32), rng.choice([64, 256, 1024, 4096])
    chunks = micro_batches(p, r, max_rows, budget)
    assert sorted(i for c in chunks for i in c) == list(range(n))
    for c in chunks:
        assert 1 <= len(c) <= max_rows
        if len(c) > 1:
            assert len(c) * (max(p[i] for i in c) + max(r[i] for i in c)) <= budget


def test_sorted_chunks_pad_less_than_batch_order_at_the_same_rows():
    rng = random.Random(0)
    p = [rng.randint(5, 30) for _ in range(64)]
    r = [rng.randint(3, 96) for _ in range(64)]
    fixed = micro_batches(p, r, 16)
    budget = 16 * (max(p) + max(r))          # never binding: only the sorting differs
    assert padded_cost(micro_batches(p, r, 16, budget), p, r) < 0.8 * padded_cost(fixed, p, r)


def test_budget_must_be_positive():
    from poise_probe.config import load_config

    with pytest.raises(ValueError, match="optim.micro_batch_tokens"):
        load_config(None, ["optim.micro_batch_tokens=0"])
    assert load_config(None, ["optim.micro_batch_tokens=2048"]).optim.micro_batch_tokens == 2048
    assert load_config(None, []).optim.micro_batch_tokens is None


def _batch_and_model(model_dir, n_prompts=6, k=2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from poise_probe.data import Prompt
    from poise_probe.rollout.collect import Rollouts
    from poise_probe.tasks import get_task
    from poise_probe.tasks.base import Example

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rng = random.Random(1)
    task = get_task("arith")
    texts = [f"{rng.randint(1, 10 ** rng.randint(1, 6))}+{rng.randint(1, 99)}="
             for _ in range(n_prompts)]
    prompts = [Prompt(Example(prompt=t, ground_truth="0", domain="math", data_source="t"), task)
               for t in texts]
    prompt_ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    vocab = [tok.convert_tokens_to_ids(c) for c in "0123456789+=<>/thinkasw"]
    responses = [[rng.choice(vocab) for _ in range(rng.randint(1, 40))]
                 for _ in range(n_prompts * k)]
    gids = torch.arange(n_prompts).repeat_interleave(k)
    scores = torch.tensor([float(rng.random() < 0.5) for _ in range(n_prompts * k)])
    batch = Rollouts(prompts, prompt_ids, responses, ["x"] * len(responses),
                     [False] * len(responses), gids, scores, scores.clone(),
                     pad_id=tok.pad_token_id)
    return model, tok, batch


def test_old_policy_pass_is_the_same_in_batch_order(tiny_model_dir):
    import contextlib

    from poise_probe.config import load_config
    from poise_probe.features import TagIds
    from poise_probe.update import old_policy_pass

    model, tok, batch = _batch_and_model(tiny_model_dir)
    outs = {}
    for budget in (None, 150):
        cfg = load_config(None, [f"model.path={tiny_model_dir}", "optim.micro_batch_size=4",
                                 "probe.layer=1"] +
                          ([f"optim.micro_batch_tokens={budget}"] if budget else []))
        outs[budget] = old_policy_pass(model, batch, cfg, TagIds.from_tokenizer(tok), 1,
                                       torch.device("cpu"), contextlib.nullcontext(),
                                       keep_hidden=True)
    a, b = outs[None], outs[150]
    for key in ("log_probs", "entropies", "features"):
        assert a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, msg=key)
    assert len(a["hidden"]) == len(b["hidden"]) == len(batch.response_ids)
    for ha, hb in zip(a["hidden"], b["hidden"]):
        torch.testing.assert_close(ha, hb, atol=1e-5, rtol=1e-5)
    lens = [len(r) for r in batch.response_ids]
    mask = torch.arange(a["log_probs"].shape[1])[None, :] < torch.tensor(lens)[:, None]
    assert (a["log_probs"][~mask] == 0).all() and (b["log_probs"][~mask] == 0).all()


def test_update_gradient_is_the_same_with_sorted_micro_batches(tiny_model_dir):
    """One PPO step from the same weights: the parameters after it agree (losses are normalised
    by the mini-batch's token count, so the micro-batch partition does not change the sum)."""
    import contextlib
    import copy

    from poise_probe.config import load_config
    from poise_probe.features import TagIds
    from poise_probe.update import old_policy_pass, ppo_update

    model, tok, batch = _batch_and_model(tiny_model_dir)
    adv = torch.randn(len(batch.response_ids), generator=torch.Generator().manual_seed(0))
    params = {}
    for budget in (None, 150):
        cfg = load_config(None, [f"model.path={tiny_model_dir}", "optim.micro_batch_size=4",
                                 "optim.mini_batch_prompts=6", "optim.lr=1e-2",
                                 "optim.warmup_steps=0"] +
                          ([f"optim.micro_batch_tokens={budget}"] if budget else []))
        m = copy.deepcopy(model)
        old = old_policy_pass(m, batch, cfg, TagIds.from_tokenizer(tok), None,
                              torch.device("cpu"), contextlib.nullcontext())["log_probs"]
        opt = torch.optim.SGD(m.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        logs = ppo_update(m, batch, adv, old, None, cfg, opt, sched, torch.device("cpu"),
                          contextlib.nullcontext(), step=1)
        assert logs["actor/grad_norm"] > 0
        params[budget] = torch.cat([p.detach().flatten() for p in m.parameters()])
    torch.testing.assert_close(params[None], params[150], atol=1e-6, rtol=1e-5)


def test_refit_runs_on_the_configured_blas_threads(monkeypatch):
    """probe.refit_threads=1: every BLAS/OpenMP pool holds one thread during a refit, and the
    pools are back to their own counts after it."""
    import numpy as np
    from threadpoolctl import threadpool_info

    from poise_probe.probe.bank import ProbeBank
    from poise_probe.probe.ridge import RidgeProbe

    seen, real = [], RidgeProbe.fit

    def fit(self, X, y):
        seen.append({p["num_threads"] for p in threadpool_info()})
        return real(self, X, y)

    monkeypatch.setattr(RidgeProbe, "fit", fit)
    before = [p["num_threads"] for p in threadpool_info()]
    bank = ProbeBank({"all": 64}, alpha=1.0, min_steps_to_fit=1, fit_threads=1)
    rng = np.random.default_rng(0)
    bank.update(rng.normal(size=(8, 5)), rng.integers(0, 2, 8).astype(float),
                np.repeat(np.arange(4), 2), ["math"] * 8, step=1)
    assert seen == [{1}]
    assert [p["num_threads"] for p in threadpool_info()] == before
