"""What a step leaves behind: its metrics and its rollout table (docs/run-format.md).

The rollout table is self-describing: besides the text it stores each token's id and the text
piece it adds to the completion (exact for any tokenizer, BPE included), the think/answer
spans the features used, the probe's target, the trainer's and the engine's log-probs, and
per-token advantages when the estimator produced them. Readers (the dashboard, probe studies)
never re-derive these from the text.
"""
from __future__ import annotations

import numpy as np
import torch

from poise_probe.advantages import AdvantageResult
from poise_probe.diagnostics import advantage_diagnostics, probe_diagnostics
from poise_probe.features import TagIds, response_spans
from poise_probe.probe import ProbeBank, loo_targets
from poise_probe.rollout.collect import Rollouts


def probe_targets(batch: Rollouts) -> np.ndarray:
    """(N,) the probe's target per rollout: its siblings' mean score; NaN if it has none."""
    try:
        return loo_targets(batch.scores.numpy(), batch.group_ids.numpy())
    except ValueError:  # a lone rollout has no siblings, so no target
        return np.full(len(batch.response_ids), np.nan)


def sequence_baselines(adv: AdvantageResult, seq_adv: torch.Tensor,
                       rewards: torch.Tensor) -> torch.Tensor:
    """(N,) baselines: the estimator's, or r - mean token advantage for token-level ones."""
    return rewards - seq_adv if adv.token_level else adv.baselines


def step_metrics(batch: Rollouts, adv: AdvantageResult, seq_adv: torch.Tensor, preds, fitted,
                 raw, used, entropies, targets, num_generations: int) -> dict:
    """Reward, probe, advantage and token statistics of one step (slash-grouped names).

    `seq_adv` (N,) are the per-rollout advantages (token-level ones averaged per rollout);
    `targets` (N,) the probe's targets (`probe_targets`); `num_generations` the rollouts per
    prompt (K).
    """
    r = batch.rewards
    g = batch.group_ids
    m: dict = {"reward/mean": float(r.mean()), "reward/std": float(r.std(unbiased=False)),
               "reward/score_mean": float(batch.scores.mean())}
    grouped = r.reshape(-1, num_generations)
    m["batch/frac_reward_zero_std"] = float((grouped.max(1).values == grouped.min(1).values)
                                            .float().mean())
    for d in sorted(set(batch.domains)):
        sel = torch.tensor([x == d for x in batch.domains])
        m[f"reward/{d}/mean"] = float(r[sel].mean())
    lens = torch.tensor([len(x) for x in batch.response_ids], dtype=torch.float32)
    m["tokens/generated"] = int(lens.sum())
    m["tokens/response_len_mean"] = float(lens.mean())
    m["response/truncated_frac"] = float(np.mean(batch.truncated))
    m["response/entropy_mean"] = float(entropies.sum() / max(lens.sum(), 1))
    m.update(batch.stats)
    m["probe/used_frac"] = float(used.float().mean())
    if fitted.any():  # the probe predicts the verifier's score, not a shaped reward
        s = batch.scores.numpy()
        m.update(probe_diagnostics(preds[fitted], targets[fitted], s[fitted],
                                   g.numpy()[fitted], raw_preds=raw[fitted]))
    baselines = sequence_baselines(adv, seq_adv, r)
    scale = adv.scale if not adv.token_level else torch.ones_like(r)
    m.update(advantage_diagnostics(seq_adv.numpy(), baselines.numpy(), r.numpy(),
                                   scale=scale.numpy()))
    return m


