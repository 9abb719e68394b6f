"""Whole rows from sequence-split ones: gather ``[B, T_r, ...]`` column blocks over a sequence-parallel group.

Under Ulysses / context parallelism rank ``r`` of the group holds the columns ``[c_r, c_r + T_r)`` of every row
(the ranks in rank order, ``T_r`` may differ). :func:`gather_columns` gives every rank the whole ``[B, T, ...]``
rows (one all-gather of the column widths, once, then one all-gather per tensor, padded to the widest block); its
autograd backward hands each rank the gradient of its own columns (no reduction: every rank computes the same
function of the same whole rows, so the gradient of that function with respect to its own columns is exact).
"""

from __future__ import annotations

import torch

from rlvr_kernels.parallel.collectives import all_gather


def column_widths(width: int, group, device: torch.device) -> list[int]:
    """Every rank's number of columns ``T_r``, in rank order (one small all-gather)."""
    w = all_gather(torch.tensor([width], dtype=torch.int64, device=device), group)
    return [int(v) for v in w.view(-1).tolist()]


def whole_rows(x: torch.Tensor, group, widths: list[int]) -> torch.Tensor:
    """``x [B, T_r, ...]`` -> the whole rows ``[B, sum(widths), ...]`` (no autograd; bool travels as uint8): one
    all-gather of ``[W, B, max T_r, ...]``, O(tokens of the row) traffic."""
    if x.dtype == torch.bool:  # not every backend reduces / gathers bool
        return whole_rows(x.to(torch.uint8), group, widths).bool()
    b = x.shape[0]
    t_max = max(widths)
    rest = tuple(x.shape[2:])
    padded = x.new_zeros((b, t_max) + rest)
    padded[:, : x.shape[1]] = x
    allr = all_gather(padded, group)
    return torch.cat([allr[r, :, : widths[r]] for r in range(len(widths))], dim=1)


class _GatherColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, widths, offset):
        ctx.cols = (offset, offset + x.shape[1])
        return whole_rows(x, group, widths)

    @staticmethod
    def backward(ctx, g):
        c0, c1 = ctx.cols
        return g[:, c0:c1], None, None, None


def gather_columns(x: torch.Tensor | None, group, widths: list[int], rank: int) -> torch.Tensor | None:
    """``x [B, T_r, ...]`` (this rank's columns) -> ``[B, sum(widths), ...]`` on every rank; differentiable (the
    backward keeps this rank's columns of the gradient). ``[B]`` / ``[B, 1]`` per-row tensors and None pass through.
    """
    if x is None or x.dim() < 2 or (x.shape[1] == 1 and widths[rank] != 1):
        return x
    if x.shape[1] != widths[rank]:
        raise ValueError(f"a per-token tensor has {x.shape[1]} columns on this rank, expected {widths[rank]}")
    offset = sum(widths[:rank])
    if x.requires_grad:
        return _GatherColumns.apply(x, group, widths, offset)
    return whole_rows(x, group, widths)
