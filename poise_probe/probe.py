"""The POISE value probe g: a ridge regression on the policy's own features, its buffer and bank.

`RidgeProbe` is `StandardScaler -> optional PCA per feature block -> Ridge(alpha) -> clip`;
`loo_targets` gives each rollout the mean reward of its siblings (the probe's target);
`ProbeBuffer` is the FIFO of recent rows (whole prompt groups evicted, oldest first);
`ProbeBank` keeps one probe and buffer per domain and refits from scratch every step.
Paper: POISE (arXiv 2605.07579), "The probe g".
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Hashable, Mapping, Sequence
from numbers import Integral

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted, validate_data

logger = logging.getLogger(__name__)

__all__ = ["RidgeProbe", "ProbeBuffer", "ProbeBank", "loo_targets", "DEFAULT_DOMAINS"]

TARGET_TOL = 1e-6  # rewards a hair outside [0, 1] (float noise from partial credit) are accepted
PCA_RANDOM_STATE = 0  # PCA's randomized solver is seeded so a refit on the same buffer is identical


def _first_bad_row(a: np.ndarray) -> int | None:
    """Index of the first row holding NaN or inf, or None when every value is finite."""
    bad = ~np.isfinite(a)
    if a.ndim > 1:
        bad = bad.reshape(a.shape[0], -1).any(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


def _check_finite(name: str, a: np.ndarray) -> None:
    row = _first_bad_row(a)
    if row is not None:
        raise ValueError(f"{name} contains NaN or inf (first bad row: {row}); the probe needs "
                         f"finite features and rewards. Check the feature capture and verifier.")


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

    def _clip_bounds(self) -> tuple[float | None, float | None] | None:
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
        """Fit scaler, per-block PCA and ridge on (X, y). X (n, D), y (n,) in `clip`."""
        # Name the first bad row of y (validate_data would only say "y contains NaN"); other
        # kinds of y (None, strings, complex) are left to validate_data's own errors.
        y_arr = np.asarray(y) if y is not None else None
        if y_arr is not None and y_arr.ndim >= 1 and y_arr.dtype.kind == "f":
            _check_finite("y", y_arr)
        X, y = validate_data(self, X, y, dtype=np.float64, ensure_all_finite=False,
                             y_numeric=True)
        _check_finite("X", X)
        bounds = self._clip_bounds()
        if bounds is not None:
            low, high = bounds
            out = np.zeros(len(y), dtype=bool)
            if low is not None:
                out |= y < low - TARGET_TOL
            if high is not None:
                out |= y > high + TARGET_TOL
            if out.any():
                row = int(np.argmax(out))
                raise ValueError(f"y must lie in clip={self.clip} (rewards are in [0, 1]); "
                                 f"y[{row}] = {float(y[row]):g}. Pass clip=None for unbounded "
                                 f"targets.")
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
                pca = PCA(n_components=k_eff, random_state=PCA_RANDOM_STATE)
                self.pcas_.append(pca.fit(Z[:, start:start + size]))
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
        _check_finite("X", X)
        # The same numpy path serves fitted and from_arrays probes, so round trips are exact.
        return self._project(self._scale(X)) @ self.ridge_.coef_ + self.ridge_.intercept_

    def predict(self, X) -> np.ndarray:
        """Predicted prompt value, clipped to `clip`. (n, D) -> (n,)."""
        raw = self.predict_raw(X)
        bounds = self._clip_bounds()
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


# --------------------------------------------------------------------------------------------
# Targets and buffer
# --------------------------------------------------------------------------------------------

def _as_id_list(group_ids) -> list[Hashable]:
    return group_ids.tolist() if isinstance(group_ids, np.ndarray) else list(group_ids)


def _group_index(ids: list[Hashable]) -> tuple[np.ndarray, list[Hashable]]:
    """Map ids to 0..G-1 in order of first appearance. -> (codes (n,), unique ids (G,))."""
    code_of: dict[Hashable, int] = {}
    codes = np.empty(len(ids), dtype=np.int64)
    for i, g in enumerate(ids):
        codes[i] = code_of.setdefault(g, len(code_of))
    return codes, list(code_of)


def loo_targets(rewards, group_ids) -> np.ndarray:
    """Probe target of rollout i: the mean reward of the OTHER rollouts of its prompt. (n,) -> (n,).

    So g learns the prompt value, not whether this trajectory is correct (POISE, "The probe g").
    Example: rewards [0, .5, 1] in one group -> [.75, .5, .25]; with two rollouts, the sibling's.
    """
    r = np.asarray(rewards, dtype=np.float64)
    ids = _as_id_list(group_ids)
    if r.ndim != 1 or len(ids) != r.shape[0]:
        raise ValueError(f"rewards must be 1-D with one group id per reward; got rewards "
                         f"shape {r.shape} and {len(ids)} group ids.")
    _check_finite("rewards", r)
    codes, uniq = _group_index(ids)
    sizes = np.bincount(codes, minlength=len(uniq))
    if (sizes < 2).any():
        lone = [uniq[g] for g in np.flatnonzero(sizes < 2)[:5]]
        raise ValueError(f"every prompt needs >= 2 rollouts (the target is the mean reward of "
                         f"the others); groups with one rollout: {lone}.")
    out = np.empty_like(r)
    for g in range(len(uniq)):
        idx = np.flatnonzero(codes == g)
        k = idx.size
        # 0/1 weights keep K = 2 exact: the target is the sibling's reward, bit for bit.
        others = 1.0 - np.eye(k)
        out[idx] = (others @ r[idx]) / (k - 1)
    return out


class ProbeBuffer:
    """FIFO of recent rows; evicts whole prompt groups, oldest first.

    Stores features (as `dtype`, float32 by default to halve memory at 4096 x 5123), the
    leave-one-out targets computed at add time, rewards, the step and a group serial per row.
    """

    _KEYS = ("X", "y", "rewards", "group", "step")

    def __init__(self, capacity: int = 4096, *, dtype=np.float32):
        if int(capacity) < 2:
            raise ValueError(f"capacity must be >= 2 rows (a group has >= 2 rollouts); got "
                             f"{capacity}.")
        self.capacity = int(capacity)
        self.dtype = np.dtype(dtype)
        self._chunks: list[dict[str, np.ndarray]] = []  # one per add, oldest first
        self._next_group = 0  # serial of the next group; serials grow with insertion order
        self._n_features: int | None = None

    def add(self, features, rewards, group_ids, step: int) -> None:
        """Append one step's rows, then drop the oldest whole groups while over capacity.

        features (n, D), rewards (n,), group_ids (n,) unique per prompt within this call.
        """
        checked = self.check_rows(features, rewards, group_ids)
        if checked is None:
            return
        X, r, y, codes, n_groups = checked
        self._n_features = X.shape[1]
        self._chunks.append({
            "X": np.array(X, dtype=self.dtype),
            "y": y,
            "rewards": r.copy(),
            "group": codes + self._next_group,
            "step": np.full(X.shape[0], int(step), dtype=np.int64),
        })
        self._next_group += n_groups
        self._evict()

    def check_rows(self, features, rewards, group_ids):
        """Validate rows for `add` without storing them; None when there are no rows.

        -> (features (n, D), rewards (n,), loo targets (n,), group codes (n,), n_groups).
        """
        X = np.asarray(features)
        r = np.asarray(rewards, dtype=np.float64)
        ids = _as_id_list(group_ids)
        if X.ndim != 2 or r.ndim != 1 or not (X.shape[0] == r.shape[0] == len(ids)):
            raise ValueError(f"add needs features (n, D), rewards (n,), group_ids (n,); got "
                             f"{X.shape}, {r.shape}, {len(ids)} ids.")
        if X.shape[0] == 0:
            return None
        if self._n_features is not None and X.shape[1] != self._n_features:
            raise ValueError(f"features have {X.shape[1]} columns but the buffer holds "
                             f"{self._n_features}-feature rows.")
        _check_finite("features", X)
        y = loo_targets(r, ids)  # validates rewards and group sizes
        codes, uniq = _group_index(ids)
        biggest = int(np.bincount(codes).max())
        if biggest > self.capacity:
            raise ValueError(f"a group of {biggest} rows exceeds capacity={self.capacity}; "
                             f"groups are never split.")
        return X, r, y, codes, len(uniq)

    def _evict(self) -> None:
        excess = self.n_rows - self.capacity
        if excess <= 0:
            return
        dropped, last = 0, None
        for c in self._chunks:  # serials increase across chunks, so this walks oldest first
            serials, counts = np.unique(c["group"], return_counts=True)
            for s, k in zip(serials, counts):
                dropped += int(k)
                last = int(s)
                if dropped >= excess:
                    break
            if dropped >= excess:
                break
        kept = []
        for c in self._chunks:
            keep = c["group"] > last
            if keep.all():
                kept.append(c)
            elif keep.any():
                kept.append({k: v[keep] for k, v in c.items()})
        self._chunks = kept
        logger.debug("probe buffer evicted %d rows (groups <= %d)", dropped, last)

    def _cat(self, key: str) -> np.ndarray:
        if not self._chunks:
            if key == "X":
                return np.zeros((0, self._n_features or 0), dtype=self.dtype)
            return np.zeros(0, dtype=np.int64 if key in ("group", "step") else np.float64)
        return np.concatenate([c[key] for c in self._chunks])

    @property
    def n_rows(self) -> int:
        return sum(c["y"].shape[0] for c in self._chunks)

    @property
    def n_groups(self) -> int:
        return sum(np.unique(c["group"]).size for c in self._chunks)

    @property
    def steps(self) -> list[int]:
        """Distinct steps with rows in the buffer, ascending."""
        return sorted({int(s) for c in self._chunks for s in np.unique(c["step"])})

    @property
    def X(self) -> np.ndarray:
        return self._cat("X")  # (n, D) in insertion order

    @property
    def y(self) -> np.ndarray:
        return self._cat("y")  # (n,) leave-one-out targets

    @property
    def rewards(self) -> np.ndarray:
        return self._cat("rewards")

    @property
    def row_steps(self) -> np.ndarray:
        return self._cat("step")

    @property
    def row_groups(self) -> np.ndarray:
        return self._cat("group")

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays only (safetensors-ready): rows, group serials, steps and counters."""
        d = {k: np.ascontiguousarray(self._cat(k)) for k in self._KEYS}
        d["next_group"] = np.array([self._next_group], dtype=np.int64)
        d["capacity"] = np.array([self.capacity], dtype=np.int64)
        d["n_features"] = np.array([-1 if self._n_features is None else self._n_features],
                                   dtype=np.int64)
        return d

    def load_state_dict(self, d: Mapping[str, np.ndarray]) -> None:
        """Restore exactly what `state_dict` returned (rows, order, serials, counters)."""
        missing = [k for k in (*self._KEYS, "next_group", "capacity", "n_features")
                   if k not in d]
        if missing:
            raise ValueError(f"buffer state misses {missing}.")
        cap = int(np.asarray(d["capacity"]).reshape(-1)[0])
        if cap != self.capacity:
            raise ValueError(f"buffer state has capacity={cap} but this buffer has "
                             f"capacity={self.capacity}; build it with the saved capacity.")
        rows = {k: np.array(d[k]) for k in self._KEYS}
        n = rows["y"].shape[0]
        if rows["X"].ndim != 2 or any(v.shape[0] != n for v in rows.values()):
            raise ValueError(f"buffer state arrays disagree on the row count: "
                             f"{ {k: v.shape for k, v in rows.items()} }.")
        nf = int(np.asarray(d["n_features"]).reshape(-1)[0])
        self._n_features = None if nf < 0 else nf
        self.dtype = rows["X"].dtype if n else self.dtype
        rows["group"] = rows["group"].astype(np.int64)
        rows["step"] = rows["step"].astype(np.int64)
        self._chunks = [rows] if n else []
        self._next_group = int(np.asarray(d["next_group"]).reshape(-1)[0])


