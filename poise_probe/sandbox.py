"""Run untrusted Python (model-written code, test programs) in an isolated, resource-capped child.

What is enforced, from strongest to weakest setting (the child decides at start and reports it in
`SandboxResult.isolation`):

* Host is root (the normal case on our training machines): the child enters new mount, network,
  IPC and PID namespaces. The whole filesystem is remounted read-only; the working directory
  (same path as the host's fresh temp dir) and ``/dev/shm`` are private, size-capped tmpfs mounts,
  so writes anywhere else fail and nothing written reaches the host. A small init (PID 1 of the
  new namespace) starts the program under a per-run unprivileged uid/gid (no supplementary groups,
  ``no_new_privs``), so ``RLIMIT_NPROC`` holds (root is exempt from it): a fork bomb stops at
  `max_processes`. The program cannot signal the host (it cannot even see host processes: ``/proc``
  is the namespace's own), the network namespace has no usable interface (not even loopback), an
  empty read-only tmpfs over ``/run``, ``/tmp`` and ``/var/tmp`` hides the host's Unix sockets
  bound to paths there (D-Bus, Docker, X11, ssh-agent: the network namespace does not cover
  them), and when the program exits or times out every process it started dies with the
  namespace.
  Directories on the interpreter's path that the sandbox uid could not traverse (e.g. ``/root``
  for a pyenv Python) are replaced by an empty tmpfs with the interpreter bind-mounted read-only.
* Host is not root and unprivileged user namespaces work: the same namespaces inside a new user
  namespace; the program keeps the host uid (mapped to itself), without capabilities.
* No namespaces at all (e.g. a container without ``CAP_SYS_ADMIN``, or user namespaces disabled):
  only a new session, rlimits and (as root) the per-run uid; the working directory is the host
  temp dir; network is refused by an audit hook in the child interpreter (defeatable with
  ``ctypes`` or a subprocess, so weak); after the run the process group and, as root, every process
  of the run's uid are killed. Processes that left the session survive as non-root. A warning is
  logged once.

Always: ``python -I -S`` (stdlib only, no site-packages, no ``PYTHON*`` variables), a scrubbed
environment (PATH, LANG/LC_ALL, HOME=TMPDIR=working dir, MALLOC_ARENA_MAX, nothing else),
wall-clock (`wall_time_s`), CPU (``RLIMIT_CPU``), address-space (``RLIMIT_AS``), file-size
(``RLIMIT_FSIZE``) and core-dump limits, stdout/stderr read incrementally and capped at
`max_output_bytes` each, and the host temp dir removed afterwards.

Caveats: `memory_mb` and `cpu_time_s` hold per process, so a run may use up to `max_processes` x
`memory_mb` of address space (plus two `disk_mb` tmpfs); there is no cgroup and no seccomp filter.
World-readable host files stay readable. Root inside a user namespace (rootless containers) is
treated as root and fails to switch uid: run those hosts as non-root. Off Linux only rlimits and
the audit hook apply. The wall clock includes ~50 ms of sandbox start-up.
"""
from __future__ import annotations

import json
import logging
import os
import random
import selectors
import shutil
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Sequence

logger = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "timeout", "memory", "error")

#: The interpreter the child runs: the real binary behind a venv's symlink (the venv itself adds
#: nothing under ``-I -S``) and the prefix holding its stdlib.
_PYTHON = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
_PREFIX = os.path.realpath(sys.base_prefix)

#: Per-run sandbox uids (= gids) are drawn from this range, far above any real account.
_UID_BASE, _UID_SPAN = 1_700_000_000, 1 << 24
_uids_in_use: set[int] = set()
_uid_lock = threading.Lock()
_warned = False
_USE_NAMESPACES = True    # tests switch this off to exercise the no-namespace fallback
_HIDE_SOCKET_DIRS = True  # tests switch this off to measure the layers beneath it

_TAIL_BYTES = 4096        # stderr tail kept for classification even when the head is capped
_TERM_GRACE_S = 2.0       # time the child's init gets to tear down after a timeout
_DRAIN_GRACE_S = 1.0      # time to wait for pipe EOF after the process is gone
_MEMORY_MARKERS = (b"MemoryError", b"Cannot allocate memory", b"out of memory",
                   b"std::bad_alloc", b"RecursionError: maximum recursion depth exceeded")


