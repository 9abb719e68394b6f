"""Per-row scans and selections of the torch backend's token ops as PyTorch custom ops, on the padded layout
(``[R, M]`` rows plus a bool ``valid`` mask of the same shape; the packed layout is mapped onto it by
:mod:`rlvr_kernels.credit`).

- ``rlvr_kernels::row_rank_percentile``: ``rank / n`` per valid entry (``trajectory_percentile`` with ``values``);
- ``rlvr_kernels::row_topk_mask``: the ``k[r]`` valid entries of largest score (forking tokens, D^3S);
- ``rlvr_kernels::row_order_stats``: two order statistics per row (the quantile of CPPO's dynamic budget);
- ``rlvr_kernels::cppo_prefix_inside``: CPPO's exclusive prefix-budget scan.

Each op's implementation is the plain-torch reference (:mod:`rlvr_kernels.reference.credit`,
:mod:`rlvr_kernels.reference.cppo`) on every device, and the native kernels of ``csrc/token_rows.cpp`` (a sort or a
linear-time selection per row, or one sequential sweep, OpenMP over rows) registered for the CPU dispatch key once
built (:mod:`rlvr_kernels._native`); both give the same results bit for bit. These are not the public ops: those
take a ``backend`` argument and run the Triton kernels under the interpreter on CPU tensors when asked to; their torch
branches call the thin wrappers at the bottom of this module, which cast to the dtypes the ops take.
"""

from __future__ import annotations

import torch

from rlvr_kernels import _native
from rlvr_kernels.reference import cppo as ref_cppo
from rlvr_kernels.reference import credit as ref_credit

_NATIVE = "token_rows"

# The kernels index a row's entries with 32 bits (packed beside a 32-bit sort key); longer rows take the reference.
_MAX_ROW = 1 << 32


def _native_ok(x: torch.Tensor) -> bool:
    """On the first CPU call this builds and registers the kernels; True when they now serve the CPU key."""
    return x.device.type == "cpu" and _native.load(_NATIVE)


@torch.library.custom_op("rlvr_kernels::row_rank_percentile", mutates_args=())
def _rank_op(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``values [R, M]`` (float32, float64 or int64; anything at invalid entries), ``valid [R, M]`` bool -> fp32
    ``[R, M]``: ``rank / n`` with ``rank`` the 0-based ascending rank of the entry among the row's ``n`` valid ones
    (ties to the lower index), 0 on invalid entries."""
    if _native_ok(values):
        return torch.ops.rlvr_kernels.row_rank_percentile.default(values, valid)
    return ref_credit.rank_percentile(values, valid)


@_rank_op.register_fake
def _(values, valid):
    return values.new_empty(values.shape, dtype=torch.float32)


@torch.library.custom_op("rlvr_kernels::row_topk_mask", mutates_args=())
def _topk_op(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``scores [R, M]`` float32, ``valid [R, M]`` bool, ``k [R]`` int64 -> bool ``[R, M]``: per row the ``k[r]``
    (clamped to ``[0, n]``) valid entries with the largest score, ties to the lower index."""
    if _native_ok(scores):
        return torch.ops.rlvr_kernels.row_topk_mask.default(scores, valid, k)
    return ref_credit.topk_mask(scores, valid, k)


@_topk_op.register_fake
def _(scores, valid, k):
    return scores.new_empty(scores.shape, dtype=torch.bool)


@torch.library.custom_op("rlvr_kernels::row_order_stats", mutates_args=())
def _order_stats_op(
    values: torch.Tensor, valid: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``values [R, M]`` float32 (``M >= 1``), ``valid [R, M]`` bool, ``lo``, ``hi`` int64 ``[R]`` in ``[0, M)`` ->
    fp32 ``[R]`` each: the ``lo[r]``-th and ``hi[r]``-th valid values of the row in ascending order (``+inf`` past
    the valid count)."""
    if _native_ok(values):
        return torch.ops.rlvr_kernels.row_order_stats.default(values, valid, lo, hi)
    return ref_cppo.order_stats(values, valid, lo, hi)


@_order_stats_op.register_fake
def _(values, valid, lo, hi):
    R = values.shape[0]
    return values.new_empty(R), values.new_empty(R)


@torch.library.custom_op("rlvr_kernels::cppo_prefix_inside", mutates_args=())
def _prefix_op(Z: torch.Tensor, w: torch.Tensor, db: torch.Tensor, delta: float) -> torch.Tensor:
    """``Z``, ``w`` fp32 ``[R, M]`` (0 on invalid tokens), ``db`` fp32 ``[R]`` finite -> bool ``[R, M]``:
    ``Z_t <= min(delta, delta + sum_{j<t} (db w_j - Z_j))``."""
    if _native_ok(Z):
        return torch.ops.rlvr_kernels.cppo_prefix_inside.default(Z, w, db, delta)
    return ref_cppo.prefix_inside(Z, w, db, delta)


@_prefix_op.register_fake
def _(Z, w, db, delta):
    return Z.new_empty(Z.shape, dtype=torch.bool)


# ----------------------------------------------------------------------------------------------------------------------
# thin wrappers: the reference functions' signatures, cast to what the ops take
# ----------------------------------------------------------------------------------------------------------------------
def rank_percentile(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """:func:`rlvr_kernels.reference.credit.rank_percentile` through ``row_rank_percentile``. Values keep their
    order exactly: fp16/bf16 widen to fp32 (as the reference does) and integers to int64; uint64, which int64 cannot
    hold, and rows of 2**32+ entries take the reference."""
    if values.dtype == torch.uint64 or values.shape[1] >= _MAX_ROW:
        return ref_credit.rank_percentile(values, valid)
    if values.dtype.is_floating_point:
        v = values if values.dtype in (torch.float32, torch.float64) else values.float()
    else:
        v = values.to(torch.int64)
    return torch.ops.rlvr_kernels.row_rank_percentile(v.contiguous(), valid.contiguous())


def topk_mask(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """:func:`rlvr_kernels.reference.credit.topk_mask` through ``row_topk_mask`` (scores compared in fp32, as
    there)."""
    if scores.shape[1] >= _MAX_ROW:
        return ref_credit.topk_mask(scores, valid, k)
    return torch.ops.rlvr_kernels.row_topk_mask(
        scores.float().contiguous(), valid.contiguous(), k.to(torch.int64).contiguous()
    )


def order_stats(
    D: torch.Tensor, valid: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rlvr_kernels.reference.cppo.order_stats` through ``row_order_stats``."""
    if D.shape[1] >= _MAX_ROW:
        return ref_cppo.order_stats(D, valid, lo, hi)
    return torch.ops.rlvr_kernels.row_order_stats(
        D.float().contiguous(), valid.contiguous(), lo.to(torch.int64).contiguous(), hi.to(torch.int64).contiguous()
    )


def prefix_inside(Z: torch.Tensor, w: torch.Tensor, db: torch.Tensor, delta: float) -> torch.Tensor:
    """:func:`rlvr_kernels.reference.cppo.prefix_inside` through ``cppo_prefix_inside``."""
    return torch.ops.rlvr_kernels.cppo_prefix_inside(
        Z.float().contiguous(), w.float().contiguous(), db.float().contiguous(), float(delta)
    )
