"""verl integration: ``rlvr_*`` policy losses, the hooks that feed them the training step, and a fused forward.

Importing this module (verl 0.9.x must be installed):

1. registers one policy loss per credit rule and trust region of the method catalogue (:mod:`rlvr_kernels.methods`)
   with verl's ``register_policy_loss`` (names in :data:`LOSS_NAMES`): ``rlvr_clip`` (verl ``vanilla``: PPO clip,
   clip-higher, dual clip), ``rlvr_dppo`` (verl ``dppo_tv``), ``rlvr_cispo`` (verl ``cispo``), ``rlvr_cppo`` (CPPO)
   and, for every credit rule (``tp_schedule | forking | entropy_adv | d3s | delta``), ``rlvr_<credit>`` (PPO clip)
   and ``rlvr_<credit>_dppo | _cispo | _cppo``. Each has verl's exact call signature
   ``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)`` and returns
   ``(loss, metrics)`` with ``rlvr/...`` metrics. The token math is the package's (``rlvr_kernels.loss.token_pass``);
   the aggregation is verl's ``agg_loss`` fed with verl's ``global_batch_info`` (``dp_size``, ``batch_num_tokens``,
   ``global_batch_size``, ``loss_scale_factor``), so the four verl modes and ``token-sum`` give verl's numbers.
   Padding (``response_mask == 0``) may hold anything: loss, gradient (0 there) and metrics are those of clean
   padding. A non-finite ``old_log_prob``, ``advantages``, ``rollout_is_weights`` (or entropy / rollout log-probs /
   DelTA coefficient, when the loss reads them) on a loss token is a ``ValueError`` naming it, as in ``RLVRLoss``.
2. installs small, idempotent hooks (skip them with ``RLVR_VERL_HOOKS=0``), each applied when its verl module is
   imported, because verl 0.9.1 hands a policy loss nothing but the 7 arguments above:

   - trainer process: ``_update_actor`` of ``RayPPOTrainer`` (legacy) and of the v1 ``PPOTrainer`` ships verl's
     ``global_steps`` k and ``total_training_steps`` T to the workers with the batch (:data:`STEP_KEY`,
     :data:`TOTAL_STEPS_KEY`);
   - worker process: ``TrainingWorker.train_mini_batch`` reads them (else the engine's LR-scheduler count), applies
     TP-Schedule's cut-off to ``response_mask`` / ``loss_mask`` **before** verl counts tokens (so
     ``batch_num_tokens`` counts the active tokens, as in the official code), computes the DelTA coefficients of a
     ``rlvr_delta*`` loss (below), switches verl's ``calculate_entropy`` on for the losses that read the entropy
     (forking, entropy-shaped advantages, D^3S), and makes each micro-batch's ``data`` and ``model_output`` visible
     to the ``rlvr_*`` losses (:func:`loss_context`);
   - ``fused_kernel_options.impl_backend=rlvr`` (``rlvr_triton``, ``rlvr_torch``) installs
     :func:`patch_forward_with_rlvr`; on verl's Megatron engine it installs the vocabulary-parallel Megatron form
     (:func:`megatron_fused_output_processor`, :func:`install_megatron_forward`); it is refused with
     ``use_fused_kernels`` on every other engine that never reads it instead of being silently ignored;
   - configuration: verl's ``ActorConfig`` rejects a ``loss_mode`` spelt ``rlvr_...`` that is none of
     :data:`LOSS_NAMES`, naming them (:func:`check_loss_mode`; :class:`RLVRPolicyLossConfig` checks it too).

Configuration (Hydra overrides; see the README section "verl"): select a loss with
``actor_rollout_ref.actor.policy_loss.loss_mode=rlvr_...``; options live under ``policy_loss.rlvr`` once the policy
loss config is our subclass,
``actor_rollout_ref.actor.policy_loss._target_=rlvr_kernels.integrations.verl.RLVRPolicyLossConfig``
(Hydra then imports this module in every process that builds the actor config), then e.g.
``+actor_rollout_ref.actor.policy_loss.rlvr.schedule_mode=linear``. Keys (:data:`RLVR_OPTION_DEFAULTS`): the
catalogue's method options (``rlvr_kernels.methods.OPTIONS``: the same names, defaults and checks as ``RLVRLoss``
and TRL's config) plus the verl-only ``total_steps``, ``anchor``, ``backend``, ``delta_coef_all_reduce`` and
``delta_coef_hidden_cache``. verl's own keys keep their meaning: ``clip_ratio_low/high`` (PPO clip; DPPO's
binary-TV thresholds; CISPO's clamp ``[1 - low, 1 + high]``; CPPO's delta is ``clip_ratio_high``), ``clip_ratio_c``
(dual clip for PPO clip; the truncated-IS cap of DPPO/CPPO, as verl's ``dppo_tv``; ``policy_loss.rlvr.ratio_cap``
overrides it, ``"none"`` for no cap), ``loss_agg_mode``, ``loss_scale_factor``. ``d3s_scope="batch"`` selects over
the micro-batch one loss call sees.

DelTA (``rlvr_delta``, ``rlvr_delta_dppo | _cispo | _cppo``; ``docs/methods/delta.md``). The loss scales each
token's advantage by a detached coefficient ``c~_t`` (mean 1 over the estimation set E), read from the batch field
``rlvr_delta_coef`` (:data:`DELTA_COEF_KEY`). The worker hook computes that field itself, so a run needs only the
overrides (with the module loaded in every process, e.g. ``export
VERL_USE_EXTERNAL_MODULES=rlvr_kernels.integrations.verl`` before launching, which verl's ``import verl`` honours; on
a multi-node Ray cluster also pass it to the workers with
``+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=rlvr_kernels.integrations.verl``)::

    actor_rollout_ref.actor.policy_loss.loss_mode=rlvr_delta
    actor_rollout_ref.actor.policy_loss._target_=rlvr_kernels.integrations.verl.RLVRPolicyLossConfig
    +actor_rollout_ref.actor.policy_loss.rlvr.delta_coef_iters=1            # K (official 1)
    +actor_rollout_ref.actor.policy_loss.rlvr.delta_coef_lam_min=0.8        # official 0.8 / 1.2
    +actor_rollout_ref.actor.policy_loss.rlvr.delta_coef_lam_max=1.2
    +actor_rollout_ref.actor.policy_loss.rlvr.delta_coef_exclude_zero_adv=false
    +actor_rollout_ref.actor.policy_loss.rlvr.delta_coef_all_reduce=false
    +actor_rollout_ref.actor.policy_loss.rlvr.delta_coef_hidden_cache=none  # none (K + 3 forwards) | cpu | device

(the ``rlvr.*`` lines are optional; the official run's base loss is DAPO: ``actor_rollout_ref.actor.clip_ratio_low=0.2
clip_ratio_high=0.28 clip_ratio_c=10.0 loss_agg_mode=token-mean``, ``algorithm.adv_estimator=grpo``). The
coefficients are computed at the start of ``TrainingWorker.train_mini_batch``, before its mini-batch loop, when the
actor's weights are still theta_old, by no-grad forwards through verl's own engine (``h_t`` is the input of
``lm_head``); ``p_t = exp(old_log_probs)`` and the advantages come from the batch. E is the DP rank's shard of the
rollout batch (official), or the whole rollout batch with ``delta_coef_all_reduce=true``. They are computed once per
rollout step and reused by every mini-batch and PPO epoch, as ``old_log_probs`` are. Precedence: coefficients given
explicitly (``loss_context(delta_coefficients=...)`` around the update, or a ``rlvr_delta_coef`` batch field the user
put into the batch) are used as they are; ``delta_coef_lam_min == delta_coef_lam_max`` gives ``c~ = 1`` without any
forward. The automatic route needs verl's FSDP / FSDP2 engines (a Hugging Face causal LM as ``engine.module``); with
Megatron, set the batch field yourself. In bypass mode (``algorithm.rollout_correction.bypass_mode``)
``old_log_probs`` are the rollout engine's, while h comes from the actor's weights at the update.

The implementation lives in the private package :mod:`rlvr_kernels.integrations._verl` (one module per concern).
"""

