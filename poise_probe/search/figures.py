"""The mechanism search's family tree: lineage depths, a layout and the Plotly figure, built
from the archive's trials as dicts (`asdict(Trial)`, or archive.json read back). One home for
the tree: the search's study folder and the dashboard's Search page both draw it from here."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

__all__ = ["TreeLayout", "best_trial", "family_tree_figure", "gene_diff", "lineage_depths",
           "ranked", "run_name", "seed_scores", "tree_layout", "tree_trials"]

UNSCORED = "#b0b0b0"


def run_name(trial_id: int) -> str:
    """The trial's run folder name under `<search>/trials/`: t + the id on four digits."""
    return f"t{int(trial_id):04d}"


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def seed_scores(trials: list[dict]) -> dict[int, list[float]]:
    """{trial id: [its score, then its repeats' scores]} for every scored non-repeat trial."""
    out = {t["id"]: [float(t["score"])] for t in trials
           if t.get("repeat_of") is None and _num(t.get("score"))}
    for t in trials:
        if t.get("repeat_of") in out and _num(t.get("score")):
            out[t["repeat_of"]].append(float(t["score"]))
    return out


def ranked(trials: list[dict]) -> list[dict]:
    """Scored non-repeat trials, best first: by the mean over their seeds (their own score and
    their repeats'), then more seeds, then the older trial."""
    scores, by_id = seed_scores(trials), {t["id"]: t for t in trials}
    order = sorted(scores, key=lambda i: (-float(np.mean(scores[i])), -len(scores[i]), i))
    return [by_id[i] for i in order]


def best_trial(trials: list[dict]) -> dict | None:
    """The first of `ranked`: the best mean over seeds."""
    order = ranked(trials)
    return order[0] if order else None


def tree_trials(trials: list[dict]) -> list[dict]:
    """The nodes of the family tree: every trial that is not a repeat, by id."""
    return sorted((t for t in trials if t.get("repeat_of") is None), key=lambda t: t["id"])


def lineage_depths(trials: list[dict]) -> dict[int, int]:
    """Depth of each non-repeat trial: 0 for a trial without (known) parents, else 1 + the
    largest depth of its parents. Unknown parents are ignored; a cycle is cut (depth 0)."""
    nodes = {t["id"]: t for t in tree_trials(trials)}
    depth: dict[int, int] = {}
    visiting: set[int] = set()

    def of(i: int) -> int:
        if i in depth:
            return depth[i]
        if i in visiting:  # a malformed archive: parents that loop
            return -1
        visiting.add(i)
        parents = [p for p in nodes[i]["parents"] if p in nodes and p != i]
        d = 1 + max((of(p) for p in parents), default=-1)
        visiting.discard(i)
        depth[i] = max(d, 0)
        return depth[i]

    for i in nodes:
        of(i)
    return depth


@dataclass
class TreeLayout:
    """Node coordinates (x = depth, y = spread within the depth) and parent -> child edges."""

    nodes: pd.DataFrame   # id, x, y, depth, op, state, score, parents
    edges: pd.DataFrame   # parent, child, op, x0, y0, x1, y1


def tree_layout(trials: list[dict]) -> TreeLayout:
    """Coordinates of the family tree. Within a depth, nodes are spaced 1 apart and centred on
    0; depth 0 is ordered by id, a deeper depth by the mean y of the parents (then id), which
    keeps children near their parents and edges short."""
    nodes = tree_trials(trials)
    depth = lineage_depths(trials)
    ys: dict[int, float] = {}
    for d in sorted(set(depth.values())):
        level = [t for t in nodes if depth[t["id"]] == d]

        def key(t: dict) -> tuple[float, int]:
            parents = [ys[p] for p in t["parents"] if p in ys]
            return (float(np.mean(parents)) if parents else -math.inf, t["id"])

        level.sort(key=key)
        for i, t in enumerate(level):
            ys[t["id"]] = i - (len(level) - 1) / 2
    node_rows = [{"id": t["id"], "x": depth[t["id"]], "y": ys[t["id"]],
                  "depth": depth[t["id"]], "op": t["op"], "state": t["state"],
                  "score": t["score"], "parents": list(t["parents"])} for t in nodes]
    edge_rows = [{"parent": p, "child": t["id"], "op": t["op"],
                  "x0": depth[p], "y0": ys[p], "x1": depth[t["id"]], "y1": ys[t["id"]]}
                 for t in nodes for p in dict.fromkeys(t["parents"]) if p in ys and p != t["id"]]
    return TreeLayout(
        pd.DataFrame(node_rows, columns=["id", "x", "y", "depth", "op", "state", "score",
                                         "parents"]),
        pd.DataFrame(edge_rows, columns=["parent", "child", "op", "x0", "y0", "x1", "y1"]))


