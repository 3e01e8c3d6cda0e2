"""`poise train` in a fresh process that SIGKILLs itself at a chosen moment: the kill harness.

POISE_KILL=POINT:N kills the process at the N-th time (1-based) it reaches POINT:
  startup     the policy has loaded; the run folder is not touched yet
  eval        inside a held-out evaluation, its completions generated, nothing written
  generation  inside a step's (or an evaluation's) generation, after the engine returns
  scoring     inside scoring, the verifier's rewards computed
  update      inside the PPO update, after an optimizer step (weights changed in memory only)
  checkpoint  inside a checkpoint write: trainer_state.pt half written in the temp folder
  commit      a checkpoint folder was just renamed into place (later bookkeeping not done)
  metrics     inside a metrics.jsonl append: half the line written (a torn line)
Without POISE_KILL it is plain `poise train` (the test tasks registered).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import run_helpers  # noqa: E402,F401  (registers the test tasks)

POINTS = ("startup", "eval", "generation", "scoring", "update", "checkpoint", "commit",
          "metrics")
_count = 0


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _hit(target: int) -> bool:
    global _count
    _count += 1
    return _count == target


def _after(module, name: str, target: int) -> None:
    """Wrap module.name: call it, then die at its `target`-th return."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        if _hit(target):
            _die()
        return out
    setattr(module, name, wrapper)


def install(point: str, n: int) -> None:
    import torch

    import poise_probe.rollout.collect as collect
    import poise_probe.rundir.fs as fs
    import poise_probe.trainer as trainer
    from poise_probe.rollout.hf import HFEngine

    if point == "startup":
        _after(trainer, "load_policy", n)
    elif point == "eval":
        _after(trainer, "evaluate", n)
    elif point == "generation":
        _after(HFEngine, "generate", n)
    elif point == "scoring":
        _after(collect, "score_rollouts", n)
    elif point == "update":
        _after(torch.optim.AdamW, "step", n)
    elif point == "checkpoint":
        save = torch.save

        def torch_save(obj, f, *args, **kwargs):
            if str(f).endswith("trainer_state.pt") and _hit(n):
                save(obj, f, *args, **kwargs)
                size = os.path.getsize(f)
                os.truncate(f, size // 2)
                _die()
            return save(obj, f, *args, **kwargs)
        torch.save = torch_save
    elif point == "commit":
        replace = fs._replace_dir

        def replace_dir(src, dst):
            replace(src, dst)
            if Path(dst).parent.name == "checkpoints" and _hit(n):
                _die()
        fs._replace_dir = replace_dir
    elif point == "metrics":
        write = os.write

        def os_write(fd, data):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if target.endswith("metrics.jsonl") and _hit(n):
                write(fd, bytes(data)[: max(1, len(data) // 2)])
                os.fsync(fd)
                _die()
            return write(fd, data)
        os.write = os_write
    else:
        raise SystemExit(f"POISE_KILL point {point!r} is not one of {POINTS}")


if __name__ == "__main__":
    spec = os.environ.get("POISE_KILL")
    if spec:
        point, n = spec.split(":")
        install(point, int(n))
    from poise_probe.cli import main
    raise SystemExit(main(sys.argv[1:]))
