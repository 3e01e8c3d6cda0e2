"""The search archive: every trial with its lineage, state and score, in `<out>/archive.json`.

One JSON file, rewritten atomically after every change (`rundir.atomic_write_json`), so a kill
at any moment leaves the previous or the next archive, never a part. A trial is `pending`
(proposed), `running` (handed to a worker), `done` (scored) or `failed` (its run raised; the
error is kept). A rerun of the search resumes: done and failed trials stay, pending and running
ones are trained again (their run directories resume from their last checkpoint).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from poise_probe.search.figures import run_name

__all__ = ["ARCHIVE_KIND", "Archive", "Trial"]

ARCHIVE_KIND = "poise-mechanism-search"
ARCHIVE_VERSION = 1
TRIAL_STATES = ("pending", "running", "done", "failed")


@dataclass
class Trial:
    """One evaluated (or to be evaluated) configuration."""

    id: int
    genes: dict[str, Any]
    parents: list[int] = field(default_factory=list)   # none (seed), one (mutation), two
    op: str = "seed"                                   # seed | mutation | crossover | repeat
    seed: int = 0                                      # trainer.seed of its run
    repeat_of: int | None = None                       # a repeat: the trial it re-runs
    state: str = "pending"
    score: float | None = None                         # held-out accuracy at the budget
    tokens: int | None = None                          # generated tokens it used
    steps: int | None = None
    seconds: float | None = None
    error: str | None = None

    @property
    def run_name(self) -> str:
        return run_name(self.id)


class Archive:
    """The trials of one search and its fixed settings; `save()` writes `archive.json`."""

    def __init__(self, root: str | Path, settings: dict[str, Any]):
        self.root = Path(root)
        self.settings = dict(settings)
        self.trials: list[Trial] = []

    @property
    def path(self) -> Path:
        return self.root / "archive.json"

    def run_dir(self, trial: Trial) -> Path:
        return self.root / "trials" / trial.run_name

    # -- persistence

    @classmethod
    def open(cls, root: str | Path, settings: dict[str, Any]) -> Archive:
        """The archive in `root` (resumed), or a new one; a resume must keep the settings that
        decide what a score means (budget, base recipe, space)."""
        arch = cls(root, settings)
        if not arch.path.exists():
            return arch
        try:
            doc = json.loads(arch.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{arch.path} is not valid JSON ({err}); it was not written by "
                             f"`poise search` (its writes are atomic): move it away to start "
                             f"a new search.") from err
        if not isinstance(doc, dict) or doc.get("kind") != ARCHIVE_KIND:
            raise ValueError(f"{arch.path} is not a mechanism-search archive (kind "
                             f"{doc.get('kind') if isinstance(doc, dict) else None!r}).")
        if doc.get("version", 0) > ARCHIVE_VERSION:
            raise ValueError(f"{arch.path} has version {doc['version']}; this poise_probe reads "
                             f"up to {ARCHIVE_VERSION}. Upgrade poise_probe.")
        fixed = ("budget", "base", "genes", "eval_n", "eval_samples", "seed")
        changed = {k: (doc["settings"].get(k), settings.get(k)) for k in fixed
                   if doc["settings"].get(k) != settings.get(k)}
        if changed:
            said = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"{arch.path} was searched with other settings ({said}); its "
                             f"scores would not compare. Rerun with the same settings, or "
                             f"choose another --output.")
        arch.settings = {**doc["settings"], **settings}
        arch.trials = [Trial(**t) for t in doc["trials"]]
        return arch

    def save(self) -> None:
        from poise_probe.rundir import atomic_write_json

        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"kind": ARCHIVE_KIND, "version": ARCHIVE_VERSION,
                                      "settings": self.settings,
                                      "trials": [asdict(t) for t in self.trials]})

    # -- queries

    def add(self, genes: dict, *, parents: list[int], op: str, seed: int,
            repeat_of: int | None = None) -> Trial:
        trial = Trial(len(self.trials), dict(genes), list(parents), op, seed, repeat_of)
        self.trials.append(trial)
        return trial

    def done(self) -> list[Trial]:
        return [t for t in self.trials if t.state == "done"]

    def evaluated(self) -> list[Trial]:
        """Scored trials that are not repeats: the nodes of the family tree."""
        return [t for t in self.done() if t.repeat_of is None]

    def unfinished(self) -> list[Trial]:
        return [t for t in self.trials if t.state in ("pending", "running")]

    def children(self, trial_id: int) -> list[Trial]:
        return [t for t in self.trials if trial_id in t.parents and t.repeat_of is None]

    def seen(self, genes: dict) -> bool:
        """Whether a non-repeat trial already has these genes."""
        return any(t.genes == genes and t.repeat_of is None for t in self.trials)

    def repeats(self, trial_id: int) -> list[Trial]:
        return [t for t in self.done() if t.repeat_of == trial_id]
