"""Run directory contract: atomic files, live-readable metrics, typed rollouts, safe resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from poise_probe import __version__, rundir
from poise_probe.rundir import (
    ROLLOUT_COLUMNS,
    SCHEMA_VERSION,
    RunReader,
    RunWriter,
    atomic_write_json,
    atomic_write_text,
    find_runs,
    step_name,
)

META = {"model": "tiny-reasoner", "device": "cpu", "algorithm": "poise", "git_commit": None}
CONFIG = {"algorithm": {"adv_estimator": "poise"}, "num_generations": 2, "lr": 1e-6}


def make_writer(run_dir, **kwargs) -> RunWriter:
    return RunWriter(run_dir, config=CONFIG, meta=META, **kwargs)


def make_rows(step: int = 0, n_groups: int = 2, k: int = 2) -> dict[str, list]:
    """n_groups prompts x k rollouts; entropies vary in length and come as float64."""
    n = n_groups * k
    return {
        "step": [step] * n,
        "prompt_id": [f"p{i // k}" for i in range(n)],
        "group_id": [i // k for i in range(n)],
        "domain": ["math"] * n,
        "data_source": ["arith"] * n,
        "rollout_idx": [i % k for i in range(n)],
        "prompt": [f"Compute {i // k}+1." for i in range(n)],
        "completion": [f"<answer>{i}</answer> é" for i in range(n)],
        "reward": [float(i % 2) for i in range(n)],
        "probe_pred": [float("nan")] + [0.25 * i for i in range(1, n)],
        "baseline": [0.5] * n,
        "advantage": [float(i % 2) - 0.5 for i in range(n)],
        "token_entropies": [np.linspace(0, 1, i + 1) for i in range(n)],
        "num_tokens": [i + 1 for i in range(n)],
        "truncated": [i == n - 1 for i in range(n)],
    }


def strict_json(line: str):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    return json.loads(line, parse_constant=refuse)


# -- atomic writes ----------------------------------------------------------------------------

def test_atomic_write_failing_rename_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "status.json"
    atomic_write_json(target, {"v": 1})

    def crash(src, dst):
        raise OSError("simulated crash before rename")
    monkeypatch.setattr(rundir.fs.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_text(target, "partial")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # temp file removed


def test_killed_writer_leaves_old_files_and_reads_as_crashed(tmp_path):
    """A writer killed between temp write and rename: old table intact, status crashed."""
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os
        from poise_probe import rundir
        w = rundir.RunWriter({str(run)!r}, config={{}}, meta={META!r})
        w.write_rollouts(0, make_rows(0))
        w.log_metrics(0, {{"reward/mean": 0.5}})
        rundir.fs.os.replace = lambda src, dst: os._exit(3)   # die right before the rename
        w.write_rollouts(0, make_rows(0, n_groups=5))
    """)
    source = f"import numpy as np\n{_source_of_make_rows()}\n{script}"
    proc = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3, proc.stderr

    reader = RunReader(run)
    assert reader.status["status"] == "running"
    assert reader.inferred_status() == "crashed"  # its pid is gone
    assert reader.rollout_steps() == [0]
    assert len(reader.rollouts(0)) == 4  # the old table, not the 10-row one
    leftovers = [p.name for p in (run / "rollouts").iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and ".tmp-" in leftovers[0]

    writer = make_writer(run, resume=True)  # resume cleans the temp file
    assert sorted(p.name for p in (run / "rollouts").iterdir()) == ["step_000000.parquet"]
    assert reader.inferred_status() == "running"
    writer.close()


def _source_of_make_rows() -> str:
    import inspect
    return inspect.getsource(make_rows)


# -- metrics ----------------------------------------------------------------------------------

def test_metrics_nan_and_numpy_values_written_as_strict_json(tmp_path):
    with make_writer(tmp_path / "run") as w:
        w.log_metrics(np.int64(3), {"reward/mean": np.float32(0.5), "probe/mae": float("nan"),
                                    "adv/max": float("inf"), "n": np.int64(7), "ok": np.bool_(True),
                                    "note": "x", "none": None})
    line = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0]
    record = strict_json(line)
    assert record["step"] == 3 and record["reward/mean"] == 0.5
    assert record["probe/mae"] is None and record["adv/max"] is None
    assert record["n"] == 7 and record["ok"] is True and isinstance(record["time"], float)
    assert list(record)[0] == "step" and list(record)[-1] == "time"


@pytest.mark.parametrize("metrics, error, match", [
    ({"reward/hist": [1, 2]}, TypeError, "'reward/hist'"),
    ({"cfg": {"a": 1}}, TypeError, "'cfg'"),
    ({"step": 1}, ValueError, "reserved"),
    ({1: 0.5}, TypeError, "strings"),
])
def test_log_metrics_rejects_bad_values_naming_the_key(tmp_path, metrics, error, match):
    w = make_writer(tmp_path / "run")
    with pytest.raises(error, match=match):
        w.log_metrics(0, metrics)
    with pytest.raises(ValueError, match=">= 0"):
        w.log_metrics(-1, {})


