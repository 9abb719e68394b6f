"""What a verl config may say to the plug-in: the ``rlvr_*`` loss names, the ``policy_loss.rlvr`` keys and their
checks, :class:`RLVRPolicyLossConfig`, and the batch keys the hooks add.

Loss names come from the catalogue (:mod:`rlvr_kernels.methods`): ``rlvr_<trust>`` for every trust region (no
credit rule), ``rlvr_<credit>`` (PPO clip) and ``rlvr_<credit>_<trust>`` for every credit rule and every other trust
region. The ``policy_loss.rlvr`` keys are the catalogue's method options (``methods.OPTIONS``: the same names,
defaults and checks as ``RLVRLoss`` and TRL's config) plus the verl-only keys of :data:`VERL_OPTION_DEFAULTS`.
One verl-only meaning: ``ratio_cap=None`` is verl's ``clip_ratio_c`` and ``ratio_cap="none"`` no cap.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any, Optional, Union

from verl.workers.config import PolicyLossConfig

from rlvr_kernels import _checks as C
from rlvr_kernels import methods as M
from rlvr_kernels._backend import BACKENDS

# Non-tensor keys the trainer hook adds to the batch (verl ships meta_info / extra_info to the workers).
STEP_KEY = "rlvr_global_steps"
TOTAL_STEPS_KEY = "rlvr_total_training_steps"
# Response-aligned batch fields ([bs, response_len], like ``advantages``) read by the losses when present.
DELTA_COEF_KEY = "rlvr_delta_coef"
ROLLOUT_LOGP_KEY = "rollout_log_probs"  # verl's own name for the rollout engine's log-probs

PREFIX = "policy_loss.rlvr."
ANCHORS = ("old", "rollout")
DELTA_HIDDEN_CACHES = ("none", "cpu", "device")

#: The ``policy_loss.rlvr`` keys that only verl has (the method options are the catalogue's).
VERL_OPTION_DEFAULTS: dict[str, Any] = {
    "total_steps": None,  # the schedule's T; default: the trainer's total_training_steps (else actor.optim's)
    "anchor": "old",  # DPPO/CPPO divergence anchor: "old" (old_log_prob, verl's dppo_tv) or "rollout"
    "delta_coef_all_reduce": False,  # DelTA: True = E is the global rollout batch (statistics summed over DP)
    "delta_coef_hidden_cache": "none",  # DelTA: "none" = K + 3 no-grad forwards; "cpu" / "device" = one forward
    "backend": "auto",  # kernels backend of the losses and DelTA's estimator
}

#: Every ``policy_loss.rlvr`` key and its default.
RLVR_OPTION_DEFAULTS: dict[str, Any] = {**M.option_defaults(), **VERL_OPTION_DEFAULTS}

_TYPES = {
    "total_steps": Optional[int],
    "anchor": str,
    "delta_coef_all_reduce": bool,
    "delta_coef_hidden_cache": str,
    "backend": str,
    "ratio_cap": Union[float, str, None],
}
Options = dataclasses.make_dataclass("Options", [(n, _TYPES.get(n, Any)) for n in RLVR_OPTION_DEFAULTS], frozen=True)
Options.__module__ = __name__
Options.__doc__ = (
    "The validated ``policy_loss.rlvr`` options of an actor config (every key of "
    "``RLVR_OPTION_DEFAULTS``, defaults filled in), as :func:`options_of` returns them."
)


class OptionTypeError(TypeError, ValueError):
    """A ``policy_loss.rlvr`` value of the wrong type: a ``TypeError`` as the catalogue's checks raise it, and a
    ``ValueError`` as verl's option checks raised most of them (``except`` clauses written for either keep
    working)."""


# ----------------------------------------------------------------------------------------------------------------
# loss names


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One ``rlvr_*`` loss: a trust region of the catalogue and, optionally, a credit rule."""

    name: str
    trust: str  # a key of methods.TRUST_REGIONS
    credit: Optional[str]  # a key of methods.CREDITS; None for the plain trust-region losses

    @property
    def region(self) -> M.TrustRegion:
        return M.TRUST_REGIONS[self.trust]

    @property
    def rule(self) -> M.CreditRule:
        return M.credit(self.credit)

    @property
    def loss_type(self) -> str:
        """The ``RLVRLoss`` objective: the trust region's, and dapo's PPO clip (verl's ``vanilla``) for ``clip``."""
        return self.region.loss_type or "dapo"

    @property
    def cuts_batch(self) -> bool:
        """Whether the credit rule removes tokens before the vocabulary pass (it has a static mask: TP-Schedule's
        cut-off). Inside verl the worker hook applies that mask to the batch before verl counts its tokens."""
        return type(self.rule).static_mask is not M.CreditRule.static_mask

    def uses_schedule(self, flag: Optional[bool]) -> bool:
        """Whether this loss evaluates q(k) under ``policy_loss.rlvr.schedule=flag`` (the catalogue's rule)."""
        try:
            return self.rule.uses_schedule(flag)
        except ValueError as exc:
            if flag:
                raise ValueError(
                    f"{self.name}: policy_loss.rlvr.schedule=true applies only to the losses of a credit "
                    f"rule with a scheduled variant ({exc})"
                ) from None
            raise ValueError(f"{self.name}: policy_loss.rlvr.schedule=false is not allowed ({exc})") from None


