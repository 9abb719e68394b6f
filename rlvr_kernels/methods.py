"""The method catalogue: every credit rule and trust region of the package, in one place.

A *credit rule* decides which tokens of a batch take part in the loss and how strongly (TP-Schedule, forking
tokens, entropy-shaped advantages, D^3S, DelTA); a *trust region* decides how far the policy may move on each token
(PPO clip, DPPO, CISPO, CPPO). Each one is a single entry here: its name, the options it reads (defaults and
validation in :data:`OPTIONS`), whether it is token-local, the inputs it needs and how it counts the active tokens
before the vocabulary pass. Its math lives in its op (``credit.py``, ``cppo.py``, ``delta.py``) and that op's
plain-torch reference; its page is under ``docs/methods/``.

Everything that used to keep its own list reads this module: :class:`rlvr_kernels.RLVRLoss` (option checks, the
token pass, the planned active-token counts), the TRL plug-in (its config fields and their help, the trust regions
it offers), the verl plug-in (the ``rlvr_*`` loss names and the ``policy_loss.rlvr`` keys) and the benchmark cases.

Adding a method: one entry in :data:`CREDITS` or :data:`TRUST_REGIONS` (plus its options in :data:`OPTIONS`), its op
and its reference; ``CONTRIBUTING.md`` has the checklist.

Order of composition inside the loss (``docs/methods/objectives.md``): (1) the credit **mask** shrinks the loss mask
(:meth:`CreditRule.static_mask` before the vocabulary pass, :meth:`CreditRule.policy_mask` after it); (2) the
**advantage shaping** rescales A per token (:meth:`CreditRule.shape`); (3) the **trust region** of the objective
(:meth:`TrustRegion.mask`); (4) the **aggregation** over the tokens that remain: every normaliser that counts tokens
counts the active ones, known in advance from :meth:`CreditRule.planned_counts`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import types
from collections.abc import Callable
from typing import Any, Optional

import torch

from rlvr_kernels import _checks as C
from rlvr_kernels.reference import cppo as _ref_cppo
from rlvr_kernels.reference import loss as _ref_loss
from rlvr_kernels.reference.credit import topk_budget
from rlvr_kernels.schedule import SCHEDULE_MODES, TemporalSchedule

__all__ = [
    "Option",
    "OPTIONS",
    "RENAMED_OPTIONS",
    "CreditRule",
    "TrustRegion",
    "CREDITS",
    "TRUST_REGIONS",
    "SCHEDULE_OPTIONS",
    "credit",
    "call_hook",
    "trust_region",
    "trust_region_of_loss_type",
    "check_options",
    "check_option",
    "option_defaults",
    "option_help",
    "rho",
    "token_local",
    "make_schedule",
    "ROLLOUT_OPTIONS",
    "ROLLOUT_CORRECTIONS",
    "rollout_correction_active",
    "rollout_correction",
]


# ----------------------------------------------------------------------------------------------------------------
# options


@dataclasses.dataclass(frozen=True)
class Option:
    """One method option: the same name, default and check in ``RLVRLoss`` (when ``loss``), TRL's config and verl's
    ``policy_loss.rlvr``. ``check(name, value)`` returns the value normalised (a plain Python value) or raises
    ``TypeError`` / ``ValueError`` naming the option."""

    name: str
    default: Any
    check: Callable[[str, Any], Any]
    help: str
    #: Whether ``RLVRLoss`` takes it as a keyword (``LossConfig`` field). The others are trainer-level: the schedule
    #: settings reach the loss as a ``TemporalSchedule``, DelTA's estimator settings as coefficients.
    loss: bool = True


def _unit(name, v):
    return C.unit(name, v)


def _pos(name, v):
    return C.real(name, v, low=0.0, low_open=True)


def _nonneg(name, v):
    return C.real(name, v, low=0.0)


def _at_least_one(name, v):
    return C.real(name, v, low=1.0)


def _choice(options: tuple) -> Callable[[str, Any], str]:
    return lambda name, v: C.choice(name, v, options)


def _optional_flag(name, v):
    return None if v is None else C.flag(name, v)


def _optional_pos_int(name, v):
    return C.optional_integer(name, v, low=1)


def _iters(name, v):
    return C.integer(name, v, low=0)


def _optional_pos(name, v):
    return C.optional_real(name, v, low=0.0, low_open=True)


def _cache_bytes(name, v):
    return C.integer(name, v, low=0)


def _rollout_rs(name, v):
    """One rejection criterion or a comma-separated chain of them, normalised (``"a,b"``, no spaces)."""
    if not isinstance(v, str):
        return C.choice(name, v, _ref_loss.ROLLOUT_RS_MODES)
    try:
        crits = _ref_loss.rollout_rs_criteria(v)
    except ValueError as exc:
        raise ValueError(str(exc).replace("rollout_rs", name, 1)) from None
    return ",".join(crits) if crits else "none"


def _rollout_rs_bound(optional: bool):
    """A rejection bound: None, one positive number (every criterion) or one per criterion (a sequence or a
    comma-separated string), normalised to None, a float or a tuple."""

    def check(name, v):
        if isinstance(v, (str, list, tuple)):
            return _ref_loss.rollout_rs_thresholds(name, v, optional=optional)
        return C.optional_real(name, v, low=0.0, low_open=True)

    return check


_OPTION_LIST = (
    # the temporal schedule q(k) (docs/methods/tp-schedule.md, section "The schedule")
    Option(
        "schedule",
        None,
        _optional_flag,
        "Whether the credit rule follows the temporal schedule q(k): None = only tp_schedule (which needs it); "
        "True = the scheduled variants (forking / d3s keep rho = 1 - q(k), entropy_adv scales by q(k)).",
        loss=False,
    ),
    Option(
        "schedule_mode", "linear", _choice(SCHEDULE_MODES), f"Schedule profile, one of {SCHEDULE_MODES}.", loss=False
    ),
    Option(
        "schedule_start_value",
        0.99,
        _unit,
        "q(k) before schedule_begin_frac (TP-Schedule's m0), in [0, 1].",
        loss=False,
    ),
    Option("schedule_end_value", 0.0, _unit, "q(k) after schedule_end_frac, in [0, 1].", loss=False),
    Option(
        "schedule_begin_frac", 0.0, _unit, "Fraction of the training steps at which q(k) starts to move.", loss=False
    ),
    Option(
        "schedule_end_frac",
        0.8,
        _unit,
        "Fraction of the training steps at which q(k) reaches its end value.",
        loss=False,
    ),
    Option("schedule_gamma", 2.0, _pos, "Exponent of schedule_mode='gamma'.", loss=False),
    # credit rules
    Option(
        "credit_rho",
        0.2,
        _unit,
        "Keep-fraction rho of forking / d3s (ceil(n rho) tokens); with schedule=True rho = 1 - q(k) instead.",
    ),
    Option("entropy_adv_alpha", 0.4, _pos, "alpha of entropy_adv: A' = A + s min(alpha H, |A| / kappa)."),
    Option("entropy_adv_kappa", 2.0, _pos, "kappa of entropy_adv."),
    Option(
        "d3s_scope",
        "batch",
        _choice(("batch", "sequence")),
        "D^3S selects the top rho tokens by |A| H over the batch the loss sees ('batch', the paper's) or per "
        "sequence ('sequence').",
    ),
    Option(
        "delta_coef_iters",
        1,
        _iters,
        "DelTA: K >= 0 soft-assignment refinements of the side centroids (official 1).",
        loss=False,
    ),
    Option(
        "delta_coef_lam_min",
        0.8,
        _pos,
        "DelTA: coefficient of the tokens most like the other side (and of A = 0 tokens), > 0 (official 0.8).",
        loss=False,
    ),
    Option(
        "delta_coef_lam_max",
        1.2,
        _pos,
        "DelTA: coefficient of the tokens most like their own side, >= delta_coef_lam_min (official 1.2); equal "
        "values give every token 1 (the plain objective).",
        loss=False,
    ),
    Option(
        "delta_coef_exclude_zero_adv",
        False,
        C.flag,
        "DelTA: leave A = 0 tokens out of the mean-1 normaliser (their coefficient is then 1); False = official.",
        loss=False,
    ),
    # trust regions (the thresholds are the trainer's own clip settings, see TrustRegion.thresholds)
    Option(
        "ratio_cap",
        None,
        lambda n, v: C.optional_real(n, v, low=0.0, low_open=True),
        "DPPO/CPPO truncated-IS form -M A sg(min(rho, cap)) log p (verl's, cap 20); None keeps -M A rho.",
    ),
    Option(
        "dppo_divergence",
        "binary_tv",
        _choice(("binary_tv", "binary_kl")),
        "DPPO's divergence: 'binary_tv' |pi(a) - mu(a)| (verl's dppo_tv) or 'binary_kl' KL(Ber(mu(a)) || Ber(pi(a))) "
        "(verl's dppo_kl), each against its side's threshold.",
    ),
    Option("cppo_w_min", 0.8, _unit, "CPPO: position weight at the last token, in [0, 1]."),
    Option("cppo_delta_b", 0.02, _nonneg, "CPPO: prefix divergence budget (the minimum when dynamic)."),
    Option("cppo_budget", "dynamic", _choice(_ref_cppo.BUDGETS), f"CPPO budget, one of {_ref_cppo.BUDGETS}."),
    Option("cppo_quantile", 0.9, _unit, "CPPO: quantile of the dynamic budget."),
    Option("cppo_max_mult", 2.0, _at_least_one, "CPPO: upper clamp of the dynamic budget, x cppo_delta_b (>= 1)."),
    Option("cppo_horizon", None, _optional_pos_int, "CPPO: horizon of the position weight (None: each row's length)."),
    Option(
        "cppo_divergence",
        "binary_tv",
        _choice(_ref_cppo.DIVERGENCES),
        f"CPPO divergence, one of {_ref_cppo.DIVERGENCES}.",
    ),
    # rollout corrections (train / rollout mismatch; docs/methods/rollout-corrections.md)
    Option(
        "rollout_is",
        "none",
        _choice(_ref_loss.ROLLOUT_IS_LEVELS),
        "Rollout IS weight pi_old / mu from the training and rollout engines' log-probs: 'none', 'token' (per "
        "token) or 'sequence' (exp of the row's summed log ratio).",
    ),
    Option(
        "rollout_is_mode",
        "truncate",
        _choice(_ref_loss.ROLLOUT_IS_MODES),
        "'truncate': the weight clamped to [rollout_is_low, rollout_is_high] (TIS); 'mask': tokens (sequences) "
        "whose weight is outside that band leave the loss and its token counts (token level: IcePop; sequence "
        "level: sequence MIS), the others keep their weight.",
    ),
    Option("rollout_is_low", None, _optional_pos, "Lower bound of the rollout IS weight (None: none)."),
    Option("rollout_is_high", 2.0, _optional_pos, "Upper bound of the rollout IS weight (None: none)."),
    Option(
        "rollout_is_batch_normalize",
        False,
        C.flag,
        "Divide the rollout IS weights (after rollout_is_high / the band) by their mean over the batch of the loss "
        "call (token level: its loss tokens; sequence level: its non-empty rows), as verl's "
        "rollout_is_batch_normalize; no all-reduce across ranks. Needs rollout_is.",
    ),
    Option(
        "rollout_rs",
        "none",
        _rollout_rs,
        "Rollout rejection (verl's criteria), one or a comma-separated chain (a token stays only if every one "
        "keeps it): *_k1 keep the tokens / sequences whose ratio (token_k1), product (seq_sum_k1) or geometric mean "
        "(seq_mean_k1: Geo-RS) of pi_old / mu is in [rollout_rs_low, rollout_rs_high]; *_k2 / *_k3 those whose "
        "divergence is <= rollout_rs_high. Rejected tokens leave the loss and its token counts.",
    ),
    Option(
        "rollout_rs_low",
        None,
        _rollout_rs_bound(True),
        "Lower ratio bound of the *_k1 rejections (None: 1 / rollout_rs_high): one value for every k1 criterion or "
        "one per criterion (None for the k2 / k3 ones).",
    ),
    Option(
        "rollout_rs_high",
        None,
        _rollout_rs_bound(False),
        "Upper bound of the rollout rejection (needed with rollout_rs): one value for every criterion or one per "
        "criterion ('1.001,0.05' or a list).",
    ),
)
OPTIONS: dict[str, Option] = {o.name: o for o in _OPTION_LIST}
ROLLOUT_OPTIONS = (
    "rollout_is",
    "rollout_is_mode",
    "rollout_is_low",
    "rollout_is_high",
    "rollout_is_batch_normalize",
    "rollout_rs",
    "rollout_rs_low",
    "rollout_rs_high",
)
SCHEDULE_OPTIONS = (
    "schedule_mode",
    "schedule_start_value",
    "schedule_end_value",
    "schedule_begin_frac",
    "schedule_end_frac",
    "schedule_gamma",
)

#: Options renamed after 0.1.0 (old -> new): the trainers' option checks name the new one.
RENAMED_OPTIONS = {
    "schedule_begin": "schedule_begin_frac",
    "schedule_end": "schedule_end_frac",
    "delta_iters": "delta_coef_iters",
    "delta_lam_min": "delta_coef_lam_min",
    "delta_lam_max": "delta_coef_lam_max",
    "delta_exclude_zero_adv": "delta_coef_exclude_zero_adv",
    "delta_cache_bytes": "delta_coef_cache_bytes",
    "delta_all_reduce": "delta_coef_all_reduce",
    "delta_hidden_cache": "delta_coef_hidden_cache",
    "cppo_delta": "trust_region_delta",
    "trust_region_ratio_cap": "ratio_cap",
}


def option_defaults(names=None) -> dict:
    """``{name: default}`` of the catalogue's options (all, or ``names``)."""
    return {n: OPTIONS[n].default for n in (names if names is not None else OPTIONS)}


