"""Every dashboard page under Streamlit's AppTest, on run directories made by real training runs:
finished POISE and GRPO runs, a SIGKILLed run, a run whose last metrics line is torn, a probe
study; plus filters, permalinks, live refresh and files missing or half-written."""
from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import dashboard_fixtures as fx
import numpy as np
import pandas as pd
import pytest
from dashboard_fixtures import assert_ok, chart_titles, open_app
from streamlit.testing.v1 import AppTest

from poise_probe import rundir
from poise_probe.rundir import RunReader, RunWriter

pytestmark = pytest.mark.slow

PAGES = ("runs", "training", "probe", "rollouts", "studies")


@pytest.fixture(scope="session")
def runs(tiny_model_dir, tmp_path_factory):
    """The fixture runs (trained once per session; see dashboard_fixtures)."""
    return fx.build_fixture_runs(tmp_path_factory.mktemp("dashboard"), tiny_model_dir)


def chart(at: AppTest, title_part: str) -> dict:
    for el in at.get("plotly_chart"):
        spec = json.loads(el.proto.spec)
        if title_part in spec["layout"].get("title", {}).get("text", ""):
            return spec
    raise AssertionError(f"no chart titled like {title_part!r} in {chart_titles(at)}")


def values(v) -> list:
    """A Plotly JSON array: a list, or a base64 typed array ({"dtype", "bdata"})."""
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist()
    return list(v)


def query(at: AppTest) -> dict[str, list[str]]:
    """The URL's query parameters, each as a list of values."""
    return {k: v if isinstance(v, list) else [v] for k, v in at.query_params.items()}


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    parts += [w.value for w in at.warning] + [i.value for i in at.info]
    parts += [e.value for e in at.error]
    parts += [str(h.proto.body) for h in at.html]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# every page on real runs


def test_every_page_renders_real_runs_without_error(runs, monkeypatch):
    at = open_app(monkeypatch, runs["root"])
    for page in PAGES:
        if page != "runs":
            at.switch_page(f"views/{page}.py").run()
        assert_ok(at)
        assert at.title[0].value in ("Runs", "Training", "Probe", "Rollouts", "Probe studies")


def test_runs_page_infers_status_and_headline_numbers(runs, monkeypatch):
    at = open_app(monkeypatch, runs["root"] / "runs")
    table = at.dataframe[0].value.set_index("run")
    assert set(table.index) == {"poise", "grpo", "crashed", "torn"}
    status = table["status"].str.split().str[-1]
    assert status.to_dict() == {"poise": "finished", "grpo": "finished", "crashed": "crashed",
                                "torn": "finished"}
    assert table.loc["poise", "algorithm"] == "poise" and table.loc["grpo", "algorithm"] == "grpo"
    assert table.loc["poise", "steps"] == 3 and table.loc["crashed", "steps"] in (1, 2)
    best = RunReader(runs["poise"]).metrics_frame()["eval/accuracy"].max()
    assert table.loc["poise", "best held-out acc"] == pytest.approx(best)
    assert "incomplete line" in texts(at)                        # the torn run, inline
    # config difference between two runs
    at.selectbox(key="diff_a").set_value(str(runs["poise"].resolve()))
    at.selectbox(key="diff_b").set_value(str(runs["grpo"].resolve())).run()
    assert_ok(at)
    diff = next(d.value for d in at.dataframe if "key" in d.value.columns)
    assert "algorithm.adv_estimator" in set(diff["key"])
    assert "trainer.total_steps" in set(diff["key"])
    # "Select all" selects every run in the sidebar
    at.multiselect(key="sel_runs").set_value([str(runs["poise"].resolve())]).run()
    at.button(key="select_all").click().run()
    assert_ok(at)
    assert len(at.multiselect(key="sel_runs").value) == 4


