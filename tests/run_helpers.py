"""Short trainer runs on the tiny self-built model, shared by the trainer, engine and capture tests.

Importing this module registers the test tasks, so a fresh `poise train` process that imports it
(see `test_trainer._RUNNER`) can train on them too.
"""
from __future__ import annotations

from pathlib import Path

from poise_probe.config import load_config
from poise_probe.tasks import TASKS, register_task
from poise_probe.tasks.builtin import ArithTask


class ParityTask(ArithTask):
    """Arithmetic prompts with a reward a random policy earns half the time (even length).

    A real verifier of a synthetic property, so that a random-initialised model gets mixed
    rewards and non-zero advantages.
    """

    name = "test_parity"

    def score(self, completion, example):
        return float(len(completion) % 2 == 0)


class EvenStartTask(ArithTask):
    """Reward 1 when the completion's first character has an even code point (48 of the 97
    characters): a random policy earns about half, and a policy can learn it from the first
    token alone, so its expected reward is exact to compute from one forward pass."""

    name = "test_even_start"

    def score(self, completion, example):
        return float(bool(completion) and ord(completion[0]) % 2 == 0)


class OddStartTask(EvenStartTask):
    """The mirror image of `EvenStartTask`: training on it must lower what that one raises."""

    name = "test_odd_start"

    def score(self, completion, example):
        return float(bool(completion) and ord(completion[0]) % 2 == 1)


class NanTask(ArithTask):
    name = "test_nan"

    def score(self, completion, example):
        return float("nan")


for _cls in (ParityTask, EvenStartTask, OddStartTask, NanTask):
    if _cls.name not in TASKS:
        register_task(_cls.name)(_cls)


def tiny_overrides(model_dir, **extra) -> list[str]:
    """Config overrides for a 3-step run of 4 prompts x 2 rollouts x 12 tokens on `model_dir`."""
    base = {
        "model.path": str(model_dir), "data.tasks": "[test_parity]", "data.pool_size": 32,
        "data.eval_n": 3, "data.eval_samples": 2, "data.eval_every": 0,
        "rollout.prompts_per_step": 4, "rollout.num_generations": 2,
        "rollout.max_completion_length": 12, "optim.lr": 1e-3, "optim.warmup_steps": 0,
        "optim.mini_batch_prompts": 2, "optim.micro_batch_size": 3, "probe.layer": 0,
        "probe.bootstrap_steps": 1, "probe.min_steps_to_fit": 1, "probe.snapshot_every": 1,
        "probe.buffer_caps": "{all: 64}", "trainer.total_steps": 3, "trainer.save_every": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run(model_dir, out, **extra) -> Path:
    """Train on the tiny model with `tiny_overrides(model_dir, **extra)`; returns the run dir."""
    from poise_probe.trainer import train
    cfg = load_config(None, tiny_overrides(model_dir, **extra))
    return train(cfg, out)
