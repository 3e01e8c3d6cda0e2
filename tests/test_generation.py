"""Sampling: deterministic, in eval mode whatever the caller's mode, and exactly pi / T."""
from __future__ import annotations

import pytest

from poise_probe.generation import sample_completions
from poise_probe.models import load_policy

PROMPTS = ["Compute 3+4.", "Evaluate T&F.", [{"role": "user", "content": "Compute 1+1."}]]


def _sample(model, tok, **kw):
    return sample_completions(model, tok, PROMPTS, 2, max_new_tokens=10, seed=3, **kw)


def test_deterministic_for_a_seed(tiny_model_dir):
    model, tok = load_policy(tiny_model_dir)
    a, b = _sample(model, tok), _sample(model, tok)
    assert a.token_ids == b.token_ids
    assert len(a.texts) == 3 and all(len(r) == 2 for r in a.texts)
    c = sample_completions(model, tok, PROMPTS, 2, max_new_tokens=10, seed=4)
    assert c.token_ids != a.token_ids


def test_train_mode_and_checkpointing_do_not_change_sampling(tiny_model_dir):
    model, tok = load_policy(tiny_model_dir)
    ref = _sample(model, tok)
    model.gradient_checkpointing_enable()
    model.train()
    out = _sample(model, tok)
    assert out.token_ids == ref.token_ids
    assert model.training  # the caller's mode is restored


def test_model_generation_defaults_are_ignored(tiny_model_dir):
    model, tok = load_policy(tiny_model_dir)
    ref = _sample(model, tok)
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.top_k = 3
    assert _sample(model, tok).token_ids == ref.token_ids


def test_truncation_flag_and_bad_arguments(tiny_model_dir):
    model, tok = load_policy(tiny_model_dir)
    out = sample_completions(model, tok, PROMPTS[:1], 1, max_new_tokens=2, seed=0)
    ids = out.token_ids[0][0]
    assert out.truncated[0][0] == (len(ids) == 2 and ids[-1] != tok.eos_token_id)
    with pytest.raises(ValueError, match="num_samples"):
        sample_completions(model, tok, PROMPTS, 0)
    with pytest.raises(ValueError, match="top_p"):
        sample_completions(model, tok, PROMPTS, 1, top_p=0)