def _specs() -> dict[str, LossSpec]:
    trusts = tuple(M.TRUST_REGIONS)
    plain = M.credit(None)
    out = {f"rlvr_{t}": LossSpec(f"rlvr_{t}", t, None) for t in trusts}
    for credit, rule in M.CREDITS.items():
        if rule is plain:
            continue
        for t in trusts:
            name = f"rlvr_{credit}" if t == "clip" else f"rlvr_{credit}_{t}"
            out[name] = LossSpec(name, t, credit)
    return out


SPECS: dict[str, LossSpec] = _specs()
LOSS_NAMES: tuple = tuple(SPECS)
#: ``rlvr_*`` losses outside the catalogue (no :class:`LossSpec`): verl's bypass mode (:mod:`.bypass`)
OTHER_LOSS_NAMES: tuple = ("rlvr_bypass_mode",)


def check_loss_mode(loss_mode) -> None:
    """Raise ``ValueError`` for a ``loss_mode`` that starts with ``rlvr_`` but is none of :data:`LOSS_NAMES` (a typo
    that verl itself would only report at the first actor update, after the first rollout). Other names are verl's
    business (its registry may gain losses later)."""
    names = LOSS_NAMES + OTHER_LOSS_NAMES
    if not isinstance(loss_mode, str) or not loss_mode.startswith("rlvr_") or loss_mode in names:
        return
    close = difflib.get_close_matches(loss_mode, names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(
        f"unknown policy loss actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode!r}: {hint}"
        f"the rlvr_* losses are {', '.join(names)}"
    )


# ----------------------------------------------------------------------------------------------------------------
# policy_loss.rlvr


def plain(obj):
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


def _unknown_keys_error(bad: list) -> ValueError:
    """A renamed key names its new name (the catalogue's message); other keys the closest valid one (a key renamed
    to an option verl does not have, e.g. TRL's ``delta_coef_cache_bytes``, is just unknown here)."""
    for key in bad:
        if M.RENAMED_OPTIONS.get(key) in RLVR_OPTION_DEFAULTS:
            return M.unknown_option_error(key, RLVR_OPTION_DEFAULTS, prefix=PREFIX)
    close = [c for k in bad for c in difflib.get_close_matches(k, list(RLVR_OPTION_DEFAULTS), n=1, cutoff=0.7)]
    hint = f" (did you mean {', '.join(PREFIX + c for c in close)}?)" if close else ""
    return ValueError(f"unknown policy_loss.rlvr option(s) {bad}{hint}; valid: {sorted(RLVR_OPTION_DEFAULTS)}")


def _check_verl_only(opts: dict) -> dict:
    cache = opts["delta_coef_hidden_cache"]
    return {
        "total_steps": C.optional_integer(PREFIX + "total_steps", opts["total_steps"], low=1),
        "anchor": C.choice(PREFIX + "anchor", opts["anchor"], ANCHORS),
        "delta_coef_all_reduce": C.flag(PREFIX + "delta_coef_all_reduce", opts["delta_coef_all_reduce"]),
        "delta_coef_hidden_cache": C.choice(
            PREFIX + "delta_coef_hidden_cache", "none" if cache is None else cache, DELTA_HIDDEN_CACHES
        ),
        "backend": C.choice(PREFIX + "backend", opts["backend"], BACKENDS),
    }


def _ratio_cap(value):
    """verl's spelling: None = verl's ``clip_ratio_c``, ``"none"`` = no cap; a number goes to the catalogue."""
    if isinstance(value, str):
        if value.lower() != "none":
            raise ValueError(
                f"{PREFIX}ratio_cap must be a positive number, null (verl's clip_ratio_c) or 'none' "
                f"(no cap), got {value!r}"
            )
        return "none"
    return M.check_option("ratio_cap", value, prefix=PREFIX)


def _check_method_options(opts: dict) -> dict:
    """The catalogue's checks of every method option and its cross-option rules; the schedule as a whole is checked
    here (at config time, before verl's ``total_training_steps`` is known)."""
    method = {k: opts[k] for k in M.OPTIONS if k != "ratio_cap"}
    sched = {k: M.check_option(k, method.pop(k), prefix=PREFIX) for k in M.SCHEDULE_OPTIONS}
    out = M.check_options(method, prefix=PREFIX)
    try:
        M.make_schedule(sched, total_steps=1 << 30)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"policy_loss.rlvr schedule options: {exc}") from None
    return {**out, **sched, "ratio_cap": _ratio_cap(opts["ratio_cap"])}


