"""Runs made elsewhere: a TRL `GRPOTrainer` output folder or a verl rollout dump, read as a
read-only run through `RunReader`'s interface, so the dashboard and notebooks open them too.

What each trainer leaves (read from TRL 1.16 and verl 0.9.1):

- TRL, with `GRPOConfig(log_completions=True)`: `<output_dir>/completions/completions_{step:05d}
  .parquet` at every logging step (columns step, prompt, completion, one column per reward
  function, the extra columns logged with `log_extra`, advantage), and the Trainer's
  `log_history` in `trainer_state.json` (in every `checkpoint-N/`, and at the top after
  `save_state()`).
- verl, with `trainer.rollout_data_dir` (or `trainer.validation_data_dir`): `{global_step}.jsonl`,
  one JSON object per rollout: input, output, gts, score, step and the reward function's
  `reward_extra_info` keys.

Rollout tables get this project's columns where they can be derived (docs/run-format.md): step,
prompt_id (a hash of the prompt), group_id (see `_with_groups`), rollout_idx,
prompt, completion, reward, advantage (TRL), ground_truth and score (verl), the per-function
rewards as `reward/<name>` (TRL), and `probe_pred`/`baseline` where the run logged them (this
project's integrations do); other logged columns are kept under their own names. Metrics keep
their own names and add this project's where the meaning is the same (`TRL_METRIC_NAMES`); a
verl dump holds no training metrics, so its reward statistics are computed from the dumps.
Nothing is written into the folder: parsed files are cached in memory by file identity.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from poise_probe.rundir.fs import pick_step
from poise_probe.rundir.reader import RunReader

logger = logging.getLogger(__name__)

SOURCES = ("poise", "trl", "verl")
#: A foreign run with no end marker counts as running while a file changed this recently.
LIVE_SECONDS = 300.0
#: `inferred_status` of a foreign run: TRL's trainer_state.json can say finished; otherwise a
#: run is running while its files change and "ended" after (neither trainer records failures).
EXTERNAL_STATUSES = ("running", "finished", "ended")

#: TRL's logged keys that mean what a key of docs/run-format.md means (the original is kept too).
TRL_METRIC_NAMES = {
    "reward": "reward/mean", "reward_std": "reward/std",
    "frac_reward_zero_std": "batch/frac_reward_zero_std",
    "completions/mean_length": "tokens/response_len_mean",
    "completions/clipped_ratio": "response/truncated_frac",
    "entropy": "response/entropy_mean",
    "loss": "actor/pg_loss", "grad_norm": "actor/grad_norm", "learning_rate": "actor/lr",
    "clip_ratio/region_mean": "actor/clip_frac", "clip_ratio/high_mean": "actor/clip_frac_higher",
    "clip_ratio/low_mean": "actor/clip_frac_lower", "kl": "actor/kl",
    "step_time": "timing_s/step",
    "poise/used_frac": "probe/used_frac", "poise/baseline_mean": "adv/baseline_mean",
}
#: Logged columns that are this project's rollout columns under the same name (not rewards).
CONTRACT_EXTRAS = ("prompt_id", "domain", "data_source", "task", "probe_pred", "baseline",
                   "probe_target", "score", "num_tokens", "truncated", "token_entropies",
                   "ground_truth")
#: The first columns of a derived table, in the contract's order (those present).
LEADING = ("step", "prompt_id", "group_id", "domain", "data_source", "rollout_idx", "prompt",
           "completion", "reward", "probe_pred", "baseline", "advantage", "num_tokens",
           "truncated", "ground_truth", "score")

TRL_TABLE = re.compile(r"^completions_(\d+)\.parquet$")
VERL_DUMP = re.compile(r"^(\d+)\.jsonl$")
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
REWARD_FUNC_KEY = re.compile(r"^rewards/(.+)/mean$")
VERL_FIELDS = ("input", "output", "score")


class FoundRun(NamedTuple):
    """A run folder and where it came from: "poise" (a run directory), "trl" or "verl"."""

    path: Path
    source: str


# --------------------------------------------------------------------------------------------
# recognising and opening


def _numbered(folder: Path, pattern: re.Pattern, *, dirs: bool = False) -> list[tuple[int, Path]]:
    """(number, path) of the entries of `folder` whose name matches `pattern`, by number."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for e in entries:
        m = pattern.match(e.name)
        if m and (e.is_dir() if dirs else e.is_file()):
            out.append((int(m.group(1)), Path(e.path)))
    return sorted(out)


