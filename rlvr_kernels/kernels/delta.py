"""Triton sweeps over the hidden states for the DelTA coefficients, and their launchers (``docs/methods/delta.md``,
section "How the package computes it").

Both read ``h [N, H]`` (fp32 / bf16 / fp16 / fp64, last dim contiguous, any row stride) once, accumulate in fp32,
skip rows whose int8 ``valid`` flag is 0 (their contents, NaN included, never reach the result), handle any ``H``
through masked column blocks, and use int64 row offsets:

- ``rowdot3``: per row ``h.mu[0]``, ``h.mu[1]`` (and ``||h||^2`` when ``NORM``): one program per block of
  ``BLOCK_N`` rows, looping over column blocks; grid-stride over row blocks (grid <= 65535).
- ``colsum2``: ``h^T [w0, w1]`` as a split-N reduction: program ``(col block, split)`` sums its contiguous range of
  rows into a fp32 partial ``[splits, 2, H]``; the second stage is a fixed-order sum over ``splits`` (deterministic,
  no atomics). Both grid dimensions <= 65535 (programs grid-stride over column blocks).

Elementwise multiply-accumulate into 2-D fp32 tiles, reduced once per program, rather than ``tl.dot``: the sweeps are
memory-bound ([H, 2] operands would waste tensor cores), and this sidesteps the interpreter's low-precision ``tl.dot``
trap. Tiles compile for sm_90 without register spills (checked with the bundled ptxas: 72-96 registers per thread).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlvr_kernels._backend import max_grid, triton_interpreting

__all__ = ["rowdot3", "colsum2"]

# Tiles: 2-D fp32 accumulators (one reduction at the end of a program, not one per tile); untuned on GPU so far.
ROWDOT_BLOCK_N = 16
ROWDOT_BLOCK_H = 128
COLSUM_BLOCK_N = 16
COLSUM_BLOCK_H = 128


@triton.jit
def _rowdot3_kernel(
    Hp,
    Mu,
    Valid,
    Out,
    N,
    Hdim,
    stride_row,
    n_row_blocks,
    NORM: tl.constexpr,
    NOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    for rb in range(tl.program_id(0), n_row_blocks, tl.num_programs(0)):
        rows = tl.arange(0, BLOCK_N).to(tl.int64) + rb * BLOCK_N
        rmask = rows < N
        ok = rmask & (tl.load(Valid + rows, mask=rmask, other=0) != 0)
        acc0 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
        for c0 in range(0, Hdim, BLOCK_H):
            cols = c0 + tl.arange(0, BLOCK_H)
            cmask = cols < Hdim
            h = tl.load(
                Hp + rows[:, None] * stride_row + cols[None, :], mask=ok[:, None] & cmask[None, :], other=0.0
            ).to(tl.float32)
            m0 = tl.load(Mu + cols, mask=cmask, other=0.0)
            m1 = tl.load(Mu + Hdim + cols, mask=cmask, other=0.0)
            acc0 += h * m0[None, :]
            acc1 += h * m1[None, :]
            if NORM:
                acc2 += h * h
        tl.store(Out + rows * NOUT, tl.sum(acc0, axis=1), mask=rmask)
        tl.store(Out + rows * NOUT + 1, tl.sum(acc1, axis=1), mask=rmask)
        if NORM:
            tl.store(Out + rows * NOUT + 2, tl.sum(acc2, axis=1), mask=rmask)


@triton.jit
def _colsum2_kernel(
    Hp, W, Valid, Part, N, Hdim, stride_row, rows_per_split, n_col_blocks, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr
):
    split = tl.program_id(1).to(tl.int64)
    row_lo = split * rows_per_split
    row_hi = tl.minimum(row_lo + rows_per_split, N)
    for cb in range(tl.program_id(0), n_col_blocks, tl.num_programs(0)):
        cols = cb * BLOCK_H + tl.arange(0, BLOCK_H)
        cmask = cols < Hdim
        acc0 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
        for r0 in range(row_lo, row_hi, BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N).to(tl.int64)
            rmask = rows < row_hi
            ok = rmask & (tl.load(Valid + rows, mask=rmask, other=0) != 0)
            w0 = tl.load(W + rows * 2, mask=ok, other=0.0)
            w1 = tl.load(W + rows * 2 + 1, mask=ok, other=0.0)
            h = tl.load(
                Hp + rows[:, None] * stride_row + cols[None, :], mask=ok[:, None] & cmask[None, :], other=0.0
            ).to(tl.float32)
            acc0 += h * w0[:, None]
            acc1 += h * w1[:, None]
        base = split * 2 * Hdim
        tl.store(Part + base + cols, tl.sum(acc0, axis=0), mask=cmask)
        tl.store(Part + base + Hdim + cols, tl.sum(acc1, axis=0), mask=cmask)


def _prep(h: torch.Tensor, valid: torch.Tensor):
    if h.dim() != 2:
        raise ValueError(f"h must be [N, H], got shape {tuple(h.shape)}")
    if h.shape[1] > 1 and h.stride(1) != 1:
        h = h.contiguous()
    v8 = valid.to(torch.bool).contiguous().view(torch.int8)
    return h, v8


def _row_stride(h: torch.Tensor) -> int:
    return h.stride(0) if h.shape[0] > 1 else h.shape[1]


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4 if triton_interpreting() else 64


def rowdot3(
    h: torch.Tensor,
    mu: torch.Tensor,
    valid: torch.Tensor,
    *,
    with_norm: bool = False,
    block_n: int | None = None,
    block_h: int | None = None,
) -> torch.Tensor:
    """``[h.mu[0], h.mu[1](, ||h||^2)]`` per row: fp32 ``[N, 2]`` (``[N, 3]`` with ``with_norm``), 0 on invalid rows.

    ``h [N, H]`` (last dim contiguous), ``mu [2, H]`` (cast to contiguous fp32), ``valid [N]`` bool.
    ``block_n`` / ``block_h`` (powers of two) override the tile (tests use small ones).
    """
    h, v8 = _prep(h, valid)
    N, H = h.shape
    nout = 3 if with_norm else 2
    out = torch.zeros(N, nout, dtype=torch.float32, device=h.device)
    if N == 0 or H == 0:
        return out
    mu = mu.to(device=h.device, dtype=torch.float32).contiguous()
    bn = block_n or ROWDOT_BLOCK_N
    bh = block_h or min(ROWDOT_BLOCK_H, triton.next_power_of_2(H))
    n_rb = triton.cdiv(N, bn)
    _rowdot3_kernel[(min(n_rb, max_grid()),)](
        h,
        mu,
        v8,
        out,
        N,
        H,
        _row_stride(h),
        n_rb,
        NORM=bool(with_norm),
        NOUT=nout,
        BLOCK_N=bn,
        BLOCK_H=bh,
    )
    return out


def colsum2(
    h: torch.Tensor,
    w: torch.Tensor,
    valid: torch.Tensor,
    *,
    splits: int | None = None,
    block_n: int | None = None,
    block_h: int | None = None,
) -> torch.Tensor:
    """``h^T w`` over the valid rows: fp32 ``[2, H]``. ``w [N, 2]`` (cast to contiguous fp32).

    ``splits`` (default: enough programs to fill the device) is the number of row ranges of the first stage.
    """
    h, v8 = _prep(h, valid)
    N, H = h.shape
    if N == 0 or H == 0:
        return torch.zeros(2, H, dtype=torch.float32, device=h.device)
    w = w.to(device=h.device, dtype=torch.float32).contiguous()
    bn = block_n or COLSUM_BLOCK_N
    bh = block_h or min(COLSUM_BLOCK_H, triton.next_power_of_2(H))
    n_cb = triton.cdiv(H, bh)
    n_rblocks = triton.cdiv(N, bn)
    if splits is None:
        splits = max(1, _target_programs(h.device) // n_cb)
    splits = max(1, min(int(splits), n_rblocks, max_grid()))
    rows_per_split = triton.cdiv(n_rblocks, splits) * bn
    splits = triton.cdiv(N, rows_per_split)
    part = torch.empty(splits, 2, H, dtype=torch.float32, device=h.device)
    _colsum2_kernel[(min(n_cb, max_grid()), splits)](
        h,
        w,
        v8,
        part,
        N,
        H,
        _row_stride(h),
        rows_per_split,
        n_cb,
        BLOCK_N=bn,
        BLOCK_H=bh,
    )
    return part.sum(0) if splits > 1 else part[0]
