"""Search: a mechanism search (`poise search --output DIR`): its settings, the family tree of its
trials coloured by score, the trials ranked by score, and a click to open a trial's run on the
Training page. Refreshes while the search runs."""
from __future__ import annotations

import time
from pathlib import Path

import streamlit as st
from poise_dash import run_index, search_files, study_files, ui

from poise_probe.search.figures import family_tree_figure

# A button below asked for a trial's run: the sidebar has selected it on this rerun (it runs
# before the page), so go to the Training page, which shows the selected runs.
if st.session_state.pop("_se_open", None):
    st.switch_page("views/training.py")

st.title("Mechanism search")
ui.own_query("search")
searches = search_files.discover_searches(ui.roots())
if not searches:
    st.info("No mechanism search (a folder whose archive.json has `\"kind\": "
            "\"poise-mechanism-search\"`, written by `poise search --output DIR`) under the "
            "dashboard's folders: " + (", ".join(f"`{r}`" for r in ui.roots()) or "none given")
            + ". Add the search's folder (or a folder above it) in the sidebar (Folders).")
    st.stop()


ui.query_default("se_search", "search",
                 lambda v: next(s for s in searches if ui.root_label(s) == v))
if st.session_state.get("se_search") not in searches:
    st.session_state.pop("se_search", None)
labels = {s: ui.root_label(s) for s in searches}
folder = st.selectbox("search", searches, key="se_search", format_func=labels.__getitem__)
ui.set_query(search=ui.root_label(folder))


def _open(paths: list[Path]) -> None:
    """Select these trials' runs in the sidebar and go to the Training page."""
    run_index.discover_runs.clear()  # a trial started since the last scan
    st.session_state["_se_open"] = True
    ui.select_runs([str(p.resolve()) for p in paths])


def _has_run(path: Path) -> bool:
    return (path / "meta.json").is_file()


def _running_runs(search: search_files.Search) -> list[str]:
    return [str(search.run_dir(t["id"]).resolve()) for t in search.trials
            if t["state"] == "running" and _has_run(search.run_dir(t["id"]))]


def _settings(search: search_files.Search) -> None:
    s = search.settings
    facts = {"budget": f"{s['budget']:,} tokens" if isinstance(s.get("budget"), int)
             else s.get("budget"),
             "trials": s.get("trials"), "repeats": s.get("repeats"), "seed": s.get("seed"),
             "held-out": (f"{s['eval_n']} × {s['eval_samples']} samples"
                          if s.get("eval_n") is not None and s.get("eval_samples") is not None
                          else None)}
    st.caption(" · ".join(f"{k}: **{v}**" for k, v in facts.items() if v is not None)
               + f" · `{search.folder}`")
    counts = search.counts()
    best = search.best()
    cols = st.columns(len(counts) + 1)
    for col, (state, n) in zip(cols, counts.items()):
        col.metric(f"{search_files.STATE_ICONS.get(state, '')} {state}", n)
    cols[-1].metric("best score", f"{best['score']:.3f}" if best else "—",
                    help="held-out accuracy at the budget; " +
                         (f"trial {search_files.run_name(best['id'])}" if best else "none yet"))
    with st.expander("settings (archive.json)"):
        st.json(s, expanded=True)


def _open_buttons(search: search_files.Search) -> None:
    best = search_files.best_trials(search, 3)
    if not best:
        return
    st.markdown("**Open a best trial's run on the Training page**")
    cols = st.columns(len(best))
    for i, (col, t) in enumerate(zip(cols, best)):
        run = search.run_dir(t["id"])
        name = search_files.run_name(t["id"])
        text = f"{'★ ' if i == 0 else ''}{name} · {t['score']:.3f}"
        if col.button(text, key=f"se_open_{name}",
                      disabled=not _has_run(run), icon=":material/show_chart:",
                      help=f"select {run} in the sidebar and open the Training page"
                      if _has_run(run) else f"no run directory at {run}"):
            _open([run])


def _table(search: search_files.Search) -> None:
    st.subheader("Trials by score")
    repeats = st.toggle("show repeats as rows", key="se_repeats",
                        help="A repeat re-trains a trial's genes with another seed; by default "
                             "repeats are folded into their trial's seeds / seed mean / seed "
                             "sd columns (over the trial and its scored repeats).")
    df = search_files.trial_table(search, repeats=repeats)
    config = {
        "id": None,
        "run": st.column_config.TextColumn("run", width="small"),
        "score": st.column_config.ProgressColumn("score", min_value=0.0, max_value=1.0,
                                                 format="%.3f",
                                                 help="held-out accuracy at the budget"),
        "seed mean": st.column_config.NumberColumn(format="%.3f"),
        "seed sd": st.column_config.NumberColumn(format="%.3f"),
        "tokens": st.column_config.NumberColumn(format="%d"),
    }
    event = st.dataframe(df, key="se_table", hide_index=True, width="stretch",
                         on_select="rerun", selection_mode="multi-row", column_config=config,
                         height=min(420, 38 + 35 * len(df)))
    rows = event.selection.rows if event else []
    picked = [search.run_dir(int(df["id"].iloc[i])) for i in rows if i < len(df)]
    picked = [p for p in picked if _has_run(p)]
    if st.button("Open ticked on Training", key="se_open_ticked", disabled=not picked,
                 help="tick rows, then overlay their runs on the Training page"):
        _open(picked)
    failed = [t for t in search.trials if t["state"] == "failed" and t["error"]]
    if failed:
        with st.expander(f"{len(failed)} failed trial(s)"):
            for t in failed:
                st.markdown(f"**{search_files.run_name(t['id'])}**: `{t['error']}`")


def body() -> None:
    search, error = search_files.load_search(folder)
    if search is None:
        st.warning(error, icon="⚠️")
        return
    for w in search.warnings:
        st.warning(w, icon="⚠️")
    _settings(search)
    if not search.trials:
        st.info("The search has no trial yet.")
        return
    ui.chart(st, family_tree_figure(search.trials), key="se_tree")
    st.caption("x: lineage depth (seed trials 0; a child is one deeper than its deepest "
               "parent) · colour: score (grey: failed ✕, pending or running ○) · dotted "
               "edges: crossover · ★ best · hover a node for its genes that differ from the "
               "first trial · repeats are not drawn")
    _open_buttons(search)
    _table(search)
    if folder in study_files.discover_studies(ui.roots()):
        st.page_link("views/studies.py", label="The search's tables and saved figure on Studies",
                     icon=":material/science:", query_params={"study": ui.root_label(folder)})


def _active() -> bool:
    search, _ = search_files.load_search(folder)
    if search is None:
        return False
    return (search_files.is_active(search)
            or any(ui.status_of(p) == "running" for p in _running_runs(search)))


every = (float(st.session_state.get("live_every", 2.0))
         if st.session_state.get("live", True) and _active() else None)


def fragment() -> None:
    body()
    if every is None:
        return
    if not _active():
        st.rerun()  # the search ended: a full rerun drops the timer
    st.caption(f"🔴 live · refreshed {time.strftime('%H:%M:%S')} · every {every:g} s · "
               f"pause in the sidebar")


st.fragment(fragment, run_every=every)()
