"""Mechanism search over the trainer's configurations (in the spirit of seed 003's discovery
loop, with a programmatic proposer): `space` (the genes), `archive` (trials and lineage),
`acquisition` (the parent-selection rule), `operators` (mutation, crossover, proposals),
`loop` (`run_search`, the `poise search` command) and `figures` (the family tree)."""
from poise_probe.search.acquisition import Node, Weights, acquisition, select_parents
from poise_probe.search.archive import Archive, Trial
from poise_probe.search.loop import run_search, summarise
from poise_probe.search.space import GENES, Gene

__all__ = ["GENES", "Archive", "Gene", "Node", "Trial", "Weights", "acquisition",
           "run_search", "select_parents", "summarise"]
