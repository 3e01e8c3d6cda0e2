"""Children of the mechanism search: mutation and crossover of genes, and the proposal step
that picks parents by the acquisition rule and keeps only children the config accepts and the
archive has not seen. Programmatic throughout: no language model proposes anything."""
from __future__ import annotations

import numpy as np

from poise_probe.search.acquisition import Node, Weights, select_parents
from poise_probe.search.space import GENES, Gene, check

__all__ = ["crossover", "mutate", "propose", "random_candidate"]


def mutate(genes: dict, space: tuple[Gene, ...], rng: np.random.Generator,
           n_changes: int = 1) -> dict:
    """`genes` with `n_changes` genes set to another of their values."""
    child = dict(genes)
    for i in rng.choice(len(space), size=min(n_changes, len(space)), replace=False):
        gene = space[int(i)]
        others = [v for v in gene.values if v != genes.get(gene.name)]
        if others:
            child[gene.name] = others[int(rng.integers(len(others)))]
    return child


def crossover(a: dict, b: dict, space: tuple[Gene, ...], rng: np.random.Generator) -> dict:
    """Each gene from `a` or `b` with equal odds (uniform crossover)."""
    return {g.name: (a if rng.random() < 0.5 else b).get(g.name) for g in space}


def random_candidate(space: tuple[Gene, ...], rng: np.random.Generator) -> dict:
    return {g.name: g.values[int(rng.integers(len(g.values)))] for g in space}


def propose(nodes: list[Node], seen, base: list[str], rng: np.random.Generator, *,
            space: tuple[Gene, ...] = GENES, weights: Weights = Weights(),
            p_crossover: float = 0.3, tries: int = 200) -> tuple[dict, list[int], str]:
    """(genes, parents, op) of a new valid, unseen child. Parents come from the acquisition
    rule's top three (a random one of them, the best twice as likely); with two or more nodes a
    crossover of two of them with probability `p_crossover`, else a mutation of one or two
    genes. Falls back to a random valid candidate (op "seed") when no child is new.
    `seen(genes)` says whether the archive already holds a configuration."""
    top = select_parents(nodes, 3, weights) if nodes else []
    odds = np.array([2.0] + [1.0] * (len(top) - 1))[:len(top)]
    for _ in range(tries):
        if not top:
            break
        if len(top) >= 2 and rng.random() < p_crossover:
            i, j = rng.choice(len(top), size=2, replace=False, p=odds / odds.sum())
            pa, pb = top[int(i)], top[int(j)]
            genes = crossover(_genes(nodes, pa), _genes(nodes, pb), space, rng)
            parents, op = [pa, pb], "crossover"
        else:
            pa = top[int(rng.choice(len(top), p=odds / odds.sum()))]
            genes = mutate(_genes(nodes, pa), space, rng, n_changes=int(rng.integers(1, 3)))
            parents, op = [pa], "mutation"
        if not seen(genes) and check(genes, base, space) is None:
            return genes, parents, op
    for _ in range(tries):
        genes = random_candidate(space, rng)
        if not seen(genes) and check(genes, base, space) is None:
            return genes, [], "seed"
    raise RuntimeError(f"no new valid configuration found in {2 * tries} tries; the space "
                       f"({len(space)} genes) is exhausted or the base recipe refuses it.")


def _genes(nodes: list[Node], node_id: int) -> dict:
    return next(n.genes for n in nodes if n.id == node_id)
