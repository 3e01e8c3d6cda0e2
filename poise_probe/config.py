"""Training configuration: dataclasses with verl/TRL names, YAML files and `key=value` overrides."""
from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from poise_probe.config_docs import ALIASES
from poise_probe.config_fields import above as _above
from poise_probe.config_fields import choice as _choice
from poise_probe.config_fields import nonneg as _nonneg
from poise_probe.config_fields import opt
from poise_probe.config_fields import positive as _positive
from poise_probe.config_methods import CriticConfig, GroupConfig, HistaConfig, NumcaConfig
from poise_probe.losses import AGG_MODES as LOSS_AGG_MODES  # one definition, the loss's
from poise_probe.losses import KL_KINDS
from poise_probe.tracking import SINK_NAMES

ROLLOUT_ENGINES = ("hf", "vllm")


@dataclass
class ModelConfig:
    path: str = opt(
        "tiny-reasoner", "local save_pretrained directory of a causal LM, or the alias 'tiny-reasoner'")
    dtype: str = opt(
        "auto", 'auto (fp32 weights, bf16 autocast on CUDA) | float32 | bfloat16 weights')
    device: str = opt(
        "auto", 'auto (CUDA if present) | cpu | cuda | cuda:N; cuda stops if there is none')
    gradient_checkpointing: bool = opt(
        False, 'recompute activations in backward to save memory (long responses)')

    def __post_init__(self):
        _choice("model.dtype", self.dtype, ("auto", "float32", "bfloat16"))


@dataclass
class DataConfig:
    tasks: list[str] = opt(lambda: ["arith", "boolean", "code_output"],
                           "training tasks: built-in names, rg:<dataset>, humaneval or a "
                           ".jsonl/.parquet file", factory=True)
    task_kwargs: dict[str, dict[str, Any]] = opt(dict, "difficulty knobs per task: {task: "
                                                  "{knob: value}}", factory=True)
    eval_tasks: list[str] | None = opt(None, 'held-out tasks; None: the training tasks')
    eval_n: int = opt(100, 'held-out prompts per task')
    eval_samples: int = opt(8, 'samples per held-out prompt, K of Avg@K and Pass@K')
    eval_every: int = opt(10, 'evaluate every this many steps; 0: only before and after training')
    eval_temperature: float = opt(
        1.0, 'sampling temperature of the held-out evaluation (0: greedy)')
    pool_size: int = opt(4096, 'train prompts drawn per task, cycled and reshuffled')

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("data.tasks must name at least one task, e.g. [arith].")
        unknown = set(self.task_kwargs) - set(self.tasks) - set(self.eval_tasks or [])
        if unknown:
            raise ValueError(f"data.task_kwargs has knobs for {sorted(unknown)}, which are not "
                             f"in data.tasks {self.tasks}; fix the task name.")
        _positive("data.eval_n", self.eval_n)
        _positive("data.eval_samples", self.eval_samples)
        _nonneg("data.eval_every", self.eval_every)
        _nonneg("data.eval_temperature", self.eval_temperature)
        _positive("data.pool_size", self.pool_size)