def _looks_like_verl(path: Path) -> bool:
    """A verl dump's first line names input and output (a line that does not parse still counts,
    so opening it reports the damage)."""
    try:
        with open(path, "rb") as f:
            line = f.readline(1 << 20)
    except OSError:
        return False
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return True
    return isinstance(record, dict) and "input" in record and "output" in record


def _trl_states(folder: Path) -> list[Path]:
    """trainer_state.json at the top of a TRL output folder and in its checkpoints."""
    states = [folder / "trainer_state.json"] if (folder / "trainer_state.json").is_file() else []
    for _, ckpt in _numbered(folder, CHECKPOINT, dirs=True):
        if (ckpt / "trainer_state.json").is_file():
            states.append(ckpt / "trainer_state.json")
    return states


def run_source(path: str | os.PathLike) -> str | None:
    """"poise" for a run directory (meta.json), "trl" for a TRL output folder (completion logs
    or a trainer_state.json of a GRPO run), "verl" for a verl dump folder, else None."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    if (folder / "meta.json").is_file():
        return "poise"
    dumps = _numbered(folder, VERL_DUMP)
    if dumps and _looks_like_verl(dumps[0][1]):
        return "verl"
    if _numbered(folder / "completions", TRL_TABLE):
        return "trl"
    for state in _trl_states(folder):
        try:
            history = _read_state(*_identity(state))["log_history"]
        except (OSError, ValueError):
            return "trl"            # a damaged state: open it to see why
        if any("reward" in entry for entry in history):
            return "trl"
    return None


def open_run(path: str | os.PathLike) -> RunReader | ExternalRun:
    """A `RunReader` for a run directory, a `TrlRun` or `VerlDumpRun` for a foreign run folder;
    anything else raises, saying what was looked for."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"run directory {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder, so not a run directory")
    source = run_source(folder)
    if source == "poise":
        return RunReader(folder)
    if source == "trl":
        return TrlRun(folder)
    if source == "verl":
        return VerlDumpRun(folder)
    raise FileNotFoundError(
        f"{folder} is not a run: it has no meta.json (a poise_probe run directory), no "
        f"completions/completions_NNNNN.parquet or trainer_state.json with a 'reward' log "
        f"(a TRL GRPOTrainer output_dir: train with log_completions=True), and no "
        f"<step>.jsonl (a verl trainer.rollout_data_dir or validation_data_dir). To list the "
        f"runs under a folder use find_all_runs({str(folder)!r}).")


def find_all_runs(*roots: str | os.PathLike) -> list[FoundRun]:
    """Every run at or under `roots`, sorted: run directories (as `find_runs`), TRL output
    folders and verl dump folders, each with its source; hidden folders are skipped."""
    found: dict[Path, str] = {}
    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(f"cannot search {root} for runs: no such folder")
        for dirpath, dirnames, filenames in os.walk(root):
            folder = Path(dirpath)
            if "meta.json" in filenames:
                found[folder] = "poise"
                dirnames.clear()  # a run's own subfolders hold no runs
                continue
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            source = run_source(folder)
            if source is not None:
                found[folder] = source
            if source == "trl":  # its checkpoints and logs hold no runs (a poise/ subfolder may)
                dirnames[:] = [d for d in dirnames if not CHECKPOINT.match(d)
                               and d not in ("completions", "runs")]
    return [FoundRun(path, source) for path, source in sorted(found.items())]


# --------------------------------------------------------------------------------------------
# cached file reads (keyed by path, mtime and size: a changed file is read again)


def _identity(path: Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return str(path), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=256)
def _read_state(path: str, mtime_ns: int, size: int) -> dict:
    """A Trainer's trainer_state.json, checked for a `log_history` list of objects."""
    del mtime_ns, size
    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err}); the Trainer rewrites this file at each "
                         f"checkpoint: delete the damaged checkpoint folder or wait for the "
                         f"next one") from err
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise ValueError(f"{path}: field 'log_history' must be a list of log entries (a "
                         f"transformers Trainer's trainer_state.json); got "
                         f"{type(state.get('log_history') if isinstance(state, dict) else state).__name__}")
    for i, entry in enumerate(state["log_history"]):
        if not isinstance(entry, dict) or isinstance(entry.get("step"), bool) \
                or not isinstance(entry.get("step"), int):
            raise ValueError(f"{path}: log_history[{i}] is not an object with an integer "
                             f"'step': {str(entry)[:120]}")
    return state