@dataclass(frozen=True)
class SandboxLimits:
    """Resource caps for one sandboxed run (per process or per run: see the module docstring)."""

    wall_time_s: float = 10.0
    cpu_time_s: float = 10.0       # per process, RLIMIT_CPU (rounded up to whole seconds)
    memory_mb: int = 1024          # per process address space, RLIMIT_AS
    max_processes: int = 16        # tasks of the run (threads count), RLIMIT_NPROC
    max_file_size_mb: int = 16     # RLIMIT_FSIZE
    max_output_bytes: int = 64_000  # stdout and stderr each capped at this, `truncated` set
    allow_network: bool = False
    disk_mb: int = 64              # size of the private tmpfs working dir (and of /dev/shm)

    def __post_init__(self) -> None:
        for name in ("wall_time_s", "cpu_time_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0 seconds; got "
                                 f"{getattr(self, name)!r}.")
        mins = {"memory_mb": 32, "max_processes": 1, "max_file_size_mb": 1,
                "max_output_bytes": 0, "disk_mb": 1}
        for name, low in mins.items():
            val = getattr(self, name)
            if not isinstance(val, int) or val < low:
                why = " (the interpreter alone needs ~30 MB)" if name == "memory_mb" else ""
                raise ValueError(f"SandboxLimits.{name} must be an int >= {low}{why}; got "
                                 f"{val!r}.")


@dataclass
class SandboxResult:
    """Outcome of one run; `status` is one of `STATUSES` (see `run_python` for the rules)."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    truncated: bool
    isolation: tuple[str, ...] = ()
    stdout_tail: str = ""          # the last 4 KB of stdout, even when `stdout` was capped

    @property
    def passed(self) -> bool:
        """True iff the program exited with status 0 within its limits."""
        return self.status == "passed"


def with_end_marker(program: str) -> tuple[str, str]:
    """`program` plus a last line that prints a fresh random marker, and the marker.

    A test program "passes" on exit status 0, which a completion can fake by exiting early
    (``sys.exit(0)``, ``os._exit(0)``) before the tests run: a reward hack. Such a run never
    reaches the last line, so `ran_to_the_end` refuses it. (A program could still read its own
    source to find the marker; see docs/sandbox-security.md.)
    """
    marker = f"__poise_end_{secrets.token_hex(16)}__"
    line = f"__import__('sys').stdout.write({marker!r} + '\\n'); __import__('sys').stdout.flush()"
    return f"{program}\n\n{line}\n", marker


def ran_to_the_end(result: SandboxResult, marker: str) -> bool:
    """Passed, and printed the marker of `with_end_marker`: the tests really ran."""
    return result.passed and marker in result.stdout_tail


# --- the child: poise_probe/sandbox_child.py, run as a script (see its docstring) ------
_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")


# --- the host side --------------------------------------------------------------------------


class _Capture:
    """Keeps the first `cap` bytes of a stream plus a short tail; counts the rest."""

    def __init__(self, cap: int):
        self.cap, self.total = cap, 0
        self.head, self.tail = bytearray(), bytearray()

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.cap - len(self.head)
        if room > 0:
            self.head += data[:room]
        self.tail = (self.tail + data[-_TAIL_BYTES:])[-_TAIL_BYTES:]

    @property
    def truncated(self) -> bool:
        return self.total > self.cap

    def text(self) -> str:
        return self.head.decode("utf-8", errors="replace")


def _child_env(workdir: str) -> dict[str, str]:
    """The only environment the program sees: nothing of the host's (no tokens, no keys)."""
    # Few malloc arenas: each thread's 64 MB arena reservation would eat RLIMIT_AS otherwise.
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": workdir, "TMPDIR": workdir, "MALLOC_ARENA_MAX": "2"}


def _pids_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is `uid`."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        fields = dict(line.split(b":", 1) for line in status.splitlines() if b":" in line)
        if int(fields[b"Uid"].split()[0]) == uid and not fields[b"State"].strip().startswith(b"Z"):
            pids.append(int(name))
    return pids


