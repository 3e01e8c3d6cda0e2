"""Fitting machinery of probe studies: prompt-grouped folds and a ridge path over many alphas.

The study probe is the trainer's `RidgeProbe` without PCA: scikit-learn's `StandardScaler ->
Ridge(alpha)`, clipped, refit per fold. Only the nested alpha search fits in closed form: one
eigendecomposition gives every alpha's predictions (`RidgePath`: equal to GridSearchCV over the
pipeline, 5-8x faster on a 20-alpha grid; benchmarks/bench_ridge.py). Folds are scikit-learn's
`GroupKFold` and never split a prompt (rows sharing a prompt id or text), so sibling rollouts,
whose leave-one-out targets share rewards, never sit on both sides of a split.
Paper: POISE (arXiv 2605.07579), "The probe g".
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from numbers import Integral

import numpy as np
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components
from sklearn.linear_model import Ridge
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

logger = logging.getLogger(__name__)

__all__ = [
    "CVResult",
    "RidgePath",
    "check_no_leak",
    "cross_val_predict",
    "fit_predict",
    "grouped_folds",
    "prompt_groups",
]

TARGET_TOL = 1e-6  # same rule as RidgeProbe.fit: targets may exceed `clip` by float noise only
TIE_RTOL = 1e-12  # inner MSEs this close count as a tie (then the larger alpha wins)


# --------------------------------------------------------------------------------------------
# Input checks (boundaries only; the inner loops trust what they get)
# --------------------------------------------------------------------------------------------

def _check_X(name: str, X) -> np.ndarray:
    """Finite, non-empty 2-D float64 copy-or-view of X. (n, p) -> (n, p)."""
    try:
        a = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric (n, p) array; could not convert it to "
                         f"float64 ({e}).") from None
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows x features); got shape {a.shape}. "
                         f"Reshape a single row with x[None, :].")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {a.shape}); a probe needs at least one row "
                         f"and one feature.")
    if not np.isfinite(a).all():
        flat = int(np.argmax(~np.isfinite(a)))  # row-major: first bad row, then first column
        r, c = divmod(flat, a.shape[1])
        raise ValueError(f"{name}[{r}, {c}] = {a[r, c]} is not finite (row {r}, column {c}); "
                         f"drop that rollout (row {r}) or fix its feature capture.")
    return a


def _check_y(name: str, y, n: int, x_name: str) -> np.ndarray:
    """Finite 1-D float64 targets, one per row of X. -> (n,)."""
    try:
        v = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric; could not convert it to float64 ({e}).") \
            from None
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one target per row); got shape {v.shape}.")
    if v.shape[0] != n:
        raise ValueError(f"{name} has {v.shape[0]} values but {x_name} has {n} rows; give one "
                         f"target per row.")
    if not np.isfinite(v).all():
        r = int(np.argmax(~np.isfinite(v)))
        raise ValueError(f"{name}[{r}] = {v[r]} is not finite; drop that rollout (row {r}) or "
                         f"fix its reward.")
    return v


def _check_clip(clip) -> tuple[float | None, float | None] | None:
    if clip is None:
        return None
    try:
        low, high = clip
    except (TypeError, ValueError):
        raise ValueError(f"clip must be None or a (low, high) pair; got {clip!r}.") from None
    low, high = (None if v is None else float(v) for v in (low, high))
    if low is not None and high is not None and not low < high:
        raise ValueError(f"clip must have low < high; got {clip!r}.")
    return low, high


def _check_in_clip(name: str, y: np.ndarray, bounds) -> None:
    """Refuse targets outside `clip`, as RidgeProbe.fit does (a [0, 1] probe on others is a bug)."""
    if bounds is None:
        return
    low, high = bounds
    out = (y < (-np.inf if low is None else low) - TARGET_TOL) | \
        (y > (np.inf if high is None else high) + TARGET_TOL)
    if out.any():
        r = int(np.argmax(out))
        raise ValueError(f"{name} must lie in clip=({low}, {high}) (rewards are in [0, 1]); "
                         f"{name}[{r}] = {y[r]:g}. Pass clip=None for unbounded targets.")


def _check_alphas(alphas) -> np.ndarray:
    """Positive finite ridge penalties as a 1-D float64 array. scalar or (A,) -> (A,)."""
    a = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"alphas must be a positive number or a non-empty 1-D sequence of "
                         f"them; got {alphas!r}.")
    bad = ~np.isfinite(a) | (a <= 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"alphas must be finite and > 0 (alpha -> 0 is unpenalised least "
                         f"squares, singular when p >= n); alphas[{i}] = {a[i]!r}. Use e.g. "
                         f"np.logspace(-2, 4, 7).")
    return a


def _ridge(alpha: float) -> Pipeline:
    """The probe without PCA and clip; one alpha needs no path (a Cholesky solve beats `eigh`)."""
    return make_pipeline(StandardScaler(), Ridge(alpha=float(alpha)))


def _clip(a: np.ndarray, bounds) -> np.ndarray:
    return a if bounds is None else np.clip(a, bounds[0], bounds[1])


def _check_labels(name: str, labels, n: int | None = None) -> np.ndarray:
    """1-D group labels (ints from `prompt_groups`, or strings), one per row. -> (n,)."""
    g = np.asarray(labels)
    if g.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one group label per row); got shape {g.shape}.")
    if n is not None and g.shape[0] != n:
        raise ValueError(f"{name} has {g.shape[0]} labels but X has {n} rows; give one group "
                         f"per row (see prompt_groups).")
    if g.shape[0] == 0:
        raise ValueError(f"{name} is empty; there are no rows to split.")
    if g.dtype.kind == "f" and not np.isfinite(g).all():
        r = int(np.argmax(~np.isfinite(g)))
        raise ValueError(f"{name}[{r}] = {g[r]} is not a group label; build labels with "
                         f"prompt_groups(prompt_ids, prompts).")
    try:
        np.unique(g)  # grouped_folds and check_no_leak sort the labels
    except TypeError as e:
        raise ValueError(f"{name} mixes label types that cannot be sorted ({e}); build labels "
                         f"with prompt_groups(prompt_ids, prompts).") from None
    return g


# --------------------------------------------------------------------------------------------
# Groups and folds
# --------------------------------------------------------------------------------------------

def _first_seen_codes(name: str, values, fix: str) -> tuple[np.ndarray, int]:
    """Code per value, 0..m-1 in order of first appearance; missing values refused. -> (n,), m."""
    vals = values.tolist() if isinstance(values, np.ndarray) else list(values)
    for i, v in enumerate(vals):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise ValueError(f"{name}[{i}] is {v!r}; {fix}")
    code_of: dict = {}
    codes = [code_of.setdefault(v, len(code_of)) for v in vals]
    return np.asarray(codes, dtype=np.int64), len(code_of)


def prompt_groups(prompt_ids, prompts=None) -> np.ndarray:
    """Group code per row: same prompt id, or (given `prompts`) identical prompt text. (n,) -> (n,).

    Codes are 0..G-1 in order of first appearance. Ids that share a text are merged
    (transitively), so a prompt duplicated under two ids cannot sit on both sides of a split.
    Texts are compared exactly (no whitespace or case folding).
    """
    ids, n_ids = _first_seen_codes("prompt_ids", prompt_ids,
                                   "every row needs its prompt id (drop rows without one).")
    if prompts is None:
        return ids
    prompts = prompts.tolist() if isinstance(prompts, np.ndarray) else list(prompts)
    if len(prompts) != ids.size:
        raise ValueError(f"prompts has {len(prompts)} entries but prompt_ids has {ids.size}; "
                         f"give one prompt text per row, or prompts=None.")
    texts, n_texts = _first_seen_codes("prompts", prompts, "give every row its prompt text, "
                                       "or pass prompts=None to group by id only.")
    # ids and texts are nodes, each row an edge between its two: a group is a connected component
    n_nodes = n_ids + n_texts
    edges = coo_array((np.ones(ids.size), (ids, n_ids + texts)), shape=(n_nodes, n_nodes))
    component = connected_components(edges, directed=False)[1][ids]  # (n,), never missing
    out, n_groups = _first_seen_codes("groups", component, "")
    if n_groups < n_ids:
        logger.info("prompt_groups: %d prompt ids share text with another id; %d groups remain",
                    n_ids - n_groups, n_groups)
    return out


def _check_int(name: str, v, low: int) -> int:
    """n_splits, inner_splits (low=2), seed (low=0)."""
    if isinstance(v, bool) or not isinstance(v, Integral) or v < low:
        raise ValueError(f"{name} must be an int >= {low}; got {v!r}.")
    return int(v)


def grouped_folds(groups, n_splits: int = 5,
                  seed: int | np.random.Generator = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds that never split a group, row counts balanced. groups (n,) -> [(train, test)] * K.

    scikit-learn's `GroupKFold`: largest group first into the fold with the fewest rows, so
    fold sizes differ by at most the largest group. It is fed the labels in an order shuffled
    by `seed` (an int, or a Generator to draw from), which decides among equal-sized groups.
    (`GroupKFold(shuffle=True)` would balance group counts, not rows.) Sorted int64 indices.
    """
    g = _check_labels("groups", groups)
    n_splits = _check_int("n_splits", n_splits, 2)
    rng = seed if isinstance(seed, np.random.Generator) else \
        np.random.default_rng(_check_int("seed", seed, 0))
    _, codes = np.unique(g, return_inverse=True)
    n_groups = int(codes.max()) + 1
    if n_groups < n_splits:
        raise ValueError(f"grouped_folds needs at least n_splits={n_splits} groups (a group is "
                         f"never split); got {n_groups} groups in {g.shape[0]} rows. Use "
                         f"n_splits <= {n_groups}, or more prompts.")
    # GroupKFold places equal-sized groups highest label first: rank the shuffle from the top.
    rank = np.empty(n_groups, dtype=np.int64)
    rank[rng.permutation(n_groups)] = np.arange(n_groups)[::-1]
    split = GroupKFold(n_splits).split(codes, groups=rank[codes])
    return [(tr.astype(np.int64), te.astype(np.int64)) for tr, te in split]


