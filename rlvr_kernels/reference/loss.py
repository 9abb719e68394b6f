"""Plain-torch token-level policy objectives and aggregation (the math behind ``RLVRLoss``; autograd-friendly).

Every function works on padded ``[B, T]`` float32 tensors. Per-token terms follow the trainers they replace:
- ``grpo | bnpo | dr_grpo | dapo``: PPO clip ``-min(c A, clip(c, 1-eps_low, 1+eps_high) A)`` (Liger / TRL),
  optional INTELLECT-2 ``delta`` clamp of ``c``, optional verl dual clip (``dual_clip`` = verl's ``clip_ratio_c``);
- ``cispo``: ``-sg(clamp(c, cispo_min, eps_high)) A log p`` (Liger/TRL clamp only from above; verl's ``cispo`` also
  from below, ``cispo_min = 1 - clip_ratio_low``);
- ``sapo``: the sigmoid gate ``-(4 / tau) sigmoid(tau (c - 1)) A`` with tau by the sign of A;
- ``luspo``: the PPO clip term, aggregated with the sequence-length weight of TRL's ``luspo``;
- ``vespo``: ``-sg(phi_seq) A log p`` with the gamma weight ``phi(w) = exp(lambda + k log w - lambda w)``;
- ``dppo | cppo``: ``-M A rho`` (or ``-M A sg(min(rho, cap)) log p`` with ``ratio_cap``), ``M`` a detached
  direction-aware trust-region mask (DPPO, arXiv 2602.04879; CPPO, arXiv 2606.10968 Eq. 11); the log-ratio is
  clamped to +-20 as both official codes do;
- ``gpg``: the plain policy gradient ``-A log p`` (GPG, arXiv 2504.02546; verl's ``gpg``);
- ``dro``: ``-(A log p - dro_beta / 2 (log p - old)^2)`` (verl's ``dro``: a quadratic log-ratio penalty);
- ``geo_mean``: GMPO (arXiv 2507.20673, verl's ``geo_mean``): per sequence ``-mean(A) exp(mean_t l_t)`` with
  ``l_t = sgn(A_t) min(sgn(A_t) lr_t, sgn(A_t) clamp(lr_t, -epsilon_low, epsilon_high))`` (the clip is on the
  log-ratio), one value per sequence, averaged over the sequences; the rollout IS weight enters as the sequence's
  geometric mean;
- ``kl_cov``: ``-A c + kl_cov_coef |lr|`` on the KL-Cov tokens, ``-A c`` elsewhere (no clip); ``clip_cov``: the PPO
  clip term, 0 (and no gradient) on the Clip-Cov tokens (arXiv 2505.22617; the selections are
  :mod:`rlvr_kernels.reference.cov`, passed in as the trust mask ``M``, 1 = not selected).
``c`` is the importance ratio ``exp(logp - old)``: per token, or per sequence (GSPO) as ``exp`` of the masked mean
(``importance_sampling_level="sequence"``), or GSPO-token as verl computes it (``"sequence_token"``: that value with
each token's own gradient, ``exp(min(lr_t - sg(lr_t) + sg(mean lr), 10))``).
Then ``x vllm_is_ratio`` (except vespo, which folds it into phi, and geo_mean), then ``+ beta k3(ref, logp)`` (times
``c`` with the bias-corrected KL). The aggregation divides by constants that the caller computes once for the whole
batch (:func:`normalizer`), so the same functions give the loss of any subset of whole sequences (the fused path).
Empty rows and all-zero masks give 0, never NaN (every divisor is clamped to >= 1).
"""

from __future__ import annotations

import math

import torch

