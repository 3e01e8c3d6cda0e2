"""One step's rollouts: sample prompts, generate K completions each with the engine, score them."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from poise_probe.advantages import filter_groups, overlong_reward_shaping
from poise_probe.config import Config
from poise_probe.data import Prompt, PromptStream
from poise_probe.generation import encode_prompts
from poise_probe.rollout.base import RolloutEngine
from poise_probe.state import derive_seed


@dataclass
class Rollouts:
    """One step's batch, flat over rollouts; `group_ids` index the prompt of each rollout."""

    prompts: list[Prompt]
    prompt_ids: list[list[int]]           # per prompt
    response_ids: list[list[int]]         # per rollout
    texts: list[str]
    truncated: list[bool]
    group_ids: torch.Tensor               # (N,)
    rewards: torch.Tensor                 # (N,) what the advantages use (shaped, if DAPO)
    scores: torch.Tensor                  # (N,) the verifier's scores in [0, 1] (probe targets)
    gen_rounds: int = 1
    stats: dict = field(default_factory=dict)
    pad_id: int = 0
    engine_log_probs: list[list[float]] | None = None  # per rollout, the engine's own
    # (N,) bool: the task's answer extractor found an answer (format-valid), for validity
    # masking; None (the default) means every rollout is valid
    valid: torch.Tensor | None = None

    def __post_init__(self):
        if self.valid is None:
            self.valid = torch.ones(len(self.response_ids), dtype=torch.bool)

    @property
    def domains(self) -> list[str]:
        return [self.prompts[g].example.domain for g in self.group_ids.tolist()]

    def engine_log_prob_matrix(self, width: int) -> torch.Tensor | None:
        """(N, width) right-padded engine log-probs, or None when the engine gave none."""
        if self.engine_log_probs is None:
            return None
        out = torch.zeros(len(self.engine_log_probs), width)
        for n, lp in enumerate(self.engine_log_probs):
            out[n, :len(lp)] = torch.tensor(lp[:width], dtype=torch.float32)
        return out


def collect_rollouts(step: int, cfg: Config, engine: RolloutEngine, tokenizer,
                     stream: PromptStream, timing: dict, sampling) -> Rollouts:
    """Generate and score K rollouts for the step's prompts; DAPO drops all-equal groups and
    samples more prompts, for at most `max_gen_rounds` rounds."""
    k = cfg.rollout.num_generations
    want = cfg.rollout.prompts_per_step
    prompts: list[Prompt] = []
    prompt_ids, resp, texts, trunc, rew, sco, lps, val = [], [], [], [], [], [], [], []
    timing["gen"] = timing["reward"] = 0.0
    rounds, dropped, seen_groups, sampled_tokens = 0, 0, 0, 0
    dynamic = cfg.algorithm.dynamic_sampling
    while len(prompts) < want and rounds < (cfg.algorithm.max_gen_rounds if dynamic else 1):
        rounds += 1
        new = stream.next(want - len(prompts) if not dynamic or rounds == 1 else want)
        t = time.perf_counter()
        ids = encode_prompts(tokenizer, [p.example.prompt for p in new])
        comps = engine.generate(ids, k, sampling, seed=derive_seed(cfg.trainer.seed, step, rounds))
        timing["gen"] += time.perf_counter() - t
        sampled_tokens += comps.num_tokens
        t = time.perf_counter()
        score, ok = score_rollouts(new, comps.texts)            # (P_new, K) rewards, validity
        r = score
        if cfg.algorithm.overlong_shaping:
            lengths = torch.tensor([[len(x) for x in row] for row in comps.token_ids])
            r = r + overlong_reward_shaping(lengths, cfg.rollout.max_completion_length,
                                            cfg.algorithm.overlong_buffer_len,
                                            cfg.algorithm.overlong_penalty_factor).float()
        timing["reward"] += time.perf_counter() - t
        seen_groups += len(new)
        keep = torch.ones(len(new), dtype=torch.bool)
        if dynamic:
            g = torch.arange(len(new)).repeat_interleave(k)
            # on the verifier's score, as verl's DAPO: shaping must not make a group "mixed"
            keep = filter_groups(score.reshape(-1), g).reshape(len(new), k)[:, 0]
            dropped += int((~keep).sum())
        for i in torch.nonzero(keep).flatten().tolist():
            if len(prompts) >= want:
                break
            prompts.append(new[i])
            prompt_ids.append(ids[i])
            resp.extend(comps.token_ids[i])
            texts.extend(comps.texts[i])
            trunc.extend(comps.truncated[i])
            rew.append(r[i])
            sco.append(score[i])
            val.append(ok[i])
            lps.extend(comps.log_probs[i] if comps.log_probs is not None else [None] * k)
    if not prompts:
        raise RuntimeError(f"step {step}: every group had equal rewards in "
                           f"{rounds} generation rounds, so DAPO's dynamic sampling kept none; "
                           f"raise algorithm.max_gen_rounds or turn dynamic_sampling off.")
    gids = torch.arange(len(prompts)).repeat_interleave(k)
    rewards = torch.cat(rew).reshape(-1).float()
    scores = torch.cat(sco).reshape(-1).float()
    valid = torch.cat(val).reshape(-1)
    stats = {"batch/gen_rounds": rounds, "batch/prompts": len(prompts),
             "batch/prompts_sampled": seen_groups, "batch/groups_dropped": dropped,
             "batch/valid_frac": float(valid.float().mean()),
             "tokens/sampled": sampled_tokens}     # every round's, dropped groups included
    return Rollouts(prompts, prompt_ids, resp, texts, trunc, gids, rewards, scores, rounds,
                    stats, tokenizer.pad_token_id,
                    None if any(x is None for x in lps) else lps, valid)


