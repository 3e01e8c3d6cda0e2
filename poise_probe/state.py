"""Everything a run carries from one step to the next, as one object with a state dict.

`TrainState` holds the policy, its optimizer and LR schedule, the probe bank, the prompt
stream, the step and the RNG states. `state_dict()` / `load_state_dict()` round-trip all of it,
so a resumed run continues bit for bit (checkpointing in `poise_probe.checkpoint` writes it to
disk); integrations (TRL, verl) save and restore the same dictionary.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from poise_probe.data import PromptStream
from poise_probe.probe import ProbeBank


@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any                       # torch.optim.lr_scheduler.LRScheduler
    bank: ProbeBank
    stream: PromptStream
    step: int = 0                        # the last completed step
    value_method: Any = None             # a stateful estimator (critic, Numca table), if any

    def state_dict(self) -> dict:
        """{policy, optimizer, scheduler, probe_bank, data, rng, step}: tensors and arrays."""
        return {"policy": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "probe_bank": self.bank.state_dict(),
                "data": self.stream.state_dict(), "rng": rng_state(), "step": self.step,
                "value_method": ({} if self.value_method is None
                                 else self.value_method.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (the policy's weights are copied onto its device)."""
        missing = {"policy", "optimizer", "scheduler", "probe_bank", "data", "rng", "step"} - set(state)
        if missing:
            raise ValueError(f"train state lacks {sorted(missing)}; it was not written by "
                             f"TrainState.state_dict (or the checkpoint is incomplete).")
        load_policy_weights(self.model, state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["data"])
        self.bank.load_state_dict(state["probe_bank"])
        if self.value_method is not None:
            if "value_method" not in state:
                raise ValueError(f"the checkpoint has no state of {self.value_method.name!r}: "
                                 f"it was written by a run with another adv_estimator; resume "
                                 f"with that estimator or start a new run.")
            self.value_method.load_state_dict(state["value_method"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])


def load_policy_weights(model: torch.nn.Module, weights: dict) -> None:
    """Copy `weights` into `model`; a tied LM head may be absent (safetensors drops it)."""
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:         # shapes differ: another architecture or size
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise ValueError(f"saved weights do not match the model ({len(lines)} tensors differ in "
                         f"shape, first: {lines[0] if lines else exc}); resume with the same "
                         f"model.path.") from exc
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ValueError(f"saved weights do not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}; resume with the same model.path.")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def derive_seed(seed: int, *parts) -> int:
    """A 32-bit seed for one purpose of one step (`derive_seed(seed, step, "update")`)."""
    h = hashlib.sha256("|".join(map(str, (seed, *parts))).encode()).hexdigest()
    return int(h[:8], 16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
