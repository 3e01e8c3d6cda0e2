"""Sandbox reliability: the two new status rules end to end, and escape or abuse attempts that
tests/test_sandbox.py does not try, each checked on the host afterwards.

Already covered in tests/test_sandbox.py, not repeated here: timeouts, the CPU limit, fork bombs,
the process cap, a fork+setsid daemon, memory bombs, RLIMIT_FSIZE, plain writes outside the
working directory, TCP to IPv4 loopback, signals to a host process, the output cap and the
no-namespace fallback.

Each program prints one JSON line describing what it tried and what the kernel answered; the test
checks that line and then the host itself (files, mounts, processes, sockets). Tests skip where the
sandbox on this platform lacks the isolation the attempt targets (see `needs`).
See docs/sandbox-security.md for the outcomes measured on the reference machine.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from poise_probe import sandbox
from poise_probe.sandbox import SandboxLimits, run_python

ROOT = os.geteuid() == 0
LIMITS = SandboxLimits(wall_time_s=30.0, cpu_time_s=5, memory_mb=256, max_processes=8)
#: for programs that must end on their own quickly: a stuck sandbox shows up as a timeout
SHORT = dataclasses.replace(LIMITS, wall_time_s=10.0)


@pytest.fixture(scope="module")
def isolation() -> tuple[str, ...]:
    """What the sandbox enforces here (root, namespaces), as the sandbox reports it."""
    res = run_python("pass", limits=LIMITS)
    assert res.passed, res
    return res.isolation


def needs(isolation, *features: str) -> None:
    missing = [f for f in features if f not in isolation]
    if missing:
        pytest.skip(f"this platform's sandbox lacks {missing} (enforced: {isolation})")


def sandbox_uid(isolation) -> int | None:
    return next((int(f[4:]) for f in isolation if f.startswith("uid=")), None)


def report(res) -> dict:
    """The JSON line a probe program printed last."""
    assert res.passed, res
    return json.loads(res.stdout.strip().splitlines()[-1])


def probe_prelude() -> str:
    """Helpers for the programs: `attempt(name, fn)` records None (it worked) or the errno."""
    return ("import ctypes, json, os, signal, socket, sys\n"
            "out = {}\n"
            "def attempt(name, fn):\n"
            "    try:\n"
            "        fn()\n"
            "        out[name] = None\n"
            "    except OSError as e:\n"
            "        out[name] = e.errno\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "def call(fn, *args):\n"
            "    if fn(*args) != 0:\n"
            "        e = ctypes.get_errno()\n"
            "        raise OSError(e, os.strerror(e))\n")


@pytest.fixture
def layers_beneath(monkeypatch):
    """The sandbox without its empty tmpfs over /run, /tmp and /var/tmp, so that a host folder
    made under /tmp is visible inside it: what the layers beneath (read-only remount, uid drop,
    namespaces) contain on their own."""
    monkeypatch.setattr(sandbox, "_HIDE_SOCKET_DIRS", False)


@pytest.fixture
def host_victim(layers_beneath):
    """A world-writable host folder holding a world-writable file: only the sandbox's read-only
    remount can stop a write to it (file permissions would not)."""
    folder = tempfile.mkdtemp(prefix="poise_victim_", dir="/tmp")
    os.chmod(folder, 0o777)
    victim = os.path.join(folder, "victim.txt")
    with open(victim, "w") as f:
        f.write("original")
    os.chmod(victim, 0o666)
    try:
        yield folder, victim
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def assert_victim_untouched(folder: str, victim: str) -> None:
    assert os.listdir(folder) == ["victim.txt"]
    with open(victim) as f:
        assert f.read() == "original"


def host_mounts() -> list[tuple[str, str]]:
    with open("/proc/self/mountinfo") as f:
        return sorted((line.split()[4], line.split()[5]) for line in f)


def processes_with_arg(arg: str) -> list[int]:
    """Host processes whose command line holds `arg`."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if arg.encode() in f.read().split(b"\0"):
                        found.append(int(name))
            except OSError:
                continue
    return found


# --- the status rules, end to end ------------------------------------------------------------

