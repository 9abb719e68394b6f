# GRPO on GSM8K with an rlvr_kernels policy loss (default: TP-Schedule on DAPO's clip-higher), in the style of verl's
# examples/grpo_trainer scripts. verl 0.9.x.
#
# Data: verl's GSM8K preprocessing (examples/data_preprocess/gsm8k.py in the verl repository) writes
#   $HOME/data/gsm8k/train.parquet and test.parquet (set DATA_DIR otherwise).
# Run (one node, N_GPUS GPUs, Ray and vLLM installed):
#   bash examples/verl/run_grpo_rlvr.sh
# Any other loss or option, e.g. forking tokens under CPPO's trust region:
#   LOSS_MODE=rlvr_forking_cppo bash examples/verl/run_grpo_rlvr.sh \
#       +actor_rollout_ref.actor.policy_loss.rlvr.credit_rho=0.2
# Loss modes: rlvr_clip | rlvr_dppo | rlvr_cispo | rlvr_cppo and rlvr_<credit>[_dppo|_cispo|_cppo] with <credit> one
# of tp_schedule | forking | entropy_adv | d3s | delta. Options go under policy_loss.rlvr.* (the method catalogue's
# names: schedule, schedule_mode, schedule_start_value, schedule_end_value, schedule_begin_frac, schedule_end_frac,
# schedule_gamma, credit_rho, entropy_adv_*, d3s_scope, delta_coef_*, ratio_cap, cppo_*; verl-only: total_steps,
# anchor, backend, delta_coef_all_reduce, delta_coef_hidden_cache); extra ones need a leading "+".
#
# tests/test_examples.py checks on CPU that this script is valid bash and that every override it passes composes on
# verl's own ppo_trainer config and passes verl's validate_config (the driver-side check main_ppo runs before Ray).

set -x

# verl imports this module in every process (driver and Ray workers): it registers the rlvr_* policy losses and the
# hooks that ship the training step to the workers.
export VERL_USE_EXTERNAL_MODULES=rlvr_kernels.integrations.verl

MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-0.5B-Instruct}
DATA_DIR=${DATA_DIR:-$HOME/data/gsm8k}
N_GPUS=${N_GPUS:-8}
NNODES=${NNODES:-1}
LOSS_MODE=${LOSS_MODE:-rlvr_tp_schedule}

python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=grpo \
    data.train_files=$DATA_DIR/train.parquet \
    data.val_files=$DATA_DIR/test.parquet \
    data.train_batch_size=256 \
    data.max_prompt_length=512 \
    data.max_response_length=1024 \
    data.filter_overlong_prompts=True \
    data.truncation='error' \
    actor_rollout_ref.model.path=$MODEL_PATH \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.model.use_fused_kernels=True \
    actor_rollout_ref.model.fused_kernel_options.impl_backend=rlvr \
    actor_rollout_ref.actor.strategy=fsdp2 \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=64 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.clip_ratio_low=0.2 \
    actor_rollout_ref.actor.clip_ratio_high=0.28 \
    actor_rollout_ref.actor.clip_ratio_c=10.0 \
    actor_rollout_ref.actor.loss_agg_mode=token-mean \
    actor_rollout_ref.actor.policy_loss.loss_mode=$LOSS_MODE \
    actor_rollout_ref.actor.policy_loss._target_=rlvr_kernels.integrations.verl.RLVRPolicyLossConfig \
    +actor_rollout_ref.actor.policy_loss.rlvr.schedule_mode=linear \
    +actor_rollout_ref.actor.policy_loss.rlvr.schedule_start_value=0.99 \
    +actor_rollout_ref.actor.policy_loss.rlvr.schedule_end_value=0.0 \
    +actor_rollout_ref.actor.policy_loss.rlvr.schedule_end_frac=0.8 \
    actor_rollout_ref.actor.fsdp_config.param_offload=False \
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16 \
    algorithm.use_kl_in_reward=False \
    +ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=rlvr_kernels.integrations.verl \
    trainer.critic_warmup=0 \
    trainer.logger='["console"]' \
    trainer.project_name='rlvr_kernels_grpo_gsm8k' \
    trainer.experiment_name="qwen2_5_0_5b_${LOSS_MODE}" \
    trainer.n_gpus_per_node=$N_GPUS \
    trainer.nnodes=$NNODES \
    trainer.save_freq=-1 \
    trainer.test_freq=10 \
    trainer.total_epochs=3 "$@"
