"""Save a random-initialised model of a real architecture, for testing recipes without downloads.

    python training/make_random_model.py --arch qwen3-0.6b --out /tmp/qwen3-0.6b-random

The weights are random, the shapes are the real ones (Qwen3-0.6B: 28 layers, hidden 1024, GQA
16/8 heads, vocab 151,936); the tokenizer is the tiny reasoner's character tokenizer, whose ids
fit in any vocabulary. Use it to check that a GPU recipe's code path runs (memory, hooks, PCA,
checkpointing), not to learn anything.
"""
from __future__ import annotations

import argparse

import torch

ARCHS = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0,
                       max_position_embeddings=40960, rms_norm_eps=1e-6),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0,
                       max_position_embeddings=40960, rms_norm_eps=1e-6),
}


def main(argv=None) -> int:
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from poise_probe.models import build_char_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="qwen3-0.6b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tok = build_char_tokenizer()
    torch.manual_seed(args.seed)
    config = Qwen3Config(**ARCHS[args.arch], pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved a random {args.arch} ({n / 1e6:.0f}M parameters) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
