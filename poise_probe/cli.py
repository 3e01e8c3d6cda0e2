"""The `poise` command line."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

import poise_probe
from poise_probe import __version__
from poise_probe.cli_args import add_sampling_args
from poise_probe.runtime import DEMO_OVERRIDES, quiet_library_bars

OVERRIDES_HELP = ("config overrides: section.key=value, a key only one section has "
                  "(adv_estimator=grpo) or a TRL/verl alias (learning_rate=1e-5); values are YAML")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown where they say something: not for required options, None, empty lists,
    flags, or help that names its default itself; blank lines in descriptions and epilogs
    separate paragraphs."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help, d = action.help or "", action.default
        if (action.required or d is None or d is False or d is argparse.SUPPRESS
                or (isinstance(d, list) and not d) or "default" in help.lower()):
            return help
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(super(HelpFormatter, self)._fill_text(p, width, indent)
                            for p in text.split("\n\n"))


class Parser(argparse.ArgumentParser):
    """argparse with `HelpFormatter` for every command; a callable epilog is built only when
    help is printed (the train epilog imports the estimator registry, hence torch)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    """The `poise` command line with every subcommand."""
    parser = Parser(
        prog="poise", description="POISE: RLVR with a probe on the policy's own internal states.")
    parser.add_argument("--version", action="version", version=f"poise-probe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level and show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_eval(sub)
    _add_train(sub)
    _add_demo(sub)
    _add_config(sub)
    _add_value_bench(sub)
    _add_ablate(sub)
    _add_search(sub)
    from poise_probe.study.commands import add_probe_parser

    add_probe_parser(sub)
    from poise_probe.dashboard import add_parser as add_dashboard_parser

    add_dashboard_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may also follow the options (`--output DIR optim.lr=1e-5`)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-")
                                                    for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:        # Ctrl-C, or SIGTERM in training (TrainingStopped)
        if args.verbose:
            raise
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"poise {args.command}: {signal.Signals(signum).name}: stopped", file=sys.stderr)
        return 128 + signum
    except Exception as exc:
        if args.verbose:
            raise
        print(f"poise {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 2


#: Exceptions whose message is written for the user; any other type is named in the line.
_USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, ImportError,
                NotADirectoryError, IsADirectoryError, PermissionError)


def error_line(exc: BaseException) -> str:
    """One line for an error: the message of errors meant for users (KeyError unquoted), the
    type and message of anything else, with the hint that --verbose shows the traceback."""
    from poise_probe.rundir import RunLockedError

    if isinstance(exc, KeyError) and exc.args:
        msg = str(exc.args[0])
    elif isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        msg = f"{exc.filename}: {exc.strerror}"
        if isinstance(exc, FileExistsError):
            msg += " (and is in the way: choose another path, or move it away)"
    else:
        msg = str(exc) or type(exc).__name__
    if not isinstance(exc, (*_USER_ERRORS, RunLockedError)):
        first = msg.strip().splitlines()[0] if msg.strip() else ""
        msg = f"{type(exc).__name__}: {first} (run `poise --verbose ...` for the traceback)"
    return " ".join(msg.split())        # one line, whatever the message's own layout


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="held-out accuracy of a model on tasks (Avg@K, Pass@K, mixed)",
                       description="Sample K completions for N held-out prompts of each task, "
                                   "score them with the task's verifier and report accuracy, "
                                   "Avg@K, Pass@K and the share of prompts with mixed outcomes.")
    p.add_argument("--model", default="tiny-reasoner",
                   help="local model directory (save_pretrained) or 'tiny-reasoner'")
    p.add_argument("--tasks", default=None,
                   help="comma-separated task names (arith, boolean, code_output, humaneval, "
                        "rg:<dataset>, or a .jsonl/.parquet file); default: one built-in family "
                        "per domain")
    p.add_argument("--n", type=int, default=100, help="held-out prompts per task")
    add_sampling_args(p, samples=8, max_new_tokens=128)
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling mass (1: the whole vocabulary)")
    p.add_argument("--batch-size", type=int, default=256, help="rows per generation batch")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if "
                                                  "available, else cpu)")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                   help="rollout engine: hf (transformers generate) or vllm (needs the vLLM "
                        "environment: make vllm-env)")
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
    engine = None
    if args.engine == "vllm":
        from poise_probe.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(args.model, tokenizer=tokenizer,
                            dtype="bfloat16" if device.startswith("cuda") else "float32",
                            max_model_len=args.max_new_tokens + 2048, seed=args.seed)
    try:
        with tqdm(total=args.n * args.samples * len(tasks), desc="eval", unit="completion",
                  file=sys.stderr, disable=engine is not None) as bar:
            report = evaluate(model, tokenizer, tasks, n=args.n, samples=args.samples,
                              temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              seed=args.seed, split=args.split, progress=bar.update,
                              engine=engine)
    finally:
        if engine is not None:
            engine.close()
    report["config"] = {"model": str(args.model), "tasks": names, "n": args.n,
                        "samples": args.samples, "temperature": args.temperature,
                        "top_p": args.top_p, "seed": args.seed, "split": args.split,
                        "device": device, "engine": args.engine}
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


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="RL training (POISE, GRPO, DAPO, RLOO, ...) from a recipe",
                       description="Train with a YAML recipe; override any key as key=value "
                                   "(section.key or a unique key name, e.g. optim.lr=1e-5 "
                                   "adv_estimator=grpo). `poise config show` prints the "
                                   "resulting configuration, docs/config.md every key.",
                       epilog=_train_epilog)
    p.add_argument("--config", default=None,
                   help="YAML recipe (training/configs/*.yaml; default: the built-in defaults)")
    p.add_argument("--output", default=None, help="run directory (default: trainer.output_dir)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its last checkpoint (a run killed "
                        "before its first checkpoint restarts from step 0 in place)")
    p.add_argument("--allow-change", action="store_true",
                   help="with --resume: allow overrides that change what the run is "
                        "(model.path, adv_estimator, data.tasks, ...); recorded in meta.json")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.set_defaults(func=_run_train)


