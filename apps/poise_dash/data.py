"""Reading one run's files for the dashboard, through `poise_probe.rundir` only: its metrics,
rollout tables, eval reports, config and meta. A run is a run directory (`RunReader`) or a run
made elsewhere, a TRL output folder or a verl dump (`rundir.external`, read-only, no eval
reports or probe snapshots); `rundir.open_run` opens either.

- Metrics are tailed: `MetricsTail` keeps a `RunReader` whose `new_metrics()` reads only the
  bytes appended since the last refresh; a rewrite (resume truncation) starts over.
- Rollout tables, eval reports, config and meta are cached by file identity (path, mtime,
  size): a committed file is renamed into place whole, so a changed file has a new identity and
  an unchanged one is never read twice (`study_files` caches a study's files the same way).
- Nothing here raises on a half-written or missing file: callers get warnings to show inline.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import streamlit as st

from poise_dash.analysis import (
    calibration_summary,
    numeric_frame,
    per_step,
    target_column,
)
from poise_probe.rundir import ExternalRun, RunReader, open_run, step_name

logger = logging.getLogger(__name__)

#: Columns the Probe page and the rollout filters need: everything but text and per-token lists
#: (`probe_target` from run-format schema 2 on; a table without it is read without it).
LIGHT_COLUMNS = ("step", "prompt_id", "group_id", "domain", "data_source", "task", "rollout_idx",
                 "reward", "score", "probe_pred", "probe_target", "baseline", "advantage",
                 "num_tokens", "truncated")
TEXT_COLUMNS = ("prompt", "completion", "ground_truth")


def file_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """(mtime_ns, size) of a file, or None when it is missing."""
    try:
        st_ = os.stat(path)
    except OSError:
        return None
    return st_.st_mtime_ns, st_.st_size


# --------------------------------------------------------------------------------------------
# one run: live metrics


class MetricsTail:
    """The metrics of one run, read incrementally (only appended bytes are read on refresh)."""

    def __init__(self, path: str):
        self.path = path
        self.reader = open_run(path)
        self.external = isinstance(self.reader, ExternalRun)
        self.records: list[dict] = []
        self._frame: pd.DataFrame | None = None
        self._steps: pd.DataFrame | None = None
        self.last_new = 0           # records the last refresh added
        self.refreshes = 0
        self.restarts = 0
        self.warnings: list[str] = []

    def refresh(self) -> int:
        """Read what was appended since the last call; returns how many records were new."""
        self.warnings = []
        metrics = Path(self.path, "metrics.jsonl")
        try:
            new = self.reader.new_metrics(errors="skip")
        except (OSError, ValueError) as err:  # e.g. a folder deleted under us
            self.warnings.append(f"could not read {metrics}: {err}")
            new = []
        if self.reader.metrics_restarted:
            self.records, self._frame, self._steps = [], None, None
            self.restarts += 1
        if new:
            self.records.extend(new)
            self._frame, self._steps = None, None
        self.last_new = len(new)
        self.refreshes += 1
        if self.external:  # no metrics.jsonl: steps its tables could not give
            self.warnings.extend(self.reader.warnings)
            return len(new)
        ident = file_identity(metrics)
        if ident is None:
            self.warnings.append("metrics.jsonl does not exist yet: no step has been logged.")
        elif ident[1] > 0 and _last_byte(metrics) != b"\n":
            self.warnings.append("metrics.jsonl ends in an incomplete line (a write in progress "
                                 "or a torn write); it is ignored until it is complete.")
        return len(new)

    @property
    def frame(self) -> pd.DataFrame:
        """One row per metrics line."""
        if self._frame is None:
            self._frame = numeric_frame(self.records)
        return self._frame

    @property
    def steps(self) -> pd.DataFrame:
        """One row per step with x-axis columns (see analysis.per_step)."""
        if self._steps is None:
            self._steps = per_step(self.frame)
        return self._steps


def _last_byte(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1)
    except OSError:
        return b""


def tails() -> dict[str, MetricsTail]:
    """This browser session's metric tails, by run path."""
    return st.session_state.setdefault("_poise_tails", {})


