"""The runs under the dashboard's folders: finding them and summarising each for the Runs page
(status, meta and headline numbers), through `poise_probe.rundir` and `poise_dash.data`. Runs
made elsewhere (TRL output folders, verl rollout dumps) are found too, with their source."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import streamlit as st

from poise_dash.analysis import best_eval
from poise_dash.data import tail
from poise_probe.rundir import find_all_runs

STATUS_ICONS = {"running": "🟢", "finished": "✅", "failed": "❌", "crashed": "💥",
                "stopped": "⏸️", "ended": "⏹️", "unreadable": "⚠️"}
#: Where a run came from: a poise_probe run directory, or a run made elsewhere (read-only).
SOURCE_LABELS = {"poise": "poise", "trl": "TRL", "verl": "verl"}


@dataclass(frozen=True)
class RunRef:
    """A run (absolute path), the label the pages show for it and its source ("poise" for a
    run directory, "trl" or "verl" for a run made elsewhere)."""

    path: str
    label: str
    source: str = "poise"


@st.cache_data(ttl=5, show_spinner=False)
def discover_runs(roots: tuple[str, ...]) -> tuple[list[RunRef], list[str]]:
    """Every run under `roots` with a unique label, plus warnings for roots that do not exist."""
    warnings, found = [], []
    for root in roots:
        try:
            runs = find_all_runs(root)
        except FileNotFoundError as err:
            warnings.append(str(err))
            continue
        base = Path(root).resolve()
        for run, source in runs:
            run = run.resolve()
            if run == base:
                label = base.name
            else:
                rel = str(run.relative_to(base))
                label = rel if len(roots) == 1 else f"{base.name}/{rel}"
            found.append(RunRef(str(run), label, source))
    unique: dict[str, RunRef] = {}
    for ref in found:
        unique.setdefault(ref.path, ref)
    return sorted(unique.values(), key=lambda r: r.label), warnings


@dataclass
class RunSummary:
    """What the Runs page shows for one run."""

    ref: RunRef
    status: str = "unreadable"
    algorithm: str = ""
    model: str = ""
    device: str = ""
    last_step: int | None = None
    created: str = ""
    updated: str = ""
    error: str | None = None
    best_acc: float | None = None
    best_step: int | None = None
    last_acc: float | None = None
    last_reward: float | None = None
    lines: int = 0
    warnings: list[str] = field(default_factory=list)


def summarise(ref: RunRef, stale_after: float | None = None) -> RunSummary:
    """Status, meta and headline numbers of a run; an unreadable run says why, never raises."""
    s = RunSummary(ref)
    try:
        t = tail(ref.path)
        meta = t.reader.meta
    except (OSError, ValueError) as err:
        s.error = str(err)
        return s
    s.algorithm, s.model = str(meta.get("algorithm", "")), str(meta.get("model", ""))
    s.device, s.created = str(meta.get("device", "")), str(meta.get("created", ""))
    s.status = t.reader.inferred_status(stale_after=stale_after)
    try:
        status = t.reader.status
        s.last_step, s.updated = status.get("last_step"), str(status.get("updated", ""))
        s.error = status.get("error")
    except (OSError, ValueError) as err:
        s.warnings.append(f"status.json: {err}")
    steps = t.steps
    s.lines = len(t.records)
    s.warnings.extend(t.warnings)
    best = best_eval(steps)
    if best is not None:
        s.best_acc, s.best_step = best
        acc = pd.to_numeric(steps["eval/accuracy"], errors="coerce").dropna()
        s.last_acc = float(acc.iloc[-1])
    if "reward/mean" in steps:
        r = pd.to_numeric(steps["reward/mean"], errors="coerce").dropna()
        s.last_reward = float(r.iloc[-1]) if len(r) else None
    if s.last_step is None and len(steps):
        s.last_step = int(steps["step"].max())
    return s
