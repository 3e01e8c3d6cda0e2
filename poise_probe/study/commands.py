"""`poise probe capture | sweep | calibrate | transfer`: the probe-study command line.

Help shows defaults through `poise_probe.cli.HelpFormatter`, which `poise`'s parser hands down."""
from __future__ import annotations

import sys
from pathlib import Path

from poise_probe.cli_args import add_sampling_args


def add_probe_parser(sub) -> None:
    p = sub.add_parser("probe", help="probe studies: capture activations, sweep layers and "
                                     "pooling, calibration, cross-domain transfer",
                       description="Study the POISE value probe on captured activations.")
    psub = p.add_subparsers(dest="probe_command", metavar="STUDY")
    _add_capture(psub)
    _add_sweep(psub)
    _add_calibrate(psub)
    _add_transfer(psub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers; got {text!r}.") from None
    if not vals:
        raise ValueError(f"{what} is empty; give at least one value.")
    return vals


def _alphas(text: str) -> list[float]:
    """--alphas: "default" (study.analyses.DEFAULT_ALPHAS) or comma-separated floats."""
    if text == "default":
        from poise_probe.study.analyses import DEFAULT_ALPHAS
        return list(DEFAULT_ALPHAS)
    return _floats(text, "--alphas")


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
                    "resume an interrupted capture.")
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
    add_sampling_args(p, samples=4, max_new_tokens=96, when="with --tasks: ")
    p.add_argument("--gen-batch-size", type=int, default=256,
                   help="with --tasks: rows per generation batch")
    p.add_argument("--layers", default="all", help="'all' or comma-separated 0-based blocks")
    p.add_argument("--prompt-windows", default="1,5,10,32", help="n of prompt_last_n poolings")
    p.add_argument("--reasoning-windows", default="1,5,10,32",
                   help="n of reasoning_last_n poolings (ending at </think>)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype the pooled features are stored in")
    p.add_argument("--backend", default="nnsight", choices=["nnsight", "hooks"],
                   help="capture under nnsight, or plain torch hooks (for equivalence checks)")
    p.add_argument("--batch-size", type=int, default=32, help="rollouts per forward")
    p.add_argument("--shard-rows", type=int, default=256, help="rollouts per shard file")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
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
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; the capture writes a dataset folder: "
                              f"choose another --out.")
    if (out / "meta.json").is_file():
        raise ValueError(f"--out {out} is a training run directory; a capture writes its own "
                         f"folder: choose another --out (e.g. {out}-capture).")
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




# -- analyses --------------------------------------------------------------------------------

def _common(p, *, need_data: bool = True) -> None:
    p.add_argument("--data", nargs="+", required=need_data, default=None, metavar="DIR",
                   help="capture dataset directories (several are joined; they must share model, "
                        "layers and poolings)")
    p.add_argument("--out", required=True, help="study directory (tables and figures go here)")
    p.add_argument("--alphas", default="default",
                   help="ridge alphas, comma-separated; several = nested grouped CV picks one "
                        "per fold; default: 20 from 1e-2 to 1e5, log-spaced")
    p.add_argument("--folds", type=int, default=5, help="grouped CV folds (by prompt)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold split and bootstraps")
    p.add_argument("--no-png", action="store_true", help="skip PNG export (HTML/JSON only)")


def _add_sweep(psub) -> None:
    p = psub.add_parser(
        "sweep", help="layer x pooling sweep and the input ablation (grouped CV)",
        description="Fit the trainer's probe (StandardScaler -> Ridge, clipped) for every "
                    "captured layer, window n and reasoning pooling with cross-validation grouped "
                    "by prompt; report MAE/RMSE/Pearson/Brier skill against the leave-one-out "
                    "target and Avg@K; then the paper's input ablation at the best setting.")
    _common(p)
    p.add_argument("--layers", default="all", help="'all' captured layers or a list")
    p.add_argument("--windows", default="all", help="'all' captured windows or a list")
    p.add_argument("--poolings", default="reasoning_last,response_mean,response_last",
                   help="second-vector poolings to compare")
    p.add_argument("--metric", default="pearson_avg_k", help="column that picks the best setting")
    p.set_defaults(func=_run_sweep)


def _load(args):
    from poise_probe.capture import load_datasets

    return load_datasets(args.data)


