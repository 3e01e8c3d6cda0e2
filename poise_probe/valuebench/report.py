"""Scores of the value benchmark: MAE and Pearson r with cluster-bootstrap intervals, SVEB's
Monte-Carlo noise rows, the published reference rows, and the Plotly figures."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from poise_probe import stats
from poise_probe.study.metrics import bootstrap_ci
from poise_probe.valuebench.data import noise_reference

__all__ = ["PAPER_ROWS", "score_table", "mae_figure", "scatter_figure"]

#: Published value-estimation figures to read the tables beside (MAE, Pearson r): POISE.md
#: (Qwen3-4B, DAPO-Math, prompt level, target Avg@8) and RELATED.md A.5 (SVEB-Math, state level,
#: Qwen2.5-1.5B-Instruct, target MCS@20; r not reported).
PAPER_ROWS = [
    {"level": "prompt", "estimator": "paper: POISE probe", "mae": 0.141, "pearson": 0.870},
    {"level": "prompt", "estimator": "paper: PPO critic", "mae": 0.262, "pearson": 0.676},
    {"level": "state", "estimator": "paper: GRPO@40 (SVEB-Math)", "mae": 0.208},
    {"level": "state", "estimator": "paper: PPO-N@40 (SVEB-Math)", "mae": 0.187},
    {"level": "state", "estimator": "paper: Hista@40 (SVEB-Math)", "mae": 0.145},
    {"level": "state", "estimator": "paper: Numca@40 (SVEB-Math)", "mae": 0.194},
    {"level": "state", "estimator": "paper: MCS@1 (SVEB-Math)", "mae": 0.235},
    {"level": "state", "estimator": "paper: MCS@2 (SVEB-Math)", "mae": 0.160},
]


def _mae(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.abs(p - y)))


def _row(level: str, name: str, pred: np.ndarray, target: np.ndarray, n_boot: int,
         seed: int) -> dict:
    keep = np.isfinite(pred)
    p, y = pred[keep], target[keep]
    groups = np.arange(len(p))                    # one row per prompt: resample prompts
    row = {"level": level, "estimator": name, "n": int(len(p)), "mae": _mae(p, y),
           "pearson": stats.pearson(p, y)}
    if len(p) >= 2:
        row["mae_lo"], row["mae_hi"] = bootstrap_ci(_mae, p, y, groups, n_boot=n_boot, seed=seed)
        row["pearson_lo"], row["pearson_hi"] = bootstrap_ci(stats.pearson, p, y, groups,
                                                            n_boot=n_boot, seed=seed)
    return row


def score_table(values: dict[str, dict[str, np.ndarray]], targets: dict[str, np.ndarray],
                mc: dict[str, np.ndarray], *, n_boot: int = 500, seed: int = 0) -> pd.DataFrame:
    """One row per (level, estimator): n, MAE, Pearson r and 95% bootstrap intervals, then the
    MCS@1 / MCS@2 noise rows of each level and the published rows (`PAPER_ROWS`).

    values: {level: {estimator: (n,) values}}; targets: {level: (n,) MC means};
    mc: {level: (n, M) MC rewards}.
    """
    rows = []
    for level, by_name in values.items():
        y = targets[level]
        for name, pred in by_name.items():
            if np.isfinite(pred).any():
                rows.append(_row(level, name, np.asarray(pred, float), y, n_boot, seed))
        for n in (1, 2):
            if mc[level].shape[1] > n:
                ref = noise_reference(mc[level], n, seed=seed)
                rows.append(_row(level, f"MCS@{n} (noise)", ref, y, n_boot, seed))
    rows.extend(PAPER_ROWS)
    cols = ["level", "estimator", "n", "mae", "mae_lo", "mae_hi", "pearson", "pearson_lo",
            "pearson_hi"]
    return pd.DataFrame(rows).reindex(columns=cols).astype({"n": "Int64"})


def mae_figure(table: pd.DataFrame) -> go.Figure:
    """MAE with 95% intervals per estimator, one panel per level; published rows hollow."""
    levels = [lv for lv in ("prompt", "state") if (table["level"] == lv).any()]
    fig = make_subplots(rows=1, cols=len(levels), subplot_titles=[f"{lv} level" for lv in levels],
                        shared_yaxes=False)
    for i, level in enumerate(levels, start=1):
        t = table[table["level"] == level]
        ours = t[~t["estimator"].str.startswith("paper")]
        fig.add_trace(go.Bar(
            x=ours["mae"], y=ours["estimator"], orientation="h", name=f"{level}: this run",
            marker_color="#1f77b4", showlegend=i == 1,
            error_x=dict(type="data", symmetric=False, array=ours["mae_hi"] - ours["mae"],
                         arrayminus=ours["mae"] - ours["mae_lo"])), row=1, col=i)
        paper = t[t["estimator"].str.startswith("paper")]
        fig.add_trace(go.Bar(x=paper["mae"], y=paper["estimator"], orientation="h",
                             name="published", marker=dict(color="rgba(0,0,0,0)",
                                                           line=dict(color="#888", width=1.5)),
                             showlegend=i == 1), row=1, col=i)
        fig.update_xaxes(title_text="MAE to the Monte-Carlo value (lower is better)", row=1,
                         col=i)
    fig.update_layout(title="Value estimation on held-out prompts and states", height=520,
                      barmode="overlay", margin=dict(l=10, r=10, t=60, b=40))
    return fig


def scatter_figure(values: dict[str, np.ndarray], target: np.ndarray, level: str) -> go.Figure:
    """Estimated against Monte-Carlo value, one trace per estimator, with the diagonal."""
    fig = go.Figure()
    for name, pred in values.items():
        keep = np.isfinite(pred)
        if keep.any():
            fig.add_trace(go.Scatter(x=target[keep], y=np.asarray(pred)[keep], mode="markers",
                                     name=name, opacity=0.7))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="y = x",
                             line=dict(color="#999", dash="dash")))
    fig.update_layout(title=f"{level} level: estimate vs Monte-Carlo value",
                      xaxis_title="Monte-Carlo value", yaxis_title="estimate", height=480)
    return fig
