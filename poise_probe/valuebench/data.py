"""The value benchmark's data: rollouts with features, and Monte-Carlo ground truth.

SVEB's protocol (RELATED.md A.2.5) at prompt and state level, on the same rollouts for every
estimator:

- **train**: `n_train` prompts of the tasks' train split, `pool` rollouts each; what the learned
  estimators (probes, critics) are fitted on: the same rollouts for all of them.
- **eval**: `n_eval` prompts of the test split (held out), `pool` rollouts each (what the
  estimators see: the probe's sibling features, the group means, Hista's and Numca's pools), and
  `mc` fresh rollouts per prompt whose mean is the prompt-level target (MCS@mc).
- **states**: per eval prompt, the first pool rollout cut at a token that starts with whitespace,
  chosen uniformly (SVEB cuts at a space character; cutting at a token boundary keeps the prefix
  a token sequence the policy produced), with `mc` continuations of prompt + prefix; their mean
  reward is the state's target.

Features, log-probs and (for Hista) the last-layer states come from the trainer's own
old-policy pass (`poise_probe.update.old_policy_pass`), so the bench sees what training sees.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from poise_probe.data import Prompt
from poise_probe.features import TagIds
from poise_probe.generation import encode_prompts, sample_completions
from poise_probe.records import token_pieces
from poise_probe.rollout.collect import Rollouts, score_rollouts
from poise_probe.state import derive_seed
from poise_probe.tasks import get_task
from poise_probe.update import old_policy_pass

__all__ = ["BenchSet", "States", "build_set", "cut_states", "sample_rollouts"]


@dataclass
class BenchSet:
    """Rollouts of one split with what the estimators read; `pool` rollouts per prompt, rollout
    n of prompt p at row p * pool + n. target / mc: eval only (prompt-level MCS targets)."""

    rollouts: Rollouts
    pool: int
    features: np.ndarray                 # (N, F) the probe's inputs
    hidden: list[torch.Tensor] | None    # per rollout (P + R, H) last-layer states
    pieces: list[list[str]]              # per rollout, the text of each response token
    mc: np.ndarray | None = None         # (P, M) rewards of fresh rollouts per prompt
    states: States | None = None

    @property
    def n_prompts(self) -> int:
        return len(self.rollouts.prompts)

    @property
    def scores(self) -> np.ndarray:
        return self.rollouts.scores.numpy().astype(np.float64)

    @property
    def target(self) -> np.ndarray:
        """(P,) the prompt-level ground truth: the mean of the fresh rollouts' rewards."""
        if self.mc is None:
            raise ValueError("this set has no Monte-Carlo targets (a train set); build it with "
                             "mc > 0.")
        return self.mc.mean(axis=1)


@dataclass
class States:
    """Intermediate states of eval rollouts: one per prompt (its first pool rollout, cut)."""

    prompt: np.ndarray          # (S,) prompt index
    rollout: np.ndarray         # (S,) row of the cut rollout in the set
    cut: np.ndarray             # (S,) response tokens kept in the prefix
    prefix_text: list[str]
    mc: np.ndarray              # (S, M) rewards of the continuations

    @property
    def target(self) -> np.ndarray:
        return self.mc.mean(axis=1)


def _prompts(tasks: list[str], n: int, split: str, seed: int) -> list[Prompt]:
    """n prompts per task (round-robin order, task by task)."""
    out = []
    for name in tasks:
        task = get_task(name)
        out.extend(Prompt(e, task) for e in task.sample(n, seed=seed, split=split))
    return out


def sample_rollouts(model, tokenizer, prompts: list[Prompt], k: int, *, cfg, seed: int
                    ) -> Rollouts:
    """k scored rollouts per prompt, sampled as the trainer samples (rollout.* settings)."""
    ids = encode_prompts(tokenizer, [p.example.prompt for p in prompts])
    comps = sample_completions(model, tokenizer, None, k, prompt_ids=ids,
                               temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                               max_new_tokens=cfg.rollout.max_completion_length,
                               batch_size=cfg.rollout.generation_batch_size, seed=seed)
    score, valid = score_rollouts(prompts, comps.texts)                  # (P, K) each
    flat = score.reshape(-1).float()
    return Rollouts(prompts, ids, [r for row in comps.token_ids for r in row],
                    [t for row in comps.texts for t in row],
                    [t for row in comps.truncated for t in row],
                    torch.arange(len(prompts)).repeat_interleave(k), flat, flat.clone(),
                    pad_id=tokenizer.pad_token_id, valid=valid.reshape(-1))