def tail(path: str) -> MetricsTail:
    """The refreshed tail of a run (created on first use)."""
    store = tails()
    t = store.get(path)
    if t is None:
        t = store[path] = MetricsTail(path)
    t.refresh()
    return t


# --------------------------------------------------------------------------------------------
# rollouts (cached per file identity)


def reader_of(run: str) -> RunReader | ExternalRun:
    """The run's reader: the one its metrics tail holds, else a new one (`open_run`)."""
    t = tails().get(run)
    return t.reader if t is not None else open_run(run)


def is_external(run: str) -> bool:
    """Whether `run` was made elsewhere (TRL, verl): read-only, no eval reports or probes."""
    try:
        return isinstance(reader_of(run), ExternalRun)
    except (OSError, ValueError):
        return False


def table_path(run: str, step: int) -> Path:
    """The file a step's rollout table is read from."""
    reader = reader_of(run)
    if isinstance(reader, ExternalRun):
        return reader.rollout_file(step)
    return Path(run, "rollouts", f"{step_name(step)}.parquet")


def tables_hint(run: str) -> str:
    """Where a run's rollout tables would be, for a page that finds none."""
    try:
        reader = reader_of(run)
    except (OSError, ValueError):
        return "rollouts/step_XXXXXX.parquet"
    return reader.tables if isinstance(reader, ExternalRun) else "rollouts/step_XXXXXX.parquet"


def rollout_files(run: str) -> list[tuple[int, tuple[int, int]]]:
    """(step, (mtime_ns, size)) of each committed rollout table, ascending."""
    try:
        steps = reader_of(run).rollout_steps()
    except (OSError, ValueError):
        return []
    out = []
    for step in steps:
        try:
            ident = file_identity(table_path(run, step))
        except (OSError, ValueError):
            continue
        if ident is not None:
            out.append((step, ident))
    return out


@st.cache_data(max_entries=4096, show_spinner=False)
def read_rollout_step(run: str, step: int, ident: tuple[int, int],
                      columns: tuple[str, ...] | None) -> pd.DataFrame:
    """One step's rollouts (the columns of `columns` it has; all when None)."""
    del ident  # part of the cache key only
    reader = open_run(run)
    if isinstance(reader, ExternalRun):  # its table is derived in memory: select what it has
        df = reader.rollouts(step)
        return df if columns is None else df[[c for c in columns if c in df]]
    path = Path(run, "rollouts", f"{step_name(step)}.parquet")
    if columns is not None:
        try:
            names = set(pq.read_schema(path).names)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...
            raise ValueError(f"{path}: cannot read parquet ({err})") from err
        columns = tuple(c for c in columns if c in names)
    return reader.rollouts(step, columns=list(columns) if columns is not None else None)


@st.cache_data(max_entries=64, show_spinner=False)
def read_rollout_steps(run: str, files: tuple[tuple[int, tuple[int, int]], ...],
                       columns: tuple[str, ...]) -> pd.DataFrame:
    """Several steps' rollouts concatenated (a step lacking a column gets NaN there)."""
    frames = [read_rollout_step(run, step, ident, columns) for step, ident in files]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=list(columns))
    return pd.concat(frames, ignore_index=True)


def load_rollouts(run: str, steps: list[int] | None = None,
                  columns: tuple[str, ...] = LIGHT_COLUMNS) -> tuple[pd.DataFrame, list[str]]:
    """Rollouts of `steps` (all when None) and warnings for tables that could not be read."""
    files = rollout_files(run)
    if steps is not None:
        wanted = set(steps)
        files = [f for f in files if f[0] in wanted]
    try:
        return read_rollout_steps(run, tuple(files), tuple(columns)), []
    except (OSError, ValueError, KeyError):
        pass
    # one table is bad: read the others, name the bad one
    frames, warnings = [], []
    for step, ident in files:
        try:
            frames.append(read_rollout_step(run, step, ident, tuple(columns)))
        except (OSError, ValueError, KeyError) as err:
            warnings.append(f"rollouts of step {step} could not be read: {err}")
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(columns))
    return df, warnings


