"""Batched sampling of K completions per prompt with Hugging Face `generate` (KV cache on)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from poise_probe.tasks.base import Messages, as_messages


@dataclass
class Completions:
    """Sampled completions, indexed `[prompt][sample]`."""

    texts: list[list[str]]
    token_ids: list[list[list[int]]]   # generated ids, EOS included when it was produced
    truncated: list[list[bool]]        # True where max_new_tokens ran out before EOS
    # the engine's log softmax(logits / T) at each sampled token, [prompt][sample][token];
    # None where the engine did not report them
    log_probs: list[list[list[float]]] | None = None

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
def sample_completions(model, tokenizer, prompts: Sequence[str | Messages] | None,
                       num_samples: int = 1, *, temperature: float = 1.0, top_p: float = 1.0,
                       max_new_tokens: int = 128, batch_size: int = 256, seed: int = 0,
                       progress=None, prompt_ids: list[list[int]] | None = None,
                       max_batch_tokens: int | None = None,
                       with_log_probs: bool = False) -> Completions:
    """Sample `num_samples` completions for each prompt, batching rows of similar length.

    `progress`, if given, is called with the number of completions finished after each batch;
    `prompt_ids` may pass the already-encoded prompts (see `encode_prompts`), and then
    `prompts` may be None. A batch holds at most `batch_size` rows and, with
    `max_batch_tokens`, at most that many prompt + new tokens (the KV cache's bound).
    `with_log_probs` also records log softmax(logits / T) at each sampled token, streamed
    step by step (one (B, V) buffer, not the whole (B, T, V) score history).
    Sampling is deterministic for a fixed seed, batch size and device.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}.")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1 (or None); got {max_batch_tokens}.")
    if prompt_ids is None and prompts is None:
        raise ValueError("sample_completions needs prompts or prompt_ids; got neither.")
    encoded = prompt_ids if prompt_ids is not None else encode_prompts(tokenizer, prompts)
    if prompts is not None and len(encoded) != len(prompts):
        raise ValueError(f"prompt_ids has {len(encoded)} rows for {len(prompts)} prompts.")
    n_prompts = len(encoded)
    rows = sorted(((i, k) for i in range(n_prompts) for k in range(num_samples)),
                  key=lambda r: (len(encoded[r[0]]), r))  # similar lengths share a batch
    batches = plan_batches([len(encoded[i]) for i, _ in rows], max_new_tokens, batch_size,
                           max_batch_tokens)
    out_ids: dict[tuple[int, int], list[int]] = {}
    out_lps: dict[tuple[int, int], list[float]] | None = {} if with_log_probs else None
    device = next(model.parameters()).device
    eos = eos_ids(tokenizer, getattr(getattr(model, "generation_config", None),
                                      "eos_token_id", None))
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
        _generate_rows(model, tokenizer, rows, batches, encoded, gen, gen_config, device,
                       eos, out_ids, out_lps, temperature if do_sample else 1.0, progress)
    finally:
        model.train(was_training)
        model.generation_config = model_config
    keys = [[(i, k) for k in range(num_samples)] for i in range(n_prompts)]
    token_ids = [[out_ids[key] for key in row] for row in keys]
    return Completions(
        texts=[[tokenizer.decode(ids, skip_special_tokens=True) for ids in row]
               for row in token_ids],
        token_ids=token_ids,
        truncated=[[not ids or ids[-1] not in eos for ids in row] for row in token_ids],
        log_probs=None if out_lps is None else [[out_lps[key] for key in row] for row in keys])


def plan_batches(prompt_lens: Sequence[int], max_new_tokens: int, batch_size: int,
                 max_batch_tokens: int | None = None) -> list[slice]:
    """Consecutive row slices of at most `batch_size` rows and, with `max_batch_tokens`, at
    most that many padded prompt + new tokens (rows sorted by prompt length keep it tight).
    A single row longer than the budget still gets a batch of its own."""
    out, start = [], 0
    while start < len(prompt_lens):
        stop, widest = start, 0
        while stop < len(prompt_lens) and stop - start < batch_size:
            w = max(widest, prompt_lens[stop])
            if (max_batch_tokens is not None and stop > start
                    and (stop - start + 1) * (w + max_new_tokens) > max_batch_tokens):
                break
            widest, stop = w, stop + 1
        out.append(slice(start, stop))
        start = stop
    return out


class _SampledLogProbs(LogitsProcessor):
    """Records log softmax(logits / T) of each sampled token while `generate` runs.

    Custom processors run before the sampling warpers, so `scores` are the model's raw logits;
    the token sampled from step t is `input_ids[:, -1]` at step t + 1 (and, for the last step,
    read after `generate` returns). Scores pass through unchanged.
    """

    def __init__(self, temperature: float):
        self.t = temperature
        self.prev: torch.Tensor | None = None      # (B, V) log-probs of the step before
        self.steps: list[torch.Tensor] = []        # (B,) per generated token

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self.steps.append(self.prev.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.prev = torch.log_softmax(scores.float() / self.t, dim=-1)
        return scores

    def finish(self, new_ids: torch.Tensor) -> torch.Tensor:
        """(B, S) log-probs of the S generated tokens `new_ids`."""
        if self.prev is not None and len(self.steps) < new_ids.shape[1]:
            self.steps.append(self.prev.gather(-1, new_ids[:, -1:]).squeeze(-1))
        if not self.steps:
            return torch.zeros(new_ids.shape, dtype=torch.float32)
        return torch.stack(self.steps, dim=1).cpu()


def _generate_rows(model, tokenizer, rows, batches, encoded, gen, gen_config, device, eos,
                   out_ids, out_lps, temperature, progress) -> None:
    for part in batches:
        chunk = rows[part]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i, _ in chunk]},
                              padding=True, return_tensors="pt", padding_side="left")
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        recorder = _SampledLogProbs(temperature) if out_lps is not None else None
        out = model.generate(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device),
                             generation_config=gen_config,
                             logits_processor=LogitsProcessorList([recorder]) if recorder else None)
        new_t = out[:, batch["input_ids"].shape[1]:]
        lps = recorder.finish(new_t).tolist() if recorder is not None else None
        for j, ((i, k), ids) in enumerate(zip(chunk, new_t.tolist())):
            out_ids[(i, k)] = _strip_after_eos(ids, eos)
            if lps is not None:
                out_lps[(i, k)] = lps[j][:len(out_ids[(i, k)])]
        if progress is not None:
            progress(len(chunk))


def eos_ids(tokenizer, generation_eos=None) -> list[int]:
    """Where sampling stops: the tokenizer's EOS plus the generation config's `eos_token_id`
    (an id or a list of ids, as in `generation_config.json`); every engine uses this."""
    ids = {tokenizer.eos_token_id}
    ids.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    return sorted(i for i in ids if i is not None)


def _strip_after_eos(ids: list[int], eos: list[int]) -> list[int]:
    for j, t in enumerate(ids):
        if t in eos:
            return ids[:j + 1]
    return ids
