"""The parent-selection rule of the mechanism search: pure functions over the archive's nodes.

A node is an evaluated trial: its id, its parents' ids, its genes and its score y. For node n
among N nodes (docs/search.md gives the rule with a worked example):

    a(n) = w_perf * P(n) + w_div * D(n) + w_gain * (G(n) + beta * sqrt(ln(1 + N) / (1 + c(n))))

- P(n) = (y_n - y_min) / (y_max - y_min): normalised performance (1 for all when equal);
- D(n): the mean, over the other nodes, of the fraction of genes in which they differ from n;
- G(n) = sum over the top-K descendants d of n (by score) of
  gamma^(depth(d) - depth(n) - 1) * (y_d - y_n) / (y_max - y_min): the discounted gain of n's
  lineage (seed 003's "discounted top-K descendant gain"), 0 without descendants;
- c(n): the number of n's children; the square-root term is an upper-confidence bonus that
  favours lineages explored little (seed 003 fits a GP to the gain and takes its UCB; with a
  few dozen trials we use the count-based bound instead).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Node", "Weights", "acquisition", "depths", "descendants", "diversity",
           "lineage_gain", "select_parents"]


@dataclass(frozen=True)
class Node:
    id: int
    parents: tuple[int, ...]
    genes: dict
    score: float


@dataclass(frozen=True)
class Weights:
    perf: float = 1.0
    div: float = 0.5
    gain: float = 0.5
    beta: float = 0.5          # exploration bonus of the lineage term
    top_k: int = 3             # descendants counted in the lineage gain
    gamma: float = 0.7         # discount per generation below the first


def depths(nodes: list[Node]) -> dict[int, int]:
    """0 for a node without parents among `nodes`; a child is 1 + its deepest parent."""
    by_id = {n.id: n for n in nodes}
    memo: dict[int, int] = {}

    def depth(i: int, seen: frozenset = frozenset()) -> int:
        if i in memo:
            return memo[i]
        if i in seen:
            raise ValueError(f"trial {i} is its own ancestor; the archive's lineage is broken.")
        parents = [p for p in by_id[i].parents if p in by_id]
        memo[i] = 0 if not parents else 1 + max(depth(p, seen | {i}) for p in parents)
        return memo[i]

    return {n.id: depth(n.id) for n in nodes}


def descendants(nodes: list[Node], node_id: int) -> list[int]:
    """Every node below `node_id` (children, their children, ...), each once."""
    kids: dict[int, list[int]] = {}
    for n in nodes:
        for p in n.parents:
            kids.setdefault(p, []).append(n.id)
    out, stack = [], list(kids.get(node_id, []))
    while stack:
        i = stack.pop()
        if i not in out:
            out.append(i)
            stack.extend(kids.get(i, []))
    return sorted(out)


def _span(nodes: list[Node]) -> float:
    scores = [n.score for n in nodes]
    return max(scores) - min(scores) if scores else 0.0


def lineage_gain(nodes: list[Node], node_id: int, top_k: int = 3, gamma: float = 0.7) -> float:
    """G(n): the discounted gain of the top-K descendants over n, in units of the score span."""
    span = _span(nodes)
    if span == 0:
        return 0.0
    by_id, d = {n.id: n for n in nodes}, depths(nodes)
    below = sorted(descendants(nodes, node_id), key=lambda i: (-by_id[i].score, i))[:top_k]
    y = by_id[node_id].score
    return sum(gamma ** (d[i] - d[node_id] - 1) * (by_id[i].score - y) for i in below) / span


def diversity(nodes: list[Node], node_id: int) -> float:
    """D(n): mean fraction of genes differing between n and each other node (0 alone)."""
    me = next(n for n in nodes if n.id == node_id)
    others = [n for n in nodes if n.id != node_id]
    if not others:
        return 0.0
    keys = sorted(set(me.genes).union(*(o.genes for o in others)))
    return sum(sum(me.genes.get(k) != o.genes.get(k) for k in keys) / len(keys)
               for o in others) / len(others)


def acquisition(nodes: list[Node], w: Weights = Weights()) -> dict[int, dict[str, float]]:
    """Per node: the terms P, D, G, the bonus and their weighted sum `a`."""
    if not nodes:
        return {}
    lo, span = min(n.score for n in nodes), _span(nodes)
    out = {}
    for n in nodes:
        perf = (n.score - lo) / span if span > 0 else 1.0
        div = diversity(nodes, n.id)
        gain = lineage_gain(nodes, n.id, w.top_k, w.gamma)
        kids = sum(n.id in m.parents for m in nodes)
        bonus = w.beta * math.sqrt(math.log(1 + len(nodes)) / (1 + kids))
        out[n.id] = {"perf": perf, "div": div, "gain": gain, "bonus": bonus,
                     "a": w.perf * perf + w.div * div + w.gain * (gain + bonus)}
    return out


def select_parents(nodes: list[Node], k: int, w: Weights = Weights()) -> list[int]:
    """The `k` nodes of highest acquisition, best first (ties: the older trial)."""
    scores = acquisition(nodes, w)
    return sorted(scores, key=lambda i: (-scores[i]["a"], i))[:k]