def _run_sweep(args) -> int:
    from tqdm import tqdm

    from poise_probe.study import analyses as A
    from poise_probe.study import report as R

    ds = _load(args)
    layers = ds.layers if args.layers == "all" else _ints(args.layers, "--layers")
    windows = ds.windows() if args.windows == "all" else _ints(args.windows, "--windows")
    for x in layers:
        if x not in ds.layers:
            raise ValueError(f"--layers: layer {x} was not captured; captured: {ds.layers}.")
    for w in windows:
        if w not in ds.windows():
            raise ValueError(f"--windows: window {w} was not captured; captured: {ds.windows()}.")
    poolings = [x.strip() for x in args.poolings.split(",") if x.strip()]
    for x in poolings:
        if x != "reasoning_last" and x not in ds.poolings:
            raise ValueError(f"--poolings: {x!r} was not captured; use reasoning_last or one of "
                             f"{[q for q in ds.poolings if q.startswith('response')]}.")
    alphas = _alphas(args.alphas)
    writer = R.StudyWriter(args.out, dataset=",".join(args.data), png=not args.no_png)
    total = len(layers) * len(windows) * len(poolings)
    with tqdm(total=total, desc="sweep", unit="fit", file=sys.stderr) as bar:
        table = A.sweep(ds, layers=layers, windows=windows, poolings=poolings, alphas=alphas,
                        n_splits=args.folds, seed=args.seed, progress=bar.update)
    if args.metric not in table.columns:
        raise ValueError(f"--metric {args.metric!r} is not a sweep column; choose from "
                         f"{[c for c in table.columns if c not in ('layer', 'window', 'pooling')]}.")
    best = A.best_setting(table, args.metric)
    writer.table("sweep", "sweep", table)
    writer.figure("sweep", "heatmap", R.sweep_heatmap(table, args.metric))
    writer.figure("sweep", "heatmap_mae", R.sweep_heatmap(table, "mae_avg_k"))
    writer.record("sweep", {"best": best, "metric": args.metric, "rows": len(ds),
                            "alphas": alphas})
    abl = A.ablation(ds, best["layer"], best["window"], pooling=best["pooling"], alphas=alphas,
                     n_splits=args.folds, seed=args.seed)
    writer.table("ablation", "ablation", abl)
    writer.figure("ablation", "ablation", R.ablation_chart(abl))
    writer.record("ablation", {"layer": best["layer"], "window": best["window"],
                               "pooling": best["pooling"]})
    _print_table(f"best: layer {best['layer']}, window {best['window']}, {best['pooling']} "
                 f"({args.metric} {best[args.metric]:.3f}); input ablation vs Avg@K",
                 abl, ["feature_set", "n_features", "mae_avg_k", "pearson_avg_k", "paper_mae",
                       "paper_pearson", "explained_var_reward"])
    print(f"wrote {writer.root}/sweep and {writer.root}/ablation")
    return 0


