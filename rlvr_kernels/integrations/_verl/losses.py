"""The ``rlvr_*`` policy losses and their registration with verl's ``register_policy_loss``.

Each loss has verl's call signature ``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
rollout_is_weights)`` and returns ``(loss, metrics)``. What it computes comes from its catalogue entries
(:class:`rlvr_kernels.methods.CreditRule` / ``TrustRegion``): the inputs it reads (``rule.needs``,
``region.needs_anchor``), whether it follows q(k) (``rule.uses_schedule``), its static mask and its objective
(``region.loss_type``). The token math is :func:`rlvr_kernels.loss.token_pass`; the divisor is verl's ``agg_loss``
one (``reference.loss.normalizer`` with verl's ``global_batch_info``). Inputs that verl does not pass (the step,
the entropy, DelTA coefficients, rollout log-probs) come from :mod:`.context`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from verl.trainer.ppo.core_algos import register_policy_loss

from rlvr_kernels import loss as _loss
from rlvr_kernels import methods as M
from rlvr_kernels.integrations._verl.context import current, response_tensor
from rlvr_kernels.integrations._verl.options import (
    DELTA_COEF_KEY,
    ROLLOUT_LOGP_KEY,
    SPECS,
    LossSpec,
    Options,
    cfg_value,
    options_of,
)
from rlvr_kernels.loss.config import LOSS_METHOD_OPTIONS
from rlvr_kernels.reference import loss as _ref_loss
from rlvr_kernels.schedule import TemporalSchedule

_STEP_HELP = (
    "it needs verl's training step: load this module in the trainer and the workers "
    "(VERL_USE_EXTERNAL_MODULES=rlvr_kernels.integrations.verl, see the README) so that its hooks pass "
    "global_steps with the batch, or call rlvr_kernels.integrations.verl.set_training_step(k) in a custom loop"
)
_HOOK_HELP = (
    "load this module in the workers: VERL_USE_EXTERNAL_MODULES=rlvr_kernels.integrations.verl, RLVR_VERL_HOOKS unset"
)


def resolve_total_steps(config, opts: Options, ctx: dict) -> Optional[int]:
    if opts.total_steps is not None:
        return int(opts.total_steps)
    if ctx.get("total_steps") is not None:
        return int(ctx["total_steps"])
    optim = cfg_value(config, "optim", None)
    if optim is not None:
        t = (
            optim.get("total_training_steps", None)
            if hasattr(optim, "get")
            else getattr(optim, "total_training_steps", None)
        )
        if t is not None and int(t) > 0:
            return int(t)
    return None


def _schedule_value(spec: LossSpec, config, opts: Options, ctx: dict):
    """``(q, step, schedule)`` of the current update, or Nones when the loss has no schedule."""
    if not spec.uses_schedule(opts.schedule):
        return None, None, None
    step = ctx.get("step")
    if step is None:
        raise RuntimeError(f"{spec.name}: {_STEP_HELP}")
    total = resolve_total_steps(config, opts, ctx)
    if total is None:
        raise RuntimeError(
            f"{spec.name}: the schedule needs the total number of training steps; set "
            "policy_loss.rlvr.total_steps (verl sets actor.optim.total_training_steps itself)"
        )
    sched = M.make_schedule(opts, total)
    return float(sched(step)), step, sched


def _thresholds(region: M.TrustRegion, low: float, high: float, clip_c: float, opts: Options) -> dict:
    """verl's clip settings in the terms of the region's objective (``TrustRegion.thresholds``)."""
    if "ratio_cap" in region.options:  # DPPO / CPPO: verl's truncated-IS form (dppo_tv), cap clip_ratio_c
        cap = opts.ratio_cap
        return {"ratio_cap": None if cap == "none" else float(clip_c) if cap is None else cap}
    if region.name == "clip":  # the PPO clip: clip_ratio_c is the dual clip (verl's gspo has none)
        return {"dual_clip": float(clip_c)}
    if region.loss_type == "cispo":  # verl: sg(clamp(ratio, 1 - low, 1 + high)); ours clamps at absolute bounds
        return {"epsilon_high": 1.0 + float(high), "cispo_min": 1.0 - float(low)}
    return {}


#: verl's own form of the objectives beyond the clip keys. verl clamps the log-ratio at +-20 before ``exp`` in
#: vanilla, dppo_*, cispo and sapo, and not in the others (its GSPO-token caps the sequence log-ratio at 10 itself);
#: sapo aggregates seq-mean-token-mean whatever loss_agg_mode says; geo_mean takes the mean over the micro-batch's
#: sequences, ignoring loss_agg_mode and global_batch_info (aggregation None: the loss type's own normaliser).
_VERL_FORMS: dict[str, dict] = {
    "gspo": dict(log_ratio_clip=None),
    "sapo": dict(aggregation="seq-mean-token-mean"),
    "gpg": dict(log_ratio_clip=None),
    "dro": dict(log_ratio_clip=None),
    "geo_mean": dict(log_ratio_clip=None, aggregation=None),
    "kl_cov": dict(log_ratio_clip=None),
    "clip_cov": dict(log_ratio_clip=None),
}


def _verl_objective_keys(region: M.TrustRegion, config) -> dict:
    """The objective's parameters from verl's own keys (``actor.tau_pos`` / ``tau_neg``, ``policy_loss.dro_beta``,
    ``policy_loss.kl_cov_ratio`` / ``ppo_kl_coef``, ``policy_loss.clip_cov_*``), so that ``loss_mode=X`` and
    ``loss_mode=rlvr_X`` read the same settings; unset keys take the fallbacks of verl's functions."""
    pl = cfg_value(config, "policy_loss", None)

    def key(name, fallback):
        return fallback if pl is None else cfg_value(pl, name, fallback)

    if region.name == "sapo":
        return dict(
            sapo_temperature_pos=float(cfg_value(config, "tau_pos", 1.0)),
            sapo_temperature_neg=float(cfg_value(config, "tau_neg", 1.05)),
        )
    if region.name == "dro":
        beta = key("dro_beta", None)
        if beta is None or float(beta) <= 0:
            raise ValueError("policy_loss.dro_beta must be a positive value with rlvr_*dro (verl's dro key)")
        return dict(dro_beta=float(beta))
    if region.name == "kl_cov":
        return dict(kl_cov_ratio=float(key("kl_cov_ratio", 0.0002)), kl_cov_coef=float(key("ppo_kl_coef", 1.0)))
    if region.name == "clip_cov":
        return dict(
            clip_cov_ratio=float(key("clip_cov_ratio", 0.0002)),
            clip_cov_lb=float(key("clip_cov_lb", 1.0)),
            clip_cov_ub=float(key("clip_cov_ub", 5.0)),
        )
    return {}


