"""tests/vllm run only where vllm is installed (`make test-vllm`, in .venv-vllm).

The core environment has no vllm: there pytest does not even collect this folder, so the core
run neither fails on the import nor reports skips.
"""
from __future__ import annotations

import importlib.util


def _vllm_installed() -> bool:
    # tests/ is on sys.path, so this very folder passes for a namespace package named `vllm`
    # (no origin); the real one is a regular package. Never add an __init__.py here: it would
    # shadow the real vllm.
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


if not _vllm_installed():
    collect_ignore_glob = ["*.py"]
