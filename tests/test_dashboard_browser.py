"""The dashboard in a real browser: `streamlit run` on localhost, every page opened in headless
Chromium (driven over the DevTools protocol), no exception box, the expected Plotly charts drawn;
screenshots saved. A live run's new metrics line appears without reloading the page.

Needs Debian's `chromium` (CI installs it in .ci/run); skipped, saying so, where it is absent.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import dashboard_fixtures as fx
import pytest

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
    with fx.StreamlitServer([runs["root"]]) as server, fx.Browser() as browser:
        for page, (path, min_charts, title) in PAGES.items():
            browser.goto(server.url + path)
            state = fx.wait_rendered(browser, min_charts=min_charts, timeout=90)
            shot = browser.screenshot(shots_dir / f"dashboard-{page}.png",
                                      full_height=min(state["height"] + 200, 8000))
            assert state["exceptions"] == 0, (page, state["exceptionText"],
                                              server.log.read_text()[-3000:])
            assert title in state["title"], (page, state["title"])
            assert state["charts"] >= min_charts and state["plots"] >= min_charts, (page, state)
            if page in ("runs", "rollouts", "studies"):
                assert state["dataframes"] >= 1, (page, state)
            assert shot.stat().st_size > 10_000
        assert not browser.js_errors, browser.js_errors
    assert "Traceback" not in server.log.read_text()


def test_live_run_updates_in_place(runs, tmp_path):
    live = fx.copy_run(runs["poise"], tmp_path / "live")
    fx.mark_running(live)              # this test process is its (alive) writer
    with fx.StreamlitServer([live], refresh=1) as server, fx.Browser() as browser:
        browser.goto(server.url + "/training")
        fx.wait_rendered(browser, min_charts=6, timeout=90)
        points = ("(() => { const p = Array.from(document.querySelectorAll('.js-plotly-plot'))"
                  ".find(e => ((e.layout.title || {}).text || '').includes('reward (mean'));"
                  " return Math.max(...p.data.map(t => ((t.x || {})._inputArray || t.x || [])"
                  ".length)); })()")   # Plotly keeps typed arrays as {bdata, _inputArray}
        before = browser.eval(points)
        browser.eval("window.__marker = 'same page'")     # survives only without a reload
        fx.append_metrics_step(live, 4, **{"reward/mean": 0.5, "tokens/generated": 50})
        browser.wait_until(f"{points} > {before}", timeout=30)
        assert browser.eval("window.__marker") == "same page"
        # a half-written line: a warning, never an error, and the line counts once complete
        fx.tear_last_line(live, '{"step": 5, "reward/mean": 0.')
        browser.wait_until("document.body.innerText.includes('incomplete line')", timeout=30)
        assert browser.eval("document.querySelectorAll('[data-testid=stException]').length") == 0
        with open(live / "metrics.jsonl", "ab") as f:
            f.write(f'25, "time": {time.time()}}}\n'.encode())
        browser.wait_until(f"{points} > {before + 1}", timeout=30)


BUTTON_JS = ("Array.from(document.querySelectorAll('button'))"
             ".find(b => b.innerText.includes('Compare ticked'))")
SIDEBAR_TAGS_JS = ("Array.from(document.querySelectorAll('[data-testid=stSidebar] [data-tag] "
                   "span[title]')).map(t => t.title)")


def test_tick_runs_in_the_table_and_compare_them(runs):
    """Runs page: tick two rows of the (canvas) table, press *Compare ticked*: the sidebar now
    selects exactly those two runs, and the Training page overlays them."""
    with fx.StreamlitServer([runs["root"] / "runs"]) as server, fx.Browser() as browser:
        browser.goto(server.url + "/")
        fx.wait_rendered(browser, timeout=90)
        assert len(browser.eval(SIDEBAR_TAGS_JS)) == 4         # every run selected at first
        assert browser.eval(f"{BUTTON_JS}.disabled") is True
        left, top = browser.eval("(() => { const r = document.querySelector("
                                 "'[data-testid=stDataFrame]').getBoundingClientRect();"
                                 " return [r.left, r.top]; })()")
        for row in (1, 2):           # rows sorted by label: crashed, grpo, poise, torn
            browser.click(left + 18, top + 35 + 17 + 35 * row)
            time.sleep(0.5)
        browser.wait_until(f"{BUTTON_JS} && !{BUTTON_JS}.disabled", timeout=30)
        browser.eval(f"{BUTTON_JS}.click()")
        browser.wait_until(f"{SIDEBAR_TAGS_JS}.length === 2", timeout=30)
        assert sorted(browser.eval(SIDEBAR_TAGS_JS)) == ["grpo", "poise"]
        browser.eval("document.querySelector('[data-testid=stSidebarNav] a[href$=\"/training\"]')"
                     ".click()")
        state = fx.wait_rendered(browser, min_charts=6, timeout=90)
        assert state["exceptions"] == 0, state["exceptionText"]
        legend = browser.eval("document.querySelector('[data-testid=stMain]').innerText")
        assert "grpo" in legend and "poise" in legend and "crashed" not in legend
        # a tab runs only when opened: the Probe tab's charts appear on a click
        brier = ("Array.from(document.querySelectorAll('.js-plotly-plot')).some(p => "
                 "((p.layout.title || {}).text || '').includes('probe Brier skill'))")
        assert browser.eval(brier) is False
        browser.eval("Array.from(document.querySelectorAll('[role=tab]'))"
                     ".find(t => t.innerText.trim() === 'Probe').click()")
        browser.wait_until(brier, timeout=30)
        assert "tab=probe" in browser.eval("location.search")


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
        with fx.Browser() as browser:
            for path, charts in (("/", 0), ("/training", 6), ("/probe", 7), ("/rollouts", 2)):
                browser.goto(url + path)
                state = fx.wait_rendered(browser, min_charts=charts, timeout=90)
                assert state["exceptions"] == 0, (path, state["exceptionText"])
                assert state["charts"] >= charts, (path, state)
            assert "poise" in browser.eval("document.body.innerText")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