def loss_config(
    spec: LossSpec, config, opts: Options, loss_agg_mode: str, sched: Optional[TemporalSchedule]
) -> _loss.LossConfig:
    """The :class:`rlvr_kernels.LossConfig` of one call: verl's clip keys, the options the loss's methods read."""
    low = cfg_value(config, "clip_ratio_low", None)
    high = cfg_value(config, "clip_ratio_high", None)
    base = cfg_value(config, "clip_ratio", 0.2)
    low = base if low is None else low
    high = base if high is None else high
    clip_c = cfg_value(config, "clip_ratio_c", 3.0)
    kw: dict = dict(
        beta=0.0,
        loss_type=spec.loss_type,
        epsilon_low=float(low),
        epsilon_high=float(high),
        backend=opts.backend,
        fused=False,
        log_ratio_clip=20.0,
    )  # verl clamps the log-ratio at +-20
    kw.update(_thresholds(spec.region, low, high, clip_c, opts))
    kw.update(spec.region.settings)
    kw.update(_verl_objective_keys(spec.region, config))
    kw.update({n: getattr(opts, n) for n in spec.region.options if n in LOSS_METHOD_OPTIONS and n != "ratio_cap"})
    kw.update({n: getattr(opts, n) for n in M.ROLLOUT_OPTIONS})  # the rollout correction, with every loss
    kw["aggregation"] = loss_agg_mode
    # verl's agg_loss takes the horizon of seq-mean-token-sum-norm from global_batch_info only (ppo_loss copies
    # actor.loss_scale_factor there); default: the padded response width
    lsf = (cfg_value(config, "global_batch_info", {}) or {}).get("loss_scale_factor", None)
    kw["loss_horizon"] = int(lsf) if lsf is not None else None
    kw.update(_VERL_FORMS.get(spec.trust, {}))
    if spec.credit is not None:
        kw["credit"] = spec.credit
        kw.update({n: getattr(opts, n) for n in spec.rule.options if n in LOSS_METHOD_OPTIONS})
        kw["schedule"] = sched
    return _loss.LossConfig(**kw)


