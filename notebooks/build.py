"""Write the probe-study notebooks from the cell sources below; `--execute` runs them in place.

    python notebooks/build.py              # rewrite notebooks/*.ipynb (sources only, no outputs)
    python notebooks/build.py --execute    # ... then execute each and save its outputs
    make notebooks                         # capture (or resume) the data, then the line above

The notebooks read their parameters from the environment in their first cell:
POISE_NB_DATA (capture directory, made there when missing; default notebooks/data/tiny_capture),
POISE_NB_RUN (optional trainer run directory: calibration over training steps) and
POISE_NB_REDUCED=1 (the small CI version that tests/test_notebooks.py executes).
Cell ids are fixed, so regenerating an unchanged notebook changes nothing but its outputs.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

import nbformat

NB_DIR = Path(__file__).resolve().parent
KERNEL = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}

# -- cells shared by every notebook ----------------------------------------------------------

SETUP = '''\
# Parameters come from the environment, so `build.py --execute` and CI can set them:
#   POISE_NB_DATA     capture dataset directory (captured here first when it does not exist)
#   POISE_NB_RUN      optional trainer run directory (calibration over training steps)
#   POISE_NB_REDUCED  1 = CI mode: a small capture and small settings, seconds not minutes
import json
import logging
import os
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets
import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import plotly.io as pio
from IPython.display import Markdown, display
from plotly.subplots import make_subplots

from poise_probe.capture import load_datasets
from poise_probe.study import analyses as A
from poise_probe.study import report as R

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "pyproject.toml").is_file())
DATA = Path(os.environ.get("POISE_NB_DATA") or ROOT / "notebooks" / "data" / "tiny_capture")
RUN = os.environ.get("POISE_NB_RUN") or None
REDUCED = os.environ.get("POISE_NB_REDUCED", "0").strip().lower() not in ("", "0", "false", "no")

SEED = 0
ALPHAS = (10.0, 100.0) if REDUCED else A.DEFAULT_ALPHAS  # ridge alphas; nested grouped CV picks
FOLDS = 3 if REDUCED else 5                              # grouped CV folds (by prompt)

# Saved outputs hold each figure's data once (plotly mimetype, for JupyterLab / VS Code) plus
# HTML that loads plotly.js from its CDN (classic notebook, nbviewer): small files.
pio.renderers.default = "plotly_mimetype+notebook_connected"
pd.set_option("display.precision", 3)
pd.set_option("display.max_columns", 40)
pd.set_option("display.width", 200)
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def shown(path) -> str:
    """A path as the notebook prints it: relative to the repository when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


print(f"data: {shown(DATA)} | run: {Path(RUN).name if RUN else '-'} | "
      f"mode: {'reduced (CI)' if REDUCED else 'full'}")
'''

CAPTURE = '''\
# A missing DATA is captured here from the bundled tiny reasoner: in full mode exactly what
# `poise probe capture --tasks arith,boolean,code_output --prompts 200 --samples 4` makes (the
# same source key, so either resumes the other); in reduced mode a capture of seconds.
CAPTURE = dict(tasks=("arith", "boolean", "code_output"),
               prompts=12 if REDUCED else 200, samples=2 if REDUCED else 4,
               max_new_tokens=48 if REDUCED else 96,
               layers=(2, 3, 4) if REDUCED else None,            # None: every decoder block
               windows=(5, 10) if REDUCED else (1, 5, 10, 32))


def ensure_capture(out: Path, *, tasks, prompts, samples, max_new_tokens, layers, windows,
                   seed=SEED):
    """The capture at `out`; samples and captures it first when missing or unfinished."""
    manifest = out / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("complete"):
        return load_datasets([out])
    if out.is_dir() and any(out.iterdir()) and not manifest.is_file():
        raise FileNotFoundError(f"{out} exists but holds no capture (no manifest.json); set "
                                f"POISE_NB_DATA to a capture directory or to a new path.")
    import torch

    from poise_probe.capture import CaptureSpec, capture, plan_from_generation, prepare_plan
    from poise_probe.capture.dataset import fingerprint_model
    from poise_probe.features import find_decoder_layers
    from poise_probe.models import load_policy
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, tok = load_policy("tiny-reasoner", device="cuda" if torch.cuda.is_available() else "cpu")
    spec = CaptureSpec(layers=tuple(layers or range(len(find_decoder_layers(model)))),
                       prompt_windows=tuple(windows), reasoning_windows=tuple(windows))
    key = {"kind": "generate", "tasks": list(tasks), "prompts": prompts, "samples": samples,
           "seed": seed, "split": "test", "temperature": 1.0, "max_new_tokens": max_new_tokens,
           "model_fingerprint": fingerprint_model(model)}
    print(f"capturing {len(tasks)} tasks x {prompts} prompts x {samples} samples into {shown(out)}")
    plan, source = prepare_plan(out, lambda: plan_from_generation(
        model, tok, list(tasks), prompts=prompts, samples=samples, seed=seed, split="test",
        temperature=1.0, max_new_tokens=max_new_tokens), key)
    return capture(model, tok, plan, out, spec, source=source, model_path="tiny-reasoner")