def test_self_sigkill_is_failed_not_memory():
    res = run_python("import os, signal\nprint('before', flush=True)\n"
                     "os.kill(os.getpid(), signal.SIGKILL)\nprint('after')", limits=LIMITS)
    assert (res.status, res.returncode, res.stdout) == ("failed", -signal.SIGKILL, "before\n"), res
    # the documented exception: a SIGKILL after a memory message stays "memory"
    res = run_python("import os, signal, sys\nsys.stderr.write('MemoryError\\n')\n"
                     "sys.stderr.flush()\nos.kill(os.getpid(), signal.SIGKILL)", limits=LIMITS)
    assert (res.status, res.returncode) == ("memory", -signal.SIGKILL), res


@pytest.mark.parametrize("code", [
    "def f(n):\n    return f(n + 1)\nf(0)",
    "import json\njson.loads('[' * 200000 + ']' * 200000)",       # recursion in C code
], ids=["python", "json-decoder"])
def test_infinite_recursion_is_memory(code):
    res = run_python(code, limits=LIMITS)
    assert (res.status, res.returncode) == ("memory", 1), res
    assert "RecursionError: maximum recursion depth exceeded" in res.stderr
    # control: a program that catches its RecursionError and exits 0 passes
    caught = run_python(f"try:\n    exec({code!r})\nexcept RecursionError:\n    print('caught')",
                        limits=LIMITS)
    assert caught.passed and caught.stdout == "caught\n", caught


# --- escape attempts --------------------------------------------------------------------------

def test_namespace_mount_and_ptrace_attempts_are_contained(isolation, host_victim):
    """ctypes: mount, a nested user+mount namespace as its root, remounts, ptrace of the init
    and of the host test process; host files and host mounts unchanged after."""
    needs(isolation, "mount-ns", "read-only-fs", "pid-ns")
    folder, victim = host_victim
    mounts = host_mounts()
    code = probe_prelude() + f"""
FOLDER, VICTIM, HOST_PID = {folder!r}, {victim!r}, {os.getpid()}
MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.ptrace.restype = ctypes.c_long
def write(path):
    with open(path, "w") as f:
        f.write("pwned")
attempt("mount_tmpfs", lambda: call(libc.mount, b"tmpfs", FOLDER.encode(), b"tmpfs", 0, None))
attempt("ptrace_init", lambda: call(libc.ptrace, 16, 1, None, None))          # PTRACE_ATTACH
attempt("ptrace_host", lambda: call(libc.ptrace, 16, HOST_PID, None, None))
attempt("open_init_mntns", lambda: os.close(os.open("/proc/1/ns/mnt", os.O_RDONLY)))
uid = os.getuid()
attempt("unshare_user_mnt", lambda: call(libc.unshare, 0x10000000 | 0x20000))
if out["unshare_user_mnt"] is None:        # become root of the new user namespace
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {{uid}} 1"),
                       ("gid_map", f"0 {{uid}} 1")):
        with open(f"/proc/self/{{name}}", "w") as f:
            f.write(text)
    out["uid_in_userns"] = os.getuid()
for target in ("/", "/tmp", FOLDER):
    attempt(f"remount_rw {{target}}",
            lambda: call(libc.mount, None, target.encode(), None, MS_REMOUNT | MS_BIND, None))
attempt("tmpfs_over_folder", lambda: call(libc.mount, b"tmpfs", FOLDER.encode(), b"tmpfs", 0,
                                          None))
if out["tmpfs_over_folder"] is None:       # private to its namespace: undo, try the real one
    write(os.path.join(FOLDER, "inside.txt"))
    call(libc.umount2, FOLDER.encode(), 2)
attempt("write_victim", lambda: write(VICTIM))
attempt("create_in_folder", lambda: write(os.path.join(FOLDER, "new.txt")))
attempt("ptrace_init_as_userns_root", lambda: call(libc.ptrace, 16, 1, None, None))
print(json.dumps(out))
"""
    out = report(run_python(code, limits=LIMITS))
    assert out["mount_tmpfs"] == errno.EPERM
    assert out["ptrace_init"] == errno.EPERM
    assert out["ptrace_host"] in (errno.ESRCH, errno.EPERM)      # ESRCH: not in its pid namespace
    assert out["open_init_mntns"] is not None
    for target in ("/", "/tmp", folder):
        assert out[f"remount_rw {target}"] is not None, (target, out)
    assert out["write_victim"] == errno.EROFS and out["create_in_folder"] == errno.EROFS, out
    assert out["ptrace_init_as_userns_root"] == errno.EPERM
    assert_victim_untouched(folder, victim)
    assert host_mounts() == mounts
    with open("/proc/self/status") as f:
        assert "\nTracerPid:\t0\n" in f.read()


