"""A small random Qwen3 with a byte-level BPE tokenizer trained here, offline, like Qwen3's own.

The bundled tiny reasoner's tokenizer is character-level: one token per character, so text and
tokens line up trivially. Real models use byte-level BPE, where one token is several characters
(`Ġthe`), and a multi-byte character (`×`, `→`, `é`) can be split over tokens that are not
text on their own. `build_bpe_model` makes such a model in a second, with no hub access, for
tests and demos that must see real BPE pieces (the dashboard's token view, the rollout engines):

- the tokenizer is trained with the `tokenizers` library on the project's own task text (arith,
  boolean and code-output prompts and reference traces) plus a few lines of non-ASCII text;
- `<think>`, `</think>`, `<answer>`, `</answer>` are single added (non-special) tokens and
  `<|im_end|>` is the EOS, as in Qwen3's tokenizer, so `TagIds.from_tokenizer` finds every tag;
- the chat template is the tiny reasoner's (`poise_probe.models.CHAT_TEMPLATE`);
- the model is `Qwen3ForCausalLM(Qwen3Config(...))` with random weights (seeded).

    python -m poise_probe.bpe_model --out DIR [--vocab-size 400 --hidden-size 64 --layers 2]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

#: Special tokens, in id order (pad and EOS named as Qwen3 names them).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

#: Non-ASCII lines in the corpus, so some merges hold multi-byte characters and others split
#: them (a BPE piece that is only part of a character's UTF-8 bytes).
NON_ASCII_TEXT = [
    "3 × 4 → 12; 7 × 8 → 56; a → b → c",
    "café, résumé, naïve, déjà vu, élève, fiancée",
    "x ≤ y ≥ z ≠ w; α β γ δ; π ≈ 3.14; 10 € ; 5 °C",
    "straße, Ærø, smørrebrød, señor, 東京, 😀",
]


def corpus_lines(n_per_task: int = 300, seed: int = 0) -> list[str]:
    """Training text: each built-in task's prompts and reference traces, plus `NON_ASCII_TEXT`."""
    import random

    from poise_probe.tasks import get_task

    rng = random.Random(seed)
    lines: list[str] = []
    for name in ("arith", "boolean", "code_output"):
        task = get_task(name)
        for ex in task.sample(n_per_task, seed=seed):
            lines.append(ex.prompt if isinstance(ex.prompt, str) else
                         "\n".join(m["content"] for m in ex.prompt))
            lines.append(task.reference(ex, rng, error_rate=0.2))
    return lines + NON_ASCII_TEXT * 20


def build_bpe_tokenizer(vocab_size: int = 400, *, lines: list[str] | None = None):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `lines` (default `corpus_lines()`).

    Byte-level: every byte is in the alphabet, so any text encodes (no unknown token) and a
    character outside the merges is spelled byte by byte. The think/answer tags are added
    non-special tokens (decoding keeps them), the others special (decoding skips them).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from poise_probe.models import CHAT_TEMPLATE, THINK_TOKENS

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    floor = len(alphabet) + len(SPECIAL_TOKENS) + len(THINK_TOKENS) + 1
    if vocab_size < floor:
        raise ValueError(f"vocab_size must be >= {floor} (256 bytes, the special and tag tokens "
                         f"and at least one merge); got {vocab_size}.")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(THINK_TOKENS),
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    # the text between the tags: they become single added tokens, so no merge is spent on them
    tag = re.compile("|".join(re.escape(t) for t in THINK_TOKENS))
    text = [part for line in (lines if lines is not None else corpus_lines())
            for part in tag.split(line) if part]
    core.train_from_iterator(text, trainer=trainer)
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", bos_token=None, unk_token=None,
                                  padding_side="left", model_max_length=512)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_bpe_model(out_dir: str | Path, *, vocab_size: int = 400, hidden_size: int = 64,
                    num_layers: int = 2, seed: int = 0) -> Path:
    """Train the tokenizer, build a random `Qwen3ForCausalLM` over its vocabulary and save both
    to `out_dir` with `save_pretrained` (what `load_policy(out_dir)` reads). Returns `out_dir`."""
    import torch
    from transformers import Qwen3ForCausalLM

    from poise_probe.models import build_tiny_config

    if hidden_size < 8 or hidden_size % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 (4 attention heads), >= 8; got "
                         f"{hidden_size}.")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1; got {num_layers}.")
    out = Path(out_dir)
    tok = build_bpe_tokenizer(vocab_size)
    torch.manual_seed(seed)
    cfg = build_tiny_config(len(tok), hidden_size=hidden_size, num_layers=num_layers,
                            intermediate_size=2 * hidden_size, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id)
    model = Qwen3ForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m poise_probe.bpe_model",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to save the model in")
    parser.add_argument("--vocab-size", type=int, default=400)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_bpe_model(args.out, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                           num_layers=args.layers, seed=args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
