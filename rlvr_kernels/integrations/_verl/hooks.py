"""The trainer / worker / config / engine hooks, and their installation when their verl module is imported.

verl 0.9.1 hands a policy loss nothing but its 7 arguments, so small, idempotent wrappers carry the rest:

- trainer process: ``_update_actor`` of ``RayPPOTrainer`` (legacy) and of the v1 ``PPOTrainer`` writes
  ``rlvr_global_steps`` / ``rlvr_total_training_steps`` into the batch (:func:`wrap_update_actor`);
- worker process: ``TrainingWorker.train_mini_batch`` reads them (else the LR scheduler's count,
  :func:`step_from_worker`), applies TP-Schedule's cut before verl counts tokens (:func:`cut_batch`), computes DelTA's
  coefficients (:func:`rlvr_kernels.integrations._verl.delta_worker.delta_for_update`), switches
  ``calculate_entropy`` on for the losses that read the entropy, and opens the per-micro-batch loss context
  (:func:`wrap_train_mini_batch`);
- configuration: ``ActorConfig.__post_init__`` rejects a misspelt ``rlvr_*`` loss mode;
- engines: ``patch_forward_with_backends`` and ``EngineRegistry.new`` (:mod:`.forward`); the optimal-token baseline
  (``calculate_sum_pi_squared``) with the rlvr forward: ``FSDPEngineWithLMHead.prepare_model_inputs`` /
  ``prepare_model_outputs`` (:mod:`.forward`) and ``MegatronEngineWithLMHead.forward_step`` (:mod:`.megatron`).

Installation: :func:`install_hooks` registers each entry of :data:`_HOOKS` with ``wrapt``'s post-import hooks
(``wrapt.register_post_import_hook``: run when the module is first imported, or at once when it already is). A hook
that fails is logged and never breaks verl's own import.
"""

from __future__ import annotations

import functools
import numbers
import sys
from collections.abc import Callable
from typing import Optional

import torch
import wrapt

from rlvr_kernels.integrations._verl import context as _ctx
from rlvr_kernels.integrations._verl.bypass import hook_rollout_corr_helper
from rlvr_kernels.integrations._verl.context import check_step, current, logger, loss_context, pushed, warn_once
from rlvr_kernels.integrations._verl.delta_worker import delta_for_update
from rlvr_kernels.integrations._verl.forward import (
    wrap_engine_new,
    wrap_patch_forward_with_backends,
    wrap_prepare_model_inputs,
    wrap_prepare_model_outputs,
)
from rlvr_kernels.integrations._verl.losses import loss_config, resolve_total_steps
from rlvr_kernels.integrations._verl.options import (
    STEP_KEY,
    TOTAL_STEPS_KEY,
    cfg_value,
    check_loss_mode,
    loss_mode_of,
    options_of,
    spec_of,
)
from rlvr_kernels.methods import make_schedule

# ----------------------------------------------------------------------------------------------------------------
# trainer side


def wrap_update_actor(orig):
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


# ----------------------------------------------------------------------------------------------------------------
# worker side


def _non_tensor(data, key):
    if data is None or not hasattr(data, "keys") or key not in data.keys():
        return None
    from verl.utils import tensordict_utils as tu

    v = tu.get_non_tensor_data(data=data, key=key, default=None)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    return v


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


def step_from_worker(worker, data) -> dict:
    """The step of the update about to run: from the batch (trainer hook, exact), else from the number of updates
    the actor's LR scheduler has made (verl steps it once per ``update_actor``; restored with checkpoints that keep
    'extra'; it lags ``global_steps`` by ``trainer.critic_warmup`` and counts local updates in the v1 async modes)."""
    k = _non_tensor(data, STEP_KEY)
    if k is not None:
        out = {"step": check_step(k, STEP_KEY), "source": "trainer"}
        t = _non_tensor(data, TOTAL_STEPS_KEY)
        if t is not None:
            out["total_steps"] = check_step(t, TOTAL_STEPS_KEY)
        return out
    n = _scheduler_updates(getattr(worker, "engine", None))
    if n is not None:
        if warn_once("lr_scheduler_step"):
            logger.warning(
                "rlvr_kernels: the batch carries no %s (the trainer process did not load "
                "rlvr_kernels.integrations.verl); using the actor LR scheduler's update count + 1 as the "
                "step (off by trainer.critic_warmup when that is set)",
                STEP_KEY,
            )
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