# --------------------------------------------------------------------------------------------
# ProbeBank
# --------------------------------------------------------------------------------------------

DEFAULT_DOMAINS: Mapping[str, int] = {"math": 4096, "code": 3072, "other": 3072}


class ProbeBank:
    """Per-domain probes and buffers routed by domain; refit from scratch every step.

    Use it in the spec's order, so that a step's baselines never see that step's rows:
    ``preds = bank.predict(phi, domains)`` -> advantages frozen -> ``bank.update(...)``.
    Release defaults: math / code / other with 4096 / 3072 / 3072 rows; the first fit of a
    bucket waits until its buffer holds rows from `min_steps_to_fit` distinct steps.
    """

    def __init__(self, domains: Mapping[str, int] | None = None, *, alpha: float = 0.01,
                 blocks=None, pca_components=None, clip=(0.0, 1.0),
                 min_steps_to_fit: int = 8, dtype=np.float32):
        domains = dict(DEFAULT_DOMAINS if domains is None else domains)
        if not domains:
            raise ValueError("domains must name at least one bucket, e.g. {'all': 4096}.")
        if int(min_steps_to_fit) < 1:
            raise ValueError(f"min_steps_to_fit must be >= 1; got {min_steps_to_fit}.")
        self.alpha, self.blocks, self.pca_components, self.clip = (
            alpha, blocks, pca_components, clip)
        self.min_steps_to_fit = int(min_steps_to_fit)
        self.buffers = {name: ProbeBuffer(cap, dtype=dtype) for name, cap in domains.items()}
        self.probes: dict[str, RidgeProbe | None] = {name: None for name in domains}
        self.fit_steps: dict[str, int | None] = {name: None for name in domains}
        RidgeProbe(**self._probe_params())._clip_bounds()  # fail early on a bad clip

    def _probe_params(self) -> dict:
        return dict(alpha=self.alpha, blocks=self.blocks, pca_components=self.pca_components,
                    clip=self.clip)

    @property
    def buckets(self) -> list[str]:
        return list(self.buffers)

    def route(self, domain: str) -> str:
        """Bucket of a domain: its own if the bank has one, else "other", else the only one."""
        if domain in self.buffers:
            return domain
        if "other" in self.buffers:
            return "other"
        if len(self.buffers) == 1:
            return next(iter(self.buffers))
        raise ValueError(f"domain {domain!r} has no bucket and the bank has no 'other' bucket; "
                         f"buckets: {self.buckets}.")

    def is_fitted(self, bucket: str) -> bool:
        if bucket not in self.probes:
            raise ValueError(f"unknown bucket {bucket!r}; buckets: {self.buckets}.")
        return self.probes[bucket] is not None

    def _routes(self, n: int, domains: Sequence[str]) -> np.ndarray:
        domains = list(domains)
        if len(domains) != n:
            raise ValueError(f"got {len(domains)} domains for {n} feature rows.")
        return np.array([self.route(d) for d in domains], dtype=object)

    def predict(self, features, domains: Sequence[str]):
        """Current probes' predictions; rows of an unfitted bucket get NaN and mask False.

        features (n, D), domains (n,) -> (preds (n,) clipped, fitted_mask (n,) bool,
        raw_preds (n,) unclipped). Fresh arrays: later updates never change them.
        """
        X = np.asarray(features)
        if X.ndim != 2:
            raise ValueError(f"features must be (n, D); got shape {X.shape}.")
        _check_finite("features", X)
        routes = self._routes(X.shape[0], domains)
        preds = np.full(X.shape[0], np.nan)
        raw = np.full(X.shape[0], np.nan)
        mask = np.zeros(X.shape[0], dtype=bool)
        for bucket, probe in self.probes.items():
            rows = routes == bucket
            if probe is None or not rows.any():
                continue
            raw[rows] = probe.predict_raw(X[rows])
            bounds = probe._clip_bounds()
            preds[rows] = raw[rows] if bounds is None else np.clip(raw[rows], *bounds)
            mask[rows] = True
        return preds, mask, raw

    def update(self, features, rewards, group_ids, domains: Sequence[str],
               step: int) -> dict[str, float]:
        """Add this step's rows to their buckets, then refit each bucket that got rows.

        A bucket is refit from scratch on its whole buffer once the buffer holds rows from
        >= `min_steps_to_fit` distinct steps (a bucket without new rows would refit to the
        same probe, so it is skipped). Returns ``probe/<bucket>/{n_rows,n_groups,n_steps,
        fitted,refit,fit_s}`` for every bucket and ``probe/fit_s`` (total refit seconds).
        """
        X = np.asarray(features)
        r = np.asarray(rewards, dtype=np.float64)
        ids = _as_id_list(group_ids)
        if X.ndim != 2 or r.ndim != 1 or not (X.shape[0] == r.shape[0] == len(ids)):
            raise ValueError(f"update needs features (n, D), rewards (n,), group_ids (n,); "
                             f"got {X.shape}, {r.shape}, {len(ids)} ids.")
        routes = self._routes(X.shape[0], domains)
        bucket_of: dict[Hashable, str] = {}
        for g, b in zip(ids, routes):
            if bucket_of.setdefault(g, b) != b:
                raise ValueError(f"group {g!r} has rollouts routed to {bucket_of[g]!r} and "
                                 f"{b!r}; all rollouts of a prompt share its domain.")
        _check_finite("features", X)  # row numbers in errors refer to the caller's batch
        _check_finite("rewards", r)
        bounds = RidgeProbe(**self._probe_params())._clip_bounds()
        if bounds is not None:
            low, high = bounds
            bad = ((r < low - TARGET_TOL) if low is not None else False) | \
                  ((r > high + TARGET_TOL) if high is not None else False)
            if np.any(bad):
                row = int(np.argmax(bad))
                raise ValueError(f"rewards must lie in clip={self.clip}; rewards[{row}] = "
                                 f"{float(r[row]):g}.")

        per_bucket = {}
        for bucket, buf in self.buffers.items():  # validate every bucket before touching any
            rows = np.flatnonzero(routes == bucket)
            per_bucket[bucket] = (X[rows], r[rows], [ids[i] for i in rows])
            buf.check_rows(*per_bucket[bucket])

        metrics: dict[str, float] = {}
        total = 0.0
        for bucket, buf in self.buffers.items():
            Xb, rb, idb = per_bucket[bucket]
            refit, fit_s = False, 0.0
            if rb.size:
                buf.add(Xb, rb, idb, step)
                if len(buf.steps) >= self.min_steps_to_fit:
                    t0 = time.perf_counter()
                    self.probes[bucket] = RidgeProbe(**self._probe_params()).fit(buf.X, buf.y)
                    fit_s = time.perf_counter() - t0
                    self.fit_steps[bucket] = int(step)
                    refit = True
                    logger.debug("refit probe %r on %d rows in %.3fs", bucket, buf.n_rows, fit_s)
            total += fit_s
            p = f"probe/{bucket}/"
            metrics[p + "n_rows"] = float(buf.n_rows)
            metrics[p + "n_groups"] = float(buf.n_groups)
            metrics[p + "n_steps"] = float(len(buf.steps))
            metrics[p + "fitted"] = float(self.probes[bucket] is not None)
            metrics[p + "refit"] = float(refit)
            metrics[p + "fit_s"] = fit_s
        metrics["probe/fit_s"] = total
        return metrics

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat str -> ndarray for safetensors: ``<bucket>/buffer/<k>``, ``<bucket>/probe/<k>``."""
        out: dict[str, np.ndarray] = {}
        for bucket, buf in self.buffers.items():
            for k, v in buf.state_dict().items():
                out[f"{bucket}/buffer/{k}"] = v
            probe = self.probes[bucket]
            if probe is not None:
                for k, v in probe.to_arrays().items():
                    out[f"{bucket}/probe/{k}"] = v
                out[f"{bucket}/fit_step"] = np.array([self.fit_steps[bucket]], dtype=np.int64)
        return out

    def load_state_dict(self, d: Mapping[str, np.ndarray]) -> None:
        """Restore buffers and probes saved by `state_dict`; same predictions afterwards."""
        buckets = {k.split("/", 1)[0] for k in d}
        unknown = buckets - set(self.buffers)
        if unknown:
            raise ValueError(f"state has buckets {sorted(unknown)} this bank lacks; buckets: "
                             f"{self.buckets}.")
        for bucket, buf in self.buffers.items():
            pre = f"{bucket}/buffer/"
            sub = {k[len(pre):]: v for k, v in d.items() if k.startswith(pre)}
            if not sub:
                raise ValueError(f"state has no buffer for bucket {bucket!r}.")
            buf.load_state_dict(sub)
            pre = f"{bucket}/probe/"
            arrays = {k[len(pre):]: v for k, v in d.items() if k.startswith(pre)}
            self.probes[bucket] = RidgeProbe.from_arrays(arrays) if arrays else None
            fs = d.get(f"{bucket}/fit_step")
            self.fit_steps[bucket] = None if fs is None else int(np.asarray(fs).reshape(-1)[0])
