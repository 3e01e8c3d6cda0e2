"""Fitting machinery of probe studies: prompt-grouped folds and a ridge path over many alphas.

The study probe is the trainer's `RidgeProbe` without PCA (`StandardScaler -> Ridge(alpha) ->
clip`), refit per fold in closed form: one eigendecomposition of the standardised training
design gives predictions for every alpha at once. Folds never split a prompt (rows that share
a prompt id or prompt text), so sibling rollouts, whose leave-one-out targets share rewards,
never sit on both sides of a split. Paper: POISE (arXiv 2605.07579), "The probe g".
"""
from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass
from numbers import Integral

import numpy as np

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
_EPS = np.finfo(np.float64).eps


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
    low = None if low is None else float(low)
    high = None if high is None else float(high)
    if low is not None and high is not None and not low < high:
        raise ValueError(f"clip must have low < high; got {clip!r}.")
    return low, high


def _check_in_clip(name: str, y: np.ndarray, bounds) -> None:
    """Refuse targets outside `clip`, as RidgeProbe.fit does (a [0, 1] probe on others is a bug)."""
    if bounds is None:
        return
    low, high = bounds
    out = np.zeros(y.shape[0], dtype=bool)
    if low is not None:
        out |= y < low - TARGET_TOL
    if high is not None:
        out |= y > high + TARGET_TOL
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
    return g


