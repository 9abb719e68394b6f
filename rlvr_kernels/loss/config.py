"""``LossConfig``: the settings of :class:`rlvr_kernels.RLVRLoss`, validated once.

Liger's constructor keywords keep their names, defaults and meaning; the method options (credit rules, trust regions)
take their names, defaults and checks from the catalogue (:mod:`rlvr_kernels.methods`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Optional, Union

import torch

from rlvr_kernels import _checks as C
from rlvr_kernels import methods as M
from rlvr_kernels._backend import BACKENDS
from rlvr_kernels.reference import loss as ref_loss
from rlvr_kernels.schedule import TemporalSchedule

#: ``"sequence"``: GSPO as TRL / Liger compute it (one ratio per sequence); ``"sequence_token"``: GSPO-token as verl
#: computes it (the sequence ratio's value, each token's own gradient, the sequence log-ratio capped at 10).
IS_LEVELS = ("token", "sequence", "sequence_token")

#: The catalogue options that are ``LossConfig`` fields (the others are trainer-level: the schedule settings, which
#: reach the loss as a :class:`TemporalSchedule`, and DelTA's estimator settings, which reach it as coefficients).
LOSS_METHOD_OPTIONS = tuple(name for name, opt in M.OPTIONS.items() if opt.loss)
_D = M.option_defaults(LOSS_METHOD_OPTIONS)


@dataclass
class LossConfig:
    """Settings of :class:`RLVRLoss` (validated in ``__post_init__``); see its docstring for their meaning."""

    beta: float = 0.04
    compiled: bool = True
    use_ref_model: bool = True
    chunk_size: int = 1
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: str = "dapo"
    max_completion_length: Optional[int] = None
    importance_sampling_level: str = "token"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    temperature: float = 1.0
    delta: Optional[float] = None
    use_bias_correction_kl: bool = False
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    # beyond Liger
    dro_beta: Optional[float] = None
    kl_cov_ratio: float = 0.0002
    kl_cov_coef: float = 1.0
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    aggregation: Optional[str] = None
    loss_horizon: Optional[int] = None
    dual_clip: Optional[float] = None
    cispo_min: Optional[float] = None
    ratio_cap: Optional[float] = _D["ratio_cap"]
    log_ratio_clip: Optional[float] = None
    entropy_coef: float = 0.0
    credit: str = "none"
    schedule: Optional[TemporalSchedule] = None
    credit_rho: float = _D["credit_rho"]
    entropy_adv_alpha: float = _D["entropy_adv_alpha"]
    entropy_adv_kappa: float = _D["entropy_adv_kappa"]
    d3s_scope: str = _D["d3s_scope"]
    dppo_divergence: str = _D["dppo_divergence"]
    cppo_w_min: float = _D["cppo_w_min"]
    cppo_delta_b: float = _D["cppo_delta_b"]
    cppo_budget: str = _D["cppo_budget"]
    cppo_quantile: float = _D["cppo_quantile"]
    cppo_max_mult: float = _D["cppo_max_mult"]
    cppo_horizon: Optional[int] = _D["cppo_horizon"]
    cppo_divergence: str = _D["cppo_divergence"]
    rollout_is: str = _D["rollout_is"]
    rollout_is_mode: str = _D["rollout_is_mode"]
    rollout_is_low: Optional[float] = _D["rollout_is_low"]
    rollout_is_high: Optional[float] = _D["rollout_is_high"]
    rollout_is_batch_normalize: bool = _D["rollout_is_batch_normalize"]
    rollout_rs: str = _D["rollout_rs"]  # one criterion or a comma-separated chain
    rollout_rs_low: Union[float, tuple, None] = _D["rollout_rs_low"]  # one value or one per criterion
    rollout_rs_high: Union[float, tuple, None] = _D["rollout_rs_high"]
    fused: object = "auto"
    backend: str = "auto"
    ignore_index: int = -100
    compiled_value_checks: bool = True

    def __post_init__(self):
        if self.credit is None:
            self.credit = "none"
        self._check_numbers()
        for name in LOSS_METHOD_OPTIONS:
            setattr(self, name, M.check_option(name, getattr(self, name)))
        M.check_options({n: getattr(self, n) for n in M.ROLLOUT_OPTIONS})  # the bands and bounds together
        C.choice("loss_type", self.loss_type, ref_loss.LOSS_TYPES)
        C.choice("importance_sampling_level", self.importance_sampling_level, IS_LEVELS)
        if self.importance_sampling_level != "token" and self.loss_type not in ref_loss.PPO_CLIP_TYPES:
            raise ValueError(
                f"importance_sampling_level={self.importance_sampling_level!r} (GSPO) is not supported with "
                f"loss_type={self.loss_type!r}: GSPO's sequence ratio goes with the PPO clip types "
                f"{ref_loss.PPO_CLIP_TYPES}"
            )
        if self.loss_type == "dro" and self.dro_beta is None:
            raise ValueError("loss_type='dro' needs dro_beta > 0 (the weight of its quadratic log-ratio penalty)")
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got {self.clip_cov_lb} >= {self.clip_cov_ub}")
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ValueError(
                "loss_type='dr_grpo' needs max_completion_length (it divides by B * max_completion_length)"
            )
        if self.aggregation is not None:
            C.choice("aggregation", self.aggregation, ref_loss.VERL_AGGREGATIONS)
        rule = M.credit(self.credit)
        if rule.schedule == "required" and self.schedule is None:
            raise ValueError(
                f"credit={self.credit!r} needs a schedule=TemporalSchedule(...) (its cut-off moves with the step)"
            )
        if self.schedule is not None and not isinstance(self.schedule, TemporalSchedule):
            raise TypeError(f"schedule must be a TemporalSchedule, got {type(self.schedule).__name__}")
        C.choice("backend", self.backend, BACKENDS)
        if self.dual_clip is not None and self.loss_type not in ref_loss.PPO_CLIP_TYPES:
            raise ValueError(
                f"dual_clip applies to the PPO-clip loss types {ref_loss.PPO_CLIP_TYPES}, not {self.loss_type!r}"
            )
        capped = tuple(t.loss_type for t in M.TRUST_REGIONS.values() if "ratio_cap" in t.options)
        if self.ratio_cap is not None and self.loss_type not in capped:
            raise ValueError(f"ratio_cap (truncated IS, verl's dppo/cppo form) applies to loss_type {capped}")
        if isinstance(self.fused, str) and self.fused != "auto" or not isinstance(self.fused, (str, bool)):
            raise ValueError(f"fused must be 'auto', True or False, got {self.fused!r}")
        if self.fused is True and self.batch_selection:
            what = (
                f"loss_type={self.loss_type!r}: its covariance selection"
                if M.trust_region_of_loss_type(self.loss_type).batch_wide
                else f"credit={self.credit!r} with d3s_scope='batch': the batch-wide top-rho selection"
            )
            raise ValueError(
                f"fused=True cannot run {what} needs every token's current log-prob or entropy before any chunk's "
                "gradient; use fused='auto' (composable path)"
            )

    @property
    def batch_selection(self) -> bool:
        """Whether the loss selects tokens over the whole batch from the current policy, so that no chunk's gradient
        is known before the vocabulary pass of every row: the credit rule's per-row active counts (D^3S with
        ``d3s_scope="batch"``) or the objective's covariance selection (Clip-Cov, KL-Cov)."""
        return M.credit(self.credit).selects_over_batch(self) or M.trust_region_of_loss_type(self.loss_type).batch_wide

    def _check_numbers(self) -> None:
        """Every Liger-level number and flag: type and range, stored back as a plain Python value (NaN never
        passes). The method options are checked by the catalogue."""
        pos = dict(low=0.0, low_open=True)
        nonneg = dict(low=0.0)
        reals = {
            "beta": nonneg,
            "epsilon_low": nonneg,
            "epsilon_high": nonneg,
            "sapo_temperature_pos": pos,
            "sapo_temperature_neg": pos,
            "vespo_k_pos": nonneg,
            "vespo_lambda_pos": nonneg,
            "vespo_k_neg": nonneg,
            "vespo_lambda_neg": nonneg,
            "entropy_coef": {},
            "kl_cov_ratio": dict(low=0.0, low_open=True, high=1.0),
            "kl_cov_coef": nonneg,
            "clip_cov_ratio": dict(low=0.0, low_open=True, high=1.0),
            "clip_cov_lb": {},
            "clip_cov_ub": {},
        }
        optional_reals = {
            "delta": pos,
            "loss_horizon": pos,
            "dual_clip": dict(low=1.0, low_open=True),
            "cispo_min": nonneg,
            "log_ratio_clip": pos,
            "dro_beta": pos,
        }
        for name, rng in reals.items():
            setattr(self, name, C.real(name, getattr(self, name), **rng))
        for name, rng in optional_reals.items():
            setattr(self, name, C.optional_real(name, getattr(self, name), **rng))
        self.temperature = C.temperature(self.temperature)
        self.chunk_size = C.integer("chunk_size", self.chunk_size, low=1)
        self.max_completion_length = C.optional_integer("max_completion_length", self.max_completion_length, low=1)
        self.ignore_index = C.integer("ignore_index", self.ignore_index)
        for name in ("compiled", "use_ref_model", "use_bias_correction_kl", "compiled_value_checks"):
            C.flag(name, getattr(self, name))

    def to_json(self) -> str:
        """The configuration as canonical JSON (sorted keys; the schedule as :meth:`TemporalSchedule.to_dict`): the
        string argument of the loss's custom ops, parsed back by :func:`config_from_json`. Under torch.compile it is
        evaluated once, at trace time (a constant of the graph)."""
        return _config_json(self)


@torch.compiler.assume_constant_result
def _config_json(cfg: LossConfig) -> str:
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    if cfg.schedule is not None:
        d["schedule"] = cfg.schedule.to_dict()
    return json.dumps(d, sort_keys=True)


@functools.lru_cache(maxsize=64)
def config_from_json(text: str) -> LossConfig:
    """The :class:`LossConfig` of :meth:`LossConfig.to_json` (validated again; cached per string). Do not mutate the
    returned object: it is shared by every call with the same string."""
    d = json.loads(text)
    if d.get("schedule") is not None:
        d["schedule"] = TemporalSchedule.from_dict(d["schedule"])
    return LossConfig(**d)


def token_local(cfg: LossConfig) -> bool:
    """Whether the fused path may split a row into segments (:func:`rlvr_kernels.methods.token_local`)."""
    return M.token_local(cfg)
