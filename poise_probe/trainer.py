"""One RLVR training loop for every estimator (POISE, GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO).

Read top to bottom, one step is (POISE.md, "Order within a step"):
  sample prompts -> generate K rollouts -> score -> old-log-prob forward with feature capture
  -> probe predictions (frozen) -> advantages (frozen) -> probe buffer append + refit
  -> PPO update over mini-batches -> held-out eval -> rollout table, metrics, checkpoint.
The math lives in `advantages`, `losses`, `probe` and `features`; this module only wires it.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from poise_probe import __version__
from poise_probe.advantages import compute_advantages, filter_groups, overlong_reward_shaping
from poise_probe.config import Config
from poise_probe.data import Prompt, PromptStream
from poise_probe.diagnostics import advantage_diagnostics, probe_diagnostics
from poise_probe.evaluation import evaluate
from poise_probe.features import (TagIds, pack_rollouts, policy_forward, response_spans)
from poise_probe.generation import encode_prompts, sample_completions
from poise_probe.losses import agg_loss, kl_penalty, policy_loss
from poise_probe.models import load_policy
from poise_probe.probe import ProbeBank, loo_targets
from poise_probe.rundir import RunWriter

logger = logging.getLogger(__name__)

# the sandbox forks worker processes; tokenizers would warn and turn its thread pool off
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STAGES = ("gen", "reward", "old_log_prob", "probe", "adv", "update")


@dataclass
class Rollouts:
    """One step's batch, flat over rollouts; `group_ids` index the prompt of each rollout."""

    prompts: list[Prompt]
    prompt_ids: list[list[int]]           # per prompt
    response_ids: list[list[int]]         # per rollout
    texts: list[str]
    truncated: list[bool]
    group_ids: torch.Tensor               # (N,)
    rewards: torch.Tensor                 # (N,) what the advantages use (shaped, if DAPO)
    scores: torch.Tensor                  # (N,) the verifier's scores in [0, 1] (probe targets)
    gen_rounds: int = 1
    stats: dict = field(default_factory=dict)
    pad_id: int = 0

    @property
    def domains(self) -> list[str]:
        return [self.prompts[g].example.domain for g in self.group_ids.tolist()]


def select_device(cfg: Config) -> torch.device:
    if cfg.model.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.model.device)


