"""The sandbox's child program: run as `python -I -S -B sandbox_child.py <json>` by
`poise_probe.sandbox.run_python`, in a new session, never imported by the package.

As "B" (still root if the host is) it unshares namespaces and locks the filesystem, then forks
"C", PID 1 of the new PID namespace, which mounts a fresh /proc and forks "D": D applies rlimits,
drops to the sandbox uid and execs the program. C reaps everything, reports D's wait status on
the status pipe and exits, which kills whatever is left in the namespace. B waits for C; SIGTERM
to B (the host's timeout) kills C. Setup errors go to the status pipe as {"error": ...}; the pipe
is close-on-exec, so D's exec closes its copy. Standard library only (`-I -S`: no site-packages).
`GUARD` stays a string: it is the program the sandboxed interpreter runs with `-c` after the
filesystem is locked, when this file may no longer be readable.
"""
import ctypes, errno, json, os, resource, signal, sys

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                       ctypes.c_char_p]
if hasattr(libc, "prctl"):
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
NEWNS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
KEPT = {"nosuid": NOSUID, "nodev": NODEV, "noexec": NOEXEC, "noatime": 1024,
        "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24}
PSEUDO = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "mqueue", "debugfs",
          "tracefs", "securityfs", "pstore", "bpf", "configfs", "fusectl", "binfmt_misc",
          "hugetlbfs", "autofs", "efivarfs", "nsfs", "rpc_pipefs", "selinuxfs"}
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
GUARD = """
import sys
def _guard(event, args):
    if (event == "socket.__new__" and args[1] != 1) or (
            event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg")
            and not isinstance(args[1], (str, bytes))):
        raise PermissionError("network access is disabled in this sandbox")
sys.addaudithook(_guard)
del _guard
import runpy
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""


def report(**kw):
    os.write(STATUS, (json.dumps(kw) + "\n").encode())


def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else os.fsencode(s)
    check(libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def unescape(field):
    raw, out, i = os.fsencode(field), bytearray(), 0
    while i < len(raw):
        if raw[i] == 92 and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def lock_filesystem(probe_dir):
    """Every writable mount read-only (in our namespace only), skipping kernel pseudo-fs."""
    mount(None, "/", None, REC | PRIVATE)
    rows = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            rows.append((parts[0], parts[1], unescape(parts[4]), parts[5].split(","),
                         parts[parts.index("-") + 1]))
    stacked = {(parent, point) for _, parent, point, _, _ in rows}
    for mid, _, point, opts, fstype in rows:
        if (mid, point) in stacked or fstype in PSEUDO or "ro" in opts:
            continue  # covered by a mount on top, or nothing to do
        flags = REMOUNT | BIND | RDONLY
        for name, bit in KEPT.items():
            if name in opts:
                flags |= bit
        try:
            mount(None, point, None, flags)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: hidden under a mount higher up
                raise
    try:  # self-check where the host's temp dirs live: this must now fail
        fd = os.open(os.path.join(probe_dir, f".poise_rw_check_{os.getpid()}"),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return
    os.close(fd)
    os.unlink(os.path.join(probe_dir, f".poise_rw_check_{os.getpid()}"))
    raise RuntimeError(f"{probe_dir} is still writable after remounting read-only")


#: the host's usual folders of Unix sockets bound to a path (/run: D-Bus, Docker, systemd;
#: /tmp and /var/tmp: X11, ssh-agent, tmux, user daemons)
SOCKET_DIRS = ("/run", "/tmp", "/var/tmp")


def hide_socket_dirs(keep):
    """An empty read-only tmpfs over each of SOCKET_DIRS: the network namespace does not cover
    Unix sockets bound to a path, and connect() works on a read-only mount. A folder holding a
    path in `keep` (the interpreter) stays. Returns the hidden folders."""
    hidden = []
    for d in SOCKET_DIRS:
        real = os.path.realpath(d)
        if not os.path.isdir(real) or real in hidden:
            continue
        if any(k == real or k.startswith(real + "/") for k in keep):
            continue
        mount("tmpfs", real, "tmpfs", NOSUID | NODEV | NOEXEC, "size=64k,nr_inodes=64,mode=755")
        hidden.append(real)
    return hidden


def expose(paths, fds):
    """Make each path reachable for an unprivileged uid: a tmpfs over the first untraversable
    directory, the real directory bind-mounted read-only at the same place."""
    covered = set()
    for path in sorted(paths, key=len):
        cur = ""
        for comp in path.strip("/").split("/"):
            cur += "/" + comp
            try:
                blocked = not os.stat(cur).st_mode & 0o001
            except FileNotFoundError:
                blocked = True
            if not blocked:
                continue
            if os.path.exists(cur) and cur not in covered:
                mount("tmpfs", cur, "tmpfs", NOSUID | NODEV, "size=1m,mode=755")
                covered.add(cur)
            os.makedirs(path, mode=0o755, exist_ok=True)
            mount(f"/proc/self/fd/{fds[path]}", path, None, BIND | REC)
            mount(None, path, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV)
            break


def limit(res, soft, hard=None):
    hard = soft if hard is None else hard
    cur_hard = resource.getrlimit(res)[1]
    if cur_hard != resource.RLIM_INFINITY:
        hard = min(hard, cur_hard)
    resource.setrlimit(res, (min(soft, hard), hard))


def tasks_of(uid):
    n = 0
    for name in (os.listdir("/proc") if os.path.isdir("/proc") else ()):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    st = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue
            if int(st["Uid"].split()[0]) == uid:
                n += int(st.get("Threads", "1"))
    return n


def apply_limits(nproc):
    lim = cfg["limits"]
    cpu = max(1, int(-(-lim["cpu_time_s"] // 1)))
    limit(resource.RLIMIT_CPU, cpu, cpu + 1)
    limit(resource.RLIMIT_AS, lim["memory_mb"] << 20)
    limit(resource.RLIMIT_FSIZE, lim["max_file_size_mb"] << 20)
    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_NPROC, nproc)


def prctl(option, value):
    if hasattr(libc, "prctl"):  # Linux only
        check(libc.prctl(option, value, 0, 0, 0), f"prctl({option})")


def drop_privileges():
    if ROOT:
        os.setgroups([])
        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def exec_program(argv):
    try:
        os.execve(cfg["python"], argv, cfg["env"])
    except OSError as exc:
        hint = (" (run as a sandbox uid: the interpreter must be readable by all)"
                if ROOT else "")
        raise OSError(exc.errno, f"cannot start {cfg['python']}: {exc.strerror}{hint}")


def user_main(nproc):
    """D: rlimits, privilege drop, exec the program."""
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        apply_limits(nproc)
        drop_privileges()
        exec_program([cfg["python"], "-I", "-S", "-B", "main.py"])
    except BaseException as exc:
        report(error=f"{type(exc).__name__}: {exc}")
    os._exit(127)


def init_main(nproc):
    """C: PID 1 of the namespace; reaps everything, reports D's exit, then ends the namespace."""
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        try:
            mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC)
        except OSError as exc:
            report(warning=f"private /proc unavailable: {exc}")
        child = os.fork()
        if child == 0:
            user_main(nproc)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        while True:
            pid, status, usage = os.wait4(-1, 0)
            if pid == child:
                report(exit=status, cpu_s=usage.ru_utime + usage.ru_stime)
                os._exit(0)
    except BaseException as exc:
        report(error=f"sandbox init failed: {type(exc).__name__}: {exc}")
        os._exit(1)


