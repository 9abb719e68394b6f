"""verl integration: ``rlvr_*`` policy losses, the hooks that feed them the training step, and a fused forward.

Importing this module (verl 0.9.x must be installed):

1. registers one policy loss per credit rule and trust region with verl's ``register_policy_loss``
   (names in :data:`LOSS_NAMES`): ``rlvr_clip`` (verl ``vanilla``: PPO clip, clip-higher, dual clip),
   ``rlvr_dppo`` (verl ``dppo_tv``), ``rlvr_cispo`` (verl ``cispo``), ``rlvr_cppo`` (CPPO) and, for every credit rule
   ``tp_schedule | forking | entropy_adv | d3s | delta``, ``rlvr_<credit>`` (PPO clip) and
   ``rlvr_<credit>_dppo | _cispo | _cppo``. Each has verl's exact call signature
   ``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)`` and returns
   ``(loss, metrics)`` with ``rlvr/...`` metrics. The token math is the package's (``rlvr_kernels.loss.token_pass``:
   credit masks, advantage shaping, trust region, ``reference.loss.policy_token_loss``); the aggregation is the
   package's ``aggregate`` / ``normalizer`` fed with verl's ``global_batch_info`` (``dp_size``, ``batch_num_tokens``,
   ``global_batch_size``, ``loss_scale_factor``), so the four verl modes and ``token-sum`` give verl's numbers.
   Padding (``response_mask == 0``) may hold anything (NaN / +-inf log-probs, advantages, IS weights, entropy,
   rollout log-probs, DelTA coefficients): loss, gradient (0 there) and metrics are those of clean padding. A
   non-finite ``old_log_prob``, ``advantages``, ``rollout_is_weights`` (or entropy / rollout log-probs / DelTA
   coefficient, when the loss reads them) on a loss token is a ``ValueError`` naming it (one host sync, before the
   math), as in ``RLVRLoss``.
2. installs small, idempotent hooks (skip them with ``RLVR_VERL_HOOKS=0``), each applied when its verl module is
   imported, because verl 0.9.1 hands a policy loss nothing but the 7 arguments above:

   - trainer process: ``_update_actor`` of ``RayPPOTrainer`` (legacy) and of the v1 ``PPOTrainer`` writes
     ``rlvr_global_steps`` / ``rlvr_total_training_steps`` (verl's ``global_steps`` k and ``total_training_steps`` T)
     into the batch's ``meta_info`` / ``extra_info``, which verl ships to the workers as non-tensor data;
   - worker process: ``TrainingWorker.train_mini_batch`` reads them (falling back to the engine's LR-scheduler
     count, see :func:`_step_from_worker`), applies TP-Schedule's cut-off to ``response_mask`` / ``loss_mask``
     **before** verl counts tokens (so ``batch_num_tokens`` is the global count of active tokens, as in the official
     code), computes the DelTA coefficients of a ``rlvr_delta*`` loss (below), switches verl's ``calculate_entropy``
     on for the forking / entropy-shaped / D^3S losses (they read the current policy's entropy), and, for the
     duration of the update, wraps the worker's loss function so that each micro-batch's ``data`` and
     ``model_output`` (entropy, extra batch fields) are visible to the ``rlvr_*`` losses;
   - ``verl.models.transformers.monkey_patch.patch_forward_with_backends`` accepts
     ``fused_kernel_options.impl_backend=rlvr`` (``rlvr_triton``, ``rlvr_torch``) and then installs
     :func:`patch_forward_with_rlvr`; ``EngineRegistry.new`` refuses ``impl_backend=rlvr*`` with
     ``use_fused_kernels`` on an engine that never reads it (every strategy but ``fsdp`` / ``fsdp2``, e.g.
     Megatron, which runs its own fused forward) instead of letting it be silently ignored;
   - configuration: ``ActorConfig.__post_init__`` (verl's ``validate_config`` on the driver and every worker build
     the actor config) rejects a ``loss_mode`` spelt ``rlvr_...`` that is none of :data:`LOSS_NAMES`, naming them
     (:func:`check_loss_mode`; :class:`RLVRPolicyLossConfig` checks it too, hooks or not).

Configuration (Hydra overrides; see the README section "verl"): select a loss with
``actor_rollout_ref.actor.policy_loss.loss_mode=rlvr_...``; options live under ``policy_loss.rlvr`` once the policy
loss config is our subclass,
``actor_rollout_ref.actor.policy_loss._target_=rlvr_kernels.integrations.verl.RLVRPolicyLossConfig``
(Hydra then imports this module in every process that builds the actor config), then e.g.
``+actor_rollout_ref.actor.policy_loss.rlvr.schedule_mode=linear``. Keys: :data:`RLVR_OPTION_DEFAULTS`.
verl's own keys keep their meaning: ``clip_ratio_low/high`` (PPO clip; DPPO's binary-TV thresholds; CISPO's clamp
``[1 - low, 1 + high]``; CPPO's delta is ``clip_ratio_high``), ``clip_ratio_c`` (dual clip for PPO clip; the
truncated-IS cap of DPPO/CPPO, as verl's ``dppo_tv``), ``loss_agg_mode``, ``loss_scale_factor``.

DelTA (``rlvr_delta``, ``rlvr_delta_dppo | _cispo | _cppo``; spec ``delta.md``). The loss scales each token's
advantage by a detached coefficient ``c~_t`` (mean 1 over the estimation set E), read from the batch field
``rlvr_delta_coef``. The worker hook computes that field itself, so a run needs only the overrides (with the
module loaded in every process, e.g. ``export VERL_USE_EXTERNAL_MODULES=rlvr_kernels.integrations.verl`` before
launching, which verl's ``import verl`` honours; on a multi-node Ray cluster also pass it to the workers with
``+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=rlvr_kernels.integrations.verl``)::

    actor_rollout_ref.actor.policy_loss.loss_mode=rlvr_delta
    actor_rollout_ref.actor.policy_loss._target_=rlvr_kernels.integrations.verl.RLVRPolicyLossConfig
    +actor_rollout_ref.actor.policy_loss.rlvr.delta_iters=1            # K (official 1)
    +actor_rollout_ref.actor.policy_loss.rlvr.delta_lam_min=0.8        # official 0.8 / 1.2
    +actor_rollout_ref.actor.policy_loss.rlvr.delta_lam_max=1.2
    +actor_rollout_ref.actor.policy_loss.rlvr.delta_exclude_zero_adv=false
    +actor_rollout_ref.actor.policy_loss.rlvr.delta_all_reduce=false
    +actor_rollout_ref.actor.policy_loss.rlvr.delta_hidden_cache=none  # none (K + 3 forwards) | cpu | device (one)

(the ``rlvr.*`` lines are optional; the official run's base loss is DAPO: ``actor_rollout_ref.actor.clip_ratio_low=0.2
clip_ratio_high=0.28 clip_ratio_c=10.0 loss_agg_mode=token-mean``, ``algorithm.adv_estimator=grpo``). How theta_old
and E are chosen: verl computes ``old_log_probs`` before the advantages (``RayPPOTrainer.fit``; v1
``PPOTrainer._step_once``), so the coefficients are computed at the start of ``TrainingWorker.train_mini_batch``
(``ActorRolloutRefWorker.update_actor``), before its mini-batch loop, when no optimizer step has been taken for this
rollout batch: the actor's weights are theta_old. No-grad forwards of the actor through verl's own engine
(``engine.infer_batch`` in eval mode, its micro-batching, padding removal, Ulysses gather and fused kernels) give
``h_t``, the final hidden state fed to ``lm_head`` (a forward pre-hook on ``lm_head``, as the official
``compute_log_prob_h``; the decoder's output when a fused forward bypasses ``lm_head``); ``p_t = exp(old_log_probs)``
and the advantages come from the batch; a :class:`rlvr_kernels.delta.DeltaEstimator` streams the micro-batches
(``delta_hidden_cache=none``: K + 3 forwards as the official code, never more than one micro-batch of hidden
states; ``cpu`` / ``device``: one forward, the response tokens' hidden states kept on the host / the
accelerator). E is the DP rank's shard of the rollout batch (official; Ulysses SP ranks of one DP rank compute the
same coefficients), or the whole rollout batch with ``delta_all_reduce=true`` (the statistics are summed over verl's
DP group). The coefficients are computed once
per rollout step and reused by every mini-batch and PPO epoch, as ``old_log_probs`` are. Precedence: coefficients
given explicitly (``loss_context(delta_coefficients=...)`` around the update, or a ``rlvr_delta_coef`` batch field
the user put into the batch) are used as they are and nothing is computed; ``delta_lam_min == delta_lam_max`` gives
``c~ = 1`` without any forward (the plain ``rlvr_clip`` / ``_dppo`` / ... loss). The automatic route needs verl's
FSDP / FSDP2 engines (a Hugging Face causal LM as ``engine.module``); with Megatron, set the batch field yourself.
In bypass mode (``algorithm.rollout_correction.bypass_mode``) ``old_log_probs`` are the rollout engine's, while h
comes from the actor's weights at the update.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import difflib
import functools
import importlib.abc
import logging
import math
import numbers
import os
import sys
import types
from typing import Any, Callable, Optional

import torch

try:
    from verl.trainer.ppo.core_algos import register_policy_loss
    from verl.workers.config import PolicyLossConfig
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError(
        "rlvr_kernels.integrations.verl needs verl (pip install 'rlvr-kernels[verl]', verl==0.9.1)"
    ) from exc

from rlvr_kernels import loss as _loss
from rlvr_kernels import methods as _methods
from rlvr_kernels.logprobs import fused_linear_logprobs
from rlvr_kernels.reference import loss as _ref_loss
from rlvr_kernels.schedule import SCHEDULE_MODES, TemporalSchedule

logger = logging.getLogger(__name__)

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
]

# Non-tensor keys the trainer hook adds to the batch (verl ships meta_info / extra_info to the workers).
STEP_KEY = "rlvr_global_steps"
TOTAL_STEPS_KEY = "rlvr_total_training_steps"
# Response-aligned batch fields ([bs, response_len], like ``advantages``) read by the losses when present.
DELTA_COEF_KEY = "rlvr_delta_coef"
ROLLOUT_LOGP_KEY = "rollout_log_probs"  # verl's own name for the rollout engine's log-probs

TRUST_REGIONS = ("clip", "dppo", "cispo", "cppo")
CREDIT_RULES = ("tp_schedule", "forking", "entropy_adv", "d3s", "delta")
_LOSS_TYPE = {"clip": "dapo", "dppo": "dppo", "cispo": "cispo", "cppo": "cppo"}

# Options under ``policy_loss.rlvr`` (all optional) and their defaults.
RLVR_OPTION_DEFAULTS: dict[str, Any] = {
    # temporal schedule q(k) (rlvr_kernels.TemporalSchedule); on by default only for tp_schedule
    "schedule": None,
    "schedule_mode": "linear",
    "schedule_start_value": 0.99,
    "schedule_end_value": 0.0,
    "schedule_begin": 0.0,
    "schedule_end": 0.8,
    "schedule_gamma": 2.0,
    "total_steps": None,  # default: the trainer's total_training_steps (else actor.optim.total_training_steps)
    # credit rules
    "credit_rho": 0.2,  # forking / D^3S keep-fraction without a schedule (with one: 1 - q(k))
    "entropy_adv_alpha": 0.4,
    "entropy_adv_kappa": 2.0,
    "d3s_scope": "sequence",  # "batch" means the micro-batch the loss sees
    # trust regions
    "ratio_cap": None,  # dppo/cppo truncated-IS cap; None: verl's clip_ratio_c; "none": differentiable rho
    "anchor": "old",  # dppo/cppo divergence anchor: "old" (old_log_prob, verl's dppo_tv) or "rollout"
    "cppo_w_min": 0.8,
    "cppo_delta_b": 0.02,
    "cppo_budget": "dynamic",
    "cppo_quantile": 0.9,
    "cppo_max_mult": 2.0,
    "cppo_horizon": None,
    "cppo_divergence": "binary_tv",
    # DelTA coefficients, computed by the worker hook at the start of each actor update (see _delta_for_update)
    "delta_iters": 1,  # K refinement iterations (official 1)
    "delta_lam_min": 0.8,  # official 0.8 / 1.2; lam_min == lam_max gives c = 1 (plain rlvr_<trust> loss)
    "delta_lam_max": 1.2,
    "delta_exclude_zero_adv": False,  # True: A = 0 tokens leave the normaliser (c~ = 1); official False
    "delta_all_reduce": False,  # True: E = the global rollout batch (sum the statistics over the DP group)
    "delta_hidden_cache": "none",  # "none": one no-grad forward per phase (K + 3); "cpu" / "device": one forward
    # kernels
    "backend": "auto",
}

DELTA_HIDDEN_CACHES = ("none", "cpu", "device")


# ----------------------------------------------------------------------------------------------------------------
# configuration


def _plain(obj):
    """DictConfig / Mapping -> plain dict (recursively); other values unchanged."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(obj, DictConfig):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, dict):
        return dict(obj)
    return obj