def test_nested_user_namespace_does_not_lift_the_limits(isolation):
    """Root of a user namespace it made itself, the program still cannot raise a hard rlimit
    nor fork past `max_processes`."""
    needs(isolation, "rlimits")
    code = probe_prelude() + """
import resource, time
uid = os.getuid()
attempt("unshare_user", lambda: call(libc.unshare, 0x10000000))
if out["unshare_user"] is None:
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {uid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
out["uid"] = os.getuid()
for name in ("RLIMIT_NPROC", "RLIMIT_AS", "RLIMIT_NOFILE", "RLIMIT_CPU", "RLIMIT_FSIZE"):
    res = getattr(resource, name)
    try:
        resource.setrlimit(res, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        out[name] = "raised"
    except (ValueError, OSError):
        out[name] = "refused"
made = 0
for _ in range(40):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(5)
        os._exit(0)
    made += 1
out["forks"] = made
print(json.dumps(out))
"""
    out = report(run_python(code, limits=LIMITS))
    for name in ("RLIMIT_NPROC", "RLIMIT_AS", "RLIMIT_NOFILE", "RLIMIT_CPU", "RLIMIT_FSIZE"):
        assert out[name] == "refused", (name, out)
    assert out["forks"] < LIMITS.max_processes, out


@pytest.mark.skipif(not ROOT or shutil.which("setpriv") is None,
                    reason="needs root (to make a setuid-root binary) and setpriv")
def test_setuid_zero_is_refused(isolation, layers_beneath):
    """setuid/setresuid/setgid/setgroups to 0, and exec of a setuid-root copy of `id`."""
    needs(isolation, "no-new-privs")
    folder = tempfile.mkdtemp(prefix="poise_suid_", dir="/tmp")
    try:
        os.chmod(folder, 0o755)
        suid_id = os.path.join(folder, "id")
        shutil.copy(shutil.which("id"), suid_id)
        os.chown(suid_id, 0, 0)
        os.chmod(suid_id, 0o4755)
        # control: the setuid bit works on this filesystem for an ordinary uid outside
        ctl = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              suid_id, "-u"], capture_output=True, text=True)
        if ctl.stdout.strip() != "0":
            pytest.skip(f"setuid binaries do not work under {folder} here: {ctl}")
        code = probe_prelude() + f"""
import subprocess
for name, fn in (("setuid", lambda: os.setuid(0)), ("setresuid", lambda: os.setresuid(0, 0, 0)),
                 ("setgid", lambda: os.setgid(0)), ("setgroups", lambda: os.setgroups([0]))):
    attempt(name, fn)
out["uid"] = os.getuid()
out["suid_id"] = subprocess.run([{suid_id!r}, "-u"], capture_output=True, text=True).stdout.strip()
print(json.dumps(out))
"""
        res = run_python(code, limits=LIMITS)
        out = report(res)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for name in ("setuid", "setresuid", "setgid", "setgroups"):
        assert out[name] == errno.EPERM, (name, out)
    assert out["uid"] != 0 and out["suid_id"] == str(out["uid"]), out
    if sandbox_uid(res.isolation) is not None:    # the run's own uid, drawn per run
        assert out["uid"] == sandbox_uid(res.isolation)


def test_symlink_and_hardlink_out_of_the_workdir(isolation, host_victim):
    """Links made in the working directory to a world-writable host file and folder: writing
    through them fails, the host file stays as it was."""
    needs(isolation, "read-only-fs", "private-tmpfs-workdir")
    folder, victim = host_victim
    code = probe_prelude() + f"""
FOLDER, VICTIM = {folder!r}, {victim!r}
os.symlink(VICTIM, "file_link")
os.symlink(FOLDER, "dir_link")
def write(path, mode="w"):
    with open(path, mode) as f:
        f.write("pwned")
attempt("write_via_file_link", lambda: write("file_link"))
attempt("append_via_file_link", lambda: write("file_link", "a"))
attempt("create_via_dir_link", lambda: write("dir_link/new.txt"))
attempt("hardlink", lambda: os.link(VICTIM, "hard"))
attempt("rename_into_host", lambda: (write("mine.txt"), os.rename("mine.txt", "dir_link/x.txt")))
attempt("unlink_via_dir_link", lambda: os.unlink("dir_link/victim.txt"))
out["cwd_is_link_target"] = os.path.realpath("file_link") == VICTIM
print(json.dumps(out))
"""
    out = report(run_python(code, limits=LIMITS))
    assert out["cwd_is_link_target"]             # the links do point at the host file
    for name in ("write_via_file_link", "append_via_file_link", "create_via_dir_link",
                 "unlink_via_dir_link"):
        assert out[name] == errno.EROFS, (name, out)
    assert out["hardlink"] in (errno.EXDEV, errno.EROFS), out
    assert out["rename_into_host"] in (errno.EXDEV, errno.EROFS), out
    assert_victim_untouched(folder, victim)