def namespaced():
    """B with namespaces: isolate the filesystem, then fork the init and wait for it."""
    if not ROOT:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{HOST_UID} {HOST_UID} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{HOST_GID} {HOST_GID} 1")
    fds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in cfg["expose"]}
    lock_filesystem(os.path.dirname(cfg["workdir"]))
    if ROOT:
        expose(cfg["expose"], fds)
    hidden = (hide_socket_dirs([*cfg["expose"], os.path.realpath(cfg["python"])])
              if cfg.get("hide_dirs", True) else [])
    size = cfg["limits"]["disk_mb"]
    owner = f",uid={cfg['uid']},gid={cfg['gid']}" if ROOT else ""
    work = cfg["workdir"]
    if os.path.isdir("/dev/shm"):
        mount("tmpfs", "/dev/shm", "tmpfs", NOSUID | NODEV,
              f"size={size}m,nr_inodes=1024,mode=1777")
    os.makedirs(work, exist_ok=True)  # new if it lived under a folder just hidden or replaced
    mount("tmpfs", work, "tmpfs", NOSUID | NODEV, f"size={size}m,nr_inodes=16384,mode=700{owner}")
    os.chdir(work)
    with open("main.py", "wb") as f:
        f.write(CODE)
    os.chmod("main.py", 0o644)
    feats = ["mount-ns", "read-only-fs", "private-tmpfs-workdir", "pid-ns", "ipc-ns"]
    if hidden:
        feats.append("hidden-socket-dirs")
    if not cfg["limits"]["allow_network"]:
        feats.append("net-ns")
    feats.append(f"uid={cfg['uid']}" if ROOT else "user-ns")
    # RLIMIT_NPROC counts per (user namespace, uid) since Linux 5.14; before, the host user's
    # other processes count too.
    old = tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit()) < (5, 14)
    nproc = cfg["limits"]["max_processes"]
    if not ROOT and old:
        nproc += tasks_of(HOST_UID)
    report(mode="ns", isolation=feats + ["rlimits", "no-new-privs"])
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    child = os.fork()
    if child == 0:
        init_main(nproc)
    os.close(STATUS)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGKILL))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
    os.waitpid(child, 0)
    os._exit(0)


