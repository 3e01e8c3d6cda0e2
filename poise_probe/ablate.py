"""`poise ablate`: the paper's training-side comparison, run on one policy with several seeds.

Arms (POISE.md "Baselines it is compared with" and the one-rollout ablations), all on the
demo recipe (the bundled tiny reasoner on a CPU) with the same number of rollouts per step, so
the generated-token budgets match up to completion lengths (the curves are drawn against
generated tokens, which is the fair axis):

- `poise`: two rollouts per prompt, the cross-rollout probe baseline;
- `poise_self`: the same-rollout baseline (biased, the paper's 40.7% ablation);
- `poise_prompt`: the prompt-only probe (unbiased, the paper's 47.5% ablation);
- `grpo_8`: GRPO with eight rollouts per prompt (a quarter of the prompts per step);
- `rloo_2`: RLOO with two rollouts per prompt;
- `rloo_8`: RLOO with eight rollouts per prompt (a quarter of the prompts per step);
- `dapo_8`: DAPO with eight rollouts per prompt, dynamic sampling (up to three generation rounds
  to fill the batch with prompts whose rewards differ) and overlong shaping, as `dapo_tiny.yaml`;
  its extra rounds cost generated tokens, which the token axis counts;
- `ppo_critic`: PPO with the paper's prompt-only critic (a policy-sized copy).

Each (arm, seed) is a normal run directory under `<out>/runs/`, so the dashboard compares them
and a rerun resumes unfinished runs and skips finished ones. The summary (held-out accuracy
against tokens, final accuracy, the variance-reduction ratio 1 - Var(A)/Var(r) with 95%
intervals over seeds) goes to the study directory `<out>` (analysis "training_ablation").
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from poise_probe.stats import t95

__all__ = ["ARMS", "run_ablation", "step_tokens", "summarise"]

log = logging.getLogger(__name__)
ANALYSIS = "training_ablation"

#: arm -> overrides on top of the demo recipe; every arm samples 64 rollouts per step (dapo_8
#: up to three times that, when its dynamic sampling needs more rounds)
ARMS: dict[str, list[str]] = {
    "poise": ["algorithm.adv_estimator=poise"],
    "poise_self": ["algorithm.adv_estimator=poise_self"],
    "poise_prompt": ["algorithm.adv_estimator=poise_prompt"],
    "grpo_8": ["algorithm.adv_estimator=grpo", "rollout.num_generations=8",
               "rollout.prompts_per_step=8", "optim.mini_batch_prompts=8"],
    "rloo_2": ["algorithm.adv_estimator=rloo"],
    "rloo_8": ["algorithm.adv_estimator=rloo", "rollout.num_generations=8",
               "rollout.prompts_per_step=8", "optim.mini_batch_prompts=8"],
    "dapo_8": ["algorithm.adv_estimator=dapo", "algorithm.dynamic_sampling=true",
               "algorithm.max_gen_rounds=3", "algorithm.overlong_shaping=true",
               "algorithm.overlong_buffer_len=16", "rollout.num_generations=8",
               "rollout.prompts_per_step=8", "optim.mini_batch_prompts=8"],
    "ppo_critic": ["algorithm.adv_estimator=ppo_critic"],
}


def arm_config(arm: str, seed: int, steps: int, eval_every: int, eval_n: int,
               overrides: list[str] | None = None):
    """The config of one (arm, seed) run: the demo recipe, the arm's estimator, then `overrides`."""
    from poise_probe.runtime import DEMO_OVERRIDES
    from poise_probe.config import load_config

    if arm not in ARMS:
        raise ValueError(f"unknown ablation arm {arm!r}; arms: {list(ARMS)}.")
    return load_config(None, DEMO_OVERRIDES + ARMS[arm] + [
        f"trainer.seed={seed}", f"trainer.total_steps={steps}", f"data.eval_every={eval_every}",
        f"data.eval_n={eval_n}", "data.eval_samples=4", f"trainer.save_every={steps}",
        "trainer.keep_checkpoints=1"] + list(overrides or []))


