"""Rollout engines (`hf`, `vllm`) behind one interface, and the step's rollout collection."""
from __future__ import annotations


from poise_probe.rollout.base import RolloutEngine, SamplingSettings
from poise_probe.rollout.hf import HFEngine
from poise_probe.rollout.memory import kv_bytes_per_token

__all__ = ["HFEngine", "RolloutEngine", "SamplingSettings", "make_engine", "sampling_settings"]


def sampling_settings(cfg) -> SamplingSettings:
    """The rollout section's sampling settings."""
    r = cfg.rollout
    return SamplingSettings(temperature=r.temperature, top_p=r.top_p,
                            max_new_tokens=r.max_completion_length)


def make_engine(cfg, model, tokenizer, device, autocast=None) -> RolloutEngine:
    """The engine `cfg.rollout.engine` names, sampling from `model`'s current weights."""
    r = cfg.rollout
    if r.engine == "hf":
        return HFEngine(model, tokenizer, batch_size=r.generation_batch_size,
                        max_batch_tokens=r.max_batch_tokens, autocast=autocast)
    if r.engine == "vllm":
        from poise_probe.models import resolve_model_path
        from poise_probe.rollout.vllm_engine import VLLMEngine

        dtype = _vllm_dtype(cfg, device)
        # room for a prompt + completion, within the model's positions
        kwargs = {"max_model_len": min(r.max_completion_length + 2048,
                                       model.config.max_position_embeddings)}
        if r.max_batch_tokens is not None:
            # the token budget is the KV cache: at most that many tokens in flight; vLLM queues
            # the other requests (continuous batching), as the hf engine splits batches
            kwargs["kv_cache_memory_bytes"] = r.max_batch_tokens * kv_bytes_per_token(
                model.config, dtype)
        kwargs.update(r.engine_kwargs)
        engine = VLLMEngine(str(resolve_model_path(cfg.model.path)), tokenizer=tokenizer,
                            dtype=dtype, gpu_memory_utilization=r.gpu_memory_utilization,
                            seed=cfg.trainer.seed, **kwargs)
        engine.sync_weights(model)  # a resumed or already-updated policy, not the files on disk
        return engine
    raise ValueError(f"rollout.engine must be one of ['hf', 'vllm']; got {r.engine!r}.")


def _vllm_dtype(cfg, device) -> str:
    """bf16 on CUDA as the trainer's autocast; fp32 on CPU, so the engine matches the trainer."""
    if cfg.model.dtype in ("float32", "bfloat16"):
        return cfg.model.dtype
    return "bfloat16" if str(device).startswith("cuda") else "float32"