def train(cfg: Config, output_dir: str | Path | None = None, *, resume: bool = False,
          progress: Callable[[int, dict], None] | None = None,
          stop_after: int | None = None) -> Path:
    """Run (or resume) training; returns the run directory.

    `progress(step, metrics)` is called after every step (the CLI prints its one-line summary
    there). `stop_after` ends the process-level loop early (tests simulate a kill with it).
    """
    out = Path(output_dir or cfg.trainer.output_dir)
    device = select_device(cfg)
    _seed_everything(cfg.trainer.seed)
    model, tokenizer = load_policy(cfg.model.path, device=device, dtype=_param_dtype(cfg, device))
    if cfg.model.dtype == "bfloat16":
        logger.warning("model.dtype=bfloat16 keeps the policy's weights in bf16: AdamW updates "
                       "smaller than bf16's resolution (about 1e-4 relative) are lost. Use "
                       "model.dtype=auto (fp32 weights, bf16 autocast) unless memory forbids.")
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    autocast = _autocast(cfg, device)
    n_layers = model.config.num_hidden_layers
    layer = cfg.probe.layer if cfg.probe.layer is not None else n_layers // 2
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"probe.layer={layer} is out of range for {cfg.model.path} with "
                         f"{n_layers} decoder blocks; choose 0..{n_layers - 1}.")
    tags = TagIds.from_tokenizer(tokenizer)
    ref = _reference_model(cfg, device) if cfg.algorithm.kl_coef > 0 else None

    stream = PromptStream(cfg.data.tasks, cfg.data.task_kwargs, seed=cfg.trainer.seed,
                          pool_size=cfg.data.pool_size)
    eval_tasks = _eval_tasks(cfg)
    hidden = model.config.hidden_size
    bank = ProbeBank(dict(cfg.probe.buffer_caps), alpha=cfg.probe.alpha,
                     blocks=(hidden, hidden, 3),
                     pca_components=(cfg.probe.pca_prompt, cfg.probe.pca_reasoning, None),
                     min_steps_to_fit=cfg.probe.min_steps_to_fit)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))

    writer = RunWriter(out, config=cfg.to_dict(), resume=resume, keep_last=cfg.trainer.keep_checkpoints,
                       meta={"model": str(cfg.model.path), "device": str(device),
                             "algorithm": cfg.algorithm.adv_estimator,
                             "package_version": __version__, "torch": torch.__version__,
                             "platform": platform.platform(), "probe_layer": layer,
                             "run_name": out.name})
    start = 0
    if resume:
        start = _restore(writer, model, optimizer, scheduler, bank, stream, device)
    try:
        if start == 0:
            _evaluate(model, tokenizer, cfg, eval_tasks, writer, step=0, autocast=autocast)
        for step in range(start + 1, cfg.trainer.total_steps + 1):
            metrics = train_step(step, cfg, model, ref, tokenizer, tags, layer, stream, bank,
                                 optimizer, scheduler, writer, device, autocast)
            last = step == cfg.trainer.total_steps
            if last or (cfg.data.eval_every and step % cfg.data.eval_every == 0):
                t = time.perf_counter()
                metrics.update(_evaluate(model, tokenizer, cfg, eval_tasks, writer, step=step,
                                         autocast=autocast, log=False))
                metrics["timing_s/eval"] = time.perf_counter() - t
            writer.log_metrics(step, metrics)
            if last or step % cfg.trainer.save_every == 0:
                _save_checkpoint(writer, step, model, tokenizer, optimizer, scheduler, bank,
                                 stream)
            writer.set_status("running", last_step=step)
            if progress is not None:
                progress(step, metrics)
            if stop_after is not None and step >= stop_after:
                return out
    except BaseException as exc:
        writer.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    writer.close("finished")
    return out


def train_step(step, cfg: Config, model, ref, tokenizer, tags, layer, stream: PromptStream,
               bank: ProbeBank, optimizer, scheduler, writer: RunWriter, device,
               autocast) -> dict:
    """One RL step; returns its metrics (timings per stage included)."""
    timing: dict[str, float] = {}
    t_step = time.perf_counter()

    # 1-2. prompts -> K rollouts each -> verifiable rewards (DAPO may loop for more prompts)
    batch = collect_rollouts(step, cfg, model, tokenizer, stream, timing, autocast)
    rewards, gids = batch.rewards, batch.group_ids                       # (N,), (N,)

    # 3. old-policy forward: log-probs, token entropies, pooled features (one pass, hooks)
    t = time.perf_counter()
    fwd = old_policy_pass(model, batch, cfg, tags, layer, device, autocast)
    old_log_probs, entropies, feats = fwd["log_probs"], fwd["entropies"], fwd["features"]
    ref_log_probs = None
    if ref is not None:
        ref_log_probs = old_policy_pass(ref, batch, cfg, tags, None, device, autocast,
                                        with_entropy=False)["log_probs"]
    timing["old_log_prob"] = time.perf_counter() - t

    # 4. probe predictions with the probe fitted on *earlier* steps only (frozen here)
    t = time.perf_counter()
    phi = feats.numpy()
    domains = batch.domains
    preds, fitted, raw = bank.predict(phi, domains)
    timing["probe"] = time.perf_counter() - t

    # 5. advantages, frozen before this batch can touch the probe
    t = time.perf_counter()
    est = cfg.algorithm.adv_estimator
    if est == "poise":
        use_probe = torch.from_numpy(fitted) & torch.tensor(step > cfg.probe.bootstrap_steps)
        group_ok = _all_in_group(use_probe, gids)                        # a group is one kind
        adv = compute_advantages("rloo", rewards, gids)                  # bootstrap: sibling reward
        if group_ok.any():
            p = torch.from_numpy(np.nan_to_num(preds, nan=0.0)).float()
            pz = compute_advantages("poise", rewards[group_ok], _renumber(gids[group_ok]),
                                    preds=p[group_ok])
            adv.advantages[group_ok] = pz.advantages
            adv.baselines[group_ok] = pz.baselines
            adv.scale[group_ok] = pz.scale
        used = group_ok
    else:
        adv = compute_advantages(est, rewards, gids)
        used = torch.zeros_like(rewards, dtype=torch.bool)
    advantages = adv.advantages.detach().clone()                         # frozen
    timing["adv"] = time.perf_counter() - t

    # 6. only now the batch enters the probe buffers; refit from scratch
    t = time.perf_counter()
    probe_metrics = bank.update(phi, batch.scores.numpy(), gids.numpy(), domains, step)
    timing["probe"] += time.perf_counter() - t

    # 7. policy update (PPO clipped surrogate, mini-batches of prompts, grad accumulation)
    t = time.perf_counter()
    update_metrics = ppo_update(model, batch, advantages, old_log_probs, ref_log_probs, cfg,
                                optimizer, scheduler, device, autocast, step)
    timing["update"] = time.perf_counter() - t

    # 8. diagnostics, rollout table, probe snapshot
    metrics = step_metrics(batch, advantages, adv, preds, fitted, raw, used, entropies, cfg)
    metrics.update(probe_metrics)
    metrics.update(update_metrics)
    if step % cfg.trainer.log_rollouts_every == 0:
        writer.write_rollouts(step, rollout_table(step, batch, preds, adv, advantages,
                                                  entropies, old_log_probs))
    if step % cfg.probe.snapshot_every == 0 or step == cfg.trainer.total_steps:
        writer.write_probe_snapshot(step, probe_snapshot(bank), {"layer": layer, "step": step})
    timing["step"] = time.perf_counter() - t_step
    metrics.update({f"timing_s/{k}": v for k, v in timing.items()})
    return metrics


