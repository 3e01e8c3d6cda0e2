"""Mechanism searches for the dashboard (`poise search --output DIR`): finding search folders,
reading their `archive.json` (cached by file identity) and the pure building blocks of the
Search page: lineage depths, the family-tree layout and figure, the table of trials.

A search folder holds `archive.json` (`"kind": "poise-mechanism-search"`: the settings and every
trial with its genes, parents, operator, state and score), one run directory per trial under
`trials/tNNNN/` (found by the ordinary run discovery) and a probe-study folder (`study.json`,
analysis `mechanism_search`, shown by the Studies page). Only the JSON is read here; the tree
itself (depths, layout, figure) comes from `poise_probe.search.figures`, its one home.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from poise_dash.data import file_identity
from poise_probe.search.figures import best_trial, ranked, run_name, seed_scores

SEARCH_KIND = "poise-mechanism-search"
SEARCH_VERSION = 1
ANALYSIS = "mechanism_search"
ARCHIVE = "archive.json"
STATES = ("done", "running", "pending", "failed")
STATE_ICONS = {"done": "✅", "running": "🟢", "pending": "⏳", "failed": "❌"}
_SKIP_IN_RUN = {"rollouts", "probes", "checkpoints", "eval"}


# --------------------------------------------------------------------------------------------
# finding and reading


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _looks_like_search(folder: Path, filenames: list[str], dirnames: list[str]) -> bool:
    """A search folder: archive.json of the search kind; or (to warn about a damaged or missing
    archive) an unreadable archive.json beside `trials/`, or a study.json whose analyses include
    mechanism_search."""
    if ARCHIVE in filenames:
        doc = _json_file(folder / ARCHIVE)
        if isinstance(doc, dict):
            return doc.get("kind") == SEARCH_KIND
        if "trials" in dirnames:
            return True  # not JSON (or unreadable) beside trial runs: a damaged search archive
    if "study.json" in filenames:
        study = _json_file(folder / "study.json")
        analyses = study.get("analyses") if isinstance(study, dict) else None
        if isinstance(analyses, (dict, list)) and ANALYSIS in analyses:
            return True
    return False


@st.cache_data(ttl=10, show_spinner=False)
def discover_searches(roots: tuple[str, ...]) -> list[str]:
    """Folders at or under `roots` that hold a mechanism search, sorted (absolute paths)."""
    out = []
    for root in roots:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            if _looks_like_search(Path(dirpath), filenames, dirnames):
                out.append(str(Path(dirpath).resolve()))
                dirnames.clear()  # its trials are runs, not searches
                continue
            in_run = "meta.json" in filenames
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                                 and not (in_run and d in _SKIP_IN_RUN))
    return sorted(set(out))


@st.cache_data(max_entries=64, show_spinner=False)
def _read_doc(path: str, ident: tuple[int, int] | None) -> Any:
    del ident
    return json.loads(Path(path).read_text(encoding="utf-8"))


@dataclass
class Search:
    """A parsed archive: its folder, settings and trials (dicts with every documented key)."""

    folder: str
    settings: dict[str, Any]
    trials: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)

    @property
    def by_id(self) -> dict[int, dict[str, Any]]:
        return {t["id"]: t for t in self.trials}

    def run_dir(self, trial_id: int) -> Path:
        return Path(self.folder, "trials", run_name(trial_id))

    def counts(self) -> dict[str, int]:
        """Trials by state (every trial, repeats included), in STATES order then others."""
        out: dict[str, int] = {s: 0 for s in STATES}
        for t in self.trials:
            out[t["state"]] = out.get(t["state"], 0) + 1
        return {k: v for k, v in out.items() if v}

    def best(self) -> dict[str, Any] | None:
        """The scored non-repeat trial with the highest score (lowest id on ties)."""
        return best_trial(self.trials)


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


TRIAL_DEFAULTS: dict[str, Any] = {
    "genes": {}, "parents": [], "op": "seed", "seed": 0, "repeat_of": None, "state": "pending",
    "score": None, "tokens": None, "steps": None, "seconds": None, "error": None}


def parse_archive(doc: Any, folder: str) -> Search:
    """An archive document as a `Search`; raises ValueError (with the reason) when it is not a
    mechanism-search archive. Malformed trials are skipped with a warning."""
    path = Path(folder, ARCHIVE)
    if not isinstance(doc, dict):
        raise ValueError(f"{path} is not a JSON object")
    if doc.get("kind") != SEARCH_KIND:
        raise ValueError(f"{path} has kind {doc.get('kind')!r}, not {SEARCH_KIND!r}")
    warnings = []
    if isinstance(doc.get("version"), int) and doc["version"] > SEARCH_VERSION:
        warnings.append(f"{path} has version {doc['version']}; this dashboard knows up to "
                        f"{SEARCH_VERSION}: some fields may be missing.")
    settings = doc.get("settings") if isinstance(doc.get("settings"), dict) else {}
    raw = doc.get("trials")
    if not isinstance(raw, list):
        raise ValueError(f"{path} has no list of trials")
    trials = []
    for i, t in enumerate(raw):
        if not (isinstance(t, dict) and isinstance(t.get("id"), int)
                and not isinstance(t.get("id"), bool)):
            warnings.append(f"{path}: trial #{i} is malformed (no integer id); skipped.")
            continue
        trial = {**TRIAL_DEFAULTS, **t}
        trial["genes"] = trial["genes"] if isinstance(trial["genes"], dict) else {}
        trial["parents"] = [p for p in (trial["parents"] or []) if isinstance(p, int)]
        if not _num(trial["score"]):
            trial["score"] = None
        trials.append(trial)
    return Search(str(folder), settings, trials, warnings)


def load_search(folder: str) -> tuple[Search | None, str | None]:
    """(the search, None), or (None, a message naming the file) when archive.json is missing,
    not JSON or not a search archive. Never raises."""
    path = Path(folder, ARCHIVE)
    ident = file_identity(path)
    if ident is None:
        return None, (f"`{path}` does not exist: the search has not written its archive yet, "
                      f"or it was moved away.")
    try:
        doc = _read_doc(str(path), ident)
    except (OSError, UnicodeDecodeError) as err:
        return None, f"`{path}` cannot be read: {err}"
    except ValueError as err:
        return None, (f"`{path}` is not valid JSON ({err}); `poise search` writes it atomically, "
                      f"so it was damaged or written by something else.")
    try:
        return parse_archive(doc, folder), None
    except ValueError as err:
        return None, f"`{path}` is not a mechanism-search archive: {err}"


# --------------------------------------------------------------------------------------------
# the family tree


# --------------------------------------------------------------------------------------------
# the table of trials


def seed_stats(search: Search) -> dict[int, tuple[int, float, float]]:
    """{trial id: (n seeds, mean, sd)} for each trial that has scored repeats (trials whose
    repeat_of is its id): over its own score and its repeats' scores, as `poise search`'s
    `best` table counts them (`poise_probe.search.figures.seed_scores`); sd with ddof=1."""
    return {i: (len(v), float(np.mean(v)), float(np.std(v, ddof=1)))
            for i, v in seed_scores(search.trials).items() if len(v) > 1}


def _column(values: list) -> list:
    """A gene column Arrow can hold: unchanged when all values share one scalar type, else
    text (lists, dicts, mixed types)."""
    kinds = {type(v) for v in values if v is not None}
    if kinds <= {int, float} and bool not in kinds and kinds:
        return values
    if len(kinds) == 1 and kinds <= {str, bool}:
        return values
    return [None if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
            for v in values]


def trial_table(search: Search, repeats: bool = False) -> pd.DataFrame:
    """One row per trial (repeats only if `repeats`), best score first (unscored last, by id):
    id, run, op, parents, every gene, score, seeds/mean/sd over the trial and its repeats (where
    repeats exist), tokens, steps, state, repeat of, error."""
    genes = list(dict.fromkeys(g for t in search.trials for g in t["genes"]))
    genes += [g for g in search.settings.get("genes", {}) if g not in genes] \
        if isinstance(search.settings.get("genes"), dict) else []
    stats = seed_stats(search)
    trials = [t for t in search.trials if repeats or t["repeat_of"] is None]
    trials.sort(key=lambda t: (t["score"] is None, -(t["score"] or 0.0), t["id"]))
    rows = []
    for t in trials:
        n, mean, sd = stats.get(t["id"], (None, None, None))
        rows.append({
            "id": t["id"], "run": run_name(t["id"]), "op": t["op"],
            "parents": ", ".join(str(p) for p in t["parents"]),
            **{f"gene {g}": t["genes"].get(g) for g in genes},
            "score": t["score"], "seeds": n, "seed mean": mean, "seed sd": sd,
            "tokens": t["tokens"] if _num(t["tokens"]) else None,
            "steps": t["steps"] if _num(t["steps"]) else None,
            "state": t["state"], "repeat of": t["repeat_of"],
            "error": t["error"] or ""})
    columns = (["id", "run", "op", "parents"] + [f"gene {g}" for g in genes]
               + ["score", "seeds", "seed mean", "seed sd", "tokens", "steps", "state",
                  "repeat of", "error"])
    df = pd.DataFrame(rows, columns=columns)
    for g in genes:
        df[f"gene {g}"] = _column(df[f"gene {g}"].tolist()) if len(df) else df[f"gene {g}"]
    for c in ("score", "seed mean", "seed sd"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in ("seeds", "tokens", "steps", "repeat of"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    if not repeats or not df["repeat of"].notna().any():
        df = df.drop(columns=["repeat of"])
    if not df["seeds"].notna().any():
        df = df.drop(columns=["seeds", "seed mean", "seed sd"])
    return df


def best_trials(search: Search, n: int = 3) -> list[dict]:
    """The `n` best non-repeat trials (by the mean over their seeds, as `poise search` ranks)."""
    return ranked(search.trials)[:n]


def is_active(search: Search, recent_s: float = 600.0) -> bool:
    """Whether the search looks alive: trials pending or running and archive.json rewritten in
    the last `recent_s` seconds (a search killed mid-trial leaves `running` states behind)."""
    if not any(t["state"] in ("pending", "running") for t in search.trials):
        return False
    ident = file_identity(Path(search.folder, ARCHIVE))
    return ident is not None and time.time() - ident[0] / 1e9 < recent_s
