"""Training: metric curves of the selected runs overlaid, smoothed, by step, tokens or time.

The charts are grouped in tabs that run lazily (`st.tabs(on_change="rerun")`): only the open
tab's charts are built and drawn, so the page opens on the Overview's six charts; *All* draws
every section on one scroll.
"""
from __future__ import annotations

import streamlit as st
from poise_dash import analysis, data, figures, ui

st.title("Training")
ui.own_query("x", "tab")
refs = ui.require_selection()

#: (section, [(chart title, key patterns, options)]); every key named in docs/run-format.md.
SECTIONS = [
    ("Reward", [
        ("reward (mean over the step's rollouts)", ["reward/mean", "reward/score_mean"], {}),
        ("reward by domain", ["reward/*/mean"], {}),
        ("groups whose rollouts all got the same reward", ["batch/frac_reward_zero_std"], {}),
    ]),
    ("Held-out accuracy", [
        ("held-out accuracy (Avg@K, all tasks)", ["eval/accuracy"], {"sparse": True}),
        ("held-out accuracy by domain", ["eval/domain/*/accuracy"], {"sparse": True}),
        ("held-out Pass@K", ["eval/pass_at_k"], {"sparse": True}),
    ]),
    ("Probe", [
        ("probe MAE", ["probe/mae", "probe/raw_mae"], {}),
        ("probe Pearson r", ["probe/pearson"], {}),
        ("probe Brier skill", ["probe/brier_skill"], {}),
        ("explained variance and its ceiling", ["probe/explained_var", "probe/ev_ceiling"], {}),
        ("calibration slope", ["probe/calib_slope"], {}),
        ("share of baselines from the probe", ["probe/used_frac"], {}),
    ]),
    ("Advantage and baseline", [
        ("variance-reduction ratio 1 − Var(A)/Var(r)", ["adv/var_reduction"], {}),
        ("identity check max |A·scale + b − r|", ["adv/identity_max_abs_err"], {}),
        ("advantage spread", ["adv/std", "adv/abs_mean"], {}),
        ("share of positive advantages", ["adv/frac_pos"], {}),
    ]),
    ("Policy update", [
        ("gradient norm", ["actor/grad_norm"], {}),
        ("PPO clip fraction", ["actor/clip_frac", "actor/clip_frac_higher",
                               "actor/clip_frac_lower"], {}),
        ("approximate KL to the rollout policy", ["actor/approx_kl", "actor/approx_kl_k3"], {}),
        ("policy-gradient loss", ["actor/pg_loss"], {}),
    ]),
    ("Generation", [
        ("generated tokens per step", ["tokens/generated"], {}),
        ("mean response length (tokens)", ["tokens/response_len_mean"], {}),
        ("truncated share", ["response/truncated_frac"], {}),
        ("mean token entropy (nats)", ["response/entropy_mean"], {}),
    ]),
]
#: The first tab: the charts a POISE run is judged by, one screenful.
OVERVIEW = [
    ("reward (mean over the step's rollouts)", ["reward/mean", "reward/score_mean"], {}),
    ("held-out accuracy by domain", ["eval/domain/*/accuracy", "eval/accuracy"],
     {"sparse": True}),
    ("probe MAE", ["probe/mae"], {}),
    ("probe Pearson r", ["probe/pearson"], {}),
    ("variance-reduction ratio 1 − Var(A)/Var(r)", ["adv/var_reduction"], {}),
    ("gradient norm", ["actor/grad_norm"], {}),
]
TABS = ["Overview"] + [s for s, _ in SECTIONS] + ["Timing", "All"]


def _slug(name: str) -> str:
    return name.lower().split()[0].replace("-", "")


def _draw(name: str, charts, all_keys, runs, x, smoothing, columns, colours) -> None:
    charts = [(title, analysis.keys_matching(all_keys, pats), opts) for title, pats, opts in charts]
    charts = [c for c in charts if c[1]]
    if not charts:
        st.caption(f"{name}: nothing logged by the selected runs.")
        return
    cols = st.columns(columns)
    for i, (title, keys, opts) in enumerate(charts):
        fig = figures.metric_chart(runs, keys, x, smoothing, title, run_colours=colours, **opts)
        ui.chart(cols[i % columns], fig, key=f"tr_{_slug(name)}_{i}")


