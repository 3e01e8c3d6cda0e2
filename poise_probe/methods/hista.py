"""Hista: state values from the policy's own last-layer hidden states (arXiv 2605.29782).

A prefix of a rollout is represented by the EMA-smoothed, subsampled last-layer states of its
prompt + response tokens. Its value is the inverse-MinDistance-weighted kNN average of the final
rewards of the prompt group's prefixes ("nodes"). A segment GAE over the chain
[group mean reward, V at each online node, own reward] gives one advantage per token segment,
then TRL's group-std scaling. The pure functions below follow RELATED.md A.2.2-A.2.3 and the
official code (`steps_selection`, `compute_distances_for_nodes_fast`,
`calculate_weighted_distance_for_nodes`, `calculate_GAE_advantages`); docs/methods/hista.md
lists the official code's quirks this port keeps behind flags.

Memory: distances are computed per query rollout against at most `pool_chunk` pool rollouts at
a time, so the peak is about 40 B x pool_chunk x (L/W)^2 (L the longest prompt + response in
the group, W the mean window), never the (sum_i L_i / W)^2 matrix of the whole group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from poise_probe.advantages import AdvantageResult
from poise_probe.methods.segments import segment_gae
from poise_probe.value_methods import StepContext, ValueMethod, register_value_method

__all__ = ["Hista", "GroupRollout", "boundaries", "broadcast_segments", "ema", "k_schedule",
           "knn_values", "min_distance", "own_prefix_allowed", "prefix_min_distances",
           "segment_gae", "state_values"]

EMA_BLOCK = 64     # positions per block of the EMA scan (a (64, 64) matrix per block)
TINY_WEIGHT = 1e-8  # below this total kNN weight the official code returns V = 0


# ---------------------------------------------------------------------------------------------
# State representation (A.2.2)
# ---------------------------------------------------------------------------------------------

def ema(h: Tensor, alpha: float, init: str = "first") -> Tensor:
    """Bias-corrected EMA over positions: out_k = e_k / (1 - alpha^(k+1)); (..., S, H) -> same.

    init="first" is the official code (e_0 = h_0, so out_0 = h_0 / (1 - alpha): the first
    positions are over-scaled); init="zero" is the textbook EMA (e_-1 = 0). The scan runs in
    blocks of EMA_BLOCK positions, each a product with the lower-triangular matrix
    (1 - alpha) alpha^(t-u), so it needs no Python loop over single positions and no powers
    above 1. RELATED.md A.2.2 step 2, test vector T5.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must lie in [0, 1) (the bias correction divides by "
                         f"1 - alpha^(k+1)); got {alpha}.")
    if init not in ("first", "zero"):
        raise ValueError(f"init must be 'first' (official code) or 'zero'; got {init!r}.")
    s = h.shape[-2]
    if s == 0:
        return h.clone()
    t = torch.arange(EMA_BLOCK, dtype=torch.float64)
    lag = t[:, None] - t[None, :]
    mix = torch.where(lag >= 0, (1 - alpha) * alpha ** lag.clamp_min(0), torch.zeros(()))
    mix = mix.to(h.dtype)                                                # (B, B)
    carry = (alpha ** (t + 1)).to(h.dtype)                              # (B,)
    prev = h[..., 0, :] if init == "first" else torch.zeros_like(h[..., 0, :])
    blocks = []
    for start in range(0, s, EMA_BLOCK):
        hb = h[..., start:start + EMA_BLOCK, :]
        n = hb.shape[-2]
        e = mix[:n, :n] @ hb + carry[:n, None] * prev[..., None, :]      # (..., n, H)
        blocks.append(e)
        prev = e[..., -1, :]
    k = torch.arange(1, s + 1, dtype=torch.float64)
    correction = (1 - alpha ** k).to(h.dtype)                           # (S,)
    return torch.cat(blocks, dim=-2) / correction[:, None]


