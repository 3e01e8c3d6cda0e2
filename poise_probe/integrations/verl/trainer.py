"""verl's v1 sync trainer with the POISE stage, registered as `trainer.v1.trainer_mode=poise_sync`.

Imported through verl's public module hook (`VERL_USE_EXTERNAL_MODULES=
poise_probe.integrations.verl.trainer`, read at `import verl` in every process), not by the
plugin: the v1 trainer needs TransferQueue (verl[verl-core]) and Ray, which the plugin must not.
It overrides one stage method, `_compute_advantage` (verl 0.9.1 trainer/ppo/v1/trainer_base.py:
1743; verl has no public hook between old-log-prob and advantage): stage the probe's
predictions, run verl's own advantage stage (which calls the registered `poise` estimator),
then add the step's rows to the bank and refit. NOT RUN here: it needs GPUs (see docs/verl.md).
"""
from __future__ import annotations

import numpy as np
import transfer_queue as tq
from verl.protocol import DataProto
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from poise_probe.integrations.verl.actor import FEATURES_KEY
from poise_probe.integrations.verl.driver import PoiseDriver, RunDirLogger, rollout_rows
from poise_probe.probe import ProbeBank

_FIELDS = ["uid", "data_source", FEATURES_KEY, "rm_scores", "responses", "response_mask"]


def _builtin_domains() -> dict[str, str]:
    """data_source -> bank bucket for this project's built-in tasks (`poise/arith` -> math)."""
    from poise_probe.tasks import DEFAULT_TASKS, get_task
    return {f"poise/{name}": get_task(name).domain for name in DEFAULT_TASKS}


@register_trainer("poise_sync")
class PoiseTrainerSync(PPOTrainerSync):
    """Sync PPO with POISE baselines; probe settings under `algorithm.poise` (docs/verl.md)."""

    def _poise_driver(self) -> PoiseDriver:
        if getattr(self, "_poise", None) is None:
            cfg = self.config.algorithm.get("poise", {}) or {}
            bank = ProbeBank(alpha=float(cfg.get("alpha", 0.01)),
                             min_steps_to_fit=int(cfg.get("min_steps_to_fit", 8)))
            self._poise = PoiseDriver(bank, bootstrap_steps=int(cfg.get("bootstrap_steps", 16)),
                                      domain_map=dict(cfg.get("domain_map", None) or
                                                      _builtin_domains()))
        return self._poise

    def _compute_advantage(self, batch, metrics: dict):
        driver = self._poise_driver()
        td = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=_FIELDS)
        data = DataProto(batch=td.select(FEATURES_KEY, "responses", "response_mask").to_padded_tensor())
        data.batch["token_level_rewards"] = td["rm_scores"].to_padded_tensor()
        for key in ("uid", "data_source"):
            data.non_tensor_batch[key] = np.array(list(td[key]), dtype=object)
        driver.stage(data, self.global_steps)
        batch = super()._compute_advantage(batch, metrics)
        metrics.update(driver.update(data, self.global_steps))
        run = self._poise_run()
        if run is not None:
            run.write_rollouts(self.global_steps, rollout_rows(data, driver, self.global_steps,
                                                               self.tokenizer))
        return batch

    def _poise_run(self) -> RunDirLogger | None:
        """`algorithm.poise.run_dir`: a run directory beside verl's own loggers (same metrics)."""
        run_dir = (self.config.algorithm.get("poise", {}) or {}).get("run_dir")
        if not run_dir:
            return None
        if getattr(self, "_poise_run_logger", None) is None:
            from omegaconf import OmegaConf
            self._poise_run_logger = RunDirLogger(
                run_dir, config=OmegaConf.to_container(self.config, resolve=True),
                model=str(self.config.actor_rollout_ref.model.path),
                device=str(self.config.trainer.device))
            self.logger = _Both(self.logger, self._poise_run_logger)
        return self._poise_run_logger


class _Both:
    """verl's Tracking plus the run directory: `log` goes to both, the rest to verl's."""

    def __init__(self, tracking, run: RunDirLogger):
        self._tracking, self._run = tracking, run

    def log(self, data, step, backend=None):
        self._tracking.log(data=data, step=step, backend=backend)
        self._run.log(data, step)

    def finish(self, exit_code: int = 0):
        self._run.finish(exit_code)
        return self._tracking.finish(exit_code=exit_code)

    def __getattr__(self, name):
        return getattr(self._tracking, name)