def rollout_table(step, batch: Rollouts, preds, adv: AdvantageResult, seq_adv, entropies,
                  log_probs, targets, tokenizer, tags: TagIds, reasoning_window: int) -> dict:
    """Columns of `rollouts/step_XXXXXX.parquet` (see docs/run-format.md).

    `entropies` and `log_probs` are the old-policy pass's (N, T) tensors, right-padded;
    `log_probs` (stored as `token_logprobs`) is each sampled token's log-prob under the policy
    that sampled it, temperature-scaled: the very tensor the PPO ratio divides by.
    """
    k = len(batch.response_ids) // len(batch.prompts)
    rows_g = batch.group_ids.tolist()
    n = len(rows_g)
    lens = [len(x) for x in batch.response_ids]
    lp = log_probs.detach().float().cpu().numpy()
    spans = [response_spans(ids, tags, reasoning_window) for ids in batch.response_ids]
    token_adv = None
    if adv.token_level:
        ta = adv.advantages.detach().float().cpu().numpy()
        token_adv = [ta[i, :lens[i]].astype(np.float32) for i in range(n)]
    eng = batch.engine_log_probs
    return {
        "step": [step] * n,
        "prompt_id": [batch.prompts[g].example.prompt_id for g in rows_g],
        "group_id": rows_g,
        "task": [batch.prompts[g].task.name for g in rows_g],
        "domain": batch.domains,
        "data_source": [batch.prompts[g].example.data_source for g in rows_g],
        "rollout_idx": [i % k for i in range(n)],
        "prompt": [_prompt_text(batch.prompts[g].example.prompt) for g in rows_g],
        "completion": batch.texts,
        "ground_truth": [str(batch.prompts[g].example.ground_truth) for g in rows_g],
        "reward": batch.rewards.tolist(),
        "score": batch.scores.tolist(),
        "probe_pred": [float(x) for x in preds],
        "probe_target": np.asarray(targets, dtype=np.float64).tolist(),
        "baseline": sequence_baselines(adv, seq_adv, batch.rewards).tolist(),
        "advantage": seq_adv.tolist(),
        "token_entropies": [entropies[i, :lens[i]].tolist() for i in range(n)],
        "num_tokens": lens,
        "truncated": list(batch.truncated),
        # exact ids, so probe studies can re-run the forward on what the policy saw
        "prompt_token_ids": [batch.prompt_ids[g] for g in rows_g],
        "token_ids": [list(ids) for ids in batch.response_ids],
        "token_pieces": [token_pieces(tokenizer, ids, text)
                         for ids, text in zip(batch.response_ids, batch.texts)],
        "reasoning_span": [list(sp.reasoning) for sp in spans],
        "answer_span": [list(sp.answer) for sp in spans],
        "pooled_span": [list(sp.reasoning_vec) for sp in spans],
        # float32 numpy arrays, so pyarrow stores list<float32>
        "token_logprobs": [lp[i, :lens[i]].astype(np.float32) for i in range(n)],
        "engine_logprobs": [None] * n if eng is None
        else [np.asarray(x, dtype=np.float32) for x in eng],
        "token_advantages": [None] * n if token_adv is None else token_adv,
    }


def token_pieces(tokenizer, ids: list[int], text: str | None = None) -> list[str] | None:
    """The text each token adds to `decode(ids, skip_special_tokens=True)`, joined == that text.

    Incremental detokenization as vLLM does it: decode a few tokens back from the last emitted
    piece, emit what is new once it no longer ends in an incomplete UTF-8 character (a byte-level
    BPE token may carry part of one: it gets "" and the token completing it gets the character).
    Skipped special tokens get "". None if the pieces cannot reproduce `text` (an odd decoder).
    """
    def dec(part):
        return tokenizer.decode(part, skip_special_tokens=True)

    text = dec(ids) if text is None else text
    pieces: list[str] = []
    prefix, read = 0, 0                        # decode(ids[prefix:read]) ends what is emitted
    for i in range(len(ids)):
        before = dec(ids[prefix:read])
        now = dec(ids[prefix:i + 1])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            pieces.append(now[len(before):])
            prefix, read = read, i + 1
        else:                                  # nothing visible yet, or half a character
            pieces.append("")
    if _close(pieces, text):
        return pieces
    # exact but quadratic fallback: each piece is what the full prefix adds
    pieces, done = [], ""
    for i in range(len(ids)):
        now = dec(ids[:i + 1])
        if now.endswith("\ufffd") or not now.startswith(done):
            pieces.append("")
            continue
        pieces.append(now[len(done):])
        done = now
    return pieces if _close(pieces, text) else None


def _close(pieces: list[str], text: str) -> bool:
    """Give the last token what is still held back (a completion cut inside a character ends in
    U+FFFD); True when the pieces then join to `text`."""
    joined = "".join(pieces)
    if pieces and len(joined) < len(text) and text.startswith(joined):
        pieces[-1] += text[len(joined):]
        joined = text
    return joined == text


def probe_snapshot(bank: ProbeBank) -> dict[str, dict[str, np.ndarray]]:
    """The fitted probes' arrays per bucket (coefficients, scaler, PCA), for safetensors."""
    return {bucket: probe.to_arrays() for bucket, probe in bank.probes.items()
            if probe is not None}


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(
        f"{m['role']}: {m['content']}" for m in prompt)
