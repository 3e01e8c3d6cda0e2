"""Widgets and state shared by the pages: folders, run selection, live refresh, permalinks."""
from __future__ import annotations

import argparse
import html
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import streamlit as st

from poise_dash import data, run_index, study_files
from poise_dash.run_index import STATUS_ICONS, RunRef

APP_DIR = Path(__file__).resolve().parents[1]
ENTRY = APP_DIR / "dashboard.py"
ENV_PATHS = "POISE_DASHBOARD_PATHS"       # os.pathsep-separated folders (used by tests)
ENV_REFRESH = "POISE_DASHBOARD_REFRESH"   # seconds between live refreshes
REFRESH_CHOICES = (1.0, 2.0, 5.0, 10.0, 30.0)
PLOTLY_CONFIG = {"displaylogo": False, "displayModeBar": "hover",
                 "toImageButtonOptions": {"format": "png", "scale": 2}}
MAX_DEFAULT_SELECTION = 6


# --------------------------------------------------------------------------------------------
# command line and folders


def script_args() -> argparse.Namespace:
    """`streamlit run apps/dashboard.py -- [PATH ...] [--refresh S]`; other hosts (AppTest) give
    their paths through $POISE_DASHBOARD_PATHS."""
    argv: list[str] = []
    if sys.argv and Path(sys.argv[0]).resolve() == ENTRY:
        argv = sys.argv[1:]
    parser = argparse.ArgumentParser(prog="dashboard.py", add_help=False)
    parser.add_argument("paths", nargs="*")
    parser.add_argument("--refresh", type=float, default=None)
    args, _unknown = parser.parse_known_args(argv)
    if not args.paths and os.environ.get(ENV_PATHS):
        args.paths = [p for p in os.environ[ENV_PATHS].split(os.pathsep) if p]
    if not args.paths and Path("runs").is_dir():
        args.paths = ["runs"]
    if args.refresh is None:
        try:
            args.refresh = float(os.environ.get(ENV_REFRESH, "2"))
        except ValueError:
            args.refresh = 2.0
    return args


def init_state() -> None:
    """Folders and refresh interval from the command line, once per browser session."""
    if "roots" not in st.session_state:
        args = script_args()
        st.session_state["roots"] = [str(Path(p).expanduser().resolve()) for p in args.paths]
        st.session_state["live_every"] = min(REFRESH_CHOICES,
                                             key=lambda c: abs(c - args.refresh))


def roots() -> tuple[str, ...]:
    return tuple(st.session_state.get("roots", []))


def root_label(path: str) -> str:
    """`path` relative to the first dashboard folder holding it (its name when it is one)."""
    for root in roots():
        try:
            rel = Path(path).relative_to(root)
            return str(rel) if str(rel) != "." else Path(path).name
        except ValueError:
            continue
    return path


def all_runs() -> list[RunRef]:
    return run_index.discover_runs(roots())[0]


def by_path() -> dict[str, RunRef]:
    return {r.path: r for r in all_runs()}


def status_of(path: str) -> str:
    """The inferred status (running, finished, failed, crashed), without reading metrics."""
    store = data.tails()
    try:
        t = store.get(path) or store.setdefault(path, data.MetricsTail(path))
        return t.reader.inferred_status()
    except (OSError, ValueError):
        return "unreadable"


def unreadable_reason(path: str) -> str:
    try:
        data.MetricsTail(path)
    except (OSError, ValueError) as err:
        return str(err)
    return "unknown error"


def source_name(ref: RunRef) -> str:
    """"TRL", "verl" or "poise": where a run came from, as the Runs page names it."""
    return run_index.SOURCE_LABELS.get(ref.source, ref.source)


def run_label(ref: RunRef, with_status: bool = True) -> str:
    if not with_status:
        return ref.label
    return f"{STATUS_ICONS.get(status_of(ref.path), '')} {ref.label}"


# --------------------------------------------------------------------------------------------
# sidebar


def _apply_pending_selection(options: list[str]) -> None:
    """Selections asked for by a page (a button) or by the URL, applied before the widget."""
    pending = st.session_state.pop("_pending_selection", None)
    if pending is not None:
        st.session_state["sel_runs"] = [p for p in pending if p in options]
    elif "sel_runs" not in st.session_state:
        labels = st.query_params.get_all("run")
        wanted = {r.label: r.path for r in all_runs()}
        if labels:
            st.session_state["sel_runs"] = [wanted[x] for x in labels if x in wanted]
        else:
            refs = all_runs()
            if len(refs) > MAX_DEFAULT_SELECTION:  # the most recently written ones
                refs = sorted(refs, key=lambda r: data.file_identity(
                    Path(r.path, "status.json")) or (0, 0))[-MAX_DEFAULT_SELECTION:]
            st.session_state["sel_runs"] = [r.path for r in refs]
    else:
        st.session_state["sel_runs"] = [p for p in st.session_state["sel_runs"] if p in options]