def collect_rollouts(step, cfg: Config, model, tokenizer, stream: PromptStream,
                     timing: dict, autocast) -> Rollouts:
    """Generate and score K rollouts for the step's prompts; DAPO drops all-equal groups and
    samples more prompts, for at most `max_gen_rounds` rounds."""
    k = cfg.rollout.num_generations
    want = cfg.rollout.prompts_per_step
    prompts: list[Prompt] = []
    prompt_ids, resp, texts, trunc, rew, sco = [], [], [], [], [], []
    timing["gen"] = timing["reward"] = 0.0
    rounds, dropped, seen_groups = 0, 0, 0
    dynamic = cfg.algorithm.dynamic_sampling
    while len(prompts) < want and rounds < (cfg.algorithm.max_gen_rounds if dynamic else 1):
        rounds += 1
        new = stream.next(want - len(prompts) if not dynamic or rounds == 1 else want)
        t = time.perf_counter()
        ids = encode_prompts(tokenizer, [p.example.prompt for p in new])
        with autocast:
            comps = sample_completions(
                model, tokenizer, [p.example.prompt for p in new], k,
                temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                max_new_tokens=cfg.rollout.max_completion_length,
                batch_size=cfg.rollout.generation_batch_size,
                seed=_derive_seed(cfg.trainer.seed, step, rounds), prompt_ids=ids)
        timing["gen"] += time.perf_counter() - t
        t = time.perf_counter()
        score = score_rollouts(new, comps.texts)                         # (P_new, K)
        r = score
        if cfg.algorithm.overlong_shaping:
            lengths = torch.tensor([[len(x) for x in row] for row in comps.token_ids])
            r = r + overlong_reward_shaping(lengths, cfg.rollout.max_completion_length,
                                            cfg.algorithm.overlong_buffer_len,
                                            cfg.algorithm.overlong_penalty_factor).float()
        timing["reward"] += time.perf_counter() - t
        seen_groups += len(new)
        keep = torch.ones(len(new), dtype=torch.bool)
        if dynamic:
            g = torch.arange(len(new)).repeat_interleave(k)
            # on the verifier's score, as verl's DAPO: shaping must not make a group "mixed"
            keep = filter_groups(score.reshape(-1), g).reshape(len(new), k)[:, 0]
            dropped += int((~keep).sum())
        for i in torch.nonzero(keep).flatten().tolist():
            if len(prompts) >= want:
                break
            prompts.append(new[i])
            prompt_ids.append(ids[i])
            resp.extend(comps.token_ids[i])
            texts.extend(comps.texts[i])
            trunc.extend(comps.truncated[i])
            rew.append(r[i])
            sco.append(score[i])
    if not prompts:
        raise RuntimeError(f"step {step}: every group had equal rewards in "
                           f"{rounds} generation rounds, so DAPO's dynamic sampling kept none; "
                           f"raise algorithm.max_gen_rounds or turn dynamic_sampling off.")
    gids = torch.arange(len(prompts)).repeat_interleave(k)
    rewards = torch.cat(rew).reshape(-1).float()
    scores = torch.cat(sco).reshape(-1).float()
    stats = {"batch/gen_rounds": rounds, "batch/prompts": len(prompts),
             "batch/prompts_sampled": seen_groups, "batch/groups_dropped": dropped}
    return Rollouts(prompts, prompt_ids, resp, texts, trunc, gids, rewards, scores, rounds,
                    stats, tokenizer.pad_token_id)


