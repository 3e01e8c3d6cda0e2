"""Memory arithmetic for rollouts: KV-cache bytes per token, and what a token budget costs.

Per token, a decoder keeps K and V for every layer: 2 x layers x kv_heads x head_dim values.
Qwen3-0.6B and -1.7B (28 layers, 8 KV heads of 128) hold 112 KiB per token in bf16, Qwen3-8B
(36 layers) 144 KiB; 128 sequences x 8,192 tokens of Qwen3-0.6B is 1,048,576 tokens, 120 GB.
The numbers for the recipes are in docs/engines.md (`python -m poise_probe.rollout.memory`).
"""
from __future__ import annotations

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# the published shapes (config.json of each release), for the docs table
QWEN3 = {
    "Qwen3-0.6B": dict(num_hidden_layers=28, num_key_value_heads=8, head_dim=128,
                       params=0.596e9),
    "Qwen3-1.7B": dict(num_hidden_layers=28, num_key_value_heads=8, head_dim=128,
                       params=1.72e9),
    "Qwen3-8B": dict(num_hidden_layers=36, num_key_value_heads=8, head_dim=128,
                     params=8.19e9),
}


def kv_bytes_per_token(config, dtype: str = "bfloat16") -> int:
    """Bytes of K and V cached per token: 2 x layers x kv_heads x head_dim x dtype size.

    `config` is a transformers config or a dict with the same keys; head_dim defaults to
    hidden_size / num_attention_heads, kv heads to the attention heads (no GQA).
    """
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}; got {dtype!r}.")
    layers = get("num_hidden_layers")
    heads = get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or (get("hidden_size") // heads)
    if not (layers and kv_heads and head_dim):
        raise ValueError("config needs num_hidden_layers, num_key_value_heads (or "
                         "num_attention_heads) and head_dim (or hidden_size).")
    return 2 * int(layers) * int(kv_heads) * int(head_dim) * DTYPE_BYTES[dtype]


def rollout_memory_table(seq_tokens: int = 8192, sequences: int = 128) -> list[dict]:
    """Per Qwen3 size: KV bytes per token, one sequence, the whole batch; weights (bf16) and the
    trainer's fp32 weights + grads + AdamW moments (16 bytes per parameter)."""
    rows = []
    for name, c in QWEN3.items():
        per_tok = kv_bytes_per_token(c, "bfloat16")
        rows.append({"model": name, "kv_kib_per_token": per_tok / 1024,
                     "kv_gib_per_sequence": per_tok * seq_tokens / 2**30,
                     "kv_gib_batch": per_tok * seq_tokens * sequences / 2**30,
                     "weights_gib_bf16": c["params"] * 2 / 2**30,
                     "trainer_gib_fp32_adamw": c["params"] * 16 / 2**30})
    return rows


def main() -> None:
    print(f"{'model':<12} {'KiB/token':>9} {'GiB/8k seq':>10} {'GiB 128x8k':>10} "
          f"{'weights bf16':>12} {'fp32+AdamW':>10}")
    for r in rollout_memory_table():
        print(f"{r['model']:<12} {r['kv_kib_per_token']:>9.0f} {r['kv_gib_per_sequence']:>10.3f} "
              f"{r['kv_gib_batch']:>10.1f} {r['weights_gib_bf16']:>12.1f} "
              f"{r['trainer_gib_fp32_adamw']:>10.1f}")


if __name__ == "__main__":
    main()
