"""Run directories: the one package that writes and reads what a training run leaves on disk.

The trainer writes with `RunWriter`; dashboards and notebooks read with `RunReader` and never import
trainer code. Every file and column is documented in docs/run-format.md; change both together.
Only `metrics.jsonl` is appended to; every other file is written whole to a hidden temp name in
the same folder, fsynced and renamed into place, so a reader sees the old or the new file, never a
part. Folders (probe snapshots, checkpoints) are built under a hidden temp name and renamed.

Modules: `schema` (version, columns, step names, plain values), `fs` (atomic writes, step
listings, process liveness, timestamps), `writer` (`RunWriter`), `reader` (`RunReader`,
`find_runs`), `external` (TRL output folders and verl rollout dumps read through `RunReader`'s
interface: `open_run`, `find_all_runs`).
"""
from poise_probe.rundir.external import (
    ExternalRun,
    FoundRun,
    TrlRun,
    VerlDumpRun,
    find_all_runs,
    open_run,
    run_source,
)
from poise_probe.rundir.fs import (
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    now_iso,
    parse_iso,
)
from poise_probe.rundir.reader import RunReader, find_runs
from poise_probe.rundir.schema import (
    ROLLOUT_COLUMNS,
    SCHEMA_VERSION,
    STATUSES,
    as_rollout_table,
    step_name,
)
from poise_probe.rundir.writer import RunLockedError, RunWriter, diff_configs, git_commit

__all__ = [
    "ROLLOUT_COLUMNS",
    "SCHEMA_VERSION",
    "STATUSES",
    "ExternalRun",
    "FoundRun",
    "RunLockedError",
    "RunReader",
    "RunWriter",
    "TrlRun",
    "VerlDumpRun",
    "as_rollout_table",
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "diff_configs",
    "find_all_runs",
    "find_runs",
    "git_commit",
    "now_iso",
    "open_run",
    "parse_iso",
    "run_source",
    "step_name",
]
