"""Plotly figures of `poise ablate`: held-out accuracy against generated tokens, and the
variance-reduction ratio per arm with 95% intervals over seeds."""
from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from poise_probe.stats import t95

__all__ = ["accuracy_figure", "variance_figure"]


def accuracy_figure(curves: pd.DataFrame, x: str = "tokens") -> go.Figure:
    """Mean held-out accuracy over seeds against `x` (a column of `curves`: cumulative generated
    `tokens`, or `seconds` of training), one line per arm with its 95% t band over seeds and
    each seed's curve faint behind it."""
    fig = go.Figure()
    if curves.empty:
        return fig.update_layout(title="no held-out evaluations in these runs")
    label = {"tokens": "generated tokens", "seconds": "training seconds"}.get(x, x)
    for i, (arm, g) in enumerate(curves.groupby("arm", sort=False)):
        colour = qualitative.Plotly[i % len(qualitative.Plotly)]
        for seed, s in g.groupby("seed"):
            fig.add_trace(go.Scatter(x=s[x], y=s["accuracy"], mode="lines",
                                     line=dict(color=colour, width=1), opacity=0.3,
                                     name=f"{arm} seed {seed}", showlegend=False))
        mean = g.groupby("step").agg(x=(x, "mean"), accuracy=("accuracy", "mean"),
                                     sd=("accuracy", "std"), n=("accuracy", "size"))
        half = [t95(n) * sd / math.sqrt(n) if n > 1 else 0.0
                for sd, n in zip(mean["sd"].fillna(0.0), mean["n"])]
        xs = mean["x"].tolist()
        fig.add_trace(go.Scatter(
            x=xs + xs[::-1], y=[a + h for a, h in zip(mean["accuracy"], half)]
            + [a - h for a, h in zip(mean["accuracy"], half)][::-1], fill="toself",
            fillcolor=colour, opacity=0.15, line=dict(width=0), hoverinfo="skip",
            showlegend=False, name=f"{arm} 95% band"))
        fig.add_trace(go.Scatter(x=xs, y=mean["accuracy"], mode="lines+markers",
                                 line=dict(color=colour, width=3), name=arm))
    fig.update_layout(title=f"Held-out accuracy against {label} (mean over seeds, 95% band)",
                      xaxis_title=label, yaxis_title="accuracy (Avg@K)", height=480)
    return fig


def variance_figure(summary: pd.DataFrame) -> go.Figure:
    """1 - Var(A)/Var(r) per arm (second half of training), mean over seeds with 95% t CI."""
    fig = go.Figure(go.Bar(
        x=summary["arm"], y=summary["var_reduction"],
        error_y=dict(type="data", symmetric=False,
                     array=summary["var_reduction_hi"] - summary["var_reduction"],
                     arrayminus=summary["var_reduction"] - summary["var_reduction_lo"])))
    fig.add_hline(y=0.3, line_dash="dash", line_color="#888",
                  annotation_text="POISE paper: about 0.3 after the first phase")
    fig.update_layout(title="Variance-reduction ratio 1 - Var(A)/Var(r), 95% CI over seeds",
                      yaxis_title="1 - Var(A)/Var(r)", height=420)
    return fig
