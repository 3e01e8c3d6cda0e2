"""Metric mirrors: TensorBoard event files and an offline W&B run that copy metrics.jsonl.

metrics.jsonl stays the record (the dashboard, the studies and resume read it); a sink gets each
step's finite numbers right after the run writer has appended them (`trainer.report_to`).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import numbers
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

logger = logging.getLogger(__name__)

SINK_NAMES = ("tensorboard", "wandb")
INSTALL_HINT = "pip install 'poise-probe[tracking]'"
WANDB_STATE = "poise_wandb.json"   # in <run>/wandb: the run id and the last step W&B holds


class MetricSink(Protocol):
    """Where one step's scalars are mirrored; `close` flushes and ends it."""

    def log(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of one step's metrics; strings, bools, None and NaN (null in
    metrics.jsonl) are not mirrored, nor the writer's `step` and `time`."""
    out = {}
    for key, value in metrics.items():
        if key in ("step", "time") or isinstance(value, bool) or not isinstance(
                value, numbers.Real):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def require(report_to: Iterable[str]) -> None:
    """Fail before any work when a requested mirror's package is missing, naming the extra."""
    packages = {"tensorboard": "tensorboard", "wandb": "wandb"}
    for name in report_to:
        if name not in packages:
            raise ValueError(f"trainer.report_to: unknown mirror {name!r}; choose from "
                             f"{list(SINK_NAMES)}.")
        if importlib.util.find_spec(packages[name]) is None:
            raise ModuleNotFoundError(
                f"trainer.report_to={list(report_to)} needs the {packages[name]!r} package, "
                f"which is not installed: {INSTALL_HINT}", name=packages[name])


class TensorBoardSink:
    """Scalars as TensorBoard event files in <run>/tensorboard (`tensorboard --logdir runs`)."""

    def __init__(self, run_dir: Path, *, resume_step: int | None = None):
        require(["tensorboard"])
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run redoes the steps after its checkpoint: purge_step hides the old events
        purge = None if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                     purge_step=purge)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()             # a killed run keeps its finished steps, as metrics.jsonl

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """Scalars as an offline W&B run in <run>/wandb; `wandb sync <run>/wandb/offline-run-*`
    uploads it. Offline W&B cannot rewrite history, so a resumed run keeps the run id and skips
    the steps W&B already holds (both files hold the same values but for timings)."""

    def __init__(self, run_dir: Path, *, project: str, config: Mapping[str, Any],
                 resume_step: int | None = None):
        require(["wandb"])
        import wandb

        self._state_path = Path(run_dir) / "wandb" / WANDB_STATE
        state = {}
        if resume_step is not None and self._state_path.is_file():
            state = json.loads(self._state_path.read_text())
        self._state = {"id": state.get("id") or uuid.uuid4().hex[:12],
                       "last_step": state.get("last_step", -1)}
        self._state_path.parent.mkdir(parents=True, exist_ok=True)
        self._save_state()
        # console off: W&B must not wrap stdout/stderr under the CLI's progress bar
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                  save_code=False)
        self._run = wandb.init(mode="offline", dir=str(run_dir), project=project,
                               name=Path(run_dir).name, id=self._state["id"], resume="allow",
                               config=dict(config), settings=settings)
        logger.info("offline W&B run %s in %s", self._state["id"], self._run.dir)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        if step <= self._state["last_step"]:
            return
        self._run.log(dict(scalars), step=step, commit=True)
        self._state["last_step"] = step
        self._save_state()

    def close(self) -> None:
        self._run.finish()

    def _save_state(self) -> None:
        from poise_probe.rundir import atomic_write_json

        atomic_write_json(self._state_path, self._state)


class Tracker:
    """The mirrors `trainer.report_to` names; `log` sends one step's scalars to each."""

    def __init__(self, sinks: Iterable[MetricSink] = ()):
        self.sinks = list(sinks)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.sinks:
            scalars = scalar_metrics(metrics)
            for sink in self.sinks:
                sink.log(step, scalars)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def open_tracker(report_to: Iterable[str], run_dir: str | Path, *, config: Mapping[str, Any],
                 wandb_project: str, resume_step: int | None = None) -> Tracker:
    """The sinks for `report_to` on `run_dir`; `resume_step` is the checkpoint a resumed run
    continues from (None for a new run)."""
    report_to = list(dict.fromkeys(report_to))
    require(report_to)
    tracker = Tracker()
    try:
        for name in report_to:
            if name == "tensorboard":
                tracker.sinks.append(TensorBoardSink(Path(run_dir), resume_step=resume_step))
            else:
                tracker.sinks.append(WandbSink(Path(run_dir), project=wandb_project,
                                               config=config, resume_step=resume_step))
    except BaseException:
        tracker.close()
        raise
    return tracker
