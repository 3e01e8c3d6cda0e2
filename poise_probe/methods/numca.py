"""Numca: numerical credit assignment, a training-free state-value baseline (RELATED.md A.2.4).

The abstract state of a response prefix is the *set* of numbers it has written so far. A per-prompt
table counts, for every such state, how many of the prompt's rollouts passed through it and
their summed final rewards; V(state) = reward_sum / count, 0 for a state never seen. The
response is cut into segments at the tokens where new numbers appear, and each segment gets a
GAE (gamma = 1) over the chain of state values that ends in the rollout's own reward.

What the official code does, and this module keeps (`rl/utils/numca_dict.py`):
- milestones are digit runs only (`\\d+`: "3.5" gives "3" and "5"), and the last one (the final
  answer) is dropped;
- the table is keyed by prompt, lives for the whole run, and is updated with a step's whole
  group *before* that group's advantages are computed, so it includes the rollout's own path;
- milestones closer than `merge_distance` tokens merge right to left into the later one; a
  number seen before adds no state; milestones landing on one position collapse to the last.
"""
from __future__ import annotations

import bisect
import logging
import re
from typing import Iterable, Sequence

import numpy as np
import torch

from poise_probe.advantages import AdvantageResult
from poise_probe.methods.segments import segment_gae
from poise_probe.records import token_pieces
from poise_probe.value_methods import StepContext, ValueMethod, register_value_method

logger = logging.getLogger(__name__)

__all__ = ["MILESTONE", "Numca", "Table", "build_table", "list_prefix_states", "lookup_value",
           "merge_close_positions", "numca_token_advantages", "offsets_to_token_positions",
           "parse_milestones", "segment_gae", "update_table", "walk_segments"]

#: a milestone: a run of decimal digits (the official pattern; decimals and fractions split)
MILESTONE = re.compile(r"\d+")

#: state (frozenset of number strings) -> [count, reward_sum]
Table = dict[frozenset, list]

SCALE_EPS = 1e-4  # TRL's GRPO: A / (std_group(r) + 1e-4)


# ---------------------------------------------------------------------------------------------
# Pure pieces: parsing, the state table, merging, the segment GAE, offsets -> tokens
# ---------------------------------------------------------------------------------------------

def parse_milestones(text: str) -> tuple[list[str], list[int]]:
    """The completion's digit runs but the last (its final answer), with their start offsets.

    Returns (numbers, char offsets). "We have 12 apples and 3.5 pears, so 15.5" ->
    (["12", "3", "5", "15"], [8, 22, 24, 36]). RELATED.md A.2.4 step 1, test vector T7.
    """
    matches = list(MILESTONE.finditer(text))[:-1]
    return [m.group(0) for m in matches], [m.start() for m in matches]


def list_prefix_states(numbers: Iterable[str]) -> list[frozenset]:
    """The abstract states a response passes: {}, {n1}, {n1, n2}, ... over its unique numbers
    in first-appearance order; a repeated number adds no state. [5, 3, 5] -> [{}, {5}, {3, 5}]."""
    seen: set[str] = set()
    states = [frozenset()]
    for n in numbers:
        if n not in seen:
            seen.add(n)
            states.append(frozenset(seen))
    return states


def update_table(table: Table, numbers: Iterable[str], reward: float) -> None:
    """Add one rollout to its prompt's table in place: every state it passes gets count += 1 and
    reward_sum += reward (once per state, however often a number repeats). A.2.4 step 2."""
    for s in list_prefix_states(numbers):
        entry = table.setdefault(s, [0, 0.0])
        entry[0] += 1
        entry[1] += float(reward)


def build_table(rollouts: Iterable[tuple[Sequence[str], float]]) -> Table:
    """A fresh table from (numbers, reward) pairs; the same set reached in any order is one
    state. Test vector T8."""
    table: Table = {}
    for numbers, reward in rollouts:
        update_table(table, numbers, reward)
    return table


def lookup_value(table: Table, state: Iterable[str]) -> float:
    """V(state) = reward_sum / count over the rollouts that passed it; 0 for an unseen state
    (the official code's choice, not the group mean)."""
    entry = table.get(frozenset(state))
    if not entry or entry[0] == 0:
        return 0.0
    return entry[1] / entry[0]


