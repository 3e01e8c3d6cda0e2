"""`poise --help` and every subcommand's: each option explained, no empty defaults printed."""
from __future__ import annotations

import argparse

import pytest

from poise_probe.cli import build_parser, main


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("poise",)):
    """(command path, parser) for `parser` and every subparser below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*path, name))


PARSERS = list(walk(build_parser()))


def test_the_walk_reaches_every_command():
    names = {" ".join(p) for p, _ in PARSERS}
    assert {"poise train", "poise eval", "poise demo", "poise config", "poise dashboard",
            "poise probe capture", "poise probe sweep", "poise probe calibrate",
            "poise probe transfer"} <= names


@pytest.mark.parametrize("path, parser", PARSERS, ids=lambda x: " ".join(x) if
                         isinstance(x, tuple) else "")
def test_every_option_has_help_and_no_none_default(path, parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:            # the subcommand list
                assert (choice.help or "").strip(), f"{' '.join(path)} {choice.dest}: no help"
            continue
        name = "/".join(action.option_strings) or action.dest
        assert (action.help or "").strip(), f"{' '.join(path)} {name}: no help"
    text = " ".join(parser.format_help().split())      # the same at any terminal width
    assert "(default: None)" not in text
    assert "(default: [])" not in text and "(default: False)" not in text


def test_required_options_print_no_default():
    sweep = " ".join(dict(PARSERS)[("poise", "probe", "sweep")].format_help().split())
    assert "--out OUT study directory (tables and figures go here) --alphas" in sweep
    assert "grouped CV folds (by prompt) (default: 5)" in sweep


def test_train_help_lists_recipes_and_estimators(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "poise_tiny" in text and "grpo_tiny" in text
    estimators = text.split("advantage estimators", 1)[1]
    assert "poise" in estimators and "grpo" in estimators and "rloo" in estimators
    assert "key=value config overrides" in text


def test_train_help_without_recipes_folder(monkeypatch, capsys):
    """An installed wheel has no training/configs: the help says where recipes live."""
    import poise_probe.cli as cli

    monkeypatch.setattr(cli, "recipe_dir", lambda: None)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "recipes: none here" in text and "training/configs/ of a source checkout" in text
    assert "dr_grpo" in text


def test_library_bars_are_off_while_training_and_restored_after():
    """transformers' "Loading weights" / "Writing model shards" bars would draw over the step
    bar; `poise train` turns them (and huggingface_hub's) off and restores them after."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    from poise_probe.runtime import quiet_library_bars

    before = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    with quiet_library_bars():
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    assert (hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()) == before
