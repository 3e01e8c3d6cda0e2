"""Performance and sample efficiency, measured side by side in one run (issue 15).

    python benchmarks/run.py --suite cpu                 # everything below, about an hour here
    python benchmarks/run.py --suite cpu --only trl,probe --rounds 3 --steps 4
    python benchmarks/run.py --suite cpu --arms poise,grpo_8 --seeds 0,1,2   # efficiency subset

Sections (`--only` picks some; the rest keep their figures from the previous latest.json):
- `peak`: the CPU's matrix-product rate, fp32 and bf16 (torch.mm 2048^2, median of 5), and the
  rate at the tiny reasoner's own shapes (64 rows x hidden x hidden, x 4 hidden, x vocab).
- `trl`: TRL's `GRPOTrainer` against this trainer on the tiny reasoner, alternating contender
  by contender for `--rounds` rounds of `--steps` steps (first step of each run dropped): the
  same prompts (this project's task mix), 8 prompts x 8 completions, at most 96 new tokens,
  temperature 1, no reference model, one optimisation pass per batch, fp32, all cores. This
  trainer runs GRPO (grpo_tiny.yaml's settings) and POISE (the demo recipe, 32 x 2), each as
  the current default and as it was before issue 15 (`optim.micro_batch_tokens=null`, the
  probe refit on every BLAS thread), and GRPO without the shadow probe (`probe.shadow=false`).
  Reports seconds per step, completion tokens per second (median, min, max over rounds), stage
  shares, the padded against the useful tokens of the old-policy and update forwards, one
  profiled step's ten hottest operators outside matrix products, and the fraction of the fp32
  peak the whole step reaches (FLOPs: 2 x matmul parameters per token generated or prefilled,
  2 x per token of the old-policy forward, 6 x per token of the update).
- `probe`: the probe's cost per POISE step: feature capture (the old-policy forward with and
  without the hook, alternated), prediction and refit (the trainer's `timing_s/probe`), on the
  tiny reasoner and on a random-initialised Qwen3-0.6B architecture (a few short CPU steps).
- `efficiency`: `poise ablate`'s runs (`--arms` x `--seeds`, 60 steps, eval every 15 on 50
  held-out prompts per task) under `--efficiency-dir` (finished runs are kept, so a rerun only
  summarises): held-out accuracy against generated tokens and against training seconds with
  95% bands, and the tokens POISE needs to reach GRPO-8's final accuracy over GRPO-8's tokens.
- `gpu`: only with `--suite gpu` on a machine with CUDA (not written yet: null here).

Writes benchmarks/results/latest.json (every headline figure beside the machine and the date),
docs/img/bench-*.html and .png, and the generated section of benchmarks/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "latest.json"
IMG = REPO / "docs" / "img"
MD = REPO / "benchmarks" / "BENCHMARKS.md"
BEGIN, END = "<!-- bench-run:begin -->", "<!-- bench-run:end -->"
TASKS = ["arith", "boolean", "code_output"]
SECTIONS = ("peak", "trl", "probe", "efficiency")
STAGES = ("gen", "reward", "old_log_prob", "probe", "adv", "update", "sync")
GOALS = {"trl_throughput_ratio": (">=", 2.0), "cpu_peak_fraction": (">=", 0.30),
         "probe_overhead_share": ("<=", 0.02), "tokens_to_match_grpo8_ratio": ("<=", 0.6)}

# the contenders of the `trl` section: this trainer's recipes (config overrides) and TRL's
BEFORE = ["optim.micro_batch_tokens=null", "probe.refit_threads=null"]


def recipe(name: str) -> list[str]:
    from poise_probe.runtime import DEMO_OVERRIDES

    grpo = DEMO_OVERRIDES + ["algorithm.adv_estimator=grpo", "rollout.prompts_per_step=8",
                             "rollout.num_generations=8", "optim.mini_batch_prompts=8"]
    return {"poise": DEMO_OVERRIDES, "poise_before": DEMO_OVERRIDES + BEFORE,
            "grpo": grpo, "grpo_before": grpo + BEFORE,
            "grpo_no_shadow": grpo + ["probe.shadow=false"]}[name]


# -- helpers -----------------------------------------------------------------------------------

def summary(xs) -> dict:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- peak --------------------------------------------------------------------------------------

def mm_rate(m: int, k: int, n: int, dtype, reps: int = 5, min_s: float = 0.2) -> float:
    """GFLOP/s of torch.mm (m x k) @ (k x n), median of `reps` timed batches."""
    import torch

    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    torch.mm(a, b)
    rates = []
    for _ in range(reps):
        it, t0 = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            it += 1
            el = time.perf_counter() - t0
            if el >= min_s:
                break
        rates.append(2 * m * k * n * it / el / 1e9)
    return statistics.median(rates)


def bench_peak() -> dict:
    import torch
    from transformers import AutoConfig

    from poise_probe.models import resolve_model_path

    cfg = AutoConfig.from_pretrained(resolve_model_path("tiny-reasoner"))
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    # the peak is the best rate over square sizes (the best size differs between processors)
    square = {n: {"fp32_gflops": mm_rate(n, n, n, torch.float32),
                  "bf16_gflops": mm_rate(n, n, n, torch.bfloat16)} for n in (512, 1024, 2048)}
    out = {"fp32_gflops": max(r["fp32_gflops"] for r in square.values()),
           "bf16_gflops": max(r["bf16_gflops"] for r in square.values()),
           "square": square, "tiny_shapes": {}}
    for name, (m, k, n) in {"attn 64x h x h": (64, h, h), "mlp 64x h x 4h": (64, h, f),
                            "lm head 64x h x V": (64, h, v),
                            "update 4096x h x 4h": (4096, h, f)}.items():
        out["tiny_shapes"][name] = {"shape": [m, k, n],
                                    "fp32_gflops": mm_rate(m, k, n, torch.float32)}
    # a tiny shape that beats the squares is the peak's best witness on this processor
    out["fp32_gflops"] = max(out["fp32_gflops"],
                             *(r["fp32_gflops"] for r in out["tiny_shapes"].values()))
    say(f"peak: fp32 {out['fp32_gflops']:.0f} GFLOP/s, bf16 {out['bf16_gflops']:.0f}")
    return out


# -- trl: TRL's GRPOTrainer against this trainer -------------------------------------------------

class _PassCounter:
    """Wraps the trainer's old-policy pass to count the useful and the padded tokens its
    forwards (and the update's, which chunks the same way) compute on."""

    def __init__(self):
        import poise_probe.trainer as trainer_mod

        self.mod, self.real, self.steps = trainer_mod, trainer_mod.old_policy_pass, []

    def __enter__(self):
        from poise_probe.update import micro_batches, padded_tokens

        def counted(model, batch, cfg, *a, **kw):
            if kw.get("with_entropy", True):             # the policy's pass, not the reference's
                p = [len(batch.prompt_ids[g]) for g in batch.group_ids.tolist()]
                r = [len(x) for x in batch.response_ids]
                chunks = micro_batches(p, r, cfg.optim.micro_batch_size,
                                       cfg.optim.micro_batch_tokens)
                self.steps.append({"useful": sum(p) + sum(r),
                                   "padded": padded_tokens(chunks, p, r),
                                   "prompt": sum(p), "response": sum(r)})
            return self.real(model, batch, cfg, *a, **kw)

        self.mod.old_policy_pass = counted
        return self

    def __exit__(self, *exc):
        self.mod.old_policy_pass = self.real


def ours_run(name: str, steps: int, out: Path, profile_step: int | None = None) -> dict:
    """`steps` steps of this trainer's recipe `name`; per-step metrics (first dropped)."""
    from poise_probe.config import load_config
    from poise_probe.runtime import quiet_library_bars
    from poise_probe.trainer import train

    cfg = load_config(None, recipe(name) + [
        f"trainer.total_steps={steps}", "data.eval_every=0", f"trainer.save_every={10 * steps}",
        "trainer.keep_checkpoints=1", "data.eval_n=1", "data.eval_samples=1"])  # the run's
    # evaluations (at steps 0 and last) are outside the measured steps; keep them short
    rows, prof = [], {}

    def progress(step, m):
        rows.append(dict(m))
        if profile_step is not None and step == profile_step - 1:
            import torch.profiler as tp
            prof["p"] = tp.profile(activities=[tp.ProfilerActivity.CPU])
            prof["p"].__enter__()
        elif profile_step is not None and step == profile_step and "p" in prof:
            prof["p"].__exit__(None, None, None)

    with _PassCounter() as counter, quiet_library_bars():
        try:
            train(cfg, out, progress=progress)
        finally:
            if "p" in prof and profile_step is not None and len(rows) < profile_step:
                prof["p"].__exit__(None, None, None)          # the run ended early
    for row, c in zip(rows, counter.steps):
        row.update({f"fwd/{k}": v for k, v in c.items()})
    return {"steps": rows[1:], "profile": prof.get("p")}


def trl_run(steps: int, out: Path) -> dict:
    """`steps` steps of TRL's GRPOTrainer, 8 x 8; per-step seconds and completion tokens."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from poise_probe.integrations.task_data import TaskReward, task_rows
    from poise_probe.models import resolve_model_path

    path = str(resolve_model_path("tiny-reasoner"))
    times, logged = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                logged.append(dict(logs))

    args = GRPOConfig(
        output_dir=str(out), max_steps=steps, learning_rate=5e-5, num_generations=8,
        per_device_train_batch_size=64, max_completion_length=96, temperature=1.0, beta=0.0,
        loss_type="dapo", scale_rewards="group", num_iterations=1, use_cpu=True, bf16=False,
        logging_steps=1, report_to=[], save_strategy="no", seed=0, disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = GRPOTrainer(model=path, reward_funcs=[TaskReward()], args=args,
                          processing_class=AutoTokenizer.from_pretrained(path),
                          train_dataset=Dataset.from_list(task_rows(TASKS, 64, seed=0)),
                          callbacks=[Clock()])
    with contextlib.redirect_stdout(sys.stderr):        # TRL prints its logs without tqdm
        trainer.train()
    rows = [{"timing_s/step": t, "tokens/generated": lg["completions/mean_length"] * 64}
            for t, lg in zip(times, logged)]
    return {"steps": rows[1:]}


def bench_trl(rounds: int, steps: int, work: Path) -> dict:
    import torch

    names = ["trl_grpo", "grpo", "grpo_before", "grpo_no_shadow", "poise", "poise_before"]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    profile = None
    for rnd in range(rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]     # rotate the start
        for name in order:
            out = work / f"{name}-r{rnd}"
            t0 = time.perf_counter()
            if name == "trl_grpo":
                res = trl_run(steps + 1, out)
            else:
                res = ours_run(name, steps + 1, out,
                               profile_step=3 if (name == "poise" and rnd == 0) else None)
                profile = res["profile"] or profile
            runs[name].append(res["steps"])
            sec = statistics.median(r["timing_s/step"] for r in res["steps"])
            say(f"trl: round {rnd + 1}/{rounds} {name}: {sec:.2f} s/step "
                f"({time.perf_counter() - t0:.0f} s)")
    out: dict = {"contenders": {}, "settings": {"rounds": rounds, "steps_measured": steps,
                                                "torch_threads": torch.get_num_threads()}}
    for name, per_round in runs.items():
        sec = [statistics.median(r["timing_s/step"] for r in rows) for rows in per_round]
        tps = [sum(r["tokens/generated"] for r in rows) / sum(r["timing_s/step"] for r in rows)
               for rows in per_round]
        entry = {"s_per_step": summary(sec), "completion_tok_per_s": summary(tps)}
        flat = [r for rows in per_round for r in rows]
        if name != "trl_grpo":
            step = statistics.median(r["timing_s/step"] for r in flat)
            entry["stage_share"] = {s: statistics.median(r.get(f"timing_s/{s}", 0.0) /
                                                         r["timing_s/step"] for r in flat)
                                    for s in STAGES}
            entry["stage_s"] = {s: statistics.median(r.get(f"timing_s/{s}", 0.0) for r in flat)
                                for s in STAGES}
            no_old = [sum(r["tokens/generated"] for r in rows) /
                      sum(r["timing_s/step"] - r.get("timing_s/old_log_prob", 0) for r in rows)
                      for rows in per_round]
            entry["completion_tok_per_s_without_old_pass"] = summary(no_old)
            entry["fwd_tokens"] = {k: statistics.median(r[f"fwd/{k}"] for r in flat)
                                   for k in ("useful", "padded", "prompt", "response")}
            entry["step_median_s"] = step
        out["contenders"][name] = entry
    trl_tps = out["contenders"]["trl_grpo"]["completion_tok_per_s"]["median"]
    for name in names[1:]:
        c = out["contenders"][name]
        c["throughput_over_trl"] = c["completion_tok_per_s"]["median"] / trl_tps
        c["throughput_over_trl_without_old_pass"] = \
            c["completion_tok_per_s_without_old_pass"]["median"] / trl_tps
    for new, old in (("grpo", "grpo_before"), ("poise", "poise_before")):
        out["contenders"][new]["speedup_over_before"] = (
            out["contenders"][old]["s_per_step"]["median"]
            / out["contenders"][new]["s_per_step"]["median"])
    if profile is not None:
        out["profile_poise_step"] = top_ops(profile)
    return out


def top_ops(prof, k: int = 10) -> dict:
    """The `k` operators with the most self CPU time outside matrix products, and the share of
    the profiled step's self time that matrix products take."""
    mm = ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm", "_scaled_dot_product",
          "scaled_dot_product")
    ev = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in ev) or 1.0
    is_mm = [any(e.key == f"aten::{m}" or e.key.startswith(f"aten::{m}") for m in mm)
             for e in ev]
    rows = sorted((e for e, m in zip(ev, is_mm) if not m), key=lambda e: -e.self_cpu_time_total)
    return {"matmul_self_share": sum(e.self_cpu_time_total for e, m in zip(ev, is_mm) if m)
            / total,
            "top": [{"op": e.key, "self_share": e.self_cpu_time_total / total,
                     "calls": e.count} for e in rows[:k]]}


