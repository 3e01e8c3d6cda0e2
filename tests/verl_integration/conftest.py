"""tests/verl_integration run only where verl is installed (`make test-verl`, in .venv-verl).

The core environment has no verl: there pytest does not even collect this folder, so the core
run neither fails on the import nor reports skips.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch


def _verl_installed() -> bool:
    # tests/ is on sys.path, so this very folder passes for a namespace package named `verl`
    # (no origin); the real one is a regular package. Never add an __init__.py here: it would
    # shadow the real verl.
    spec = importlib.util.find_spec("verl")
    return spec is not None and spec.origin is not None


if not _verl_installed():
    collect_ignore_glob = ["*.py"]


def make_batch(rewards, uids, data_sources, features, resp_lens, width=6):
    """A verl DataProto as the advantage stage sees it: the outcome reward on each response's
    last token (verl's reward managers), response_mask (bs, T), uid and data_source arrays."""
    from verl import DataProto

    n = len(rewards)
    mask = torch.zeros(n, width)
    tlr = torch.zeros(n, width)
    for i, (r, k) in enumerate(zip(rewards, resp_lens)):
        mask[i, :k] = 1
        tlr[i, k - 1] = r
    tensors = {"token_level_rewards": tlr, "response_mask": mask,
               "poise_features": torch.as_tensor(np.asarray(features), dtype=torch.float32)}
    return DataProto.from_dict(tensors=tensors, non_tensors={
        "uid": np.array(uids, dtype=object), "data_source": np.array(data_sources, dtype=object)})


@pytest.fixture
def estimator():
    from poise_probe.integrations.verl import get_estimator
    est = get_estimator()
    est._staged = None  # a test that failed mid-way must not leak its staging
    return est