_Options = collections.namedtuple("_Options", list(RLVR_OPTION_DEFAULTS))  # validated policy_loss.rlvr


def _check_options(raw) -> dict:
    raw = _plain(raw) if raw is not None else {}
    if not isinstance(raw, dict):
        raise TypeError(f"policy_loss.rlvr must be a mapping of options, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(RLVR_OPTION_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown policy_loss.rlvr option(s) {unknown}; valid: {sorted(RLVR_OPTION_DEFAULTS)}")
    opts = {**RLVR_OPTION_DEFAULTS, **raw}
    if opts["schedule"] is not None and not isinstance(opts["schedule"], bool):
        raise TypeError(f"policy_loss.rlvr.schedule must be true/false, got {opts['schedule']!r}")
    if opts["schedule_mode"] not in SCHEDULE_MODES:
        raise ValueError(f"policy_loss.rlvr.schedule_mode must be one of {SCHEDULE_MODES}, "
                         f"got {opts['schedule_mode']!r}")
    ts = opts["total_steps"]
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, numbers.Integral) or ts < 1):
        raise ValueError(f"policy_loss.rlvr.total_steps must be a positive int or null, got {ts!r}")
    if opts["anchor"] not in ("old", "rollout"):
        raise ValueError(f"policy_loss.rlvr.anchor must be 'old' or 'rollout', got {opts['anchor']!r}")
    if opts["d3s_scope"] not in ("batch", "sequence"):
        raise ValueError(f"policy_loss.rlvr.d3s_scope must be 'batch' or 'sequence', got {opts['d3s_scope']!r}")
    try:  # the schedule's own checks (ranges, gamma needs end_value 0, ...) at config time
        TemporalSchedule(opts["schedule_mode"], start_value=opts["schedule_start_value"],
                         end_value=opts["schedule_end_value"], begin=opts["schedule_begin"], end=opts["schedule_end"],
                         total_steps=1_000_000, gamma=opts["schedule_gamma"])
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"policy_loss.rlvr schedule options: {exc}") from exc
    _check_delta_options(opts)
    cap = opts["ratio_cap"]
    if isinstance(cap, str):
        if cap.lower() != "none":
            raise ValueError(f"policy_loss.rlvr.ratio_cap must be a number, null or 'none', got {cap!r}")
    elif cap is not None and not (isinstance(cap, numbers.Real) and not isinstance(cap, bool) and cap > 0):
        raise ValueError(f"policy_loss.rlvr.ratio_cap must be a positive number, null or 'none', got {cap!r}")
    return opts


