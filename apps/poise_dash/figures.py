"""Plotly figures of the dashboard (every chart is Plotly); pure functions of frames."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from poise_dash.analysis import X_AXES, ema
from poise_dash.token_view import SPAN_COLOURS, get_scale

PALETTE = qualitative.Plotly + qualitative.D3
DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
DOMAIN_COLOURS = {"math": "#1f77b4", "logic": "#ff7f0e", "code": "#2ca02c", "all": "#444"}
HEIGHT = 300
STAGE_COLOURS = {"gen": "#636efa", "reward": "#ef553b", "old_log_prob": "#00cc96",
                 "probe": "#ab63fa", "adv": "#ffa15a", "update": "#19d3f3", "eval": "#ff6692",
                 "other": "#b6b6b6"}


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def domain_colour(name: str, i: int = 0) -> str:
    return DOMAIN_COLOURS.get(name, colour(i + 3))


def _layout(fig: go.Figure, title: str, *, height: int = HEIGHT, x_title: str = "",
            y_title: str = "") -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.01, xanchor="left", font=dict(size=14)),
                      height=height, margin=dict(l=10, r=10, t=40, b=10),
                      legend=dict(orientation="h", yanchor="top", y=-0.2 if x_title else -0.12,
                                  x=0, font=dict(size=11)),
                      hovermode="x unified")
    if x_title:
        fig.update_xaxes(title_text=x_title)
    if y_title:
        fig.update_yaxes(title_text=y_title)
    return fig


def short_key(key: str, keys: list[str]) -> str:
    """The part of a metric key that tells it apart from the others on the same chart."""
    if len(keys) == 1:
        return key
    parts = [k.split("/") for k in keys]
    prefix = 0
    while all(len(p) > prefix + 1 for p in parts) and len({p[prefix] for p in parts}) == 1:
        prefix += 1
    return "/".join(key.split("/")[prefix:])


def metric_chart(runs: list[tuple[str, pd.DataFrame]], keys: list[str], x: str = "step",
                 smoothing: float = 0.0, title: str = "", *, log_y: bool = False,
                 sparse: bool = False, y_title: str = "",
                 run_colours: dict[str, str] | None = None) -> dict:
    """Metric `keys` over `x` for each run, overlaid, as a Plotly figure dict.

    With several runs the colour is the run's (the page shows one key for all charts) and the
    dash tells the keys apart; with one run the colour tells the keys apart. Smoothed lines are
    drawn over the faint raw values; `sparse` metrics (eval) are markers joined by lines and
    never smoothed. A plain dict (not go.Figure): the Training page draws dozens of these on
    every refresh, and building graph objects costs ~20 ms each.
    """
    data: list[dict] = []
    xcol = f"_x_{x}"
    many_runs = len(runs) > 1
    drawn_keys: list[str] = []
    for r, (label, steps) in enumerate(runs):
        for k, key in enumerate(keys):
            if key not in steps or xcol not in steps:
                continue
            ys = pd.to_numeric(steps[key], errors="coerce").to_numpy(float)
            xs = steps[xcol].to_numpy(float)
            ok = np.isfinite(ys) & np.isfinite(xs)
            if not ok.any():
                continue
            xs, ys = xs[ok], ys[ok]
            if key not in drawn_keys:
                drawn_keys.append(key)
            c = (run_colours or {}).get(label, colour(r)) if many_runs else colour(k)
            dash = DASHES[k % len(DASHES)] if many_runs else "solid"
            part = short_key(key, keys)
            name = f"{label} · {part}" if many_runs and len(keys) > 1 else (
                label if many_runs else part)
            legend = {"legendgroup": part, "showlegend": not many_runs}
            if sparse or smoothing <= 0 or len(xs) < 3:
                data.append({"type": "scatter", "x": xs, "y": ys, "name": name,
                             "mode": "lines+markers" if sparse or len(xs) < 3 else "lines",
                             "line": {"color": c, "dash": dash}, **legend})
                continue
            data.append({"type": "scatter", "x": xs, "y": ys, "name": name, "mode": "lines",
                         "opacity": 0.25, "line": {"color": c, "dash": dash, "width": 1},
                         "showlegend": False, "hoverinfo": "skip", "legendgroup": part})
            data.append({"type": "scatter", "x": xs, "y": ema(ys, smoothing), "name": name,
                         "mode": "lines", "line": {"color": c, "dash": dash, "width": 2},
                         **legend})
    if many_runs and len(drawn_keys) > 1:  # a grey key to the dashes
        for k, key in enumerate(keys):
            if key in drawn_keys:
                part = short_key(key, keys)
                data.append({"type": "scatter", "x": [None], "y": [None], "mode": "lines",
                             "name": part, "legendgroup": part,
                             "line": {"color": "#777", "dash": DASHES[k % len(DASHES)]}})
    layout = _layout_dict(title or (keys[0] if len(keys) == 1 else ""), y_title=y_title)
    layout["showlegend"] = sum(t.get("showlegend", True) is not False for t in data) > 1
    if log_y:
        layout["yaxis"]["type"] = "log"
    if not data:
        layout["annotations"] = [{"text": "not logged by the selected runs", "showarrow": False,
                                  "x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper",
                                  "font": {"color": "#888"}}]
        # an empty trace: Streamlit's figure check refuses a figure with no data at all
        data.append({"type": "scatter", "x": [], "y": [], "showlegend": False})
    return {"data": data, "layout": layout}


def _layout_dict(title: str, *, height: int = HEIGHT, y_title: str = "") -> dict:
    """The layout `_layout` gives, as a dict (for figures built as dicts)."""
    return {"title": {"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 14}},
            "height": height, "margin": {"l": 10, "r": 10, "t": 40, "b": 10},
            "legend": {"orientation": "h", "yanchor": "top", "y": -0.12, "x": 0,
                       "font": {"size": 11}},
            "hovermode": "x unified", "xaxis": {},
            "yaxis": {"title": {"text": y_title}} if y_title else {}}


def stage_share_figure(shares: dict[str, pd.Series]) -> go.Figure:
    """Mean share of each training stage in the step time, one stacked bar per run."""
    fig = go.Figure()
    stages: list[str] = []
    for s in shares.values():
        stages += [k for k in s.index if k not in stages]
    labels = list(shares)
    for i, stage in enumerate(stages):
        vals = [float(shares[r].get(stage, 0.0)) for r in labels]
        fig.add_trace(go.Bar(y=labels, x=vals, name=stage, orientation="h",
                             marker_color=STAGE_COLOURS.get(stage, colour(i + 8)),
                             text=[f"{v:.0%}" if v >= 0.06 else "" for v in vals],
                             textposition="inside",
                             hovertemplate=f"{stage}: %{{x:.1%}}<extra>%{{y}}</extra>"))
    fig.update_layout(barmode="stack", hovermode="closest")
    fig.update_xaxes(tickformat=".0%", range=[0, 1])
    return _layout(fig, "stage shares of the step time (mean over steps)",
                   height=max(180, 90 + 40 * len(labels)))


def stage_time_figure(steps: pd.DataFrame, x: str, label: str) -> go.Figure:
    """Seconds per stage per step, stacked, for one run."""
    fig = go.Figure()
    xcol = f"_x_{x}"
    keys = [k for k in steps.columns if k.startswith("timing_s/")
            and k not in ("timing_s/step", "timing_s/eval")]
    if "timing_s/step" in steps:
        steps = steps[pd.to_numeric(steps["timing_s/step"], errors="coerce").notna()]
    for i, key in enumerate(keys):
        stage = key.removeprefix("timing_s/")
        fig.add_trace(go.Scatter(x=steps[xcol], y=pd.to_numeric(steps[key], errors="coerce"),
                                 name=stage, stackgroup="t", mode="lines",
                                 line=dict(width=0.5, color=STAGE_COLOURS.get(stage,
                                                                              colour(i + 8)))))
    return _layout(fig, f"seconds per stage · {label}", x_title=X_AXES[x], y_title="s")


# --------------------------------------------------------------------------------------------
# probe


def scatter_pred_obs(df: pd.DataFrame, target: str, *, jitter: float = 0.03,
                     max_points: int = 20000, seed: int = 0) -> go.Figure:
    """Probe prediction (x) against the observed outcome (y), by domain; binary outcomes are
    jittered vertically so that overlapping points show their density."""
    d = df[["domain", "probe_pred", target, "step", "group_id", "rollout_idx"]].dropna(
        subset=["probe_pred", target])
    note = ""
    if len(d) > max_points:
        d = d.sample(max_points, random_state=seed)
        note = f" (random {max_points:,} of {len(df):,})"
    rng = np.random.default_rng(seed)
    fig = go.Figure()
    for i, (dom, sub) in enumerate(sorted(d.groupby("domain"), key=lambda kv: kv[0])):
        y = sub[target].to_numpy(float) + (rng.uniform(-jitter, jitter, len(sub))
                                            if jitter else 0.0)
        fig.add_trace(go.Scattergl(
            x=sub["probe_pred"], y=y, mode="markers", name=str(dom),
            marker=dict(size=5, opacity=0.55, color=domain_colour(str(dom), i)),
            customdata=np.stack([sub["step"], sub["group_id"], sub["rollout_idx"],
                                 sub[target]], axis=-1),
            hovertemplate=("pred %{x:.3f} · observed %{customdata[3]:.3f}<br>step "
                           "%{customdata[0]} group %{customdata[1]} rollout %{customdata[2]}"
                           "<extra>%{fullData.name}</extra>")))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect",
                             line=dict(color="#888", dash="dot"), hoverinfo="skip"))
    fig.update_layout(hovermode="closest")
    return _layout(fig, f"probe prediction vs observed {target}{note}", height=380,
                   x_title="probe prediction", y_title=f"observed {target} (jittered)"
                   if jitter else f"observed {target}")


def reliability_figure(bins: dict[str, pd.DataFrame], preds: dict[str, np.ndarray],
                       ece: dict[str, float], target: str) -> go.Figure:
    """Equal-mass reliability diagram with 95% intervals, over a histogram of predictions."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.72, 0.28],
                        vertical_spacing=0.04)
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect",
                             line=dict(color="#888", dash="dot"), hoverinfo="skip"), 1, 1)
    for i, (name, b) in enumerate(bins.items()):
        if b.empty:
            continue
        c = domain_colour(name, i)
        fig.add_trace(go.Scatter(
            x=b["pred_mean"], y=b["obs_mean"], mode="lines+markers",
            name=f"{name} (ECE {ece.get(name, float('nan')):.3f})",
            line=dict(color=c), marker=dict(size=7),
            error_y=dict(type="data", symmetric=False, array=b["obs_hi"] - b["obs_mean"],
                         arrayminus=b["obs_mean"] - b["obs_lo"], thickness=1),
            customdata=np.stack([b["n"], b["pred_lo"], b["pred_hi"]], axis=-1),
            hovertemplate=("mean pred %{x:.3f} · observed %{y:.3f}<br>n=%{customdata[0]} · "
                           "preds %{customdata[1]:.2f}-%{customdata[2]:.2f}"
                           "<extra>%{fullData.name}</extra>")), 1, 1)
        p = preds.get(name)
        if p is not None and len(p):
            fig.add_trace(go.Histogram(x=p, name=f"{name} predictions", showlegend=False,
                                       marker_color=c, opacity=0.6, xbins=dict(size=0.025),
                                       hovertemplate="%{x}: %{y}<extra></extra>"), 2, 1)
    fig.update_layout(barmode="overlay", hovermode="closest")
    fig.update_yaxes(title_text=f"mean observed {target}", range=[-0.05, 1.05], row=1, col=1)
    fig.update_yaxes(title_text="count", row=2, col=1)
    fig.update_xaxes(title_text="mean probe prediction (equal-mass bins)", range=[-0.02, 1.02],
                     row=2, col=1)
    return _layout(fig, "reliability diagram", height=460)