def test_training_page_overlays_runs_with_every_documented_chart(runs, monkeypatch):
    at = open_app(monkeypatch, runs["root"] / "runs", page="training")
    # the page opens on the Overview tab: six charts, the other tabs are not built
    assert sorted(chart_titles(at)) == sorted([
        "reward (mean over the step's rollouts)", "held-out accuracy by domain", "probe MAE",
        "probe Pearson r", "variance-reduction ratio 1 − Var(A)/Var(r)", "gradient norm"])
    at.session_state["tr_tab"] = "Probe"
    at.run()
    assert_ok(at)
    assert "probe Brier skill" in chart_titles(at) and "gradient norm" not in chart_titles(at)
    assert query(at)["tab"] == ["probe"]
    at.session_state["tr_tab"] = "All"
    at.run()
    assert_ok(at)
    titles = " | ".join(chart_titles(at))
    for part in ("reward (mean", "reward by domain", "held-out accuracy by domain", "probe MAE",
                 "probe Pearson", "probe Brier skill", "variance-reduction ratio",
                 "identity check", "gradient norm", "generated tokens", "step time",
                 "stage shares", "seconds per stage"):
        assert part in titles, part
    reward = chart(at, "reward (mean")
    names = {t.get("name") for t in reward["data"]}
    assert {"poise · mean", "grpo · mean", "crashed · mean"} <= names
    # x-axis by tokens: the cumulative generated tokens of the run
    at.radio(key="tr_x").set_value("tokens")
    at.slider(key="tr_smooth").set_value(0.0).run()
    assert_ok(at)
    steps = RunReader(runs["poise"]).metrics_frame().groupby("step").last()
    want = steps["tokens/generated"].fillna(0).cumsum().dropna()
    poise = next(t for t in chart(at, "reward (mean")["data"] if t.get("name") == "poise · mean")
    assert values(poise["x"]) == pytest.approx(want.loc[1:].tolist())
    assert query(at)["x"] == ["tokens"]
    at.radio(key="tr_x").set_value("wall").run()
    assert_ok(at)
    # any other key on request
    at.multiselect(key="tr_more").set_value(["actor/lr"]).run()
    assert_ok(at)
    assert "actor/lr" in chart_titles(at)


def test_probe_page_shows_calibration_for_a_step_window(runs, monkeypatch):
    poise = runs["poise"].resolve()
    at = open_app(monkeypatch, runs["root"] / "runs", page="probe")
    at.selectbox(key="pr_run").set_value(str(poise)).run()
    assert_ok(at)
    titles = " | ".join(chart_titles(at))
    for part in ("probe prediction vs observed", "reliability diagram", "residuals",
                 "within-pair sign accuracy", "baseline error", "clip fractions",
                 "calibration of each step"):
        assert part in titles, part
    lo, hi = at.slider(key="pr_window").value
    assert (int(lo), int(hi)) == (1, 3)                      # the last (up to) 10 steps
    df = RunReader(poise).all_rollouts(steps=[1, 2, 3])
    shown = int(at.metric[0].value.replace(",", ""))
    assert shown == int(df["probe_pred"].notna().sum())
    at.slider(key="pr_window").set_value((3, 3)).run()
    assert_ok(at)
    assert int(at.metric[0].value) == int(RunReader(poise).rollouts(3)["probe_pred"].notna().sum())
    assert query(at)["window"] == ["3-3"]


def test_rollouts_page_filters_pairs_and_permalinks(runs, monkeypatch):
    poise = runs["poise"].resolve()
    at = open_app(monkeypatch, runs["root"] / "runs", page="rollouts")
    at.selectbox(key="ro_run").set_value(str(poise)).run()
    assert_ok(at)
    full = RunReader(poise).rollouts(3)
    table = at.dataframe[0].value
    assert len(table) == len(full) and set(table["step"]) == {3}
    # filters: domain, advantage sign, free text
    at.multiselect(key="ro_domains").set_value(["math"]).run()
    assert set(at.dataframe[0].value["domain"]) == {"math"}
    at.pills(key="ro_signs").set_value(["negative"]).run()
    assert (at.dataframe[0].value["advantage"] < 0).all()
    at.multiselect(key="ro_domains").set_value([])
    at.pills(key="ro_signs").set_value([]).run()
    needle = full["prompt_id"].iloc[0].rsplit("/", 1)[-1]          # the prompt's hash
    at.text_input(key="ro_q").input(needle).run()
    assert_ok(at)
    hits = pd.Series(False, index=full.index)
    for col in ("completion", "prompt", "ground_truth", "prompt_id"):
        hits |= full[col].str.lower().str.contains(needle.lower(), regex=False)
    assert len(at.dataframe[0].value) == int(hits.sum()) >= 1
    assert [b.proto.label for b in at.get("download_button")] == ["CSV", "JSONL"]
    link = query(at)
    assert link["q"] == [needle] and link["focus"] == ["poise"]
    # the pair view: both rollouts of the prompt, side by side, with the numbers of each
    step, gid = at.selectbox(key="ro_group").value
    group = full[full["group_id"] == gid].sort_values("rollout_idx")
    metrics = {m.label: [] for m in at.metric}
    for m in at.metric:
        metrics[m.label].append(float(m.value))
    assert metrics["reward"] == pytest.approx(group["reward"].tolist(), abs=1e-3)
    assert metrics["probe pred"] == pytest.approx(group["probe_pred"].tolist(), abs=1e-3)
    assert metrics["baseline"] == pytest.approx(group["baseline"].tolist(), abs=1e-3)
    assert metrics["advantage"] == pytest.approx(group["advantage"].tolist(), abs=1e-3)
    html = "\n".join(str(h.proto.body) for h in at.html)
    assert "H=" in html and ">think</sup>" in html                  # coloured, spans marked
    assert sum("entropy per token" in t for t in chart_titles(at)) == len(group)
    # the permalink opens the same view in a fresh session
    at2 = open_app(monkeypatch, runs["root"] / "runs", page="rollouts",
                   query={**link, "group": [f"{step}:{gid}"]})
    assert at2.text_input(key="ro_q").value == needle
    assert at2.selectbox(key="ro_run").value == str(poise)
    assert at2.selectbox(key="ro_group").value == (step, gid)


