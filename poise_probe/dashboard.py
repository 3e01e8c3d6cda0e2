"""`poise dashboard`: start the Streamlit dashboard (apps/dashboard.py) over run directories.

The dashboard itself lives in `apps/` beside the package and reads runs only through
`poise_probe.rundir`; this module just checks the arguments and runs `streamlit run`.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import poise_probe


def app_path() -> Path:
    """apps/dashboard.py of this checkout (the package's parent folder), else the copy a wheel
    installs under <prefix>/share/poise_probe/apps (pyproject's data-files)."""
    checkout = Path(poise_probe.__file__).resolve().parents[1] / "apps" / "dashboard.py"
    if checkout.is_file():
        return checkout
    installed = Path(sys.prefix) / "share" / "poise_probe" / "apps" / "dashboard.py"
    return installed if installed.is_file() else checkout


def dashboard_command(run_dir: str | os.PathLike) -> str:
    """The shell command that opens the dashboard on `run_dir` (what `poise demo` prints)."""
    return f"poise dashboard {shlex.quote(str(run_dir))}"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `dashboard` sub-command to the `poise` command line."""
    p = subparsers.add_parser(
        "dashboard", help="Streamlit dashboard over run directories and probe studies",
        description="Open the dashboard (Runs, Training, Probe, Rollouts, Studies) on run "
                    "directories, folders of runs or probe-study folders. It refreshes on its "
                    "own while a run is being written.")
    p.add_argument("paths", nargs="*", metavar="RUN_DIR_OR_ROOT",
                   help="run directories or folders searched for runs and studies "
                        "(default: ./runs)")
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    p.add_argument("--host", default="localhost",
                   help="address to bind (default localhost; 0.0.0.0 to share on a network)")
    p.add_argument("--no-browser", action="store_true",
                   help="do not open a browser tab (headless server)")
    p.add_argument("--refresh", type=float, default=2.0,
                   help="seconds between live refreshes of running runs (default 2)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the streamlit command instead of running it")
    p.set_defaults(func=run)
    return p


def build_command(args: argparse.Namespace) -> list[str]:
    """The `python -m streamlit run apps/dashboard.py -- PATHS` command for `args`."""
    app = app_path()
    if not app.is_file():
        raise FileNotFoundError(
            f"the dashboard app is missing: {app} does not exist, nor does "
            f"{Path(sys.prefix) / 'share/poise_probe/apps/dashboard.py'}. Reinstall poise_probe "
            f"(pip install -e . from a checkout, or the wheel, which ships apps/).")
    paths = list(args.paths) or ["runs"]
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        hint = (" Start a run with `poise demo` (it writes runs/demo-<time>) or pass the "
                "folder a run was written to." if paths == ["runs"] else "")
        raise FileNotFoundError(f"no such run directory or folder: {', '.join(missing)}.{hint}")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535; got {args.port}.")
    if args.refresh <= 0:
        raise ValueError(f"--refresh must be > 0 seconds; got {args.refresh}.")
    return [sys.executable, "-m", "streamlit", "run", str(app),
            "--server.port", str(args.port), "--server.address", args.host,
            "--server.headless", "true" if args.no_browser else "false",
            "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer",
            "--", *[str(Path(p).resolve()) for p in paths], "--refresh", f"{args.refresh:g}"]


def run(args: argparse.Namespace) -> int:
    """Run streamlit until it exits (Ctrl-C stops it); returns its exit status."""
    cmd = build_command(args)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    print(f"dashboard: http://{args.host}:{args.port}  (Ctrl-C to stop)", file=sys.stderr)
    return serve(cmd)


def serve(cmd: list[str], stop_timeout: float = 10.0) -> int:
    """Run `cmd` (streamlit) as a child until it exits. SIGTERM, SIGHUP and SIGINT reach the
    child and this process waits for it (SIGKILL after `stop_timeout` s), so no server is left
    orphaned on the port; returns the child's exit status, 0 after Ctrl-C, 128 + N after
    signal N."""
    import signal

    proc = subprocess.Popen(cmd)
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    watched = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    previous = {s: signal.signal(s, forward) for s in watched}
    try:
        while True:
            try:
                rc = proc.wait(timeout=stop_timeout if received else None)
                break
            except subprocess.TimeoutExpired:
                proc.kill()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if received:
        return 0 if received[0] == signal.SIGINT else 128 + received[0]
    return rc
