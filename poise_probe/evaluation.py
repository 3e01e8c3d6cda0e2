"""Held-out evaluation: accuracy, Avg@K, Pass@K and the share of prompts with mixed outcomes."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from poise_probe.generation import encode_prompts, sample_completions
from poise_probe.tasks import get_task
from poise_probe.tasks.base import Task


def summarize_rewards(rewards: np.ndarray) -> dict[str, float]:
    """Metrics of a (prompts, K) reward matrix with values in [0, 1].

    accuracy: mean reward over every sample; avg_at_k: mean over prompts of the per-prompt mean
    (equal to accuracy when every prompt has K samples); pass_at_k: share of prompts with at
    least one fully correct sample; mixed_fraction: share of prompts whose K rewards differ.
    """
    r = np.asarray(rewards, dtype=float)  # (P, K)
    if r.ndim != 2 or r.size == 0:
        raise ValueError(f"rewards must be a non-empty (prompts, samples) matrix; got shape "
                         f"{r.shape}.")
    if not np.isfinite(r).all():
        raise ValueError("rewards contain NaN or inf; a verifier must return numbers in [0, 1].")
    per_prompt = r.mean(axis=1)
    return {
        "accuracy": float(r.mean()),
        "avg_at_k": float(per_prompt.mean()),
        "pass_at_k": float((r.max(axis=1) >= 1.0).mean()),
        "mixed_fraction": float((r.max(axis=1) != r.min(axis=1)).mean()),
        "stderr": float(per_prompt.std(ddof=1) / math.sqrt(len(per_prompt)))
        if len(per_prompt) > 1 else 0.0,
        "n_prompts": int(r.shape[0]),
        "k": int(r.shape[1]),
    }


def evaluate(model, tokenizer, tasks: Sequence[str | Task], *, n: int = 100, samples: int = 8,
             temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 128,
             batch_size: int = 256, seed: int = 0, split: str = "test",
             progress: Callable[[int], None] | None = None, engine=None) -> dict:
    """Sample `samples` completions for `n` held-out prompts of each task and score them.

    With a rollout `engine` (poise_probe.rollout) it samples, not `model` (which may be None);
    `batch_size` and `progress` then belong to the engine.

    Returns `{"overall": {...}, "tasks": {name: {...}}, "domains": {domain: {...}}}`; overall
    and domain entries pool the prompts of their tasks.
    """
    report: dict = {"tasks": {}, "domains": {}}
    pooled: list[np.ndarray] = []
    by_domain: dict[str, list[np.ndarray]] = {}
    for spec in tasks:
        task = get_task(spec) if isinstance(spec, str) else spec
        examples = task.sample(n, seed=seed, split=split)
        if engine is not None:
            from poise_probe.rollout import SamplingSettings

            comps = engine.generate(encode_prompts(tokenizer, [e.prompt for e in examples]),
                                    samples, SamplingSettings(temperature, top_p, max_new_tokens),
                                    seed=seed)
        else:
            comps = sample_completions(model, tokenizer, [e.prompt for e in examples], samples,
                                       temperature=temperature, top_p=top_p,
                                       max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       seed=seed, progress=progress)
        flat_c = [c for row in comps.texts for c in row]
        flat_e = [e for e in examples for _ in range(samples)]
        rewards = np.array(task.score_many(flat_c, flat_e), dtype=float).reshape(n, samples)
        if not np.isfinite(rewards).all():
            raise ValueError(f"task {task.name!r} returned NaN or inf rewards; a verifier must "
                             f"return numbers in [0, 1]. Fix the task's score function.")
        stats = summarize_rewards(rewards)
        stats["domain"] = task.domain
        stats["mean_completion_tokens"] = comps.num_tokens / (n * samples)
        stats["truncated_fraction"] = float(np.mean(comps.truncated))
        report["tasks"][task.name] = stats
        pooled.append(rewards)
        by_domain.setdefault(task.domain, []).append(rewards)
    report["overall"] = summarize_rewards(np.concatenate(pooled))
    report["domains"] = {d: summarize_rewards(np.concatenate(rs)) for d, rs in by_domain.items()}
    return report