def test_torn_last_line_skipped_then_read_once_complete(tmp_path):
    w = make_writer(tmp_path / "run")
    for step in range(3):
        w.log_metrics(step, {"reward/mean": step / 10})
    path = tmp_path / "run" / "metrics.jsonl"
    reader = RunReader(tmp_path / "run")
    assert [r["step"] for r in reader.new_metrics()] == [0, 1, 2]

    with open(path, "ab") as f:
        f.write(b'{"step": 3, "reward/me')  # a writer caught mid-line
    assert [r["step"] for r in reader.metrics()] == [0, 1, 2]
    assert reader.new_metrics() == []
    with open(path, "ab") as f:
        f.write(b'an": 0.3}\n')
    assert [r["step"] for r in reader.new_metrics()] == [3]
    assert reader.new_metrics() == []
    assert reader.metrics_restarted is False


def test_new_metrics_returns_only_appended_records(tmp_path):
    w = make_writer(tmp_path / "run")
    reader = RunReader(tmp_path / "run")
    assert reader.new_metrics() == []  # no file yet
    w.log_metrics(0, {"a": 1})
    w.log_metrics(1, {"a": 2})
    assert [r["a"] for r in reader.new_metrics()] == [1, 2]
    w.log_metrics(2, {"a": 3})
    assert [r["a"] for r in reader.new_metrics()] == [3]
    assert reader.new_metrics() == []
    frame = reader.metrics_frame()
    assert list(frame["step"]) == [0, 1, 2] and list(frame["a"]) == [1, 2, 3]


def test_new_metrics_restarts_after_rewrite(tmp_path):
    w = make_writer(tmp_path / "run")
    for step in range(4):
        w.log_metrics(step, {"a": step})
    reader = RunReader(tmp_path / "run")
    assert len(reader.new_metrics()) == 4
    w.truncate_after(1)
    w.log_metrics(2, {"a": 20})
    assert [r["a"] for r in reader.new_metrics()] == [0, 1, 20]
    assert reader.metrics_restarted is True
    w.log_metrics(3, {"a": 30})
    assert [r["a"] for r in reader.new_metrics()] == [30]
    assert reader.metrics_restarted is False


def test_corrupt_middle_line_raises_with_path_and_line(tmp_path):
    w = make_writer(tmp_path / "run")
    w.log_metrics(0, {"a": 1})
    path = tmp_path / "run" / "metrics.jsonl"
    with open(path, "ab") as f:
        f.write(b"garbage\n")
    w.log_metrics(1, {"a": 2})
    reader = RunReader(tmp_path / "run")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        reader.metrics()
    assert [r["a"] for r in reader.metrics(errors="skip")] == [1, 2]


# -- creating, resuming, status ---------------------------------------------------------------

def test_new_run_files_and_meta(tmp_path):
    run = tmp_path / "run"
    make_writer(run).close()
    reader = RunReader(run)
    meta = reader.meta
    assert meta["schema_version"] == SCHEMA_VERSION and meta["version"] == __version__
    assert meta["model"] == "tiny-reasoner" and meta["algorithm"] == "poise"
    assert meta["run_name"] == "run" and meta["pid"] == os.getpid() and "created" in meta
    assert reader.config == CONFIG
    assert reader.status["status"] == "finished" and reader.inferred_status() == "finished"


def test_refuses_existing_run_without_resume(tmp_path):
    run = tmp_path / "run"
    w = make_writer(run)
    w.log_metrics(0, {"a": 1})
    w.close()
    with pytest.raises(FileExistsError, match=r"--resume.*--output") as err:
        make_writer(run)
    assert str(run) in str(err.value)
    with pytest.raises(FileNotFoundError, match="drop --resume"):
        make_writer(tmp_path / "other", resume=True)

    resumed = make_writer(run, resume=True)
    assert RunReader(run).status["status"] == "running"
    assert len(RunReader(run).metrics()) == 1  # files kept
    assert len(RunReader(run).meta["resumes"]) == 1
    resumed.close()


def test_resume_refused_while_writer_alive(tmp_path):
    run = tmp_path / "run"
    make_writer(run)
    status = json.loads((run / "status.json").read_text())
    status["pid"] = os.getppid()  # a live process that is not us
    status["started"] = "2999-01-01T00:00:00+00:00"
    atomic_write_json(run / "status.json", status)
    with pytest.raises(RuntimeError, match="still being written"):
        make_writer(run, resume=True)