@dataclass
class RolloutConfig:
    prompts_per_step: int = opt(32, 'prompts sampled per step (verl data.train_batch_size)')
    num_generations: int = opt(2, 'rollouts per prompt, K (TRL num_generations, verl rollout.n)')
    temperature: float = opt(1.0, 'sampling temperature T; log-probs are of softmax(logits / T)')
    top_p: float = opt(1.0, 'nucleus sampling mass (1: the whole vocabulary)')
    max_completion_length: int = opt(
        96, 'most new tokens per rollout (TRL max_completion_length, verl response_length)')
    generation_batch_size: int = opt(256, 'rows per generation batch at most (hf engine)')
    max_batch_tokens: int | None = opt(
        None, 'rollout token budget: prompt + new tokens held at once (hf batches, vllm KV cache)')
    engine: str = opt(
        "hf", 'rollout engine: hf (transformers generate) | vllm (colocated vllm.LLM)')
    gpu_memory_utilization: float | None = opt(
        None, "vllm: share of GPU memory it takes (CPU: of RAM, for the KV cache); None: 0.3 "
              "on CUDA, 0.15 on CPU")
    is_correction: bool | None = opt(
        None, 'truncated importance weights pi_trainer/pi_engine on the loss; None: on for vllm, off for hf')
    is_cap: float = opt(2.0, 'ceiling of the truncated importance weight')
    engine_kwargs: dict[str, Any] = opt(dict, "more vllm.LLM(...) arguments, e.g. "
                                        "{max_model_len: 4096}", factory=True)

    def __post_init__(self):
        _positive("rollout.prompts_per_step", self.prompts_per_step)
        _positive("rollout.num_generations", self.num_generations)
        _above("rollout.temperature", self.temperature)   # RL samples: no greedy
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1]; got {self.top_p}.")
        _positive("rollout.max_completion_length", self.max_completion_length)
        _positive("rollout.generation_batch_size", self.generation_batch_size)
        if self.max_batch_tokens is not None:
            _positive("rollout.max_batch_tokens", self.max_batch_tokens)
        _choice("rollout.engine", self.engine, ROLLOUT_ENGINES)
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.gpu_memory_utilization must be in (0, 1] (the share of "
                             f"device memory vLLM may take); got {self.gpu_memory_utilization}.")
        if not (math.isfinite(self.is_cap) and self.is_cap >= 1):
            raise ValueError(f"rollout.is_cap must be a finite number >= 1 (the truncated "
                             f"importance weight's ceiling; verl and TRL use 2 to 3); got "
                             f"{self.is_cap}.")

    @property
    def use_is_correction(self) -> bool:
        """The effective `is_correction`: as set, else on for vllm and off for hf."""
        return self.engine != "hf" if self.is_correction is None else self.is_correction


def estimator_names() -> tuple[str, ...]:
    """Every registered advantage estimator: the pure ones and the stateful value methods."""
    from poise_probe import methods
    from poise_probe.advantages import ADV_ESTIMATORS
    from poise_probe.value_methods import VALUE_METHODS
    del methods  # imported for its registrations
    return tuple(sorted(set(ADV_ESTIMATORS) | set(VALUE_METHODS)))