@functools.lru_cache(maxsize=64)
def _trl_table(path: str, mtime_ns: int, size: int, step: int,
               reward_names: tuple[str, ...] | None) -> pd.DataFrame:
    del mtime_ns, size
    try:
        raw = pq.read_table(path).to_pandas()
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path}: cannot read parquet ({err}); TRL writes it whole at each "
                         f"logging step: delete the damaged file") from err
    return _trl_rows(raw, Path(path), step, reward_names)


@functools.lru_cache(maxsize=64)
def _verl_table(path: str, mtime_ns: int, size: int, step: int) -> pd.DataFrame:
    del mtime_ns, size
    return _verl_rows(_read_jsonl(Path(path)), Path(path), step)


@functools.lru_cache(maxsize=16384)
def _summary(kind: str, path: str, mtime_ns: int, size: int, step: int,
             reward_names: tuple[str, ...] | None) -> dict:
    """The reward statistics of one step's table (its metrics line when no log holds them)."""
    table = (_trl_table(path, mtime_ns, size, step, reward_names) if kind == "trl"
             else _verl_table(path, mtime_ns, size, step))
    return table_metrics(table)


# --------------------------------------------------------------------------------------------
# turning foreign rows into this project's columns


def chat_text(value: Any) -> str:
    """A prompt or completion as text: a string as is, chat messages as `role: content` lines
    (the run format's convention), content parts joined by their text."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, (list, tuple, np.ndarray)):
        lines = []
        for m in value:
            if isinstance(m, dict) and "content" in m:
                lines.append(f"{m.get('role', '')}: {_content_text(m['content'])}")
            else:
                lines.append(str(m))
        return "\n".join(lines)
    return "" if value is None else str(value)


def completion_text(value: Any) -> str:
    """A completion as text: one assistant message gives its content, several give `role:
    content` lines (tool calls and their results)."""
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) == 1 \
            and isinstance(value[0], dict) and "content" in value[0]:
        return _content_text(value[0]["content"])
    return chat_text(value)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple, np.ndarray)):  # multimodal parts, images stripped
        return "".join(str(p.get("text", "")) if isinstance(p, dict) else str(p)
                       for p in content)
    return "" if content is None else str(content)


def _ground_truth(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _prompt_id(prompt: str) -> str:
    """A stable id of a prompt's text (the same prompt has it at every step)."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


def _with_groups(df: pd.DataFrame, adjacent: bool) -> pd.DataFrame:
    """group_id, rollout_idx within each group, prompt_id from the text; then the contract's
    columns first. Neither trainer logs the group itself. TRL logs a group's rollouts together
    (`adjacent`): a group is a run of consecutive identical prompts, so the same prompt drawn
    twice into a batch is two groups unless the sampler put them side by side. verl dumps after
    balancing the batch across ranks, which scatters a group: there a group is every rollout of
    one prompt text."""
    if adjacent:
        prompts = df["prompt"].to_numpy()
        starts = np.ones(len(prompts), dtype=bool)
        starts[1:] = prompts[1:] != prompts[:-1]
        df["group_id"] = (np.cumsum(starts) - 1).astype("int64")
    else:
        df["group_id"] = pd.factorize(df["prompt"], sort=False)[0].astype("int64")
    df["rollout_idx"] = df.groupby("group_id").cumcount().astype("int64")
    if "prompt_id" not in df:
        df["prompt_id"] = [_prompt_id(p) for p in df["prompt"]]
    lead = [c for c in LEADING if c in df]
    return df[lead + [c for c in df.columns if c not in lead]].reset_index(drop=True)


