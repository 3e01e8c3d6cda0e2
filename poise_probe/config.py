"""Training configuration: dataclasses with verl/TRL names, YAML files and `key=value` overrides."""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
ROLLOUT_ENGINES = ("hf", "vllm")


@dataclass
class ModelConfig:
    path: str = "tiny-reasoner"          # local save_pretrained directory or 'tiny-reasoner'
    dtype: str = "auto"                  # auto: fp32 weights, bf16 autocast on CUDA | float32 | bfloat16
    device: str = "auto"                 # auto | cpu | cuda | cuda:N (cuda: stop if there is none)
    gradient_checkpointing: bool = False

    def __post_init__(self):
        _choice("model.dtype", self.dtype, ("auto", "float32", "bfloat16"))


@dataclass
class DataConfig:
    tasks: list[str] = field(default_factory=lambda: ["arith", "boolean", "code_output"])
    task_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # {task: {knob: v}}
    eval_tasks: list[str] | None = None  # None: the training tasks
    eval_n: int = 100                    # held-out prompts per task
    eval_samples: int = 8                # K for Avg@K
    eval_every: int = 10                 # steps; 0 = only at the start and the end
    eval_temperature: float = 1.0
    pool_size: int = 4096                # train prompts drawn per task, cycled (reshuffled)

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
        _positive("data.pool_size", self.pool_size)


@dataclass
class RolloutConfig:
    prompts_per_step: int = 32           # verl data.train_batch_size
    num_generations: int = 2             # rollouts per prompt (TRL num_generations, verl n)
    temperature: float = 1.0
    top_p: float = 1.0
    max_completion_length: int = 96      # max new tokens
    generation_batch_size: int = 256     # rows per generation batch at most (hf engine)
    max_batch_tokens: int | None = None  # and at most this many prompt + new tokens per batch
    engine: str = "hf"                   # hf (transformers generate) | vllm (colocated vllm.LLM)
    gpu_memory_utilization: float | None = None  # vllm: share of GPU memory (CPU: of RAM, for
    #                                      the KV cache) it takes; None: 0.3 on CUDA, 0.15 on CPU
    is_correction: bool | None = None    # truncated IS on pi_trainer/pi_engine; None: on for vllm
    is_cap: float = 2.0                  # ceiling of the truncated importance weight
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # more vllm.LLM(...) arguments

    def __post_init__(self):
        _positive("rollout.prompts_per_step", self.prompts_per_step)
        _positive("rollout.num_generations", self.num_generations)
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0 for RL sampling; got "
                             f"{self.temperature}.")
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