def option_help(name: str) -> str:
    return OPTIONS[name].help


def check_option(name: str, value: Any, *, prefix: str = "") -> Any:
    """One option's value, checked and normalised (errors name ``prefix + name``)."""
    return OPTIONS[name].check(prefix + name, value)


def unknown_option_error(key: str, valid, prefix: str = "") -> ValueError:
    """The error for an option key that is not one of ``valid``: names the renamed option or the closest one."""
    if key in RENAMED_OPTIONS:
        return ValueError(f"{prefix}{key} was renamed to {prefix}{RENAMED_OPTIONS[key]} (after rlvr-kernels 0.1.0)")
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.7)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return ValueError(f"unknown option {prefix}{key}{hint}; valid: {sorted(valid)}")


def check_options(values: dict, *, prefix: str = "") -> dict:
    """Every catalogue option in ``values`` checked and normalised, plus the cross-option rules (the schedule as a
    whole, DelTA's coefficient range). Keys that are not catalogue options are returned unchanged."""
    out = dict(values)
    for name, v in values.items():
        if name in OPTIONS:
            out[name] = check_option(name, v, prefix=prefix)
    if (
        "delta_coef_lam_min" in out
        and "delta_coef_lam_max" in out
        and out["delta_coef_lam_max"] < out["delta_coef_lam_min"]
    ):
        raise ValueError(
            f"{prefix}delta_coef_lam_max must be a finite number >= {prefix}delta_coef_lam_min = "
            f"{out['delta_coef_lam_min']!r}, got {out['delta_coef_lam_max']!r}"
        )
    if all(n in out for n in ROLLOUT_OPTIONS):
        _check_rollout(out, prefix)
    if all(n in out for n in SCHEDULE_OPTIONS):
        try:  # the schedule's own checks (begin < end, gamma needs end_value 0, ...); total_steps comes at train time
            make_schedule(out, total_steps=1 << 30)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"invalid {prefix}schedule_* settings: {exc}") from None
    return out