def score_rollouts(prompts: list[Prompt], texts: list[list[str]]) -> torch.Tensor:
    """(P, K) rewards from each prompt's own task verifier (batched per task)."""
    k = len(texts[0])
    rewards = torch.zeros(len(prompts), k)
    by_task: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_task.setdefault(id(p.task), []).append(i)
    for idx in by_task.values():
        task = prompts[idx[0]].task
        flat = task.score_many([c for i in idx for c in texts[i]],
                               [prompts[i].example for i in idx for _ in range(k)])
        rewards[idx] = torch.tensor(flat, dtype=torch.float32).reshape(len(idx), k)
        if not torch.isfinite(rewards[idx]).all():
            raise ValueError(f"task {task.name!r} returned NaN or inf rewards; a verifier must "
                             f"return numbers in [0, 1]. Fix the task's score function.")
    return rewards


@torch.no_grad()
def old_policy_pass(model, batch: Rollouts, cfg: Config, tags: TagIds, layer,
                    device, autocast, with_entropy: bool = True) -> dict:
    """Log-probs, entropies and (if `layer`) features of every rollout, in micro-batches."""
    rows = [(batch.prompt_ids[g], batch.response_ids[n])
            for n, g in enumerate(batch.group_ids.tolist())]
    lps, ents, feats = [], [], []
    mb = cfg.optim.micro_batch_size
    was_training = model.training
    model.eval()
    for s in range(0, len(rows), mb):
        chunk = rows[s:s + mb]
        packed = pack_rollouts([p for p, _ in chunk], [r for _, r in chunk], batch.pad_id)
        spans = [response_spans(r, tags, cfg.probe.reasoning_window) for _, r in chunk]
        with autocast:
            out = policy_forward(model, packed, temperature=cfg.rollout.temperature,
                                 with_entropy=with_entropy, capture_layer=layer, spans=spans,
                                 prompt_window=cfg.probe.prompt_window,
                                 chunk_tokens=cfg.optim.logit_chunk_tokens)
        lps.append(_pad_to(out.log_probs.float().cpu()))
        if with_entropy:
            ents.append(_pad_to(out.entropies.float().cpu()))
        if out.features is not None:
            feats.append(out.features.float().cpu())
    model.train(was_training)
    width = max(x.shape[1] for x in lps)
    return {"log_probs": torch.cat([_pad_to(x, width) for x in lps]),
            "entropies": torch.cat([_pad_to(x, width) for x in ents]) if ents else None,
            "features": torch.cat(feats) if feats else None}