def _kill_uid(uid: int) -> bool:
    """SIGKILL every process of a per-run sandbox uid, race-free via pidfds; True when none left."""
    for attempt in range(50):
        pids = _pids_of_uid(uid)
        if not pids:
            return True
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:  # the pidfd pins the process: re-check that it is still one of ours
                with open(f"/proc/{pid}/status", "rb") as f:
                    mine = any(line.startswith(b"Uid:") and int(line.split()[1]) == uid
                               for line in f)
                if mine:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(fd)
        time.sleep(0.001 * attempt)
    logger.warning("sandbox uid %d still has processes after 50 kill rounds: %s", uid,
                   _pids_of_uid(uid))
    return False


def _claim_uid() -> int:
    """A per-run uid no process uses, so RLIMIT_NPROC and clean-up concern this run only."""
    with _uid_lock:
        for _ in range(64):
            uid = _UID_BASE + random.randrange(_UID_SPAN)
            if uid not in _uids_in_use and not _pids_of_uid(uid):
                _uids_in_use.add(uid)
                return uid
    raise RuntimeError("could not find a free sandbox uid in 64 draws; are old sandbox "
                       "processes still running?")


def _exited(pid: int) -> bool:
    """True once `pid` has terminated; does not reap it, so its pid (and group) stay ours."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _classify(wait_status: int, cpu_s: float, limits: SandboxLimits,
              stderr_tail: bytes) -> tuple[str, int]:
    """Status and returncode from a wait status (see `run_python`)."""
    rc = os.waitstatus_to_exitcode(wait_status)
    memory_hint = any(m in stderr_tail for m in _MEMORY_MARKERS)
    if rc == 0:
        return "passed", rc
    if rc > 0:
        return ("memory" if memory_hint else "failed"), rc
    sig = -rc
    cpu_cap = max(1, -(-limits.cpu_time_s // 1))
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= cpu_cap - 0.05):
        return "timeout", rc
    if sig == signal.SIGKILL:       # not the sandbox's (timeouts are above): the program's own
        return ("memory" if memory_hint else "failed"), rc
    if sig in (signal.SIGSEGV, signal.SIGBUS):
        return "memory", rc
    if sig == signal.SIGABRT and memory_hint:
        return "memory", rc
    return "error", rc


def run_python(code: str, *, stdin: str | None = None,
               limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` as ``__main__`` in the sandbox (see the module docstring) and classify it.

    Status rules, first match wins:
      "error"   the sandbox itself failed (bad setup, interpreter not startable, lost init);
      "timeout" wall clock over `wall_time_s` (the run is killed), or killed by SIGXCPU /
                by SIGKILL after using the CPU budget (`cpu_time_s`);
      "passed"  exit status 0;
      "memory"  nonzero exit with MemoryError (or "Cannot allocate memory") in the stderr tail,
                a Python stack overflow (RecursionError: maximum recursion depth exceeded),
                killed by SIGSEGV or SIGBUS (how C code fails under RLIMIT_AS; a C stack
                overflow too), or by SIGABRT or SIGKILL with such a message;
      "failed"  any other nonzero exit (an exception, a failed assert, ``sys.exit(1)``), or a
                SIGKILL the sandbox did not send (the program killed itself: under RLIMIT_AS
                memory runs out as MemoryError or SIGSEGV, not as the OOM killer's SIGKILL);
      "error"   killed by any other signal.
    """
    limits = limits or SandboxLimits()
    if not isinstance(code, str):
        raise TypeError(f"run_python needs the program as a str; got {type(code).__name__}.")
    root = os.geteuid() == 0
    uid = _claim_uid() if root else None
    workdir = tempfile.mkdtemp(prefix="poise_sbx_")
    try:
        return _run(code, stdin, limits, workdir, uid)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if uid is not None:
            with _uid_lock:
                _uids_in_use.discard(uid)


