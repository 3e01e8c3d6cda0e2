"""RidgeProbe, loo_targets, ProbeBuffer and ProbeBank: sklearn contract, exact round trips, and
the ordering rule that keeps POISE baselines unbiased (predict before this step's rows enter)."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from sklearn.compose import ColumnTransformer
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from poise_probe.probe import ProbeBank, ProbeBuffer, RidgeProbe, loo_targets

# --------------------------------------------------------------------------------------------
# scikit-learn contract
# --------------------------------------------------------------------------------------------

_Y_IN_CLIP = ("fit refuses targets outside clip=(0, 1) by design (rewards are in [0, 1]); "
              "this check fits on unbounded regression targets. RidgeProbe(clip=None) passes it.")


# Each check below fits on targets outside [0, 1] (integer classes, standardized regression
# targets), which a probe clipped to [0, 1] refuses on purpose. The same checks pass on
# RidgeProbe(clip=None), which is also parametrized here, so only the target-range rule is waived.
_FIT_ON_UNBOUNDED_Y = (
    "check_dict_unchanged",
    "check_dont_overwrite_parameters",
    "check_dtype_object",
    "check_estimators_dtypes",
    "check_estimators_fit_returns_self",
    "check_estimators_overwrite_params",
    "check_f_contiguous_array_estimator",
    "check_fit2d_1feature",
    "check_fit2d_predict1d",
    "check_fit_check_is_fitted",
    "check_fit_idempotent",
    "check_fit_score_takes_y",
    "check_methods_sample_order_invariance",
    "check_methods_subset_invariance",
    "check_n_features_in",
    "check_n_features_in_after_fitting",
    "check_positive_only_tag_during_fit",
    "check_readonly_memmap_input",
    "check_regressor_data_not_an_array",
    "check_regressors_int",
    "check_regressors_no_decision_function",
    "check_regressors_train",
    "check_supervised_y_2d",
)


def _expected_failed_checks(est):
    if est.clip is None:
        return {}
    return {name: _Y_IN_CLIP for name in _FIT_ON_UNBOUNDED_Y}


@parametrize_with_checks(
    [RidgeProbe(), RidgeProbe(clip=None), RidgeProbe(pca_components=8, clip=None)],
    expected_failed_checks=_expected_failed_checks)
def test_sklearn_compatible(estimator, check):
    check(estimator)


# --------------------------------------------------------------------------------------------
# RidgeProbe: equals the hand-built pipeline, validation, snapshots
# --------------------------------------------------------------------------------------------

D_BLOCK, N_ENT = 6, 3
BLOCKS = (D_BLOCK, D_BLOCK, N_ENT)


def _data(n=80, seed=0):
    """Features laid out as [prompt vec; reasoning vec; 3 entropies], targets in [0, 1]."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, sum(BLOCKS))) * rng.uniform(0.5, 3.0, size=sum(BLOCKS))
    y = 1.0 / (1.0 + np.exp(-(X[:, :4].sum(axis=1) + 0.5 * rng.normal(size=n))))
    return X, y


@pytest.mark.parametrize("alpha", [0.01, 10.0])
def test_probe_matches_hand_built_scaler_ridge_clip(alpha):
    X, y = _data()
    probe = RidgeProbe(alpha=alpha).fit(X, y)
    ref = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(X, y)
    Xt = _data(40, seed=1)[0] * 2.0  # wider inputs, so some raw outputs leave [0, 1]
    raw = ref.predict(Xt)
    assert ((raw < 0) | (raw > 1)).any()
    np.testing.assert_allclose(probe.predict_raw(Xt), raw, rtol=0, atol=1e-10)
    np.testing.assert_allclose(probe.predict(Xt), np.clip(raw, 0.0, 1.0), rtol=0, atol=1e-10)


def test_probe_with_block_pca_matches_hand_built_pipeline():
    X, y = _data()
    probe = RidgeProbe(alpha=100.0, blocks=BLOCKS, pca_components=(2, 4, None)).fit(X, y)
    a, b = D_BLOCK, 2 * D_BLOCK
    ref = make_pipeline(
        StandardScaler(),
        ColumnTransformer([("prompt", PCA(2, random_state=0), list(range(0, a))),
                           ("reasoning", PCA(4, random_state=0), list(range(a, b))),
                           ("entropy", "passthrough", list(range(b, b + N_ENT)))]),
        Ridge(alpha=100.0)).fit(X, y)
    Xt = _data(40, seed=1)[0]
    np.testing.assert_allclose(probe.predict_raw(Xt), ref.predict(Xt), rtol=0, atol=1e-10)
    assert probe.n_components_ == (2, 4, None)
    assert probe.pcas_[2] is None and probe.ridge_.coef_.shape == (2 + 4 + N_ENT,)