def test_meta_validation(tmp_path):
    with pytest.raises(ValueError, match="algorithm"):
        RunWriter(tmp_path / "a", config={}, meta={"model": "m", "device": "cpu"})
    with pytest.raises(ValueError, match="schema_version"):
        RunWriter(tmp_path / "b", config={}, meta={**META, "schema_version": 2})
    with pytest.raises(TypeError, match=r"config\.x"):
        RunWriter(tmp_path / "c", config={"x": object()}, meta=META)
    assert not (tmp_path / "c" / "meta.json").exists()


def test_context_manager_marks_failed_and_reraises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with make_writer(tmp_path / "run") as w:
            w.set_status("running", last_step=4)
            raise RuntimeError("boom")
    status = RunReader(tmp_path / "run").status
    assert status["status"] == "failed" and status["error"] == "RuntimeError: boom"
    assert status["last_step"] == 4
    with pytest.raises(RuntimeError, match="closed"):
        w.log_metrics(5, {})


def test_stale_status_counts_as_crashed(tmp_path):
    make_writer(tmp_path / "run")
    reader = RunReader(tmp_path / "run")
    assert reader.inferred_status() == "running"
    status = reader.status
    status["updated"] = "2000-01-01T00:00:00+00:00"
    atomic_write_json(tmp_path / "run" / "status.json", status)
    assert reader.inferred_status(stale_after=60) == "crashed"


# -- truncate, checkpoints --------------------------------------------------------------------

def test_truncate_after_drops_later_steps(tmp_path):
    w = make_writer(tmp_path / "run")
    for step in range(4):
        w.log_metrics(step, {"a": step})
        w.write_rollouts(step, make_rows(step))
        w.write_probe_snapshot(step, {"math": {"coef": np.ones(2)}}, {})
        w.write_eval(step, {"acc": step})
        with w.checkpoint(step) as d:
            (d / "w.bin").write_bytes(b"x")
    w.set_status("running", last_step=3)
    w.truncate_after(1)
    reader = RunReader(tmp_path / "run")
    assert [r["step"] for r in reader.metrics()] == [0, 1]
    assert reader.rollout_steps() == [0, 1]
    assert reader.probe_snapshot_steps() == [0, 1]
    assert reader.eval_steps() == [0, 1]
    assert [s for s, _ in reader.checkpoints()] == [0, 1, 2, 3]  # kept unless asked
    assert reader.status["last_step"] == 1
    w.truncate_after(2, checkpoints=True)
    assert [s for s, _ in reader.checkpoints()] == [0, 1, 2]


def test_checkpoint_commits_only_on_success(tmp_path):
    w = make_writer(tmp_path / "run")
    assert w.latest_checkpoint() is None
    with pytest.raises(KeyError):
        with w.checkpoint(5) as d:
            (d / "model.bin").write_bytes(b"half")
            assert not (tmp_path / "run" / "checkpoints" / step_name(5)).exists()
            raise KeyError("save failed")
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []  # temp cleaned
    assert w.latest_checkpoint() is None

    with w.checkpoint(5) as d:
        (d / "model.bin").write_bytes(b"v1")
    with w.checkpoint(5) as d:  # same step again replaces it whole
        (d / "other.bin").write_bytes(b"v2")
    step, path = w.latest_checkpoint()
    assert step == 5 and path.name == "step_000005"
    assert sorted(p.name for p in path.iterdir()) == ["other.bin"]


def test_keep_last_deletes_older_checkpoints(tmp_path):
    w = make_writer(tmp_path / "run", keep_last=2)
    for step in (10, 20, 30):
        with w.checkpoint(step) as d:
            (d / "s").write_text(str(step))
    assert [s for s, _ in RunReader(tmp_path / "run").checkpoints()] == [20, 30]
    assert w.latest_checkpoint()[0] == 30
    with pytest.raises(ValueError, match="keep_last"):
        make_writer(tmp_path / "other", keep_last=0)


# -- rollouts, probes, eval -------------------------------------------------------------------

def test_rollouts_round_trip(tmp_path):
    w = make_writer(tmp_path / "run")
    rows = make_rows(3)
    rows["reward/format"] = [1.0, 0.0, 1.0, 1.0]  # extra columns are kept
    path = w.write_rollouts(3, rows)
    assert path.name == "step_000003.parquet"
    w.write_rollouts(4, pd.DataFrame(make_rows(4)).drop(columns="step"))  # step filled in

    reader = RunReader(tmp_path / "run")
    assert reader.rollout_steps() == [3, 4]
    df = reader.rollouts(3)
    assert list(df.columns) == [*ROLLOUT_COLUMNS, "reward/format"]
    assert df["prompt_id"].tolist() == rows["prompt_id"]
    assert df["completion"].tolist() == rows["completion"]
    assert np.isnan(df["probe_pred"].iloc[0]) and df["probe_pred"].iloc[1] == 0.25
    assert df["truncated"].tolist() == rows["truncated"]
    for got, want in zip(df["token_entropies"], rows["token_entropies"]):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want.astype(np.float32))
    assert reader.rollouts()["step"].tolist() == [4] * 4  # latest

    both = reader.all_rollouts(columns=["step", "reward/format"])
    assert both["step"].tolist() == [3] * 4 + [4] * 4
    assert both["reward/format"].iloc[:4].tolist() == rows["reward/format"]
    assert both["reward/format"].iloc[4:].isna().all()
    with pytest.raises(FileNotFoundError, match="available steps: 3, 4"):
        reader.rollouts(7)
    with pytest.raises(KeyError, match="nope"):
        reader.rollouts(3, columns=["nope"])


