"""Property-based reliability tests (hypothesis) of the advantage estimators, the config parser
and the two line-oriented loaders.

1. Advantages (`poise_probe.advantages`, `poise_probe.group_norm`): for random prompt groups
   (unequal sizes, arbitrary non-contiguous ids, shuffled rows) A * scale + b = r; each
   baseline is what POISE.md says (group mean, mean of the other rewards, mean of the other
   rollouts' predictions, batch mean); permuting rows permutes the outputs and relabelling
   groups changes nothing; a leave-one-out baseline ignores the rollout's own value and lies
   within the range of the others'; bounds for rewards in [0, 1]; zero-variance groups give
   A = 0 for grpo / dr_grpo / rloo; outputs are finite for finite inputs; token-level
   estimators ignore padding and masked-out values; poise_with_bootstrap ignores the
   predictions of groups that fall back to RLOO; validity masking ignores invalid rows.
2. Config (`poise_probe.config`): valid numeric overrides round-trip; random override strings
   either load (with the field's type) or raise ValueError/KeyError; NaN and inf for positive
   fields raise ValueError naming the field.
3. Loaders: `get_task("<file>.jsonl")` on random and malformed lines loads or raises
   ValueError naming the file and the offending line; `RunReader.metrics` skips a torn last
   line, raises ValueError naming a corrupt middle line, or skips it with errors="skip".

The library bugs these properties found (GRPO's float32 constant groups, non-finite method
config values, PyYAML and overflow errors escaping the override parser, pathological JSON lines
in task files and metrics) were fixed with them; their cases are kept below as plain tests.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import types
import typing
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from poise_probe.advantages import (
    AdvantageResult,
    compute_advantages,
    masked_whiten_scale,
    poise_with_bootstrap,
)
from poise_probe.config import load_config, parse_override, section_classes
from poise_probe.group_norm import GROUP_ESTIMATORS, group_advantages
from poise_probe.rundir.reader import RunReader
from poise_probe.tasks import get_task
from poise_probe.tasks.base import DOMAINS
from poise_probe.tasks.files import SPLIT_NAMES

F64 = torch.float64
PER_ROLLOUT = ["poise", "rloo", "grpo", "dr_grpo", "dapo", "reinforce_pp"]
TOKEN_LEVEL = ["reinforce_plus_plus", "reinforce_plus_plus_baseline"]
ZERO_ON_FLAT = ["grpo", "dr_grpo", "dapo", "rloo"]  # spec: an all-equal group gets A = 0

# database=None: no .hypothesis/ folder in the shared working tree
FAST = settings(max_examples=50, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=30, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow])


# =============================================================================================
# 1. Advantage estimators
# =============================================================================================

def finite(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


@st.composite
def grouped(draw, *, lo=0.0, hi=1.0, min_size=2, max_size=6, max_groups=4, dtype=F64):
    """(rewards (N,), group_ids (N,), preds (N,)): groups of unequal sizes with arbitrary distinct
    ids, rows shuffled; values in [lo, hi], often exactly lo or hi (0/1 rewards)."""
    sizes = draw(st.lists(st.integers(min_size, max_size), min_size=1, max_size=max_groups))
    gids = draw(st.lists(st.integers(-10**9, 10**9), min_size=len(sizes), max_size=len(sizes),
                         unique=True))
    rows = [g for g, k in zip(gids, sizes) for _ in range(k)]
    n = len(rows)
    value = st.one_of(st.sampled_from([lo, hi]), finite(lo, hi))
    r = draw(st.lists(value, min_size=n, max_size=n))
    p = draw(st.lists(value, min_size=n, max_size=n))
    perm = draw(st.permutations(range(n)))
    return (torch.tensor([r[i] for i in perm], dtype=dtype),
            torch.tensor([rows[i] for i in perm], dtype=torch.long),
            torch.tensor([p[i] for i in perm], dtype=dtype))


def members(gid: torch.Tensor) -> list[list[int]]:
    """For each row, the row indices of its group (itself included)."""
    g = gid.tolist()
    return [[j for j in range(len(g)) if g[j] == g[i]] for i in range(len(g))]


def oracle(name: str, r: torch.Tensor, gid: torch.Tensor, p: torch.Tensor, eps: float):
    """(baseline, scale) per row by the plain-Python reading of POISE.md (groups of >= 2)."""
    rv, pv, grp = r.tolist(), p.tolist(), members(gid)
    base, scale = [], []
    for i, g in enumerate(grp):
        others = [j for j in g if j != i]
        if name == "poise":
            base.append(math.fsum(pv[j] for j in others) / len(others))
            scale.append(1.0)
        elif name == "rloo":
            base.append(math.fsum(rv[j] for j in others) / len(others))
            scale.append(1.0)
        elif name in ("grpo", "dapo", "dr_grpo"):
            m = math.fsum(rv[j] for j in g) / len(g)
            sd = math.sqrt(math.fsum((rv[j] - m) ** 2 for j in g) / (len(g) - 1))
            base.append(m)
            scale.append(1.0 if name == "dr_grpo" else sd + eps)
        elif name == "reinforce_pp":
            m = math.fsum(rv) / len(rv)
            sd = math.sqrt(math.fsum((x - m) ** 2 for x in rv) / (len(rv) - 1))
            base.append(m)
            scale.append(sd + eps)
    return torch.tensor(base, dtype=F64), torch.tensor(scale, dtype=F64)


@FAST
@given(batch=grouped(lo=-50.0, hi=50.0), eps=st.sampled_from([1e-6, 1e-4, 0.1]))
def test_identity_and_baselines_follow_the_spec(batch, eps):
    """A * scale + b = r, and b / scale are the spec's group statistics, for random groupings."""
    r, g, p = batch
    big = 1.0 + float(r.abs().max()) + float(p.abs().max())
    for name in PER_ROLLOUT:
        res = compute_advantages(name, r, g, preds=p, epsilon=eps)
        assert isinstance(res, AdvantageResult)
        assert res.advantages.shape == res.baselines.shape == res.scale.shape == r.shape
        assert res.identity_max_abs_err(r) <= 1e-9 * big, name
        base, scale = oracle(name, r, g, p, eps)
        torch.testing.assert_close(res.baselines, base, rtol=0, atol=1e-9 * big,
                                   msg=lambda m: f"{name} baselines: {m}")
        torch.testing.assert_close(res.scale, scale, rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"{name} scale: {m}")