ds = ensure_capture(DATA, **CAPTURE)
idx = ds.index
mixed = idx.groupby("group")["reward"].agg(lambda r: 0 < r.mean() < 1)
overview = idx.assign(mixed=idx["group"].map(mixed)).groupby("domain").agg(
    tasks=("data_source", lambda s: ", ".join(sorted(set(s)))),
    prompts=("group", "nunique"), rollouts=("row", "size"), mean_reward=("reward", "mean"),
    mixed_outcome_rollouts=("mixed", "mean"), mean_response_tokens=("num_response_tokens", "mean"))
print(f"{len(ds)} rollouts, {idx['group'].nunique()} prompts, K = "
      f"{sorted(idx.groupby('group').size().unique().tolist())}; layers {ds.layers}, windows "
      f"{ds.windows()}; model {ds.manifest.get('model')} (hidden size {ds.hidden_size})")
display(overview)
'''

SETTING = '''\
# The trainer reads `reasoning_last` (the last n tokens before </think>); its best layer and window
# come from the same grouped-CV sweep as in 01_layer_sweep.ipynb, restricted to that pooling.
# Set POISE_NB_LAYER and POISE_NB_WINDOW to fix them instead (alpha is still chosen by CV).
fixed = bool(os.environ.get("POISE_NB_LAYER") and os.environ.get("POISE_NB_WINDOW"))
quick = A.sweep(ds, layers=[int(os.environ["POISE_NB_LAYER"])] if fixed else None,
                windows=[int(os.environ["POISE_NB_WINDOW"])] if fixed else None,
                poolings=("reasoning_last",), alphas=ALPHAS, n_splits=FOLDS, seed=SEED)