def select_runs(paths: list[str]) -> None:
    """Ask for a new selection (takes effect on the full rerun this triggers)."""
    st.session_state["_pending_selection"] = list(paths)
    st.rerun()


def sidebar() -> None:
    """Folders, run selection and the live-refresh switch, shown on every page."""
    init_state()
    sb = st.sidebar
    refs, warnings = run_index.discover_runs(roots())
    for w in warnings:
        sb.warning(w)
    options = [r.path for r in refs]
    _apply_pending_selection(options)
    labels = {r.path: r.label for r in refs}
    # The label must not change while the page lives (a selection is kept as labels), so the
    # status is shown beside the widget, not in it.
    picked = sb.multiselect("Runs", options, key="sel_runs",
                            format_func=lambda p: labels.get(p, p),
                            help="The runs the Training page overlays and the other pages "
                                 "offer. 🟢 running · ✅ finished · 💥 crashed · ❌ failed · "
                                 "⏹️ ended (a TRL or verl run no longer written)")
    if picked:
        sb.caption(" · ".join(run_label(by_path()[p]) for p in picked if p in labels))
    running = sum(status_of(p) == "running" for p in options)
    sb.toggle("Live refresh", key="live", **default("live", True),
              help="While a shown run is being written, pages re-read what was appended "
                   "(metrics lines, new rollout tables) on a timer. Turn off to pause.")
    sb.select_slider("refresh every (seconds)", REFRESH_CHOICES, key="live_every",
                     format_func=lambda s: f"{s:g}", disabled=not st.session_state.get("live"))
    sb.caption(f"{len(refs)} run(s) under {len(roots())} folder(s); {running} running"
               + ("" if st.session_state.get("live", True) else " · live refresh paused"))
    with sb.expander("Folders", expanded=not refs):
        for r in roots():
            st.code(r, language=None)
        new = st.text_input("Add a folder (a run or a folder of runs)", key="new_root")
        if st.button("Add", key="add_root") and new:
            path = Path(new).expanduser()
            if not path.is_dir():
                st.error(f"{path} is not a folder")
            else:
                st.session_state["roots"] = list(dict.fromkeys(
                    [*roots(), str(path.resolve())]))
                run_index.discover_runs.clear()
                study_files.discover_studies.clear()
                st.rerun()
        if st.button("Rescan folders", key="rescan"):
            run_index.discover_runs.clear()
            study_files.discover_studies.clear()
            st.rerun()


# --------------------------------------------------------------------------------------------
# pages


def selected() -> list[RunRef]:
    """The runs chosen in the sidebar, in the order chosen."""
    known = by_path()
    return [known[p] for p in st.session_state.get("sel_runs", []) if p in known]


def require_selection() -> list[RunRef]:
    """The selected runs that can be read; stops the page with a hint when there are none."""
    refs = []
    for ref in selected():
        if status_of(ref.path) == "unreadable":
            st.warning(f"**{ref.label}** cannot be read: {unreadable_reason(ref.path)}",
                       icon="⚠️")
        else:
            refs.append(ref)
    if not refs:
        if not all_runs():
            no_runs_help()
        else:
            st.info("Select one or more runs in the sidebar.")
        st.stop()
    return refs


def no_runs_help() -> None:
    where = ", ".join(roots()) or "no folder given"
    st.info(f"No run under {where}: no run directory (a folder holding meta.json), TRL "
            f"output folder (completions/completions_NNNNN.parquet or trainer_state.json) or "
            f"verl rollout dump (<step>.jsonl). Start one with `poise demo` or `poise train "
            f"--output runs/NAME`, then open `poise dashboard runs`, or add a folder in the "
            f"sidebar.")


def focus_run(refs: list[RunRef], key: str, label: str = "Run",
              reset: tuple[str, ...] = ()) -> RunRef:
    """One of `refs` for pages that show a single run; `?focus=` in the URL picks it first.
    Choosing another run forgets the page state named in `reset` (step windows, groups)."""
    paths = [r.path for r in refs]
    if key not in st.session_state or st.session_state[key] not in paths:
        wanted = st.query_params.get("focus")
        match = [r.path for r in refs if r.label == wanted]
        st.session_state[key] = match[0] if match else paths[0]
    labels = {r.path: r for r in refs}
    def forget() -> None:
        for name in reset:
            st.session_state.pop(name, None)
        for param in list(st.query_params):  # the old run's window, group, filters
            if param not in ("run", "focus"):
                del st.query_params[param]

    # the label must stay fixed while the page lives: the status is shown beside it
    path = st.selectbox(label, paths, key=key, format_func=lambda p: labels[p].label,
                        on_change=forget)
    ref = labels[path]
    state = status_of(ref.path)
    st.caption(f"{STATUS_ICONS.get(state, '')} {state} · `{ref.path}`")
    return ref