def test_pca_components_capped_at_samples_and_block_size():
    X, y = _data(n=5)
    probe = RidgeProbe(blocks=BLOCKS, pca_components=(32, 3, 64)).fit(X, y)
    # prompt: min(32, n-1=4, 6) = 4; reasoning: 3; entropies: min(64, 4, 3) = 3
    assert probe.n_components_ == (4, 3, 3)
    assert RidgeProbe(pca_components=2).fit(X, y).n_components_ == (2,)


def test_predict_before_fit_raises():
    with pytest.raises(NotFittedError):
        RidgeProbe().predict(np.zeros((2, 3)))


@pytest.mark.parametrize("where, match", [("X", r"X contains NaN or inf \(first bad row: 7\)"),
                                          ("y", r"y contains NaN or inf \(first bad row: 7\)")])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_fit_names_nonfinite_input_and_row(where, match, bad):
    X, y = _data()
    if where == "X":
        X[7, 3] = bad
    else:
        y[7] = bad
    with pytest.raises(ValueError, match=match):
        RidgeProbe().fit(X, y)


def test_predict_names_nonfinite_row():
    X, y = _data()
    probe = RidgeProbe().fit(X, y)
    X[4, 0] = np.nan
    with pytest.raises(ValueError, match=r"first bad row: 4"):
        probe.predict(X)


@pytest.mark.parametrize("value", [-0.01, 1.01])
def test_fit_refuses_targets_outside_unit_interval(value):
    X, y = _data()
    y[3] = value
    with pytest.raises(ValueError, match=r"y must lie in clip.*y\[3\]"):
        RidgeProbe().fit(X, y)
    y[3] = 1.0 + 1e-9  # float noise within tolerance is fine
    RidgeProbe().fit(X, y)
    y[3] = value
    RidgeProbe(clip=None).fit(X, y)  # unbounded targets are allowed without a clip


def test_blocks_must_sum_to_n_features():
    X, y = _data()
    with pytest.raises(ValueError, match=r"blocks \(6, 6\) sum to 12 but X has 15 features"):
        RidgeProbe(blocks=(6, 6)).fit(X, y)


@pytest.mark.parametrize("pca, match", [((2, 4), "2 entries but there are 3 blocks"),
                                        ((2, 0, None), "positive ints or None")])
def test_bad_pca_components(pca, match):
    X, y = _data()
    with pytest.raises(ValueError, match=match):
        RidgeProbe(blocks=BLOCKS, pca_components=pca).fit(X, y)


@pytest.mark.parametrize("clip", [(1.0, 0.0), (0.5,)])
def test_bad_clip(clip):
    X, y = _data()
    with pytest.raises(ValueError, match="clip"):
        RidgeProbe(clip=clip).fit(X, y)


@pytest.mark.parametrize("params", [
    dict(alpha=0.01),
    dict(alpha=100.0, blocks=BLOCKS, pca_components=(2, 4, None)),
    dict(alpha=1.0, pca_components=3, clip=None),
    dict(alpha=1.0, blocks=BLOCKS, pca_components=(None, 2, None), clip=(0.0, None)),
])
def test_to_arrays_round_trip_is_exact_through_safetensors(params):
    X, y = _data()
    probe = RidgeProbe(**params).fit(X, y)
    arrays = probe.to_arrays()
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float64 for v in arrays.values())
    loaded = RidgeProbe.from_arrays(st_load(st_save(arrays)))
    Xt = _data(40, seed=1)[0] * 2.0
    np.testing.assert_array_equal(loaded.predict(Xt), probe.predict(Xt))
    np.testing.assert_array_equal(loaded.predict_raw(Xt), probe.predict_raw(Xt))
    assert loaded.get_params() == probe.get_params()
    assert loaded.n_components_ == probe.n_components_


def test_from_arrays_keyword_overrides_and_missing_keys():
    X, y = _data()
    arrays = RidgeProbe().fit(X, y).to_arrays()
    assert RidgeProbe.from_arrays(arrays, alpha=5.0).alpha == 5.0
    del arrays["ridge.coef"]
    with pytest.raises(ValueError, match=r"miss \['ridge.coef'\]"):
        RidgeProbe.from_arrays(arrays)