@dataclass
class AlgorithmConfig:
    adv_estimator: str = opt(
        "poise", "advantage estimator (verl algorithm.adv_estimator); `poise train --help` lists "
                 "them all (docs/estimators.md)")
    epsilon: float = opt(
        0.2, 'PPO clip below: ratio >= 1 - epsilon (verl clip_ratio_low, TRL epsilon)')
    epsilon_high: float = opt(
        0.28, 'PPO clip above, clip-higher: ratio <= 1 + epsilon_high (verl clip_ratio_high)')
    clip_ratio_c: float = opt(10.0, 'dual clip for negative advantages: loss capped at c * |A|')
    loss_agg_mode: str = opt(
        "token-mean", 'how token losses become one: token-mean | seq-mean-token-sum | seq-mean-token-mean')
    kl_coef: float = opt(
        0.0, 'weight of the KL penalty to the initial policy (TRL beta); 0: off, no reference model')
    kl_type: str = opt("low_var_kl", 'KL estimator: kl/k1, abs, mse/k2, low_var_kl/k3')
    entropy_coeff: float = opt(0.0, 'weight of the entropy bonus (0: off)')
    dynamic_sampling: bool = opt(
        False, 'DAPO: drop groups whose rewards are all equal and sample more prompts')
    max_gen_rounds: int = opt(3, 'DAPO: generation rounds per step at most')
    overlong_shaping: bool = opt(
        False, 'DAPO: soft punishment of responses near max_completion_length')
    overlong_buffer_len: int = opt(
        16, 'DAPO: tokens before the limit where the punishment ramps up')
    overlong_penalty_factor: float = opt(1.0, 'DAPO: the punishment at the limit')

    def __post_init__(self):
        _choice("algorithm.adv_estimator", self.adv_estimator, estimator_names())
        _choice("algorithm.loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        _choice("algorithm.kl_type", self.kl_type, KL_KINDS)
        if not (0 < self.epsilon < 1 and self.epsilon_high > 0):
            raise ValueError(f"algorithm.epsilon must be in (0, 1) and epsilon_high > 0; got "
                             f"{self.epsilon} and {self.epsilon_high}.")
        if not self.clip_ratio_c > 1:
            raise ValueError(f"algorithm.clip_ratio_c must be > 1 (dual clip); got "
                             f"{self.clip_ratio_c}.")
        _positive("algorithm.max_gen_rounds", self.max_gen_rounds)
        _nonneg("algorithm.kl_coef", self.kl_coef)
        _nonneg("algorithm.entropy_coeff", self.entropy_coeff)
        _nonneg("algorithm.overlong_penalty_factor", self.overlong_penalty_factor)


@dataclass
class ProbeConfig:
    layer: int | None = opt(None, 'decoder block the probe reads (0-based); None: the middle block')
    prompt_window: int = opt(10, 'last n prompt tokens pooled into the prompt vector')
    reasoning_window: int = opt(
        10, 'last n response tokens ending at </think> pooled into the reasoning vector')
    alpha: float = opt(
        0.01, 'ridge strength (paper v2: 0.01 on raw features; release: 100 with PCA)')
    pca_prompt: int | None = opt(
        None, 'PCA components of the prompt vector (release: 32); None: no PCA')
    pca_reasoning: int | None = opt(
        None, 'PCA components of the reasoning vector (release: 64); None: no PCA')
    buffer_caps: dict[str, int] = opt(
        lambda: {"math": 4096, "code": 3072, "other": 3072},
        "probe buffer rows per domain bucket (FIFO by prompt group); 'other' takes the rest",
        factory=True)
    bootstrap_steps: int = opt(16, "RLOO (the sibling's reward as baseline) up to this step")
    min_steps_to_fit: int = opt(8, 'a buffer bucket is fitted once it holds this many steps')
    snapshot_every: int = opt(10, 'write the fitted probes every this many steps (and at the last)')
    refit_threads: int | None = opt(
        1, "BLAS threads of the probe's refit (a few ms of small products: on few cores more "
           "threads fight torch's pool); None: the libraries' default")
    shadow: bool = opt(
        True, "estimators that do not use the probe still fit it on the same features, so the "
              "dashboard compares its predictions (the shadow probe); false skips the feature "
              "capture, prediction and refit there")

    def __post_init__(self):
        _positive("probe.prompt_window", self.prompt_window)
        _positive("probe.reasoning_window", self.reasoning_window)
        _above("probe.alpha", self.alpha)
        for key in ("pca_prompt", "pca_reasoning"):
            if getattr(self, key) is not None:
                _positive(f"probe.{key}", getattr(self, key))
        if not self.buffer_caps or any(v < 2 for v in self.buffer_caps.values()):
            raise ValueError(f"probe.buffer_caps needs at least one bucket with >= 2 rows; got "
                             f"{self.buffer_caps}.")
        _nonneg("probe.bootstrap_steps", self.bootstrap_steps)
        _positive("probe.min_steps_to_fit", self.min_steps_to_fit)
        _positive("probe.snapshot_every", self.snapshot_every)
        if self.refit_threads is not None:
            _positive("probe.refit_threads", self.refit_threads)

    def resolve_layer(self, n_layers: int, model: object = "the model") -> int:
        """The decoder block the probe reads: `layer`, or the middle block when None."""
        layer = self.layer if self.layer is not None else n_layers // 2
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"probe.layer={layer} is out of range for {model} with "
                             f"{n_layers} decoder blocks; choose 0..{n_layers - 1}.")
        return layer


