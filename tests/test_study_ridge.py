"""Study ridge machinery: equal to sklearn and to the trainer's RidgeProbe, prompt-grouped folds
that never leak a prompt, and nested alpha selection that never looks at the outer test fold."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.metrics import make_scorer
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from poise_probe.probe import RidgeProbe
from poise_probe.study.ridge import (
    CVResult,
    RidgePath,
    check_no_leak,
    cross_val_predict,
    fit_predict,
    grouped_folds,
    prompt_groups,
)

ALPHAS = [1e-2, 1.0, 100.0]


def _design(n, p, seed=0, constant_col=None):
    """Features with uneven scales and offsets (like pooled hidden states). -> (n, p)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) * rng.uniform(0.1, 10, p) + rng.uniform(-50, 50, p)
    if constant_col is not None:
        X[:, constant_col] = 0.1  # 0.1 does not sum exactly: the mean carries rounding
    return X


def _probe_data(n_prompts=120, k=4, p=30, noise=0.1, seed=0):
    """Prompt-grouped rows whose target is a noisy linear prompt value in [0, 1]."""
    rng = np.random.default_rng(seed)
    prompt_vec = rng.standard_normal((n_prompts, p))
    w = rng.standard_normal(p) / np.sqrt(p)
    value = 1 / (1 + np.exp(-2 * prompt_vec @ w))  # (P,)
    groups = np.repeat(np.arange(n_prompts), k)
    X = prompt_vec[groups] + 0.3 * rng.standard_normal((n_prompts * k, p))
    y = np.clip(value[groups] + noise * rng.standard_normal(n_prompts * k), 0, 1)
    return X, y, groups


# --------------------------------------------------------------------------------------------
# RidgePath == StandardScaler -> Ridge
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, p", [(60, 10), (25, 80), (40, 40), (300, 3), (80, 400)],
                         ids=["tall", "wide", "square", "few-features", "wide-study-like"])
@pytest.mark.parametrize("constant_col", [None, 2], ids=["", "constant-col"])
def test_ridge_path_matches_sklearn_pipeline(n, p, constant_col):
    """The closed form kept for speed (benchmarks/bench_ridge.py) is scikit-learn's pipeline."""
    X = _design(n, p, seed=n + p, constant_col=constant_col)
    rng = np.random.default_rng(1)
    y = rng.uniform(0, 1, n)
    X_test = _design(17, p, seed=99)
    alphas = [1e-3, 1e-2, 1.0, 100.0, 1e4]
    path = RidgePath(X, y)
    preds = path.predict(X_test, alphas)  # one call, every alpha
    assert preds.shape == (len(alphas), 17)
    for i, alpha in enumerate(alphas):
        ref = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(X, y)
        want = ref.predict(X_test)
        np.testing.assert_allclose(preds[i], want, rtol=1e-8, atol=1e-8 * np.abs(want).max())
        np.testing.assert_allclose(path.coef(alpha), ref[-1].coef_, rtol=1e-8,
                                   atol=1e-8 * np.abs(ref[-1].coef_).max())
        assert path.intercept_ == pytest.approx(ref[-1].intercept_, abs=1e-12)


def test_standardisation_matches_standardscaler_constant_column_unscaled():
    X = _design(50, 6, constant_col=3)
    # Column 5 differs only in the last bit (variance ~3e-27, not 0): sklearn's error bound
    # calls it constant and leaves it unscaled; dividing by its std would blow it up to +-1.
    X[:, 5] = np.where(np.arange(50) % 2 == 0, 1e3, np.nextafter(1e3, 2e3))
    path = RidgePath(X, np.linspace(0, 1, 50))
    ref = StandardScaler().fit(X)
    np.testing.assert_allclose(path.mean_, ref.mean_, rtol=1e-14)
    np.testing.assert_array_equal(path.scale_[[3, 5]], [1.0, 1.0])
    np.testing.assert_array_equal(ref.scale_[[3, 5]], [1.0, 1.0])
    np.testing.assert_allclose(path.scale_, ref.scale_, rtol=1e-12)