def _trl_rows(raw: pd.DataFrame, path: Path, step: int,
              reward_names: tuple[str, ...] | None) -> pd.DataFrame:
    """A TRL completions table with this project's columns (see the module docstring)."""
    cols = [str(c) for c in raw.columns]
    for need in ("prompt", "completion"):
        if need not in cols:
            raise ValueError(
                f"{path}: no {need!r} column (it has {cols}); TRL's GRPOTrainer with "
                f"log_completions=True writes step, prompt, completion, one column per reward "
                f"function and advantage: point the dashboard at the output_dir of such a run, "
                f"or remove this file from its completions/ folder")
    funcs = _reward_columns(raw, cols, reward_names)
    if not funcs:
        raise ValueError(f"{path}: no reward column: expected one numeric column per reward "
                         f"function between 'completion' and 'advantage' (it has {cols}); "
                         f"TRL writes them with log_completions=True")
    out = pd.DataFrame({"step": np.full(len(raw), step, dtype="int64"),
                        "prompt": [chat_text(v) for v in raw["prompt"]],
                        "completion": [completion_text(v) for v in raw["completion"]]})
    rewards = raw[funcs].apply(pd.to_numeric, errors="coerce").astype("float64")
    out["reward"] = rewards.sum(axis=1, min_count=1)  # TRL's nansum; all None stays NaN
    if "advantage" in cols:
        out["advantage"] = pd.to_numeric(raw["advantage"], errors="coerce").astype("float64")
    for name in funcs:
        out[f"reward/{name}"] = rewards[name]
    for name in cols:
        if name not in ("step", "prompt", "completion", "advantage", *funcs) and name not in out:
            out[name] = raw[name].to_numpy()
    for name in ("probe_pred", "baseline", "probe_target", "score"):
        if name in out:
            out[name] = pd.to_numeric(out[name], errors="coerce").astype("float64")
    return _with_groups(out, adjacent=True)


def _reward_columns(raw: pd.DataFrame, cols: list[str],
                    reward_names: tuple[str, ...] | None) -> list[str]:
    """The reward functions' columns: the names the log knows (`rewards/<name>/mean`), else the
    numeric columns between completion and advantage that are not this project's columns."""
    if reward_names:
        named = [n for n in reward_names if n in cols]
        if named:
            return named
    end = cols.index("advantage") if "advantage" in cols else len(cols)
    return [c for c in cols[cols.index("completion") + 1:end]
            if c not in CONTRACT_EXTRAS and c != "step"
            and pd.api.types.is_numeric_dtype(raw[c]) and not pd.api.types.is_bool_dtype(raw[c])]