def _run(code: str, stdin: str | None, limits: SandboxLimits, workdir: str,
         uid: int | None) -> SandboxResult:
    """Start the child, feed stdin, capture output until exit or timeout, clean up, classify."""
    start = time.monotonic()
    try:
        proc, status_r = _start_child(code, stdin, limits, workdir, uid)
    except OSError as exc:
        return SandboxResult("error", None, "", f"sandbox could not start: {exc}",
                             time.monotonic() - start, False)
    io = _ChildIO(proc, status_r, stdin, limits.max_output_bytes)
    try:
        timed_out = not io.pump(start + limits.wall_time_s)
        duration = time.monotonic() - start
        if timed_out:
            if io.status_info().get("mode") == "ns":  # the init tears the namespace down
                os.kill(proc.pid, signal.SIGTERM)
                if not io.pump(time.monotonic() + _TERM_GRACE_S):
                    logger.warning("sandbox init did not stop within %.1fs of SIGTERM; killing "
                                   "it", _TERM_GRACE_S)
        # no-namespace runs can leave children in the session; harmless when the group is gone
        # (the unreaped leader holds the id)
        _killpg(proc.pid)
        try:
            _, wait_status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(wait_status)
        except ChildProcessError:  # someone else in this process reaped it (a waitpid(-1) loop)
            wait_status, usage, proc.returncode = None, None, -1
        if uid is not None and io.status_info().get("mode") != "ns":
            _kill_uid(uid)
        io.drain(time.monotonic() + _DRAIN_GRACE_S)
    finally:
        io.close()
    return _result(io.status_info(), timed_out, wait_status, usage, duration, limits, io.out,
                   io.err)


def _start_child(code: str, stdin: str | None, limits: SandboxLimits, workdir: str,
                 uid: int | None) -> tuple[subprocess.Popen, int]:
    """Write the program, start sandbox_child.py on it; returns (process, status pipe's read end)."""
    with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
        f.write(code)
    if uid is not None:  # only used without namespaces; the tmpfs hides this dir otherwise
        os.chown(workdir, uid, uid)
        os.chmod(workdir, 0o700)
    expose = [_PREFIX]  # the dirs the sandbox uid must be able to read: stdlib and binary
    if not _PYTHON.startswith(_PREFIX + os.sep):
        expose.append(os.path.dirname(_PYTHON))
    status_r, status_w = os.pipe()
    cfg = {"status_fd": status_w, "parent_pid": os.getpid(), "workdir": workdir, "uid": uid,
           "gid": uid, "python": _PYTHON, "expose": expose, "env": _child_env(workdir),
           "limits": asdict(limits), "namespaces": _USE_NAMESPACES,
           "hide_dirs": _HIDE_SOCKET_DIRS}
    try:
        proc = subprocess.Popen(
            [_PYTHON, "-I", "-S", "-B", _CHILD, json.dumps(cfg)],
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir,
            env=_child_env(workdir), start_new_session=True, pass_fds=(status_w,))
    except OSError:
        os.close(status_r)
        raise
    finally:
        os.close(status_w)
    return proc, status_r