def _check_delta_options(opts: dict) -> None:
    it = opts["delta_iters"]
    if isinstance(it, bool) or not isinstance(it, numbers.Integral) or it < 0:
        raise ValueError(f"policy_loss.rlvr.delta_iters must be an int >= 0, got {it!r}")
    lo, hi = opts["delta_lam_min"], opts["delta_lam_max"]
    for name, v in (("delta_lam_min", lo), ("delta_lam_max", hi)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise ValueError(f"policy_loss.rlvr.{name} must be a finite number, got {v!r}")
    if not float(lo) > 0:
        raise ValueError(f"policy_loss.rlvr.delta_lam_min must be > 0 (the coefficients must stay positive), "
                         f"got {lo!r}")
    if float(hi) < float(lo):
        raise ValueError(f"policy_loss.rlvr.delta_lam_max must be >= delta_lam_min = {lo!r}, got {hi!r}")
    for name in ("delta_exclude_zero_adv", "delta_all_reduce"):
        if not isinstance(opts[name], bool):
            raise ValueError(f"policy_loss.rlvr.{name} must be true/false, got {opts[name]!r}")
    cache = opts["delta_hidden_cache"]
    if cache is None:
        opts["delta_hidden_cache"] = cache = "none"
    if cache not in DELTA_HIDDEN_CACHES:
        raise ValueError(f"policy_loss.rlvr.delta_hidden_cache must be one of {DELTA_HIDDEN_CACHES}, got {cache!r}")


@dataclasses.dataclass
class RLVRPolicyLossConfig(PolicyLossConfig):
    """verl's ``PolicyLossConfig`` plus ``rlvr``: a mapping of the options in :data:`RLVR_OPTION_DEFAULTS`.

    verl builds configs with Hydra's ``instantiate`` from ``_target_``, which rejects unknown keys, so extra options
    need this subclass:
    ``actor_rollout_ref.actor.policy_loss._target_=rlvr_kernels.integrations.verl.RLVRPolicyLossConfig``.
    Options and a ``loss_mode`` spelt ``rlvr_...`` are validated here, when verl builds the actor config.
    """

    rlvr: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        check_loss_mode(self.loss_mode)
        _check_options(self.rlvr)


def check_loss_mode(loss_mode) -> None:
    """Raise ``ValueError`` for a ``loss_mode`` that starts with ``rlvr_`` but is none of :data:`LOSS_NAMES` (a typo
    that verl itself would only report at the first actor update, after the first rollout). Other names are verl's
    business (its registry may gain losses later)."""
    if not isinstance(loss_mode, str) or not loss_mode.startswith("rlvr_") or loss_mode in _SPECS:
        return
    close = difflib.get_close_matches(loss_mode, LOSS_NAMES, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"unknown policy loss actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode!r}: {hint}"
                     f"the rlvr_* losses are {', '.join(LOSS_NAMES)}")


@functools.lru_cache(maxsize=64)
def _options_cached(items: tuple) -> _Options:
    return _Options(**_check_options(dict(items)))


def _freeze(v):
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


def _options(config) -> _Options:
    pl = config.get("policy_loss", None) if hasattr(config, "get") else getattr(config, "policy_loss", None)
    raw = None
    if pl is not None:
        raw = pl.get("rlvr", None) if hasattr(pl, "get") else getattr(pl, "rlvr", None)
    raw = _plain(raw) if raw is not None else {}
    if not isinstance(raw, dict):
        raise TypeError(f"policy_loss.rlvr must be a mapping of options, got {type(raw).__name__}")
    return _options_cached(tuple(sorted((k, _freeze(v)) for k, v in raw.items())))


def _loss_mode(config) -> Optional[str]:
    pl = config.get("policy_loss", None) if hasattr(config, "get") else getattr(config, "policy_loss", None)
    if pl is None:
        return None
    return pl.get("loss_mode", None) if hasattr(pl, "get") else getattr(pl, "loss_mode", None)


def _cfg_value(config, name, default=None):
    v = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if v is None else v


# ----------------------------------------------------------------------------------------------------------------
# the training step and per-micro-batch context


_BASE: dict = {}  # set_training_step
_STACK: list = []  # loss_context / hooks


def set_training_step(step: Optional[int], total_steps: Optional[int] = None) -> None:
    """Declare the current 1-based training step (verl's ``global_steps``) for this process.

    For custom training loops; verl runs with the hooks installed do not need it (the step comes with the batch).
    ``total_steps`` (verl's ``total_training_steps``) is optional when ``policy_loss.rlvr.total_steps`` or
    ``actor.optim.total_training_steps`` is set. ``set_training_step(None)`` clears it.
    """
    _BASE.clear()
    if step is None:
        return
    _BASE.update(step=_check_step(step, "step"), source="user")
    if total_steps is not None:
        _BASE["total_steps"] = _check_step(total_steps, "total_steps")


def clear_training_step() -> None:
    """Forget the step set by :func:`set_training_step`."""
    _BASE.clear()


def _check_step(v, name):
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1 (verl's first update is global step 1), got {v}")
    return int(v)


@contextlib.contextmanager
def loss_context(*, step: Optional[int] = None, total_steps: Optional[int] = None, entropy=None,
                 delta_coefficients=None, rollout_log_probs=None, data=None, model_output=None):
    """Extra inputs of the ``rlvr_*`` losses called inside the block (nested blocks inherit and override).

    The verl hooks open one around every actor update (``step``, ``total_steps``) and every micro-batch (``data``,
    ``model_output``: the entropy and the ``rlvr_delta_coef`` / ``rollout_log_probs`` fields are read from them).
    Custom loops and tests pass the tensors directly: ``entropy`` / ``delta_coefficients`` / ``rollout_log_probs``
    are ``[bs, response_len]`` like ``log_prob``.
    """
    top = dict(_STACK[-1]) if _STACK else {}
    new = {k: v for k, v in dict(step=step, total_steps=total_steps, entropy=entropy, delta_coef=delta_coefficients,
                                 rollout_logp=rollout_log_probs, data=data, model_output=model_output).items()
           if v is not None}
    if "step" in new:
        new["step"] = _check_step(new["step"], "step")
        new.setdefault("source", "context")
    if "total_steps" in new:
        new["total_steps"] = _check_step(new["total_steps"], "total_steps")
    if "data" in new or "model_output" in new:  # a new micro-batch: drop the previous one's tensors
        for k in ("entropy", "delta_coef", "rollout_logp"):
            if k not in new:
                top.pop(k, None)
    top.update(new)
    _STACK.append(top)
    try:
        yield
    finally:
        _STACK.pop()


def _ctx() -> dict:
    out = dict(_BASE)
    if _STACK:
        out.update(_STACK[-1])
    return out


def _response_tensor(ctx: dict, name: str, like: torch.Tensor) -> Optional[torch.Tensor]:
    """A ``[bs, response_len]`` input of the losses: given to :func:`loss_context`, or read from the current
    micro-batch (``entropy`` from verl's model output, unpacked as verl unpacks ``log_probs``; the other names from
    the batch fields ``rlvr_delta_coef`` / ``rollout_log_probs``, aligned like ``advantages``)."""
    direct = {"entropy": "entropy", DELTA_COEF_KEY: "delta_coef", ROLLOUT_LOGP_KEY: "rollout_logp"}[name]
    t = ctx.get(direct)
    data = ctx.get("data")
    if t is None and name == "entropy":
        mo = ctx.get("model_output")
        t = mo.get("entropy", None) if hasattr(mo, "get") else None
        if t is not None and data is not None:
            from verl.workers.utils.padding import no_padding_2_padding

            t = no_padding_2_padding(t, data)
    elif t is None and data is not None and name in data.keys():
        t = data.get(name)
        if isinstance(t, torch.Tensor) and t.is_nested:
            t = t.to_padded_tensor(0.0)
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() == 2 and t.shape[0] == like.shape[0] and t.shape[1] < like.shape[1]:
        t = torch.nn.functional.pad(t, (0, like.shape[1] - t.shape[1]))
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(like.shape)} (that of log_prob)")
    return t.to(device=like.device)


# ----------------------------------------------------------------------------------------------------------------
# the losses


@dataclasses.dataclass(frozen=True)
class _Spec:
    name: str
    trust: str
    credit: Optional[str]

    def uses_schedule(self, opts: _Options) -> bool:
        if self.credit == "tp_schedule":
            if opts.schedule is False:
                raise ValueError("rlvr_tp_schedule needs its schedule (policy_loss.rlvr.schedule cannot be false)")
            return True
        if opts.schedule and self.credit not in ("forking", "entropy_adv", "d3s"):
            raise ValueError(f"{self.name}: policy_loss.rlvr.schedule=true applies to the tp_schedule, forking, "
                             "entropy_adv and d3s losses only")
        return bool(opts.schedule)


def _schedule(opts: _Options, total_steps: int) -> TemporalSchedule:
    return TemporalSchedule(opts.schedule_mode, start_value=opts.schedule_start_value,
                            end_value=opts.schedule_end_value, begin=opts.schedule_begin, end=opts.schedule_end,
                            total_steps=total_steps, gamma=opts.schedule_gamma)


def _resolve_total_steps(config, opts: _Options, ctx: dict) -> Optional[int]:
    if opts.total_steps is not None:
        return int(opts.total_steps)
    if ctx.get("total_steps") is not None:
        return int(ctx["total_steps"])
    optim = _cfg_value(config, "optim", None)
    if optim is not None:
        t = (optim.get("total_training_steps", None) if hasattr(optim, "get")
             else getattr(optim, "total_training_steps", None))
        if t is not None and int(t) > 0:
            return int(t)
    return None


_STEP_HELP = (
    "it needs verl's training step: load this module in the trainer and the workers "
    "(VERL_USE_EXTERNAL_MODULES=rlvr_kernels.integrations.verl, see the README) so that its hooks pass "
    "global_steps with the batch, or call rlvr_kernels.integrations.verl.set_training_step(k) in a custom loop"
)


def _schedule_value(spec: _Spec, config, opts: _Options, ctx: dict):
    """``(q, step, schedule)`` of the current update, or Nones when the loss has no schedule."""
    if not spec.uses_schedule(opts):
        return None, None, None
    step = ctx.get("step")
    if step is None:
        raise RuntimeError(f"{spec.name}: {_STEP_HELP}")
    total = _resolve_total_steps(config, opts, ctx)
    if total is None:
        raise RuntimeError(f"{spec.name}: the schedule needs the total number of training steps; set "
                           "policy_loss.rlvr.total_steps (verl sets actor.optim.total_training_steps itself)")
    sched = _schedule(opts, total)
    return float(sched(step)), step, sched


def _loss_config(spec: _Spec, config, opts: _Options, loss_agg_mode: str,
                 sched: Optional[TemporalSchedule]) -> _loss.LossConfig:
    low = _cfg_value(config, "clip_ratio_low", None)
    high = _cfg_value(config, "clip_ratio_high", None)
    base = _cfg_value(config, "clip_ratio", 0.2)
    low = base if low is None else low
    high = base if high is None else high
    clip_c = _cfg_value(config, "clip_ratio_c", 3.0)
    kw: dict = dict(beta=0.0, loss_type=_LOSS_TYPE[spec.trust], epsilon_low=float(low), epsilon_high=float(high),
                    backend=opts.backend, fused=False, log_ratio_clip=20.0)  # verl clamps the log-ratio at +-20
    if spec.trust == "clip":
        kw["dual_clip"] = float(clip_c)
    elif spec.trust == "cispo":  # verl: sg(clamp(ratio, 1 - low, 1 + high)); ours clamps at absolute bounds
        kw["epsilon_high"] = 1.0 + float(high)
        kw["cispo_min"] = 1.0 - float(low)
    else:  # dppo / cppo: verl's truncated-IS form, cap clip_ratio_c
        cap = opts.ratio_cap
        if isinstance(cap, str):
            cap = None
        elif cap is None:
            cap = float(clip_c)
        kw["ratio_cap"] = cap
        if spec.trust == "cppo":
            kw.update(cppo_w_min=opts.cppo_w_min, cppo_delta_b=opts.cppo_delta_b, cppo_budget=opts.cppo_budget,
                      cppo_quantile=opts.cppo_quantile, cppo_max_mult=opts.cppo_max_mult,
                      cppo_horizon=opts.cppo_horizon, cppo_divergence=opts.cppo_divergence)
    kw["aggregation"] = loss_agg_mode
    # verl's agg_loss takes the horizon of seq-mean-token-sum-norm from global_batch_info only (ppo_loss copies
    # actor.loss_scale_factor there); default: the padded response width
    lsf = (_cfg_value(config, "global_batch_info", {}) or {}).get("loss_scale_factor", None)
    kw["loss_horizon"] = int(lsf) if lsf is not None else None
    if spec.credit is not None:
        kw["credit"] = spec.credit
        kw.update(credit_rho=float(opts.credit_rho), entropy_adv_alpha=float(opts.entropy_adv_alpha),
                  entropy_adv_kappa=float(opts.entropy_adv_kappa), d3s_scope=opts.d3s_scope)
        kw["schedule"] = sched
    return _loss.LossConfig(**kw)


def _normaliser(cfg, active: torch.Tensor, T: int, gbi: dict) -> torch.Tensor:
    """verl's ``agg_loss`` divisor (``cfg.aggregation`` is verl's mode) for the active-token mask ``active [bs, T]``
    and ``global_batch_info``."""
    return _ref_loss.normalizer(cfg, active.sum(-1), T, batch_num_tokens=gbi.get("batch_num_tokens", None),
                                global_batch_size=gbi.get("global_batch_size", None),
                                dp_size=int(gbi.get("dp_size", 1) or 1))


def _ensure_tp_mask(spec, cfg, mask, q, ctx, gbi, loss_agg_mode):
    """TP-Schedule's mask: already applied to response_mask by the worker hook, or applied here."""
    if spec.credit != "tp_schedule":
        return mask
    if ctx.get("tp_q") is not None:
        if abs(float(ctx["tp_q"]) - float(q)) > 1e-12:
            raise RuntimeError(f"internal error: the batch was cut at q={ctx['tp_q']} but the loss computes q={q}")
        return mask
    if loss_agg_mode == "token-mean" and gbi.get("batch_num_tokens", None) is not None:
        raise RuntimeError(
            "rlvr_tp_schedule with loss_agg_mode=token-mean inside verl needs the worker hook: verl's batch_num_tokens "
            "counts the tokens before the cut-off, so the loss would shrink with q. Load this module in the workers "
            "(VERL_USE_EXTERNAL_MODULES=rlvr_kernels.integrations.verl) and keep RLVR_VERL_HOOKS unset")
    return _methods.credit(cfg.credit).static_mask(cfg, mask, q)


def _policy_loss(spec: _Spec, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                 config=None, rollout_is_weights=None):
    if config is None:
        raise ValueError(f"{spec.name}: config (verl's ActorConfig) is required")
    if not (hasattr(config, "clip_ratio") or (hasattr(config, "get") and config.get("clip_ratio", None) is not None)):
        raise TypeError(f"{spec.name}: config must be verl's ActorConfig (actor_rollout_ref.actor), "
                        f"got {type(config).__name__}")
    if log_prob.dim() != 2 or tuple(old_log_prob.shape) != tuple(log_prob.shape) \
            or tuple(advantages.shape) != tuple(log_prob.shape) or tuple(response_mask.shape) != tuple(log_prob.shape):
        raise ValueError(f"{spec.name}: old_log_prob, log_prob, advantages and response_mask must all be "
                         f"[bs, response_len]; got {tuple(old_log_prob.shape)}, {tuple(log_prob.shape)}, "
                         f"{tuple(advantages.shape)}, {tuple(response_mask.shape)}")
    if loss_agg_mode not in _ref_loss.VERL_AGGREGATIONS:
        raise ValueError(f"{spec.name}: unsupported loss_agg_mode {loss_agg_mode!r}")
    opts = _options(config)
    ctx = _ctx()
    gbi = dict(_cfg_value(config, "global_batch_info", {}) or {})
    valid_b = response_mask != 0
    entropy = None
    if spec.credit in ("forking", "d3s", "entropy_adv"):
        entropy = _response_tensor(ctx, "entropy", log_prob)
        if entropy is None:
            raise ValueError(
                f"{spec.name} needs the current policy's per-token entropy, which verl computes only when asked. "
                "The worker hook of this module asks for it automatically (load the module in the workers: "
                "VERL_USE_EXTERNAL_MODULES=rlvr_kernels.integrations.verl, RLVR_VERL_HOOKS unset); otherwise add the "
                "override actor_rollout_ref.actor.calculate_entropy=True and pass the entropy with "
                "rlvr_kernels.integrations.verl.loss_context(entropy=...)")
    coef = None
    if spec.credit == "delta":
        coef = _response_tensor(ctx, DELTA_COEF_KEY, log_prob)
        if coef is None:
            raise ValueError(
                f"{spec.name} needs DelTA coefficients: inside verl the worker hook computes the batch field "
                f"{DELTA_COEF_KEY!r} at the start of each actor update (load this module in the workers: "
                "VERL_USE_EXTERNAL_MODULES=rlvr_kernels.integrations.verl, RLVR_VERL_HOOKS unset); otherwise set "
                "that [bs, response_len] batch field or loss_context(delta_coefficients=...); see rlvr_kernels.delta")
    mu = None
    if spec.trust in ("dppo", "cppo") and opts.anchor == "rollout":
        mu = _response_tensor(ctx, ROLLOUT_LOGP_KEY, log_prob)
        if mu is None:
            raise ValueError(f"{spec.name} with policy_loss.rlvr.anchor=rollout needs the batch field "
                             f"{ROLLOUT_LOGP_KEY!r} (rollout.calculate_log_probs=True) or "
                             "loss_context(rollout_log_probs=)")
    # one check (one host sync) of every input on the loss tokens, before any of the math, as RLVRLoss does;
    # padding (response_mask == 0) may hold anything and is never read
    _check_finite(spec.name, valid_b, (("old_log_prob", old_log_prob), ("advantages", advantages),
                                       ("rollout_is_weights", rollout_is_weights), ("entropy", entropy),
                                       (DELTA_COEF_KEY, coef), (ROLLOUT_LOGP_KEY, mu)))
    q, step, sched = _schedule_value(spec, config, opts, ctx)
    cfg = _loss_config(spec, config, opts, loss_agg_mode, sched)
    B, T = log_prob.shape
    valid = response_mask.to(torch.float32)
    mask = _ensure_tp_mask(spec, cfg, valid, q, ctx, gbi, loss_agg_mode)
    logp = log_prob.float()
    old = old_log_prob.detach().float()
    if entropy is not None:
        entropy = entropy.detach().float()
    if coef is not None:
        coef = coef.detach().float()
    mu = old if mu is None else mu.detach().float()
    is_ratio = rollout_is_weights.detach().float() if rollout_is_weights is not None else None
    rows = _loss.Rows(mask=mask, adv=advantages.detach().float(), old=old, mu=mu, is_ratio=is_ratio, coef=coef)
    one = torch.ones((), dtype=torch.float32, device=log_prob.device)
    loss_unnorm, sums, active = _loss.token_pass(cfg, logp, entropy, rows, q, one, one)
    norm = _normaliser(cfg, active, T, gbi)
    loss = loss_unnorm / norm
    return loss, _metrics(sums, valid, mask, logp, old, q, step, coef)


def _nonfinite_flags(valid: torch.Tensor, named) -> list:
    """For each ``(name, tensor)`` (tensors broadcastable to ``valid [bs, T]``): whether it has a NaN / +-inf on a
    ``valid`` position. One device-to-host transfer for all of them."""
    if not named:
        return []
    flags = torch.stack([(valid & ~torch.isfinite(t)).any() for _, t in named])
    return flags.tolist()


def _check_finite(loss_name: str, valid: torch.Tensor, named) -> None:
    named = [(n, t) for n, t in named if t is not None]
    for (name, _), bad in zip(named, _nonfinite_flags(valid, named)):
        if bad:
            raise ValueError(f"{loss_name}: {name} has non-finite values on loss tokens (response_mask == 1); "
                             "padding may hold anything, the tokens the loss reads may not")


def _metrics(sums, valid, mask, logp, old, q, step, coef) -> dict:
    """Floats, as verl's own losses return them (verl wraps them in its ``Metric``, mean over micro-batches)."""
    act = sums.active.clamp(min=1.0)
    on = mask > 0  # a select: log-probs at padding may be NaN / -inf (NaN * 0 is NaN)
    kl = torch.where(on, old - logp.detach(), torch.zeros((), dtype=old.dtype, device=old.device))
    m = {
        "rlvr/clip_ratio": (sums.clipped / act).item(),
        "rlvr/clip_ratio_low": (sums.low_clipped / act).item(),
        "rlvr/clip_ratio_high": (sums.high_clipped / act).item(),
        "rlvr/active_fraction": (sums.active / valid.sum().clamp(min=1.0)).item(),
        "rlvr/ppo_kl": (kl.sum() / mask.sum().clamp(min=1.0)).item(),
    }
    if sums.entropy is not None:
        m["rlvr/entropy"] = (sums.entropy / act).item()
    if sums.trust_masked is not None:
        m["rlvr/trust_region_masked_fraction"] = (sums.trust_masked / act).item()
    if sums.cppo_delta_b_sum is not None:
        m["rlvr/cppo_delta_b_mean"] = (sums.cppo_delta_b_sum / max(1, int((valid.sum(-1) > 0).sum()))).item()
    if q is not None:
        m["rlvr/schedule_value"] = float(q)
        m["rlvr/step"] = float(step)
    if coef is not None:
        sel = coef[valid > 0]
        m["rlvr/delta_coef_std"] = float(sel.std().item()) if sel.numel() > 1 else 0.0
    return m


def _make_loss(spec: _Spec) -> Callable:
    def policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                    rollout_is_weights: Optional[torch.Tensor] = None):
        return _policy_loss(spec, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                            rollout_is_weights)

    policy_loss.__name__ = policy_loss.__qualname__ = spec.name
    policy_loss.__doc__ = (f"verl policy loss {spec.name!r}: trust region {spec.trust!r}, credit rule "
                           f"{spec.credit or 'none'!r} (rlvr_kernels token math). verl's signature; returns "
                           "(loss, metrics).")
    policy_loss.rlvr_spec = spec
    return policy_loss


