"""tests/vllm_engine run only where vllm is installed (`make test-vllm`, in .venv-vllm).

The core environment has no vllm: there pytest does not even collect this folder, so the core
run neither fails on the import nor reports skips. The folder is not named `vllm`: pytest puts
tests/ on sys.path, where a folder named like a package passes for it (TRL's vLLM check then
reads the folder as an installed vllm without a version).
"""
from __future__ import annotations

import importlib.util


def _vllm_installed() -> bool:
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


if not _vllm_installed():
    collect_ignore_glob = ["*.py"]
