"""Runs made elsewhere, written the way TRL 1.16 and verl 0.9.1 write them (no TRL or verl needed).

- `write_trl_run`: a `GRPOTrainer` output_dir: `completions/completions_{step:05d}.parquet` made by
  the same `pd.DataFrame(table).to_parquet(path)` as `GRPOTrainer.log`, and `trainer_state.json`
  (top level and per `checkpoint-N/`) with the Trainer's `log_history` entries.
- `write_verl_dump`: a `trainer.rollout_data_dir`: `{step}.jsonl` made as verl's
  `RayPPOTrainer._write_generations` makes it (`json.dumps(entry, ensure_ascii=False,
  default=str)` per line, extra infos kept when they have one value per rollout).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

PROMPTS = ["What is 2+3?", "Is 7 prime?", "Name a colour."]


def trl_table(step: int, *, k: int = 2, chat: bool = False, poise: bool = False,
              seed: int = 0) -> dict:
    """The `table` dict `GRPOTrainer.log` builds: step, prompt, completion, one column per reward
    function, extra columns (`log_extra`; POISE's probe_pred and baseline), advantage."""
    rng = np.random.default_rng(seed + step)
    prompts, completions = [], []
    for p in PROMPTS:
        for j in range(k):
            text = f"answer {j} to {p}"
            if chat:
                prompts.append([{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": p}])
                completions.append([{"role": "assistant", "content": text}])
            else:
                prompts.append(p)
                completions.append(text)
    n = len(prompts)
    correct = rng.integers(0, 2, n).astype(float)
    fmt = np.full(n, 0.5)
    rewards = correct + fmt
    groups = rewards.reshape(-1, k)
    adv = ((groups - groups.mean(1, keepdims=True))
           / (groups.std(1, ddof=1, keepdims=True) + 1e-4)).ravel()
    table = {"step": [step] * n, "prompt": prompts, "completion": completions,
             "correct": correct.tolist(), "format": fmt.tolist()}
    if poise:
        table["probe_pred"] = rng.uniform(0, 1, n).tolist()
        table["baseline"] = rng.uniform(0, 1, n).tolist()
    table["advantage"] = adv.tolist()
    return table


def trl_log_entry(step: int, table: dict) -> dict:
    """A `log_history` entry as GRPOTrainer logs it (its keys, this step's reward numbers)."""
    r = np.asarray(table["correct"]) + np.asarray(table["format"])
    return {"clip_ratio/high_max": 0.0, "clip_ratio/high_mean": 0.0, "clip_ratio/low_mean": 0.0,
            "clip_ratio/low_min": 0.0, "clip_ratio/region_mean": 0.0,
            "completions/clipped_ratio": 0.25, "completions/mean_length": 7.5,
            "entropy": 2.0 - 0.1 * step, "epoch": 0.1 * step,
            "frac_reward_zero_std": 0.0, "grad_norm": 1.0 / step, "learning_rate": 1e-6,
            "loss": 0.01 * step, "num_tokens": 100.0 * step, "reward": float(r.mean()),
            "reward_std": float(r.std(ddof=1)),
            "rewards/correct/mean": float(np.mean(table["correct"])),
            "rewards/correct/std": float(np.std(table["correct"], ddof=1)),
            "rewards/format/mean": 0.5, "rewards/format/std": 0.0,
            "step": step, "step_time": 0.2}


def trainer_state(entries: list[dict], global_step: int, max_steps: int) -> dict:
    return {"best_global_step": None, "best_metric": None, "best_model_checkpoint": None,
            "epoch": 0.1 * global_step, "eval_steps": 500, "global_step": global_step,
            "is_hyper_param_search": False, "is_local_process_zero": True,
            "is_world_process_zero": True, "log_history": entries, "logging_steps": 1,
            "max_steps": max_steps, "num_input_tokens_seen": 100 * global_step,
            "num_train_epochs": 1, "save_steps": 1,
            "stateful_callbacks": {"TrainerControl": {"args": {}, "attributes": {}}},
            "total_flos": 0.0, "train_batch_size": 6, "trial_name": None,
            "trial_params": None}


def write_trl_run(out: Path, steps: int = 3, *, max_steps: int | None = None, chat: bool = False,
                  poise: bool = False, state: bool = True, save_state: bool = True) -> Path:
    """A TRL output_dir after `steps` steps (checkpoint every step; `save_state()` at the end
    when `save_state`; `max_steps` defaults to `steps`, i.e. a finished run)."""
    (out / "completions").mkdir(parents=True, exist_ok=True)
    entries = []
    for step in range(1, steps + 1):
        table = trl_table(step, chat=chat, poise=poise)
        pd.DataFrame(table).to_parquet(out / "completions" / f"completions_{step:05d}.parquet")
        entries.append(trl_log_entry(step, table))
        if state:
            ckpt = out / f"checkpoint-{step}"
            ckpt.mkdir(exist_ok=True)
            (ckpt / "trainer_state.json").write_text(json.dumps(
                trainer_state(list(entries), step, max_steps or steps), indent=2))
            (ckpt / "config.json").write_text(json.dumps(
                {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}))
    if state and save_state:
        entries.append({"epoch": 0.1 * steps, "step": steps, "total_flos": 0.0,
                        "train_loss": 0.01, "train_runtime": 1.5})
        (out / "trainer_state.json").write_text(json.dumps(
            trainer_state(entries, steps, max_steps or steps), indent=2))
        (out / "README.md").write_text("---\nbase_model: Qwen/Qwen3-0.6B\nlibrary_name: "
                                       "transformers\ntags:\n- grpo\n- trl\n---\n\n# card\n")
    return out


def verl_rows(step: int, *, k: int = 2, validation: bool = False, poise: bool = False,
              seed: int = 0) -> tuple[list, list, list, list, dict]:
    """(inputs, outputs, gts, scores, reward_extra_infos_dict) as verl hands them to
    `_dump_generations`; the rows of a prompt are not adjacent (verl's balance_batch reorders)."""
    rng = np.random.default_rng(100 + seed + step)
    order = [(g, j) for j in range(k) for g in range(len(PROMPTS))]   # interleaved groups
    inputs = [f"user\n{PROMPTS[g]}\nassistant\n" for g, _ in order]
    outputs = [f"<think>try {j}</think><answer>{g + j}</answer>" for g, j in order]
    gts = [str(g) if g != 2 else {"target": ["red", "blue"]} for g, _ in order]
    scores = rng.integers(0, 2, len(order)).astype(float).tolist()
    extra = {"acc": [bool(s) for s in scores], "pred": [str(g + j) for g, j in order],
             "too_short": [1.0]}           # not one value per rollout: verl leaves it out
    if validation:
        extra["reward"] = list(scores)
    if poise:
        extra["probe_pred"] = rng.uniform(0, 1, len(order)).tolist()
        extra["baseline"] = rng.uniform(0, 1, len(order)).tolist()
    return inputs, outputs, gts, scores, extra


def write_verl_step(dump_path: Path, global_steps: int, inputs, outputs, gts, scores,
                    reward_extra_infos_dict) -> Path:
    """verl 0.9.1's `RayPPOTrainer._write_generations`, line for line."""
    os.makedirs(dump_path, exist_ok=True)
    filename = os.path.join(dump_path, f"{global_steps}.jsonl")
    n = len(inputs)
    base_data = {"input": inputs, "output": outputs, "gts": gts, "score": scores,
                 "step": [global_steps] * n}
    for k, v in reward_extra_infos_dict.items():
        if len(v) == n:
            base_data[k] = v
    with open(filename, "w") as f:
        for i in range(n):
            entry = {k: v[i] for k, v in base_data.items()}
            f.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
    return Path(filename)


def write_verl_dump(out: Path, steps: int = 3, **kw) -> Path:
    """A rollout_data_dir after `steps` training steps (verl counts from 1)."""
    for step in range(1, steps + 1):
        write_verl_step(out, step, *verl_rows(step, **kw))
    return out


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every file and folder under `root`: to show nothing was written."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.stat(Path(dirpath, name))
            out[str(Path(dirpath, name))] = (st.st_mtime_ns, st.st_size)
    return out
