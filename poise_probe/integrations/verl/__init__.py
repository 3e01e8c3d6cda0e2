"""POISE as a verl plugin: verl imports this package at `import verl` (the `verl.plugins`
entry point) and it registers the `poise` advantage estimator in verl's own registry.

Modules: `estimator` (the registered callable), `actor` (features from the old-log-prob
forward), `driver` (the probe bank on the driver, the run-directory logger), `trainer` (verl's
v1 sync trainer with the POISE stage, registered as `poise_sync`), `data` (tasks -> Parquet).
Loading must never break `import verl`: a failure here is logged, not raised.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

ESTIMATOR_NAME = "poise"
_estimator = None


def get_estimator():
    """The `PoiseEstimator` registered in verl under "poise" (registering it on first use)."""
    global _estimator
    if _estimator is None:
        from verl.trainer.ppo.core_algos import get_adv_estimator_fn, register_adv_est

        from poise_probe.integrations.verl.estimator import PoiseEstimator

        try:
            existing = get_adv_estimator_fn(ESTIMATOR_NAME)
        except ValueError:
            existing = None
        if isinstance(existing, PoiseEstimator):  # registered by an earlier import
            _estimator = existing
        else:
            _estimator = register_adv_est(ESTIMATOR_NAME)(PoiseEstimator())
    return _estimator


def _register() -> None:
    try:
        get_estimator()
    except Exception:  # a broken plugin must not stop verl from importing
        logger.exception("poise_probe: could not register the 'poise' advantage estimator in "
                         "verl; algorithm.adv_estimator=poise will be unknown.")


_register()
