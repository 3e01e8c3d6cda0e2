"""Run directories: the one module that writes and reads what a training run leaves on disk.

The trainer writes with `RunWriter`; dashboards and notebooks read with `RunReader` and never import
trainer code. Every file and column is documented in docs/run-format.md; change both together.
Only `metrics.jsonl` is appended to; every other file is written whole to a hidden temp name in
the same folder, fsynced and renamed into place, so a reader sees the old or the new file, never a
part. Folders (probe snapshots, checkpoints) are built under a hidden temp name and renamed.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from safetensors.numpy import load_file as _load_safetensors
from safetensors.numpy import save_file as _save_safetensors

from poise_probe import __version__

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# version 2 only added rollout columns and meta keys, so a version-1 run can be continued
_RESUMABLE_VERSIONS = (1, 2)
STATUSES = ("running", "finished", "failed")

# Required rollout columns and their on-disk types, in file order; extra columns follow them.
ROLLOUT_COLUMNS: dict[str, pa.DataType] = {
    "step": pa.int64(),
    "prompt_id": pa.string(),
    "group_id": pa.int64(),
    "domain": pa.string(),
    "data_source": pa.string(),
    "rollout_idx": pa.int64(),
    "prompt": pa.string(),
    "completion": pa.string(),
    "reward": pa.float64(),
    "probe_pred": pa.float64(),
    "baseline": pa.float64(),
    "advantage": pa.float64(),
    "token_entropies": pa.list_(pa.float32()),
    "num_tokens": pa.int64(),
    "truncated": pa.bool_(),
}
# NaN is a value here ("no probe prediction"); a null in any other required column is an error.
_NULL_AS_NAN = ("reward", "probe_pred", "baseline", "advantage")

_META_FROM_CALLER = ("model", "device", "algorithm")
_META_SET_HERE = ("schema_version", "version", "created", "hostname", "pid", "resumes")
_RESERVED_METRIC_KEYS = ("step", "time")
_STEP_RE = re.compile(r"^step_(\d+)$")
# Hidden names of our temp files/folders: ".<final name>.tmp-<pid>-<hex>" and ".<final>.old-...".
_TEMP_RE = re.compile(r"^\.(?P<final>.+)\.(?P<kind>tmp|old)-\d+-[0-9a-f]+$")
_BUCKET_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_PID_START_SLACK_S = 5.0


def step_name(step: int) -> str:
    """File stem of a step: 12 -> "step_000012" (zero-padded to 6 digits, longer when needed)."""
    return f"step_{_check_step(step):06d}"


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int; got {type(step).__name__} {step!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0; got {step}")
    return int(step)


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _parse_iso(text: Any) -> float | None:
    try:
        return dt.datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# Atomic writes


def _fsync_path(path: Path) -> None:
    """fsync a file or folder by path; folders may refuse on some platforms, which is harmless."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_sibling(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def _atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temp path beside `path`; on clean exit fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_path(path.parent)  # makes the rename itself durable


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temp file in the same folder, fsync, then os.replace it onto `path`."""
    with _atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write UTF-8 text (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write strict JSON: NaN/inf become null, numpy values become Python ones."""
    plain = _to_plain(obj, Path(path).name, json_nan=True)
    atomic_write_text(path, json.dumps(plain, indent=2, allow_nan=False, ensure_ascii=False) + "\n")


def _to_plain(obj: Any, where: str, *, json_nan: bool) -> Any:
    """Convert to dict/list/str/int/float/bool/None; `where` names the value in errors."""
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return None if json_nan and not math.isfinite(obj) else float(obj)
    if isinstance(obj, (np.generic, np.ndarray)) and np.asarray(obj).dtype.kind in "biufU":
        return _to_plain(obj.tolist() if isinstance(obj, np.ndarray) else obj.item(), where,
                         json_nan=json_nan)
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be strings; got {type(key).__name__} {key!r}")
            out[key] = _to_plain(value, f"{where}.{key}", json_nan=json_nan)
        return out
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v, f"{where}[{i}]", json_nan=json_nan) for i, v in enumerate(obj)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{where}: cannot store a {type(obj).__name__} ({obj!r:.80}); convert it to a "
                    f"number, string, bool, None, list or dict first")


