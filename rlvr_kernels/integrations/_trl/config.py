"""``RLVRGRPOConfig``: TRL's ``GRPOConfig`` plus the method options of :mod:`rlvr_kernels.methods`.

The method options (names, defaults, help and checks) are the catalogue's, the same as verl's ``policy_loss.rlvr``
keys and ``RLVRLoss``'s keywords. The TRL-only fields are the method choice (``credit``, ``trust_region``), the
DPPO/CPPO threshold ``trust_region_delta`` (TRL's ``epsilon`` is the PPO clip of ``loss_type``), DelTA's hidden-state
cache budget and the kernel backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from trl import GRPOConfig

from rlvr_kernels import _checks as C
from rlvr_kernels import methods as M
from rlvr_kernels._backend import BACKENDS

__all__ = ["RLVRGRPOConfig", "CREDITS", "TRUST_REGIONS", "TRUST_REGION_BASES"]

CREDITS = tuple(M.CREDITS)
TRUST_REGIONS = tuple(n for n, t in M.TRUST_REGIONS.items() if t.trl)
# TRL loss types whose normaliser a trust region other than "clip" can take over (the others are objectives of their
# own).
TRUST_REGION_BASES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _help(text: str) -> dict:
    return {"help": text}


def _option(name: str):
    """A dataclass field for the catalogue option ``name``: its default and help."""
    return field(default=M.OPTIONS[name].default, metadata=_help(M.OPTIONS[name].help))


@dataclass
class RLVRGRPOConfig(GRPOConfig):
    r"""``GRPOConfig`` plus the credit-allocation and trust-region options of ``rlvr_kernels``.

    Defaults leave TRL's behaviour unchanged (``credit="none"``, ``trust_region="clip"``). The methods, their
    equations and every option are described in ``docs/methods/`` and the README's TRL section.

    Credit (``credit``): ``"tp_schedule"`` (only the last ``1 - q(k)`` of each completion by position gets a
    gradient), ``"forking"`` (per completion the top ``ceil(n rho)`` tokens by entropy), ``"d3s"`` (the top
    ``ceil(n rho)`` tokens by ``|A| H`` over the micro-batch or per completion, ``d3s_scope``), ``"entropy_adv"``
    (``A' = A + s min(alpha H, |A| / kappa)``), ``"delta"`` (DelTA: ``A' = A c~`` with detached coefficients from the
    last-layer proxy, ``delta_coef_*``). ``rho = credit_rho``; with ``schedule=True`` the scheduled variants use
    ``rho = 1 - q(k)`` (forking, d3s) and ``s = q(k)`` (entropy_adv, else 1).
    Schedule: ``q(k) = TemporalSchedule(schedule_mode, start_value=schedule_start_value,
    end_value=schedule_end_value, begin=schedule_begin_frac, end=schedule_end_frac, gamma=schedule_gamma,
    total_steps=max_steps)(k)`` at the 1-based optimizer step k (``schedule_*_frac`` are fractions of the run).
    Trust region (``trust_region``): ``"clip"`` TRL's own objective (``loss_type``); ``"dppo"`` DPPO's Binary-TV
    (or, ``dppo_divergence="binary_kl"``, Binary-KL) mask with threshold ``trust_region_delta`` on both sides;
    ``"cppo"`` CPPO's position-weighted prefix-budget mask (delta ``trust_region_delta``, ``cppo_*``); ``"cispo"``
    CISPO's clamp at ``epsilon_high`` (as TRL's ``loss_type="cispo"``). They replace the objective and keep the
    normaliser of ``loss_type`` (one of grpo, bnpo, dr_grpo, dapo; ``trust_region="cispo"`` with
    ``loss_type="dapo"`` is TRL's ``loss_type="cispo"``).
    Rollout correction (``rollout_is``, ``rollout_rs`` and their bounds; ``docs/methods/rollout-corrections.md``):
    the train/rollout IS weight and rejection computed in log space from ``old_per_token_logps`` and vLLM's
    ``sampling_per_token_logps``, in place of TRL's ``vllm_importance_sampling_mode``; rejected tokens leave the loss
    and its token counts.
    """

    credit: str = field(default="none", metadata=_help(f"Token credit rule, one of {CREDITS}."))
    schedule: Optional[bool] = _option("schedule")
    schedule_mode: str = _option("schedule_mode")
    schedule_start_value: float = _option("schedule_start_value")
    schedule_end_value: float = _option("schedule_end_value")
    schedule_begin_frac: float = _option("schedule_begin_frac")
    schedule_end_frac: float = _option("schedule_end_frac")
    schedule_gamma: float = _option("schedule_gamma")
    credit_rho: float = _option("credit_rho")
    entropy_adv_alpha: float = _option("entropy_adv_alpha")
    entropy_adv_kappa: float = _option("entropy_adv_kappa")
    d3s_scope: str = _option("d3s_scope")
    d3s_rollouts_k: Optional[int] = field(
        default=None,
        metadata=_help(
            "D^3S sample level: keep, per prompt group, the k completions whose advantages have the largest variance "
            "(the others leave the loss); None keeps all. Independent of credit."
        ),
    )
    delta_coef_iters: int = _option("delta_coef_iters")
    delta_coef_lam_min: float = _option("delta_coef_lam_min")
    delta_coef_lam_max: float = _option("delta_coef_lam_max")
    delta_coef_exclude_zero_adv: bool = _option("delta_coef_exclude_zero_adv")
    delta_coef_cache_bytes: int = field(
        default=1 << 30,
        metadata=_help(
            "DelTA: byte budget for caching the generation batch's valid-token hidden states between the estimator's "
            "phases (one no-grad forward); over it (or 0) every phase re-runs the backbone (delta_coef_iters + 3 "
            "forwards)."
        ),
    )
    trust_region: str = field(
        default="clip",
        metadata=_help(f"One of {TRUST_REGIONS}: 'clip' is TRL's loss_type; the others replace its objective."),
    )
    trust_region_delta: float = field(
        default=0.15, metadata=_help("Divergence threshold delta of trust_region='dppo' (both sides) and 'cppo'.")
    )
    ratio_cap: Optional[float] = _option("ratio_cap")
    dppo_divergence: str = _option("dppo_divergence")
    cppo_w_min: float = _option("cppo_w_min")
    cppo_delta_b: float = _option("cppo_delta_b")
    cppo_budget: str = _option("cppo_budget")
    cppo_quantile: float = _option("cppo_quantile")
    cppo_max_mult: float = _option("cppo_max_mult")
    cppo_horizon: Optional[int] = _option("cppo_horizon")
    cppo_divergence: str = _option("cppo_divergence")
    rollout_is: str = _option("rollout_is")
    rollout_is_mode: str = _option("rollout_is_mode")
    rollout_is_low: Optional[float] = _option("rollout_is_low")
    rollout_is_high: Optional[float] = _option("rollout_is_high")
    rollout_is_batch_normalize: bool = _option("rollout_is_batch_normalize")
    rollout_rs: str = _option("rollout_rs")
    # one value, or one per criterion of a rollout_rs chain ("1.001,0.05" on the command line: parsed as str)
    rollout_rs_low: Union[float, str, None] = _option("rollout_rs_low")
    rollout_rs_high: Union[float, str, None] = _option("rollout_rs_high")
    rlvr_backend: str = field(
        default="auto",
        metadata=_help("rlvr_kernels backend: 'auto' (Triton on CUDA, torch on CPU), 'triton' or 'torch'."),
    )

    def __post_init__(self):
        super().__post_init__()
        validate(self)

    @property
    def uses_rlvr_loss(self) -> bool:
        """Whether the loss is computed by ``RLVRLoss`` (any credit rule, a trust region other than clip, or a
        rollout correction)."""
        return self.credit != "none" or self.trust_region != "clip" or self.uses_rollout_correction

    @property
    def uses_rollout_correction(self) -> bool:
        """Whether ``rollout_is`` / ``rollout_rs`` ask for the package's rollout correction (it then replaces TRL's
        ``vllm_importance_sampling_mode``: the loss reads ``old_per_token_logps`` and ``sampling_per_token_logps``)."""
        return M.rollout_correction_active(dict(rollout_is=self.rollout_is, rollout_rs=self.rollout_rs))

    def rollout_correction_kwargs(self) -> dict:
        """The ``RLVRLoss`` / ``LossConfig`` keywords of the rollout correction (empty when inactive)."""
        return {n: getattr(self, n) for n in M.ROLLOUT_OPTIONS} if self.uses_rollout_correction else {}

    @property
    def uses_schedule(self) -> bool:
        """Whether the credit rule evaluates q(k) (``schedule``, or a rule defined by it)."""
        return M.credit(self.credit).uses_schedule(self.schedule)


def validate(c: RLVRGRPOConfig) -> None:
    """Every rlvr option of ``c`` (the catalogue's checks, normalised values stored back) and the combinations.
    Every bad value is a ``ValueError``, as for TRL's own options (a wrong type included)."""
    try:
        _validate(c)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def _validate(c: RLVRGRPOConfig) -> None:
    rule = M.credit(c.credit)
    C.choice("trust_region", c.trust_region, TRUST_REGIONS)  # the others are TRL objectives or verl's
    trust = M.trust_region(c.trust_region)
    for name, value in M.check_options({n: getattr(c, n) for n in M.OPTIONS}).items():
        setattr(c, name, value)
    rule.uses_schedule(c.schedule)  # schedule=True on a rule without a scheduled variant, False on tp_schedule
    c.delta_coef_cache_bytes = C.integer("delta_coef_cache_bytes", c.delta_coef_cache_bytes, low=0)
    c.trust_region_delta = C.real("trust_region_delta", c.trust_region_delta, low=0.0, low_open=True)
    C.choice("rlvr_backend", c.rlvr_backend, BACKENDS)
    if c.ratio_cap is not None and "ratio_cap" not in trust.options:
        capped = tuple(n for n, t in M.TRUST_REGIONS.items() if "ratio_cap" in t.options)
        raise ValueError(f"ratio_cap applies to trust_region in {capped}, not {c.trust_region!r}")
    if c.trust_region != "clip":
        tr = c.trust_region
        if c.loss_type not in TRUST_REGION_BASES:
            raise ValueError(
                f"trust_region={tr!r} replaces the objective of loss_type; loss_type then only picks the normaliser "
                f"and must be one of {TRUST_REGION_BASES}, got {c.loss_type!r}"
            )
        if c.importance_sampling_level != "token":
            raise ValueError(
                f"trust_region={tr!r} works per token: importance_sampling_level must be 'token', got "
                f"{c.importance_sampling_level!r}"
            )
        if c.delta is not None:
            raise ValueError(
                f"delta (the two-sided clip of the PPO ratio) does not apply to trust_region={tr!r}; "
                "use ratio_cap for a truncated-IS cap"
            )
    if c.uses_rollout_correction and not (c.use_vllm and c.vllm_importance_sampling_correction):
        raise ValueError(
            "rollout_is / rollout_rs correct the vLLM rollout: they need use_vllm=True and "
            "vllm_importance_sampling_correction=True (TRL then keeps the old and the sampling log-probs; the "
            "package's correction replaces TRL's vllm_importance_sampling_mode)"
        )
    if c.uses_rlvr_loss:
        what = f"credit={c.credit!r}, trust_region={c.trust_region!r}"
        if c.top_entropy_quantile < 1.0:
            raise ValueError(
                f"top_entropy_quantile < 1 cannot be combined with {what}: it is TRL's own token mask "
                "(use credit='forking' with credit_rho for the same rule)"
            )
        if c.off_policy_mask_threshold is not None:
            raise ValueError(f"off_policy_mask_threshold is not supported with {what}")
        if c.use_adaptive_entropy:
            raise ValueError(f"use_adaptive_entropy is not supported with {what} (a static entropy_coef is)")
