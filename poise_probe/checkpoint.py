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

    bad = [name for name, p in state.model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        last = writer.latest_checkpoint()
        raise FloatingPointError(
            f"step {state.step}: the policy's weights hold NaN or inf ({bad[0]}"
            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); this checkpoint was not "
            f"written (the last good one: step {last[0] if last else 'none'}). Lower optim.lr "
            f"or optim.max_grad_norm and resume.")
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
    """A checkpoint folder read back into `TrainState.state_dict()`'s form (tensors on CPU).
    A truncated or corrupted file raises a ValueError that names it."""
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as load_torch

    folder = Path(folder)
    weights = {}
    for f in sorted((folder / "policy").glob("*.safetensors")):
        weights.update(_read(f, lambda p: load_torch(str(p), device="cpu")))
    if not weights:
        raise FileNotFoundError(f"checkpoint {folder} has no policy/*.safetensors; it is not a "
                                f"checkpoint this trainer wrote.")
    # CPU first: RNG states must stay CPU byte tensors; the optimizer moves its state itself
    rest = _read(folder / "trainer_state.pt",
                 lambda p: torch.load(p, map_location="cpu", weights_only=False))
    if not isinstance(rest, dict):
        raise ValueError(f"{folder / 'trainer_state.pt'} holds a {type(rest).__name__}, not the "
                         f"trainer's state dict; {_DAMAGED}")
    bank = _read(folder / "probe_bank.safetensors", lambda p: load_file(str(p)))
    return {"policy": weights, "probe_bank": bank, **rest}


_DAMAGED = ("the checkpoint is damaged: delete its folder to resume from the one before (or, "
            "if it is the only one, --resume restarts the run from step 0)")


def _read(path: Path, loader):
    """`loader(path)`, with a missing, truncated or corrupted file as one clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {_DAMAGED}")
    try:
        return loader(path)
    except Exception as exc:   # safetensors, pickle, zip and EOF errors all mean "damaged"
        raise ValueError(f"{path} is unreadable ({type(exc).__name__}: {str(exc)[:200]}); "
                         f"{_DAMAGED}") from exc


def load_checkpoint_into(state: TrainState, step: int, folder: Path) -> None:
    """Load checkpoint `folder` (of `step`) into `state`; a damaged one raises a clear error."""
    state.load_state_dict(load_checkpoint(folder))
    if state.step != step:
        raise ValueError(f"checkpoint {folder} says step {state.step}; its folder says {step}. "
                         f"{_DAMAGED}")


def resume(writer: RunWriter, state: TrainState) -> int:
    """Resume `writer`'s run into `state`: load its newest checkpoint (a damaged one raises
    before anything is written), start the writer if it was made with `start=False`, then drop
    the records of later steps. Returns the step resumed from; 0 for a run killed before its
    first checkpoint, which restarts from scratch in place (every step record dropped)."""
    found = writer.latest_checkpoint()
    if found is not None:
        load_checkpoint_into(state, *found)
    if not writer.started:
        writer.start()
    writer.truncate_after(found[0] if found else -1)
    if found is None:
        logger.warning("%s has no checkpoint yet (killed before its first save): restarting it "
                       "from step 0 in place", writer.run_dir)
        return 0
    logger.info("resumed %s from step %d", writer.run_dir, found[0])
    return found[0]