def residual_figure(df: pd.DataFrame, target: str) -> go.Figure:
    """Observed minus predicted, per domain (box with mean, all points when few)."""
    d = df.dropna(subset=["probe_pred", target])
    fig = go.Figure()
    for i, (dom, sub) in enumerate(sorted(d.groupby("domain"), key=lambda kv: kv[0])):
        res = sub[target] - sub["probe_pred"]
        fig.add_trace(go.Box(y=res, name=f"{dom} (n={len(sub)})", boxmean=True,
                             marker_color=domain_colour(str(dom), i),
                             boxpoints="all" if len(sub) <= 300 else "outliers",
                             jitter=0.4, pointpos=0, marker=dict(size=3, opacity=0.5)))
    fig.add_hline(y=0, line=dict(color="#888", dash="dot"))
    fig.update_layout(showlegend=False, hovermode="closest")
    return _layout(fig, f"residuals ({target} − prediction) by domain", height=340,
                   y_title="residual")


def calibration_history_figure(hist: pd.DataFrame, smoothing: float = 0.0) -> go.Figure:
    """ECE, calibration slope, Brier skill and MAE of each step's predictions, over training."""
    panels = [("ece", "ECE (lower is better)"), ("slope", "calibration slope (1 is ideal)"),
              ("brier_skill", "Brier skill (higher is better)"), ("mae", "MAE")]
    fig = make_subplots(rows=2, cols=2, subplot_titles=[t for _, t in panels],
                        horizontal_spacing=0.08, vertical_spacing=0.16)
    for i, (key, _title) in enumerate(panels):
        row, col = i // 2 + 1, i % 2 + 1
        if key not in hist:
            continue
        d = hist[["step", key]].dropna()
        c = colour(i)
        if smoothing > 0 and len(d) >= 3:
            fig.add_trace(go.Scatter(x=d["step"], y=d[key], mode="lines", opacity=0.3,
                                     line=dict(color=c, width=1), hoverinfo="skip"), row, col)
            fig.add_trace(go.Scatter(x=d["step"], y=ema(d[key].to_numpy(float), smoothing),
                                     mode="lines", name=key, line=dict(color=c, width=2)),
                          row, col)
        else:
            fig.add_trace(go.Scatter(x=d["step"], y=d[key], mode="lines+markers", name=key,
                                     marker=dict(size=4), line=dict(color=c)), row, col)
    fig.add_hline(y=1, line=dict(color="#888", dash="dot"), row=1, col=2)
    fig.add_hline(y=0, line=dict(color="#888", dash="dot"), row=2, col=1)
    fig.update_layout(showlegend=False)
    fig.update_xaxes(title_text="step", row=2)
    fig = _layout(fig, "calibration of each step's predictions, over training", height=500)
    fig.update_layout(margin=dict(t=80))
    return fig