def _check_index(name: str, idx, n: int) -> np.ndarray:
    a = np.asarray(idx)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be a 1-D array of integer row indices; got dtype "
                         f"{a.dtype} and shape {a.shape}.")
    if a.size and (a.min() < 0 or a.max() >= n):
        bad = int(a[(a < 0) | (a >= n)][0])
        raise ValueError(f"{name} holds row index {bad}, outside [0, {n}); indices refer to "
                         f"rows of X.")
    return a.astype(np.int64, copy=False)


def check_no_leak(groups, train_idx, test_idx) -> None:
    """Raise ValueError if any group has rows in both train and test. groups (n,); indices 1-D.

    The error names the smallest such label (for `prompt_groups` codes: the earliest prompt)
    and its row count on each side.
    """
    g = _check_labels("groups", groups)
    tr = _check_index("train_idx", train_idx, g.shape[0])
    te = _check_index("test_idx", test_idx, g.shape[0])
    g_tr, g_te = g[tr], g[te]
    both = np.intersect1d(g_tr, g_te)
    if both.size:
        first = both[0]
        n_tr, n_te = int((g_tr == first).sum()), int((g_te == first).sum())
        label = first.item() if hasattr(first, "item") else first
        raise ValueError(f"group {label!r} leaks across the split: {n_tr} rows in train and "
                         f"{n_te} in test ({both.size} leaking groups in all). Build folds with "
                         f"grouped_folds(prompt_groups(prompt_ids, prompts)).")