def test_killing_its_parent_does_not_corrupt_the_verdict(isolation):
    """SIGSTOP/SIGTERM/SIGKILL to its parent (the sandbox's init) and to every process it may
    signal (kill -1): the program carries on and its own exit status is what is reported.
    (That host processes survive is tests/test_sandbox.py::test_cannot_signal_host_processes.)"""
    needs(isolation, "pid-ns")
    code = probe_prelude() + """
out["ppid"] = os.getppid()
for sig in (signal.SIGSTOP, signal.SIGTERM, signal.SIGKILL):
    attempt(f"parent {sig.name}", lambda: os.kill(os.getppid(), sig))
    attempt(f"all {sig.name}", lambda: os.kill(-1, sig))
print(json.dumps(out))
sys.exit(7)
"""
    res = run_python(code, limits=SHORT)
    # a stopped or killed init would show as "timeout" or "error"; a lost exit status as another rc
    assert (res.status, res.returncode) == ("failed", 7), res
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["ppid"] == 1, out           # its parent is the namespace's init, not a host process
    assert run_python("print('next')", limits=SHORT).stdout == "next\n"


def test_fd_exhaustion_stays_in_the_program(isolation):
    needs(isolation, "rlimits")
    code = probe_prelude() + """
import resource
fds = []
try:
    while True:
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError as e:
    out["errno"] = e.errno
out["opened"] = len(fds)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
out["limit"] = [soft, hard]
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard + 1, hard + 1))
    out["raise"] = "raised"
except (ValueError, OSError):
    out["raise"] = "refused"
for fd in fds:
    os.close(fd)
print(json.dumps(out))
"""
    out = report(run_python(code, limits=LIMITS))
    assert out["errno"] == errno.EMFILE, out
    assert 0 < out["opened"] <= out["limit"][0] and out["raise"] == "refused", out
    # the host still opens files and pipes, and runs the next program
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert run_python("print('next')", limits=LIMITS).stdout == "next\n"


def test_disk_exhaustion_stops_at_disk_mb(isolation):
    """Writing past `disk_mb` in many files (each under the file-size cap) stops with ENOSPC, in
    the working directory and in /dev/shm; inodes run out too; nothing reaches the host."""
    needs(isolation, "private-tmpfs-workdir")
    limits = dataclasses.replace(LIMITS, disk_mb=8, max_file_size_mb=16)
    tag = secrets.token_hex(6)
    code = probe_prelude() + f"""
chunk = b"x" * (1 << 20)
def fill(prefix):
    written = 0
    try:
        for i in range(1000):
            with open(f"{{prefix}}{{i}}", "wb") as f:
                f.write(chunk)
                f.write(chunk)
            written += 2
    except OSError as e:
        return written, e.errno
    return written, None
out["work_mb"], out["work_errno"] = fill("fill_")
st = os.statvfs(".")
out["work_size_mb"] = st.f_blocks * st.f_frsize >> 20
out["shm_mb"], out["shm_errno"] = fill("/dev/shm/poise_{tag}_")
for name in os.listdir("."):
    if name.startswith("fill_"):
        os.unlink(name)
n = 0
try:
    while True:
        open(f"i{{n}}", "w").close()
        n += 1
except OSError as e:
    out["inodes"], out["inode_errno"] = n, e.errno
print(json.dumps(out))
"""
    res = run_python(code, limits=limits)
    out = report(res)
    assert out["work_size_mb"] == limits.disk_mb, out
    assert out["work_errno"] == errno.ENOSPC and out["work_mb"] <= limits.disk_mb, out
    assert out["shm_errno"] == errno.ENOSPC and out["shm_mb"] <= limits.disk_mb, out
    assert out["inode_errno"] == errno.ENOSPC and out["inodes"] <= 16384, out
    if os.path.isdir("/dev/shm"):
        assert not [n for n in os.listdir("/dev/shm") if tag in n]


