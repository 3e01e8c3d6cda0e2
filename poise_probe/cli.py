"""The `poise` command line."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from poise_probe import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="poise", description="POISE: RLVR with a probe on the policy's own internal states.")
    parser.add_argument("--version", action="version", version=f"poise-probe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_eval(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"poise {args.command}: error: {msg}", file=sys.stderr)
        return 2


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="held-out accuracy of a model on tasks (Avg@K, Pass@K, mixed)",
                       description="Sample K completions for N held-out prompts of each task, "
                                   "score them with the task's verifier and report accuracy, "
                                   "Avg@K, Pass@K and the share of prompts with mixed outcomes.")
    p.add_argument("--model", default="tiny-reasoner",
                   help="local model directory (save_pretrained) or 'tiny-reasoner' (default)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated task names (arith, boolean, code_output, humaneval, "
                        "rg:<dataset>, or a .jsonl/.parquet file); default: one built-in family "
                        "per domain")
    p.add_argument("--n", type=int, default=100, help="held-out prompts per task (default 100)")
    p.add_argument("--samples", type=int, default=8, help="completions per prompt, K (default 8)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", choices=["test", "train"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if "
                                                  "available, else cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    import torch
    from tqdm import tqdm

    from poise_probe.evaluation import evaluate
    from poise_probe.models import load_policy
    from poise_probe.tasks import DEFAULT_TASKS, get_task

    for name, val, lo in (("--n", args.n, 1), ("--samples", args.samples, 1),
                          ("--batch-size", args.batch_size, 1),
                          ("--max-new-tokens", args.max_new_tokens, 1)):
        if val < lo:
            raise ValueError(f"{name} must be >= {lo}; got {val}.")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(
        DEFAULT_TASKS)
    tasks = [get_task(n) for n in names]  # fail on a bad name before loading the model
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_policy(args.model, device=device)
    with tqdm(total=args.n * args.samples * len(tasks), desc="eval", unit="completion",
              file=sys.stderr) as bar:
        report = evaluate(model, tokenizer, tasks, n=args.n, samples=args.samples,
                          temperature=args.temperature, top_p=args.top_p,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          seed=args.seed, split=args.split, progress=bar.update)
    report["config"] = {"model": str(args.model), "tasks": names, "n": args.n,
                        "samples": args.samples, "temperature": args.temperature,
                        "top_p": args.top_p, "seed": args.seed, "split": args.split,
                        "device": device}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_eval_table(report)
    return 0


def _print_eval_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    k = report["overall"]["k"]
    table = Table(title=f"held-out evaluation ({report['config']['model']}, K={k}, "
                        f"T={report['config']['temperature']})")
    for col in ("task", "domain", "prompts", f"Avg@{k}", f"Pass@{k}", "mixed"):
        table.add_column(col, justify="left" if col in ("task", "domain") else "right")
    rows = list(report["tasks"].items()) + [("overall", report["overall"])]
    for name, s in rows:
        table.add_row(name, s.get("domain", ""), str(s["n_prompts"]), f"{s['avg_at_k']:.3f}",
                      f"{s['pass_at_k']:.3f}", f"{s['mixed_fraction']:.3f}")
    Console().print(table)


if __name__ == "__main__":
    raise SystemExit(main())