def _specs() -> dict:
    out = {}
    for trust in TRUST_REGIONS:
        out[f"rlvr_{trust}"] = _Spec(f"rlvr_{trust}", trust, None)
    for credit in CREDIT_RULES:
        for trust in TRUST_REGIONS:
            name = f"rlvr_{credit}" if trust == "clip" else f"rlvr_{credit}_{trust}"
            out[name] = _Spec(name, trust, credit)
    return out


_SPECS = _specs()
LOSS_NAMES = tuple(_SPECS)
_LOSSES = {name: register_policy_loss(name)(_make_loss(spec)) for name, spec in _SPECS.items()}


# ----------------------------------------------------------------------------------------------------------------
# fused forward (verl's ``use_fused_kernels`` hook)

# model types for which verl ships its own (multimodal) fused forward; ours only handles text causal LMs
_UNSUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "qwen3_5", "qwen3_5_moe",
                            "kimi_vl")


def _rlvr_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                  inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                  return_dict=None, cache_position=None, logits_to_keep=0, temperature=1.0, shift_labels=None,
                  **kwargs):
    from verl.models.transformers.dense_common import CausalLMOutputForPPO

    base = getattr(self, self.base_model_prefix, None) if getattr(self, "base_model_prefix", "") else None
    if base is None:
        base = self.get_decoder()
    extra = dict(kwargs)
    if output_attentions is not None:
        extra["output_attentions"] = output_attentions
    if output_hidden_states is not None:
        extra["output_hidden_states"] = output_hidden_states
    outputs = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                   cache_position=cache_position, **extra)
    hidden = outputs[0]
    # verl's convention: the label of position t is the token at t + 1 (wrapping at the end); the engine passes
    # globally rolled ``shift_labels`` on its packed path.
    if shift_labels is not None:
        rolled = shift_labels
    elif labels is not None:
        rolled = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise RuntimeError("the rlvr fused forward needs input_ids, labels or shift_labels")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError("the rlvr fused forward takes one temperature per call "
                             "(verl's fused path asserts the same)")
        temperature = float(temperature.item())
    head = self.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    dev = hidden.device.type
    # Under autocast the GEMM runs in the autocast dtype (as a plain lm_head would); our op then keeps its fp32
    # statistics and dtype checks, so autocast is disabled inside it.
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    with torch.autocast(device_type=dev, enabled=False):
        logp, ent = fused_linear_logprobs(hidden.to(dt), weight.to(dt), rolled.long(),
                                          bias=None if bias is None else bias.to(dt), temperature=float(temperature),
                                          backend=getattr(self, "_rlvr_backend", "auto"))
    out = CausalLMOutputForPPO(log_probs=logp, entropy=ent, past_key_values=getattr(outputs, "past_key_values", None),
                               hidden_states=getattr(outputs, "hidden_states", None),
                               attentions=getattr(outputs, "attentions", None))
    return out if return_dict is not False else out.to_tuple()


