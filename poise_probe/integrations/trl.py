"""POISE inside TRL: a `GRPOTrainer` whose advantages come from this project's POISE core.

`PoiseGRPOTrainer` overrides one TRL hook, `_generate_and_score_completions` (TRL's own advice
for new advantage estimators), and returns TRL's output with new `advantages`:

1. TRL generates and scores; the policy's old-log-prob forward runs with this project's pooling
   hook on block L (`features.pooled_block_rows`) and TRL's fused entropies, so the POISE
   features cost no second forward. Where TRL skips that forward (one optimisation pass, no
   vLLM), the trainer runs it, once, and hands TRL the log-probs it computed.
2. Features, rewards and domains are gathered from every process; the probe bank, fitted on
   earlier steps only, predicts; `poise_with_bootstrap` gives the advantages (RLOO while the
   probe is not ready); then the gathered batch enters the bank and the probes are refit. Every
   process runs the same fit on the same rows, so all of them hold identical predictions.
3. Each process keeps its own slice of the advantages; the main process writes this project's
   run directory (metrics with the contract's keys, rollout tables, probe snapshots) under
   `<output_dir>/poise`, which `poise dashboard` opens. The bank is saved in and restored from
   TRL's checkpoints (`checkpoint-N/poise_probe_bank.safetensors`).

A step here is one generation round (TRL's global step when `steps_per_generation` is 1).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather, gather_object
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from poise_probe import __version__
from poise_probe.advantages import poise_with_bootstrap
from poise_probe.config import ProbeConfig
from poise_probe.features import (TagIds, entropy_stats, packed_from_split, pooled_block_rows,
                                  pooling_weights, response_spans)
from poise_probe.probe import ProbeBank
from poise_probe.records import probe_snapshot, probe_targets, rollout_table, step_metrics
from poise_probe.rollout.collect import Rollouts
from poise_probe.rundir import RunWriter

logger = logging.getLogger(__name__)

BANK_FILE = "poise_probe_bank.safetensors"
STATE_FILE = "poise_state.json"
# TRL's logged keys that have a name in this project's metric groups (docs/run-format.md)
TRL_KEYS = {"loss": "actor/pg_loss", "grad_norm": "actor/grad_norm", "learning_rate": "actor/lr",
            "clip_ratio/region_mean": "actor/clip_frac", "kl": "actor/kl"}


@dataclass
class PoiseGRPOConfig(GRPOConfig):
    """TRL's `GRPOConfig` plus the probe's settings (`poise_probe`: `config.ProbeConfig` fields)."""

    poise_probe: dict = field(default_factory=dict, metadata={
        "help": "the probe's settings, as the built-in trainer's `probe` section: layer, alpha, "
                "buffer_caps, bootstrap_steps, min_steps_to_fit, prompt_window, "
                "reasoning_window, pca_prompt, pca_reasoning, snapshot_every"})
    poise_run_dir: str | None = field(default=None, metadata={
        "help": "this project's run directory (the dashboard reads it); default "
                "<output_dir>/poise"})
    poise_domain_column: str = field(default="domain", metadata={
        "help": "dataset column routing each prompt to a probe bucket (math, code, other); "
                "rows without it go to 'other'"})
    poise_target_reward: str | None = field(default=None, metadata={
        "help": "name of the reward function whose value (in [0, 1]) the probe predicts; "
                "default: the weighted sum of all reward functions"})
    poise_log_rollouts_every: int = field(default=1, metadata={
        "help": "write the rollout table every this many steps"})

    def probe_config(self) -> ProbeConfig:
        """`poise_probe` validated as the built-in trainer's `probe` section."""
        known = set(ProbeConfig.__dataclass_fields__)
        unknown = sorted(set(self.poise_probe) - known)
        if unknown:
            raise ValueError(f"poise_probe has unknown field(s) {unknown}; the fields are "
                             f"{sorted(known)} (docs/config.md, section probe).")
        return ProbeConfig(**self.poise_probe)


@dataclass
class _Capture:
    """What the captured old-log-prob forward left: (B, F) features, (B, C) entropies."""

    features: torch.Tensor | None = None
    entropies: torch.Tensor | None = None
    packed: Any = None


@dataclass
class _RowTask:
    name: str