def recipe_dir() -> Path | None:
    """training/configs of this checkout (the package's parent folder); a wheel has none."""
    folder = Path(poise_probe.__file__).resolve().parents[1] / "training" / "configs"
    return folder if folder.is_dir() else None


def _train_epilog() -> str:
    from poise_probe.config import estimator_names

    folder = recipe_dir()
    names = sorted(p.stem for p in folder.glob("*.yaml")) if folder else []
    if names:
        try:
            shown = folder.relative_to(Path.cwd())
        except ValueError:
            shown = folder
        recipes = f"recipes (--config {shown}/NAME.yaml): {', '.join(names)}."
    else:
        recipes = ("recipes: none here; they are not installed with the package, they live in "
                   "training/configs/ of a source checkout.")
    return (f"{recipes}\n\nadvantage estimators (algorithm.adv_estimator=NAME): "
            f"{', '.join(estimator_names())}.")


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="the effective configuration, each field's help and source",
                       description="show: the configuration a `poise train` with these arguments "
                                   "would use, each value's source (default, file, override) and "
                                   "help; docs: docs/config.md, generated from the dataclasses.")
    p.add_argument("action", choices=["show", "docs"],
                   help="show: the effective configuration; docs: print docs/config.md")
    p.add_argument("--config", default=None,
                   help="YAML recipe (training/configs/*.yaml; default: the built-in defaults)")
    p.add_argument("--json", action="store_true", help="show: print one JSON list of rows")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.set_defaults(func=_run_config)


