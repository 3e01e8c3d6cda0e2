"""`poise value-bench`: the method family's value estimators scored against Monte-Carlo values
on held-out prompts and intermediate states (SVEB's protocol; RELATED.md A.2.5), all on the
same rollouts. See `data` (the rollouts and ground truth), `estimators` (the contenders) and
`report` (scores, intervals, figures). Results go to a study directory, which the dashboard's
Studies page shows."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from poise_probe.valuebench.estimators import ESTIMATORS, BenchContext, default_estimators

__all__ = ["run_value_bench", "ESTIMATORS", "default_estimators"]

log = logging.getLogger(__name__)
ANALYSIS = "value_bench"


def run_value_bench(cfg, out: str | Path, *, tasks: list[str], n_train: int, n_eval: int,
                    pool: int, mc: int, estimators: list[str] | None = None, seed: int = 0,
                    n_boot: int = 500, png: bool = True,
                    progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Build the train and eval sets with the policy `cfg.model.path`, fit every estimator on
    the train rollouts, score them on the eval prompts and states; write tables and figures to
    the study directory `out` (analysis "value_bench"). Returns the score table."""
    from poise_probe import trainer as T
    from poise_probe.models import load_policy
    from poise_probe.study.report import StudyWriter
    from poise_probe.valuebench.data import build_set
    from poise_probe.valuebench.report import mae_figure, scatter_figure, score_table

    names = list(estimators or default_estimators())
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown value-bench estimator(s) {unknown}; known: "
                         f"{default_estimators()}.")
    if pool < 2 or mc < 2:
        raise ValueError(f"--pool and --mc must be >= 2 (leave-one-out targets, noise rows); "
                         f"got pool={pool}, mc={mc}.")
    say = progress or (lambda msg: log.info(msg))
    t0 = time.perf_counter()
    device = T.select_device(cfg)
    from poise_probe.runtime import quiet_library_bars

    with quiet_library_bars():
        model, tokenizer = load_policy(cfg.model.path, device=device, dtype=T._param_dtype(cfg))
    layer = cfg.probe.resolve_layer(model.config.num_hidden_layers, cfg.model.path)
    ctx = BenchContext(cfg, model, tokenizer, device, T._autocast(cfg, device),
                       model.config.hidden_size)
    chosen = [ESTIMATORS[n]() for n in names]
    hidden = any(e.needs_hidden for e in chosen)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    say(f"train set: {n_train} prompts x {pool} rollouts per task")
    train = build_set(model, tokenizer, tasks, n_train, split="train", pool=pool, mc=0, cfg=cfg,
                      layer=layer, device=device, autocast=ctx.autocast, seed=seed,
                      keep_hidden=hidden, with_states=False)
    say(f"eval set: {n_eval} prompts x ({pool} pool + {mc} Monte-Carlo) rollouts per task, "
        f"one cut state each with {mc} continuations")
    ev = build_set(model, tokenizer, tasks, n_eval, split="test", pool=pool, mc=mc, cfg=cfg,
                   layer=layer, device=device, autocast=ctx.autocast, seed=seed,
                   keep_hidden=hidden, with_states=True)
    timings["data_s"] = time.perf_counter() - t
    values: dict[str, dict[str, np.ndarray]] = {"prompt": {}, "state": {}}
    for name, est in zip(names, chosen):
        say(f"estimator {name}")
        t = time.perf_counter()
        est.fit(train, ctx)
        values["prompt"][name] = np.asarray(est.prompt_values(ev, ctx), dtype=float)
        values["state"][name] = np.asarray(est.state_values(ev, ctx), dtype=float)
        timings[f"{name}_s"] = time.perf_counter() - t
    targets = {"prompt": ev.target, "state": ev.states.target}
    mcs = {"prompt": ev.mc, "state": ev.states.mc}
    table = score_table(values, targets, mcs, n_boot=n_boot, seed=seed)
    writer = StudyWriter(out, dataset=f"value-bench {','.join(tasks)} on {cfg.model.path}",
                         png=png)
    writer.table(ANALYSIS, "scores", table)
    for level in ("prompt", "state"):
        frame = pd.DataFrame({"target": targets[level], **values[level]})
        frame.insert(0, "task", [ev.rollouts.prompts[p].task.name
                                 for p in (range(ev.n_prompts) if level == "prompt"
                                           else ev.states.prompt)])
        writer.table(ANALYSIS, f"values_{level}", frame)
        writer.figure(ANALYSIS, f"scatter_{level}", scatter_figure(values[level],
                                                                   targets[level], level))
    writer.figure(ANALYSIS, "mae", mae_figure(table))
    timings["total_s"] = time.perf_counter() - t0
    writer.record(ANALYSIS, {"model": str(cfg.model.path), "tasks": tasks, "n_train": n_train,
                             "n_eval": n_eval, "pool": pool, "mc": mc, "seed": seed,
                             "estimators": names, "timings": timings})
    return table