def test_rollouts_pager_walks_the_prompts(runs, monkeypatch):
    at = open_app(monkeypatch, runs["poise"], page="rollouts")
    first = at.selectbox(key="ro_group").value
    at.button(key="ro_next").click().run()
    assert_ok(at)
    assert at.selectbox(key="ro_group").value != first
    at.button(key="ro_prev").click().run()
    assert at.selectbox(key="ro_group").value == first


def test_studies_page_shows_every_table_and_figure(runs, monkeypatch):
    at = open_app(monkeypatch, runs["root"], page="studies")
    titles = chart_titles(at)
    assert {"explained variance by layer and position", "input ablation", "reliability",
            "transfer: train domain (rows) -> test domain (columns)"} <= set(titles)
    study = runs["study"]
    tables = sorted(p.stem for p in study.rglob("*.parquet"))
    assert len([d for d in at.dataframe]) == len(tables)
    assert [s.value for s in at.subheader] == ["sweep", "ablation", "calibration", "transfer"]


# --------------------------------------------------------------------------------------------
# crashed, torn, missing and live


def test_crashed_and_torn_runs_render_every_page(runs, monkeypatch):
    for name in ("crashed", "torn"):
        at = open_app(monkeypatch, runs[name])
        for page in PAGES[1:4]:
            at.switch_page(f"views/{page}.py").run()
            assert_ok(at)
    at = open_app(monkeypatch, runs["torn"], page="training")
    assert "incomplete line" in texts(at)
    assert len(at.get("plotly_chart")) == 6                      # the Overview tab
    at.session_state["tr_tab"] = "All"
    at.run()
    assert_ok(at)
    assert len(at.get("plotly_chart")) > 20


def test_missing_and_corrupt_files_warn_inline(runs, tmp_path, monkeypatch):
    bare = fx.copy_run(runs["poise"], tmp_path / "bare")
    (bare / "metrics.jsonl").unlink()
    (bare / "status.json").unlink()
    shutil.rmtree(bare / "rollouts")
    bad = fx.copy_run(runs["poise"], tmp_path / "bad")
    (bad / "rollouts" / "step_000002.parquet").write_bytes(b"not parquet")
    future = fx.copy_run(runs["poise"], tmp_path / "future")
    meta = json.loads((future / "meta.json").read_text())
    (future / "meta.json").write_text(json.dumps({**meta, "schema_version": 99}))
    at = open_app(monkeypatch, tmp_path)
    table = at.dataframe[0].value.set_index("run")
    assert table.loc["bare", "status"].endswith("crashed")        # no status.json
    assert table.loc["future", "status"].endswith("unreadable")
    assert "schema_version" in texts(at) or "newer" in texts(at)
    at.multiselect(key="sel_runs").set_value([str(future.resolve())]).run()
    for page in PAGES[1:4]:
        at.switch_page(f"views/{page}.py").run()
        assert_ok(at)
        assert "cannot be read" in texts(at)
    at.multiselect(key="sel_runs").set_value([str(bare.resolve())]).run()
    for page in PAGES[1:4]:
        at.switch_page(f"views/{page}.py").run()
        assert_ok(at)
    assert "no rollout table yet" in texts(at)
    at.multiselect(key="sel_runs").set_value([str(bad.resolve())]).run()
    at.switch_page("views/probe.py").run()
    at.slider(key="pr_window").set_value((1, 3)).run()
    assert_ok(at)
    assert "step 2" in texts(at) and "cannot read parquet" in texts(at)


