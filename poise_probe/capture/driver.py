"""`capture`: plan -> shards -> index, resumable; the function behind `poise probe capture`."""
from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from poise_probe import __version__
from poise_probe.capture.collect import TOKEN_STATS, Capturer, CaptureSpec
from poise_probe.capture.dataset import (
    CaptureDataset,
    DatasetError,
    build_index,
    shard_done,
    fingerprint_model,
    fingerprint_tokenizer,
    new_manifest,
    plan_hash,
    read_plan,
    shard_name,
    tensor_name,
    write_manifest,
    write_plan,
)
from poise_probe.capture.sources import fill_token_ids
from poise_probe.rundir import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = ["capture", "prepare_plan"]

#: Manifest fields a resume must match, with the fix to print when one differs.
_RESUME_KEYS = ("model_fingerprint", "tokenizer_fingerprint", "layers", "poolings", "dtype",
                "temperature", "shard_rows", "plan_sha256", "n_rows", "source")


def prepare_plan(out_dir: Path, make_plan: Callable[[], tuple[pd.DataFrame, dict]],
                 source_key: dict) -> tuple[pd.DataFrame, dict]:
    """Reuse `out_dir/rollouts.parquet` when it was made from the same source, else make it.

    `source_key` identifies the source without running it (for generation: tasks, counts, seed,
    model fingerprint), so a resumed capture does not sample again.
    """
    path = out_dir / "rollouts.parquet"
    manifest_path = out_dir / "manifest.json"
    if path.is_file() and manifest_path.is_file():
        old = json.loads(manifest_path.read_text()).get("source")
        if old == source_key:
            return read_plan(path), old
        raise DatasetError(f"{out_dir} already holds a capture of another source ({old}); this "
                           f"call asks for {source_key}. Use a new --out folder, or repeat the "
                           f"original command to resume it.")
    plan, _desc = make_plan()
    return plan, source_key


def capture(model, tokenizer, plan: pd.DataFrame, out_dir: str | os.PathLike, spec: CaptureSpec,
            *, source: dict, model_path: str = "", batch_size: int = 32, shard_rows: int = 256,
            backend: str = "nnsight", progress: Callable[[int], None] | None = None,
            stop_after_shards: int | None = None) -> CaptureDataset:
    """Capture every plan row into `out_dir`; finished shards of an earlier run are kept.

    plan: rows from `sources.plan_from_run` / `plan_from_generation` (token ids filled from text
    where missing). Memory is bounded by one shard of pooled vectors. `stop_after_shards` stops
    early (tests of resume); `progress(n_rows)` is called after each batch.
    """
    if batch_size < 1 or shard_rows < 1:
        raise ValueError(f"batch_size and shard_rows must be >= 1; got {batch_size}, {shard_rows}.")
    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    plan = fill_token_ids(plan, tokenizer).reset_index(drop=True)
    plan["row"] = np.arange(len(plan), dtype=np.int64)
    capturer = Capturer(model, tokenizer, spec, backend=backend)
    manifest = new_manifest(
        version=__version__, model=str(model_path), model_type=model.config.model_type,
        model_fingerprint=fingerprint_model(model),
        tokenizer_fingerprint=fingerprint_tokenizer(tokenizer),
        num_layers=capturer.num_layers, hidden_size=int(model.config.hidden_size),
        layers=list(spec.layers), poolings=list(spec.poolings), dtype=spec.dtype,
        temperature=spec.temperature, token_stats=list(TOKEN_STATS), shard_rows=shard_rows,
        n_rows=len(plan), plan_sha256=plan_hash(plan), source=source, backend=backend,
        prompt_template=tokenizer.chat_template or "", tensor_names="layers.<L>.resid_post.<pooling>")
    _check_resume(out, manifest)
    if not (out / "rollouts.parquet").is_file():
        write_plan(out / "rollouts.parquet", plan)
    write_manifest(out, manifest)
    n_shards = -(-len(plan) // shard_rows)
    done = 0
    for s in range(n_shards):
        name = shard_name(s)
        lo, hi = s * shard_rows, min(len(plan), (s + 1) * shard_rows)
        if shard_done(out, name):
            if progress:
                progress(hi - lo)
            continue
        _write_shard(out, name, plan.iloc[lo:hi], capturer, spec, batch_size, progress)
        done += 1
        if stop_after_shards is not None and done >= stop_after_shards and s + 1 < n_shards:
            log.info("stopping after %d new shard(s) as asked", done)
            return CaptureDataset(out, allow_partial=True)
    index = build_index(out, [shard_name(i) for i in range(n_shards)])
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(index, preserve_index=False), sink, compression="zstd")
    atomic_write_bytes(out / "index.parquet", sink.getvalue().to_pybytes())
    manifest["complete"] = True
    write_manifest(out, manifest)
    return CaptureDataset(out)


