"""Probe studies for the dashboard: finding study folders (a study.json of kind
poise-probe-study) and reading their tables, figures and texts, cached by file identity."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st

from poise_dash.data import file_identity

STUDY_KIND = "poise-probe-study"


@st.cache_data(ttl=10, show_spinner=False)
def discover_studies(roots: tuple[str, ...]) -> list[str]:
    """Folders under `roots` holding a study.json of kind poise-probe-study, sorted."""
    out = []
    skip_in_run = {"rollouts", "probes", "checkpoints", "eval"}
    for root in roots:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            if "study.json" in filenames:
                try:
                    kind = json.loads(Path(dirpath, "study.json").read_text()).get("kind")
                except (OSError, ValueError, AttributeError):
                    kind = None
                if kind == STUDY_KIND:
                    out.append(str(Path(dirpath).resolve()))
                    dirnames.clear()
                    continue
            in_run = "meta.json" in filenames
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                                 and not (in_run and d in skip_in_run))
    return sorted(set(out))


@dataclass
class StudyItem:
    """One table or figure of a study analysis; `files` maps extension -> path."""

    name: str
    files: dict[str, str]

    @property
    def kind(self) -> str:
        if "json" in self.files:
            return "figure"
        if "parquet" in self.files or "csv" in self.files:
            return "table"
        if "png" in self.files or "svg" in self.files:
            return "image"
        if "html" in self.files:
            return "html"
        return "other"


KNOWN_ANALYSES = ("sweep", "ablation", "calibration", "transfer", "drift", "value_bench")


def study_sections(study: str) -> dict[str, list[StudyItem]]:
    """{analysis: items} of a study directory; files at its top level form "overview"."""
    root = Path(study)
    sections: dict[str, list[StudyItem]] = {}
    folders = [("overview", root)] + sorted(
        ((p.name, p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda kv: (KNOWN_ANALYSES.index(kv[0]) if kv[0] in KNOWN_ANALYSES
                        else len(KNOWN_ANALYSES), kv[0]))
    for name, folder in folders:
        by_stem: dict[str, dict[str, str]] = {}
        for f in sorted(folder.iterdir()):
            if not f.is_file() or f.name.startswith(".") or f.name == "study.json":
                continue
            stem, _, ext = f.name.partition(".")
            by_stem.setdefault(stem, {})[ext.lower()] = str(f)
        items = [StudyItem(stem, files) for stem, files in sorted(by_stem.items())]
        # a figure's data table has its own stem; a table beside a figure of the same stem
        # is split off so both show
        out: list[StudyItem] = []
        for item in items:
            if item.kind == "figure" and ({"parquet", "csv"} & set(item.files)):
                out.append(StudyItem(item.name, {k: v for k, v in item.files.items()
                                                 if k not in ("parquet", "csv")}))
                out.append(StudyItem(item.name, {k: v for k, v in item.files.items()
                                                 if k in ("parquet", "csv")}))
            else:
                out.append(item)
        if out:
            sections[name] = out
    return sections


@st.cache_data(max_entries=512, show_spinner=False)
def read_table(path: str, ident: tuple[int, int] | None) -> pd.DataFrame:
    del ident
    if path.endswith(".parquet"):
        return pd.read_parquet(path)
    return pd.read_csv(path)


@st.cache_data(max_entries=512, show_spinner=False)
def read_text(path: str, ident: tuple[int, int] | None) -> str:
    del ident
    return Path(path).read_text(encoding="utf-8")


def study_meta(study: str) -> dict:
    try:
        meta = json.loads(read_text(str(Path(study, "study.json")),
                                    file_identity(Path(study, "study.json"))))
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}
