"""Fixture run directories for the dashboard tests, made by real (tiny) training runs.

`build_fixture_runs(root, model_dir)` trains, once per process, on the project's random 2-layer
test model (the `tiny_model_dir` fixture):

- `poise`: a finished POISE run (two domains, probe fitted from step 2, eval at start and end);
- `grpo`: a finished GRPO run (to compare with and to diff configs against);
- `crashed`: a POISE run whose process was SIGKILLed after its second step;
- `torn`: a copy of `poise` whose metrics.jsonl ends in a half-written line;
- `studies/layer_study`: a probe-study directory with real Plotly figures and tables.

Run as a script, it trains one run (used for the SIGKILLed subprocess), or screenshots every
page of the dashboard (docs/img):
    python tests/dashboard_fixtures.py train OUT MODEL_DIR STEPS
    python tests/dashboard_fixtures.py screenshots OUT_DIR RUN_DIR [MORE_PATHS ...]
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from playwright.sync_api import Page

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "dashboard.py"
TINY_RECIPE = REPO / "training" / "configs" / "poise_tiny.yaml"

_BUILT: dict[str, dict[str, Path]] = {}


def _register_tasks() -> None:
    """Two parity tasks (math, logic): a random model earns reward half the time, so groups mix."""
    from poise_probe.tasks import TASKS, register_task
    from poise_probe.tasks.builtin import ArithTask, BooleanTask

    class DashParityMath(ArithTask):
        name = "dash_parity_math"

        def score(self, completion, example):
            return float(len(completion) % 2 == 0)

    class DashParityLogic(BooleanTask):
        name = "dash_parity_logic"

        def score(self, completion, example):
            return float(len(completion) % 2 == 1)

    for cls in (DashParityMath, DashParityLogic):
        if cls.name not in TASKS:
            register_task(cls.name)(cls)


def tiny_overrides(model_dir: Path, steps: int, **extra) -> list[str]:
    """Overrides of training/configs/poise_tiny.yaml that make a run take seconds on a CPU."""
    base = {
        "model.path": str(model_dir), "data.tasks": "[dash_parity_math, dash_parity_logic]",
        "data.pool_size": 32, "data.eval_n": 3, "data.eval_samples": 2, "data.eval_every": 0,
        "rollout.prompts_per_step": 4, "rollout.num_generations": 2,
        "rollout.max_completion_length": 24, "optim.lr": 1e-3, "optim.warmup_steps": 0,
        "optim.mini_batch_prompts": 4, "optim.micro_batch_size": 8, "probe.layer": 0,
        "probe.bootstrap_steps": 1, "probe.min_steps_to_fit": 1, "probe.snapshot_every": 1,
        "probe.buffer_caps": "{all: 64}", "trainer.total_steps": steps, "trainer.save_every": 100,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def train_run(out: Path, model_dir: Path, steps: int, **extra) -> Path:
    from poise_probe.config import load_config
    from poise_probe.trainer import train

    _register_tasks()
    cfg = load_config(TINY_RECIPE, tiny_overrides(model_dir, steps, **extra))
    return train(cfg, out)


def tear_last_line(run_dir: Path, text: str = '{"step": 99, "reward/mean": 0.') -> None:
    """Append a half-written metrics line (no newline), as a writer caught mid-write leaves."""
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(text.encode())


def mark_running(run_dir: Path, pid: int | None = None) -> None:
    """Rewrite status.json as if `pid` (default: this process, alive) were writing the run."""
    path = run_dir / "status.json"
    status = json.loads(path.read_text())
    import datetime as dt

    status.update(status="running", pid=pid or os.getpid(), hostname=socket.gethostname(),
                  started=dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"))
    path.write_text(json.dumps(status))


def append_metrics_step(run_dir: Path, step: int, **values) -> None:
    """Append one complete metrics line, the way RunWriter.log_metrics does (one write)."""
    record = {"step": step, **values, "time": time.time()}
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write((json.dumps(record) + "\n").encode())


def make_study_dir(folder: Path) -> Path:
    """A probe-study directory: study.json plus analyses with tables and Plotly figures."""
    import plotly.express as px
    import plotly.graph_objects as go

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "study.json").write_text(json.dumps({
        "kind": "poise-probe-study", "version": 1, "model": "tiny-random",
        "created": "2026-11-23T12:00:00+00:00", "analyses": ["sweep", "ablation", "calibration",
                                                             "transfer"]}))
    rng = np.random.default_rng(0)

    def save(sub: str, name: str, table: pd.DataFrame | None = None, fig=None) -> None:
        d = folder / sub
        d.mkdir(exist_ok=True)
        if table is not None:
            table.to_parquet(d / f"{name}.parquet", index=False)
            table.to_csv(d / f"{name}.csv", index=False)
        if fig is not None:
            (d / f"{name}.json").write_text(fig.to_json())
            fig.write_html(d / f"{name}.html", include_plotlyjs="cdn")

    layers, positions = [0, 1, 2, 3], ["last_prompt", "mean_response", "last_response"]
    sweep = pd.DataFrame([{"layer": la, "position": p, "ev": float(rng.uniform(0, .4)),
                           "mae": float(rng.uniform(.2, .4))} for la in layers for p in positions])
    heat = go.Figure(go.Heatmap(z=sweep.pivot(index="position", columns="layer",
                                              values="ev").values,
                                x=layers, y=positions, colorscale="Viridis"))
    heat.update_layout(title="explained variance by layer and position")
    save("sweep", "layer_sweep", sweep, heat)
    ablation = pd.DataFrame({"features": ["hidden", "entropy", "both"],
                             "ev": [0.21, 0.08, 0.26], "ev_ci": [0.03, 0.02, 0.03]})
    save("ablation", "input_ablation", ablation,
         px.bar(ablation, x="features", y="ev", error_y="ev_ci", title="input ablation"))
    bins = pd.DataFrame({"pred": np.linspace(.05, .95, 10),
                         "observed": np.clip(np.linspace(.05, .95, 10)
                                             + rng.normal(0, .05, 10), 0, 1)})
    save("calibration", "reliability", bins,
         px.line(bins, x="pred", y="observed", markers=True, title="reliability"))
    save("calibration", "summary", pd.DataFrame({"metric": ["ece", "brier_skill"],
                                                 "value": [0.04, 0.18]}))
    domains = ["math", "logic", "code"]
    matrix = rng.uniform(-.1, .4, (3, 3))
    tr = go.Figure(go.Heatmap(z=matrix, x=domains, y=domains, colorscale="RdBu", zmid=0))
    tr.update_layout(title="transfer: train domain (rows) -> test domain (columns)")
    save("transfer", "transfer_matrix",
         pd.DataFrame(matrix, index=domains, columns=domains).reset_index(names="train"), tr)
    return folder


def build_fixture_runs(root: Path, model_dir: Path) -> dict[str, Path]:
    """Train the fixture runs under `root` (once per process; later calls return the same)."""
    import torch

    key = str(model_dir)
    if key in _BUILT:
        return _BUILT[key]
    root.mkdir(parents=True, exist_ok=True)
    runs = root / "runs"
    crashed = runs / "crashed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # The run to be killed trains in its own process while this one trains the others.
    log = root / "crashed-run.log"      # a file, not a pipe: a full pipe would stall the run
    with open(log, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, __file__, "train", str(crashed),
                                 str(model_dir), "200"], env=env, stdout=subprocess.DEVNULL,
                                stderr=log_file)
    killed: list[str] = []

    def kill_after_step_2() -> None:
        deadline = time.time() + 300
        while not (crashed / "rollouts" / "step_000002.parquet").exists():
            if proc.poll() is not None:
                killed.append("the run to be killed ended early: "
                              + log.read_text(errors="replace")[-2000:])
                return
            if time.time() > deadline:
                killed.append("the run to be killed made no step 2 in 300 s")
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    watcher = threading.Thread(target=kill_after_step_2, daemon=True)
    watcher.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # share the CPU with the run in the other process
    try:
        out = {"poise": train_run(runs / "poise", model_dir, 3),
               "grpo": train_run(runs / "grpo", model_dir, 2,
                                 **{"algorithm.adv_estimator": "grpo"})}
        watcher.join(timeout=330)
    finally:
        torch.set_num_threads(threads)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if killed:
        raise RuntimeError(killed[0])
    out["crashed"] = crashed
    torn = runs / "torn"
    shutil.copytree(out["poise"], torn, ignore=shutil.ignore_patterns("checkpoints"))
    tear_last_line(torn)
    out["torn"] = torn
    out["study"] = make_study_dir(root / "studies" / "layer_study")
    out["root"] = root
    _BUILT[key] = out
    return out


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run without its checkpoints (what the dashboard never reads)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
    return dst


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# a real server and a real browser (headless Debian chromium, driven by Playwright)


def chromium_path() -> str | None:
    """The system's chromium, which Playwright drives (Playwright's own browser builds are not
    installed: there may be no network to fetch them)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class StreamlitServer:
    """`streamlit run apps/dashboard.py -- PATHS` on 127.0.0.1; always killed on exit."""

    def __init__(self, paths: list[Path], port: int | None = None, timeout: float = 60,
                 refresh: float | None = None, app: Path = APP):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "streamlit", "run", str(app),
               "--server.port", str(self.port), "--server.address", "127.0.0.1",
               "--server.headless", "true", "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none", "--client.toolbarMode", "viewer",
               "--", *map(str, paths)]
        if refresh is not None:
            cmd += ["--refresh", str(refresh)]
        self.log = Path(os.environ.get("TMPDIR", "/tmp"), f"streamlit-{self.port}.log")
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=REPO, start_new_session=True)
        self.timeout = timeout

    def __enter__(self) -> StreamlitServer:
        import urllib.request

        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.close()
                raise RuntimeError(f"streamlit exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.25)
        self.close()
        raise TimeoutError(f"streamlit did not answer within {self.timeout} s: "
                           f"{self.log.read_text()[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(Exception):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def open_page(width: int = 1440, height: int = 1800, timeout: float = 30,
              js_errors: list[str] | None = None) -> Iterator[Page]:
    """One page in headless chromium under Playwright; closed, browser and driver, on exit.
    Uncaught JS errors of the page are appended to `js_errors` when it is given."""
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as pw:
        # containers: no user namespaces for chromium's sandbox, a small /dev/shm
        browser = pw.chromium.launch(executable_path=exe, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout * 1000)
            if js_errors is not None:
                page.on("pageerror", lambda err: js_errors.append(str(err)))
            yield page
        finally:
            browser.close()


def page_state(page: Page) -> dict:
    """What the dashboard page shows now: exceptions (and their text), charts, tables, title."""
    exceptions = page.get_by_test_id("stException")
    main = page.get_by_test_id("stMainBlockContainer")
    return {
        "exceptions": exceptions.count(),
        "exceptionText": [t[:2000] for t in exceptions.all_inner_texts()],
        "charts": page.get_by_test_id("stPlotlyChart").count(),
        "plots": page.locator(".js-plotly-plot").count(),
        "dataframes": page.get_by_test_id("stDataFrame").count(),
        "title": next(iter(page.locator("h1").all_inner_texts()), ""),
        "height": main.evaluate("e => e.scrollHeight") if main.count() else 0,
    }


def wait_rendered(page: Page, min_charts: int = 0, timeout: float = 60) -> dict:
    """Wait until Streamlit has run the page and drawn `min_charts` Plotly charts (or shown an
    exception); then the page's state (see `page_state`)."""
    from playwright.sync_api import expect

    ms = timeout * 1000
    # the attributes Streamlit's own end-to-end tests wait on (stApp's connection and script
    # state): once the script has stopped, every element it sent is in the page
    app = page.get_by_test_id("stApp")
    expect(app).to_have_attribute("data-test-connection-state", "CONNECTED", timeout=ms)
    expect(app).to_have_attribute("data-test-script-state", "notRunning", timeout=ms)
    expect(page.get_by_test_id("stSkeleton")).to_have_count(0, timeout=ms)
    if page.get_by_test_id("stException").count():
        return page_state(page)
    charts = page.get_by_test_id("stPlotlyChart")
    if min_charts:
        charts.nth(min_charts - 1).wait_for(state="attached", timeout=ms)
    # Plotly draws after the script has ended (its code loads lazily): wait for every SVG
    expect(charts.filter(has_not=page.locator(".main-svg"))).to_have_count(0, timeout=ms)
    return page_state(page)


def screenshot(page: Page, path: Path, full_height: int | None = None) -> Path:
    """A PNG of the page, `full_height` pixels tall (the app scrolls inside its own container,
    so Playwright's full_page cannot reach below the window: the window grows instead)."""
    size = page.viewport_size
    if full_height:
        page.set_viewport_size({"width": size["width"], "height": full_height})
        # two animation frames: the page has laid itself out (and painted) at the new size
        page.evaluate("() => new Promise(r => requestAnimationFrame(() => "
                      "requestAnimationFrame(r)))")
    path.parent.mkdir(parents=True, exist_ok=True)
    # As a mouse user sees the page: Plotly shows its toolbar only on hover, but keeps it on
    # where the browser reports no hover capability (headless).
    page.screenshot(path=path, animations="disabled", timeout=60_000,
                    style=".modebar-container { display: none !important; }")
    if full_height:
        page.set_viewport_size(size)
    return path


SHOT_PAGES = ("runs", "training", "training-all", "probe", "rollouts", "studies")


def screenshots(out: Path, paths: list[Path], width: int = 1500) -> list[Path]:
    """Screenshots of every page over `paths` (the first is the run the Probe and Rollouts pages
    show), saved as out/dashboard-<page>.png."""
    focus = Path(paths[0]).resolve().name
    saved = []
    with StreamlitServer(paths) as server, open_page(width=width, height=1000) as page:
        for name in SHOT_PAGES:
            path = {"runs": "/", "training-all": "/training?tab=all"}.get(name, f"/{name}")
            if name in ("probe", "rollouts"):
                path += f"?focus={focus}"
            page.goto(server.url + path)
            state = wait_rendered(page, timeout=120)
            if state["exceptions"]:
                raise RuntimeError(f"{name}: {state['exceptionText']}")
            saved.append(screenshot(page, out / f"dashboard-{name}.png",
                                    full_height=min(state["height"] + 120, 7000)))
    return saved


# --------------------------------------------------------------------------------------------
# AppTest helpers shared by the dashboard test files


def open_app(monkeypatch, *paths, query: dict | None = None, page: str = "runs"):
    """The app on `paths` (as `poise dashboard PATHS` would pass them) under Streamlit's
    AppTest, opened on `page` with the URL's `query` (a permalink)."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    st.cache_data.clear()
    monkeypatch.setenv("POISE_DASHBOARD_PATHS", os.pathsep.join(map(str, paths)))
    at = AppTest.from_file(str(APP), default_timeout=90)
    at.run()  # AppTest learns the pages from a first run
    if page != "runs":
        at.query_params.clear()
        at.query_params.update(query or {})
        at.switch_page(f"views/{page}.py").run()
    assert_ok(at)
    return at


def assert_ok(at) -> None:
    errors = [e.value for e in at.exception]
    assert not errors, "the page raised:\n" + "\n\n".join(map(str, errors))


def chart_titles(at) -> list[str]:
    titles = []
    for el in at.get("plotly_chart"):
        title = json.loads(el.proto.spec)["layout"].get("title", {})
        titles.append(title.get("text", "") if isinstance(title, dict) else str(title))
    return titles


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "train":
        import torch

        torch.set_num_threads(1)
        train_run(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) >= 4 and sys.argv[1] == "screenshots":
        for shot in screenshots(Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]]):
            print(shot)
    else:
        sys.exit(f"usage: {sys.argv[0]} train OUT MODEL_DIR STEPS\n"
                 f"       {sys.argv[0]} screenshots OUT_DIR RUN_DIR [MORE_PATHS ...]")
