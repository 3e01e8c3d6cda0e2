"""Plotly figures of `poise ablate`: held-out accuracy against generated tokens, and the
variance-reduction ratio per arm with 95% intervals over seeds."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

__all__ = ["accuracy_figure", "variance_figure"]


def accuracy_figure(curves: pd.DataFrame) -> go.Figure:
    """Mean held-out accuracy over seeds against cumulative generated tokens, one line per arm,
    with each seed's curve faint behind it."""
    fig = go.Figure()
    if curves.empty:
        return fig.update_layout(title="no held-out evaluations in these runs")
    for i, (arm, g) in enumerate(curves.groupby("arm", sort=False)):
        colour = qualitative.Plotly[i % len(qualitative.Plotly)]
        for seed, s in g.groupby("seed"):
            fig.add_trace(go.Scatter(x=s["tokens"], y=s["accuracy"], mode="lines",
                                     line=dict(color=colour, width=1), opacity=0.3,
                                     name=f"{arm} seed {seed}", showlegend=False))
        mean = g.groupby("step").agg(tokens=("tokens", "mean"), accuracy=("accuracy", "mean"))
        fig.add_trace(go.Scatter(x=mean["tokens"], y=mean["accuracy"], mode="lines+markers",
                                 line=dict(color=colour, width=3), name=arm))
    fig.update_layout(title="Held-out accuracy against generated tokens (mean over seeds)",
                      xaxis_title="generated tokens", yaxis_title="accuracy (Avg@K)", height=480)
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
