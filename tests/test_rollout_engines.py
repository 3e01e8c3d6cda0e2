"""The hf rollout engine: the RolloutEngine contract, engine log-probs equal to the trainer's,
token-budget batching, and the KV-cache arithmetic behind the GPU recipes' budgets."""
from __future__ import annotations

import pytest
import torch

from poise_probe.features import pack_rollouts, policy_forward
from poise_probe.generation import encode_prompts, plan_batches, sample_completions
from poise_probe.models import load_policy
from poise_probe.rollout import HFEngine, RolloutEngine, SamplingSettings
from poise_probe.rollout.memory import kv_bytes_per_token, rollout_memory_table

PROMPTS = ["Compute 3+4.", "Evaluate T&F.", "Compute 12-5+1."]


def teacher_forced(model, prompt_ids, comps, temperature):
    """The trainer's log-probs of the engine's completions, (rows, T) flat over samples."""
    k = len(comps.token_ids[0])
    packed = pack_rollouts([p for p in prompt_ids for _ in range(k)],
                           [r for row in comps.token_ids for r in row], 0)
    with torch.no_grad():
        return policy_forward(model, packed, temperature=temperature).log_probs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_hf_engine_log_probs_equal_the_trainers(tiny_model_dir, temperature):
    model, tok = load_policy(tiny_model_dir)
    eng = HFEngine(model, tok, batch_size=4)
    assert isinstance(eng, RolloutEngine)
    ids = encode_prompts(tok, PROMPTS)
    out = eng.generate(ids, 3, SamplingSettings(temperature, 1.0, 12), seed=5)
    ref = teacher_forced(model, ids, out, temperature)
    flat = [lp for row in out.log_probs for lp in row]
    for n, (lp, resp) in enumerate(zip(flat, [r for row in out.token_ids for r in row])):
        assert len(lp) == len(resp)
        torch.testing.assert_close(torch.tensor(lp), ref[n, :len(lp)], atol=1e-5, rtol=0)
    # the same seed reproduces, another does not; texts decode from the ids
    again = eng.generate(ids, 3, SamplingSettings(temperature, 1.0, 12), seed=5)
    assert again.token_ids == out.token_ids and again.log_probs == out.log_probs
    assert eng.generate(ids, 3, SamplingSettings(temperature, 1.0, 12), seed=6).token_ids \
        != out.token_ids
    for row_t, row_i in zip(out.texts, out.token_ids):
        assert row_t == [tok.decode(i, skip_special_tokens=True) for i in row_i]


def test_recording_log_probs_does_not_change_the_samples(tiny_model_dir):
    model, tok = load_policy(tiny_model_dir)
    a = sample_completions(model, tok, PROMPTS, 2, max_new_tokens=10, seed=3)
    b = sample_completions(model, tok, PROMPTS, 2, max_new_tokens=10, seed=3, with_log_probs=True)
    assert a.token_ids == b.token_ids and a.log_probs is None and b.log_probs is not None


def test_hf_engine_refuses_another_model_and_sleep_is_harmless(tiny_model_dir):
    model, tok = load_policy(tiny_model_dir)
    other, _ = load_policy(tiny_model_dir)
    eng = HFEngine(model, tok)
    eng.sync_weights(model)
    with pytest.raises(ValueError, match="policy object"):
        eng.sync_weights(other)
    eng.sleep()
    eng.wake()
    assert eng.generate(encode_prompts(tok, PROMPTS[:1]), 1, SamplingSettings(), 0).texts


def test_plan_batches_respects_rows_and_tokens():
    lens = [5, 5, 6, 10, 30]
    assert plan_batches(lens, 10, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    # budget 48 tokens: rows x (longest prompt + 10 new) <= 48
    got = plan_batches(lens, 10, 256, max_batch_tokens=48)
    assert got == [slice(0, 3), slice(3, 4), slice(4, 5)]
    for part in got:
        rows = lens[part]
        assert len(rows) == 1 or len(rows) * (max(rows) + 10) <= 48
    assert plan_batches([100], 10, 8, max_batch_tokens=5) == [slice(0, 1)]  # alone if too long
    assert plan_batches([], 10, 8) == []


def test_token_budget_batches_still_sample_correctly(tiny_model_dir):
    model, tok = load_policy(tiny_model_dir)
    ids = encode_prompts(tok, PROMPTS)
    out = sample_completions(model, tok, None, 2, prompt_ids=ids, max_new_tokens=8, seed=1,
                             max_batch_tokens=60, with_log_probs=True)
    ref = teacher_forced(model, ids, out, 1.0)
    for n, lp in enumerate(lp for row in out.log_probs for lp in row):
        torch.testing.assert_close(torch.tensor(lp), ref[n, :len(lp)], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        sample_completions(model, tok, None, 1, prompt_ids=ids, max_batch_tokens=0)
    with pytest.raises(ValueError, match="prompts or prompt_ids"):
        sample_completions(model, tok, None, 1)


def test_sampling_settings_validate():
    with pytest.raises(ValueError, match="temperature"):
        SamplingSettings(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingSettings(max_new_tokens=0)


def test_kv_cache_arithmetic_matches_the_published_shapes():
    from transformers import Qwen3Config

    qwen06 = Qwen3Config(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128)
    assert kv_bytes_per_token(qwen06, "bfloat16") == 2 * 28 * 8 * 128 * 2 == 114_688
    assert kv_bytes_per_token(qwen06, "float32") == 229_376
    # no GQA, head_dim from hidden / heads
    assert kv_bytes_per_token({"num_hidden_layers": 2, "num_attention_heads": 4,
                               "hidden_size": 64}, "float32") == 2 * 2 * 4 * 16 * 4
    rows = {r["model"]: r for r in rollout_memory_table()}
    # the figure: 128 x 8,192 tokens of Qwen3-0.6B is about 120 GB of KV cache
    assert rows["Qwen3-0.6B"]["kv_gib_batch"] * 2**30 / 1e9 == pytest.approx(120.3, abs=0.1)
    assert rows["Qwen3-8B"]["kv_kib_per_token"] == 144
    with pytest.raises(ValueError, match="dtype"):
        kv_bytes_per_token(qwen06, "int4")