def merge_close_positions(positions: Sequence[int], merge_distance: int) -> list[int]:
    """Right to left: a milestone closer than `merge_distance` to the next moves onto it
    (pos[i] = pos[i+1] when pos[i+1] - pos[i] < merge_distance), comparing with pos[i+1] after
    it moved. [10, 40, 100] with 50 -> [40, 40, 100]; [0, 20, 40, 60] with 25 -> [20, 20, 60,
    60]. A.2.4 step 3."""
    out = list(positions)
    for i in range(len(out) - 2, -1, -1):
        if out[i + 1] - out[i] < merge_distance:
            out[i] = out[i + 1]
    return out


def walk_segments(numbers: Sequence[str], positions: Sequence[int], length: int, table: Table,
                   reward: float) -> tuple[list[tuple[int, int]], list[float]]:
    """The response's segments [b_j, b_{j+1}) and the value chain [V_0, ..., V_{n-1}, end].

    `positions` (already merged) are where each number's state begins, in tokens; a repeated
    number is skipped, states on one position collapse to the last, positions are clamped to
    [0, length]. V_j is the value of the state at segment j's start; `end` is the rollout's
    reward, or, when a milestone lands on the response's end (no tail), that state's value, as
    the official walk does. Empty lists for an empty response. A.2.4 step 4.
    """
    grouped: list[tuple[int, frozenset]] = []
    seen: set[str] = set()
    for number, pos in zip(numbers, positions):
        if number in seen:
            continue
        seen.add(number)
        state = frozenset(seen)
        if grouped and grouped[-1][0] == pos:
            grouped[-1] = (pos, state)
        else:
            grouped.append((pos, state))
    segments: list[tuple[int, int]] = []
    values: list[float] = []
    current, last, end = frozenset(), 0, float(reward)
    for pos, nxt in grouped:
        pos = max(0, min(pos, length))
        if pos > last:
            segments.append((last, pos))
            values.append(lookup_value(table, current))
            end = lookup_value(table, nxt)       # what this segment's delta ends in
            last = pos
        current = nxt
    if length > last:
        segments.append((last, length))
        values.append(lookup_value(table, current))
        end = float(reward)
    return segments, (values + [end] if segments else [])


