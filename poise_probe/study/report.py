"""Study directories and the Plotly figures of each analysis.

```
<study>/
  study.json                 {"kind": "poise-probe-study", "dataset": ..., "analyses": {...}}
  sweep/      sweep.parquet|csv, heatmap.json|html[|png]
  ablation/   ablation.parquet|csv, ablation.json|html[|png]
  calibration/ summary, reliability, by_domain, by_length, over_steps tables; reliability figs
  transfer/   matrix.parquet|csv, recovery.parquet|csv, matrix.json|html, recovery.json|html
```
Tables are Parquet (typed) and CSV (for people); figures are Plotly JSON (the dashboard reads
these), standalone HTML, and PNG when a static renderer (kaleido + Chromium) is available.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from poise_probe.rundir import atomic_write_json, atomic_write_text, now_iso

log = logging.getLogger(__name__)

STUDY_KIND = "poise-probe-study"

__all__ = [
    "STUDY_KIND",
    "StudyWriter",
    "ablation_chart",
    "calibration_steps_chart",
    "recovery_chart",
    "reliability_chart",
    "sweep_heatmap",
    "transfer_heatmap",
]


class StudyWriter:
    """Writes tables and figures of analyses into one study directory; keeps study.json current."""

    def __init__(self, root: str | os.PathLike, *, dataset: str | None = None, png: bool = True):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.png = png
        path = self.root / "study.json"
        self.meta: dict[str, Any] = {"kind": STUDY_KIND, "created": now_iso(), "analyses": {}}
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON ({err}); delete it or choose another "
                                 f"--out.") from err
            if old.get("kind") != STUDY_KIND:
                raise ValueError(f"{path} is not a poise-probe study (kind {old.get('kind')!r}); "
                                 f"choose another --out.")
            self.meta.update(old)
        if dataset is not None:
            self.meta["dataset"] = str(dataset)

    def table(self, analysis: str, name: str, frame: pd.DataFrame) -> Path:
        d = self.root / analysis
        d.mkdir(exist_ok=True)
        frame = frame.copy()
        for col in frame.columns:      # categoricals (length buckets) as plain strings
            if isinstance(frame[col].dtype, pd.CategoricalDtype):
                frame[col] = frame[col].astype(str)
        frame.to_parquet(d / f".{name}.parquet.tmp", index=False)
        os.replace(d / f".{name}.parquet.tmp", d / f"{name}.parquet")
        atomic_write_text(d / f"{name}.csv", frame.to_csv(index=False))
        return d / f"{name}.parquet"

    def figure(self, analysis: str, name: str, fig: go.Figure) -> Path:
        d = self.root / analysis
        d.mkdir(exist_ok=True)
        atomic_write_text(d / f"{name}.json", fig.to_json())
        atomic_write_text(d / f"{name}.html", fig.to_html(include_plotlyjs="cdn", full_html=True))
        if self.png:
            try:
                fig.write_image(str(d / f"{name}.png"), width=1000, height=600, scale=1)
            except Exception as err:  # noqa: BLE001 - kaleido or a browser missing: HTML/JSON still written
                log.warning("no PNG for %s/%s (%s); HTML and JSON were written", analysis, name,
                            str(err).splitlines()[0] if str(err) else type(err).__name__)
                self.png = False
        return d / f"{name}.json"

    def record(self, analysis: str, info: Mapping[str, Any]) -> None:
        self.meta["analyses"][analysis] = {"updated": now_iso(), **_plain(info)}
        atomic_write_json(self.root / "study.json", self.meta)


def _plain(obj):
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return obj


# -- figures ---------------------------------------------------------------------------------

def sweep_heatmap(table: pd.DataFrame, metric: str = "pearson_avg_k") -> go.Figure:
    """Layer x window heatmap of `metric`, one panel per reasoning pooling."""
    pools = list(dict.fromkeys(table["pooling"]))
    fig = make_subplots(rows=1, cols=len(pools), subplot_titles=pools, shared_yaxes=True)
    lo, hi = float(table[metric].min()), float(table[metric].max())
    for j, pooling in enumerate(pools, start=1):
        part = table[table["pooling"] == pooling].pivot(index="layer", columns="window",
                                                        values=metric)
        fig.add_trace(go.Heatmap(
            z=part.to_numpy(), x=[str(c) for c in part.columns], y=[str(i) for i in part.index],
            zmin=lo, zmax=hi, colorscale="Viridis", showscale=j == len(pools),
            text=np.round(part.to_numpy(), 3), texttemplate="%{text}",
            hovertemplate="layer %{y}, window %{x}: %{z:.3f}<extra></extra>"), row=1, col=j)
        fig.update_xaxes(title_text="window n (tokens)", row=1, col=j)
    fig.update_yaxes(title_text="layer (0-based block)", row=1, col=1)
    fig.update_layout(title=f"Probe quality by layer and pooling window ({metric}, grouped CV)",
                      height=450)
    return fig


def ablation_chart(table: pd.DataFrame) -> go.Figure:
    """MAE and Pearson r of each input set against Avg@K, beside the paper's Qwen3-4B values."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("MAE vs Avg@K (lower is better)",
                                                        "Pearson r vs Avg@K"))
    t = table[table["feature_set"] != "constant"]
    for col, (ours, paper) in enumerate((("mae_avg_k", "paper_mae"),
                                         ("pearson_avg_k", "paper_pearson")), start=1):
        fig.add_trace(go.Bar(x=t["feature_set"], y=t[ours], name="this capture",
                             marker_color="#1f77b4", showlegend=col == 1), row=1, col=col)
        fig.add_trace(go.Bar(x=t["feature_set"], y=t[paper], name="paper (Qwen3-4B)",
                             marker_color="#bbbbbb", showlegend=col == 1), row=1, col=col)
    const = table[table["feature_set"] == "constant"]
    if len(const):
        fig.add_hline(y=float(const["mae_avg_k"].iloc[0]), line_dash="dot", row=1, col=1,
                      annotation_text="constant baseline")
    fig.update_layout(barmode="group", title="Input ablation (same folds)", height=420)
    return fig