def baseline_error_figure(errors: pd.DataFrame) -> go.Figure:
    """MSE against the reward of each candidate baseline, per domain (lower is better)."""
    fig = go.Figure()
    for i, (name, sub) in enumerate(errors.groupby("baseline", sort=False)):
        fig.add_trace(go.Bar(x=sub["domain"], y=sub["mse"], name=str(name),
                             marker_color=colour(i), customdata=sub["n"],
                             hovertemplate="%{x}: MSE %{y:.4f} (n=%{customdata})"
                                           "<extra>%{fullData.name}</extra>"))
    fig.update_layout(barmode="group", hovermode="closest")
    return _layout(fig, "baseline error: MSE against the reward (lower is better)",
                   height=340, y_title="MSE")


def pair_sign_figure(rows: pd.DataFrame) -> go.Figure:
    """Within-pair sign accuracy per domain, with the number of informative pairs."""
    fig = go.Figure(go.Bar(
        x=rows["domain"], y=rows["accuracy"],
        marker_color=[domain_colour(str(d), i) for i, d in enumerate(rows["domain"])],
        text=[f"{a:.0%} ({n} pairs)" if np.isfinite(a) else "no pairs"
              for a, n in zip(rows["accuracy"], rows["pairs"])], textposition="outside",
        hovertemplate="%{x}: %{y:.3f}<extra></extra>"))
    fig.add_hline(y=0.5, line=dict(color="#888", dash="dot"))
    fig.update_yaxes(range=[0, 1.1], tickformat=".0%")
    fig.update_layout(hovermode="closest")
    return _layout(fig, "within-pair sign accuracy (pairs whose outcomes differ; dotted: chance)",
                   height=320)


