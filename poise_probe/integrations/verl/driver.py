"""The probe on verl's driver, in the spec's order, and the run directory of a verl run.

One training step in verl (v1 sync trainer): generate -> reward -> old-log-prob (the actor
returns `poise_features`, see `actor`) -> **stage**: predict with the current probe bank,
routed by each row's `data_source`, and hand the predictions to the registered `poise`
estimator -> verl's compute_advantage (advantages frozen) -> **update**: append this step's
rows to the bank and refit -> policy update. So a step's baselines never see that step's rows
(POISE.md, "Order within a step matters").
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from poise_probe.diagnostics import advantage_diagnostics, probe_diagnostics
from poise_probe.integrations.verl.actor import FEATURES_KEY
from poise_probe.probe import ProbeBank, loo_targets
from poise_probe.rundir import RunWriter

logger = logging.getLogger(__name__)

__all__ = ["PoiseDriver", "RunDirLogger", "batch_features", "rollout_rows"]


def batch_features(data) -> np.ndarray:
    """(bs, D) float64 POISE features of a verl DataProto; missing or non-finite ones raise."""
    if FEATURES_KEY not in data.batch.keys():
        raise KeyError(f"verl batch has no {FEATURES_KEY!r}: the old-log-prob forward did not "
                       f"capture POISE features. Run the actor with the POISE feature capture "
                       f"(docs/verl.md); batch keys: {sorted(data.batch.keys())}.")
    phi = data.batch[FEATURES_KEY].detach().double().cpu().numpy()
    if phi.ndim != 2 or phi.shape[0] != len(data):
        raise ValueError(f"{FEATURES_KEY} must be (bs={len(data)}, D); got {phi.shape}.")
    bad = ~np.isfinite(phi)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"{FEATURES_KEY}[{row}, {col}] = {phi[row, col]} ({int(bad.sum())} "
                         f"non-finite values): the old-log-prob forward produced NaN/inf; check "
                         f"the model's dtype and the probe layer.")
    return phi


def _strings(data, key: str) -> list[str]:
    if key not in data.non_tensor_batch:
        raise KeyError(f"verl batch has no non-tensor field {key!r}; POISE needs 'uid' (prompt "
                       f"groups) and 'data_source' (the probe bank's routing).")
    return [str(x) for x in data.non_tensor_batch[key]]


@dataclass
class _Pending:
    uids: list[str]
    domains: list[str]
    phi: np.ndarray
    preds: np.ndarray
    fitted: np.ndarray
    raw: np.ndarray


class PoiseDriver:
    """The per-domain probe bank on verl's driver: `stage` before, `update` after advantages.

    `domain_map` maps a `data_source` to a bank bucket (default: the data_source itself, which
    the bank routes to its own bucket or "other"); `bootstrap_steps` steps of RLOO come first
    (POISE.md, "Bootstrap"); `estimator` is the registered `PoiseEstimator`.
    """

    def __init__(self, bank: ProbeBank, *, estimator=None, bootstrap_steps: int = 16,
                 domain_map: Mapping[str, str] | None = None):
        if estimator is None:
            from poise_probe.integrations.verl import get_estimator
            estimator = get_estimator()
        if int(bootstrap_steps) < 0:
            raise ValueError(f"bootstrap_steps must be >= 0; got {bootstrap_steps}.")
        self.bank, self.estimator = bank, estimator
        self.bootstrap_steps = int(bootstrap_steps)
        self.domain_map = dict(domain_map or {})
        self._pending: _Pending | None = None

    def domains(self, data) -> list[str]:
        return [self.domain_map.get(s, s) for s in _strings(data, "data_source")]

    def stage(self, data, step: int) -> None:
        """Predict this batch's g(phi_i) with the probes as they are, and stage them (bs,)."""
        phi = batch_features(data)
        uids, domains = _strings(data, "uid"), self.domains(data)
        preds, fitted, raw = self.bank.predict(phi, domains)
        ready = fitted & (step > self.bootstrap_steps)
        self.estimator.stage(list(data.non_tensor_batch["uid"]), np.nan_to_num(preds), ready)
        self._pending = _Pending(uids, domains, phi, preds, fitted, raw)

    def update(self, data, step: int) -> dict[str, float]:
        """After advantages: add this step's rows to the bank and refit; the step's metrics."""
        p, self._pending = self._pending, None
        if p is None or p.uids != _strings(data, "uid"):
            raise RuntimeError("PoiseDriver.update needs the rows staged by stage() for this "
                               "batch; call stage -> compute_advantage -> update in that order.")
        scores = data.batch["token_level_rewards"].sum(-1).double().cpu().numpy()   # (bs,)
        metrics = self.bank.update(p.phi, scores, p.uids, p.domains, step)
        out, used = self.estimator.last
        metrics["probe/used_frac"] = float(used.float().mean())
        if p.fitted.any():
            t = loo_targets(scores, p.uids)
            metrics.update(probe_diagnostics(p.preds[p.fitted], t[p.fitted], scores[p.fitted],
                                             np.asarray(p.uids)[p.fitted],
                                             raw_preds=p.raw[p.fitted]))
        metrics.update(advantage_diagnostics(out.advantages.numpy(), out.baselines.numpy(),
                                             scores, scale=out.scale.numpy()))
        self.last_rows = (p, scores, out)
        return metrics

    def compute_advantage(self, data, step: int, **kwargs):
        """stage -> verl's own compute_advantage(adv_estimator="poise") -> update; (data, metrics)."""
        from verl.trainer.ppo.ray_trainer import compute_advantage

        self.stage(data, step)
        data = compute_advantage(data, adv_estimator="poise", **kwargs)
        return data, self.update(data, step)