from __future__ import annotations

import os

try:
    import verl.trainer.ppo.core_algos  # noqa: F401
    import verl.workers.config  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError(
        "rlvr_kernels.integrations.verl needs verl (pip install 'rlvr-kernels[verl]', verl==0.9.1)"
    ) from exc

from rlvr_kernels.integrations._verl import bypass as _bypass  # importing it registers rlvr_bypass_mode
from rlvr_kernels.integrations._verl import losses as _losses  # importing it registers the losses with verl
from rlvr_kernels.integrations._verl.context import clear_training_step, loss_context, set_training_step
from rlvr_kernels.integrations._verl.forward import FORWARD_BACKENDS, patch_forward_with_rlvr
from rlvr_kernels.integrations._verl.hooks import install_hooks
from rlvr_kernels.integrations._verl.megatron import (
    install_megatron_forward,
    megatron_fused_output_processor,
    uninstall_megatron_forward,
)
from rlvr_kernels.integrations._verl.options import (
    DELTA_COEF_KEY,
    LOSS_NAMES,
    RLVR_OPTION_DEFAULTS,
    ROLLOUT_LOGP_KEY,
    STEP_KEY,
    TOTAL_STEPS_KEY,
    RLVRPolicyLossConfig,
    check_loss_mode,
    options_of,
)
from rlvr_kernels.integrations._verl.rollouts import apply_d3s_rollouts, d3s_rollout_mask  # noqa: F401 (public)

__all__ = [
    "LOSS_NAMES",
    "RLVR_OPTION_DEFAULTS",
    "RLVRPolicyLossConfig",
    "check_loss_mode",
    "STEP_KEY",
    "TOTAL_STEPS_KEY",
    "DELTA_COEF_KEY",
    "ROLLOUT_LOGP_KEY",
    "set_training_step",
    "clear_training_step",
    "loss_context",
    "patch_forward_with_rlvr",
    "install_hooks",
    "megatron_fused_output_processor",
    "install_megatron_forward",
    "uninstall_megatron_forward",
]

# The config class is addressed by this module's path (Hydra's ``_target_``, and pickle when Ray ships a config to a
# worker): loading it there imports this module, which registers the losses and installs the hooks.
RLVRPolicyLossConfig.__module__ = __name__

# private aliases that tests/test_readme.py checks the README recipe against (its loss, options, forward backend)
_LOSSES = {**_losses.LOSSES, _bypass.NAME: _bypass.LOSS}
_options = options_of
_FORWARD_BACKENDS = FORWARD_BACKENDS

if os.environ.get("RLVR_VERL_HOOKS", "1").strip().lower() not in ("0", "false", "no", "off"):
    install_hooks()
