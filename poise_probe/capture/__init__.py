"""Probe-study capture: pooled residual streams and token statistics of rollouts, to disk.

The trainer never imports this package; it pools its own features with plain hooks. Both use the
span and weight functions of `poise_probe.features`, so they agree (tests/test_capture.py).
"""
from poise_probe.capture.collect import BACKENDS, TOKEN_STATS, Capturer, CaptureSpec
from poise_probe.capture.dataset import (
                                         FEATURE_SETS,
                                         CaptureDataset,
                                         DatasetError,
                                         load_datasets,
)
from poise_probe.capture.driver import capture, prepare_plan
from poise_probe.capture.sources import (
                                         fill_token_ids,
                                         plan_from_generation,
                                         plan_from_run,
                                         run_model_path,
)

__all__ = [
                                         "BACKENDS",
                                         "FEATURE_SETS",
                                         "TOKEN_STATS",
                                         "CaptureDataset",
                                         "CaptureSpec",
                                         "Capturer",
                                         "DatasetError",
                                         "capture",
                                         "fill_token_ids",
                                         "load_datasets",
                                         "plan_from_generation",
                                         "plan_from_run",
                                         "prepare_plan",
                                         "run_model_path",
]
