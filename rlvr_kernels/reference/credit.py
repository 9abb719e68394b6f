"""Plain-torch reference of the token-level credit ops (the CPU path, and the oracle of the Triton kernels).

Every function takes the PADDED layout: ``[B, T]`` tensors and a bool ``valid`` mask of the same shape (inputs are
already validated by :mod:`rlvr_kernels.credit`, which also maps the packed layout onto this one). The per-row
integer quantities that the Triton path also needs (cut-offs, budgets) are computed here once, in float64, and shared
by both backends, so there is a single copy of the math.

Conventions: positions are 0-based within the row; ``L`` = last valid index + 1 (:func:`row_lengths`), ``n`` = number
of valid tokens (:func:`valid_counts`); both are equal for right-padded rows. Outputs are fp32 or bool.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlvr_kernels.layout import row_lengths

__all__ = [
    "row_lengths",
    "valid_counts",
    "tp_bounds",
    "range_mask",
    "position_percentile",
    "rank_percentile",
    "topk_budget",
    "topk_mask",
    "tp_schedule_mask",
    "forking_token_mask",
    "entropy_shaped_advantages",
    "d3s_scores",
    "d3s_token_mask",
]


def valid_counts(valid: torch.Tensor) -> torch.Tensor:
    """Number of valid tokens per row, int64 ``[B]``."""
    return valid.sum(dim=1, dtype=torch.int64)


def tp_bounds(lengths: torch.Tensor, q: float, *, reverse: bool = False):
    """TP-Schedule's targeted range ``[lo, hi)`` per row (int64 ``[B]`` each), computed in float64.

    Late-first (default; ``docs/methods/tp-schedule.md``, section "The cut-off mask"): ``b = min(floor(L q), L - 1)``,
    range ``[b, L)``; at least the last token stays active. Reverse (experimental; same page, section "Choices where
    the paper leaves room", item 6): ``e = max(ceil(L (1 - q)), 1)``, range ``[0, e)``; at least the first token stays
    active. Rows with ``L = 0`` get an empty range.
    """
    L = lengths.to(torch.int64)
    Ld = L.to(torch.float64)
    if not reverse:
        b = torch.floor(Ld * q).to(torch.int64)
        b = torch.minimum(b, L - 1).clamp_min(0)
        return b, L.clone()
    e = torch.ceil(Ld * (1.0 - q)).to(torch.int64)
    e = torch.minimum(e.clamp_min(1), L)
    return torch.zeros_like(L), e


def range_mask(valid: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``valid & (lo[b] <= t < hi[b])`` as a bool ``[B, T]``."""
    pos = torch.arange(valid.shape[1], device=valid.device)[None, :]
    return valid & (pos >= lo[:, None]) & (pos < hi[:, None])


def tp_schedule_mask(valid: torch.Tensor, q: float, *, reverse: bool = False) -> torch.Tensor:
    lo, hi = tp_bounds(row_lengths(valid), q, reverse=reverse)
    return range_mask(valid, lo, hi)


def position_percentile(valid: torch.Tensor) -> torch.Tensor:
    """``t / L`` (fp32) on valid tokens, 0 elsewhere."""
    L = row_lengths(valid).clamp_min(1).to(torch.float32)
    pos = torch.arange(valid.shape[1], device=valid.device, dtype=torch.float32)[None, :]
    return torch.where(valid, pos / L[:, None], torch.zeros((), dtype=torch.float32, device=valid.device))


def _stable_order(values: torch.Tensor, valid: torch.Tensor, *, descending: bool) -> torch.Tensor:
    """Per-row permutation: valid entries first, sorted by value (ties by lower index), then the invalid ones."""
    order = torch.sort(values, dim=1, descending=descending, stable=True).indices
    invalid_sorted = (~valid).gather(1, order).to(torch.int8)
    regroup = torch.sort(invalid_sorted, dim=1, stable=True).indices
    return order.gather(1, regroup)


def _ranks(values: torch.Tensor, valid: torch.Tensor, *, descending: bool) -> torch.Tensor:
    order = _stable_order(values, valid, descending=descending)
    ranks = torch.empty_like(order)
    ar = torch.arange(values.shape[1], device=values.device).expand_as(order)
    ranks.scatter_(1, order, ar)
    return ranks


def rank_percentile(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``rank / n`` (fp32) on valid tokens, 0 elsewhere.

    ``rank`` is the 0-based ascending rank of the token's value among the row's valid tokens, ties broken by lower
    index (the earlier token gets the lower rank); ``n`` the row's valid count. Values in ``[0, (n - 1) / n]``.
    The values are compared in their own dtype (fp16/bf16 widened to fp32, exactly): a cast of float64 or int64 to
    fp32 would tie values that differ (1e300 and 2e300, 2**24 and 2**24 + 1).
    """
    if values.shape[1] == 0:
        return torch.zeros(values.shape, dtype=torch.float32, device=values.device)
    if values.dtype.is_floating_point and values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    ranks = _ranks(values, valid, descending=False)
    n = valid_counts(valid).clamp_min(1).to(torch.float32)
    return torch.where(valid, ranks.to(torch.float32) / n[:, None], torch.zeros((), device=values.device))


def topk_budget(n: torch.Tensor, rho: float) -> torch.Tensor:
    """``ceil(n rho)`` in float64, as int64 in ``[0, n]`` (the forking / D^3S budget)."""
    k = torch.ceil(n.to(torch.float64) * rho).to(torch.int64)
    return torch.minimum(k.clamp_min(0), n.to(torch.int64))


def topk_mask(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row, the ``k[r]`` valid entries with the largest score, ties to the lower index (bool ``[R, M]``)."""
    if scores.shape[1] == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    ranks = _ranks(scores.float(), valid, descending=True)
    return valid & (ranks < k[:, None])


#: ``topk(scores, valid, k) -> bool mask``: :func:`topk_mask`, or a native kernel with its exact results.
TopK = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def forking_token_mask(
    entropy: torch.Tensor, valid: torch.Tensor, rho: float, *, topk: TopK = topk_mask
) -> torch.Tensor:
    """Forking tokens: per row the top ``ceil(n rho)`` valid tokens by entropy, ties to the lower index (selected by
    ``topk``)."""
    return topk(entropy, valid, topk_budget(valid_counts(valid), rho))


def entropy_shaped_advantages(advantages, entropy, valid, scale: float, alpha: float, kappa: float) -> torch.Tensor:
    """``(A + scale * min(alpha H, |A| / kappa))`` on valid tokens, 0 elsewhere (fp32 ``[B, T]``).

    ``advantages`` is ``[B]`` (broadcast over the row) or ``[B, T]``.
    """
    A = advantages.float()
    if A.dim() == 1:
        A = A[:, None]
    H = entropy.float()
    bonus = scale * torch.minimum(alpha * H, A.abs() / kappa)
    out = torch.where(valid, A + bonus, torch.zeros((), device=H.device))
    return out.expand(valid.shape).contiguous()


def d3s_scores(advantages, entropy, valid) -> torch.Tensor:
    """D^3S token score ``|A| H`` (fp32) on valid tokens, 0 elsewhere."""
    A = advantages.float()
    if A.dim() == 1:
        A = A[:, None]
    score = A.abs() * entropy.float()
    return torch.where(valid, score, torch.zeros((), device=score.device)).expand(valid.shape).contiguous()


def d3s_token_mask(
    advantages, entropy, valid, rho: float, *, scope: str = "batch", topk: TopK = topk_mask
) -> torch.Tensor:
    """Keep the top ``ceil(n rho)`` valid tokens by ``|A| H`` over the batch (flat row-major order breaks ties, lower
    first) or per row (``scope="sequence"``), selected by ``topk``."""
    scores = d3s_scores(advantages, entropy, valid)
    if scope == "sequence":
        return topk(scores, valid, topk_budget(valid_counts(valid), rho))
    flat_valid = valid.reshape(1, -1)
    k = topk_budget(flat_valid.sum(dim=1, dtype=torch.int64), rho)
    return topk(scores.reshape(1, -1), flat_valid, k).reshape(valid.shape)