def _read_jsonl(path: Path) -> list[dict]:
    """The objects of a verl dump, each checked for the fields it must have."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err})") from err
    lines = data.split(b"\n")
    records = []
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if lineno == len(lines):  # no newline after it: cut off
                raise ValueError(
                    f"{path}:{lineno}: the last line is cut off ({err}): verl is still writing "
                    f"this step (wait for it) or the dump was interrupted (delete line "
                    f"{lineno}, or the file)") from err
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err}); the dump is damaged: "
                             f"delete line {lineno}, or the file") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got "
                             f"{type(record).__name__}")
        absent = [k for k in VERL_FIELDS if k not in record]
        if absent:
            raise ValueError(
                f"{path}:{lineno}: no field(s) {absent} (it has {sorted(record)}); verl's "
                f"rollout dump writes input, output, gts, score and step on every line: point "
                f"the dashboard at a trainer.rollout_data_dir or validation_data_dir")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: holds no rollout; verl writes every line of a step at once: "
                         f"wait for the step, or delete the empty file")
    return records


def _verl_rows(records: list[dict], path: Path, step: int) -> pd.DataFrame:
    """A verl dump with this project's columns (see the module docstring)."""
    for lineno, r in enumerate(records, 1):
        if "step" in r and r["step"] != step:
            raise ValueError(f"{path}:{lineno}: field 'step' is {r['step']!r} in the dump of "
                             f"step {step}; verl names each file after its step: rename or "
                             f"move the file")

    def number(value, lineno: int, field: str) -> float:
        if value is None:
            return math.nan
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}:{lineno}: field {field!r} must be a number; got "
                             f"{value!r}")
        return float(value)

    out = pd.DataFrame({
        "step": np.full(len(records), step, dtype="int64"),
        "prompt": [str(r["input"]) for r in records],
        "completion": [str(r["output"]) for r in records],
        "score": [number(r["score"], i, "score") for i, r in enumerate(records, 1)],
        "ground_truth": [_ground_truth(r.get("gts")) for r in records],
    })
    # `reward` is what the advantage used: a dump that names it keeps it, else the score
    out["reward"] = ([number(r.get("reward"), i, "reward") for i, r in enumerate(records, 1)]
                     if all("reward" in r for r in records) else out["score"])
    taken = {"input", "output", "gts", "score", "step", "reward"}
    extra = list(dict.fromkeys(k for r in records for k in r if k not in taken))
    for name in extra:
        out[name] = [r.get(name) for r in records]
    for name in ("probe_pred", "baseline", "advantage", "probe_target"):
        if name in out:
            out[name] = pd.to_numeric(out[name], errors="coerce").astype("float64")
    return _with_groups(out, adjacent=False)


def table_metrics(table: pd.DataFrame) -> dict:
    """Reward statistics of one step's rollouts, under this project's metric names: reward/mean,
    reward/std (population, as the trainer's), batch/prompts, batch/rollouts and
    batch/frac_reward_zero_std (share of prompts whose rollouts all got the same reward)."""
    r = pd.to_numeric(table["reward"], errors="coerce")
    by_group = r.groupby(table["group_id"])
    out = {"reward/mean": float(r.mean()), "reward/std": float(r.std(ddof=0)),
           "batch/prompts": int(table["group_id"].nunique()), "batch/rollouts": int(len(table)),
           "batch/frac_reward_zero_std": float((by_group.max() == by_group.min()).mean())}
    if "advantage" in table:
        a = pd.to_numeric(table["advantage"], errors="coerce")
        out.update({"adv/mean": float(a.mean()), "adv/std": float(a.std(ddof=0)),
                    "adv/abs_mean": float(a.abs().mean()), "adv/frac_pos": float((a > 0).mean())})
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# the readers


def _iso(t: float | None) -> str:
    if t is None:
        return ""
    return pd.Timestamp(t, unit="s", tz="UTC").isoformat(timespec="milliseconds")


def _mtime(path: Path) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