@FAST
@given(batch=grouped(), data=st.data())
def test_permuting_rows_permutes_outputs_and_relabelling_groups_changes_nothing(batch, data):
    r, g, p = batch
    n = len(r)
    perm = torch.tensor(data.draw(st.permutations(range(n)), label="perm"))
    # a bijective relabelling of the prompt ids (their sorted order changes too): same values
    uniq = sorted(set(g.tolist()))
    new = data.draw(st.lists(st.integers(-10**12, 10**12), min_size=len(uniq),
                             max_size=len(uniq), unique=True), label="new ids")
    relabel = dict(zip(uniq, new))
    g2 = torch.tensor([relabel[x] for x in g.tolist()], dtype=torch.long)
    for name in PER_ROLLOUT:
        res = compute_advantages(name, r, g, preds=p)
        moved = compute_advantages(name, r[perm], g[perm], preds=p[perm])
        for got, want in [(moved.advantages, res.advantages[perm]),
                          (moved.baselines, res.baselines[perm]),
                          (moved.scale, res.scale[perm])]:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-7,
                                       msg=lambda m: f"{name} permuted: {m}")
        same = compute_advantages(name, r, g2, preds=p)
        for got, want in [(same.advantages, res.advantages), (same.baselines, res.baselines)]:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"{name} relabelled: {m}")


@FAST
@given(batch=grouped(), name=st.sampled_from(["rloo", "poise"]), data=st.data())
def test_leave_one_out_baseline_ignores_own_value_and_lies_within_the_others(batch, name, data):
    """b_i depends on the siblings only (unbiasedness) and is a mean of them: within their range."""
    r, g, p = batch
    vals = p if name == "poise" else r
    res = compute_advantages(name, r, g, preds=p)
    grp = members(g)
    for i in range(len(r)):
        others = [float(vals[j]) for j in grp[i] if j != i]
        b = float(res.baselines[i])
        assert min(others) - 1e-12 <= b <= max(others) + 1e-12
    i = data.draw(st.integers(0, len(r) - 1), label="row")
    new = data.draw(finite(-5.0, 5.0).filter(lambda x: x != float(vals[i])), label="new value")
    r2, p2 = r.clone(), p.clone()
    (p2 if name == "poise" else r2)[i] = new
    moved = compute_advantages(name, r2, g, preds=p2)
    assert moved.baselines[i] == res.baselines[i]
    outside = torch.tensor([g[j] != g[i] for j in range(len(r))])
    assert torch.equal(moved.baselines[outside], res.baselines[outside])


@FAST
@given(batch=grouped(lo=0.0, hi=1.0), eps=st.sampled_from([1e-6, 1e-2]))
def test_bounds_for_rewards_and_predictions_in_unit_interval(batch, eps):
    """r, g in [0, 1]: rloo, dr_grpo, poise A in [-1, 1]; grpo's centred A * scale in [-1, 1]
    and |A| <= (n - 1) / sqrt(n) (the largest z-score of n values, unbiased std)."""
    r, g, p = batch
    tol = 1e-12
    for name in ("rloo", "dr_grpo", "poise"):
        a = compute_advantages(name, r, g, preds=p).advantages
        assert bool((a.abs() <= 1 + tol).all()), (name, a)
    n_of = torch.tensor([len(m) for m in members(g)], dtype=F64)
    for name in ("grpo", "dapo"):
        res = compute_advantages(name, r, g, epsilon=eps)
        assert bool(((res.advantages * res.scale).abs() <= 1 + tol).all())
        assert bool((res.advantages.abs() <= (n_of - 1) / n_of.sqrt() + 1e-9).all()), name
    a = compute_advantages("reinforce_pp", r, g, epsilon=eps).advantages
    n = len(r)
    assert float(a.abs().max()) <= (n - 1) / math.sqrt(n) + 1e-9