def check_rlvr_options(raw) -> dict:
    """``policy_loss.rlvr`` (a mapping or None) checked, normalised and completed with the defaults."""
    raw = plain(raw) if raw is not None else {}
    if not isinstance(raw, dict):
        raise TypeError(f"policy_loss.rlvr must be a mapping of options, got {type(raw).__name__}")
    bad = sorted(set(raw) - set(RLVR_OPTION_DEFAULTS))
    if bad:
        raise _unknown_keys_error(bad)
    opts = {**RLVR_OPTION_DEFAULTS, **raw}
    try:
        opts.update(_check_verl_only(opts))
        opts.update(_check_method_options(opts))
    except TypeError as exc:
        if isinstance(exc, ValueError):
            raise
        raise OptionTypeError(str(exc)) from None
    return opts


@dataclasses.dataclass
class RLVRPolicyLossConfig(PolicyLossConfig):
    """verl's ``PolicyLossConfig`` plus ``rlvr``: a mapping of the options in ``RLVR_OPTION_DEFAULTS``.

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
        opts = check_rlvr_options(self.rlvr)
        spec = SPECS.get(self.loss_mode)
        if spec is not None:  # schedule=true on a loss without a scheduled variant: refused now, not at the update
            spec.uses_schedule(opts["schedule"])


# ----------------------------------------------------------------------------------------------------------------
# reading an actor config


def _freeze(v):
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


@functools.lru_cache(maxsize=64)
def _options_cached(items: tuple) -> Options:
    return Options(**check_rlvr_options(dict(items)))


def _policy_loss_config(config):
    return config.get("policy_loss", None) if hasattr(config, "get") else getattr(config, "policy_loss", None)


def options_of(config) -> Options:
    """The validated ``policy_loss.rlvr`` of verl's actor config (cached per distinct mapping)."""
    pl = _policy_loss_config(config)
    raw = None
    if pl is not None:
        raw = pl.get("rlvr", None) if hasattr(pl, "get") else getattr(pl, "rlvr", None)
    raw = plain(raw) if raw is not None else {}
    if not isinstance(raw, dict):
        raise TypeError(f"policy_loss.rlvr must be a mapping of options, got {type(raw).__name__}")
    return _options_cached(tuple(sorted((k, _freeze(v)) for k, v in raw.items())))


def loss_mode_of(config) -> Optional[str]:
    pl = _policy_loss_config(config)
    if pl is None:
        return None
    return pl.get("loss_mode", None) if hasattr(pl, "get") else getattr(pl, "loss_mode", None)


def spec_of(config) -> Optional[LossSpec]:
    """The ``rlvr_*`` loss of an actor config (None for verl's own losses)."""
    return SPECS.get(loss_mode_of(config) or "")


def cfg_value(config, name, default=None):
    v = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if v is None else v