def _codes(name: str, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique labels and each row's index into them. -> (labels (G,), codes (n,))."""
    try:
        uniq, codes = np.unique(g, return_inverse=True)
    except TypeError as e:
        raise ValueError(f"{name} mixes label types that cannot be sorted ({e}); build labels "
                         f"with prompt_groups(prompt_ids, prompts).") from None
    return uniq, codes.reshape(-1)


# --------------------------------------------------------------------------------------------
# Groups and folds
# --------------------------------------------------------------------------------------------

def _is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def prompt_groups(prompt_ids, prompts=None) -> np.ndarray:
    """Group code per row: same prompt id, or (given `prompts`) identical prompt text. (n,) -> (n,).

    Codes are 0..G-1 in order of first appearance. Ids that share a text are merged
    (union-find), so a prompt duplicated under two ids cannot sit on both sides of a split.
    Texts are compared exactly (no whitespace or case folding).
    """
    ids = prompt_ids.tolist() if isinstance(prompt_ids, np.ndarray) else list(prompt_ids)
    for i, v in enumerate(ids):
        if _is_missing(v):
            raise ValueError(f"prompt_ids[{i}] is {v!r}; every row needs its prompt id (drop "
                             f"rows without one).")
    code_of: dict = {}
    id_codes = [code_of.setdefault(v, len(code_of)) for v in ids]
    parent = list(range(len(code_of)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]  # path halving
            a = parent[a]
        return a

    if prompts is not None:
        texts = prompts.tolist() if isinstance(prompts, np.ndarray) else list(prompts)
        if len(texts) != len(ids):
            raise ValueError(f"prompts has {len(texts)} entries but prompt_ids has {len(ids)}; "
                             f"give one prompt text per row, or prompts=None.")
        id_of_text: dict = {}
        for i, (t, c) in enumerate(zip(texts, id_codes)):
            if _is_missing(t):
                raise ValueError(f"prompts[{i}] is {t!r}; give every row its prompt text, or "
                                 f"pass prompts=None to group by id only.")
            ra, rb = find(id_of_text.setdefault(t, c)), find(c)
            if ra != rb:  # keep the earlier id as root: codes stay in first-appearance order
                parent[max(ra, rb)] = min(ra, rb)
    relabel: dict[int, int] = {}
    out = np.fromiter((relabel.setdefault(find(c), len(relabel)) for c in id_codes),
                      dtype=np.int64, count=len(id_codes))
    if len(relabel) < len(code_of):
        logger.info("prompt_groups: %d prompt ids share text with another id; %d groups remain",
                    len(code_of) - len(relabel), len(relabel))
    return out


def _assign_folds(codes: np.ndarray, n_groups: int, n_splits: int,
                  rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Whole groups to folds: seeded shuffle, then largest first into the lightest fold."""
    sizes = np.bincount(codes, minlength=n_groups)
    order = rng.permutation(n_groups)
    order = order[np.argsort(-sizes[order], kind="stable")]  # shuffle only breaks size ties
    heap = [(0, k) for k in range(n_splits)]  # (rows so far, fold); ties -> lower fold index
    fold_of = np.empty(n_groups, dtype=np.int64)
    for g in order.tolist():
        load, k = heapq.heappop(heap)
        fold_of[g] = k
        heapq.heappush(heap, (load + int(sizes[g]), k))
    row_fold = fold_of[codes]
    return [(np.flatnonzero(row_fold != k), np.flatnonzero(row_fold == k))
            for k in range(n_splits)]


def _check_n_splits(name: str, n_splits) -> int:
    if isinstance(n_splits, bool) or not isinstance(n_splits, Integral) or n_splits < 2:
        raise ValueError(f"{name} must be an int >= 2; got {n_splits!r}.")
    return int(n_splits)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}.")
    return int(seed)


def grouped_folds(groups, n_splits: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds that never split a group, row counts balanced. groups (n,) -> [(train, test)] * K.

    Groups are shuffled by `seed`, then placed largest first into the fold with the fewest
    rows, so fold sizes differ by at most the largest group. Index arrays are sorted int64.
    """
    g = _check_labels("groups", groups)
    n_splits = _check_n_splits("n_splits", n_splits)
    seed = _check_seed(seed)
    uniq, codes = _codes("groups", g)
    if uniq.size < n_splits:
        raise ValueError(f"grouped_folds needs at least n_splits={n_splits} groups (a group is "
                         f"never split); got {uniq.size} groups in {g.shape[0]} rows. Use "
                         f"n_splits <= {uniq.size}, or more prompts.")
    return _assign_folds(codes, uniq.size, n_splits, np.random.default_rng(seed))


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

def _standardise(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """StandardScaler's mean, scale (ddof=0; near-constant columns -> 1) and Z. (n, p) -> ..."""
    n = X.shape[0]
    mean = X.sum(axis=0) / n
    Z = X - mean
    # sklearn's corrected two-pass variance and its constant-feature bound (Chan, Golub, LeVeque),
    # so the columns StandardScaler leaves unscaled are exactly the ones left unscaled here.
    var = (np.einsum("ij,ij->j", Z, Z) - Z.sum(axis=0) ** 2 / n) / n
    constant = var <= n * _EPS * var + (n * mean * _EPS) ** 2
    scale = np.sqrt(np.where(constant, 1.0, var))
    Z /= scale
    return mean, scale, Z


class RidgePath:
    """StandardScaler -> Ridge fit for all alphas at once, from one eigendecomposition.

    With Z the standardised training design (n, p) and yc the centred targets, the ridge
    coefficients are w(alpha) = V diag(s / (s^2 + alpha)) U^T yc for the thin SVD Z = U S V^T;
    the intercept is mean(y) (sklearn's Ridge: alpha * ||w||^2, intercept unpenalised).
    V and s^2 come from `eigh` of the smaller Gram matrix (Z^T Z if n >= p, else Z Z^T),
    several times faster than an SVD of Z and exactly the system sklearn's solver factorises.

    Attributes: mean_ (p,), scale_ (p,), intercept_ (mean of y), n_samples_, n_features_in_.
    """

    def __init__(self, X, y):
        X = _check_X("X", X)
        y = _check_y("y", y, X.shape[0], "X")
        self._fit(X, y)

    @classmethod
    def _from_checked(cls, X: np.ndarray, y: np.ndarray) -> RidgePath:
        """Fit on arrays already validated (float64, finite); the CV inner loops use this."""
        self = cls.__new__(cls)
        self._fit(X, y)
        return self

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        n, p = X.shape
        self.mean_, self.scale_, Z = _standardise(X)
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

    def _check_fitted_X(self, X) -> np.ndarray:
        X = _check_X("X", X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features but the path was fit on "
                             f"{self.n_features_in_}; use the same feature layout.")
        return X

    def _predict(self, X: np.ndarray, alphas: np.ndarray) -> np.ndarray:
        """Unchecked `predict`. (m, p), (A,) -> (A, m)."""
        Zt = (X - self.mean_) / self.scale_  # (m, p)
        proj = Zt @ self._basis if self._primal else (Zt @ self._Z.T) @ self._basis  # (m, k)
        shrink = 1.0 / (self._lam[None, :] + alphas[:, None])  # (A, k)
        return self.intercept_ + shrink @ (proj * self._b).T  # (A, m)

    def predict(self, X, alphas) -> np.ndarray:
        """Unclipped ridge predictions for every alpha. X (m, p), alphas (A,) -> (A, m)."""
        return self._predict(self._check_fitted_X(X), _check_alphas(alphas))

    def coef(self, alpha: float) -> np.ndarray:
        """Coefficients on the standardised features for one alpha. -> (p,)."""
        a = _check_alphas(alpha)
        if a.size != 1:
            raise ValueError(f"coef takes one alpha; got {a.size}. Loop over alphas for a path.")
        d = self._b / (self._lam + a[0])  # (k,)
        return self._basis @ d if self._primal else self._Z.T @ (self._basis @ d)


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


def _select_alpha(X: np.ndarray, y: np.ndarray, labels: np.ndarray, codes: np.ndarray,
                  alphas: np.ndarray, inner_splits: int, rng: np.random.Generator, bounds,
                  outer: int) -> tuple[float, np.ndarray]:
    """Grouped inner CV on one outer training part: -> (chosen alpha, pooled MSE (A,))."""
    uniq, inner_codes = np.unique(codes, return_inverse=True)
    if uniq.size < inner_splits:
        raise ValueError(f"outer fold {outer}'s training part has {uniq.size} groups, fewer "
                         f"than inner_splits={inner_splits}; use inner_splits <= {uniq.size} "
                         f"or more prompts.")
    sse = np.zeros(alphas.size)
    for tr, te in _assign_folds(inner_codes, uniq.size, inner_splits, rng):
        check_no_leak(labels, tr, te)
        path = RidgePath._from_checked(X[tr], y[tr])
        err = _clip(path._predict(X[te], alphas), bounds) - y[te]  # (A, m)
        sse += np.einsum("am,am->a", err, err)
    mse = sse / y.shape[0]
    ties = mse <= mse.min() * (1.0 + TIE_RTOL)
    return float(alphas[ties].max()), mse  # ties -> the larger (smoother) alpha


def cross_val_predict(X, y, groups, alphas, *, n_splits: int = 5, inner_splits: int = 3,
                      seed: int = 0, clip=(0.0, 1.0), folds=None) -> CVResult:
    """Grouped out-of-fold ridge predictions; alpha chosen by nested grouped CV. X (n, p), y (n,).

    One alpha: plain K-fold. Several: inside each outer training part, grouped inner CV
    (`inner_splits` folds by `groups`) picks the alpha with the lowest MSE of clipped
    predictions (ties -> larger alpha); the outer test fold is never seen until prediction.
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
    seed = _check_seed(seed)
    if a.size > 1:
        inner_splits = _check_n_splits("inner_splits", inner_splits)
    if folds is None:
        outer = grouped_folds(g, n_splits, seed)
    else:
        outer = _check_folds(folds, g)
    _, codes = _codes("groups", g)

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
            rng = np.random.default_rng([seed, k])  # inner folds differ per outer fold
            chosen[k], inner_mse[k] = _select_alpha(X_tr, y_tr, g[tr], codes[tr], a,
                                                    inner_splits, rng, bounds, k)
        path = RidgePath._from_checked(X_tr, y_tr)
        raw[te] = path._predict(X[te], chosen[k:k + 1])[0]
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
    path = RidgePath._from_checked(X_train, y_train)
    return _clip(path._predict(X_test, a)[0], bounds)
