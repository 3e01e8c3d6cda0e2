"""The dashboard in a real browser: `streamlit run` on localhost, every page opened in headless
Chromium (driven by Playwright), no exception box, the expected Plotly charts drawn;
screenshots saved. A live run's new metrics line appears without reloading the page.

Needs Debian's `chromium` (CI installs it in .ci/run); skipped, saying so, where it is absent.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import dashboard_fixtures as fx
import pytest
from playwright.sync_api import Locator, expect

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(fx.chromium_path() is None,
                       reason="chromium is not installed (apt-get install chromium); CI "
                              "installs it"),
]

#: page -> (URL path and query, charts it must draw at least, text its title has)
PAGES = {
    "runs": ("/", 0, "Runs"),
    "training": ("/training", 6, "Training"),              # the Overview tab
    "training-all": ("/training?tab=all", 20, "Training"),  # every section (a permalink)
    "probe": ("/probe?focus=runs/poise", 7, "Probe"),
    "rollouts": ("/rollouts?focus=runs/poise", 2, "Rollouts"),
    "studies": ("/studies", 4, "Probe studies"),
}


@pytest.fixture(scope="session")
def runs(tiny_model_dir, tmp_path_factory):
    return fx.build_fixture_runs(tmp_path_factory.mktemp("dashboard"), tiny_model_dir)


@pytest.fixture
def shots_dir(tmp_path) -> Path:
    """Where screenshots go: $POISE_DASHBOARD_SCREENSHOTS (e.g. a CI artifact) or tmp."""
    where = os.environ.get("POISE_DASHBOARD_SCREENSHOTS")
    return Path(where) if where else tmp_path / "screenshots"


def test_every_page_in_headless_chromium(runs, shots_dir):
    js_errors: list[str] = []
    with fx.StreamlitServer([runs["root"]]) as server, fx.open_page(js_errors=js_errors) as page:
        for name, (path, min_charts, title) in PAGES.items():
            page.goto(server.url + path)
            state = fx.wait_rendered(page, min_charts=min_charts, timeout=90)
            assert state["exceptions"] == 0, (name, state["exceptionText"],
                                              server.log.read_text()[-3000:])
            expect(page.locator("h1").first).to_contain_text(title)
            if name in ("runs", "rollouts", "studies"):
                expect(page.get_by_test_id("stDataFrame").first).to_be_attached()
            state = fx.page_state(page)
            shot = fx.screenshot(page, shots_dir / f"dashboard-{name}.png",
                                 full_height=min(state["height"] + 200, 8000))
            assert state["charts"] >= min_charts and state["plots"] >= min_charts, (name, state)
            assert shot.stat().st_size > 10_000
        assert not js_errors, js_errors
    assert "Traceback" not in server.log.read_text()


#: JS: the longest trace of the reward chart (looked up afresh: a redraw may replace its div)
REWARD_POINTS_JS = """() => {
  const p = Array.from(document.querySelectorAll('.js-plotly-plot'))
      .find(e => String(e.layout?.title?.text ?? '').includes('reward (mean'));
  // Plotly keeps typed arrays as {bdata, _inputArray}
  return p ? Math.max(...p.data.map(t => ((t.x || {})._inputArray || t.x || []).length)) : 0;
}"""


def test_live_run_updates_in_place(runs, tmp_path):
    live = fx.copy_run(runs["poise"], tmp_path / "live")
    fx.mark_running(live)              # this test process is its (alive) writer
    with fx.StreamlitServer([live], refresh=1) as server, fx.open_page() as page:
        page.goto(server.url + "/training")
        fx.wait_rendered(page, min_charts=6, timeout=90)

        def wait_points(more_than: int) -> None:
            page.wait_for_function(f"n => ({REWARD_POINTS_JS})() > n", arg=more_than,
                                   polling=250, timeout=30_000)

        before = page.evaluate(REWARD_POINTS_JS)
        assert before > 0
        page.evaluate("window.__marker = 'same page'")     # survives only without a reload
        fx.append_metrics_step(live, 4, **{"reward/mean": 0.5, "tokens/generated": 50})
        wait_points(before)
        assert page.evaluate("window.__marker") == "same page"
        # a half-written line: a warning, never an error, and the line counts once complete
        fx.tear_last_line(live, '{"step": 5, "reward/mean": 0.')
        expect(page.get_by_text("incomplete line").first).to_be_visible(timeout=30_000)
        expect(page.get_by_test_id("stException")).to_have_count(0)
        with open(live / "metrics.jsonl", "ab") as f:
            f.write(f'25, "time": {time.time()}}}\n'.encode())
        wait_points(before + 1)


def tick_row(grid: Locator, run: str) -> None:
    """Tick the row of `run` in a Streamlit dataframe's grid, as a keyboard user does.

    The grid (glide-data-grid) draws its cells on a canvas; the same cells also sit in an
    accessible role=grid table inside the canvas, never rendered (hence include_hidden), which
    the grid keeps in step with its selection. Focusing such a cell moves the grid's cursor
    there, and Shift+Space is the grid's "select row" key (it adds to a multi-row selection):
    no clicks at pixel offsets that depend on row heights and column widths.
    """
    row = grid.get_by_role("row", include_hidden=True).filter(
        has=grid.page.locator('[role=gridcell][aria-colindex="2"]',   # the "run" column
                              has_text=re.compile(f"^{re.escape(run)}$")))
    cell = row.get_by_role("gridcell", include_hidden=True).first
    cell.focus()
    expect(cell).to_have_attribute("aria-selected", "true")     # the cursor is on it
    cell.press("Shift+Space")
    expect(row).to_have_attribute("aria-selected", "true")


def test_tick_runs_in_the_table_and_compare_them(runs):
    """Runs page: tick two rows of the (canvas) table, press *Compare ticked*: the sidebar now
    selects exactly those two runs, and the Training page overlays them."""
    with fx.StreamlitServer([runs["root"] / "runs"]) as server, fx.open_page() as page:
        page.goto(server.url + "/")
        fx.wait_rendered(page, timeout=90)
        sidebar_runs = page.get_by_test_id("stSidebar").locator("[data-tag] span[title]")
        expect(sidebar_runs).to_have_count(4)                   # every run selected at first
        compare = page.get_by_role("button", name="Compare ticked")
        expect(compare).to_be_disabled()
        table = page.get_by_test_id("stDataFrame").first
        grid = table.get_by_role("grid", include_hidden=True)
        # the grid's first focus puts its cursor on the top-left cell, over the cell focused:
        # take that focus first
        table.get_by_test_id("data-grid-canvas").focus()
        for run in ("grpo", "poise"):
            tick_row(grid, run)
        expect(compare).to_be_enabled()
        compare.click()
        expect(sidebar_runs).to_have_count(2)
        assert sorted(t.get_attribute("title") for t in sidebar_runs.all()) == ["grpo", "poise"]
        page.get_by_test_id("stSidebarNav").locator('a[href$="/training"]').click()
        page.wait_for_url("**/training*")
        expect(page.locator("h1").first).to_contain_text("Training")
        state = fx.wait_rendered(page, min_charts=6, timeout=90)
        assert state["exceptions"] == 0, state["exceptionText"]
        legend = page.get_by_test_id("stMain").inner_text()
        assert "grpo" in legend and "poise" in legend and "crashed" not in legend
        # a tab runs only when opened: the Probe tab's charts appear on a click
        brier = page.locator(".js-plotly-plot").filter(
            has=page.locator(".gtitle", has_text="probe Brier skill"))
        expect(brier).to_have_count(0)
        page.get_by_role("tab", name="Probe", exact=True).click()
        expect(brier.first).to_be_attached(timeout=30_000)
        expect(page).to_have_url(re.compile(r"[?&]tab=probe"))


def test_the_poise_dashboard_command_serves_every_page(runs):
    """What `poise demo` prints, run as printed: `poise dashboard RUN_DIR` (plus a free port and
    no browser tab) serves every page with the run's data."""
    import signal
    import subprocess
    import sys
    import urllib.request

    poise = Path(sys.executable).with_name("poise")
    port = fx.free_port()
    proc = subprocess.Popen([str(poise), "dashboard", str(runs["poise"]), "--port", str(port),
                             "--host", "127.0.0.1", "--no-browser"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.time() < deadline, "poise dashboard did not start in 60 s"
                time.sleep(0.25)
        with fx.open_page() as page:
            for path, charts in (("/", 0), ("/training", 6), ("/probe", 7), ("/rollouts", 2)):
                page.goto(url + path)
                state = fx.wait_rendered(page, min_charts=charts, timeout=90)
                assert state["exceptions"] == 0, (path, state["exceptionText"])
                assert state["charts"] >= charts, (path, state)
            assert "poise" in page.locator("body").inner_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
