"""Checkpoints of a `TrainState` inside a run directory, and resuming from the latest one.

Layout of `checkpoints/step_XXXXXX/` (committed whole by `RunWriter.checkpoint`):
  policy/               the policy in `save_pretrained` form (safetensors) with its tokenizer,
                        so a checkpoint is also a loadable model
  trainer_state.pt      optimizer, scheduler, prompt-stream position, RNG states, step, and
                        the state of a stateful estimator (critic, Numca table) if any
  probe_bank.safetensors  the probe bank's buffers and fitted probes
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from poise_probe.rundir import RunWriter, step_name
from poise_probe.state import TrainState

logger = logging.getLogger(__name__)


def save_checkpoint(writer: RunWriter, state: TrainState, tokenizer) -> Path:
    """Write `state` as the checkpoint of its step; returns the committed folder."""
    from safetensors.numpy import save_file

    sd = state.state_dict()
    with writer.checkpoint(state.step) as d:
        state.model.save_pretrained(d / "policy", safe_serialization=True)
        tokenizer.save_pretrained(d / "policy")
        torch.save({k: sd[k] for k in ("optimizer", "scheduler", "data", "rng", "step",
                                       "value_method")},
                   d / "trainer_state.pt")
        save_file(sd["probe_bank"], str(d / "probe_bank.safetensors"))
    return writer.run_dir / "checkpoints" / step_name(state.step)


def load_checkpoint(folder: Path) -> dict:
    """A checkpoint folder read back into `TrainState.state_dict()`'s form (tensors on CPU)."""
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as load_torch

    weights = {}
    for f in sorted((folder / "policy").glob("*.safetensors")):
        weights.update(load_torch(str(f), device="cpu"))
    if not weights:
        raise FileNotFoundError(f"checkpoint {folder} has no policy/*.safetensors; it is not a "
                                f"checkpoint this trainer wrote.")
    # CPU first: RNG states must stay CPU byte tensors; the optimizer moves its state itself
    rest = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=False)
    return {"policy": weights, "probe_bank": load_file(str(folder / "probe_bank.safetensors")),
            **rest}


def resume(writer: RunWriter, state: TrainState) -> int:
    """Load the run's latest checkpoint into `state`, drop later records; returns its step."""
    found = writer.latest_checkpoint()
    if found is None:
        raise FileNotFoundError(f"--resume: {writer.run_dir} has no checkpoint to resume from; "
                                f"start a new run instead (drop --resume).")
    step, folder = found
    state.load_state_dict(load_checkpoint(folder))
    if state.step != step:
        raise ValueError(f"checkpoint {folder} says step {state.step}; its folder says {step}. "
                         f"The checkpoint is damaged: delete it to resume from the one before.")
    writer.truncate_after(step)
    logger.info("resumed %s from step %d", writer.run_dir, step)
    return step
