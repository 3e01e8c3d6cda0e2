"""The vLLM rollout engine: token ids, texts and flags as the HF sampler defines them; seeded
determinism; engine log-probs equal to the trainer's after a weight push (and not before)."""
from __future__ import annotations

import logging
import sys

import pytest
import torch

from poise_probe.features import pack_rollouts, policy_forward
from poise_probe.generation import encode_prompts
from poise_probe.models import load_policy
from poise_probe.rollout.base import RolloutEngine, SamplingSettings
from poise_probe.rollout.vllm_engine import VLLMEngine, derive_seeds, import_vllm
from poise_probe.tasks import get_task

T = 0.7            # a temperature != 1, so a missing / T would show
ATOL = 1e-4        # float32 engine vs float32 trainer (measured ~1e-5)


def _prompts(tok, n=6):
    exs = get_task("arith").sample(n // 2, seed=1) + get_task("boolean").sample(n - n // 2, seed=1)
    return encode_prompts(tok, [e.prompt for e in exs])


@pytest.fixture(scope="module")
def policy():
    return load_policy("tiny-reasoner")                  # float32 on CPU


STARTUP: dict[str, bool] = {}


@pytest.fixture(scope="module")
def engine(policy):
    """One engine per module: start-up takes seconds. Tests that push weights restore them."""
    _, tok = policy
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    eng = VLLMEngine("tiny-reasoner", tokenizer=tok, dtype="float32")
    STARTUP["rng_kept"] = torch.equal(torch.rand(3), expected)
    yield eng
    eng.close()


def _trainer_log_probs(model, prompt_ids, comps, temperature):
    """The trainer's teacher-forced log softmax(logits / T), as `old_policy_pass` computes it."""
    rows = [(prompt_ids[i], ids) for i, row in enumerate(comps.token_ids) for ids in row]
    packed = pack_rollouts([p for p, _ in rows], [r for _, r in rows], pad_id=0)
    with torch.no_grad():
        out = policy_forward(model.eval(), packed, temperature=temperature, with_entropy=False)
    return [out.log_probs[n, :len(r)] for n, (_, r) in enumerate(rows)]


def _max_gap(model, prompt_ids, comps, temperature=T) -> float:
    ref = _trainer_log_probs(model, prompt_ids, comps, temperature)
    eng = [torch.tensor(lp) for row in comps.log_probs for lp in row]
    return max((a - b).abs().max().item() for a, b in zip(ref, eng))


@pytest.mark.slow
def test_ids_texts_flags_and_shapes(engine, policy):
    _, tok = policy
    ids = _prompts(tok)
    assert isinstance(engine, RolloutEngine)
    for max_new in (96, 5):
        c = engine.generate(ids, 3, SamplingSettings(temperature=T, max_new_tokens=max_new), 0)
        assert len(c.token_ids) == len(c.texts) == len(c.truncated) == len(c.log_probs) == 6
        for row_ids, row_txt, row_tr, row_lp in zip(c.token_ids, c.texts, c.truncated,
                                                    c.log_probs):
            assert len(row_ids) == len(row_txt) == len(row_tr) == len(row_lp) == 3
            for x, text, trunc, lp in zip(row_ids, row_txt, row_tr, row_lp):
                assert text == tok.decode(x, skip_special_tokens=True)
                assert len(lp) == len(x) and all(v <= 0 for v in lp)
                eos_at = [j for j, t in enumerate(x) if t in engine.eos_ids]
                if trunc:   # ran out of tokens: exactly max_new of them, no EOS
                    assert len(x) == max_new and not eos_at
                else:       # stopped at its one EOS, which is kept
                    assert eos_at == [len(x) - 1] and len(x) <= max_new
        flags = [t for row in c.truncated for t in row]
        if max_new == 5:
            assert any(flags)
        else:
            assert not all(flags)  # the tiny reasoner finishes most answers in 96 tokens


@pytest.mark.slow
def test_seed_reproduces_and_separates(engine, policy):
    _, tok = policy
    ids = _prompts(tok)
    ids = ids + [ids[0]]                                  # the same prompt at two positions
    s = SamplingSettings(temperature=1.0, max_new_tokens=40)
    a, b = engine.generate(ids, 2, s, seed=7), engine.generate(ids, 2, s, seed=7)
    assert a.token_ids == b.token_ids and a.log_probs == b.log_probs
    assert engine.generate(ids, 2, s, seed=8).token_ids != a.token_ids
    assert a.token_ids[0] != a.token_ids[-1]              # another position, another stream
    assert a.token_ids[0][0] != a.token_ids[0][1]         # and another sample


def test_derived_seeds_are_distinct_and_stable():
    s = derive_seeds(0, 50, 4)
    assert len({x for row in s for x in row}) == 200
    assert s == derive_seeds(0, 50, 4) and s != derive_seeds(1, 50, 4)
    assert all(0 <= x < 2**31 for row in s for x in row)


@pytest.mark.slow
def test_log_probs_match_the_trainer_only_after_a_push(engine, policy):
    _, tok = policy
    model, _ = load_policy("tiny-reasoner")              # a copy this test may train
    ids = _prompts(tok)
    s = SamplingSettings(temperature=T, max_new_tokens=64)
    try:
        engine.sync_weights(model)
        c = engine.generate(ids, 2, s, seed=0)
        pushed = _max_gap(model, ids, c)
        assert pushed < ATOL

        # a few optimizer steps on the sampled rollouts move every parameter, the tied
        # embedding / LM head included; the engine does not see them until the next push
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        rows = [(ids[i], x) for i, row in enumerate(c.token_ids) for x in row]
        packed = pack_rollouts([p for p, _ in rows], [r for _, r in rows], pad_id=0)
        model.train()
        for _ in range(3):
            opt.zero_grad()
            out = policy_forward(model, packed, temperature=T, with_entropy=False)
            (-(out.log_probs * packed.resp_mask).sum() / packed.resp_mask.sum()).backward()
            opt.step()
        assert model.model.embed_tokens.weight is model.lm_head.weight
        stale = engine.generate(ids, 2, s, seed=0)
        not_pushed = _max_gap(model, ids, stale)
        assert not_pushed > 100 * ATOL                    # the check can fail

        engine.sync_weights(model)
        fresh = engine.generate(ids, 2, s, seed=0)
        assert _max_gap(model, ids, fresh) < ATOL
        logging.getLogger(__name__).info("max |engine - trainer| log-prob: %.2e pushed, %.2e "
                                         "not pushed", pushed, not_pushed)
    finally:
        engine.sync_weights(policy[0])                    # the other tests' weights


@pytest.mark.slow
def test_nucleus_sampling_reports_no_log_probs(engine, policy):
    _, tok = policy
    c = engine.generate(_prompts(tok, 2), 2, SamplingSettings(top_p=0.9, max_new_tokens=8), 0)
    assert c.log_probs is None and len(c.token_ids[0]) == 2


@pytest.mark.slow
def test_sleep_and_wake_are_no_ops_on_cpu(engine, policy):
    _, tok = policy
    ids = _prompts(tok, 2)
    s = SamplingSettings(max_new_tokens=16)
    before = engine.generate(ids, 2, s, seed=3)
    assert not engine.sleep_mode
    engine.sleep()
    engine.sleep()                                        # twice is fine
    with pytest.raises(RuntimeError, match="wake"):
        engine.generate(ids, 2, s, seed=3)
    engine.wake()
    assert engine.generate(ids, 2, s, seed=3).token_ids == before.token_ids


@pytest.mark.slow
def test_trainer_rng_and_threads_survive_the_engine(engine, policy):
    n = torch.get_num_threads()
    torch.set_num_threads(2)      # not the 1 the engine uses inside generate (conftest sets 1)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    engine.generate(_prompts(policy[1], 2), 2, SamplingSettings(max_new_tokens=8), 0)
    assert torch.equal(torch.rand(3), expected)           # generate leaves the global RNG be
    assert STARTUP["rng_kept"]                            # and so does the engine's start-up
    assert torch.get_num_threads() == 2                   # the trainer's thread count is back
    torch.set_num_threads(3)
    assert torch.get_num_threads() == 3                   # set_num_threads works again
    torch.set_num_threads(n)


@pytest.mark.slow
def test_too_long_for_max_model_len(engine, policy):
    _, tok = policy
    too_many = engine.max_model_len                        # any prompt + this many is too long
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate(_prompts(tok, 2), 1, SamplingSettings(max_new_tokens=too_many), 0)


def test_missing_model_path(tmp_path, policy):
    with pytest.raises(FileNotFoundError, match="model_path .*nope"):
        VLLMEngine(tmp_path / "nope", tokenizer=policy[1])


@pytest.mark.parametrize("gmu", [0.0, -0.1, 1.5])
def test_bad_gpu_memory_utilization(gmu, policy):
    with pytest.raises(ValueError, match=rf"gpu_memory_utilization must be in \(0, 1\]; got {gmu}"):
        VLLMEngine("tiny-reasoner", tokenizer=policy[1], gpu_memory_utilization=gmu)


def test_bad_dtype_device_and_sleep_mode_on_cpu(policy):
    tok = policy[1]
    with pytest.raises(ValueError, match="dtype must be one of"):
        VLLMEngine("tiny-reasoner", tokenizer=tok, dtype="fp32")
    if torch.cuda.is_available():
        pytest.skip("the CPU-only checks below need the CPU build of vLLM")
    with pytest.raises(ValueError, match="device 'cuda' does not match"):
        VLLMEngine("tiny-reasoner", tokenizer=tok, device="cuda")
    with pytest.raises(ValueError, match="enable_sleep_mode=True needs CUDA"):
        VLLMEngine("tiny-reasoner", tokenizer=tok, enable_sleep_mode=True)


def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)        # `import vllm` now raises
    with pytest.raises(ImportError, match="make vllm-env"):
        import_vllm()
