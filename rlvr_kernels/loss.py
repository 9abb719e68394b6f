"""RLVRLoss: GRPO-family objectives with credit allocation on top, from hidden states; a drop-in for Liger's
``LigerFusedLinearGRPOLoss`` (same constructor and forward keywords, same ``(loss, metrics)`` return).

Order of composition (tp-schedule.md section 3): (1) the credit **mask** (TP-Schedule, forking tokens, D^3S) shrinks
the loss mask; (2) the **advantage shaping** (entropy-shaped advantages, DelTA coefficients) rescales A per token;
(3) the **trust region** of the objective (PPO clip, CISPO, DPPO, CPPO mask); (4) the **aggregation** over the
tokens that remain: every normaliser that counts tokens counts the active ones.

Two paths, one set of numbers:
- composable: ``fused_linear_logprobs`` under autograd, the token pass in plain torch (4 GEMM-equivalents);
- fused (default when the loss needs a gradient): sequence-aligned token chunks (or row segments for token-local
  losses whose rows do not fit a chunk); per chunk the logits block is
  computed once, its statistics give log-probs and entropies, the token pass gives per-token gradient coefficients
  through autograd on ``[rows]`` tensors, ``dz`` is formed in place and dX, dW, db follow by GEMMs, all during the
  forward (3 GEMM-equivalents, one chunk buffer). Batch-global normalisers and per-row active counts are computed
  before the first chunk from the tokens the credit rules will keep (their counts are known in advance), so a chunk
  needs no other chunk. Backward only scales the saved gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import nn

from rlvr_kernels import _checks as C
from rlvr_kernels._backend import BACKENDS, autocast_inputs, first_order_backward, no_autocast, resolve_backend
from rlvr_kernels.logprobs import _check_float_tensor, _check_int_tensor, fused_linear_logprobs
from rlvr_kernels.reference import logprobs as ref_lp
from rlvr_kernels.reference import cppo as ref_cppo
from rlvr_kernels.reference import loss as ref_loss
from rlvr_kernels.schedule import TemporalSchedule

CREDITS = ("none", "tp_schedule", "forking", "entropy_adv", "d3s", "delta")
IS_LEVELS = ("token", "sequence")
# Bytes of one fused-path logits block (fp32 [rows, V]); on CPU a smaller block keeps the reference path lean.
FUSED_CHUNK_BYTES = 1 << 30
FUSED_CHUNK_BYTES_CPU = 1 << 24


class LossMetrics(list):
    """Liger-compatible metrics: a list (``[kl_mean]`` when beta != 0, then ``clip_ratio``), plus every metric by
    name: ``metrics["entropy"]``, ``metrics.named`` (a dict of 0-dim tensors).

    Trainers rebuild returned containers as ``type(x)(iterable)`` (accelerate's fp32 output conversion under
    ``bf16=True``, ``recursively_apply``); that call works and gives a plain Liger-style list whose ``named`` is
    empty. Code that needs the names across such a trainer should pass ``dict(metrics.named)`` instead."""

    def __init__(self, ordered=(), named=None):
        super().__init__(ordered)
        self.named = dict(named) if named is not None else {}

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.named[key]
        return super().__getitem__(key)

    def keys(self):
        return self.named.keys()


@dataclass
class LossConfig:
    """Settings of :class:`RLVRLoss` (validated in ``__post_init__``)."""

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
    aggregation: Optional[str] = None
    loss_horizon: Optional[int] = None
    dual_clip: Optional[float] = None
    cispo_min: Optional[float] = None
    ratio_cap: Optional[float] = None
    log_ratio_clip: Optional[float] = None
    entropy_coef: float = 0.0
    credit: str = "none"
    schedule: Optional[TemporalSchedule] = None
    credit_rho: float = 0.2
    entropy_adv_alpha: float = 0.4
    entropy_adv_kappa: float = 2.0
    d3s_scope: str = "batch"
    cppo_w_min: float = 0.8
    cppo_delta_b: float = 0.02
    cppo_budget: str = "dynamic"
    cppo_quantile: float = 0.9
    cppo_max_mult: float = 2.0
    cppo_horizon: Optional[int] = None
    cppo_divergence: str = "binary_tv"
    fused: object = "auto"
    backend: str = "auto"
    ignore_index: int = -100

    def __post_init__(self):
        if self.credit is None:
            self.credit = "none"
        self._check_numbers()
        C.choice("loss_type", self.loss_type, ref_loss.LOSS_TYPES)
        C.choice("importance_sampling_level", self.importance_sampling_level, IS_LEVELS)
        if self.importance_sampling_level == "sequence" and self.loss_type in ("cispo", "sapo", "vespo", "dppo", "cppo"):
            raise ValueError(f"importance_sampling_level='sequence' (GSPO) is not supported with "
                             f"loss_type={self.loss_type!r}: its trust region or weight is per token")
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length (it divides by B * max_completion_length)")
        if self.aggregation is not None:
            C.choice("aggregation", self.aggregation, ref_loss.VERL_AGGREGATIONS)
        C.choice("credit", self.credit, CREDITS)
        if self.credit == "tp_schedule" and self.schedule is None:
            raise ValueError("credit='tp_schedule' needs a schedule=TemporalSchedule(...) (its cut-off moves with the step)")
        if self.schedule is not None and not isinstance(self.schedule, TemporalSchedule):
            raise TypeError(f"schedule must be a TemporalSchedule, got {type(self.schedule).__name__}")
        C.choice("d3s_scope", self.d3s_scope, ("batch", "sequence"))
        C.choice("cppo_budget", self.cppo_budget, ref_cppo.BUDGETS)
        C.choice("cppo_divergence", self.cppo_divergence, ref_cppo.DIVERGENCES)
        C.choice("backend", self.backend, BACKENDS)
        if self.dual_clip is not None and self.loss_type not in ref_loss.PPO_CLIP_TYPES:
            raise ValueError(f"dual_clip applies to the PPO-clip loss types {ref_loss.PPO_CLIP_TYPES}, "
                             f"not {self.loss_type!r}")
        if self.ratio_cap is not None and self.loss_type not in ("dppo", "cppo"):
            raise ValueError("ratio_cap (truncated IS, verl's dppo/cppo form) applies to loss_type 'dppo' or 'cppo'")
        if isinstance(self.fused, str) and self.fused != "auto" or not isinstance(self.fused, (str, bool)):
            raise ValueError(f"fused must be 'auto', True or False, got {self.fused!r}")
        if self.fused is True and self.credit == "d3s" and self.d3s_scope == "batch":
            raise ValueError("fused=True cannot run credit='d3s' with d3s_scope='batch': the batch-wide top-rho "
                             "selection needs every token's current entropy before any chunk's gradient; use "
                             "fused='auto' (composable path) or d3s_scope='sequence'")

    def _check_numbers(self) -> None:
        """Every number and flag: type and range, stored back as a plain Python value (NaN never passes)."""
        pos = dict(low=0.0, low_open=True)
        nonneg = dict(low=0.0)
        unit = dict(low=0.0, high=1.0)
        reals = {"beta": nonneg, "epsilon_low": nonneg, "epsilon_high": nonneg, "sapo_temperature_pos": pos,
                 "sapo_temperature_neg": pos, "vespo_k_pos": nonneg, "vespo_lambda_pos": nonneg,
                 "vespo_k_neg": nonneg, "vespo_lambda_neg": nonneg, "entropy_coef": {}, "credit_rho": unit,
                 "entropy_adv_alpha": pos, "entropy_adv_kappa": pos, "cppo_w_min": unit, "cppo_delta_b": nonneg,
                 "cppo_quantile": unit, "cppo_max_mult": dict(low=1.0)}
        optional_reals = {"delta": pos, "loss_horizon": pos, "dual_clip": dict(low=1.0, low_open=True),
                          "cispo_min": nonneg, "ratio_cap": pos, "log_ratio_clip": pos}
        for name, rng in reals.items():
            setattr(self, name, C.real(name, getattr(self, name), **rng))
        for name, rng in optional_reals.items():
            setattr(self, name, C.optional_real(name, getattr(self, name), **rng))
        self.temperature = C.temperature(self.temperature)
        self.chunk_size = C.integer("chunk_size", self.chunk_size, low=1)
        self.max_completion_length = C.optional_integer("max_completion_length", self.max_completion_length, low=1)
        self.cppo_horizon = C.optional_integer("cppo_horizon", self.cppo_horizon, low=1)
        self.ignore_index = C.integer("ignore_index", self.ignore_index)
        for name in ("compiled", "use_ref_model", "use_bias_correction_kl"):
            C.flag(name, getattr(self, name))


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


class _Batch:
    """Checked, ``[B, T]``-shaped inputs of one forward call; ``rows(sl, cols)`` gives a slice of it (whole rows, or
    a segment of rows for token-local configurations); ``counts`` ``[B]``: each row's planned active tokens."""

    def __init__(self, cfg: LossConfig, x, ids, valid, mask, adv, old, ref, is_ratio, mu, coef, old_ent):
        B, T = mask.shape
        self.B, self.T = B, T
        self.x, self.ids = x, ids
        self.valid = _as_float(valid)  # the caller's loss mask
        self.mask = _as_float(mask)  # after the credit masks known before the vocab pass
        self.adv = _as_float(adv).unsqueeze(1).expand(B, T) if adv.dim() == 1 else _as_float(adv)
        self.old, self.ref, self.mu = old, ref, mu
        if is_ratio is not None:
            is_ratio = _as_float(is_ratio)
            is_ratio = is_ratio.unsqueeze(1) if is_ratio.dim() == 1 else is_ratio
        self.is_ratio = is_ratio
        self.coef, self.old_ent = coef, old_ent
        self.counts: Optional[torch.Tensor] = None

    def rows(self, sl: slice, cols: slice = slice(None)) -> dict:
        T = self.T

        def pick(t):
            if t is None:
                return None
            return t[sl, cols] if t.shape[-1] == T or t.shape[-1] == 0 else t[sl]  # [B, 1] ratios: per row

        return dict(mask=pick(self.mask), adv=pick(self.adv), old=pick(self.old), ref=pick(self.ref),
                    mu=pick(self.mu), is_ratio=pick(self.is_ratio), coef=pick(self.coef), old_ent=pick(self.old_ent),
                    ids=pick(self.ids), counts=None if self.counts is None else self.counts[sl], width=T)