def _normaliser(cfg, active: torch.Tensor, T: int, gbi: dict) -> torch.Tensor:
    """verl's ``agg_loss`` divisor (``cfg.aggregation`` is verl's mode) for the active-token mask ``active [bs, T]``
    and ``global_batch_info``."""
    return _ref_loss.normalizer(
        cfg,
        active.sum(-1),
        T,
        batch_num_tokens=gbi.get("batch_num_tokens", None),
        global_batch_size=gbi.get("global_batch_size", None),
        dp_size=int(gbi.get("dp_size", 1) or 1),
    )


def _static_mask(spec: LossSpec, cfg, mask, q, ctx, gbi, loss_agg_mode):
    """The credit rule's static mask (TP-Schedule's cut-off): already applied to response_mask by the worker hook,
    or applied here."""
    if not spec.cuts_batch:
        return mask
    if ctx.get("tp_q") is not None:
        if abs(float(ctx["tp_q"]) - float(q)) > 1e-12:
            raise RuntimeError(f"internal error: the batch was cut at q={ctx['tp_q']} but the loss computes q={q}")
        return mask
    if loss_agg_mode == "token-mean" and gbi.get("batch_num_tokens", None) is not None:
        raise RuntimeError(
            f"{spec.name} with loss_agg_mode=token-mean inside verl needs the worker hook: verl's batch_num_tokens "
            "counts the tokens before the cut-off, so the loss would shrink with q. Load this module in the workers "
            "(VERL_USE_EXTERNAL_MODULES=rlvr_kernels.integrations.verl) and keep RLVR_VERL_HOOKS unset"
        )
    return spec.rule.static_mask(cfg, mask, q)


def _read_inputs(spec: LossSpec, opts: Options, ctx: dict, log_prob: torch.Tensor):
    """``(entropy, coef, mu)``: the inputs beyond verl's 7 that the loss's methods need (None when not needed)."""
    entropy = coef = mu = None
    if "entropy" in spec.rule.needs:
        entropy = response_tensor(ctx, "entropy", log_prob)
        if entropy is None:
            raise ValueError(
                f"{spec.name} needs the current policy's per-token entropy, which verl computes only when asked. "
                f"The worker hook of this module asks for it automatically ({_HOOK_HELP}); otherwise add the "
                "override actor_rollout_ref.actor.calculate_entropy=True and pass the entropy with "
                "rlvr_kernels.integrations.verl.loss_context(entropy=...)"
            )
    if "coefficients" in spec.rule.needs:
        coef = response_tensor(ctx, DELTA_COEF_KEY, log_prob)
        if coef is None:
            raise ValueError(
                f"{spec.name} needs DelTA coefficients: inside verl the worker hook computes the batch field "
                f"{DELTA_COEF_KEY!r} at the start of each actor update ({_HOOK_HELP}); otherwise set "
                "that [bs, response_len] batch field or loss_context(delta_coefficients=...); see rlvr_kernels.delta"
            )
    rollout = M.rollout_correction_active(dict(rollout_is=opts.rollout_is, rollout_rs=opts.rollout_rs))
    if (spec.region.needs_anchor and opts.anchor == "rollout") or rollout:
        mu = response_tensor(ctx, ROLLOUT_LOGP_KEY, log_prob)
        if mu is None:
            why = "policy_loss.rlvr.rollout_is / rollout_rs" if rollout else "policy_loss.rlvr.anchor=rollout"
            raise ValueError(
                f"{spec.name} with {why} needs the batch field "
                f"{ROLLOUT_LOGP_KEY!r} (rollout.calculate_log_probs=True) or "
                "loss_context(rollout_log_probs=)"
            )
    return entropy, coef, mu