def matmul_params(model_path) -> int:
    """Parameters of the linear layers (LM head included): 2 FLOPs each per token forward."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path)
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return int(n)


def peak_fraction(trl: dict, peak: dict) -> dict:
    """FLOPs of a step (from parameters and tokens) over its time, against the fp32 peak."""
    from poise_probe.models import resolve_model_path

    p = matmul_params(resolve_model_path("tiny-reasoner"))
    out = {"matmul_params": p}
    for name in ("poise", "grpo", "poise_before"):
        c = trl["contenders"][name]
        tok = c["fwd_tokens"]
        # generation prefills every prompt row and decodes every response token; the old-policy
        # pass runs forward over prompt + response; the update forward + backward (3x)
        flops = 2 * p * tok["useful"] * (1 + 1 + 3)
        gflops = flops / c["step_median_s"] / 1e9
        out[name] = {"gflop_per_step": flops / 1e9, "gflop_per_s": gflops,
                     "fraction_of_fp32_peak": gflops / peak["fp32_gflops"],
                     "padded_over_useful": tok["padded"] / tok["useful"]}
    return out


# -- probe cost --------------------------------------------------------------------------------

def capture_cost(model_path: str, overrides: list[str], reps: int = 9) -> dict:
    """Seconds of the old-policy forward over one POISE batch with and without the feature hook
    (alternated), on rollouts sampled from the model itself."""
    from poise_probe.config import load_config
    from poise_probe.data import PromptStream
    from poise_probe.features import TagIds
    from poise_probe.models import load_policy
    from poise_probe.update import old_policy_pass
    from poise_probe.valuebench.data import sample_rollouts

    cfg = load_config(None, [f"model.path={model_path}"] + overrides)
    model, tok = load_policy(cfg.model.path, device="cpu")
    layer = cfg.probe.resolve_layer(model.config.num_hidden_layers, model_path)
    stream = PromptStream(cfg.data.tasks, cfg.data.task_kwargs, seed=0)
    prompts = stream.next(cfg.rollout.prompts_per_step)
    batch = sample_rollouts(model, tok, prompts, cfg.rollout.num_generations, cfg=cfg, seed=0)
    tags = TagIds.from_tokenizer(tok)
    times = {"with": [], "without": []}
    pair = [("with", layer), ("without", None)]
    for rep in range(reps):
        for key, lay in (pair if rep % 2 == 0 else pair[::-1]):     # alternate the order
            t0 = time.perf_counter()
            old_policy_pass(model, batch, cfg, tags, lay, "cpu", contextlib.nullcontext())
            times[key].append(time.perf_counter() - t0)
    diffs = [a - b for a, b in zip(times["with"], times["without"])]
    return {"old_pass_with_capture_s": summary(times["with"]),
            "old_pass_without_capture_s": summary(times["without"]),
            "capture_s": summary(diffs)}


def bench_probe(trl: dict | None, work: Path, big: bool) -> dict:
    from poise_probe.runtime import DEMO_OVERRIDES

    out: dict = {}
    tiny_over = [o for o in DEMO_OVERRIDES if not o.startswith("model.path")]
    cap = capture_cost("tiny-reasoner", tiny_over)
    tiny: dict = {"capture": cap}
    if trl is not None:
        c = trl["contenders"]["poise"]
        step, probe = c["step_median_s"], c["stage_s"]["probe"]
        tiny.update({"step_s": step, "predict_refit_s": probe,
                     "share": (probe + max(cap["capture_s"]["median"], 0.0)) / step})
        g, ns = trl["contenders"]["grpo"], trl["contenders"]["grpo_no_shadow"]
        out["grpo_shadow"] = {
            "step_s": g["s_per_step"]["median"], "no_shadow_step_s": ns["s_per_step"]["median"],
            "share": 1 - ns["s_per_step"]["median"] / g["s_per_step"]["median"],
            "probe_stage_share": g["stage_share"]["probe"]}
    out["tiny"] = tiny
    say(f"probe: tiny capture {cap['capture_s']['median'] * 1e3:.1f} ms")
    if big:
        out["qwen3_0.6b"] = bench_probe_big(work)
    return out


def bench_probe_big(work: Path) -> dict:
    """A random-initialised Qwen3-0.6B architecture, a few short CPU steps with the probe fitted
    from the second step: predict + refit and capture against the step."""
    import subprocess

    path = work / "qwen3-0.6b"
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "training" / "make_random_model.py"),
                        "--arch", "qwen3-0.6b", "--out", str(path)], check=True)
    over = ["rollout.prompts_per_step=8", "rollout.num_generations=2",
            "rollout.max_completion_length=24", "optim.mini_batch_prompts=8",
            "optim.micro_batch_size=16", "probe.bootstrap_steps=1", "probe.min_steps_to_fit=1",
            "data.eval_every=0", "trainer.save_every=100", "trainer.keep_checkpoints=1",
            "data.eval_n=1", "data.eval_samples=1"]
    from poise_probe.config import load_config
    from poise_probe.runtime import quiet_library_bars
    from poise_probe.trainer import train

    rows = []
    cfg = load_config(None, [f"model.path={path}", "trainer.total_steps=3"] + over)
    with quiet_library_bars():
        train(cfg, work / "qwen3-0.6b-run", progress=lambda s, m: rows.append(dict(m)))
    rows = rows[1:]
    step = statistics.median(r["timing_s/step"] for r in rows)
    probe = statistics.median(r["timing_s/probe"] for r in rows)
    cap = capture_cost(str(path), over, reps=2)
    res = {"step_s": step, "predict_refit_s": probe, "capture": cap,
           "share": (probe + max(cap["capture_s"]["median"], 0.0)) / step,
           "settings": over}
    say(f"probe: qwen3-0.6b step {step:.1f} s, probe {probe * 1e3:.0f} ms, "
        f"capture {cap['capture_s']['median'] * 1e3:.0f} ms")
    return res


# -- efficiency --------------------------------------------------------------------------------

def bench_efficiency(out_dir: Path, arms: list[str], seeds: list[int], steps: int,
                     jobs: int) -> dict:
    import numpy as np
    import pandas as pd

    from poise_probe.ablate import run_ablation, step_tokens
    from poise_probe.rundir import RunReader

    tables = run_ablation(out_dir, arms=arms, seeds=seeds, steps=steps, eval_every=15,
                          eval_n=50, jobs=jobs, png=False, progress=lambda m: say(f"ablate: {m}"))
    rows = []
    for arm in arms:
        for seed in seeds:
            m = RunReader(out_dir / "runs" / f"{arm}-seed{seed}").metrics_frame()
            m = m.groupby("step", sort=True).last().reset_index()
            tok = step_tokens(m).cumsum()
            sec = pd.to_numeric(m.get("timing_s/step"), errors="coerce").fillna(0).cumsum()
            ev = m["eval/accuracy"].notna()
            for s, t, w, a in zip(m["step"][ev], tok[ev], sec[ev], m["eval/accuracy"][ev]):
                rows.append({"arm": arm, "seed": seed, "step": int(s), "tokens": float(t),
                             "seconds": float(w), "accuracy": float(a)})
    curves = pd.DataFrame(rows)
    mean = curves.groupby(["arm", "step"]).agg(
        tokens=("tokens", "mean"), seconds=("seconds", "mean"), accuracy=("accuracy", "mean"),
        sd=("accuracy", "std"), n=("accuracy", "size")).reset_index()
    final = {}
    for arm, g in mean.groupby("arm"):
        last = g.sort_values("step").iloc[-1]
        final[arm] = {"accuracy": float(last.accuracy), "sd": float(last.sd),
                      "tokens": float(last.tokens), "seconds": float(last.seconds)}
    ratio, reason, cross = None, None, None
    if "poise" in final and "grpo_8" in final:
        target = final["grpo_8"]["accuracy"]
        g = mean[mean.arm == "poise"].sort_values("step")
        xs, ys = g.tokens.to_numpy(), g.accuracy.to_numpy()
        for i in range(len(ys)):
            if ys[i] >= target:
                cross = float(xs[0]) if i == 0 else float(
                    xs[i - 1] + (target - ys[i - 1]) / (ys[i] - ys[i - 1]) * (xs[i] - xs[i - 1]))
                break
        if cross is None:
            reason = (f"POISE's mean held-out accuracy never reached GRPO-8's final "
                      f"{target:.3f} within {steps} steps (its final: "
                      f"{final['poise']['accuracy']:.3f})")
        else:
            ratio = cross / final["grpo_8"]["tokens"]
    from poise_probe.ablate_figures import accuracy_figure

    figs = {f"bench-efficiency-{x}": accuracy_figure(curves, x=x) for x in ("tokens", "seconds")}
    return {"arms": arms, "seeds": seeds, "steps": steps, "final": final,
            "tokens_to_match_grpo8": cross, "ratio": ratio, "why_null": reason,
            "summary": tables["summary"].replace({np.nan: None}).to_dict("records"),
            "curves": mean.replace({np.nan: None}).to_dict("records"), "_figures": figs}


# -- figures, json, markdown -------------------------------------------------------------------

def trl_figures(trl: dict) -> dict:
    import plotly.graph_objects as go

    c = trl["contenders"]
    names = list(c)
    med = [c[n]["completion_tok_per_s"]["median"] for n in names]
    lo = [m - c[n]["completion_tok_per_s"]["min"] for n, m in zip(names, med)]
    hi = [c[n]["completion_tok_per_s"]["max"] - m for n, m in zip(names, med)]
    bar = go.Figure(go.Bar(x=names, y=med, error_y={"type": "data", "array": hi,
                                                     "arrayminus": lo}))
    bar.update_layout(title="Completion tokens per second, same run (median, min-max over "
                            "rounds)", yaxis_title="completion tokens / s",
                      template="plotly_white")
    stages = go.Figure()
    ours = [n for n in names if n != "trl_grpo"]
    for s in STAGES:
        stages.add_trace(go.Bar(name=s, x=ours, y=[c[n]["stage_s"][s] for n in ours]))
    stages.update_layout(barmode="stack", title="Where the step goes (median seconds per stage)",
                         yaxis_title="seconds", template="plotly_white")
    return {"bench-trl-throughput": bar, "bench-stages": stages}


def write_figures(figs: dict) -> list[str]:
    IMG.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figs.items():
        fig.write_html(IMG / f"{name}.html", include_plotlyjs="cdn")
        written.append(f"docs/img/{name}.html")
        try:
            fig.write_image(IMG / f"{name}.png", width=900, height=500)
            written.append(f"docs/img/{name}.png")
        except Exception as e:                 # kaleido / Chromium missing: HTML only
            say(f"{name}.png not written ({type(e).__name__}: {e})")
    return written


def headline(res: dict) -> dict:
    """Each headline figure with the machine and the date of the section that measured it."""
    trl, probe, eff, peak = (res.get(k) or {} for k in ("trl", "probe", "efficiency", "peak"))
    c = trl.get("contenders", {})
    frac = (trl.get("peak_fraction") or {}).get("poise", {})
    values = {
        "trl_throughput_ratio": (trl, c.get("grpo", {}).get("throughput_over_trl")),
        "trl_throughput_ratio_poise": (trl, c.get("poise", {}).get("throughput_over_trl")),
        "probe_overhead_share": (probe, probe.get("tiny", {}).get("share")),
        "probe_overhead_share_qwen3_0.6b_cpu": (probe, probe.get("qwen3_0.6b", {}).get("share")),
        "tokens_to_match_grpo8_ratio": (eff, eff.get("ratio")),
        "cpu_peak_fraction": (trl, frac.get("fraction_of_fp32_peak")),
        "gpu_generate_speedup": ({}, None),
        "default_step_speedup_poise": (trl, c.get("poise", {}).get("speedup_over_before")),
        "default_step_speedup_grpo": (trl, c.get("grpo", {}).get("speedup_over_before")),
        "cpu_fp32_peak_gflops": (peak, peak.get("fp32_gflops")),
    }
    return {k: {"value": v, "machine": sec.get("machine"), "date": sec.get("date")}
            for k, (sec, v) in values.items()}


def fmt(x, spec=".2f", none="not measured") -> str:
    return none if x is None else format(x, spec)


def markdown(res: dict) -> str:
    h, m = res["headline"], res["machine"]
    when = res["date"]
    commands: dict[str, list[str]] = {}
    for sec in SECTIONS:
        if res.get(sec):
            commands.setdefault(res[sec].get("command") or res["command"], []).append(
                f"{sec} ({res[sec].get('date') or when})")
    lines = [BEGIN, "", "## The CPU suite (`benchmarks/run.py`, issue 15)", "",
             "```bash"] + list(commands) + ["```", "",
             "Sections by command: " + "; ".join(f"`{c.split('run.py ')[-1]}`: {', '.join(v)}"
                                                 for c, v in commands.items()) + ".", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, no GPU; torch "
             f"{m['torch']} ({m['torch_threads']} threads). Each section's ratios are measured "
             f"within its one run, contenders alternated round by round. Raw figures: "
             f"`benchmarks/results/latest.json`.", "",
             "| headline | value | goal | met |", "|---|---|---|---|"]
    for key, (op, goal) in GOALS.items():
        v = h[key]["value"]
        met = "n/a" if v is None else ("yes" if (v >= goal if op == ">=" else v <= goal)
                                       else "**no**")
        pct = "share" in key or "fraction" in key
        shown = fmt(v, ".1%" if pct else ".2f")
        lines.append(f"| `{key}` | {shown} | {op} {format(goal, '.0%' if pct else 'g')} | "
                     f"{met} |")
    lines.append("| `gpu_generate_speedup` | not measured (no GPU lent) | | n/a |")
    lines.append("")
    peak = res.get("peak")
    if peak:
        lines += [f"Peak here: fp32 {peak['fp32_gflops']:.0f} GFLOP/s, bf16 "
                  f"{peak['bf16_gflops']:.0f} GFLOP/s (the best torch.mm rate over 512², 1024², "
                  f"2048² and the shapes below). At the tiny reasoner's "
                  f"own shapes: " + ", ".join(
                      f"{k} {v['fp32_gflops']:.0f}" for k, v in peak["tiny_shapes"].items())
                  + " GFLOP/s.", ""]
    trl = res.get("trl")
    if trl:
        lines += ["### Against TRL's GRPOTrainer (8 prompts x 8 completions, 96 new tokens, "
                  "fp32)", "",
                  "| contender | s/step (median, min-max) | completion tok/s | × TRL | "
                  "× TRL without the old-policy pass |", "|---|---|---|---|---|"]
        for name, c in trl["contenders"].items():
            s, t = c["s_per_step"], c["completion_tok_per_s"]
            lines.append(f"| {name} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | "
                         f"{t['median']:.0f} | {fmt(c.get('throughput_over_trl'))} | "
                         f"{fmt(c.get('throughput_over_trl_without_old_pass'))} |")
        lines += ["", "Stage shares of the step (median):", "",
                  "| contender | " + " | ".join(STAGES) + " | padded / useful forward tokens |",
                  "|---" * (len(STAGES) + 2) + "|"]
        for name, c in trl["contenders"].items():
            if "stage_share" in c:
                ft = c["fwd_tokens"]
                lines.append(f"| {name} | " + " | ".join(f"{c['stage_share'][s]:.1%}"
                                                         for s in STAGES)
                             + f" | {ft['padded'] / ft['useful']:.2f} |")
        pf = trl.get("peak_fraction")
        if pf:
            lines += ["", f"FLOPs: {pf['matmul_params'] / 1e6:.2f} M matmul parameters; "
                      + "; ".join(f"{n}: {v['gflop_per_step']:.1f} GFLOP/step, "
                                  f"{v['gflop_per_s']:.1f} GFLOP/s = "
                                  f"{v['fraction_of_fp32_peak']:.1%} of the fp32 peak"
                                  for n, v in pf.items() if isinstance(v, dict)) + "."]
        prof = trl.get("profile_poise_step")
        if prof:
            lines += ["", f"One profiled POISE step: matrix products take "
                      f"{prof['matmul_self_share']:.0%} of the self CPU time; the ten hottest "
                      f"operators outside them:", "", "| operator | self share | calls |",
                      "|---|---|---|"]
            lines += [f"| `{r['op']}` | {r['self_share']:.1%} | {r['calls']} |"
                      for r in prof["top"]]
    probe = res.get("probe")
    if probe:
        t = probe.get("tiny", {})
        lines += ["", "### The probe's cost", ""]
        if "share" in t:
            lines.append(f"- Tiny reasoner, POISE step {t['step_s']:.2f} s: predict + refit "
                         f"{t['predict_refit_s'] * 1e3:.0f} ms, feature capture "
                         f"{t['capture']['capture_s']['median'] * 1e3:.1f} ms "
                         f"(old-policy pass {t['capture']['old_pass_without_capture_s']['median']:.2f}"
                         f" s without the hook): **{t['share']:.1%}** of the step.")
        b = probe.get("qwen3_0.6b")
        if b:
            c = b["capture"]["capture_s"]
            cap = (f"capture {c['median'] * 1e3:.0f} ms" if c["median"] >= 0 else
                   f"capture not resolvable (with minus without the hook: median "
                   f"{c['median'] * 1e3:.0f} ms, {c['min'] * 1e3:.0f} to {c['max'] * 1e3:.0f} ms "
                   f"over {c['n']} pairs, so counted as 0)")
            lines.append(f"- Random-initialised Qwen3-0.6B, CPU, 8 x 2 rollouts of at most 24 "
                         f"tokens: step {b['step_s']:.1f} s, predict + refit "
                         f"{b['predict_refit_s'] * 1e3:.0f} ms, {cap}: "
                         f"**{b['share']:.2%}** of the step (GPU: not measured).")
        s = probe.get("grpo_shadow")
        if s:
            lines.append(f"- GRPO's shadow probe: step {s['step_s']:.2f} s with it, "
                         f"{s['no_shadow_step_s']:.2f} s with `probe.shadow=false` "
                         f"({s['share']:.1%}; its probe stage alone "
                         f"{s['probe_stage_share']:.1%}).")
    eff = res.get("efficiency")
    if eff:
        lines += ["", f"### Sample efficiency ({', '.join(eff['arms'])}; seeds "
                  f"{', '.join(map(str, eff['seeds']))}; {eff['steps']} steps; held-out Avg@4 on "
                  f"50 prompts per task)", "",
                  "| arm | final accuracy (mean ± sd) | generated tokens | training seconds |",
                  "|---|---|---|---|"]
        for arm, f in eff["final"].items():
            lines.append(f"| {arm} | {f['accuracy']:.3f} ± {f['sd']:.3f} | {f['tokens']:,.0f} | "
                         f"{f['seconds']:.0f} |")
        lines.append("")
        lines.append(f"Tokens POISE needs to reach GRPO-8's final accuracy over GRPO-8's tokens: "
                     f"**{fmt(eff['ratio'])}**" + (f" ({eff['why_null']})" if eff['why_null']
                                                    else "") + ".")
    figs = res.get("figures") or []
    if figs:
        lines += ["", "Figures: " + ", ".join(f"[{Path(f).name}](../{f})" for f in figs
                                               if f.endswith(".html")) + "."]
    lines += ["", END]
    return "\n".join(lines)


def update_markdown(block: str) -> None:
    text = MD.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    MD.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--suite", choices=["cpu", "gpu"], required=True)
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections of {SECTIONS}; none: only rewrite "
                         f"BENCHMARKS.md from latest.json")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds of the trl section")
    ap.add_argument("--steps", type=int, default=4, help="measured steps per run (plus one)")
    ap.add_argument("--arms", default="poise,grpo_8,dapo_8,rloo_2,rloo_8,ppo_critic")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--eff-steps", type=int, default=60)
    ap.add_argument("--jobs", type=int, default=2, help="efficiency runs trained at once")
    ap.add_argument("--efficiency-dir", default=str(REPO / "runs" / "bench_efficiency"))
    ap.add_argument("--no-big", action="store_true", help="skip the Qwen3-0.6B probe steps")
    args = ap.parse_args(argv)
    if args.suite == "gpu":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("--suite gpu needs a CUDA device; this machine has none. "
                             "Run --suite cpu here.")
        raise SystemExit("--suite gpu is not written yet (issue 15, item 5).")
    only = [s.strip() for s in args.only.split(",") if s.strip() and s.strip() != "none"]
    bad = sorted(set(only) - set(SECTIONS))
    if bad:
        raise SystemExit(f"--only: unknown sections {bad}; sections: {SECTIONS}")
    prev = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    res = {k: prev.get(k) for k in SECTIONS}
    res.update({"date": dt.date.today().isoformat(), "machine": machine(),
                "command": "python benchmarks/run.py " + " ".join(argv or sys.argv[1:])})
    figs: dict = {}
    with tempfile.TemporaryDirectory(prefix="poise-bench-") as tmp:
        work = Path(tmp)
        if "peak" in only:
            res["peak"] = bench_peak()
        if "trl" in only:
            res["trl"] = bench_trl(args.rounds, args.steps, work)
            if res["peak"]:
                res["trl"]["peak_fraction"] = peak_fraction(res["trl"], res["peak"])
            figs.update(trl_figures(res["trl"]))
        if "probe" in only:
            res["probe"] = bench_probe(res["trl"], work, big=not args.no_big)
        if "efficiency" in only:
            eff = bench_efficiency(Path(args.efficiency_dir),
                                   [a.strip() for a in args.arms.split(",") if a.strip()],
                                   [int(s) for s in args.seeds.split(",") if s.strip()],
                                   args.eff_steps, args.jobs)
            figs.update(eff.pop("_figures"))
            res["efficiency"] = eff
    res["figures"] = sorted(set((prev.get("figures") or []) + write_figures(figs)))
    for section in only:                  # what was measured now, where, when and how
        if res.get(section) is not None:
            res[section].update({"machine": res["machine"]["cpu"], "date": res["date"],
                                 "command": res["command"]})
    res["headline"] = headline(res)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2, default=float) + "\n")
    update_markdown(markdown(res))
    print(json.dumps({k: v["value"] for k, v in res["headline"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