def test_float32_input_is_computed_in_float64():
    X = _design(80, 12).astype(np.float32)
    y = np.random.default_rng(2).uniform(0, 1, 80)
    a = RidgePath(X, y).predict(X[:5], ALPHAS)
    b = RidgePath(X.astype(np.float64), y).predict(X[:5].astype(np.float64), ALPHAS)
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------
# fit_predict == the trainer's probe
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.01, 100.0])  # paper v2 raw features; release value
@pytest.mark.parametrize("n, p", [(200, 40), (30, 90)], ids=["tall", "wide"])
def test_fit_predict_equals_trainer_ridge_probe(alpha, n, p):
    """Ties the study to the probe the trainer uses: RidgeProbe without PCA, clipped to [0, 1]."""
    X, y, _ = _probe_data(n_prompts=n // 2, k=2, p=p, noise=0.3, seed=n)
    X_src, y_src = X.astype(np.float32), y
    X_dst = (X[: n // 2] * 3.0 + 1.0).astype(np.float32)  # another domain: shifted features
    ours = fit_predict(X_src, y_src, X_dst, alpha)
    theirs = RidgeProbe(alpha=alpha).fit(X_src, y_src).predict(X_dst)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    assert ((ours == 0) | (ours == 1)).any(), "the case should exercise the clip"
    raw = fit_predict(X_src, y_src, X_dst, alpha, clip=None)
    np.testing.assert_allclose(raw, RidgeProbe(alpha=alpha).fit(X_src, y_src).predict_raw(X_dst),
                               rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Groups and folds
# --------------------------------------------------------------------------------------------

def test_prompt_groups_codes_in_first_appearance_order():
    np.testing.assert_array_equal(prompt_groups(["z", "y", "z", "x", "y"]), [0, 1, 0, 2, 1])


def test_prompt_groups_merges_duplicate_text_under_two_ids():
    ids = ["a", "a", "b", "b", "c", "c"]
    texts = ["What is 2+2?"] * 4 + ["Name a prime."] * 2  # "b" duplicates "a"'s prompt
    np.testing.assert_array_equal(prompt_groups(ids), [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(prompt_groups(ids, texts), [0, 0, 0, 0, 1, 1])


def test_prompt_groups_merges_transitively():
    # id2 shares a text with id1 and another with id3: all three are one prompt family.
    ids = [1, 2, 2, 3, 4]
    texts = ["tA", "tA", "tB", "tB", "tC"]
    np.testing.assert_array_equal(prompt_groups(ids, texts), [0, 0, 0, 0, 1])


def test_merged_duplicates_never_straddle_folds():
    ids = np.repeat(np.arange(40), 2)
    texts = np.array([f"prompt {i % 30}" for i in ids])  # ids 30..39 repeat prompts 0..9
    groups = prompt_groups(ids, texts)
    for train, test in grouped_folds(groups, 5, seed=3):
        assert not set(texts[train]) & set(texts[test])


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_grouped_folds_never_split_a_group_and_are_balanced(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, size=57)
    groups = rng.permutation(np.repeat(np.arange(57), sizes))
    folds = grouped_folds(groups, n_splits=5, seed=seed)
    assert len(folds) == 5
    tests = np.concatenate([te for _, te in folds])
    np.testing.assert_array_equal(np.sort(tests), np.arange(groups.size))  # a partition
    for train, test in folds:
        check_no_leak(groups, train, test)
        assert not set(groups[train]) & set(groups[test])
        np.testing.assert_array_equal(np.sort(np.concatenate([train, test])),
                                      np.arange(groups.size))
    counts = [te.size for _, te in folds]
    assert max(counts) - min(counts) <= sizes.max()


def test_grouped_folds_fill_the_lightest_fold_largest_group_first():
    # Sizes 6, 3, 3, 2, 1, 1 into 2 folds: 6 | 3+3 | then 2, 1, 1 go to the lighter side -> 8 | 8.
    groups = np.repeat(np.arange(6), [6, 3, 3, 2, 1, 1])
    for seed in range(5):
        counts = sorted(te.size for _, te in grouped_folds(groups, 2, seed=seed))
        assert counts == [8, 8]


def test_grouped_folds_are_deterministic_by_seed():
    groups = np.repeat(np.arange(30), 4)
    a, b = grouped_folds(groups, 5, seed=11), grouped_folds(groups, 5, seed=11)
    c = grouped_folds(groups, 5, seed=12)
    for (tr_a, te_a), (tr_b, te_b) in zip(a, b):
        np.testing.assert_array_equal(te_a, te_b)
        np.testing.assert_array_equal(tr_a, tr_b)
    assert any(not np.array_equal(te_a, te_c) for (_, te_a), (_, te_c) in zip(a, c))


def test_grouped_folds_take_a_generator_as_seed():
    groups = np.repeat(np.arange(30), 4)
    a = grouped_folds(groups, 3, np.random.default_rng([4, 1]))
    b = grouped_folds(groups, 3, np.random.default_rng([4, 1]))
    for (tr_a, te_a), (tr_b, te_b) in zip(a, b):
        np.testing.assert_array_equal(te_a, te_b)
        check_no_leak(groups, tr_a, te_a)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_grouped_folds_refuse_a_bad_seed(seed):
    with pytest.raises(ValueError, match=r"seed must be an int >= 0"):
        grouped_folds(np.arange(10), 2, seed=seed)


def test_grouped_folds_refuses_fewer_groups_than_splits():
    with pytest.raises(ValueError, match=r"got 3 groups in 12 rows.*n_splits <= 3"):
        grouped_folds(np.repeat([0, 1, 2], 4), n_splits=5)


def test_check_no_leak_names_the_group_and_its_counts():
    groups = np.array([0, 0, 1, 1, 1, 2, 2])
    check_no_leak(groups, [0, 1, 5, 6], [2, 3, 4])  # clean
    with pytest.raises(ValueError, match=r"group 1 leaks.*1 rows in train and 2 in test"):
        check_no_leak(groups, [0, 1, 2], [3, 4, 5, 6])


def test_cross_val_predict_refuses_a_planted_leaky_split():
    X, y, groups = _probe_data(n_prompts=10, k=3, p=5)
    # Row-wise KFold is a valid partition but cuts group 2 (rows 6, 7 | 8) at the fold edge.
    leaky = list(KFold(4).split(X))
    with pytest.raises(ValueError, match=r"group 2 leaks.*1 rows in train and 2 in test"):
        cross_val_predict(X, y, groups, 1.0, folds=leaky)
    with pytest.raises(ValueError, match=r"group 'p2' leaks"):  # labels are named as given
        cross_val_predict(X, y, np.array([f"p{g}" for g in groups]), ALPHAS, folds=leaky)
    clean = grouped_folds(groups, 4)
    res = cross_val_predict(X, y, groups, ALPHAS, folds=clean, inner_splits=2)
    assert res.alpha.shape == (4,)


# --------------------------------------------------------------------------------------------
# cross_val_predict
# --------------------------------------------------------------------------------------------

def test_single_alpha_cv_equals_fit_predict_per_grouped_fold():
    X, y, groups = _probe_data(noise=0.3)
    res = cross_val_predict(X, y, groups, 0.5, n_splits=4, seed=3)
    assert isinstance(res, CVResult)
    np.testing.assert_array_equal(res.alpha, [0.5] * 4)
    assert np.isnan(res.inner_mse).all()  # no inner loop with one alpha
    for k, (train, test) in enumerate(grouped_folds(groups, 4, seed=3)):
        np.testing.assert_array_equal(res.fold[test], k)
        np.testing.assert_allclose(res.pred[test], fit_predict(X[train], y[train], X[test], 0.5),
                                   rtol=0, atol=1e-12)
        np.testing.assert_allclose(
            res.raw_pred[test], fit_predict(X[train], y[train], X[test], 0.5, clip=None),
            rtol=0, atol=1e-12)
    np.testing.assert_array_equal(res.pred, np.clip(res.raw_pred, 0, 1))


def test_nested_selection_picks_the_inner_argmin_and_follows_the_signal():
    alphas = np.logspace(-2, 5, 8)
    X, y, groups = _probe_data(noise=0.02, seed=4)
    clean = cross_val_predict(X, y, groups, alphas)
    for k in range(5):
        assert clean.alpha[k] == alphas[np.argmin(clean.inner_mse[k])]
    rng = np.random.default_rng(5)
    noise_only = cross_val_predict(X, rng.uniform(0, 1, y.size), groups, alphas)
    assert np.median(clean.alpha) < np.median(noise_only.alpha)
    assert np.mean((clean.pred - y) ** 2) < 0.5 * np.var(y)


def _clipped_mse(y_true, y_pred):
    return np.mean((np.clip(y_pred, 0.0, 1.0) - y_true) ** 2)


def test_nested_selection_equals_gridsearchcv_on_the_same_inner_folds():
    """The alpha search is GridSearchCV(StandardScaler -> Ridge) scored by clipped MSE on the
    documented inner folds; only the pooling differs (rows, not an unweighted fold mean), and
    with equal-sized inner folds GridSearchCV's own pick is the same."""
    alphas = np.logspace(-2, 4, 7)
    X, y, groups = _probe_data(noise=0.2, seed=11)  # 120 prompts x 4: inner folds of 32 prompts
    res = cross_val_predict(X, y, groups, alphas, seed=3)
    for k, (train, _) in enumerate(grouped_folds(groups, 5, seed=3)):
        inner = grouped_folds(groups[train], 3, np.random.default_rng([3, k]))
        search = GridSearchCV(make_pipeline(StandardScaler(), Ridge()), {"ridge__alpha": alphas},
                              cv=inner, scoring=make_scorer(_clipped_mse, greater_is_better=False),
                              refit=False).fit(X[train], y[train])
        fold_mse = -np.stack([search.cv_results_[f"split{i}_test_score"] for i in range(3)])
        sizes = np.array([te.size for _, te in inner])  # (3,)
        np.testing.assert_allclose(res.inner_mse[k], sizes @ fold_mse / sizes.sum(), rtol=1e-9)
        assert (sizes == sizes[0]).all()
        assert res.alpha[k] == search.best_params_["ridge__alpha"]


def test_inner_mse_scores_clipped_predictions():
    alphas = np.logspace(-3, 1, 5)
    X, y, groups = _probe_data(noise=0.3, seed=10)  # noisy targets piled at 0 and 1
    clipped = cross_val_predict(X, y, groups, alphas, clip=(0.0, 1.0))
    raw = cross_val_predict(X, y, groups, alphas, clip=None)  # same folds: they ignore y
    np.testing.assert_array_equal(clipped.fold, raw.fold)
    assert (raw.raw_pred < 0).any() and (raw.raw_pred > 1).any()
    # y is in [0, 1], so clipping can only move a prediction closer to its target.
    assert (clipped.inner_mse <= raw.inner_mse + 1e-15).all()
    assert (clipped.inner_mse < raw.inner_mse - 1e-6).any()


def test_nested_selection_ties_go_to_the_larger_alpha():
    X, _, groups = _probe_data(seed=6)
    y = np.full(X.shape[0], 0.5)  # every alpha predicts 0.5 exactly: all inner MSEs tie at 0
    res = cross_val_predict(X, y, groups, [0.1, 10.0, 1.0])
    np.testing.assert_array_equal(res.alpha, 10.0)


@pytest.mark.parametrize("clip, poison", [(None, lambda v: v + 1e6), ((0.0, 1.0), lambda v: 1 - v)],
                         ids=["huge-unclipped", "reflected-in-range"])
def test_nested_selection_never_sees_the_outer_test_fold(clip, poison):
    alphas = np.logspace(-2, 5, 8)
    X, y, groups = _probe_data(noise=0.1, seed=8)
    base = cross_val_predict(X, y, groups, alphas, clip=clip, seed=2)
    k = 1
    test = np.flatnonzero(base.fold == k)
    y_poisoned = y.copy()
    y_poisoned[test] = poison(y[test])
    hit = cross_val_predict(X, y_poisoned, groups, alphas, clip=clip, seed=2)
    np.testing.assert_array_equal(hit.fold, base.fold)
    assert hit.alpha[k] == base.alpha[k]
    np.testing.assert_array_equal(hit.inner_mse[k], base.inner_mse[k])
    np.testing.assert_array_equal(hit.raw_pred[test], base.raw_pred[test])
    # The poison is potent where it is training data: the other folds do move.
    other = base.fold != k
    assert not np.allclose(hit.raw_pred[other], base.raw_pred[other])


def test_cross_val_predict_is_deterministic_by_seed_and_dtype_free():
    X, y, groups = _probe_data(seed=9)
    a = cross_val_predict(X.astype(np.float32), y, groups, ALPHAS, seed=4)
    b = cross_val_predict(X.astype(np.float32).astype(np.float64), y, groups, ALPHAS, seed=4)
    c = cross_val_predict(X, y, groups, ALPHAS, seed=5)
    for field in ("pred", "raw_pred", "fold", "alpha", "inner_mse"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.fold, c.fold)


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------

def _small():
    X, y, groups = _probe_data(n_prompts=12, k=2, p=4)
    return X, y, groups


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_x_names_row_and_column(bad):
    X, y, groups = _small()
    X[5, 2] = bad
    X[7, 0] = bad
    with pytest.raises(ValueError, match=r"X\[5, 2\].*row 5, column 2.*drop that rollout"):
        cross_val_predict(X, y, groups, 1.0)
    with pytest.raises(ValueError, match=r"X_test\[5, 2\]"):
        fit_predict(X[~np.isin(np.arange(24), [5, 7])], y[:22], X, 1.0)
    with pytest.raises(ValueError, match=r"X\[5, 2\]"):
        RidgePath(X, y)


def test_non_finite_y_names_the_row():
    X, y, groups = _small()
    y[3] = np.nan
    with pytest.raises(ValueError, match=r"y\[3\] = nan.*drop that rollout \(row 3\)"):
        cross_val_predict(X, y, groups, 1.0)
    with pytest.raises(ValueError, match=r"y_train\[3\]"):
        fit_predict(X, y, X, 1.0)


def test_mismatched_lengths_are_refused():
    X, y, groups = _small()
    with pytest.raises(ValueError, match=r"y has 23 values but X has 24 rows"):
        cross_val_predict(X, y[:-1], groups, 1.0)
    with pytest.raises(ValueError, match=r"groups has 23 labels but X has 24 rows"):
        cross_val_predict(X, y, groups[:-1], 1.0)
    with pytest.raises(ValueError, match=r"X_test has 3 features but X_train has 4"):
        fit_predict(X, y, X[:, :3], 1.0)
    with pytest.raises(ValueError, match=r"X has 3 features but the path was fit on 4"):
        RidgePath(X, y).predict(X[:, :3], [1.0])
    with pytest.raises(ValueError, match=r"prompts has 2 entries but prompt_ids has 3"):
        prompt_groups([1, 2, 3], ["a", "b"])


@pytest.mark.parametrize("shape", [(0, 4), (5, 0)])
def test_empty_x_is_refused(shape):
    with pytest.raises(ValueError, match=r"X is empty"):
        RidgePath(np.zeros(shape), np.zeros(shape[0]))
    with pytest.raises(ValueError, match=r"X is empty"):
        cross_val_predict(np.zeros(shape), np.zeros(shape[0]), np.arange(shape[0]), 1.0)


@pytest.mark.parametrize("alphas", [0.0, -1.0, [1.0, 0.0], [np.nan], []])
def test_non_positive_or_empty_alphas_are_refused(alphas):
    X, y, groups = _small()
    with pytest.raises(ValueError, match=r"alphas must"):
        cross_val_predict(X, y, groups, alphas)
    if np.size(alphas) == 1:
        with pytest.raises(ValueError, match=r"alphas must"):
            fit_predict(X, y, X, alphas)
    with pytest.raises(ValueError, match=r"alphas must"):
        RidgePath(X, y).predict(X, alphas)


def test_targets_outside_clip_are_refused_like_the_probe():
    X, y, groups = _small()
    y[4] = 1.5
    with pytest.raises(ValueError, match=r"y\[4\] = 1.5.*clip=None"):
        cross_val_predict(X, y, groups, 1.0)
    with pytest.raises(ValueError, match=r"y_train\[4\] = 1.5"):
        fit_predict(X, y, X, 1.0)
    assert cross_val_predict(X, y, groups, 1.0, clip=None).pred.shape == (24,)


def test_too_few_groups_for_the_inner_folds_is_refused():
    X, y, groups = _small()  # 12 prompts: 6 outer folds leave 10 groups to train on
    with pytest.raises(ValueError, match=r"outer fold 0's training part has 10 groups.*"
                                         r"inner_splits <= 10"):
        cross_val_predict(X, y, groups, ALPHAS, n_splits=6, inner_splits=11)


def test_bad_user_folds_are_refused():
    X, y, groups = _small()
    folds = grouped_folds(groups, 3)
    tr, te = folds[0]
    with pytest.raises(ValueError, match=r"row \d+ is in 0 test folds"):
        cross_val_predict(X, y, groups, 1.0, folds=[(tr, te[1:]), *folds[1:]])
    with pytest.raises(ValueError, match=r"outside \[0, 24\)"):
        cross_val_predict(X, y, groups, 1.0, folds=[(tr, np.append(te, 99)), *folds[1:]])


@pytest.mark.parametrize("ids", [["a", None, "b"], [1.0, float("nan"), 2.0]])
def test_prompt_groups_refuses_missing_ids(ids):
    with pytest.raises(ValueError, match=r"prompt_ids\[1\]"):
        prompt_groups(ids)


def test_n_splits_below_two_is_refused():
    with pytest.raises(ValueError, match=r"n_splits must be an int >= 2; got 1"):
        grouped_folds(np.arange(10), n_splits=1)