def score_rollouts(prompts: list[Prompt], texts: list[list[str]]) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """(P, K) rewards from each prompt's own task verifier (batched per task), and (P, K) bool
    validity: the task's `has_answer` (its answer extractor found an answer; a task that cannot
    tell says True), or a reward > 0, since a rollout the verifier rewarded has an answer."""
    k = len(texts[0])
    rewards = torch.zeros(len(prompts), k)
    valid = torch.zeros(len(prompts), k, dtype=torch.bool)
    by_task: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_task.setdefault(id(p.task), []).append(i)
    for idx in by_task.values():
        task = prompts[idx[0]].task
        examples = [prompts[i].example for i in idx for _ in range(k)]
        flat = list(task.score_many([c for i in idx for c in texts[i]], examples))
        if len(flat) != len(examples):
            raise ValueError(f"task {task.name!r} returned {len(flat)} rewards for "
                             f"{len(examples)} completions; score_many must return one reward "
                             f"per completion. Fix the task's score_many.")
        try:
            values = [float(v) for v in flat]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"task {task.name!r} returned a reward that is not a number "
                             f"({exc}); a verifier must return numbers in [0, 1]. Fix the task's "
                             f"score function.") from None
        scored = torch.tensor(values, dtype=torch.float32)  # checked as stored: 1e39 -> inf
        finite = torch.isfinite(scored)
        if not finite.all():
            bad = int((~finite).nonzero()[0])
            raise ValueError(f"task {task.name!r} returned NaN or inf rewards (reward "
                             f"{values[bad]:g} for prompt {examples[bad].prompt_id}, completion "
                             f"{bad % k}); a verifier must return numbers in [0, 1]. Fix the "
                             f"task's score function.")
        rewards[idx] = scored.reshape(len(idx), k)
        found = [bool(task.has_answer(texts[i][j], prompts[i].example))
                 for i in idx for j in range(k)]
        valid[idx] = torch.tensor(found, dtype=torch.bool).reshape(len(idx), k)
    return rewards, valid | (rewards > 0)
