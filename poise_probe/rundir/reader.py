"""Reading run directories: `RunReader`, `find_runs`, and the metrics.jsonl and parquet parsing.

Safe on live runs: readers skip a torn last metrics line and see only renamed-in files. Dashboards
and notebooks read with `RunReader` and never import trainer code (docs/run-format.md).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from safetensors.numpy import load_file as _load_safetensors

from poise_probe import __version__
from poise_probe.rundir.fs import list_steps, parse_iso, pick_step, process_alive
from poise_probe.rundir.schema import ROLLOUT_COLUMNS, SCHEMA_VERSION, STATUSES

logger = logging.getLogger(__name__)


def read_json(path: Path) -> Any:
    """A JSON file; a missing or invalid file raises with its path."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err


def read_meta(run_dir: Path) -> dict:
    """meta.json, checked for a schema this code can read."""
    path = run_dir / "meta.json"
    meta = read_json(path)
    version = meta.get("schema_version") if isinstance(meta, dict) else None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{path}: schema_version must be an int >= 1; got {version!r}")
    if version > SCHEMA_VERSION:
        raise ValueError(f"{path}: run written with schema_version {version}, newer than this "
                         f"poise_probe {__version__} reads (<= {SCHEMA_VERSION}); upgrade "
                         f"poise_probe to read it")
    return meta


# --------------------------------------------------------------------------------------------
# metrics.jsonl parsing (shared by the reader and the writer's repair/truncation)


