"""TRL integration: ``RLVRGRPOConfig`` and ``RLVRGRPOTrainer``, drop-ins for TRL's ``GRPOConfig`` / ``GRPOTrainer``.

For a TRL user the change is two names::

    from rlvr_kernels.integrations.trl import RLVRGRPOConfig as GRPOConfig, RLVRGRPOTrainer as GRPOTrainer

With the defaults (``credit="none"``, ``trust_region="clip"``) the trainer trains exactly like TRL's: the only
difference is that the per-token log-probs and entropies come from :func:`rlvr_kernels.fused_linear_logprobs` (last
hidden states x ``lm_head.weight``, never the ``[tokens x vocab]`` logits) instead of TRL's chunked LM head. Setting
``credit`` (TP-Schedule, forking tokens, entropy-shaped advantages, D^3S, DelTA) or ``trust_region`` (DPPO, CPPO)
switches the loss to :class:`rlvr_kernels.RLVRLoss` on the same hidden states, with TRL's normalisation.

How the forward is routed (TRL 1.16). TRL 1.16 no longer has ``compute_liger_loss`` / ``_get_last_hidden_state`` in
GRPO: ``GRPOTrainer.__init__`` patches the policy's ``forward`` (``trl.trainer.utils.add_fused_lm_head``) so that
``model(..., labels=..., fused_lm_head=True)`` runs the backbone and the LM head *inside the model's forward*, which
is what the Liger path's ``_ForwardRedirection`` achieved (the DDP/FSDP/DeepSpeed wrapper's forward runs, so its
pre-forward and gradient hooks fire), and gathers a ZeRO-3-partitioned ``lm_head`` with
``maybe_gather_lm_head_ctx``. We wrap that patched forward once more (policy and reference model):

- ``fused_lm_head=True``: the backbone's ``last_hidden_state[:, :-1]`` (the positions whose next-token label is not
  ``-100``, i.e. the completion tokens), ``lm_head.weight`` / ``bias`` gathered under TRL's
  ``maybe_gather_lm_head_ctx`` (and ``full_tensor()`` for FSDP2 DTensors), then ``fused_linear_logprobs``; the
  result is TRL's ``FusedCausalLMOutput`` so TRL's own ``_get_per_token_logps_and_entropies`` (3-tuple return,
  micro-batching, multimodal inputs), ``_compute_loss`` (every loss type, masks, IS corrections, entropy mask and
  bonus, metrics) and the old/ref log-prob passes keep working unchanged. Under ZeRO-3 the backward gathers the
  head again (``_RegatheredLinearLogprobs``), as TRL's own chunked head does.
- ``rlvr_head_fn=fn``: the same hidden states, sliced ``[:, :-1][:, -logits_to_keep:]``, and the gathered head are
  handed to ``fn(hidden, weight, bias)`` (the ``RLVRLoss`` call) inside the forward; ``RLVRLoss``'s fused path
  computes the gradients w.r.t. hidden states and head during that forward, so the head is read only while it is
  gathered.
- a tap (``_HeadState.tap``, set only during the trainer's DelTA passes): the ``fused_lm_head=True`` forward also
  hands its final hidden states (the ``lm_head`` input) to the tap, and skips the head when the pass needs no
  log-probs.

DelTA (``credit="delta"``, spec ``delta.md``). Once per generation batch, in ``_generate_and_score_completions``
after TRL has scored it (advantages known) and before any optimizer step on it, the trainer computes the detached
coefficients ``c~ [B, T]`` (:meth:`RLVRGRPOTrainer.rlvr_delta_coefficients`): E = every loss-mask token of the
generation batch on this process (no all-reduce, as the official per-DP-rank rollout batch); theta_old = the
policy at that moment, run exactly like TRL's ``old_per_token_logps`` pass (``_get_per_token_logps_and_entropies``
on ``self.model``, no_grad, gradient checkpointing off, ``per_device_*_batch_size`` rows at a time, multimodal
inputs sliced by TRL, the backbone under ZeRO-3's own hooks); ``h_t`` = the tapped final hidden states; ``p_t`` =
``exp`` of TRL's ``old_per_token_logps`` when TRL computed them, else of the log-probs of the first DelTA pass, both
at the rollout temperature (``temperature`` divided by the model's logit scale, the temperature TRL samples and
scores with). :class:`rlvr_kernels.DeltaEstimator` streams the phases over the micro-batches; the valid tokens'
``h`` are cached between phases when they fit ``delta_cache_bytes`` (one forward), otherwise every phase re-runs
the backbone (``delta_iters + 3`` forwards as the official code, the head only in the first); the last phase's raw
coefficients are normalised without a further pass. The coefficients
travel in the batch dict under ``"rlvr_delta_coefficients"`` (TRL's shuffle/split carry them to each micro-batch,
stale across ``num_iterations`` like the old log-probs) and reach ``RLVRLoss(credit="delta")`` as
``delta_coefficients``: the advantage becomes ``A c~`` in the unchanged objective of ``loss_type`` / ``trust_region``.
The DelTA pass's log-probs also serve as the DPPO/CPPO behaviour log-probs when TRL skipped them.

DPPO / CPPO anchor. The mask measures the divergence against mu, the rollout engine's policy: TRL's
``sampling_per_token_logps`` (vLLM's log-probs of the sampled tokens, or a ``rollout_func``'s), passed to ``RLVRLoss``
as ``rollout_per_token_logps``; a token the engine did not score (NaN) takes the behaviour log-prob. The ratio
``rho`` stays against the behaviour log-probs (``old_per_token_logps``). When the trained model generated the batch
there are no rollout log-probs and mu is the generating policy, the behaviour log-probs: on a batch's first update
pi equals mu and nothing is masked; the trainer says so once (a ``logging`` warning on the main process) instead of
CPPO's anchor warning at every step.

Precision. Under ``bf16=True`` / ``fp16=True`` accelerate runs the model's forward under autocast and converts its
outputs to fp32, rebuilding the returned containers (``type(x)(iterable)``). The head function runs with autocast
off on the hidden states and head cast to the autocast dtype (what ``lm_head`` would have computed in) and returns
``(loss, dict of 0-dim metric tensors)``, which that conversion and DDP keep intact.

Why ``RLVRLoss`` for the new methods (rather than masking before TRL's math): the credit masks that depend on the
current policy (forking tokens, D^3S) are only known after the vocabulary pass, TRL computes its loss mask and
normaliser before it, and TRL has no DPPO/CPPO objective; the package's composition rule (``tp-schedule.md`` 6.2:
every normaliser that counts tokens counts the active ones) also needs the normaliser to follow the credit mask.
``RLVRLoss`` applies credit mask -> advantage shaping -> trust region -> aggregation in one place and is parity-tested
against TRL's loss types. The TRL normalisation is kept: per-micro-batch loss types (grpo, bnpo, dr_grpo, sapo,
luspo) are divided by the gradient-accumulation steps, and the token-count ones (dapo, cispo, vespo, and DPPO/CPPO on
a dapo config) divide by TRL's ``num_items_in_batch`` rescaled to one accumulation window, counting the tokens the
credit rule keeps over the whole generation batch on every process.

The schedule is evaluated at the 1-based optimizer step ``self.state.global_step + 1`` with
``total_steps = self.state.max_steps`` (the planned total). Metrics are logged as TRL does, under ``rlvr/...``:
``schedule_value``, ``active_fraction`` (tokens the credit rule keeps / completion tokens),
``trust_region_masked_fraction`` (DPPO/CPPO), ``cppo_delta_b_mean`` (CPPO's dynamic budget), ``delta_coef_std``
(DelTA: the std of ``c~`` over the micro-batch's loss tokens). Across processes: D^3S with ``d3s_scope="batch"``
selects over the micro-batch of one process (not all-reduced), DelTA's E is the generation batch of one process, and
the token-count normaliser counts every process's kept tokens.

Not supported (clear errors): MoE router aux loss, models with final-logit soft-capping; and, on the RLVRLoss path
only, TRL's ``top_entropy_quantile`` (use ``credit="forking"``),
``off_policy_mask_threshold``, ``use_adaptive_entropy``, and ZeRO-3 with ``d3s_scope="batch"``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import math
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

from rlvr_kernels.delta import DeltaEstimator
from rlvr_kernels.logprobs import fused_linear_logprobs
from rlvr_kernels.loss import LossConfig, rlvr_loss
from rlvr_kernels.schedule import SCHEDULE_MODES, TemporalSchedule

__all__ = ["RLVRGRPOConfig", "RLVRGRPOTrainer", "CREDITS", "TRUST_REGIONS"]

logger = logging.getLogger(__name__)

CREDITS = ("none", "tp_schedule", "forking", "entropy_adv", "d3s", "delta")
TRUST_REGIONS = ("clip", "dppo", "cppo")
# TRL loss types whose normaliser a DPPO/CPPO objective can take over (the others are objectives of their own).
_TRUST_REGION_BASES = ("grpo", "bnpo", "dr_grpo", "dapo")
# TRL loss types normalised by the token count of the generation batch (the others are per-micro-batch means).
_TOKEN_COUNT_TYPES = ("dapo", "cispo", "vespo")
# The batch-dict key of the DelTA coefficients [B, T]: TRL's shuffle / split carry it to every micro-batch.
DELTA_KEY = "rlvr_delta_coefficients"
# TRL's batch-dict key of the rollout engine's per-token log-probs (vLLM, or a rollout_func), NaN where unscored.
ROLLOUT_KEY = "sampling_per_token_logps"
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class RLVRGRPOConfig(GRPOConfig):
    r"""``GRPOConfig`` plus the credit-allocation and trust-region options of ``rlvr_kernels``.

    Defaults leave TRL's behaviour unchanged (``credit="none"``, ``trust_region="clip"``).

    Credit (``credit``):
        ``"tp_schedule"``: only the last ``1 - q(k)`` of each completion (by position) gets a gradient;
        ``"forking"``: per completion, the top ``ceil(n rho)`` tokens by entropy; ``"d3s"``: the top ``ceil(n rho)``
        tokens by ``|A| H`` over the micro-batch (``d3s_scope="batch"``) or per completion (``"sequence"``);
        ``"entropy_adv"``: ``A' = A + q(k) min(alpha H, |A| / kappa)``; ``"delta"``: DelTA, ``A' = A c~`` with
        detached coefficients ``c~`` (mean 1 over E) from the proxy ``(1 - p_t) h_t`` (``delta_*``).
        ``rho`` is ``credit_rho`` when set, else ``1 - q(k)``.
    DelTA (``credit="delta"``): computed once per generation batch, right after TRL scores it. E = the whole
        generation batch on this process (every completion token in the loss mask; no all-reduce across processes,
        as the official code). theta_old = the policy before any optimizer step on that batch, run like TRL's
        ``old_per_token_logps`` pass; ``h_t`` = its final hidden states (the ``lm_head`` input, after the final
        norm); ``p_t`` = the probability of the sampled token at the rollout temperature (``temperature``), from
        TRL's ``old_per_token_logps`` when TRL computes them, else from the same no-grad pass. ``delta_iters`` (K),
        ``delta_lam_min`` / ``delta_lam_max`` (the coefficient range; equal values give the plain objective),
        ``delta_exclude_zero_adv`` (A = 0 tokens out of the normaliser), ``delta_cache_bytes`` (hidden-state cache
        budget: within it one forward, beyond it K + 3 forwards). The coefficients weight the objective of
        ``loss_type`` or ``trust_region`` (clip, DPPO, CPPO) and are reused, stale, across ``num_iterations``.
    Schedule: ``q(k) = TemporalSchedule(schedule_mode, start_value=schedule_start_value, end_value=schedule_end_value,
        begin=schedule_begin, end=schedule_end, gamma=schedule_gamma, total_steps=max_steps)(k)`` at the 1-based
        optimizer step k.
    Trust region (``trust_region``): ``"clip"`` TRL's own objective (``loss_type``); ``"dppo"`` DPPO's Binary-TV mask
        with threshold ``cppo_delta`` on both sides; ``"cppo"`` CPPO's position-weighted prefix-budget mask
        (``cppo_*``). Both are ``-M A rho`` with ``rho`` against the behaviour log-probs (``old_per_token_logps``;
        the trainer computes them when TRL would skip them) and the mask against the anchor mu: the rollout engine's
        log-probs when TRL has them (``sampling_per_token_logps``: vLLM, or a ``rollout_func``; a token the engine
        did not score takes the behaviour log-prob), else the policy that generated the batch (the behaviour
        log-probs, logged once). Normalised like ``loss_type`` (one of grpo, bnpo, dr_grpo, dapo).
    Cross-process sets: D^3S ``d3s_scope="batch"`` selects over the micro-batch of one process (one ``RLVRLoss``
        call); DelTA's E is this process's generation batch; the token-count normaliser counts the kept tokens of
        the generation batch of every process.
    """

    credit: str = field(default="none", metadata=_help(
        "Token credit rule: 'none', 'tp_schedule', 'forking', 'entropy_adv', 'd3s' or 'delta' (DelTA, delta_*)."))
    credit_rho: Optional[float] = field(default=None, metadata=_help(
        "Fixed keep-fraction rho of 'forking' / 'd3s'; when unset, rho = 1 - q(k) follows the schedule."))
    schedule_mode: str = field(default="linear", metadata=_help(f"Schedule profile, one of {SCHEDULE_MODES}."))
    schedule_start_value: float = field(default=0.99, metadata=_help("q before schedule_begin (TP's m0)."))
    schedule_end_value: float = field(default=0.0, metadata=_help("q after schedule_end."))
    schedule_begin: float = field(default=0.0, metadata=_help("Fraction of max_steps where the schedule starts."))
    schedule_end: float = field(default=0.8, metadata=_help("Fraction of max_steps where the schedule ends."))
    schedule_gamma: float = field(default=2.0, metadata=_help("Exponent of schedule_mode='gamma'."))
    entropy_adv_alpha: float = field(default=0.4, metadata=_help("alpha of credit='entropy_adv'."))
    entropy_adv_kappa: float = field(default=2.0, metadata=_help("kappa of credit='entropy_adv'."))
    d3s_scope: str = field(default="batch", metadata=_help("D^3S selection over the micro-batch or per sequence."))
    trust_region: str = field(default="clip", metadata=_help("'clip' (TRL's loss_type), 'dppo' or 'cppo'."))
    cppo_delta: float = field(default=0.15, metadata=_help("Divergence threshold delta of DPPO and CPPO."))
    cppo_w_min: float = field(default=0.8, metadata=_help("CPPO position weight at the last token."))
    cppo_delta_b: float = field(default=0.02, metadata=_help("CPPO prefix budget (the minimum when dynamic)."))
    cppo_budget: str = field(default="dynamic", metadata=_help("CPPO budget: 'dynamic' or 'fixed'."))
    cppo_quantile: float = field(default=0.9, metadata=_help("Quantile of the dynamic CPPO budget."))
    cppo_max_mult: float = field(default=2.0, metadata=_help("Upper clamp of the dynamic budget, x cppo_delta_b."))
    cppo_horizon: Optional[int] = field(default=None, metadata=_help(
        "Horizon of the CPPO position weight (None: each sequence's own length)."))
    trust_region_ratio_cap: Optional[float] = field(default=None, metadata=_help(
        "DPPO/CPPO truncated-IS form -M A sg(min(rho, cap)) log p (verl's, cap 20); None keeps -M A rho."))
    delta_iters: int = field(default=1, metadata=_help(
        "DelTA (credit='delta'): K >= 0 soft-assignment refinements of the side centroids (official 1)."))
    delta_lam_min: float = field(default=0.8, metadata=_help(
        "DelTA: coefficient of the tokens most like the other side (and of A = 0 tokens), > 0 (official 0.8)."))
    delta_lam_max: float = field(default=1.2, metadata=_help(
        "DelTA: coefficient of the tokens most like their own side, >= delta_lam_min (official 1.2); "
        "delta_lam_min == delta_lam_max gives every token 1 (the plain objective)."))
    delta_exclude_zero_adv: bool = field(default=False, metadata=_help(
        "DelTA: leave A = 0 tokens out of the mean-1 normaliser (their coefficient is then 1); False = official."))
    delta_cache_bytes: int = field(default=1 << 30, metadata=_help(
        "DelTA: byte budget for caching the generation batch's valid-token hidden states between the estimator's "
        "phases (one no-grad forward); over it (or 0) every phase re-runs the backbone (delta_iters + 3 forwards)."))
    rlvr_backend: str = field(default="auto", metadata=_help(
        "rlvr_kernels backend: 'auto' (Triton on CUDA, torch on CPU), 'triton' or 'torch'."))

    def __post_init__(self):
        super().__post_init__()
        _validate(self)

    @property
    def uses_rlvr_loss(self) -> bool:
        """Whether the loss is computed by ``RLVRLoss`` (any credit rule or a DPPO/CPPO trust region)."""
        return self.credit != "none" or self.trust_region != "clip"

    @property
    def uses_schedule(self) -> bool:
        return self.credit in ("tp_schedule", "entropy_adv") or (
            self.credit in ("forking", "d3s") and self.credit_rho is None)


def _unit(name: str, v, *, open_low: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if v > 1 or v < 0 or (open_low and v == 0):
        raise ValueError(f"{name} must lie in {'(0, 1]' if open_low else '[0, 1]'}, got {v!r}")


def _validate_delta(c: RLVRGRPOConfig) -> None:
    k = c.delta_iters
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"delta_iters (DelTA's refinement count K) must be an int >= 0, got {k!r}")
    lo, hi = c.delta_lam_min, c.delta_lam_max
    if isinstance(lo, bool) or not isinstance(lo, (int, float)) or not (math.isfinite(lo) and lo > 0):
        raise ValueError(f"delta_lam_min must be a finite number > 0, got {lo!r}")
    if isinstance(hi, bool) or not isinstance(hi, (int, float)) or not (math.isfinite(hi) and hi >= lo):
        raise ValueError(f"delta_lam_max must be a finite number >= delta_lam_min = {lo!r}, got {hi!r}")
    if not isinstance(c.delta_exclude_zero_adv, bool):
        raise ValueError(f"delta_exclude_zero_adv must be a bool, got {c.delta_exclude_zero_adv!r}")
    b = c.delta_cache_bytes
    if isinstance(b, bool) or not isinstance(b, int) or b < 0:
        raise ValueError(f"delta_cache_bytes must be an int >= 0 (0: never cache the hidden states), got {b!r}")


def _validate(c: RLVRGRPOConfig) -> None:
    if c.credit not in CREDITS:
        raise ValueError(f"credit must be one of {CREDITS}, got {c.credit!r}")
    _validate_delta(c)
    if c.trust_region not in TRUST_REGIONS:
        raise ValueError(f"trust_region must be one of {TRUST_REGIONS}, got {c.trust_region!r}")
    if c.rlvr_backend not in ("auto", "triton", "torch"):
        raise ValueError(f"rlvr_backend must be 'auto', 'triton' or 'torch', got {c.rlvr_backend!r}")
    if c.credit_rho is not None:
        if c.credit not in ("forking", "d3s"):
            raise ValueError(f"credit_rho applies to credit='forking' or 'd3s' (a fixed keep-fraction), not "
                             f"credit={c.credit!r}")
        _unit("credit_rho", c.credit_rho, open_low=True)
    if c.d3s_scope not in ("batch", "sequence"):
        raise ValueError(f"d3s_scope must be 'batch' or 'sequence', got {c.d3s_scope!r}")
    for name in ("entropy_adv_alpha", "entropy_adv_kappa"):
        v = getattr(c, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    # The schedule's own checks (mode, values in [0, 1], begin < end, gamma); total_steps is only known at train time.
    try:
        TemporalSchedule(c.schedule_mode, start_value=c.schedule_start_value, end_value=c.schedule_end_value,
                         begin=c.schedule_begin, end=c.schedule_end, gamma=c.schedule_gamma, total_steps=1 << 30)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid schedule_* settings: {e}") from None
    if c.trust_region != "clip":
        tr = c.trust_region
        if c.loss_type not in _TRUST_REGION_BASES:
            raise ValueError(
                f"trust_region={tr!r} replaces the objective of loss_type; loss_type then only picks the normaliser "
                f"and must be one of {_TRUST_REGION_BASES}, got {c.loss_type!r}")
        if c.importance_sampling_level != "token":
            raise ValueError(f"trust_region={tr!r} masks tokens: importance_sampling_level must be 'token', got "
                             f"{c.importance_sampling_level!r}")
        if c.delta is not None:
            raise ValueError(f"delta (the two-sided clip of the PPO ratio) does not apply to trust_region={tr!r}; "
                             "use trust_region_ratio_cap for a truncated-IS cap")
        if not (math.isfinite(c.cppo_delta) and c.cppo_delta > 0):
            raise ValueError(f"cppo_delta must be > 0, got {c.cppo_delta!r}")
        if c.trust_region_ratio_cap is not None and not c.trust_region_ratio_cap > 0:
            raise ValueError(f"trust_region_ratio_cap must be > 0, got {c.trust_region_ratio_cap!r}")
        if tr == "cppo":
            _unit("cppo_w_min", c.cppo_w_min)
            _unit("cppo_quantile", c.cppo_quantile)
            if c.cppo_budget not in ("dynamic", "fixed"):
                raise ValueError(f"cppo_budget must be 'dynamic' or 'fixed', got {c.cppo_budget!r}")
            if not c.cppo_delta_b >= 0:
                raise ValueError(f"cppo_delta_b must be >= 0, got {c.cppo_delta_b!r}")
            if not c.cppo_max_mult >= 1:
                raise ValueError(f"cppo_max_mult must be >= 1, got {c.cppo_max_mult!r}")
            if c.cppo_horizon is not None and not (isinstance(c.cppo_horizon, int) and c.cppo_horizon > 0):
                raise ValueError(f"cppo_horizon must be None or a positive int, got {c.cppo_horizon!r}")
            if importlib.util.find_spec("rlvr_kernels.cppo") is None:
                raise ValueError("trust_region='cppo' needs rlvr_kernels.cppo, which this build of rlvr_kernels "
                                 "does not contain")
    elif c.trust_region_ratio_cap is not None:
        raise ValueError("trust_region_ratio_cap applies to trust_region='dppo' or 'cppo'")
    if c.uses_rlvr_loss:
        what = f"credit={c.credit!r}, trust_region={c.trust_region!r}"
        if c.top_entropy_quantile < 1.0:
            raise ValueError(f"top_entropy_quantile < 1 cannot be combined with {what}: it is TRL's own token mask "
                             "(use credit='forking' with credit_rho for the same rule)")
        if c.off_policy_mask_threshold is not None:
            raise ValueError(f"off_policy_mask_threshold is not supported with {what}")
        if c.use_adaptive_entropy:
            raise ValueError(f"use_adaptive_entropy is not supported with {what} (a static entropy_coef is)")


# ----------------------------------------------------------------------------------------------------------------
# the LM head: hidden states x lm_head.weight, inside the model's forward


def _head_dtype(hidden: torch.Tensor, weight: torch.Tensor, cast_fp32: bool) -> torch.dtype:
    """The dtype of the head GEMM: fp32 with ``cast_lm_head_to_fp32``, the autocast dtype under autocast (what the
    ``lm_head`` module would use), else the weight's."""
    if cast_fp32:
        return torch.float32
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