# --------------------------------------------------------------------------------------------
# loo_targets
# --------------------------------------------------------------------------------------------

def test_loo_targets_hand_values():
    # POISE.md check: rewards [0, .5, 1] -> targets [.75, .5, .25]
    np.testing.assert_allclose(loo_targets([0.0, 0.5, 1.0], [7, 7, 7]), [0.75, 0.5, 0.25])
    # two rollouts: each target is exactly the sibling's reward; groups may interleave
    r = [1.0, 0.3, 0.0, 0.7]
    np.testing.assert_array_equal(loo_targets(r, ["a", "b", "a", "b"]), [0.0, 0.7, 1.0, 0.3])


def test_loo_targets_refuses_lone_rollouts_and_nan():
    with pytest.raises(ValueError, match=r"groups with one rollout: \['b'\]"):
        loo_targets([1.0, 0.0, 1.0], ["a", "a", "b"])
    with pytest.raises(ValueError, match="rewards contains NaN"):
        loo_targets([1.0, np.nan], [0, 0])


# --------------------------------------------------------------------------------------------
# ProbeBuffer
# --------------------------------------------------------------------------------------------

def _step_rows(step, n_groups, k=2, d=4, seed=None):
    """One step's rows: n_groups prompts x k rollouts, features unique across steps."""
    rng = np.random.default_rng(step if seed is None else seed)
    X = rng.normal(size=(n_groups * k, d)).astype(np.float32)
    r = rng.integers(0, 2, size=n_groups * k).astype(float)
    gids = np.repeat(np.arange(n_groups), k)
    return X, r, gids


def test_buffer_stores_loo_targets_and_evicts_whole_groups_oldest_first():
    buf = ProbeBuffer(capacity=10)
    X0, r0, g0 = _step_rows(0, 3, k=2)           # 6 rows, 3 groups
    buf.add(X0, r0, g0, step=0)
    np.testing.assert_array_equal(buf.y, loo_targets(r0, g0))
    X1 = np.arange(15, dtype=np.float32).reshape(5, 3)[:, :1].repeat(4, axis=1) + 100
    r1, g1 = np.array([1.0, 0.0, 1.0, 1.0, 0.0]), np.array([5, 6, 5, 6, 6])  # sizes 2 and 3
    buf.add(X1, r1, g1, step=1)                   # 11 rows > 10: drop step 0's first group
    assert buf.n_rows == 9 and buf.n_groups == 4 and buf.steps == [0, 1]
    np.testing.assert_array_equal(buf.X[:4], X0[2:])
    np.testing.assert_array_equal(buf.X[4:], X1)
    np.testing.assert_array_equal(buf.rewards[4:], r1)
    buf.add(*_step_rows(2, 3, k=2), step=2)       # 15 rows, excess 5: drop 3 oldest groups
    assert buf.n_rows == 9 and buf.steps == [1, 2]  # (2 + 2 from step 0, then step 1's id 5)
    np.testing.assert_array_equal(buf.X[:3], X1[[1, 3, 4]])  # id 6 (interleaved) stays whole
    np.testing.assert_array_equal(buf.y[:3], [0.5, 0.0, 0.5])
    # every group in the buffer is complete
    _, counts = np.unique(buf.row_groups, return_counts=True)
    assert sorted(counts.tolist()) == [2, 2, 2, 3]


def test_buffer_never_splits_a_group_larger_than_the_excess():
    buf = ProbeBuffer(capacity=6)
    buf.add(np.ones((4, 2)), [1, 0, 1, 0], [0, 0, 0, 0], step=0)   # one group of 4
    buf.add(np.zeros((4, 2)), [1, 0, 0, 1], [1, 1, 2, 2], step=1)  # 8 rows: drop the 4-group
    assert buf.n_rows == 4 and buf.steps == [1]


def test_buffer_validation():
    buf = ProbeBuffer(capacity=4)
    with pytest.raises(ValueError, match="exceeds capacity=4"):
        buf.add(np.zeros((6, 2)), np.zeros(6), np.zeros(6), step=0)
    buf.add(np.zeros((2, 2)), [0, 1], [0, 0], step=0)
    with pytest.raises(ValueError, match="3 columns but the buffer holds 2-feature rows"):
        buf.add(np.zeros((2, 3)), [0, 1], [0, 0], step=1)
    with pytest.raises(ValueError, match=r"features contains NaN or inf \(first bad row: 1\)"):
        buf.add(np.array([[0.0, 0.0], [np.nan, 0.0]]), [0, 1], [0, 0], step=1)
    with pytest.raises(ValueError, match="one rollout"):
        buf.add(np.zeros((3, 2)), [0, 1, 1], [0, 0, 1], step=1)


