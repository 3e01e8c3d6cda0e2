"""How a config field is declared and checked: shared by `config` and `config_methods`."""
from __future__ import annotations

import math

from dataclasses import field


def opt(default, help: str, *, factory: bool = False):
    """A config field with its one-line help (shown by `poise config show` and docs/config.md);
    `factory=True` when `default` is a callable making a mutable default."""
    if factory:
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{key} must be one of {list(options)}; got {value!r}.")


def positive(key: str, value: int) -> None:
    if not value >= 1:                                  # NaN fails too
        raise ValueError(f"{key} must be >= 1; got {value}.")


def nonneg(key: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):        # NaN and inf fail too
        raise ValueError(f"{key} must be >= 0 and finite; got {value}.")


def above(key: str, value: float, low: float = 0.0) -> None:
    """A finite number strictly above `low` (a rate, a strength, a temperature)."""
    if not (value > low and math.isfinite(value)):
        raise ValueError(f"{key} must be > {low:g} and finite; got {value}.")


def unit(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:                          # NaN fails too
        raise ValueError(f"{key} must lie in [0, 1]; got {value}.")