def patch_forward_with_rlvr(model, *, backend: str = "auto"):
    """Make ``model(...)`` (a Hugging Face causal LM) return verl's ``CausalLMOutputForPPO(log_probs, entropy)``.

    Same contract as verl's ``use_fused_kernels`` forwards (``verl.models.transformers.dense_common``): keyword
    ``temperature`` (a float), labels rolled by -1 (``shift_labels`` when given, else ``labels``, else
    ``input_ids``), ``log_probs`` and ``entropy`` fp32 with the leading shape of ``input_ids``, both differentiable;
    computed by :func:`rlvr_kernels.fused_linear_logprobs` from the last hidden states and ``lm_head`` without the
    ``[tokens, vocab]`` logits (on the Triton backend). Patches this instance only; returns ``model``.
    ``backend`` as in :func:`rlvr_kernels.fused_linear_logprobs`.
    """
    from rlvr_kernels._backend import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype in _UNSUPPORTED_MODEL_TYPES:
        raise NotImplementedError(f"the rlvr fused forward handles text causal LMs; {mtype!r} has its own multimodal "
                                  "forward in verl (use fused_kernel_options.impl_backend=triton|torch for it)")
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise ValueError("patch_forward_with_rlvr needs a causal LM with an lm_head (get_output_embeddings())")
    model.forward = types.MethodType(_rlvr_forward, model)
    model._rlvr_backend = backend
    model._verl_fused_kernels_backend = "rlvr"
    return model


_FORWARD_BACKENDS = {"rlvr": "auto", "rlvr_triton": "triton", "rlvr_torch": "torch"}


def _wrap_patch_forward_with_backends(orig):
    if getattr(orig, "_rlvr_wrapped", False):
        return orig

    @functools.wraps(orig)
    def patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend=None, *args, **kwargs):
        if use_fused_kernels and fused_kernels_backend in _FORWARD_BACKENDS:
            patch_forward_with_rlvr(model, backend=_FORWARD_BACKENDS[fused_kernels_backend])
            logger.info("rlvr_kernels: fused log-prob/entropy forward installed on %s", type(model).__name__)
            return None
        return orig(model, use_fused_kernels, fused_kernels_backend, *args, **kwargs)

    patch_forward_with_backends._rlvr_wrapped = True
    return patch_forward_with_backends


# ----------------------------------------------------------------------------------------------------------------
# trainer / worker hooks


def _wrap_update_actor(orig):
    """Trainer side: put k = global_steps and T = total_training_steps into the batch sent to ``update_actor``."""
    if getattr(orig, "_rlvr_wrapped", False):
        return orig

    @functools.wraps(orig)
    def _update_actor(self, batch, *args, **kwargs):
        k = getattr(self, "global_steps", None)
        info = {}
        if isinstance(k, numbers.Integral) and not isinstance(k, bool):
            info[STEP_KEY] = int(k)
        t = getattr(self, "total_training_steps", None)
        if isinstance(t, numbers.Integral) and not isinstance(t, bool):
            info[TOTAL_STEPS_KEY] = int(t)
        target = getattr(batch, "extra_info", None)  # v1: KVBatchMeta
        if not isinstance(target, dict):
            target = getattr(batch, "meta_info", None)  # legacy: DataProto
        if isinstance(target, dict):
            target.update(info)
        return orig(self, batch, *args, **kwargs)

    _update_actor._rlvr_wrapped = True
    return _update_actor