def boundaries(prompt_len: int, total_len: int, m: int, w: int
               ) -> tuple[list[int], list[int], list[int]]:
    """State boundaries, their representation indices and the online nodes' prefix lengths.

    Positions count from the first prompt token. The grid 0, m, 2m, ... strictly below
    end = total_len - 1, plus end; keep the points > prompt_len - m and overwrite the first kept
    with prompt_len. Boundary b's node is the representation prefix E[0 : b // w + 1]; the
    online nodes are the interior boundaries. RELATED.md A.2.2 step 4, test vector T6:
    (120, 300, 50, 5) -> [120, 150, 200, 250, 299], [24, 30, 40, 50, 59], [31, 41, 51].
    """
    if prompt_len < 1 or total_len <= prompt_len:
        raise ValueError(f"boundaries need prompt_len >= 1 and at least one response token; got "
                         f"prompt_len={prompt_len}, total_len={total_len}.")
    if m < 1 or w < 1:
        raise ValueError(f"min_interval and mean_window must be >= 1; got m={m}, W={w}.")
    end = total_len - 1
    grid = list(range(0, end, m)) + [end]
    kept = [b for b in grid if b > prompt_len - m]   # never empty: end >= prompt_len
    kept[0] = prompt_len
    rep = [b // w for b in kept]
    return kept, rep, [r + 1 for r in rep[1:-1]]


# ---------------------------------------------------------------------------------------------
# MinDistance and the weighted average (A.2.3)
# ---------------------------------------------------------------------------------------------

def _prefix_sums(d: Tensor) -> tuple[Tensor, Tensor]:
    """From distances d (..., Lx, Ly): rows[a-1, b-1] = sum_{i<a} min_{j<b} d[i, j] and
    cols[a-1, b-1] = sum_{j<b} min_{i<a} d[i, j], for every prefix pair at once."""
    rows = torch.cummin(d, dim=-1).values.cumsum(dim=-2)
    cols = torch.cummin(d, dim=-2).values.cumsum(dim=-1)
    return rows, cols


def _pick(rows: Tensor, cols: Tensor, x_lens: Tensor, y_lens: Tensor, normalised: bool) -> Tensor:
    """(A, B) MinDistance of prefixes x[:a], y[:b] from `_prefix_sums` of one pair: the longer
    prefix's positions are matched into the shorter; ties go to x (the query), as in the code."""
    a, b = x_lens[:, None], y_lens[None, :]
    by_rows = rows[a - 1, b - 1]
    by_cols = cols[a - 1, b - 1]
    longer_x = a >= b
    if normalised:
        by_rows = by_rows / a.to(rows.dtype)
        by_cols = by_cols / b.to(rows.dtype)
    return torch.where(longer_x, by_rows, by_cols)


def prefix_min_distances(x: Tensor, y: Tensor, x_lens, y_lens,
                         distance: str = "normalised") -> Tensor:
    """MinDistance between x[:a] and y[:b] for every a in x_lens, b in y_lens; (A, B) float32.

    MD = sum over the longer prefix's positions of the L2 distance to the nearest position of
    the shorter one: distance="sum" is the paper's, "normalised" (the official code) divides by
    the longer length. One cdist, then cummin + cumsum give all prefix pairs. x (Lx, H),
    y (Ly, H). RELATED.md A.2.3, test vector T1.
    """
    if distance not in ("normalised", "sum"):
        raise ValueError(f"distance must be 'normalised' (official code) or 'sum' (paper); "
                         f"got {distance!r}.")
    xl = torch.as_tensor(x_lens, dtype=torch.long).reshape(-1)
    yl = torch.as_tensor(y_lens, dtype=torch.long).reshape(-1)
    for name, lens, seq in (("x_lens", xl, x), ("y_lens", yl, y)):
        if lens.numel() and (int(lens.min()) < 1 or int(lens.max()) > seq.shape[0]):
            raise ValueError(f"{name} must lie in [1, {seq.shape[0]}]; got {lens.tolist()}.")
    if xl.numel() == 0 or yl.numel() == 0:
        return torch.zeros(xl.numel(), yl.numel())
    d = torch.cdist(x[:int(xl.max())].float(), y[:int(yl.max())].float())
    rows, cols = _prefix_sums(d)
    return _pick(rows, cols, xl, yl, distance == "normalised")


def min_distance(x1: Tensor, x2: Tensor, distance: str = "normalised") -> float:
    """MinDistance of two whole sequences (L1, H), (L2, H); symmetric when L1 != L2 (T1)."""
    return float(prefix_min_distances(x1, x2, [x1.shape[0]], [x2.shape[0]], distance)[0, 0])


def own_prefix_allowed(query_lens, node_lens, exclude_self: bool = False) -> Tensor:
    """(Q, M) bool: which of its own rollout's nodes may enter a query node's pool.

    The official code keeps the rollout's own prefixes no longer than the query (the identical
    prefix included: distance 0, clamped to min_d), so its own reward enters its own baseline;
    exclude_self leaves all of them out. Other rollouts' nodes are always allowed.
    """
    q = torch.as_tensor(query_lens, dtype=torch.long).reshape(-1, 1)
    n = torch.as_tensor(node_lens, dtype=torch.long).reshape(1, -1)
    allowed = n <= q
    return torch.zeros_like(allowed) if exclude_self else allowed


def k_schedule(n_online: int, max_k: int, min_k: int) -> list[int]:
    """Neighbours per online node q: max_k - ((max_k - min_k) // n_online) q (T3)."""
    if n_online == 0:
        return []
    step = (max_k - min_k) // n_online
    return [max_k - step * q for q in range(n_online)]


def _knn_weights(distances: Tensor, ks, min_d: float) -> Tensor:
    """(Q, M) weights 1/d on each row's k nearest nodes (NaN = +inf, d >= min_d), else 0.

    A stable sort breaks ties at the k-th distance towards the earlier node (torch.topk in the
    official code leaves them unspecified; with min_d clamping, ties are common).
    """
    d = torch.nan_to_num(distances.float(), nan=float("inf"), posinf=float("inf"))
    d = d.clamp_min(min_d)
    order = torch.sort(d, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(d.shape[-1]).expand_as(order))
    k = torch.as_tensor(ks, dtype=torch.long).reshape(-1, 1)
    return torch.where(rank < k, 1.0 / d, torch.zeros(()))


def knn_values(distances: Tensor, rewards: Tensor, ks, min_d: float) -> Tensor:
    """V = sum w r / sum w over each row's k nearest nodes, w = 1 / max(d, min_d); 0 when
    sum w < 1e-8. distances (Q, M), rewards (M,), ks (Q,) -> (Q,). RELATED.md A.2.3, T2."""
    return _weighted_mean(_knn_weights(distances, ks, min_d), rewards)


def _weighted_mean(w: Tensor, rewards: Tensor) -> Tensor:
    """(Q,) sum w r / sum w per row of w (Q, M); 0 where sum w < 1e-8 (the official code)."""
    total = w.sum(-1)
    v = (w * rewards.float()).sum(-1) / total.clamp_min(TINY_WEIGHT)
    return torch.where(total < TINY_WEIGHT, torch.zeros(()), v)


@dataclass
class GroupRollout:
    """One rollout of a prompt group as Hista sees it."""

    reps: Tensor            # (ceil(S / W), H) representation sequence E
    node_lens: list[int]    # prefix length b // W + 1 of each boundary's node
    reward: float


def _query_distances(q: int, group: list[GroupRollout], normalised: bool, exclude_self: bool,
                     pool_chunk: int) -> Tensor:
    """(Q, M) MinDistance from rollout q's online nodes to all M nodes of the group (rollout
    order, then boundary order); +inf where the own-rollout rule leaves a node out. Pool
    rollouts are padded and stacked `pool_chunk` at a time: memory O(pool_chunk (L/W)^2)."""
    query = group[q]
    qlens = torch.tensor(query.node_lens[1:-1], dtype=torch.long)
    x = query.reps[:int(qlens.max())].float()
    cols_out = []
    for start in range(0, len(group), pool_chunk):
        chunk = group[start:start + pool_chunk]
        width = max(int(max(g.node_lens)) for g in chunk)
        ys = torch.zeros(len(chunk), width, x.shape[1])
        for i, g in enumerate(chunk):
            n = min(width, g.reps.shape[0])
            ys[i, :n] = g.reps[:n].float()
        rows, cols = _prefix_sums(torch.cdist(x[None].expand(len(chunk), -1, -1), ys))
        for i, g in enumerate(chunk):
            nl = torch.tensor(g.node_lens, dtype=torch.long)
            md = _pick(rows[i], cols[i], qlens, nl, normalised)
            if start + i == q:
                md = md.masked_fill(~own_prefix_allowed(qlens, nl, exclude_self), float("inf"))
            cols_out.append(md)
    return torch.cat(cols_out, dim=1)


def state_values(group: list[GroupRollout], *, min_d: float, max_k: int, min_k: int,
                 distance: str = "normalised", exclude_self: bool = False,
                 pool_chunk: int = 8) -> tuple[list[Tensor], list[Tensor]]:
    """V-hat at every rollout's online nodes, and the share of that kNN weight on its own nodes.

    The pool of a query is every node (all boundaries) of every rollout of the prompt group,
    with the own-rollout rule (`own_prefix_allowed`). Returns, per rollout, V (Q_i,) and
    self_share (Q_i,). RELATED.md A.2.3 ("Candidate nodes", "Weighting").
    """
    if distance not in ("normalised", "sum"):
        raise ValueError(f"distance must be 'normalised' or 'sum'; got {distance!r}.")
    for i, g in enumerate(group):
        if not g.node_lens or min(g.node_lens) < 1 or max(g.node_lens) > g.reps.shape[0]:
            raise ValueError(f"rollout {i}'s node lengths must lie in [1, {g.reps.shape[0]}] "
                             f"(its representation length); got {g.node_lens}.")
    rewards = torch.tensor([g.reward for g in group for _ in g.node_lens], dtype=torch.float32)
    owner = torch.tensor([i for i, g in enumerate(group) for _ in g.node_lens])
    values, shares = [], []
    for q, g in enumerate(group):
        n_online = len(g.node_lens) - 2
        if n_online <= 0:
            values.append(torch.zeros(0))
            shares.append(torch.zeros(0))
            continue
        d = _query_distances(q, group, distance == "normalised", exclude_self, pool_chunk)
        ks = k_schedule(n_online, max_k, min_k)
        w = _knn_weights(d, ks, min_d)
        values.append(_weighted_mean(w, rewards))
        shares.append(w[:, owner == q].sum(-1) / w.sum(-1).clamp_min(TINY_WEIGHT))
    return values, shares


# ---------------------------------------------------------------------------------------------
# Segment advantages (A.2.1)
# ---------------------------------------------------------------------------------------------

def broadcast_segments(seg: Tensor, bounds: list[int], response_len: int, fill: float,
                       zero_last_token: bool = True) -> Tensor:
    """Per response token (R,) the value of its segment: token at position p in [b_j, b_{j+1})
    gets seg[j]; bounds from `boundaries` (bounds[0] = prompt length, bounds[-1] = last token).

    The official code's segments end at the last token's position, so that token gets `fill`
    (advantage 0) unless zero_last_token=False, which extends the last segment over it.
    seg has len(bounds) - 1 entries (one when bounds is a single point). RELATED.md A.2.2, T6.
    """
    edges = list(bounds) if len(bounds) >= 2 else [bounds[0], bounds[0]]
    if seg.shape[0] != len(edges) - 1:
        raise ValueError(f"need one value per segment ({len(edges) - 1}); got {seg.shape[0]}.")
    if not zero_last_token:
        edges[-1] += 1
    pos = torch.arange(response_len) + bounds[0]                       # (R,)
    idx = torch.searchsorted(torch.tensor(edges), pos, right=True) - 1
    table = torch.cat([seg, torch.full((1,), fill, dtype=seg.dtype)])
    return table[idx.clamp(0, len(edges) - 1)]


# ---------------------------------------------------------------------------------------------
# The value method
# ---------------------------------------------------------------------------------------------

@register_value_method("hista")
class Hista(ValueMethod):
    """Hista's segment advantages, (N, T) over response tokens; stateless across steps.

    Per prompt group: values = [group mean reward (incl. self)] + [V-hat at each online node] +
    [own reward]; A = segment GAE (`hista.gae_lambda`), broadcast over the segments, divided
    by the group's reward std (unbiased, as TRL) + 1e-4 when `hista.scale_rewards=group`.
    Baselines (N, T) hold the value at each token's segment start, so A * scale + b = r at
    lambda = 1; the zero-filled last token and the padding hold A = 0, b = r.
    """

    token_level = True
    hidden_states_wanted = True

    def __init__(self, cfg, model=None, tokenizer=None, device=None):
        del model, tokenizer, device  # training-free: reads the old-policy pass's states
        if cfg.rollout.num_generations < 2:
            raise ValueError(f"rollout.num_generations must be >= 2 for hista (the kNN pool and "
                             f"the group std need siblings); got {cfg.rollout.num_generations}.")
        self.cfg = cfg.hista
        self._metrics: dict[str, float] = {}

    def advantages(self, ctx: StepContext) -> AdvantageResult:
        c = self.cfg
        n, width = ctx.mask.shape
        if ctx.hidden is None or len(ctx.hidden) != n:
            got = None if ctx.hidden is None else len(ctx.hidden)
            raise ValueError(f"hista needs the last-layer states of all {n} rollouts "
                             f"(ctx.hidden, hidden_states_wanted=True); got {got}.")
        rewards = ctx.rewards.float()                                      # (N,)
        if not bool(torch.isfinite(rewards).all()):
            raise ValueError(f"hista needs finite rewards; got {rewards.tolist()}.")
        resp_lens = ctx.mask.sum(-1).long().tolist()
        adv = torch.zeros(n, width)
        base = rewards[:, None].expand(n, width).clone()
        scale = torch.ones(n, width)
        nodes, gaps, shares = [], [], []
        for g in torch.unique(ctx.group_ids).tolist():
            rows = (ctx.group_ids == g).nonzero().flatten().tolist()
            if len(rows) < 2:
                raise ValueError(f"hista needs >= 2 rollouts per prompt; group {g} has "
                                 f"{len(rows)}.")
            r = rewards[rows]
            mean = float(r.mean())
            std = float(r.std()) if c.scale_rewards == "group" else None  # unbiased, as TRL
            live = [i for i in rows if resp_lens[i] > 0]  # an empty response has no token
            group, bounds = [], []
            for i in live:
                s = ctx.hidden[i].shape[0]
                b, rep, _ = boundaries(s - resp_lens[i], s, c.min_interval, c.mean_window)
                e = ema(ctx.hidden[i].float(), c.alpha, c.ema_init)[::c.mean_window]
                group.append(GroupRollout(e, [x + 1 for x in rep], float(rewards[i])))
                bounds.append(b)
            values, share = state_values(group, min_d=c.min_d, max_k=c.max_k, min_k=c.min_k,
                                         distance=c.distance, exclude_self=c.exclude_self,
                                         pool_chunk=c.pool_chunk)
            for j, i in enumerate(live):
                chain = torch.cat([torch.tensor([mean]), values[j],
                                   torch.tensor([float(rewards[i])])])
                seg = torch.as_tensor(segment_gae(chain.tolist(), c.gae_lambda),
                                      dtype=chain.dtype)
                ln = resp_lens[i]
                adv[i, :ln] = broadcast_segments(seg, bounds[j], ln, 0.0, c.zero_last_token)
                base[i, :ln] = broadcast_segments(chain[:-1], bounds[j], ln, float(rewards[i]),
                                                  c.zero_last_token)
                nodes.append(values[j].numel())
                gaps.extend((values[j] - mean).abs().tolist())
                shares.extend(share[j].tolist())
            if std is not None:
                scale[rows] = std + 1e-4
        self._metrics = {"hista/online_nodes_mean": sum(nodes) / max(len(nodes), 1)}
        if gaps:   # how far the state values move from GRPO's group mean, and own-rollout weight
            self._metrics["hista/value_gap_abs_mean"] = sum(gaps) / len(gaps)
            self._metrics["hista/self_weight_share"] = sum(shares) / len(shares)
        return AdvantageResult(adv / scale, base, scale)

    def update(self, ctx: StepContext) -> dict[str, float]:
        """Nothing to learn (training-free); reports this step's node and value statistics."""
        del ctx
        return dict(self._metrics)
