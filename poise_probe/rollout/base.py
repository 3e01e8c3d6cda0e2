"""The rollout-engine interface: K sampled completions per prompt, plus the engine's log-probs.

An engine turns prompt token ids into `Completions` (token ids, texts, truncation flags and the
engine's own log-probability of every sampled token, temperature-scaled as the trainer scores
them), takes the policy's current weights after each update (`sync_weights`), and may release
its memory while the trainer updates (`sleep` / `wake`). The trainer talks to engines only
through this interface, so `hf` (Hugging Face `generate`) and `vllm` share one loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from poise_probe.generation import Completions


@dataclass(frozen=True)
class SamplingSettings:
    """What every engine samples with: pi(.|x)^(1/T), nucleus top_p, at most max_new_tokens.

    temperature 0 is greedy decoding (evaluation only; the RL config requires T > 0).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 96

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {self.max_new_tokens}.")


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a rollout engine (see the module docstring)."""

    name: str

    def generate(self, prompt_ids: list[list[int]], num_samples: int,
                 sampling: SamplingSettings, seed: int) -> Completions:
        """`num_samples` completions per prompt; `Completions.log_probs` holds, per sampled
        token, log softmax(logits / T) at that token under the engine's weights. The same
        seed, prompts and weights give the same completions."""

    def sync_weights(self, model) -> None:
        """Make the engine sample from `model`'s current parameters (in memory, no disk)."""

    def sleep(self) -> None:
        """Release what the engine can (KV cache, weights) before the policy update."""

    def wake(self) -> None:
        """Reclaim what `sleep` released, before the next generation."""

    def close(self) -> None:
        """Free every resource; the engine is unusable afterwards."""