def live(body: Callable[[], None], run_paths: list[str]) -> None:
    """Run `body` in a fragment that re-runs on a timer while one of `run_paths` is running and
    live refresh is on; only the fragment reruns, reading what was appended since last time."""
    running = [p for p in run_paths if status_of(p) == "running"]
    every = (float(st.session_state.get("live_every", 2.0))
             if st.session_state.get("live", True) and running else None)

    def fragment() -> None:
        body()
        if every is None:
            return
        if not any(status_of(p) == "running" for p in run_paths):
            st.rerun()  # the runs ended: a full rerun drops the timer
        new = sum(data.tails()[p].last_new for p in run_paths if p in data.tails())
        st.caption(f"🔴 live · refreshed {time.strftime('%H:%M:%S')} · every {every:g} s · "
                   f"{new} new metrics line(s) this refresh · pause in the sidebar")

    st.fragment(fragment, run_every=every)()


def chart(where, fig, key: str) -> None:
    """A Plotly chart with the dashboard's config (toolbar on hover, PNG export at 2x)."""
    where.plotly_chart(fig, key=key, config=PLOTLY_CONFIG)


def run_colours(refs: list[RunRef]) -> dict[str, str]:
    """One colour per selected run, the same on every chart."""
    from poise_dash.figures import colour

    return {r.label: colour(i) for i, r in enumerate(refs)}


def run_key(refs: list[RunRef]) -> None:
    """The colour of each run, shown once above charts that overlay runs."""
    if len(refs) < 2:
        return
    colours = run_colours(refs)
    chips = " ".join(
        f'<span style="white-space:nowrap; margin-right:14px"><span style="display:inline-block;'
        f' width:22px; height:4px; background:{colours[r.label]}; vertical-align:middle; '
        f'margin-right:5px; border-radius:2px"></span>{html.escape(r.label)}</span>'
        for r in refs)
    st.html(f'<div style="font-size:0.85rem">{chips}</div>')


def show_warnings(messages: list[str], prefix: str = "") -> None:
    for m in dict.fromkeys(messages):
        st.warning(f"{prefix}{m}", icon="⚠️")


def set_query(**params: str | list[str] | None) -> None:
    """Put page state in the URL (a permalink); None removes a parameter."""
    for key, value in params.items():
        if value is None or value == [] or value == "":
            if key in st.query_params:
                del st.query_params[key]
        elif st.query_params.get_all(key) != (value if isinstance(value, list) else [str(value)]):
            st.query_params[key] = value


def default(key: str, value, name: str = "value") -> dict:
    """`value=` (or `name=`) for a widget unless its state is already set (a permalink, an
    earlier run): Streamlit warns when both are given."""
    return {} if key in st.session_state else {name: value}


def own_query(*params: str) -> None:
    """Drop URL parameters another page left (keeps `run`, the sidebar selection)."""
    for key in list(st.query_params):
        if key not in params and key != "run":
            del st.query_params[key]


def step_window(where, label: str, steps: list[int], key: str,
                default_width: int) -> tuple[int, int]:
    """A (first, last) step range over the steps that have tables (gaps allowed).

    A window that ended at the latest step follows new steps as a live run writes them; a
    window naming steps that no longer exist is dropped.
    """
    if len(steps) == 1:
        where.caption(f"one rollout table: step {steps[0]}")
        return steps[0], steps[0]
    lo_all, hi_all = steps[0], steps[-1]
    latest_key = f"_{key}_latest"
    value = st.session_state.get(key)
    if isinstance(value, (int, float)):
        value = (value, value)
    if value is not None:
        try:
            lo, hi = sorted(int(v) for v in value)
        except (TypeError, ValueError):
            lo = hi = None
        previous = st.session_state.get(latest_key)
        if lo is None or lo < lo_all or hi > hi_all:
            del st.session_state[key]
        elif previous is not None and hi == previous and hi_all > previous:
            st.session_state[key] = (lo + hi_all - hi, hi_all)   # follow the live run
        else:
            st.session_state[key] = (lo, hi)
    st.session_state[latest_key] = hi_all
    first = steps[max(0, len(steps) - default_width)]
    lo, hi = where.slider(label, lo_all, hi_all, key=key, step=1,
                          **default(key, (first, hi_all)))
    return int(lo), int(hi)


def query_default(key: str, param: str, parse: Callable[[str], object],
                  valid: Callable[[object], bool] = lambda v: True) -> None:
    """Seed a widget's state from `?param=` on first render (a permalink being opened)."""
    if key in st.session_state:
        return
    raw = st.query_params.get(param)
    if raw is None:
        return
    try:
        value = parse(raw)
    except (ValueError, TypeError):
        return
    if valid(value):
        st.session_state[key] = value