def _run_config(args) -> int:
    from poise_probe.config import load_config_with_sources
    from poise_probe.config_docs import config_markdown, describe

    if args.action == "docs":
        print(config_markdown(), end="")
        return 0
    cfg, sources = load_config_with_sources(args.config, args.overrides)
    rows = describe(cfg, sources)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"effective configuration ({args.config or 'defaults'})")
    for col in ("key", "value", "from", "help"):
        table.add_column(col, overflow="fold")
    for r in rows:
        src = r["source"]
        table.add_row(r["key"] + (f" ({', '.join(r['aliases'])})" if r["aliases"] else ""),
                      repr(r["value"]) if isinstance(r["value"], str) else str(r["value"]),
                      src if src == "default" else f"[bold]{src}[/bold]", r["help"])
    Console(width=160).print(table)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="POISE on the bundled tiny reasoner, a few minutes on a CPU",
                       description="Train the tiny reasoner with POISE on the default task mix, "
                                   "evaluating held-out accuracy before and after.")
    p.add_argument("--output", default=None, help="run directory (default: runs/demo-<time>)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=OVERRIDES_HELP + ", applied after the demo's own")
    p.set_defaults(func=_run_demo)


def _add_value_bench(sub) -> None:
    p = sub.add_parser(
        "value-bench", help="score the value estimators against Monte-Carlo values",
        description="Sample rollouts of the policy (--config / key=value, model.path) on train "
                    "and held-out prompts, fit every value estimator on the same train "
                    "rollouts, and score them against Monte-Carlo values of held-out prompts "
                    "and of states cut from their rollouts (SVEB's protocol): MAE and Pearson r "
                    "with bootstrap intervals, the MCS@1/MCS@2 noise rows and the published "
                    "figures. Writes a study directory the dashboard's Studies page shows.")
    p.add_argument("--config", default=None, help="YAML recipe whose model, rollout, probe, "
                                                  "critic, hista and numca sections apply "
                                                  "(default: the demo's, the tiny reasoner)")
    p.add_argument("--out", required=True, help="study directory (tables and figures go here)")
    p.add_argument("--tasks", default="arith,code_output,boolean",
                   help="comma-separated tasks: the math, code and logic mix")
    p.add_argument("--train-prompts", type=int, default=64,
                   help="train-split prompts per task the estimators are fitted on")
    p.add_argument("--eval-prompts", type=int, default=32,
                   help="held-out prompts per task (one cut state each)")
    p.add_argument("--pool", type=int, default=8,
                   help="rollouts per prompt the estimators see (group means use 2, 4, 8)")
    p.add_argument("--mc", type=int, default=16,
                   help="Monte-Carlo rollouts per held-out prompt and per state (the targets)")
    p.add_argument("--estimators", default="all",
                   help="comma-separated estimators, or all (see `poise value-bench --list`)")
    p.add_argument("--list", action="store_true", help="list the estimators and exit")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts, sampling and bootstrap")
    p.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples for the CIs")
    p.add_argument("--no-png", action="store_true", help="skip PNG export (HTML/JSON only)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.set_defaults(func=_run_value_bench)


def _run_value_bench(args) -> int:
    from poise_probe.config import load_config
    from poise_probe.valuebench import default_estimators, run_value_bench

    if args.list:
        print("\n".join(default_estimators()))
        return 0
    # without a recipe: the demo's (the bundled tiny reasoner on a CPU)
    cfg = load_config(args.config, (DEMO_OVERRIDES if args.config is None else [])
                      + args.overrides)
    names = None if args.estimators == "all" else [n.strip() for n in args.estimators.split(",")]
    with quiet_library_bars():
        table = run_value_bench(
            cfg, args.out, tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
            n_train=args.train_prompts, n_eval=args.eval_prompts, pool=args.pool, mc=args.mc,
            estimators=names, seed=args.seed, n_boot=args.bootstrap, png=not args.no_png,
            progress=lambda msg: print(f"value-bench: {msg}", file=sys.stderr, flush=True))
    ours = table[~table["estimator"].str.startswith("paper")]
    with _pd_options():
        print(ours.round(3).to_string(index=False))
    print(f"written to {args.out}/value_bench", file=sys.stderr)
    return 0


def _pd_options():
    import pandas as pd
    return pd.option_context("display.width", 160, "display.max_columns", 20)


def _add_ablate(sub) -> None:
    p = sub.add_parser(
        "ablate", help="the paper's training ablations: several estimators x seeds",
        description="Train the tiny reasoner (the demo recipe) with each arm's estimator and "
                    "seed at 64 rollouts per step, resuming unfinished runs, then write held-out "
                    "accuracy against generated tokens and the variance-reduction ratio with "
                    "95%% intervals over seeds to a study directory.")
    p.add_argument("--out", required=True, help="study directory; runs go to OUT/runs/")
    p.add_argument("--arms", default="poise,poise_self,poise_prompt,grpo_8,rloo_2,ppo_critic",
                   help="comma-separated arms (see poise_probe.ablate.ARMS)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated trainer seeds")
    p.add_argument("--steps", type=int, default=60, help="training steps per run")
    p.add_argument("--eval-every", type=int, default=15, help="held-out evaluation interval")
    p.add_argument("--eval-n", type=int, default=50, help="held-out prompts per task")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, in separate processes (one torch thread each)")
    p.add_argument("--no-png", action="store_true", help="skip PNG export (HTML/JSON only)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=OVERRIDES_HELP + ", applied to every arm after its own")
    p.set_defaults(func=_run_ablate)


def _run_ablate(args) -> int:
    from poise_probe.ablate import run_ablation

    with quiet_library_bars():
        tables = run_ablation(
            args.out, arms=[a.strip() for a in args.arms.split(",") if a.strip()],
            seeds=[int(x) for x in args.seeds.split(",") if x.strip()], steps=args.steps,
            eval_every=args.eval_every, eval_n=args.eval_n, overrides=args.overrides,
            jobs=args.jobs, png=not args.no_png,
            progress=lambda msg: print(f"ablate: {msg}", file=sys.stderr, flush=True))
    with _pd_options():
        print(tables["summary"].round(3).to_string(index=False))
    return 0


def _add_search(sub) -> None:
    p = sub.add_parser(
        "search", help="mechanism search: evolve estimator, normalisation, masking, clipping, "
                       "probe and lr settings at a fixed token budget",
        description="An evolutionary search over this trainer's configurations on the demo "
                    "recipe (the bundled tiny reasoner): each trial is a short training run at "
                    "a fixed generated-token budget, scored by held-out accuracy on the task "
                    "mix. Parents are chosen by the acquisition rule (performance, diversity, "
                    "lineage gain; docs/search.md), children by mutation and crossover and kept "
                    "when the config accepts them. The best candidates are rerun with other "
                    "seeds. The archive (OUTPUT/archive.json), every trial's run "
                    "(OUTPUT/trials/tNNNN) and the summary (a study folder) survive a kill: "
                    "rerunning the command resumes without repeating finished trials. "
                    "`poise dashboard OUTPUT` shows the family tree (Search page).")
    p.add_argument("--output", required=True, help="search folder (archive, trials, summary)")
    p.add_argument("--budget", type=int, required=True,
                   help="generated tokens per trial (tokens/sampled, every generation round)")
    p.add_argument("--trials", type=int, required=True,
                   help="configurations to evaluate (the repeats come on top)")
    p.add_argument("--workers", type=int, default=None,
                   help="trials trained at once, in separate processes (one torch thread each); "
                        "default: one per CPU core")
    p.add_argument("--init", type=int, default=3,
                   help="initial population: the base recipe and random valid configurations")
    p.add_argument("--repeats", type=int, default=2,
                   help="best candidates rerun with other seeds to measure the seed variation")
    p.add_argument("--seeds-per-repeat", type=int, default=2,
                   help="extra seeds for each repeated candidate")
    p.add_argument("--seed", type=int, default=0, help="seed of the proposals and of the runs")
    p.add_argument("--eval-n", type=int, default=50, help="held-out prompts per task")
    p.add_argument("--eval-samples", type=int, default=4, help="samples per held-out prompt")
    p.add_argument("--no-png", action="store_true", help="skip PNG export (HTML/JSON only)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=OVERRIDES_HELP + ", applied to the base recipe (the demo's) before each "
                                         "trial's genes")
    p.set_defaults(func=_run_search)


def _run_search(args) -> int:
    from poise_probe.search import run_search

    with quiet_library_bars():
        tables = run_search(
            args.output, budget=args.budget, trials=args.trials,
            workers=args.workers if args.workers is not None else (os.cpu_count() or 1),
            seed=args.seed, repeats=args.repeats, seeds_per_repeat=args.seeds_per_repeat,
            init=args.init, eval_n=args.eval_n, eval_samples=args.eval_samples,
            base=DEMO_OVERRIDES + list(args.overrides), png=not args.no_png,
            progress=lambda msg: print(f"search: {msg}", file=sys.stderr, flush=True))
    with _pd_options():
        print(tables["best"].drop(columns=["overrides"]).round(3).to_string(index=False))
    print(f"written to {args.output} (poise dashboard {args.output}: the Search page)",
          file=sys.stderr)
    return 0


def _run_train(args) -> int:
    from poise_probe.config import load_config

    if args.allow_change and not args.resume:
        raise ValueError("--allow-change only applies to --resume (a new run has nothing to "
                         "change); drop it.")
    if args.config is None and not args.overrides and not args.resume:
        logging.getLogger("poise_probe.cli").warning(
            "no --config and no overrides: training the built-in defaults (see `poise config "
            "show`); recipes live in training/configs/, e.g. --config "
            "training/configs/poise_tiny.yaml")
    config = args.config
    if args.resume and config is None and args.output:
        stored = Path(args.output) / "config.yaml"
        if stored.is_file():             # a resume continues with the run's own recipe
            config = stored
    cfg = load_config(config, args.overrides)
    return _train_with_progress(cfg, args.output, resume=args.resume,
                                allow_change=args.allow_change)


def _run_demo(args) -> int:
    import time as _time

    from poise_probe.config import load_config

    cfg = load_config(None, DEMO_OVERRIDES + list(args.overrides))
    out = args.output or f"runs/demo-{_time.strftime('%Y%m%d-%H%M%S')}"
    return _train_with_progress(cfg, out, resume=False, demo=True)


def _train_with_progress(cfg, output, resume: bool, demo: bool = False,
                         allow_change: bool = False) -> int:
    from tqdm import tqdm

    from poise_probe.rundir import RunReader
    from poise_probe.trainer import train

    out = output or cfg.trainer.output_dir
    bars: list = []                     # drawn once the run has started (checks passed)

    def on_start(step: int) -> None:
        bars.append(tqdm(total=cfg.trainer.total_steps, initial=step, unit="step",
                         desc=f"{cfg.algorithm.adv_estimator}", file=sys.stderr))

    def on_step(step: int, m: dict) -> None:
        if not bars:
            on_start(step - 1)
        bars[0].update(1)
        tqdm.write(format_step(step, m), file=sys.stderr)

    try:
        with quiet_library_bars():
            run_dir = train(cfg, out, resume=resume, progress=on_step, started=on_start,
                            allow_change=allow_change)
    finally:
        for bar in bars:
            bar.close()
    reader = RunReader(run_dir)
    _print_before_after(reader)
    print(f"run directory: {run_dir}")
    if demo:
        from poise_probe.dashboard import dashboard_command

        print(f"open the dashboard: {dashboard_command(run_dir)}")
    return 0


def format_step(step: int, m: dict) -> str:
    """The one-line summary printed after every training step."""
    parts = [f"step {step:>4}", f"reward {m.get('reward/mean', float('nan')):.3f}"]
    for key, label, fmt in (("probe/mae", "probe mae", ".3f"), ("probe/pearson", "r", ".2f"),
                            ("adv/var_reduction", "var red", ".2f"),
                            ("actor/grad_norm", "|g|", ".2f"),
                            ("eval/accuracy", "eval acc", ".3f"),
                            ("timing_s/step", "s", ".1f")):
        v = m.get(key)
        if isinstance(v, (int, float)):
            parts.append(f"{label} {v:{fmt}}")
    return " | ".join(parts)


def _print_before_after(reader) -> None:
    from rich.console import Console
    from rich.table import Table

    steps = reader.eval_steps()
    if len(steps) < 2:
        return
    first, last = reader.eval_report(steps[0]), reader.eval_report(steps[-1])
    k = first["overall"]["k"]
    table = Table(title=f"held-out Avg@{k}: step {steps[0]} -> step {steps[-1]}")
    for col in ("task", "domain", "before", "after", "change"):
        table.add_column(col, justify="left" if col in ("task", "domain") else "right")
    rows = [(n, s.get("domain", ""), s, last["tasks"][n]) for n, s in first["tasks"].items()]
    rows.append(("overall", "", first["overall"], last["overall"]))
    for name, dom, a, b in rows:
        table.add_row(name, dom, f"{a['accuracy']:.3f}", f"{b['accuracy']:.3f}",
                      f"{b['accuracy'] - a['accuracy']:+.3f}")
    Console(file=sys.stdout).print(table)


if __name__ == "__main__":
    raise SystemExit(main())