def ppo_update(model, batch: Rollouts, advantages, old_log_probs, ref_log_probs, cfg: Config,
               optimizer, scheduler, device, autocast, step) -> dict:
    """PPO epochs over mini-batches of whole prompt groups; token-mean over the mini-batch."""
    a = cfg.algorithm
    n_prompts = len(batch.prompts)
    gen = torch.Generator().manual_seed(_derive_seed(cfg.trainer.seed, step, "update"))
    logs: dict[str, list[float]] = {}
    model.train()
    for _epoch in range(cfg.optim.ppo_epochs):
        order = torch.randperm(n_prompts, generator=gen)
        for s in range(0, n_prompts, cfg.optim.mini_batch_prompts):
            groups = set(order[s:s + cfg.optim.mini_batch_prompts].tolist())
            rows = [n for n, g in enumerate(batch.group_ids.tolist()) if g in groups]
            n_tokens = sum(len(batch.response_ids[n]) for n in rows)
            optimizer.zero_grad(set_to_none=True)
            mb = {"actor/pg_loss": 0.0, "actor/kl_loss": 0.0, "actor/entropy_loss": 0.0}
            for m in range(0, len(rows), cfg.optim.micro_batch_size):
                micro = rows[m:m + cfg.optim.micro_batch_size]
                packed = pack_rollouts([batch.prompt_ids[batch.group_ids[n]] for n in micro],
                                       [batch.response_ids[n] for n in micro], batch.pad_id)
                r = packed.resp_mask.shape[1]
                mask = packed.resp_mask.to(device).float()
                with autocast:
                    out = policy_forward(model, packed, temperature=cfg.rollout.temperature,
                                         with_entropy=a.entropy_coeff > 0,
                                         entropy_grad=a.entropy_coeff > 0,
                                         chunk_tokens=cfg.optim.logit_chunk_tokens)
                old = old_log_probs[micro, :r].to(device)
                loss, info = policy_loss(
                    out.log_probs.float(), old, advantages[micro].to(device), mask,
                    clip_ratio_low=a.epsilon, clip_ratio_high=a.epsilon_high,
                    clip_ratio_c=a.clip_ratio_c, loss_agg_mode=a.loss_agg_mode,
                    num_tokens=max(n_tokens, 1), num_seqs=len(rows))
                if ref_log_probs is not None:
                    kl = kl_penalty(out.log_probs.float(), ref_log_probs[micro, :r].to(device),
                                    kind=a.kl_type)
                    kl_loss = agg_loss(kl, mask, a.loss_agg_mode, num_tokens=max(n_tokens, 1),
                                       num_seqs=len(rows))
                    loss = loss + a.kl_coef * kl_loss
                    mb["actor/kl_loss"] += float(kl_loss)
                if a.entropy_coeff > 0:
                    ent = agg_loss(out.entropies, mask, a.loss_agg_mode,
                                   num_tokens=max(n_tokens, 1), num_seqs=len(rows))
                    loss = loss - a.entropy_coeff * ent
                    mb["actor/entropy_loss"] += float(ent)
                loss.backward()
                # micro losses are already normalised by the mini-batch's token/sequence count,
                # so the mini-batch's loss is their sum
                mb["actor/pg_loss"] += info.pop("actor/pg_loss")
                for key, v in info.items():
                    logs.setdefault(key, []).append(v)
            for key, v in mb.items():
                if key == "actor/pg_loss" or v:
                    logs.setdefault(key, []).append(v)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       cfg.optim.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(f"step {step}: gradient norm is {float(grad_norm)}; "
                                         f"lower optim.lr or check the rewards.")
            optimizer.step()
            logs.setdefault("actor/grad_norm", []).append(float(grad_norm))
    scheduler.step()
    out = {k: float(np.mean(v)) for k, v in logs.items()}
    out["actor/lr"] = scheduler.get_last_lr()[0]
    return out


