"""The dashboard's pure parts: numbers behind the charts, token alignment, the launcher."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

APPS = Path(__file__).resolve().parents[1] / "apps"
if str(APPS) not in sys.path:
    sys.path.insert(0, str(APPS))

from poise_dash import analysis, token_view, tokens

from poise_probe import dashboard

# --------------------------------------------------------------------------------------------
# analysis


def test_ema_matches_tensorboard_debiasing_and_skips_nan():
    x = np.array([1.0, np.nan, 3.0])
    out = analysis.ema(x, 0.5)
    assert out[0] == pytest.approx(1.0)                 # debiased: first value unchanged
    assert math.isnan(out[1])
    assert out[2] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    np.testing.assert_array_equal(analysis.ema(x, 0.0), x)
    with pytest.raises(ValueError, match="smoothing"):
        analysis.ema(x, 1.0)


def test_per_step_merges_lines_and_builds_x_axes():
    frame = analysis.numeric_frame([
        {"step": 0, "eval/accuracy": 0.5, "time": 100.0},
        {"step": 1, "reward/mean": 0.2, "tokens/generated": 10, "time": 3700.0},
        {"step": 2, "reward/mean": None, "tokens/generated": 30, "time": 7300.0},
        {"step": 2, "eval/accuracy": 0.7, "time": 7400.0},
    ])
    steps = analysis.per_step(frame)
    assert list(steps["step"]) == [0, 1, 2]
    assert list(steps["_x_tokens"]) == [0, 10, 40]
    assert steps["_x_wall"].iloc[-1] == pytest.approx((7400 - 100) / 3600)
    assert steps["eval/accuracy"].tolist() == [0.5, pytest.approx(np.nan, nan_ok=True), 0.7]
    assert steps["reward/mean"].dtype == float
    assert analysis.best_eval(steps) == (0.7, 2)


def test_per_step_of_a_run_that_logged_only_its_first_evaluation():
    steps = analysis.per_step(analysis.numeric_frame([{"step": 0, "eval/accuracy": 0.5,
                                                       "time": 10.0}]))
    assert steps["_x_tokens"].tolist() == [0.0] and steps["_x_wall"].tolist() == [0.0]
    empty = analysis.per_step(analysis.numeric_frame([]))
    assert empty.empty and "_x_tokens" in empty


def test_reliability_bins_are_equal_mass_with_hand_values():
    pred = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])
    obs = np.array([0, 0, 1, 0, 1, 1, 0, 1], float)
    bins = analysis.reliability_bins(pred, obs, n_bins=2)
    assert bins["n"].tolist() == [4, 4]
    assert bins["pred_mean"].tolist() == pytest.approx([0.25, 0.75])
    assert bins["obs_mean"].tolist() == pytest.approx([0.25, 0.75])
    assert analysis.expected_calibration_error(bins) == pytest.approx(0.0)
    assert (bins["obs_lo"] >= 0).all() and (bins["obs_hi"] <= 1).all()
    s = analysis.calibration_summary(pred, obs, n_bins=2)
    assert s["mae"] == pytest.approx(np.abs(pred - obs).mean())
    assert s["brier_skill"] == pytest.approx(1 - ((pred - obs) ** 2).mean() / obs.var())


def test_pair_sign_accuracy_counts_only_pairs_with_different_outcomes():
    df = pd.DataFrame({
        "step": [1] * 6, "group_id": [0, 0, 1, 1, 2, 2], "rollout_idx": [0, 1] * 3,
        "reward": [1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
        "probe_pred": [0.9, 0.2, 0.8, 0.3, 0.5, 0.1],   # right, wrong, (equal outcomes)
    })
    acc, n = analysis.pair_sign_accuracy(df, "reward")
    assert (acc, n) == (0.5, 2)
    df.loc[3, "probe_pred"] = 0.8                       # a tie counts one half
    assert analysis.pair_sign_accuracy(df, "reward") == (0.75, 2)


def test_baseline_errors_compare_probe_with_sibling_mean():
    df = pd.DataFrame({
        "step": [1] * 4, "group_id": [0, 0, 1, 1], "domain": ["math"] * 2 + ["code"] * 2,
        "reward": [1.0, 0.0, 1.0, 1.0], "probe_pred": [0.9, 0.1, 1.0, 1.0],
        "baseline": [0.1, 0.9, 1.0, 1.0],
    })
    err = analysis.baseline_errors(df, "reward").set_index(["domain", "baseline"])["mse"]
    # RLOO baseline of group 0 is the sibling's reward: errors 1 and 1 -> MSE over 4 rows 0.5
    assert err[("all", "sibling reward mean (RLOO)")] == pytest.approx(0.5)
    assert err[("all", "own probe prediction")] == pytest.approx((0.01 + 0.01) / 4)
    assert err[("math", "used by the run")] == pytest.approx((0.81 + 0.81) / 2)


def test_rollout_filter_and_sort():
    df = pd.DataFrame({
        "step": [1, 1, 2, 2], "group_id": [0, 0, 0, 0], "rollout_idx": [0, 1, 0, 1],
        "domain": ["math", "math", "code", "code"], "reward": [1.0, 0.0, 1.0, 0.0],
        "score": [1.0, 0.0, 1.0, 0.0], "probe_pred": [0.9, 0.6, np.nan, 0.2],
        "advantage": [0.4, -0.6, 3e-8, -0.1], "prompt": ["a", "a", "b", "b"],
        "completion": ["<answer>42</answer>", "x", "foo", "FOO bar"], "truncated": [0, 0, 0, 1],
        "num_tokens": [5, 1, 3, 7],
    })
    f = analysis.RolloutFilter
    assert list(f(domains=["code"]).apply(df, "score").index) == [2, 3]
    assert list(f(advantage_signs=["zero"]).apply(df, "score").index) == [2]
    assert list(f(min_probe_error=0.5).apply(df, "score").index) == [1]
    assert list(f(text="foo").apply(df, "score").index) == [2, 3]
    assert list(f(text=r"\d+", regex=True).apply(df, "score").index) == [0]
    assert list(f(text="(").apply(df, "score").index) == []       # literal unless regex
    assert list(f(truncated_only=True, reward_range=(0, 0.5)).apply(df, "score").index) == [3]
    with pytest.raises(ValueError, match="invalid regular expression"):
        f(text="(", regex=True).apply(df, "score")
    df["_probe_err"] = (df["score"] - df["probe_pred"]).abs()
    assert list(analysis.sort_rollouts(df, "worst probe miss first").index) == [1, 3, 0, 2]
    assert list(analysis.sort_rollouts(df, "length (long first)").index) == [3, 0, 2, 1]


def test_config_diff_flattens_and_shows_only_differences():
    a = {"optim": {"lr": 1e-3, "betas": [0.9, 0.99]}, "algorithm": {"adv_estimator": "poise"}}
    b = {"optim": {"lr": 1e-3, "betas": [0.9, 0.999]}, "algorithm": {"adv_estimator": "grpo"},
         "extra": {"x": 1}}
    diff = analysis.config_diff(a, b)
    assert diff["key"].tolist() == ["algorithm.adv_estimator", "extra.x", "optim.betas"]
    assert diff.set_index("key").loc["extra.x", "A"] == "(absent)"
    assert len(analysis.config_diff(a, b, show_all=True)) == 4


def test_stage_shares_sum_to_one():
    steps = pd.DataFrame({"timing_s/step": [2.0, 4.0], "timing_s/gen": [1.0, 2.0],
                          "timing_s/update": [0.5, 1.0], "timing_s/eval": [9.0, None]})
    shares = analysis.stage_shares(steps)
    assert shares["gen"] == pytest.approx(0.5) and shares["update"] == pytest.approx(0.25)
    assert shares.sum() == pytest.approx(1.0) and "eval" not in shares


# --------------------------------------------------------------------------------------------
# token alignment


def test_character_level_completion_with_single_token_tags_and_end_token():
    text = "<think>1+2=3</think><answer>3</answer>"
    pieces = tokens.split_pieces(text)
    assert pieces[0] == "<think>" and pieces[-1] == "</answer>" and len(pieces) == 5 + 4 + 1
    al = tokens.align(text, np.arange(len(pieces) + 1) / 10)
    assert al.mode == "chars+tags" and al.extra_tokens == 1
    assert al.spans == [("think", 0, 6), ("answer", 7, 9)]
    html = token_view.render_html(al, vmax=1.0)
    assert html.count('title="token') == len(pieces) + 1
    assert "&lt;think&gt;" in html and ">think</sup>" in html and ">answer</sup>" in html


def test_one_entropy_per_character_marks_spans_in_characters():
    text = "<think>ab</think><answer>c</answer>"
    al = tokens.align(text, np.ones(len(text)))
    assert al.mode == "chars"
    assert al.spans == [("think", 0, 16), ("answer", 17, len(text) - 1)]
    assert text[al.spans[0][1]:al.spans[0][2] + 1] == "<think>ab</think>"


def test_unclosed_span_of_a_truncated_completion_runs_to_the_end():
    al = tokens.align("<think>abc", np.ones(4))
    assert al.mode == "chars+tags" and al.spans == [("think", 0, 3)]


def test_subword_tokens_fall_back_to_ids_or_a_strip_never_guessing():
    text = "The answer is <b>42</b>"
    al = tokens.align(text, np.ones(6))
    assert al.mode == "strip" and not al.coloured and "subword" in al.describe()
    assert "&lt;b&gt;" in token_view.render_html(al, 1.0)      # text escaped, not coloured
    al = tokens.align(text, np.ones(3), token_ids=[11, 12, 13])
    assert al.mode == "token_ids" and al.coloured
    assert token_view.render_html(al, 1.0).count("id 1") == 3


def test_entropy_colour_is_monotone_and_handles_nan():
    assert token_view.entropy_colour(float("nan"), 1.0).startswith("rgba(128")
    alphas = [float(token_view.entropy_colour(h, 2.0).rsplit(",", 1)[1][:-1])
              for h in (0.0, 1.0, 2.0, 5.0)]
    assert alphas == sorted(alphas) and alphas[-1] == alphas[-2]


def _rgba(colour: str) -> tuple[float, ...]:
    return tuple(float(x) for x in colour[colour.index("(") + 1:-1].split(","))


def test_colour_scales_at_their_end_points():
    ent, lp, prob = (token_view.SCALES[k] for k in ("entropy", "logprob", "prob"))
    # no colour: zero entropy, log p = 0 (a certain token), p = 1; full colour at the far end
    for scale, none, full, beyond in ((ent, 0.0, 2.0, 9.0), (lp, 0.0, -2.0, -9.0),
                                      (prob, 1.0, 0.0, -1.0)):
        assert _rgba(scale.colour(none, 2.0))[3] == pytest.approx(0.08), scale.key
        assert _rgba(scale.colour(full, 2.0))[3] == pytest.approx(0.90), scale.key
        assert scale.colour(beyond, 2.0) == scale.colour(full, 2.0)           # clipped
        assert scale.colour(float("nan"), 2.0) == token_view.MISSING_COLOUR
    assert token_view.entropy_colour(2.0, 2.0) == ent.colour(2.0, 2.0)                # unchanged
    assert token_view.logprob_colour(-1.0, 2.0) == token_view.prob_colour(0.5)     # half way both
    assert token_view.prob_colour(0.5, 123.0) == token_view.prob_colour(0.5)        # vmax unused
    alphas = [_rgba(token_view.logprob_colour(v, 2.0))[3] for v in (0.0, -0.5, -1.0, -2.0)]
    assert alphas == sorted(alphas)                    # less likely tokens are more coloured
    assert [s.key for s in token_view.available_scales(False)] == ["entropy"]
    assert [s.key for s in token_view.available_scales(True)] == ["entropy", "logprob", "prob"]
    assert token_view.get_scale("log-prob (nats)") is lp
    assert token_view.get_scale("probability") is prob
    with pytest.raises(ValueError, match="unknown colour scale"):
        token_view.get_scale("loss")
    assert lp.legend_values(2.0) == [0.0, -0.5, -1.0, -1.5, -2.0]
    assert prob.legend_values(2.0) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert "-0.00" not in token_view.legend_html(2.0, "logprob")
    assert "probability" in token_view.legend_html(1.0, "prob")
    assert "entropy (nats)" in token_view.legend_html(1.0)


def test_tooltips_show_id_entropy_log_prob_and_probability():
    text = "<think>1</think><answer>1</answer>"
    pieces = tokens.split_pieces(text)
    n = len(pieces) + 1                                        # plus the end token
    lps = -np.arange(n) / 4
    al = tokens.align(text, np.arange(n) / 10, token_ids=list(range(200, 200 + n)),
                      log_probs=lps.astype(np.float32))
    assert al.mode == "chars+tags" and al.token_ids == list(range(200, 200 + n))
    np.testing.assert_allclose(token_view.get_scale("logprob").values(al), lps, rtol=1e-6)
    np.testing.assert_allclose(token_view.get_scale("prob").values(al), np.exp(lps), rtol=1e-6)
    np.testing.assert_allclose(token_view.get_scale("entropy").values(al), np.arange(n) / 10)
    for scale in ("entropy", "logprob", "prob"):
        html = token_view.render_html(al, 1.0, scale=scale)
        assert html.count('title="token') == n
        for i in range(n):
            assert f"id {200 + i}" in html
            assert f"H={i / 10:.3f} nats" in html
            assert f"log p={lps[i]:.3f}" in html and f"p={np.exp(lps[i]):.3f}" in html
    assert token_view.render_html(al, 1.0, scale="logprob") != token_view.render_html(al, 1.0)
    # an old run: no log-probs, no log p in the tooltips, the log-prob scales grey
    old = tokens.align(text, np.arange(n) / 10)
    assert old.log_probs is None and old.token_ids is None
    assert "log p=" not in token_view.render_html(old, 1.0)
    assert " · id " not in token_view.render_html(old, 1.0)
    assert np.isnan(token_view.get_scale("prob").values(old)).all()
    assert token_view.MISSING_COLOUR in token_view.render_html(old, 1.0, scale="prob")
    # token-id chips carry the same values
    chips = tokens.align("xyz", np.ones(2), token_ids=[7, 8], log_probs=[-0.5, -2.0])
    assert chips.mode == "token_ids"
    html = token_view.render_html(chips, 1.0, scale="prob")
    assert "id 8 · H=1.000 nats · log p=-2.000 · p=0.135" in html


def test_log_probs_align_like_entropies_whatever_their_length():
    text = "abc"
    # one per character plus an end token, like the entropies
    al = tokens.align(text, np.ones(4), log_probs=[-0.1, -0.2, -0.3, -0.4])
    assert al.mode == "chars" and al.extra_tokens == 1
    assert "log p=-0.400" in token_view.render_html(al, 1.0)             # the end token's
    assert "log-probs" not in al.describe()
    # fewer log-probs than tokens: the missing ones are NaN (grey, "–"), and the caption says so
    short = tokens.align(text, np.ones(4), log_probs=[-0.1, -0.2])
    assert short.mode == "chars" and len(short.log_probs) == 4
    assert np.isnan(short.log_probs[2:]).all()
    html = token_view.render_html(short, 1.0, scale="logprob")
    assert "log p=–" in html and token_view.MISSING_COLOUR in html
    assert "2 log-probs for 4 tokens" in short.describe()
    # more: cut to the token count
    long = tokens.align(text, np.ones(3), log_probs=-np.ones(7))
    assert long.mode == "chars" and len(long.log_probs) == 3
    assert "7 log-probs for 3 tokens" in long.describe()
    # a subword tokenizer: a strip, the log-probs kept for the strip chart
    strip = tokens.align("The answer", np.ones(3), log_probs=[-1.0, -2.0, -3.0])
    assert strip.mode == "strip"
    np.testing.assert_allclose(token_view.SCALES["logprob"].values(strip), [-1.0, -2.0, -3.0])
    # no entropies stored: the log-probs give the token count
    only = tokens.align(text, None, log_probs=[-0.1, -0.2, -0.3])
    assert only.mode == "chars" and np.isnan(only.entropies).all()
    assert "H=– nats · log p=-0.300" in token_view.render_html(only, 1.0)
    # a missing value (an old step in a mixed table reads as NaN)
    assert tokens.align(text, np.ones(3), log_probs=float("nan")).log_probs is None


def test_strip_chart_plots_the_chosen_quantity():
    from poise_dash import figures

    al = tokens.align("<think>a</think>", np.array([0.5, 1.0, 0.2]),
                      log_probs=[-0.1, -3.0, -0.5])
    for scale, title, y in (("entropy", "entropy (nats)", [0.5, 1.0, 0.2]),
                            ("logprob", "log-prob (nats)", [-0.1, -3.0, -0.5]),
                            ("prob", "probability", np.exp([-0.1, -3.0, -0.5]))):
        fig = figures.entropy_strip(token_view.SCALES[scale].values(al), al.spans, 2.0, "t",
                                    al.pieces, scale=scale)
        assert fig.layout.yaxis.title.text == title
        np.testing.assert_allclose(np.asarray(fig.data[0].y, float), y, rtol=1e-6)
        lo, hi = fig.layout.yaxis.range
        assert lo <= min(y) and hi >= max(y)
    fig = figures.entropy_strip(token_view.SCALES["logprob"].values(al), al.spans, 2.0, "t",
                                scale="logprob")
    assert fig.layout.yaxis.range[1] == 0.0 and "log p=" in fig.data[0].hovertemplate


# --------------------------------------------------------------------------------------------
# launcher


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    dashboard.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["dashboard", *argv])


def test_launcher_builds_the_streamlit_command(tmp_path):
    args = _args(str(tmp_path), "--port", "8600", "--no-browser", "--refresh", "5")
    cmd = dashboard.build_command(args)
    assert cmd[1:4] == ["-m", "streamlit", "run"]
    assert Path(cmd[4]) == dashboard.app_path() and dashboard.app_path().is_file()
    assert cmd[cmd.index("--server.port") + 1] == "8600"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    assert cmd[cmd.index("--") + 1:] == [str(tmp_path.resolve()), "--refresh", "5"]
    assert args.func is dashboard.run


def test_launcher_refuses_missing_paths_and_bad_ports(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no such run directory or folder: .*nope"):
        dashboard.build_command(_args(str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="--port"):
        dashboard.build_command(_args(str(tmp_path), "--port", "0"))
    assert dashboard.run(_args(str(tmp_path), "--dry-run")) == 0
    assert "streamlit run" in capsys.readouterr().out


def test_launcher_names_a_missing_app(tmp_path, monkeypatch):
    monkeypatch.setattr(dashboard, "app_path", lambda: tmp_path / "apps" / "dashboard.py")
    with pytest.raises(FileNotFoundError, match="dashboard app is missing"):
        dashboard.build_command(_args(str(tmp_path)))


def test_app_path_falls_back_to_the_wheels_share_folder(tmp_path, monkeypatch):
    """Installed from a wheel (no checkout beside the package), the app is the copy pyproject's
    data-files put under <prefix>/share/poise_probe/apps."""
    import poise_probe

    fake_pkg = tmp_path / "site" / "poise_probe" / "__init__.py"
    monkeypatch.setattr(poise_probe, "__file__", str(fake_pkg))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    with pytest.raises(FileNotFoundError, match="share/poise_probe/apps/dashboard.py"):
        dashboard.build_command(_args(str(tmp_path)))
    shipped = tmp_path / "prefix" / "share" / "poise_probe" / "apps" / "dashboard.py"
    shipped.parent.mkdir(parents=True)
    shipped.write_text("")
    assert dashboard.app_path() == shipped
    assert dashboard.build_command(_args(str(tmp_path)))[4] == str(shipped)


def test_dashboard_command_is_what_demo_prints():
    assert dashboard.dashboard_command("runs/demo-20261123-120000") == \
        "poise dashboard runs/demo-20261123-120000"
    assert dashboard.dashboard_command("my runs/a") == "poise dashboard 'my runs/a'"


def test_the_app_never_imports_torch_or_the_trainer(tmp_path):
    """Every page runs (on an empty folder) in a fresh process without importing torch."""
    import subprocess

    script = f"""
import os, sys
os.environ["POISE_DASHBOARD_PATHS"] = {str(tmp_path)!r}
from streamlit.testing.v1 import AppTest
at = AppTest.from_file({str(APPS / "dashboard.py")!r}, default_timeout=60).run()
for page in ("training", "probe", "rollouts", "studies"):
    at.switch_page(f"views/{{page}}.py").run()
    assert not at.exception, [e.value for e in at.exception]
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "transformers",
             "poise_probe.trainer", "poise_probe.models", "poise_probe.probe")))
print("BAD", bad)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "BAD []" in out.stdout, out.stdout[-2000:]


def test_poise_dashboard_command_line(tmp_path, capsys):
    from poise_probe.cli import main

    assert main(["dashboard", str(tmp_path), "--dry-run"]) == 0
    assert f"-- {tmp_path.resolve()}" in capsys.readouterr().out
    assert main(["dashboard", str(tmp_path / "missing")]) == 2
    assert "no such run directory or folder" in capsys.readouterr().err
