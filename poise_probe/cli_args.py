"""Command-line options several `poise` commands share (eval, probe capture): one definition of
the sampling options, so their names, types and help agree."""
from __future__ import annotations

import argparse


def add_sampling_args(p: argparse.ArgumentParser, *, samples: int, max_new_tokens: int,
                      when: str = "") -> None:
    """--samples, --split, --seed, --max-new-tokens, --temperature. when: a prefix for the help
    of options that only apply in one mode (e.g. "with --tasks: ")."""
    p.add_argument("--samples", type=int, default=samples,
                   help=f"{when}completions per prompt, K")
    p.add_argument("--split", default="test", choices=["test", "train"],
                   help=f"{when}which split of each task to draw the prompts from")
    p.add_argument("--seed", type=int, default=0,
                   help=f"{when}seed of the prompts and the sampling")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"{when}most new tokens per completion")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (0: greedy); entropies use logits / temperature")
