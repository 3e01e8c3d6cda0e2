"""The dashboard's Search page (a `poise search --output DIR` folder) on a search folder made by
hand: lineage depths, the family-tree layout and figure, the table of trials with seed
statistics, and the page under AppTest (tree drawn, a best trial's run opened on Training,
damaged or missing archive.json warned about inline)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
from dashboard_fixtures import APP, assert_ok, chart_titles, open_app

from poise_probe.rundir import RunWriter

sys.path.insert(0, str(APP.parent))
from poise_dash import search_files  # noqa: E402

from poise_probe.search import figures  # noqa: E402

GENES = {"estimator": ["poise", "grpo"], "lr": [0.001, 0.003], "clip_high": [0.2, 0.28]}


def _trial(id_, genes, parents=(), op="seed", state="done", score=None, repeat_of=None,
           seed=0, error=None):
    return {"id": id_, "genes": genes, "parents": list(parents), "op": op, "seed": seed,
            "repeat_of": repeat_of, "state": state, "score": score,
            "tokens": 1000 * (id_ + 1) if state == "done" else None,
            "steps": 4 if state == "done" else None, "seconds": 1.5 if state == "done" else None,
            "error": error}


G0 = {"estimator": "poise", "lr": 0.001, "clip_high": 0.2}
G1 = {"estimator": "grpo", "lr": 0.001, "clip_high": 0.2}
G2 = {"estimator": "poise", "lr": 0.003, "clip_high": 0.2}
TRIALS = [
    _trial(0, G0, score=0.40),
    _trial(1, G1, score=0.30),
    _trial(2, G2, parents=[0], op="mutation", score=0.55),
    _trial(3, {**G1, "lr": 0.003, "clip_high": 0.28}, parents=[1, 2], op="crossover",
           state="failed", error="RuntimeError: CUDA out of memory"),
    _trial(4, G2, parents=[], op="repeat", repeat_of=2, seed=1, score=0.45),
    _trial(5, {**G2, "clip_high": 0.28}, parents=[2], op="mutation", state="running"),
    _trial(6, {**G0, "lr": 0.003}, parents=[0, 2], op="crossover", score=0.50),
]
SETTINGS = {"budget": 20000, "base": ["trainer.total_steps=100"], "genes": GENES, "eval_n": 8,
            "eval_samples": 2, "seed": 7, "trials": 7, "repeats": 1}


def write_archive(folder: Path, trials=TRIALS, settings=SETTINGS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "archive.json"
    tmp = folder / ".archive.json.tmp"
    tmp.write_text(json.dumps({"kind": "poise-mechanism-search", "version": 1,
                               "settings": settings, "trials": trials}))
    os.replace(tmp, path)
    return path


def write_run(run: Path, acc: float) -> Path:
    with RunWriter(run, config={"algorithm": {"adv_estimator": "poise"}},
                   meta={"model": "tiny", "device": "cpu", "algorithm": "poise"}) as w:
        for step in (1, 2):
            w.log_metrics(step, {"reward/mean": 0.2 * step, "eval/accuracy": acc * step / 2,
                                 "tokens/generated": 100})
    return run


@pytest.fixture
def search_dir(tmp_path) -> Path:
    folder = tmp_path / "searches" / "s1"
    write_archive(folder)
    for tid, acc in ((2, 0.55), (0, 0.40)):
        write_run(folder / "trials" / f"t{tid:04d}", acc)
    return folder


def search_of(folder: Path | None = None) -> search_files.Search:
    doc = {"kind": "poise-mechanism-search", "version": 1, "settings": SETTINGS,
           "trials": TRIALS}
    return search_files.parse_archive(doc, str(folder or "/x"))


def texts(at) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    parts += [w.value for w in at.warning] + [i.value for i in at.info]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# pure functions


def test_lineage_depths_follow_the_deepest_parent():
    depths = figures.lineage_depths(TRIALS)
    assert depths == {0: 0, 1: 0, 2: 1, 3: 2, 5: 2, 6: 2}          # repeat 4 is no node
    # unknown parents are ignored, a loop does not recurse forever
    odd = [_trial(0, G0, parents=[9]), _trial(1, G0, parents=[2]), _trial(2, G0, parents=[1])]
    assert figures.lineage_depths(odd)[0] == 0
    assert set(figures.lineage_depths(odd)) == {0, 1, 2}


def test_tree_layout_spreads_each_depth_and_draws_every_parent_edge():
    layout = figures.tree_layout(TRIALS)
    nodes = layout.nodes.set_index("id")
    assert list(nodes.index) == [0, 1, 2, 3, 5, 6]
    assert nodes["x"].to_dict() == {0: 0, 1: 0, 2: 1, 3: 2, 5: 2, 6: 2}
    # depth 0 by id; depth 2 by the mean y of the parents (6: -0.25, 5: 0, 3: 0.25)
    assert nodes["y"].to_dict() == {0: -0.5, 1: 0.5, 2: 0.0, 6: -1.0, 5: 0.0, 3: 1.0}
    edges = {(e.parent, e.child): (e.x0, e.y0, e.x1, e.y1) for e in layout.edges.itertuples()}
    assert set(edges) == {(0, 2), (1, 3), (2, 3), (2, 5), (0, 6), (2, 6)}
    assert edges[(1, 3)] == (0, 0.5, 2, 1.0)
    assert edges[(0, 6)] == (0, -0.5, 2, -1.0)


def test_family_tree_figure_colours_by_score_and_marks_the_best():
    search = search_of()
    fig = figures.family_tree_figure(search.trials)
    assert fig.layout.title.text == "family tree"
    traces = {t.name: t for t in fig.data}
    scored, grey = traces["trials"], traces["unscored"]
    assert list(scored.text) == ["0", "1", "2", "6"] and list(grey.text) == ["3", "5"]
    assert list(scored.marker.color) == [0.40, 0.30, 0.55, 0.50]
    assert scored.marker.colorbar.title.text == "score"
    assert list(scored.marker.symbol) == ["circle", "circle", "star", "circle"]
    assert list(grey.marker.symbol) == ["x", "circle-open"]            # failed, running
    assert grey.marker.color == figures.UNSCORED
    # the crossover's edges are a trace of their own: (1->3), (2->3), (0->6), (2->6)
    assert [x for x in traces["crossover edge"].x if x is not None] == [0, 2, 1, 2, 0, 2, 1, 2]
    hover = dict(zip(scored.text, scored.hovertext))
    assert "t0002" in hover["2"] and "mutation of t0000" in hover["2"]
    assert "vs t0000: lr=0.003" in hover["2"] and "estimator" not in hover["2"]
    assert "score 0.5500" in hover["2"]
    assert "CUDA out of memory" in dict(zip(grey.text, grey.hovertext))["3"]
    assert any("best t0002" in a.text for a in fig.layout.annotations)


def test_trial_table_ranks_by_score_with_seed_statistics():
    search = search_of()
    df = search_files.trial_table(search)
    assert df["id"].tolist() == [2, 6, 0, 1, 3, 5]                     # unscored last, by id
    assert df.loc[df["id"] == 3, "parents"].item() == "1, 2"
    assert df.loc[df["id"] == 3, "op"].item() == "crossover"
    assert {"gene estimator", "gene lr", "gene clip_high"} <= set(df.columns)
    assert df.loc[df["id"] == 6, "gene lr"].item() == pytest.approx(0.003)
    row = df.set_index("id").loc[2]
    assert row["seeds"] == 2                                            # t0002 and its repeat
    assert row["seed mean"] == pytest.approx(0.5)
    assert row["seed sd"] == pytest.approx(math.sqrt(0.005))            # sd of (.55, .45)
    assert df.set_index("id")["seeds"].isna().sum() == 5                # no repeats elsewhere
    assert df.set_index("id").loc[3, "state"] == "failed"
    assert df.set_index("id").loc[0, "tokens"] == 1000
    with_repeats = search_files.trial_table(search, repeats=True)
    assert 4 in set(with_repeats["id"])
    assert with_repeats.set_index("id").loc[4, "repeat of"] == 2
    assert search.counts() == {"done": 5, "running": 1, "failed": 1}
    assert [t["id"] for t in search_files.best_trials(search, 3)] == [2, 6, 0]


def test_archive_reading_and_discovery(search_dir, tmp_path):
    bad = tmp_path / "searches" / "bad"
    (bad / "trials").mkdir(parents=True)
    (bad / "archive.json").write_text("{not json")
    other = tmp_path / "searches" / "other"                             # someone else's file
    other.mkdir()
    (other / "archive.json").write_text(json.dumps({"kind": "something-else"}))
    found = search_files.discover_searches((str(tmp_path),))
    assert found == [str(bad.resolve()), str(search_dir.resolve())]
    search, err = search_files.load_search(str(search_dir))
    assert err is None and len(search.trials) == 7
    search, err = search_files.load_search(str(bad))
    assert search is None and str(bad / "archive.json") in err and "not valid JSON" in err
    search, err = search_files.load_search(str(tmp_path / "nowhere"))
    assert search is None and "does not exist" in err


# --------------------------------------------------------------------------------------------
# the page under AppTest


def test_search_page_draws_the_tree_and_opens_a_best_run(search_dir, monkeypatch):
    at = open_app(monkeypatch, search_dir.parent, page="search")
    assert at.title[0].value == "Mechanism search"
    assert "family tree" in chart_titles(at)
    assert "budget: **20,000 tokens**" in texts(at) and "seed: **7**" in texts(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["✅ done"] == "5" and metrics["❌ failed"] == "1"
    assert metrics["best score"] == "0.550"
    table = at.dataframe[0].value
    assert table["id"].tolist() == [2, 6, 0, 1, 3, 5]
    assert at.button(key="se_open_t0006").disabled                      # no run directory
    assert at.query_params["search"] in ("s1", ["s1"])
    # one click: the run is selected in the sidebar and the Training page shows it
    at.button(key="se_open_t0002").click().run()
    assert_ok(at)
    run = str((search_dir / "trials" / "t0002").resolve())
    assert at.session_state["sel_runs"] == [run]
    assert at.title[0].value == "Training"
    assert "reward (mean over the step's rollouts)" in chart_titles(at)


def test_search_page_refreshes_while_the_search_runs(search_dir, monkeypatch):
    at = open_app(monkeypatch, search_dir, page="search")
    assert "🔴 live" in texts(at)                  # t0005 is running, the archive is fresh
    old = time.time() - 3600                       # a search killed an hour ago
    os.utime(search_dir / "archive.json", (old, old))
    at.run()
    assert_ok(at)
    assert "🔴 live" not in texts(at)


def test_search_page_warns_about_a_damaged_or_missing_archive(tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    (bad / "trials").mkdir(parents=True)
    (bad / "archive.json").write_text('{"kind": "poise-mechanism-search", "trials": [')
    at = open_app(monkeypatch, bad, page="search")
    assert any(str(bad.resolve() / "archive.json") in w.value and "not valid JSON" in w.value
               for w in at.warning)
    gone = tmp_path / "gone"                       # a study of the search, its archive gone
    gone.mkdir()
    (gone / "study.json").write_text(json.dumps({"kind": "poise-probe-study",
                                                 "analyses": {"mechanism_search": {}}}))
    at = open_app(monkeypatch, gone, page="search")
    assert any(str(gone.resolve() / "archive.json") in w.value and "does not exist" in w.value
               for w in at.warning)
    empty = tmp_path / "empty"
    empty.mkdir()
    at = open_app(monkeypatch, empty, page="search")
    assert "No mechanism search" in texts(at)