@dataclass
class OptimConfig:
    lr: float = opt(1e-6, 'AdamW learning rate (TRL learning_rate)')
    weight_decay: float = opt(0.01, 'AdamW weight decay')
    betas: list[float] = opt(lambda: [0.9, 0.999], "AdamW betas [b1, b2]", factory=True)
    warmup_steps: int = opt(10, 'linear learning-rate warm-up steps')
    lr_schedule: str = opt("constant", 'after warm-up: constant | cosine')
    max_grad_norm: float = opt(1.0, 'gradient-norm clip')
    mini_batch_prompts: int = opt(32, 'prompts per optimizer step (verl ppo_mini_batch_size)')
    micro_batch_size: int = opt(16, 'rollouts per forward; gradients accumulate over a mini-batch')
    micro_batch_tokens: int | None = opt(
        None, "padded tokens per forward at most (rows sorted by length, so a micro-batch holds "
              "rows of similar length and pads less); None: fixed micro_batch_size chunks in "
              "batch order")
    ppo_epochs: int = opt(1, "passes over each step's batch")
    logit_chunk_tokens: int = opt(
        2048, "response tokens per LM-head chunk (bounds the logits' memory)")

    def __post_init__(self):
        _above("optim.lr", self.lr)
        _nonneg("optim.weight_decay", self.weight_decay)
        # a negative norm would flip the clipped gradient's sign (the run would ascend)
        _above("optim.max_grad_norm", self.max_grad_norm)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), [b1, b2] as AdamW "
                             f"takes them (e.g. [0.9, 0.999]); got {self.betas}.")
        _choice("optim.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _positive("optim.mini_batch_prompts", self.mini_batch_prompts)
        _positive("optim.micro_batch_size", self.micro_batch_size)
        _positive("optim.ppo_epochs", self.ppo_epochs)
        if self.micro_batch_tokens is not None:
            _positive("optim.micro_batch_tokens", self.micro_batch_tokens)
        _positive("optim.logit_chunk_tokens", self.logit_chunk_tokens)
        _nonneg("optim.warmup_steps", self.warmup_steps)


@dataclass
class TrainerConfig:
    total_steps: int = opt(50, 'training steps')
    token_budget: int | None = opt(
        None, 'stop after the step at which the generated tokens (tokens/sampled: every '
              'generation round) reach this, evaluating and saving there; total_steps stays the '
              'cap; None: no budget')
    seed: int = opt(0, 'seed of prompts, sampling and the update order')
    output_dir: str = opt("runs/poise", 'run directory when --output is not given')
    save_every: int = opt(10, 'checkpoint every this many steps (and at the last)')
    keep_checkpoints: int = opt(2, 'newest checkpoints kept')
    log_rollouts_every: int = opt(1, 'write the rollout table every this many steps')
    report_to: list[str] = opt(
        list, "metric mirrors of metrics.jsonl (TRL report_to): tensorboard (event files in "
              "the run's tensorboard/), wandb (an offline run in its wandb/); needs the "
              "tracking extra", factory=True)
    wandb_project: str = opt("poise-probe", "W&B project of the offline run (report_to: wandb)")

    def __post_init__(self):
        for name in self.report_to:
            _choice("trainer.report_to[]", name, SINK_NAMES)
        _positive("trainer.total_steps", self.total_steps)
        if self.token_budget is not None:
            _positive("trainer.token_budget", self.token_budget)
        _positive("trainer.save_every", self.save_every)
        _positive("trainer.keep_checkpoints", self.keep_checkpoints)
        _positive("trainer.log_rollouts_every", self.log_rollouts_every)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    group: GroupConfig = field(default_factory=GroupConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    hista: HistaConfig = field(default_factory=HistaConfig)
    numca: NumcaConfig = field(default_factory=NumcaConfig)

    def __post_init__(self):
        # the probe estimators: POISE and its ablations (same-rollout, prompt-only baselines)
        probed = ("poise", "poise_self", "poise_prompt")
        if self.algorithm.adv_estimator in (*probed, "rloo") and self.rollout.num_generations < 2:
            raise ValueError(
                f"rollout.num_generations must be >= 2 for {self.algorithm.adv_estimator} "
                f"(baselines or the probe's targets come from sibling rollouts); got "
                f"{self.rollout.num_generations}.")
        a = self.algorithm
        if a.adv_estimator in probed and not self.probe.shadow:
            raise ValueError(f"probe.shadow=false turns the probe off, but "
                             f"adv_estimator={a.adv_estimator} computes its baseline with it; "
                             f"drop probe.shadow=false, or pick an estimator without the probe "
                             f"(grpo, dapo, rloo, ...).")
        if a.adv_estimator in probed and (a.dynamic_sampling or a.overlong_shaping):
            raise ValueError(
                f"algorithm.dynamic_sampling and algorithm.overlong_shaping must be false for "
                f"{a.adv_estimator}: it keeps equal-reward groups (both-correct pairs get 1 - g, "
                f"both-wrong -g) and its probe predicts the unshaped score; use "
                f"adv_estimator=dapo for them.")
        from poise_probe.group_norm import GROUP_ESTIMATORS as group_estimators
        g = self.group
        if (g.validity_mask or g.variance != "empirical") and a.adv_estimator not in group_estimators:
            raise ValueError(f"group.validity_mask and group.variance are options of "
                             f"{list(group_estimators)}; adv_estimator={a.adv_estimator!r} "
                             f"ignores them. Turn them off or pick one of those estimators.")
        if g.variance != "empirical" and a.adv_estimator != "grpo":
            raise ValueError(f"group.variance={g.variance!r} sets grpo's scale; "
                             f"{a.adv_estimator} does not divide by a std. Use "
                             f"adv_estimator=grpo or group.variance=empirical.")
        if g.variance != "empirical" and a.overlong_shaping:
            raise ValueError(f"group.variance={g.variance!r} treats rewards as success rates in "
                             f"[0, 1]; algorithm.overlong_shaping makes them negative. Turn one "
                             f"off.")
        if a.overlong_shaping and a.overlong_buffer_len >= self.rollout.max_completion_length:
            raise ValueError(f"algorithm.overlong_buffer_len ({a.overlong_buffer_len}) must be < "
                             f"rollout.max_completion_length ({self.rollout.max_completion_length}).")
        if self.optim.mini_batch_prompts > self.rollout.prompts_per_step:
            raise ValueError(f"optim.mini_batch_prompts ({self.optim.mini_batch_prompts}) must "
                             f"be <= rollout.prompts_per_step ({self.rollout.prompts_per_step}).")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or the defaults), apply `key=value` overrides, validate everything."""
    return load_config_with_sources(path, overrides)[0]


def load_config_with_sources(path: str | Path | None = None, overrides: list[str] | None = None
                             ) -> tuple[Config, dict[str, str]]:
    """`load_config`, plus where each set value came from: {"optim.lr": "override
    learning_rate=1e-5", "rollout.engine": "file training/configs/x.yaml", ...}; keys not
    listed hold their defaults."""
    raw: dict = {}
    sources: dict[str, str] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist; recipes live in "
                                    f"training/configs/.")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"config file {str(p)!r} is not valid YAML: {what}{where}; fix "
                             f"the file (yamllint names the same place).") from exc
        if raw is None or raw == {}:
            logging.getLogger(__name__).warning(
                "config file %r is empty: every value not overridden is a default (see `poise "
                "config show`)", str(p))
            raw = {}
        if not isinstance(raw, dict):
            raise ValueError(f"config file {str(p)!r} must hold a mapping of sections; got "
                             f"{type(raw).__name__}.")
        raw = _canonical_sections(raw, sources, f"file {p}")
    for item in overrides or []:
        key, value = parse_override(item)
        (section, name), value = resolve_alias(key, value)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ValueError(f"config section {section!r} must be a mapping.")
        raw[section][name] = value
        sources[f"{section}.{name}"] = f"override {item}"
    return from_dict(raw), sources


def resolve_alias(key: str, value: Any) -> tuple[tuple[str, str], Any]:
    """(section, field) and value for `key`, which may be a TRL/verl alias (`learning_rate`)."""
    bare = key.rsplit(".", 1)[-1]
    if bare in ALIASES and (key == bare or key.split(".", 1)[0] == ALIASES[bare][0].split(".")[0]):
        canonical, values = ALIASES[bare]
        if values is not None:
            if not isinstance(value, typing.Hashable) or value not in values:
                raise ValueError(f"{key}={value!r}: {key} maps to {canonical} only for "
                                 f"{sorted(values)}; set {canonical} to one of "
                                 f"{list(LOSS_AGG_MODES) if 'loss_agg' in canonical else ''} "
                                 f"directly.")
            value = values[value]
        section, name = canonical.split(".")
        return (section, name), value
    return resolve_key(key), value


def _canonical_sections(raw: dict, sources: dict, origin: str) -> dict:
    """A YAML mapping with aliases inside sections (`optim: {learning_rate: ..}`) renamed."""
    out: dict = {}
    for section, values in raw.items():
        if not isinstance(values, dict):
            out[section] = values
            continue
        for key, val in values.items():
            if key in ALIASES and ALIASES[key][0].split(".")[0] == section:
                (sec, name), val = resolve_alias(f"{section}.{key}", val)
            else:
                sec, name = section, key
            out.setdefault(sec, {})[name] = val
            sources[f"{sec}.{name}"] = origin + (f" ({section}.{key})" if name != key else "")
    return out


def from_dict(raw: dict) -> Config:
    """Build a `Config` from nested dicts, naming any unknown section or key and bad types."""
    unknown = set(raw) - set(section_classes())
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; sections are "
                         f"{sorted(section_classes())}.")
    sections = {}
    for name, cls in section_classes().items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config section {name!r} must be a mapping; got {values!r}.")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, val in values.items():
            if key not in fields:
                close = difflib.get_close_matches(key, list(fields), n=3)
                hint = f" (did you mean {', '.join(name + '.' + c for c in close)}?)" if close else ""
                raise ValueError(f"unknown config key {name}.{key}{hint}; keys of {name}: "
                                 f"{sorted(fields)}.")
            values[key] = _coerce(f"{name}.{key}", val, typing.get_type_hints(cls)[key])
        sections[name] = cls(**values)
    return Config(**sections)


def parse_override(item: str) -> tuple[str, Any]:
    """`optim.lr=1e-5` -> ('optim.lr', 1e-05); the value is read as YAML."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-5).")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except Exception as exc:  # YAMLError, and PyYAML's own bugs on some tags (!!int, !!timestamp)
        raise ValueError(f"override {item!r}: value {text!r} is not valid YAML "
                         f"({type(exc).__name__}: {exc}).") from exc
    return key.strip(), value


def resolve_key(key: str) -> tuple[str, str]:
    """`section.field`, or a bare field name that exactly one section has."""
    classes = section_classes()
    if "." in key:
        section, name = key.split(".", 1)
        if section not in classes:
            raise ValueError(f"unknown config key {key!r}: no section {section!r}; sections are "
                             f"{sorted(classes)}.")
        if name not in {f.name for f in dataclasses.fields(classes[section])}:
            names = [f.name for f in dataclasses.fields(classes[section])]
            close = difflib.get_close_matches(name, names, n=3)
            hint = f" (did you mean {', '.join(section + '.' + c for c in close)}?)" if close else ""
            raise ValueError(f"unknown config key {key!r}{hint}.")
        return section, name
    owners = [s for s, c in classes.items() if key in {f.name for f in dataclasses.fields(c)}]
    if len(owners) == 1:
        return owners[0], key
    if len(owners) > 1:
        raise ValueError(f"config key {key!r} is ambiguous; write one of "
                         f"{[o + '.' + key for o in owners]}.")
    every = [f"{s}.{f.name}" for s, c in classes.items() for f in dataclasses.fields(c)]
    close = difflib.get_close_matches(key, [e.split(".", 1)[1] for e in every], n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"unknown config key {key!r}{hint}.")


def section_classes() -> dict[str, type]:
    """{section name: its dataclass}, in `Config`'s order."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and gently convert, int -> float) `value` against the annotated type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"config key {key}: bad value {value!r}.")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"config key {key} must be a list; got {value!r}.")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_coerce(f"{key}[{i}]", v, arg) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key} must be a mapping; got {value!r}.")
        _, varg = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(f"{key}.{k}", v, varg) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {key} must be true or false; got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"config key {key} must be an integer; got {value!r}.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise ValueError(f"config key {key}: {str(value)[:20]}... is beyond the range of "
                                 f"a float; give a number below 1.8e308.") from None
        if isinstance(value, str):  # YAML reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"config key {key} must be a number; got {value!r}.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"config key {key} must be a string; got {value!r}.")
    return value