class _ChildIO:
    """The child's pipes: stdin fed, stdout/stderr/status captured, one selector for all."""

    def __init__(self, proc: subprocess.Popen, status_r: int, stdin: str | None, cap: int):
        self.proc, self.status_r = proc, status_r
        self.out, self.err, self.status = _Capture(cap), _Capture(cap), _Capture(1 << 16)
        self.sel = selectors.DefaultSelector()
        self.sel.register(proc.stdout, selectors.EVENT_READ, self.out)
        self.sel.register(proc.stderr, selectors.EVENT_READ, self.err)
        self.sel.register(status_r, selectors.EVENT_READ, self.status)
        self.pending = memoryview(stdin.encode("utf-8")) if stdin is not None else None
        if proc.stdin is not None:
            os.set_blocking(proc.stdin.fileno(), False)
            self.sel.register(proc.stdin, selectors.EVENT_WRITE, None)
        try:
            self.pidfd = os.pidfd_open(proc.pid)
            self.sel.register(self.pidfd, selectors.EVENT_READ, "exit")
        except (AttributeError, OSError):
            self.pidfd = None

    def pump(self, until: float) -> bool:
        """Move data until the child's leader exits (True) or `until` passes (False)."""
        while not _exited(self.proc.pid):
            left = until - time.monotonic()
            if left <= 0:
                return False
            for key, _ in self.sel.select(min(left, 0.02) if self.pidfd is None else left):
                if key.data == "exit":
                    continue
                if key.data is None:
                    self._feed_stdin(key)
                    continue
                self._read(key)
        return True

    def _feed_stdin(self, key) -> None:
        try:
            n = os.write(key.fd, self.pending[:65536])
            self.pending = self.pending[n:]
        except BlockingIOError:
            return
        except OSError:  # the program stopped reading
            self.pending = self.pending[:0]
        if not self.pending:
            self.sel.unregister(key.fileobj)
            self._close_stdin()

    def _read(self, key) -> None:
        data = os.read(key.fd, 65536)
        if data:
            key.data.feed(data)
        else:
            self.sel.unregister(key.fileobj)

    def drain(self, until: float) -> None:
        """After the child is gone: read what its pipes still hold, until they close or `until`.
        The pipes close once every process holding them is gone."""
        captures = (self.out, self.err, self.status)
        for key in list(self.sel.get_map().values()):
            if key.data not in captures:
                self.sel.unregister(key.fileobj)
        self._close_stdin()
        while [k for k in self.sel.get_map().values() if k.data in captures]:
            left = until - time.monotonic()
            if left <= 0:
                break
            for key, _ in self.sel.select(left):
                if key.data in captures:
                    self._read(key)

    def status_info(self) -> dict:
        """The JSON lines the child wrote on the status pipe, merged."""
        merged: dict = {}
        for line in bytes(self.status.head).decode(errors="replace").splitlines():
            try:
                merged.update(json.loads(line))
            except json.JSONDecodeError:
                continue
        return merged

    def _close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def close(self) -> None:
        self.sel.close()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None and not f.closed:
                try:
                    f.close()
                except OSError:
                    pass
        os.close(self.status_r)
        if self.pidfd is not None:
            os.close(self.pidfd)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _result(info: dict, timed_out: bool, wait_status: int, usage, duration: float,
            limits: SandboxLimits, out: _Capture, err: _Capture) -> SandboxResult:
    """Turn what the child reported and how it ended into a `SandboxResult`."""
    global _warned
    isolation = tuple(info.get("isolation", ()))
    if info.get("mode") == "direct" and not _warned:
        _warned = True
        logger.warning("sandbox runs without namespaces (%s); enforced: %s", info.get("warning"),
                       ", ".join(isolation))
    stderr = err.text()
    truncated = out.truncated or err.truncated
    if "error" in info:
        return SandboxResult("error", None, out.text(), f"sandbox error: {info['error']}\n{stderr}",
                             duration, truncated, isolation)
    if timed_out:
        return SandboxResult("timeout", None, out.text(), stderr, duration, truncated, isolation)
    if info.get("mode") == "ns":
        if "exit" not in info:
            return SandboxResult("error", None, out.text(),
                                 f"sandbox error: the sandbox init ended without reporting the "
                                 f"program's exit\n{stderr}", duration, truncated, isolation)
        wait_status, cpu_s = info["exit"], info["cpu_s"]
    elif info.get("mode") == "direct" and wait_status is not None:
        cpu_s = usage.ru_utime + usage.ru_stime
    else:
        return SandboxResult("error", None, out.text(),
                             f"sandbox error: the sandbox ended before setting up "
                             f"(wait status {wait_status})\n{stderr}", duration, truncated,
                             isolation)
    status, rc = _classify(wait_status, cpu_s, limits, bytes(err.tail))
    return SandboxResult(status, rc, out.text(), stderr, duration, truncated, isolation,
                         bytes(out.tail).decode("utf-8", errors="replace"))


def run_many(codes: Sequence[str], *, stdins: Sequence[str | None] | None = None,
             limits: SandboxLimits | None = None,
             max_workers: int | None = None) -> list[SandboxResult]:
    """`run_python` over many programs in parallel threads (default: one per CPU), order kept."""
    codes = list(codes)
    stdins = [None] * len(codes) if stdins is None else list(stdins)
    if len(stdins) != len(codes):
        raise ValueError(f"run_many needs one stdin per program; got {len(stdins)} stdins for "
                         f"{len(codes)} programs (pass stdins=None for none).")
    if max_workers is not None and max_workers < 1:
        raise ValueError(f"max_workers must be >= 1; got {max_workers}.")
    if not codes:
        return []
    workers = min(len(codes), max_workers or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda cs: run_python(cs[0], stdin=cs[1], limits=limits),
                             zip(codes, stdins)))
