"""Rollouts: browse and filter every rollout; the rollouts of one prompt side by side, their text
split into the tokens the run stored (`token_pieces`; older runs: see poise_dash.tokens) and
coloured by per-token entropy (or, for runs that store them, by the sampled tokens' log-probs or
probabilities, the engine's log-probs and their gap, or per-token advantages), with the think and
answer spans and the probe's window marked. Runs made elsewhere (TRL, verl) lack some columns
(probe, per-token values, domain, advantage for verl): the controls that need them are off."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import streamlit as st
from poise_dash import analysis, data, figures, token_view, tokens, ui

st.title("Rollouts")
refs = ui.require_selection()
ui.own_query("focus", "steps", "q", "domain", "adv", "err", "group")
ref = ui.focus_run(refs, key="ro_run", reset=("ro_steps", "_ro_steps_latest", "ro_group",
                                              "ro_domains", "ro_reward", "_ro_last_rows"))

MAX_TABLE_ROWS = 5000
SHOWN = ["step", "group_id", "rollout_idx", "domain", "task", "reward", "probe_pred",
         "probe_target", "baseline", "advantage", "probe error", "num_tokens", "truncated",
         "completion"]
SIGNS = ["positive", "zero", "negative"]


def _steps_param(v: str) -> tuple[int, int]:
    a, _, b = v.partition("-")
    return int(a), int(b or a)


def _group_param(v: str) -> tuple[int, int]:
    a, _, b = v.partition(":")
    return int(a), int(b)


def body() -> None:
    files = data.rollout_files(ref.path)
    if not files:
        st.info(f"{ref.label} has no rollout table yet ({data.tables_hint(ref.path)}).")
        return
    steps = [s for s, _ in files]
    ui.query_default("ro_steps", "steps", _steps_param)
    ui.query_default("ro_q", "q", str)
    ui.query_default("ro_domains", "domain", lambda v: v.split(","))
    ui.query_default("ro_signs", "adv", lambda v: v.split(","),
                     lambda v: set(v) <= set(SIGNS))
    ui.query_default("ro_minerr", "err", float, lambda v: 0.0 <= v <= 1.0)

    c1, c2, c3, c4 = st.columns([3, 2, 2, 2])
    window = ui.step_window(c1, "steps", steps, "ro_steps", default_width=1)
    in_window = [s for s in steps if window[0] <= s <= window[1]]
    df, warnings = data.load_rollouts(ref.path, in_window,
                                      data.LIGHT_COLUMNS + data.TEXT_COLUMNS)
    ui.show_warnings(warnings)
    if df.empty:
        st.info("No rollout in this step window.")
        return
    target = analysis.target_column(df)
    has_probe, has_adv = "probe_pred" in df, "advantage" in df   # a run made elsewhere may lack
    df = df.assign(_probe_err=(df[target] - df["probe_pred"]).abs() if has_probe else np.nan,
                   _abs_adv=df["advantage"].abs() if has_adv else np.nan)

    domains = sorted(df["domain"].dropna().unique()) if "domain" in df else []
    st.session_state["ro_domains"] = [d for d in st.session_state.get("ro_domains", [])
                                      if d in domains]
    dom = c2.multiselect("domain", domains, key="ro_domains", placeholder="all",
                         disabled=not domains,
                         help=None if domains else "this run logs no domain")
    if not has_adv:
        st.session_state["ro_signs"] = []
    signs = c3.pills("advantage sign", SIGNS, selection_mode="multi", key="ro_signs",
                     disabled=not has_adv,
                     help=None if has_adv else "this run logs no advantage (verl's dumps)")
    sorts = [name for name, (col, _) in analysis.SORTS.items()
             if col is None or (col in df and df[col].notna().any())]
    if st.session_state.get("ro_sort") not in sorts:
        st.session_state.pop("ro_sort", None)
    sort = c4.selectbox("sort by", sorts, key="ro_sort")

    c1, c2, c3, c4 = st.columns([3, 2, 3, 1.4])
    rmin, rmax = float(np.nanmin(df["reward"])), float(np.nanmax(df["reward"]))
    reward_range = None
    if rmax > rmin:
        kept = st.session_state.get("ro_reward")
        if kept is not None:  # the range of another window or of a live run's new steps
            lo, hi = max(rmin, min(kept[0], rmax)), min(rmax, max(kept[1], rmin))
            st.session_state["ro_reward"] = (lo, hi) if lo <= hi else (rmin, rmax)
        reward_range = c1.slider("reward", rmin, rmax, key="ro_reward",
                                 **ui.default("ro_reward", (rmin, rmax)))
    else:
        c1.caption(f"every reward is {rmin:g}")
    if not has_probe:
        st.session_state["ro_minerr"] = 0.0
    min_err = c2.slider(f"|{target} − probe| ≥", 0.0, 1.0, step=0.05, key="ro_minerr",
                        **ui.default("ro_minerr", 0.0), disabled=not has_probe,
                        help="probe error: how far the probe's prediction is from the outcome"
                             + ("" if has_probe else " (this run logs no probe predictions)"))
    text = c3.text_input("search prompt, completion, answer", key="ro_q",
                         placeholder="free text (case-insensitive)")
    regex = c4.toggle("regex", key="ro_regex")
    truncated_only = c4.toggle("truncated", key="ro_trunc")

    filt = analysis.RolloutFilter(domains=dom, advantage_signs=list(signs or []),
                                  reward_range=reward_range, min_probe_error=min_err,
                                  text=text, regex=regex, truncated_only=truncated_only)
    try:
        view = filt.apply(df, target)
    except ValueError as err:
        st.warning(str(err))
        view = df.iloc[0:0]
    view = analysis.sort_rollouts(view, sort)
    ui.set_query(focus=ref.label, steps=f"{window[0]}-{window[1]}", q=text or None,
                 domain=",".join(dom) or None, adv=",".join(signs or []) or None,
                 err=f"{min_err:g}" if min_err else None)

    export = view.drop(columns=["_probe_err", "_abs_adv"]).assign(
        probe_error=view["_probe_err"])
    h1, h2, h3 = st.columns([4, 1, 1])
    h1.caption(f"**{len(view):,}** of {len(df):,} rollouts in steps {window[0]}–{window[1]} "
               f"match" + (f" (the table shows the first {MAX_TABLE_ROWS:,}; the export has "
                           f"all)" if len(view) > MAX_TABLE_ROWS else ""))
    stem = f"{ref.label.replace('/', '_')}_steps{window[0]}-{window[1]}"
    h2.download_button("CSV", lambda: export.to_csv(index=False).encode(),
                       file_name=f"{stem}.csv", mime="text/csv", key="ro_csv",
                       icon=":material/download:", on_click="ignore")
    h3.download_button("JSONL", lambda: export.to_json(orient="records", lines=True).encode(),
                       file_name=f"{stem}.jsonl", mime="application/jsonl", key="ro_jsonl",
                       icon=":material/download:", on_click="ignore")

    table = view.head(MAX_TABLE_ROWS).rename(columns={"_probe_err": "probe error"})
    table = table[[c for c in SHOWN if c in table]].copy()
    table["completion"] = table["completion"].str.slice(0, 160)
    event = st.dataframe(
        table, key="ro_table", hide_index=True, on_select="rerun", selection_mode="single-row",
        width="stretch", height=320,
        column_config={c: st.column_config.NumberColumn(format="%.3f")
                       for c in ("reward", "probe_pred", "probe_target", "baseline",
                                 "advantage", "probe error")})
    st.caption("Select a row to open its prompt's rollouts below.")
    _group_view(view, event, target)


def _group_view(view: pd.DataFrame, event, target: str) -> None:
    groups = list(dict.fromkeys(zip(view["step"].astype(int), view["group_id"].astype(int))))
    if not groups:
        return
    rows = [i for i in (event.selection.rows if event else []) if i < len(view)]
    picked_row = tuple(rows)
    if rows and st.session_state.get("_ro_last_rows") != picked_row:
        r = view.iloc[rows[0]]
        st.session_state["ro_group"] = (int(r["step"]), int(r["group_id"]))
    st.session_state["_ro_last_rows"] = picked_row
    ui.query_default("ro_group", "group", _group_param)
    if st.session_state.get("ro_group") not in groups:
        st.session_state["ro_group"] = groups[0]

    st.subheader("Rollouts of one prompt")
    st.session_state["_ro_groups"] = groups
    c_sel, c_prev, c_next = st.columns([6, 1, 1], vertical_alignment="bottom")
    i = groups.index(st.session_state["ro_group"])
    c_prev.button("◀ prev", key="ro_prev", disabled=i == 0, width="stretch",
                  on_click=_move_group, args=(-1,))
    c_next.button("next ▶", key="ro_next", disabled=i == len(groups) - 1, width="stretch",
                  on_click=_move_group, args=(1,))
    by_group = view.groupby(["step", "group_id"])
    first = by_group.first()
    rewards = by_group["reward"].agg(lambda r: " / ".join(f"{x:g}" for x in r))

    def label(g: tuple[int, int]) -> str:
        row = first.loc[g]
        return (f"step {g[0]} · group {g[1]} · {row.get('domain', '–')} · "
                f"{row.get('task', '')} · rewards {rewards.loc[g]}")

    step, gid = c_sel.selectbox(f"prompt ({len(groups)} matching)", groups, key="ro_group",
                                format_func=label)
    ui.set_query(group=f"{step}:{gid}")
    ident = dict(data.rollout_files(ref.path)).get(step)
    if ident is None:
        st.warning(f"the rollout table of step {step} is gone")
        return
    full = data.read_rollout_step(ref.path, step, ident, None)
    g = full[full["group_id"] == gid].sort_values("rollout_idx")
    if g.empty:
        st.warning(f"group {gid} is not in step {step}")
        return
    head = g.iloc[0]
    st.code(head["prompt"], language=None, wrap_lines=True)
    facts = [f"prompt id `{head['prompt_id']}`"] if "prompt_id" in g else []
    if "domain" in g:
        facts.append(f"domain **{head['domain']}**")
    if "data_source" in g:
        facts.append(f"source `{head['data_source']}`")
    if "ground_truth" in g:
        gt = str(head["ground_truth"])
        facts.append(f"reference answer `{gt[:200]}`" + ("…" if len(gt) > 200 else ""))
    st.markdown(" · ".join(facts))

    # each colour scale needs its columns: runs written before them show entropy only
    aligned = {int(r["rollout_idx"]): tokens.align_row(r) for _, r in g.iterrows()}
    scales = token_view.available_scales("token_logprobs" in g.columns,
                                         _stores(g, "engine_logprobs"),
                                         _stores(g, "token_advantages"))
    keys = [s.key for s in scales]
    if st.session_state.get("ro_colour") not in keys:       # e.g. a run without that column
        st.session_state.pop("ro_colour", None)
    engine = data.meta_of(ref.path).get("rollout_engine")
    c0, c1, c2 = st.columns([2, 3, 1], vertical_alignment="bottom")
    if len(scales) > 1:
        key = c0.segmented_control(
            "colour by", keys, key="ro_colour", default="entropy",
            required=True, format_func=lambda k: token_view.SCALES[k].label,
            help="entropy of the policy at each token; the log-probability of the sampled "
                 "token under the policy that sampled it (the trainer's forward, "
                 "temperature-scaled as in the PPO ratio; coloured by surprisal −log p) or its "
                 "probability exp(log p); the rollout engine's own log-prob"
                 + (f" ({engine})" if engine else "") + " and its gap to the trainer's; the "
                 "per-token advantage (where the run stores each)")
        scale = token_view.get_scale(key or "entropy")
    else:
        scale = token_view.SCALES["entropy"]
        c0.caption("coloured by entropy (this run stores no per-token log-probs)")
    if scale.uses_vmax:
        magnitudes = [scale.magnitude(scale.values(al)) for al in aligned.values()]
        top, auto = _auto_scale(magnitudes, scale.at_least, scale.slider_min)
        vmax = c1.slider(scale.slider_label, scale.slider_min, top, auto, scale.slider_step,
                         key=scale.slider_key)
    else:
        vmax = 1.0
        c1.caption("probability: white at p = 1, full colour at p = 0")
    show_tags = c2.toggle("show tags", value=True, key="ro_tags")
    st.html(token_view.legend_html(vmax, scale, pooled=any(
        al.pooled is not None for al in aligned.values())))
    per_row = min(len(g), 4)
    rows_of = [g.iloc[i:i + per_row] for i in range(0, len(g), per_row)]
    k = len(g)
    for chunk in rows_of:
        cols = st.columns(per_row)
        for col, (_, r) in zip(cols, chunk.iterrows()):
            with col:
                _rollout_card(r, aligned[int(r["rollout_idx"])], k, vmax, show_tags, scale)


def _stores(g: pd.DataFrame, column: str) -> bool:
    """Whether any row of `g` stores the per-token list `column` (it may be null per row)."""
    return column in g.columns and any(_is_list(v) for v in g[column])


def _is_list(v) -> bool:
    """A stored per-token list (not a missing value)."""
    return v is not None and not (isinstance(v, float) and np.isnan(v))


def _auto_scale(arrays: list[np.ndarray], at_least: float,
                low: float = 0.1) -> tuple[float, float]:
    """(slider maximum, default): full colour at the 98th percentile of the values (never
    below the slider's minimum `low`)."""
    allv = np.concatenate([a for a in arrays if len(a)]) if any(len(a) for a in arrays) \
        else np.array([1.0])
    allv = allv[np.isfinite(allv)]
    auto = float(max(low, np.percentile(allv, 98))) if len(allv) else 1.0
    digits = max(2, -int(np.floor(np.log10(low))))
    return float(max(auto, at_least)), round(auto, digits)


def _move_group(delta: int) -> None:
    """Previous/next prompt (a callback, so the buttons are drawn with the new position)."""
    groups = st.session_state.get("_ro_groups", [])
    current = st.session_state.get("ro_group")
    if current in groups:
        j = groups.index(current) + delta
        if 0 <= j < len(groups):
            st.session_state["ro_group"] = groups[j]


def _value(r: pd.Series, column: str) -> float:
    """A row's number, NaN where the run has no such column (runs made elsewhere)."""
    try:
        return float(r[column]) if column in r else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


def _rollout_card(r: pd.Series, al: tokens.Alignment, k: int, vmax: float, show_tags: bool,
                  scale: token_view.Scale) -> None:
    idx = int(r["rollout_idx"])
    adv, reward, base = _value(r, "advantage"), _value(r, "reward"), _value(r, "baseline")
    tone = "🟩" if adv > analysis.ZERO_ADVANTAGE else "🟥" if adv < -analysis.ZERO_ADVANTAGE \
        else "⬜"
    n_tokens = _value(r, "num_tokens")
    st.markdown(f"**{tone} rollout {idx}**"
                + (f" · {int(n_tokens)} tokens" if np.isfinite(n_tokens) else "")
                + (" · ✂️ truncated" if "truncated" in r and bool(r["truncated"]) else ""))
    m = st.columns(4)
    m[0].metric("reward", _fmt(reward),
                help=f"verifier score {_fmt(float(r['score']))}" if "score" in r else None)
    target = (f"; its training target, the mean score of the sibling rollouts, is "
              f"{_fmt(float(r['probe_target']))}" if "probe_target" in r else "")
    m[1].metric("probe pred", _fmt(_value(r, "probe_pred")),
                help="the probe's predicted expected reward from this rollout's own features"
                     + target)
    m[2].metric("baseline", _fmt(base),
                help=("the baseline this rollout received: for POISE the mean of its "
                      f"{'sibling' if k == 2 else str(k - 1) + ' siblings'}' probe "
                      "predictions; for GRPO/RLOO the (leave-one-out) group mean"))
    m[3].metric("advantage", _fmt(adv),
                help="the mean of the per-token advantages over the rollout's tokens"
                     if al.advantages is not None else None)
    if np.isfinite(adv) and np.isfinite(base) and abs(adv - (reward - base)) > 1e-5:
        st.caption(f"A ≠ r − b ({reward - base:+.3f}): the estimator rescales advantages")
    if al.coloured:
        st.html(token_view.render_html(al, vmax, show_tags=show_tags, scale=scale))
    else:
        st.code(str(r["completion"]), language=None, wrap_lines=True)
    st.caption(al.describe())
    if len(al.entropies):
        pieces = [token_view.visible_piece(p)[1:-1] for p in al.pieces] if al.coloured else None
        fig = figures.entropy_strip(scale.values(al), al.strip_spans(), vmax,
                                    f"{scale.name} per token · rollout {idx}", pieces,
                                    scale=scale.key)
        ui.chart(st, fig, key=f"ro_strip_{r['step']}_{r['group_id']}_{idx}")
    with st.expander("raw row"):
        long_lists = ("token_entropies", "token_logprobs", "engine_logprobs",
                      "token_advantages", "token_pieces")
        st.json(json.loads(pd.Series({k: v for k, v in r.items() if k not in long_lists})
                           .to_json(default_handler=str)), expanded=False)


ui.live(body, [ref.path])