def step_metrics(batch: Rollouts, advantages, adv, preds, fitted, raw, used, entropies,
                 cfg: Config) -> dict:
    """Reward, probe, advantage and token statistics of one step (slash-grouped names)."""
    r = batch.rewards
    g = batch.group_ids
    m: dict = {"reward/mean": float(r.mean()), "reward/std": float(r.std(unbiased=False)),
               "reward/score_mean": float(batch.scores.mean())}
    k = cfg.rollout.num_generations
    grouped = r.reshape(-1, k)
    m["batch/frac_reward_zero_std"] = float((grouped.max(1).values == grouped.min(1).values)
                                            .float().mean())
    for d in sorted(set(batch.domains)):
        sel = torch.tensor([x == d for x in batch.domains])
        m[f"reward/{d}/mean"] = float(r[sel].mean())
    lens = torch.tensor([len(x) for x in batch.response_ids], dtype=torch.float32)
    m["tokens/generated"] = int(lens.sum())
    m["tokens/response_len_mean"] = float(lens.mean())
    m["response/truncated_frac"] = float(np.mean(batch.truncated))
    m["response/entropy_mean"] = float(entropies.sum() / max(lens.sum(), 1))
    m.update(batch.stats)
    m["probe/used_frac"] = float(used.float().mean())
    ok = fitted
    if ok.any():  # the probe predicts the verifier's score, not a shaped reward
        s = batch.scores.numpy()
        targets = loo_targets(s, g.numpy())
        m.update(probe_diagnostics(preds[ok], targets[ok], s[ok], g.numpy()[ok],
                                   raw_preds=raw[ok]))
    m.update(advantage_diagnostics(advantages.numpy(), adv.baselines.numpy(), r.numpy(),
                                   scale=adv.scale.numpy()))
    return m


def rollout_table(step, batch: Rollouts, preds, adv, advantages, entropies, log_probs) -> dict:
    """Columns of `rollouts/step_XXXXXX.parquet` (see docs/run-format.md).

    `entropies` and `log_probs` are the old-policy pass's (N, T) tensors, right-padded;
    `log_probs` (stored as `token_logprobs`) is each sampled token's log-prob under the policy
    that sampled it, temperature-scaled: the very tensor the PPO ratio divides by.
    """
    k = len(batch.response_ids) // len(batch.prompts)
    rows_g = batch.group_ids.tolist()
    lens = [len(x) for x in batch.response_ids]
    lp = log_probs.detach().float().cpu().numpy()
    return {
        "step": [step] * len(rows_g),
        "prompt_id": [batch.prompts[g].example.prompt_id for g in rows_g],
        "group_id": rows_g,
        "task": [batch.prompts[g].task.name for g in rows_g],
        "domain": batch.domains,
        "data_source": [batch.prompts[g].example.data_source for g in rows_g],
        "rollout_idx": [n % k for n in range(len(rows_g))],
        "prompt": [_prompt_text(batch.prompts[g].example.prompt) for g in rows_g],
        "completion": batch.texts,
        "ground_truth": [str(batch.prompts[g].example.ground_truth) for g in rows_g],
        "reward": batch.rewards.tolist(),
        "score": batch.scores.tolist(),
        "probe_pred": [float(x) for x in preds],
        "baseline": adv.baselines.tolist(),
        "advantage": advantages.tolist(),
        "token_entropies": [entropies[n, :lens[n]].tolist() for n in range(len(rows_g))],
        "num_tokens": lens,
        "truncated": list(batch.truncated),
        # exact ids, so probe studies can re-run the forward on what the policy saw
        "prompt_token_ids": [batch.prompt_ids[g] for g in rows_g],
        "token_ids": [list(ids) for ids in batch.response_ids],
        # float32 numpy arrays, so pyarrow stores list<float32>
        "token_logprobs": [lp[n, :lens[n]].astype(np.float32) for n in range(len(rows_g))],
    }


def probe_snapshot(bank: ProbeBank) -> dict[str, dict[str, np.ndarray]]:
    """The fitted probes' arrays per bucket (coefficients, scaler, PCA), for safetensors."""
    return {bucket: probe.to_arrays() for bucket, probe in bank.probes.items()
            if probe is not None}


# --- evaluation, checkpoints, resume -------------------------------------------------------