PPO_CLIP_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
LOSS_TYPES = PPO_CLIP_TYPES + ("cispo", "sapo", "vespo", "dppo", "cppo", "gpg", "dro", "geo_mean", "kl_cov", "clip_cov")
#: verl caps GSPO-token's sequence log-ratio at 10 before ``exp``
GSPO_TOKEN_LOG_RATIO_MAX = 10.0
VERL_AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def k3_kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def importance_log_weights(log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """``[B, T]`` per-token log-ratio, or ``[B, 1]`` masked sequence mean (GSPO) when ``level == "sequence"``, or
    ``[B, T]`` GSPO-token (``"sequence_token"``: the sequence mean's value, each token's own gradient, capped at
    ``GSPO_TOKEN_LOG_RATIO_MAX``)."""
    if level == "token":
        return log_ratio
    seq = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    if level == "sequence":
        return seq
    return (log_ratio - log_ratio.detach() + seq.detach()).clamp(max=GSPO_TOKEN_LOG_RATIO_MAX)


def vespo_phi(advantages, log_ratio, mask, is_ratio, k_pos, lam_pos, k_neg, lam_neg) -> torch.Tensor:
    """VESPO's detached ``[B, 1]`` gamma weight of the sequence ratio (normalised so that ``phi(1) = 1``)."""
    with torch.no_grad():
        lo = math.log(1e-8)
        log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
        if is_ratio is not None:
            log_w = log_w + torch.log(is_ratio).clamp(lo, 20.0).sum(-1, keepdim=True)
        log_w = log_w.clamp(lo, 20.0)
        nonneg = advantages[:, :1] >= 0
        k = torch.where(nonneg, k_pos, k_neg)
        lam = torch.where(nonneg, lam_pos, lam_neg).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def policy_token_loss(
    cfg,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    is_ratio: torch.Tensor | None = None,
    trust_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss ``[B, T]`` and per-token diagnostics for one objective.

    cfg: an object with the ``RLVRLoss`` settings (loss_type, epsilon_low/high, delta, dual_clip, cispo_min,
    importance_sampling_level, beta, use_bias_correction_kl, sapo/vespo parameters, ratio_cap, log_ratio_clip:
    verl clamps ``logp - old_logp`` to +-20 before ``exp`` in every policy loss, Liger and TRL do not; dppo/cppo
    always clamp at 20 as their papers' code does).
    logp: ``[B, T]`` current log-probs (differentiable); old_logp / ref_logp: ``[B, T]`` detached;
    advantages: ``[B, T]`` (already broadcast and shaped); mask: ``[B, T]`` float; is_ratio: ``[B, T]`` or
    ``[B, 1]``; trust_mask: ``[B, T]`` float for dppo/cppo.
    Returns ``(per_token_loss, aux)`` with aux ``kl`` (or None), ``clipped`` (bool ``[B, T]``, Liger's clip metric),
    ``low_clipped``/``high_clipped`` and ``coef``.
    """
    lt = cfg.loss_type
    # Positions outside the loss mask may hold anything (padding: NaN, -inf, huge values). Every use of them below
    # is multiplied by the mask, but NaN * 0 = NaN, so make them inert first. Replacing old/ref there by the current
    # log-prob (log-ratio 0, KL 0) and non-finite advantages by 0 leaves every finite result unchanged. VESPO sums
    # log(is_ratio) over every position (as Liger and TRL do), so there only non-finite values are replaced.
    # (No host sync: elementwise selects over [b, T].)
    keep = mask > 0
    # the current log-probs too (verl hands log_prob with NaN/-inf at response_mask == 0): a select, so their
    # gradient there is exactly 0 rather than 0 * NaN
    logp = torch.where(keep, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    safe = logp.detach()
    old_logp = torch.where(keep, old_logp, safe)
    if ref_logp is not None:
        ref_logp = torch.where(keep, ref_logp, safe)
    if advantages.shape == keep.shape:
        advantages = torch.where(keep | torch.isfinite(advantages), advantages, torch.zeros_like(advantages))
    if is_ratio is not None and is_ratio.shape == keep.shape:
        inert = keep | torch.isfinite(is_ratio) if lt == "vespo" else keep
        is_ratio = torch.where(inert, is_ratio, torch.ones_like(is_ratio))
    log_ratio = logp - old_logp
    clip = 20.0 if lt in ("dppo", "cppo") else getattr(cfg, "log_ratio_clip", None)
    if clip is not None:
        log_ratio = log_ratio.clamp(-clip, clip)
    log_w = importance_log_weights(log_ratio, mask, cfg.importance_sampling_level)
    coef = torch.exp(log_w)
    A = advantages
    zeros = torch.zeros_like(A, dtype=torch.bool)
    low, high = zeros, zeros
    if lt in PPO_CLIP_TYPES:
        c2 = coef.clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)
        low, high = coef < 1.0 - cfg.epsilon_low, coef > 1.0 + cfg.epsilon_high
        c1 = coef.clamp(max=cfg.delta) if cfg.delta is not None else coef
        loss = -torch.min(c1 * A, c2 * A)
        if cfg.dual_clip is not None:
            loss = torch.where(A < 0, torch.min(loss, -A * cfg.dual_clip), loss)
    elif lt == "cispo":
        c2 = coef.clamp(min=cfg.cispo_min, max=cfg.epsilon_high).detach()
        high = coef > cfg.epsilon_high
        if cfg.cispo_min is not None:
            low = coef < cfg.cispo_min
        loss = -c2 * A * logp
    elif lt == "sapo":
        tau = torch.where(A > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        loss = -(torch.sigmoid(tau * (coef - 1.0)) * 4.0 / tau) * A
    elif lt == "vespo":
        phi = vespo_phi(
            A, log_ratio, mask, is_ratio, cfg.vespo_k_pos, cfg.vespo_lambda_pos, cfg.vespo_k_neg, cfg.vespo_lambda_neg
        )
        loss = -phi * A * logp
    elif lt == "gpg":
        loss = -A * logp
    elif lt == "dro":
        loss = -(A * logp - 0.5 * cfg.dro_beta * log_ratio.square())
    elif lt == "geo_mean":
        loss, low, high = _gmpo(cfg, A, log_ratio, mask, is_ratio)
    elif lt == "kl_cov":
        loss = -A * coef + cfg.kl_cov_coef * log_ratio.abs() * (1.0 - trust_mask)
    elif lt == "clip_cov":
        c2 = coef.clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)
        low, high = coef < 1.0 - cfg.epsilon_low, coef > 1.0 + cfg.epsilon_high
        loss = -torch.min(coef * A, c2 * A) * trust_mask
    elif lt in ("dppo", "cppo"):
        m = trust_mask
        if cfg.ratio_cap is not None:
            loss = -A * coef.detach().clamp(max=cfg.ratio_cap) * logp * m
        else:
            loss = -A * coef * m
        low = (m == 0) & (A < 0)
        high = (m == 0) & (A > 0)
    else:  # validated earlier
        raise ValueError(f"unknown loss_type {lt!r}")
    loss = loss.expand_as(A) if loss.shape != A.shape else loss
    if is_ratio is not None and lt not in ("vespo", "geo_mean"):
        loss = loss * is_ratio
    kl = None
    if cfg.beta != 0.0:
        kl = k3_kl(ref_logp, logp)
        if cfg.use_bias_correction_kl:
            kl = kl * torch.exp(log_w)
        loss = loss + cfg.beta * kl
    clipped = ((low & (A < 0)) | (high & (A > 0))).expand_as(A)
    return loss, {
        "kl": kl,
        "clipped": clipped,
        "low_clipped": (low & (A < 0)).expand_as(A),
        "high_clipped": (high & (A > 0)).expand_as(A),
        "coef": coef,
    }


def _gmpo(cfg, A, log_ratio, mask, is_ratio):
    """GMPO's ``[B, 1]`` sequence loss and its ``[B, T]`` low / high clip flags (see the module docstring)."""
    sgn = torch.sign(A)
    clamped = log_ratio.clamp(-cfg.epsilon_low, cfg.epsilon_high)
    lr = sgn * torch.min(sgn * log_ratio, sgn * clamped)
    n = mask.sum(-1, keepdim=True).clamp(min=1.0)
    ratio = torch.exp((lr * mask).sum(-1, keepdim=True) / n)
    loss = -(A * mask).sum(-1, keepdim=True) / n * ratio
    if is_ratio is not None:  # the geometric mean of the weights over the sequence (verl's 1e-10 guard)
        w = is_ratio.expand_as(A) if is_ratio.shape != A.shape else is_ratio
        loss = loss * torch.exp((torch.log(w + 1e-10) * mask).sum(-1, keepdim=True) / n)
    return loss, log_ratio < -cfg.epsilon_low, log_ratio > cfg.epsilon_high


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    norm: float | torch.Tensor,
    horizon: float | None = None,
    row_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar loss of ``per_token [B, T]`` over ``mask`` with a batch-global ``norm`` from :func:`normalizer`.

    ``row_counts [B]``: the active tokens of each whole row, when ``per_token`` holds only a segment of the rows
    (the per-sequence token mean divides by them; default ``mask.sum(-1)``). Every mode is then a sum over tokens of
    per-token weights, so the loss of a batch is the sum of its segments' losses.

    Modes: ``token-sum-over-norm`` (sum of masked tokens / norm: bnpo, dapo, cispo, dr_grpo, verl token-mean),
    ``seq-mean-token-mean`` (per-sequence token mean, summed, / norm: grpo, sapo, geo_mean, verl
    seq-mean-token-mean),
    ``seq-mean-token-sum`` (per-sequence token sum / norm), ``seq-mean-token-sum-norm`` (that / horizon),
    ``luspo`` (TRL's masked per-sequence sum, / norm = B; Liger 0.8.5's luspo is TRL's older unmasked
    ``(per_token_loss * L).mean()``, which also sums padded positions: the two agree only while the per-token loss
    is ``[B, 1]``, i.e. sequence level, beta = 0 and a per-sequence (or no) vllm_is_ratio).
    """
    masked = torch.where(mask != 0, per_token * mask, 0.0)  # a select: padding never gives NaN * 0
    if mode == "token-sum-over-norm":
        return masked.sum() / norm
    if mode == "seq-mean-token-mean":
        counts = mask.sum(-1) if row_counts is None else row_counts
        return (masked.sum(-1) / counts.clamp(min=1.0)).sum() / norm
    if mode == "seq-mean-token-sum":
        return masked.sum() / norm
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / norm / horizon
    if mode == "luspo":  # TRL: (per_token_loss * mask).sum(-1).mean(), norm = B
        return masked.sum() / norm
    raise ValueError(f"unknown aggregation {mode!r}")


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def aggregation_mode(cfg, T: int) -> tuple[str, float | None]:
    """``(mode, horizon)`` of :func:`aggregate` for a configuration (no communication, no batch statistics)."""
    agg = cfg.aggregation
    if agg is None:
        if cfg.loss_type in ("grpo", "sapo", "geo_mean"):
            return "seq-mean-token-mean", None
        if cfg.loss_type == "luspo":
            return "luspo", None
        return "token-sum-over-norm", None
    if agg in ("token-mean", "token-sum"):
        return "token-sum-over-norm", None
    if agg == "seq-mean-token-sum-norm":
        return agg, float(cfg.loss_horizon) if cfg.loss_horizon is not None else float(T)
    return agg, None


def check_global_batch_info(cfg, dp_size: int, batch_num_tokens, global_batch_size) -> None:
    """verl's modes with ``dp_size > 1`` need the global count they divide by (verl's ``agg_loss`` raises too: a
    local count times ``dp_size`` is not the global count)."""
    if not (isinstance(dp_size, int) and dp_size >= 1):
        raise ValueError(f"dp_size must be an int >= 1, got {dp_size!r}")
    agg = cfg.aggregation
    if agg in (None, "token-sum") or dp_size == 1:
        return
    if (batch_num_tokens if agg == "token-mean" else global_batch_size) is None:
        need = "batch_num_tokens" if agg == "token-mean" else "global_batch_size"
        raise ValueError(
            f"aggregation={agg!r} with dp_size={dp_size} > 1 needs the global {need} (verl's global_batch_info)"
        )


def normalizer(
    cfg,
    row_counts: torch.Tensor,
    T: int,
    *,
    num_items_in_batch=None,
    global_batch_size=None,
    batch_num_tokens=None,
    dp_size: int = 1,
) -> torch.Tensor:
    """The batch-global divisor of :func:`aggregate` (fp32 0-dim), from the active-token count of every row.

    row_counts: ``[B]`` active tokens per row. Without ``cfg.aggregation`` the loss type's own normaliser is used,
    as Liger and TRL define it: grpo/sapo/luspo/geo_mean B (after a per-sequence mean for grpo/sapo/geo_mean); bnpo
    the token count; dr_grpo B * max_completion_length; dapo/cispo/vespo/dppo/cppo/gpg/dro/kl_cov/clip_cov
    ``num_items_in_batch`` (else the all-reduced token count) / world size. With a verl mode, ``batch_num_tokens``
    and ``global_batch_size`` (verl's ``global_batch_info``) replace the local token count and the count of rows with
    an active token, and the divisor is divided by ``dp_size`` (verl's ``agg_loss`` multiplies by it).
    """
    B = row_counts.shape[0]
    f32 = dict(device=row_counts.device, dtype=torch.float32)
    tokens = row_counts.sum().to(torch.float32)
    agg = cfg.aggregation
    if agg is None:
        lt = cfg.loss_type
        if lt in ("grpo", "sapo", "luspo", "geo_mean"):
            return torch.tensor(float(max(B, 1)), **f32)
        if lt == "bnpo":
            return tokens.clamp(min=1.0)
        if lt == "dr_grpo":
            return torch.tensor(float(max(B, 1) * cfg.max_completion_length), **f32)
        world = _world_size()
        if num_items_in_batch is not None:
            n = torch.as_tensor(num_items_in_batch, **f32) / world
        else:
            n = tokens
            if world > 1:
                n = n.clone()
                torch.distributed.all_reduce(n)
            n = n / world
        return n.clamp(min=1.0)
    check_global_batch_info(cfg, dp_size, batch_num_tokens, global_batch_size)
    if agg == "token-sum":  # verl: the local token sum times dp_size (DP averages the ranks' gradients)
        return torch.tensor(1.0 / dp_size, **f32)
    if agg == "token-mean":
        n = batch_num_tokens if batch_num_tokens is not None else tokens
        return torch.as_tensor(n, **f32).clamp(min=1.0) / dp_size
    seqs = global_batch_size if global_batch_size is not None else (row_counts > 0).sum()
    return torch.as_tensor(seqs, **f32).clamp(min=1.0) / dp_size


# ----------------------------------------------------------------------------------------------------------------
# rollout corrections (train / rollout mismatch)

ROLLOUT_IS_LEVELS = ("none", "token", "sequence")
ROLLOUT_IS_MODES = ("truncate", "mask")
#: verl's rejection criteria (``rollout_corr_helper.SUPPORTED_ROLLOUT_RS_OPTIONS``): the k1 ones keep a band of the
#: train/rollout ratio, the k2 / k3 ones an upper bound of the divergence.
ROLLOUT_RS_MODES = (
    "none",
    "token_k1",
    "token_k2",
    "token_k3",
    "seq_sum_k1",
    "seq_sum_k2",
    "seq_sum_k3",
    "seq_mean_k1",
    "seq_mean_k2",
    "seq_mean_k3",
    "seq_max_k2",
    "seq_max_k3",
)
#: |log ratio| bound before any exp (verl's ``SAFETY_BOUND``)
ROLLOUT_SAFETY_BOUND = 20.0
#: below this batch mean the IS weights are left unnormalised (verl's guard)
ROLLOUT_NORMALIZE_EPS = 1e-8


def _log_or(v, default: float) -> float:
    return math.log(v) if v is not None else default


def rollout_rs_criteria(rs) -> tuple[str, ...]:
    """The rejection criteria of ``rs``: ``"none"`` (or None) -> ``()``; one criterion or a comma-separated chain
    (verl's spelling, ``"token_k1,seq_max_k2"``) -> the criteria in order. ``ValueError`` for an unknown, empty or
    repeated criterion (verl drops a repeat silently; here it is a mistake) or ``"none"`` inside a chain."""
    if rs is None:
        return ()
    if not isinstance(rs, str):
        raise ValueError(f"rollout_rs must be a string (one criterion or a comma-separated chain), got {rs!r}")
    if rs.strip() == "none":
        return ()
    parts = [p.strip() for p in rs.split(",")]
    seen: list[str] = []
    for p in parts:
        if p not in ROLLOUT_RS_MODES or p == "none":
            if len(parts) == 1:
                raise ValueError(f"rollout_rs must be one of {ROLLOUT_RS_MODES}, got {rs!r}")
            raise ValueError(
                f"rollout_rs={rs!r}: {p!r} is not a rejection criterion; each one of a chain must be one of "
                f"{ROLLOUT_RS_MODES[1:]}"
            )
        if p in seen:
            raise ValueError(f"rollout_rs={rs!r} names the criterion {p!r} twice")
        seen.append(p)
    return tuple(seen)


def _rs_value(name: str, v, *, optional: bool):
    """One threshold: a positive finite number (None / "none" / "null" when ``optional``)."""
    if isinstance(v, str):
        s = v.strip()
        if optional and s.lower() in ("none", "null", ""):
            return None
        try:
            v = float(s)
        except ValueError:
            raise ValueError(f"{name}: {s!r} is not a number") from None
    if v is None:
        if optional:
            return None
        raise ValueError(f"{name}: every value must be a positive number, got None")
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
        raise TypeError(f"{name} must be a number, a comma-separated string or a sequence of them, got {v!r}")
    f = float(v)
    if not (math.isfinite(f) and 0.0 < f <= 3.4028234663852886e38):
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return f


def rollout_rs_thresholds(name: str, value, *, optional: bool = True):
    """A ``rollout_rs_low`` / ``rollout_rs_high`` value normalised: None, one float (for every criterion), or a
    tuple with one entry per criterion (from a sequence or a comma-separated string such as ``"1.001,0.05"``;
    entries of ``rollout_rs_low`` may be None / ``"none"`` for the k2 / k3 criteria)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in ("none", "null", ""):
            return None
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() > 1:
        items = value.tolist()
    else:
        return _rs_value(name, value, optional=False)
    if not items:
        raise ValueError(f"{name} must not be empty")
    vals = tuple(_rs_value(name, v, optional=optional) for v in items)
    return vals[0] if len(vals) == 1 else vals


def rollout_rs_bands(rs, low, high) -> tuple[tuple[str, float | None, float], ...]:
    """``((criterion, low, high), ...)`` of a rejection (``rs`` one criterion or a chain): ``high`` one value for
    every criterion or one per criterion (required); ``low`` (k1 criteria only, default ``1 / high``) one value for
    every k1 criterion or one per criterion (None for the k2 / k3 ones). ``ValueError`` for a wrong count, a missing
    bound, a lower bound on a k2 / k3 criterion or ``low > high``."""
    crits = rollout_rs_criteria(rs)
    if not crits:
        return ()
    n = len(crits)
    high = rollout_rs_thresholds("rollout_rs_high", high, optional=False)
    low = rollout_rs_thresholds("rollout_rs_low", low)
    if high is None:
        raise ValueError(f"rollout_rs={rs!r} needs rollout_rs_high")

    def per(name, v):
        if not isinstance(v, tuple):
            return (v,) * n
        if len(v) != n:
            raise ValueError(
                f"{name} has {len(v)} values for the {n} criteria of rollout_rs={rs!r}: give one value (for every "
                f"criterion) or one per criterion"
            )
        return v

    highs = per("rollout_rs_high", high)
    if isinstance(low, tuple):
        lows = per("rollout_rs_low", low)
        for c, lo in zip(crits, lows):
            if lo is not None and not c.endswith("k1"):
                raise ValueError(f"rollout_rs_low applies to the *_k1 rejections, not {c!r} (give None for it)")
    elif low is not None:
        if not any(c.endswith("k1") for c in crits):
            raise ValueError(f"rollout_rs_low applies to the *_k1 rejections, not {rs!r}")
        lows = tuple(low if c.endswith("k1") else None for c in crits)
    else:
        lows = (None,) * n
    for c, lo, hi in zip(crits, lows, highs):
        if lo is not None and lo > hi:
            raise ValueError(f"rollout_rs_low = {lo!r} must be <= rollout_rs_high = {hi!r} (criterion {c!r})")
    return tuple(zip(crits, lows, highs))


def rollout_correction(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    *,
    is_level: str = "none",
    is_mode: str = "truncate",
    is_low: float | None = None,
    is_high: float | None = None,
    is_batch_normalize: bool = False,
    rs: str = "none",
    rs_low=None,
    rs_high=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rollout correction of a batch: ``(keep, weight)``, both detached fp32.

    ``log_ratio [B, T]``: ``log pi_old - log mu`` (training engine minus rollout engine log-probs of the sampled
    tokens); ``mask [B, T]``: the loss tokens (other positions may hold anything and are never read). Everything is
    computed in log space, the log ratios bounded to +-20 before any ``exp`` (no ``0 * inf``).

    - IS weight (``is_level`` token: per-token ratio ``[B, T]``; sequence: ``exp(sum log ratio)`` ``[B, 1]``):
      ``is_mode="truncate"`` clamps it to ``[is_low, is_high]`` (TIS; TRL's ``*_truncate``, verl's single threshold);
      ``"mask"`` keeps it inside the band and removes the tokens (sequences) outside it from the loss (TRL's
      ``*_mask``, IcePop / verl's ``"low_high"`` threshold at token level, sequence MIS at sequence level).
    - ``is_batch_normalize`` (verl's ``rollout_is_batch_normalize``): the weights, after the truncation / band, are
      divided by their mean over **this batch** (``mask``): token level the mean over the loss tokens, sequence level
      over the rows with a loss token (one weight per row); a token (row) the band removes counts as weight 0, as
      verl's zeroed IcePop weight does; the rejection (``rs``) does not enter the mean. A mean <= 1e-8 leaves the
      weights as they are. The result may exceed ``is_high``. No collective: on several ranks (or micro-batches)
      each call normalises its own batch.
    - Rejection (``rs``, verl's criteria on ``log pi_old - log mu``; one criterion or a comma-separated chain, a
      token kept only if every criterion keeps it): ``*_k1`` keep the tokens / sequences whose ratio (token),
      product (``seq_sum``) or geometric mean (``seq_mean``: Geo-RS) lies in ``[rs_low, rs_high]`` (``rs_low``
      default ``1 / rs_high``); ``*_k2`` / ``*_k3`` keep those whose divergence (``0.5 lr^2``, ``exp(lr) - 1 - lr``;
      per token, summed, averaged or the row's max) is ``<= rs_high``. ``rs_low`` / ``rs_high``: one value for every
      criterion or one per criterion (:func:`rollout_rs_bands`).

    ``keep [B, T]``: 1 for the loss tokens that stay, 0 elsewhere (the removed tokens leave the loss and every
    normaliser that counts tokens); ``weight``: ``[B, T]`` / ``[B, 1]`` or None (no IS weight), 1 at the removed
    tokens (the peers' weight 0 there is ``weight * keep``).
    """
    bands = rollout_rs_bands(rs, rs_low, rs_high)
    with torch.no_grad():
        on = mask != 0
        f = on.to(torch.float32)
        lr = torch.where(on, log_ratio.float(), 0.0).clamp(-ROLLOUT_SAFETY_BOUND, ROLLOUT_SAFETY_BOUND)
        keep = on.clone()
        weight = None
        if is_level != "none":
            lw = lr if is_level == "token" else lr.sum(-1, keepdim=True).clamp(-ROLLOUT_SAFETY_BOUND, 20.0)
            lo, hi = _log_or(is_low, -math.inf), _log_or(is_high, math.inf)
            inside = None
            if is_mode == "truncate":
                weight = torch.exp(lw.clamp(lo, hi))
            else:
                inside = (lw >= lo) & (lw <= hi)
                keep = keep & inside
                weight = torch.where(inside, torch.exp(lw), 1.0)  # 1 (inert) where removed: out of the loss
            if is_batch_normalize:
                weight = _batch_normalize(weight, inside, on, f, is_level)
        for crit, low, high in bands:
            keep = keep & _rejection_keep(lr, f, crit, low, high)
        return keep.to(torch.float32), weight


def _batch_normalize(weight, inside, on, f, is_level):
    """verl's ``rollout_is_batch_normalize`` over this batch: the weights (0 where the band removes them) divided by
    their mean over the loss tokens (token level) or the non-empty rows (sequence level); left as they are below
    :data:`ROLLOUT_NORMALIZE_EPS`. Removed tokens keep their inert 1."""
    w = weight if inside is None else torch.where(inside, weight, 0.0)
    if is_level == "token":
        n = f.sum()
        total = (w * f).sum()
    else:
        rows = on.any(-1, keepdim=True).to(torch.float32)
        n = rows.sum()
        total = (w * rows).sum()
    mean = total / n.clamp(min=1.0)
    scaled = torch.where(mean > ROLLOUT_NORMALIZE_EPS, w / mean.clamp(min=ROLLOUT_NORMALIZE_EPS), w)
    return scaled if inside is None else torch.where(inside, scaled, 1.0)


def _rejection_keep(lr: torch.Tensor, f: torch.Tensor, rs: str, low, high) -> torch.Tensor:
    """Bool ``[B, T]`` (or ``[B, 1]``) of what verl's criterion ``rs`` (one criterion) keeps."""
    k1 = rs.endswith("k1")
    if rs.endswith("k1"):
        stat = lr
    elif rs.endswith("k2"):
        stat = 0.5 * lr * lr
    else:
        stat = torch.exp(lr) - 1.0 - lr
    if rs.startswith("seq_sum"):
        stat = (stat * f).sum(-1, keepdim=True)
    elif rs.startswith("seq_mean"):
        stat = (stat * f).sum(-1, keepdim=True) / f.sum(-1, keepdim=True).clamp(min=1.0)
    elif rs.startswith("seq_max"):
        stat = torch.where(f > 0, stat, -math.inf).amax(-1, keepdim=True).clamp(min=0.0)
    if k1:
        hi = math.log(high)
        lo = math.log(low) if low is not None else -hi
        return (stat >= lo) & (stat <= hi)
    return stat <= high
