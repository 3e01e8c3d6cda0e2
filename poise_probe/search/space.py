"""The search space: the trainer's configuration fields a mechanism search varies.

A candidate is a dict gene -> value. `overrides(candidate)` turns it into `key=value` config
overrides on top of the search's base recipe; whether a combination is allowed is decided by the
config's own validation (`check`), never by rules repeated here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["GENES", "Gene", "check", "config_of", "describe", "overrides"]

#: rollouts per step held fixed while `rollouts_per_prompt` varies (prompts = this / K)
ROLLOUTS_PER_STEP = 64


@dataclass(frozen=True)
class Gene:
    """One searched field: its name, the values it takes and what it sets."""

    name: str
    values: tuple
    help: str

    def settings(self, value: Any) -> list[str]:
        """The `key=value` overrides this gene sets for `value`."""
        return _SETTERS[self.name](value)


_SETTERS = {
    "estimator": lambda v: [f"algorithm.adv_estimator={v}"],
    "normalisation": lambda v: [f"group.variance={v}"],
    "validity_mask": lambda v: [f"group.validity_mask={str(v).lower()}"],
    "clip_low": lambda v: [f"algorithm.epsilon={v}"],
    "clip_high": lambda v: [f"algorithm.epsilon_high={v}"],
    "ppo_epochs": lambda v: [f"optim.ppo_epochs={v}"],
    "rollouts_per_prompt": lambda k: [f"rollout.num_generations={k}",
                                      f"rollout.prompts_per_step={ROLLOUTS_PER_STEP // k}",
                                      f"optim.mini_batch_prompts={ROLLOUTS_PER_STEP // k}"],
    "probe_layer": lambda v: [f"probe.layer={v}"],
    "probe_alpha": lambda v: [f"probe.alpha={v}"],
    "lr": lambda v: [f"optim.lr={v}"],
}

#: the default space, sized for the bundled tiny reasoner (6 decoder blocks)
GENES: tuple[Gene, ...] = (
    Gene("estimator", ("poise", "grpo", "dr_grpo", "rloo"), "algorithm.adv_estimator"),
    Gene("normalisation", ("empirical", "analytic", "smoothed"),
         "group.variance: GRPO's sample std, analytic-variance (AV) or smoothed scaling"),
    Gene("validity_mask", (False, True), "group.validity_mask: statistics over valid rollouts"),
    Gene("clip_low", (0.1, 0.2, 0.3), "algorithm.epsilon"),
    Gene("clip_high", (0.2, 0.28, 0.4), "algorithm.epsilon_high"),
    Gene("ppo_epochs", (1, 2), "optim.ppo_epochs: passes over each step's batch; the clip "
                               "ranges act only from the second (the first is on-policy)"),
    Gene("rollouts_per_prompt", (2, 4, 8),
         f"rollout.num_generations, with {ROLLOUTS_PER_STEP} rollouts per step"),
    Gene("probe_layer", (1, 2, 3, 4, 5), "probe.layer (POISE's probe and shadow probe)"),
    Gene("probe_alpha", (0.1, 1.0, 10.0, 100.0), "probe.alpha"),
    Gene("lr", (1e-5, 2e-5, 5e-5, 1e-4), "optim.lr"),
)

#: the base recipe's own values, the search's first candidate (the demo recipe with POISE)
BASELINE = {"estimator": "poise", "normalisation": "empirical", "validity_mask": False,
            "clip_low": 0.2, "clip_high": 0.28, "ppo_epochs": 1, "rollouts_per_prompt": 2, "probe_layer": 3,
            "probe_alpha": 10.0, "lr": 5e-5}


def genes_by_name(genes: tuple[Gene, ...] = GENES) -> dict[str, Gene]:
    return {g.name: g for g in genes}


def overrides(candidate: dict, genes: tuple[Gene, ...] = GENES) -> list[str]:
    """The config overrides of `candidate` (genes in the space's order)."""
    by_name = genes_by_name(genes)
    unknown = sorted(set(candidate) - set(by_name))
    if unknown:
        raise ValueError(f"candidate has genes {unknown} that the space lacks; genes: "
                         f"{list(by_name)}.")
    out: list[str] = []
    for gene in genes:
        if gene.name in candidate:
            out += gene.settings(candidate[gene.name])
    return out


def config_of(candidate: dict, base: list[str], genes: tuple[Gene, ...] = GENES):
    """The full `Config` of a candidate: the base recipe overrides, then the candidate's."""
    from poise_probe.config import load_config

    return load_config(None, list(base) + overrides(candidate, genes))


def check(candidate: dict, base: list[str], genes: tuple[Gene, ...] = GENES) -> str | None:
    """None when the config accepts the candidate, else its validation message."""
    try:
        config_of(candidate, base, genes)
    except ValueError as err:
        return str(err)
    return None


def describe(candidate: dict) -> str:
    """A short label: the estimator and what differs from the baseline."""
    diff = [f"{k}={v}" for k, v in candidate.items() if k != "estimator"
            and BASELINE.get(k) != v]
    return candidate.get("estimator", "?") + (f" ({', '.join(diff)})" if diff else "")