@st.composite
def with_flat_group(draw, dtype):
    """A random batch plus one extra group whose rewards all equal v (v, size drawn)."""
    r, g, p = draw(grouped(dtype=dtype))
    v = draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.7, 0.1]), finite(0.0, 1.0)))
    k = draw(st.integers(2, 16))
    gid = int(g.max()) + 1
    return (torch.cat([r, torch.full((k,), v, dtype=dtype)]),
            torch.cat([g, torch.full((k,), gid, dtype=torch.long)]),
            torch.cat([p, torch.full((k,), 0.5, dtype=dtype)]), gid)


@FAST
@given(batch=with_flat_group(F64))
def test_zero_variance_group_gets_zero_advantage_float64(batch):
    """POISE.md: GRPO (r - mean)/std, Dr. GRPO r - mean, RLOO r_i - mean of the others are all 0
    for a group whose rewards are all equal (POISE's are not: 1 - g, -g; see the spec test)."""
    r, g, p, flat = batch
    for name in ZERO_ON_FLAT:
        a = compute_advantages(name, r, g, preds=p).advantages
        assert float(a[g == flat].abs().max()) <= 1e-6, name


@FEW
@given(batch=with_flat_group(torch.float32))
@example(batch=(torch.full((16,), 0.7), torch.zeros(16, dtype=torch.long), torch.zeros(16), 0))
def test_zero_variance_group_gets_zero_advantage_float32_grpo(batch):
    r, g, p, flat = batch
    a = compute_advantages("grpo", r, g).advantages
    assert float(a[g == flat].abs().max()) == 0.0   # once |A| = 0.106 (advantages fix, issue 16)


@FAST
@given(batch=grouped(lo=-1e6, hi=1e6, dtype=torch.float32),
       eps=st.sampled_from([1e-8, 1e-6, 1e-2]), gamma=finite(0.0, 1.0), data=st.data())
def test_finite_inputs_give_finite_outputs(batch, eps, gamma, data):
    r, g, p = batch
    for name in PER_ROLLOUT:
        res = compute_advantages(name, r, g, preds=p, epsilon=eps)
        for x in (res.advantages, res.baselines, res.scale):
            assert bool(torch.isfinite(x).all()), name
    t_len = data.draw(st.integers(2, 6), label="T")
    mask = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=t_len,
                                                    max_size=t_len),
                                           min_size=len(r), max_size=len(r)), label="mask"))
    mask[0, :2] = True                       # >= 2 counted tokens (masked_whiten's variance)
    for name in TOKEN_LEVEL:
        opts = {"gamma": gamma} if name == "reinforce_plus_plus" else {}
        res = compute_advantages(name, r, g, epsilon=eps, response_mask=mask, **opts)
        assert res.advantages.shape == mask.shape
        assert bool(torch.isfinite(res.advantages).all() & torch.isfinite(res.scale).all())
        assert bool((res.advantages[~mask] == 0).all()), name


@st.composite
def token_batch(draw):
    """rewards (N,), group_ids (N,), right-padded mask (N, T) with >= 2 counted tokens."""
    r, g, _ = draw(grouped(lo=-3.0, hi=3.0))
    t_len = draw(st.integers(2, 6))
    lens = draw(st.lists(st.integers(0, t_len), min_size=len(r), max_size=len(r)))
    lens[0] = max(lens[0], 2)                # >= 2 counted tokens (masked_whiten's variance)
    return r, g, torch.tensor([[j < n for j in range(t_len)] for n in lens])


@FAST
@given(batch=token_batch(), name=st.sampled_from(TOKEN_LEVEL), extra=st.integers(1, 4),
       gamma=finite(0.0, 1.0))
def test_token_level_ignores_padding_and_mask_dtype(batch, name, extra, gamma):
    """More padding columns, or the mask as float / int, change no counted token's advantage."""
    r, g, mask = batch
    opts = {"gamma": gamma} if name == "reinforce_plus_plus" else {}
    res = compute_advantages(name, r, g, response_mask=mask, **opts)
    assert bool((res.advantages[~mask] == 0).all())
    padded = torch.cat([mask, torch.zeros(len(r), extra, dtype=torch.bool)], 1)
    more = compute_advantages(name, r, g, response_mask=padded, **opts)
    torch.testing.assert_close(more.advantages[:, :mask.shape[1]], res.advantages,
                               rtol=1e-9, atol=1e-9)
    assert bool((more.advantages[:, mask.shape[1]:] == 0).all())
    for m in (mask.to(F64), mask.to(torch.int64)):
        other = compute_advantages(name, r, g, response_mask=m, **opts)
        torch.testing.assert_close(other.advantages, res.advantages, rtol=1e-9, atol=1e-9)