class ExternalRun:
    """A foreign run read through `RunReader`'s interface (meta, config, status,
    inferred_status, metrics, new_metrics, metrics_frame, rollout_steps, rollouts,
    all_rollouts, probe snapshots, eval reports, checkpoints). Read-only; it has no probe
    snapshots or eval reports. `rollout_file(step)` names the file a step's table comes from,
    `notes` say what was derived, `warnings` what the last metrics read skipped."""

    source = ""
    tables = ""   # where the rollout tables are, for messages

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise FileNotFoundError(f"run folder {self.run_dir} does not exist")
        self.metrics_restarted = False
        self.warnings: list[str] = []
        self._seen: list[dict] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.run_dir)!r})"

    # -- what subclasses provide

    def _step_files(self) -> list[tuple[int, Path]]:
        raise NotImplementedError

    def _table(self, step: int, path: Path) -> pd.DataFrame:
        raise NotImplementedError

    def _summary_of(self, step: int, path: Path) -> dict:
        raise NotImplementedError

    def _logged_metrics(self) -> list[dict] | None:
        """Metrics the trainer logged, or None when it logged none here."""
        return None

    def _finished(self) -> bool:
        return False

    def _watched(self) -> list[Path]:
        """Files and folders whose change means the run is still being written."""
        files = self._step_files()
        return [p for p in (self.run_dir, files[-1][1] if files else None) if p is not None]

    def _meta_extra(self) -> dict:
        return {}

    @property
    def notes(self) -> list[str]:
        return []

    # -- RunReader's interface

    @property
    def meta(self) -> dict:
        """What the folder says about the run: source, run_name, model, algorithm, created."""
        files = self._step_files()
        times = [t for t in (_mtime(p) for _, p in files[:1]) if t is not None]
        meta = {"source": self.source, "run_name": self.run_dir.name, "model": "",
                "algorithm": "", "device": "", "created": _iso(min(times) if times else None),
                "read_only": True}
        meta.update(self._meta_extra())
        return meta

    @property
    def config(self) -> dict:
        return {"source": self.source}

    def _updated(self) -> float | None:
        times = [t for t in map(_mtime, self._watched()) if t is not None]
        return max(times) if times else None

    @property
    def status(self) -> dict:
        """A status.json-like summary: status, last_step, updated (newest file), error None."""
        steps = self.rollout_steps()
        logged = [r["step"] for r in (self._logged_metrics() or [])]
        last = max(steps + logged) if steps or logged else None
        return {"status": self.inferred_status(), "last_step": last,
                "updated": _iso(self._updated()), "error": None, "source": self.source}

    def inferred_status(self, stale_after: float | None = None) -> str:
        """"finished" when the trainer's own state says so, "running" while a file changed in
        the last `stale_after` seconds (default `LIVE_SECONDS`), else "ended"."""
        if self._finished():
            return "finished"
        updated = self._updated()
        window = LIVE_SECONDS if stale_after is None else stale_after
        return "running" if updated is not None and time.time() - updated <= window else "ended"

    def metrics(self, errors: str = "raise") -> list[dict]:
        """One record per logged line (step first); from the rollout tables when the trainer
        logged none here. A table that cannot be read raises (errors="raise") or is skipped and
        named in `warnings` (errors="skip")."""
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip'; got {errors!r}")
        self.warnings = []
        logged = self._logged_metrics()
        if logged is not None:
            return logged
        records = []
        for step, path in self._step_files():
            try:
                records.append({"step": step, **self._summary_of(step, path),
                                "time": _mtime(path)})
            except (OSError, ValueError) as err:
                if errors == "raise":
                    raise
                self.warnings.append(f"step {step} left out: {err}")
        return records

    def new_metrics(self, errors: str = "raise") -> list[dict]:
        """Records added since the previous call (all on the first); a changed history starts
        over and sets `metrics_restarted`, as RunReader's."""
        records = self.metrics(errors)
        old, self.metrics_restarted = self._seen, False
        if old is not None and records[:len(old)] == old:
            new = records[len(old):]
        else:
            new, self.metrics_restarted = records, bool(old)
        self._seen = records
        return new

    def metrics_frame(self, errors: str = "raise") -> pd.DataFrame:
        """metrics() as a DataFrame, one row per record, numeric columns as float64."""
        records = self.metrics(errors)
        if not records:
            return pd.DataFrame({"step": pd.Series([], dtype="int64")})
        frame = pd.DataFrame.from_records(records)
        for name in frame.columns:
            values = frame[name].dropna()
            if frame[name].dtype == object and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                frame[name] = frame[name].astype("float64")
        return frame

    def rollout_steps(self) -> list[int]:
        return [step for step, _ in self._step_files()]

    def rollout_file(self, step: int | None = None) -> Path:
        """The file the rollout table of `step` (latest when None) is read from."""
        return pick_step(self._step_files(), step, f"rollout tables ({self.tables})",
                         self.run_dir)

    def rollout_columns(self, step: int | None = None) -> list[str]:
        return list(self.rollouts(step).columns)

    def rollouts(self, step: int | None = None, columns: list[str] | None = None) -> pd.DataFrame:
        """One step's rollouts with this project's columns (latest when step is None); asking
        for a column the table lacks raises KeyError, as RunReader's."""
        path = self.rollout_file(step)
        found = dict((p, s) for s, p in self._step_files())
        df = self._table(found[path], path)
        if columns is None:
            return df.copy()
        absent = [c for c in columns if c not in df]
        if absent:
            raise KeyError(f"{path} gives no column(s) {absent}; it gives {list(df.columns)}")
        return df[list(columns)].copy()

    def all_rollouts(self, steps: Iterable[int] | None = None,
                     columns: list[str] | None = None) -> pd.DataFrame:
        """Tables of `steps` (all when None) concatenated; a column a step lacks is NaN."""
        found = self._step_files()
        if steps is not None:
            found = [(s, pick_step(found, s, f"rollout tables ({self.tables})", self.run_dir))
                     for s in steps]
        frames = [self._table(s, p) for s, p in found]
        if columns is not None:
            present = set().union(*(f.columns for f in frames)) if frames else set()
            absent = [c for c in columns if c not in present]
            if absent and frames:
                raise KeyError(f"no rollout table of {self.run_dir} gives column(s) {absent}")
            frames = [f[[c for c in columns if c in f]] for f in frames]
        if not frames:
            return pd.DataFrame(columns=list(columns or LEADING))
        return pd.concat(frames, ignore_index=True)

    def probe_snapshot_steps(self) -> list[int]:
        return []

    def probe_snapshot(self, step: int | None = None):
        raise FileNotFoundError(f"{self.run_dir} is a {self.source} run: it has no probe "
                                f"snapshots (poise_probe run directories store them)")

    def eval_steps(self) -> list[int]:
        return []

    def eval_report(self, step: int | None = None) -> dict:
        raise FileNotFoundError(f"{self.run_dir} is a {self.source} run: it has no eval reports")

    def checkpoints(self) -> list[tuple[int, Path]]:
        return []