def run_ablation(out: str | Path, *, arms: list[str], seeds: list[int], steps: int,
                 eval_every: int, eval_n: int, overrides: list[str] | None = None,
                 jobs: int = 1, png: bool = True, progress: Callable[[str], None] | None = None
                 ) -> dict[str, pd.DataFrame]:
    """Train every (arm, seed) not finished yet under `<out>/runs/`, then summarise them all."""
    from poise_probe.rundir import RunReader
    from poise_probe.study.report import StudyWriter
    from poise_probe.trainer import train

    say = progress or log.info
    out = Path(out)
    dirs, todo = {}, []
    for arm in arms:
        for seed in seeds:
            cfg = arm_config(arm, seed, steps, eval_every, eval_n, overrides)
            d = out / "runs" / f"{arm}-seed{seed}"
            dirs[(arm, seed)] = d
            status = RunReader(d).status.get("status") if (d / "meta.json").is_file() else None
            if status == "finished":
                say(f"{d.name}: finished, kept")
                continue
            resume = status is not None and bool(RunReader(d).checkpoints())
            if status is not None and not resume:       # started, no checkpoint: start over
                shutil.rmtree(d)
            todo.append((cfg, d, resume))
    if jobs <= 1:
        from poise_probe.runtime import quiet_library_bars
        for cfg, d, resume in todo:
            say(f"{d.name}: {'resuming' if resume else 'training'} ({steps} steps)")
            with quiet_library_bars():
                train(cfg, d, resume=resume)
    else:                   # separate processes, one torch thread each (tiny models, few cores)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_train_one, cfg.to_dict(), str(d), resume): d
                       for cfg, d, resume in todo}
            say(f"training {len(todo)} runs, {jobs} at a time")
            for fut in as_completed(futures):
                fut.result()                            # a failed run raises here
                say(f"{futures[fut].name}: finished")
    tables = summarise(dirs)
    writer = StudyWriter(out, dataset=f"training ablation: {', '.join(arms)}", png=png)
    for name, frame in tables.items():
        writer.table(ANALYSIS, name, frame)
    from poise_probe.ablate_figures import accuracy_figure, variance_figure

    writer.figure(ANALYSIS, "accuracy_vs_tokens", accuracy_figure(tables["curves"]))
    writer.figure(ANALYSIS, "variance_reduction", variance_figure(tables["summary"]))
    writer.record(ANALYSIS, {"arms": arms, "seeds": seeds, "steps": steps,
                             "eval_every": eval_every, "eval_n": eval_n,
                             "overrides": list(overrides or [])})
    return tables


def _train_one(cfg: dict, run_dir: str, resume: bool) -> str:
    """One run in a worker process: one torch thread, the same trainer as `poise train`."""
    import torch

    from poise_probe.config import from_dict
    from poise_probe.trainer import train

    from poise_probe.runtime import quiet_library_bars

    torch.set_num_threads(1)
    with quiet_library_bars():
        return str(train(from_dict(cfg), run_dir, resume=resume))


def step_tokens(m: pd.DataFrame) -> pd.Series:
    """Tokens each step generated (one row per step of a metrics frame): `tokens/sampled`
    (every generation round, groups DAPO's dynamic sampling dropped included); for runs written
    before it was logged, `tokens/generated` scaled by `batch/prompts_sampled / batch/prompts`
    (the dropped groups taken as long as the kept ones), else `tokens/generated`."""
    def col(name):
        return pd.to_numeric(m[name], errors="coerce") if name in m else \
            pd.Series(np.nan, index=m.index)

    kept = col("tokens/generated")
    scale = (col("batch/prompts_sampled") / col("batch/prompts")).fillna(1.0)
    return col("tokens/sampled").fillna(kept * scale).fillna(0.0)


def summarise(dirs: dict[tuple[str, int], Path]) -> dict[str, pd.DataFrame]:
    """`curves`: held-out accuracy per (arm, seed, step) with cumulative generated tokens;
    `runs`: per run the final accuracy and the mean variance-reduction ratio over the second
    half of training; `summary`: per arm, means over seeds with 95% t intervals."""
    from poise_probe.rundir import RunReader

    curves, runs = [], []
    for (arm, seed), d in dirs.items():
        m = RunReader(d).metrics_frame().groupby("step", sort=True).last().reset_index()
        tokens = step_tokens(m).cumsum()
        if "eval/accuracy" in m:
            ev = m["eval/accuracy"].notna()
            for step, tok, acc in zip(m["step"][ev], tokens[ev], m["eval/accuracy"][ev]):
                curves.append({"arm": arm, "seed": seed, "step": int(step), "tokens": float(tok),
                               "accuracy": float(acc)})
        vr = pd.to_numeric(m.get("adv/var_reduction", pd.Series(np.nan, index=m.index)),
                           errors="coerce")
        late = vr[m["step"] > m["step"].max() / 2].dropna()
        acc = m["eval/accuracy"].dropna() if "eval/accuracy" in m else pd.Series(dtype=float)
        runs.append({"arm": arm, "seed": seed, "steps": int(m["step"].max()),
                     "tokens": float(tokens.iloc[-1]) if len(tokens) else 0.0,
                     "accuracy_start": float(acc.iloc[0]) if len(acc) else math.nan,
                     "accuracy_end": float(acc.iloc[-1]) if len(acc) else math.nan,
                     "var_reduction": float(late.mean()) if len(late) else math.nan})
    runs_df = pd.DataFrame(runs)
    rows = []
    for arm, g in runs_df.groupby("arm", sort=False):
        row = {"arm": arm, "seeds": len(g), "tokens": g["tokens"].mean()}
        for col in ("accuracy_end", "var_reduction"):
            v = g[col].dropna()
            mean = float(v.mean()) if len(v) else math.nan
            half = t95(len(v)) * float(v.std(ddof=1)) / math.sqrt(len(v)) if len(v) > 1 \
                else math.nan
            row.update({col: mean, f"{col}_lo": mean - half, f"{col}_hi": mean + half})
        rows.append(row)
    return {"curves": pd.DataFrame(curves), "runs": runs_df, "summary": pd.DataFrame(rows)}