def _setting(args, ds, writer) -> tuple[int, int, str]:
    """--layer/--window, else the sweep's best from the study directory, else the middle layer."""
    best = writer.meta.get("analyses", {}).get("sweep", {}).get("best", {})
    layer = args.layer if args.layer is not None else best.get("layer", ds.layers[len(ds.layers) // 2])
    window = args.window if args.window is not None else best.get(
        "window", 10 if 10 in ds.windows() else ds.windows()[0])
    pooling = best.get("pooling", "reasoning_last") if args.layer is None else "reasoning_last"
    if layer not in ds.layers:
        raise ValueError(f"--layer {layer} was not captured; captured layers: {ds.layers}.")
    if window not in ds.windows():
        raise ValueError(f"--window {window} was not captured; captured: {ds.windows()}.")
    return int(layer), int(window), pooling


def _add_calibrate(psub) -> None:
    p = psub.add_parser(
        "calibrate", help="reliability diagrams, ECE, Brier decomposition, recalibration",
        description="Out-of-fold probe predictions on a capture (--data): equal-width and "
                    "equal-mass reliability diagrams, ECE with a bootstrap CI, Brier score with "
                    "its Murphy decomposition, linear/Platt/isotonic recalibration fitted out of "
                    "fold, by domain and by length. With --run: calibration of the run's online "
                    "probe over training steps.")
    _common(p, need_data=False)
    p.add_argument("--run", default=None, help="run directory: calibration over training steps")
    p.add_argument("--layer", type=int, default=None, help="default: the sweep's best")
    p.add_argument("--window", type=int, default=None, help="default: the sweep's best")
    p.add_argument("--bins", type=int, default=None, help="bins (default n^(1/3))")
    p.add_argument("--methods", default="linear,platt,isotonic",
                   help="recalibration methods to fit out of fold")
    p.add_argument("--step-window", type=int, default=5, help="steps pooled per point (--run)")
    p.set_defaults(func=_run_calibrate)


def _run_calibrate(args) -> int:
    from poise_probe.study import analyses as A
    from poise_probe.study import report as R

    if not args.data and not args.run:
        raise ValueError("give --data (a capture) and/or --run (a run directory).")
    writer = R.StudyWriter(args.out, png=not args.no_png)
    if args.data:
        ds = _load(args)
        layer, window, pooling = _setting(args, ds, writer)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        oof = A.oof_predictions(ds, layer, window, pooling=pooling,
                                alphas=_alphas(args.alphas), n_splits=args.folds,
                                seed=args.seed)
        res = A.calibration(oof, methods=methods, n_bins=args.bins, seed=args.seed)
        for name, frame in res.items():
            writer.table("calibration", name, frame)
        writer.figure("calibration", "reliability_equal_mass",
                      R.reliability_chart(res["reliability"], "quantile"))
        writer.figure("calibration", "reliability_equal_width",
                      R.reliability_chart(res["reliability"], "uniform"))
        s = res["summary"].set_index("method")
        writer.record("calibration", {"layer": layer, "window": window, "pooling": pooling,
                                      "ece_raw": s.loc["raw", "ece_quantile"],
                                      **{f"ece_{m}": s.loc[m, "ece_quantile"] for m in methods}})
        _print_table(f"calibration (layer {layer}, window {window}; out of fold, vs rewards)",
                     res["summary"], ["method", "ece_uniform", "ece_quantile", "brier",
                                      "reliability", "resolution", "uncertainty",
                                      "explained_var", "calib_slope", "n_distinct_preds"])
    if args.run:
        from poise_probe.rundir import RunReader

        steps = A.calibration_over_steps(RunReader(args.run).all_rollouts(),
                                         window=args.step_window, n_bins=args.bins)
        writer.table("calibration", "over_steps", steps)
        writer.figure("calibration", "over_steps", R.calibration_steps_chart(steps))
        writer.record("calibration_over_steps", {"run": str(args.run), "points": len(steps)})
        _print_table(f"online probe calibration over training ({args.run})", steps,
                     ["step_start", "step_end", "n", "mae", "ece_quantile", "explained_var",
                      "calib_slope"])
    print(f"wrote {writer.root}/calibration")
    return 0


def _add_transfer(psub) -> None:
    p = psub.add_parser(
        "transfer", help="fit on one domain, evaluate on another; recovery curves",
        description="Transfer matrix (fit on domain A, evaluate on B; diagonal in-domain by "
                    "grouped CV) with surface baselines, and how many target-domain prompts "
                    "recover in-domain quality by recalibration or refitting.")
    _common(p)
    p.add_argument("--layer", type=int, default=None, help="default: the sweep's best")
    p.add_argument("--window", type=int, default=None, help="default: the sweep's best")
    p.add_argument("--alpha", type=float, default=None,
                   help="ridge alpha (default: the sweep's choice, else 10)")
    p.add_argument("--by", default="domain", choices=["domain", "data_source", "task"],
                   help="what counts as a domain")
    p.add_argument("--sizes", default="0,4,8,16,32,64", help="target prompts for the curve")
    p.add_argument("--repeats", type=int, default=5,
                   help="random draws of the target prompts per curve point")
    p.set_defaults(func=_run_transfer)


def _run_transfer(args) -> int:
    from poise_probe.study import analyses as A
    from poise_probe.study import report as R

    ds = _load(args)
    writer = R.StudyWriter(args.out, png=not args.no_png)
    layer, window, pooling = _setting(args, ds, writer)
    alpha = args.alpha or writer.meta.get("analyses", {}).get("sweep", {}).get("best", {}).get(
        "alpha", 10.0)
    res = A.transfer(ds, layer, window, pooling=pooling, alpha=alpha, domain_col=args.by,
                     sizes=_ints(args.sizes, "--sizes"), repeats=args.repeats, seed=args.seed,
                     n_splits=args.folds)
    writer.table("transfer", "matrix", res["matrix"])
    writer.table("transfer", "recovery", res["recovery"])
    writer.figure("transfer", "matrix_pearson", R.transfer_heatmap(res["matrix"]))
    writer.figure("transfer", "matrix_mae", R.transfer_heatmap(res["matrix"], "mae_avg_k"))
    writer.figure("transfer", "recovery", R.recovery_chart(res["recovery"]))
    writer.record("transfer", {"layer": layer, "window": window, "pooling": pooling,
                               "alpha": alpha, "by": args.by})
    full = res["matrix"][res["matrix"]["feature_set"] == "full"]
    for metric in ("pearson_avg_k", "mae_avg_k"):
        piv = full.pivot(index="source", columns="target", values=metric).reset_index()
        _print_table(f"transfer {metric} (rows: fitted on; columns: evaluated on)", piv,
                     list(piv.columns))
    print(f"wrote {writer.root}/transfer")
    return 0


def _print_table(title: str, frame, columns) -> None:
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        numeric = pd.api.types.is_numeric_dtype(frame[c])
        table.add_column(str(c), justify="right" if numeric else "left")
    for row in frame[list(columns)].itertuples(index=False):
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row])
    Console(file=sys.stdout, width=160).print(table)
