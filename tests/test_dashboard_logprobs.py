"""Per-token log-probs: a real training run stores `token_logprobs` (the rollout policy's
log-probability of each sampled token), and the Rollouts page colours a completion by entropy,
log-prob or probability; runs written before the column existed show entropy only."""
from __future__ import annotations

import math

import dashboard_fixtures as fx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from dashboard_fixtures import assert_ok, chart_titles, open_app
from streamlit.testing.v1 import AppTest

from poise_probe.rundir import RunReader

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lp_run(tiny_model_dir, tmp_path_factory):
    """A one-step POISE run on the tiny random model."""
    return fx.train_run(tmp_path_factory.mktemp("logprobs") / "run", tiny_model_dir, 1)


@pytest.fixture(scope="module")
def old_run(lp_run, tmp_path_factory):
    """A copy of `lp_run` whose rollout tables lack `token_logprobs` and the columns added after
    it (a run written before it)."""
    run = fx.copy_run(lp_run, tmp_path_factory.mktemp("old") / "old")
    newer = {"token_logprobs", "engine_logprobs", "token_advantages", "token_pieces",
             "reasoning_span", "answer_span", "pooled_span", "probe_target"}
    for path in (run / "rollouts").glob("step_*.parquet"):
        table = pq.read_table(path)
        table = table.drop_columns([c for c in table.column_names if c in newer])
        pq.write_table(table, path, compression="zstd")
    return run


def chart_specs(at: AppTest) -> list[dict]:
    import json

    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def html_of(at: AppTest) -> str:
    return "\n".join(str(h.proto.body) for h in at.html)


def keys_of(widgets) -> list[str]:
    return [w.key for w in widgets]


def shown_group(at: AppTest, run):
    """The rollouts of the prompt the pair view shows, in rollout order."""
    step, gid = at.selectbox(key="ro_group").value
    table = RunReader(run).rollouts(step)
    return table[table["group_id"] == gid].sort_values("rollout_idx")


# --------------------------------------------------------------------------------------------
# the trainer writes them


def test_training_stores_each_sampled_tokens_log_prob(lp_run, tiny_model_dir):
    path = lp_run / "rollouts" / "step_000001.parquet"
    assert pq.read_schema(path).field("token_logprobs").type == pa.list_(pa.float32())
    table = RunReader(lp_run).rollouts(1)
    assert len(table) == 8 and table["num_tokens"].sum() > 0
    lens = [len(x) for x in table["token_logprobs"]]
    assert lens == table["num_tokens"].tolist()
    assert lens == [len(x) for x in table["token_ids"]]
    allv = np.concatenate(table["token_logprobs"].tolist()).astype(float)
    assert np.isfinite(allv).all() and (allv <= 0).all()
    assert allv.mean() <= 0 and ((np.exp(allv) > 0) & (np.exp(allv) <= 1)).all()
    # sampled tokens are not all certain ones under a random model
    assert allv.min() < -0.1

    # teacher forcing the same ids through the policy that sampled them (the initial weights:
    # the one step's update came after) gives the same log-probs at the run's temperature
    from poise_probe.features import pack_rollouts, policy_forward
    from poise_probe.models import load_policy

    temperature = float(RunReader(lp_run).config["rollout"]["temperature"])
    model, tok = load_policy(tiny_model_dir)
    packed = pack_rollouts([list(p) for p in table["prompt_token_ids"]],
                           [list(t) for t in table["token_ids"]], tok.pad_token_id)
    with torch.no_grad():
        out = policy_forward(model, packed, temperature=temperature)
    fresh = out.log_probs.float().numpy()
    for n, stored in enumerate(table["token_logprobs"]):
        np.testing.assert_allclose(stored, fresh[n, :len(stored)], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# the Rollouts page colours by them


def test_rollouts_page_colours_by_log_prob_and_probability(lp_run, monkeypatch):
    at = open_app(monkeypatch, lp_run, page="rollouts")
    assert "ro_colour" in keys_of(at.segmented_control)
    assert at.segmented_control(key="ro_colour").value == "entropy"
    group = shown_group(at, lp_run)
    assert len(group) == 2 and group["num_tokens"].sum() > 0
    body = html_of(at)
    assert "H=" in body and "log p=" in body                      # tooltips carry both
    assert "entropy (nats):" in body                              # the legend
    assert sum("entropy per token" in t for t in chart_titles(at)) == len(group)
    assert "ro_vmax" in keys_of(at.slider)

    at.segmented_control(key="ro_colour").set_value("logprob").run()
    assert_ok(at)
    assert at.segmented_control(key="ro_colour").value == "logprob"
    body = html_of(at)
    assert "log-prob of the sampled token" in body
    for lps, ids in zip(group["token_logprobs"], group["token_ids"]):
        for lp, tid in zip(lps, ids):
            assert f"id {tid} · " in body
            assert f"log p={float(lp):.3f}" in body
    strips = [s for s in chart_specs(at) if "log-prob per token" in s["layout"]["title"]["text"]]
    assert len(strips) == len(group)
    assert all(s["layout"]["yaxis"]["title"]["text"] == "log-prob (nats)" for s in strips)
    assert "ro_lpmax" in keys_of(at.slider) and "ro_vmax" not in keys_of(at.slider)

    at.segmented_control(key="ro_colour").set_value("prob").run()
    assert_ok(at)
    body = html_of(at)
    assert "probability of the sampled token" in body
    for lps in group["token_logprobs"]:
        for lp in lps:
            assert f"p={math.exp(float(lp)):.3f}" in body
    strips = [s for s in chart_specs(at)
              if "probability per token" in s["layout"]["title"]["text"]]
    assert len(strips) == len(group)
    assert all(s["layout"]["yaxis"]["title"]["text"] == "probability" for s in strips)
    assert not {"ro_lpmax", "ro_vmax"} & set(keys_of(at.slider))

    at.segmented_control(key="ro_colour").set_value("entropy").run()    # and back
    assert_ok(at)
    assert "ro_vmax" in keys_of(at.slider)
    assert sum("entropy per token" in t for t in chart_titles(at)) == len(group)


def test_a_run_without_log_probs_shows_entropy_only(old_run, monkeypatch):
    assert "token_logprobs" not in RunReader(old_run).rollouts(1).columns
    at = open_app(monkeypatch, old_run, page="rollouts")
    assert "ro_colour" not in keys_of(at.segmented_control)
    assert "ro_vmax" in keys_of(at.slider)
    group = shown_group(at, old_run)
    body = html_of(at)
    assert "H=" in body and "log p=" not in body
    assert sum("entropy per token" in t for t in chart_titles(at)) == len(group)
    assert any("no per-token log-probs" in c.value for c in at.caption)
