"""Studies: every table and figure a probe-study directory holds (layer sweep, input ablation,
calibration, transfer matrix, ...), shown generically."""
from __future__ import annotations

import json
from pathlib import Path

import plotly.io as pio
import streamlit as st
from poise_dash import data, study_files, ui

st.title("Probe studies")
ui.own_query("study")
studies = study_files.discover_studies(ui.roots())
if not studies:
    st.info("No probe-study directory (a folder whose study.json has "
            "`\"kind\": \"poise-probe-study\"`) under the dashboard's folders: "
            + (", ".join(f"`{r}`" for r in ui.roots()) or "none given")
            + ". Add the folder a study command wrote in the sidebar (Folders).")
    st.stop()


ui.query_default("st_study", "study", lambda v: next(s for s in studies if ui.root_label(s) == v))
if st.session_state.get("st_study") not in studies:
    st.session_state.pop("st_study", None)
labels = {s: ui.root_label(s) for s in studies}  # a pure format_func (no session state inside)
study = st.selectbox("study", studies, key="st_study", format_func=labels.__getitem__)
ui.set_query(study=ui.root_label(study))
meta = study_files.study_meta(study)
facts = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) and k != "kind"}
if facts:
    st.caption(" · ".join(f"{k}: **{v}**" for k, v in facts.items()))
with st.expander("study.json"):
    st.json(meta, expanded=True)

try:
    sections = study_files.study_sections(study)
except OSError as err:
    st.warning(f"cannot list {study}: {err}")
    st.stop()
if not sections:
    st.info(f"{ui.root_label(study)} holds no table or figure yet.")
    st.stop()


def _figure(item: study_files.StudyItem, key: str) -> None:
    path = item.files["json"]
    try:
        text = study_files.read_text(path, data.file_identity(path))
        obj = json.loads(text)
    except (OSError, ValueError) as err:
        st.warning(f"{Path(path).name}: cannot read ({err})")
        return
    if not (isinstance(obj, dict) and isinstance(obj.get("data"), list)):
        st.markdown(f"**{item.name}**")
        st.json(obj, expanded=False)  # a JSON file that is not a Plotly figure
        return
    try:
        fig = pio.from_json(text, skip_invalid=True)
    except (ValueError, TypeError) as err:
        st.warning(f"{Path(path).name}: not a Plotly figure ({err})")
        return
    if not fig.layout.title.text:
        fig.update_layout(title=item.name)
    ui.chart(st, fig, key=key)
    extra = [Path(p).name for ext, p in item.files.items() if ext != "json"]
    if extra:
        st.caption(f"`{item.name}` · also saved as " + ", ".join(f"`{e}`" for e in extra))


def _table(item: study_files.StudyItem, key: str, expanded: bool) -> None:
    path = item.files.get("parquet") or item.files["csv"]
    try:
        df = study_files.read_table(path, data.file_identity(path))
    except Exception as err:  # pandas/pyarrow raise many types for a bad file
        st.warning(f"{Path(path).name}: cannot read ({type(err).__name__}: {err})")
        return
    box = st.expander(f"table **{item.name}** · {len(df):,} rows × {len(df.columns)} columns · "
                      f"`{Path(path).name}`", expanded=expanded)
    box.download_button("CSV", lambda: df.to_csv(index=False).encode(),
                       file_name=f"{item.name}.csv", mime="text/csv", key=f"{key}_dl",
                       on_click="ignore", icon=":material/download:")
    box.dataframe(df, hide_index=True, width="stretch", key=key,
                 height=min(400, 38 + 35 * len(df)))


names = list(sections)
ui.query_default("st_sections", "show", lambda v: [x for x in v.split(",") if x in names])
shown = st.pills("analyses", names, selection_mode="multi", key="st_sections",
                 **ui.default("st_sections", names, "default"))
ui.set_query(study=ui.root_label(study), show=",".join(shown) if set(shown) != set(names) else None)
for name in [n for n in names if n in shown]:
    items = sections[name]
    st.subheader(name)
    figures_ = [it for it in items if it.kind == "figure"]
    tables = [it for it in items if it.kind == "table"]
    others = [it for it in items if it.kind not in ("figure", "table")]
    cols = st.columns(2) if len(figures_) > 1 else [st.container()]
    for i, item in enumerate(figures_):
        with cols[i % len(cols)]:
            _figure(item, f"st_fig_{name}_{item.name}")
    for item in tables:
        _table(item, f"st_tab_{name}_{item.name}", expanded=not figures_)
    for item in others:
        if item.kind == "image":
            st.image(item.files.get("png") or item.files.get("svg"), caption=item.name)
        else:
            st.caption(f"`{item.name}`: " + ", ".join(Path(p).name
                                                      for p in item.files.values()))
