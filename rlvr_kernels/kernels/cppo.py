"""Triton kernel of the CPPO token mask (arXiv 2606.10968v2, Alg. 1; ``docs/methods/cppo.md``) and its launch helper.

Rows view as in :mod:`rlvr_kernels.kernels.credit`: flat contiguous tensors, per row an int64 ``start`` and ``span``
(padded ``[B, T]``: ``start = b T``, ``span = T``; packed: from ``cu_seqlens``), a flat int8 ``valid`` mask. One
program handles one row at a time (grid ``min(rows, 65535)``, programs loop over rows), int64 offsets, and loops over
blocks of ``BLOCK`` tokens, so rows of any length work. Per row:

1. one pass writes ``D`` (Binary-TV fused from ``logp``/``logp_mu``, or a divergence precomputed by the torch
   prologue :func:`rlvr_kernels.reference.cppo.divergence`), zero on invalid tokens, into the output buffer and counts
   the valid tokens ``n`` and the row length ``L`` (last valid index + 1);
2. ``budget="dynamic"``: the two order statistics of the linear-interpolation quantile (fp32 rank ``q (n - 1)``, as
   ``torch.quantile``): the lower one by the exact radix select
   :func:`rlvr_kernels.kernels.select.row_kth_largest_key` on that buffer (a block barrier orders the writes of
   pass 1 before these reads), the upper one (a tie, or the next larger value) from its ``n_greater`` count and one
   min pass; then the clamp. 11 reads of the row in all (1 + 8 radix passes + 1 + 1);
3. one pass: ``w_t``, ``Z = w D``, the exclusive prefix sum of ``G = delta_b w - Z`` (``tl.cumsum`` of the block
   loaded shifted by one token, plus a running scalar carry), the threshold ``c = min(delta, delta + sum_{j<t} G_j)``,
   the sign test of the toward-mu clause, and the mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlvr_kernels import _backend
from rlvr_kernels.kernels.select import key_to_float, row_kth_largest_key
from rlvr_kernels.reference.cppo import budget_upper

__all__ = ["DEFAULT_BLOCK", "DEFAULT_SELECT_BLOCK", "cppo_mask"]

DEFAULT_BLOCK = 1024
DEFAULT_SELECT_BLOCK = 256  # the radix select builds a [BLOCK, 16] histogram tile

BUDGET_NONE = 0
BUDGET_FIXED = 1
BUDGET_DYNAMIC = 2
_BUDGET_CODE = {"none": BUDGET_NONE, "fixed": BUDGET_FIXED, "dynamic": BUDGET_DYNAMIC}


@triton.jit
def _weight(pos, ok, omw, denom):
    """``w = 1 - (1 - w_min) min(t / denom, 1)`` on valid tokens, 0 elsewhere (fp32)."""
    frac = tl.minimum(tl.div_rn(pos.to(tl.float32), denom), 1.0)  # IEEE division, as the reference
    return tl.where(ok, 1.0 - omw * frac, 0.0)


@triton.jit
def _cppo_kernel(
    LP,
    LMU,
    Dpre,
    A,
    Valid,
    Starts,
    Spans,
    OutM,
    OutD,
    OutW,
    OutDB,
    S,
    delta,
    omw,
    delta_b,
    db_hi,
    q,
    scale,
    h_denom,
    DIV_FUSED: tl.constexpr,
    BUDGET: tl.constexpr,
    A_PER_TOKEN: tl.constexpr,
    HAS_HORIZON: tl.constexpr,
    BLOCK: tl.constexpr,
    SELECT_BLOCK: tl.constexpr,
):
    for s in range(tl.program_id(0), S, tl.num_programs(0)):
        start = tl.load(Starts + s).to(tl.int64)
        span = tl.load(Spans + s).to(tl.int64)
        # ---- pass 1: D (zero on invalid) into OutD; valid count n and length L ----------------------------------
        n = span * 0
        L = span * 0
        for j0 in range(0, span, BLOCK):
            offs = j0 + tl.arange(0, BLOCK)
            inb = offs < span
            ptr = start + offs
            ok = tl.load(Valid + ptr, mask=inb, other=0) != 0
            if DIV_FUSED:  # Binary-TV |pi(a) - mu(a)|, log-probs clamped to <= 0 (as the reference's divergence)
                lp = tl.load(LP + ptr, mask=ok, other=0.0).to(tl.float32)
                lm = tl.load(LMU + ptr, mask=ok, other=0.0).to(tl.float32)
                d = tl.abs(tl.exp(tl.minimum(lp, 0.0)) - tl.exp(tl.minimum(lm, 0.0)))
            else:
                d = tl.load(Dpre + ptr, mask=ok, other=0.0).to(tl.float32)
            tl.store(OutD + ptr, tl.where(ok, d, 0.0), mask=inb)
            n += tl.sum(ok.to(tl.int64), axis=0)
            L = tl.maximum(L, tl.max(tl.where(ok, offs + 1, 0), axis=0))
        tl.debug_barrier()  # OutD written by every thread of the program before anyone reads it back
        # ---- per-row budget --------------------------------------------------------------------------------------
        db = delta_b
        if BUDGET == 2:
            r = tl.maximum(q * (n - 1).to(tl.float32), 0.0)  # fp32 rank, as torch.quantile
            lo = r.to(tl.int64)
            wgt = r - lo.to(tl.float32)
            hi = lo + (wgt > 0.0).to(tl.int64)
            # k-th smallest = (n - k + 1)-th largest; 0-based ascending rank i -> (n - i)-th largest
            key_lo, _t0, n_gt, _n0 = row_kth_largest_key(OutD, Valid, start, span, n - lo, True, SELECT_BLOCK)
            v_lo = key_to_float(tl.minimum(key_lo, 4294967295))
            # the upper order statistic is v_lo again (a tie) unless exactly n_gt elements lie above rank hi, in
            # which case it is the smallest valid element above v_lo: one min pass instead of a second select
            v_next = tl.where(n >= 0, float("inf"), 0.0)  # fp32 scalar +inf
            for j0 in range(0, span, BLOCK):
                offs = j0 + tl.arange(0, BLOCK)
                inb = offs < span
                ok = tl.load(Valid + start + offs, mask=inb, other=0) != 0
                d = tl.load(OutD + start + offs, mask=inb, other=0.0)
                v_next = tl.minimum(v_next, tl.min(tl.where(ok & (d > v_lo), d, float("inf")), axis=0))
            v_hi = tl.where(n - hi <= n_gt.to(tl.int64), v_next, v_lo)
            diff = v_hi - v_lo
            qv = tl.where(wgt < 0.5, v_lo + wgt * diff, v_hi - diff * (1.0 - wgt))  # torch.lerp
            db = tl.where(n > 0, tl.minimum(tl.maximum(scale * qv, delta_b), db_hi), delta_b)
            tl.store(OutDB + s, db)
        # ---- pass 2: weights, exclusive prefix sum of G = db w - w D, threshold, mask ----------------------------
        if HAS_HORIZON:
            denom = h_denom
        else:
            denom = tl.maximum(L - 1, 1).to(tl.float32)
        if not A_PER_TOKEN:
            a_row = tl.load(A + s).to(tl.float32)
        carry = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), axis=0)
        for j0 in range(0, span, BLOCK):
            offs = j0 + tl.arange(0, BLOCK)
            inb = offs < span
            ptr = start + offs
            ok = tl.load(Valid + ptr, mask=inb, other=0) != 0
            d = tl.load(OutD + ptr, mask=inb, other=0.0)
            w = _weight(offs, ok, omw, denom)
            z = w * d
            if BUDGET == 0:
                inside = z <= delta
            else:
                prv = offs - 1  # the block shifted by one token: exclusive sums without "cumsum - G"
                inb_p = (prv >= 0) & (prv < span)
                ok_p = tl.load(Valid + start + prv, mask=inb_p, other=0) != 0
                d_p = tl.load(OutD + start + prv, mask=inb_p, other=0.0)
                w_p = _weight(prv, ok_p, omw, denom)
                g_p = db * w_p - w_p * d_p
                R = carry + tl.cumsum(g_p, axis=0)
                carry += tl.sum(g_p, axis=0)
                inside = z <= tl.minimum(delta + R, delta)
            lp = tl.load(LP + ptr, mask=ok, other=0.0).to(tl.float32)
            lm = tl.load(LMU + ptr, mask=ok, other=0.0).to(tl.float32)
            if A_PER_TOKEN:
                a = tl.load(A + ptr, mask=ok, other=0.0).to(tl.float32)
            else:
                a = tl.zeros([BLOCK], dtype=tl.float32) + a_row
            lr = lp - lm
            away = ((a > 0.0) & (lr > 0.0)) | ((a < 0.0) & (lr < 0.0))
            keep = ok & (inside | (away == 0))
            tl.store(OutM + ptr, keep.to(tl.int8), mask=inb)
            tl.store(OutW + ptr, w, mask=inb)


def _grid(S: int):
    return (max(1, min(S, _backend.max_grid())),)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().reshape(-1)


def cppo_mask(
    logp,
    logp_mu,
    D,
    adv,
    valid8,
    starts,
    spans,
    *,
    per_token,
    delta,
    w_min,
    delta_b,
    budget,
    quantile,
    quantile_scale,
    max_mult,
    horizon,
    block=None,
):
    """Launch the CPPO kernel on the rows view. Returns ``(mask bool flat, D fp32 flat, w fp32 flat, db fp32 [S])``.

    ``logp``/``logp_mu`` flat per token (any float dtype); ``D`` a precomputed flat divergence, or None for the fused
    Binary-TV; ``adv`` flat per token (``per_token=True``) or one per row (only its sign is used: the caller passes
    ``sign(A)``). No argument checking (the caller validates). Inputs at invalid positions are never loaded (masked
    loads and selects), so they may hold anything.
    """
    lp = _flat(logp)
    lm = _flat(logp_mu)
    a = _flat(adv)
    N = valid8.numel()
    dev = valid8.device
    out_m = torch.zeros(N, dtype=torch.int8, device=dev)
    out_d = torch.zeros(N, dtype=torch.float32, device=dev)
    out_w = torch.zeros(N, dtype=torch.float32, device=dev)
    S = starts.numel()
    if budget == "none":
        out_db = torch.full((S,), float("inf"), dtype=torch.float32, device=dev)
    else:
        out_db = torch.full((S,), float(delta_b), dtype=torch.float32, device=dev)
    if S == 0 or N == 0:
        return out_m.view(torch.bool), out_d, out_w, out_db
    block = block or DEFAULT_BLOCK
    sel_block = min(max(block, 64), DEFAULT_SELECT_BLOCK)
    Dpre = _flat(D) if D is not None else out_d
    _cppo_kernel[_grid(S)](
        lp,
        lm,
        Dpre,
        a,
        valid8,
        starts.to(torch.int64).contiguous(),
        spans.to(torch.int64).contiguous(),
        out_m,
        out_d,
        out_w,
        out_db,
        S,
        float(delta),
        float(1.0 - w_min),
        float(delta_b),
        budget_upper(delta_b, max_mult),
        float(quantile),
        float(quantile_scale),
        float(max(int(horizon) - 1, 1)) if horizon is not None else 1.0,
        DIV_FUSED=D is None,
        BUDGET=_BUDGET_CODE[budget],
        A_PER_TOKEN=bool(per_token),
        HAS_HORIZON=horizon is not None,
        BLOCK=block,
        SELECT_BLOCK=sel_block,
        enable_fp_fusion=False,  # no FMA contraction: w, G and the lerp rounded op by op, as the interpreter/torch
    )
    return out_m.view(torch.bool), out_d, out_w, out_db
