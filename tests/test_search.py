"""The mechanism search: the acquisition rule and the operators on hand-made archives, the
archive's persistence, the trainer's token budget, a 4-trial search on the tiny reasoner, and a
killed search that resumes without repeating finished trials."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from run_helpers import run as tiny_run

from poise_probe.rundir import RunReader
from poise_probe.runtime import DEMO_OVERRIDES
from poise_probe.search.acquisition import (
    Node,
    Weights,
    acquisition,
    depths,
    descendants,
    diversity,
    lineage_gain,
    select_parents,
)
from poise_probe.search.archive import Archive
from poise_probe.search.operators import crossover, mutate, propose
from poise_probe.search.space import BASELINE, GENES, check, overrides

# a hand-made archive: 0 -> 1 -> 2 (a lineage), 3 alone; three genes
NODES = [Node(0, (), {"a": 1, "b": 1, "c": 1}, 0.5),
         Node(1, (0,), {"a": 2, "b": 1, "c": 1}, 0.7),
         Node(2, (1,), {"a": 2, "b": 2, "c": 1}, 0.6),
         Node(3, (), {"a": 1, "b": 1, "c": 2}, 0.4)]


def test_depths_and_descendants():
    assert depths(NODES) == {0: 0, 1: 1, 2: 2, 3: 0}
    assert descendants(NODES, 0) == [1, 2] and descendants(NODES, 3) == []
    crossed = NODES + [Node(4, (2, 3), {}, 0.1)]
    assert depths(crossed)[4] == 3                     # 1 + the deepest parent
    with pytest.raises(ValueError, match="its own ancestor"):
        depths([Node(0, (1,), {}, 0.0), Node(1, (0,), {}, 0.0)])


def test_lineage_gain_by_hand():
    # span 0.3; G(0) = (1 * (0.7 - 0.5) + 0.7 * (0.6 - 0.5)) / 0.3 = 0.27 / 0.3
    assert lineage_gain(NODES, 0) == pytest.approx(0.9)
    assert lineage_gain(NODES, 1) == pytest.approx(-0.1 / 0.3)
    assert lineage_gain(NODES, 2) == 0.0 and lineage_gain(NODES, 3) == 0.0
    assert lineage_gain(NODES, 0, top_k=1) == pytest.approx(0.2 / 0.3)


def test_diversity_by_hand():
    assert diversity(NODES, 0) == pytest.approx(4 / 9)   # (1/3 + 2/3 + 1/3) / 3
    assert diversity(NODES, 2) == pytest.approx(2 / 3)   # (2/3 + 1/3 + 3/3) / 3
    assert diversity(NODES[:1], 0) == 0.0


def test_acquisition_by_hand_and_the_parents_it_picks():
    a = acquisition(NODES)
    bonus1 = 0.5 * math.sqrt(math.log(5) / 2)          # one child
    bonus0 = 0.5 * math.sqrt(math.log(5))              # none
    expect = {0: 1 / 3 + 0.5 * 4 / 9 + 0.5 * (0.9 + bonus1),
              1: 1.0 + 0.5 * 4 / 9 + 0.5 * (-1 / 3 + bonus1),
              2: 2 / 3 + 0.5 * 2 / 3 + 0.5 * bonus0,
              3: 0.0 + 0.5 * 2 / 3 + 0.5 * bonus0}
    for i, value in expect.items():
        assert a[i]["a"] == pytest.approx(value), i
    assert select_parents(NODES, 2) == [2, 1]          # the unexplored child beats its parent
    # performance alone picks the best score; diversity alone the most different
    assert select_parents(NODES, 1, Weights(perf=1, div=0, gain=0)) == [1]
    assert select_parents(NODES, 2, Weights(perf=0, div=1, gain=0)) == [2, 3]
    equal = [Node(i, (), {"a": i}, 0.5) for i in range(3)]
    assert all(v["perf"] == 1.0 for v in acquisition(equal).values())


def test_mutation_and_crossover():
    rng = np.random.default_rng(0)
    for n in (1, 2):
        child = mutate(BASELINE, GENES, rng, n_changes=n)
        changed = [k for k in BASELINE if child[k] != BASELINE[k]]
        assert len(changed) == n
        assert all(child[k] in {g.name: g.values for g in GENES}[k] for k in changed)
    other = {g.name: g.values[-1] for g in GENES}
    for _ in range(10):
        child = crossover(BASELINE, other, GENES, rng)
        assert all(child[g.name] in (BASELINE[g.name], other[g.name]) for g in GENES)


def test_the_configs_own_validation_refuses_invalid_combinations():
    assert check(BASELINE, DEMO_OVERRIDES) is None
    bad = {**BASELINE, "normalisation": "analytic"}      # analytic variance is GRPO's option
    assert "group.variance" in check(bad, DEMO_OVERRIDES)
    assert "group.variance=analytic" in overrides(bad)
    assert overrides({"rollouts_per_prompt": 8}) == [
        "rollout.num_generations=8", "rollout.prompts_per_step=8", "optim.mini_batch_prompts=8"]
    with pytest.raises(ValueError, match="genes \\['nope'\\]"):
        overrides({"nope": 1})


def test_proposals_are_valid_new_and_descend_from_chosen_parents():
    nodes = [Node(0, (), dict(BASELINE), 0.6),
             Node(1, (0,), {**BASELINE, "lr": 1e-4}, 0.7),
             Node(2, (), {**BASELINE, "estimator": "grpo", "normalisation": "analytic"}, 0.5)]
    seen = [n.genes for n in nodes]
    top3 = set(select_parents(nodes, 3))
    for i in range(30):
        genes, parents, op = propose(nodes, seen.__contains__, DEMO_OVERRIDES,
                                     np.random.default_rng(i))
        assert check(genes, DEMO_OVERRIDES) is None and genes not in seen
        assert op in ("mutation", "crossover") and set(parents) <= top3
        assert len(parents) == (2 if op == "crossover" else 1)
        seen.append(genes)


def test_archive_round_trip_and_refusals(tmp_path):
    settings = {"budget": 100, "base": ["a=1"], "genes": {"x": [1]}, "eval_n": 2,
                "eval_samples": 1, "seed": 0}
    arch = Archive.open(tmp_path, settings)
    t = arch.add({"x": 1}, parents=[], op="seed", seed=0)
    t.state, t.score = "done", 0.5
    arch.add({"x": 2}, parents=[0], op="mutation", seed=0)
    arch.save()
    back = Archive.open(tmp_path, settings)
    assert [x.genes for x in back.trials] == [{"x": 1}, {"x": 2}]
    assert back.done()[0].score == 0.5 and [x.id for x in back.unfinished()] == [1]
    assert back.children(0)[0].id == 1 and back.seen({"x": 2})
    with pytest.raises(ValueError, match="other settings \\(budget: 100 -> 200\\)"):
        Archive.open(tmp_path, {**settings, "budget": 200})
    (tmp_path / "archive.json").write_text("{broken")
    with pytest.raises(ValueError, match="archive.json is not valid JSON"):
        Archive.open(tmp_path, settings)


def test_token_budget_ends_the_run_at_the_step_reaching_it(tiny_model_dir, tmp_path):
    out = tiny_run(tiny_model_dir, tmp_path / "b", **{"trainer.total_steps": 50,
                                                     "trainer.token_budget": 60,
                                                     "trainer.save_every": 10})
    reader = RunReader(out)
    m = [r for r in reader.metrics() if "tokens/sampled" in r]
    tokens = np.cumsum([r["tokens/sampled"] for r in m])
    assert tokens[-1] >= 60 and (len(tokens) == 1 or tokens[-2] < 60)
    assert reader.checkpoints()[-1][0] == m[-1]["step"] < 50
    assert reader.eval_steps()[-1] == m[-1]["step"]
    assert reader.inferred_status() == "finished"


SMALL = ["--budget", "2500", "--eval-n", "4", "--eval-samples", "1", "--no-png"]


@pytest.mark.slow
def test_a_four_trial_search_on_the_tiny_reasoner(tmp_path, capsys):
    from poise_probe.cli import main

    out = tmp_path / "search"
    assert main(["search", "--output", str(out), "--trials", "4", "--workers", "2",
                 "--init", "2", "--repeats", "1", "--seeds-per-repeat", "1", *SMALL]) == 0
    doc = json.loads((out / "archive.json").read_text())
    trials = doc["trials"]
    searched = [t for t in trials if t["repeat_of"] is None]
    assert len(searched) == 4 and all(t["state"] == "done" for t in trials)
    assert [t["op"] for t in searched[:2]] == ["seed", "seed"]
    assert all(t["parents"] for t in searched[2:])          # children of the archive
    assert all(0.0 <= t["score"] <= 1.0 and t["tokens"] >= 2500 for t in trials)
    repeats = [t for t in trials if t["repeat_of"] is not None]
    best = max(searched, key=lambda t: (t["score"], -t["id"]))
    assert len(repeats) == 1 and repeats[0]["repeat_of"] == best["id"]
    assert repeats[0]["seed"] != best["seed"]
    for t in trials:
        run = RunReader(out / "trials" / f"t{t['id']:04d}")
        assert run.inferred_status() == "finished"
        assert run.config["trainer"]["token_budget"] == 2500
    study = json.loads((out / "study.json").read_text())
    assert "mechanism_search" in study["analyses"]
    assert (out / "mechanism_search" / "family_tree.html").is_file() or any(
        out.rglob("family_tree*"))
    printed = capsys.readouterr().out
    assert best and f"t{best['id']:04d}" in printed


@pytest.mark.slow
def test_a_killed_search_resumes_without_repeating_finished_trials(tmp_path):
    out = tmp_path / "search"
    cmd = [sys.executable, "-m", "poise_probe", "search", "--output", str(out), "--trials", "3",
           "--workers", "1", "--init", "2", "--repeats", "0", *SMALL]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 600
    try:
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            if (out / "archive.json").exists():
                states = [t["state"] for t in
                          json.loads((out / "archive.json").read_text())["trials"]]
                if states.count("done") >= 1 and "running" in states:
                    break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)        # the search and its workers
        proc.wait()
    before = json.loads((out / "archive.json").read_text())["trials"]
    finished = {t["id"]: t for t in before if t["state"] == "done"}
    stamps = {i: (out / "trials" / f"t{i:04d}" / "metrics.jsonl").stat().st_mtime_ns
              for i in finished}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming: " in done.stderr
    after = json.loads((out / "archive.json").read_text())["trials"]
    assert len([t for t in after if t["repeat_of"] is None]) == 3
    assert all(t["state"] == "done" for t in after)
    for i, t in finished.items():                     # kept as they were, not trained again
        assert after[i] == t
        assert (out / "trials" / f"t{i:04d}" / "metrics.jsonl").stat().st_mtime_ns == stamps[i]
    assert len({json.dumps(t["genes"], sort_keys=True) for t in after}) == len(after)