def test_double_fork_daemon_does_not_survive_the_run(isolation):
    """A daemon that double-forks, ignores SIGTERM/SIGHUP, holds the output pipes and execs
    `sleep`: the run ends at once and no such process is left on the host. (A plain fork+setsid
    daemon: tests/test_sandbox.py::test_escaped_daemon_does_not_outlive_the_run.)"""
    needs(isolation, "pid-ns")
    sleep = shutil.which("sleep")
    if sleep is None:
        pytest.skip("no sleep binary")
    marker = f"{97 + secrets.randbelow(10**6) / 10**7:.7f}"    # a unique sleep duration, ~97 s
    # control: the host scan finds such a process when it does live
    ctl = subprocess.Popen([sleep, marker])
    try:
        deadline = time.monotonic() + 5
        while not processes_with_arg(marker) and time.monotonic() < deadline:
            time.sleep(0.01)     # until the child has exec'd sleep
        assert processes_with_arg(marker) == [ctl.pid]
    finally:
        ctl.kill()
        ctl.wait()
    code = f"""
import os, signal
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        os.execv({sleep!r}, ["sleep", {marker!r}])
    os._exit(0)
os.wait()
print("launched", flush=True)
"""
    res = run_python(code, limits=SHORT)
    assert res.passed and res.stdout == "launched\n", res
    assert res.duration_s < 5, res              # not held open by the daemon's copy of stdout
    assert processes_with_arg(marker) == []
    uid = sandbox_uid(res.isolation)
    if uid is not None:
        assert sandbox._pids_of_uid(uid) == []


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_udp_ipv6_and_abstract_sockets_do_not_reach_the_host(isolation):
    """UDP over IPv4 and IPv6, TCP over IPv6, an abstract Unix socket, raw and packet sockets:
    all refused, and the host listeners receive nothing; with `allow_network` the same UDP
    datagrams do arrive (so the check can see them).
    (TCP to IPv4 loopback: tests/test_sandbox.py::test_network_is_unreachable.)"""
    needs(isolation, "net-ns")
    v6 = _ipv6_loopback()
    tag = secrets.token_hex(6)
    listeners = []
    def listen(family, kind, addr):
        s = socket.socket(family, kind)
        listeners.append(s)
        s.bind(addr)
        if kind == socket.SOCK_STREAM:
            s.listen(4)
        s.settimeout(0.3)
        return s
    try:
        udp4 = listen(socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 0))
        abstract = listen(socket.AF_UNIX, socket.SOCK_STREAM, f"\0poise_{tag}")
        udp6 = listen(socket.AF_INET6, socket.SOCK_DGRAM, ("::1", 0)) if v6 else None
        tcp6 = listen(socket.AF_INET6, socket.SOCK_STREAM, ("::1", 0)) if v6 else None
        code = probe_prelude() + f"""
def send(family, addr):
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.sendto(b"{tag}", addr)
def connect(family, addr):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        s.connect(addr)
        s.sendall(b"{tag}")
attempt("udp4", lambda: send(socket.AF_INET, ("127.0.0.1", {udp4.getsockname()[1]})))
if {v6}:
    attempt("udp6", lambda: send(socket.AF_INET6, ("::1", {udp6.getsockname()[1] if v6 else 0})))
    attempt("tcp6", lambda: connect(socket.AF_INET6, ("::1", {tcp6.getsockname()[1] if v6 else 0})))
attempt("abstract_unix", lambda: connect(socket.AF_UNIX, "\\0poise_{tag}"))
attempt("raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close())
attempt("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close())
print(json.dumps(out))
"""
        out = report(run_python(code, limits=LIMITS))
        tried = ["udp4", "abstract_unix", "raw", "packet"] + (["udp6", "tcp6"] if v6 else [])
        for name in tried:
            assert out[name] is not None, (name, out)
        for s in (udp4, udp6):
            if s is not None:
                with pytest.raises(socket.timeout):
                    s.recvfrom(100)
        for s in (abstract, tcp6):
            if s is not None:
                with pytest.raises(socket.timeout):
                    s.accept()
        # control: with networking allowed the datagrams arrive
        allowed = report(run_python(code, limits=dataclasses.replace(LIMITS,
                                                                     allow_network=True)))
        assert allowed["udp4"] is None and udp4.recvfrom(100)[0] == tag.encode(), allowed
        if v6:
            assert allowed["udp6"] is None and udp6.recvfrom(100)[0] == tag.encode(), allowed
    finally:
        for s in listeners:
            s.close()


