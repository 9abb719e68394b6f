"""verl's bypass mode as an ``rlvr_*`` loss: ``rlvr_bypass_mode``, and the trainer-side guard that keeps it.

In bypass mode (``algorithm.rollout_correction.bypass_mode=True``) verl's driver sets ``old_log_probs`` to the rollout
engine's log-probs, puts ``algorithm.rollout_correction`` into ``policy_loss.rollout_correction`` and switches the loss
to its own ``bypass_mode`` (``rollout_corr_helper.apply_bypass_mode``). That loss (``core_algos``'s
``compute_policy_loss_bypass_mode``) computes the IS weight and the rejection mask from the **current** policy
against the rollout (``log_prob.detach() - old_log_prob``), then, by ``rollout_correction.loss_type``:

- ``"ppo_clip"`` (default): verl's vanilla PPO clip (dual clip ``clip_ratio_c``, log-ratio clamped at +-20) on the
  rejection-masked tokens; the IS weight is not applied (the ratio already is the correction);
- ``"reinforce"``: ``-A log p w`` with the (detached) IS weight ``w`` on the rejection-masked tokens.

:func:`bypass_mode_loss` computes the same loss and gradient with the package's pieces: the weight and the rejection
from :func:`rlvr_kernels.reference.loss.rollout_correction`, the objective from :func:`rlvr_kernels.loss.token_pass`
(``rlvr_clip``'s for ``ppo_clip``, ``rlvr_gpg``'s for ``reinforce``), verl's ``agg_loss`` divisor. It reads the same
``policy_loss.rollout_correction`` keys as verl (``loss_type``, ``rollout_is``, ``rollout_is_threshold``,
``rollout_is_batch_normalize``, ``rollout_rs``, ``rollout_rs_threshold``; :func:`correction_of`), with verl's
semantics where they differ from the package's rollout options:

- a ``"lower_upper"`` IS threshold (IcePop) zeroes the weight outside the band and keeps the token in the mask (the
  package's ``rollout_is_mode="mask"`` removes it): the weight is ``weight * inside``, the mask unchanged;
- the rejection removes the tokens from the mask and every token count;
- ``rollout_is_batch_normalize`` divides by the mean over the loss tokens (token level) or the non-empty rows
  (sequence level) of **all ranks** when ``torch.distributed`` is initialised (verl's ``distributed_masked_mean``);
- verl's k1 band ``"a_b"`` bounds ``-log r`` (``log a <= -log r <= log b``): the package's ``[1 / b, 1 / a]``.

:func:`wrap_apply_bypass_mode` wraps verl's ``apply_bypass_mode`` so that a user's ``rlvr_bypass_mode`` survives it
(and refuses the other ``rlvr_*`` losses, which compute their correction against ``old_log_prob``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import torch
from verl.trainer.ppo.core_algos import register_policy_loss

from rlvr_kernels import loss as _loss
from rlvr_kernels import methods as M
from rlvr_kernels.integrations._verl import losses as L
from rlvr_kernels.integrations._verl.context import logger
from rlvr_kernels.integrations._verl.options import SPECS, cfg_value, options_of, plain
from rlvr_kernels.reference import loss as _ref_loss

NAME = "rlvr_bypass_mode"
#: verl's ``rollout_correction.loss_type`` -> the ``rlvr_*`` loss whose objective (and verl form) it is
LOSS_TYPES = {"ppo_clip": "rlvr_clip", "reinforce": "rlvr_gpg"}
#: verl's IS levels (``compute_rollout_correction_weights``)
IS_LEVELS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class BypassCorrection:
    """verl's ``policy_loss.rollout_correction`` in the package's terms (what :func:`correction_of` returns).

    ``is_level``: "none", "token" or "sequence"; ``is_low`` / ``is_high``: the IS band (``is_low`` None: TIS, the
    weight clamped at ``is_high``; else IcePop, the weight zeroed outside ``[is_low, is_high]``);
    ``rs``: "none" or a chain of verl's criteria (duplicates removed, as verl does), ``rs_low`` / ``rs_high``: one
    bound per criterion in :func:`rlvr_kernels.reference.loss.rollout_correction`'s terms."""

    loss_type: str = "ppo_clip"
    is_level: str = "none"
    is_low: Optional[float] = None
    is_high: Optional[float] = None
    batch_normalize: bool = False
    rs: str = "none"
    rs_low: tuple = ()
    rs_high: tuple = ()

    @property
    def icepop(self) -> bool:
        return self.is_level != "none" and self.is_low is not None