def _decode_metric_line(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # bad JSON or UTF-8, a 5000-digit number, deep nesting
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        return None
    return record


def scan_metrics(data: bytes, path: Path, first_lineno: int,
                 errors: str) -> tuple[list[tuple[dict, bytes]], int, int]:
    """Parse complete lines of `data`: (records with their raw line, bytes consumed, next line no).

    A piece after the last newline is torn (being written) and not consumed. A complete line that
    does not parse is also left unconsumed while nothing complete follows it; anywhere else it is
    corrupt and raises (errors="raise") or is logged and skipped (errors="skip").
    """
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip'; got {errors!r}")
    out: list[tuple[dict, bytes]] = []
    pos, lineno = 0, first_lineno
    while (end := data.find(b"\n", pos)) >= 0:
        raw = data[pos:end + 1]
        if raw.strip():
            record = _decode_metric_line(raw)
            if record is None:
                if data.find(b"\n", end + 1) < 0:
                    break  # last complete line: treat as torn, re-read once more follows
                message = (f"{path}:{lineno}: not a JSON object with an integer 'step': "
                           f"{raw[:120]!r}")
                if errors == "raise":
                    raise ValueError(message + " (pass errors='skip' to skip corrupt lines)")
                logger.warning("skipping corrupt line %s", message)
            else:
                out.append((record, raw))
        pos, lineno = end + 1, lineno + 1
    return out, pos, lineno


# --------------------------------------------------------------------------------------------
# Reader


class RunReader:
    """Reads one run directory, finished or live; safe to use while the writer runs."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        if not self.run_dir.exists():
            raise FileNotFoundError(f"run directory {self.run_dir} does not exist")
        if not self.run_dir.is_dir():
            raise NotADirectoryError(f"{self.run_dir} is not a folder, so not a run directory")
        if not (self.run_dir / "meta.json").is_file():
            raise FileNotFoundError(f"{self.run_dir} is not a run directory: it has no meta.json. "
                                    f"To list the runs under a folder use "
                                    f"find_runs({str(self.run_dir)!r}).")
        read_meta(self.run_dir)
        self._cursor: tuple[int, int, bytes, int] | None = None  # inode, offset, tail, line no
        self.metrics_restarted = False

    def _path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    @property
    def meta(self) -> dict:
        """meta.json, re-read on each access."""
        return read_meta(self.run_dir)

    @property
    def config(self) -> dict:
        """config.yaml as a nested dict, re-read on each access."""
        path = self._path("config.yaml")
        try:
            return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} does not exist") from None
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: invalid YAML ({err})") from err

    @property
    def status(self) -> dict:
        """status.json as written, re-read on each access (see `inferred_status`)."""
        path = self._path("status.json")
        status = read_json(path)
        if not isinstance(status, dict):
            raise ValueError(f"{path}: expected a JSON object; got {type(status).__name__}")
        return status

    def inferred_status(self, stale_after: float | None = None) -> str:
        """"running" | "finished" | "failed" | "crashed".

        A run that says running is crashed when its writer pid is gone from this host (or was
        reused by a newer process), or when status.json was last updated more than `stale_after`
        seconds ago (the writer refreshes it on every log_metrics; needed for runs on other hosts).
        A missing status.json also counts as crashed.
        """
        try:
            status = self.status
        except FileNotFoundError:
            return "crashed"
        state = status.get("status")
        if state != "running":
            return state if state in STATUSES else "crashed"
        if status.get("hostname") == socket.gethostname() and not process_alive(
                status.get("pid"), parse_iso(status.get("started"))):
            return "crashed"
        if stale_after is not None:
            updated = parse_iso(status.get("updated"))
            if updated is None or time.time() - updated > stale_after:
                return "crashed"
        return "running"

    # -- metrics

    def metrics(self, errors: str = "raise") -> list[dict]:
        """Every complete record of metrics.jsonl; a torn last line is skipped."""
        path = self._path("metrics.jsonl")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        records, _, _ = scan_metrics(data, path, 1, errors)
        return [record for record, _raw in records]

    def new_metrics(self, errors: str = "raise") -> list[dict]:
        """Records appended since the previous call (all of them on the first call).

        Keeps a byte offset; a torn last line is returned once complete. If the file was rewritten
        (truncate_after on resume), this reads from the start and sets `metrics_restarted` to True:
        replace what you hold instead of appending.
        """
        path = self._path("metrics.jsonl")
        self.metrics_restarted = False
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            if self._cursor is not None and self._cursor[1]:
                self.metrics_restarted = True
            self._cursor = None
            return []
        with f:
            st = os.fstat(f.fileno())
            offset, lineno, tail = 0, 1, b""
            if self._cursor is not None:
                old_inode, old_offset, old_tail, old_lineno = self._cursor
                f.seek(old_offset - len(old_tail))
                # Same file and the bytes before our offset unchanged: it was only appended to.
                if (st.st_ino == old_inode and st.st_size >= old_offset
                        and f.read(len(old_tail)) == old_tail):
                    offset, lineno, tail = old_offset, old_lineno, old_tail
                else:
                    self.metrics_restarted = old_offset > 0
            f.seek(offset)
            data = f.read()
        records, consumed, lineno = scan_metrics(data, path, lineno, errors)
        tail = (tail + data[:consumed])[-256:]
        self._cursor = (st.st_ino, offset + consumed, tail, lineno)
        return [record for record, _raw in records]

    def metrics_frame(self, errors: str = "raise") -> pd.DataFrame:
        """metrics() as a DataFrame, one row per line (a step may have several lines)."""
        records = self.metrics(errors)
        if not records:
            return pd.DataFrame({"step": pd.Series([], dtype="int64")})
        frame = pd.DataFrame.from_records(records)
        for name in frame.columns:  # a metric that was NaN (null) on some steps stays numeric
            values = frame[name].dropna()
            if frame[name].dtype == object and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                frame[name] = frame[name].astype("float64")
        return frame

    # -- rollouts

    def rollout_steps(self) -> list[int]:
        """Steps with a committed rollout table, ascending."""
        return [step for step, _ in list_steps(self._path("rollouts"), ".parquet")]

    def rollouts(self, step: int | None = None, columns: list[str] | None = None) -> pd.DataFrame:
        """One step's rollout table (latest when step is None); entropies are float32 arrays."""
        path = pick_step(list_steps(self._path("rollouts"), ".parquet"), step, "rollouts",
                         self.run_dir)
        return read_parquet(path, columns, require_all=True)

    def all_rollouts(self, steps: Iterable[int] | None = None,
                     columns: list[str] | None = None) -> pd.DataFrame:
        """Rollout tables of `steps` (all when None) concatenated; a column a step lacks is NaN."""
        found = list_steps(self._path("rollouts"), ".parquet")
        if steps is not None:
            found = [(s, pick_step(found, s, "rollouts", self.run_dir)) for s in steps]
        frames = [read_parquet(path, columns, require_all=False) for _, path in found]
        frames = [frame for frame in frames if len(frame.columns)]
        if columns is not None and frames:
            present = set().union(*(frame.columns for frame in frames))
            absent = [c for c in columns if c not in present]
            if absent:
                raise KeyError(f"no rollout table in {self.run_dir} has column(s) {absent}")
        if not frames:
            return pd.DataFrame(columns=list(columns or ROLLOUT_COLUMNS))
        return pd.concat(frames, ignore_index=True)

    # -- probes, eval, checkpoints

    def probe_snapshot_steps(self) -> list[int]:
        """Steps with a committed probe snapshot, ascending."""
        return [step for step, _ in list_steps(self._path("probes"), is_dir=True)]

    def probe_snapshot(self, step: int | None = None
                       ) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
        """({bucket: {name: array}}, meta) of one snapshot (latest when step is None)."""
        folder = pick_step(list_steps(self._path("probes"), is_dir=True), step,
                           "probe snapshots", self.run_dir)
        tensors = {}
        for file in sorted(folder.glob("*.safetensors")):
            try:
                tensors[file.name[: -len(".safetensors")]] = _load_safetensors(str(file))
            except Exception as err:  # safetensors raises its own error types
                raise ValueError(f"{file}: cannot read safetensors ({err})") from err
        return tensors, read_json(folder / "meta.json")

    def eval_steps(self) -> list[int]:
        """Steps with an evaluation report, ascending."""
        return [step for step, _ in list_steps(self._path("eval"), ".json")]

    def eval_report(self, step: int | None = None) -> dict:
        """One evaluation report (latest when step is None)."""
        return read_json(pick_step(list_steps(self._path("eval"), ".json"), step,
                                    "eval reports", self.run_dir))

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Committed checkpoints (step, folder), oldest first."""
        return list_steps(self._path("checkpoints"), is_dir=True)


def read_parquet(path: Path, columns: list[str] | None, *, require_all: bool) -> pd.DataFrame:
    """One parquet file as a DataFrame; `columns` it lacks raise when `require_all`, else drop."""
    try:
        if columns is not None:
            names = pq.read_schema(path).names
            absent = [c for c in columns if c not in names]
            if absent and require_all:
                raise KeyError(f"{path} has no column(s) {absent}; it has {names}")
            columns = [c for c in columns if c in names]
        return pq.read_table(path, columns=columns).to_pandas()
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path}: cannot read parquet ({err})") from err


def find_runs(*roots: str | os.PathLike) -> list[Path]:
    """Every run directory (holding meta.json) at or under `roots`, sorted; skips hidden dirs."""
    found: set[Path] = set()
    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(f"cannot search {root} for runs: no such folder")
        for dirpath, dirnames, filenames in os.walk(root):
            if "meta.json" in filenames:
                found.add(Path(dirpath))
                dirnames.clear()  # a run's own subfolders hold no runs
            else:
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(found)