def build_set(model, tokenizer, tasks: list[str], n: int, *, split: str, pool: int, mc: int,
              cfg, layer: int, device, autocast, seed: int, keep_hidden: bool,
              with_states: bool) -> BenchSet:
    """Sample, score and pass the old-policy forward over one split (see the module doc)."""
    prompts = _prompts(tasks, n, split, derive_seed(seed, "prompts", split))
    roll = sample_rollouts(model, tokenizer, prompts, pool, cfg=cfg,
                           seed=derive_seed(seed, "pool", split))
    fwd = old_policy_pass(model, roll, cfg, TagIds.from_tokenizer(tokenizer), layer, device,
                          autocast, keep_hidden=keep_hidden)
    pieces = [token_pieces(tokenizer, ids, text) or [tokenizer.decode([t]) for t in ids]
              for ids, text in zip(roll.response_ids, roll.texts)]
    out = BenchSet(roll, pool, fwd["features"].numpy(), fwd["hidden"], pieces)
    if mc > 0:
        fresh = sample_rollouts(model, tokenizer, prompts, mc, cfg=cfg,
                                seed=derive_seed(seed, "mc", split))
        out.mc = fresh.scores.numpy().astype(np.float64).reshape(len(prompts), mc)
    if with_states and mc > 0:
        out.states = cut_states(model, tokenizer, out, mc, cfg=cfg, seed=seed)
    return out


def cut_points(pieces: list[str]) -> list[int]:
    """Token positions t (1 <= t < len) whose piece starts with whitespace: the prefix keeps
    tokens [0, t). Empty when the response has none."""
    return [t for t in range(1, len(pieces)) if pieces[t][:1].isspace()]


def cut_states(model, tokenizer, bench: BenchSet, mc: int, *, cfg, seed: int) -> States:
    """Cut each prompt's first pool rollout at a uniformly chosen whitespace token (the middle
    token when there is none) and score `mc` continuations of each prefix."""
    rng = np.random.default_rng(derive_seed(seed, "cuts"))
    roll = bench.rollouts
    rows, cuts, texts, prefixes = [], [], [], []
    for p in range(bench.n_prompts):
        n = p * bench.pool
        resp, pieces = roll.response_ids[n], bench.pieces[n]
        options = cut_points(pieces)
        t = int(rng.choice(options)) if options else max(1, len(resp) // 2)
        t = min(t, max(len(resp) - 1, 0))
        rows.append(n)
        cuts.append(t)
        texts.append("".join(pieces[:t]))
        prefixes.append(roll.prompt_ids[p] + list(resp[:t]))
    left = [max(1, cfg.rollout.max_completion_length - t) for t in cuts]
    mc_rewards = np.zeros((bench.n_prompts, mc))
    # one generation call per distinct budget keeps every continuation inside the rollout length
    for budget in sorted(set(left)):
        idx = [i for i, b in enumerate(left) if b == budget]
        comps = sample_completions(model, tokenizer, None, mc,
                                   prompt_ids=[prefixes[i] for i in idx],
                                   temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                   max_new_tokens=budget, batch_size=cfg.rollout.generation_batch_size,
                                   seed=derive_seed(seed, "continue", budget))
        full = [[texts[i] + c for c in comps.texts[j]] for j, i in enumerate(idx)]
        score, _ = score_rollouts([roll.prompts[i] for i in idx], full)
        mc_rewards[idx] = score.numpy()
    return States(np.arange(bench.n_prompts), np.array(rows), np.array(cuts), texts, mc_rewards)


def noise_reference(mc: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """SVEB's MCS@n rows: the mean of n random draws (without replacement) of each row's mc
    rewards, as an 'estimate' of the row's mean; its error is the Monte-Carlo noise floor."""
    rng = np.random.default_rng(seed)
    m = mc.shape[1]
    if not 1 <= n <= m:
        raise ValueError(f"MCS@{n} needs 1 <= n <= {m} Monte-Carlo rewards per row.")
    picks = np.argsort(rng.random(mc.shape), axis=1)[:, :n]
    return np.take_along_axis(mc, picks, axis=1).mean(axis=1)
