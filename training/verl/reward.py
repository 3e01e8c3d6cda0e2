"""verl custom reward function scoring this project's tasks (reward.custom_reward_function).

verl calls compute_score(data_source, solution_str, ground_truth, extra_info) per rollout; rows
written by `python -m poise_probe.integrations.verl.data` have data_source `poise/<task>`.
"""
from __future__ import annotations

from poise_probe.tasks import Example, get_task


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    if not str(data_source).startswith("poise/"):
        raise ValueError(f"compute_score scores this project's tasks (data_source 'poise/<task>'); "
                         f"got {data_source!r}. Use verl's default reward for other data.")
    task = get_task(str(data_source)[len("poise/"):])
    example = Example(prompt="", ground_truth=str(ground_truth), domain=task.domain,
                      data_source=str(data_source), extra_info=dict(extra_info or {}))
    return float(task.score(solution_str, example))