def _check_resume(out: Path, manifest: dict) -> None:
    path = out / "manifest.json"
    if not path.is_file():
        stray = sorted((out / "shards").glob("shard_*"))
        if stray:
            raise DatasetError(f"{out}/shards holds {len(stray)} file(s) but there is no "
                               f"manifest.json, so they cannot be checked; empty the folder or "
                               f"choose another --out.")
        return
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is not valid JSON ({err}); delete the folder and capture "
                           f"again.") from err
    diff = [k for k in _RESUME_KEYS if old.get(k) != manifest.get(k)]
    if diff:
        what = "; ".join(f"{k}: was {old.get(k)!r}, now {manifest.get(k)!r}" for k in diff)
        hint = (" The model does not match the captured one." if "model_fingerprint" in diff
                else "")
        raise DatasetError(f"{out} holds a capture made with other settings ({what}).{hint} "
                           f"Resume with the original model and arguments, or use a new --out.")
    manifest["created"] = old.get("created", manifest["created"])


def _write_shard(out: Path, name: str, rows: pd.DataFrame, capturer: Capturer,
                 spec: CaptureSpec, batch_size: int, progress) -> None:
    from safetensors.torch import save

    pooled: dict[int, list[torch.Tensor]] = {layer: [] for layer in spec.layers}
    ent, seq, tok_ent, tok_lp = [], [], [], []
    n_prompt, n_resp = [], []
    # similar lengths share a batch (less padding); results go back to plan order
    order = np.argsort([len(p) + len(r) for p, r in zip(rows["prompt_token_ids"],
                                                        rows["token_ids"])], kind="stable")
    for start in range(0, len(rows), batch_size):
        idx = order[start:start + batch_size]
        p_ids = [list(map(int, rows["prompt_token_ids"].iloc[i])) for i in idx]
        r_ids = [list(map(int, rows["token_ids"].iloc[i])) for i in idx]
        res = capturer.run(p_ids, r_ids)
        for layer in spec.layers:
            pooled[layer].append(res["pooled"][layer])
        ent.append(res["entropy_stats"])
        seq.append(res["seq_stats"])
        tok_ent.extend(res["token_entropy"])
        tok_lp.extend(res["token_logprob"])
        n_prompt.extend(len(p) for p in p_ids)
        n_resp.extend(len(r) for r in r_ids)
        if progress:
            progress(len(idx))
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    inv_t = torch.as_tensor(inv)
    tensors = {}
    for layer in spec.layers:
        stacked = torch.cat(pooled[layer])[inv_t]                         # (rows, P, d)
        for j, pooling in enumerate(spec.poolings):
            tensors[tensor_name(layer, pooling)] = stacked[:, j].contiguous()
    tensors["entropy_stats"] = torch.as_tensor(np.concatenate(ent)[inv])
    tensors["seq_stats"] = torch.as_tensor(np.concatenate(seq)[inv])
    first = int(rows["row"].iloc[0])
    # one metadata key: safetensors orders several keys differently from run to run
    meta = {"poise_probe.rows": json.dumps({"first_row": first, "n_rows": len(rows)})}
    atomic_write_bytes(out / "shards" / f"{name}.safetensors", save(tensors, metadata=meta))
    table = pa.table({
        "row": pa.array(np.arange(first, first + len(rows), dtype=np.int64)),
        "shard": pa.array([name] * len(rows)),
        "shard_row": pa.array(np.arange(len(rows), dtype=np.int64)),
        "num_prompt_tokens": pa.array(np.asarray(n_prompt)[inv].astype(np.int64)),
        "num_response_tokens": pa.array(np.asarray(n_resp)[inv].astype(np.int64)),
        "token_entropies": pa.array([tok_ent[i] for i in inv], type=pa.list_(pa.float32())),
        "token_logprobs": pa.array([tok_lp[i] for i in inv], type=pa.list_(pa.float32())),
        **{f"mean_{k}": pa.array(tensors["seq_stats"][:, j].numpy())
           for j, k in enumerate(TOKEN_STATS)},
    })
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(out / "shards" / f"{name}.parquet", sink.getvalue())