def _check_rollout(o: dict, prefix: str) -> None:
    """The rollout-correction options together: bands in order, a rejection with its bound(s) (one value or one per
    criterion of a chain), the batch normalisation with an IS weight."""
    lo, hi = "rollout_is_low", "rollout_is_high"
    if o[lo] is not None and o[hi] is not None and o[lo] > o[hi]:
        raise ValueError(f"{prefix}{lo} = {o[lo]!r} must be <= {prefix}{hi} = {o[hi]!r}")
    rs = o["rollout_rs"]
    if rs == "none":
        lo, hi = "rollout_rs_low", "rollout_rs_high"
        scalar = not isinstance(o[lo], tuple) and not isinstance(o[hi], tuple)
        if scalar and o[lo] is not None and o[hi] is not None and o[lo] > o[hi]:
            raise ValueError(f"{prefix}{lo} = {o[lo]!r} must be <= {prefix}{hi} = {o[hi]!r}")
    else:
        try:
            _ref_loss.rollout_rs_bands(rs, o["rollout_rs_low"], o["rollout_rs_high"])
        except ValueError as exc:
            raise ValueError(str(exc).replace("rollout_", prefix + "rollout_") if prefix else str(exc)) from None
    if o["rollout_is_batch_normalize"] and o["rollout_is"] == "none":
        raise ValueError(f"{prefix}rollout_is_batch_normalize=True needs an IS weight ({prefix}rollout_is != 'none')")
    if (
        o["rollout_is"] != "none"
        and o["rollout_is_mode"] == "mask"
        and (o["rollout_is_low"] is None and o["rollout_is_high"] is None)
    ):
        raise ValueError(f"{prefix}rollout_is_mode='mask' needs {prefix}rollout_is_low or {prefix}rollout_is_high")


