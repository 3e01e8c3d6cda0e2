"""Runs: every run under the folders, its status and headline numbers; compare and diff configs."""
from __future__ import annotations

import pandas as pd
import streamlit as st
from poise_dash import analysis, data, run_index, ui

st.title("Runs")
ui.own_query()
refs = ui.all_runs()
if not refs:
    ui.no_runs_help()
    st.stop()


def _age(iso: str) -> str:
    try:
        seconds = pd.Timestamp.now(tz="UTC") - pd.Timestamp(iso)
    except (ValueError, TypeError):
        return ""
    s = seconds.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.0f} {unit} ago"
    return f"{s:.0f} s ago"


def overview() -> None:
    summaries = [run_index.summarise(r) for r in refs]
    sel = set(st.session_state.get("sel_runs", []))
    table = pd.DataFrame([{
        "selected": s.ref.path in sel,
        "run": s.ref.label,
        "source": run_index.SOURCE_LABELS.get(s.ref.source, s.ref.source),
        "status": f"{run_index.STATUS_ICONS.get(s.status, '')} {s.status}",
        "algorithm": s.algorithm,
        "model": s.model,
        "steps": s.last_step,
        "best held-out acc": s.best_acc,
        "at step": s.best_step,
        "last held-out acc": s.last_acc,
        "last reward": s.last_reward,
        "device": s.device,
        "created": s.created[:19].replace("T", " "),
        "updated": _age(s.updated),
        "error": s.error or "",
    } for s in summaries])
    counts = table["status"].str.split().str[-1].value_counts()
    st.caption(" · ".join(f"{run_index.STATUS_ICONS.get(k, '')} {v} {k}"
                          for k, v in counts.items())
               + " — tick rows and press *Compare ticked* to select them in the sidebar"
               + (" · TRL and verl runs are read-only imports of their logs (no eval reports "
                  "or probe snapshots; ⏹️ ended: no file changed for 5 minutes)"
                  if any(s.ref.source != "poise" for s in summaries) else ""))
    event = st.dataframe(
        table, key="runs_table", hide_index=True, on_select="rerun",
        selection_mode="multi-row", width="stretch",
        column_config={
            "selected": st.column_config.CheckboxColumn("sel", width="small",
                                                        help="selected in the sidebar"),
            "source": st.column_config.TextColumn(
                "source", width="small",
                help="poise: a poise_probe run directory; TRL: a GRPOTrainer output_dir "
                     "(completion logs, trainer_state.json); verl: a rollout_data_dir dump"),
            "best held-out acc": st.column_config.ProgressColumn(
                "best held-out acc", min_value=0.0, max_value=1.0, format="%.3f"),
            "last held-out acc": st.column_config.NumberColumn(format="%.3f"),
            "last reward": st.column_config.NumberColumn(format="%.3f"),
            "steps": st.column_config.NumberColumn(format="%d"),
            "at step": st.column_config.NumberColumn(format="%d"),
        })
    picked = [refs[i].path for i in (event.selection.rows if event else []) if i < len(refs)]
    c1, c2, _ = st.columns([1, 1, 3])
    if c1.button("Compare ticked", disabled=not picked, key="compare_ticked",
                 help="select the ticked rows' runs in the sidebar"):
        ui.select_runs(picked)
    if c2.button("Select all", key="select_all"):
        ui.select_runs([r.path for r in refs])
    for s in summaries:
        for w in s.warnings:
            st.warning(f"**{s.ref.label}**: {w}", icon="⚠️")
        if s.status == "failed" and s.error:
            st.error(f"**{s.ref.label}** failed: {s.error}")
        if s.status == "unreadable":
            st.error(f"**{s.ref.label}** cannot be read: {s.error}")
    _eval_table([s for s in summaries if s.ref.path in sel and s.status != "unreadable"])


def _eval_table(summaries: list[run_index.RunSummary]) -> None:
    """Held-out accuracy per task, first and last evaluation, for the selected runs."""
    rows = []
    for s in summaries:
        reports = data.eval_reports(s.ref.path)
        if not reports:
            continue
        first, last = min(reports), max(reports)
        a, b = reports[first], reports[last]
        for name, task in {**a.get("tasks", {}), "overall": a.get("overall", {})}.items():
            after = (b.get("tasks", {}).get(name) if name != "overall" else b.get("overall"))
            before_acc = task.get("accuracy")
            after_acc = after.get("accuracy") if after else None
            rows.append({"run": s.ref.label, "task": name, "domain": task.get("domain", ""),
                         "from step": first, "before": before_acc, "to step": last,
                         "after": after_acc,
                         "change": (after_acc - before_acc if isinstance(after_acc, float)
                                    and isinstance(before_acc, float) else None),
                         "Pass@k after": after.get("pass_at_k") if after else None})
    if rows:
        st.subheader("Held-out evaluation of the selected runs")
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
                     column_config={"change": st.column_config.NumberColumn(format="%+.3f"),
                                    "before": st.column_config.NumberColumn(format="%.3f"),
                                    "after": st.column_config.NumberColumn(format="%.3f"),
                                    "Pass@k after": st.column_config.NumberColumn(
                                        format="%.3f")})


def config_diff() -> None:
    st.subheader("Config difference")
    paths = [r.path for r in refs]
    labels = {r.path: r.label for r in refs}
    sel = [p for p in st.session_state.get("sel_runs", []) if p in labels]
    default = (sel + [p for p in paths if p not in sel])[:2]
    if len(paths) < 2:
        st.caption("Only one run: nothing to compare.")
        return
    c1, c2, c3 = st.columns([2, 2, 1])
    a = c1.selectbox("A", paths, index=paths.index(default[0]), key="diff_a",
                     format_func=labels.get)
    b = c2.selectbox("B", paths, index=paths.index(default[1]), key="diff_b",
                     format_func=labels.get)
    show_all = c3.toggle("show equal keys", key="diff_all")
    try:
        cfg_a, cfg_b = data.config_of(a), data.config_of(b)
    except ValueError as err:
        st.warning(str(err))
        return
    diff = analysis.config_diff(cfg_a, cfg_b, show_all=show_all)
    n = int(diff["differs"].sum()) if len(diff) else 0
    st.caption(f"{n} config key(s) differ" + ("" if show_all else " (equal keys hidden)"))
    if len(diff):
        st.dataframe(diff.rename(columns={"A": labels[a], "B": labels[b]}), hide_index=True,
                     width="stretch", key="diff_table")
    meta_a, meta_b = ({k: v for k, v in data.tails()[p].reader.meta.items()
                       if k not in ("resumes",)} if p in data.tails() else {} for p in (a, b))
    meta = analysis.config_diff(meta_a, meta_b, show_all=False)
    meta = meta[~meta["key"].isin(["created", "pid", "run_name"])]
    if len(meta):
        with st.expander(f"meta.json: {len(meta)} key(s) differ"):
            st.dataframe(meta.rename(columns={"A": labels[a], "B": labels[b]}),
                         hide_index=True, width="stretch")


def body() -> None:
    overview()
    config_diff()


ui.live(body, [r.path for r in refs])