def test_buffer_state_dict_round_trip_is_exact_and_resumes_identically():
    a, b = ProbeBuffer(capacity=12), ProbeBuffer(capacity=12)
    for step in range(4):
        a.add(*_step_rows(step, 2 + step % 2), step=step)
    b.load_state_dict(st_load(st_save(a.state_dict())))
    for key in ("X", "y", "rewards", "row_groups", "row_steps"):
        np.testing.assert_array_equal(getattr(b, key), getattr(a, key))
    assert b.X.dtype == a.X.dtype == np.float32
    for step in range(4, 7):  # same evictions afterwards
        a.add(*_step_rows(step, 3), step=step)
        b.add(*_step_rows(step, 3), step=step)
    for key, v in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[key], v)
    with pytest.raises(ValueError, match="capacity=12 but this buffer has capacity=8"):
        ProbeBuffer(capacity=8).load_state_dict(a.state_dict())


# --------------------------------------------------------------------------------------------
# ProbeBank
# --------------------------------------------------------------------------------------------

def _bank_step(step, n_groups=4, d=5):
    """Half math, half code prompts, two rollouts each; rewards depend on the features."""
    rng = np.random.default_rng(1000 + step)
    X = rng.normal(size=(2 * n_groups, d)).astype(np.float32)
    r = (X[:, 0] + 0.3 * rng.normal(size=2 * n_groups) > 0).astype(float)
    gids = np.repeat(np.arange(n_groups), 2)
    domains = ["math" if g % 2 == 0 else "code" for g in gids]
    return X, r, gids, domains


def test_route():
    bank = ProbeBank()
    assert [bank.route(d) for d in ("math", "code", "logic", "stem")] == \
        ["math", "code", "other", "other"]
    single = ProbeBank({"all": 4096})
    assert single.route("math") == single.route("code") == "all"
    with pytest.raises(ValueError, match="no 'other' bucket"):
        ProbeBank({"math": 10, "code": 10}).route("logic")


def test_bank_fits_only_after_min_steps_and_unfitted_rows_are_nan():
    bank = ProbeBank(min_steps_to_fit=3)
    for step in range(3):
        X, r, g, dom = _bank_step(step)
        preds, mask, raw = bank.predict(X, dom)
        assert not mask.any() and np.isnan(preds).all() and np.isnan(raw).all()
        m = bank.update(X, r, g, dom, step)
        assert m["probe/math/fitted"] == float(step == 2)
        assert m["probe/other/n_rows"] == 0.0 and m["probe/other/fitted"] == 0.0
    assert m["probe/math/n_rows"] == 12.0 and m["probe/math/n_steps"] == 3.0
    assert m["probe/math/refit"] == 1.0 and m["probe/fit_s"] >= m["probe/math/fit_s"] >= 0.0
    assert bank.is_fitted("math") and bank.is_fitted("code") and not bank.is_fitted("other")
    X, r, g, dom = _bank_step(3)
    dom = [d if i < 6 else "logic" for i, d in enumerate(dom)]  # last group -> unfitted "other"
    preds, mask, raw = bank.predict(X, dom)
    assert mask.tolist() == [True] * 6 + [False] * 2
    assert np.isnan(preds[6:]).all()
    assert ((preds[:6] >= 0) & (preds[:6] <= 1)).all()
    np.testing.assert_array_equal(preds[:6], np.clip(raw[:6], 0, 1))
    math_rows = [i for i, d in enumerate(dom) if d == "math"]
    np.testing.assert_array_equal(preds[math_rows], bank.probes["math"].predict(X[math_rows]))


def test_bank_refuses_groups_split_across_buckets_and_bad_rewards():
    bank = ProbeBank(min_steps_to_fit=1)
    X = np.zeros((2, 3))
    with pytest.raises(ValueError, match="routed to 'math' and 'code'"):
        bank.update(X, [1.0, 0.0], [0, 0], ["math", "code"], 0)
    with pytest.raises(ValueError, match=r"rewards\[1\] = 2"):
        bank.update(X, [1.0, 2.0], [0, 0], ["math", "math"], 0)