def cut_batch(data, config, ctx) -> Optional[float]:
    """Apply the credit rule's static mask (TP-Schedule's cut-off at q(k)) to ``response_mask`` (and ``loss_mask``)
    of the update's batch, before verl counts its tokens; returns q (None: nothing cut, the loss decides)."""
    spec = spec_of(config)
    if spec is None or not spec.cuts_batch or ctx.get("step") is None or "response_mask" not in data.keys():
        return None
    opts = options_of(config)
    if not spec.uses_schedule(opts.schedule):
        return None
    total = resolve_total_steps(config, opts, ctx)
    if total is None:
        return None  # the loss raises with an explanation
    sched = make_schedule(opts, total)
    q = float(sched(ctx["step"]))
    rm = data.get("response_mask")
    valid = (rm.to_padded_tensor(0) if rm.is_nested else rm) != 0
    cfg = loss_config(spec, config, opts, cfg_value(config, "loss_agg_mode", "token-mean"), sched)
    keep = spec.rule.static_mask(cfg, valid.to(torch.float32), q) != 0
    lm = data.get("loss_mask") if "loss_mask" in data.keys() else None
    same = lm is rm
    _apply_keep(data, "response_mask", keep)
    if lm is not None:
        if same:
            data["loss_mask"] = data.get("response_mask")
        elif _same_layout(lm, rm):
            _apply_keep(data, "loss_mask", keep)
        else:
            raise RuntimeError(
                f"{spec.name}: loss_mask does not have the layout of response_mask; cannot apply "
                "the cut-off consistently (unsupported verl batch layout)"
            )
    return q


def _request_entropy(data, config) -> None:
    """The losses whose credit rule reads the current policy's entropy (forking, entropy-shaped, D^3S): verl's
    engines compute it only when the batch says ``calculate_entropy`` (the trainer sets it from
    ``actor.calculate_entropy`` or a non-zero ``entropy_coeff``), so switch it on for this update. With
    ``entropy_coeff = 0`` verl then only logs the entropy (``actor/entropy_loss``); the loss is unchanged."""
    spec = spec_of(config)
    if spec is None or "entropy" not in spec.rule.needs or not hasattr(data, "keys"):
        return
    if _non_tensor(data, "calculate_entropy"):
        return
    from verl.utils import tensordict_utils as tu

    tu.assign_non_tensor(data, calculate_entropy=True)
    if warn_once("calculate_entropy"):
        logger.info(
            "rlvr_kernels: %s needs the per-token entropy: calculate_entropy switched on for the actor "
            "update (actor_rollout_ref.actor.calculate_entropy=True does the same)",
            spec.name,
        )


def wrap_train_mini_batch(orig):
    """Worker side: the step context, TP-Schedule's batch cut, DelTA's coefficients and the per-micro-batch context
    for one actor update."""
    if getattr(orig, "_rlvr_wrapped", False):
        return orig

    @functools.wraps(orig)
    def train_mini_batch(self, data, *args, **kwargs):
        loss_fn = getattr(self, "loss_fn", None)
        config = _actor_config(loss_fn)
        if config is None or not str(loss_mode_of(config) or "").startswith("rlvr_"):
            return orig(self, data, *args, **kwargs)
        check_loss_mode(loss_mode_of(config))  # before any work (a config built without verl's validation)
        _request_entropy(data, config)
        step = step_from_worker(self, data)
        ctx = {**current(), **step}
        tp_q = cut_batch(data, config, ctx)
        delta_for_update(self, data, config, ctx)

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
        try:
            with pushed(scope):
                return orig(self, data, *args, **kwargs)
        finally:
            self.loss_fn = loss_fn

    train_mini_batch._rlvr_wrapped = True
    return train_mini_batch


# ----------------------------------------------------------------------------------------------------------------
# configuration