# --------------------------------------------------------------------------------------------
# Ridge path
# --------------------------------------------------------------------------------------------

class RidgePath:
    """StandardScaler -> Ridge fit for all alphas at once, from one eigendecomposition.

    With Z the standardised training design (n, p) and yc the centred targets, the ridge
    coefficients are w(alpha) = V diag(s / (s^2 + alpha)) U^T yc for the thin SVD Z = U S V^T;
    the intercept is mean(y) (sklearn's Ridge: alpha * ||w||^2, intercept unpenalised).
    V and s^2 come from `eigh` of the smaller Gram matrix (Z^T Z if n >= p, else Z Z^T),
    several times faster than an SVD of Z and exactly the system sklearn's solver factorises.

    Attributes: scaler_ (fitted StandardScaler), its mean_ (p,) and scale_ (p,) (1 on constant
    columns), intercept_ (mean of y), n_samples_, n_features_in_.
    """

    def __init__(self, X, y):
        X = _check_X("X", X)
        self._fit(X, _check_y("y", y, X.shape[0], "X"))

    @classmethod
    def _from_checked(cls, X: np.ndarray, y: np.ndarray) -> RidgePath:
        """Fit on arrays already validated (float64, finite); the CV inner loops use this."""
        self = cls.__new__(cls)
        self._fit(X, y)
        return self

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        n, p = X.shape
        self.scaler_ = StandardScaler().fit(X)
        self.mean_, self.scale_ = self.scaler_.mean_, self.scaler_.scale_
        Z = self.scaler_.transform(X)  # (n, p), a copy
        self.intercept_ = float(y.mean())
        yc = y - self.intercept_
        self.n_samples_, self.n_features_in_ = n, p
        self._primal = n >= p
        if self._primal:  # Z^T Z = V diag(s^2) V^T
            lam, V = np.linalg.eigh(Z.T @ Z)  # (p,), (p, p)
            self._basis = V
            self._b = V.T @ (Z.T @ yc)  # (p,)  = s * U^T yc
        else:  # Z Z^T = U diag(s^2) U^T; the kernel form keeps the work at n x n
            lam, U = np.linalg.eigh(Z @ Z.T)  # (n,), (n, n)
            self._Z, self._basis = Z, U
            self._b = U.T @ yc  # (n,)
        self._lam = np.maximum(lam, 0.0)  # s^2; rounding can leave -1e-13 on a null direction

    def _coefs(self, alphas: np.ndarray) -> np.ndarray:
        """Coefficients on the standardised features, one column per alpha. (A,) -> (p, A)."""
        d = self._b[:, None] / (self._lam[:, None] + alphas[None, :])  # (k, A)
        return self._basis @ d if self._primal else self._Z.T @ (self._basis @ d)

    def _predict(self, X: np.ndarray, alphas: np.ndarray) -> np.ndarray:
        """Unchecked `predict`. (m, p), (A,) -> (A, m)."""
        # (p, A) coefficients first: A is far below n and p, so this beats projecting X.
        return self.intercept_ + (self.scaler_.transform(X) @ self._coefs(alphas)).T

    def predict(self, X, alphas) -> np.ndarray:
        """Unclipped ridge predictions for every alpha. X (m, p), alphas (A,) -> (A, m)."""
        X = _check_X("X", X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features but the path was fit on "
                             f"{self.n_features_in_}; use the same feature layout.")
        return self._predict(X, _check_alphas(alphas))

    def coef(self, alpha: float) -> np.ndarray:
        """Coefficients on the standardised features for one alpha. -> (p,)."""
        a = _check_alphas(alpha)
        if a.size != 1:
            raise ValueError(f"coef takes one alpha; got {a.size}. Loop over alphas for a path.")
        return self._coefs(a)[:, 0]


