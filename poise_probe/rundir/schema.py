"""What a run directory holds: schema version, rollout columns and types, step names, plain values.

No file I/O here; `fs`, `writer` and `reader` build on these definitions (docs/run-format.md).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

SCHEMA_VERSION = 2
# version 2 only added rollout columns and meta keys, so a version-1 run can be continued
RESUMABLE_VERSIONS = (1, 2)
STATUSES = ("running", "finished", "failed", "stopped")

# Required rollout columns and their on-disk types, in file order; extra columns follow them.
ROLLOUT_COLUMNS: dict[str, pa.DataType] = {
    "step": pa.int64(),
    "prompt_id": pa.string(),
    "group_id": pa.int64(),
    "domain": pa.string(),
    "data_source": pa.string(),
    "rollout_idx": pa.int64(),
    "prompt": pa.string(),
    "completion": pa.string(),
    "reward": pa.float64(),
    "probe_pred": pa.float64(),
    "baseline": pa.float64(),
    "advantage": pa.float64(),
    "token_entropies": pa.list_(pa.float32()),
    "num_tokens": pa.int64(),
    "truncated": pa.bool_(),
}
# NaN is a value here ("no probe prediction"); a null in any other required column is an error.
_NULL_AS_NAN = ("reward", "probe_pred", "baseline", "advantage")


def step_name(step: int) -> str:
    """File stem of a step: 12 -> "step_000012" (zero-padded to 6 digits, longer when needed)."""
    return f"step_{check_step(step):06d}"


def check_step(step: Any) -> int:
    """`step` as an int >= 0; bools, floats and negatives raise."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int; got {type(step).__name__} {step!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0; got {step}")
    return int(step)


# --------------------------------------------------------------------------------------------
# Plain values (JSON, YAML, metrics)


def to_plain(obj: Any, where: str, *, json_nan: bool) -> Any:
    """Convert to dict/list/str/int/float/bool/None; `where` names the value in errors."""
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return None if json_nan and not math.isfinite(obj) else float(obj)
    if isinstance(obj, (np.generic, np.ndarray)) and np.asarray(obj).dtype.kind in "biufU":
        return to_plain(obj.tolist() if isinstance(obj, np.ndarray) else obj.item(), where,
                        json_nan=json_nan)
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be strings; got {type(key).__name__} {key!r}")
            out[key] = to_plain(value, f"{where}.{key}", json_nan=json_nan)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, f"{where}[{i}]", json_nan=json_nan) for i, v in enumerate(obj)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{where}: cannot store a {type(obj).__name__} ({obj!r:.80}); convert it to a "
                    f"number, string, bool, None, list or dict first")


def metric_value(key: str, value: Any) -> Any:
    """One metric value as a JSON scalar; NaN/inf -> None."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, np.generic) and value.dtype.kind in "biufU":
        value = value.item()
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(f"metric {key!r}: values must be numbers, strings, bools or None; got "
                    f"{type(value).__name__} ({value!r:.80}). Log a scalar (e.g. tensor.item()).")


# --------------------------------------------------------------------------------------------
# Rollout tables


def _entropy_array(rows: Iterable[Any]) -> pa.Array:
    """Per-row token entropies (lists or arrays of any float dtype) as list<float32>."""
    values = [None if v is None or (isinstance(v, float) and math.isnan(v))
              else np.asarray(v, dtype=np.float32).ravel() for v in rows]
    return pa.array(values, type=ROLLOUT_COLUMNS["token_entropies"])


def _column_array(name: str, values: Any) -> pa.Array | pa.ChunkedArray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    if name == "token_entropies":
        return _entropy_array(values)
    if isinstance(values, pd.Series):
        return pa.Array.from_pandas(values)
    return pa.array(values)


def as_rollout_table(rows: Any, step: int) -> pa.Table:
    """Validate rollout rows and give the required columns their on-disk types."""
    if isinstance(rows, pa.RecordBatch):
        rows = pa.Table.from_batches([rows])
    if isinstance(rows, pd.DataFrame):
        rows = {str(name): rows[name].reset_index(drop=True) for name in rows.columns}
    if isinstance(rows, pa.Table):
        table = rows.replace_schema_metadata(None)
    elif isinstance(rows, Mapping):
        columns = {}
        for name, values in rows.items():
            try:
                columns[str(name)] = _column_array(str(name), values)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as err:
                raise TypeError(f"rollout column {name!r} at step {step} cannot be stored as "
                                f"one typed column: {err}") from err
        try:
            table = pa.table(columns)
        except pa.ArrowInvalid as err:
            raise ValueError(f"rollouts for step {step} do not form a table: {err}") from err
    else:
        raise TypeError(f"rollouts must be a pandas DataFrame, a pyarrow Table or a dict of "
                        f"columns; got {type(rows).__name__}")

    if "step" not in table.column_names:  # the step argument says it; no need to repeat it per row
        table = table.append_column("step", pa.array([step] * table.num_rows, pa.int64()))
    missing = [name for name in ROLLOUT_COLUMNS if name not in table.column_names]
    if missing:
        raise ValueError(f"rollouts for step {step} lack required column(s) {missing}; required "
                         f"columns: {list(ROLLOUT_COLUMNS)} (see docs/run-format.md)")
    fixed = {}
    for name, typ in ROLLOUT_COLUMNS.items():
        col = table.column(name)
        if col.type != typ:
            try:  # float64 -> float32 entropies lose precision by design; other casts must be exact
                col = col.cast(typ, safe=name != "token_entropies")
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
                raise TypeError(f"rollout column {name!r} must hold {typ}; got {col.type} "
                                f"({err})") from err
        if col.null_count:
            if name not in _NULL_AS_NAN:
                raise ValueError(f"rollout column {name!r} has {col.null_count} missing value(s) "
                                 f"at step {step}; every row needs one")
            col = col.fill_null(float("nan"))
        fixed[name] = col
    for name in table.column_names:
        if name not in fixed:
            fixed[name] = table.column(name)
    table = pa.table(fixed)

    steps = set(table.column("step").to_pylist())
    if steps - {step}:
        raise ValueError(f"rollout column 'step' holds {sorted(steps)} but write_rollouts was "
                         f"called for step {step}")
    seen: set[tuple[int, int]] = set()
    for key in zip(table.column("group_id").to_pylist(), table.column("rollout_idx").to_pylist()):
        if key in seen:
            raise ValueError(f"rollouts for step {step} repeat (group_id, rollout_idx) = {key}; "
                             f"each rollout of a group needs its own rollout_idx")
        seen.add(key)
    return table.replace_schema_metadata({"poise_probe.schema_version": str(SCHEMA_VERSION)})