junk_value = st.one_of(finite(-1e30, 1e30), st.sampled_from([math.nan, math.inf, -math.inf]))


@FAST
@given(batch=token_batch(), data=st.data())
def test_values_at_masked_out_tokens_change_nothing(batch, data):
    """masked_whiten_scale and AdvantageResult.per_token / per_sequence read only counted tokens:
    any value (NaN and inf included) where response_mask == 0 leaves their output there alone."""
    _, _, mask = batch
    shape = tuple(mask.shape)
    n_cells = mask.numel()
    vals = torch.tensor(data.draw(st.lists(finite(-100, 100), min_size=n_cells,
                                           max_size=n_cells), label="values"),
                        dtype=F64).reshape(shape)
    junk = torch.tensor(data.draw(st.lists(junk_value, min_size=n_cells, max_size=n_cells),
                                  label="junk"), dtype=F64).reshape(shape)
    dirty = torch.where(mask, vals, junk)
    white, scale = masked_whiten_scale(vals, mask)
    white2, scale2 = masked_whiten_scale(dirty, mask)
    torch.testing.assert_close(white2[mask], white[mask], rtol=0, atol=0)
    torch.testing.assert_close(scale2, scale, rtol=0, atol=0)
    ones = torch.ones(shape, dtype=F64)
    clean = AdvantageResult(torch.where(mask, vals, 0.0), torch.zeros(shape, dtype=F64), ones)
    noisy = AdvantageResult(dirty, torch.zeros(shape, dtype=F64), ones)
    assert torch.equal(noisy.per_token(mask), clean.per_token(mask))
    assert bool((noisy.per_token(mask)[~mask] == 0).all())
    torch.testing.assert_close(noisy.per_sequence(mask), clean.per_sequence(mask), rtol=0, atol=0)
    # per-rollout advantages broadcast over the counted tokens only
    per_row = AdvantageResult(vals[:, 0].clone(), torch.zeros(shape[0], dtype=F64),
                              torch.ones(shape[0], dtype=F64))
    tok = per_row.per_token(mask)
    assert torch.equal(tok, torch.where(mask, vals[:, :1].expand(shape), 0.0))


@FAST
@given(batch=grouped(), data=st.data())
def test_poise_with_bootstrap_mixes_poise_and_rloo_by_whole_groups(batch, data):
    """A group uses the probe only if every rollout in it is ready; other groups get RLOO and
    their predictions (even NaN) change nothing."""
    r, g, p = batch
    n = len(r)
    ready = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="ready"))
    grp = members(g)
    all_ready = torch.tensor([all(bool(ready[j]) for j in m) for m in grp])
    p_nan = torch.where(all_ready, p, torch.full_like(p, math.nan))
    out, used = poise_with_bootstrap(r, g, p_nan, ready)
    assert torch.equal(used, all_ready)
    assert bool(torch.isfinite(out.advantages).all() & torch.isfinite(out.baselines).all())
    assert out.identity_max_abs_err(r) <= 1e-12
    poise_b, _ = oracle("poise", r, g, p, 0.0)
    rloo_b, _ = oracle("rloo", r, g, p, 0.0)
    torch.testing.assert_close(out.baselines, torch.where(used, poise_b, rloo_b),
                               rtol=0, atol=1e-12)
    junk = torch.tensor(data.draw(st.lists(junk_value, min_size=n, max_size=n), label="junk"),
                        dtype=F64)
    other = torch.where(all_ready, p, junk)
    out2, _ = poise_with_bootstrap(r, g, other, ready)
    assert torch.equal(out2.advantages, out.advantages)


@st.composite
def vm_batch(draw):
    r, g, p = draw(grouped(max_size=8))
    n = len(r)
    valid = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    new_invalid = torch.tensor(draw(st.lists(st.one_of(st.sampled_from([0.0, 1.0]),
                                                       finite(0.0, 1.0)),
                                             min_size=n, max_size=n)), dtype=F64)
    return r, g, valid, torch.where(valid, r, new_invalid)


VM_CASES = [(name, "empirical") for name in GROUP_ESTIMATORS] + [("grpo", "analytic"),
                                                                 ("grpo", "smoothed")]


@FAST
@given(batch=vm_batch(), case=st.sampled_from(VM_CASES),
       invalid=st.sampled_from(["mask", "penalty"]), penalty=finite(-2.0, 2.0),
       smoothing=finite(0.1, 3.0), eps=st.sampled_from([0.0, 1e-6, 1e-3]), data=st.data())
