"""Configs: every recipe loads, overrides apply, bad keys and values name themselves."""
from __future__ import annotations

from pathlib import Path

import pytest

from poise_probe.config import load_config

RECIPES = sorted((Path(__file__).parents[1] / "training" / "configs").glob("*.yaml"))


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert {"poise_tiny.yaml", "grpo_tiny.yaml", "dapo_tiny.yaml", "rloo_tiny.yaml",
            "poise_qwen3_0.6b.yaml", "poise_qwen3_1.7b.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_starts_with_its_command(path):
    cfg = load_config(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# poise train --config training/configs/{path.name}")
    assert cfg.trainer.total_steps >= 1


def test_tiny_recipes_share_the_rollout_budget():
    budgets = {p.stem: load_config(p).rollout.prompts_per_step * load_config(p).rollout
               .num_generations for p in RECIPES if p.stem.endswith("_tiny")}
    assert len(set(budgets.values())) == 1, budgets
    assert load_config(RECIPES[0].parent / "grpo_tiny.yaml").rollout.num_generations == 8


def test_gpu_recipe_has_paper_hyperparameters():
    c = load_config(RECIPES[0].parent / "poise_qwen3_1.7b.yaml")
    assert (c.rollout.prompts_per_step, c.rollout.num_generations) == (256, 2)
    assert (c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay) == (1e-6, 10, 0.01)
    assert (c.algorithm.epsilon, c.algorithm.epsilon_high, c.algorithm.clip_ratio_c) == (
        0.2, 0.28, 10.0)
    assert c.model.dtype == "auto" and c.optim.mini_batch_prompts == 32


def test_overrides_dotted_and_bare():
    c = load_config(None, ["optim.lr=1e-5", "adv_estimator=grpo", "num_generations=8",
                           "data.tasks=[arith]", "probe.layer=null"])
    assert c.optim.lr == 1e-5 and isinstance(c.optim.lr, float)
    assert c.algorithm.adv_estimator == "grpo" and c.rollout.num_generations == 8
    assert c.data.tasks == ["arith"] and c.probe.layer is None


@pytest.mark.parametrize("override, match", [
    ("optim.lrr=1", r"unknown config key 'optim.lrr' \(did you mean optim.lr\?\)"),
    ("nosuchkey=1", "unknown config key 'nosuchkey'"),
    ("bogus.lr=1", "no section 'bogus'"),
    ("optim.lr=fast", "optim.lr must be a number; got 'fast'"),
    ("trainer.total_steps=2.5", "trainer.total_steps must be an integer"),
    ("algorithm.dynamic_sampling=maybe", "must be true or false"),
    ("adv_estimator=ppo2", r"algorithm.adv_estimator must be one of"),
    ("loss_agg_mode=mean", "algorithm.loss_agg_mode must be one of"),
    ("num_generations=1", "num_generations must be >= 2 for poise"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("rollout.temperature=0", "rollout.temperature must be > 0"),
    ("noequals", "must look like key=value"),
    ("trainer.report_to=[mlflow]", r"trainer.report_to\[\] must be one of \['tensorboard'"),
    ("report_to=wandb", "trainer.report_to must be a list"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(ValueError, match=r"unknown config section\(s\) \['optimizer'\]"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(bad)


def test_round_trip_through_dict():
    from poise_probe.config import from_dict
    c = load_config(RECIPES[0].parent / "dapo_tiny.yaml")
    assert from_dict(c.to_dict()) == c


def test_demo_is_the_poise_tiny_recipe():
    """`poise demo` keeps its settings in the CLI (recipes are not packaged): no drift allowed."""
    from poise_probe.runtime import DEMO_OVERRIDES

    demo = load_config(None, DEMO_OVERRIDES).to_dict()
    recipe = load_config(RECIPES[0].parent / "poise_tiny.yaml").to_dict()
    demo["data"]["eval_every"] = recipe["data"]["eval_every"]  # the demo evaluates at the ends
    demo["trainer"]["output_dir"] = recipe["trainer"]["output_dir"]
    assert demo == recipe


# ------------------------------------------------------------------ config as a product

def test_every_field_has_help_and_the_docs_are_current():
    import dataclasses

    from poise_probe.config import section_classes
    from poise_probe.config_docs import config_markdown

    for section, cls in section_classes().items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{section}.{f.name} has no help"
    doc = Path(__file__).parents[1] / "docs" / "config.md"
    assert doc.read_text() == config_markdown(), \
        "docs/config.md is stale: run `poise config docs > docs/config.md`"


def test_trl_and_verl_aliases_map_to_canonical_keys(tmp_path):
    from poise_probe.config import load_config_with_sources

    cfg, src = load_config_with_sources(None, [
        "learning_rate=3e-6", "clip_ratio_low=0.1", "clip_ratio_high=0.3", "beta=0.01",
        "loss_type=grpo", "train_batch_size=16", "response_length=64",
        "ppo_mini_batch_size=8", "grad_clip=0.5", "kl_loss_type=k3"])
    assert cfg.optim.lr == 3e-6 and src["optim.lr"] == "override learning_rate=3e-6"
    assert (cfg.algorithm.epsilon, cfg.algorithm.epsilon_high) == (0.1, 0.3)
    assert cfg.algorithm.kl_coef == 0.01 and cfg.algorithm.kl_type == "k3"
    assert cfg.algorithm.loss_agg_mode == "seq-mean-token-mean"
    assert (cfg.rollout.prompts_per_step, cfg.rollout.max_completion_length) == (16, 64)
    assert (cfg.optim.mini_batch_prompts, cfg.optim.max_grad_norm) == (8, 0.5)
    assert load_config(None, ["loss_type=dapo"]).algorithm.loss_agg_mode == "token-mean"
    with pytest.raises(ValueError, match="loss_type.*dr_grpo|dr_grpo.*loss_agg_mode"):
        load_config(None, ["loss_type=dr_grpo"])
    # inside a YAML section too, and the source names the file and the alias
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  learning_rate: 2.0e-5\n")
    cfg, src = load_config_with_sources(f)
    assert cfg.optim.lr == 2e-5 and "optim.learning_rate" in src["optim.lr"]


def test_one_definition_of_agg_modes_and_kl_kinds():
    from poise_probe import config, losses

    assert config.LOSS_AGG_MODES is losses.AGG_MODES
    for kind in losses.KL_KINDS:                      # every kind the loss knows is accepted
        assert load_config(None, [f"algorithm.kl_type={kind}"]).algorithm.kl_type == kind
    with pytest.raises(ValueError, match="algorithm.kl_type"):
        load_config(None, ["algorithm.kl_type=k9"])


def test_config_show_names_sources_and_help(capsys):
    import json

    from poise_probe.cli import main

    assert main(["config", "show", "--config", "training/configs/poise_tiny.yaml",
                 "learning_rate=1e-5", "--json"]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["optim.lr"]["value"] == 1e-5
    assert rows["optim.lr"]["source"] == "override learning_rate=1e-5"
    assert "learning_rate" in rows["optim.lr"]["aliases"]
    assert rows["rollout.engine"]["source"] == "default"
    assert rows["trainer.total_steps"]["source"].startswith("file ")
    assert rows["optim.lr"]["help"]
    assert main(["config", "show", "optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err


@pytest.mark.parametrize("override, match", [
    # a negative clip norm flips the clipped gradient's sign: the run would ascend
    ("optim.max_grad_norm=-1", r"optim.max_grad_norm must be > 0 and finite; got -1"),
    ("optim.max_grad_norm=0", r"optim.max_grad_norm must be > 0 and finite; got 0"),
    # NaN passed every `x <= 0` check before
    ("optim.lr=.nan", r"optim.lr must be > 0 and finite; got nan"),
    ("optim.lr=.inf", r"optim.lr must be > 0 and finite; got inf"),
    ("probe.alpha=.nan", r"probe.alpha must be > 0 and finite; got nan"),
    ("rollout.temperature=.nan", r"rollout.temperature must be > 0 and finite; got nan"),
    ("algorithm.clip_ratio_c=.nan", r"algorithm.clip_ratio_c must be > 1"),
    ("algorithm.kl_coef=.nan", r"algorithm.kl_coef must be >= 0 and finite; got nan"),
    ("optim.weight_decay=-5", r"optim.weight_decay must be >= 0 and finite; got -5"),
    ("optim.betas=[2.0, 0.5]", r"optim.betas must be two numbers in \[0, 1\).*got \[2.0, 0.5\]"),
    ("optim.betas=[0.9]", r"optim.betas must be two numbers in \[0, 1\).*got \[0.9\]"),
    ("data.eval_temperature=-1", r"data.eval_temperature must be >= 0 and finite; got -1"),
    ("probe.snapshot_every=-3", r"probe.snapshot_every must be >= 1; got -3"),
    ("probe.snapshot_every=0", r"probe.snapshot_every must be >= 1; got 0"),
    ("algorithm.entropy_coeff=-1", r"algorithm.entropy_coeff must be >= 0 and finite; got -1"),
    ("algorithm.overlong_penalty_factor=-1",
     r"algorithm.overlong_penalty_factor must be >= 0 and finite; got -1"),
])
def test_out_of_range_and_non_finite_values_are_refused(override, match):
    """Values that used to pass and break training silently (issue 16) name the field, the value
    and the range."""
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_edge_values_that_are_fine_still_load():
    cfg = load_config(None, ["optim.weight_decay=0", "data.eval_temperature=0",
                             "optim.betas=[0.0, 0.999]", "algorithm.entropy_coeff=0"])
    assert cfg.optim.betas == [0.0, 0.999] and cfg.data.eval_temperature == 0