def _host_socket_reached(folder: str) -> tuple[dict, bool]:
    """A world-writable Unix socket in host `folder`; whether a sandboxed connect reaches it."""
    path = os.path.join(folder, "s")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(path)
        os.chmod(path, 0o666)
        srv.listen(1)
        srv.settimeout(0.3)
        code = probe_prelude() + f"""
def connect():
    with socket.socket(socket.AF_UNIX) as s:
        s.connect({path!r})
        s.sendall(b"hello host")
attempt("connect", connect)
print(json.dumps(out))
"""
        out = report(run_python(code, limits=LIMITS))
        try:
            conn, _ = srv.accept()
            conn.close()
            return out, True
        except socket.timeout:
            return out, False
    finally:
        srv.close()


@pytest.mark.parametrize("where", ["/tmp", "/run"])
def test_host_unix_sockets_in_tmp_and_run_are_not_reachable(isolation, where):
    """The network namespace does not cover Unix sockets bound to a path and connect() works on
    a read-only mount, so the sandbox lays an empty tmpfs over /run, /tmp and /var/tmp, where
    hosts keep them (D-Bus, Docker, X11, ssh-agent)."""
    needs(isolation, "net-ns", "hidden-socket-dirs")
    if not os.access(where, os.W_OK):
        pytest.skip(f"cannot make a test socket in {where}")
    folder = tempfile.mkdtemp(prefix="poise_sock_", dir=where)
    try:
        os.chmod(folder, 0o755)
        out, reached = _host_socket_reached(folder)
        assert out["connect"] == errno.ENOENT and not reached, out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.xfail(strict=True, reason="known gap, documented: a world-writable socket outside "
                   "the hidden folders (say in a home folder open to all) stays reachable; "
                   "the layers beneath the tmpfs do not stop connect() (seccomp would)")
def test_host_unix_socket_outside_the_hidden_folders(isolation, layers_beneath):
    needs(isolation, "net-ns", "read-only-fs")
    folder = tempfile.mkdtemp(prefix="poise_sock_", dir="/tmp")
    try:
        os.chmod(folder, 0o755)
        out, reached = _host_socket_reached(folder)
        assert out["connect"] is not None and not reached, out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- reward hacking: exiting 0 before the tests run --------------------------------------------

EARLY_EXITS = ["import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit(0)",
               "def f(x):\n    raise SystemExit(0)\nf(1)"]


@pytest.mark.parametrize("completion", EARLY_EXITS)
def test_an_early_exit_0_does_not_pass_humaneval(completion):
    """A completion that exits 0 before `check(...)` runs scores 0 (both score paths); the
    canonical solution still scores 1."""
    from poise_probe.tasks.humaneval import HumanEvalTask, load_problems

    problem = next(p for p in load_problems() if p["task_id"] == "HumanEval/79")
    task, ex = HumanEvalTask(timeout_s=5.0), HumanEvalTask.to_example(problem)
    hack = f"<answer>```python\n{completion}\n```</answer>"
    assert task.score(hack, ex) == 0.0
    assert task.score_many([hack, problem["canonical_solution"]], [ex, ex]) == [0.0, 1.0]


def test_an_early_exit_0_does_not_pass_a_file_task_test_program(tmp_path):
    import json

    from poise_probe.tasks.files import FileTask

    row = {"data_source": "t", "prompt": [{"role": "user", "content": "write dbl"}],
           "ability": "code", "reward_model": {"style": "rule", "ground_truth":
                                               "def check(c):\n    assert c(2) == 4\n"},
           "extra_info": {"index": 0, "entry_point": "dbl"}}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    task = FileTask(str(path))
    ex = task.examples[0]
    good = "<answer>```python\ndef dbl(x):\n    return 2 * x\n```</answer>"
    hack = "<answer>```python\nimport sys; sys.exit(0)\n```</answer>"
    assert task.score(good, ex) == 1.0 and task.score(hack, ex) == 0.0
    assert task.score_many([hack, good], [ex, ex]) == [0.0, 1.0]