def test_validity_masking_ignores_invalid_rows(batch, case, invalid, penalty, smoothing, eps,
                                               data):
    """VM: invalid rows' rewards change no valid row's advantage; invalid rows get 0 or the
    penalty; A * scale + b = r everywhere; results are finite and permute with the rows; with
    empirical variance a valid row is the registry's estimator on its group's valid rows, or 0
    when it has no valid sibling."""
    r, g, valid, r2 = batch
    name, variance = case
    kw = dict(valid=valid, validity_mask=True, invalid=invalid, invalid_penalty=penalty,
              variance=variance, smoothing=smoothing, epsilon=eps)
    res = group_advantages(name, r, g, **kw)
    res2 = group_advantages(name, r2, g, **kw)
    assert torch.equal(res2.advantages[valid], res.advantages[valid])
    want_bad = 0.0 if invalid == "mask" else penalty
    assert bool((res.advantages[~valid] == want_bad).all())
    for out, rew in ((res, r), (res2, r2)):
        assert bool(torch.isfinite(out.advantages).all() & torch.isfinite(out.scale).all())
        assert out.identity_max_abs_err(rew) <= 1e-12
    perm = torch.tensor(data.draw(st.permutations(range(len(r))), label="perm"))
    moved = group_advantages(name, r[perm], g[perm], **(kw | {"valid": valid[perm]}))
    torch.testing.assert_close(moved.advantages, res.advantages[perm], rtol=1e-9, atol=1e-9)
    if variance == "empirical" and eps > 0:
        grp = members(g)
        for i in range(len(r)):
            if not valid[i]:
                continue
            sib = [j for j in grp[i] if valid[j]]
            if len(sib) < 2:
                assert res.advantages[i] == 0.0
                continue
            sub = compute_advantages(name, r[sib], g[sib], epsilon=eps)
            k = sib.index(i)
            assert float(res.advantages[i]) == pytest.approx(float(sub.advantages[k]),
                                                             rel=1e-12, abs=1e-12)


@FEW
@given(batch=grouped(lo=-5.0, hi=5.0))
def test_group_options_off_is_the_registry_estimator(batch):
    r, g, _ = batch
    for name in GROUP_ESTIMATORS:
        a = group_advantages(name, r, g)
        b = compute_advantages(name, r, g)
        assert torch.equal(a.advantages, b.advantages) and torch.equal(a.baselines, b.baselines)


# =============================================================================================
# 2. Config parser
# =============================================================================================

def _numeric_fields() -> dict[str, type]:
    """{"section.field": int or float} for every numeric (or optional numeric) config field."""
    out = {}
    for section, cls in section_classes().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            args = set(typing.get_args(tp)) - {type(None)}
            union = typing.get_origin(tp) in (typing.Union, types.UnionType)
            base = tp if tp in (int, float) else (args.pop() if union and len(args) == 1 else None)
            if base in (int, float):
                out[f"{section}.{f.name}"] = base
    return out


NUMERIC = _numeric_fields()
pos_float = st.floats(min_value=0.0, max_value=1e300, exclude_min=True, allow_nan=False,
                      allow_infinity=False)
VALID_VALUES = {  # field -> values its checks accept (ranges from config.py / config_methods.py)
    "optim.lr": pos_float, "probe.alpha": pos_float, "rollout.temperature": pos_float,
    "optim.max_grad_norm": pos_float, "critic.lr": pos_float,
    "optim.weight_decay": finite(0.0, 1e300), "algorithm.kl_coef": finite(0.0, 1e300),
    "data.eval_temperature": finite(0.0, 1e300), "rollout.top_p": finite(0.0, 1.0).filter(bool),
    "algorithm.epsilon": st.floats(0.0, 1.0, exclude_min=True, exclude_max=True),
    "rollout.is_cap": finite(1.0, 1e300), "group.gamma": finite(0.0, 1.0),
    "critic.lam": finite(0.0, 1.0), "group.invalid_penalty": finite(-1e300, 1e300),
    "trainer.total_steps": st.integers(1, 10**15), "trainer.seed": st.integers(-10**18, 10**18),
    "probe.prompt_window": st.integers(1, 10**9), "data.eval_n": st.integers(1, 10**9),
    "probe.layer": st.integers(-10**6, 10**6), "rollout.max_batch_tokens": st.integers(1, 10**12),
    "learning_rate": pos_float, "grad_clip": pos_float,   # TRL / verl aliases
}
ALIAS_OF = {"learning_rate": "optim.lr", "grad_clip": "optim.max_grad_norm"}


def _get(cfg, key: str):
    section, name = ALIAS_OF.get(key, key).split(".")
    return getattr(getattr(cfg, section), name)


@FAST
@given(data=st.data(), key=st.sampled_from(sorted(VALID_VALUES)),
       spelling=st.sampled_from(["repr", "g17", "spaces"]))