def _metric_value(key: str, value: Any) -> Any:
    """One metric value as a JSON scalar; NaN/inf -> None."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, np.generic) and value.dtype.kind in "biufU":
        value = value.item()
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(f"metric {key!r}: values must be numbers, strings, bools or None; got "
                    f"{type(value).__name__} ({value!r:.80}). Log a scalar (e.g. tensor.item()).")


# --------------------------------------------------------------------------------------------
# Folders and step listings


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                _fsync_path(path)
        _fsync_path(Path(dirpath))


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename the finished folder `src` to `dst`, moving an older `dst` aside and deleting it."""
    old = None
    if dst.exists():
        old = _temp_sibling(dst, "old")
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_path(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a hidden temp folder; on clean exit fsync its files and rename it to `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _list_steps(directory: Path, suffix: str = "", *,
                is_dir: bool = False) -> list[tuple[int, Path]]:
    """Committed `step_XXXXXX<suffix>` entries of a folder, sorted by step (temp names skipped)."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        if not entry.name.endswith(suffix):
            continue
        match = _STEP_RE.match(entry.name[: len(entry.name) - len(suffix)])
        if match is None or entry.is_dir() != is_dir:
            continue
        found.append((int(match.group(1)), Path(entry.path)))
    return sorted(found)


def _pick_step(found: list[tuple[int, Path]], step: int | None, what: str, where: Path) -> Path:
    if not found:
        raise FileNotFoundError(f"{where} has no {what} yet")
    if step is None:
        return found[-1][1]
    by_step = dict(found)
    step = _check_step(step)
    if step not in by_step:
        steps = [s for s, _ in found]
        raise FileNotFoundError(f"{where} has no {what} for step {step}; available steps: "
                                f"{_describe_steps(steps)}")
    return by_step[step]


def _describe_steps(steps: list[int]) -> str:
    if len(steps) <= 10:
        return ", ".join(map(str, steps))
    return f"{len(steps)} steps from {steps[0]} to {steps[-1]}"


# --------------------------------------------------------------------------------------------
# metrics.jsonl parsing (shared by the reader and the writer's repair/truncation)


def _decode_metric_line(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        return None
    return record


def _scan_metrics(data: bytes, path: Path, first_lineno: int,
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
# Rollout tables


def _entropy_array(rows: Iterable[Any]) -> pa.Array:
    """Per-row token entropies (lists or arrays of any float dtype) as list<float32>."""
    values = [None if v is None or (isinstance(v, float) and math.isnan(v))
              else np.asarray(v, dtype=np.float32).ravel() for v in rows]
    return pa.array(values, type=ROLLOUT_COLUMNS["token_entropies"])


def _column_array(name: str, values: Any) -> pa.Array | pa.ChunkedArray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    if name == "token_entropies":
        return _entropy_array(values)
    if isinstance(values, pd.Series):
        return pa.Array.from_pandas(values)
    return pa.array(values)


def _as_rollout_table(rows: Any, step: int) -> pa.Table:
    """Validate rollout rows and give the required columns their on-disk types."""
    if isinstance(rows, pa.RecordBatch):
        rows = pa.Table.from_batches([rows])
    if isinstance(rows, pd.DataFrame):
        rows = {str(name): rows[name].reset_index(drop=True) for name in rows.columns}
    if isinstance(rows, pa.Table):
        table = rows.replace_schema_metadata(None)
    elif isinstance(rows, Mapping):
        columns = {}
        for name, values in rows.items():
            try:
                columns[str(name)] = _column_array(str(name), values)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as err:
                raise TypeError(f"rollout column {name!r} at step {step} cannot be stored as "
                                f"one typed column: {err}") from err
        try:
            table = pa.table(columns)
        except pa.ArrowInvalid as err:
            raise ValueError(f"rollouts for step {step} do not form a table: {err}") from err
    else:
        raise TypeError(f"rollouts must be a pandas DataFrame, a pyarrow Table or a dict of "
                        f"columns; got {type(rows).__name__}")

    if "step" not in table.column_names:  # the step argument says it; no need to repeat it per row
        table = table.append_column("step", pa.array([step] * table.num_rows, pa.int64()))
    missing = [name for name in ROLLOUT_COLUMNS if name not in table.column_names]
    if missing:
        raise ValueError(f"rollouts for step {step} lack required column(s) {missing}; required "
                         f"columns: {list(ROLLOUT_COLUMNS)} (see docs/run-format.md)")
    fixed = {}
    for name, typ in ROLLOUT_COLUMNS.items():
        col = table.column(name)
        if col.type != typ:
            try:  # float64 -> float32 entropies lose precision by design; other casts must be exact
                col = col.cast(typ, safe=name != "token_entropies")
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
                raise TypeError(f"rollout column {name!r} must hold {typ}; got {col.type} "
                                f"({err})") from err
        if col.null_count:
            if name not in _NULL_AS_NAN:
                raise ValueError(f"rollout column {name!r} has {col.null_count} missing value(s) "
                                 f"at step {step}; every row needs one")
            col = col.fill_null(float("nan"))
        fixed[name] = col
    for name in table.column_names:
        if name not in fixed:
            fixed[name] = table.column(name)
    table = pa.table(fixed)

    steps = set(table.column("step").to_pylist())
    if steps - {step}:
        raise ValueError(f"rollout column 'step' holds {sorted(steps)} but write_rollouts was "
                         f"called for step {step}")
    seen: set[tuple[int, int]] = set()
    for key in zip(table.column("group_id").to_pylist(), table.column("rollout_idx").to_pylist()):
        if key in seen:
            raise ValueError(f"rollouts for step {step} repeat (group_id, rollout_idx) = {key}; "
                             f"each rollout of a group needs its own rollout_idx")
        seen.add(key)
    return table.replace_schema_metadata({"poise_probe.schema_version": str(SCHEMA_VERSION)})


# --------------------------------------------------------------------------------------------
# Process liveness (for crashed-run detection and the one-writer rule)


def _process_started_at(pid: int) -> float | None:
    """Unix time a process started (Linux /proc), or None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        fields = stat[stat.rfind(")") + 2:].split()  # fields[0] is field 3 (state)
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _process_alive(pid: Any, started: float | None) -> bool:
    """Whether `pid` on this host is still the process that began writing at time `started`."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rfind(")") + 2:].split()[0] in ("Z", "X"):
            return False  # exited, not yet reaped
    except (OSError, IndexError):
        return True
    if started is not None:
        began = _process_started_at(pid)
        if began is not None and began > started + _PID_START_SLACK_S:
            return False  # the pid now belongs to a newer process
    return True


def _git_commit() -> str | None:
    """HEAD of the repository holding this package, or None (not a checkout, no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err


def _read_meta(run_dir: Path) -> dict:
    """meta.json, checked for a schema this code can read."""
    path = run_dir / "meta.json"
    meta = _read_json(path)
    version = meta.get("schema_version") if isinstance(meta, dict) else None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{path}: schema_version must be an int >= 1; got {version!r}")
    if version > SCHEMA_VERSION:
        raise ValueError(f"{path}: run written with schema_version {version}, newer than this "
                         f"poise_probe {__version__} reads (<= {SCHEMA_VERSION}); upgrade "
                         f"poise_probe to read it")
    return meta


# --------------------------------------------------------------------------------------------
# Writer


class RunWriter:
    """Writes one run directory; the trainer's only way to put files there (one writer per run).

    Usable as a context manager: a clean exit marks the run finished; an exception marks it
    failed with the error text and propagates.
    """

    def __init__(self, run_dir: str | os.PathLike, *, config: Mapping[str, Any],
                 meta: Mapping[str, Any], resume: bool = False, keep_last: int | None = None):
        self.run_dir = Path(run_dir)
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)
                                      or keep_last < 1):
            raise ValueError(f"keep_last must be None (keep every checkpoint) or an int >= 1; "
                             f"got {keep_last!r}")
        self.keep_last = keep_last
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict (the fully resolved config, e.g. "
                            f"dataclasses.asdict(cfg)); got {type(config).__name__}")
        if not isinstance(meta, Mapping):
            raise TypeError(f"meta must be a dict; got {type(meta).__name__}")
        missing = [key for key in _META_FROM_CALLER if key not in meta]
        if missing:
            raise ValueError(f"meta lacks {missing}; the caller gives {list(_META_FROM_CALLER)} "
                             f"(algorithm = the adv_estimator name)")
        clash = [key for key in _META_SET_HERE if key in meta]
        if clash:
            raise ValueError(f"meta keys {clash} are filled in by RunWriter; leave them out")
        self._closed = False
        self._started = _now_iso()
        exists = (self.run_dir / "meta.json").exists()
        if exists and not resume:
            raise FileExistsError(f"{self.run_dir} already holds a run (it has meta.json); pass "
                                  f"--resume to continue it, or choose another --output")
        if resume and not exists:
            raise FileNotFoundError(f"cannot resume {self.run_dir}: no run there (no meta.json); "
                                    f"drop --resume to start a new run")
        # Convert everything before writing anything, so a bad value leaves no half-made run.
        config_text = yaml.safe_dump(_to_plain(config, "config", json_nan=False),
                                     sort_keys=False, allow_unicode=True)
        meta = _to_plain(meta, "meta", json_nan=True)
        commit = meta["git_commit"] if "git_commit" in meta else _git_commit()
        if resume:
            self._resume(config_text, meta, commit)
        else:
            self._create(config_text, meta, commit)

    # -- setup

    def _path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    def _new_status(self, last_step: int | None) -> dict:
        return {"status": "running", "last_step": last_step, "updated": _now_iso(),
                "pid": os.getpid(), "hostname": socket.gethostname(), "error": None,
                "started": self._started}

    def _create(self, config_text: str, meta: dict, commit: str | None) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._status = self._new_status(None)
        atomic_write_json(self._path("status.json"), self._status)
        atomic_write_text(self._path("config.yaml"), config_text)
        full = {"schema_version": SCHEMA_VERSION, "version": __version__, "git_commit": commit,
                **meta, "created": self._started, "hostname": socket.gethostname(),
                "pid": os.getpid()}
        full.setdefault("run_name", self.run_dir.resolve().name)
        # meta.json goes last: its presence is what makes a folder a run directory.
        atomic_write_json(self._path("meta.json"), full)

    def _resume(self, config_text: str, meta: dict, commit: str | None) -> None:
        old_meta = _read_meta(self.run_dir)
        old_version = old_meta["schema_version"]
        if old_version not in _RESUMABLE_VERSIONS:
            raise ValueError(f"{self.run_dir} has schema_version {old_version}; this poise_probe "
                             f"writes {SCHEMA_VERSION} and resumes {list(_RESUMABLE_VERSIONS)}; "
                             f"start a new run instead")
        old_status = {}
        if self._path("status.json").exists():
            old_status = _read_json(self._path("status.json"))
        if (old_status.get("status") == "running"
                and old_status.get("hostname") == socket.gethostname()
                and old_status.get("pid") != os.getpid()
                and _process_alive(old_status.get("pid"), _parse_iso(old_status.get("started")))):
            raise RuntimeError(f"{self.run_dir} is still being written by pid "
                               f"{old_status['pid']} on this host; stop it before resuming")
        self._clean_temp()
        self._repair_metrics_tail()
        last = old_status.get("last_step")
        self._status = self._new_status(last if isinstance(last, int) else None)
        atomic_write_json(self._path("status.json"), self._status)
        atomic_write_text(self._path("config.yaml"), config_text)
        resumed = {"time": self._started, "hostname": socket.gethostname(), "pid": os.getpid(),
                   "version": __version__, "git_commit": commit,
                   "last_step": self._status["last_step"],
                   "changed": {k: v for k, v in meta.items() if old_meta.get(k) != v}}
        if old_version != SCHEMA_VERSION:  # later steps carry the newer columns
            resumed["schema_version_from"] = old_version
            old_meta["schema_version"] = SCHEMA_VERSION
        old_meta["resumes"] = [*old_meta.get("resumes", []), resumed]
        atomic_write_json(self._path("meta.json"), old_meta)

    def _clean_temp(self) -> None:
        """Remove temp files a killed writer left; restore a checkpoint caught mid-swap."""
        for folder in (self.run_dir, *(self._path(d) for d in ("rollouts", "probes", "eval",
                                                                "checkpoints"))):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                match = _TEMP_RE.match(entry.name)
                if match is None:
                    continue
                final = folder / match["final"]
                if match["kind"] == "old" and not final.exists():
                    os.replace(entry, final)
                    logger.warning("restored %s from an interrupted replacement", final)
                elif entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def _repair_metrics_tail(self) -> None:
        """Cut a torn last line so that appended lines start on a fresh line."""
        path = self._path("metrics.jsonl")
        if not path.exists():
            return
        data = path.read_bytes()
        _records, consumed, _ = _scan_metrics(data, path, 1, errors="raise")
        if consumed != len(data):
            logger.warning("dropping %d bytes of a torn last line in %s", len(data) - consumed,
                           path)
            atomic_write_bytes(path, data[:consumed])

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"RunWriter for {self.run_dir} is closed")

    # -- writing

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append {"step", **metrics, "time"} to metrics.jsonl as one fsynced line."""
        self._check_open()
        step = _check_step(step)
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a dict; got {type(metrics).__name__}")
        record: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            if not isinstance(key, str):
                raise TypeError(f"metric keys must be strings; got {type(key).__name__} {key!r}")
            if key in _RESERVED_METRIC_KEYS:
                raise ValueError(f"metric key {key!r} is reserved (RunWriter sets it); rename it")
            record[key] = _metric_value(key, value)
        record["time"] = time.time()
        data = (json.dumps(record, allow_nan=False, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self._path("metrics.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:  # one write() in practice; loop in case the OS writes less
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        self._status["updated"] = _now_iso()  # heartbeat for readers on other hosts
        atomic_write_json(self._path("status.json"), self._status)

    def write_rollouts(self, step: int, rows: Any) -> Path:
        """Write rollouts/step_XXXXXX.parquet atomically; returns its path."""
        self._check_open()
        step = _check_step(step)
        table = _as_rollout_table(rows, step)
        path = self._path("rollouts", f"{step_name(step)}.parquet")
        with _atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        return path

    def write_probe_snapshot(self, step: int, tensors: Mapping[str, Mapping[str, np.ndarray]],
                             meta: Mapping[str, Any]) -> Path:
        """Write probes/step_XXXXXX/<bucket>.safetensors + meta.json as one atomic folder."""
        self._check_open()
        step = _check_step(step)
        if not isinstance(tensors, Mapping):
            raise TypeError(f"tensors must be a dict bucket -> {{name: array}}; got "
                            f"{type(tensors).__name__}")
        arrays: dict[str, dict[str, np.ndarray]] = {}
        for bucket, named in tensors.items():
            if not isinstance(bucket, str) or not _BUCKET_RE.match(bucket):
                raise ValueError(f"probe bucket name {bucket!r} must be a plain file name "
                                 f"(letters, digits, _ . -; not starting with '.' or '-')")
            if not isinstance(named, Mapping):
                raise TypeError(f"probe bucket {bucket!r} must map names to arrays; got "
                                f"{type(named).__name__}")
            arrays[bucket] = {}
            for name, array in named.items():
                if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
                    raise TypeError(f"probe tensor {bucket}/{name} must be a numeric numpy array; "
                                    f"got {type(array).__name__} "
                                    f"{getattr(array, 'dtype', '')}")
                arrays[bucket][str(name)] = np.ascontiguousarray(array)
        if not isinstance(meta, Mapping):
            raise TypeError(f"probe meta must be a dict; got {type(meta).__name__}")
        meta_plain = _to_plain(meta, "probe meta", json_nan=True)
        final = self._path("probes", step_name(step))
        with _atomic_dir(final) as tmp:
            for bucket, named in arrays.items():
                _save_safetensors(named, str(tmp / f"{bucket}.safetensors"),
                                  metadata={"step": str(step), "bucket": bucket})
            (tmp / "meta.json").write_text(
                json.dumps(meta_plain, indent=2, allow_nan=False, ensure_ascii=False) + "\n",
                encoding="utf-8")
        return final

    def write_eval(self, step: int, report: Mapping[str, Any]) -> Path:
        """Write eval/step_XXXXXX.json atomically (strict JSON); returns its path."""
        self._check_open()
        path = self._path("eval", f"{step_name(step)}.json")
        if not isinstance(report, Mapping):
            raise TypeError(f"eval report must be a dict; got {type(report).__name__}")
        atomic_write_json(path, report)
        return path

    @contextlib.contextmanager
    def checkpoint(self, step: int) -> Iterator[Path]:
        """Yield a temp folder to save into; a clean exit commits it as checkpoints/step_XXXXXX."""
        self._check_open()
        final = self._path("checkpoints", step_name(step))
        with _atomic_dir(final) as tmp:
            yield tmp
        if self.keep_last is not None:
            for _step, old in self.checkpoints()[:-self.keep_last]:
                shutil.rmtree(old)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Committed checkpoints, oldest first."""
        return _list_steps(self._path("checkpoints"), is_dir=True)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        """(step, folder) of the newest committed checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def truncate_after(self, step: int, *, checkpoints: bool = False) -> None:
        """Forget steps > `step` (before resuming from it): metrics lines, rollouts, probes, eval.

        Checkpoints of later steps are kept unless `checkpoints=True`.
        """
        self._check_open()
        step = _check_step(step)
        path = self._path("metrics.jsonl")
        if path.exists():
            data = path.read_bytes()
            records, _, _ = _scan_metrics(data, path, 1, errors="raise")
            kept = b"".join(raw for record, raw in records if record["step"] <= step)
            if kept != data:
                atomic_write_bytes(path, kept)
        for later, file in _list_steps(self._path("rollouts"), ".parquet"):
            if later > step:
                file.unlink()
        for later, file in _list_steps(self._path("eval"), ".json"):
            if later > step:
                file.unlink()
        for later, folder in _list_steps(self._path("probes"), is_dir=True):
            if later > step:
                shutil.rmtree(folder)
        if checkpoints:
            for later, folder in self.checkpoints():
                if later > step:
                    shutil.rmtree(folder)
        last = self._status.get("last_step")
        if last is not None and last > step:
            self.set_status(self._status["status"], last_step=step, error=self._status["error"])

    def set_status(self, status: str, last_step: int | None = None,
                   error: str | None = None) -> None:
        """Rewrite status.json; `last_step=None` keeps the previous value."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}; got {status!r}")
        self._status.update(status=status, error=error, updated=_now_iso())
        if last_step is not None:
            self._status["last_step"] = _check_step(last_step)
        atomic_write_json(self._path("status.json"), self._status)

    def close(self, status: str = "finished", error: str | None = None) -> None:
        """Mark the run `status` and refuse further writes; a second call does nothing."""
        if self._closed:
            return
        self.set_status(status, error=error)
        self._closed = True

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.close("finished")
        elif not self._closed:
            self.close("failed", error=f"{exc_type.__name__}: {exc}")
        return False


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
        _read_meta(self.run_dir)
        self._cursor: tuple[int, int, bytes, int] | None = None  # inode, offset, tail, line no
        self.metrics_restarted = False

    def _path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    @property
    def meta(self) -> dict:
        """meta.json, re-read on each access."""
        return _read_meta(self.run_dir)

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
        status = _read_json(path)
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
        if status.get("hostname") == socket.gethostname() and not _process_alive(
                status.get("pid"), _parse_iso(status.get("started"))):
            return "crashed"
        if stale_after is not None:
            updated = _parse_iso(status.get("updated"))
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
        records, _, _ = _scan_metrics(data, path, 1, errors)
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
        records, consumed, lineno = _scan_metrics(data, path, lineno, errors)
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
        return [step for step, _ in _list_steps(self._path("rollouts"), ".parquet")]

    def rollouts(self, step: int | None = None, columns: list[str] | None = None) -> pd.DataFrame:
        """One step's rollout table (latest when step is None); entropies are float32 arrays."""
        path = _pick_step(_list_steps(self._path("rollouts"), ".parquet"), step, "rollouts",
                          self.run_dir)
        return _read_parquet(path, columns, require_all=True)

    def all_rollouts(self, steps: Iterable[int] | None = None,
                     columns: list[str] | None = None) -> pd.DataFrame:
        """Rollout tables of `steps` (all when None) concatenated; a column a step lacks is NaN."""
        found = _list_steps(self._path("rollouts"), ".parquet")
        if steps is not None:
            found = [(s, _pick_step(found, s, "rollouts", self.run_dir)) for s in steps]
        frames = [_read_parquet(path, columns, require_all=False) for _, path in found]
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
        return [step for step, _ in _list_steps(self._path("probes"), is_dir=True)]

    def probe_snapshot(self, step: int | None = None
                       ) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
        """({bucket: {name: array}}, meta) of one snapshot (latest when step is None)."""
        folder = _pick_step(_list_steps(self._path("probes"), is_dir=True), step,
                            "probe snapshots", self.run_dir)
        tensors = {}
        for file in sorted(folder.glob("*.safetensors")):
            try:
                tensors[file.name[: -len(".safetensors")]] = _load_safetensors(str(file))
            except Exception as err:  # safetensors raises its own error types
                raise ValueError(f"{file}: cannot read safetensors ({err})") from err
        return tensors, _read_json(folder / "meta.json")

    def eval_steps(self) -> list[int]:
        """Steps with an evaluation report, ascending."""
        return [step for step, _ in _list_steps(self._path("eval"), ".json")]

    def eval_report(self, step: int | None = None) -> dict:
        """One evaluation report (latest when step is None)."""
        return _read_json(_pick_step(_list_steps(self._path("eval"), ".json"), step,
                                     "eval reports", self.run_dir))

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Committed checkpoints (step, folder), oldest first."""
        return _list_steps(self._path("checkpoints"), is_dir=True)


def _read_parquet(path: Path, columns: list[str] | None, *, require_all: bool) -> pd.DataFrame:
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
