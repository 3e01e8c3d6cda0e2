"""TensorBoard and offline W&B mirror metrics.jsonl step for step, also across a resume."""
from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from poise_probe.config import load_config
from poise_probe.rundir import RunReader
from poise_probe.tracking import INSTALL_HINT, open_tracker, scalar_metrics
from run_helpers import tiny_overrides  # registers the test tasks too


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch, tmp_path):
    """W&B offline and quiet, its caches in tmp, and any server address a dead local port."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def train_tiny(model_dir, out, *, resume=False, stop_after=None, **extra):
    from poise_probe.trainer import train

    cfg = load_config(None, tiny_overrides(model_dir, **{
        "trainer.report_to": "[tensorboard, wandb]", "trainer.total_steps": 2, **extra}))
    return train(cfg, out, resume=resume, stop_after=stop_after)


def jsonl_scalars(run_dir: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl as {step: {key: value}}, the numbers only, lines of a step merged."""
    out: dict[int, dict[str, float]] = {}
    for rec in RunReader(run_dir).metrics():
        out.setdefault(rec["step"], {}).update(scalar_metrics(rec))
    return out


def tensorboard_scalars(run_dir: Path) -> dict[int, dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for ev in acc.Scalars(tag):
            assert tag not in out.get(ev.step, {}), f"{tag} logged twice at step {ev.step}"
            out.setdefault(ev.step, {})[tag] = ev.value
    return out


def wandb_records(path: Path):
    """The records of a .wandb file: a 7-byte header, then LevelDB-log chunks of 32 KiB blocks
    (crc32, length, type; FULL=1 or FIRST=2 .. LAST=4), each record a wandb protobuf."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:                                    # block trailer: zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            yield rec


def wandb_history(run_dir: Path) -> tuple[dict[str, dict], dict[int, dict[str, float]]]:
    """({run id: its config}, {step: {key: value}}) over every offline run segment in
    <run>/wandb."""
    ids, out = {}, {}
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                ids[rec.run.run_id] = {i.key: json.loads(i.value_json)
                                       for i in rec.run.config.update}
            elif kind == "history":
                step = rec.history.step.num
                assert step not in out, f"W&B holds step {step} twice"
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in rec.history.item}
                out[step] = {k: v for k, v in items.items() if not k.startswith("_")}
    return ids, out


def assert_mirrors(mirror: dict, truth: dict, rel: float) -> None:
    assert sorted(mirror) == sorted(truth)
    for step, values in truth.items():
        assert mirror[step].keys() == values.keys(), step
        for key, v in values.items():
            assert mirror[step][key] == pytest.approx(v, rel=rel, abs=1e-12), (step, key)


@pytest.mark.slow
def test_two_steps_mirror_metrics_jsonl(tiny_model_dir, tmp_path):
    out = train_tiny(tiny_model_dir, tmp_path / "run")
    truth = jsonl_scalars(out)
    assert sorted(truth) == [0, 1, 2] and "reward/mean" in truth[1] and "eval/accuracy" in truth[0]
    assert_mirrors(tensorboard_scalars(out), truth, rel=1e-6)   # TensorBoard keeps float32
    ids, history = wandb_history(out)
    (run_id, config), = ids.items()
    assert run_id == json.loads((out / "wandb" / "poise_wandb.json").read_text())["id"]
    assert config["algorithm"]["adv_estimator"] == "poise"
    assert config["trainer"]["report_to"] == ["tensorboard", "wandb"]
    assert_mirrors(history, truth, rel=1e-12)


@pytest.mark.slow
def test_resume_does_not_duplicate_steps(tiny_model_dir, tmp_path):
    """Killed after step 3 with its checkpoint at step 2: the resumed run redoes step 3; each
    mirror holds steps 0..4 once, under one W&B run id."""
    kw = {"trainer.total_steps": 4, "trainer.save_every": 2}
    out = train_tiny(tiny_model_dir, tmp_path / "run", stop_after=3, **kw)
    assert max(tensorboard_scalars(out)) == 3
    train_tiny(tiny_model_dir, out, resume=True, **kw)
    truth = jsonl_scalars(out)
    assert sorted(truth) == [0, 1, 2, 3, 4]

    def untimed(by_step):                   # wall-clock values differ between any two runs
        return {s: {k: v for k, v in m.items()
                    if not (k.startswith("timing_s/") or k.endswith("fit_s"))}
                for s, m in by_step.items()}
    tb = tensorboard_scalars(out)
    assert_mirrors(tb, truth, rel=1e-6)                # the killed run's step 3 was purged
    ids, history = wandb_history(out)
    assert len(ids) == 1 and len(list((out / "wandb").glob("offline-run-*"))) == 2
    # W&B keeps the killed run's step 3 (offline it cannot rewrite); a resumed run is
    # deterministic, so only the timings differ from metrics.jsonl
    assert_mirrors(untimed(history), untimed(truth), rel=1e-9)


def test_only_finite_numbers_are_mirrored():
    m = {"step": 3, "time": 1.0, "reward/mean": 0.5, "n": 4, "np": np.float32(0.25),
         "flag": True, "name": "x", "missing": None, "bad": float("nan"), "inf": math.inf}
    assert scalar_metrics(m) == {"reward/mean": 0.5, "n": 4.0, "np": 0.25}


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_missing_package_names_the_extra(package, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, package, None)    # `import package` now fails
    with pytest.raises(ModuleNotFoundError, match=f"'{package}' package.*" +
                       INSTALL_HINT.replace("[", r"\[").replace("]", r"\]")):
        open_tracker([package], tmp_path, config={}, wandb_project="p")


def test_missing_package_fails_before_training(monkeypatch, tmp_path, capsys):
    from poise_probe.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)
    rc = main(["train", "--output", str(tmp_path / "run"), "trainer.report_to=[wandb]",
               "model.path=/nonexistent"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "poise train: error:" in err and "pip install 'poise-probe[tracking]'" in err
    assert not (tmp_path / "run").exists()
