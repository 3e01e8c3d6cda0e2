"""`poise probe capture | sweep | calibrate | transfer`: the probe-study command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_probe_parser(sub) -> None:
    p = sub.add_parser("probe", help="probe studies: capture activations, sweep layers and "
                                     "pooling, calibration, cross-domain transfer",
                       description="Study the POISE value probe on captured activations.")
    psub = p.add_subparsers(dest="probe_command", metavar="STUDY")
    _add_capture(psub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers; got {text!r}.") from None
    if not vals:
        raise ValueError(f"{what} is empty; give at least one value.")
    return vals


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers; got {text!r}.") from None
    if not vals or any(v <= 0 for v in vals):
        raise ValueError(f"{what} needs positive values; got {text!r}.")
    return vals


# -- capture ---------------------------------------------------------------------------------

def _add_capture(psub) -> None:
    p = psub.add_parser(
        "capture", help="pool residual streams of chosen layers for rollouts, to disk",
        description="Capture pooled residual streams (nnsight) and token-entropy statistics of "
                    "rollouts from a trainer run directory (--run) or sampled fresh on tasks "
                    "(--tasks), into a resumable dataset directory: rerun the same command to "
                    "resume an interrupted capture.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="trainer run directory whose saved rollouts to capture")
    src.add_argument("--tasks", help="comma-separated tasks to sample fresh rollouts on "
                                     "(arith,boolean,code_output, rg:<name>, files)")
    p.add_argument("--out", required=True, help="dataset directory to write (or resume)")
    p.add_argument("--model", default=None,
                   help="local causal LM or 'tiny-reasoner'; with --run the default is the run's "
                        "latest checkpoint policy, with --tasks the tiny reasoner")
    p.add_argument("--steps", default=None, help="with --run: all, A:B (inclusive) or a list")
    p.add_argument("--prompts", type=int, default=200, help="with --tasks: prompts per task")
    p.add_argument("--samples", type=int, default=4, help="with --tasks: rollouts per prompt, K")
    p.add_argument("--split", default="test", choices=["test", "train"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--gen-batch-size", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; entropies use logits / temperature")
    p.add_argument("--layers", default="all", help="'all' or comma-separated 0-based blocks")
    p.add_argument("--prompt-windows", default="1,5,10,32", help="n of prompt_last_n poolings")
    p.add_argument("--reasoning-windows", default="1,5,10,32",
                   help="n of reasoning_last_n poolings (ending at </think>)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--backend", default="nnsight", choices=["nnsight", "hooks"])
    p.add_argument("--batch-size", type=int, default=32, help="rollouts per forward")
    p.add_argument("--shard-rows", type=int, default=256, help="rollouts per shard file")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_run_capture)


def _run_capture(args) -> int:
    import torch
    from tqdm import tqdm

    from poise_probe.capture import (
        CaptureSpec,
        capture,
        plan_from_generation,
        plan_from_run,
        prepare_plan,
        run_model_path,
    )
    from poise_probe.capture.dataset import fingerprint_model
    from poise_probe.models import load_policy
    from poise_probe.tasks import get_task

    for name, val in (("--prompts", args.prompts), ("--samples", args.samples),
                      ("--batch-size", args.batch_size), ("--shard-rows", args.shard_rows),
                      ("--max-new-tokens", args.max_new_tokens)):
        if val < 1:
            raise ValueError(f"{name} must be >= 1; got {val}.")
    out = Path(args.out)
    if args.run is not None and not Path(args.run).is_dir():
        raise FileNotFoundError(f"--run {args.run}: no such run directory.")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    for t in tasks:
        get_task(t)                                  # a bad task name fails before loading
    model_path = args.model or (run_model_path(args.run) if args.run else "tiny-reasoner")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_policy(model_path, device=device)
    n_layers = _num_layers(model)
    layers = list(range(n_layers)) if args.layers == "all" else _ints(args.layers, "--layers")
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"--layers {args.layers}: layer(s) {bad} out of range; the model has "
                         f"{n_layers} decoder blocks (0..{n_layers - 1}).")
    spec = CaptureSpec(layers=tuple(layers),
                       prompt_windows=tuple(_ints(args.prompt_windows, "--prompt-windows")),
                       reasoning_windows=tuple(_ints(args.reasoning_windows,
                                                     "--reasoning-windows")),
                       temperature=args.temperature, dtype=args.dtype)
    if args.run:
        from poise_probe.capture.sources import parse_steps
        from poise_probe.rundir import RunReader

        steps = parse_steps(args.steps, RunReader(args.run).rollout_steps())
        key = {"kind": "run", "run_dir": str(Path(args.run).resolve()), "steps": steps}
        plan, source = prepare_plan(out, lambda: plan_from_run(args.run, args.steps), key)
    else:
        key = {"kind": "generate", "tasks": tasks, "prompts": args.prompts,
               "samples": args.samples, "seed": args.seed, "split": args.split,
               "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
               "model_fingerprint": fingerprint_model(model)}

        def generate():
            total = len(tasks) * args.prompts * args.samples
            with tqdm(total=total, desc="sample", unit="rollout", file=sys.stderr) as bar:
                return plan_from_generation(
                    model, tok, tasks, prompts=args.prompts, samples=args.samples,
                    seed=args.seed, split=args.split, temperature=args.temperature,
                    max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch_size,
                    progress=bar.update)

        plan, source = prepare_plan(out, generate, key)
    shards_dir = out / "shards"
    done = len(list(shards_dir.glob("shard_*.parquet"))) if shards_dir.is_dir() else 0
    if done:
        print(f"resumed: {done} shard(s) already captured in {out}", file=sys.stderr)
    with tqdm(total=len(plan), desc="capture", unit="rollout", file=sys.stderr) as bar:
        ds = capture(model, tok, plan, out, spec, source=source, model_path=str(model_path),
                     batch_size=args.batch_size, shard_rows=args.shard_rows,
                     backend=args.backend, progress=bar.update)
    idx = ds.index
    print(f"captured {len(ds)} rollouts ({idx['group'].nunique()} prompt groups; "
          f"{', '.join(f'{d} {n}' for d, n in idx['domain'].value_counts().sort_index().items())})"
          f" x {len(spec.layers)} layers x {len(spec.poolings)} poolings -> {out}")
    print(f"next: poise probe sweep --data {out} --out {out}/study")
    return 0


def _num_layers(model) -> int:
    from poise_probe.features import find_decoder_layers

    return len(find_decoder_layers(model))


