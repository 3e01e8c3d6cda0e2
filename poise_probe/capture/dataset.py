"""Capture datasets on disk: sharded safetensors plus a Parquet index, resumable shard by shard.

```
<dataset>/
  manifest.json                 what was captured and from what (model/tokenizer fingerprints,
                                layers, poolings, dtype, source); "complete" once every shard is in
  rollouts.parquet              the plan: every rollout to capture, one row each, in row order
  shards/shard_000000.safetensors  layers.<L>.resid_post.<pooling> (rows, d), entropy_stats
                                   (rows, 3), seq_stats (rows, 5)
  shards/shard_000000.parquet      per-row token entropies / log-probs and token counts
  index.parquet                 the plan's columns (less token ids) + shard, shard_row + the above
```
Every file is written whole and renamed into place, so a shard exists completely or not at all;
a rerun with the same arguments skips finished shards and recomputes the rest (deterministic, so
the shards come out byte-identical to an uninterrupted capture).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from poise_probe.rundir import (
    atomic_write_bytes,
    atomic_write_json,
    git_commit,
    now_iso,
)

__all__ = [
    "FEATURE_SETS",
    "MANIFEST_KIND",
    "PLAN_COLUMNS",
    "CaptureDataset",
    "DatasetError",
    "check_compatible",
    "fingerprint_model",
    "fingerprint_tokenizer",
    "load_datasets",
    "read_plan",
    "shard_name",
    "tensor_name",
    "write_plan",
]

MANIFEST_KIND = "poise-probe-capture"
SCHEMA_VERSION = 1
#: Columns a plan must have (see sources.py); token id lists are filled from text when absent.
PLAN_COLUMNS = ("prompt_id", "group", "rollout_idx", "step", "domain", "data_source", "prompt",
                "completion", "reward")
#: Input sets of the paper's ablation (POISE.md, "Published results"), built by `design`.
FEATURE_SETS = ("full", "reasoning", "entropy", "prompt", "length")
#: Manifest keys that must agree for a resume or for datasets used together.
_COMPAT_KEYS = ("model_fingerprint", "tokenizer_fingerprint", "layers", "poolings", "dtype",
                "temperature", "hidden_size", "num_layers")


class DatasetError(ValueError):
    """A capture dataset directory that is missing, malformed, incomplete or incompatible."""


def shard_name(index: int) -> str:
    return f"shard_{index:06d}"


def shard_done(root: Path, name: str) -> bool:
    """A shard is complete when both its files were renamed into place (tensors first)."""
    d = root / "shards"
    return (d / f"{name}.safetensors").is_file() and (d / f"{name}.parquet").is_file()


def tensor_name(layer: int, pooling: str) -> str:
    """Safetensors key of one layer's pooled residual stream: `layers.19.resid_post.prompt_last_10`."""
    return f"layers.{layer}.resid_post.{pooling}"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint_model(model) -> str:
    """Config plus the bytes of the first and last parameter: cheap, and changes when training does."""
    cfg = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    h = hashlib.sha256(cfg.encode())
    params = list(model.parameters())
    for p in (params[0], params[-1]):
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint_tokenizer(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha((vocab + str(tokenizer.chat_template)).encode())[:16]


# -- plan ------------------------------------------------------------------------------------

def _plan_table(frame: pd.DataFrame) -> pa.Table:
    missing = [c for c in PLAN_COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetError(f"rollouts to capture lack column(s) {missing}; each row needs "
                           f"{list(PLAN_COLUMNS)}.")
    rewards = pd.to_numeric(frame["reward"], errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(~np.isfinite(rewards))
    if bad.size:
        i = int(bad[0])
        value = _plain(frame["reward"].iloc[i])
        raise DatasetError(f"rollout {i} (prompt_id {frame['prompt_id'].iloc[i]!r}) has reward "
                           f"{value!r}; rewards must be finite numbers in "
                           f"[0, 1]. Drop or re-score those rows.")
    frame = frame.reset_index(drop=True).copy()
    frame["row"] = np.arange(len(frame), dtype=np.int64)
    return pa.Table.from_pandas(frame, preserve_index=False)


def write_plan(path: Path, frame: pd.DataFrame) -> str:
    """Write the plan atomically; returns its content hash (rows, ids and rewards)."""
    table = _plan_table(frame)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    return plan_hash(table.to_pandas())


def plan_hash(frame: pd.DataFrame) -> str:
    h = hashlib.sha256()
    for col in ("prompt_id", "group", "rollout_idx", "reward", "prompt_token_ids", "token_ids"):
        if col in frame.columns:
            h.update(col.encode())
            h.update(json.dumps([_plain(v) for v in frame[col]]).encode())
    return h.hexdigest()[:16]


def _plain(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return v


def read_plan(path: Path) -> pd.DataFrame:
    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetError(f"{path}: cannot read the capture plan ({err}); delete it to rebuild "
                           f"it from the source.") from err


# -- reading ---------------------------------------------------------------------------------

def _read_manifest(root: Path) -> dict:
    path = root / "manifest.json"
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; pass a dataset directory written by "
                           f"`poise probe capture`.")
    if not path.is_file():
        if (root / "meta.json").is_file():
            raise DatasetError(f"{root} is a training run directory, not a capture dataset; "
                               f"capture its rollouts' activations first: `poise probe capture "
                               f"--run {root} --out {root}-capture`, then pass --data "
                               f"{root}-capture.")
        raise DatasetError(f"{root} has no manifest.json, so it is not a capture dataset; create "
                           f"one with `poise probe capture --out {root} ...`.")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is not valid JSON ({err}); rerun the capture into a new "
                           f"--out folder.") from err
    if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
        raise DatasetError(f"{path} is not a poise-probe capture manifest (kind "
                           f"{manifest.get('kind') if isinstance(manifest, dict) else None!r}).")
    if manifest.get("schema_version", 0) > SCHEMA_VERSION:
        raise DatasetError(f"{path} has schema_version {manifest['schema_version']}; this "
                           f"poise_probe reads up to {SCHEMA_VERSION}. Upgrade poise_probe.")
    for key in ("layers", "poolings", "n_rows", "shard_rows", "hidden_size"):
        if key not in manifest:
            raise DatasetError(f"{path} lacks the field {key!r}; the capture did not finish "
                               f"writing its manifest. Rerun the capture command to resume.")
    return manifest


def check_compatible(a: Mapping[str, Any], b: Mapping[str, Any], what_a: str, what_b: str) -> None:
    """Raise naming every manifest field that differs between two captures."""
    diff = [k for k in _COMPAT_KEYS if a.get(k) != b.get(k)]
    if diff:
        detail = "; ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in diff)
        raise DatasetError(f"{what_a} and {what_b} were captured differently ({detail}); features "
                           f"from different models, layers or poolings cannot be mixed. Capture "
                           f"both with the same model and --layers/--*-windows/--dtype.")


class CaptureDataset:
    """A finished capture: the index (one row per rollout) and lazy access to pooled features."""

    def __init__(self, path: str | os.PathLike, *, allow_partial: bool = False):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        m = self.manifest
        self.layers: list[int] = [int(x) for x in m["layers"]]
        self.poolings: list[str] = list(m["poolings"])
        self.hidden_size = int(m["hidden_size"])
        self.n_rows = int(m["n_rows"])
        n_shards = -(-self.n_rows // int(m["shard_rows"])) if self.n_rows else 0
        self.shards = [shard_name(i) for i in range(n_shards)]
        missing = [s for s in self.shards if not shard_done(self.path, s)]
        if missing and not allow_partial:
            raise DatasetError(f"{self.path}: capture incomplete, {len(missing)} of "
                               f"{len(self.shards)} shards missing (first {missing[0]}); rerun "
                               f"the same `poise probe capture` command to resume it.")
        self.shards = [s for s in self.shards if s not in missing]
        self._cache: dict[str, np.ndarray] = {}
        self._index: pd.DataFrame | None = None

    @classmethod
    def from_arrays(cls, index: pd.DataFrame, tensors: Mapping[str, np.ndarray], *,
                    layers: Sequence[int], poolings: Sequence[str],
                    hidden_size: int) -> CaptureDataset:
        """A capture held in memory (synthetic studies, tests), read like one on disk.

        `index` has one row per rollout (the columns `index` has on disk that the reader
        uses); `tensors` what the shards would hold: `tensor_name(layer, pooling)` (n, d) for
        every layer and pooling, "entropy_stats" (n, 3) and "seq_stats" (n, 5).
        """
        n = len(index)
        widths = {tensor_name(layer, pooling): hidden_size for layer in layers
                  for pooling in poolings}
        widths.update(entropy_stats=3, seq_stats=5)
        for key, width in widths.items():
            if key not in tensors:
                raise DatasetError(f"in-memory capture lacks the tensor {key!r}; pass an "
                                   f"(n, {width}) array for every layer and pooling, plus "
                                   f"'entropy_stats' and 'seq_stats'.")
            if np.shape(tensors[key]) != (n, width):
                raise DatasetError(f"in-memory tensor {key!r} has shape "
                                   f"{np.shape(tensors[key])}; expected ({n}, {width}): one row "
                                   f"per index row, hidden_size={hidden_size} columns.")
        ds = cls.__new__(cls)
        ds.path = Path(":memory:")
        ds.layers, ds.poolings = [int(x) for x in layers], list(poolings)
        ds.hidden_size, ds.n_rows, ds.shards = int(hidden_size), n, []
        ds.manifest = {"kind": MANIFEST_KIND, "schema_version": SCHEMA_VERSION,
                       "layers": ds.layers, "poolings": ds.poolings, "hidden_size": ds.hidden_size,
                       "n_rows": n, "complete": True, "source": {"kind": "memory"}}
        ds._cache = {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}
        ds._index = index
        return ds

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return (f"CaptureDataset({str(self.path)!r}, rows={len(self)}, layers={self.layers}, "
                f"poolings={len(self.poolings)})")

    @property
    def index(self) -> pd.DataFrame:
        """One row per captured rollout: plan columns, shard, shard_row, token arrays."""
        if self._index is None:
            path = self.path / "index.parquet"
            if path.is_file() and self.manifest.get("complete"):
                self._index = pq.read_table(path).to_pandas()
            else:
                self._index = build_index(self.path, self.shards)
        return self._index

    def _check(self, layer: int, pooling: str) -> None:
        if layer not in self.layers:
            raise DatasetError(f"layer {layer} was not captured in {self.path}; captured layers: "
                               f"{self.layers}. Capture it with --layers.")
        if pooling not in self.poolings:
            raise DatasetError(f"pooling {pooling!r} was not captured in {self.path}; captured: "
                               f"{self.poolings}.")

    def _tensor(self, key: str) -> np.ndarray:
        if key not in self._cache:
            from safetensors import safe_open

            parts = []
            for s in self.shards:
                with safe_open(str(self.path / "shards" / f"{s}.safetensors"), "pt") as f:
                    if key not in f.keys():  # noqa: SIM118 - safe_open has no __contains__
                        raise DatasetError(f"{self.path}/shards/{s}.safetensors has no tensor "
                                           f"{key!r}; the shard is not from this manifest. Delete "
                                           f"it and rerun the capture to rewrite it.")
                    parts.append(f.get_tensor(key).float().numpy())
            width = {"entropy_stats": 3, "seq_stats": 5}.get(key, self.hidden_size)
            self._cache[key] = (np.concatenate(parts) if parts
                                else np.zeros((0, width), np.float32))
        return self._cache[key]

    def pooled(self, layer: int, pooling: str) -> np.ndarray:
        """(n, d) float32 pooled residual stream after block `layer`."""
        self._check(layer, pooling)
        return self._tensor(tensor_name(layer, pooling))

    def entropy_stats(self) -> np.ndarray:
        """(n, 3) mean entropy over all response tokens, the reasoning span, the answer span."""
        return self._tensor("entropy_stats")

    def seq_stats(self) -> np.ndarray:
        """(n, 5) per-sequence means of entropy, varentropy, log-prob, top-1 prob, top-1 margin."""
        return self._tensor("seq_stats")

    def poise_features(self, layer: int, window: int, reasoning: str = "reasoning_last") -> np.ndarray:
        """(n, 2d + 3) the trainer's phi: [prompt_last_n; reasoning_last_n; 3 entropies]."""
        second = f"{reasoning}_{window}" if reasoning == "reasoning_last" else reasoning
        return np.concatenate([self.pooled(layer, f"prompt_last_{window}"),
                               self.pooled(layer, second), self.entropy_stats()], axis=1)

    def design(self, feature_set: str, layer: int, window: int,
               reasoning: str = "reasoning_last") -> np.ndarray:
        """Inputs of one ablation row: full, reasoning (state), entropy, prompt (state), length."""
        if feature_set == "full":
            return self.poise_features(layer, window, reasoning)
        if feature_set == "reasoning":
            second = f"{reasoning}_{window}" if reasoning == "reasoning_last" else reasoning
            return self.pooled(layer, second)
        if feature_set == "prompt":
            return self.pooled(layer, f"prompt_last_{window}")
        if feature_set == "entropy":
            return self.entropy_stats()
        if feature_set == "length":
            return self.index["num_response_tokens"].to_numpy(dtype=np.float64)[:, None]
        raise DatasetError(f"unknown feature set {feature_set!r}; choose from {FEATURE_SETS}.")

    def windows(self) -> list[int]:
        """Windows n captured for both prompt_last_n and reasoning_last_n."""
        p = {int(x.rsplit("_", 1)[1]) for x in self.poolings if x.startswith("prompt_last_")}
        r = {int(x.rsplit("_", 1)[1]) for x in self.poolings if x.startswith("reasoning_last_")}
        return sorted(p & r)


def build_index(root: Path, shards: Sequence[str]) -> pd.DataFrame:
    """The plan (less token id lists) joined with each finished shard's per-row outputs."""
    plan = read_plan(root / "rollouts.parquet")
    plan = plan.drop(columns=[c for c in ("prompt_token_ids", "token_ids") if c in plan.columns])
    parts = [pq.read_table(root / "shards" / f"{s}.parquet").to_pandas() for s in shards]
    if not parts:
        return plan.iloc[:0]
    rows = pd.concat(parts, ignore_index=True)
    return plan.merge(rows, on="row", how="inner", validate="one_to_one").sort_values(
        "row", ignore_index=True)


def load_datasets(paths: Iterable[str | os.PathLike]) -> CaptureDataset | ConcatDataset:
    """One dataset, or several captured compatibly (same model, layers, poolings) used as one."""
    sets = [CaptureDataset(p) for p in paths]
    if not sets:
        raise DatasetError("no dataset directory given.")
    if len(sets) == 1:
        return sets[0]
    for other in sets[1:]:
        check_compatible(sets[0].manifest, other.manifest, str(sets[0].path), str(other.path))
    return ConcatDataset(sets)


class ConcatDataset(CaptureDataset):
    """Several compatible captures read as one (rows in order; `dataset` column says which)."""

    def __init__(self, sets: Sequence[CaptureDataset]):
        self.sets = list(sets)
        first = self.sets[0]
        self.path = first.path
        self.manifest = first.manifest
        self.layers, self.poolings = first.layers, first.poolings
        self.hidden_size = first.hidden_size
        self.n_rows = sum(len(s) for s in self.sets)
        self._cache = {}
        frames = []
        for i, s in enumerate(self.sets):
            f = s.index.copy()
            f["dataset"] = str(s.path)
            f["group"] = f"{i}/" + f["group"].astype(str)
            frames.append(f)
        self._index = pd.concat(frames, ignore_index=True)

    def _tensor(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = np.concatenate([s._tensor(key) for s in self.sets])
        return self._cache[key]


def new_manifest(**fields) -> dict:
    return {"kind": MANIFEST_KIND, "schema_version": SCHEMA_VERSION, "created": now_iso(),
            "git_commit": git_commit(), **fields, "complete": False}


def write_manifest(root: Path, manifest: Mapping[str, Any]) -> None:
    atomic_write_json(root / "manifest.json", dict(manifest))