@st.cache_resource(max_entries=64, show_spinner=False)
def _calibration_memo(run: str, n_bins: int | None) -> dict[int, tuple[tuple[int, int], dict]]:
    """{step: (file identity, summary)} of a run, shared by sessions, filled as steps appear."""
    return {}


def calibration_history(run: str, n_bins: int | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Per-step calibration of the probe's predictions over every rollout table of a run.

    Only tables not seen before (or rewritten since) are read, all in one pass, so a live run
    costs one table per new step.
    """
    memo = _calibration_memo(run, n_bins)
    files = rollout_files(run)
    ident_of = dict(files)
    missing = [s for s, ident in files if memo.get(s, (None, None))[0] != ident]
    warnings: list[str] = []
    if missing:
        frame, warnings = _read_steps(run, missing, ["step", "reward", "score", "probe_pred"])
        for step, g in frame.groupby("step") if len(frame) else []:
            step = int(step)
            target = target_column(g)
            memo[step] = (ident_of[step], {"step": step, **calibration_summary(
                g["probe_pred"].to_numpy(float), g[target].to_numpy(float), n_bins)})
    rows = [memo[s][1] for s, ident in files if s in memo and memo[s][0] == ident]
    return pd.DataFrame(rows), warnings


def _read_steps(run: str, steps: list[int], columns: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Several steps' tables in one reader pass; on a bad table, the others and a warning."""
    reader = open_run(run)
    for cols in (columns, [c for c in columns if c != "score"]):
        try:
            return reader.all_rollouts(steps=steps, columns=cols), []
        except KeyError:
            continue          # no table has `score`: read without it
        except (OSError, ValueError):
            break
    frames, warnings = [], []
    for step in steps:
        try:
            frames.append(reader.all_rollouts(steps=[step], columns=[
                c for c in columns if c != "score"]))
        except (OSError, ValueError, KeyError) as err:
            warnings.append(f"step {step}: {err}")
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns),
            warnings)


# --------------------------------------------------------------------------------------------
# eval reports


@st.cache_data(max_entries=1024, show_spinner=False)
def _eval_report(run: str, step: int, ident: tuple[int, int]) -> dict:
    del ident
    return open_run(run).eval_report(step)


def eval_reports(run: str) -> dict[int, dict]:
    """{step: report} of every eval/step_XXXXXX.json (unreadable ones skipped)."""
    out = {}
    try:
        steps = reader_of(run).eval_steps()
    except (OSError, ValueError):
        return out
    for step in steps:
        ident = file_identity(Path(run, "eval", f"{step_name(step)}.json"))
        if ident is None:
            continue
        try:
            out[step] = _eval_report(run, step, ident)
        except (OSError, ValueError) as err:
            logger.warning("skipping eval report of step %s in %s: %s", step, run, err)
    return out


@st.cache_data(max_entries=256, show_spinner=False)
def run_config(run: str, ident: tuple[int, int] | None) -> dict:
    """config.yaml of a run ({} when missing)."""
    del ident
    try:
        return open_run(run).config
    except FileNotFoundError:
        return {}


def config_of(run: str) -> dict:
    """config.yaml of a run; a run made elsewhere: what its folder says of its settings."""
    if is_external(run):
        return reader_of(run).config   # a few small files, read on each call
    return run_config(run, file_identity(Path(run, "config.yaml")))


@st.cache_data(max_entries=256, show_spinner=False)
def _run_meta(run: str, ident: tuple[int, int] | None) -> dict:
    del ident
    try:
        return RunReader(run).meta
    except (OSError, ValueError):
        return {}


def meta_of(run: str) -> dict:
    """meta.json of a run ({} when missing or unreadable), read again only when it changes;
    a run made elsewhere: what its reader derives (source, model, algorithm)."""
    if is_external(run):
        try:
            return reader_of(run).meta
        except (OSError, ValueError):
            return {}
    return _run_meta(run, file_identity(Path(run, "meta.json")))
