"""The `hf` rollout engine: Hugging Face `generate` on the policy itself (KV cache on)."""
from __future__ import annotations

from contextlib import nullcontext

from poise_probe.generation import Completions, sample_completions
from poise_probe.rollout.base import SamplingSettings


class HFEngine:
    """Samples from the very policy object the trainer updates, so a weight push is a no-op.

    Rows are batched by prompt length, at most `batch_size` rows and `max_batch_tokens`
    prompt + new tokens per batch; the engine's log-probs are recorded while sampling.
    """

    name = "hf"

    def __init__(self, model, tokenizer, *, batch_size: int = 256,
                 max_batch_tokens: int | None = None, autocast=None):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.autocast = autocast if autocast is not None else nullcontext()

    def generate(self, prompt_ids: list[list[int]], num_samples: int,
                 sampling: SamplingSettings, seed: int) -> Completions:
        with self.autocast:
            return sample_completions(
                self.model, self.tokenizer, None, num_samples, prompt_ids=prompt_ids,
                temperature=sampling.temperature, top_p=sampling.top_p,
                max_new_tokens=sampling.max_new_tokens, batch_size=self.batch_size,
                max_batch_tokens=self.max_batch_tokens, seed=seed, with_log_probs=True)

    def sync_weights(self, model) -> None:
        if model is not self.model:
            raise ValueError("the hf engine samples from the policy object it was built with; "
                             "build a new HFEngine for another model.")

    def sleep(self) -> None:
        """Nothing to release: the KV cache lives only inside `generate`."""

    def wake(self) -> None:
        """Nothing to reclaim."""

    def close(self) -> None:
        self.model = None