def _check_2d(name, t, B, T, *, dtype_kind="float", allow=(None,)):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) not in [(B, T)] + [s for s in allow if s is not None]:
        shapes = " or ".join(str(s) for s in [(B, T)] + [s for s in allow if s is not None])
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(t.shape)}")
    if dtype_kind == "float" and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


class RLVRLoss(nn.Module):
    """Drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` with more objectives and credit rules.

    Liger's constructor keywords keep their names, defaults and meaning (``compiled`` and ``chunk_size`` are
    accepted; chunking here is by memory budget). Additional keywords (all optional):

    - ``loss_type``: also ``dppo`` and ``cppo`` (``-M A rho`` with DPPO's / CPPO's direction-aware mask; for dppo,
      ``epsilon_low/high`` are the binary-TV divergence thresholds as in verl's ``dppo_tv``; for cppo
      ``epsilon_high`` is CPPO's delta and ``cppo_*`` are its parameters); ``ratio_cap`` gives the truncated-IS form
      ``-M A sg(min(rho, cap)) log p`` (verl's, cap 20). ``importance_sampling_level="sequence"`` is GSPO.
    - ``log_ratio_clip``: clamp ``log p - log p_old`` to ``[-c, c]`` before ``exp`` (verl clamps at 20 in every
      policy loss; Liger and TRL do not, hence the default None; dppo/cppo always clamp at 20).
    - ``aggregation``: one of verl's ``token-mean | token-sum | seq-mean-token-mean | seq-mean-token-sum |
      seq-mean-token-sum-norm`` (``loss_horizon`` for the last; default T) instead of the loss type's normaliser.
    - ``dual_clip`` (verl's ``clip_ratio_c``), ``cispo_min`` (verl's two-sided CISPO clamp), ``entropy_coef`` (an
      entropy bonus ``- entropy_coef * agg(H)`` with the exact entropy gradient).
    - ``credit``: ``"none" | "tp_schedule" | "forking" | "entropy_adv" | "d3s" | "delta"`` with ``schedule`` (a
      :class:`TemporalSchedule`, evaluated at the forward keyword ``step``): TP-Schedule's cut-off ``q(k)``; forking /
      D^3S keep ``rho = 1 - q(k)`` (or ``credit_rho`` without a schedule); entropy-shaped advantages use scale
      ``q(k)`` (or 1). ``delta`` multiplies A by precomputed DelTA coefficients (forward keyword
      ``delta_coefficients [B, T]``).
    - ``fused``: ``"auto"`` (fused 3-GEMM path when a gradient is needed, the configuration allows it and one
      sequence's fp32 ``[T, V]`` logits fit the chunk budget, 1 GiB on GPU, 16 MiB on CPU, or the loss is
      :func:`token_local`, whose rows are then split into segments),
      ``True``, ``False`` (composable path); ``backend`` as in :func:`fused_linear_logprobs`.

    Returns ``(loss, metrics)`` as Liger does: ``metrics[0]`` the KL mean when ``beta != 0``, ``metrics[-1]`` the clip
    ratio, and every metric by name (``metrics["entropy"]``, ``metrics.named``).
    """

    def __init__(self, beta: float = 0.04, compiled: bool = True, use_ref_model: bool = True, chunk_size: int = 1,
                 epsilon_low: float = 0.2, epsilon_high: float = 0.2, loss_type: str = "dapo",
                 max_completion_length: Optional[int] = None, importance_sampling_level: str = "token",
                 sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05, temperature: float = 1.0,
                 delta: Optional[float] = None, use_bias_correction_kl: bool = False, vespo_k_pos: float = 2.0,
                 vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0, **extra):
        super().__init__()
        names = {f.name for f in fields(LossConfig)}
        unknown = set(extra) - names
        if unknown:
            raise TypeError(f"RLVRLoss got unexpected keyword(s) {sorted(unknown)}")
        self.config = LossConfig(
            beta=beta, compiled=compiled, use_ref_model=use_ref_model, chunk_size=chunk_size,
            epsilon_low=epsilon_low, epsilon_high=epsilon_high, loss_type=loss_type,
            max_completion_length=max_completion_length, importance_sampling_level=importance_sampling_level,
            sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
            temperature=temperature, delta=delta, use_bias_correction_kl=use_bias_correction_kl,
            vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
            vespo_lambda_neg=vespo_lambda_neg, **extra,
        )

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            cfg = self.__dict__.get("config")
            if cfg is not None and hasattr(cfg, name):
                return getattr(cfg, name)
            raise

    def extra_repr(self) -> str:
        c = self.config
        return f"loss_type={c.loss_type!r}, beta={c.beta}, credit={c.credit!r}, schedule={c.schedule!r}"

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None,
                vllm_is_ratio=None, num_items_in_batch=None, *, step: Optional[int] = None,
                rollout_per_token_logps=None, delta_coefficients=None, old_entropy=None,
                global_batch_size=None, batch_num_tokens=None, dp_size: int = 1):
        """Loss of one micro-batch.

        Args (Liger's): ``_input [B, T, H]`` last hidden states; ``lin_weight [V, H]``; ``selected_token_ids [B, T]``;
        ``attention_mask [B, T]`` (the loss mask); ``advantages [B]`` (or per token ``[B, T]``); ``bias [V]``;
        ``ref_per_token_logps``/``old_per_token_logps [B, T]``; ``ref_input``/``ref_weight``/``ref_bias`` (the
        reference model's hidden states, used when no ref log-probs are given); ``vllm_is_ratio`` ``[B, T]``,
        ``[B, 1]`` or ``[B]``; ``num_items_in_batch`` (dapo/cispo normaliser, as TRL passes it).
        Extra: ``step`` (1-based optimizer step, for the schedule); ``rollout_per_token_logps`` (mu for dppo/cppo;
        default ``old_per_token_logps``); ``delta_coefficients [B, T]``; ``old_entropy [B, T]`` (entropy_adv's
        H, default the current policy's, detached); ``global_batch_size`` / ``batch_num_tokens`` (verl's
        ``global_batch_info`` for the verl aggregation modes) and ``dp_size`` (verl multiplies those modes by the
        data-parallel size, because DDP/FSDP average the ranks' gradients).
        """
        return rlvr_loss(self.config, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias,
                         ref_per_token_logps, old_per_token_logps, ref_input, ref_weight, ref_bias, vllm_is_ratio,
                         num_items_in_batch, step=step, rollout_per_token_logps=rollout_per_token_logps,
                         delta_coefficients=delta_coefficients, old_entropy=old_entropy,
                         global_batch_size=global_batch_size, batch_num_tokens=batch_num_tokens, dp_size=dp_size)