class _RegatheredLinearLogprobs(torch.autograd.Function):
    """``fused_linear_logprobs`` for a ZeRO-3-partitioned head: the forward and the backward each gather the head
    (``maybe_gather_lm_head_ctx``) and the backward recomputes from the saved hidden states, since the partitioned
    parameter holds no data once the forward's gather has ended."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, dtype, temperature, want_entropy, backend):
        with maybe_gather_lm_head_ctx(weight, bias):
            logp, ent = fused_linear_logprobs(hidden, _cast(weight, dtype), targets, bias=_cast(bias, dtype),
                                              temperature=temperature, return_entropy=want_entropy, backend=backend)
        ctx.save_for_backward(hidden, targets)
        ctx.head = (weight, bias)
        ctx.opts = (dtype, temperature, backend)
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, targets = ctx.saved_tensors
        weight, bias = ctx.head
        dtype, temperature, backend = ctx.opts
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if g_logp is None and g_ent is None:
            return None, None, None, None, None, None, None, None
        with maybe_gather_lm_head_ctx(weight, bias), torch.enable_grad():
            h = hidden.detach().requires_grad_(need_h)
            w = weight.detach().requires_grad_(need_w)
            b = None if bias is None else bias.detach().requires_grad_(bool(need_b))
            logp, ent = fused_linear_logprobs(h, _cast(w, dtype), targets, bias=_cast(b, dtype),
                                              temperature=temperature, return_entropy=g_ent is not None,
                                              backend=backend)
            outs = [logp] + ([ent] if g_ent is not None else [])
            grads = [g_logp if g_logp is not None else torch.zeros_like(logp)] + ([g_ent] if g_ent is not None else [])
            leaves = [t for t in (h, w, b) if t is not None and t.requires_grad]
            got = iter(torch.autograd.grad(outs, leaves, grads, allow_unused=True)) if leaves else iter(())
            dh = next(got) if h.requires_grad else None
            dw = next(got) if w.requires_grad else None
            db = next(got) if b is not None and b.requires_grad else None
        return dh, dw, db, None, None, None, None, None


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return bool(is_deepspeed_zero3_enabled())


def linear_logprobs(hidden, weight, bias, targets, *, dtype, temperature, want_entropy, backend, regather=False):
    """Per-token ``(logp, entropy|None)`` of ``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)``
    computed in ``dtype``; ``regather=True`` is the ZeRO-3 form (the head is gathered again in the backward)."""
    hidden = hidden.to(dtype)
    if regather:
        return _RegatheredLinearLogprobs.apply(hidden, weight, bias, targets, dtype, temperature, want_entropy,
                                               backend)
    return fused_linear_logprobs(hidden, _cast(weight, dtype), targets, bias=_cast(bias, dtype),
                                 temperature=temperature, return_entropy=want_entropy, backend=backend)


def _logit_scale(text_config) -> float:
    """The factor some architectures apply to the logits before the softmax (folded into the temperature)."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        v = getattr(text_config, name, None)
        if v is not None:
            return float(v)
    v = getattr(text_config, "logits_scaling", None)
    if v is not None:
        return float(v) if getattr(text_config, "model_type", "") == "hyperclovax" else 1.0 / float(v)
    return 1.0


