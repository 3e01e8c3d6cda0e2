"""poise dashboard: Streamlit pages over run directories and probe studies, live or finished.

    poise dashboard runs/                  # or: streamlit run apps/dashboard.py -- runs/

Reads only the run-directory format (docs/run-format.md, through poise_probe.rundir) and
probe-study folders; never imports the trainer or a model. See docs/dashboard.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

import streamlit as st
from poise_dash import ui

st.set_page_config(page_title="poise dashboard", page_icon="📈", layout="wide")

VIEWS = APP_DIR / "views"
PAGES = [
    st.Page(VIEWS / "runs.py", title="Runs", icon=":material/list_alt:", default=True),
    st.Page(VIEWS / "training.py", title="Training", icon=":material/show_chart:"),
    st.Page(VIEWS / "probe.py", title="Probe", icon=":material/target:"),
    st.Page(VIEWS / "rollouts.py", title="Rollouts", icon=":material/article:"),
    st.Page(VIEWS / "studies.py", title="Studies", icon=":material/science:"),
    st.Page(VIEWS / "search.py", title="Search", icon=":material/account_tree:"),
]

page = st.navigation(PAGES)
ui.sidebar()
page.run()
