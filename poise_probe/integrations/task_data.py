"""This project's tasks as rows other engines train on, and their verifiers as a reward function.

`task_rows` samples examples from built-in or file tasks (the same `Task.sample` the built-in
trainer's `PromptStream` draws from) and returns plain rows: the chat prompt, the ground truth
and what routes the probe (domain, data_source), plus `extra_info` as a JSON string so any
columnar store keeps it. `TaskReward` scores completions with each row's own task, the same
verifier the built-in trainer calls. TRL's GRPOTrainer takes both directly (`Dataset.from_list`
and `reward_funcs=[TaskReward()]`).
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from poise_probe.tasks import Example, Task, get_task

ROW_COLUMNS = ("prompt", "ground_truth", "task", "domain", "data_source", "prompt_id",
               "extra_info")


def task_rows(tasks: Sequence[str], n_per_task: int, *, seed: int = 0, split: str = "train",
              task_kwargs: dict[str, dict] | None = None) -> list[dict[str, Any]]:
    """`n_per_task` examples of each task, interleaved round-robin (as `PromptStream` serves
    them), as dicts with `ROW_COLUMNS`."""
    if not tasks:
        raise ValueError("task_rows needs at least one task name, e.g. ['arith', 'boolean'].")
    if n_per_task < 1:
        raise ValueError(f"n_per_task must be >= 1; got {n_per_task}.")
    kwargs = task_kwargs or {}
    per_task = [(name, get_task(name, **kwargs.get(name, {})).sample(n_per_task, seed, split))
                for name in tasks]
    rows = []
    for i in range(n_per_task):
        for name, examples in per_task:
            ex = examples[i]
            rows.append({"prompt": ex.messages, "ground_truth": str(ex.ground_truth),
                         "task": name, "domain": ex.domain, "data_source": ex.data_source,
                         "prompt_id": ex.prompt_id,
                         "extra_info": json.dumps(ex.extra_info, sort_keys=True, default=str)})
    return rows


def completion_text(completion: Any) -> str:
    """The text of a completion as TRL passes it: a string, or a chat list (the last message)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of chat messages; got "
                    f"{type(completion).__name__} {completion!r:.80}")


class TaskReward:
    """A TRL reward function: each completion scored in [0, 1] by its row's task.

    Needs the dataset columns `task` and `ground_truth` (from `task_rows`); `domain`,
    `data_source` and `extra_info` are used when present. Task objects are built once per name.
    """

    __name__ = "task_score"

    def __init__(self, task_kwargs: dict[str, dict] | None = None):
        self.task_kwargs = task_kwargs or {}
        self._tasks: dict[str, Task] = {}

    def _task(self, name: str) -> Task:
        if name not in self._tasks:
            self._tasks[name] = get_task(name, **self.task_kwargs.get(name, {}))
        return self._tasks[name]

    def __call__(self, prompts, completions, task=None, ground_truth=None, domain=None,
                 data_source=None, extra_info=None, **_: Any) -> list[float]:
        n = len(completions)
        for column, values in (("task", task), ("ground_truth", ground_truth)):
            if values is None:
                raise KeyError(f"TaskReward needs the dataset column {column!r} (rows from "
                               f"poise_probe.integrations.task_data.task_rows have it).")
            if len(values) != n:
                raise ValueError(f"column {column!r} has {len(values)} values for {n} "
                                 f"completions.")
        by_task: dict[str, list[int]] = {}
        for i, name in enumerate(task):
            by_task.setdefault(name, []).append(i)
        out = [0.0] * n
        for name, idx in by_task.items():
            t = self._task(name)
            examples = [Example(prompts[i], ground_truth[i],
                                domain[i] if domain is not None else t.domain,
                                data_source[i] if data_source is not None else name,
                                json.loads(extra_info[i]) if extra_info is not None else {})
                        for i in idx]
            scores = t.score_many([completion_text(completions[i]) for i in idx], examples)
            for i, s in zip(idx, scores):
                out[i] = float(s)
        return out
