"""The probe's targets and memory: `loo_targets` (each rollout's mean sibling reward),
`ProbeBuffer` (the FIFO of recent rows, whole prompt groups evicted oldest first) and
`ProbeBank` (one probe and buffer per domain, refit from scratch every step).
Paper: POISE (arXiv 2605.07579), "The probe g".
"""
from __future__ import annotations

import contextlib
import functools

import logging
import time
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from poise_probe.probe.ridge import RidgeProbe, check_finite, check_in_clip
from poise_probe.stats import as_id_list, group_codes, loo_mean

logger = logging.getLogger(__name__)

__all__ = ["ProbeBuffer", "ProbeBank", "loo_targets", "DEFAULT_DOMAINS"]


# --------------------------------------------------------------------------------------------
# Targets and buffer
# --------------------------------------------------------------------------------------------

def _batch(what: str, features, rewards, group_ids) -> tuple[np.ndarray, np.ndarray, list]:
    """(features (n, D), rewards (n,) float64, group ids as a list), shapes checked."""
    X = np.asarray(features)
    r = np.asarray(rewards, dtype=np.float64)
    ids = as_id_list(group_ids)
    if X.ndim != 2 or r.ndim != 1 or not (X.shape[0] == r.shape[0] == len(ids)):
        raise ValueError(f"{what} needs features (n, D), rewards (n,), group_ids (n,); got "
                         f"{X.shape}, {r.shape}, {len(ids)} ids.")
    return X, r, ids


def loo_targets(rewards, group_ids) -> np.ndarray:
    """Probe target of rollout i: the mean reward of the OTHER rollouts of its prompt. (n,) -> (n,).

    So g learns the prompt value, not whether this trajectory is correct (POISE, "The probe g").
    Example: rewards [0, .5, 1] in one group -> [.75, .5, .25]; with two rollouts, the sibling's.
    """
    r = np.asarray(rewards, dtype=np.float64)
    ids = as_id_list(group_ids)
    if r.ndim != 1 or len(ids) != r.shape[0]:
        raise ValueError(f"rewards must be 1-D with one group id per reward; got rewards "
                         f"shape {r.shape} and {len(ids)} group ids.")
    check_finite("rewards", r)
    codes, uniq = group_codes(ids)
    sizes = np.bincount(codes, minlength=len(uniq))
    if (sizes < 2).any():
        lone = [uniq[g] for g in np.flatnonzero(sizes < 2)[:5]]
        raise ValueError(f"every prompt needs >= 2 rollouts (the target is the mean reward of "
                         f"the others); groups with one rollout: {lone}.")
    return loo_mean(r, codes)


def check_storable(X: np.ndarray, dtype: np.dtype) -> None:
    """Validate features in the dtype that is stored: a finite float64 beyond float32's range
    would be stored as inf and poison every later fit."""
    dtype = np.dtype(dtype)
    if dtype.kind != "f" or X.dtype.itemsize <= dtype.itemsize:
        return
    limit = np.finfo(dtype).max
    bad = np.flatnonzero((np.abs(X) > limit).any(axis=1))
    if bad.size:
        raise ValueError(f"features row {int(bad[0])} holds {float(np.abs(X[bad[0]]).max()):.3g}, "
                         f"beyond {dtype} (max {limit:.3g}), the dtype the probe buffer stores; "
                         f"the features are broken (check the capture), or build the bank with "
                         f"dtype=np.float64.")


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
        X, r, ids = _batch("add", features, rewards, group_ids)
        if X.shape[0] == 0:
            return None
        if self._n_features is not None and X.shape[1] != self._n_features:
            raise ValueError(f"features have {X.shape[1]} columns but the buffer holds "
                             f"{self._n_features}-feature rows.")
        check_finite("features", X)
        check_storable(X, self.dtype)
        y = loo_targets(r, ids)  # validates rewards and group sizes
        codes, uniq = group_codes(ids)
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
        for key in ("X", "rewards", "y"):
            if not np.isfinite(rows[key]).all():
                raise ValueError(f"the saved probe buffer's {key!r} holds NaN or inf; the probe "
                                 f"bank file is damaged (resume from an earlier checkpoint).")
        rows["group"] = rows["group"].astype(np.int64)
        rows["step"] = rows["step"].astype(np.int64)
        self._chunks = [rows] if n else []
        self._next_group = int(np.asarray(d["next_group"]).reshape(-1)[0])


# --------------------------------------------------------------------------------------------
# ProbeBank
# --------------------------------------------------------------------------------------------