def _get(obj, key: str, default=None):
    if obj is None:
        return default
    if hasattr(obj, "get"):
        return obj.get(key, default)
    return getattr(obj, key, default)


@functools.lru_cache(maxsize=64)
def _correction(loss_type, rollout_is, is_threshold, batch_normalize, rollout_rs, rs_threshold) -> BypassCorrection:
    # verl's own threshold parsers: the same spellings and the same errors as its bypass_mode loss
    from verl.trainer.ppo import rollout_corr_helper as H

    if loss_type not in LOSS_TYPES:
        raise ValueError(
            f"{NAME}: policy_loss.rollout_correction.loss_type must be 'reinforce' or 'ppo_clip', got {loss_type!r}"
        )
    out: dict[str, Any] = dict(loss_type=loss_type, batch_normalize=bool(batch_normalize))
    if rollout_is is not None and is_threshold is not None:  # verl: no IS weight when either is None
        if rollout_is not in IS_LEVELS:
            raise ValueError(f"{NAME}: rollout_correction.rollout_is must be 'token', 'sequence' or null, got "
                             f"{rollout_is!r}")  # fmt: skip
        upper, lower = H._parse_rollout_is_threshold(is_threshold)
        out.update(is_level=rollout_is, is_low=lower, is_high=upper)
    if rollout_rs is not None:
        if not isinstance(rollout_rs, str):
            raise ValueError(f"{NAME}: rollout_correction.rollout_rs must be a string, got {rollout_rs!r}")
        if rs_threshold is None:
            raise ValueError(f"{NAME}: rollout_correction.rollout_rs_threshold must be set with rollout_rs")
        crits: list[str] = []
        for c in (p.strip() for p in rollout_rs.split(",")):
            if not c:
                continue
            if c not in H.SUPPORTED_ROLLOUT_RS_OPTIONS:
                raise ValueError(f"{NAME}: invalid rollout_rs option {c!r}: one of "
                                 f"{sorted(H.SUPPORTED_ROLLOUT_RS_OPTIONS)}")  # fmt: skip
            if c not in crits:
                crits.append(c)
        if not crits:
            raise ValueError(f"{NAME}: rollout_correction.rollout_rs must name at least one criterion")
        bands = H._parse_rollout_rs_thresholds(crits, rs_threshold)
        lows, highs = [], []
        for c in crits:
            lo, hi = bands[c]["lower"], bands[c]["upper"]
            if c.endswith("k1"):  # verl bounds -log r in [log lo, log hi]: log r in [log(1 / hi), log(1 / lo)]
                lows.append(1.0 / hi)
                highs.append(1.0 / lo)
            else:
                lows.append(None)
                highs.append(hi)
        out.update(rs=",".join(crits), rs_low=tuple(lows), rs_high=tuple(highs))
    return BypassCorrection(**out)


def correction_of(config) -> BypassCorrection:
    """``config.policy_loss.rollout_correction`` (verl's actor config; what verl's ``apply_bypass_mode`` puts there)
    read with the keys and defaults of verl's ``compute_policy_loss_bypass_mode``."""
    pl = _get(config, "policy_loss", None)
    rc = _get(pl, "rollout_correction", None)
    if rc is None:
        raise ValueError(
            f"{NAME}: policy_loss.rollout_correction is not set: verl's apply_bypass_mode puts "
            "algorithm.rollout_correction there (algorithm.rollout_correction.bypass_mode=True), or set "
            "actor_rollout_ref.actor.policy_loss.rollout_correction yourself"
        )

    def key(name, default):
        v = plain(_get(rc, name, default))
        return tuple(v) if isinstance(v, list) else v

    return _correction(
        key("loss_type", "ppo_clip"),
        key("rollout_is", None),
        key("rollout_is_threshold", 2.0),
        bool(key("rollout_is_batch_normalize", False)),
        key("rollout_rs", None),
        key("rollout_rs_threshold", None),
    )


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _batch_mean(weight: torch.Tensor, valid: torch.Tensor, level: str) -> torch.Tensor:
    """verl's ``rollout_is_batch_normalize`` mean: of the weights over the loss tokens (token level) or over the
    non-empty rows (sequence level, one weight a row), summed over the ranks when ``torch.distributed`` is
    initialised (verl's ``distributed_masked_mean``; every rank must call the loss the same number of times)."""
    if level == "token":
        stats = torch.stack([(weight * valid).sum(), valid.sum()])
    else:
        rows = (valid.sum(-1, keepdim=True) > 0).to(weight.dtype)
        stats = torch.stack([(weight * rows).sum(), rows.sum()])
    if _distributed():
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM)
    return stats[0] / stats[1].clamp(min=1.0)