def _evaluate(model, tokenizer, cfg: Config, tasks, writer: RunWriter, step: int, autocast,
              log: bool = True) -> dict:
    """Held-out Avg@K per task and domain; logged as eval/... metrics."""
    model.eval()
    with autocast:
        report = evaluate(model, tokenizer, tasks, n=cfg.data.eval_n,
                          samples=cfg.data.eval_samples, temperature=cfg.data.eval_temperature,
                          max_new_tokens=cfg.rollout.max_completion_length,
                          batch_size=cfg.rollout.generation_batch_size, seed=cfg.trainer.seed)
    model.train()
    writer.write_eval(step, report)
    m = {"eval/accuracy": report["overall"]["accuracy"],
         "eval/pass_at_k": report["overall"]["pass_at_k"]}
    for name, s in report["tasks"].items():
        m[f"eval/{name}/accuracy"] = s["accuracy"]
    for d, s in report["domains"].items():
        m[f"eval/domain/{d}/accuracy"] = s["accuracy"]
    if log:
        writer.log_metrics(step, m)
    return m


def _save_checkpoint(writer: RunWriter, step, model, tokenizer, optimizer, scheduler,
                     bank: ProbeBank, stream: PromptStream) -> None:
    from safetensors.numpy import save_file

    with writer.checkpoint(step) as d:
        model.save_pretrained(d / "policy", safe_serialization=True)
        tokenizer.save_pretrained(d / "policy")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "data": stream.state_dict(), "rng": _rng_state(), "step": step},
                   d / "trainer_state.pt")
        save_file(bank.state_dict(), str(d / "probe_bank.safetensors"))


def _restore(writer: RunWriter, model, optimizer, scheduler, bank: ProbeBank,
             stream: PromptStream, device) -> int:
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as load_torch

    found = writer.latest_checkpoint()
    if found is None:
        raise FileNotFoundError(f"--resume: {writer.run_dir} has no checkpoint to resume from; "
                                f"start a new run instead (drop --resume).")
    step, d = found
    weights = {}
    for f in sorted((d / "policy").glob("*.safetensors")):
        weights.update(load_torch(str(f), device="cpu"))  # load_state_dict copies to device
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ValueError(f"checkpoint {d} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}; resume with the same model.path.")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    # CPU first: RNG states must stay CPU byte tensors; the optimizer moves its state itself
    state = torch.load(d / "trainer_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stream.load_state_dict(state["data"])
    bank.load_state_dict(load_file(str(d / "probe_bank.safetensors")))
    _set_rng_state(state["rng"])
    writer.truncate_after(step)
    logger.info("resumed %s from step %d", writer.run_dir, step)
    return step


# --- small helpers -------------------------------------------------------------------------

def _param_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}.get(cfg.model.dtype, torch.float32)


def _autocast(cfg: Config, device: torch.device):
    """bf16 autocast on CUDA (master weights stay fp32 unless model.dtype says otherwise)."""
    if device.type == "cuda" and cfg.model.dtype in ("auto", "bfloat16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _reference_model(cfg: Config, device):
    ref, _ = load_policy(cfg.model.path, device=device, dtype=_param_dtype(cfg, device))
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


def _derive_seed(seed: int, *parts) -> int:
    import hashlib
    h = hashlib.sha256("|".join(map(str, (seed, *parts))).encode()).hexdigest()
    return int(h[:8], 16)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_in_group(mask: torch.Tensor, gids: torch.Tensor) -> torch.Tensor:
    """Row mask true where every row of the row's group is true."""
    n_groups = int(gids.max()) + 1
    bad = torch.zeros(n_groups, dtype=torch.bool).index_put_((gids,), ~mask, accumulate=True)
    return ~bad[gids]


def _renumber(gids: torch.Tensor) -> torch.Tensor:
    return torch.unique(gids, return_inverse=True)[1]


def _pad_to(x: torch.Tensor, width: int | None = None) -> torch.Tensor:
    if width is None or x.shape[1] == width:
        return x
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(
        f"{m['role']}: {m['content']}" for m in prompt)