class TrlRun(ExternalRun):
    """A TRL `GRPOTrainer` output_dir: completion logs and the Trainer's log_history."""

    source = "trl"
    tables = "completions/completions_NNNNN.parquet, written with log_completions=True"

    def _step_files(self) -> list[tuple[int, Path]]:
        return _numbered(self.run_dir / "completions", TRL_TABLE)

    def _state(self) -> dict | None:
        """The newest trainer_state.json (most steps; the top-level one on a tie), or None."""
        best, best_key = None, None
        for i, path in enumerate(_trl_states(self.run_dir)):
            state = _read_state(*_identity(path))
            key = (int(state.get("global_step") or 0), i == 0 and path.parent == self.run_dir)
            if best_key is None or key > best_key:
                best, best_key = state, key
        return best

    def _reward_names(self) -> tuple[str, ...] | None:
        state = self._state()
        if state is None:
            return None
        names = [m.group(1) for entry in state["log_history"] for key in entry
                 if (m := REWARD_FUNC_KEY.match(key))]
        return tuple(dict.fromkeys(names)) or None

    def _table(self, step: int, path: Path) -> pd.DataFrame:
        return _trl_table(*_identity(path), step, self._reward_names())

    def _summary_of(self, step: int, path: Path) -> dict:
        return _summary("trl", *_identity(path), step, self._reward_names())

    def _logged_metrics(self) -> list[dict] | None:
        state = self._state()
        if state is None:
            return None
        records = []
        for entry in state["log_history"]:
            record = {"step": entry["step"]}
            for key, value in entry.items():
                if key == "step" or not (value is None or isinstance(value, (int, float, str))):
                    continue
                record[key] = value
                name = TRL_METRIC_NAMES.get(key)
                if name is not None and name not in entry:
                    record[name] = value
            records.append(record)
        return records

    def _finished(self) -> bool:
        state = self._state()
        if state is None:
            return False
        max_steps = state.get("max_steps")
        return bool(max_steps) and int(state.get("global_step") or 0) >= int(max_steps)

    def _watched(self) -> list[Path]:
        watched = super()._watched() + [self.run_dir / "completions"]
        watched += _trl_states(self.run_dir)[-1:]
        return watched

    def _meta_extra(self) -> dict:
        card = self._model_card()
        model = str(card.get("base_model") or "")
        model_config = self.config.get("model_config", {})
        if not model:
            archs = model_config.get("architectures") or []
            model = str(model_config.get("_name_or_path") or (archs[0] if archs else ""))
        files = self._step_files()
        columns = []
        if files:
            try:
                columns = pq.read_schema(files[-1][1]).names
            except (pa.ArrowInvalid, OSError):
                columns = []
        state = self._state()
        extra = {"model": model, "algorithm": "poise" if "probe_pred" in columns else "grpo",
                 "trainer": "trl.GRPOTrainer", "reward_functions": list(self._reward_names() or [])}
        if state is None and files:
            extra["created"] = _iso(_mtime(files[0][1]))
        return extra

    def _model_card(self) -> dict:
        """The YAML front matter of the README.md TRL writes (base_model, tags), or {}."""
        try:
            text = (self.run_dir / "README.md").read_text(encoding="utf-8")
        except OSError:
            return {}
        if not text.startswith("---"):
            return {}
        try:
            card = yaml.safe_load(text.split("---", 2)[1])
        except (yaml.YAMLError, IndexError):
            return {}
        return card if isinstance(card, dict) else {}

    @property
    def config(self) -> dict:
        """The Trainer's settings in trainer_state.json, the model's config.json and the model
        card (training_args.bin is a pickle, which a reader does not load)."""
        config: dict = {"source": "trl"}
        state = self._state()
        if state is not None:
            config["trainer_state"] = {k: v for k, v in state.items()
                                       if k not in ("log_history", "stateful_callbacks")}
        for folder in [self.run_dir] + [p for _, p in reversed(self.checkpoints())]:
            try:
                config["model_config"] = json.loads((folder / "config.json").read_text("utf-8"))
                break
            except (OSError, ValueError):
                continue
        card = self._model_card()
        if card:
            config["model_card"] = card
        return config

    def checkpoints(self) -> list[tuple[int, Path]]:
        return _numbered(self.run_dir, CHECKPOINT, dirs=True)

    @property
    def notes(self) -> list[str]:
        notes = []
        if self._state() is None:
            notes.append("no trainer_state.json yet (the Trainer writes one per checkpoint and "
                         "at save_state()): the curves are reward statistics computed from the "
                         "completion logs")
        names = self._reward_names()
        notes.append("reward = the sum of the reward-function columns "
                     + (f"({', '.join(names)})" if names else "(guessed: no log names them)")
                     + "; a run with reward_weights other than 1 logged its weighted sum only "
                       "in trainer_state.json (reward/mean)")
        return notes


class VerlDumpRun(ExternalRun):
    """A verl `rollout_data_dir` (or `validation_data_dir`): one `{step}.jsonl` per step."""

    source = "verl"
    tables = "<step>.jsonl, written with trainer.rollout_data_dir"

    def _step_files(self) -> list[tuple[int, Path]]:
        return _numbered(self.run_dir, VERL_DUMP)

    def _table(self, step: int, path: Path) -> pd.DataFrame:
        return _verl_table(*_identity(path), step)

    def _summary_of(self, step: int, path: Path) -> dict:
        return _summary("verl", *_identity(path), step, None)

    def _meta_extra(self) -> dict:
        files = self._step_files()
        algorithm = ""
        if files:
            try:
                algorithm = "poise" if "probe_pred" in self._table(*files[-1]) else ""
            except (OSError, ValueError):
                pass
        return {"algorithm": algorithm, "trainer": "verl"}

    @property
    def notes(self) -> list[str]:
        return ["verl's rollout dumps hold no training metrics: the curves are reward "
                "statistics computed from the dumps (reward = verl's score, the summed "
                "token-level scores), and the wall-clock axis is each file's modification time; "
                "verl's own metrics go to its loggers (trainer.logger)"]