def gene_diff(genes: dict, reference: dict) -> dict:
    """The genes whose value differs from `reference` (those missing there included)."""
    return {k: v for k, v in genes.items() if k not in reference or reference[k] != v}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _hover(t: dict, first: dict | None) -> str:
    lines = [f"<b>{run_name(t['id'])}</b> · {t['op']}"
             + (f" of {', '.join(run_name(p) for p in t['parents'])}" if t["parents"] else "")]
    lines.append(f"score {t['score']:.4f}" if t["score"] is not None else f"state {t['state']}")
    diff = gene_diff(t["genes"], first["genes"]) if first is not None else t["genes"]
    if first is None or t["id"] == first["id"]:
        lines.append("genes: " + (", ".join(f"{k}={_fmt(v)}" for k, v in t["genes"].items())
                                  or "—"))
    else:
        lines.append(f"vs {run_name(first['id'])}: "
                     + (", ".join(f"{k}={_fmt(v)}" for k, v in diff.items()) or "same genes"))
    if t.get("tokens") is not None:
        lines.append(f"tokens {t['tokens']:,}" if isinstance(t["tokens"], int)
                     else f"tokens {t['tokens']}")
    if t.get("error"):
        lines.append("error: " + str(t["error"])[:120])
    return "<br>".join(lines)


def family_tree_figure(trials: list[dict], title: str = "family tree") -> go.Figure:
    """One node per non-repeat trial at (lineage depth, spread), coloured by score (grey when
    unscored: failed, pending, running), an edge from each parent to its child (crossover edges
    dashed), the best trial drawn as a star."""
    layout = tree_layout(trials)
    by_id = {t["id"]: t for t in trials}
    first = min(trials, key=lambda t: t["id"]) if trials else None
    best = best_trial(trials)
    fig = go.Figure()
    for op, dash, name in (("crossover", "dot", "crossover edge"), (None, "solid", "edge")):
        edges = layout.edges[(layout.edges["op"] == op) if op else
                             (layout.edges["op"] != "crossover")]
        if not len(edges):
            continue
        xs, ys = [], []
        for e in edges.itertuples():
            xs += [e.x0, e.x1, None]
            ys += [e.y0, e.y1, None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=name, hoverinfo="skip",
                                 line={"color": "#9aa0a6", "width": 1.2, "dash": dash},
                                 showlegend=False))
    nodes = layout.nodes
    scored = nodes[nodes["score"].notna()] if len(nodes) else nodes
    unscored = nodes[nodes["score"].isna()] if len(nodes) else nodes
    if len(unscored):
        fig.add_trace(go.Scatter(
            x=unscored["x"], y=unscored["y"], mode="markers+text", name="unscored",
            text=[str(i) for i in unscored["id"]], textposition="top center",
            marker={"color": UNSCORED, "size": 12, "line": {"width": 1, "color": "#666"},
                    "symbol": ["x" if s == "failed" else "circle-open" if s != "done"
                               else "circle" for s in unscored["state"]]},
            hovertext=[_hover(by_id[i], first) for i in unscored["id"]], hoverinfo="text",
            showlegend=False))
    if len(scored):
        best_id = best["id"] if best else None
        fig.add_trace(go.Scatter(
            x=scored["x"], y=scored["y"], mode="markers+text", name="trials",
            text=[str(i) for i in scored["id"]], textposition="top center",
            marker={"color": scored["score"].astype(float), "colorscale": "Viridis",
                    "size": [22 if i == best_id else 13 for i in scored["id"]],
                    "symbol": ["star" if i == best_id else "circle" for i in scored["id"]],
                    "line": {"width": [2 if i == best_id else 1 for i in scored["id"]],
                             "color": ["#d62728" if i == best_id else "#444"
                                       for i in scored["id"]]},
                    "colorbar": {"title": {"text": "score"}}, "showscale": True},
            hovertext=[_hover(by_id[i], first) for i in scored["id"]], hoverinfo="text",
            showlegend=False))
    if best is not None:
        row = nodes[nodes["id"] == best["id"]].iloc[0]
        fig.add_annotation(x=row["x"], y=row["y"], text=f"best {run_name(best['id'])}",
                           showarrow=True, arrowhead=0, ay=-34, ax=0,
                           font={"color": "#d62728"})
    depth_max = int(nodes["x"].max()) if len(nodes) else 0
    fig.update_layout(
        title=title, height=max(360, 60 * (nodes.groupby("x").size().max() if len(nodes)
                                            else 1) + 160),
        margin={"l": 30, "r": 30, "t": 60, "b": 40}, hovermode="closest",
        xaxis={"title": {"text": "lineage depth"}, "dtick": 1, "zeroline": False,
               "range": [-0.5, depth_max + 0.5]},
        yaxis={"visible": False, "zeroline": False})
    return fig
