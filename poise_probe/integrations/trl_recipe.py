"""Train a local causal LM with POISE inside TRL, on this project's tasks; one process or many.

    python -m poise_probe.integrations.trl_recipe --model tiny-reasoner --tasks arith,boolean \\
        --output runs/trl-poise --max-steps 20
    accelerate launch --multi_gpu --num_processes 2 -m poise_probe.integrations.trl_recipe \\
        --model tiny-reasoner --output runs/trl-poise-2p --max-steps 20
    poise dashboard runs/trl-poise       # finds the run directory runs/trl-poise/poise

Defaults follow the built-in demo recipe (`poise demo`): 32 prompts x 2 completions a step,
lr 5e-5, probe layer 3 and alpha 10 for the tiny reasoner; `--probe key=value` sets any field
of the probe section. The global batch is split evenly over the processes, so one process and
two give the same step (accelerate's `--multi_gpu` launcher runs the processes on the CPU, over
gloo, where there is no GPU); `--resume` continues from the output's latest TRL checkpoint,
probe bank included.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

DEMO_PROBE = {"layer": 3, "alpha": 10.0, "bootstrap_steps": 8, "min_steps_to_fit": 4}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m poise_probe.integrations.trl_recipe",
        description="POISE inside TRL's GRPOTrainer on this project's tasks (accelerate launch "
                    "scales it out). Writes TRL's output and this project's run directory "
                    "(<output>/poise) that `poise dashboard` opens.")
    p.add_argument("--model", default="tiny-reasoner",
                   help="local Hugging Face causal LM folder, or tiny-reasoner (bundled)")
    p.add_argument("--tasks", default="arith,boolean",
                   help="comma-separated task names (poise tasks lists them)")
    p.add_argument("--output", required=True, help="TRL's output_dir")
    p.add_argument("--max-steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--prompts-per-step", type=int, default=32,
                   help="prompts per step, over all processes")
    p.add_argument("--num-generations", type=int, default=2, help="completions per prompt")
    p.add_argument("--prompts-per-task", type=int, default=512,
                   help="training examples sampled from each task")
    p.add_argument("--max-completion-length", type=int, default=96, help="new tokens at most")
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--seed", type=int, default=0, help="seed of data order and sampling")
    p.add_argument("--save-steps", type=int, default=10, help="TRL checkpoint every N steps")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint-N in --output")
    p.add_argument("--probe", action="append", default=[], metavar="KEY=VALUE",
                   help="a probe setting (config section probe), e.g. --probe layer=2; "
                        "repeatable")
    p.add_argument("--log-completions", action="store_true",
                   help="also write TRL's completion tables (<output>/completions)")
    return p.parse_args(argv)


def probe_settings(pairs: list[str]) -> dict:
    """The demo's probe settings updated by KEY=VALUE pairs (values parsed as YAML)."""
    out = dict(DEMO_PROBE)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--probe takes KEY=VALUE (e.g. layer=2); got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def main(argv=None) -> Path:
    args = parse_args(argv)
    trainer = build_trainer(args)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    return Path(trainer.args.poise_run_dir or Path(args.output) / "poise")


def build_trainer(args: argparse.Namespace, trainer_cls=None):
    """The recipe's `PoiseGRPOTrainer` (or a subclass of it) for parsed arguments."""
    from datasets import Dataset

    from poise_probe.integrations.task_data import TaskReward, task_rows
    from poise_probe.integrations.trl import PoiseGRPOConfig, PoiseGRPOTrainer
    from poise_probe.models import resolve_model_path

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows = args.prompts_per_step * args.num_generations
    if rows % world:
        raise SystemExit(f"--prompts-per-step x --num-generations = {rows} completions must "
                         f"split evenly over {world} processes.")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    dataset = Dataset.from_list(task_rows(tasks, args.prompts_per_task, seed=args.seed))
    config = PoiseGRPOConfig(
        output_dir=args.output, max_steps=args.max_steps, learning_rate=args.lr,
        num_generations=args.num_generations, per_device_train_batch_size=rows // world,
        max_completion_length=args.max_completion_length, temperature=args.temperature,
        beta=0.0, loss_type="dapo", seed=args.seed, logging_steps=1, report_to=[],
        save_strategy="steps", save_steps=args.save_steps, use_cpu=not _has_cuda(),
        bf16=_has_cuda(),  # TRL defaults to bf16 autocast, on the CPU too (slower there)
        log_completions=args.log_completions, poise_probe=probe_settings(args.probe))
    return (trainer_cls or PoiseGRPOTrainer)(model=str(resolve_model_path(args.model)),
                                             reward_funcs=[TaskReward()], args=config,
                                             train_dataset=dataset)


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
