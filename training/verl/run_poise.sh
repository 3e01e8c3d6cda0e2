#!/usr/bin/env bash
# POISE in verl's PPO trainer (GPU machine with verl's GPU install: pip install "verl[vllm]" and
# pip install -e ".[verl]"). Usage: MODEL=Qwen/Qwen3-1.7B NGPUS=8 bash training/verl/run_poise.sh [overrides]
# NOT RUN in this project's CI (CPU only); see docs/verl.md for what ran and what did not.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-Qwen/Qwen3-1.7B}
NGPUS=${NGPUS:-8}
DATA=${DATA:-data/verl}
RUN=${RUN:-runs/verl_poise}

[ -f "$DATA/train.parquet" ] || python -m poise_probe.integrations.verl.data \
  --tasks arith,boolean,code_output --out "$DATA" --train 4000 --test 200

# verl's public module hook: imports the POISE trainer (registers trainer_mode=poise_sync) at
# `import verl` in every process; the `poise` estimator itself comes from the verl.plugins entry point.
export VERL_USE_EXTERNAL_MODULES=poise_probe.integrations.verl.trainer

# POISE.md hyperparameters: 256 prompts x 2 rollouts, PPO mini-batch 32 prompts, clip-higher
# 0.2/0.28, dual-clip 10, token-mean, no KL, no entropy bonus, lr 1e-6 with 10 warm-up steps.
python -m verl.trainer.main_ppo \
  trainer.use_v1=True trainer.v1.trainer_mode=poise_sync \
  algorithm.adv_estimator=poise algorithm.use_kl_in_reward=False \
  +algorithm.poise.bootstrap_steps=16 +algorithm.poise.min_steps_to_fit=8 +algorithm.poise.alpha=0.01 \
  data.train_files="$DATA/train.parquet" data.val_files="$DATA/test.parquet" \
  data.train_batch_size=256 data.max_prompt_length=1024 data.max_response_length=8192 \
  reward.custom_reward_function.path=training/verl/reward.py \
  reward.custom_reward_function.name=compute_score \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.n=2 \
  actor_rollout_ref.rollout.temperature=1.0 \
  actor_rollout_ref.actor.optim.lr=1e-6 actor_rollout_ref.actor.optim.lr_warmup_steps=10 \
  actor_rollout_ref.actor.optim.weight_decay=0.01 actor_rollout_ref.actor.grad_clip=1.0 \
  actor_rollout_ref.actor.ppo_mini_batch_size=32 actor_rollout_ref.actor.ppo_epochs=1 \
  actor_rollout_ref.actor.clip_ratio_low=0.2 actor_rollout_ref.actor.clip_ratio_high=0.28 \
  actor_rollout_ref.actor.clip_ratio_c=10.0 actor_rollout_ref.actor.loss_agg_mode=token-mean \
  actor_rollout_ref.actor.use_kl_loss=False actor_rollout_ref.actor.entropy_coeff=0 \
  actor_rollout_ref.actor.use_dynamic_bsz=True \
  trainer.n_gpus_per_node="$NGPUS" trainer.nnodes=1 trainer.total_training_steps=200 \
  trainer.logger='[console]' trainer.project_name=poise trainer.experiment_name=verl_poise \
  +algorithm.poise.run_dir="$RUN" trainer.rollout_data_dir="$RUN/verl_rollouts" \
  "$@"