def test_valid_numeric_override_round_trips(data, key, spelling):
    value = data.draw(VALID_VALUES[key], label="value")
    text = {"repr": repr(value), "g17": f"{value:.17g}" if isinstance(value, float) else str(value),
            "spaces": f" {value!r} "}[spelling]
    assert parse_override(f"{key}={text}")[0] == key
    cfg = load_config(None, [f"{key}={text}"])
    got = _get(cfg, key)
    assert got == value and type(got) is type(value)


yaml_bits = st.sampled_from([
    "", "~", "null", "true", "no", "1", "-1", "0", "1.5", "1e-6", "1.0e+3", ".inf", "-.inf", ".nan",
    "nan", "inf", "0x1F", "0o17", "0b101", "1_000", "1:30", "2001-12-14", "[1, 2]", "{a: 1}",
    "'3'", '"4"', "- a", "a: b", "&x 1", "*x", "|\n 1", "!foo 1", "%", "@", "`", "{", "[",
    "1e400", "-0", "+1", "1.", ".5", "._", "0b_", "0x_", "1__2", "--1", "1e", "é", "１"])
random_value = st.one_of(
    st.text(max_size=30),
    yaml_bits,
    st.deferred(lambda: json_value).map(json.dumps),     # JSON is YAML: lists, maps, null
    st.lists(yaml_bits, min_size=1, max_size=3).map(" ".join),
    st.tuples(yaml_bits, st.text(max_size=8)).map("".join),
    st.integers(-10**30, 10**30).map(str),
    st.floats().map(repr),
).filter(lambda s: "!!" not in s and "!<" not in s)  # YAML core tags: their own test below


@FAST
@given(key=st.sampled_from(sorted(NUMERIC)), value=random_value)
@example(key="optim.lr", value="1e-6")          # YAML 1.1 reads this as a string
@example(key="optim.lr", value="{")
@example(key="trainer.seed", value="[1, 2]")
@example(key="probe.layer", value="2001-12-14")
def test_random_numeric_override_loads_or_raises_value_or_key_error(key, value):
    try:
        cfg = load_config(None, [f"{key}={value}"])
    except (ValueError, KeyError) as err:
        event(f"raised {type(err).__name__}")
        return
    event("loaded")
    got = _get(cfg, key)
    want = NUMERIC[key]
    assert got is None or (type(got) is want), (key, value, got)
    if key in CHECKED_FIELDS:
        assert math.isfinite(got), (key, value, got)


# fields whose checks require a finite value: positive (lr, alpha, temperature, ...),
# non-negative (weight_decay, kl_coef, ...) or just finite (invalid_penalty)
CHECKED_FIELDS = ["optim.lr", "probe.alpha", "rollout.temperature", "optim.max_grad_norm",
                   "rollout.is_cap", "rollout.top_p", "optim.weight_decay", "algorithm.kl_coef",
                   "algorithm.entropy_coeff", "data.eval_temperature",
                   "algorithm.overlong_penalty_factor", "group.invalid_penalty"]
NON_FINITE = st.sampled_from([".nan", ".NaN", "nan", "NaN", ".inf", ".Inf", "inf", "Infinity",
                              "1e999", "-.inf", "-inf", "-1e999"])


@pytest.mark.parametrize("key", CHECKED_FIELDS)
@FEW
@given(text=NON_FINITE)
def test_nan_and_inf_for_positive_fields_raise_naming_the_field(key, text):
    with pytest.raises(ValueError) as info:
        load_config(None, [f"{key}={text}"])
    assert key in str(info.value)


@pytest.mark.parametrize("key", ["critic.lr", "critic.weight_decay", "critic.max_grad_norm",
                                 "group.smoothing", "hista.min_d"])
def test_nan_and_inf_for_method_positive_fields_raise(key):
    for text in (".nan", ".inf", "1e999"):
        with pytest.raises(ValueError) as info:
            load_config(None, [f"{key}={text}"])
        assert key in str(info.value)


@pytest.mark.parametrize("value", ["!!timestamp x", "!!int", "!!float", "!!int _"])
def test_yaml_tagged_override_raises_value_error(value):
    with pytest.raises((ValueError, KeyError)):
        load_config(None, [f"optim.lr={value}"])


def test_huge_integer_for_float_field_raises_value_error():
    with pytest.raises(ValueError):
        load_config(None, ["optim.lr=" + "1" * 400])


@pytest.mark.parametrize("value", ["[1]", "{a: 1}"])
def test_alias_with_unhashable_value_raises_value_error(value):
    with pytest.raises(ValueError):
        load_config(None, [f"loss_type={value}"])


# =============================================================================================
# 3. Loaders: verl-format task files and metrics.jsonl
# =============================================================================================

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=8), kids, max_size=3)),
    max_leaves=8)
# text a file can hold: no line breaks, no lone surrogates (not encodable; their JSON escapes
# are tested on their own)
no_newline_text = st.text(st.characters(blacklist_characters="\n\r",
                                        blacklist_categories=("Cs",)), max_size=60)


