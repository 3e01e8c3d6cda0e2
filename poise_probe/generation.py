"""Batched sampling of K completions per prompt with Hugging Face `generate` (KV cache on)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import GenerationConfig

from poise_probe.tasks.base import Messages, as_messages


@dataclass
class Completions:
    """Sampled completions, indexed `[prompt][sample]`."""

    texts: list[list[str]]
    token_ids: list[list[list[int]]]   # generated ids, EOS included when it was produced
    truncated: list[list[bool]]        # True where max_new_tokens ran out before EOS

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for row in self.token_ids for ids in row)


def render_prompt(tokenizer, prompt: str | Messages) -> str:
    """The prompt text the policy sees: the chat template with the generation prompt appended."""
    if tokenizer.chat_template is None:
        return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    return tokenizer.apply_chat_template(as_messages(prompt), tokenize=False,
                                         add_generation_prompt=True)


def encode_prompts(tokenizer, prompts: Sequence[str | Messages]) -> list[list[int]]:
    """Token ids of each rendered prompt (chat template applied, no extra special tokens)."""
    return [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
            for p in prompts]


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: Sequence[str | Messages], num_samples: int = 1,
                       *, temperature: float = 1.0, top_p: float = 1.0,
                       max_new_tokens: int = 128, batch_size: int = 256, seed: int = 0,
                       progress=None, prompt_ids: list[list[int]] | None = None) -> Completions:
    """Sample `num_samples` completions for each prompt, batching rows of similar length.

    `progress`, if given, is called with the number of completions finished after each batch;
    `prompt_ids` may pass the already-encoded prompts (see `encode_prompts`).
    Sampling is deterministic for a fixed seed, batch size and device.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}.")
    encoded = prompt_ids if prompt_ids is not None else encode_prompts(tokenizer, prompts)
    if len(encoded) != len(prompts):
        raise ValueError(f"prompt_ids has {len(encoded)} rows for {len(prompts)} prompts.")
    texts = prompts
    rows = sorted(((i, k) for i in range(len(texts)) for k in range(num_samples)),
                  key=lambda r: (len(encoded[r[0]]), r))  # similar lengths share a batch
    out_ids: dict[tuple[int, int], list[int]] = {}
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    do_sample = temperature > 0
    # An explicit config: the model's own defaults (repetition penalty, top_k, min_p...) would
    # make the sampler differ from pi/T, which the old log-probs assume.
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
        top_k=0 if do_sample else None, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
        use_cache=True)
    was_training, model_config = model.training, model.generation_config
    model.eval()  # no dropout; gradient checkpointing would also disable the KV cache
    # generate() fills unset fields from model.generation_config: swap it out while sampling
    model.generation_config = gen_config
    try:
        _generate_rows(model, tokenizer, rows, encoded, batch_size, gen, gen_config, device,
                       eos, out_ids, progress)
    finally:
        model.train(was_training)
        model.generation_config = model_config
    token_ids = [[out_ids[(i, k)] for k in range(num_samples)] for i in range(len(texts))]
    return Completions(
        texts=[[tokenizer.decode(ids, skip_special_tokens=True) for ids in row]
               for row in token_ids],
        token_ids=token_ids,
        truncated=[[not ids or ids[-1] not in eos for ids in row] for row in token_ids])


def _generate_rows(model, tokenizer, rows, encoded, batch_size, gen, gen_config, device, eos,
                   out_ids, progress) -> None:
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i, _ in chunk]},
                              padding=True, return_tensors="pt", padding_side="left")
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        out = model.generate(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device),
                             generation_config=gen_config)
        new = out[:, batch["input_ids"].shape[1]:].tolist()
        for (i, k), ids in zip(chunk, new):
            out_ids[(i, k)] = _strip_after_eos(ids, eos)
        if progress is not None:
            progress(len(chunk))


def _eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    cfg = getattr(model, "generation_config", None)
    extra = getattr(cfg, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    return sorted(i for i in ids if i is not None)


def _strip_after_eos(ids: list[int], eos: list[int]) -> list[int]:
    for j, t in enumerate(ids):
        if t in eos:
            return ids[:j + 1]
    return ids
