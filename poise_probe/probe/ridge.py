"""`RidgeProbe`, the POISE value probe g: `StandardScaler -> optional PCA per feature block ->
Ridge(alpha) -> clip`, a scikit-learn regressor with exact array round trips.
Paper: POISE (arXiv 2605.07579), "The probe g".
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted, validate_data

__all__ = ["RidgeProbe", "check_finite", "check_in_clip", "TARGET_TOL", "PCA_RANDOM_STATE"]

TARGET_TOL = 1e-6  # rewards a hair outside [0, 1] (float noise from partial credit) are accepted
PCA_RANDOM_STATE = 0  # PCA's randomized solver is seeded so a refit on the same buffer is identical


def _first_bad_row(a: np.ndarray) -> int | None:
    """Index of the first row holding NaN or inf, or None when every value is finite."""
    bad = ~np.isfinite(a)
    if a.ndim > 1:
        bad = bad.reshape(a.shape[0], -1).any(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


def check_finite(name: str, a: np.ndarray) -> None:
    row = _first_bad_row(a)
    if row is not None:
        raise ValueError(f"{name} contains NaN or inf (first bad row: {row}); the probe needs "
                         f"finite features and rewards. Check the feature capture and verifier.")



def check_in_clip(name: str, y: np.ndarray, bounds: tuple[float | None, float | None] | None
                  ) -> None:
    """ValueError naming the first value of y outside the probe's clip bounds (give or take
    TARGET_TOL of float noise); None bounds check nothing."""
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
                         f"{name}[{r}] = {float(y[r]):g}. Pass clip=None for unbounded "
                         f"targets.")


def _fit_pca(Z: np.ndarray, k: int) -> PCA:
    """PCA with `k` components on scaled block `Z`, also on a block without variance.

    One row, or a block that is constant over the rows, scales to zeros: scikit-learn then
    divides 0 by 0 for the explained variance (a RuntimeWarning, NaN in the snapshot). Such a
    block explains no variance, so those entries are 0; the projection is 0 either way.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        pca = PCA(n_components=k, random_state=PCA_RANDOM_STATE).fit(Z)
    for attr in ("explained_variance_", "explained_variance_ratio_"):
        value = getattr(pca, attr, None)
        if value is not None and not np.isfinite(value).all():
            setattr(pca, attr, np.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0))
    return pca


# --------------------------------------------------------------------------------------------
# RidgeProbe
# --------------------------------------------------------------------------------------------