best = A.best_setting(quick, "pearson_avg_k")
LAYER, WINDOW, ALPHA, POOLING = best["layer"], best["window"], best["alpha"], best["pooling"]
display(Markdown(f"Setting: **layer {LAYER}, window n = {WINDOW}, {POOLING}**, ridge alpha {ALPHA:g}."))
'''


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(
        textwrap.dedent(text).strip("\n").replace("@REGEN@", textwrap.dedent(REGEN)))


def code(text: str, *tags: str) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(textwrap.dedent(text).strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


REGEN = """\
*Regenerate*: `make notebooks` (see `notebooks/README.md`). The first code cell reads
`POISE_NB_DATA`, `POISE_NB_RUN` and `POISE_NB_REDUCED`; saved outputs come from the full capture
of the bundled tiny reasoner (3 tasks × 200 prompts × 4 samples = 2,400 rollouts)."""

# -- 01: layer sweep and input ablation ------------------------------------------------------

SWEEP = [
    md("""
    # Layer × pooling sweep, and the paper's input ablation

    Which residual-stream layer and which pooling window should the POISE value probe read?
    For every captured layer *l*, window *n* and second pooling, this notebook fits the trainer's
    probe (`StandardScaler → Ridge`, clipped to [0, 1]) on

    φ = [ prompt_last_n(h_l) ; second vector(h_l) ; mean entropy over response, reasoning, answer ]

    where the second vector is the mean of the last *n* residual states before `</think>`
    (`reasoning_last`, what the trainer uses), the mean over the whole response, or its last
    token. Cross-validation is grouped by prompt (no prompt has rollouts on both sides of a
    split) and ridge α is picked by nested grouped CV. The fitting target is the trainer's, the
    leave-one-out mean reward of a rollout's siblings; predictions are scored against **Avg@K**,
    the mean reward of the prompt's K rollouts (the paper's value target).

    The paper's input ablation (full input, reasoning state only, entropy only, prompt state
    only, response length only) is then repeated on the same folds at the best setting, beside
    the published Qwen3-4B / DAPO-Math numbers.

    Library: `poise_probe.study.analyses.sweep`, `best_setting`, `ablation`; figures from
    `poise_probe.study.report` (the same as `poise probe sweep`).

    @REGEN@
    """),
    code(SETUP, "parameters"),
    md("""
    ## The capture
    One row per rollout; *mixed_outcome_rollouts* is the share of rollouts whose prompt had both
    successes and failures among its K samples (only those carry a learning signal in GRPO-like
    training, and only there does a value estimate matter).
    """),
    code(CAPTURE, "capture"),
    md("""
    ## Sweep: layer × window × pooling
    Each cell is one grouped-CV fit; colour and label give Pearson r with Avg@K (higher is better)
    in the first figure and MAE against Avg@K (lower is better) in the second. `response_mean` and
    `response_last` do not depend on *n* except through the prompt vector.
    """),
    code("""
    if REDUCED:     # CI: at most 3 layers x 2 windows
        layers, windows = ds.layers[-3:], ds.windows()[:2]
    else:
        layers, windows = ds.layers, ds.windows()
    table = A.sweep(ds, layers=layers, windows=windows, alphas=ALPHAS, n_splits=FOLDS, seed=SEED)
    R.sweep_heatmap(table, "pearson_avg_k").show()
    R.sweep_heatmap(table, "mae_avg_k").show()
    """, "sweep"),
    code("""
    cols = ["layer", "window", "pooling", "alpha", "pearson_avg_k", "mae_avg_k", "rmse_avg_k",
            "brier_skill_avg_k", "pearson_loo", "mae_loo", "explained_var_reward"]
    display(table.sort_values("pearson_avg_k", ascending=False)[cols].head(10)
            .reset_index(drop=True))
    """, "sweep-table"),
    md("""
    Depth profile: the best window at each layer, per pooling.
    """),
    code("""
    depth = (table.sort_values("pearson_avg_k", ascending=False)
             .groupby(["layer", "pooling"], as_index=False).first().sort_values("layer"))
    fig = px.line(depth, x="layer", y="pearson_avg_k", color="pooling", markers=True,
                  hover_data=["window", "mae_avg_k"],
                  title="Pearson r with Avg@K by layer (best window per layer)")
    fig.update_layout(height=380, xaxis_title="layer (0-based block)", yaxis_title="Pearson r")
    fig.show()
    """),
    code("""
    overall = A.best_setting(table, "pearson_avg_k")
    best = A.best_setting(table[table["pooling"] == "reasoning_last"], "pearson_avg_k")
    LAYER, WINDOW, POOLING = best["layer"], best["window"], best["pooling"]
    row = table[(table["layer"] == LAYER) & (table["window"] == WINDOW)
                & (table["pooling"] == POOLING)].iloc[0]
    display(Markdown(
        f"**Best setting overall**: layer {overall['layer']}, window {overall['window']}, "
        f"{overall['pooling']} (r = {overall['pearson_avg_k']:.3f}).  \\n"
        f"**Best with the trainer's pooling** (`reasoning_last`, used below and in the other "
        f"notebooks): layer {LAYER}, window {WINDOW}: r = {row['pearson_avg_k']:.3f}, MAE = "
        f"{row['mae_avg_k']:.3f} against Avg@K; alpha {best['alpha']:g}."))
    """, "best"),
    md("""
    ## Input ablation (same folds)
    At that setting: **full** is φ above; **reasoning** the reasoning-state vector alone;
    **entropy** the three entropy means; **prompt** the prompt-state vector alone (a
    per-prompt difficulty estimate, identical for the K rollouts of a prompt); **length** the
    response length in tokens; **constant** predicts the mean target for everything (the floor).
    `paper_*` are the paper's Qwen3-4B numbers (MAE / Pearson r against Avg@8).
    """),
    code("""
    abl = A.ablation(ds, LAYER, WINDOW, pooling=POOLING, alphas=ALPHAS, n_splits=FOLDS, seed=SEED)
    display(abl[["feature_set", "n_features", "mae_avg_k", "paper_mae", "pearson_avg_k",
                 "paper_pearson", "mae_loo", "pearson_loo", "explained_var_reward"]])
    R.ablation_chart(abl).show()
    """, "ablation-table"),
    code("""
    a = abl.set_index("feature_set")
    sets = [s for s in A.PAPER_ABLATION]
    ours = sorted(sets, key=lambda s: -a.loc[s, "pearson_avg_k"])
    paper = sorted(sets, key=lambda s: -A.PAPER_ABLATION[s][1])
    gain = 1 - a.loc["full", "mae_avg_k"] / a.loc["constant", "mae_avg_k"]
    display(Markdown("\\n".join([
        f"- Ranking by Pearson r here: **{' > '.join(ours)}**; in the paper: "
        f"{' > '.join(paper)}.",
        f"- Full input: MAE {a.loc['full', 'mae_avg_k']:.3f}, r {a.loc['full', 'pearson_avg_k']:.3f}"
        f" (paper 0.126 / 0.838); it removes {gain:.0%} of the constant predictor's MAE "
        f"({a.loc['constant', 'mae_avg_k']:.3f}).",
        f"- Reasoning state alone: r {a.loc['reasoning', 'pearson_avg_k']:.3f}; prompt state alone:"
        f" r {a.loc['prompt', 'pearson_avg_k']:.3f}; entropy alone: "
        f"r {a.loc['entropy', 'pearson_avg_k']:.3f}; length alone: "
        f"r {a.loc['length', 'pearson_avg_k']:.3f}.",
        f"- Share of individual-reward variance the full probe explains (out of fold): "
        f"{a.loc['full', 'explained_var_reward']:.3f}.",
    ])))
    """, "interpretation"),
    md("""
    ## Within each domain
    The pooled Pearson r above mixes two abilities: telling the domains apart (their success
    rates differ widely, see the capture table) and ranking prompts *within* a domain, which is
    what a baseline inside a training batch of one task needs. Here each input's out-of-fold
    predictions (the same fits and folds as the ablation; the `pooled` column reproduces it) are
    scored inside each domain. *domain label* predicts each domain's mean training target: all
    that knowing the task gives.
    """),
    code("""
    from poise_probe.study import metrics as M
    from poise_probe.study.ridge import cross_val_predict, grouped_folds

    t = A.study_targets(ds.index)
    dom = ds.index["domain"].astype(str).to_numpy()
    avg_k, loo, groups = t["avg_k"].to_numpy(), t["loo"].to_numpy(), t["cv_group"].to_numpy()
    folds = grouped_folds(groups, FOLDS, SEED)
    preds = {fs: cross_val_predict(ds.design(fs, LAYER, WINDOW, POOLING), loo, groups, ALPHAS,
                                   seed=SEED, folds=folds).pred
             for fs in A.PAPER_ABLATION}
    label = np.empty(len(t))
    for train, test in folds:                       # the domain's mean target, out of fold
        means = pd.Series(loo[train]).groupby(dom[train]).mean()
        label[test] = means.reindex(dom[test]).to_numpy()
    preds["domain label"] = label
    rows = []
    for name, pred in preds.items():
        row = {"input": name, "pooled": M.regression_metrics(pred, avg_k)["pearson"]}
        for d in sorted(set(dom)):
            m = dom == d
            row[d] = M.regression_metrics(pred[m], avg_k[m])["pearson"]
        row["mean within domain"] = np.nanmean([row[d] for d in sorted(set(dom))])
        rows.append(row)
    within = pd.DataFrame(rows)
    display(Markdown("**Pearson r with Avg@K, pooled and within each domain**"))
    display(within)
    """, "within-domain"),
    md("""
    ## Reading the saved results

    INTERPRETATION_01
    """),
]

# -- 02: calibration -------------------------------------------------------------------------

CALIBRATION = [
    md("""
    # Calibration of the value probe

    POISE uses the probe's prediction b̂ of a sibling rollout as a baseline, so besides ranking
    prompts well the numbers should mean what they say: among rollouts predicted 0.7, about 70%
    should succeed. This notebook takes out-of-fold predictions of the trainer's probe (grouped
    by prompt) at the sweep's best `reasoning_last` setting and checks them against the
    individual rewards:

    - reliability diagrams with equal-width and equal-mass bins (95% Wilson intervals);
    - ECE (L1, both binnings) with a bootstrap interval over prompts, before and after
      recalibration (linear, Platt, isotonic), each recalibrator cross-fitted by prompt group so
      no row is mapped by a calibrator that saw its prompt;
    - the Brier score with its Murphy decomposition, Brier = reliability − resolution +
      uncertainty (CORP, isotonic);
    - the same by domain and by response length;
    - if a run directory is given (`POISE_NB_RUN`), the trainer's **online** probe over training
      steps, from the predictions it logged with each rollout.

    Library: `poise_probe.study.analyses.oof_predictions`, `calibration`,
    `calibration_over_steps` (the same as `poise probe calibrate`).

    @REGEN@
    """),
    code(SETUP, "parameters"),
    code(CAPTURE, "capture"),
    code(SETTING, "setting"),
    md("""
    ## ECE before and after recalibration
    `raw` is the clipped probe output; the other rows recalibrate it out of fold.
    `n_distinct_preds` shows what isotonic regression does to resolution: it collapses the
    predictions to a few steps.
    """),
    code("""
    METHODS = ("linear", "platt", "isotonic")
    oof = A.oof_predictions(ds, LAYER, WINDOW, pooling=POOLING, alphas=ALPHAS, n_splits=FOLDS,
                            seed=SEED)
    res = A.calibration(oof, methods=METHODS, seed=SEED)
    summary = res["summary"]
    display(summary[["method", "n", "ece_uniform", "ece_quantile", "ece_quantile_ci_low",
                     "ece_quantile_ci_high", "mce", "mae", "explained_var", "ev_ceiling", "calib_slope",
                     "calib_intercept", "auroc", "n_distinct_preds"]])
    """, "ece-table"),
    md("""
    ## Reliability diagrams
    Mean reward in each bin against the mean prediction in it; the dashed diagonal is perfect
    calibration. Equal-width bins show where predictions are sparse (wide intervals); equal-mass
    bins give every point the same number of rollouts.
    """),
    code("""
    R.reliability_chart(res["reliability"], "uniform").show()
    R.reliability_chart(res["reliability"], "quantile").show()
    """, "reliability"),
    code("""
    fig = px.histogram(oof.assign(outcome=np.where(oof["reward"] > 0.5, "reward 1", "reward 0")),
                       x="pred", color="outcome", nbins=40, barmode="overlay", opacity=0.6,
                       title="Sharpness: out-of-fold predictions by outcome")
    fig.update_layout(height=350, xaxis_title="predicted value b̂", yaxis_title="rollouts")
    fig.show()
    """),
    md("""
    ## Brier score and its Murphy decomposition
    *reliability* is the part of the Brier score that recalibration could remove (lower is
    better), *resolution* how far the calibrated predictions spread from the base rate (higher
    is better), *uncertainty* the variance of the rewards (fixed by the data). The identity
    `brier = reliability − resolution + uncertainty` holds exactly.
    """),
    code("""
    murphy = summary[["method", "brier", "reliability", "resolution", "uncertainty"]].copy()
    murphy["rel - res + unc"] = murphy["reliability"] - murphy["resolution"] + murphy["uncertainty"]
    murphy["brier_skill"] = 1 - murphy["brier"] / murphy["uncertainty"]
    display(murphy)
    """, "murphy-table"),
    md("""
    ## By domain and by response length
    Raw (not recalibrated) out-of-fold predictions, sliced. *ev_ceiling* is the share of reward
    variance a perfect per-prompt value would explain (the rest is sampling noise within a
    prompt); `frac_low` / `frac_high` the share of raw ridge outputs clipped at 0 / 1.
    """),
    code("""
    cols = ["n", "mae", "bias", "ece_quantile", "brier", "reliability", "resolution",
            "explained_var", "ev_ceiling", "calib_slope", "frac_low", "frac_high"]
    display(res["by_domain"][["domain", *cols]])
    display(res["by_length"][["length_bucket", *cols]])
    per = oof.groupby("domain", as_index=False).agg(mean_prediction=("pred", "mean"),
                                                    mean_reward=("reward", "mean"))
    fig = px.bar(per.melt(id_vars="domain"), x="domain", y="value", color="variable",
                 barmode="group", title="Mean prediction against mean reward, by domain")
    fig.update_layout(height=350, yaxis_title="", legend_title="")
    fig.show()
    """, "by-domain"),
    md("""
    ## The online probe over training steps
    From a trainer run directory (`POISE_NB_RUN`): the predictions the probe made for each
    rollout when it was generated (before that step's refit), against the verifier score, pooled
    over windows of steps. Steps before the probe's first fit logged no prediction.
    """),
    code("""
    if RUN:
        from poise_probe.rundir import RunReader

        reader = RunReader(RUN)
        STEP_WINDOW = 2 if REDUCED else 5
        steps = A.calibration_over_steps(reader.all_rollouts(), window=STEP_WINDOW)
        print(f"run {Path(RUN).name}: algorithm {reader.meta.get('algorithm', '?')}, model "
              f"{reader.meta.get('model', '?')}, {len(reader.rollout_steps())} steps of rollouts")
        display(steps[["step_start", "step_end", "n", "mae", "ece_uniform", "ece_quantile",
                       "brier", "reliability", "resolution", "explained_var", "calib_slope",
                       "pearson"]])
        R.calibration_steps_chart(steps).show()
    else:
        steps = None
        display(Markdown("*No run directory given*: set `POISE_NB_RUN=runs/<name>` (a POISE run) "
                         "to see the online probe's calibration over training."))
    """, "over-steps"),
    code("""
    s = summary.set_index("method")
    best_m = s.drop("raw")["ece_quantile"].idxmin()
    lines = [
        f"- ECE (equal-mass bins) of the raw probe: **{s.loc['raw', 'ece_quantile']:.3f}** "
        f"(95% CI {s.loc['raw', 'ece_quantile_ci_low']:.3f}–{s.loc['raw', 'ece_quantile_ci_high']:.3f});"
        f" after recalibration: " + ", ".join(f"{m} {s.loc[m, 'ece_quantile']:.3f}" for m in METHODS)
        + f" (lowest: {best_m}).",
        f"- Brier {s.loc['raw', 'brier']:.3f} = reliability {s.loc['raw', 'reliability']:.3f} − "
        f"resolution {s.loc['raw', 'resolution']:.3f} + uncertainty {s.loc['raw', 'uncertainty']:.3f};"
        f" calibration slope {s.loc['raw', 'calib_slope']:.2f} (1 is ideal).",
        f"- Out of fold the raw probe explains {s.loc['raw', 'explained_var']:.3f} of the variance "
        f"of individual rewards; a perfect per-prompt value would explain "
        f"{s.loc['raw', 'ev_ceiling']:.3f} (the rest is sampling noise within a prompt).",
    ]
    d = res["by_domain"].set_index("domain")
    lines.append("- ECE by domain: " + ", ".join(f"{k} {v:.3f}" for k, v in d["ece_quantile"].items())
                 + ".")
    if steps is not None and len(steps):
        first, last = (steps.iloc[i].to_dict() for i in (0, -1))
        span = lambda r: f"{int(r['step_start'])}–{int(r['step_end'])}"
        lines.append(f"- Online probe: ECE {first['ece_quantile']:.3f} → {last['ece_quantile']:.3f} "
                     f"and explained variance {first['explained_var']:.3f} → "
                     f"{last['explained_var']:.3f} from steps {span(first)} to {span(last)}.")
    display(Markdown("\\n".join(lines)))
    """, "interpretation"),
    md("""
    ## Reading the saved results

    INTERPRETATION_02
    """),
]

# -- 03: transfer ----------------------------------------------------------------------------

TRANSFER = [
    md("""
    # Cross-domain transfer of the value probe

    Does a probe fitted on one domain's rollouts estimate values on another? The tiny reasoner's
    capture holds three domains: **math** (arithmetic), **code** (predicting a program's output)
    and **logic** (boolean expressions). For every pair the trainer's probe is fitted on all of
    domain A and evaluated on all of domain B; the diagonal is in-domain, by cross-validation
    grouped by prompt. Surface baselines (prompt state, entropy, response length alone) sit
    beside the full input, to tell transfer of the representation from transfer of a shortcut.

    Recovery curves: with B's prompts split in half (adaptation pool / test), how many B prompts
    does it take to reach in-domain quality, by recalibrating the source probe (linear), refitting
    on A + B's prompts, or fitting on B's prompts alone? The dotted line is a probe fitted on the
    whole pool (the in-domain ceiling); points average several random splits.

    Library: `poise_probe.study.analyses.transfer` (the same as `poise probe transfer`).

    @REGEN@
    """),
    code(SETUP, "parameters"),
    code(CAPTURE, "capture"),
    code(SETTING, "setting"),
    md("""
    ## Transfer matrix
    Rows: fitted on; columns: evaluated on. Pearson r and MAE against Avg@K, full input.
    """),
    code("""
    SIZES = (0, 2, 4) if REDUCED else (0, 4, 8, 16, 32, 64)   # target prompts for the curves
    REPEATS = 2 if REDUCED else 5
    res = A.transfer(ds, LAYER, WINDOW, pooling=POOLING, alpha=ALPHA, sizes=SIZES,
                     repeats=REPEATS, seed=SEED, n_splits=FOLDS)
    matrix = res["matrix"]
    R.transfer_heatmap(matrix, "pearson_avg_k").show()
    R.transfer_heatmap(matrix, "mae_avg_k").show()
    """, "transfer-heatmap"),
    code("""
    full = matrix[matrix["feature_set"] == "full"]
    for metric in ("pearson_avg_k", "mae_avg_k", "ece_quantile"):
        display(Markdown(f"**{metric}** (rows fitted on, columns evaluated on)"))
        display(full.pivot(index="source", columns="target", values=metric))
    """, "transfer-table"),
    md("""
    ## Surface baselines
    The same matrix for each input. A surface feature that transfers as well as the full input
    would mean the probe's transfer is a shortcut; the prompt state alone can only rank prompts
    (it is the same for the K rollouts of a prompt).
    """),
    code("""
    sets = ["full", "prompt", "entropy", "length"]
    piv = matrix.pivot_table(index=["source", "target"], columns="feature_set",
                             values="pearson_avg_k")[sets]
    display(Markdown("**Pearson r with Avg@K by input** (diagonal rows: in-domain CV)"))
    display(piv)
    lo, hi = float(np.nanmin(piv.to_numpy())), float(np.nanmax(piv.to_numpy()))
    fig = make_subplots(rows=1, cols=len(sets), subplot_titles=sets, shared_yaxes=True)
    for j, fs in enumerate(sets, start=1):
        part = matrix[matrix["feature_set"] == fs].pivot(index="source", columns="target",
                                                         values="pearson_avg_k")
        fig.add_trace(go.Heatmap(z=part.to_numpy(), x=list(part.columns), y=list(part.index),
                                 zmin=min(lo, 0), zmax=hi, colorscale="RdBu",
                                 showscale=j == len(sets), text=np.round(part.to_numpy(), 2),
                                 texttemplate="%{text}"), row=1, col=j)
        fig.update_xaxes(title_text="evaluated on", row=1, col=j)
    fig.update_yaxes(title_text="fitted on", row=1, col=1)
    fig.update_layout(title="Transfer of surface baselines (Pearson r with Avg@K)", height=380)
    fig.show()
    """, "baselines"),
    md("""
    ## Recovery curves
    MAE and Pearson r against Avg@K on the held-out half of the target domain, as target prompts
    are added (each prompt brings its K rollouts).
    """),
    code("""
    rec = res["recovery"]
    R.recovery_chart(rec, "mae").show()
    R.recovery_chart(rec, "pearson").show()
    """, "recovery"),
    code("""
    # Smallest number of target prompts at which each method's mean MAE comes within 10% of the
    # in-domain ceiling (NaN: not within the sizes tried).
    agg = rec.groupby(["source", "target", "method", "target_prompts"], as_index=False).agg(
        mae=("mae", "mean"), ceiling=("in_domain_mae", "mean"))
    agg["within_10pct"] = agg["mae"] <= 1.1 * agg["ceiling"]
    need = (agg[agg["within_10pct"]].groupby(["source", "target", "method"])["target_prompts"]
            .min().unstack("method"))
    need = need.reindex(pd.MultiIndex.from_frame(agg[["source", "target"]].drop_duplicates()))
    display(Markdown("**Target prompts needed to come within 10% of in-domain MAE**"))
    display(need)
    display(Markdown("**Mean test MAE by target prompts used** (ceiling: in-domain probe)"))
    display(agg.pivot_table(index=["source", "target", "method"], columns="target_prompts",
                            values="mae"))
    """, "recovery-table"),
    code("""
    f = full.set_index(["source", "target"])
    diag = f[[s == t for s, t in f.index]]["pearson_avg_k"]
    off = f[[s != t for s, t in f.index]]["pearson_avg_k"]
    worst = off.idxmin()
    lines = [
        "- In-domain Pearson r: " + ", ".join(f"{s} {v:.3f}" for (s, _), v in diag.items()) + ".",
        f"- Across domains: mean r {off.mean():.3f} (range {off.min():.3f} for "
        f"{worst[0]} → {worst[1]} to {off.max():.3f}).",
    ]
    for fs in ("prompt", "entropy", "length"):
        part = matrix[(matrix["feature_set"] == fs) & (matrix["source"] != matrix["target"])]
        lines.append(f"- {fs} alone across domains: mean r {part['pearson_avg_k'].mean():.3f}.")
    display(Markdown("\\n".join(lines)))
    """, "interpretation"),
    md("""
    ## Reading the saved results

    INTERPRETATION_03
    """),
]

# Written after reading the full-mode outputs (seed 0); the cells above print the live numbers.
INTERPRETATIONS = {
    "INTERPRETATION_01": """
    - **Layer and window matter little on this model.** Every setting reaches Pearson r
      0.71–0.76 with Avg@K (MAE 0.19–0.21). The last 5 tokens before `</think>` at layer 3 of
      the tiny reasoner's 6 blocks are best, by about 0.01 over layers 2, 4 and 5; a window of 1
      is weaker than 5 or 10 for `reasoning_last` from layer 1 on, and `response_last` (the final
      token alone) is the weakest pooling. The paper reports the same shape: mid-to-late layers
      best, the window barely mattering past 5 tokens.
    - **The ablation keeps the paper's order at the top and the bottom**: full > reasoning state,
      with length last, and full and reasoning-only close to each other (0.755 / 0.723 here,
      0.838 / 0.821 in the paper): the reasoning state carries most of the signal.
    - **Two differences.** The prompt state beats entropy here (r 0.705 vs 0.656; the paper has
      0.569 vs 0.780), and length carries nothing (r 0.03; paper 0.494). Both follow from the
      data: the three synthetic tasks have very different success rates (code 0.29, math 0.71,
      logic 0.86), the prompt state identifies the task (the domain label alone reaches a pooled
      r of 0.66, next section), and responses are short (about 22 tokens) with no long failing
      chains of thought, which is where length predicts failure in long-CoT math.
    - **Within a domain the probe is weaker than the pooled r suggests**: the full input's mean
      within-domain r is 0.35 (code 0.62, math 0.38, logic 0.06). Logic has almost no
      between-prompt variance to find (86% success; a perfect per-prompt value would explain
      only about 3% of its reward variance, see `ev_ceiling` in 02_calibration), so its Avg@4
      is mostly sampling noise. In code and math the full input is the best input, and the
      reasoning state adds most over the prompt state in code (0.55 vs 0.45), where rollouts of
      one prompt differ most. The domain label's within-domain r is slightly negative, as
      out-of-fold means are: a fold's training mean moves against its test prompts.
    - **Absolute numbers are not the paper's**: a 6-block, 192-wide model on synthetic tasks
      with K = 4 (a noisier Avg@K than the paper's Avg@8) against Qwen3-4B on DAPO-Math.
    """,
    "INTERPRETATION_02": """
    - **In domain, the out-of-fold probe is already calibrated**: ECE 0.040 with equal-mass bins
      (95% CI 0.030–0.061) and 0.037 with equal-width bins, calibration slope 1.01 and intercept
      −0.01. A ridge fitted with an intercept on the leave-one-out target (an unbiased estimate of
      the value) is close to conditionally unbiased, and clipping touches under 2% of rows.
    - **Recalibration does not help here**: linear 0.042, Platt 0.052 (worse: a logistic map
      bends a probe that is already linear), isotonic 0.038 — all inside the raw probe's
      interval, and isotonic collapses 1,468 distinct predictions to 105 steps, losing the
      resolution a baseline is for. Keep the raw probe in domain; recalibration earns its keep
      across domains (03_transfer).
    - **The Brier score is almost all resolution and noise**: 0.159 = reliability 0.005 −
      resolution 0.083 + uncertainty 0.236. Miscalibration costs 0.005; the probe explains 0.33
      of the reward variance where a perfect per-prompt value would explain 0.43.
    - **By domain** the mean is right everywhere (ECE 0.04–0.06) but discrimination is not: in
      logic the resolution is 0.002 and the calibration slope 0.24 (predictions spread without
      tracking outcomes — there is little between-prompt signal to track); code resolves best.
      **By length**, longer responses are predicted better (explained variance 0.19 → 0.43 from
      the shortest to the longest quarter) with similar calibration error.
    - **The online probe over training** (run `demo_a10`: POISE with K = 2 on the tiny reasoner,
      60 steps, probe refitted every step from its buffer): early on its predictions are too
      spread (slope 0.70, ECE about 0.10 at steps 5–14); by steps 55–59 the slope is 1.0, the
      ECE 0.05 and the explained variance 0.40, as the buffer fills and the policy settles. The
      points are noisy (320 rollouts each; steps 20–24 dip), and the last point holds one step.
    """,
    "INTERPRETATION_03": """
    - **Ranking transfers partly, levels do not.** Fitted on logic or math, the probe ranks
      code prompts with r 0.44 and 0.37 (in-domain 0.63), and code → math / logic → math reach
      0.17 / 0.29 (in-domain 0.36). But the MAE of any pair involving code is 0.55–0.72 against
      0.16–0.22 in domain: the probe carries its source's base rate (code succeeds 29% of the
      time, math 71%, logic 86%), and ECE follows: probes fitted on logic or math predict
      0.82–0.88 on average for code, and the code-fitted probe predicts 0 (clipped) for 85% of
      math rows. The `LinearCalibrator: constant predictions` warnings above are math
      adaptation sets on which it predicted 0 throughout, where recalibration can only move to
      the target mean.
    - **Into logic nothing transfers, and nothing is there in domain either** (r ≈ 0): its
      Avg@4 is mostly sampling noise (see 01 and 02).
    - **Surface baselines transfer as well as the full input**: across domains the mean r is
      0.21 for the full input, 0.20 for the prompt state and 0.25 for entropy alone (length
      −0.04). What crosses domains looks like a generic signal that surface features carry as
      well, not a direction specific to the full probe; a probe for a new domain should be
      refitted, or at least recalibrated, on it.
    - **A few target prompts recover in-domain quality.** Fitting on 16 target prompts
      (64 rollouts) alone comes within 10% of the in-domain MAE for every pair. Recalibrating the
      source probe is faster when only the level is off (into logic: 8 prompts, MAE 0.72 → 0.17
      from code) but plateaus above the ceiling when the ranking does not transfer (into code,
      never within 10%). Refitting on source + target helps most between similar domains
      (logic → math: 4 prompts) and least into code (64 prompts, or not within the sizes tried).
    """,
}

NOTEBOOKS = {"01_layer_sweep": SWEEP, "02_calibration": CALIBRATION, "03_transfer": TRANSFER}


def notebooks() -> dict[str, nbformat.NotebookNode]:
    """Every notebook, by file stem, with fixed cell ids and no outputs."""
    out = {}
    for stem, cells in NOTEBOOKS.items():
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = dict(KERNEL)
        nb.metadata["language_info"] = {"name": "python"}
        for i, cell in enumerate(cells):
            cell = nbformat.from_dict(cell)  # a copy: the templates stay output-free
            for key, text in INTERPRETATIONS.items():
                cell.source = cell.source.replace(key, textwrap.dedent(text).strip())
            cell.id = f"{stem.split('_', 1)[0]}-{i:02d}"
            nb.cells.append(cell)
        nbformat.validate(nb)
        out[stem] = nb
    return out


def execute(nb: nbformat.NotebookNode, *, timeout: int = 1800) -> nbformat.NotebookNode:
    """Run every cell in a python3 kernel started in notebooks/ (the environment passes on)."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(NB_DIR)}})
    client.execute()
    return nb


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--execute", action="store_true", help="execute and save outputs")
    p.add_argument("--only", nargs="+", choices=list(NOTEBOOKS), help="these notebooks only")
    p.add_argument("--data", help="sets POISE_NB_DATA for the kernels")
    p.add_argument("--run", help="sets POISE_NB_RUN for the kernels")
    p.add_argument("--reduced", action="store_true", help="sets POISE_NB_REDUCED=1 (CI mode)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = p.parse_args(argv)
    if args.data:
        os.environ["POISE_NB_DATA"] = str(Path(args.data).resolve())
    if args.run:
        if not Path(args.run).is_dir():
            p.error(f"--run {args.run}: no such run directory")
        os.environ["POISE_NB_RUN"] = str(Path(args.run).resolve())
    if args.reduced:
        os.environ["POISE_NB_REDUCED"] = "1"
    for stem, nb in notebooks().items():
        if args.only and stem not in args.only:
            continue
        path = NB_DIR / f"{stem}.ipynb"
        if args.execute:
            t0 = time.time()
            print(f"executing {path.name} ...", file=sys.stderr, flush=True)
            execute(nb, timeout=args.timeout)
            print(f"  done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        nbformat.write(nb, str(path))
        print(f"wrote {path.relative_to(NB_DIR.parent)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
