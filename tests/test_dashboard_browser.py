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
    "training": ("/training", 20, "Training"),
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
        fx.wait_rendered(browser, min_charts=20, timeout=90)
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
        state = fx.wait_rendered(browser, min_charts=20, timeout=90)
        assert state["exceptions"] == 0, state["exceptionText"]
        legend = browser.eval("document.querySelector('[data-testid=stMain]').innerText")
        assert "grpo" in legend and "poise" in legend and "crashed" not in legend