DEFAULT_DOMAINS: Mapping[str, int] = {"math": 4096, "code": 3072, "other": 3072}


@functools.lru_cache(maxsize=1)
def _thread_pools():
    """The process's BLAS/OpenMP pools, found once at the first refit (a new scan per refit,
    as `threadpool_limits` does, cost 2.5 ms here: most of a tiny step's probe time)."""
    from threadpoolctl import ThreadpoolController
    return ThreadpoolController()


class ProbeBank:
    """Per-domain probes and buffers routed by domain; refit from scratch every step.

    Use it in the spec's order, so that a step's baselines never see that step's rows:
    ``preds = bank.predict(phi, domains)`` -> advantages frozen -> ``bank.update(...)``.
    Release defaults: math / code / other with 4096 / 3072 / 3072 rows; the first fit of a
    bucket waits until its buffer holds rows from `min_steps_to_fit` distinct steps.
    """

    def __init__(self, domains: Mapping[str, int] | None = None, *, alpha: float = 0.01,
                 blocks=None, pca_components=None, clip=(0.0, 1.0),
                 min_steps_to_fit: int = 8, dtype=np.float32, fit_threads: int | None = None):
        domains = dict(DEFAULT_DOMAINS if domains is None else domains)
        if not domains:
            raise ValueError("domains must name at least one bucket, e.g. {'all': 4096}.")
        if int(min_steps_to_fit) < 1:
            raise ValueError(f"min_steps_to_fit must be >= 1; got {min_steps_to_fit}.")
        self.alpha, self.blocks, self.pca_components, self.clip = (
            alpha, blocks, pca_components, clip)
        self.min_steps_to_fit = int(min_steps_to_fit)
        if fit_threads is not None and int(fit_threads) < 1:
            raise ValueError(f"fit_threads must be >= 1 or None; got {fit_threads}.")
        # BLAS/OpenMP threads of a refit (None: the libraries' own); a refit is a few ms of
        # small products, and on few cores more threads fight torch's pool rather than help
        self.fit_threads = None if fit_threads is None else int(fit_threads)
        self.buffers = {name: ProbeBuffer(cap, dtype=dtype) for name, cap in domains.items()}
        self.probes: dict[str, RidgeProbe | None] = {name: None for name in domains}
        self.fit_steps: dict[str, int | None] = {name: None for name in domains}
        RidgeProbe(**self._probe_params()).clip_bounds()  # fail early on a bad clip

    @classmethod
    def from_config(cls, probe, hidden_size: int) -> "ProbeBank":
        """The bank a run's `probe` config section (`config.ProbeConfig`) describes, for
        features of a model with `hidden_size` (prompt vector, reasoning vector, 3 entropies)."""
        return cls(dict(probe.buffer_caps), alpha=probe.alpha,
                   blocks=(hidden_size, hidden_size, 3),
                   pca_components=(probe.pca_prompt, probe.pca_reasoning, None),
                   min_steps_to_fit=probe.min_steps_to_fit, fit_threads=probe.refit_threads)

    def _fit_threads(self):
        if self.fit_threads is None:
            return contextlib.nullcontext()
        return _thread_pools().limit(limits=self.fit_threads)

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
        check_finite("features", X)
        routes = self._routes(X.shape[0], domains)
        preds = np.full(X.shape[0], np.nan)
        raw = np.full(X.shape[0], np.nan)
        mask = np.zeros(X.shape[0], dtype=bool)
        for bucket, probe in self.probes.items():
            rows = routes == bucket
            if probe is None or not rows.any():
                continue
            raw[rows] = probe.predict_raw(X[rows])
            bounds = probe.clip_bounds()
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
        X, r, ids = _batch("update", features, rewards, group_ids)
        routes = self._routes(X.shape[0], domains)
        bucket_of: dict[Hashable, str] = {}
        for g, b in zip(ids, routes):
            if bucket_of.setdefault(g, b) != b:
                raise ValueError(f"group {g!r} has rollouts routed to {bucket_of[g]!r} and "
                                 f"{b!r}; all rollouts of a prompt share its domain.")
        check_finite("features", X)  # row numbers in errors refer to the caller's batch
        check_storable(X, next(iter(self.buffers.values())).dtype)
        check_finite("rewards", r)
        check_in_clip("rewards", r, RidgeProbe(**self._probe_params()).clip_bounds())

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
                    with self._fit_threads():
                        self.probes[bucket] = RidgeProbe(**self._probe_params()).fit(buf.X,
                                                                                     buf.y)
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

