"""Sandbox: normal programs get the right status; hostile ones stay contained, the host unharmed."""
from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import tracemalloc

import pytest

from poise_probe import sandbox
from poise_probe.sandbox import SandboxLimits, run_many, run_python

ROOT = os.geteuid() == 0
# FAST: runs the wall clock must stop. LIMITS: runs that end on their own or by another limit;
# its wall clock is long enough never to decide them, however busy the machine.
FAST = SandboxLimits(wall_time_s=1.0, cpu_time_s=5, memory_mb=256, max_processes=8)
LIMITS = dataclasses.replace(FAST, wall_time_s=30.0)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def isolation() -> tuple[str, ...]:
    """What the sandbox enforces on this machine (depends on root and namespaces)."""
    res = run_python("pass", limits=LIMITS)
    assert res.passed, res
    return res.isolation


def needs(isolation, feature: str) -> None:
    if feature not in isolation:
        pytest.skip(f"this platform's sandbox lacks {feature!r} (enforced: {isolation})")


def sandbox_uid(isolation) -> int | None:
    """The run's dedicated uid as reported, when the host is root."""
    return next((int(f[4:]) for f in isolation if f.startswith("uid=")), None)


def my_children() -> set[int]:
    """Host processes (zombies included) whose parent is this test process."""
    me, kids = os.getpid(), set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    if f"\nPPid:\t{me}\n" in f.read():
                        kids.add(int(name))
            except OSError:
                continue
    return kids


def assert_host_clean(res, kids_before: set[int]) -> None:
    """No process of the run is left: none of its uid, no child (or zombie) of ours."""
    uid = sandbox_uid(res.isolation)
    if uid is not None:
        assert sandbox._pids_of_uid(uid) == []
    assert my_children() <= kids_before
    assert subprocess.run(["true"]).returncode == 0  # the host can still spawn processes


# --- normal programs ------------------------------------------------------------------------

def test_passed_failed_and_exit_codes():
    ok = run_python("import json, math, collections, hashlib, re\nprint(math.factorial(5))",
                    limits=LIMITS)
    assert (ok.status, ok.returncode, ok.stdout, ok.passed) == ("passed", 0, "120\n", True)
    boom = run_python("raise ValueError('boom')", limits=LIMITS)
    assert (boom.status, boom.returncode, boom.passed) == ("failed", 1, False)
    assert "ValueError: boom" in boom.stderr
    assert run_python("assert 1 == 2", limits=LIMITS).status == "failed"
    three = run_python("import sys; sys.exit(3)", limits=LIMITS)
    assert (three.status, three.returncode) == ("failed", 3)
    syntax = run_python("def f(:\n", limits=LIMITS)
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr


def test_stdin_is_fed():
    res = run_python("import sys; print(sys.stdin.read().upper(), end='')", stdin="hello\nworld",
                     limits=LIMITS)
    assert res.passed and res.stdout == "HELLO\nWORLD"
    big = "x" * 1_000_000  # more than a pipe buffer: written while the program reads
    res = run_python("import sys; print(len(sys.stdin.read()))", stdin=big, limits=LIMITS)
    assert res.stdout == "1000000\n"
    assert run_python("import sys; print(repr(sys.stdin.read()))", limits=LIMITS).stdout == "''\n"


def test_workdir_is_fresh_writable_and_removed():
    res = run_python("import os\nopen('scratch.txt', 'w').write('hi')\nprint(os.getcwd())\n"
                     "print(os.environ['HOME'])\nprint(sorted(os.listdir('.')))", limits=LIMITS)
    assert res.passed, res
    cwd, home, listing = res.stdout.splitlines()
    assert home == cwd and listing == "['main.py', 'scratch.txt']"
    assert not os.path.exists(cwd)


def test_host_environment_is_not_visible(monkeypatch):
    token = secrets.token_hex(16)
    monkeypatch.setenv("POISE_TEST_SECRET", token)
    code = ("import os\nprint(dict(os.environ))\n"
            f"try:\n    print(open('/proc/{os.getpid()}/environ', 'rb').read())\n"
            "except OSError as e:\n    print(type(e).__name__)\n")
    res = run_python(code, limits=LIMITS)
    assert res.passed, res
    assert token not in res.stdout
    env = eval(res.stdout.splitlines()[0])
    assert set(env) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "MALLOC_ARENA_MAX"}


def stamp_program(i: int, sleep_s: float) -> str:
    """A program that prints its index and when it started and ended (the host's real-time
    clock: the sandbox has no time namespace)."""
    return (f"import time\nstart = time.time()\ntime.sleep({sleep_s})\n"
            f"print({i}, start, time.time())")


def read_spans(results) -> list[tuple[float, float]]:
    rows = [r.stdout.split() for r in results]
    assert [int(row[0]) for row in rows] == list(range(len(rows))), rows   # order kept
    return [(float(row[1]), float(row[2])) for row in rows]


