"""Triton kernels of the token-level credit ops, and their launch helpers.

All kernels see the same "rows" view of either layout: flat contiguous tensors, and per row an int64 ``start`` and
``span`` (padded ``[B, T]``: ``start = b T``, ``span = T``; packed: ``start = cu_seqlens[b]``, ``span`` = its length),
with a flat int8 ``valid`` mask. One program handles one row at a time, looping over blocks of ``BLOCK`` tokens (rows
of any length) and over rows (grid ``min(rows, 65535)``). Offsets are int64. Per-row integers that need float64
arithmetic (TP cut-offs) are computed by the caller and passed in.

The top-k selections (forking tokens, D^3S) use :mod:`rlvr_kernels.kernels.select`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlvr_kernels._backend import max_grid
from rlvr_kernels.kernels.select import segmented_topk_mask

__all__ = [
    "DEFAULT_BLOCK",
    "position_percentile",
    "range_mask",
    "token_advantage_op",
    "topk_mask",
    "OP_ENTROPY_SHAPED",
    "OP_D3S_SCORE",
]

DEFAULT_BLOCK = 1024
DEFAULT_SELECT_BLOCK = 256

OP_ENTROPY_SHAPED = 0
OP_D3S_SCORE = 1


@triton.jit
def _position_percentile_kernel(Valid, Lengths, Starts, Spans, Out, S, BLOCK: tl.constexpr):
    for s in range(tl.program_id(0), S, tl.num_programs(0)):
        start = tl.load(Starts + s).to(tl.int64)
        span = tl.load(Spans + s).to(tl.int64)
        L = tl.maximum(tl.load(Lengths + s), 1).to(tl.float32)
        for j0 in range(0, span, BLOCK):
            offs = j0 + tl.arange(0, BLOCK)
            inb = offs < span
            ok = tl.load(Valid + start + offs, mask=inb, other=0) != 0
            out = tl.where(ok, tl.div_rn(offs.to(tl.float32), L), 0.0)  # IEEE t / L (`/` is div.full.f32 on GPU)
            tl.store(Out + start + offs, out, mask=inb)


@triton.jit
def _range_mask_kernel(Valid, Lo, Hi, Starts, Spans, Out, S, BLOCK: tl.constexpr):
    for s in range(tl.program_id(0), S, tl.num_programs(0)):
        start = tl.load(Starts + s).to(tl.int64)
        span = tl.load(Spans + s).to(tl.int64)
        lo = tl.load(Lo + s).to(tl.int64)
        hi = tl.load(Hi + s).to(tl.int64)
        for j0 in range(0, span, BLOCK):
            offs = j0 + tl.arange(0, BLOCK)
            inb = offs < span
            ok = tl.load(Valid + start + offs, mask=inb, other=0) != 0
            keep = ok & (offs >= lo) & (offs < hi)
            tl.store(Out + start + offs, keep.to(tl.int8), mask=inb)


@triton.jit
def _token_advantage_kernel(
    A,
    H,
    Valid,
    Starts,
    Spans,
    Out,
    S,
    scale,
    alpha,
    kappa,
    A_PER_TOKEN: tl.constexpr,
    OP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    for s in range(tl.program_id(0), S, tl.num_programs(0)):
        start = tl.load(Starts + s).to(tl.int64)
        span = tl.load(Spans + s).to(tl.int64)
        if not A_PER_TOKEN:
            a_row = tl.load(A + s).to(tl.float32)
        for j0 in range(0, span, BLOCK):
            offs = j0 + tl.arange(0, BLOCK)
            inb = offs < span
            ok = tl.load(Valid + start + offs, mask=inb, other=0) != 0
            h = tl.load(H + start + offs, mask=ok, other=0.0).to(tl.float32)
            if A_PER_TOKEN:
                a = tl.load(A + start + offs, mask=ok, other=0.0).to(tl.float32)
            else:
                a = tl.zeros([BLOCK], dtype=tl.float32) + a_row
            if OP == 0:  # entropy-shaped advantage
                val = a + scale * tl.minimum(alpha * h, tl.div_rn(tl.abs(a), kappa))
            else:  # D^3S score
                val = tl.abs(a) * h
            tl.store(Out + start + offs, tl.where(ok, val, 0.0), mask=inb)


def _grid(S: int):
    return (max(1, min(S, max_grid())),)


# Compiled like the interpreter computes them (and like the torch reference, op by op): no FMA contraction of
# ``a + scale * m``, and IEEE division (tl.div_rn) instead of ``/`` (div.full.f32, 2 ulp, on NVIDIA GPUs). Triton 3.9
# contracts by default (3.10 will not); these kernels are memory-bound, so pinning it costs nothing.
_EXACT = dict(enable_fp_fusion=False)


def _i64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64).contiguous()


def position_percentile(valid8, lengths, starts, spans, *, block=None) -> torch.Tensor:
    """``t / L`` per token (fp32, 0 on invalid) for the rows view; ``valid8`` flat int8."""
    out = torch.zeros(valid8.numel(), dtype=torch.float32, device=valid8.device)
    S = starts.numel()
    if S and valid8.numel():
        _position_percentile_kernel[_grid(S)](
            valid8, _i64(lengths), _i64(starts), _i64(spans), out, S, BLOCK=block or DEFAULT_BLOCK, **_EXACT
        )
    return out


def range_mask(valid8, lo, hi, starts, spans, *, block=None) -> torch.Tensor:
    """Bool flat mask ``valid & lo[row] <= t < hi[row]``."""
    out = torch.zeros(valid8.numel(), dtype=torch.int8, device=valid8.device)
    S = starts.numel()
    if S and valid8.numel():
        _range_mask_kernel[_grid(S)](
            valid8, _i64(lo), _i64(hi), _i64(starts), _i64(spans), out, S, BLOCK=block or DEFAULT_BLOCK
        )
    return out.view(torch.bool)


def token_advantage_op(
    adv, entropy, valid8, starts, spans, *, per_token, op, scale=1.0, alpha=1.0, kappa=1.0, block=None
):
    """Per-token fp32 output of ``op`` (entropy-shaped advantage or D^3S score), 0 on invalid tokens.

    ``adv`` is flat per token (``per_token=True``, same size as ``entropy``) or one value per row.
    """
    ent = entropy.contiguous().reshape(-1)
    a = adv.contiguous().reshape(-1)
    out = torch.zeros(ent.numel(), dtype=torch.float32, device=ent.device)
    S = starts.numel()
    if S and ent.numel():
        _token_advantage_kernel[_grid(S)](
            a,
            ent,
            valid8,
            _i64(starts),
            _i64(spans),
            out,
            S,
            float(scale),
            float(alpha),
            float(kappa),
            A_PER_TOKEN=bool(per_token),
            OP=op,
            BLOCK=block or DEFAULT_BLOCK,
            **_EXACT,
        )
    return out


def topk_mask(scores, valid8, starts, spans, k, *, block=None) -> torch.Tensor:
    """Bool flat mask of the top ``k[row]`` valid tokens per row (ties to the lower index)."""
    return segmented_topk_mask(scores, starts, spans, k, valid=valid8, block=block or DEFAULT_SELECT_BLOCK)
