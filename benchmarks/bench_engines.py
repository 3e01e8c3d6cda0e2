"""Rollout engines side by side: generation tokens/s and whole-step time, `hf` against `vllm`.

    make vllm-env
    nice .venv-vllm/bin/python benchmarks/bench_engines.py [--models tiny,qwen3-0.6b]
                                                          [--rounds 5] [--steps 3]

Runs in the vLLM environment, which has both engines. For each model (the bundled tiny
reasoner; a random-initialised Qwen3-0.6B architecture, built here, fp32 on the CPU) it
1. generates the same prompts (the task mix, K samples each, up to N new tokens, temperature 1)
   with `HFEngine` and `VLLMEngine`, alternating engine by engine for `--rounds` rounds, and
   reports completion tokens per second (median, min, max);
2. trains `--steps` steps with `rollout.engine=hf` and then with `rollout.engine=vllm` (the same
   recipe, seed and prompts; each a `poise train` process) and reports the median whole-step
   time, first step excluded.
Writes benchmarks/results/engines.json with `vllm_over_hf_generate` and `vllm_over_hf_step` per
model, beside the machine and the date; BENCHMARKS.md shows them.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "engines.json"

# per model: prompts x samples x new tokens for generation; the training recipe's sizes
SIZES = {
    "tiny": dict(prompts=64, samples=2, new=96,
                 train=dict(prompts=32, k=2, new=96, micro=64, kv_share=0.15)),
    # 0.6B on a 24 GiB CPU machine: 9 GiB of trainer state, vLLM's fp32 copy, a 1.2 GiB KV cache
    "qwen3-0.6b": dict(prompts=8, samples=2, new=32,
                       train=dict(prompts=4, k=2, new=16, micro=8, kv_share=0.05)),
}


def model_path(name: str, workdir: Path) -> str:
    if name == "tiny":
        return "tiny-reasoner"
    out = workdir / name
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "training" / "make_random_model.py"),
                        "--arch", name, "--out", str(out)], check=True)
    return str(out)


def prompts_for(tokenizer, n: int) -> list[list[int]]:
    from poise_probe.data import PromptStream
    from poise_probe.generation import encode_prompts

    stream = PromptStream(["arith", "boolean", "code_output"], {}, seed=0, pool_size=256)
    return encode_prompts(tokenizer, [p.example.prompt for p in stream.next(n)])


def bench_generate(path: str, size: dict, rounds: int) -> dict:
    """Tokens/s of each engine on the same prompts, alternating engines round by round."""
    from poise_probe.models import load_policy
    from poise_probe.rollout import HFEngine, SamplingSettings
    from poise_probe.rollout.vllm_engine import VLLMEngine

    model, tok = load_policy(path)
    ids = prompts_for(tok, size["prompts"])
    sampling = SamplingSettings(1.0, 1.0, size["new"])
    engines = {"hf": HFEngine(model, tok, batch_size=256),
               "vllm": VLLMEngine(path, tokenizer=tok, dtype="float32",
                                  max_model_len=min(size["new"] + 512,
                                                    model.config.max_position_embeddings))}
    engines["vllm"].sync_weights(model)
    rates: dict[str, list[float]] = {k: [] for k in engines}
    for name, eng in engines.items():                       # warm-up, not timed
        eng.generate(ids[:2], 1, sampling, seed=99)
    for r in range(rounds):
        for name, eng in (engines.items() if r % 2 == 0 else reversed(engines.items())):
            t = time.perf_counter()
            out = eng.generate(ids, size["samples"], sampling, seed=r)
            rates[name].append(out.num_tokens / (time.perf_counter() - t))
            print(f"  generate round {r} {name}: {rates[name][-1]:.0f} tokens/s", flush=True)
    engines["vllm"].close()
    del engines, model
    gc.collect()
    return {name: summary(v) for name, v in rates.items()}


def bench_step(path: str, size: dict, steps: int, workdir: Path) -> dict:
    """Median step time of `steps` training steps with each engine (first step excluded).

    Each engine trains in its own `poise train` process, so one run's memory (a 0.6B model's
    fp32 AdamW state is 9 GiB) is gone before the next starts on this 24 GiB machine.
    """
    from poise_probe.rundir import RunReader

    t = size["train"]
    out = {}
    for engine in ("hf", "vllm"):
        run = workdir / f"run-{Path(path).name}-{engine}"
        subprocess.run([
            sys.executable, "-m", "poise_probe", "train",
            "--config", str(REPO / "training" / "configs" / "poise_tiny.yaml"),
            "--output", str(run), f"model.path={path}", f"rollout.engine={engine}",
            f"trainer.total_steps={steps}", f"rollout.prompts_per_step={t['prompts']}",
            f"rollout.num_generations={t['k']}", f"rollout.max_completion_length={t['new']}",
            f"optim.mini_batch_prompts={t['prompts']}", f"optim.micro_batch_size={t['micro']}",
            f"rollout.gpu_memory_utilization={t['kv_share']}", "data.eval_n=1",
            "data.eval_samples=1", "data.eval_every=0", "trainer.save_every=1000",
            "probe.layer=null"], check=True, stdout=subprocess.DEVNULL)
        rows = [m for m in RunReader(run).metrics() if "timing_s/step" in m]
        times = [m["timing_s/step"] for m in rows[1:]] or [rows[0]["timing_s/step"]]
        gen = [m["timing_s/gen"] for m in rows[1:]] or [rows[0]["timing_s/gen"]]
        out[engine] = {"step_s": summary(times), "gen_s": summary(gen),
                       "logprob_abs_diff_max": max(m.get("rollout/logprob_abs_diff_max", 0.0)
                                                   for m in rows)}
        print(f"  train {engine}: step {out[engine]['step_s']['median']:.2f} s", flush=True)
    return out


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,qwen3-0.6b")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    result = {"date": dt.date.today().isoformat(), "machine": machine(), "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            if name not in SIZES:
                raise SystemExit(f"--models: unknown model {name!r}; choose from {sorted(SIZES)}")
            print(f"{name}:", flush=True)
            path = model_path(name, work)
            gen = bench_generate(path, SIZES[name], args.rounds)
            step = bench_step(path, SIZES[name], args.steps, work)
            result["models"][name] = {
                "sizes": SIZES[name], "generate_tokens_per_s": gen, "train": step,
                "vllm_over_hf_generate": gen["vllm"]["median"] / gen["hf"]["median"],
                "vllm_over_hf_step": step["hf"]["step_s"]["median"]
                / step["vllm"]["step_s"]["median"]}
            r = result["models"][name]
            print(f"{name}: vllm/hf generate {r['vllm_over_hf_generate']:.2f}x, "
                  f"step {r['vllm_over_hf_step']:.2f}x", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def machine() -> dict:
    import torch
    import vllm

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "vllm": vllm.__version__,
            "platform": platform.platform()}


if __name__ == "__main__":
    raise SystemExit(main())