def policy_loss(
    spec: LossSpec,
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode="token-mean",
    config=None,
    rollout_is_weights=None,
):
    if config is None:
        raise ValueError(f"{spec.name}: config (verl's ActorConfig) is required")
    if not (hasattr(config, "clip_ratio") or (hasattr(config, "get") and config.get("clip_ratio", None) is not None)):
        raise TypeError(
            f"{spec.name}: config must be verl's ActorConfig (actor_rollout_ref.actor), got {type(config).__name__}"
        )
    if (
        log_prob.dim() != 2
        or tuple(old_log_prob.shape) != tuple(log_prob.shape)
        or tuple(advantages.shape) != tuple(log_prob.shape)
        or tuple(response_mask.shape) != tuple(log_prob.shape)
    ):
        raise ValueError(
            f"{spec.name}: old_log_prob, log_prob, advantages and response_mask must all be "
            f"[bs, response_len]; got {tuple(old_log_prob.shape)}, {tuple(log_prob.shape)}, "
            f"{tuple(advantages.shape)}, {tuple(response_mask.shape)}"
        )
    if loss_agg_mode not in _ref_loss.VERL_AGGREGATIONS:
        raise ValueError(f"{spec.name}: unsupported loss_agg_mode {loss_agg_mode!r}")
    opts = options_of(config)
    ctx = current()
    gbi = dict(cfg_value(config, "global_batch_info", {}) or {})
    valid_b = response_mask != 0
    entropy, coef, mu = _read_inputs(spec, opts, ctx, log_prob)
    # one check (one host sync) of every input on the loss tokens, before any of the math, as RLVRLoss does;
    # padding (response_mask == 0) may hold anything and is never read
    _check_finite(
        spec.name,
        valid_b,
        (
            ("old_log_prob", old_log_prob),
            ("advantages", advantages),
            ("rollout_is_weights", rollout_is_weights),
            ("entropy", entropy),
            (DELTA_COEF_KEY, coef),
            (ROLLOUT_LOGP_KEY, mu),
        ),
    )
    q, step, sched = _schedule_value(spec, config, opts, ctx)
    cfg = loss_config(spec, config, opts, loss_agg_mode, sched)
    B, T = log_prob.shape
    valid = response_mask.to(torch.float32)
    mask = _static_mask(spec, cfg, valid, q, ctx, gbi, loss_agg_mode)
    logp = log_prob.float()
    old = old_log_prob.detach().float()
    if entropy is not None:
        entropy = entropy.detach().float()
    if coef is not None:
        coef = coef.detach().float()
    is_ratio = rollout_is_weights.detach().float() if rollout_is_weights is not None else None
    if M.rollout_correction_active(cfg):
        # the rollout correction from old_log_prob and the rollout engine's log-probs (verl's
        # compute_rollout_correction_and_rejection_mask, inside the loss): rejected tokens leave the mask and the
        # token counts; the weight joins verl's own rollout_is_weights when both are set
        keep, weight = M.rollout_correction(cfg, old, mu.detach().float(), valid)
        mask = mask * keep
        if weight is not None:
            is_ratio = weight if is_ratio is None else is_ratio * weight
    mu = old if (mu is None or not spec.region.needs_anchor or opts.anchor != "rollout") else mu.detach().float()
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
            raise ValueError(
                f"{loss_name}: {name} has non-finite values on loss tokens (response_mask == 1); "
                "padding may hold anything, the tokens the loss reads may not"
            )


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


def _make_loss(spec: LossSpec) -> Callable:
    def loss_fn(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config=None,
        rollout_is_weights: Optional[torch.Tensor] = None,
    ):
        return policy_loss(
            spec, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
        )

    loss_fn.__name__ = loss_fn.__qualname__ = spec.name
    loss_fn.__doc__ = (
        f"verl policy loss {spec.name!r}: trust region {spec.trust!r}, credit rule "
        f"{spec.credit or 'none'!r} (rlvr_kernels token math). verl's signature; returns "
        "(loss, metrics)."
    )
    loss_fn.rlvr_spec = spec
    return loss_fn


#: The registered losses, by name (verl's ``get_policy_loss_fn(name)`` returns the same functions).
LOSSES: dict[str, Callable] = {name: register_policy_loss(name)(_make_loss(spec)) for name, spec in SPECS.items()}
