"""What the reliability suite shares: folder hashes, `poise train` in a fresh process (with the
kill runner), and the state of a finished run to compare two runs bit for bit."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from run_helpers import tiny_overrides  # noqa: E402  (registers the test tasks)

from poise_probe.rundir import RunReader  # noqa: E402

KILL_RUNNER = Path(__file__).with_name("kill_runner.py")
#: the runs the harness kills and stops: 6 steps, a checkpoint every 2, an evaluation every 3
STEPS = 6
EXTRA = {"trainer.save_every": 2, "data.eval_every": 3}
#: the full (soak) variants run when this is set: POISE_RELIABILITY_FULL=1 pytest tests/reliability
FULL = os.environ.get("POISE_RELIABILITY_FULL") == "1"


def tree_hash(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root` (folders as "dir"; a single file
    hashes as {name: sha256}): two equal hashes mean nothing was written, renamed or removed."""
    root = Path(root)
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def train_cmd(model_dir, out, *, steps: int, resume: bool = False, extra: dict | None = None,
              args: tuple[str, ...] = ()) -> list[str]:
    """`poise train` through the kill runner (it kills itself when POISE_KILL says so)."""
    cmd = [sys.executable, str(KILL_RUNNER), "train", "--output", str(out), *args]
    if resume:
        cmd.append("--resume")
    return cmd + tiny_overrides(model_dir, **{"trainer.total_steps": steps, **(extra or {})})


def run_cmd(cmd: list[str], kill: str | None = None, timeout: float = 600,
            **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("POISE_KILL", None)
    if kill:
        env["POISE_KILL"] = kill
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def _timing(key: str) -> bool:   # wall-clock values differ between any two runs
    return key.startswith("timing_s/") or key.endswith("fit_s") or key == "time"


def run_state(run_dir: Path) -> dict:
    """Everything a run leaves that must not depend on kills: the last checkpoint (weights,
    optimizer, probe bank), metrics rows without timings, rollout tables, probe snapshots and
    evaluation reports."""
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as load_t

    reader = RunReader(run_dir)
    step, ckpt = reader.checkpoints()[-1]
    trainer_state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    rollouts = {}
    for s in reader.rollout_steps():
        table = pq.read_table(run_dir / "rollouts" / f"step_{s:06d}.parquet").to_pydict()
        rollouts[s] = table
    probes = {}
    for folder in sorted((run_dir / "probes").glob("step_*")):
        for f in sorted(folder.glob("*.safetensors")):
            probes[f"{folder.name}/{f.name}"] = load_file(str(f))
    evals = {f.name: f.read_text() for f in sorted((run_dir / "eval").glob("step_*.json"))}
    metrics = [{k: v for k, v in m.items() if not _timing(k)} for m in reader.metrics()]
    return {"step": step, "weights": load_t(str(ckpt / "policy" / "model.safetensors")),
            "optimizer": trainer_state["optimizer"], "data": trainer_state["data"],
            "bank": load_file(str(ckpt / "probe_bank.safetensors")), "metrics": metrics,
            "rollouts": rollouts, "probes": probes, "evals": evals}


def assert_same_run(a: dict, b: dict) -> None:
    """Two `run_state`s are equal bit for bit (and no step is duplicated or missing)."""
    assert a["step"] == b["step"]
    steps = [m["step"] for m in b["metrics"]]
    assert steps == [m["step"] for m in a["metrics"]], "metrics steps differ"
    assert a["metrics"] == b["metrics"]
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    _assert_nested_equal(a["optimizer"], b["optimizer"], "optimizer")
    assert a["data"] == b["data"]
    for name in ("bank",):
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            np.testing.assert_array_equal(a[name][k], b[name][k], err_msg=k)
    assert a["rollouts"].keys() == b["rollouts"].keys()
    for s in a["rollouts"]:
        ta, tb = a["rollouts"][s], b["rollouts"][s]
        assert ta.keys() == tb.keys()
        for col in ta:
            assert ta[col] == tb[col] or _nan_equal(ta[col], tb[col]), (s, col)
    assert a["probes"].keys() == b["probes"].keys()
    for k in a["probes"]:
        for name in a["probes"][k]:
            np.testing.assert_array_equal(a["probes"][k][name], b["probes"][k][name])
    assert a["evals"] == b["evals"]


def _nan_equal(x, y) -> bool:
    try:
        return np.array_equal(np.asarray(x, dtype=object).astype(float),
                              np.asarray(y, dtype=object).astype(float), equal_nan=True)
    except (TypeError, ValueError):
        return False


def _assert_nested_equal(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_nested_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_nested_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where