def bypass_correction(
    corr: BypassCorrection, log_ratio: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, Optional[torch.Tensor], dict]:
    """``(keep, weight, stats)`` of verl's bypass mode: ``keep [B, T]`` the tokens the rejection leaves (the IS band
    does not remove any), ``weight`` the IS weight (``[B, T]`` token level, ``[B, 1]`` sequence level, 0 outside an
    IcePop band, batch-normalised when asked) or None, ``stats`` 0-d tensors for the metrics. ``log_ratio``:
    ``log pi - log mu`` (read on ``valid`` only)."""
    stats: dict[str, torch.Tensor] = {}
    weight = None
    if corr.is_level != "none":
        mode = "mask" if corr.icepop else "truncate"
        inside, w = _ref_loss.rollout_correction(
            log_ratio, valid, is_level=corr.is_level, is_mode=mode, is_low=corr.is_low, is_high=corr.is_high
        )
        if corr.icepop:  # verl zeroes the weight and keeps the token: the package's band, weight * inside
            inside_rows = inside if corr.is_level == "token" else inside.amax(-1, keepdim=True)
            weight = w * inside_rows
            stats["rollout_is_zeroed_fraction"] = 1.0 - inside.sum() / valid.sum().clamp(min=1.0)
        else:
            weight = w
        if corr.batch_normalize:
            mean = _batch_mean(weight, valid, corr.is_level)
            weight = torch.where(mean > _ref_loss.ROLLOUT_NORMALIZE_EPS, weight / mean.clamp(min=1e-30), weight)
            stats["rollout_is_batch_norm_factor"] = torch.where(
                mean > _ref_loss.ROLLOUT_NORMALIZE_EPS, mean, torch.ones_like(mean)
            )
        stats["rollout_is_mean"] = (weight * valid).sum() / valid.sum().clamp(min=1.0)
    keep = valid
    if corr.rs != "none":
        keep, _ = _ref_loss.rollout_correction(log_ratio, valid, rs=corr.rs, rs_low=corr.rs_low, rs_high=corr.rs_high)
        stats["rollout_rs_masked_fraction"] = 1.0 - keep.sum() / valid.sum().clamp(min=1.0)
    return keep, weight, stats


def bypass_mode_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: Optional[torch.Tensor] = None,
):
    """verl policy loss ``'rlvr_bypass_mode'``: verl's ``bypass_mode`` (``old_log_prob`` = the rollout log-probs;
    ``policy_loss.rollout_correction``) with the rlvr_kernels token math. verl's signature; returns ``(loss,
    metrics)``. ``rollout_is_weights`` is ignored, as verl's ``bypass_mode`` ignores it (the weight comes from the
    current policy)."""
    if config is None:
        raise ValueError(f"{NAME}: config (verl's ActorConfig) is required")
    if not (hasattr(config, "clip_ratio") or (hasattr(config, "get") and config.get("clip_ratio", None) is not None)):
        raise TypeError(
            f"{NAME}: config must be verl's ActorConfig (actor_rollout_ref.actor), got {type(config).__name__}"
        )
    shapes = [tuple(t.shape) for t in (old_log_prob, log_prob, advantages, response_mask)]
    if log_prob.dim() != 2 or len(set(shapes)) != 1:
        raise ValueError(
            f"{NAME}: old_log_prob, log_prob, advantages and response_mask must all be [bs, response_len]; got "
            + ", ".join(map(str, shapes))
        )
    if loss_agg_mode not in _ref_loss.VERL_AGGREGATIONS:
        raise ValueError(f"{NAME}: unsupported loss_agg_mode {loss_agg_mode!r}")
    corr = correction_of(config)
    opts = options_of(config)
    if M.rollout_correction_active(dict(rollout_is=opts.rollout_is, rollout_rs=opts.rollout_rs)):
        raise ValueError(
            f"{NAME} takes its rollout correction from policy_loss.rollout_correction (verl's "
            "algorithm.rollout_correction); unset policy_loss.rlvr.rollout_is / rollout_rs"
        )
    spec = SPECS[LOSS_TYPES[corr.loss_type]]
    gbi = dict(cfg_value(config, "global_batch_info", {}) or {})
    valid_b = response_mask != 0
    L._check_finite(NAME, valid_b, (("old_log_prob", old_log_prob), ("advantages", advantages)))
    cfg = L.loss_config(spec, config, opts, loss_agg_mode, None)
    T = log_prob.shape[1]
    valid = valid_b.to(torch.float32)
    logp = log_prob.float()
    old = old_log_prob.detach().float()
    # the correction of the current policy against the rollout (= old): log_prob detached, as verl's no_grad
    keep, weight, stats = bypass_correction(corr, logp.detach() - old, valid)
    mask = valid * keep
    is_ratio = weight if corr.loss_type == "reinforce" else None  # ppo_clip: the ratio is the correction
    rows = _loss.Rows(mask=mask, adv=advantages.detach().float(), old=old, mu=old, is_ratio=is_ratio)
    one = torch.ones((), dtype=torch.float32, device=log_prob.device)
    loss_unnorm, sums, active = _loss.token_pass(cfg, logp, None, rows, None, one, one)
    loss = loss_unnorm / L._normaliser(cfg, active, T, gbi)
    metrics = L._metrics(sums, valid, mask, logp, old, None, None, None)
    if stats:
        names = list(stats)
        values = torch.stack([stats[n].float().reshape(()) for n in names]).tolist()  # one host sync
        metrics.update({f"rlvr/{n}": v for n, v in zip(names, values)})
    return loss, metrics


