"""Shared fixtures: a tiny random Qwen3 saved like a real checkpoint; one torch thread."""
from __future__ import annotations

import os

import pytest
import torch

# The tests run tiny models, where intra-op threads buy nothing; on a shared CPU they cost a lot,
# since every op's OpenMP barrier waits for whichever thread was preempted (a 3-step tiny run:
# 19 s with 2 threads on a busy 2-core machine, 3 s with 1). Subprocesses (`poise train`,
# `poise probe capture`) inherit the variable. Set OMP_NUM_THREADS to choose another count.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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
