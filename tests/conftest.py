"""Shared fixtures: a tiny random Qwen3 saved like a real checkpoint."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-initialised 2-layer Qwen3 plus the project's char tokenizer, saved to disk."""
    from transformers import Qwen3ForCausalLM

    from poise_probe.models import build_char_tokenizer, build_tiny_config

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cfg = build_tiny_config(len(tok), hidden_size=32, num_layers=2, intermediate_size=64,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = Qwen3ForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny-random")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
