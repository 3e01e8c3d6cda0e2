"""Where captured rollouts come from: a trainer run directory, or fresh sampling on named tasks.

Both give a plan: a DataFrame with one row per rollout and the columns of `dataset.PLAN_COLUMNS`
plus `prompt_token_ids` / `token_ids` (the exact ids the forward will see). `reward` is the
verifier's score in [0, 1] (what the probe predicts); `group` names the rollouts that share a
prompt *and* policy (one step's group), the unit of leave-one-out targets and of Avg@K.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from poise_probe.capture.dataset import PLAN_COLUMNS, DatasetError
from poise_probe.generation import encode_prompts, render_prompt, sample_completions
from poise_probe.rundir import RunReader
from poise_probe.tasks import get_task

log = logging.getLogger(__name__)

__all__ = [
    "fill_token_ids",
    "parse_steps",
    "plan_from_generation",
    "plan_from_run",
    "run_model_path",
]


def parse_steps(text: str | None, available: Sequence[int]) -> list[int]:
    """`None`/`all` -> every step; `10:60` -> the range (end inclusive); `5,9,12` -> those."""
    avail = list(available)
    if text is None or text == "all":
        return avail
    try:
        if ":" in text:
            lo, hi = text.split(":", 1)
            lo_i = int(lo) if lo else min(avail, default=0)
            hi_i = int(hi) if hi else max(avail, default=0)
            chosen = [s for s in avail if lo_i <= s <= hi_i]
        else:
            chosen = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise DatasetError(f"--steps {text!r} is not `all`, `A:B` or a comma list of steps.") from err
    missing = [s for s in chosen if s not in avail]
    if missing:
        raise DatasetError(f"--steps {text!r}: the run has no rollouts for step(s) {missing[:5]}; "
                           f"it has {avail[:3]}...{avail[-3:]}.")
    if not chosen:
        raise DatasetError(f"--steps {text!r} selects none of the run's rollout steps "
                           f"({avail[:1]}..{avail[-1:]}).")
    return chosen


def run_model_path(run_dir: str | os.PathLike) -> Path | str:
    """The policy a run ended with: its latest checkpoint's policy/ folder, else meta's model."""
    reader = RunReader(run_dir)
    ckpts = reader.checkpoints()
    if ckpts and (ckpts[-1][1] / "policy" / "config.json").is_file():
        return ckpts[-1][1] / "policy"
    return reader.meta.get("model", "tiny-reasoner")


def plan_from_run(run_dir: str | os.PathLike, steps: str | None = None) -> tuple[pd.DataFrame, dict]:
    """The saved rollouts of a run (chosen steps) as a capture plan, and its source description."""
    reader = RunReader(run_dir)
    chosen = parse_steps(steps, reader.rollout_steps())
    frame = reader.all_rollouts(chosen)
    if frame.empty:
        raise DatasetError(f"{run_dir} has no saved rollouts; train with "
                           f"trainer.log_rollouts_every=1 to keep them.")
    score = frame["score"] if "score" in frame.columns else frame["reward"]
    plan = pd.DataFrame({
        "prompt_id": frame["prompt_id"].astype(str),
        "group": frame["step"].astype(str) + ":" + frame["group_id"].astype(str),
        "rollout_idx": frame["rollout_idx"].astype("int64"),
        "step": frame["step"].astype("int64"),
        "domain": frame["domain"].astype(str),
        "data_source": frame["data_source"].astype(str),
        "task": frame["task"].astype(str) if "task" in frame.columns else frame["data_source"],
        "prompt": frame["prompt"].astype(str),
        "completion": frame["completion"].astype(str),
        "reward": score.astype(float),
        "train_reward": frame["reward"].astype(float),
        "truncated": frame["truncated"].astype(bool),
        "probe_pred": frame["probe_pred"].astype(float),
    })
    for col in ("ground_truth",):
        if col in frame.columns:
            plan[col] = frame[col].astype(str)
    for col in ("prompt_token_ids", "token_ids"):
        if col in frame.columns:
            plan[col] = [list(map(int, v)) for v in frame[col]]
    source = {"kind": "run", "run_dir": str(Path(run_dir).resolve()), "steps": chosen}
    return plan, source


def fill_token_ids(plan: pd.DataFrame, tokenizer) -> pd.DataFrame:
    """Add prompt/response token ids from text where the source did not record them.

    The prompt goes through the chat template (`render_prompt`); the completion is tokenized and,
    unless truncated, ends with EOS, as sampled. Runs written before token ids were logged get
    ids that may differ from the sampled ones for merge-based tokenizers; a warning says so.
    """
    plan = plan.copy()
    if "prompt_token_ids" not in plan.columns:
        log.warning("rollouts carry no prompt_token_ids; re-encoding prompt text with the chat "
                    "template")
        cache: dict[str, list[int]] = {}
        ids = []
        for p in plan["prompt"]:
            if p not in cache:
                cache[p] = encode_prompts(tokenizer, [p])[0]
            ids.append(cache[p])
        plan["prompt_token_ids"] = ids
    if "token_ids" not in plan.columns:
        log.warning("rollouts carry no token_ids; re-tokenizing completion text")
        eos = tokenizer.eos_token_id
        trunc = plan["truncated"] if "truncated" in plan.columns else [False] * len(plan)
        plan["token_ids"] = [
            tokenizer(c, add_special_tokens=False)["input_ids"] + ([] if t or eos is None else [eos])
            for c, t in zip(plan["completion"], trunc)]
    return plan


def plan_from_generation(model, tokenizer, tasks: Sequence[str], *, prompts: int, samples: int,
                         seed: int = 0, split: str = "test", temperature: float = 1.0,
                         max_new_tokens: int = 128, batch_size: int = 256,
                         progress: Callable[[int], None] | None = None
                         ) -> tuple[pd.DataFrame, dict]:
    """Sample `samples` completions for `prompts` prompts of each task and score them.

    K >= 2 samples per prompt give each rollout a leave-one-out target and each prompt an Avg@K.
    """
    if samples < 2:
        raise DatasetError(f"--samples must be >= 2 (leave-one-out targets need siblings); got "
                           f"{samples}.")
    if prompts < 1:
        raise DatasetError(f"--prompts must be >= 1; got {prompts}.")
    frames = []
    for name in tasks:
        task = get_task(name)
        examples = task.sample(prompts, seed=seed, split=split)
        ids = encode_prompts(tokenizer, [e.prompt for e in examples])
        comps = sample_completions(model, tokenizer, [e.prompt for e in examples], samples,
                                   temperature=temperature, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, seed=seed, prompt_ids=ids,
                                   progress=progress)
        flat_e = [e for e in examples for _ in range(samples)]
        flat_c = [c for row in comps.texts for c in row]
        rewards = np.asarray(task.score_many(flat_c, flat_e), dtype=float)
        if not np.isfinite(rewards).all():
            raise DatasetError(f"task {task.name!r} returned NaN or inf rewards; a verifier must "
                               f"return numbers in [0, 1]. Fix the task's score function.")
        n = len(examples)
        frames.append(pd.DataFrame({
            "prompt_id": [e.prompt_id for e in flat_e],
            "group": [f"{task.name}:{i}" for i in range(n) for _ in range(samples)],
            "rollout_idx": [k for _ in range(n) for k in range(samples)],
            "step": -1,
            "domain": task.domain,
            "data_source": [e.data_source for e in flat_e],
            "task": task.name,
            "prompt": [render_prompt(tokenizer, e.prompt) for e in flat_e],
            "completion": flat_c,
            "ground_truth": [str(e.ground_truth) for e in flat_e],
            "reward": rewards,
            "truncated": [t for row in comps.truncated for t in row],
            "probe_pred": np.nan,
            "prompt_token_ids": [ids[i] for i in range(n) for _ in range(samples)],
            "token_ids": [t for row in comps.token_ids for t in row],
        }))
    plan = pd.concat(frames, ignore_index=True)
    assert all(c in plan.columns for c in PLAN_COLUMNS)
    source = {"kind": "generate", "tasks": list(tasks), "prompts": prompts, "samples": samples,
              "seed": seed, "split": split, "temperature": temperature,
              "max_new_tokens": max_new_tokens}
    return plan, source
