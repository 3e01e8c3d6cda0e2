"""verl's own plugin loader finds and loads poise_probe; the estimator is in verl's registry."""
from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

CHECK = ("import verl; from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY as R; "
         "print('poise' in R, type(R.get('poise')).__name__)")


def _fresh(policy: str) -> str:
    """stdout of CHECK in a new interpreter that imports verl only (never poise_probe itself)."""
    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": policy}
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                         timeout=180, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_entry_point_is_listed():
    eps = entry_points(group="verl.plugins")
    ours = [ep for ep in eps if ep.name == "poise_probe"]
    assert [ep.value for ep in ours] == ["poise_probe.integrations.verl"]


def test_import_verl_registers_poise_through_the_loader():
    assert _fresh("auto") == "True PoiseEstimator"


def test_named_policy_loads_it_and_none_does_not():
    # control: with verl's loader off, nothing else registers the estimator
    assert _fresh("poise_probe") == "True PoiseEstimator"
    assert _fresh("none") == "False NoneType"


def test_lookup_in_this_process():
    import verl  # noqa: F401
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    from poise_probe.integrations.verl import get_estimator
    from poise_probe.integrations.verl.estimator import PoiseEstimator

    fn = get_adv_estimator_fn("poise")
    assert isinstance(fn, PoiseEstimator) and fn is get_estimator()


def test_poise_trainer_registers_in_verls_v1_registry():
    # imported through VERL_USE_EXTERNAL_MODULES in a real launch (training/verl/run_poise.sh)
    import poise_probe.integrations.verl.trainer as trainer
    from verl.trainer.ppo.v1 import PPOTrainerSync, get_trainer_cls

    cls = get_trainer_cls("poise_sync")
    assert cls is trainer.PoiseTrainerSync and issubclass(cls, PPOTrainerSync)