def test_run_many_is_parallel_and_keeps_order():
    results = run_many([stamp_program(i, 1.5) for i in range(4)], limits=LIMITS, max_workers=4)
    assert all(r.passed for r in results), results
    spans = read_spans(results)
    # all four ran at once: the last to start started before the first to end ended
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans
    # control: one worker runs them one after another, which the same check tells apart
    (_, first_end), (second_start, _) = read_spans(
        run_many([stamp_program(i, 0) for i in range(2)], limits=LIMITS, max_workers=1))
    assert first_end <= second_start
    outs = run_many(["import sys; print(sys.stdin.read()[::-1])"] * 3, stdins=["ab", "cd", "ef"],
                    limits=LIMITS)
    assert [r.stdout for r in outs] == ["ba\n", "dc\n", "fe\n"]
    assert run_many([]) == []


def test_run_many_rejects_misaligned_stdins():
    with pytest.raises(ValueError, match="one stdin per program"):
        run_many(["pass", "pass"], stdins=["x"])


@pytest.mark.parametrize("field, value", [("memory_mb", 0), ("max_processes", 0),
                                          ("wall_time_s", 0), ("cpu_time_s", -1),
                                          ("max_output_bytes", -5)])
def test_limits_reject_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        SandboxLimits(**{field: value})


# --- hostile programs -----------------------------------------------------------------------

def stopped_by_the_wall_clock(res, limits: SandboxLimits) -> bool:
    """The sandbox killed the run at its wall-clock limit: no exit status of the program's own,
    and the sandbox's own clock ran to the limit (it was not stopped early for another reason)."""
    return res.status == "timeout" and res.returncode is None and \
        res.duration_s >= limits.wall_time_s


@pytest.mark.parametrize("code", ["while True:\n    pass", "import time\ntime.sleep(60)"],
                         ids=["busy", "sleeping"])
def test_infinite_loop_times_out_and_is_killed(code):
    kids = my_children()
    res = run_python("print('started', flush=True)\n" + code, limits=FAST)
    assert stopped_by_the_wall_clock(res, FAST) and not res.passed, res
    assert res.stdout == "started\n"
    assert_host_clean(res, kids)                      # killed, and every process of it gone


def test_cpu_limit_stops_a_spinning_program():
    limits = SandboxLimits(wall_time_s=60, cpu_time_s=1)
    res = run_python("while True:\n    pass", limits=limits)
    # stopped by the kernel's RLIMIT_CPU signal, long before the wall clock would have
    assert res.status == "timeout" and res.returncode in (-signal.SIGXCPU, -signal.SIGKILL), res


def test_fork_bomb_is_contained(isolation):
    kids = my_children()
    bomb = ("import os\nwhile True:\n    try:\n        os.fork()\n"
            "    except OSError:\n        pass\n")
    res = run_python(bomb, limits=FAST)
    assert stopped_by_the_wall_clock(res, FAST), res
    assert_host_clean(res, kids)


def test_process_count_is_capped():
    code = ("import os, time\nmade = 0\nfor _ in range(30):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(5)\n"
            "        os._exit(0)\n    made += 1\nprint(made)\n")
    res = run_python(code, limits=LIMITS)
    assert res.passed, res
    assert int(res.stdout) < LIMITS.max_processes  # the program itself is one of them


def test_escaped_daemon_does_not_outlive_the_run(isolation):
    needs(isolation, "pid-ns")
    kids = my_children()
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
            "    os._exit(0)\nprint('parent done')\n")
    res = run_python(code, limits=LIMITS)
    assert res.passed and res.stdout == "parent done\n"
    assert_host_clean(res, kids)


@pytest.mark.parametrize("code", ["x = []\nwhile True:\n    x.append(bytearray(10**7))",
                                  "x = bytearray(10**11)"], ids=["growing", "one-shot"])
def test_memory_bomb(code):
    kids = my_children()
    res = run_python(code, limits=LIMITS)
    assert res.status == "memory", res
    assert_host_clean(res, kids)


def test_file_size_limit():
    res = run_python("open('big', 'wb').write(b'x' * 3_000_000)",
                     limits=SandboxLimits(max_file_size_mb=1))
    assert res.status == "failed" and "File too large" in res.stderr


def test_writes_outside_the_workdir_fail(isolation):
    needs(isolation, "read-only-fs")
    tag = secrets.token_hex(6)
    targets = [f"/tmp/poise_outside_{tag}", os.path.join(REPO, f"poise_outside_{tag}"),
               f"/var/tmp/poise_outside_{tag}"]
    shm = f"/dev/shm/poise_outside_{tag}"  # private tmpfs inside: may succeed, never visible here
    code = (f"for p in {targets + [shm]!r}:\n    try:\n        open(p, 'w').write('pwned')\n"
            "        print('wrote', p)\n    except OSError as e:\n"
            "        print('denied', p, e.errno)\n")
    try:
        res = run_python(code, limits=LIMITS)
        assert res.passed, res
        for p in targets:
            assert f"denied {p}" in res.stdout
        for p in targets + [shm]:
            assert not os.path.exists(p)
    finally:
        for p in targets + [shm]:
            if os.path.exists(p):
                os.unlink(p)


