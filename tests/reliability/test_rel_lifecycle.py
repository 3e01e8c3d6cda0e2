"""A run's life: a resume checks everything before it writes anything, a run killed before its
first checkpoint resumes in place, one writer per run (an OS lock; the race tested), SIGTERM and
Ctrl-C stop a run cleanly and resumably, and `poise dashboard` takes its Streamlit child down
with it. Each refused case asserts its message and that the run folder did not change."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rel_helpers import (
    EXTRA,
    STEPS,
    assert_same_run,
    run_cmd,
    run_state,
    tiny_overrides,
    train_cmd,
    tree_hash,
)

from poise_probe.cli import main
from poise_probe.config import load_config
from poise_probe.rundir import RunLockedError, RunReader, RunWriter
from poise_probe.trainer import train


def _cfg(model_dir, **extra):
    return load_config(None, tiny_overrides(model_dir, **{"trainer.total_steps": 2, **extra}))


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A finished 2-step run with a checkpoint at each step (copied by the tests that use it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(_cfg(tiny_model_dir), out)
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


# -- a run killed before its first checkpoint -----------------------------------------------

def test_a_run_without_a_checkpoint_resumes_from_step_0_in_place(tiny_model_dir, tmp_path,
                                                                 caplog):
    extra = {"trainer.save_every": 5}
    train(_cfg(tiny_model_dir, **extra), tmp_path / "whole")
    out = tmp_path / "killed"
    train(_cfg(tiny_model_dir, **extra), out, stop_after=1)  # as if killed after step 1
    assert RunReader(out).checkpoints() == []
    with pytest.raises(FileExistsError, match="--resume .*restarts from step 0 in place"):
        train(_cfg(tiny_model_dir, **extra), out)
    with caplog.at_level("WARNING"):
        train(_cfg(tiny_model_dir, **extra), out, resume=True)
    assert "no checkpoint yet" in caplog.text and "restarting it from step 0 in place" in caplog.text
    assert_same_run(run_state(tmp_path / "whole"), run_state(out))
    meta = RunReader(out).meta
    assert meta["created"] and len(meta["resumes"]) == 1        # the run kept its identity


# -- a resume that fails writes nothing -------------------------------------------------------

def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


DAMAGE = {
    "policy weights truncated": (lambda ck: _truncate(ck / "policy" / "model.safetensors"),
                                 r"model\.safetensors is unreadable.*damaged"),
    "trainer state garbage": (lambda ck: (ck / "trainer_state.pt").write_bytes(b"not a pickle"),
                              r"trainer_state\.pt is unreadable.*damaged"),
    "probe bank truncated": (lambda ck: _truncate(ck / "probe_bank.safetensors"),
                             r"probe_bank\.safetensors is unreadable.*damaged"),
    "trainer state missing": (lambda ck: (ck / "trainer_state.pt").unlink(),
                              r"trainer_state\.pt is missing"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_fails_the_resume_and_changes_nothing(tiny_model_dir, run_copy,
                                                                   case):
    damage, message = DAMAGE[case]
    damage(run_copy / "checkpoints" / "step_000002")
    before = tree_hash(run_copy)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train(_cfg(tiny_model_dir, **{"trainer.total_steps": 3}), run_copy, resume=True)
    assert tree_hash(run_copy) == before


@pytest.mark.parametrize("override, key", [
    ({"data.tasks": "[test_even_start]"}, "data.tasks"),
    ({"algorithm.adv_estimator": "grpo"}, "algorithm.adv_estimator"),
    ({"trainer.seed": 7}, "trainer.seed"),
])
def test_a_resume_that_changes_what_the_run_is_is_refused(tiny_model_dir, run_copy, override,
                                                          key):
    before = tree_hash(run_copy)
    with pytest.raises(ValueError, match=f"would change what the run is \\({key}: .*nothing was "
                                         f"written.*--allow-change"):
        train(_cfg(tiny_model_dir, **override), run_copy, resume=True)
    assert tree_hash(run_copy) == before


def test_a_resume_with_another_model_fails_before_writing(tiny_model_dir, run_copy, tmp_path):
    """Allowed by --allow-change, a model of another shape still cannot load the checkpoint."""
    from transformers import Qwen3ForCausalLM

    from poise_probe.models import build_char_tokenizer, build_tiny_config

    tok = build_char_tokenizer()
    other = tmp_path / "wider"
    Qwen3ForCausalLM(build_tiny_config(len(tok), hidden_size=48, num_layers=2,
                                       intermediate_size=64, pad_token_id=tok.pad_token_id,
                                       eos_token_id=tok.eos_token_id)).save_pretrained(other)
    tok.save_pretrained(other)
    before = tree_hash(run_copy)
    with pytest.raises(ValueError, match="model.path"):
        train(_cfg(tiny_model_dir, **{"model.path": str(other)}), run_copy, resume=True)
    with pytest.raises(ValueError, match="do not match the model"):
        train(_cfg(tiny_model_dir, **{"model.path": str(other)}), run_copy, resume=True,
              allow_change=True)
    assert tree_hash(run_copy) == before


def test_allowed_changes_are_recorded_in_meta(tiny_model_dir, run_copy):
    train(_cfg(tiny_model_dir, **{"trainer.total_steps": 3, "optim.lr": 5e-4}), run_copy,
          resume=True)
    entry = RunReader(run_copy).meta["resumes"][-1]
    assert entry["config_changes"] == {"optim.lr": [1e-3, 5e-4], "trainer.total_steps": [2, 3]}
    train(_cfg(tiny_model_dir, **{"trainer.total_steps": 4, "optim.lr": 5e-4,
                                  "data.tasks": "[test_even_start]"}),
          run_copy, resume=True, allow_change=True)
    entry = RunReader(run_copy).meta["resumes"][-1]
    assert entry["config_changes"]["data.tasks"] == [["test_parity"], ["test_even_start"]]
    assert [m["step"] for m in RunReader(run_copy).metrics() if "reward/mean" in m] == [1, 2, 3, 4]


def test_cli_resume_takes_the_runs_own_config(run_copy, capsys):
    assert main(["train", "--output", str(run_copy), "--resume", "trainer.total_steps=3"]) == 0
    entry = RunReader(run_copy).meta["resumes"][-1]
    assert entry["config_changes"] == {"trainer.total_steps": [2, 3]}


def test_cli_refused_resume_is_one_line_and_writes_nothing(tiny_model_dir, run_copy, capsys):
    before = tree_hash(run_copy)
    rc = main(["train", "--output", str(run_copy), "--resume", "data.tasks=[test_even_start]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "would change what the run is" in err[0], err
    assert tree_hash(run_copy) == before


# -- one writer per run -------------------------------------------------------------------------

def _writer(path: Path, resume: bool = False) -> RunWriter:
    return RunWriter(path, config={"a": 1}, meta={"model": "m", "device": "cpu",
                                                  "algorithm": "poise"}, resume=resume)


def test_two_writers_released_together_one_wins(tmp_path):
    for attempt in range(20):
        path = tmp_path / f"race{attempt}"
        barrier, outcomes = threading.Barrier(2), []

        def start():
            barrier.wait()
            try:
                outcomes.append(_writer(path))
            except (RunLockedError, FileExistsError) as exc:
                outcomes.append(exc)
        threads = [threading.Thread(target=start) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [o for o in outcomes if isinstance(o, RunWriter)]
        assert len(winners) == 1, (attempt, outcomes)
        winners[0].close()


_HOLDER = ("import sys, time; from poise_probe.rundir import RunReader, RunWriter; "
           "r = RunReader(sys.argv[1]); "
           "w = RunWriter(sys.argv[1], config=r.config, meta={'model': 'm', 'device': 'cpu', "
           "'algorithm': 'poise'}, resume=True); print('ready', flush=True); time.sleep(600)")


def test_a_live_writer_in_another_process_holds_the_run_until_it_dies(run_copy, capsys):
    path = run_copy
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        before = tree_hash(path)
        with pytest.raises(RunLockedError, match=f"written by another process \\(pid "
                                                 f"{holder.pid} on"):
            _writer(path, resume=True)
        rc = main(["train", "--output", str(path), "--resume"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "one writer per run" in err[0], err
        assert tree_hash(path) == before
    finally:
        holder.kill()
        holder.wait()
    _writer(path, resume=True).close()       # the lock died with its process


def test_output_that_is_a_file_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    rc = main(["train", "--output", str(target)] + tiny_overrides(tiny_model_dir))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is a file, not a folder" in err[0], err
    assert target.read_text() == "keep me"


# -- signals ------------------------------------------------------------------------------------

def _start_and_signal(model_dir, out: Path, sig: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("POISE_KILL", None)
    proc = subprocess.Popen(train_cmd(model_dir, out, steps=STEPS, extra=EXTRA), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_000002").exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_stop_the_run_resumably(reference, tiny_model_dir, tmp_path, sig,
                                                   code):
    out = tmp_path / "stopped"
    done = _start_and_signal(tiny_model_dir, out, sig)
    assert done.returncode == code, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == \
        f"poise train: {signal.Signals(sig).name}: stopped"
    assert "--resume` continues from it" in done.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "stopped" and status["error"] is None
    assert RunReader(out).inferred_status() == "stopped"
    final = run_cmd(train_cmd(tiny_model_dir, out, steps=STEPS, extra=EXTRA, resume=True))
    assert final.returncode == 0, final.stderr[-2000:]
    assert_same_run(reference, run_state(out))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
def test_sigterm_to_the_dashboard_stops_its_streamlit_child(run_copy):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "poise_probe", "dashboard", str(run_copy),
                             "--no-browser", "--port", str(port), "--host", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None and time.time() < deadline, "streamlit did not start"
            time.sleep(0.2)
        kids = _children(proc.pid)
        assert kids, "no streamlit child"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
        deadline = time.time() + 10
        while any(_alive(k) for k in kids) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(k) for k in kids), "streamlit was orphaned"
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "the port is still served"
    finally:
        if proc.poll() is None:
            proc.kill()
        for k in _children(proc.pid):
            os.kill(k, signal.SIGKILL)
