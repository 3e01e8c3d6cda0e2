"""Probe: predicted value against the observed outcome (or the probe's own regression target, the
siblings' mean outcome, as the run stored it) for a step window, calibration over training.
Runs made elsewhere (TRL, verl) show here when they logged the probe's columns (`probe_pred`,
e.g. through this project's integrations); the page says so when they did not."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st
from poise_dash import analysis, data, figures, ui

st.title("Probe")
refs = ui.require_selection()
ui.own_query("focus", "window", "against")
AGAINST = {"outcome": "own outcome", "target": "probe target"}
BIN_CHOICES = ("auto", 5, 10, 15, 20, 30)


def _bins(choice) -> int | None:
    """The "bins" choice as n_bins: None for auto (or anything unknown, e.g. an old session)."""
    return choice if isinstance(choice, int) and choice in BIN_CHOICES else None
ref = ui.focus_run(refs, key="pr_run", reset=("pr_window", "_pr_window_latest",
                                                              "pr_domains", "pr_snap"))


def body() -> None:
    t = data.tail(ref.path)
    ui.show_warnings(t.warnings)
    files = data.rollout_files(ref.path)
    if not files:
        st.info(f"{ref.label} has no rollout table yet ({data.tables_hint(ref.path)}).")
        return
    steps = [s for s, _ in files]
    ui.query_default("pr_window", "window",
                     lambda v: tuple(int(x) for x in v.split("-", 1)),
                     lambda v: len(v) == 2)
    ui.query_default("pr_against", "against", str, lambda v: v in AGAINST)
    c1, c2, c5, c3, c4 = st.columns([4, 2, 2, 1, 1])
    window = ui.step_window(c1, "step window", steps, "pr_window", default_width=10)
    in_window = [s for s in steps if window[0] <= s <= window[1]]
    df, warnings = data.load_rollouts(ref.path, in_window)
    ui.show_warnings(warnings)
    if "probe_pred" not in df:   # a run made elsewhere without this project's probe
        st.info(f"{ref.label} ({ui.source_name(ref)}) logged no probe predictions (no "
                f"`probe_pred` column in steps {window[0]}–{window[1]}), so there is nothing "
                f"to calibrate. A TRL or verl run has them when it trained through "
                f"poise_probe's integrations (`poise_probe.integrations.trl`, `.verl`); its "
                f"rewards and completions are on the Training and Rollouts pages.")
        return
    if "domain" not in df:       # one group for the per-domain charts
        st.caption(f"{ref.label} logs no domain: every rollout is shown as domain `all`.")
        df = df.assign(domain="all")
    domains = sorted(df["domain"].dropna().unique()) if "domain" in df else []
    st.session_state["pr_domains"] = [d for d in st.session_state.get("pr_domains", [])
                                      if d in domains]
    picked = c2.multiselect("domains", domains, key="pr_domains", placeholder="all domains")
    n_bins = c3.selectbox("bins", BIN_CHOICES, key="pr_bins",
                          help="equal-mass bins of the predictions; auto: about n^(1/3) of them, "
                               "as the probe studies' ECE")
    n_bins = _bins(n_bins)
    split = c4.toggle("by domain", value=True, key="pr_split",
                      help="one reliability curve per domain")
    against = c5.segmented_control(
        "compare with", list(AGAINST), format_func=AGAINST.get, key="pr_against",
        required=True, **ui.default("pr_against", "outcome", "default"),
        help="the rollout's own outcome (the verifier's score), or the probe's regression "
             "target: the mean score of the rollout's siblings (leave-one-out), which the "
             "trainer's probe/* metrics use") or "outcome"
    ui.set_query(focus=ref.label, window=f"{window[0]}-{window[1]}",
                 against=None if against == "outcome" else against)
    if picked:
        df = df[df["domain"].isin(picked)]
    outcome = analysis.target_column(df)
    if against == "target":
        values, source = analysis.probe_targets(df)
        df = df.assign(probe_target=values)
        target = "probe_target"
        about = (f"observed = `probe_target`, the mean `{outcome}` of each rollout's siblings: "
                 f"what the probe is fitted to ({source})")
    else:
        target = outcome
        about = (f"observed = `{outcome}`, each rollout's own outcome (the probe is fitted to "
                 f"its siblings' mean `{outcome}`: compare with *probe target* for that)")
    has_pred = df["probe_pred"].notna()
    if not has_pred.any():
        st.info(f"No probe prediction in steps {window[0]}–{window[1]} of {ref.label}: the "
                f"probe is fitted after its first steps (probe.min_steps_to_fit). Pick a later "
                f"window.")
        _history()
        return
    if (~has_pred).any():
        st.caption(f"{int((~has_pred).sum())} of {len(df)} rollouts have no prediction (probe "
                   f"not fitted for their bucket yet) and are left out.")
    d = df[has_pred]
    summary = analysis.calibration_summary(d["probe_pred"].to_numpy(float),
                                           d[target].to_numpy(float), n_bins)
    pair_acc, n_pairs = analysis.pair_sign_accuracy(d, outcome)   # own outcomes order pairs
    clipped = float(((d["probe_pred"] <= 1e-9) | (d["probe_pred"] >= 1 - 1e-9)).mean())
    m = st.columns(7)
    m[0].metric("rollouts", f"{len(d):,}")
    m[1].metric("MAE", f"{summary['mae']:.3f}")
    m[2].metric("ECE", f"{summary['ece']:.3f}")
    m[3].metric("Brier skill", f"{summary['brier_skill']:.3f}")
    m[4].metric("Pearson r", f"{summary['pearson']:.3f}")
    m[5].metric("pair sign acc", f"{pair_acc:.1%}" if np.isfinite(pair_acc) else "–",
                help=f"{n_pairs} within-group pairs with different outcomes")
    m[6].metric("at 0 or 1", f"{clipped:.1%}", help="predictions at the clip bounds")
    st.caption(f"{about} · steps {window[0]}–{window[1]} of {ref.label}")

    c1, c2 = st.columns(2)
    binary = set(np.unique(d[target].dropna())) <= {0.0, 1.0}
    ui.chart(c1, figures.scatter_pred_obs(d, target, jitter=0.04 if binary else 0.0),
             key="pr_scatter")
    groups = {"all": d}
    if split and d["domain"].nunique() > 1:
        groups = {str(k): v for k, v in d.groupby("domain")} | {"all": d}
    bins = {k: analysis.reliability_bins(v["probe_pred"], v[target], n_bins)
            for k, v in groups.items()}
    ece = {k: analysis.expected_calibration_error(b) for k, b in bins.items()}
    preds = {k: v["probe_pred"].to_numpy(float) for k, v in groups.items() if k != "all"
             or len(groups) == 1}
    ui.chart(c2, figures.reliability_figure(bins, preds, ece, target), key="pr_reliab")

    c1, c2 = st.columns(2)
    ui.chart(c1, figures.residual_figure(d, target), key="pr_resid")
    rows = []
    for dom, sub in [("all", d)] + sorted(d.groupby("domain"), key=lambda kv: kv[0]):
        acc, n = analysis.pair_sign_accuracy(sub, outcome)
        rows.append({"domain": str(dom), "accuracy": acc, "pairs": n})
    ui.chart(c2, figures.pair_sign_figure(pd.DataFrame(rows)), key="pr_pairs")

    errors = analysis.baseline_errors(df, outcome)
    if len(errors):
        ui.chart(st, figures.baseline_error_figure(errors), key="pr_baselines")
    _history()


def _history() -> None:
    st.subheader("Over training")
    steps = data.tail(ref.path).steps
    run = [(ref.label, steps)]
    smoothing = st.slider("smoothing", 0.0, 0.95, 0.0, 0.05, key="pr_smooth",
                          help="debiased exponential moving average over steps")
    c1, c2 = st.columns(2)
    ui.chart(c1, figures.metric_chart(run, ["probe/frac_clipped_low", "probe/frac_clipped_high"],
                                      "step", smoothing, "clip fractions (predictions clipped "
                                      "to [0, 1])"), key="pr_clip")
    ui.chart(c2, figures.metric_chart(run, ["probe/pair_sign_acc"], "step", smoothing,
                                      "within-pair sign accuracy (trainer)"), key="pr_pair_hist")
    hist, warnings = data.calibration_history(ref.path, _bins(st.session_state.get("pr_bins")))
    ui.show_warnings(warnings)
    if len(hist) and hist["n"].gt(0).any():
        ui.chart(st, figures.calibration_history_figure(hist[hist["n"] > 0], smoothing),
                 key="pr_hist")
    snapshots = data.tails()[ref.path].reader.probe_snapshot_steps()
    if snapshots:
        with st.expander(f"probe snapshots ({len(snapshots)}: steps {snapshots[0]}–"
                         f"{snapshots[-1]})"):
            step = st.selectbox("snapshot", snapshots, index=len(snapshots) - 1, key="pr_snap")
            try:
                tensors, meta = data.tails()[ref.path].reader.probe_snapshot(step)
            except (OSError, ValueError) as err:
                st.warning(f"snapshot of step {step} cannot be read: {err}")
            else:
                st.json(meta, expanded=False)
                st.dataframe(pd.DataFrame([
                    {"bucket": b, "array": n, "shape": str(a.shape), "dtype": str(a.dtype),
                     "mean |value|": float(np.abs(a).mean()) if a.size else np.nan}
                    for b, arrays in tensors.items() for n, a in arrays.items()]),
                    hide_index=True, width="stretch")


ui.live(body, [ref.path])