def _non_tensor(data, key):
    if data is None or not hasattr(data, "keys") or key not in data.keys():
        return None
    from verl.utils import tensordict_utils as tu

    v = tu.get_non_tensor_data(data=data, key=key, default=None)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    return v


_warned_lr = []


def _scheduler_updates(engine) -> Optional[int]:
    sched = getattr(engine, "lr_scheduler", None)
    if sched is None:
        return None
    for obj in (sched, *(getattr(sched, "schedulers", None) or [])[:1]):
        for attr in ("last_epoch", "num_steps"):  # torch LRScheduler / Megatron OptimizerParamScheduler
            v = getattr(obj, attr, None)
            if isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0:
                return int(v)
    return None


def _step_from_worker(worker, data) -> dict:
    """The step of the update about to run: from the batch (trainer hook, exact), else from the number of updates
    the actor's LR scheduler has made (verl steps it once per ``update_actor``; restored with checkpoints that keep
    'extra'; it lags ``global_steps`` by ``trainer.critic_warmup`` and counts local updates in the v1 async modes)."""
    k = _non_tensor(data, STEP_KEY)
    if k is not None:
        out = {"step": _check_step(k, STEP_KEY), "source": "trainer"}
        t = _non_tensor(data, TOTAL_STEPS_KEY)
        if t is not None:
            out["total_steps"] = _check_step(t, TOTAL_STEPS_KEY)
        return out
    n = _scheduler_updates(getattr(worker, "engine", None))
    if n is not None:
        if not _warned_lr:
            _warned_lr.append(True)
            logger.warning("rlvr_kernels: the batch carries no %s (the trainer process did not load "
                           "rlvr_kernels.integrations.verl); using the actor LR scheduler's update count + 1 as the "
                           "step (off by trainer.critic_warmup when that is set)", STEP_KEY)
        return {"step": n + 1, "source": "lr_scheduler"}
    return {}


def _actor_config(loss_fn):
    kw = getattr(loss_fn, "keywords", None)
    return kw.get("config", None) if isinstance(kw, dict) else None


def _apply_keep(data, key: str, keep: torch.Tensor) -> None:
    t = data.get(key)
    if t.is_nested:
        offsets = t.offsets()
        lengths = offsets.diff()
        padded = t.to_padded_tensor(0)
        sel = torch.arange(padded.shape[1], device=padded.device)[None, :] < lengths[:, None]
        k = keep[:, : padded.shape[1]].to(padded.device)
        vals = (padded.bool() & k if padded.dtype == torch.bool else padded * k.to(padded.dtype))[sel]
        data[key] = torch.nested.nested_tensor_from_jagged(vals, offsets)
    else:
        k = keep[:, : t.shape[1]].to(t.device)
        data[key] = t & k if t.dtype == torch.bool else t * k.to(t.dtype)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_nested != b.is_nested:
        return False
    if a.is_nested:
        return torch.equal(a.offsets().cpu(), b.offsets().cpu())
    return tuple(a.shape) == tuple(b.shape)


def _cut_batch_for_tp(data, config, ctx) -> Optional[float]:
    """Apply TP-Schedule's cut-off to ``response_mask`` (and ``loss_mask``) of the update's batch; returns q."""
    spec = _SPECS.get(_loss_mode(config) or "")
    if spec is None or spec.credit != "tp_schedule" or ctx.get("step") is None or "response_mask" not in data.keys():
        return None
    opts = _options(config)
    total = _resolve_total_steps(config, opts, ctx)
    if total is None:
        return None  # the loss raises with an explanation
    q = float(_schedule(opts, total)(ctx["step"]))
    rm = data.get("response_mask")
    valid = (rm.to_padded_tensor(0) if rm.is_nested else rm) != 0
    from rlvr_kernels.credit import tp_schedule_mask

    keep = tp_schedule_mask(valid, q, backend=opts.backend)
    lm = data.get("loss_mask") if "loss_mask" in data.keys() else None
    same = lm is rm
    _apply_keep(data, "response_mask", keep)
    if lm is not None:
        if same:
            data["loss_mask"] = data.get("response_mask")
        elif _same_layout(lm, rm):
            _apply_keep(data, "loss_mask", keep)
        else:
            raise RuntimeError("rlvr_tp_schedule: loss_mask does not have the layout of response_mask; cannot apply "
                               "the cut-off consistently (unsupported verl batch layout)")
    return q


# ----------------------------------------------------------------------------------------------------------------
# DelTA coefficients, computed in the worker at the start of each actor update
#
# verl 0.9.1 computes old_log_probs (RayPPOTrainer.fit -> _compute_old_log_prob; v1 PPOTrainer._step_once ->
# _compute_old_log_prob) BEFORE the advantages (compute_advantage, on the driver), so the old-log-prob forward
# cannot produce the coefficients, which need both. The first point where h (theta_old), old_log_probs, advantages
# and response_mask are all at hand on the workers is TrainingWorker.train_mini_batch (called by
# ActorRolloutRefWorker.update_actor) before its mini-batch loop: no optimizer step has run for this rollout batch,
# so the actor's weights are still theta_old. There the hook runs no-grad forwards of the actor through verl's own
# engine (``engine.infer_batch`` in ``engine.eval_mode()``: the engine's micro-batching, padding removal, Ulysses
# SP gather and fused kernels), captures the final hidden state fed to lm_head (a forward pre-hook on lm_head, as the
# official ``compute_log_prob_h``; a forward hook on the decoder when a fused forward bypasses lm_head), and
# streams each micro-batch's response tokens into a DeltaEstimator; the result becomes the batch field
# ``rlvr_delta_coef``, which verl's mini-batch iterator then splits like ``advantages``.

_DELTA_ROW_KEY = "rlvr_delta_row"  # temporary row index of the estimation forward (micro-batches may be reordered)


def _padded_response(t: torch.Tensor) -> torch.Tensor:
    return t.to_padded_tensor(0) if t.is_nested else t


def _fit_width(t: torch.Tensor, width: int) -> torch.Tensor:
    if t.shape[1] < width:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))
    return t[:, :width]


