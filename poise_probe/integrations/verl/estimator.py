"""The `poise` advantage estimator in verl's signature, over this project's POISE math.

verl's `compute_advantage` calls a registered estimator with the token-level rewards (bs, T),
the response mask (bs, T), the prompt uids (`index`) and the algorithm config, and nothing else
(verl 0.9.1, trainer/ppo/ray_trainer.py:250-279). The probe's predictions g(phi_i) come from
the driver (`PoiseDriver.stage`), which predicts them between the old-log-prob and advantage
stages and hands them to the registered estimator object with the uids they belong to; the
estimator refuses a batch whose uids do not match, and a call with nothing staged.
Math: `poise_probe.advantages.poise_with_bootstrap` (POISE.md, "Advantage and loss").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from poise_probe.advantages import AdvantageResult, poise_with_bootstrap

logger = logging.getLogger(__name__)

__all__ = ["PoiseEstimator", "StagedPredictions", "uid_codes"]


def uid_codes(index) -> Tensor:
    """verl's per-row prompt uids (strings or ints) -> int64 group ids (bs,), first-seen order."""
    codes: dict = {}
    return torch.tensor([codes.setdefault(u, len(codes)) for u in list(index)], dtype=torch.long)


@dataclass
class StagedPredictions:
    """The driver's probe output for one batch, in the batch's row order."""

    uids: list          # (bs,) verl's `uid` of each row
    preds: Tensor       # (bs,) clipped g(phi_i); NaN where not ready
    ready: Tensor       # (bs,) bool: probe fitted and bootstrap over


class PoiseEstimator:
    """Callable registered in verl as `poise`: A_i = r_i - mean_{j != i} g(phi_j), no normalisation.

    `stage(...)` before verl's advantage stage, then verl calls the object; the last result
    (`AdvantageResult`, `used`) stays readable for metrics and the rollout table.
    """

    def __init__(self):
        self._staged: StagedPredictions | None = None
        self.last: tuple[AdvantageResult, Tensor] | None = None

    def stage(self, uids, preds, ready) -> None:
        """Hand over one batch's predictions (bs,) and ready flags (bs,) with the rows' uids."""
        uids = list(uids)
        p = torch.as_tensor(np.asarray(preds, dtype=np.float64))
        r = torch.as_tensor(np.asarray(ready, dtype=bool))
        if p.shape != (len(uids),) or r.shape != (len(uids),):
            raise ValueError(f"stage needs preds and ready of shape ({len(uids)},) for "
                             f"{len(uids)} uids; got {tuple(p.shape)} and {tuple(r.shape)}.")
        self._staged = StagedPredictions(uids, p, r)

    def __call__(self, token_level_rewards: Tensor, response_mask: Tensor, index=None,
                 config=None, **kwargs) -> tuple[Tensor, Tensor]:
        """verl's estimator signature -> (advantages, returns), both (bs, T), zero off the mask."""
        if index is None:
            raise ValueError("poise needs verl's prompt uids (`index`, from non_tensor_batch['uid']) "
                             "to find each rollout's siblings; the batch has no 'uid'.")
        staged, self._staged = self._staged, None  # one staging serves exactly one call
        if staged is None:
            raise RuntimeError("poise: no probe predictions were staged for this batch. Run verl "
                               "with the POISE trainer (trainer.v1.trainer_mode=poise_sync, see "
                               "docs/verl.md) or call PoiseDriver.stage before compute_advantage.")
        index = list(index)
        if staged.uids != index:
            raise ValueError(f"poise: the staged predictions belong to other rows (uids "
                             f"{staged.uids[:4]}... vs the batch's {index[:4]}...); stage them "
                             f"for this batch, in its row order, after any reordering.")
        if token_level_rewards.shape != response_mask.shape or token_level_rewards.ndim != 2:
            raise ValueError(f"token_level_rewards and response_mask must both be (bs, T); got "
                             f"{tuple(token_level_rewards.shape)} and {tuple(response_mask.shape)}.")
        with torch.no_grad():
            scores = token_level_rewards.sum(dim=-1)  # (bs,) outcome reward, as verl's GRPO
            out, used = poise_with_bootstrap(scores, uid_codes(index), staged.preds.to(scores.dtype),
                                             staged.ready)
            adv = out.per_token(response_mask).to(token_level_rewards.dtype)     # (bs, T)
        self.last = (out, used)
        return adv, adv