@dataclass
class AlgorithmConfig:
    adv_estimator: str = "poise"         # poise | grpo | dr_grpo | rloo | reinforce_pp | dapo
    epsilon: float = 0.2                 # clip_ratio_low
    epsilon_high: float = 0.28           # clip_ratio_high (clip-higher)
    clip_ratio_c: float = 10.0           # dual clip for negative advantages
    loss_agg_mode: str = "token-mean"
    kl_coef: float = 0.0                 # KL to the initial policy (off by default)
    kl_type: str = "low_var_kl"
    entropy_coeff: float = 0.0
    dynamic_sampling: bool = False       # DAPO: drop all-equal groups, sample more prompts
    max_gen_rounds: int = 3              # DAPO: generation rounds per step at most
    overlong_shaping: bool = False       # DAPO: soft overlong punishment
    overlong_buffer_len: int = 16
    overlong_penalty_factor: float = 1.0

    def __post_init__(self):
        from poise_probe.advantages import ADV_ESTIMATORS
        _choice("algorithm.adv_estimator", self.adv_estimator, tuple(sorted(ADV_ESTIMATORS)))
        _choice("algorithm.loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        _choice("algorithm.kl_type", self.kl_type, ("kl", "abs", "mse", "low_var_kl"))
        if not (0 < self.epsilon < 1 and self.epsilon_high > 0):
            raise ValueError(f"algorithm.epsilon must be in (0, 1) and epsilon_high > 0; got "
                             f"{self.epsilon} and {self.epsilon_high}.")
        if self.clip_ratio_c <= 1:
            raise ValueError(f"algorithm.clip_ratio_c must be > 1 (dual clip); got "
                             f"{self.clip_ratio_c}.")
        _positive("algorithm.max_gen_rounds", self.max_gen_rounds)
        _nonneg("algorithm.kl_coef", self.kl_coef)


@dataclass
class ProbeConfig:
    layer: int | None = None             # decoder block (0-based); None: the middle block
    prompt_window: int = 10              # last n prompt tokens
    reasoning_window: int = 10           # last n response tokens ending at </think>
    alpha: float = 0.01                  # ridge strength (paper v2: 0.01 raw; release 100 w/ PCA)
    pca_prompt: int | None = None        # release: 32
    pca_reasoning: int | None = None     # release: 64
    buffer_caps: dict[str, int] = field(
        default_factory=lambda: {"math": 4096, "code": 3072, "other": 3072})
    bootstrap_steps: int = 16            # RLOO with the sibling's reward until then
    min_steps_to_fit: int = 8            # a bucket is fitted once it holds this many steps
    snapshot_every: int = 10

    def __post_init__(self):
        _positive("probe.prompt_window", self.prompt_window)
        _positive("probe.reasoning_window", self.reasoning_window)
        if self.alpha <= 0:
            raise ValueError(f"probe.alpha must be > 0; got {self.alpha}.")
        if not self.buffer_caps or any(v < 2 for v in self.buffer_caps.values()):
            raise ValueError(f"probe.buffer_caps needs at least one bucket with >= 2 rows; got "
                             f"{self.buffer_caps}.")
        _nonneg("probe.bootstrap_steps", self.bootstrap_steps)
        _positive("probe.min_steps_to_fit", self.min_steps_to_fit)


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 10
    lr_schedule: str = "constant"        # constant | cosine (after warm-up)
    max_grad_norm: float = 1.0
    mini_batch_prompts: int = 32         # prompts per optimizer step (verl ppo_mini_batch_size)
    micro_batch_size: int = 16           # rollouts per forward (gradient accumulation)
    ppo_epochs: int = 1
    logit_chunk_tokens: int = 2048       # response tokens per LM-head chunk (memory bound)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0; got {self.lr}.")
        _choice("optim.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _positive("optim.mini_batch_prompts", self.mini_batch_prompts)
        _positive("optim.micro_batch_size", self.micro_batch_size)
        _positive("optim.ppo_epochs", self.ppo_epochs)
        _positive("optim.logit_chunk_tokens", self.logit_chunk_tokens)
        _nonneg("optim.warmup_steps", self.warmup_steps)


@dataclass
class TrainerConfig:
    total_steps: int = 50
    seed: int = 0
    output_dir: str = "runs/poise"
    save_every: int = 10                 # checkpoint period (steps); the last step always
    keep_checkpoints: int = 2
    log_rollouts_every: int = 1

    def __post_init__(self):
        _positive("trainer.total_steps", self.total_steps)
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

    def __post_init__(self):
        if self.algorithm.adv_estimator in ("poise", "rloo") and self.rollout.num_generations < 2:
            raise ValueError(
                f"rollout.num_generations must be >= 2 for {self.algorithm.adv_estimator} "
                f"(baselines come from sibling rollouts); got {self.rollout.num_generations}.")
        a = self.algorithm
        if a.adv_estimator == "poise" and (a.dynamic_sampling or a.overlong_shaping):
            raise ValueError(
                "algorithm.dynamic_sampling and algorithm.overlong_shaping must be false for "
                "poise: it keeps equal-reward groups (both-correct pairs get 1 - g, both-wrong "
                "-g) and its probe predicts the unshaped score; use adv_estimator=dapo for them.")
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
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist; recipes live in "
                                    f"training/configs/.")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"config file {str(p)!r} must hold a mapping of sections; got "
                             f"{type(raw).__name__}.")
    for item in overrides or []:
        key, value = parse_override(item)
        section, name = resolve_key(key)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ValueError(f"config section {section!r} must be a mapping.")
        raw[section][name] = value
    return from_dict(raw)


def from_dict(raw: dict) -> Config:
    """Build a `Config` from nested dicts, naming any unknown section or key and bad types."""
    unknown = set(raw) - set(_section_classes())
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; sections are "
                         f"{sorted(_section_classes())}.")
    sections = {}
    for name, cls in _section_classes().items():
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
    except yaml.YAMLError as exc:
        raise ValueError(f"override {item!r}: value {text!r} is not valid YAML ({exc}).") from exc
    return key.strip(), value


def resolve_key(key: str) -> tuple[str, str]:
    """`section.field`, or a bare field name that exactly one section has."""
    classes = _section_classes()
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


def _section_classes() -> dict[str, type]:
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
            return float(value)
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


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{key} must be one of {list(options)}; got {value!r}.")


def _positive(key: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{key} must be >= 1; got {value}.")


def _nonneg(key: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{key} must be >= 0; got {value}.")