def _as_layout_of(ref: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
    """``padded [bs, R]`` in the layout of the batch field ``ref``: dense ``[bs, R']`` (legacy trainer) or jagged
    over the responses (v1 trainer, ``response_to_nested``)."""
    if ref.is_nested:
        offsets = ref.offsets()
        lengths = offsets.diff().to(padded.device)
        width = int(lengths.max()) if lengths.numel() else 0
        p = _fit_width(padded, max(width, 1))
        sel = torch.arange(p.shape[1], device=p.device)[None, :] < lengths[:, None]
        return torch.nested.nested_tensor_from_jagged(p[sel].to(ref.device), offsets)
    return _fit_width(padded, ref.shape[1]).to(ref.device)


def _causal_lm(engine):
    """``(lm, lm_head, decoder)`` of the engine's Hugging Face causal LM (FSDP / FSDP2 / PEFT wrappers looked
    through)."""
    root = getattr(engine, "module", None)
    if isinstance(root, torch.nn.Module):
        from transformers import PreTrainedModel

        for m in root.modules():
            if not isinstance(m, PreTrainedModel) or not hasattr(m, "get_output_embeddings"):
                continue
            head = m.get_output_embeddings()
            if not isinstance(head, torch.nn.Module):
                continue
            prefix = getattr(m, "base_model_prefix", "")
            dec = getattr(m, prefix, None) if prefix else None
            if not isinstance(dec, torch.nn.Module) or dec is m:
                dec = m.get_decoder() if hasattr(m, "get_decoder") else None
            return m, head, dec if isinstance(dec, torch.nn.Module) and dec is not m else None
    raise NotImplementedError(
        f"rlvr_delta: the automatic DelTA coefficients need an engine whose .module holds a Hugging Face causal LM "
        f"with an lm_head (verl's fsdp / fsdp2 engines); got {type(engine).__name__}. Put the coefficients in the "
        f"batch field {DELTA_COEF_KEY!r} yourself (rlvr_kernels.delta_coefficients) for other engines")


def _packed_hidden(engine, h: torch.Tensor, mb) -> torch.Tensor:
    """The captured hidden states of one micro-batch as ``[total_nnz, H]`` in the order of its nested ``input_ids``
    (the layout of verl's ``log_probs`` model output)."""
    ids = mb["input_ids"]
    if not (isinstance(ids, torch.Tensor) and ids.is_nested):
        raise NotImplementedError("rlvr_delta: the automatic coefficients need verl's no-padding batch layout "
                                  "(nested input_ids, left_right_2_no_padding)")
    offsets = ids.offsets()
    nnz = int(offsets[-1])
    if _tu_get(mb, "use_remove_padding", True):
        h = h.reshape(-1, h.shape[-1])  # (1, nnz_local + pad, H)
        sp = int(getattr(engine, "ulysses_sequence_parallel_size", 1) or 1)
        pad = h.shape[0] * sp - nnz
        if sp > 1 or pad:
            gather = getattr(engine, "_gather_and_unpad_packed", None)
            if gather is not None:
                h = gather(h, pad)
            elif sp == 1:
                h = h[:nnz]
            else:
                raise NotImplementedError("rlvr_delta: this engine has sequence parallelism but no "
                                          "_gather_and_unpad_packed to gather the hidden states")
    else:  # padded (bs, max_seq_len, H), right-padded per sequence (prepare_model_inputs)
        lens = offsets.diff().to(h.device)
        h = h[torch.arange(h.shape[1], device=h.device)[None, :] < lens[:, None]]
    if h.shape[0] != nnz:
        raise RuntimeError(f"rlvr_delta: captured {h.shape[0]} hidden states for {nnz} tokens (unsupported engine "
                           "layout)")
    return h


def _tu_get(data, key, default=None):
    from verl.utils import tensordict_utils as tu

    return tu.get_non_tensor_data(data=data, key=key, default=default)


def _delta_forward(worker, td_base, visit: Callable) -> None:
    """One no-grad forward of the actor (theta_old) over the rank's batch through verl's engine; calls
    ``visit(mb, h_packed)`` per micro-batch with the lm_head input ``[total_nnz, H]``."""
    from verl.utils import tensordict_utils as tu

    engine = worker.engine
    _, head, dec = _causal_lm(engine)
    td = td_base.copy()  # shallow: the engine writes non-tensor keys into it
    ec = getattr(worker, "engine_config", None)
    mc = getattr(worker, "model_config", None) or {}

    def cfg(name, fallback=None):
        v = getattr(ec, name, None) if ec is not None else None
        return fallback if v is None else v

    defaults = dict(  # as TrainingWorker.infer_batch
        use_remove_padding=mc.get("use_remove_padding", False) if hasattr(mc, "get") else False,
        use_dynamic_bsz=cfg("use_dynamic_bsz", False),
        max_token_len_per_gpu=cfg("infer_max_token_len_per_gpu", cfg("max_token_len_per_gpu")),
        micro_batch_size_per_gpu=cfg("infer_micro_batch_size_per_gpu", cfg("micro_batch_size_per_gpu")),
        use_fused_kernels=cfg("use_fused_kernels", False),
    )
    tu.assign_non_tensor(td, **{k: v for k, v in defaults.items() if k not in td.keys()})
    tu.assign_non_tensor(td, calculate_entropy=False, calculate_sum_pi_squared=False, distillation_use_topk=False,
                         distillation_only=False, compute_loss=True, return_model_output=False)
    cap: dict = {}

    def pre(_mod, args, kwargs):
        x = args[0] if args else kwargs.get("input", None)
        if isinstance(x, torch.Tensor):
            cap["head"] = x.detach()

    def post(_mod, _args, _kwargs, out):
        x = out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out
        if isinstance(x, torch.Tensor):
            cap["decoder"] = x.detach()

    def collect(model_output=None, data=None, dp_group=None, **_):
        h = cap.get("head", cap.get("decoder"))
        cap.clear()
        if h is None:
            raise RuntimeError("rlvr_delta: no hidden state was captured during the actor forward")
        visit(data, _packed_hidden(engine, h, data))
        return torch.zeros(()), {}

    hooks = [head.register_forward_pre_hook(pre, with_kwargs=True)]
    if dec is not None:
        hooks.append(dec.register_forward_hook(post, with_kwargs=True))
    try:
        with engine.eval_mode():
            engine.infer_batch(td, loss_function=collect)
    finally:
        for hk in hooks:
            hk.remove()


def _delta_for_update(worker, data, config, ctx) -> Optional[str]:
    """Compute ``rlvr_delta_coef`` for the rank's rollout batch ``data`` (a ``rlvr_delta*`` loss only).

    Returns where the coefficients come from: ``"context"`` (``loss_context(delta_coefficients=)``), ``"batch"``
    (a batch field the user set: both take precedence and nothing is computed), ``"computed"``, or None."""
    spec = _SPECS.get(_loss_mode(config) or "")
    if spec is None or spec.credit != "delta":
        return None
    if ctx.get("delta_coef") is not None:
        return "context"
    if DELTA_COEF_KEY in data.keys():
        return "batch"
    missing = [k for k in ("advantages", "old_log_probs", "response_mask") if k not in data.keys()]
    if missing:
        raise ValueError(f"{spec.name}: the DelTA coefficients need the batch fields {missing} at update_actor")
    from rlvr_kernels.delta import DeltaEstimator

    opts = _options(config)
    mask = (_padded_response(data.get("response_mask")) != 0).cpu()  # bookkeeping on the host
    bs, R = mask.shape
    adv = _fit_width(_padded_response(data.get("advantages")).float().cpu(), R)
    old = _fit_width(_padded_response(data.get("old_log_probs")).float().cpu(), R)
    coef = torch.zeros(bs, R, dtype=torch.float32)
    lam_min, lam_max = float(opts.delta_lam_min), float(opts.delta_lam_max)
    if lam_min == lam_max:  # c = 1 on every valid token: no forward needed
        data[DELTA_COEF_KEY] = _as_layout_of(data.get("advantages"), mask.to(torch.float32))
        return "computed"
    all_reduce = None
    if opts.delta_all_reduce:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("policy_loss.rlvr.delta_all_reduce=true needs torch.distributed (the DP group)")
        group = worker.engine.get_data_parallel_group() if hasattr(worker.engine, "get_data_parallel_group") else None
        all_reduce = functools.partial(torch.distributed.all_reduce, group=group)
    _, head, _ = _causal_lm(worker.engine)
    H = getattr(head, "in_features", None)
    est = DeltaEstimator(iters=int(opts.delta_iters), lam_min=lam_min, lam_max=lam_max,
                         exclude_zero_adv=bool(opts.delta_exclude_zero_adv), all_reduce=all_reduce,
                         backend=opts.backend, hidden_size=H if isinstance(H, int) else None)
    td = data.copy()
    td[_DELTA_ROW_KEY] = torch.arange(bs, device=data.get("response_mask").device)
    cache = opts.delta_hidden_cache

    def tokens(mb, h):
        """One micro-batch's valid response tokens: ``(rows, sel, h [n, H], old [n], adv [n])``."""
        from verl.workers.utils.padding import no_padding_2_padding

        if est.device is None:
            est.device = h.device  # lets a rank without valid tokens still take part in the all-reduce
        rows = mb[_DELTA_ROW_KEY].long().cpu()
        hr = no_padding_2_padding(h, mb)  # [b, R_mb, H], position t = the state that predicts response token t
        w = min(hr.shape[1], R)
        sel = mask[rows, :w]
        hv = hr[:, :w][sel.to(hr.device)]
        return rows, sel, hv, old[rows, :w][sel], adv[rows, :w][sel]

    def feed(mb_tokens, fn):
        rows, sel, hv, ov, av = mb_tokens
        n = hv.shape[0]
        if n == 0:
            return None
        dev = hv.device if cache != "cpu" else est.device
        hv = hv.to(dev)
        return fn(hv, ov.to(dev), av.to(dev), torch.ones(n, dtype=torch.bool, device=dev),
                  cu_seqlens=torch.tensor([0, n], dtype=torch.int32, device=dev))

    def write(mb_tokens, c):
        rows, sel, _, _, _ = mb_tokens
        if c is None:
            return
        block = torch.zeros(sel.shape, dtype=torch.float32)
        block[sel] = c.float().cpu()
        coef[rows, : sel.shape[1]] = block

    def accumulate(mb, h):
        t = tokens(mb, h)
        write(t, feed(t, est.accumulate))  # the last phase returns the raw coefficients (None before)

    n_forwards = 0
    if cache == "none":  # stream: one forward per phase (K + 3), never more than one micro-batch of h
        for _phase in est.phases():
            _delta_forward(worker, td, accumulate)
            n_forwards += 1
    else:  # one forward; the response tokens' hidden states are kept on the host / the device
        store: list = []

        def keep(mb, h):
            rows, sel, hv, ov, av = tokens(mb, h)
            store.append((rows, sel, hv.cpu() if cache == "cpu" else hv, ov, av))

        _delta_forward(worker, td, keep)
        n_forwards = 1
        for _phase in est.phases():
            for t in store:
                write(t, feed(t, est.accumulate))
        store.clear()
    coef = est.normalise(coef, adv, mask)
    data[DELTA_COEF_KEY] = _as_layout_of(data.get("advantages"), coef)
    logger.debug("rlvr_kernels: DelTA coefficients of %d responses from %d no-grad forward(s)", bs, n_forwards)
    return "computed"


def _request_entropy(data, config) -> None:
    """The forking / entropy-shaped / D^3S losses read the current policy's entropy, which verl's engines compute
    only when the batch says ``calculate_entropy`` (the trainer sets it from ``actor.calculate_entropy`` or a
    non-zero ``entropy_coeff``): switch it on for this update. With ``entropy_coeff = 0`` verl then only logs the
    entropy (``actor/entropy_loss``); the loss is unchanged."""
    spec = _SPECS.get(_loss_mode(config) or "")
    if spec is None or spec.credit not in ("forking", "entropy_adv", "d3s") or not hasattr(data, "keys"):
        return
    if _non_tensor(data, "calculate_entropy"):
        return
    from verl.utils import tensordict_utils as tu

    tu.assign_non_tensor(data, calculate_entropy=True)
    if not _warned_entropy:
        _warned_entropy.append(True)
        logger.info("rlvr_kernels: %s needs the per-token entropy: calculate_entropy switched on for the actor "
                    "update (actor_rollout_ref.actor.calculate_entropy=True does the same)", spec.name)


_warned_entropy: list = []


def _wrap_train_mini_batch(orig):
    """Worker side: the step context, TP-Schedule's batch cut and per-micro-batch context for one actor update."""
    if getattr(orig, "_rlvr_wrapped", False):
        return orig

    @functools.wraps(orig)
    def train_mini_batch(self, data, *args, **kwargs):
        loss_fn = getattr(self, "loss_fn", None)
        config = _actor_config(loss_fn)
        if config is None or not str(_loss_mode(config) or "").startswith("rlvr_"):
            return orig(self, data, *args, **kwargs)
        check_loss_mode(_loss_mode(config))  # before any work (a config built without verl's validation)
        _request_entropy(data, config)
        step = _step_from_worker(self, data)
        ctx = {**_ctx(), **step}
        tp_q = _cut_batch_for_tp(data, config, ctx)
        _delta_for_update(self, data, config, ctx)

        @functools.wraps(loss_fn)
        def micro_batch_loss(*a, **kw):  # verl's engines call loss_function(model_output=, data=, dp_group=)
            model_output = kw.get("model_output", a[0] if len(a) > 0 else None)
            mb = kw.get("data", a[1] if len(a) > 1 else None)
            with loss_context(data=mb, model_output=model_output):
                return loss_fn(*a, **kw)

        scope = dict(step.items())
        if tp_q is not None:
            scope["tp_q"] = tp_q
        self.loss_fn = micro_batch_loss
        _STACK.append({**(_STACK[-1] if _STACK else {}), **scope})
        try:
            return orig(self, data, *args, **kwargs)
        finally:
            _STACK.pop()
            self.loss_fn = loss_fn

    train_mini_batch._rlvr_wrapped = True
    return train_mini_batch


def _patch_attr(owner, name: str, wrap: Callable) -> None:
    cur = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
    if cur is None:
        logger.warning("rlvr_kernels: %s.%s not found; hook not installed (unsupported verl version?)",
                       getattr(owner, "__name__", owner), name)
        return
    new = wrap(cur)
    if new is not cur:
        setattr(owner, name, new)


def _hook_engine_workers(mod):
    _patch_attr(mod.TrainingWorker, "train_mini_batch", _wrap_train_mini_batch)


def _hook_ray_trainer(mod):
    _patch_attr(mod.RayPPOTrainer, "_update_actor", _wrap_update_actor)


def _hook_v1_trainer(mod):
    _patch_attr(mod.PPOTrainer, "_update_actor", _wrap_update_actor)


def _hook_monkey_patch(mod):
    _patch_attr(mod, "patch_forward_with_backends", _wrap_patch_forward_with_backends)


def _wrap_actor_post_init(orig):
    """verl's ``ActorConfig.__post_init__`` (run by ``omega_conf_to_dataclass`` in verl's ``validate_config`` on the
    driver and in every worker; the strategy subclasses call it): also reject a misspelt ``rlvr_*`` loss mode, whichever
    policy-loss config class holds it."""
    if getattr(orig, "_rlvr_wrapped", False):
        return orig

    @functools.wraps(orig)
    def __post_init__(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        check_loss_mode(_loss_mode(self))
        return out

    __post_init__._rlvr_wrapped = True
    return __post_init__


def _hook_actor_config(mod):
    _patch_attr(mod.ActorConfig, "__post_init__", _wrap_actor_post_init)


# verl strategies whose engine passes fused_kernel_options.impl_backend to patch_forward_with_backends (verl 0.9.1:
# FSDPEngine._build_module -> apply_monkey_patch); every other engine never reads impl_backend
_FORWARD_BACKEND_STRATEGIES = ("fsdp", "fsdp2")


def _check_forward_backend(backend, model_config, engine_name: str) -> None:
    opts = getattr(model_config, "fused_kernel_options", None)
    impl = opts.get("impl_backend", None) if hasattr(opts, "get") else None
    if impl not in _FORWARD_BACKENDS or backend in _FORWARD_BACKEND_STRATEGIES:
        return
    setting = f"actor_rollout_ref.model.fused_kernel_options.impl_backend={impl}"
    if bool(getattr(model_config, "use_fused_kernels", False)):
        raise NotImplementedError(
            f"{setting} is not supported by verl's {backend!r} engine ({engine_name}), which never reads "
            f"impl_backend (the Megatron engine runs its own fused forward) and would silently ignore it. The rlvr "
            f"fused forward needs actor_rollout_ref.actor.strategy=fsdp or fsdp2; on {backend!r} drop the override "
            f"(or use verl's own impl_backend)")
    logger.warning("rlvr_kernels: %s has no effect on verl's %r engine (%s), which never reads impl_backend "
                   "(and use_fused_kernels is off); the rlvr fused forward needs strategy=fsdp or fsdp2",
                   setting, backend, engine_name)


def _wrap_engine_new(orig):
    """``EngineRegistry.new`` (TrainingWorker builds every engine through it): refuse ``impl_backend=rlvr`` for an
    engine that would ignore it."""
    func = orig.__func__ if isinstance(orig, classmethod) else orig
    if getattr(func, "_rlvr_wrapped", False):
        return orig

    @functools.wraps(func)
    def new(cls, model_type, backend, *args, **kwargs):
        mc = kwargs.get("model_config", None)
        if mc is not None and hasattr(getattr(mc, "fused_kernel_options", None), "get"):
            try:
                engine_cls = cls.get_engine_cls(model_type, backend)
            except Exception:  # no such engine: verl's own error comes from func below
                engine_cls = None
            if engine_cls is not None:
                _check_forward_backend(backend, mc, engine_cls.__name__)
        return func(cls, model_type, backend, *args, **kwargs)

    new._rlvr_wrapped = True
    return classmethod(new)


def _hook_engine_registry(mod):
    _patch_attr(mod.EngineRegistry, "new", _wrap_engine_new)


_HOOKS: dict[str, list] = {
    "verl.workers.engine_workers": [_hook_engine_workers],
    "verl.trainer.ppo.ray_trainer": [_hook_ray_trainer],
    "verl.trainer.ppo.v1.trainer_base": [_hook_v1_trainer],
    "verl.models.transformers.monkey_patch": [_hook_monkey_patch],
    "verl.workers.config.actor": [_hook_actor_config],
    "verl.workers.engine.base": [_hook_engine_registry],
}


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, name):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _run_hooks(self._name, module)

    def __getattr__(self, item):
        return getattr(self._loader, item)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs the registered hooks right after one of the target modules is first imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS or fullname in sys.modules:
            return None
        for finder in sys.meta_path:
            if type(finder).__name__ == "_PostImportFinder" or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader, fullname)
        return spec