def _wrap_actor_post_init(orig):
    """verl's ``ActorConfig.__post_init__`` (run by ``omega_conf_to_dataclass`` in verl's ``validate_config`` on the
    driver and in every worker; the strategy subclasses call it): also reject a misspelt ``rlvr_*`` loss mode,
    whichever policy-loss config class holds it."""
    if getattr(orig, "_rlvr_wrapped", False):
        return orig

    @functools.wraps(orig)
    def __post_init__(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        check_loss_mode(loss_mode_of(self))
        return out

    __post_init__._rlvr_wrapped = True
    return __post_init__


# ----------------------------------------------------------------------------------------------------------------
# installation


def _patch_attr(owner, name: str, wrap: Callable) -> None:
    cur = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
    if cur is None:
        logger.warning(
            "rlvr_kernels: %s.%s not found; hook not installed (unsupported verl version?)",
            getattr(owner, "__name__", owner),
            name,
        )
        return
    new = wrap(cur)
    if new is not cur:
        setattr(owner, name, new)


def _hook_engine_workers(mod):
    _patch_attr(mod.TrainingWorker, "train_mini_batch", wrap_train_mini_batch)


def _hook_ray_trainer(mod):
    _patch_attr(mod.RayPPOTrainer, "_update_actor", wrap_update_actor)


def _hook_v1_trainer(mod):
    _patch_attr(mod.PPOTrainer, "_update_actor", wrap_update_actor)


def _hook_monkey_patch(mod):
    _patch_attr(mod, "patch_forward_with_backends", wrap_patch_forward_with_backends)


def _hook_actor_config(mod):
    _patch_attr(mod.ActorConfig, "__post_init__", _wrap_actor_post_init)


def _hook_engine_registry(mod):
    _patch_attr(mod.EngineRegistry, "new", wrap_engine_new)


def _hook_fsdp_engine(mod):
    _patch_attr(mod.FSDPEngineWithLMHead, "prepare_model_inputs", wrap_prepare_model_inputs)
    _patch_attr(mod.FSDPEngineWithLMHead, "prepare_model_outputs", wrap_prepare_model_outputs)


def _hook_megatron_engine(mod):
    from rlvr_kernels.integrations._verl.megatron import wrap_megatron_forward_step

    _patch_attr(mod.MegatronEngineWithLMHead, "forward_step", wrap_megatron_forward_step)


#: verl module -> the hooks applied to it once it is imported (what :func:`install_hooks` registers).
_HOOKS: dict[str, tuple] = {
    "verl.workers.engine_workers": (_hook_engine_workers,),
    "verl.trainer.ppo.ray_trainer": (_hook_ray_trainer,),
    "verl.trainer.ppo.v1.trainer_base": (_hook_v1_trainer,),
    "verl.models.transformers.monkey_patch": (_hook_monkey_patch,),
    "verl.workers.config.actor": (_hook_actor_config,),
    "verl.workers.engine.base": (_hook_engine_registry,),
    "verl.workers.engine.fsdp.transformer_impl": (_hook_fsdp_engine,),
    "verl.workers.engine.megatron.transformer_impl": (_hook_megatron_engine,),
    "verl.trainer.ppo.rollout_corr_helper": (hook_rollout_corr_helper,),
}


def _guarded(name: str, hook: Callable) -> Callable:
    def run(module) -> None:
        try:
            hook(module)
        except Exception as exc:  # never break verl's own import
            logger.warning("rlvr_kernels: hook %s on %s failed: %r", getattr(hook, "__name__", hook), name, exc)

    return run


def _when_imported(name: str, hook: Callable) -> None:
    """Run ``hook(module)`` once module ``name`` is imported, or now if it already is (the hooks are idempotent);
    a pair registered before and still waiting for its import is not registered twice."""
    if (name, hook) in _ctx._INSTALLED and name not in sys.modules:
        return  # registered, waiting for the import
    _ctx._INSTALLED.add((name, hook))
    wrapt.register_post_import_hook(_guarded(name, hook), name)


def install_hooks() -> None:
    """Install the trainer / worker / fused-forward hooks (idempotent; done on import unless ``RLVR_VERL_HOOKS=0``)."""
    for name, hooks in _HOOKS.items():
        for hook in hooks:
            _when_imported(name, hook)