def _backbone_attr(model) -> str:
    from packaging.version import Version
    import transformers

    if model.config.get_text_config() is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        return "model"
    return "base_model"


class _HeadState:
    """The per-model state of the installed head: ``tap``, when set (the trainer's DelTA passes), is called as
    ``tap(hidden, logp)`` by every ``fused_lm_head=True`` forward with the final hidden states fed to ``lm_head``
    (``[b, L - 1, H]``, detached) and the log-probs of the labels (``[b, L - 1]`` fp32, 0 where the label is
    -100), or ``logp=None`` when ``tap.want_logp`` is False: the head is then skipped (the returned log-probs are
    zeros) and only the backbone runs."""

    def __init__(self):
        self.tap: Optional[Callable] = None


def _install_head(model, *, temperature: float, cast_fp32: bool, want_entropy: bool, backend: str) -> _HeadState:
    """Wrap ``model.forward`` (TRL's fused-LM-head forward) so that ``fused_lm_head=True`` and ``rlvr_head_fn``
    compute from the last hidden states with ``rlvr_kernels``; every other call goes to the previous forward.
    Returns the :class:`_HeadState` whose ``tap`` the wrapper reads."""
    state = _HeadState()
    previous = model.forward
    text_config = model.config.get_text_config()
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        raise ValueError("RLVRGRPOTrainer does not support models with final_logit_softcapping (the fused head has "
                         "no soft-cap); use TRL's GRPOTrainer for this model")
    scale = _logit_scale(text_config)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the model's logit scale must be a finite number > 0 to fold into the temperature, got "
                         f"{scale}")
    temp = float(temperature) / scale
    backbone = _backbone_attr(model)

    @functools.wraps(type(model).forward)  # keep the signature: generate() validates its kwargs against it
    def forward(self, *args, fused_lm_head=False, rlvr_head_fn: Optional[Callable] = None, labels=None,
                shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head and rlvr_head_fn is None:
            extra = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels),
                                       ("num_items_in_batch", num_items_in_batch)) if v is not None}
            return previous(*args, **extra, **kwargs)
        kwargs["use_cache"] = False
        hidden = getattr(self, backbone)(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden = hidden[:, :-1]
            labels = None if labels is None else labels[:, 1:]
        else:
            labels = shift_labels
        lm_head = self.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor: gather once for every projection
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        hidden = hidden.to(weight.device)
        dtype = _head_dtype(hidden, weight, cast_fp32)
        no_autocast = torch.autocast(hidden.device.type, enabled=False)
        if rlvr_head_fn is not None:
            with no_autocast, maybe_gather_lm_head_ctx(weight, bias):
                return rlvr_head_fn(hidden.to(dtype), _cast(weight, dtype), _cast(bias, dtype))
        if labels is None:
            raise ValueError("fused_lm_head=True needs labels (or shift_labels)")
        labels = labels.to(weight.device)
        mask = labels != -100
        tap = state.tap
        if tap is not None and not tap.want_logp:  # a DelTA pass that needs only the hidden states
            tap(hidden.detach(), None)
            logp = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
            return FusedCausalLMOutput(loss=logp.sum(), log_probs=logp, entropy=None, label_mask=mask)
        regather = _zero3_enabled()  # the ZeRO-3 gather then happens inside the autograd Function, twice
        with no_autocast:
            logp, ent = linear_logprobs(hidden[mask], weight, bias, labels[mask], dtype=dtype, temperature=temp,
                                        want_entropy=want_entropy and tap is None, backend=backend,
                                        regather=regather)
        # masked_scatter keeps the outputs connected to the graph even when no label is valid
        logp = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
        ent = None if ent is None else ent.new_zeros(mask.shape).masked_scatter(mask, ent)
        if tap is not None:
            tap(hidden.detach(), logp.detach())
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-logp.sum() / denom, log_probs=logp, entropy=ent, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    return state


def _named_metrics(metrics) -> dict:
    """The metrics dict of the loss as the model's forward returned it: a mapping (what the head function returns),
    or a ``LossMetrics`` that still has its names."""
    if isinstance(metrics, Mapping):
        return dict(metrics)
    named = getattr(metrics, "named", None)
    if named:
        return dict(named)
    raise TypeError(f"the RLVRLoss metrics reached the trainer without their names ({type(metrics).__name__}); the "
                    "head function must return (loss, dict of metrics)")


# ----------------------------------------------------------------------------------------------------------------
# the trainer


class RLVRGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose log-probs come from ``rlvr_kernels`` and whose loss can apply the package's credit rules
    and trust regions. Takes the same arguments as ``GRPOTrainer``; ``args`` may be an :class:`RLVRGRPOConfig` (a
    plain ``GRPOConfig`` means the defaults: TRL's loss with our log-probs).

    - ``credit="none"``, ``trust_region="clip"``: only the LM head changes (see the module docstring); TRL's
      ``_get_per_token_logps_and_entropies`` keeps its 3-tuple and ``_compute_loss`` runs unchanged, so every TRL
      loss type, mask, IS correction, entropy mask/bonus and metric behaves as in TRL, to float tolerance.
    - otherwise ``compute_loss`` runs :func:`rlvr_kernels.loss.rlvr_loss` on the hidden states inside the model's
      forward, with the schedule at ``state.global_step + 1`` of ``state.max_steps``, and logs ``rlvr/...`` metrics.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        if not isinstance(a, RLVRGRPOConfig):
            defaults = {f: RLVRGRPOConfig.__dataclass_fields__[f].default for f in RLVRGRPOConfig.__dataclass_fields__
                        if f not in GRPOConfig.__dataclass_fields__}
            for name, value in defaults.items():
                if not hasattr(a, name):
                    setattr(a, name, value)
        self._rlvr_custom = a.credit != "none" or a.trust_region != "clip"
        if self.aux_loss_enabled:
            raise NotImplementedError("RLVRGRPOTrainer does not add the MoE router aux loss yet; set "
                                      "router_aux_loss_coef=0.0 or use TRL's GRPOTrainer")
        if self._rlvr_custom and a.credit == "d3s" and a.d3s_scope == "batch" and _zero3_enabled():
            raise ValueError("credit='d3s' with d3s_scope='batch' runs RLVRLoss's composable path, whose backward "
                             "reads the lm_head again; under ZeRO-3 use d3s_scope='sequence'")
        from accelerate.utils import is_peft_model

        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        common = dict(temperature=self.temperature, cast_fp32=bool(a.cast_lm_head_to_fp32), backend=a.rlvr_backend)
        self._rlvr_head = _install_head(policy, want_entropy=True, **common)
        self._rlvr_temperature = self.temperature / _logit_scale(policy.config.get_text_config())
        if self.ref_model is not None:
            _install_head(self.accelerator.unwrap_model(self.ref_model), want_entropy=False, **common)
        self._rlvr_schedule_cache: dict[int, TemporalSchedule] = {}
        self._rlvr_anchor_logged = False

    # -- schedule -------------------------------------------------------------------------------------------------

    def rlvr_step(self) -> int:
        """The 1-based optimizer step the current update will be (``state.global_step + 1``)."""
        return int(self.state.global_step) + 1

    def rlvr_schedule(self) -> Optional[TemporalSchedule]:
        """The schedule over the planned run (``state.max_steps``), or None when the configuration uses none."""
        a = self.args
        if not (a.credit in ("tp_schedule", "entropy_adv") or (a.credit in ("forking", "d3s") and
                                                                a.credit_rho is None)):
            return None
        total = int(self.state.max_steps or 0) or int(a.max_steps if a.max_steps and a.max_steps > 0 else 0)
        if total < 1:
            raise ValueError("the credit schedule needs the planned number of optimizer steps (state.max_steps), "
                             "which is set when training starts")
        if total not in self._rlvr_schedule_cache:
            try:
                self._rlvr_schedule_cache[total] = TemporalSchedule(
                    a.schedule_mode, start_value=a.schedule_start_value, end_value=a.schedule_end_value,
                    begin=a.schedule_begin, end=a.schedule_end, gamma=a.schedule_gamma, total_steps=total)
            except ValueError as e:
                raise ValueError(f"the schedule does not fit the planned {total} optimizer steps: {e}") from None
        return self._rlvr_schedule_cache[total]

    # -- per generation batch: DelTA coefficients, and the behaviour log-probs DPPO / CPPO need ------------------

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.args.trust_region != "clip" and out.get(ROLLOUT_KEY) is None:
            self._rlvr_log_anchor()
        need_old = self.args.trust_region != "clip" and out.get("old_per_token_logps") is None
        if self.args.credit == "delta":
            # after the advantages are known and before any optimizer step on this batch: theta_old
            out[DELTA_KEY], logps = self.rlvr_delta_coefficients(out)
            if need_old and logps is not None:  # the DelTA pass computed them: the same forward TRL would run
                out["old_per_token_logps"] = logps
                need_old = False
        if need_old:
            # TRL skips the behaviour log-probs when the batch is used on-policy once; the DPPO/CPPO masks are
            # anchored to them, so compute them here (one no-grad forward, as TRL does when num_iterations > 1).
            ids, am, bs, extra = self._rlvr_forward_args(out)
            with torch.no_grad():
                out["old_per_token_logps"], _, _ = self._get_per_token_logps_and_entropies(
                    self.model, ids, am, out["completion_ids"].size(1), batch_size=bs, **extra)
        return out

    def _rlvr_log_anchor(self) -> None:
        """Say once per trainer (main process) that DPPO/CPPO have no rollout log-probs to anchor to."""
        if self._rlvr_anchor_logged:
            return
        self._rlvr_anchor_logged = True
        if not self.accelerator.is_main_process:
            return
        logger.warning(
            "RLVRGRPOTrainer: trust_region=%r without rollout log-probs (TRL's %s, from vLLM or a rollout_func): the "
            "anchor mu is the policy that generated the batch, TRL's old_per_token_logps (computed by the trainer "
            "when TRL skips them). On a batch's first update pi equals mu, so the trust region masks tokens only on "
            "later updates of the same batch (num_iterations > 1 or steps_per_generation > "
            "gradient_accumulation_steps).", self.args.trust_region, ROLLOUT_KEY)

    def _rlvr_forward_args(self, out: dict):
        """``(input_ids, attention_mask, batch_size, multimodal kwargs)`` of TRL's no-grad passes over ``out``."""
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        am = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        mode = "train" if self.model.training else "eval"
        bs = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        extra = {k: out[k] for k in _MULTIMODAL_KEYS if k in out}
        return ids, am, bs, extra

    def rlvr_delta_coefficients(self, out: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """DelTA coefficients ``c~ [B, T]`` (fp32, detached, 0 off the loss mask, mean 1 over it) of the generation
        batch ``out`` on this process, plus the behaviour log-probs when this pass had to compute them (else None).

        The estimation set E is every loss-mask token of ``out`` (completion mask x tool mask): the whole generation
        batch of this process, no all-reduce (the official per-DP-rank rollout batch). theta_old is the model as it
        is now (called after generation and scoring, before any optimizer step on the batch), run exactly like TRL's
        ``old_per_token_logps`` pass (``_get_per_token_logps_and_entropies`` on ``self.model`` under no_grad,
        gradient checkpointing off, micro-batches of ``per_device_{train,eval}_batch_size`` rows). ``h_t`` is the
        backbone's final hidden state (after the final norm, the ``lm_head`` input) that the installed head
        wrapper taps; ``p_t = exp(old_logp_t)`` uses TRL's ``old_per_token_logps`` when TRL computed them, else the
        log-probs of the first tap pass, both at the rollout temperature (``temperature`` / the model's logit
        scale). The streaming :class:`~rlvr_kernels.delta.DeltaEstimator` accumulates every phase over the
        micro-batches; the first pass also caches the valid tokens' ``h`` when they fit ``delta_cache_bytes``, and
        then the other phases read the cache (one forward in all); otherwise each phase re-runs the backbone
        (``K + 3`` no-grad forwards for ``delta_iters = K``, as the official code, the head only in the first, when
        the log-probs are needed). The last phase's raw coefficients are normalised with
        :meth:`~rlvr_kernels.delta.DeltaEstimator.normalise` (no further pass).
        """
        from trl.models.utils import disable_gradient_checkpointing

        a = self.args
        mask = self._loss_mask(out).bool()
        if a.delta_lam_min == a.delta_lam_max:  # c = lam_min everywhere: c~ = 1, plain token weighting
            return mask.to(torch.float32), None
        adv = out["advantages"].detach().float()
        T = out["completion_ids"].size(1)
        ids, am, bs, extra = self._rlvr_forward_args(out)
        est = DeltaEstimator(iters=a.delta_iters, lam_min=a.delta_lam_min, lam_max=a.delta_lam_max,
                             exclude_zero_adv=a.delta_exclude_zero_adv, backend=a.rlvr_backend)
        coef = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        st: dict[str, Any] = dict(row=0, old=out.get("old_per_token_logps"), cache=[], nbytes=0)
        if a.delta_cache_bytes <= 0:
            st["cache"] = None

        def tap(hidden, logp):  # one micro-batch of one pass, rows in order
            r0 = st["row"]
            r1 = st["row"] = r0 + hidden.size(0)
            h = hidden[:, -T:]
            dev = h.device
            m = mask[r0:r1].to(dev)
            lp = (st["old"][r0:r1] if logp is None else logp[:, -T:]).detach().float().to(dev)
            av = adv[r0:r1].to(dev)
            raw = est.accumulate(h, lp, av, m)
            if raw is not None:  # the last ("normaliser") phase: raw coefficients, normalised once it is closed
                coef[r0:r1] = raw.to(coef.device)
            if st["cache"] is not None:
                hv = h[m]
                st["nbytes"] += hv.numel() * hv.element_size()
                if st["nbytes"] > a.delta_cache_bytes:
                    st["cache"] = None  # over budget: stream the remaining phases
                elif hv.size(0) > 0:
                    at = av if av.dim() == 2 else av[:, None].expand(m.shape)
                    st["cache"].append((r0, r1, hv[None], lp[m][None], at[m][None]))

        def run_pass():
            st["row"] = 0
            self._rlvr_head.tap = tap
            try:
                with torch.no_grad(), disable_gradient_checkpointing(self.model, a.gradient_checkpointing_kwargs):
                    logps, _, _ = self._get_per_token_logps_and_entropies(self.model, ids, am, T, batch_size=bs,
                                                                           **extra)
            finally:
                self._rlvr_head.tap = None
            if st["row"] != mask.size(0):
                raise RuntimeError(f"DelTA pass: the head saw {st['row']} rows of a {mask.size(0)}-row batch")
            return logps

        computed = None
        tap.want_logp = st["old"] is None
        first = run_pass()  # phase "centroids" (and the cache)
        if tap.want_logp:
            computed = st["old"] = first.detach().float()
            tap.want_logp = False
        est.finish_phase()

        def cached_sweep(fn):
            for r0, r1, hv, lpv, atv in st["cache"]:
                fn(r0, r1, hv, lpv, atv, torch.ones(lpv.shape, dtype=torch.bool, device=lpv.device))

        def accumulate_cached(r0, r1, hv, lpv, atv, one):
            raw = est.accumulate(hv, lpv, atv, one)
            if raw is not None:
                view = coef[r0:r1]
                view[mask[r0:r1]] = raw[0].to(coef.device)

        while not est.done:
            if st["cache"] is not None:
                cached_sweep(accumulate_cached)
            else:
                run_pass()
            est.finish_phase()
        return est.normalise(coef, adv.to(coef.device), mask), computed

    # -- the loss -------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._rlvr_custom:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if return_outputs:
            raise ValueError("The GRPOTrainer does not support returning outputs")
        return self._compute_rlvr_loss(model, inputs)

    def _loss_mask(self, batch: dict) -> torch.Tensor:
        m = batch["completion_mask"]
        return m if "tool_mask" not in batch else m * batch["tool_mask"]

    def _planned_active(self, batch: dict, q: Optional[float]) -> torch.Tensor:
        """Tokens of ``batch`` the credit rule will keep (fp32 0-dim); known before the vocabulary pass."""
        from rlvr_kernels.credit import tp_schedule_mask
        from rlvr_kernels.reference.credit import topk_budget

        a = self.args
        valid = self._loss_mask(batch).bool()
        n = valid.sum(-1)
        if a.credit == "tp_schedule":
            return tp_schedule_mask(valid, q, backend=a.rlvr_backend).sum().float()
        if a.credit in ("forking", "d3s"):
            rho = a.credit_rho if a.credit_rho is not None else 1.0 - q
            if a.credit == "d3s" and a.d3s_scope == "batch":
                return topk_budget(n.sum().reshape(1), rho).sum().float()
            return topk_budget(n, rho).sum().float()
        return n.sum().float()

    def _token_count_normaliser(self, inputs: dict, q: Optional[float], mode: str) -> torch.Tensor:
        """TRL's ``num_items_in_batch`` for the tokens the credit rule keeps, rescaled to one accumulation window
        (``RLVRLoss`` then divides it by the world size, as TRL does)."""
        bufs = self._buffered_inputs if mode == "train" else None
        if bufs is not None and any(b is inputs for b in bufs):
            local = sum(self._planned_active(b, q) for b in bufs)
            items = self.accelerator.gather(local.reshape(1)).sum()
        elif mode == "train":  # an unknown buffer layout: scale TRL's count by this slice's kept fraction
            kept = self.accelerator.gather(self._planned_active(inputs, q).reshape(1)).sum()
            total = self.accelerator.gather(self._loss_mask(inputs).sum().float().reshape(1)).sum()
            items = inputs["num_items_in_batch"].float() * kept / total.clamp(min=1.0)
        else:  # eval: the batch is the whole generation batch
            items = self.accelerator.gather(self._planned_active(inputs, q).reshape(1)).sum()
        if mode == "train":
            items = items * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return items.clamp(min=1.0)

    def _rlvr_loss_config(self, mode: str, schedule: Optional[TemporalSchedule]) -> tuple[LossConfig, bool, bool]:
        """``(cfg, per_micro_batch, token_count)``: the loss settings for this call, whether the result is divided by
        the accumulation steps, and whether it takes the token-count normaliser."""
        a = self.args
        tr = a.trust_region
        lt = self.loss_type
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        kw: dict[str, Any] = {}
        if tr == "clip":
            token_count = lt in _TOKEN_COUNT_TYPES
            kw.update(loss_type=lt, delta=a.delta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high)
        else:
            token_count = lt == "dapo"
            eps = dict(epsilon_low=a.cppo_delta, epsilon_high=a.cppo_delta) if tr == "dppo" else \
                dict(epsilon_low=self.epsilon_low, epsilon_high=a.cppo_delta)
            kw.update(loss_type=tr, ratio_cap=a.trust_region_ratio_cap, **eps)
            if lt == "grpo":
                kw.update(aggregation="seq-mean-token-mean")
            elif lt == "bnpo":
                kw.update(aggregation="token-mean")
            elif lt == "dr_grpo":
                kw.update(aggregation="seq-mean-token-sum-norm", loss_horizon=self.max_completion_length)
            if tr == "cppo":
                kw.update(cppo_w_min=a.cppo_w_min, cppo_delta_b=a.cppo_delta_b, cppo_budget=a.cppo_budget,
                          cppo_quantile=a.cppo_quantile, cppo_max_mult=a.cppo_max_mult, cppo_horizon=a.cppo_horizon)
        # TRL's entropy bonus is a token mean over the kept tokens divided by the accumulation steps; RLVRLoss adds
        # it inside the loss, so the token-count types (not divided afterwards) take the division here.
        coef = float(self.entropy_coef) if self._entropy_bonus_enabled else 0.0
        credit = a.credit
        cfg = LossConfig(
            beta=self.beta, use_ref_model=self.beta != 0.0, importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length, temperature=self._rlvr_temperature,
            use_bias_correction_kl=bool(a.use_bias_correction_kl), sapo_temperature_pos=a.sapo_temperature_pos,
            sapo_temperature_neg=a.sapo_temperature_neg, vespo_k_pos=a.vespo_k_pos,
            vespo_lambda_pos=a.vespo_lambda_pos, vespo_k_neg=a.vespo_k_neg, vespo_lambda_neg=a.vespo_lambda_neg,
            entropy_coef=coef / ga if token_count else coef, credit=credit, schedule=schedule,
            credit_rho=a.credit_rho if a.credit_rho is not None else 0.2, entropy_adv_alpha=a.entropy_adv_alpha,
            entropy_adv_kappa=a.entropy_adv_kappa, d3s_scope=a.d3s_scope, backend=a.rlvr_backend, **kw)
        return cfg, not token_count, token_count

    def _compute_rlvr_loss(self, model, inputs):
        a = self.args
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = self._loss_mask(inputs)
        B = completion_ids.size(0)

        step = self.rlvr_step()
        schedule = self.rlvr_schedule()
        q = None if schedule is None else float(schedule(step))
        cfg, per_micro_batch, token_count = self._rlvr_loss_config(mode, schedule)
        num_items = self._token_count_normaliser(inputs, q, mode) if token_count else None
        is_ratio = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            is_ratio = inputs.get("importance_sampling_ratio")
        extra = {}
        if cfg.aggregation in ("seq-mean-token-mean", "seq-mean-token-sum-norm"):
            extra["global_batch_size"] = B  # TRL's grpo / dr_grpo divide by every row of the micro-batch
        mu = inputs.get(ROLLOUT_KEY) if a.trust_region != "clip" else None
        if mu is not None:
            # DPPO/CPPO's anchor: the rollout engine's log-probs; a token the engine did not score (NaN) takes the
            # behaviour log-prob, as TRL's IS correction leaves such a token uncorrected
            old = inputs["old_per_token_logps"]
            extra["rollout_per_token_logps"] = torch.where(torch.isnan(mu), old, mu.to(old.dtype))
        # without rollout log-probs the anchor is the generating policy (logged once at generation): CPPO's
        # "mu equals pi" warning would say nothing new at every step
        quiet_cppo = a.trust_region == "cppo" and mu is None

        def head_fn(hidden, weight, bias):  # runs inside the model's forward, with the head gathered
            loss, metrics = rlvr_loss(
                cfg, hidden[:, -logits_to_keep:], weight, completion_ids, mask, inputs["advantages"], bias=bias,
                ref_per_token_logps=inputs.get("ref_per_token_logps"),
                old_per_token_logps=inputs.get("old_per_token_logps"), vllm_is_ratio=is_ratio,
                num_items_in_batch=num_items, step=step, delta_coefficients=inputs.get(DELTA_KEY), **extra)
            # A plain dict of 0-dim tensors: the wrappers around the model's forward rebuild what it returns
            # (accelerate's fp32 output conversion under bf16/fp16 autocast calls type(x)(iterable), DDP flattens
            # it), which keeps a dict's names but not LossMetrics.named.
            return loss, dict(metrics.named)

        model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        for k in ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                  "token_type_ids", "mm_token_type_ids", "image_position_ids"):
            if inputs.get(k) is not None:
                model_inputs[k] = inputs[k]
        with contextlib.ExitStack() as stack:
            if quiet_cppo:
                from rlvr_kernels.cppo import CPPOAnchorWarning

                stack.enter_context(warnings.catch_warnings())
                warnings.filterwarnings("ignore", category=CPPOAnchorWarning)
            with self.accelerator.autocast():
                loss, metrics = model(**model_inputs, rlvr_head_fn=head_fn)
        if per_micro_batch and mode == "train":
            loss = loss / self.current_gradient_accumulation_steps
        self._log_rlvr_metrics(mode, metrics, q)
        return loss

    def _log_rlvr_metrics(self, mode: str, metrics, q: Optional[float]) -> None:
        m = self._metrics[mode]
        named = _named_metrics(metrics)

        def gathered(name):
            return self.accelerator.gather(named[name].detach().float().reshape(1))

        def mean(name):
            return gathered(name).nanmean().item()

        def extreme(name, fn):  # TRL: nanmin / nanmax over every process's sequences
            g = gathered(name)
            g = g[~torch.isnan(g)]
            return fn(g).item() if g.numel() else float("nan")

        if self.beta != 0.0 and "kl" in named:
            m["kl"].append(mean("kl"))
        if "entropy" in named:
            m["entropy"].append(mean("entropy"))
        lt = self.args.trust_region if self.args.trust_region != "clip" else self.loss_type
        if lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            m["clip_ratio/low_mean"].append(mean("clip_ratio/low_mean"))
            m["clip_ratio/high_mean"].append(mean("clip_ratio/high_mean"))
            m["clip_ratio/region_mean"].append(mean("clip_ratio/region_mean"))
            m["clip_ratio/low_min"].append(extreme("clip_ratio/low_min", torch.min))
            m["clip_ratio/high_max"].append(extreme("clip_ratio/high_max", torch.max))
        elif lt == "cispo":
            m["cispo_clip_ratio"].append(mean("clip_ratio/high_mean"))
        m["rlvr/active_fraction"].append(mean("active_fraction"))
        if q is not None:
            m["rlvr/schedule_value"].append(float(q))
        if "trust_region/masked_fraction" in named:
            m["rlvr/trust_region_masked_fraction"].append(mean("trust_region/masked_fraction"))
        if "cppo/delta_b_mean" in named:
            m["rlvr/cppo_delta_b_mean"].append(mean("cppo/delta_b_mean"))
        if "delta/coef_std" in named:
            m["rlvr/delta_coef_std"].append(mean("delta/coef_std"))