@st.composite
def valid_row(draw):
    words = st.text(min_size=1, max_size=20).filter(str.strip)     # not blank
    prompt = draw(st.one_of(
        words,
        st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user"]),
                                        "content": st.text(max_size=20)}),
                 min_size=0, max_size=2).map(lambda m: m + [{"role": "user", "content": "Q?"}])))
    truth = draw(st.one_of(words.filter(lambda s: "def check" not in s),
                           st.integers(-10**12, 10**12), finite(-1e9, 1e9)))
    row = {"data_source": draw(st.text(min_size=1, max_size=12)), "prompt": prompt,
           "ability": draw(st.sampled_from(["math", "code", "logic", "Math", "reasoning", None])),
           "reward_model": {"style": "rule", "ground_truth": truth}}
    info = draw(st.fixed_dictionaries({}, optional={
        "domain": st.sampled_from(DOMAINS), "split": st.sampled_from(sorted(SPLIT_NAMES)),
        "index": st.integers(0, 100)}))
    if info or draw(st.booleans()):
        row["extra_info"] = info
    return row


@st.composite
def mutated_row(draw):
    """A valid row with one field replaced by (or added as) a random JSON value."""
    row = draw(valid_row())
    where = draw(st.sampled_from(["data_source", "prompt", "reward_model", "ground_truth",
                                  "extra_info", "ability", "domain", "split", "prompt[0]",
                                  "drop"]))
    junk = draw(json_value)
    if where == "ground_truth":
        row["reward_model"]["ground_truth"] = junk
    elif where in ("domain", "split"):
        row.setdefault("extra_info", {})[where] = junk
    elif where == "prompt[0]":
        row["prompt"] = [junk]
    elif where == "drop":
        row.pop(draw(st.sampled_from(["data_source", "prompt", "reward_model"])))
    else:
        row[where] = junk
    return row


LINE_KINDS = ["valid", "mutated", "json", "text", "blank"]


@st.composite
def jsonl_lines(draw):
    """[(kind, text)] lines without newlines; kinds valid / mutated / json / text / blank."""
    out = []
    for kind in draw(st.lists(st.sampled_from(LINE_KINDS), min_size=1, max_size=6)):
        ascii_only = draw(st.booleans())
        if kind == "valid":
            text = json.dumps(draw(valid_row()), ensure_ascii=ascii_only)
        elif kind == "mutated":
            text = json.dumps(draw(mutated_row()), ensure_ascii=ascii_only)
        elif kind == "json":
            text = json.dumps(draw(json_value), ensure_ascii=ascii_only)
        elif kind == "text":
            text = draw(no_newline_text)
        else:
            text = draw(st.sampled_from(["", " ", "\t", "  \t "]))
        out.append((kind, text))
    return out


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@FAST
@given(lines=jsonl_lines())
def test_task_file_loads_or_names_file_and_line(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_bytes("".join(text + "\n" for _, text in lines).encode("utf-8"))
        counted = [i for i, (_, text) in enumerate(lines, 1) if text.strip()]
        try:
            task = get_task(str(path))
        except ValueError as err:
            msg = str(err)
            event("raised: " + ("invalid JSON" if "invalid JSON" in msg else "bad row"))
            if not counted:
                assert "has no rows" in msg and str(path) in msg
                return
            assert f"{path} line " in msg, msg
            lineno = int(msg.split(f"{path} line ", 1)[1].split(":", 1)[0])
            assert lineno in counted and lines[lineno - 1][0] != "valid", (lineno, msg)
            bad_json = [i for i in counted if not _parses(lines[i - 1][1])]
            if bad_json:       # the whole file is parsed first: the first invalid JSON line
                assert lineno == bad_json[0] and "invalid JSON" in msg
            return
        event("loaded")
        assert counted and len(task) == len(counted)
        assert all(lines[i - 1][0] != "text" or _parses(lines[i - 1][1]) for i in counted)
        rows = [json.loads(lines[i - 1][1]) for i in counted]
        assert [ex.data_source for ex in task.examples] == [row["data_source"] for row in rows]
        assert all(ex.domain in DOMAINS for ex in task.examples)


@pytest.mark.parametrize("bad", [
    pytest.param(b'{"data_source": "\xff"}', id="invalid-utf8"),
    pytest.param(b'{"data_source": "t", "prompt": "p", "reward_model": {"ground_truth": '
                 + b"1" * 5000 + b"}}", id="5000-digit-int"),
    pytest.param(b"[" * 100000 + b"]" * 100000, id="deep-nesting"),
    pytest.param(b'{"data_source": "t", "prompt": "\\ud800", "reward_model": '
                 b'{"ground_truth": "1"}}', id="lone-surrogate"),
])
def test_task_file_pathological_line_raises_value_error_naming_the_line(tmp_path, bad):
    good = json.dumps({"data_source": "t", "prompt": "p", "reward_model": {"ground_truth": "1"}})
    path = tmp_path / "rows.jsonl"
    path.write_bytes(good.encode() + b"\n" + bad + b"\n")
    with pytest.raises(ValueError) as info:
        get_task(str(path))
    assert f"{path} line 2" in str(info.value)


def test_task_file_lines_are_newline_separated_only(tmp_path):
    good = {"data_source": "t", "prompt": "p", "reward_model": {"ground_truth": "1"}}
    cr = json.dumps(good).replace(", ", ",\r", 1)
    assert json.loads(cr) == good
    path = tmp_path / "rows.jsonl"
    path.write_bytes((json.dumps(good) + "\n" + cr + "\n").encode())
    assert len(get_task(str(path))) == 2


# -- metrics.jsonl ------------------------------------------------------------------------------

metric_record = st.builds(
    lambda step, metrics: {"step": step, **metrics},
    st.integers(0, 10**6),
    st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k != "step"),
                    st.one_of(finite(-1e9, 1e9), st.integers(-10**9, 10**9),
                              st.text(max_size=8), st.none()), max_size=4))


