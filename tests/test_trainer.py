"""The trainer end to end on a tiny self-built model: every estimator, step order, resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from poise_probe.config import load_config
from poise_probe.rundir import RunReader
from run_helpers import run, tiny_overrides

STAGES = ("gen", "reward", "old_log_prob", "probe", "adv", "update", "sync")


CONTRACT_KEYS = {"step", "reward/mean", "adv/var_reduction", "adv/identity_max_abs_err",
                 "tokens/generated", "timing_s/step", "actor/pg_loss", "actor/grad_norm",
                 "actor/clip_frac"} | {f"timing_s/{s}" for s in STAGES}


def test_poise_run_follows_the_contract_and_moves_the_parameters(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = run(tiny_model_dir, tmp_path / "run")
    r = RunReader(out)
    assert r.inferred_status() == "finished"
    metrics = r.metrics()
    steps = [m for m in metrics if "reward/mean" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for m in steps:
        assert CONTRACT_KEYS <= set(m), CONTRACT_KEYS - set(m)
        assert m["adv/identity_max_abs_err"] < 1e-6
    # the probe is fitted after step 1 and used from step 2 (bootstrap_steps=1)
    assert steps[0]["probe/used_frac"] == 0.0
    assert steps[2]["probe/used_frac"] == 1.0
    assert "probe/mae" in steps[2] and "probe/pearson" in steps[2]
    evals = [m for m in metrics if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [0, 3]
    table = r.rollouts(3)
    assert len(table) == 8 and set(table.rollout_idx) == {0, 1}
    np.testing.assert_allclose(table.baseline + table.advantage, table.reward, atol=1e-6)
    # POISE: each rollout's baseline is its sibling's probe prediction (K = 2)
    for _, g in table.groupby("group_id"):
        np.testing.assert_allclose(g.baseline.to_numpy(), g.probe_pred.to_numpy()[::-1],
                                   atol=1e-6)
    assert all(len(e) == n for e, n in zip(table.token_entropies, table.num_tokens))
    assert r.probe_snapshot_steps() == [1, 2, 3]
    # parameters moved
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(r.checkpoints()[-1][1] / "policy").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def first_token_reward(model_dir, prompts: list[list[int]], task) -> float:
    """Mean over `prompts` of P(first sampled token, at T = 1, earns `task`'s reward): the
    expected reward of a first-character task, exact from one forward pass per prompt."""
    from poise_probe.models import load_policy

    model, tok = load_policy(model_dir)
    earns = torch.tensor([task.score(tok.decode([i], skip_special_tokens=True), None)
                          for i in range(model.config.vocab_size)])          # (V,)
    with torch.no_grad():
        probs = [torch.softmax(model(torch.tensor([p])).logits[0, -1].float(), -1)
                 for p in prompts]                                           # P x (V,)
    return float((torch.stack(probs) @ earns).mean())


@pytest.mark.slow   # 8 steps each; test-fast keeps the 3-step contract and pinned-metric runs
@pytest.mark.parametrize("task", ["test_even_start", "test_odd_start"])
def test_poise_raises_the_expected_reward_it_is_trained_on(tiny_model_dir, tmp_path, task):
    """8 POISE steps raise the policy's exact expected reward on its training prompts; the two
    tasks reward opposite first characters, so a drift that ignores the reward fails one."""
    from poise_probe.tasks import get_task

    steps = 8
    out = run(tiny_model_dir, tmp_path / task, **{
        "data.tasks": f"[{task}]", "rollout.num_generations": 4,
        "rollout.max_completion_length": 4, "optim.lr": 1e-2, "trainer.total_steps": steps,
        "trainer.save_every": steps, "probe.snapshot_every": steps, "data.eval_n": 1,
        "data.eval_samples": 1})
    r = RunReader(out)
    prompts = sorted({tuple(p) for s in r.rollout_steps() for p in r.rollouts(s).prompt_token_ids})
    prompts = [list(p) for p in prompts]
    scorer = get_task(task)
    before = first_token_reward(tiny_model_dir, prompts, scorer)
    after = first_token_reward(r.checkpoints()[-1][1] / "policy", prompts, scorer)
    assert abs(before - 0.5) < 0.05, before            # the random policy earns about half
    assert after > before + 0.1, f"expected reward {before:.3f} -> {after:.3f} in {steps} steps"


@pytest.mark.parametrize("estimator, extra", [
    ("grpo", {"rollout.num_generations": 4}),
    ("dr_grpo", {"rollout.num_generations": 4}),
    ("rloo", {"rollout.num_generations": 3}),
    ("reinforce_pp", {}),
    ("dapo", {"rollout.num_generations": 4, "algorithm.dynamic_sampling": "true",
              "algorithm.overlong_shaping": "true", "algorithm.overlong_buffer_len": 4}),
])
def test_every_estimator_runs_on_the_same_code_path(tiny_model_dir, tmp_path, estimator, extra):
    out = run(tiny_model_dir, tmp_path / estimator, **{"algorithm.adv_estimator": estimator,
                                                       "trainer.total_steps": 2, **extra})
    r = RunReader(out)
    steps = [m for m in r.metrics() if "reward/mean" in m]
    assert len(steps) == 2
    for m in steps:
        assert CONTRACT_KEYS <= set(m)
        assert m["probe/used_frac"] == 0.0          # the shadow probe never sets baselines
        if estimator != "dapo":                      # one round, nothing dropped
            assert m["tokens/sampled"] == m["tokens/generated"]
        else:                                       # dropped groups' tokens were generated too
            assert m["tokens/sampled"] >= m["tokens/generated"]
            assert (m["tokens/sampled"] > m["tokens/generated"]) == (m["batch/groups_dropped"] > 0)
    if estimator == "dapo":
        want, max_rounds, k = 4, 3, 4   # prompts_per_step, max_gen_rounds (default), K
        for m in steps:
            rounds, kept, dropped = (m["batch/gen_rounds"], m["batch/prompts"],
                                     m["batch/groups_dropped"])
            assert 1 <= rounds <= max_rounds and 1 <= kept <= want
            assert m["batch/prompts_sampled"] == want * rounds >= kept + dropped
            # a refill round follows a round that dropped a flat group, and the batch is short
            # only when the rounds ran out
            assert dropped >= rounds - 1
            assert kept == want or rounds == max_rounds
            # flat groups are counted and left out, whether or not the refill filled the batch
            t = r.rollouts(m["step"])
            assert len(t) == kept * k
            spread = t.groupby("group_id").score.agg(lambda x: x.max() - x.min())
            assert len(spread) == kept and (spread > 0).all()
        assert sum(m["batch/groups_dropped"] for m in steps) > 0, \
            "this seed drops no group: the refill above went untested; pick a seed that does"


def test_shadow_probe_can_be_turned_off_for_estimators_without_the_probe(tiny_model_dir,
                                                                         tmp_path, monkeypatch):
    """probe.shadow=false: no feature capture (the old-policy pass gets no layer), no prediction,
    no refit, no probe metrics or snapshots; the rest of the run is unchanged."""
    import poise_probe.trainer as trainer_mod

    layers = []
    real = trainer_mod.old_policy_pass

    def spy(model, batch, cfg, tags, layer, *a, **kw):
        layers.append(layer)
        return real(model, batch, cfg, tags, layer, *a, **kw)

    monkeypatch.setattr(trainer_mod, "old_policy_pass", spy)
    on = RunReader(run(tiny_model_dir, tmp_path / "on", **{"algorithm.adv_estimator": "grpo"}))
    assert set(layers) == {0}
    layers.clear()
    off = RunReader(run(tiny_model_dir, tmp_path / "off", **{"algorithm.adv_estimator": "grpo",
                                                             "probe.shadow": "false"}))
    assert set(layers) == {None}
    m_on = [m for m in on.metrics() if "reward/mean" in m]
    m_off = [m for m in off.metrics() if "reward/mean" in m]
    assert len(m_off) == 3 and all(CONTRACT_KEYS <= set(m) for m in m_off)
    assert any("probe/mae" in m for m in m_on) and not any("probe/mae" in m for m in m_off)
    assert not any(k.startswith("probe/") and k != "probe/used_frac" for m in m_off for k in m)
    # the shadow never touches the advantages: the same rewards and updates either way
    assert [m["reward/mean"] for m in m_on] == [m["reward/mean"] for m in m_off]
    assert on.rollouts(3)["probe_pred"].notna().any()
    assert off.rollouts(3)["probe_pred"].isna().all()
    assert on.probe_snapshot_steps() == [1, 2, 3] and off.probe_snapshot_steps() == []


def test_shadow_off_with_a_probe_estimator_is_refused():
    with pytest.raises(ValueError, match="probe.shadow=false.*adv_estimator=poise"):
        load_config(None, ["probe.shadow=false"])


def test_probe_never_sees_the_batch_before_its_baselines(tiny_model_dir, tmp_path, monkeypatch):
    import poise_probe.trainer as tr
    from poise_probe.probe import ProbeBank

    events = []
    real_predict, real_update, real_adv = ProbeBank.predict, ProbeBank.update, \
        tr.step_advantages

    def predict(self, features, domains):
        events.append(("predict", features.shape[0], hash(features.tobytes())))
        return real_predict(self, features, domains)

    def update(self, features, rewards, group_ids, domains, step):
        events.append(("update", features.shape[0], hash(features.tobytes())))
        return real_update(self, features, rewards, group_ids, domains, step)

    def adv(*a, **k):
        events.append(("adv", None, None))
        return real_adv(*a, **k)

    monkeypatch.setattr(ProbeBank, "predict", predict)
    monkeypatch.setattr(ProbeBank, "update", update)
    monkeypatch.setattr(tr, "step_advantages", adv)
    run(tiny_model_dir, tmp_path / "run")
    kinds = [e[0] for e in events]
    # per step: predict, then the advantages, then (only then) this batch enters the buffer
    seen: set[int] = set()
    for i, (kind, _, h) in enumerate(events):
        if kind == "predict":
            assert h not in seen, "the probe was fitted on this batch before predicting it"
            nxt = kinds[i + 1:]
            assert nxt.index("adv") < nxt.index("update")
        if kind == "update":
            seen.add(h)
    assert kinds.count("predict") == kinds.count("update") == 3


def test_nan_rewards_fail_clearly_and_mark_the_run_failed(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="test_nan.* NaN or inf rewards"):
        run(tiny_model_dir, tmp_path / "nan", **{"data.tasks": "[test_nan]"})
    assert RunReader(tmp_path / "nan").inferred_status() == "failed"


def test_new_run_refuses_an_existing_run_dir(tiny_model_dir, tmp_path):
    run(tiny_model_dir, tmp_path / "r", **{"trainer.total_steps": 1})
    with pytest.raises(FileExistsError, match="--resume"):
        run(tiny_model_dir, tmp_path / "r", **{"trainer.total_steps": 1})


# `poise train` in a fresh process that also registers the test tasks (run_helpers)
_RUNNER = ("import sys; sys.path.insert(0, {d!r}); import run_helpers; "
           "from poise_probe.cli import main; raise SystemExit(main(sys.argv[1:]))")


def _train_cmd(model_dir, out, steps, resume=False):
    runner = _RUNNER.format(d=str(Path(__file__).parent))
    cmd = [sys.executable, "-c", runner, "train", "--output", str(out)]
    if resume:
        cmd.append("--resume")
    return cmd + tiny_overrides(model_dir, **{"trainer.total_steps": steps})


def _state(run_dir: Path):
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as load_t

    step, ckpt = RunReader(run_dir).checkpoints()[-1]
    weights = load_t(str(ckpt / "policy" / "model.safetensors"))
    bank = load_file(str(ckpt / "probe_bank.safetensors"))
    def timing(k: str) -> bool:  # wall-clock values differ between any two runs
        return k.startswith("timing_s/") or k.endswith("fit_s") or k == "time"
    metrics = [{k: v for k, v in m.items() if not timing(k)} for m in RunReader(run_dir).metrics()]
    return step, weights, bank, metrics


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    steps = 6
    subprocess.run(_train_cmd(tiny_model_dir, tmp_path / "full", steps), check=True, env=env,
                   capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(tiny_model_dir, out, steps), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_000002").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "running" and status["last_step"] < steps
    assert RunReader(out).inferred_status() == "crashed"
    subprocess.run(_train_cmd(tiny_model_dir, out, steps, resume=True), check=True, env=env,
                   capture_output=True)
    s_full, w_full, b_full, m_full = _state(tmp_path / "full")
    s_res, w_res, b_res, m_res = _state(out)
    assert s_full == s_res == steps
    assert w_full.keys() == w_res.keys()
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), k
    assert b_full.keys() == b_res.keys()
    for k in b_full:
        np.testing.assert_array_equal(b_full[k], b_res[k], err_msg=k)
    assert m_full == m_res
    assert RunReader(out).inferred_status() == "finished"


def test_demo_ends_by_printing_the_dashboard_command(tiny_model_dir, tmp_path, capsys):
    """`poise demo` (its recipe, shortened) ends with the `poise dashboard` line for its run,
    and that exact command line parses and points streamlit at the run."""
    import shlex

    from poise_probe.cli import main
    out = tmp_path / "demo run"
    rc = main(["demo", "--output", str(out)] +
              tiny_overrides(tiny_model_dir, **{"trainer.total_steps": 1}))
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("open the dashboard: poise dashboard ")
    argv = shlex.split(lines[-1].split(": ", 1)[1])
    assert argv[:2] == ["poise", "dashboard"] and Path(argv[2]) == out
    assert main(argv[1:] + ["--dry-run"]) == 0
    assert f"-- {shlex.quote(str(out.resolve()))}" in capsys.readouterr().out


def test_resume_where_no_run_began_starts_one(tiny_model_dir, tmp_path, caplog):
    from poise_probe.trainer import train
    cfg = load_config(None, tiny_overrides(tiny_model_dir, **{"trainer.total_steps": 1}))
    with caplog.at_level("WARNING"):
        train(cfg, tmp_path / "nothing", resume=True)
    assert "holds no run yet" in caplog.text
    assert RunReader(tmp_path / "nothing").inferred_status() == "finished"


def test_cli_train_and_bad_key(tiny_model_dir, tmp_path, capsys):
    from poise_probe.cli import main
    rc = main(["train", "--output", str(tmp_path / "cli")] +
              tiny_overrides(tiny_model_dir, **{"trainer.total_steps": 1}))
    assert rc == 0
    out = capsys.readouterr()
    assert "run directory:" in out.out and "step    1 | reward" in out.err
    assert main(["train", "optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err


def test_cli_overrides_may_follow_the_options(tiny_model_dir, tmp_path, capsys):
    from poise_probe.cli import main
    over = tiny_overrides(tiny_model_dir, **{"trainer.total_steps": 1})
    rc = main(["train", over[0], "--output", str(tmp_path / "mixed"), *over[1:]])
    assert rc == 0
    assert RunReader(tmp_path / "mixed").config["trainer"]["total_steps"] == 1
    with pytest.raises(SystemExit):
        main(["train", "--output", str(tmp_path / "x"), "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize("page", ["runs", "training", "probe", "rollouts"])
def test_the_dashboard_opens_a_run_without_the_shadow_probe(tiny_model_dir, tmp_path,
                                                            monkeypatch, page):
    """A GRPO run with probe.shadow=false has no probe metrics, predictions or snapshots: every
    page still renders it."""
    from dashboard_fixtures import open_app

    out = run(tiny_model_dir, tmp_path / "off", **{"algorithm.adv_estimator": "grpo",
                                                   "probe.shadow": "false",
                                                   "trainer.total_steps": 2})
    open_app(monkeypatch, out, page=page)