@pytest.mark.parametrize("change, error, match", [
    (lambda r: r.pop("advantage"), ValueError, "'advantage'"),
    (lambda r: r.update(reward=["high"] * 4), TypeError, "'reward'"),
    (lambda r: r.update(group_id=[0.5] * 4), TypeError, "'group_id'"),
    (lambda r: r.update(completion=[None, "a", "b", "c"]), ValueError, "'completion'"),
    (lambda r: r.update(rollout_idx=[0] * 4), ValueError, "rollout_idx"),
    (lambda r: r.update(step=[9] * 4), ValueError, "step"),
])
def test_write_rollouts_rejects_bad_tables(tmp_path, change, error, match):
    w = make_writer(tmp_path / "run")
    rows = make_rows(0)
    change(rows)
    with pytest.raises(error, match=match):
        w.write_rollouts(0, rows)
    assert RunReader(tmp_path / "run").rollout_steps() == []


def test_probe_snapshot_round_trip_exact(tmp_path):
    w = make_writer(tmp_path / "run")
    rng = np.random.default_rng(0)
    tensors = {
        "math": {"coef": rng.normal(size=(7,)), "scaler.mean": rng.normal(size=(7,)).astype(
            np.float32), "n_seen": np.array([123], dtype=np.int64)},
        "code": {"coef": rng.normal(size=(3, 2))[:, 0]},  # non-contiguous view
    }
    path = w.write_probe_snapshot(12, tensors, {"alpha": 1.0, "feature_names": ["h", "ent"],
                                                "ev": float("nan")})
    assert path.name == "step_000012"
    assert sorted(p.name for p in path.iterdir()) == ["code.safetensors", "math.safetensors",
                                                      "meta.json"]
    got, meta = RunReader(tmp_path / "run").probe_snapshot(12)
    assert meta == {"alpha": 1.0, "feature_names": ["h", "ent"], "ev": None}
    assert got.keys() == tensors.keys()
    for bucket, named in tensors.items():
        assert got[bucket].keys() == named.keys()
        for name, array in named.items():
            assert got[bucket][name].dtype == array.dtype
            np.testing.assert_array_equal(got[bucket][name], array)
    with pytest.raises(ValueError, match="bucket name"):
        w.write_probe_snapshot(13, {"../x": {"a": np.ones(1)}}, {})
    with pytest.raises(TypeError, match="math/w"):
        w.write_probe_snapshot(13, {"math": {"w": [1.0]}}, {})


def test_eval_report_round_trip(tmp_path):
    w = make_writer(tmp_path / "run")
    w.write_eval(100, {"overall": {"accuracy": np.float64(0.5), "ece": float("nan")}})
    reader = RunReader(tmp_path / "run")
    assert reader.eval_steps() == [100]
    assert reader.eval_report(100) == {"overall": {"accuracy": 0.5, "ece": None}}
    assert reader.eval_report() == reader.eval_report(100)


# -- discovery and reader errors --------------------------------------------------------------

def test_find_runs(tmp_path):
    for name in ("b", "a", "group/c"):
        make_writer(tmp_path / name).close()
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / ".hidden" / "x").mkdir(parents=True)
    (tmp_path / ".hidden" / "x" / "meta.json").write_text("{}")
    assert find_runs(tmp_path) == [tmp_path / "a", tmp_path / "b", tmp_path / "group" / "c"]
    assert find_runs(tmp_path / "a") == [tmp_path / "a"]
    with pytest.raises(FileNotFoundError):
        find_runs(tmp_path / "missing")


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RunReader(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="not a run directory.*find_runs"):
        RunReader(tmp_path / "plain")
    run = tmp_path / "run"
    make_writer(run).close()
    meta = json.loads((run / "meta.json").read_text())
    atomic_write_json(run / "meta.json", {**meta, "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(ValueError, match="newer.*upgrade poise_probe"):
        RunReader(run)
    (run / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        RunReader(run)


def test_step_name():
    assert step_name(12) == "step_000012"
    assert step_name(1234567) == "step_1234567"
    with pytest.raises(TypeError):
        step_name(1.0)
