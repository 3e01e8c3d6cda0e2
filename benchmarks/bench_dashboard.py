"""How long the dashboard's Training page takes to open on a large run (200 steps x 512 rollouts).

    nice .venv/bin/python benchmarks/bench_dashboard.py [--steps 200] [--rollouts 512]
                                                        [--repeat 3] [--browser] [--run DIR]

Synthesises a run with the real writer (`RunWriter`: metrics with every documented key, a
rollout table per step with text, token entropies and ids, eval reports), then times the Training
page with Streamlit's AppTest: cold (empty caches, new session, first read of every file) and
warm (the same session rerunning, as a live refresh or a widget change does). With --browser it
also times a real `streamlit run` + headless Chromium until every chart is drawn.
Prints seconds; the figure is recorded in benchmarks/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "dashboard.py"

DOMAINS = ("math", "logic", "code")
TASKS = {"math": "arith", "logic": "boolean", "code": "code_output"}


def synthesise(run_dir: Path, steps: int, rollouts: int, k: int = 2, seed: int = 0) -> Path:
    """A finished POISE-like run written by RunWriter, shaped like the trainer's output."""
    from poise_probe.rundir import RunWriter

    rng = np.random.default_rng(seed)
    config = {"model": {"path": "tiny-reasoner"}, "algorithm": {"adv_estimator": "poise"},
              "rollout": {"prompts_per_step": rollouts // k, "num_generations": k},
              "trainer": {"total_steps": steps}}
    meta = {"model": "tiny-reasoner", "device": "cpu", "algorithm": "poise", "run_name": "bench"}
    t0 = time.time() - steps * 30.0
    with RunWriter(run_dir, config=config, meta=meta) as w:
        w.log_metrics(0, _eval_metrics(rng, 0.6))
        for step in range(1, steps + 1):
            table, m = _step(rng, step, rollouts, k)
            w.write_rollouts(step, table)
            if step % 20 == 0 or step == steps:
                m.update(_eval_metrics(rng, 0.6 + 0.1 * step / steps))
                w.write_eval(step, {"overall": {"accuracy": m["eval/accuracy"], "k": 8},
                                    "tasks": {}, "domains": {}})
            w.log_metrics(step, m)
            w.set_status("running", last_step=step)
    _backdate(run_dir / "metrics.jsonl", t0)
    return run_dir


def _backdate(path: Path, t0: float) -> None:
    """Spread the lines' times over 30 s per step (the writer stamps them all 'now')."""
    import json

    lines = [json.loads(x) for x in path.read_text().splitlines()]
    for line in lines:
        line["time"] = t0 + 30.0 * line["step"]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def _eval_metrics(rng, acc: float) -> dict:
    out = {"eval/accuracy": acc, "eval/pass_at_k": min(1.0, acc + 0.2)}
    for d in DOMAINS:
        a = float(np.clip(acc + rng.normal(0, 0.05), 0, 1))
        out[f"eval/domain/{d}/accuracy"] = a
        out[f"eval/{TASKS[d]}/accuracy"] = a
    return out


def _step(rng, step: int, n: int, k: int) -> tuple[pd.DataFrame, dict]:
    groups = n // k
    domain = np.repeat(rng.choice(DOMAINS, groups), k)
    p_true = np.repeat(rng.beta(2, 2, groups), k)
    reward = (rng.random(n) < p_true).astype(float)
    pred = np.clip(p_true + rng.normal(0, 0.15, n), 0, 1)
    sib = pred.reshape(groups, k)
    baseline = ((sib.sum(1, keepdims=True) - sib) / (k - 1)).ravel()
    lengths = rng.integers(20, 120, n)
    completions = [f"<think>{'x+1=' * (int(m) // 5)}</think><answer>{int(r)}</answer>"
                   for m, r in zip(lengths, reward)]
    ntok = [len(c) - sum(len(t) - 1 for t in ("<think>", "</think>", "<answer>", "</answer>"))
            + 1 for c in completions]
    table = pd.DataFrame({
        "prompt_id": [f"bench/{d}/{g:06d}" for d, g in zip(domain, np.repeat(
            rng.integers(0, 10**6, groups), k))],
        "group_id": np.repeat(np.arange(groups), k), "domain": domain,
        "data_source": [f"poise/{TASKS[d]}" for d in domain],
        "rollout_idx": np.tile(np.arange(k), groups),
        "prompt": [f"Compute {i}+{i}-3 step by step." for i in range(n)],
        "completion": completions, "reward": reward, "probe_pred": pred, "baseline": baseline,
        "advantage": reward - baseline,
        "token_entropies": [rng.gamma(0.5, 0.3, t).astype(np.float32) for t in ntok],
        "num_tokens": ntok, "truncated": lengths > 115,
        "task": [TASKS[d] for d in domain], "ground_truth": reward.astype(int).astype(str),
        "score": reward, "token_ids": [rng.integers(0, 100, t) for t in ntok],
    })
    m = {"reward/mean": reward.mean(), "reward/std": reward.std(), "reward/score_mean":
         reward.mean(), "batch/frac_reward_zero_std": float(rng.random())}
    for d in DOMAINS:
        m[f"reward/{d}/mean"] = float(reward[domain == d].mean()) if (domain == d).any() else None
    m.update({"tokens/generated": int(sum(ntok)), "tokens/response_len_mean": float(
        np.mean(ntok)), "response/truncated_frac": float((lengths > 115).mean()),
        "response/entropy_mean": 0.15, "adv/mean": 0.0, "adv/std": 0.4, "adv/abs_mean": 0.3,
        "adv/frac_pos": 0.4, "adv/var_reduction": 0.3, "adv/identity_max_abs_err": 0.0,
        "adv/baseline_mean": float(baseline.mean())})
    for key in ("mae", "rmse", "bias", "pearson", "brier_skill", "explained_var", "ev_ceiling",
                "calib_slope", "calib_intercept", "pair_sign_acc", "frac_clipped_low",
                "frac_clipped_high", "raw_mae", "used_frac"):
        m[f"probe/{key}"] = float(rng.random())
    for key in ("pg_loss", "clip_frac", "clip_frac_higher", "clip_frac_lower", "approx_kl",
                "approx_kl_k3", "grad_norm", "lr", "ratio_mean", "ratio_max"):
        m[f"actor/{key}"] = float(rng.random())
    stages = {s: float(rng.uniform(0.5, 3)) for s in ("gen", "reward", "old_log_prob", "probe",
                                                      "adv", "update")}
    m.update({f"timing_s/{s}": v for s, v in stages.items()})
    m["timing_s/step"] = sum(stages.values())
    return table, m


def time_apptest(run_dir: Path, repeat: int,
                 tab: str | None = None) -> tuple[list[float], list[float], int]:
    """(cold seconds, warm seconds, charts drawn) of the Training page under AppTest, on its
    first tab or on `tab` (as ?tab= in the URL)."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    os.environ["POISE_DASHBOARD_PATHS"] = str(run_dir)
    cold, warm, charts = [], [], 0
    for _ in range(repeat):
        st.cache_data.clear()
        at = AppTest.from_file(str(APP), default_timeout=120)
        if tab:
            at.query_params["tab"] = tab
        at.switch_page("views/training.py")       # open the Training page directly
        t = time.perf_counter()
        at.run()
        cold.append(time.perf_counter() - t)
        assert not at.exception, [e.value for e in at.exception]
        assert at.title[0].value == "Training", at.title[0].value
        charts = len(at.get("plotly_chart"))
        for _ in range(3):
            t = time.perf_counter()
            at.run()
            warm.append(time.perf_counter() - t)
    return cold, warm, charts


#: The peer: the smallest Streamlit page with one Plotly chart (3 points), served the same way.
#: Its load time is what any Streamlit + Plotly page costs in this browser, whatever the data.
PEER_APP = """
import sys
import numpy as np
import plotly.graph_objects as go
import streamlit as st
n = int(sys.argv[1])
st.title(f"{n} charts")
cols = st.columns(3)
for i in range(n):
    y = np.random.default_rng(i).normal(size=200).cumsum()
    cols[i % 3].plotly_chart(go.Figure(go.Scatter(y=y)), key=f"c{i}")
"""

def drawn(n: int) -> str:
    """JS: at least `n` Plotly charts drawn and no element still pending."""
    return ("(() => Array.from(document.querySelectorAll('.js-plotly-plot'))"
            f".filter(e => e.querySelector('.main-svg')).length >= {n}"
            " && !document.querySelector('[data-testid=stSkeleton]'))()")


OVERVIEW_DRAWN, ALL_DRAWN = drawn(6), drawn(27)
TABLE_DRAWN = "(() => !!document.querySelector('[data-testid=stDataFrame] canvas'))()"


def time_browser(run_dir: Path, repeat: int) -> dict[str, list[float]]:
    """Seconds until drawn, real server and headless Chromium:
    - "peer": a new tab on the one-chart page (the fixed cost of Streamlit + Plotly.js);
    - "direct": a new tab opened on /training, until the Overview tab's 6 charts are drawn;
    - "direct all": a new tab on /training?tab=all (every section), until its 27 charts are drawn;
    - "runs": a new tab on the Runs page (a table, no chart) until the table shows;
    - "navigate": from the open Runs page, a click on *Training* in the sidebar (the app is
      already loaded, as when a user moves between pages) until the Overview is drawn."""
    sys.path.insert(0, str(REPO / "tests"))
    import dashboard_fixtures as fx

    out: dict[str, list[float]] = {k: [] for k in ("peer", "peer 27", "direct", "direct all", "runs",
                                                   "navigate")}

    def timed(page, url: str | None, condition: str, click: str | None = None) -> float:
        """Seconds from opening `url` (or clicking the `click` selector) until the JS
        `condition` holds, polled every 50 ms."""
        if url is not None:
            page.goto("about:blank")
            time.sleep(0.3)
        t = time.perf_counter()
        if url is not None:
            page.goto(url, wait_until="commit")
        else:
            page.locator(click).click()
        page.wait_for_function(condition, polling=50, timeout=120_000)
        return time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        peer = Path(tmp, "peer.py")
        peer.write_text(PEER_APP)
        for key, n in (("peer", 1), ("peer 27", 27)):
            with fx.StreamlitServer([str(n)], app=peer) as server, fx.open_page() as page:
                drawn = ("(() => Array.from(document.querySelectorAll('.js-plotly-plot'))"
                         f".filter(e => e.querySelector('.main-svg')).length >= {n})()")
                for i in range(repeat + 1):      # the first load fills the browser's cache
                    seconds = timed(page, server.url, drawn)
                    if i:
                        out[key].append(seconds)
    with fx.StreamlitServer([run_dir]) as server, fx.open_page() as page:
        for i in range(repeat + 1):
            times = {"direct": timed(page, f"{server.url}/training", OVERVIEW_DRAWN),
                     "direct all": timed(page, f"{server.url}/training?tab=all", ALL_DRAWN),
                     "runs": timed(page, f"{server.url}/", TABLE_DRAWN)}
            time.sleep(1.0)
            times["navigate"] = timed(page, None, OVERVIEW_DRAWN,
                                      click='[data-testid=stSidebarNav] a[href$="/training"]')
            if i:
                for k, v in times.items():
                    out[k].append(v)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rollouts", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--run", type=Path, default=None,
                   help="reuse (or create) the synthetic run here instead of a temp folder")
    p.add_argument("--browser", action="store_true",
                   help="also time a real server and headless Chromium")
    args = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="bench-dashboard-")
    run_dir = args.run or Path(tmp.name) / "bench"
    if not (run_dir / "meta.json").exists():
        t = time.perf_counter()
        synthesise(run_dir, args.steps, args.rollouts)
        size = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file())
        print(f"synthesised {args.steps} steps x {args.rollouts} rollouts in "
              f"{time.perf_counter() - t:.1f} s ({size / 2**20:.0f} MiB) at {run_dir}")
    for tab, name in ((None, "Overview tab"), ("all", "All tab")):
        cold, warm, charts = time_apptest(run_dir, args.repeat, tab)
        print(f"Training page ({name}), AppTest, {charts} charts: cold median "
              f"{statistics.median(cold):.2f} s (runs: {', '.join(f'{x:.2f}' for x in cold)}); "
              f"warm median {statistics.median(warm):.2f} s (max {max(warm):.2f})")
    if args.browser:
        seconds = time_browser(run_dir, args.repeat)
        peer = statistics.median(seconds["peer"])
        for key, what in (
                ("peer", "peer: a one-chart Streamlit page, new tab, until drawn"),
                ("peer 27", "peer: 27 bare 200-point Plotly charts, new tab, until drawn"),
                ("direct", "Training page (Overview tab), new tab, until its 6 charts are drawn"),
                ("direct all", "Training page, All tab (?tab=all), new tab, until its 27 charts "
                               "are drawn"),
                ("runs", "Runs page, new tab, until its table is drawn"),
                ("navigate", "Training page opened from the Runs page (sidebar click), "
                             "until the Overview's 6 charts are drawn")):
            med = statistics.median(seconds[key])
            print(f"{what}: median {med:.2f} s ({med / peer:.2f}x the peer; runs: "
                  f"{', '.join(f'{x:.2f}' for x in seconds[key])})")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