def test_network_is_unreachable(isolation):
    needs(isolation, "net-ns")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    code = ("import socket\ntry:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    print('connected')\nexcept OSError as e:\n    print('blocked', e.errno)\n")
    try:
        res = run_python(code, limits=LIMITS)
        assert res.passed and res.stdout.startswith("blocked"), res
        with pytest.raises(socket.timeout):
            listener.accept()
        # Control: the same program with networking allowed does reach the listener.
        res = run_python(code, limits=SandboxLimits(wall_time_s=5, allow_network=True))
        assert res.stdout == "connected\n", res
        conn, _ = listener.accept()
        conn.close()
    finally:
        listener.close()


def test_cannot_signal_host_processes():
    victim = subprocess.Popen(["sleep", "30"])
    try:
        code = ("import os, signal\n"
                f"for pid in (os.getppid(), 1, {os.getpid()}, {victim.pid}):\n"
                "    for send in (os.kill, os.killpg):\n"
                "        try:\n            send(pid, signal.SIGKILL)\n"
                "        except OSError as e:\n            print(type(e).__name__)\n"
                "os.kill(-1, signal.SIGKILL)\n")  # every process it may signal: only its own
        res = run_python(code, limits=LIMITS)
        assert res.status in ("passed", "failed", "memory"), res  # it may well kill itself
        time.sleep(0.1)
        assert victim.poll() is None, "the sandboxed program killed a host process"
        os.kill(os.getpid(), 0)  # still here
    finally:
        victim.kill()
        victim.wait()


def test_output_is_capped_without_buffering_it_all():
    code = ("import sys\nchunk = 'x' * 1_000_000\nfor _ in range(20):\n"
            "    sys.stdout.write(chunk)\n    sys.stderr.write(chunk)\n")
    tracemalloc.start()
    try:
        res = run_python(code, limits=SandboxLimits(wall_time_s=10, max_output_bytes=10_000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.passed and res.truncated
    assert len(res.stdout) == len(res.stderr) == 10_000
    assert peak < 5_000_000, f"host buffered {peak} bytes for 40 MB of output"
    small = run_python("print('ok')", limits=LIMITS)
    assert not small.truncated


# --- classification and platform ------------------------------------------------------------

@pytest.mark.parametrize("wait_status, cpu_s, tail, expected", [
    (0, 0.1, b"", "passed"),
    (1 << 8, 0.1, b"ValueError: x\n", "failed"),
    (1 << 8, 0.1, b"Traceback...\nMemoryError\n", "memory"),
    (signal.SIGKILL, 0.1, b"", "failed"),     # not ours: the program killed itself
    (signal.SIGKILL, 0.1, b"MemoryError\n", "memory"),
    (1 << 8, 0.1, b"RecursionError: maximum recursion depth exceeded\n", "memory"),
    (signal.SIGKILL, 5.0, b"", "timeout"),    # the CPU hard limit
    (signal.SIGXCPU, 5.0, b"", "timeout"),
    (signal.SIGSEGV, 0.1, b"", "memory"),
    (signal.SIGTERM, 0.1, b"", "error"),
    (signal.SIGABRT, 0.1, b"", "error"),
])
def test_classify(wait_status, cpu_s, tail, expected):
    limits = SandboxLimits(cpu_time_s=5)
    assert sandbox._classify(wait_status, cpu_s, limits, tail)[0] == expected


@pytest.mark.skipif(not ROOT or shutil.which("unshare") is None, reason="needs root and unshare")
def test_full_isolation_where_the_platform_allows_it(isolation):
    """As root with namespaces available, nothing may silently fall back."""
    probe = subprocess.run(["unshare", "--mount", "--net", "--pid", "--ipc", "--fork", "true"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"namespaces unavailable here: {probe.stderr.decode().strip()}")
    for feature in ("mount-ns", "read-only-fs", "private-tmpfs-workdir", "pid-ns", "net-ns",
                    "rlimits", "no-new-privs"):
        assert feature in isolation
    assert sandbox_uid(isolation) is not None


def test_fallback_without_namespaces(monkeypatch):
    """Without namespaces the run still works (or, as root with an interpreter other uids cannot
    read, fails with a clear error) and network is refused by the audit hook."""
    monkeypatch.setattr(sandbox, "_USE_NAMESPACES", False)
    code = ("import socket\ntry:\n    socket.socket()\n"
            "except PermissionError:\n    print('no net')\n")
    res = run_python(code, limits=LIMITS)
    if res.status == "error":
        assert ROOT and "readable by all" in res.stderr
        return
    assert res.passed and res.stdout == "no net\n"
    assert "audit-hook-net" in res.isolation and "net-ns" not in res.isolation
    assert run_python("while True:\n    pass", limits=FAST).status == "timeout"


def test_the_child_program_is_a_module_of_its_own():
    """The child is code, not a string: importable (its main does not run on import), standard
    library only, and the very file the host starts."""
    import ast
    import importlib

    from poise_probe import sandbox

    child = importlib.import_module("poise_probe.sandbox_child")
    assert callable(child.namespaced) and callable(child.direct) and "addaudithook" in child.GUARD
    assert sandbox._CHILD == child.__file__ and not hasattr(sandbox, "_BOOT")
    tree = ast.parse(open(child.__file__).read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
