"""One RLVR training loop for every estimator (POISE, GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO).

Read top to bottom, one step is (POISE.md, "Order within a step"):
  sample prompts -> generate K rollouts (engine) -> score -> old-log-prob forward with feature
  capture -> rollout correction -> probe predictions (frozen) -> advantages (frozen) -> probe
  buffer append + refit -> PPO update over mini-batches -> weights to the engine -> held-out
  eval -> rollout table, metrics, checkpoint.
The math lives in `advantages`, `losses`, `probe` and `features`; the passes in `update`; the
engines in `rollout`; records in `records`; state and checkpoints in `state` and `checkpoint`.
This module only wires them.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from poise_probe import __version__
from poise_probe.advantages import AdvantageResult, compute_advantages, poise_with_bootstrap
from poise_probe.checkpoint import resume as resume_from_checkpoint
from poise_probe.checkpoint import save_checkpoint
from poise_probe.config import Config
from poise_probe.data import PromptStream
from poise_probe.evaluation import evaluate
from poise_probe.features import TagIds
from poise_probe.group_norm import GROUP_ESTIMATORS, group_advantages
from poise_probe.losses import logprob_mismatch, truncated_is_weights
from poise_probe.models import load_policy
from poise_probe.probe import ProbeBank
from poise_probe.records import probe_snapshot, probe_targets, rollout_table, step_metrics
from poise_probe.rollout import RolloutEngine, SamplingSettings, make_engine, sampling_settings
from poise_probe.rollout.collect import collect_rollouts
from poise_probe.rundir import RunWriter
from poise_probe.state import TrainState, seed_everything
from poise_probe.tracking import Tracker, open_tracker, require
from poise_probe.update import old_policy_pass, ppo_update, response_mask
from poise_probe.value_methods import StepContext, make_value_method

logger = logging.getLogger(__name__)

# the sandbox forks worker processes; tokenizers would warn and turn its thread pool off
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STAGES = ("gen", "reward", "old_log_prob", "probe", "adv", "update", "sync")


@dataclass
class Run:
    """What every step needs besides the train state: the fixed parts of one run."""

    cfg: Config
    state: TrainState
    tokenizer: object
    engine: RolloutEngine
    ref: torch.nn.Module | None          # reference policy for a KL penalty, if any
    tags: TagIds
    layer: int | None                    # the decoder block the probe reads (None: no probe)
    writer: RunWriter
    device: torch.device
    autocast: object
    sampling: SamplingSettings
    tracker: Tracker                     # TensorBoard / W&B mirrors of metrics.jsonl, if any


def select_device(cfg: Config) -> torch.device:
    """`model.device`, where `auto` means CUDA if present; `cuda` without CUDA is an error."""
    dev = cfg.model.device
    if dev == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"model.device={dev} but this machine has no CUDA device (torch "
                           f"{torch.__version__}); this recipe is meant for a GPU. To run it on "
                           f"the CPU anyway (slowly), pass model.device=cpu.")
    return torch.device(dev)


#: Config keys that say what a run *is*; a resume that changes one is refused unless
#: `allow_change` (`poise train --resume --allow-change`), and the change is recorded.
RUN_IDENTITY_KEYS = ("model.path", "algorithm.adv_estimator", "data.tasks", "data.task_kwargs",
                     "rollout.num_generations", "trainer.seed")


class TrainingStopped(KeyboardInterrupt):
    """SIGTERM (or SIGINT) asked the run to stop: the step in flight is abandoned, the run is
    marked `stopped` and resumes from its last checkpoint."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def train(cfg: Config, output_dir: str | Path | None = None, *, resume: bool = False,
          progress: Callable[[int, dict], None] | None = None,
          stop_after: int | None = None, allow_change: bool = False,
          started: Callable[[int], None] | None = None) -> Path:
    """Run (or resume) training; returns the run directory.

    `progress(step, metrics)` is called after every step (the CLI prints its one-line summary
    there); `started(step)` once the run has begun (every check passed) at `step` (0, or the
    checkpoint's). `stop_after` ends the process-level loop early (tests simulate a kill with it).
    A resume checks everything (the config's changes, the checkpoint) before it writes anything;
    a resume of a run killed before its first checkpoint restarts it from step 0 in place.
    SIGTERM and Ctrl-C stop the run cleanly: status `stopped`, resumable.
    """
    out = Path(output_dir or cfg.trainer.output_dir)
    with _stop_on_sigterm():
        return _train(cfg, out, resume, progress, stop_after, allow_change, started)