class RidgeProbe(RegressorMixin, BaseEstimator):
    """StandardScaler on all features -> optional PCA per block -> Ridge(alpha) -> clip.

    Parameters
    ----------
    alpha : ridge penalty. 0.01 on raw features (paper v2); 100 with PCA (release, Qwen3-4B).
    blocks : sizes of consecutive feature blocks, e.g. ``(d, d, 3)`` for
        [prompt vector; reasoning vector; 3 entropies]. None: all features are one block.
    pca_components : None (no PCA), an int (the same count for every block), or one entry per
        block, each an int or None, e.g. ``(32, 64, None)`` (release: prompt -> 32, reasoning
        -> 64). Counts are capped at ``min(n_samples - 1, block size)`` (at least 1) at fit
        time; the counts used are in ``n_components_``.
    clip : ``(low, high)`` bounds for ``predict`` (either may be None), or None for no clip.
        Rewards live in [0, 1], so the default is (0, 1). ``fit`` refuses targets outside
        ``clip`` (beyond 1e-6): a probe clipped to [0, 1] fit on other targets is a bug.

    Attributes
    ----------
    scaler_ : fitted StandardScaler over all features.
    pcas_ : list with one fitted PCA per block, None where that block has no PCA.
    ridge_ : fitted Ridge on the concatenated (projected or scaled) blocks.
    block_sizes_ : tuple of block sizes used. n_components_ : tuple, PCA count per block or None.
    n_features_in_ : number of input features.
    """

    def __init__(self, alpha=0.01, blocks=None, pca_components=None, clip=(0.0, 1.0)):
        self.alpha = alpha
        self.blocks = blocks
        self.pca_components = pca_components
        self.clip = clip

    # -- hyperparameter checks (at fit, as scikit-learn does) --------------------------------

    def clip_bounds(self) -> tuple[float | None, float | None] | None:
        if self.clip is None:
            return None
        try:
            low, high = self.clip
        except (TypeError, ValueError):
            raise ValueError(f"clip must be None or a (low, high) pair; got {self.clip!r}.")
        low = None if low is None else float(low)
        high = None if high is None else float(high)
        if low is not None and high is not None and not low < high:
            raise ValueError(f"clip must have low < high; got {self.clip!r}.")
        return low, high

    def _block_sizes(self, n_features: int) -> tuple[int, ...]:
        if self.blocks is None:
            return (n_features,)
        sizes = tuple(int(b) for b in self.blocks)
        if not sizes or any(b <= 0 for b in sizes):
            raise ValueError(f"blocks must be positive sizes; got {self.blocks!r}.")
        if sum(sizes) != n_features:
            raise ValueError(f"blocks {sizes} sum to {sum(sizes)} but X has {n_features} "
                             f"features; give one size per consecutive block, e.g. (d, d, 3).")
        return sizes

    def _requested_components(self, n_blocks: int) -> tuple[int | None, ...]:
        pc = self.pca_components
        if pc is None:
            return (None,) * n_blocks
        if isinstance(pc, Integral):
            pc = (int(pc),) * n_blocks
        pc = tuple(None if k is None else k for k in pc)
        if len(pc) != n_blocks:
            raise ValueError(f"pca_components has {len(pc)} entries but there are {n_blocks} "
                             f"blocks; give one count (or None) per block.")
        for k in pc:
            if k is not None and (not isinstance(k, Integral) or k < 1):
                raise ValueError(f"pca_components entries must be positive ints or None; "
                                 f"got {self.pca_components!r}.")
        return tuple(None if k is None else int(k) for k in pc)

    # -- fit / predict -------------------------------------------------------------------------

    def fit(self, X, y):
        """Fit scaler, per-block PCA and ridge on (X, y). X (n, D), y (n,) in `clip`.

        Degenerate data is a well-defined fit, not an error: one row, constant features or
        constant targets give a probe that predicts the mean target (finite, no warnings), as
        the prompt-value estimate with nothing to tell rows apart. Zero rows are refused.
        """
        # Name the first bad row of y (validate_data would only say "y contains NaN"); other
        # kinds of y (None, strings, complex) are left to validate_data's own errors.
        y_arr = np.asarray(y) if y is not None else None
        if y_arr is not None and y_arr.ndim >= 1 and y_arr.dtype.kind == "f":
            check_finite("y", y_arr)
        X, y = validate_data(self, X, y, dtype=np.float64, ensure_all_finite=False,
                             y_numeric=True)
        check_finite("X", X)
        check_in_clip("y", y, self.clip_bounds())
        sizes = self._block_sizes(X.shape[1])
        requested = self._requested_components(len(sizes))
        n = X.shape[0]

        self.scaler_ = StandardScaler().fit(X)
        Z = self._scale(X)
        self.pcas_, n_components = [], []
        start = 0
        for size, k in zip(sizes, requested):
            if k is None:
                self.pcas_.append(None)
                n_components.append(None)
            else:
                k_eff = max(1, min(k, n - 1, size))
                self.pcas_.append(_fit_pca(Z[:, start:start + size], k_eff))
                n_components.append(k_eff)
            start += size
        self.block_sizes_ = sizes
        self.n_components_ = tuple(n_components)
        self.ridge_ = Ridge(alpha=self.alpha).fit(self._project(Z), y)
        return self

    def _scale(self, X: np.ndarray) -> np.ndarray:
        return (X - self.scaler_.mean_) / self.scaler_.scale_

    def _project(self, Z: np.ndarray) -> np.ndarray:
        """Concatenate, per block, its PCA scores or its scaled features. (n, D) -> (n, P)."""
        parts, start = [], 0
        for size, pca in zip(self.block_sizes_, self.pcas_):
            block = Z[:, start:start + size]
            parts.append(block if pca is None else (block - pca.mean_) @ pca.components_.T)
            start += size
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def predict_raw(self, X) -> np.ndarray:
        """Unclipped ridge output (diagnostics: the fraction outside [0, 1]). (n, D) -> (n,)."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False, ensure_all_finite=False)
        check_finite("X", X)
        # The same numpy path serves fitted and from_arrays probes, so round trips are exact.
        return self._project(self._scale(X)) @ self.ridge_.coef_ + self.ridge_.intercept_

    def predict(self, X) -> np.ndarray:
        """Predicted prompt value, clipped to `clip`. (n, D) -> (n,)."""
        raw = self.predict_raw(X)
        bounds = self.clip_bounds()
        return raw if bounds is None else np.clip(raw, bounds[0], bounds[1])

    # -- snapshots (arrays only, no pickle) ----------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to predict (and the hyperparameters), as float64 arrays.

        Keys: ``scaler.{mean,scale,var}``, ``pca.{i}.{components,mean,explained_variance}`` for
        each block i with PCA, ``ridge.{coef,intercept}``, ``struct.block_sizes``,
        ``struct.n_components`` (-1: no PCA), ``hyper.alpha``, ``hyper.clip`` (NaN side: None;
        empty: clip=None), ``hyper.blocks`` (empty: None), ``hyper.pca_components`` (empty:
        None; 0-d: one int for every block; -1 entries: None), ``fit.n_samples``.
        """
        check_is_fitted(self)
        f = lambda v: np.array(v, dtype=np.float64, order="C")  # noqa: E731  (safetensors: C order)
        out = {
            "scaler.mean": f(self.scaler_.mean_),
            "scaler.scale": f(self.scaler_.scale_),
            "scaler.var": f(self.scaler_.var_),
            "ridge.coef": f(self.ridge_.coef_).reshape(-1),
            "ridge.intercept": f(self.ridge_.intercept_).reshape(1),
            "struct.block_sizes": f(self.block_sizes_),
            "struct.n_components": f([-1 if k is None else k for k in self.n_components_]),
            "hyper.alpha": f([self.alpha]),
            "fit.n_samples": f([self.scaler_.n_samples_seen_]).reshape(1),
        }
        for i, pca in enumerate(self.pcas_):
            if pca is not None:
                out[f"pca.{i}.components"] = f(pca.components_)
                out[f"pca.{i}.mean"] = f(pca.mean_)
                out[f"pca.{i}.explained_variance"] = f(pca.explained_variance_)
        if self.clip is None:
            out["hyper.clip"] = f([])
        else:
            out["hyper.clip"] = f([math.nan if c is None else c for c in self.clip])
        out["hyper.blocks"] = f([] if self.blocks is None else list(self.blocks))
        pc = self.pca_components
        if pc is None:
            out["hyper.pca_components"] = f([])
        elif isinstance(pc, Integral):
            out["hyper.pca_components"] = f(int(pc))
        else:
            out["hyper.pca_components"] = f([-1 if k is None else k for k in pc])
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], **hyper) -> "RidgeProbe":
        """Rebuild a fitted probe from `to_arrays` output; same predictions, bit for bit.

        Hyperparameters come from the ``hyper.*`` arrays; keyword arguments override them.
        """
        required = ["scaler.mean", "scaler.scale", "scaler.var", "ridge.coef",
                    "ridge.intercept", "struct.block_sizes", "struct.n_components"]
        missing = [k for k in required if k not in arrays]
        if missing:
            raise ValueError(f"probe arrays miss {missing}; expected the output of "
                             f"RidgeProbe.to_arrays().")
        a = {k: np.asarray(v) for k, v in arrays.items()}
        params = {}
        if "hyper.alpha" in a:
            params["alpha"] = float(a["hyper.alpha"].reshape(-1)[0])
        if "hyper.clip" in a:
            c = a["hyper.clip"]
            params["clip"] = None if c.size == 0 else tuple(
                None if math.isnan(v) else float(v) for v in c.tolist())
        if "hyper.blocks" in a:
            b = a["hyper.blocks"]
            params["blocks"] = None if b.size == 0 else tuple(int(v) for v in b.tolist())
        if "hyper.pca_components" in a:
            pc = a["hyper.pca_components"]
            if pc.ndim == 0:
                params["pca_components"] = int(pc)
            elif pc.size == 0:
                params["pca_components"] = None
            else:
                params["pca_components"] = tuple(None if v < 0 else int(v) for v in pc.tolist())
        params.update(hyper)
        probe = cls(**params)

        sizes = tuple(int(v) for v in a["struct.block_sizes"].tolist())
        n_comp = tuple(None if v < 0 else int(v) for v in a["struct.n_components"].tolist())
        n_features = int(a["scaler.mean"].shape[0])
        if sum(sizes) != n_features or len(n_comp) != len(sizes):
            raise ValueError(f"probe arrays are inconsistent: block sizes {sizes} (sum "
                             f"{sum(sizes)}), {len(n_comp)} component entries, {n_features} "
                             f"scaler features.")
        if probe.blocks is not None and probe._block_sizes(n_features) != sizes:
            raise ValueError(f"blocks={probe.blocks!r} do not match the stored block sizes "
                             f"{sizes}.")
        scaler = StandardScaler()
        scaler.mean_ = a["scaler.mean"].astype(np.float64)
        scaler.scale_ = a["scaler.scale"].astype(np.float64)
        scaler.var_ = a["scaler.var"].astype(np.float64)
        scaler.n_features_in_ = n_features
        scaler.n_samples_seen_ = int(a["fit.n_samples"].reshape(-1)[0]) \
            if "fit.n_samples" in a else 0
        pcas = []
        for i, (size, k) in enumerate(zip(sizes, n_comp)):
            if k is None:
                pcas.append(None)
                continue
            comps = a[f"pca.{i}.components"].astype(np.float64)
            if comps.shape != (k, size):
                raise ValueError(f"pca.{i}.components has shape {comps.shape}; expected "
                                 f"({k}, {size}).")
            pca = PCA(n_components=k, random_state=PCA_RANDOM_STATE)
            pca.components_ = comps
            pca.mean_ = a[f"pca.{i}.mean"].astype(np.float64)
            pca.explained_variance_ = a.get(f"pca.{i}.explained_variance",
                                            np.full(k, np.nan)).astype(np.float64)
            pca.n_components_ = k
            pca.n_features_in_ = size
            pcas.append(pca)
        ridge = Ridge(alpha=probe.alpha)
        ridge.coef_ = a["ridge.coef"].astype(np.float64).reshape(-1)
        ridge.intercept_ = float(a["ridge.intercept"].reshape(-1)[0])
        n_proj = sum(size if k is None else k for size, k in zip(sizes, n_comp))
        if ridge.coef_.shape[0] != n_proj:
            raise ValueError(f"ridge.coef has {ridge.coef_.shape[0]} entries; the blocks give "
                             f"{n_proj} projected features.")
        ridge.n_features_in_ = n_proj
        probe.scaler_, probe.pcas_, probe.ridge_ = scaler, pcas, ridge
        probe.block_sizes_, probe.n_components_ = sizes, n_comp
        probe.n_features_in_ = n_features
        return probe


