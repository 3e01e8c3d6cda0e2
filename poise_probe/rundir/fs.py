"""File-system side of run directories: atomic files and folders, step listings, liveness, time.

Every file except `metrics.jsonl` is written whole to a hidden temp name in the same folder,
fsynced and renamed into place, so a reader sees the old or the new file, never a part. Folders
(probe snapshots, checkpoints) are built under a hidden temp name and renamed.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from poise_probe.rundir.schema import check_step, to_plain

logger = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step_(\d+)$")
# Hidden names of our temp files/folders: ".<final name>.tmp-<pid>-<hex>" and ".<final>.old-...".
_TEMP_RE = re.compile(r"^\.(?P<final>.+)\.(?P<kind>tmp|old)-\d+-[0-9a-f]+$")
_PID_START_SLACK_S = 5.0


def now_iso() -> str:
    """Current UTC time as ISO 8601 with milliseconds (the timestamps of meta and status)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def parse_iso(text: Any) -> float | None:
    """Unix time of an ISO 8601 timestamp, or None when it does not parse."""
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
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
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
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write UTF-8 text (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write strict JSON: NaN/inf become null, numpy values become Python ones."""
    plain = to_plain(obj, Path(path).name, json_nan=True)
    atomic_write_text(path, json.dumps(plain, indent=2, allow_nan=False, ensure_ascii=False) + "\n")


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
def atomic_dir(final: Path) -> Iterator[Path]:
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


def remove_temp_files(folder: Path) -> None:
    """Remove temp files a killed writer left in `folder`; restore a folder caught mid-swap."""
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


def list_steps(directory: Path, suffix: str = "", *,
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


def pick_step(found: list[tuple[int, Path]], step: int | None, what: str, where: Path) -> Path:
    """The entry of `found` for `step` (the latest when None); a missing one lists the steps."""
    if not found:
        raise FileNotFoundError(f"{where} has no {what} yet")
    if step is None:
        return found[-1][1]
    by_step = dict(found)
    step = check_step(step)
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


def process_alive(pid: Any, started: float | None) -> bool:
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