@dataclass
class _RowExample:
    """The fields of one prompt that `records` reads, from a TRL dataset row."""

    prompt: Any
    ground_truth: str
    domain: str
    data_source: str
    prompt_id: str


@dataclass
class _RowPrompt:
    example: _RowExample
    task: _RowTask


class PoiseGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with POISE advantages; use it as GRPOTrainer, with `PoiseGRPOConfig`.

    Example::

        trainer = PoiseGRPOTrainer(model="path/to/model", reward_funcs=[TaskReward()],
                                   args=PoiseGRPOConfig(output_dir="out", num_generations=2,
                                                        poise_probe={"bootstrap_steps": 4}),
                                   train_dataset=Dataset.from_list(task_rows(["arith"], 64)))
        trainer.train()
    """

    _tag_names = ["trl", "grpo", "poise"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, PoiseGRPOConfig):
            raise TypeError(f"PoiseGRPOTrainer needs args=PoiseGRPOConfig(...) (a GRPOConfig "
                            f"with the probe's settings); got {type(self.args).__name__}.")
        if self.num_generations < 2:
            raise ValueError(f"POISE needs num_generations >= 2 (the baseline averages the "
                             f"siblings' predictions); got {self.num_generations}.")
        if self.args.poise_log_rollouts_every < 1:
            raise ValueError(f"poise_log_rollouts_every must be >= 1; got "
                             f"{self.args.poise_log_rollouts_every}.")
        target = self.args.poise_target_reward
        if target is not None and target not in self.reward_func_names:
            raise ValueError(f"poise_target_reward={target!r} is not a reward function of this "
                             f"trainer; they are {self.reward_func_names}.")
        self.probe_cfg = self.args.probe_config()
        config = self._policy().config.get_text_config()
        self.probe_layer = self.probe_cfg.resolve_layer(config.num_hidden_layers,
                                                        config.name_or_path or "the policy")
        self.bank = ProbeBank.from_config(self.probe_cfg, config.hidden_size)
        self.tags = TagIds.from_tokenizer(self._tokenizer)
        self.poise_step = 0                      # generation rounds done (the bank's step)
        self._resumed = False
        self._capture: _Capture | None = None
        self._rewards_per_func: torch.Tensor | None = None
        self._writer: RunWriter | None = None
        # the last step's gathered inputs and outputs (identical on every process)
        self.last_step: dict[str, Any] | None = None

    # -- TRL hooks -----------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards_per_func = out.detach()          # (N_global, n_funcs), every process
        return out

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask,
                                           logits_to_keep, batch_size=None,
                                           compute_entropy=False, **kwargs):
        cap = self._capture
        if cap is None or cap.features is not None or model is not self.model:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, **kwargs)
        # the policy's old-log-prob forward: pool block L's states inside it (no second pass)
        packed = packed_from_split(input_ids, attention_mask, logits_to_keep)
        spans = [response_spans(r, self.tags, self.probe_cfg.reasoning_window)
                 for r in packed.response_ids]
        weights = pooling_weights(packed, spans, self.probe_cfg.prompt_window)
        with pooled_block_rows(self._policy(), self.probe_layer, weights) as pooled:
            logps, ents, aux = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=True, **kwargs)
        ents_cpu = ents.detach().float().cpu() * packed.resp_mask
        stats = entropy_stats(ents_cpu, packed, spans)
        cap.features = torch.cat([pooled[0].cpu(), pooled[1].cpu(), stats], dim=-1)
        cap.entropies, cap.packed = ents_cpu, packed
        return logps, ents if compute_entropy else None, aux

    def _generate_and_score_completions(self, inputs):
        if not self.model.training:                  # evaluation: TRL's own advantages
            return super()._generate_and_score_completions(inputs)
        t0 = time.perf_counter()
        self._rewards_per_func = None
        self._capture = _Capture() if self._trl_scores_old_policy() else None
        out = super()._generate_and_score_completions(inputs)
        timing = {"gen_score": time.perf_counter() - t0}
        t = time.perf_counter()
        cap, self._capture = self._capture, None
        if cap is None or cap.features is None:
            cap = self._old_policy_pass(out)
        timing["old_log_prob"] = time.perf_counter() - t
        self._poise_advantages(inputs, out, cap, timing)
        return out

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from safetensors.numpy import save_file
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = Path(self._get_output_dir(trial=trial),
                          f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            save_file(self.bank.state_dict(), str(folder / BANK_FILE))
            (folder / STATE_FILE).write_text(json.dumps({"poise_step": self.poise_step}))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._restore_bank(Path(checkpoint))

    def _restore_bank(self, folder: Path) -> None:
        """The probe bank and POISE step saved with a TRL checkpoint."""
        if not (folder / BANK_FILE).exists():
            raise FileNotFoundError(f"{folder} has no {BANK_FILE}: it was not written by "
                                    f"PoiseGRPOTrainer, so the probe cannot be restored; resume "
                                    f"from a PoiseGRPOTrainer checkpoint or start a new run.")
        from safetensors.numpy import load_file
        self.bank.load_state_dict(load_file(str(folder / BANK_FILE)))
        self.poise_step = int(json.loads((folder / STATE_FILE).read_text())["poise_step"])
        self._resumed = True
        logger.info("restored the probe bank from %s (POISE step %d)", folder, self.poise_step)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if self._writer is not None and self.model.training:
            mirrored = {f"trl/{k}": v for k, v in logs.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)}
            mirrored.update({TRL_KEYS[k]: v for k, v in logs.items()
                             if k in TRL_KEYS and isinstance(v, (int, float))})
            self._writer.log_metrics(self.poise_step, mirrored)

    def train(self, *args, **kwargs):
        try:
            out = super().train(*args, **kwargs)
        except BaseException as exc:
            if self._writer is not None:
                self._writer.set_status("failed", error=f"{type(exc).__name__}: {exc}")
            raise
        if self._writer is not None:
            self._writer.close("finished")
            self._writer = None
        return out

    # -- POISE ---------------------------------------------------------------------------------

    def _policy(self):
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _trl_scores_old_policy(self) -> bool:
        """Whether TRL itself runs the old-log-prob forward this round (its own condition)."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return (self.args.gradient_accumulation_steps % generate_every != 0
                or (self.use_vllm and self.vllm_importance_sampling_correction))

    def _old_policy_pass(self, out: dict) -> _Capture:
        """The forward TRL skipped at one optimisation pass: log-probs (handed to TRL as
        `old_per_token_logps`), entropies and features in one pass."""
        if "pixel_values" in out:
            raise NotImplementedError("PoiseGRPOTrainer supports text-only policies.")
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        self._capture = cap = _Capture()
        try:
            with torch.no_grad(), disable_gradient_checkpointing(
                    self.model, self.args.gradient_checkpointing_kwargs):
                logps, _, _ = self._get_per_token_logps_and_entropies(
                    self.model, ids, mask, out["completion_ids"].size(1),
                    batch_size=self.args.per_device_train_batch_size)
        finally:
            self._capture = None
        out["old_per_token_logps"] = logps
        return cap

    def _poise_advantages(self, inputs: list[dict], out: dict, cap: _Capture,
                          timing: dict) -> None:
        """Predict (frozen probe) -> advantages -> bank update; `out["advantages"]` replaced."""
        acc, k = self.accelerator, self.num_generations
        n_local = out["completion_ids"].size(0)
        t = time.perf_counter()
        phi = gather(cap.features.to(acc.device)).cpu().numpy()            # (N, F)
        rpf = self._rewards_per_func.cpu()                                  # (N, n_funcs)
        if phi.shape[0] != rpf.shape[0]:
            raise RuntimeError(f"gathered {phi.shape[0]} feature rows for {rpf.shape[0]} rewards")
        if bool(torch.isnan(rpf).all(dim=1).any()):
            bad = torch.nonzero(torch.isnan(rpf).all(dim=1)).flatten()[:5].tolist()
            raise ValueError(f"every reward function returned None for completion(s) {bad}; "
                             f"POISE needs a reward for each completion (the probe's targets and "
                             f"the baselines come from its siblings). Return a number, e.g. 0.0.")
        rewards = (rpf * self.reward_weights.cpu()[None, :]).nansum(dim=1)  # TRL's sum
        target = self.args.poise_target_reward
        scores = (rewards if target is None
                  else rpf[:, self.reward_func_names.index(target)].nan_to_num(0.0))
        column = self.args.poise_domain_column
        domains = gather_object([str(x.get(column, "other")) for x in inputs])
        gids = torch.arange(len(rewards)) // k
        self.poise_step += 1
        step = self.poise_step
        preds, fitted, raw = self.bank.predict(phi, domains)
        ready = torch.from_numpy(fitted) & torch.tensor(step > self.probe_cfg.bootstrap_steps)
        adv, used = poise_with_bootstrap(rewards, gids, torch.from_numpy(np.nan_to_num(preds)),
                                         ready)
        timing["probe_predict"] = time.perf_counter() - t
        t = time.perf_counter()
        try:
            probe_metrics = self.bank.update(phi, scores.numpy(), gids.numpy(), domains, step)
        except ValueError as err:
            raise ValueError(f"{err} (the probe's target is "
                             f"{'the sum of the rewards' if target is None else target!r}; set "
                             f"poise_target_reward to a reward in [0, 1])") from err
        timing["probe_update"] = time.perf_counter() - t
        lo = acc.process_index * n_local
        old = out["advantages"]
        out["advantages"] = adv.advantages[lo:lo + n_local].to(old.device, old.dtype)
        self._log_completion_columns(adv, preds)
        self.last_step = {"step": step, "features": phi, "rewards": rewards.numpy(),
                          "scores": scores.numpy(), "group_ids": gids.numpy(),
                          "domains": domains, "preds": preds, "fitted": fitted,
                          "advantages": adv.advantages.numpy(), "used": used.numpy(),
                          "local_advantages": out["advantages"].cpu().numpy()}
        mode = self._metrics["train"]
        mode["poise/used_frac"].append(float(used.float().mean()))
        mode["poise/baseline_mean"].append(float(adv.baselines.mean()))
        for key, value in probe_metrics.items():
            mode[key].append(float(value))
        self._record(inputs, out, cap, step, rewards, scores, gids, preds, fitted, raw, adv,
                     used, probe_metrics, timing)

    def _log_completion_columns(self, adv, preds) -> None:
        """TRL's completion log (`log_completions`) shows POISE's advantages, not its own."""
        logged = self._logs["advantages"]
        for _ in range(min(len(adv.advantages), len(logged))):
            logged.pop()
        logged.extend(adv.advantages.tolist())
        self._logs["extra"]["probe_pred"].extend(np.asarray(preds, dtype=float).tolist())
        self._logs["extra"]["baseline"].extend(adv.baselines.tolist())

    def _record(self, inputs, out, cap, step, rewards, scores, gids, preds, fitted, raw, adv,
                used, probe_metrics, timing) -> None:
        """The run directory's metrics, rollout table and probe snapshot (main process)."""
        t = time.perf_counter()
        packed = cap.packed
        n_local = out["completion_ids"].size(0)
        old_lp = out["old_per_token_logps"].detach().float().cpu()
        lens = packed.resp_mask.sum(-1).tolist()
        local = [{"prompt_ids": packed.input_ids[i, int(packed.prompt_start[i]):
                                                 int(packed.prompt_start[i] + packed.prompt_len[i])
                                                 ].tolist(),
                  "response_ids": packed.response_ids[i],
                  "entropies": cap.entropies[i, :int(lens[i])].tolist(),
                  "log_probs": old_lp[i, :int(lens[i])].tolist(),
                  "row": {c: inputs[i].get(c) for c in ("prompt", "ground_truth", "task",
                                                        "data_source", "prompt_id",
                                                        self.args.poise_domain_column)}}
                 for i in range(n_local)]
        rows = gather_object(local)
        if not self.accelerator.is_main_process:
            return
        writer = self._run_writer()
        k = self.num_generations
        batch = self._as_rollouts(rows, k, rewards, scores, gids)
        width = max(1, max(len(r["response_ids"]) for r in rows))
        ents = torch.zeros(len(rows), width)
        lps = torch.zeros(len(rows), width)
        for i, r in enumerate(rows):
            ents[i, :len(r["entropies"])] = torch.tensor(r["entropies"])
            lps[i, :len(r["log_probs"])] = torch.tensor(r["log_probs"])
        mask = (torch.arange(width)[None, :] < torch.tensor(
            [len(r["response_ids"]) for r in rows])[:, None]).float()
        seq_adv = adv.per_sequence(mask)
        targets = probe_targets(batch)
        metrics = step_metrics(batch, adv, seq_adv, preds, fitted, raw, used, ents, targets, k)
        metrics.update(probe_metrics)
        metrics["trl/global_step"] = self.state.global_step
        if step % self.args.poise_log_rollouts_every == 0:
            writer.write_rollouts(step, rollout_table(
                step, batch, preds, adv, seq_adv, ents, lps, targets, self._tokenizer, self.tags,
                self.probe_cfg.reasoning_window))
        if step % self.probe_cfg.snapshot_every == 0 or step == self.state.max_steps:
            writer.write_probe_snapshot(step, probe_snapshot(self.bank),
                                        {"layer": self.probe_layer, "step": step})
        timing["record"] = time.perf_counter() - t
        metrics.update({f"timing_s/{key}": v for key, v in timing.items()})
        writer.log_metrics(step, metrics)
        writer.set_status("running", last_step=step)

    def _as_rollouts(self, rows: list[dict], k: int, rewards, scores, gids) -> Rollouts:
        """The gathered batch as this project's `Rollouts` record (one prompt per group)."""
        prompts, prompt_ids = [], []
        for g in range(len(rows) // k):
            first = rows[g * k]
            if any(rows[g * k + j]["prompt_ids"] != first["prompt_ids"] for j in range(k)):
                raise RuntimeError(f"rows {g * k}..{g * k + k - 1} should be one prompt's "
                                   f"{k} completions (TRL's RepeatSampler); their prompts differ")
            r = first["row"]
            text = r.get("prompt")
            data_source = str(r.get("data_source") or r.get("task") or "trl")
            prompt_id = r.get("prompt_id") or f"{data_source}/{g}"
            prompts.append(_RowPrompt(
                _RowExample(text, str(r.get("ground_truth")), str(
                    r.get(self.args.poise_domain_column) or "other"), data_source,
                    str(prompt_id)),
                _RowTask(str(r.get("task") or data_source))))
            prompt_ids.append(first["prompt_ids"])
        eos = set(self.eos_token_ids) | {self._tokenizer.pad_token_id}
        responses = [r["response_ids"] for r in rows]
        texts = [self._tokenizer.decode(ids, skip_special_tokens=True)
                 for ids in responses]
        truncated = [not ids or ids[-1] not in eos for ids in responses]
        return Rollouts(prompts, prompt_ids, responses, texts, truncated, gids,
                        rewards.float(), scores.float(), pad_id=self._tokenizer.pad_token_id)

    def _run_writer(self) -> RunWriter:
        """The run directory, opened at the first step (resumed after a TRL resume)."""
        if self._writer is not None:
            return self._writer
        out = Path(self.args.poise_run_dir or os.path.join(self.args.output_dir, "poise"))
        resume = self._resumed and (out / "meta.json").exists()
        config = {"trl": _plain_args(self.args), "probe": asdict(self.probe_cfg),
                  "algorithm": {"adv_estimator": "poise"},
                  "rollout": {"num_generations": self.num_generations,
                              "temperature": self.temperature,
                              "max_completion_length": self.max_completion_length}}
        policy = self._policy()
        self._writer = RunWriter(out, config=config, resume=resume, meta={
            "model": str(policy.config.name_or_path), "device": str(self.accelerator.device),
            "algorithm": "poise", "rollout_engine": "vllm" if self.use_vllm else "trl",
            "engine": "trl", "num_processes": self.accelerator.num_processes,
            "package_version": __version__, "torch": torch.__version__,
            "platform": platform.platform(), "probe_layer": self.probe_layer,
            "run_name": out.name})
        if resume:
            self._writer.truncate_after(self.poise_step - 1)
        return self._writer


def _plain_args(args: PoiseGRPOConfig) -> dict:
    """TRL's config as plain values (its `to_dict`, enums and odd objects as strings)."""
    out = {}
    for key, value in args.to_dict().items():
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(
                isinstance(v, (bool, int, float, str)) for v in value):
            out[key] = list(value)
        elif isinstance(value, dict):
            out[key] = json.loads(json.dumps(value, default=str))
        else:
            out[key] = str(value)
    return out
