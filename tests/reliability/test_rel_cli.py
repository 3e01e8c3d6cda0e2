"""The command line under bad input and interruption: every error is one line on stderr with
exit code 2 (a signal: 128 + its number, Ctrl-C 130), `--verbose` shows the traceback, and what
was already on disk is unchanged (hashes before and after)."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from rel_helpers import tiny_overrides, tree_hash

from poise_probe import cli
from poise_probe.cli import main
from poise_probe.config import load_config
from poise_probe.rundir import RunReader
from poise_probe.trainer import train


def _one_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def small_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "run"
    train(load_config(None, tiny_overrides(tiny_model_dir, **{"trainer.total_steps": 2})), out)
    return out


@pytest.mark.parametrize("override, says", [
    ("optim.lr=nan", "optim.lr"),
    ("optim.lr=inf", "optim.lr"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("probe.snapshot_every=0", "probe.snapshot_every"),
    ("probe.pca_prompt=0", "probe.pca_prompt"),
    ("data.task_kwargs={arith: {nope: 1}}", "unknown knob(s) ['nope']"),
])
def test_bad_config_values_are_one_line_naming_the_field(tiny_model_dir, tmp_path, capsys,
                                                         override, says):
    extra = ["data.tasks=[arith]"] if "task_kwargs" in override else []
    args = ["train", "--output", str(tmp_path / "r")] + tiny_overrides(tiny_model_dir) + extra
    assert main(args + [override]) == 2
    line = _one_line(capsys)
    assert line.startswith("poise train: error: ") and says in line, line
    assert not (tmp_path / "r").exists()                      # nothing was created


def test_unexpected_errors_are_one_line_and_verbose_shows_the_traceback(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("the engine fell over\nsecond line of detail")
    monkeypatch.setattr(cli, "_run_config", boom)
    assert main(["config", "show"]) == 2
    line = _one_line(capsys)
    assert line == ("poise config: error: RuntimeError: the engine fell over (run `poise "
                    "--verbose ...` for the traceback)")
    with pytest.raises(RuntimeError, match="fell over"):
        main(["--verbose", "config", "show"])


def test_ctrl_c_is_exit_130_and_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_run_config", interrupted)
    assert main(["config", "show"]) == 130
    assert _one_line(capsys) == "poise config: SIGINT: stopped"


def test_a_corrupted_model_is_one_line(tiny_model_dir, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 3)
    before = tree_hash(broken)
    assert main(["eval", "--model", str(broken), "--n", "1", "--samples", "1"]) == 2
    line = _one_line(capsys)
    assert "the weights could not be loaded" in line and "truncated or corrupted" in line, line
    assert tree_hash(broken) == before


def test_a_model_that_is_not_a_causal_lm_is_one_line(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    from poise_probe.models import build_char_tokenizer
    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(folder)
    build_char_tokenizer().save_pretrained(folder)
    capsys.readouterr()                                     # save_pretrained's own bar
    assert main(["eval", "--model", str(folder), "--n", "1"]) == 2
    assert "which is not a causal LM" in _one_line(capsys)


def test_capture_refuses_a_file_and_a_run_folder_as_out(small_run, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep")
    assert main(["probe", "capture", "--tasks", "arith", "--out", str(target)]) == 2
    assert "--out" in _one_line(capsys) and target.read_text() == "keep"
    before = tree_hash(small_run)
    assert main(["probe", "capture", "--tasks", "arith", "--out", str(small_run)]) == 2
    line = _one_line(capsys)
    assert "is a training run directory" in line and f"{small_run}-capture" in line
    assert tree_hash(small_run) == before


def test_probe_sweep_on_a_run_folder_shows_the_capture_command(small_run, tmp_path, capsys):
    assert main(["probe", "sweep", "--data", str(small_run), "--out", str(tmp_path / "s")]) == 2
    line = _one_line(capsys)
    assert "training run directory" in line and f"poise probe capture --run {small_run}" in line


def test_train_output_that_is_a_file(tiny_model_dir, tmp_path, capsys):
    target = tmp_path / "f"
    target.write_text("x")
    assert main(["train", "--output", str(target)] + tiny_overrides(tiny_model_dir)) == 2
    line = _one_line(capsys)
    assert "is a file, not a folder" in line and "Errno" not in line


def test_no_recipe_and_no_overrides_warns(monkeypatch, capsys, caplog):
    monkeypatch.setattr(cli, "_train_with_progress", lambda cfg, output, **kw: 0)
    with caplog.at_level("WARNING"):
        assert main(["train"]) == 0
    assert "no --config and no overrides: training the built-in defaults" in caplog.text


def test_an_empty_recipe_warns(tmp_path, caplog):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with caplog.at_level("WARNING"):
        load_config(empty)
    assert "is empty: every value not overridden is a default" in caplog.text


def test_a_full_disk_during_a_checkpoint_loses_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """ENOSPC while the step-2 checkpoint is written: the run fails with the error, the step-1
    checkpoint and every record are untouched, no temp folder is left, and a resume (disk
    freed) finishes the run."""
    import poise_probe.checkpoint as ckpt

    out = tmp_path / "full-disk"
    cfg = load_config(None, tiny_overrides(tiny_model_dir, **{"trainer.total_steps": 3}))
    train(cfg, out, stop_after=1)
    before = tree_hash(out / "checkpoints")
    real_save = torch.save

    def no_space(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    monkeypatch.setattr(ckpt.torch, "save", no_space)
    with pytest.raises(OSError, match="No space left on device"):
        train(cfg, out, resume=True)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert tree_hash(out / "checkpoints") == before              # step 1 intact, no temp left
    status = RunReader(out).status
    assert status["status"] == "failed" and "No space left" in status["error"]
    train(cfg, out, resume=True)
    assert RunReader(out).checkpoints()[-1][0] == 3
    assert [m["step"] for m in RunReader(out).metrics() if "reward/mean" in m] == [1, 2, 3]


def test_a_non_finite_policy_is_never_checkpointed(tiny_model_dir, tmp_path):
    out = tmp_path / "nan"
    cfg = load_config(None, tiny_overrides(tiny_model_dir, **{"trainer.total_steps": 2}))
    train(cfg, out, stop_after=1)
    from poise_probe.checkpoint import save_checkpoint
    from poise_probe.models import load_policy
    from poise_probe.rundir import RunWriter
    from poise_probe.state import TrainState

    model, tok = load_policy(tiny_model_dir)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    opt = torch.optim.AdamW(model.parameters())
    state = TrainState(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                       None, None, step=2)
    writer = RunWriter(out, config=cfg.to_dict(), meta={"model": "m", "device": "cpu",
                                                        "algorithm": "poise"}, resume=True)
    before = tree_hash(out / "checkpoints")
    with pytest.raises(FloatingPointError, match="NaN or inf .*not written .*step 1"):
        save_checkpoint(writer, state, tok)
    writer.close()
    assert tree_hash(out / "checkpoints") == before
    assert Path(out / "checkpoints" / "step_000001").is_dir()


@pytest.mark.parametrize("text, says", [
    ("optim:\n  lrr: 1.0e-5\n", "unknown config key optim.lrr (did you mean optim.lr?)"),
    ("optimm:\n  lr: 1.0e-5\n", "unknown config section"),
    ("optim:\n  lr: fast\n", "optim.lr must be a number; got 'fast'"),
    ("optim:\n  betas: 0.9\n", "optim.betas must be a list"),
    ("trainer:\n  total_steps: 2.5\n", "trainer.total_steps must be an integer"),
    ("optim: [1, 2]\n", "must be a mapping"),
    ("optim:\n  lr: [unclosed\n", "is not valid YAML: expected ',' or ']'"),
])
def test_a_bad_recipe_is_one_line_naming_the_key(tmp_path, capsys, text, says):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    assert main(["train", "--config", str(recipe), "--output", str(tmp_path / "r")]) == 2
    line = _one_line(capsys)
    assert says in line, line
    assert recipe.read_text() == text and not (tmp_path / "r").exists()


def test_an_unknown_task_is_one_line_and_creates_nothing(tiny_model_dir, tmp_path, capsys):
    args = ["train", "--output", str(tmp_path / "r")] + tiny_overrides(tiny_model_dir)
    assert main(args + ["data.tasks=[no_such_task]"]) == 2
    line = _one_line(capsys)
    assert "unknown task 'no_such_task'" in line and "known:" in line, line
    assert not (tmp_path / "r").exists()