def reliability_chart(reliability: pd.DataFrame, strategy: str = "quantile") -> go.Figure:
    """Reliability diagram (mean reward per bin against mean prediction, 95% CI) per method."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect",
                             line={"dash": "dash", "color": "grey"}))
    part = reliability[reliability["strategy"] == strategy]
    for method, rows in part.groupby("method", sort=False):
        fig.add_trace(go.Scatter(
            x=rows["mean_pred"], y=rows["mean_outcome"], mode="lines+markers", name=method,
            error_y={"type": "data", "symmetric": False,
                     "array": rows["ci_high"] - rows["mean_outcome"],
                     "arrayminus": rows["mean_outcome"] - rows["ci_low"]},
            customdata=rows["n"], hovertemplate="pred %{x:.3f} → reward %{y:.3f} "
                                                "(n=%{customdata})<extra>" + method + "</extra>"))
    label = "equal-mass" if strategy == "quantile" else "equal-width"
    fig.update_layout(title=f"Reliability diagram ({label} bins, out-of-fold)",
                      xaxis_title="predicted value b̂", yaxis_title="observed mean reward",
                      xaxis_range=[0, 1], yaxis_range=[0, 1], height=500)
    return fig


def transfer_heatmap(matrix: pd.DataFrame, metric: str = "pearson_avg_k",
                     feature_set: str = "full") -> go.Figure:
    part = matrix[matrix["feature_set"] == feature_set].pivot(index="source", columns="target",
                                                              values=metric)
    fig = go.Figure(go.Heatmap(z=part.to_numpy(), x=list(part.columns), y=list(part.index),
                               colorscale="RdBu" if "pearson" in metric else "Viridis_r",
                               text=np.round(part.to_numpy(), 3), texttemplate="%{text}",
                               hovertemplate="fit on %{y}, evaluate on %{x}: %{z:.3f}"
                                             "<extra></extra>"))
    fig.update_layout(title=f"Transfer: {metric} ({feature_set} input; diagonal = in-domain "
                            f"grouped CV)", xaxis_title="evaluated on", yaxis_title="fitted on",
                      height=450)
    return fig


def recovery_chart(recovery: pd.DataFrame, metric: str = "mae") -> go.Figure:
    """Test-half `metric` against target prompts used, per method; one panel per pair."""
    pairs = list(dict.fromkeys(zip(recovery["source"], recovery["target"])))
    cols = min(3, len(pairs))
    nrows = -(-len(pairs) // cols)
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=[f"{a} → {b}" for a, b in pairs])
    colors = {"source only": "#7f7f7f", "recalibrate": "#1f77b4",
              "refit source+target": "#2ca02c", "target only": "#d62728"}
    for i, (a, b) in enumerate(pairs):
        r, c = i // cols + 1, i % cols + 1
        part = recovery[(recovery["source"] == a) & (recovery["target"] == b)]
        agg = part.groupby(["method", "target_prompts"], as_index=False)[metric].mean()
        for method, rows in agg.groupby("method", sort=False):
            fig.add_trace(go.Scatter(x=rows["target_prompts"], y=rows[metric], mode="lines+markers",
                                     name=method, legendgroup=method, showlegend=i == 0,
                                     line={"color": colors.get(method)}), row=r, col=c)
        ceiling = float(part[f"in_domain_{metric}"].mean())
        fig.add_hline(y=ceiling, line_dash="dot", row=r, col=c)
        fig.update_xaxes(title_text="target-domain prompts", row=r, col=c)
    fig.update_layout(title=f"Recovering in-domain {metric} (dotted) with target-domain data",
                      height=330 * nrows)
    return fig


def calibration_steps_chart(table: pd.DataFrame) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("ECE (equal-mass)", "explained variance"))
    fig.add_trace(go.Scatter(x=table["step_start"], y=table["ece_quantile"], mode="lines+markers",
                             name="ECE"), row=1, col=1)
    fig.add_trace(go.Scatter(x=table["step_start"], y=table["explained_var"],
                             mode="lines+markers", name="EV"), row=1, col=2)
    fig.update_xaxes(title_text="training step (window start)")
    fig.update_layout(title="Online probe calibration over training", height=400)
    return fig
