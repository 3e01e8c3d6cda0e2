"""Numca: RELATED.md's hand vectors T7-T9, order-insensitivity, the persistent table and its
checkpoint round trip, and short training runs (with a resume) on the tiny model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from poise_probe.config import load_config
from poise_probe.data import Prompt
from poise_probe.methods.numca import (
    Numca,
    build_table,
    list_prefix_states,
    lookup_value,
    merge_close_positions,
    numca_token_advantages,
    offsets_to_token_positions,
    parse_milestones,
    segment_gae,
    update_table,
)
from poise_probe.models import build_char_tokenizer
from poise_probe.rollout.collect import Rollouts
from poise_probe.rundir import RunReader
from poise_probe.tasks import get_task
from poise_probe.tasks.base import Example
from poise_probe.value_methods import VALUE_METHODS, StepContext
from run_helpers import run

# T8: G=4 rollouts of one prompt, numbers after the final answer is dropped, and rewards
T8 = [(["3", "5", "8"], 1.0), (["3", "5", "9"], 0.0), (["3", "7"], 1.0), (["5", "3"], 0.0)]
S = frozenset


# ---------------------------------------------------------------------------------------------
# Pure functions: T7, T8, T9
# ---------------------------------------------------------------------------------------------

def test_t7_digit_runs_only_and_the_last_is_dropped():
    numbers, offsets = parse_milestones("We have 12 apples and 3.5 pears, so 15.5")
    assert numbers == ["12", "3", "5", "15"]
    assert offsets == [8, 22, 24, 36]
    assert parse_milestones("the answer is 7") == ([], [])
    assert parse_milestones("no numbers") == ([], [])


def test_t8_table_of_order_insensitive_prefix_sets():
    table = build_table(T8)
    want = {S(): (4, 2.0, 0.5), S({"3"}): (3, 2.0, 2 / 3), S({"5"}): (1, 0.0, 0.0),
            S({"3", "5"}): (3, 1.0, 1 / 3), S({"3", "7"}): (1, 1.0, 1.0),
            S({"3", "5", "8"}): (1, 1.0, 1.0), S({"3", "5", "9"}): (1, 0.0, 0.0)}
    assert set(table) == set(want)
    for state, (count, total, value) in want.items():
        assert table[state] == [count, total], sorted(state)
        assert lookup_value(table, state) == pytest.approx(value)
    assert lookup_value(table, {"42"}) == 0.0          # unseen state: V = 0, as the code does


def test_prefix_states_count_a_rollout_once_per_state():
    assert list_prefix_states(["5", "3", "5", "3"]) == [S(), S({"5"}), S({"3", "5"})]
    table: dict = {}
    update_table(table, ["5", "3", "5"], 1.0)
    assert table == {S(): [1, 1.0], S({"5"}): [1, 1.0], S({"3", "5"}): [1, 1.0]}


def test_merge_close_positions_right_to_left():
    assert merge_close_positions([10, 40, 100], 50) == [40, 40, 100]
    assert merge_close_positions([10, 70, 130], 50) == [10, 70, 130]
    assert merge_close_positions([40, 45, 48], 50) == [48, 48, 48]
    # each is compared with the next one *after* that moved: 20 stays (60 - 20 >= 25)
    assert merge_close_positions([0, 20, 40, 60], 25) == [20, 20, 60, 60]
    assert merge_close_positions([], 50) == []
    assert merge_close_positions([5, 6], 0) == [5, 6]


def _runs(x: np.ndarray, bounds: list[int]) -> list[float]:
    """The constant value of x on each [bounds[j], bounds[j+1]), asserting it is constant."""
    out = []
    for b0, b1 in zip(bounds[:-1], bounds[1:]):
        assert np.all(x[b0:b1] == x[b0]), (b0, b1)
        out.append(float(x[b0]))
    return out


def test_t9_merged_positions_lambda_1():
    table = build_table(T8)
    adv, base = numca_token_advantages(["3", "5", "8"], [10, 40, 100], 150, table, 1.0,
                                       lam=1.0, merge_distance=50)
    assert adv.shape == base.shape == (150,)
    np.testing.assert_allclose(_runs(adv, [0, 40, 100, 150]), [0.5, 2 / 3, 0.0])
    np.testing.assert_allclose(_runs(base, [0, 40, 100, 150]), [0.5, 1 / 3, 1.0])
    np.testing.assert_allclose(adv + base, 1.0)         # lambda = 1: A + V = r on every token


@pytest.mark.parametrize("lam, want", [(1.0, [0.5, 1 / 3, 2 / 3, 0.0]),
                                       (0.0, [1 / 6, -1 / 3, 2 / 3, 0.0])])
def test_t9_unmerged_positions(lam, want):
    table = build_table(T8)
    adv, base = numca_token_advantages(["3", "5", "8"], [10, 70, 130], 150, table, 1.0,
                                       lam=lam, merge_distance=50)
    np.testing.assert_allclose(_runs(adv, [0, 10, 70, 130, 150]), want, atol=1e-12)
    np.testing.assert_allclose(_runs(base, [0, 10, 70, 130, 150]), [0.5, 2 / 3, 1 / 3, 1.0])


def test_segment_gae_matches_t4():
    values = [0.5, 6 / 7, 0.25, 1.0]
    np.testing.assert_allclose(segment_gae(values, 1.0), [0.5, 1 / 7, 0.75])
    np.testing.assert_allclose(segment_gae(values, 0.5), [0.241071, -0.232143, 0.75],
                               atol=1e-6)
    assert len(segment_gae([], 1.0)) == 0


def test_repeated_numbers_and_edges_follow_the_official_walk():
    table = build_table(T8)
    # "3" again at 60 adds no state: the same segments as without it
    a1, _ = numca_token_advantages(["3", "5", "3"], [10, 30, 60], 80, table, 0.0, 1.0, 5)
    a2, _ = numca_token_advantages(["3", "5"], [10, 30], 80, table, 0.0, 1.0, 5)
    np.testing.assert_array_equal(a1, a2)
    # no milestones: one segment, A = r - V(empty set)
    adv, base = numca_token_advantages([], [], 7, table, 1.0, 1.0, 50)
    np.testing.assert_allclose(adv, 0.5)
    np.testing.assert_allclose(base, 0.5)
    # a milestone on the last position: no tail, the chain ends in that state's value
    adv, _ = numca_token_advantages(["3"], [4], 4, table, 1.0, 1.0, 1)
    np.testing.assert_allclose(adv, 2 / 3 - 0.5)
    assert numca_token_advantages(["3"], [1], 0, table, 1.0, 1.0, 50)[0].shape == (0,)


def test_offsets_map_to_the_token_after_the_one_holding_the_digit():
    pieces = ["ab", "c", "de", "f"]                     # char ends 2, 3, 5, 6
    assert offsets_to_token_positions([0, 1, 2, 3, 5], pieces) == [1, 1, 2, 3, 4]
    assert offsets_to_token_positions([6, 99], pieces) == [4, 4]    # past the end: length
    assert offsets_to_token_positions([0], ["", "", "7x"]) == [3]   # empty pieces skipped
    assert offsets_to_token_positions([], []) == []


# ---------------------------------------------------------------------------------------------
# The value method on hand-made batches
# ---------------------------------------------------------------------------------------------

TOK = build_char_tokenizer()
# T8's rollouts as texts; with one token per character the digit at char c starts a state at
# token c + 1: R1's at tokens 1, 8 and 15 ("16" is its final answer, dropped).
T8_TEXTS = ["3 then 5 then 8 gives 16", "3 then 5 then 9 gives 17",
            "3 then 7 gives 10", "5 then 3 gives 8"]


def _cfg(**numca):
    overrides = [f"numca.{k}={v}" for k, v in numca.items()]
    return load_config(None, ["algorithm.adv_estimator=numca", *overrides])


def _example(i: int) -> Example:
    return Example(prompt=f"prompt {i}", ground_truth="0", domain="math", data_source="test")


def _ctx(texts: list[str], rewards: list[float], prompts: list[int], cfg, step: int = 1):
    """A StepContext with what Numca reads: texts, response ids, prompt ids, rewards, mask."""
    order = list(dict.fromkeys(prompts))                 # prompt index -> group position
    task = get_task("arith")
    ids = [TOK.encode(t, add_special_tokens=False) for t in texts]
    assert [TOK.decode(x, skip_special_tokens=True) for x in ids] == texts
    gids = torch.tensor([order.index(p) for p in prompts])
    width = max(len(x) for x in ids) + 3                  # padded past the longest response
    mask = (torch.arange(width)[None] < torch.tensor([len(x) for x in ids])[:, None]).float()
    r = torch.tensor(rewards)
    batch = Rollouts([Prompt(_example(p), task) for p in order], [[1]] * len(order), ids,
                     list(texts), [False] * len(texts), gids, r, r.clone())
    return StepContext(cfg, step, batch, r, gids, mask, torch.zeros(mask.shape), None, None,
                       np.zeros(len(texts)), np.zeros(len(texts), dtype=bool))


def test_numca_is_registered_as_a_token_level_value_method():
    assert VALUE_METHODS["numca"] is Numca and Numca.token_level
    assert not Numca.hidden_states_wanted


@pytest.mark.parametrize("scale_rewards", ["group", "none"])
def test_method_gives_t9_values_scaled_by_the_group_std(scale_rewards):
    cfg = _cfg(merge_distance=5, scale_rewards=scale_rewards)
    method = Numca(cfg, tokenizer=TOK)
    ctx = _ctx(T8_TEXTS, [1.0, 0.0, 1.0, 0.0], [0, 0, 0, 0], cfg)
    out = method.advantages(ctx)
    n, width = ctx.mask.shape
    assert out.token_level and out.advantages.shape == out.baselines.shape == (n, width)
    assert out.scale.shape == (n, width)
    scale = math.sqrt(1 / 3) + 1e-4 if scale_rewards == "group" else 1.0
    bounds = [0, 1, 8, 15, len(T8_TEXTS[0])]              # table built from the group itself
    assert parse_milestones(T8_TEXTS[0])[1] == [0, 7, 14]
    np.testing.assert_allclose(_runs(out.advantages[0].numpy(), bounds),
                               np.array([0.5, 1 / 3, 2 / 3, 0.0]) / scale, rtol=1e-6)
    np.testing.assert_allclose(_runs(out.baselines[0].numpy(), bounds),
                               [0.5, 2 / 3, 1 / 3, 1.0], rtol=1e-6)
    m = ctx.mask.bool()
    rec = out.advantages * out.scale + out.baselines      # A * scale + b = r on every token
    torch.testing.assert_close(rec[m], ctx.rewards[:, None].expand(n, width)[m])
    assert torch.all(out.advantages[~m] == 0) and torch.all(out.baselines[~m] == 0)
    assert out.per_sequence(ctx.mask).shape == (n,)


def test_method_is_insensitive_to_the_order_of_rollouts():
    cfg = _cfg(merge_distance=5)
    rewards = [1.0, 0.0, 1.0, 0.0]
    a = Numca(cfg, tokenizer=TOK).advantages(_ctx(T8_TEXTS, rewards, [0] * 4, cfg))
    perm = [3, 1, 0, 2]
    b_method = Numca(cfg, tokenizer=TOK)
    b = b_method.advantages(_ctx([T8_TEXTS[i] for i in perm], [rewards[i] for i in perm],
                                 [0] * 4, cfg))
    for j, i in enumerate(perm):
        torch.testing.assert_close(b.advantages[j], a.advantages[i])
        torch.testing.assert_close(b.baselines[j], a.baselines[i])
    # R4 reaches {3, 5} as {5} then {5, 3}: one state with R1 and R2
    table = b_method.tables[_example(0).prompt_id]
    assert table[S({"3", "5"})] == [3, 1.0]


def test_table_persists_across_steps_per_prompt():
    cfg = _cfg(merge_distance=5, scale_rewards="none")
    method = Numca(cfg, tokenizer=TOK)
    texts = ["1 and 2 is 3", "1 and 4 is 5", "7 and 8 is 9", "7 is 7"]
    method.advantages(_ctx(texts, [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1], cfg, step=1))
    out = method.advantages(_ctx(texts[:2], [0.0, 0.0], [0, 0], cfg, step=2))
    t0 = method.tables[_example(0).prompt_id]
    assert t0[S()] == [4, 1.0] and t0[S({"1"})] == [4, 1.0] and t0[S({"1", "2"})] == [2, 1.0]
    assert method.tables[_example(1).prompt_id][S({"7"})] == [2, 2.0]   # untouched by step 2
    # step 2's rollout 0: V(empty) = 1/4 on token 0, V({1}) = 1/4, then V({1, 2}) = 1/2
    np.testing.assert_allclose(out.baselines[0, :3].numpy(), [0.25, 0.25, 0.25])
    np.testing.assert_allclose(out.baselines[0, 7:12].numpy(), 0.5)
    metrics = method.update(_ctx(texts[:2], [0.0, 0.0], [0, 0], cfg, step=2))
    assert metrics["numca/prompts"] == 2 and metrics["numca/states"] == 4 + 3


def test_state_dict_round_trip_continues_identically(tmp_path):
    cfg = _cfg(merge_distance=5)
    a = Numca(cfg, tokenizer=TOK)
    a.advantages(_ctx(T8_TEXTS, [1.0, 0.0, 1.0, 0.0], [0, 0, 0, 0], cfg, step=1))
    torch.save(a.state_dict(), tmp_path / "numca.pt")
    b = Numca(cfg, tokenizer=TOK)
    b.load_state_dict(torch.load(tmp_path / "numca.pt", weights_only=True))   # plain data
    assert b.tables == a.tables
    nxt = _ctx(T8_TEXTS[::-1], [0.0, 1.0, 0.0, 1.0], [0, 0, 0, 0], cfg, step=2)
    ra, rb = a.advantages(nxt), b.advantages(nxt)
    assert torch.equal(ra.advantages, rb.advantages) and torch.equal(ra.baselines, rb.baselines)
    with pytest.raises(ValueError, match="tables"):
        b.load_state_dict({"weights": 1})


def test_state_survives_save_and_load_checkpoint(tiny_model_dir, tmp_path):
    from poise_probe.checkpoint import load_checkpoint, save_checkpoint
    from poise_probe.data import PromptStream
    from poise_probe.models import load_policy
    from poise_probe.probe import ProbeBank
    from poise_probe.rundir import RunWriter
    from poise_probe.state import TrainState

    cfg = _cfg(merge_distance=5)
    method = Numca(cfg, tokenizer=TOK)
    method.advantages(_ctx(T8_TEXTS, [1.0, 0.0, 1.0, 0.0], [0, 0, 0, 0], cfg))
    model, tok = load_policy(tiny_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = TrainState(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                       ProbeBank({"all": 8}), PromptStream(["arith"], {}, pool_size=4),
                       step=1, value_method=method)
    writer = RunWriter(tmp_path / "run", config={}, meta={"model": "m", "device": "cpu",
                                                          "algorithm": "numca"})
    folder = save_checkpoint(writer, state, tok)
    restored = Numca(cfg, tokenizer=TOK)
    restored.load_state_dict(load_checkpoint(folder)["value_method"])
    assert restored.tables == method.tables


def test_lone_rollouts_cannot_be_scaled_by_a_group_std():
    cfg = _cfg()
    method = Numca(cfg, tokenizer=TOK)
    with pytest.raises(ValueError, match="num_generations"):
        method.advantages(_ctx(["1 2", "3 4"], [1.0, 0.0], [0, 1], cfg))
    assert method.tables == {}                            # a refused batch leaves no trace
    out = Numca(_cfg(scale_rewards="none"), tokenizer=TOK).advantages(
        _ctx(["1 2", "3 4"], [1.0, 0.0], [0, 1], cfg))
    assert torch.isfinite(out.advantages).all()


# ---------------------------------------------------------------------------------------------
# Training on the tiny model
# ---------------------------------------------------------------------------------------------

# 32 random characters hold a few digit runs; merging within 4 tokens leaves several segments
NUMCA_RUN = {"algorithm.adv_estimator": "numca", "trainer.total_steps": 2,
             "rollout.num_generations": 4, "rollout.max_completion_length": 32,
             "numca.merge_distance": 4}


def _step_records(out):
    def timing(k: str) -> bool:
        return k.startswith("timing_s/") or k.endswith("fit_s") or k == "time"
    return [{k: v for k, v in m.items() if not timing(k)} for m in RunReader(out).metrics()
            if "reward/mean" in m]


def test_train_numca_end_to_end_then_resume_matches(tiny_model_dir, tmp_path):
    from poise_probe.checkpoint import load_checkpoint
    from poise_probe.trainer import train
    from run_helpers import tiny_overrides

    full = run(tiny_model_dir, tmp_path / "full", **NUMCA_RUN)
    reader = RunReader(full)
    steps = _step_records(full)
    assert [m["step"] for m in steps] == [1, 2]
    assert all(m["numca/states"] > 0 and math.isfinite(m["adv/identity_max_abs_err"])
               for m in steps)
    assert max(m["numca/segments_mean"] for m in steps) > 1     # milestones cut segments
    for step in (1, 2):
        t = reader.rollouts(step)
        for adv, n in zip(t["token_advantages"], t["num_tokens"]):
            assert len(adv) == n and np.isfinite(adv).all()
        assert any(len(set(np.round(a, 6))) > 1 for a in t["token_advantages"])
    # stop after step 1, resume: the same step 2 and the same table
    cfg = load_config(None, tiny_overrides(tiny_model_dir, **NUMCA_RUN))
    out = tmp_path / "resumed"
    train(cfg, out, stop_after=1)
    train(cfg, out, resume=True)
    assert _step_records(out) == steps
    tables = [load_checkpoint(RunReader(d).checkpoints()[-1][1])["value_method"]
              for d in (full, out)]
    assert tables[0] == tables[1] and tables[0]["tables"]