def _run_hooks(name: str, module) -> None:
    for hook in _HOOKS.get(name, ()):
        try:
            hook(module)
        except Exception as exc:  # never break verl's own import
            logger.warning("rlvr_kernels: hook %s on %s failed: %r", hook.__name__, name, exc)


def _when_imported(name: str, hook) -> None:
    """Register ``hook(module)`` for module ``name`` (run now if it is already imported)."""
    _HOOKS.setdefault(name, [])
    if hook not in _HOOKS[name]:
        _HOOKS[name].append(hook)
    mod = sys.modules.get(name)
    if mod is not None:
        try:
            hook(mod)
        except Exception as exc:
            logger.warning("rlvr_kernels: hook %s on %s failed: %r", getattr(hook, "__name__", hook), name, exc)


def install_hooks() -> None:
    """Install the trainer / worker / fused-forward hooks (idempotent; done on import unless ``RLVR_VERL_HOOKS=0``)."""
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())
    for name, hooks in list(_HOOKS.items()):
        mod = sys.modules.get(name)
        if mod is not None:
            for hook in hooks:
                try:
                    hook(mod)
                except Exception as exc:
                    logger.warning("rlvr_kernels: hook %s on %s failed: %r", hook.__name__, name, exc)


if os.environ.get("RLVR_VERL_HOOKS", "1").strip().lower() not in ("0", "false", "no", "off"):
    install_hooks()