@contextmanager
def _stop_on_sigterm():
    """SIGTERM raises `TrainingStopped` in the main thread (Ctrl-C's KeyboardInterrupt too)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise TrainingStopped(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_resume_config(stored: dict, cfg: Config, allow_change: bool) -> dict[str, list]:
    """The resume's config changes {"section.key": [old, new]}; a change of what the run is
    (RUN_IDENTITY_KEYS) raises unless `allow_change`."""
    from poise_probe.rundir import diff_configs
    from poise_probe.rundir.schema import to_plain

    changes = diff_configs(stored, to_plain(cfg.to_dict(), "config", json_nan=False))
    identity = {k: v for k, v in changes.items() if k in RUN_IDENTITY_KEYS}
    if identity and not allow_change:
        said = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in identity.items())
        raise ValueError(f"--resume would change what the run is ({said}); nothing was written. "
                         f"Resume with the run's own values, start a new run in another "
                         f"--output, or pass --allow-change to continue anyway (the change is "
                         f"recorded in meta.json's resumes).")
    return changes


def _train(cfg: Config, out: Path, resume: bool, progress, stop_after, allow_change,
           started) -> Path:
    if resume and not (out / "meta.json").exists():
        logger.warning("--resume: %s holds no run yet (none was started there, or it was killed "
                       "before it began): starting a new run there", out)
        resume = False
    if resume:                          # a refused change fails before the model loads
        from poise_probe.rundir import RunReader
        check_resume_config(RunReader(out).config, cfg, allow_change)
    device = select_device(cfg)
    require(cfg.trainer.report_to)       # a missing tracking package fails before the model loads
    seed_everything(cfg.trainer.seed)
    model, tokenizer = load_policy(cfg.model.path, device=device, dtype=_param_dtype(cfg))
    if cfg.model.dtype == "bfloat16":
        logger.warning("model.dtype=bfloat16 keeps the policy's weights in bf16: AdamW updates "
                       "smaller than bf16's resolution (about 1e-4 relative) are lost. Use "
                       "model.dtype=auto (fp32 weights, bf16 autocast) unless memory forbids.")
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    # the decoder block the features are pooled from; None: no probe at all (probe.shadow=false)
    layer = cfg.probe.resolve_layer(model.config.num_hidden_layers, cfg.model.path) \
        if cfg.probe.shadow else None
    ref = _reference_model(cfg, device) if cfg.algorithm.kl_coef > 0 else None
    stream = PromptStream(cfg.data.tasks, cfg.data.task_kwargs, seed=cfg.trainer.seed,
                          pool_size=cfg.data.pool_size)
    _eval_tasks(cfg)                     # unknown eval tasks or knobs fail before any write
    bank = ProbeBank.from_config(cfg.probe, model.config.hidden_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    state = TrainState(model, optimizer, scheduler, bank, stream,
                       value_method=make_value_method(cfg, model, tokenizer, device))

    # takes the one-writer lock and checks the folder; writes nothing until start()
    writer = RunWriter(out, config=cfg.to_dict(), resume=resume, keep_last=cfg.trainer.keep_checkpoints,
                       start=False,
                       meta={"model": str(cfg.model.path), "device": str(device),
                             "algorithm": cfg.algorithm.adv_estimator,
                             "rollout_engine": cfg.rollout.engine,
                             "package_version": __version__, "torch": torch.__version__,
                             "platform": platform.platform(), "probe_layer": layer,
                             "run_name": out.name})
    try:
        if resume:                  # a bad checkpoint raises before the writer writes anything
            resume_from_checkpoint(writer, state)
        else:
            writer.start()
    except BaseException:
        writer.release()
        raise
    engine, tracker = None, Tracker()
    try:
        tracker = open_tracker(cfg.trainer.report_to, out, config=cfg.to_dict(),
                               wandb_project=cfg.trainer.wandb_project,
                               resume_step=state.step if resume else None)
        autocast = _autocast(cfg, device)
        engine = make_engine(cfg, model, tokenizer, device, autocast)   # holds current weights
        run = Run(cfg, state, tokenizer, engine, ref, TagIds.from_tokenizer(tokenizer), layer,
                  writer, device, autocast, sampling_settings(cfg), tracker)
        if started is not None:
            started(state.step)
        if state.step == 0:
            _evaluate(run, step=0)
        budget = cfg.trainer.token_budget
        tokens = _tokens_so_far(out) if budget is not None and state.step > 0 else 0
        for step in range(state.step + 1, cfg.trainer.total_steps + 1):
            metrics = train_step(step, run)
            tokens += int(metrics.get("tokens/sampled", 0))
            last = step == cfg.trainer.total_steps or (budget is not None and tokens >= budget)
            if last or (cfg.data.eval_every and step % cfg.data.eval_every == 0):
                t = time.perf_counter()
                metrics.update(_evaluate(run, step=step, log=False))
                metrics["timing_s/eval"] = time.perf_counter() - t
            writer.log_metrics(step, metrics)
            tracker.log(step, metrics)
            state.step = step
            if last or step % cfg.trainer.save_every == 0:
                save_checkpoint(writer, state, tokenizer)
            writer.set_status("running", last_step=step)
            if progress is not None:
                progress(step, metrics)
            if stop_after is not None and step >= stop_after:
                writer.release()
                return out
            if last:
                break
    except KeyboardInterrupt as exc:      # Ctrl-C or SIGTERM: the step in flight is abandoned
        with _no_more_stops():
            saved = writer.latest_checkpoint()
            writer.close("stopped", error=None)
            logger.warning("stopped (%s) after step %d; the last checkpoint is step %s: "
                           "`--resume` continues from it", exc or "Ctrl-C", state.step,
                           saved[0] if saved else "none (a resume restarts from step 0)")
        raise
    except BaseException as exc:
        writer.close("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        tracker.close()
        if engine is not None:
            engine.close()
    writer.close("finished")
    return out


@contextmanager
def _no_more_stops():
    """A second Ctrl-C or SIGTERM while the stopped status is written is ignored."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def train_step(step: int, run: Run) -> dict:
    """One RL step; returns its metrics (timings per stage included)."""
    cfg, st = run.cfg, run.state
    timing: dict[str, float] = {}
    t_step = time.perf_counter()

    # 1-2. prompts -> K rollouts each (engine) -> verifiable rewards (DAPO may loop for more)
    batch = collect_rollouts(step, cfg, run.engine, run.tokenizer, st.stream, timing,
                             run.sampling)
    run.engine.sleep()                                                  # free it for the update
    rewards, gids = batch.rewards, batch.group_ids                      # (N,), (N,)

    # 3. old-policy forward: log-probs, token entropies, pooled features (one pass, hooks)
    t = time.perf_counter()
    method = st.value_method
    fwd = old_policy_pass(st.model, batch, cfg, run.tags, run.layer, run.device, run.autocast,
                          keep_hidden=method is not None and method.hidden_states_wanted)
    old_log_probs, entropies, feats = fwd["log_probs"], fwd["entropies"], fwd["features"]
    mask = response_mask(batch, old_log_probs.shape[1])                 # (N, T)
    ref_log_probs = None
    if run.ref is not None:
        ref_log_probs = old_policy_pass(run.ref, batch, cfg, run.tags, None, run.device,
                                        run.autocast, with_entropy=False)["log_probs"]
    timing["old_log_prob"] = time.perf_counter() - t

    # 3b. the engine sampled with its own kernels: log the gap, correct it if asked
    metrics: dict = {}
    is_weights = None
    engine_log_probs = batch.engine_log_prob_matrix(old_log_probs.shape[1])
    if engine_log_probs is not None:
        metrics.update(logprob_mismatch(old_log_probs, engine_log_probs, mask))
        if cfg.rollout.use_is_correction:
            is_weights, is_metrics = truncated_is_weights(old_log_probs, engine_log_probs, mask,
                                                          cap=cfg.rollout.is_cap)
            metrics.update(is_metrics)

    # 4. probe predictions with the probe fitted on *earlier* steps only (frozen here)
    t = time.perf_counter()
    domains = batch.domains
    if feats is not None:
        phi = feats.numpy()
        preds, fitted, raw = st.bank.predict(phi, domains)
    else:                                               # probe.shadow=false: no probe
        n = len(batch.response_ids)
        phi, preds, raw = None, np.full(n, np.nan), np.full(n, np.nan)
        fitted = np.zeros(n, dtype=bool)
    timing["probe"] = time.perf_counter() - t

    # 5. advantages, frozen before this batch can touch the probe
    t = time.perf_counter()
    ctx = StepContext(cfg, step, batch, rewards, gids, mask, old_log_probs, entropies, phi,
                      preds, fitted, fwd["hidden"])
    if method is not None:
        adv = method.advantages(ctx)
        used = method.used if method.used is not None else torch.zeros_like(rewards, dtype=torch.bool)
    else:
        adv, used = step_advantages(cfg, step, rewards, gids, preds, fitted, mask,
                                    valid=batch.valid)
    advantages = adv.advantages.detach().clone()                        # (N,) or (N, T)
    seq_adv = adv.per_sequence(mask).detach().clone()                   # (N,)
    timing["adv"] = time.perf_counter() - t

    # 6. only now the batch enters the probe buffers; refit from scratch
    t = time.perf_counter()
    probe_metrics = {} if phi is None else \
        st.bank.update(phi, batch.scores.numpy(), gids.numpy(), domains, step)
    timing["probe"] += time.perf_counter() - t
    if method is not None:                  # the method learns from the batch (critic, table)
        t = time.perf_counter()
        probe_metrics.update(method.update(ctx))
        timing["value_method"] = time.perf_counter() - t

    # 7. policy update (PPO clipped surrogate, mini-batches of prompts, grad accumulation)
    t = time.perf_counter()
    update_metrics = ppo_update(st.model, batch, advantages, old_log_probs, ref_log_probs, cfg,
                                st.optimizer, st.scheduler, run.device, run.autocast, step,
                                token_weights=is_weights)
    timing["update"] = time.perf_counter() - t

    # 8. the engine samples the next step from the updated weights
    t = time.perf_counter()
    run.engine.wake()
    run.engine.sync_weights(st.model)
    timing["sync"] = time.perf_counter() - t

    # 9. diagnostics, rollout table, probe snapshot
    targets = probe_targets(batch)
    metrics.update(step_metrics(batch, adv, seq_adv, preds, fitted, raw, used, entropies,
                                targets, cfg.rollout.num_generations))
    metrics.update(probe_metrics)
    metrics.update(update_metrics)
    if step % cfg.trainer.log_rollouts_every == 0:
        run.writer.write_rollouts(step, rollout_table(
            step, batch, preds, adv, seq_adv, entropies, old_log_probs, targets,
            run.tokenizer, run.tags, cfg.probe.reasoning_window))
    if run.layer is not None and (step % cfg.probe.snapshot_every == 0
                                  or step == cfg.trainer.total_steps):
        run.writer.write_probe_snapshot(step, probe_snapshot(st.bank),
                                        {"layer": run.layer, "step": step})
    timing["step"] = time.perf_counter() - t_step
    metrics.update({f"timing_s/{k}": v for k, v in timing.items()})
    return metrics