# --------------------------------------------------------------------------------------------
# tokens


def entropy_strip(entropies: np.ndarray, spans: list[tuple[str, int, int]], vmax: float,
                  title: str = "per-token entropy", pieces: list[str] | None = None,
                  scale: str = "entropy") -> go.Figure:
    """A per-token quantity at each completion position as bars, think/answer spans shaded:
    entropy (nats) by default; `scale` "logprob" or "prob" (poise_dash.token_view.SCALES) when
    `entropies` holds log-probs or probabilities."""
    sc = get_scale(scale)
    ent = np.asarray(entropies, float)
    xs = np.arange(len(ent))
    text = [repr(pieces[i]) if pieces and i < len(pieces) else "" for i in xs]
    unit = f" {sc.unit}" if sc.unit else ""
    fig = go.Figure(go.Bar(x=xs, y=ent, marker_color=[sc.colour(h, vmax) for h in ent],
                           marker_line=dict(width=0.3, color="#c55" if sc.key == "entropy"
                                            else "#56c"), customdata=text,
                           hovertemplate=f"token %{{x}} %{{customdata}}: {sc.symbol}=%{{y:.3f}}"
                                         f"{unit}<extra></extra>", showlegend=False))
    for kind, first, last in spans:
        fig.add_vrect(x0=first - 0.5, x1=last + 0.5, fillcolor=SPAN_COLOURS.get(kind, "#999"),
                      opacity=0.08, line_width=0, annotation_text=kind,
                      annotation_position="top left",
                      annotation_font=dict(color=SPAN_COLOURS.get(kind, "#999"), size=11))
    fig.update_yaxes(range=sc.y_range(ent, vmax))
    fig.update_layout(hovermode="closest", bargap=0.05)
    return _layout(fig, title, height=170, x_title="token position", y_title=sc.label)