def direct(why):
    """B without namespaces: limits and privilege drop in place, then become the program."""
    os.chdir(cfg["workdir"])
    nproc = cfg["limits"]["max_processes"] + (0 if ROOT else tasks_of(HOST_UID))
    apply_limits(nproc)
    drop_privileges()
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the uid change cleared it
    if os.getppid() != cfg["parent_pid"]:
        os._exit(1)
    feats = ["rlimits", "no-new-privs"] + ([f"uid={cfg['uid']}"] if ROOT else [])
    net = cfg["limits"]["allow_network"]
    report(mode="direct", isolation=feats + ([] if net else ["audit-hook-net"]),
           warning=f"{why}; filesystem writes and escaped processes are not contained")
    argv = [cfg["python"], "-I", "-S", "-B"] + (["main.py"] if net else ["-c", GUARD])
    exec_program(argv)


if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    STATUS = cfg["status_fd"]
    os.set_inheritable(STATUS, False)
    try:
        ROOT = os.geteuid() == 0
        HOST_UID, HOST_GID = os.getuid(), os.getgid()
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != cfg["parent_pid"]:
            os._exit(1)
        with open(os.path.join(cfg["workdir"], "main.py"), "rb") as f:
            CODE = f.read()
        flags = NEWNS | NEWIPC | NEWPID | (0 if cfg["limits"]["allow_network"] else NEWNET)
        if (cfg["namespaces"] and hasattr(libc, "unshare")
                and libc.unshare(flags | (0 if ROOT else NEWUSER)) == 0):
            namespaced()
        else:
            why = "disabled" if not cfg["namespaces"] else (
                f"unshare: {os.strerror(ctypes.get_errno())}" if hasattr(libc, "unshare")
                else "not Linux")
            direct(why)
    except BaseException as exc:
        report(error=f"sandbox setup failed: {type(exc).__name__}: {exc}")
        os._exit(126)