def step_advantages(cfg: Config, step: int, rewards, gids, preds, fitted, mask,
                    valid=None) -> tuple[AdvantageResult, torch.Tensor]:
    """The step's advantages and where the probe was used (POISE's bootstrap splice); grpo,
    dr_grpo and rloo get the `group` options (validity masking reads `valid` (N,))."""
    name, g = cfg.algorithm.adv_estimator, cfg.group
    if name == "poise":
        ready = torch.from_numpy(fitted) & torch.tensor(step > cfg.probe.bootstrap_steps)
        return poise_with_bootstrap(rewards, gids, torch.from_numpy(np.nan_to_num(preds)),
                                    ready)
    if name in GROUP_ESTIMATORS:
        adv = group_advantages(name, rewards, gids, valid=valid, validity_mask=g.validity_mask,
                               invalid=g.invalid, invalid_penalty=g.invalid_penalty,
                               variance=g.variance, smoothing=g.smoothing)
    else:
        options = {"gamma": g.gamma} if name == "reinforce_plus_plus" else {}
        adv = compute_advantages(name, rewards, gids, response_mask=mask, **options)
    return adv, torch.zeros_like(rewards, dtype=torch.bool)


def _evaluate(run: Run, step: int, log: bool = True) -> dict:
    """Held-out Avg@K per task and domain, sampled by the run's engine; logged as eval/..."""
    cfg = run.cfg
    run.engine.wake()
    report = evaluate(None, run.tokenizer, _eval_tasks(cfg), n=cfg.data.eval_n,
                      samples=cfg.data.eval_samples, temperature=cfg.data.eval_temperature,
                      max_new_tokens=cfg.rollout.max_completion_length, seed=cfg.trainer.seed,
                      engine=run.engine)
    run.writer.write_eval(step, report)
    m = {"eval/accuracy": report["overall"]["accuracy"],
         "eval/pass_at_k": report["overall"]["pass_at_k"]}
    for name, s in report["tasks"].items():
        m[f"eval/{name}/accuracy"] = s["accuracy"]
    for d, s in report["domains"].items():
        m[f"eval/domain/{d}/accuracy"] = s["accuracy"]
    if log:
        run.writer.log_metrics(step, m)
        run.tracker.log(step, m)
    return m