# ----------------------------------------------------------------------------------------------------------------
# the token pass (shared by both paths)


def _schedule_value(cfg: LossConfig, step) -> Optional[float]:
    if cfg.schedule is None:
        return None
    if step is None:
        raise ValueError("this loss has a schedule: pass the 1-based optimizer step as forward(..., step=k)")
    return float(cfg.schedule(step))


def _credit_mask_static(cfg, mask, q):
    """Credit masks that do not depend on the current policy (applied before the vocab pass)."""
    if cfg.credit == "tp_schedule":
        from rlvr_kernels.credit import tp_schedule_mask

        return tp_schedule_mask(mask.bool(), q, backend=cfg.backend).to(mask.dtype) * mask
    return mask


def _trust_mask(cfg, logp, rows) -> tuple[Optional[torch.Tensor], dict]:
    """DPPO / CPPO detached mask ``[b, T]`` and its statistics."""
    if cfg.loss_type not in ("dppo", "cppo"):
        return None, {}
    lp = logp.detach()
    mu = rows["mu"]
    A = rows["adv"]
    m = rows["mask"]
    if cfg.loss_type == "dppo":
        # verl dppo_tv / DPPO Binary-TV: keep moves toward mu, else |pi(a) - mu(a)| within the side's threshold.
        diff = lp.exp() - mu.exp()
        keep = torch.where(A > 0, diff <= cfg.epsilon_high, diff >= -cfg.epsilon_low)
        return keep.to(torch.float32), {}
    from rlvr_kernels.cppo import cppo_mask

    res = cppo_mask(lp, mu, A, m.bool(), delta=cfg.epsilon_high, w_min=cfg.cppo_w_min, delta_b=cfg.cppo_delta_b,
                    budget=cfg.cppo_budget, quantile=cfg.cppo_quantile, max_mult=cfg.cppo_max_mult,
                    horizon=cfg.cppo_horizon, divergence=cfg.cppo_divergence, backend=cfg.backend)
    stats = {}
    db = getattr(res, "delta_b", None)
    if db is not None:
        stats["cppo_delta_b_sum"] = (db.reshape(-1).float() * (m.sum(-1) > 0).float()).sum()
    return res.mask.to(torch.float32), stats