def make_schedule(opts, total_steps: int) -> TemporalSchedule:
    """The :class:`TemporalSchedule` of the ``schedule_*`` options (a mapping or an object with those attributes)."""
    get = opts.get if isinstance(opts, dict) else lambda n: getattr(opts, n)
    return TemporalSchedule(
        get("schedule_mode"),
        start_value=get("schedule_start_value"),
        end_value=get("schedule_end_value"),
        begin=get("schedule_begin_frac"),
        end=get("schedule_end_frac"),
        gamma=get("schedule_gamma"),
        total_steps=total_steps,
    )


# ----------------------------------------------------------------------------------------------------------------
# credit rules


def rho(cfg, q: Optional[float]) -> float:
    """The keep-fraction of a top-k credit rule: ``1 - q(k)`` under a schedule, else ``cfg.credit_rho``."""
    return (1.0 - q) if q is not None else cfg.credit_rho


class CreditRule:
    """One credit rule. Subclasses override the hooks they need; ``cfg`` is a :class:`rlvr_kernels.LossConfig` (its
    fields carry the options), ``q`` the schedule value at this step (None without a schedule), masks are fp32
    ``[b, T]`` weights (0 = not in the loss).

    Attributes: ``name``; ``options`` (catalogue option names it reads); ``schedule``: ``"required"`` (the rule is
    defined by q(k)), ``"optional"`` (a scheduled variant exists) or ``"none"``; ``needs``: inputs beyond the
    standard ones, among ``"entropy"`` (the current policy's per-token entropy) and ``"coefficients"``
    (precomputed per-token coefficients); ``token_local``: each token's term depends only on that token and on
    constants known before the vocabulary pass; ``doc``: its page."""

    name = "none"
    options: tuple = ()
    schedule = "none"
    needs: frozenset = frozenset()
    token_local = True
    doc = "docs/methods/objectives.md"

    def static_mask(self, cfg, mask: torch.Tensor, q: Optional[float]) -> torch.Tensor:
        """The mask after the part of the rule known before the vocabulary pass."""
        return mask

    def policy_mask(
        self, cfg, adv: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, q: Optional[float]
    ) -> Optional[torch.Tensor]:
        """Bool ``[b, T]`` of the tokens kept once the current policy's entropy is known (None: no such mask)."""
        return None

    def shape(
        self,
        cfg,
        adv: torch.Tensor,
        entropy: Optional[torch.Tensor],
        mask: torch.Tensor,
        q: Optional[float],
        coef: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """The advantages ``[b, T]`` after the rule's per-token rescaling."""
        return adv

    def selects_over_batch(self, cfg) -> bool:
        """Whether the rule selects tokens over the whole batch, so that each row's share of the active tokens is
        known only after the vocabulary pass of every row (only the batch total is known before)."""
        return False

    def planned_counts(self, cfg, mask: torch.Tensor, q: Optional[float]) -> Optional[torch.Tensor]:
        """Active tokens per row ``[B]`` (fp32) given the mask after :meth:`static_mask`, before the vocabulary pass;
        None when only the batch total is known in advance (:meth:`planned_total`)."""
        return mask.sum(-1)

    def planned_total(
        self, cfg, valid: torch.Tensor, q: Optional[float], keep: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Active tokens of a whole batch (fp32 0-dim) from its loss mask ``valid [B, T]`` (bool); ``keep``: the
        rollout correction's kept tokens (:func:`rollout_correction`), applied after the static mask as the loss
        does."""
        mask = self.static_mask(cfg, valid.to(torch.float32), q)
        if keep is not None:
            mask = mask * keep
        counts = self.planned_counts(cfg, mask, q)
        return counts.sum().float()

    def uses_schedule(self, flag: Optional[bool]) -> bool:
        """Whether q(k) is evaluated, for the trainer option ``schedule`` (None = the rule's default)."""
        if self.schedule == "required":
            if flag is False:
                raise ValueError(f"credit={self.name!r} is defined by its schedule: schedule cannot be False")
            return True
        if flag and self.schedule == "none":
            raise ValueError(
                f"schedule=True applies to the credit rules with a scheduled variant "
                f"{tuple(n for n, c in CREDITS.items() if c.schedule != 'none')}, not {self.name!r}"
            )
        return bool(flag)

    def __repr__(self) -> str:
        return f"CreditRule({self.name!r})"


class _TPSchedule(CreditRule):
    name = "tp_schedule"
    schedule = "required"
    doc = "docs/methods/tp-schedule.md"

    def static_mask(self, cfg, mask, q):
        from rlvr_kernels.credit import tp_schedule_mask

        return tp_schedule_mask(mask != 0, q, backend=cfg.backend).to(mask.dtype) * mask


class _TopK(CreditRule):
    """Shared by the rules that keep ``ceil(n rho)`` tokens per row."""

    options = ("credit_rho",)
    schedule = "optional"
    needs = frozenset({"entropy"})
    token_local = False

    def planned_counts(self, cfg, mask, q):
        return topk_budget(mask.sum(-1), rho(cfg, q)).to(torch.float32)


class _Forking(_TopK):
    name = "forking"
    doc = "docs/methods/forking-tokens.md"

    def policy_mask(self, cfg, adv, entropy, mask, q):
        from rlvr_kernels.credit import forking_token_mask

        return forking_token_mask(entropy, mask != 0, rho(cfg, q), backend=cfg.backend)


class _D3S(_TopK):
    name = "d3s"
    options = ("credit_rho", "d3s_scope")
    doc = "docs/methods/d3s.md"

    def policy_mask(self, cfg, adv, entropy, mask, q, scope: Optional[str] = None):
        from rlvr_kernels.credit import d3s_token_mask

        return d3s_token_mask(adv, entropy, mask != 0, rho(cfg, q), scope=scope or cfg.d3s_scope, backend=cfg.backend)

    def selects_over_batch(self, cfg):
        return cfg.d3s_scope == "batch"

    def planned_counts(self, cfg, mask, q):
        if self.selects_over_batch(cfg):
            return None  # only the batch total is known; the rows' shares follow from the current entropies
        return super().planned_counts(cfg, mask, q)

    def planned_total(self, cfg, valid, q, keep=None):
        if self.selects_over_batch(cfg):
            n = valid.sum() if keep is None else (valid.float() * keep).sum()
            return topk_budget(n.reshape(1), rho(cfg, q)).sum().float()
        return super().planned_total(cfg, valid, q, keep)


class _EntropyAdv(CreditRule):
    name = "entropy_adv"
    options = ("entropy_adv_alpha", "entropy_adv_kappa")
    schedule = "optional"
    needs = frozenset({"entropy"})
    doc = "docs/methods/entropy-advantages.md"

    def shape(self, cfg, adv, entropy, mask, q, coef):
        from rlvr_kernels.credit import entropy_shaped_advantages

        return entropy_shaped_advantages(
            adv,
            entropy.float(),
            mask != 0,
            q if q is not None else 1.0,
            alpha=cfg.entropy_adv_alpha,
            kappa=cfg.entropy_adv_kappa,
            backend=cfg.backend,
        )


class _DelTA(CreditRule):
    name = "delta"
    options = ("delta_coef_iters", "delta_coef_lam_min", "delta_coef_lam_max", "delta_coef_exclude_zero_adv")
    needs = frozenset({"coefficients"})
    doc = "docs/methods/delta.md"

    def shape(self, cfg, adv, entropy, mask, q, coef):
        return adv * coef.float()


CREDITS: dict[str, CreditRule] = {
    c.name: c for c in (CreditRule(), _TPSchedule(), _Forking(), _EntropyAdv(), _D3S(), _DelTA())
}


def credit(name: Optional[str]) -> CreditRule:
    """The catalogue entry of a credit rule (``None`` is ``"none"``)."""
    name = "none" if name is None else name
    C.choice("credit", name, tuple(CREDITS))
    return CREDITS[name]


# ----------------------------------------------------------------------------------------------------------------
# the hooks with the schedule value as a tensor (torch.compile)

#: The hooks of :class:`CreditRule` that read q, with their arguments after ``cfg`` (q last but for ``shape``).
_HOOKS = ("static_mask", "planned_counts", "policy_mask", "shape")


def call_hook(rule: CreditRule, hook: str, cfg, *args, q):
    """``rule.<hook>(cfg, *args, q[, coef])`` where ``q`` may also be a float64 0-dim CPU tensor (the schedule value
    of a compiled loss, :func:`rlvr_kernels.schedule.schedule_value_tensor`).

    ``args``: ``(mask,)`` for ``static_mask`` / ``planned_counts``; ``(adv, entropy, mask)`` for ``policy_mask``;
    ``(adv, entropy, mask, coef)`` for ``shape``. With a float or None ``q`` this is the plain call. With a tensor
    ``q``, a rule that reads q runs the hook inside the ``rlvr_kernels::credit_hook`` custom op, which reads q on the
    host (opaque to torch.compile: no graph break, no recompilation when q changes); the result is the same."""
    if hook not in _HOOKS:
        raise ValueError(f"unknown credit hook {hook!r}; one of {_HOOKS}")
    fn = getattr(rule, hook)
    coef = args[3] if hook == "shape" else None
    call_args = args[:3] if hook == "shape" else args
    if not isinstance(q, torch.Tensor) or not _reads_q(rule, hook, cfg):
        if isinstance(q, torch.Tensor):
            q = None  # not read: the rules that ignore q give the same result without it
        return fn(cfg, *call_args, q, coef) if hook == "shape" else fn(cfg, *call_args, q)
    padded = tuple(call_args) + (None,) * (3 - len(call_args))
    if hook in ("static_mask", "planned_counts"):
        mask, adv, ent = padded[0], None, None
    else:
        adv, ent, mask = padded
    return torch.ops.rlvr_kernels.credit_hook(hook, rule.name, _hook_options(rule, cfg), q, mask, adv, ent, coef)


def _reads_q(rule: CreditRule, hook: str, cfg) -> bool:
    """Whether ``rule.<hook>`` reads q: the rule has a schedule and overrides the hook (a batch-wide selection's
    ``planned_counts`` is None whatever q is)."""
    if rule.schedule == "none" or getattr(type(rule), hook) is getattr(CreditRule, hook):
        return False
    return not (hook == "planned_counts" and rule.selects_over_batch(cfg))


@torch.compiler.assume_constant_result
def _hook_options(rule: CreditRule, cfg) -> str:
    """The settings a rule's hooks read (its options and the backend) as canonical JSON."""
    names = tuple(rule.options) + ("backend",)
    return json.dumps({n: getattr(cfg, n) for n in names if hasattr(cfg, n)}, sort_keys=True)


@functools.lru_cache(maxsize=64)
def _options_from_json(text: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(**json.loads(text))


@torch.library.custom_op("rlvr_kernels::credit_hook", mutates_args=())
def _credit_hook_op(
    hook: str,
    rule: str,
    options: str,
    q: torch.Tensor,
    mask: torch.Tensor,
    adv: Optional[torch.Tensor],
    entropy: Optional[torch.Tensor],
    coef: Optional[torch.Tensor],
) -> torch.Tensor:
    """``credit(rule).<hook>`` with q read from the 0-dim tensor ``q``; ``options``: :func:`_hook_options`.
    Returns the hook's tensor (``static_mask`` / ``shape``: ``[b, T]`` in mask's / fp32 dtype; ``planned_counts``:
    fp32 ``[b]``; ``policy_mask``: bool ``[b, T]``), always a fresh tensor."""
    cfg, r, qf = _options_from_json(options), credit(rule), float(q)
    if hook in ("static_mask", "planned_counts"):
        out = getattr(r, hook)(cfg, mask, qf)
    elif hook == "policy_mask":
        out = r.policy_mask(cfg, adv, entropy, mask, qf)
    else:
        out = r.shape(cfg, adv, entropy, mask, qf, coef)
    if any(
        t is not None and out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
        for t in (mask, adv, entropy, coef)
    ):
        out = out.clone()  # a custom op never returns (a view of) an input
    return out


@_credit_hook_op.register_fake
def _(hook, rule, options, q, mask, adv, entropy, coef):
    if hook == "static_mask":
        return torch.empty_like(mask)
    if hook == "planned_counts":
        return mask.new_empty(mask.shape[:-1], dtype=torch.float32)
    dtype = torch.bool if hook == "policy_mask" else torch.float32
    return torch.empty(mask.shape, dtype=dtype, device=mask.device)


# ----------------------------------------------------------------------------------------------------------------
# trust regions


class TrustRegion:
    """One trust region. ``loss_type``: the :class:`rlvr_kernels.RLVRLoss` objective that carries it (``None`` for
    ``clip``: the base objective's own PPO clip); ``options``: catalogue options it reads; ``needs_anchor``: it
    measures a divergence against the rollout (behaviour) policy mu; ``token_local`` as for credit rules;
    ``batch_wide``: its mask is a selection over the whole batch from the current policy (the fused path cannot
    run it); ``settings``: the ``RLVRLoss`` settings it fixes beyond ``loss_type``; ``trl``: offered by the TRL
    plug-in's ``trust_region`` (the others are TRL objectives of their own, or verl's); ``thresholds``: how each
    trainer spells its thresholds (their own clip settings)."""

    name = "clip"
    loss_type: Optional[str] = None
    options: tuple = ()
    needs_anchor = False
    token_local = True
    batch_wide = False
    settings: dict = {}
    trl = True
    thresholds = "RLVRLoss epsilon_low/epsilon_high; TRL epsilon/epsilon_high; verl clip_ratio_low/clip_ratio_high"
    doc = "docs/methods/objectives.md"

    def mask(self, cfg, logp: torch.Tensor, rows) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(mask, budget_sum)``: the detached ``[b, T]`` fp32 mask of the tokens inside the region (None: no
        mask) and, for a prefix budget, the sum of the rows' budgets (else None). ``rows`` is a
        :class:`rlvr_kernels.loss.Rows` (``mask``, ``adv``, ``mu``)."""
        return None, None

    def __repr__(self) -> str:
        return f"TrustRegion({self.name!r})"


class _DPPO(TrustRegion):
    name = "dppo"
    loss_type = "dppo"
    options = ("ratio_cap", "dppo_divergence")
    needs_anchor = True
    thresholds = (
        "RLVRLoss epsilon_low/epsilon_high; TRL trust_region_delta (both sides); verl "
        "clip_ratio_low/clip_ratio_high (as verl's dppo_tv / dppo_kl)"
    )
    doc = "docs/methods/cppo.md"

    def mask(self, cfg, logp, rows):
        lp, lm = logp.detach(), rows.mu
        p, m = lp.exp(), lm.exp()
        if getattr(cfg, "dppo_divergence", "binary_tv") == "binary_kl":
            # DPPO's Binary-KL (verl's dppo_kl, its 1e-8 guards): keep moves toward mu, else KL(Ber(mu) || Ber(pi))
            # within the side's threshold
            kl = m * (lm - lp) + (1.0 - m) * torch.log((1.0 - m + 1e-8) / (1.0 - p + 1e-8))
            keep = torch.where(rows.adv > 0, (kl <= cfg.epsilon_high) | (p <= m), (kl <= cfg.epsilon_low) | (p >= m))
            return keep.to(torch.float32), None
        # DPPO's Binary-TV: keep moves toward mu, else |pi(a) - mu(a)| within the side's threshold
        diff = p - m
        keep = torch.where(rows.adv > 0, diff <= cfg.epsilon_high, diff >= -cfg.epsilon_low)
        return keep.to(torch.float32), None


class _CISPO(TrustRegion):
    name = "cispo"
    loss_type = "cispo"
    thresholds = "RLVRLoss epsilon_high (and cispo_min); TRL epsilon_high; verl clip_ratio_low/clip_ratio_high"


class _CPPO(TrustRegion):
    name = "cppo"
    loss_type = "cppo"
    options = (
        "ratio_cap",
        "cppo_w_min",
        "cppo_delta_b",
        "cppo_budget",
        "cppo_quantile",
        "cppo_max_mult",
        "cppo_horizon",
        "cppo_divergence",
    )
    needs_anchor = True
    token_local = False  # a prefix scan along the row
    thresholds = "RLVRLoss epsilon_high (CPPO's delta); TRL trust_region_delta; verl clip_ratio_high"
    doc = "docs/methods/cppo.md"

    def mask(self, cfg, logp, rows):
        from rlvr_kernels.cppo import cppo_mask

        m = rows.mask
        res = cppo_mask(
            logp.detach(),
            rows.mu,
            rows.adv,
            m != 0,
            delta=cfg.epsilon_high,
            w_min=cfg.cppo_w_min,
            delta_b=cfg.cppo_delta_b,
            budget=cfg.cppo_budget,
            quantile=cfg.cppo_quantile,
            max_mult=cfg.cppo_max_mult,
            horizon=cfg.cppo_horizon,
            divergence=cfg.cppo_divergence,
            backend=cfg.backend,
        )
        db = getattr(res, "delta_b", None)
        if db is not None:
            db = (db.reshape(-1).float() * (m.sum(-1) > 0).float()).sum()
        return res.mask.to(torch.float32), db


class _GSPO(TrustRegion):
    name = "gspo"
    settings = {"importance_sampling_level": "sequence_token"}
    token_local = False  # the sequence's mean log-ratio
    trl = False  # TRL's own importance_sampling_level="sequence"
    thresholds = (
        "the PPO clip of the sequence ratio: RLVRLoss epsilon_low/epsilon_high with importance_sampling_level="
        "'sequence' (TRL's GSPO) or 'sequence_token' (verl's GSPO-token); verl clip_ratio_low/clip_ratio_high"
    )


class _SAPO(TrustRegion):
    name = "sapo"
    loss_type = "sapo"
    trl = False  # TRL's own loss_type="sapo"
    thresholds = "the soft gate's temperatures: RLVRLoss sapo_temperature_pos/neg; verl actor tau_pos/tau_neg"


class _GPG(TrustRegion):
    name = "gpg"
    loss_type = "gpg"
    trl = False
    thresholds = "none: the plain policy gradient -A log p"


class _DRO(TrustRegion):
    name = "dro"
    loss_type = "dro"
    trl = False
    thresholds = "a quadratic log-ratio penalty: RLVRLoss dro_beta; verl policy_loss.dro_beta"


class _GeoMean(TrustRegion):
    name = "geo_mean"
    loss_type = "geo_mean"
    token_local = False  # the sequence's geometric mean
    trl = False
    thresholds = (
        "log-ratio bounds (GMPO): RLVRLoss epsilon_low/epsilon_high; verl clip_ratio_low/clip_ratio_high, as the "
        "bounds of the log-ratio"
    )


class _KLCov(TrustRegion):
    name = "kl_cov"
    loss_type = "kl_cov"
    token_local = False
    batch_wide = True
    trl = False
    thresholds = "RLVRLoss kl_cov_ratio, kl_cov_coef; verl policy_loss.kl_cov_ratio, policy_loss.ppo_kl_coef"

    def mask(self, cfg, logp, rows):
        from rlvr_kernels.cov import kl_cov_selection

        return (~kl_cov_selection(rows.adv, logp, rows.mask, cfg.kl_cov_ratio)).to(torch.float32), None


class _ClipCov(TrustRegion):
    name = "clip_cov"
    loss_type = "clip_cov"
    token_local = False
    batch_wide = True
    trl = False
    thresholds = (
        "the PPO clip (RLVRLoss epsilon_low/epsilon_high) and RLVRLoss clip_cov_ratio/clip_cov_lb/clip_cov_ub; verl "
        "clip_ratio_low/clip_ratio_high and policy_loss.clip_cov_ratio/clip_cov_lb/clip_cov_ub"
    )

    def mask(self, cfg, logp, rows):
        from rlvr_kernels.cov import clip_cov_selection

        old = rows.old if rows.old is not None else logp.detach()
        sel = clip_cov_selection(
            rows.adv,
            logp,
            old,
            rows.mask,
            ratio=cfg.clip_cov_ratio,
            lb=cfg.clip_cov_lb,
            ub=cfg.clip_cov_ub,
            clip_low=cfg.epsilon_low,
            clip_high=cfg.epsilon_high,
        )
        return (~sel).to(torch.float32), None


TRUST_REGIONS: dict[str, TrustRegion] = {
    t.name: t
    for t in (
        TrustRegion(),
        _DPPO(),
        _CISPO(),
        _CPPO(),
        _GSPO(),
        _SAPO(),
        _GPG(),
        _DRO(),
        _GeoMean(),
        _KLCov(),
        _ClipCov(),
    )
}


def trust_region(name: str) -> TrustRegion:
    C.choice("trust_region", name, tuple(TRUST_REGIONS))
    return TRUST_REGIONS[name]


def trust_region_of_loss_type(loss_type: str) -> TrustRegion:
    """The trust region an ``RLVRLoss`` ``loss_type`` carries (``clip`` for the PPO-clip family and the others)."""
    for t in TRUST_REGIONS.values():
        if t.loss_type == loss_type:
            return t
    return TRUST_REGIONS["clip"]


#: Objectives whose per-token term reads its whole sequence (a sequence weight).
_SEQUENCE_OBJECTIVES = ("vespo", "geo_mean")


def token_local(cfg) -> bool:
    """Whether each token's loss term and gradient coefficient depend only on that token and on batch constants known
    before the vocabulary pass (normalisers, row counts), so that the fused path may split a row: token-level ratios,
    a token-local objective, credit rule and trust region."""
    return (
        cfg.importance_sampling_level == "token"
        and cfg.loss_type not in _SEQUENCE_OBJECTIVES
        and trust_region_of_loss_type(cfg.loss_type).token_local
        and credit(cfg.credit).token_local
    )


# ----------------------------------------------------------------------------------------------------------------
# rollout corrections


#: The named rollout corrections and their option values (``RLVRLoss`` keywords, TRL fields, ``policy_loss.rlvr``
#: keys); thresholds are examples. Every one is the pair of :func:`rollout_correction` options; each has a peer.
ROLLOUT_CORRECTIONS: dict[str, dict] = {
    "token_tis": dict(rollout_is="token", rollout_is_mode="truncate", rollout_is_high=2.0),  # TRL token_truncate
    "token_mask": dict(rollout_is="token", rollout_is_mode="mask", rollout_is_high=2.0),  # TRL token_mask
    "sequence_tis": dict(rollout_is="sequence", rollout_is_mode="truncate", rollout_is_high=2.0),  # TRL seq_trunc
    "sequence_mask": dict(rollout_is="sequence", rollout_is_mode="mask", rollout_is_high=2.0),  # TRL sequence_mask
    "icepop": dict(rollout_is="token", rollout_is_mode="mask", rollout_is_low=0.5, rollout_is_high=2.0),
    "geo_rs_token_mis": dict(  # AReaL's Geo-RS + token MIS
        rollout_is="token",
        rollout_is_mode="mask",
        rollout_is_low=0.5,
        rollout_is_high=2.0,
        rollout_rs="seq_mean_k1",
        rollout_rs_high=1.001,
    ),
    "geo_rs_token_tis": dict(  # verl's decoupled_geo_rs_token_tis
        rollout_is="token",
        rollout_is_mode="truncate",
        rollout_is_high=2.0,
        rollout_rs="seq_mean_k1",
        rollout_rs_high=1.001,
    ),
}


def rollout_correction_active(cfg) -> bool:
    """Whether ``cfg`` (a ``LossConfig`` or a mapping of options) asks for a rollout IS weight or rejection."""
    get = cfg.get if isinstance(cfg, dict) else lambda n: getattr(cfg, n, "none")
    return get("rollout_is") != "none" or get("rollout_rs") != "none"


def rollout_correction(cfg, old: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor):
    """``(keep, weight)`` of the rollout correction of ``cfg`` (:func:`rlvr_kernels.reference.loss.
    rollout_correction`): ``old`` / ``mu`` the training / rollout engines' log-probs ``[B, T]``, ``mask`` the loss
    tokens. Applied before the vocabulary pass: ``keep`` multiplies the loss mask (the removed tokens leave every
    token count, as a credit rule's static mask), ``weight`` the rollout IS ratio. (None, None) when inactive.
    ``rollout_is_batch_normalize`` normalises the weight over this call's ``mask`` only (no collective: each rank /
    micro-batch its own batch)."""
    if not rollout_correction_active(cfg):
        return None, None
    return _ref_loss.rollout_correction(
        old.float() - mu.float(),
        mask,
        is_level=cfg.rollout_is,
        is_mode=cfg.rollout_is_mode,
        is_low=cfg.rollout_is_low,
        is_high=cfg.rollout_is_high,
        is_batch_normalize=getattr(cfg, "rollout_is_batch_normalize", False),
        rs=cfg.rollout_rs,
        rs_low=cfg.rollout_rs_low,
        rs_high=cfg.rollout_rs_high,
    )


# ----------------------------------------------------------------------------------------------------------------
# the catalogue as documentation


def _loss_settings(t: TrustRegion) -> str:
    """The ``RLVRLoss`` keywords of a trust region, as Markdown."""
    kw = ([f"loss_type={t.loss_type}"] if t.loss_type else []) + [f"{k}={v}" for k, v in t.settings.items()]
    return ", ".join(f"`{k}`" for k in kw)


def markdown_table() -> str:
    """The catalogue as Markdown: one row per method (kind, options, needs, token-local, page) and one row per
    option (default, meaning). The README's method table is this text
    (``python -c "from rlvr_kernels import methods; print(methods.markdown_table())"``; a test keeps them equal)."""
    rows = ["| method | kind | options | needs | token-local | page |", "|---|---|---|---|---|---|"]
    for c in CREDITS.values():
        if c.name == "none":
            continue
        needs = sorted(c.needs) + (["schedule"] if c.schedule == "required" else [])
        sched = " (scheduled variant: `schedule=True`)" if c.schedule == "optional" else ""
        rows.append(
            f"| `credit={c.name}` | credit rule{sched} | {', '.join(f'`{o}`' for o in c.options) or '-'} "
            f"| {', '.join(needs) or '-'} | {'yes' if c.token_local else 'no'} | [{c.doc}]({c.doc}) |"
        )
    for t in TRUST_REGIONS.values():
        if t.name == "clip":
            continue
        needs = ["rollout (anchor) log-probs"] if t.needs_anchor else []
        # TRL's trust_region offers the TRL ones; the others are RLVRLoss settings and verl's rlvr_<name> modes
        where = f"`trust_region={t.name}`" if t.trl else f"`rlvr_{t.name}` ({_loss_settings(t)})"
        rows.append(
            f"| {where} | trust region (thresholds: {t.thresholds}) "
            f"| {', '.join(f'`{o}`' for o in t.options) or '-'} | {', '.join(needs) or '-'} "
            f"| {'yes' if t.token_local else 'no'} | [{t.doc}]({t.doc}) |"
        )
    rows.append(
        "| `rollout_is` / `rollout_rs` | rollout correction (train/rollout mismatch; named combinations: "
        f"{', '.join(f'`{n}`' for n in ROLLOUT_CORRECTIONS)}) | {', '.join(f'`{o}`' for o in ROLLOUT_OPTIONS)} "
        "| old and rollout log-probs | yes "
        "| [docs/methods/rollout-corrections.md](docs/methods/rollout-corrections.md) |"
    )
    rows += ["", "| option | default | meaning |", "|---|---|---|"]
    for o in OPTIONS.values():
        rows.append(f"| `{o.name}` | `{o.default!r}` | {o.help.replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"
