"""Writing run directories: `RunWriter`, the trainer's only way to put files there.

Only `metrics.jsonl` is appended to; every other file goes through the atomic writes of
`poise_probe.rundir.fs`. Every file and column is documented in docs/run-format.md.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml
from safetensors.numpy import save_file as _save_safetensors

from poise_probe import __version__
from poise_probe.rundir.fs import (
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    list_steps,
    now_iso,
    parse_iso,
    process_alive,
    remove_temp_files,
)
from poise_probe.rundir.reader import read_json, read_meta, scan_metrics
from poise_probe.rundir.schema import (
    RESUMABLE_VERSIONS,
    SCHEMA_VERSION,
    STATUSES,
    as_rollout_table,
    check_step,
    metric_value,
    step_name,
    to_plain,
)

logger = logging.getLogger(__name__)

_META_FROM_CALLER = ("model", "device", "algorithm")
_META_SET_HERE = ("schema_version", "version", "created", "hostname", "pid", "resumes")
_RESERVED_METRIC_KEYS = ("step", "time")
_BUCKET_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


class RunLockedError(RuntimeError):
    """Another live process writes this run directory (one writer per run)."""


def _status_holder(run_dir: Path) -> str:
    """" (pid N on HOST)" from a status.json that says running, or "" when it does not say."""
    try:
        status = read_json(run_dir / "status.json")
        if status["status"] != "running":
            return ""
        return f" (pid {status['pid']} on {status['hostname']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, Mapping) or not tree:
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value and prefix == "":
            out.update(_flatten(value, name))      # sections; mappings inside stay whole
        else:
            out[name] = value
    return out


def diff_configs(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list]:
    """{"section.key": [old, new]} for every key whose value differs (None where absent)."""
    a, b = _flatten(old), _flatten(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def git_commit() -> str | None:
    """HEAD of the repository holding this package, or None (not a checkout, no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


class RunWriter:
    """Writes one run directory; the trainer's only way to put files there (one writer per run).

    Usable as a context manager: a clean exit marks the run finished; an exception marks it
    failed with the error text and propagates.
    """

    def __init__(self, run_dir: str | os.PathLike, *, config: Mapping[str, Any],
                 meta: Mapping[str, Any], resume: bool = False, keep_last: int | None = None,
                 start: bool = True):
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
        self._started = now_iso()
        self._lock_fd: int | None = None
        self._resume_mode = resume
        self._pending: tuple[str, dict, str | None] | None = None
        self._status: dict = {}
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise FileExistsError(f"{self.run_dir} is a file, not a folder; a run directory is a "
                                  f"folder: choose another --output (or move the file away)")
        if resume and not (self.run_dir / "meta.json").exists():
            raise FileNotFoundError(f"cannot resume {self.run_dir}: no run there (no meta.json); "
                                    f"drop --resume to start a new run")
        # Convert everything before writing anything, so a bad value leaves no half-made run.
        config_text = yaml.safe_dump(to_plain(config, "config", json_nan=False),
                                     sort_keys=False, allow_unicode=True)
        meta = to_plain(meta, "meta", json_nan=True)
        commit = meta["git_commit"] if "git_commit" in meta else git_commit()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            if (self.run_dir / "meta.json").exists() and not resume:
                raise FileExistsError(f"{self.run_dir} already holds a run (it has meta.json); "
                                      f"pass --resume to continue it (a run with no checkpoint "
                                      f"yet restarts from step 0 in place), or choose another "
                                      f"--output")
            if resume:
                self._check_resumable()
            self._pending = (config_text, meta, commit)
            if start:
                self.start()
        except BaseException:
            self.release()
            raise

    # -- the one-writer lock

    def _lock(self) -> None:
        """Take an exclusive flock on the run folder itself (no file is created), held until
        `close`/`release` or the process's death; a second writer is refused at once."""
        fd = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _status_holder(self.run_dir)
            raise RunLockedError(f"{self.run_dir} is being written by another process{holder}; "
                                 f"one writer per run: stop that one first, or choose another "
                                 f"--output") from None
        except OSError as exc:  # a file system without flock (some network mounts)
            logger.warning("cannot lock %s (%s); only the status.json pid check guards against "
                           "a second writer", self.run_dir, exc)
            os.close(fd)
            return
        self._lock_fd = fd

    def release(self) -> None:
        """Drop the one-writer lock (`close` does it; also safe to call twice)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()

    def start(self) -> None:
        """Write status.json, config.yaml and meta.json (a new run) or record the resume. The
        constructor calls it unless `start=False`: the trainer first checks that its checkpoint
        loads, so that a failed resume writes nothing."""
        if self._pending is None:
            raise RuntimeError(f"RunWriter for {self.run_dir} has already started")
        config_text, meta, commit = self._pending
        self._pending = None
        if self._resume_mode:
            self._resume(config_text, meta, commit)
        else:
            self._create(config_text, meta, commit)

    @property
    def started(self) -> bool:
        """Whether `start()` has written the run's files (always, unless `start=False`)."""
        return self._pending is None

    @property
    def stored_config(self) -> dict:
        """The run's config.yaml as it is on disk ({} for a new run or a missing file)."""
        path = self._path("config.yaml")
        if not path.exists():
            return {}
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        return loaded if isinstance(loaded, dict) else {}

    # -- setup

    def _path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    def _new_status(self, last_step: int | None) -> dict:
        return {"status": "running", "last_step": last_step, "updated": now_iso(),
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

    def _old_status(self) -> dict:
        path = self._path("status.json")
        if not path.exists():
            return {}
        try:
            status = read_json(path)
        except ValueError:
            logger.warning("%s is unreadable; it will be rewritten", path)
            return {}
        return status if isinstance(status, dict) else {}

    def _check_resumable(self) -> None:
        """Everything a resume checks before it writes anything."""
        old_version = read_meta(self.run_dir)["schema_version"]
        if old_version not in RESUMABLE_VERSIONS:
            raise ValueError(f"{self.run_dir} has schema_version {old_version}; this poise_probe "
                             f"writes {SCHEMA_VERSION} and resumes {list(RESUMABLE_VERSIONS)}; "
                             f"start a new run instead")
        old_status = self._old_status()
        if (old_status.get("status") == "running"
                and old_status.get("hostname") == socket.gethostname()
                and old_status.get("pid") != os.getpid()
                and process_alive(old_status.get("pid"), parse_iso(old_status.get("started")))):
            raise RunLockedError(f"{self.run_dir} is still being written by pid "
                                 f"{old_status['pid']} on this host; stop it before resuming")

    def _resume(self, config_text: str, meta: dict, commit: str | None) -> None:
        old_meta = read_meta(self.run_dir)
        old_version = old_meta["schema_version"]
        old_status = self._old_status()
        old_config = self.stored_config
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
        config_changes = diff_configs(old_config, yaml.safe_load(config_text) or {})
        if config_changes:
            resumed["config_changes"] = config_changes
        if old_version != SCHEMA_VERSION:  # later steps carry the newer columns
            resumed["schema_version_from"] = old_version
            old_meta["schema_version"] = SCHEMA_VERSION
        old_meta["resumes"] = [*old_meta.get("resumes", []), resumed]
        atomic_write_json(self._path("meta.json"), old_meta)

    def _clean_temp(self) -> None:
        """Remove temp files a killed writer left; restore a checkpoint caught mid-swap."""
        for folder in (self.run_dir, *(self._path(d) for d in ("rollouts", "probes", "eval",
                                                                "checkpoints"))):
            if folder.is_dir():
                remove_temp_files(folder)

    def _repair_metrics_tail(self) -> None:
        """Cut a torn last line so that appended lines start on a fresh line."""
        path = self._path("metrics.jsonl")
        if not path.exists():
            return
        data = path.read_bytes()
        _records, consumed, _ = scan_metrics(data, path, 1, errors="raise")
        if consumed != len(data):
            logger.warning("dropping %d bytes of a torn last line in %s", len(data) - consumed,
                           path)
            atomic_write_bytes(path, data[:consumed])

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"RunWriter for {self.run_dir} is closed")
        if self._pending is not None:
            raise RuntimeError(f"RunWriter for {self.run_dir} was made with start=False; call "
                               f"start() before writing")

    # -- writing

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append {"step", **metrics, "time"} to metrics.jsonl as one fsynced line."""
        self._check_open()
        step = check_step(step)
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a dict; got {type(metrics).__name__}")
        record: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            if not isinstance(key, str):
                raise TypeError(f"metric keys must be strings; got {type(key).__name__} {key!r}")
            if key in _RESERVED_METRIC_KEYS:
                raise ValueError(f"metric key {key!r} is reserved (RunWriter sets it); rename it")
            record[key] = metric_value(key, value)
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
        self._status["updated"] = now_iso()  # heartbeat for readers on other hosts
        atomic_write_json(self._path("status.json"), self._status)

    def write_rollouts(self, step: int, rows: Any) -> Path:
        """Write rollouts/step_XXXXXX.parquet atomically; returns its path."""
        self._check_open()
        step = check_step(step)
        table = as_rollout_table(rows, step)
        path = self._path("rollouts", f"{step_name(step)}.parquet")
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        return path

    def write_probe_snapshot(self, step: int, tensors: Mapping[str, Mapping[str, np.ndarray]],
                             meta: Mapping[str, Any]) -> Path:
        """Write probes/step_XXXXXX/<bucket>.safetensors + meta.json as one atomic folder."""
        self._check_open()
        step = check_step(step)
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
        meta_plain = to_plain(meta, "probe meta", json_nan=True)
        final = self._path("probes", step_name(step))
        with atomic_dir(final) as tmp:
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
        with atomic_dir(final) as tmp:
            yield tmp
        if self.keep_last is not None:
            for _step, old in self.checkpoints()[:-self.keep_last]:
                shutil.rmtree(old)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Committed checkpoints, oldest first."""
        return list_steps(self._path("checkpoints"), is_dir=True)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        """(step, folder) of the newest committed checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def truncate_after(self, step: int, *, checkpoints: bool = False) -> None:
        """Forget steps > `step` (before resuming from it): metrics lines, rollouts, probes, eval.

        Checkpoints of later steps are kept unless `checkpoints=True`. `step=-1` forgets every
        step (a run restarted from scratch in place).
        """
        self._check_open()
        step = -1 if step == -1 else check_step(step)
        path = self._path("metrics.jsonl")
        if path.exists():
            data = path.read_bytes()
            records, _, _ = scan_metrics(data, path, 1, errors="raise")
            kept = b"".join(raw for record, raw in records if record["step"] <= step)
            if kept != data:
                atomic_write_bytes(path, kept)
        for later, file in list_steps(self._path("rollouts"), ".parquet"):
            if later > step:
                file.unlink()
        for later, file in list_steps(self._path("eval"), ".json"):
            if later > step:
                file.unlink()
        for later, folder in list_steps(self._path("probes"), is_dir=True):
            if later > step:
                shutil.rmtree(folder)
        if checkpoints:
            for later, folder in self.checkpoints():
                if later > step:
                    shutil.rmtree(folder)
        last = self._status.get("last_step")
        if last is not None and last > step:
            if step < 0:
                self._status["last_step"] = None
            self.set_status(self._status["status"], last_step=step if step >= 0 else None,
                            error=self._status["error"])

    def set_status(self, status: str, last_step: int | None = None,
                   error: str | None = None) -> None:
        """Rewrite status.json; `last_step=None` keeps the previous value."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}; got {status!r}")
        self._status.update(status=status, error=error, updated=now_iso())
        if last_step is not None:
            self._status["last_step"] = check_step(last_step)
        atomic_write_json(self._path("status.json"), self._status)

    def close(self, status: str = "finished", error: str | None = None) -> None:
        """Mark the run `status` and refuse further writes; a second call does nothing."""
        if self._closed:
            return
        try:
            if self._pending is None:       # a writer that never started leaves no status
                self.set_status(status, error=error)
        finally:
            self._closed = True
            self.release()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.close("finished")
        elif not self._closed:
            self.close("failed", error=f"{exc_type.__name__}: {exc}")
        return False