def token_pass(cfg: LossConfig, logp, entropy, rows: dict, q: Optional[float], norm, ent_norm):
    """Loss contribution and metric sums of whole sequences.

    logp / entropy ``[b, T]`` fp32 (differentiable); rows: the sequence slice of the batch (``_Batch.rows``);
    norm / ent_norm: the batch-global divisors of the policy term and of the entropy bonus.
    Returns ``(loss, sums, active_mask)``: this slice's share of the loss, metric numerators, and the ``[b, T]``
    mask of active tokens.
    """
    mask = rows["mask"]
    # positions outside the mask take no part: selected to 0 (forward 0, gradient exactly 0, even from NaN/-inf)
    live = mask > 0
    logp = torch.where(live, logp, 0.0)
    entropy = torch.where(live, entropy, 0.0) if entropy is not None else None
    ent_d = entropy.detach() if entropy is not None else None
    # (1) credit masks that need the current policy's entropy
    if cfg.credit in ("forking", "d3s"):
        rho = (1.0 - q) if q is not None else cfg.credit_rho
        if cfg.credit == "forking":
            from rlvr_kernels.credit import forking_token_mask

            keep = forking_token_mask(ent_d, mask.bool(), rho, backend=cfg.backend)
        else:
            from rlvr_kernels.credit import d3s_token_mask

            keep = d3s_token_mask(rows["adv"], ent_d, mask.bool(), rho, scope=cfg.d3s_scope, backend=cfg.backend)
        mask = mask * keep.to(mask.dtype)
    # (2) advantage shaping
    adv = rows["adv"]
    if cfg.credit == "entropy_adv":
        from rlvr_kernels.credit import entropy_shaped_advantages

        h = rows["old_ent"] if rows["old_ent"] is not None else ent_d
        adv = entropy_shaped_advantages(adv, h.float(), mask.bool(), q if q is not None else 1.0,
                                        alpha=cfg.entropy_adv_alpha, kappa=cfg.entropy_adv_kappa, backend=cfg.backend)
    elif cfg.credit == "delta":
        adv = adv * rows["coef"].float()
    rows = dict(rows, mask=mask, adv=adv)
    # (3) trust region + objective
    old = rows["old"] if rows["old"] is not None else logp.detach()
    ref = rows["ref"] if rows["ref"] is not None else logp.detach()
    tmask, tstats = _trust_mask(cfg, logp, rows)
    per_tok, aux = ref_loss.policy_token_loss(cfg, logp, old, adv, mask, ref_logp=ref, is_ratio=rows["is_ratio"],
                                              trust_mask=tmask)
    # (4) aggregation (row counts of whole rows: the slice may be a segment of each row)
    counts = rows.get("counts")
    mode, horizon = ref_loss.aggregation_mode(cfg, rows.get("width", mask.shape[1]))
    loss = ref_loss.aggregate(per_tok, mask, mode, norm, horizon, counts)
    if cfg.entropy_coef != 0.0:
        # TRL: a token mean over the active tokens; verl: agg_loss(entropy) in the loss's own mode.
        emode, ehorizon = ("token-sum-over-norm", None) if cfg.aggregation is None else (mode, horizon)
        loss = loss - cfg.entropy_coef * ref_loss.aggregate(entropy, mask, emode, ent_norm, ehorizon, counts)
    sums = {
        "active": mask.sum(),
        "clipped": (aux["clipped"].float() * mask).sum(),
        "low_clipped": (aux["low_clipped"].float() * mask).sum(),
        "high_clipped": (aux["high_clipped"].float() * mask).sum(),
    }
    # per-row statistics ("row_*", [b]) for TRL's clip_ratio/low_min and /high_max (extremes over the sequences)
    if cfg.importance_sampling_level == "sequence":
        # one clip indicator per sequence (GSPO): TRL averages them over the sequences, empty ones included
        sums["rows"] = mask.new_tensor(float(mask.shape[0]))
        for k in ("clipped", "low_clipped", "high_clipped"):
            sums["seq_" + k] = aux[k][:, 0].float().sum()
        sums["row_low_clipped"] = aux["low_clipped"][:, 0].float()
        sums["row_high_clipped"] = aux["high_clipped"][:, 0].float()
    else:  # clipped tokens of each row (over its active tokens, row_active)
        sums["row_low_clipped"] = (aux["low_clipped"].float() * mask).sum(-1)
        sums["row_high_clipped"] = (aux["high_clipped"].float() * mask).sum(-1)
    sums["row_active"] = mask.sum(-1)
    if ent_d is not None:
        sums["entropy"] = (ent_d * mask).sum()
    if aux["kl"] is not None:
        sums["kl"] = (aux["kl"].detach() * mask).sum()
    if tmask is not None:
        sums["trust_masked"] = ((1.0 - tmask) * mask).sum()
    sums.update(tstats)
    return loss, {k: v.detach() for k, v in sums.items()}, mask


