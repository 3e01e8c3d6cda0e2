"""Training prompts: a resumable stream over the configured tasks' train splits."""
from __future__ import annotations

import random
from dataclasses import dataclass

from poise_probe.tasks import get_task
from poise_probe.tasks.base import Example, Task

#: Prompts drawn per generator-backed task before the stream cycles (a new shuffle per epoch).
POOL_SIZE = 4096


@dataclass
class Prompt:
    """One training prompt with the task that scores it."""

    example: Example
    task: Task


class PromptStream:
    """Round-robin over tasks; each task cycles through a fixed pool, reshuffled every epoch.

    The position is a counter per task, so `state_dict()` and `load_state_dict()` restore exactly
    where a run stopped (the data position part of resume).
    """

    def __init__(self, task_names: list[str], task_kwargs: dict[str, dict] | None = None,
                 seed: int = 0, pool_size: int = POOL_SIZE):
        kwargs = task_kwargs or {}
        self.tasks = [get_task(n, **kwargs.get(n, {})) for n in task_names]
        self.names = list(task_names)
        self.seed = seed
        self.pools: list[list[Example]] = []
        for name, task in zip(self.names, self.tasks):
            size = min(pool_size, len(task)) if hasattr(task, "__len__") else pool_size
            self.pools.append(_sample_up_to(task, size, seed))
        self.counters = [0] * len(self.tasks)
        self.turn = 0
        self._orders: dict[tuple[int, int], list[int]] = {}  # (task, epoch) -> shuffled order

    def next(self, n: int) -> list[Prompt]:
        """The next `n` prompts, taking tasks in turn."""
        out = []
        for _ in range(n):
            t = self.turn % len(self.tasks)
            self.turn += 1
            pool = self.pools[t]
            epoch, pos = divmod(self.counters[t], len(pool))
            self.counters[t] += 1
            out.append(Prompt(pool[self._order(t, epoch)[pos]], self.tasks[t]))
        return out

    def _order(self, t: int, epoch: int) -> list[int]:
        """Task t's pool order in `epoch`: a pure function of (seed, task, epoch), cached."""
        if (t, epoch) not in self._orders:
            order = list(range(len(self.pools[t])))
            random.Random(f"{self.seed}|{self.names[t]}|epoch{epoch}").shuffle(order)
            self._orders = {k: v for k, v in self._orders.items() if k[0] != t}
            self._orders[(t, epoch)] = order
        return self._orders[(t, epoch)]

    def state_dict(self) -> dict:
        return {"counters": list(self.counters), "turn": self.turn}

    def load_state_dict(self, state: dict) -> None:
        if len(state["counters"]) != len(self.tasks):
            raise ValueError(f"data state has {len(state['counters'])} task counters but the "
                             f"config names {len(self.tasks)} tasks; resume with the same "
                             f"data.tasks.")
        self.counters = list(state["counters"])
        self.turn = int(state["turn"])


def _sample_up_to(task: Task, size: int, seed: int) -> list[Example]:
    """`size` train examples, or as many distinct ones as the task has (at least one)."""
    try:
        return task.sample(size, seed=seed, split="train")
    except (RuntimeError, ValueError):
        lo, hi = 1, size
        while lo < hi:  # the largest sample the task can give
            mid = (lo + hi + 1) // 2
            try:
                task.sample(mid, seed=seed, split="train")
                lo = mid
            except (RuntimeError, ValueError):
                hi = mid - 1
        return task.sample(lo, seed=seed, split="train")