def numca_token_advantages(numbers: Sequence[str], positions: Sequence[int], length: int,
                     table: Table, reward: float, lam: float,
                     merge_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """One rollout's per-token advantages and state values, both (length,), unscaled.

    Merges the milestone positions (tokens), walks the states, runs the segment GAE and
    broadcasts each segment's advantage and start value V_j over its tokens. With lam = 1,
    A + V = r on every token (unless a milestone lands on the end). T9.
    """
    merged = merge_close_positions(positions, merge_distance)
    segments, values = walk_segments(numbers, merged, length, table, reward)
    adv, base = np.zeros(length), np.zeros(length)
    for (b0, b1), a, v in zip(segments, segment_gae(values, lam), values):
        adv[b0:b1], base[b0:b1] = a, v
    return adv, base


def offsets_to_token_positions(offsets: Sequence[int], pieces: Sequence[str]) -> list[int]:
    """Character offsets -> token positions as the official trainer maps them: the first token
    whose char-end > offset, plus 1, so the token that starts a number still belongs to the
    segment before it. `pieces` are the tokens' text pieces (`records.token_pieces`), joining to
    the completion; an offset at or past its end maps to the response's length."""
    ends = np.cumsum([len(p) for p in pieces]).tolist()                # (L,) non-decreasing
    return [min(bisect.bisect_right(ends, c) + 1, len(ends)) for c in offsets]


# ---------------------------------------------------------------------------------------------
# The value method
# ---------------------------------------------------------------------------------------------

@register_value_method("numca")
class Numca(ValueMethod):
    """Numca as a stateful estimator: token-level advantages from a per-prompt number-state table.

    Per step, in the official code's order: (1) every rollout of the batch enters its prompt's
    table (keyed by `Example.prompt_id`, kept for the whole run), so a rollout's own path is in
    its values; (2) each rollout gets segment advantages (`numca_token_advantages`); (3) they are
    divided by the group's reward std (unbiased) + 1e-4 when `numca.scale_rewards=group`.
    The table is therefore updated in `advantages`, not `update` (which only reports it).
    Returns (N, T) advantages and baselines V_j per token (zero beyond each response) and the
    (N, T) scale; with gae_lambda = 1, A * scale + b = r on every response token.
    """

    token_level = True
    hidden_states_wanted = False

    def __init__(self, cfg, model=None, tokenizer=None, device=None):
        del model, device   # training-free: the table is all it needs
        self.cfg = cfg.numca
        self.tokenizer = tokenizer
        self.tables: dict[str, Table] = {}
        self._stats: dict[str, float] = {}

    def advantages(self, ctx: StepContext) -> AdvantageResult:
        batch, c = ctx.batch, self.cfg
        rewards = ctx.rewards.detach().double().cpu()                      # (N,)
        gids = ctx.group_ids.cpu()
        keys = [batch.prompts[g].example.prompt_id for g in gids.tolist()]
        group_scale = self._scale(rewards, gids)      # (N,) checked before the table changes
        parsed = [parse_milestones(t) for t in batch.texts]
        for key, (numbers, _), r in zip(keys, parsed, rewards.tolist()):   # (1) table first
            update_table(self.tables.setdefault(key, {}), numbers, r)
        n, width = ctx.mask.shape
        adv = torch.zeros(n, width, dtype=torch.float64)                   # (N, T)
        base = torch.zeros(n, width, dtype=torch.float64)                  # (N, T)
        n_segments = []
        for i, ((numbers, offsets), ids) in enumerate(zip(parsed, batch.response_ids)):
            length = len(ids)
            positions = self._token_positions(i, ids, batch.texts[i], offsets)
            a, b = numca_token_advantages(numbers, positions, length, self.tables[keys[i]],
                                          float(rewards[i]), c.gae_lambda, c.merge_distance)
            adv[i, :length], base[i, :length] = torch.from_numpy(a), torch.from_numpy(b)
            merged = merge_close_positions(positions, c.merge_distance)
            n_segments.append(len(walk_segments(numbers, merged, length, {}, 0.0)[0]))
        scale = group_scale[:, None].expand(n, width).clone()                # (N, T)
        adv = adv / scale
        self._stats = {"numca/milestones_mean": float(np.mean([len(p[0]) for p in parsed])),
                       "numca/segments_mean": float(np.mean(n_segments))}
        dtype = ctx.rewards.dtype
        return AdvantageResult(adv.to(dtype), base.to(dtype), scale.to(dtype))

    def update(self, ctx: StepContext) -> dict[str, float]:
        """Nothing left to learn (the table took this batch before its advantages); metrics."""
        return {**self._stats, "numca/prompts": float(len(self.tables)),
                "numca/states": float(sum(len(t) for t in self.tables.values()))}

    def state_dict(self) -> dict:
        """{"tables": {prompt_id: [[sorted numbers], count, reward_sum], ...}}: plain Python."""
        return {"tables": {key: [[sorted(s), e[0], e[1]] for s, e in table.items()]
                           for key, table in self.tables.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"tables"}:
            raise ValueError(f"numca's state must be {{'tables': ...}} (from Numca.state_dict); "
                             f"got keys {sorted(state)}. Resume with the estimator that wrote "
                             f"the checkpoint.")
        self.tables = {key: {frozenset(s): [int(cnt), float(total)] for s, cnt, total in rows}
                       for key, rows in state["tables"].items()}

    def _token_positions(self, i: int, ids: list[int], text: str,
                         offsets: list[int]) -> list[int]:
        """Milestone char offsets -> token positions in rollout i's response."""
        if not offsets:
            return []
        pieces = token_pieces(self.tokenizer, ids, text)
        if pieces is None:
            raise ValueError(f"numca: rollout {i}'s token pieces do not join to its completion "
                             f"text, so milestone offsets cannot be mapped to tokens; the "
                             f"engine's text must be decode(ids, skip_special_tokens=True).")
        return offsets_to_token_positions(offsets, pieces)

    def _scale(self, rewards: torch.Tensor, gids: torch.Tensor) -> torch.Tensor:
        """(N,) the group's unbiased reward std + 1e-4 (TRL), or ones for scale_rewards=none."""
        if self.cfg.scale_rewards == "none":
            return torch.ones_like(rewards)
        uniq, inverse, counts = torch.unique(gids, return_inverse=True, return_counts=True)
        if bool((counts < 2).any()):
            raise ValueError(f"numca.scale_rewards=group divides by the group's reward std and "
                             f"needs >= 2 rollouts per prompt; group {int(uniq[counts < 2][0])} "
                             f"has 1. Set rollout.num_generations >= 2 or "
                             f"numca.scale_rewards=none.")
        std = torch.stack([rewards[inverse == g].std(unbiased=True) for g in range(len(uniq))])
        return std[inverse] + SCALE_EPS
