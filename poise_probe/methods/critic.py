"""PPO's learned critic, the baseline POISE replaces: "ppo_critic" here, "ppo_gae" in `critic_gae`.

A critic is the policy's decoder (a deep copy at the start, `critic.init: policy`, or the same
architecture randomly initialised, `random`) under a scalar head Linear(hidden, 1), trained by
its own AdamW. The paper's critic (POISE.md, "Baselines"): "a policy-initialised, prompt-only
scalar head trained with BCE on the last prompt token". It is the cost POISE avoids: a second
policy-sized model with its gradients and AdamW state, a forward for the values and a forward
and backward for its update every step. Both methods log that cost: `critic/params`,
`critic/memory_bytes`, `timing_s/critic_values`, `timing_s/critic_update`.

Order within a step (`value_methods`): `advantages` computes the values with the critic as it
was before this step (no gradient), and only `update` trains it on this batch, so a rollout's
baseline never saw its own reward.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from poise_probe import stats
from poise_probe.advantages import AdvantageResult, rloo_advantage
from poise_probe.features import PackedBatch, pack_rollouts
from poise_probe.state import derive_seed
from poise_probe.value_methods import StepContext, ValueMethod, register_value_method

__all__ = ["CriticMethod", "PromptCritic", "ValueModel", "build_value_model"]


class ValueModel(torch.nn.Module):
    """A decoder backbone under a scalar head: one float32 output per sequence position."""

    def __init__(self, backbone: torch.nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        p = next(backbone.parameters())
        self.head = torch.nn.utils.skip_init(torch.nn.Linear, hidden_size, 1, device=p.device,
                                             dtype=p.dtype)
        # a zero head: the first values are the uninformed sigmoid(0) = 0.5 (ppo_critic) or 0
        # (ppo_gae) rather than noise, and building it draws nothing from the run's RNG
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, packed: PackedBatch, autocast) -> Tensor:
        """(B, T) head outputs over `packed`'s positions; the backbone under the run's autocast."""
        dev = self.head.weight.device
        with autocast:
            h = self.backbone(input_ids=packed.input_ids.to(dev),
                              attention_mask=packed.attention_mask.to(dev),
                              position_ids=packed.position_ids.to(dev),
                              use_cache=False).last_hidden_state                 # (B, T, d)
        with torch.autocast(dev.type, enabled=False):
            # the head in float32, like the policy's LM head (features._ChunkHead)
            w, b = self.head.weight.float(), self.head.bias.float()
            return F.linear(h.float(), w, b).squeeze(-1)                        # (B, T)


def build_value_model(cfg, policy: torch.nn.Module, device) -> ValueModel:
    """The critic `cfg.critic.init` asks for, on `device` in the policy's parameter dtype.

    policy: a deep copy of the policy's decoder (no LM head), as in the paper and verl;
    random: the same architecture from its config, seeded apart from the run's RNG stream.
    """
    from transformers import AutoModel

    from poise_probe.trainer import _param_dtype

    base = policy.get_decoder() if hasattr(policy, "get_decoder") else policy.base_model
    if cfg.critic.init == "policy":
        backbone = copy.deepcopy(base)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.trainer.seed, "critic_init"))
            backbone = AutoModel.from_config(policy.config)
        if cfg.model.gradient_checkpointing:
            backbone.gradient_checkpointing_enable()
    backbone.to(device=device, dtype=_param_dtype(cfg))
    backbone.requires_grad_(True)
    return ValueModel(backbone, policy.config.hidden_size)


class CriticMethod(ValueMethod):
    """What ppo_critic and ppo_gae share: the critic, its AdamW, the update loop, the cost metrics.

    Subclasses give `_values(ctx)` (computed before the update, no gradient),
    `_advantages(ctx, values, warmup)`, `_rows(ctx, prompts)` (the units of a mini-batch:
    prompts or rollouts), `_loss(ctx, rows, denom)` (one micro-batch's share of its
    mini-batch's loss, with float shares to log) and `_value_metrics(ctx, values)`.
    """

    def __init__(self, cfg, model, tokenizer, device):
        from poise_probe.trainer import _autocast

        del tokenizer
        c = cfg.critic
        if c.warmup_steps > 0 and cfg.rollout.num_generations < 2:
            raise ValueError(f"critic.warmup_steps={c.warmup_steps} uses RLOO's sibling mean "
                             f"while the critic trains, which needs rollout.num_generations "
                             f">= 2; got {cfg.rollout.num_generations}. Set "
                             f"critic.warmup_steps=0 to use the critic from the first step.")
        self.cfg = cfg
        self.device = torch.device(device)
        self.autocast = _autocast(cfg, self.device)
        self.critic = build_value_model(cfg, model, self.device)
        self.optimizer = torch.optim.AdamW(self.critic.parameters(), lr=c.lr,
                                           betas=tuple(cfg.optim.betas),
                                           weight_decay=c.weight_decay)
        self.mini_batch_prompts = c.mini_batch_prompts or cfg.optim.mini_batch_prompts
        self.micro_batch_size = c.micro_batch_size or cfg.optim.micro_batch_size
        self.updates = 0                      # update() calls so far: the critic's step count
        self._values_s = float("nan")

    # -- the two calls of a step ----------------------------------------------------------------

    def advantages(self, ctx: StepContext) -> AdvantageResult:
        """Values from the critic before this step's update, then the step's advantages."""
        t = time.perf_counter()
        self.critic.eval()
        with torch.no_grad():
            values = self._values(ctx)
        self._sync()
        self._values_s = time.perf_counter() - t
        warmup = self.updates < self.cfg.critic.warmup_steps
        ctx.extra["critic_values"], ctx.extra["critic_warmup"] = values, warmup
        return self._advantages(ctx, values, warmup)

    def update(self, ctx: StepContext) -> dict[str, float]:
        """`critic.epochs` passes of AdamW over this batch in mini-batches of prompts."""
        if "critic_values" not in ctx.extra:
            raise RuntimeError(f"{self.name}.update(ctx) before advantages(ctx): the values "
                               f"must come from the critic before it learns from the batch.")
        t = time.perf_counter()
        logs = self._train(ctx)
        self._sync()
        m = {f"critic/{k}": float(np.mean(v)) for k, v in logs.items()}
        m.update(self._value_metrics(ctx, ctx.extra["critic_values"]))
        m.update(self.cost_metrics())
        self.optimizer.zero_grad(set_to_none=True)   # freed until the next update needs them
        self.updates += 1
        m["critic/warmup"] = float(ctx.extra["critic_warmup"])
        m["critic/lr"] = float(self.optimizer.param_groups[0]["lr"])
        m["timing_s/critic_values"] = self._values_s
        m["timing_s/critic_update"] = time.perf_counter() - t
        return m

    def _train(self, ctx: StepContext) -> dict[str, list[float]]:
        c = self.cfg.critic
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.trainer.seed, ctx.step,
                                                        "critic"))
        n_prompts = len(ctx.batch.prompts)
        logs: dict[str, list[float]] = {}
        self.critic.train()
        for _epoch in range(c.epochs):
            order = torch.randperm(n_prompts, generator=gen).tolist()
            for s in range(0, n_prompts, self.mini_batch_prompts):
                rows, denom = self._rows(ctx, order[s:s + self.mini_batch_prompts])
                self.optimizer.zero_grad(set_to_none=True)
                mb: dict[str, float] = {}
                for m in range(0, len(rows), self.micro_batch_size):
                    loss, info = self._loss(ctx, rows[m:m + self.micro_batch_size], denom)
                    loss.backward()
                    # micro losses are divided by the mini-batch's count: their sum is its loss
                    for k, v in info.items():
                        mb[k] = mb.get(k, 0.0) + v
                grad_norm = torch.nn.utils.clip_grad_norm_(self.critic.parameters(),
                                                           c.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    raise FloatingPointError(f"step {ctx.step}: the critic's gradient norm is "
                                             f"{float(grad_norm)}; lower critic.lr.")
                self.optimizer.step()
                for k, v in mb.items():
                    logs.setdefault(k, []).append(v)
                logs.setdefault("grad_norm", []).append(float(grad_norm))
        return logs

    # -- cost, state -----------------------------------------------------------------------------

    def cost_metrics(self) -> dict[str, float | int]:
        """Parameters, and bytes of parameters + gradients + AdamW state (+ the CUDA peak)."""
        params = list(self.critic.parameters())
        p_bytes = sum(p.numel() * p.element_size() for p in params)
        g_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params
                      if p.grad is not None)
        o_bytes = sum(t.numel() * t.element_size() for st in self.optimizer.state.values()
                      for t in st.values() if torch.is_tensor(t))
        m = {"critic/params": sum(p.numel() for p in params),
             "critic/param_bytes": float(p_bytes), "critic/grad_bytes": float(g_bytes),
             "critic/optimizer_bytes": float(o_bytes),
             "critic/memory_bytes": float(p_bytes + g_bytes + o_bytes)}
        if self.device.type == "cuda":
            # the process's peak (policy included): compare runs to see the critic's share
            m["critic/cuda_max_allocated_bytes"] = float(
                torch.cuda.max_memory_allocated(self.device))
        return m

    def state_dict(self) -> dict:
        """{critic weights, AdamW state, updates}: live tensors, as `TrainState.state_dict`."""
        return {"critic": self.critic.state_dict(), "optimizer": self.optimizer.state_dict(),
                "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        missing = {"critic", "optimizer", "updates"} - set(state)
        if missing:
            raise ValueError(f"{self.name}: the checkpoint's critic state lacks "
                             f"{sorted(missing)}; it was written by another adv_estimator. "
                             f"Resume with that estimator or start a new run.")
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])

    def _sync(self) -> None:
        if self.device.type == "cuda":   # kernels run asynchronously: time them whole
            torch.cuda.synchronize(self.device)

    # -- what a subclass gives ------------------------------------------------------------------

    def _values(self, ctx: StepContext) -> Tensor:
        raise NotImplementedError

    def _advantages(self, ctx: StepContext, values: Tensor, warmup: bool) -> AdvantageResult:
        raise NotImplementedError

    def _rows(self, ctx: StepContext, prompts: list[int]) -> tuple[list[int], int]:
        raise NotImplementedError

    def _loss(self, ctx: StepContext, rows: list[int], denom: int
              ) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def _value_metrics(self, ctx: StepContext, values: Tensor) -> dict[str, float]:
        raise NotImplementedError


@register_value_method("ppo_critic")
class PromptCritic(CriticMethod):
    """The paper's PPO critic: V(x) = sigmoid(head(h of the last prompt token)), BCE on scores.

    A_i = r_i - V(x_i), one advantage per rollout, not normalised (POISE's own convention, so
    the two differ only in the baseline). Shapes (N,). During `critic.warmup_steps` the
    baseline is RLOO's sibling mean while the critic trains.
    """

    name = "ppo_critic"

    def prompt_logits(self, prompts: list[int], batch) -> Tensor:
        """(len(prompts),) head outputs at each prompt's last token: one forward per prompt."""
        packed = pack_rollouts([batch.prompt_ids[g] for g in prompts], [[] for _ in prompts],
                               batch.pad_id)
        out = self.critic(packed, self.autocast)                                # (B, T)
        last = (packed.prompt_start + packed.prompt_len - 1).to(out.device)     # (B,)
        return out.gather(1, last[:, None]).squeeze(1)

    def _values(self, ctx: StepContext) -> Tensor:
        """(N,) V(x_i), float32 on the CPU; rollouts of a prompt share its value."""
        n_prompts, mb = len(ctx.batch.prompts), self.micro_batch_size
        logits = torch.cat([self.prompt_logits(list(range(s, min(s + mb, n_prompts))),
                                               ctx.batch).cpu()
                            for s in range(0, n_prompts, mb)])                  # (P,)
        return torch.sigmoid(logits)[ctx.group_ids]

    def _advantages(self, ctx: StepContext, values: Tensor, warmup: bool) -> AdvantageResult:
        if warmup:
            return rloo_advantage(ctx.rewards, ctx.group_ids)
        r = ctx.rewards
        v = values.to(r.dtype)
        return AdvantageResult(r - v, v.clone(), torch.ones_like(r))

    def _rows(self, ctx: StepContext, prompts: list[int]) -> tuple[list[int], int]:
        """The mini-batch's prompts; the BCE is a mean over their rollouts."""
        scores = ctx.batch.scores
        if not bool(((scores >= 0) & (scores <= 1)).all()):
            raise ValueError(f"ppo_critic trains with BCE on the verifier's scores, which must "
                             f"lie in [0, 1]; step {ctx.step} has scores in "
                             f"[{float(scores.min())}, {float(scores.max())}]. Fix the task's "
                             f"score function.")
        chosen = set(prompts)
        return prompts, sum(int(g) in chosen for g in ctx.group_ids.tolist())

    def _loss(self, ctx: StepContext, rows: list[int], denom: int
              ) -> tuple[Tensor, dict[str, float]]:
        logits = self.prompt_logits(rows, ctx.batch)                            # (B,)
        pos = {g: j for j, g in enumerate(rows)}
        pairs = [(pos[g], n) for n, g in enumerate(ctx.group_ids.tolist()) if g in pos]
        x = logits[torch.tensor([j for j, _ in pairs], device=logits.device)]   # (M,)
        y = ctx.batch.scores[[n for _, n in pairs]].to(logits.device, torch.float32)
        # one forward per prompt; each of its rollouts adds its own BCE term
        loss = F.binary_cross_entropy_with_logits(x, y, reduction="sum") / denom
        return loss, {"loss": float(loss.detach())}

    def _value_metrics(self, ctx: StepContext, values: Tensor) -> dict[str, float]:
        r = ctx.rewards.double().numpy()
        v = values.double().numpy()
        return {"critic/value_mean": float(v.mean()),
                "critic/explained_var": stats.explained_variance(r, v)}