# --------------------------------------------------------------------------------------------
# Cross-validation and transfer
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CVResult:
    """Out-of-fold predictions of a grouped (nested when several alphas) ridge CV.

    pred (n,) clipped to `clip`; raw_pred (n,) unclipped; fold (n,) outer fold of each row;
    alpha (K,) alpha chosen per outer fold; alphas (A,) the grid; inner_mse (K, A) pooled
    inner-CV MSE of clipped predictions per outer fold and alpha (NaN: single alpha, no
    inner loop).
    """

    pred: np.ndarray
    raw_pred: np.ndarray
    fold: np.ndarray
    alpha: np.ndarray
    alphas: np.ndarray
    inner_mse: np.ndarray


def _check_folds(folds, groups: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """User folds: (train, test) index pairs whose test sets cover every row exactly once."""
    n = groups.shape[0]
    try:
        pairs = [(tr, te) for tr, te in folds]
    except (TypeError, ValueError):
        raise ValueError("folds must be a sequence of (train_idx, test_idx) pairs, e.g. the "
                         "output of grouped_folds.") from None
    if len(pairs) < 2:
        raise ValueError(f"folds must hold at least 2 (train_idx, test_idx) pairs; got "
                         f"{len(pairs)}.")
    out, seen = [], np.zeros(n, dtype=np.int64)
    for k, (tr, te) in enumerate(pairs):
        tr = _check_index(f"folds[{k}] train_idx", tr, n)
        te = _check_index(f"folds[{k}] test_idx", te, n)
        if tr.size == 0 or te.size == 0:
            raise ValueError(f"folds[{k}] has {tr.size} train and {te.size} test rows; both "
                             f"sides need rows.")
        if np.unique(tr).size != tr.size:
            raise ValueError(f"folds[{k}] train_idx repeats a row; give each row once.")
        np.add.at(seen, te, 1)
        out.append((tr, te))
    if (seen != 1).any():
        r = int(np.argmax(seen != 1))
        raise ValueError(f"row {r} is in {int(seen[r])} test folds; out-of-fold predictions "
                         f"need every row in exactly one test fold.")
    return out


def _select_alpha(X: np.ndarray, y: np.ndarray, groups: np.ndarray, alphas: np.ndarray,
                  inner_splits: int, rng: np.random.Generator, bounds,
                  outer: int) -> tuple[float, np.ndarray]:
    """Grouped inner CV on one outer training part: -> (chosen alpha, pooled MSE (A,)).

    GridSearchCV's search with a clipped-MSE score, but pooled over rows (it averages fold MSEs
    unweighted) and ties -> the larger, smoother alpha (it takes the first listed).
    """
    n_groups = np.unique(groups).size
    if n_groups < inner_splits:
        raise ValueError(f"outer fold {outer}'s training part has {n_groups} groups, fewer "
                         f"than inner_splits={inner_splits}; use inner_splits <= {n_groups} "
                         f"or more prompts.")
    sse = np.zeros(alphas.size)
    for tr, te in grouped_folds(groups, inner_splits, rng):
        check_no_leak(groups, tr, te)
        path = RidgePath._from_checked(X[tr], y[tr])
        err = _clip(path._predict(X[te], alphas), bounds) - y[te]  # (A, m)
        sse += np.einsum("am,am->a", err, err)
    mse = sse / y.shape[0]
    ties = mse <= mse.min() * (1.0 + TIE_RTOL)
    return float(alphas[ties].max()), mse


def cross_val_predict(X, y, groups, alphas, *, n_splits: int = 5, inner_splits: int = 3,
                      seed: int = 0, clip=(0.0, 1.0), folds=None) -> CVResult:
    """Grouped out-of-fold ridge predictions; alpha chosen by nested grouped CV. X (n, p), y (n,).

    One alpha: plain K-fold. Several: inside each outer training part, grouped inner CV
    (`inner_splits` folds by `groups`) picks the alpha with the lowest MSE of clipped
    predictions (ties -> larger alpha); the outer test fold is never seen until prediction.
    Outer fold k's inner folds are `grouped_folds(groups[train], inner_splits,
    np.random.default_rng([seed, k]))`, so they differ per fold.
    `folds` (pairs of train/test indices; `n_splits` is then unused) replaces the grouped
    outer folds; every split used, outer and inner, must pass `check_no_leak`.
    """
    X = _check_X("X", X)
    n = X.shape[0]
    y = _check_y("y", y, n, "X")
    g = _check_labels("groups", groups, n)
    a = _check_alphas(alphas)
    bounds = _check_clip(clip)
    _check_in_clip("y", y, bounds)
    seed = _check_int("seed", seed, 0)
    if a.size > 1:
        inner_splits = _check_int("inner_splits", inner_splits, 2)
    outer = grouped_folds(g, n_splits, seed) if folds is None else _check_folds(folds, g)

    raw = np.empty(n)
    fold = np.full(n, -1, dtype=np.int64)
    chosen = np.empty(len(outer))
    inner_mse = np.full((len(outer), a.size), np.nan)
    for k, (tr, te) in enumerate(outer):
        check_no_leak(g, tr, te)
        X_tr, y_tr = X[tr], y[tr]
        if a.size == 1:
            chosen[k] = a[0]
        else:
            rng = np.random.default_rng([seed, k])
            chosen[k], inner_mse[k] = _select_alpha(X_tr, y_tr, g[tr], a, inner_splits, rng,
                                                    bounds, k)
        raw[te] = _ridge(chosen[k]).fit(X_tr, y_tr).predict(X[te])
        fold[te] = k
    if a.size > 1:
        edge = np.isin(chosen, [a.min(), a.max()]).sum()
        if edge:
            logger.debug("cross_val_predict: %d of %d outer folds chose an alpha at the edge "
                         "of the grid %s", edge, len(outer), a.tolist())
    return CVResult(pred=_clip(raw, bounds).copy(), raw_pred=raw, fold=fold, alpha=chosen, alphas=a,
                    inner_mse=inner_mse)


def fit_predict(X_train, y_train, X_test, alpha: float, clip=(0.0, 1.0)) -> np.ndarray:
    """Fit StandardScaler -> Ridge(alpha) on one domain, predict another, clipped. -> (m,).

    Equals `RidgeProbe(alpha=alpha, clip=clip).fit(X_train, y_train).predict(X_test)`.
    X_train (n, p), y_train (n,), X_test (m, p).
    """
    X_train = _check_X("X_train", X_train)
    y_train = _check_y("y_train", y_train, X_train.shape[0], "X_train")
    X_test = _check_X("X_test", X_test)
    if X_test.shape[1] != X_train.shape[1]:
        raise ValueError(f"X_test has {X_test.shape[1]} features but X_train has "
                         f"{X_train.shape[1]}; both domains need the same feature layout.")
    a = _check_alphas(alpha)
    if a.size != 1:
        raise ValueError(f"fit_predict takes one alpha; got {a.size}. Use RidgePath for a path.")
    bounds = _check_clip(clip)
    _check_in_clip("y_train", y_train, bounds)
    return _clip(_ridge(a[0]).fit(X_train, y_train).predict(X_test), bounds)