def test_bank_update_is_all_or_nothing():
    bank = ProbeBank(min_steps_to_fit=1)
    X = np.zeros((4, 3))
    with pytest.raises(ValueError, match="one rollout"):  # the code group is a lone rollout
        bank.update(X[:3], [1.0, 0.0, 1.0], [0, 0, 1], ["math", "math", "code"], 0)
    with pytest.raises(ValueError, match=r"features contains NaN or inf \(first bad row: 2\)"):
        bank.update(np.array([[0.0] * 3, [0.0] * 3, [np.nan] * 3, [0.0] * 3]),
                    [1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], ["math", "math", "code", "code"], 0)
    assert all(buf.n_rows == 0 for buf in bank.buffers.values())


def _run_trainer_order(bank, steps):
    """The trainer's order: predict (baselines frozen) -> update. Returns preds per step."""
    out = []
    for step in steps:
        X, r, g, dom = _bank_step(step)
        preds, mask, raw = bank.predict(X, dom)
        out.append((preds, mask, raw))
        bank.update(X, r, g, dom, step)
    return out


def test_predictions_do_not_depend_on_rows_added_later():
    bank = ProbeBank(min_steps_to_fit=2)
    _run_trainer_order(bank, range(4))
    X, r, g, dom = _bank_step(4)
    preds, mask, raw = bank.predict(X, dom)
    frozen = (preds.copy(), mask.copy(), raw.copy())
    fresh = ProbeBank(min_steps_to_fit=2)           # same history, never sees step 4
    _run_trainer_order(fresh, range(4))

    bank.update(X, r, g, dom, 4)                    # this step's rows enter after predict
    for held, copy in zip((preds, mask, raw), frozen):
        np.testing.assert_array_equal(held, copy)   # returned arrays are not views on state
    for got, want in zip(fresh.predict(X, dom), frozen):
        np.testing.assert_array_equal(got, want)
    # the test is sensitive: a probe refit on this batch predicts differently
    assert not np.allclose(bank.predict(X, dom)[0], frozen[0])


def test_bank_never_fits_on_rows_before_they_are_added(monkeypatch):
    added: set[bytes] = set()
    fitted_on: set[bytes] = set()
    real_add, real_fit = ProbeBuffer.add, RidgeProbe.fit

    def spy_add(self, features, rewards, group_ids, step):
        real_add(self, features, rewards, group_ids, step)
        added.update(np.asarray(row, dtype=np.float32).tobytes() for row in features)

    def spy_fit(self, X, y):
        rows = {np.asarray(row, dtype=np.float32).tobytes() for row in X}
        assert rows <= added, "probe fit on rows that were never added to a buffer"
        fitted_on.update(rows)
        return real_fit(self, X, y)

    monkeypatch.setattr(ProbeBuffer, "add", spy_add)
    monkeypatch.setattr(RidgeProbe, "fit", spy_fit)
    bank = ProbeBank(min_steps_to_fit=2)
    n_fit_steps = 0
    for step in range(6):
        X, r, g, dom = _bank_step(step)
        batch = {row.tobytes() for row in X}
        assert not batch & fitted_on, "a step's rows reached a probe before its predictions"
        bank.predict(X, dom)
        m = bank.update(X, r, g, dom, step)
        n_fit_steps += m["probe/math/refit"] > 0
        assert batch <= fitted_on or step < 1   # from step 1 on, update fits on the batch
    assert n_fit_steps == 5


def test_bank_state_dict_round_trip_through_safetensors():
    params = dict(min_steps_to_fit=2, alpha=1.0, pca_components=2)
    bank = ProbeBank(**params)
    _run_trainer_order(bank, range(5))
    restored = ProbeBank(**params)
    restored.load_state_dict(st_load(st_save(bank.state_dict())))
    assert restored.fit_steps == bank.fit_steps
    X, r, g, dom = _bank_step(5)
    dom = dom[:6] + ["stem", "stem"]
    for got, want in zip(restored.predict(X, dom), bank.predict(X, dom)):
        np.testing.assert_array_equal(got, want)
    # and both continue identically
    for b in (bank, restored):
        _run_trainer_order(b, range(5, 8))
    for got, want in zip(restored.predict(X, dom), bank.predict(X, dom)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"buckets \['extra'\]"):
        restored.load_state_dict({**bank.state_dict(), "extra/buffer/X": np.zeros((0, 5))})
