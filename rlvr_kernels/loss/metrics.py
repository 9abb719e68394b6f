"""The metrics of :class:`rlvr_kernels.RLVRLoss`: Liger's ordered list plus every metric by name (TRL's names)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from rlvr_kernels.loss.token_pass import TokenSums


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


def _masked_std(x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """The unbiased standard deviation of ``x[on]`` (0 with fewer than two entries), without a host read: two
    passes over the selected entries, the others selected away (never NaN * 0)."""
    n = on.sum().to(x.dtype)
    mean = torch.where(on, x, 0.0).sum() / n.clamp(min=1.0)
    var = torch.where(on, (x - mean) ** 2, 0.0).sum() / (n - 1.0).clamp(min=1.0)
    return torch.where(n > 1, var.sqrt(), torch.zeros((), dtype=x.dtype, device=x.device))


def loss_metrics(
    cfg, sums: TokenSums, valid: torch.Tensor, n_rows: int, q, coef: Optional[torch.Tensor]
) -> LossMetrics:
    """Metrics of one call from the summed token-pass numerators; ``valid`` ``[B, T]``: the caller's loss mask
    (fp32 weights), ``q``: the schedule value (a float, a 0-dim tensor under torch.compile, or None), ``coef``: the
    DelTA coefficients when the credit rule uses them. No host read (``torch.compile`` traces it whole)."""
    denom = sums.active.clamp(min=1.0)
    named = {
        "clip_ratio": sums.clipped / denom,  # Liger's: token-weighted over the active tokens
        "active_fraction": sums.active / valid.sum().clamp(min=1.0),
    }
    # TRL's clip_ratio/{low,high,region}_mean: over the active tokens, or over the sequences at sequence level
    seq = sums.rows is not None
    if seq:
        rows = sums.rows.clamp(min=1.0)
        named["clip_ratio/low_mean"] = sums.seq_low_clipped / rows
        named["clip_ratio/high_mean"] = sums.seq_high_clipped / rows
        named["clip_ratio/region_mean"] = sums.seq_clipped / rows
    else:
        named["clip_ratio/low_mean"] = sums.low_clipped / denom
        named["clip_ratio/high_mean"] = sums.high_clipped / denom
        named["clip_ratio/region_mean"] = named["clip_ratio"]
    # per-sequence clip fractions (indicators at sequence level), their min / max over the sequences that have one;
    # NaN when none has, as TRL's nanmin / nanmax
    if seq:
        low_r, high_r = sums.row_low_clipped, sums.row_high_clipped
        has = torch.ones_like(low_r, dtype=torch.bool)
    else:
        n_row = sums.row_active
        low_r = sums.row_low_clipped / n_row.clamp(min=1.0)
        high_r = sums.row_high_clipped / n_row.clamp(min=1.0)
        has = n_row > 0
    inf, nan = valid.new_tensor(math.inf), valid.new_tensor(math.nan)
    lo = torch.where(has, low_r, inf).amin() if low_r.numel() else inf
    hi = torch.where(has, high_r, -inf).amax() if high_r.numel() else -inf
    named["clip_ratio/low_min"] = torch.where(torch.isinf(lo), nan, lo)
    named["clip_ratio/high_max"] = torch.where(torch.isinf(hi), nan, hi)
    if sums.entropy is not None:
        named["entropy"] = sums.entropy / denom
    if sums.kl is not None:
        named["kl"] = sums.kl / denom
    if sums.trust_masked is not None:
        named["trust_region/masked_fraction"] = sums.trust_masked / denom
    if sums.cppo_delta_b_sum is not None:
        named["cppo/delta_b_mean"] = sums.cppo_delta_b_sum / max(1, n_rows)
    if q is not None:  # a float, or (compiled) a float64 0-dim CPU tensor
        named["schedule_value"] = (
            q.to(device=valid.device, dtype=valid.dtype) if isinstance(q, torch.Tensor) else valid.new_tensor(q)
        )
    if coef is not None:
        named["delta/coef_std"] = _masked_std(coef, valid > 0)
    ordered = ([named["kl"]] if cfg.beta != 0.0 else []) + [named["clip_ratio"]]
    return LossMetrics(ordered, named)