def _tokens_so_far(run_dir: Path) -> int:
    """Generated tokens of the steps a resumed run kept (`tokens/sampled` of metrics.jsonl)."""
    from poise_probe.rundir import RunReader

    return int(sum(m.get("tokens/sampled", 0) or 0 for m in RunReader(run_dir).metrics()))


def _param_dtype(cfg: Config) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}.get(cfg.model.dtype, torch.float32)


def _autocast(cfg: Config, device: torch.device):
    """bf16 autocast on CUDA (master weights stay fp32 unless model.dtype says otherwise)."""
    if device.type == "cuda" and cfg.model.dtype in ("auto", "bfloat16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _reference_model(cfg: Config, device):
    ref, _ = load_policy(cfg.model.path, device=device, dtype=_param_dtype(cfg))
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _eval_tasks(cfg: Config):
    from poise_probe.tasks import get_task
    names = cfg.data.eval_tasks or cfg.data.tasks
    return [get_task(n, **cfg.data.task_kwargs.get(n, {})) for n in names]


def _lr_lambda(cfg: Config):
    warm, total = cfg.optim.warmup_steps, cfg.trainer.total_steps

    def f(s: int) -> float:
        w = min(1.0, (s + 1) / warm) if warm else 1.0
        if cfg.optim.lr_schedule == "cosine":
            prog = min(1.0, max(0, s - warm) / max(1, total - warm))
            return w * 0.5 * (1 + math.cos(math.pi * prog))
        return w
    return f