def body() -> None:
    tails = {r.path: data.tail(r.path) for r in refs}
    for r in refs:
        ui.show_warnings(tails[r.path].warnings, prefix=f"**{r.label}**: ")
        if tails[r.path].external:
            for note in tails[r.path].reader.notes:
                st.caption(f"**{r.label}** ({ui.source_name(r)}): {note}")
    runs = [(r.label, tails[r.path].steps) for r in refs]
    runs = [(label, steps) for label, steps in runs if len(steps)]
    if not runs:
        st.info("The selected runs have logged no step yet.")
        return

    ui.query_default("tr_x", "x", str, lambda v: v in analysis.X_AXES)
    ui.query_default("tr_tab", "tab", lambda v: {_slug(t): t for t in TABS}.get(v),
                     lambda v: v is not None)
    c1, c2, c4 = st.columns([3, 2, 2])
    x = c1.radio("x-axis", list(analysis.X_AXES), key="tr_x", horizontal=True,
                 format_func=lambda k: {"step": "step", "tokens": "tokens",
                                        "wall": "wall-clock"}[k])
    smoothing = c2.slider("smoothing", 0.0, 0.95, 0.6, 0.05, key="tr_smooth",
                          help="TensorBoard's debiased exponential moving average; the raw "
                               "values are drawn faintly behind the smoothed lines.")
    columns = c4.select_slider("charts per row", [1, 2, 3], value=3, key="tr_cols")
    colours = ui.run_colours(refs)
    ui.run_key(refs)

    all_keys = sorted({k for _, steps in runs for k in steps.columns
                       if not k.startswith("_") and k not in ("step", "time")})
    used = {k for _, charts in SECTIONS for _, pats, _ in charts
            for k in analysis.keys_matching(all_keys, pats)}
    tabs = st.tabs(TABS, key="tr_tab", on_change="rerun")
    opened = next((name for name, tab in zip(TABS, tabs) if tab.open), TABS[0])
    ui.set_query(run=[r.label for r in refs], x=x if x != "step" else None,
                 tab=_slug(opened) if opened != TABS[0] else None)
    with tabs[TABS.index(opened)]:
        if opened == "Overview":
            _draw(opened, OVERVIEW, all_keys, runs, x, smoothing, columns, colours)
        for name, charts in SECTIONS:
            if opened in (name, "All"):
                if opened == "All":
                    st.subheader(name)
                _draw(name, charts, all_keys, runs, x, smoothing, columns, colours)
        if opened in ("Timing", "All"):
            _timing(runs, x, colours, heading=opened == "All")

    st.subheader("More metrics")
    rest = [k for k in all_keys if k not in used and not k.startswith("timing_s/")]
    more = st.multiselect(f"any other logged key ({len(rest)})", rest, key="tr_more",
                          placeholder="e.g. probe/math/n_rows")
    if more:
        cols = st.columns(columns)
        for i, key in enumerate(more):
            ui.chart(cols[i % columns], figures.metric_chart(runs, [key], x, smoothing,
                                                             run_colours=colours),
                     key=f"tr_more_{key}")


def _timing(runs, x: str, colours: dict[str, str], heading: bool = True) -> None:
    if heading:
        st.subheader("Timing")
    cols = st.columns(2)
    ui.chart(cols[0], figures.metric_chart(runs, ["timing_s/step"], x, 0.0, "step time (s)",
                                           run_colours=colours), key="tr_step_time")
    shares = {label: analysis.stage_shares(steps) for label, steps in runs}
    shares = {k: v for k, v in shares.items() if len(v)}
    if shares:
        ui.chart(cols[1], figures.stage_share_figure(shares), key="tr_shares")
    label, steps = runs[0]
    if any(k.startswith("timing_s/") for k in steps.columns):
        ui.chart(st, figures.stage_time_figure(steps, x, label), key="tr_stage_time")


ui.live(body, [r.path for r in refs])