def test_live_mode_reads_only_appended_lines_and_new_tables(runs, tmp_path, monkeypatch):
    live = fx.copy_run(runs["poise"], tmp_path / "live")
    fx.mark_running(live)                          # this test process is its "writer"
    reads = []
    real = rundir.reader.read_parquet
    monkeypatch.setattr(rundir.reader, "read_parquet",
                        lambda path, *a, **k: reads.append(Path(path).name) or real(path, *a, **k))
    at = open_app(monkeypatch, live, page="training")
    assert "live" in texts(at) and "refreshed" in texts(at)      # the timer is on
    tail = at.session_state["_poise_tails"][str(live.resolve())]
    n = len(tail.records)
    # a torn (half-written) line: ignored with a warning, never an error
    fx.tear_last_line(live, '{"step": 4, "reward/mean": 0.1')
    at.run()
    assert_ok(at)
    assert tail.last_new == 0 and "incomplete line" in texts(at)
    # the writer completes the line: only that line is read
    with open(live / "metrics.jsonl", "ab") as f:
        f.write(b'23, "tokens/generated": 99, "time": 1.0}\n')
    at.run()
    assert_ok(at)
    assert tail.last_new == 1 and len(tail.records) == n + 1
    raw = next(t for t in chart(at, "reward (mean")["data"]
               if t.get("name") == "mean" and t.get("opacity") == 0.25)
    assert values(raw["x"])[-1] == 4 and values(raw["y"])[-1] == pytest.approx(0.123)
    # the rollouts page loads each table once; a new table is the only one read later
    at.switch_page("views/rollouts.py").run()
    assert_ok(at)
    reads.clear()
    at.run()
    assert reads == []                                           # unchanged files: cache
    new = RunReader(live).rollouts(3)
    new["step"] = 4
    table = rundir.as_rollout_table(new, 4)
    tmp = live / "rollouts" / ".step_000004.parquet.tmp-1-ab"
    import pyarrow.parquet as pq

    pq.write_table(table, tmp)
    os.replace(tmp, live / "rollouts" / "step_000004.parquet")
    reads.clear()
    at.run()
    assert_ok(at)
    assert reads and set(reads) == {"step_000004.parquet"}
    assert at.slider(key="ro_steps").value == (4, 4)              # the window follows the run
    # the run ends: the timer stops
    status = json.loads((live / "status.json").read_text())
    (live / "status.json").write_text(json.dumps({**status, "status": "finished"}))
    at.run()
    assert_ok(at)
    assert "refreshed" not in texts(at)


def test_a_run_that_has_just_started_renders_every_page(tmp_path, monkeypatch):
    """A live run before its first step: only meta/status/config, then the step-0 evaluation."""
    run = tmp_path / "starting"
    writer = RunWriter(run, config={"algorithm": {"adv_estimator": "poise"}},
                       meta={"model": "tiny", "device": "cpu", "algorithm": "poise"})
    at = open_app(monkeypatch, run)
    assert at.dataframe[0].value["status"].iloc[0].endswith("running")
    for lines in (0, 1):
        if lines:
            writer.log_metrics(0, {"eval/accuracy": 0.5, "eval/domain/math/accuracy": 0.4})
            writer.write_eval(0, {"overall": {"accuracy": 0.5, "k": 2}, "domains": {},
                                  "tasks": {"arith": {"accuracy": 0.5, "domain": "math"}}})
        for page in PAGES[:4]:
            at.switch_page(f"views/{page}.py").run()
            assert_ok(at)
    at.switch_page("views/training.py").run()
    at.session_state["tr_tab"] = "Held-out accuracy"
    at.run()
    assert "held-out accuracy (Avg@K, all tasks)" in chart_titles(at)
    writer.close()


def test_live_toggle_pauses_the_timer(runs, tmp_path, monkeypatch):
    live = fx.copy_run(runs["poise"], tmp_path / "live")
    fx.mark_running(live)
    at = open_app(monkeypatch, live, page="training")
    assert "refreshed" in texts(at)
    at.toggle(key="live").set_value(False).run()
    assert_ok(at)
    assert "refreshed" not in texts(at) and "paused" in texts(at)


def test_resumed_run_rewrite_restarts_the_tail(runs, tmp_path, monkeypatch):
    run = fx.copy_run(runs["poise"], tmp_path / "resumed")
    at = open_app(monkeypatch, run, page="training")
    tail = at.session_state["_poise_tails"][str(run.resolve())]
    n = len(tail.records)
    meta = json.loads((run / "meta.json").read_text())
    with RunWriter(run, config=RunReader(run).config, resume=True,
                   meta={k: meta[k] for k in ("model", "device", "algorithm")}) as w:
        w.truncate_after(1)
    at.run()
    assert_ok(at)
    assert tail.restarts == 1 and len(tail.records) < n
    assert int(pd.Series([r["step"] for r in tail.records]).max()) == 1