def _is_record(raw: bytes) -> bool:
    """The reader's contract: a JSON object with an integer (not bool) 'step'."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return False
    return isinstance(obj, dict) and type(obj.get("step")) is int


garbage_line = st.one_of(
    st.binary(min_size=1, max_size=40),
    no_newline_text.map(lambda s: s.encode("utf-8")),
    json_value.map(lambda v: json.dumps(v).encode()),
    metric_record.map(lambda r: json.dumps(r).encode()[:-1]),            # cut short
    metric_record.map(lambda r: json.dumps({**r, "step": str(r["step"])}).encode()),
    st.sampled_from([b'{"step": true}', b'{"step": 1.0}', b"[1]", b'"step"', b"null"]),
).map(lambda b: b.replace(b"\n", b" ")).filter(lambda b: bool(b.strip()) and not _is_record(b))


def _run_dir(tmp: str) -> Path:
    run = Path(tmp) / "run"
    run.mkdir()
    (run / "meta.json").write_text(json.dumps({"schema_version": 1}))
    return run


def _encode(records, blanks) -> list[bytes]:
    lines = []
    for rec, blank in zip(records, blanks):
        if blank:
            lines.append(b"  ")
        lines.append(json.dumps(rec).encode())
    return lines


@FAST
@given(records=st.lists(metric_record, max_size=5), blanks=st.lists(st.booleans(), min_size=5,
                                                                    max_size=5),
       torn=st.one_of(st.just(b""), garbage_line, metric_record.map(lambda r: json.dumps(r)
                                                                    .encode())),
       torn_complete=st.booleans())
def test_metrics_skip_a_torn_last_line(records, blanks, torn, torn_complete):
    """A last piece without a newline (even if it parses) is being written: not returned. A
    complete last line that does not parse is treated the same (re-read once more follows)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = _run_dir(tmp)
        data = b"".join(line + b"\n" for line in _encode(records, blanks))
        ending = torn
        if torn_complete and torn and not _is_record(torn):
            ending = torn + b"\n"
        (run / "metrics.jsonl").write_bytes(data + ending)
        reader = RunReader(run)
        for errors in ("raise", "skip"):
            assert reader.metrics(errors=errors) == records


@FAST
@given(records=st.lists(metric_record, min_size=1, max_size=5),
       blanks=st.lists(st.booleans(), min_size=5, max_size=5), bad=garbage_line,
       data=st.data())
def test_metrics_corrupt_middle_line_raises_naming_it_or_is_skipped(records, blanks, bad, data):
    lines = _encode(records, blanks)
    where = data.draw(st.integers(0, len(lines) - 1), label="insert before line index")
    lines.insert(where, bad)
    with tempfile.TemporaryDirectory() as tmp:
        run = _run_dir(tmp)
        path = run / "metrics.jsonl"
        path.write_bytes(b"".join(line + b"\n" for line in lines))
        reader = RunReader(run)
        with pytest.raises(ValueError) as info:
            reader.metrics()
        assert f"{path}:{where + 1}:" in str(info.value)
        assert reader.metrics(errors="skip") == records


@pytest.mark.parametrize("bad", [b'{"step": 1, "x": ' + b"1" * 5000 + b"}",
                                 b"[" * 100000 + b"]" * 100000],
                         ids=["5000-digit-int", "deep-nesting"])
def test_metrics_pathological_middle_line_is_skipped(tmp_path, bad):
    run = _run_dir(str(tmp_path))
    good = b'{"step": 0, "a": 1}\n'
    (run / "metrics.jsonl").write_bytes(good + bad + b"\n" + good)
    assert RunReader(run).metrics(errors="skip") == [{"step": 0, "a": 1}] * 2