bypass_mode_loss.__name__ = bypass_mode_loss.__qualname__ = NAME


# ----------------------------------------------------------------------------------------------------------------
# trainer side: verl's apply_bypass_mode


def _set_loss_mode(policy_loss_config, mode: str) -> None:
    try:
        from omegaconf import DictConfig, open_dict

        if isinstance(policy_loss_config, DictConfig):
            with open_dict(policy_loss_config):
                policy_loss_config["loss_mode"] = mode
            return
    except ImportError:  # pragma: no cover
        pass
    if isinstance(policy_loss_config, dict):
        policy_loss_config["loss_mode"] = mode
    else:
        policy_loss_config.loss_mode = mode


def wrap_apply_bypass_mode(orig):
    """verl's ``rollout_corr_helper.apply_bypass_mode`` (the driver, when ``algorithm.rollout_correction.bypass_mode``
    is set): with ``policy_loss.loss_mode=rlvr_bypass_mode`` it keeps that loss instead of verl's ``bypass_mode``;
    another ``rlvr_*`` loss is refused (``ValueError``, before the batch is touched): those compute their rollout
    correction against ``old_log_prob``, which bypass mode replaces with the rollout log-probs."""
    if getattr(orig, "_rlvr_wrapped", False):
        return orig

    @functools.wraps(orig)
    def apply_bypass_mode(batch, rollout_corr_config=None, policy_loss_config=None):
        mode = _get(policy_loss_config, "loss_mode", None)
        if isinstance(mode, str) and mode.startswith("rlvr_") and mode != NAME:
            raise ValueError(
                f"algorithm.rollout_correction.bypass_mode=True replaces old_log_prob with the rollout log-probs, "
                f"and policy_loss.loss_mode={mode!r} would compute its ratio and rollout correction against them: "
                f"use loss_mode={NAME!r} (verl's bypass mode with the rlvr_kernels token math, configured by "
                "algorithm.rollout_correction), or bypass_mode=False"
            )
        out = orig(batch, rollout_corr_config=rollout_corr_config, policy_loss_config=policy_loss_config)
        if mode == NAME:
            _set_loss_mode(policy_loss_config, NAME)
        return out

    apply_bypass_mode._rlvr_wrapped = True
    return apply_bypass_mode


def hook_rollout_corr_helper(mod) -> None:
    """The post-import hook of ``verl.trainer.ppo.rollout_corr_helper``: wrap its ``apply_bypass_mode`` (idempotent;
    verl's trainers import the function from the module when they call it)."""
    cur = getattr(mod, "apply_bypass_mode", None)
    if cur is None:
        logger.warning("rlvr_kernels: %s.apply_bypass_mode not found; hook not installed", mod.__name__)
        return
    new = wrap_apply_bypass_mode(cur)
    if new is not cur:
        mod.apply_bypass_mode = new


#: The registered loss (verl's ``get_policy_loss_fn("rlvr_bypass_mode")`` returns it): registered when this module is
#: imported, as :mod:`.losses` registers the catalogue's losses.
LOSS = register_policy_loss(NAME)(bypass_mode_loss)