# ----------------------------------------------------------------------------------------------------------------
# entry point


def _check_inputs(cfg, x, w, ids, mask, adv, bias, ref, old, ref_input, ref_weight, is_ratio, mu, coef, old_ent,
                  num_items_in_batch, global_batch_size, batch_num_tokens):
    """Every tensor's type, shape, dtype and device, ids in range and finite values on the loss tokens, before any
    kernel runs. Values at positions outside the loss mask are never read (padding may hold anything)."""
    _check_float_tensor(x, "_input")
    if x.dim() != 3 or x.shape[-1] == 0:
        raise ValueError(f"_input must be [B, T, H] hidden states with H > 0, got shape {tuple(x.shape)}")
    B, T, H = x.shape
    _check_float_tensor(w, "lin_weight")
    if w.dim() != 2 or w.shape[1] != H or w.shape[0] == 0:
        raise ValueError(f"lin_weight must be [V, H] with V > 0 and H = {H}, the last dimension of _input "
                         f"(nn.Linear layout), got {tuple(w.shape)}")
    if w.dtype != x.dtype:
        raise TypeError(f"lin_weight dtype {w.dtype} does not match _input dtype {x.dtype}")
    if bias is not None:
        _check_float_tensor(bias, "bias")
        if tuple(bias.shape) != (w.shape[0],):
            raise ValueError(f"bias must have shape [V] = [{w.shape[0]}], got {tuple(bias.shape)}")
    _check_int_tensor(ids, "selected_token_ids")
    if tuple(ids.shape) != (B, T):
        raise ValueError(f"selected_token_ids must have shape {(B, T)}, got {tuple(ids.shape)}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T):
        raise ValueError(f"attention_mask must be a tensor of shape {(B, T)}, got {tuple(getattr(mask, 'shape', ()))}")
    for name, t in (("lin_weight", w), ("bias", bias), ("selected_token_ids", ids), ("attention_mask", mask),
                    ("advantages", adv), ("ref_per_token_logps", ref), ("old_per_token_logps", old),
                    ("rollout_per_token_logps", mu), ("delta_coefficients", coef), ("old_entropy", old_ent),
                    ("vllm_is_ratio", is_ratio), ("ref_input", ref_input), ("ref_weight", ref_weight)):
        if isinstance(t, torch.Tensor) and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but _input is on {x.device}")
    if mask.is_complex() or (mask.dtype.is_floating_point and not bool(torch.isfinite(mask).all())):
        raise ValueError("attention_mask must hold finite real values (1 = loss token, 0 = ignored)")
    if not isinstance(adv, torch.Tensor) or tuple(adv.shape) not in ((B,), (B, T)):
        raise ValueError(f"advantages must be a tensor of shape ({B},) or {(B, T)}, got "
                         f"{tuple(getattr(adv, 'shape', ()))}")
    if not adv.dtype.is_floating_point:
        raise TypeError(f"advantages must be a floating-point tensor, got {adv.dtype}")
    for name, t in (("ref_per_token_logps", ref), ("old_per_token_logps", old), ("rollout_per_token_logps", mu),
                    ("delta_coefficients", coef), ("old_entropy", old_ent)):
        _check_2d(name, t, B, T)
    _check_2d("vllm_is_ratio", is_ratio, B, T, allow=((B, 1), (B,)))
    keep = mask != 0
    if B * T:
        sel = ids[keep]
        bad = (sel < 0) | (sel >= w.shape[0])
        if bool(bad.any()):
            raise ValueError(f"selected_token_ids must lie in [0, {w.shape[0]}) on loss tokens (attention_mask != 0); "
                             f"found {int(sel[bad][0])}")
    rows_used = keep.any(-1)
    for name, t in (("advantages", adv), ("old_per_token_logps", old), ("ref_per_token_logps", ref),
                    ("vllm_is_ratio", is_ratio), ("rollout_per_token_logps", mu), ("delta_coefficients", coef),
                    ("old_entropy", old_ent)):
        if t is None:
            continue
        vals = t[keep] if t.shape == mask.shape else t.reshape(B, t.numel() // max(B, 1))[rows_used]
        if not bool(torch.isfinite(vals.float()).all()):  # fp32 is the token pass's precision
            raise ValueError(f"{name} has non-finite values on loss tokens (NaN, inf, or beyond the float32 range)")
    if cfg.beta != 0.0 and cfg.use_ref_model and ref is None and ref_input is None:
        raise ValueError("beta != 0 with use_ref_model=True needs ref_per_token_logps or ref_input (and ref_weight)")
    if ref is None and ref_input is not None and ref_weight is None:
        raise ValueError("ref_input needs ref_weight")
    if cfg.loss_type in ("dppo", "cppo") and mu is None and old is None:
        raise ValueError(f"loss_type={cfg.loss_type!r} needs the rollout (behaviour) log-probs: pass "
                         "rollout_per_token_logps or old_per_token_logps; without them every divergence is 0")
    if cfg.credit == "delta" and coef is None:
        raise ValueError("credit='delta' needs delta_coefficients [B, T] (see rlvr_kernels.delta_coefficients)")
    for name, v in (("num_items_in_batch", num_items_in_batch), ("global_batch_size", global_batch_size),
                    ("batch_num_tokens", batch_num_tokens)):
        if v is not None:
            C.real(name, v, low=0.0)


def rlvr_loss(cfg: LossConfig, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
              ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None,
              vllm_is_ratio=None, num_items_in_batch=None, *, step=None, rollout_per_token_logps=None,
              delta_coefficients=None, old_entropy=None, global_batch_size=None, batch_num_tokens=None,
              dp_size: int = 1):
    """Functional form of :class:`RLVRLoss` (``cfg`` a :class:`LossConfig`). Returns ``(loss, LossMetrics)``.

    Under ``torch.autocast`` the hidden states and the head are cast as the ``lm_head`` would be (to the autocast
    dtype), and the loss then runs with autocast off: statistics and the token pass in fp32."""
    _input, lin_weight, bias, ref_input, ref_weight, ref_bias = autocast_inputs(
        _input, lin_weight, bias, ref_input, ref_weight, ref_bias)
    device = _input.device if isinstance(_input, torch.Tensor) else torch.device("cpu")
    with no_autocast(device):
        return _rlvr_loss(cfg, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias,
                          ref_per_token_logps, old_per_token_logps, ref_input, ref_weight, ref_bias, vllm_is_ratio,
                          num_items_in_batch, step, rollout_per_token_logps, delta_coefficients, old_entropy,
                          global_batch_size, batch_num_tokens, dp_size)


def _rlvr_loss(cfg, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias, ref_per_token_logps,
               old_per_token_logps, ref_input, ref_weight, ref_bias, vllm_is_ratio, num_items_in_batch, step,
               rollout_per_token_logps, delta_coefficients, old_entropy, global_batch_size, batch_num_tokens,
               dp_size):
    mu = rollout_per_token_logps if rollout_per_token_logps is not None else old_per_token_logps
    if not cfg.use_ref_model:  # Liger: without a reference model the KL is taken against the current policy (0)
        ref_per_token_logps = ref_input = ref_weight = ref_bias = None
    _check_inputs(cfg, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias,
                  ref_per_token_logps, old_per_token_logps, ref_input, ref_weight, vllm_is_ratio, mu,
                  delta_coefficients, old_entropy, num_items_in_batch, global_batch_size, batch_num_tokens)
    ref_loss.check_global_batch_info(cfg, dp_size, batch_num_tokens, global_batch_size)
    B, T, H = _input.shape
    q = _schedule_value(cfg, step)
    valid = attention_mask != 0
    # The loss mask as weights; positions outside it are exactly 0 (never NaN * 0) and take no part in anything.
    mask = _credit_mask_static(cfg, torch.where(valid, _as_float(attention_mask), 0.0), q)
    # Positions outside the loss mask may hold any id and any hidden state (padding): they are ignore_index rows
    # of the vocabulary pass, read as zeros, with logp = entropy = 0 and no gradient.
    ids = torch.where(valid, selected_token_ids.long(), torch.full_like(selected_token_ids, cfg.ignore_index,
                                                                         dtype=torch.long))
    if ref_per_token_logps is None and ref_input is not None and cfg.beta != 0.0 and cfg.use_ref_model:
        with torch.no_grad():
            ref_per_token_logps, _ = fused_linear_logprobs(ref_input, ref_weight, ids, bias=ref_bias,
                                                           temperature=cfg.temperature, return_entropy=False,
                                                           ignore_index=cfg.ignore_index, backend=cfg.backend)
    f = lambda t: None if t is None else _inert(t.detach().float(), valid)  # noqa: E731
    batch = _Batch(cfg, _input, ids, torch.where(valid, _as_float(attention_mask), 0.0), mask,
                   _inert(advantages.detach().float(), valid), f(old_per_token_logps), f(ref_per_token_logps),
                   _inert_ratio(vllm_is_ratio, valid, cfg), f(mu), f(delta_coefficients), f(old_entropy))
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (_input, lin_weight, bias))
    fused = cfg.fused
    if fused == "auto":
        # the fused path holds one chunk of logits: whole rows, or row segments when every token's term is local
        # (token_local); other configurations whose rows do not fit take the composable path (O(chunk * V) memory)
        fused = (needs_grad and not (cfg.credit == "d3s" and cfg.d3s_scope == "batch")
                 and (T * lin_weight.shape[0] * 4 <= _chunk_budget(_input.device) or token_local(cfg)))
    if B * T == 0:
        fused = False  # nothing to chunk: the composable path gives a zero loss connected to the inputs
    counts = _active_counts(cfg, mask, q)
    logp = ent = None
    if not fused:
        logp, ent = fused_linear_logprobs(_input, lin_weight, ids, bias=bias, temperature=cfg.temperature,
                                          ignore_index=cfg.ignore_index, backend=cfg.backend)
        logp, ent = logp.float(), ent.float()
        if counts is None:  # D^3S over the batch: the rows' shares are known only from the current entropies
            from rlvr_kernels.credit import d3s_token_mask

            rho = (1.0 - q) if q is not None else cfg.credit_rho
            keep = d3s_token_mask(batch.adv, ent.detach(), mask.bool(), rho, scope="batch", backend=cfg.backend)
            counts = (mask * keep.to(mask.dtype)).sum(-1)
    norm = ref_loss.normalizer(cfg, counts, T, num_items_in_batch=num_items_in_batch,
                               global_batch_size=global_batch_size, batch_num_tokens=batch_num_tokens,
                               dp_size=dp_size)
    ent_norm = counts.sum().clamp(min=1.0) if cfg.aggregation is None else norm
    batch.counts = counts
    if fused:
        info: dict = {}
        loss = _FusedLoss.apply(_input, lin_weight, bias, cfg, batch, q, norm, ent_norm, info)
        sums, active = info["sums"], info["active"]
    else:
        loss, sums, active = token_pass(cfg, logp, ent, batch.rows(slice(None)), q, norm, ent_norm)
    if not torch.equal(active.sum(-1), counts):  # the normaliser was computed from the planned active tokens
        raise RuntimeError("internal error: the credit mask kept a different number of tokens than planned")
    return loss, _metrics(cfg, sums, batch, q)


def _inert(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``t`` with every position outside the loss mask set to 0 (``[B]`` per-row tensors are returned as they are;
    rows without a loss token never count)."""
    if t.shape != valid.shape:
        return torch.where(torch.isfinite(t), t, 0.0) if t.dim() == 1 else t
    return torch.where(valid, t, 0.0)


def _inert_ratio(is_ratio, valid, cfg):
    """vllm_is_ratio ``[B, T]`` / ``[B, 1]`` / ``[B]`` as fp32: 1 outside the loss mask (VESPO multiplies every
    position's ratio into its sequence weight, as Liger and TRL do, so there only non-finite values become 1)."""
    if is_ratio is None:
        return None
    r = is_ratio.detach().float()
    one = torch.ones((), dtype=r.dtype, device=r.device)
    if r.shape == valid.shape:
        keep = valid | torch.isfinite(r) if cfg.loss_type == "vespo" else valid
        return torch.where(keep, r, one)
    return torch.where(torch.isfinite(r), r, one)


def _active_counts(cfg: LossConfig, mask: torch.Tensor, q: Optional[float]) -> torch.Tensor:
    """Active tokens per row ``[B]`` (fp32) before the vocab pass: the credit masks that depend on the current
    entropy keep a known number of tokens (``ceil(n rho)`` per row, or over the batch for D^3S)."""
    n = mask.sum(-1)
    if cfg.credit in ("forking", "d3s"):
        from rlvr_kernels.reference.credit import topk_budget

        rho = (1.0 - q) if q is not None else cfg.credit_rho
        if cfg.credit == "d3s" and cfg.d3s_scope == "batch":
            return None  # only the total is known; rows are filled after the pass (composable path)
        return topk_budget(n, rho).to(torch.float32)
    return n


def _metrics(cfg, sums, batch, q) -> LossMetrics:
    denom = sums["active"].clamp(min=1.0)
    named = {
        "clip_ratio": sums["clipped"] / denom,  # Liger's: token-weighted over the active tokens
        "active_fraction": sums["active"] / batch.valid.sum().clamp(min=1.0),
    }
    # TRL's clip_ratio/{low,high,region}_mean: over the active tokens, or over the sequences at sequence level
    if "rows" in sums:
        rows = sums["rows"].clamp(min=1.0)
        for k, name in (("low_clipped", "low_mean"), ("high_clipped", "high_mean"), ("clipped", "region_mean")):
            named["clip_ratio/" + name] = sums["seq_" + k] / rows
    else:
        named["clip_ratio/low_mean"] = sums["low_clipped"] / denom
        named["clip_ratio/high_mean"] = sums["high_clipped"] / denom
        named["clip_ratio/region_mean"] = named["clip_ratio"]
    # per-sequence clip fractions (indicators at sequence level), their min / max over the sequences that have one;
    # NaN when none has, as TRL's nanmin / nanmax
    if "rows" in sums:
        low_r, high_r = sums["row_low_clipped"], sums["row_high_clipped"]
        has = torch.ones_like(low_r, dtype=torch.bool)
    else:
        n_row = sums["row_active"]
        low_r, high_r = sums["row_low_clipped"] / n_row.clamp(min=1.0), sums["row_high_clipped"] / n_row.clamp(min=1.0)
        has = n_row > 0
    inf, nan = batch.mask.new_tensor(math.inf), batch.mask.new_tensor(math.nan)
    lo = torch.where(has, low_r, inf).amin() if low_r.numel() else inf
    hi = torch.where(has, high_r, -inf).amax() if high_r.numel() else -inf
    named["clip_ratio/low_min"] = torch.where(torch.isinf(lo), nan, lo)
    named["clip_ratio/high_max"] = torch.where(torch.isinf(hi), nan, hi)
    if "entropy" in sums:
        named["entropy"] = sums["entropy"] / denom
    if "kl" in sums:
        named["kl"] = sums["kl"] / denom
    if "trust_masked" in sums:
        named["trust_region/masked_fraction"] = sums["trust_masked"] / denom
    if "cppo_delta_b_sum" in sums:
        named["cppo/delta_b_mean"] = sums["cppo_delta_b_sum"] / max(1, batch.B)
    if q is not None:
        named["schedule_value"] = batch.mask.new_tensor(q)
    if cfg.credit == "delta" and batch.coef is not None:
        valid = batch.valid > 0
        named["delta/coef_std"] = batch.coef[valid].std() if int(valid.sum()) > 1 else batch.mask.new_tensor(0.0)
    ordered = ([named["kl"]] if cfg.beta != 0.0 else []) + [named["clip_ratio"]]
    return LossMetrics(ordered, named)


# ----------------------------------------------------------------------------------------------------------------
# fused path


def _chunk_budget(device: torch.device) -> int:
    """Bytes of the fp32 ``[rows * T, V]`` logits block the fused path holds at a time."""
    return FUSED_CHUNK_BYTES if device.type == "cuda" else FUSED_CHUNK_BYTES_CPU


def token_local(cfg: LossConfig) -> bool:
    """Whether each token's loss term and gradient coefficient depend only on that token and on batch constants
    known before the vocabulary pass (normalisers, row counts), so that the fused path may split a row: token-level
    ratios, no top-k selection over a row or the batch (forking, D^3S), no prefix scan (CPPO), no sequence weight
    (VESPO)."""
    return (cfg.importance_sampling_level == "token" and cfg.loss_type not in ("vespo", "cppo")
            and cfg.credit in ("none", "tp_schedule", "entropy_adv", "delta"))


def _chunks(cfg: LossConfig, B: int, T: int, V: int, device: torch.device):
    """``(rows, cols)`` slices of the fused path: blocks of whole rows whose fp32 ``[rows * T, V]`` logits fit the
    chunk budget, or, when one row does not fit and the configuration is :func:`token_local`, segments of a row."""
    budget = _chunk_budget(device)
    if T * V * 4 <= budget or not token_local(cfg):
        step = max(1, min(B, budget // max(1, T * V * 4)))
        return [(slice(r0, min(B, r0 + step)), slice(None)) for r0 in range(0, B, step)]
    seg = max(1, budget // max(1, V * 4))
    return [(slice(r, r + 1), slice(c0, min(T, c0 + seg))) for r in range(B) for c0 in range(0, T, seg)]


class _FusedLoss(torch.autograd.Function):
    """Loss and its gradients w.r.t. hidden, weight and bias, all in one forward over sequence-aligned chunks;
    ``info`` receives the metric sums and the active mask. Backward only scales the saved gradients."""

    @staticmethod
    def forward(ctx, x, w, b, cfg, batch, q, norm, ent_norm, info):
        B, T, H = x.shape
        V = w.shape[0]
        use_triton = resolve_backend(cfg.backend, x.device) == "triton"
        inv_temp = 1.0 / cfg.temperature
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and b is not None
        # The torch path computes in fp32 (float64 for float64 inputs); the Triton path keeps GEMM operands in
        # the input dtype with fp32 logits.
        cdt = w.dtype if use_triton else ref_lp.compute_dtype(x, w, b)
        w_mm = w if use_triton else w.to(cdt)
        dx = torch.zeros((B, T, H), device=x.device, dtype=x.dtype) if need_x else None
        dw = torch.zeros(w.shape, device=w.device, dtype=w_mm.dtype) if need_w else None
        db = torch.zeros(V, device=w.device, dtype=torch.float32) if need_b else None
        loss = x.new_zeros((), dtype=torch.float32)
        sums: dict = {}
        active_all = torch.zeros((B, T), device=x.device, dtype=torch.float32)
        lse_all = torch.zeros((B, T), device=x.device, dtype=torch.float32)  # checked once, after the last chunk
        for sl, cols in _chunks(cfg, B, T, V, x.device):
            rows = batch.rows(sl, cols)
            nr, nc = rows["mask"].shape
            tc = rows["ids"].reshape(-1)
            # padding rows (ignore_index) read as zeros: NaN/inf there reaches neither the logits nor dW
            ignored = tc == cfg.ignore_index
            xc = torch.where(ignored.unsqueeze(1), torch.zeros((), dtype=cdt, device=x.device),
                             x[sl, cols].reshape(-1, H).to(cdt))
            if use_triton:
                from rlvr_kernels.kernels import logprobs as K

                z = _logits_fp32(xc, w, b)
                lp, ent, lse = K.logits_forward(z, tc, inv_temp, cfg.ignore_index)
            else:
                z = ref_lp._scaled_logits(xc, w_mm, None if b is None else b.to(cdt), inv_temp)
                lp, ent, lse, _, (logz, probs) = ref_lp.scaled_logit_stats(z, tc, ignore_index=cfg.ignore_index,
                                                                           probs=True)  # logz is z
            # per-token gradient coefficients of the loss, from a small autograd graph over [rows, T] only
            lp_leaf = lp.view(nr, nc).float().requires_grad_()
            ent_leaf = ent.view(nr, nc).float().requires_grad_()
            with torch.enable_grad():
                chunk_loss, chunk_sums, active = token_pass(cfg, lp_leaf, ent_leaf, rows, q, norm, ent_norm)
                g_lp, g_ent = torch.autograd.grad(chunk_loss, [lp_leaf, ent_leaf], allow_unused=True)
            g_lp = g_lp.reshape(-1).contiguous() if g_lp is not None else torch.zeros_like(lp, dtype=torch.float32)
            g_ent = g_ent.reshape(-1).contiguous() if g_ent is not None else None
            if use_triton:
                dz = K.logits_backward(z, tc, lse, ent, g_lp, g_ent, inv_temp, cfg.ignore_index, out=z).to(w.dtype)
            else:
                gl, gh, _, cp = ref_lp.upstream_coefficients(tc, cfg.ignore_index, g_lp, g_ent, None, None, cdt)
                dz = ref_lp.dlogits_from_probs(logz, probs, ent, tc, gl, gh, cp)
                del logz, probs
                dz *= inv_temp
            loss += chunk_loss.detach().float()
            active_all[sl, cols] = active.detach()
            lse_all[sl, cols] = lse.view(nr, nc)
            for k, v in chunk_sums.items():
                if k.startswith("row_"):  # per-row statistics [rows]: accumulated over a row's segments
                    if k not in sums:
                        sums[k] = torch.zeros(B, device=v.device, dtype=v.dtype)
                    sums[k][sl] += v
                else:
                    sums[k] = sums[k] + v if k in sums else v
            if need_x:
                dx[sl, cols] = (dz @ w_mm).view(nr, nc, H).to(x.dtype)
            if need_w:
                dw.addmm_(dz.T, xc)
            if need_b:
                db += dz.sum(0, dtype=torch.float32)
            del z, dz
        # one host sync for the whole batch (not one per chunk): a row that counts has finite logits
        ref_lp.check_finite_rows(lse_all.view(-1), batch.ids.reshape(-1) != cfg.ignore_index, "RLVRLoss")
        info["sums"] = sums
        info["active"] = active_all
        # kept until the graph is freed: a second backward (retain_graph=True) gets the same gradients
        ctx.grads = (dx, None if dw is None else dw.to(w.dtype), None if db is None else db.to(b.dtype))
        return loss

    @staticmethod
    @first_order_backward
    def backward(ctx, g_loss):
        dx, dw, db = ctx.grads
        scale = lambda t: None if t is None else t * g_loss.to(t.dtype)  # noqa: E731
        return scale(dx), scale(dw), scale(db), None, None, None, None, None, None


def _logits_fp32(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 ``x @ w.T (+ b)`` (one GEMM; bf16/fp16 inputs accumulate in fp32 and are stored in fp32)."""
    if x.dtype == torch.float32:
        z = x @ w.T
    else:
        try:
            z = torch.mm(x, w.T, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            z = (x @ w.T).float()
    if b is not None:
        z += b.float()
    return z