def rollout_rows(data, driver: PoiseDriver, step: int, tokenizer=None) -> dict:
    """The run-format rollout columns (docs/run-format.md) of the step `driver` just updated."""
    p, scores, out = driver.last_rows
    mask = data.batch["response_mask"].bool()
    ent = data.batch["entropy"].float() if "entropy" in data.batch.keys() else None
    resp = data.batch["responses"]
    n = len(p.uids)
    lens = mask.sum(-1).tolist()
    codes: dict = {}
    gids = [codes.setdefault(u, len(codes)) for u in p.uids]
    seen: dict = {}
    rollout_idx = []
    for u in p.uids:
        rollout_idx.append(seen.get(u, 0))
        seen[u] = rollout_idx[-1] + 1

    def text(ids):
        return "" if tokenizer is None else tokenizer.decode(ids, skip_special_tokens=True)

    prompts = data.non_tensor_batch.get("raw_prompt")
    return {
        "step": [step] * n,
        "prompt_id": p.uids,
        "group_id": gids,
        "domain": [driver.bank.route(d) for d in p.domains],
        "data_source": _strings(data, "data_source"),
        "rollout_idx": rollout_idx,
        "prompt": ["" if prompts is None else str(prompts[i]) for i in range(n)],
        "completion": [text(resp[i][mask[i]].tolist()) for i in range(n)],
        "reward": scores.tolist(),
        "probe_pred": [float(x) for x in p.preds],
        "baseline": out.baselines.double().tolist(),
        "advantage": out.advantages.double().tolist(),
        "token_entropies": [[] if ent is None else ent[i][mask[i]].tolist() for i in range(n)],
        "num_tokens": lens,
        "truncated": [bool(mask[i, -1]) for i in range(n)],  # ran to max_response_length
    }


class RunDirLogger:
    """A run directory (docs/run-format.md) for a verl run, so `poise dashboard` opens it.

    `log(data, step)` has the signature of verl's tracking backends (`Tracking.log`): metrics
    go to metrics.jsonl (non-numeric values skipped); `write_rollouts` stores a step's table.
    """

    def __init__(self, run_dir, *, config: Mapping, model: str, device: str, resume: bool = False):
        self.writer = RunWriter(run_dir, config=config, resume=resume,
                                meta={"model": model, "device": device, "algorithm": "poise",
                                      "engine": "verl"})

    def log(self, data: Mapping, step: int) -> None:
        numeric = {k: float(v) for k, v in data.items()
                   if isinstance(v, (int, float, np.integer, np.floating))
                   or (torch.is_tensor(v) and v.numel() == 1)}
        self.writer.log_metrics(int(step), numeric)

    def write_rollouts(self, step: int, rows) -> None:
        self.writer.write_rollouts(int(step), rows)

    def finish(self, exit_code: int = 0) -> None:
        self.writer.close("finished" if exit_code == 0 else "failed")
