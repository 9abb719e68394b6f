"""Segmented k-th-largest selection (radix select on the fp32 bit pattern) and its launch helpers.

Contract (stable; other token ops import it)
--------------------------------------------
Data: a flat contiguous fp32 tensor ``x`` split into ``S`` segments; segment ``s`` is
``x[starts[s] : starts[s] + lengths[s]]`` (int64 offsets, segments may be empty, may not overlap when a mask is
written). An optional flat ``valid`` tensor (int8/uint8/bool viewed as int8, same size as ``x``) marks the elements
that take part; the others are ignored. ``k[s]`` is the number of largest valid elements wanted in segment ``s``; it
is clamped to ``[0, n_valid[s]]`` inside the kernel.

Order: the total order of the fp32 bit patterns mapped to ordered integer keys (see :func:`ordered_key`), i.e. the
usual numeric order with ``-0.0`` folded onto ``+0.0`` and ``-inf < finite < +inf``. NaN is not a number to rank:
callers must reject or drop it (a NaN sorts above ``+inf`` or below ``-inf`` depending on its sign bit).

Results per segment (:func:`segmented_kth_largest`):
- ``value``: the k-th largest valid element (fp32), ``+inf`` when ``k == 0`` (nothing selected) and ``-inf`` when the
  segment has no valid element;
- ``n_greater``: how many valid elements are strictly greater than ``value`` (``n_greater < k <= n_greater + n_equal``);
- ``n_take``: how many elements equal to ``value`` the top-k set takes, ``k - n_greater`` (0 when ``k == 0``).
The k largest valid elements with ties broken towards the LOWER index are therefore: every element greater than
``value``, plus the first ``n_take`` elements equal to ``value`` in index order. :func:`segmented_topk_mask` writes
exactly that set as a mask (one program per segment: select, then one blocked pass with a prefix count of ties).

Quantiles: the k-th SMALLEST valid element is the ``(n_valid - k + 1)``-th largest; a per-row quantile of a rank
definition of your choice maps onto this by choosing ``k``.

Device side: :func:`row_kth_largest_key` is a ``@triton.jit`` helper that other kernels may call inside their own
per-row loop; it returns ``(key, n_take, n_greater, n_valid)`` where ``key`` is the int64 ordered key of the k-th
largest element (compare keys, not floats, to select; :func:`key_to_float` decodes one).

Cost: 8 radix passes of 4 bits over the segment (each pass reads the segment once and builds a 16-bin histogram of the
elements still in the candidate bucket), then one pass to write the mask: O(9 L) reads per segment, O(BLOCK)
registers, no sort and no O(L^2) work, so rows of any length (64k+ tokens) work. Grid: ``min(S, 65535)`` programs
that loop over segments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlvr_kernels._backend import max_grid

__all__ = [
    "ordered_key",
    "key_to_float",
    "row_kth_largest_key",
    "segmented_kth_largest",
    "segmented_topk_mask",
    "DEFAULT_BLOCK",
]

DEFAULT_BLOCK = 1024
# The radix pass builds a [BLOCK, 16] histogram tile in registers: above 1024 it spills on sm_90 (4096: 255 registers
# + 232 B of stack; 8192: 7 KB of stack and a 3-minute compile). The result does not depend on BLOCK, so larger
# requests are clamped.
MAX_BLOCK = 1024

# int64 keys lie in [0, 2**32); this one is above all of them ("select nothing").
_KEY_NONE = 1 << 32


@triton.jit
def ordered_key(x):
    """fp32 -> int64 key in ``[0, 2**32)`` whose integer order is the float order (``-0.0`` mapped to ``+0.0``)."""
    x = tl.where(x == 0.0, 0.0, x.to(tl.float32))
    bits = x.to(tl.int32, bitcast=True)
    signed = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return signed.to(tl.int64) + 2147483648


@triton.jit
def key_to_float(key):
    """Inverse of :func:`ordered_key` for keys in ``[0, 2**32)``."""
    signed = (key - 2147483648).to(tl.int32)
    bits = tl.where(signed >= 0, signed, signed ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_keys(X, Valid, start, length, j0, HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):
    offs = j0 + tl.arange(0, BLOCK)
    inb = offs < length
    ptr = start + offs.to(tl.int64)
    x = tl.load(X + ptr, mask=inb, other=0.0)
    ok = inb
    if HAS_VALID:
        v = tl.load(Valid + ptr, mask=inb, other=0)
        ok = ok & (v != 0)
    key = tl.where(ok, ordered_key(x), -1)
    return key, ok


@triton.jit
def row_kth_largest_key(X, Valid, start, length, k, HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):
    """k-th largest valid element of ``X[start : start + length]`` (see the module contract).

    ``start`` must be int64. Returns ``(key, n_take, n_greater, n_valid)``: ``key`` is the ordered key of the k-th
    largest element (``2**32`` when the clamped k is 0, so that no key is ``>=`` it), ``n_take`` how many elements with
    that key belong to the top-k (lowest indices first), ``n_greater`` how many keys are strictly greater.
    """
    bins = tl.arange(0, 16)
    k_rem = k.to(tl.int32)
    k_eff = k_rem
    n_valid = k_rem * 0
    prefix = start * 0  # int64 zero
    for p in tl.static_range(8):
        shift = 28 - 4 * p
        counts = tl.zeros([16], dtype=tl.int32)
        for j0 in range(0, length, BLOCK):
            key, ok = _load_keys(X, Valid, start, length, j0, HAS_VALID, BLOCK)
            match = ok & ((key >> (shift + 4)) == (prefix >> (shift + 4)))
            digit = ((key >> shift) & 15).to(tl.int32)
            hit = match[:, None] & (digit[:, None] == bins[None, :])
            counts += tl.sum(hit.to(tl.int32), axis=0)
        if p == 0:
            n_valid = tl.sum(counts, axis=0)
            k_rem = tl.maximum(tl.minimum(k_rem, n_valid), 0)
            k_eff = k_rem
        # suffix[d] = number of candidates whose digit is >= d (non-increasing in d)
        suffix = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
        d_sel = tl.sum((suffix >= k_rem).to(tl.int32), axis=0) - 1
        above = tl.sum(tl.where(bins > d_sel, counts, 0), axis=0)
        k_rem = k_rem - above
        prefix = prefix + (d_sel.to(tl.int64) << shift)
    none = k_eff <= 0
    key = tl.where(none, 4294967296, prefix)
    n_take = tl.where(none, 0, k_rem)
    n_greater = tl.where(none, 0, k_eff - k_rem)
    return key, n_take, n_greater, n_valid


@triton.jit
def _segmented_kth_kernel(
    X,
    Valid,
    Starts,
    Lengths,
    K,
    OutVal,
    OutGreater,
    OutTake,
    S,
    HAS_VALID: tl.constexpr,
    BLOCK: tl.constexpr,
):
    for s in range(tl.program_id(0), S, tl.num_programs(0)):
        start = tl.load(Starts + s).to(tl.int64)
        length = tl.load(Lengths + s).to(tl.int64)
        k = tl.load(K + s)
        key, n_take, n_greater, n_valid = row_kth_largest_key(X, Valid, start, length, k, HAS_VALID, BLOCK)
        val = key_to_float(tl.minimum(key, 4294967295))
        val = tl.where(key > 4294967295, float("inf"), val)
        val = tl.where(n_valid == 0, float("-inf"), val)
        tl.store(OutVal + s, val)
        tl.store(OutGreater + s, n_greater.to(tl.int64))
        tl.store(OutTake + s, n_take.to(tl.int64))


@triton.jit
def _segmented_topk_mask_kernel(
    X,
    Valid,
    Starts,
    Lengths,
    K,
    Out,
    S,
    HAS_VALID: tl.constexpr,
    BLOCK: tl.constexpr,
):
    for s in range(tl.program_id(0), S, tl.num_programs(0)):
        start = tl.load(Starts + s).to(tl.int64)
        length = tl.load(Lengths + s).to(tl.int64)
        k = tl.load(K + s)
        thr, n_take, n_greater, n_valid = row_kth_largest_key(X, Valid, start, length, k, HAS_VALID, BLOCK)
        seen = n_take * 0
        for j0 in range(0, length, BLOCK):
            key, ok = _load_keys(X, Valid, start, length, j0, HAS_VALID, BLOCK)
            eq = ok & (key == thr)
            rank = seen + tl.cumsum(eq.to(tl.int32), axis=0)  # 1-based rank among ties, in index order
            keep = ok & ((key > thr) | (eq & (rank <= n_take)))
            seen += tl.sum(eq.to(tl.int32), axis=0)
            offs = j0 + tl.arange(0, BLOCK)
            tl.store(Out + start + offs.to(tl.int64), keep.to(tl.int8), mask=offs < length)


def _prepare(x, starts, lengths, k, valid):
    if x.dtype != torch.float32:
        x = x.float()
    x = x.contiguous().reshape(-1)
    starts = starts.to(device=x.device, dtype=torch.int64).contiguous()
    lengths = lengths.to(device=x.device, dtype=torch.int64).contiguous()
    k = k.to(device=x.device, dtype=torch.int64).contiguous()
    if valid is not None:
        valid = valid.contiguous().reshape(-1)
        valid = valid.view(torch.int8) if valid.dtype in (torch.bool, torch.uint8) else (valid != 0).view(torch.int8)
    return x, starts, lengths, k, valid


def _grid(S: int):
    return (max(1, min(S, max_grid())),)


def _block(block: int) -> int:
    return min(int(block), MAX_BLOCK)


def segmented_kth_largest(x, starts, lengths, k, *, valid=None, block: int = DEFAULT_BLOCK):
    """Per segment: ``(value fp32 [S], n_greater int64 [S], n_take int64 [S])``; see the module contract.

    ``x`` any float tensor (read as fp32, flattened); ``starts``, ``lengths``, ``k`` integer ``[S]``; ``valid``
    optional flat mask. No argument checking beyond dtype/contiguity (callers validate).
    """
    x, starts, lengths, k, valid = _prepare(x, starts, lengths, k, valid)
    S = starts.numel()
    val = torch.empty(S, dtype=torch.float32, device=x.device)
    n_greater = torch.empty(S, dtype=torch.int64, device=x.device)
    n_take = torch.empty(S, dtype=torch.int64, device=x.device)
    if S == 0:
        return val, n_greater, n_take
    _segmented_kth_kernel[_grid(S)](
        x,
        valid if valid is not None else x,
        starts,
        lengths,
        k,
        val,
        n_greater,
        n_take,
        S,
        HAS_VALID=valid is not None,
        BLOCK=_block(block),
    )
    return val, n_greater, n_take


def segmented_topk_mask(x, starts, lengths, k, *, valid=None, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Bool mask (shape of the flattened ``x``) of the top-``k[s]`` valid elements of every segment.

    Ties go to the lower index; positions outside every segment, and invalid positions, are False.
    """
    x, starts, lengths, k, valid = _prepare(x, starts, lengths, k, valid)
    S = starts.numel()
    out = torch.zeros(x.numel(), dtype=torch.int8, device=x.device)
    if S > 0 and x.numel() > 0:
        _segmented_topk_mask_kernel[_grid(S)](
            x,
            valid if valid is not None else x,
            starts,
            lengths,
            k,
            out,
            S,
            HAS_VALID=valid is not None,
            BLOCK=_block(block),
        )
    return out.view(torch.bool)
