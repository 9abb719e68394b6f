"""Triton row passes over a block of logits: per-token log-probs, entropies and their gradient.

Every GEMM of the vocabulary pass runs on cuBLAS (``torch.mm`` with fp32 results, ``rlvr_kernels/_gemm.py``); these
kernels make the passes over the ``[rows, columns]`` logits block a GEMM produced, at memory bandwidth:

- ``logits_forward``: one program per row (looping over rows) folds the row's logits into online fp32 statistics
  (running max ``m``, ``s = sum exp(z - m)``, ``a = sum exp(z - m) (z - m)``, the target logit) and writes
  ``logp``, the entropy and ``lse``.
- ``logits_backward``: for a block of columns ``[col_offset, col_offset + V_c)`` of rows whose ``lse`` and entropy
  are known, writes ``dz = (g_logp (onehot - p) - c_p p - g_H p (log p + H)) / T`` (``c_p`` = g_logp + the gathered
  outputs' gradients) in the output buffer's dtype: the logits' own storage (in place) or a buffer in the GEMM
  dtype. The caller turns it into dX, dW, db with GEMMs (no atomics: deterministic).

TRL's fused-head options (``rlvr_kernels/integrations/_trl/chunked.py``): the final-logit softcap (``c tanh(
logit_scale z / c)`` before the temperature; a logit scale alone folds into the temperature) and the extra outputs
``log sum p^2``, the mean logit and ``is_top1`` are computed in the same row passes by ``_logits_fwd_ext_kernel`` and
``_logits_bwd_softcap_kernel``. Both share their body with the plain kernels (``_logits_fwd_rows`` /
``_logits_bwd_rows``) under constexpr flags, so the plain kernels compile to the same code as without the options.
A temperature per row (``inv_temp`` an fp32 ``[N]`` tensor of ``1 / T``) launches ``_logits_fwd_rowt_kernel`` /
``_logits_bwd_rowt_kernel``: the same bodies under ``HAS_ROW_T``, which reads ``1 / T`` once per row.

Correctness rules kept here: columns past V are -inf, never 0; statistics in fp32 with max initialised to -inf;
int64 row offsets; no grid dimension above 65535 (programs loop over the rest). Design notes:
``docs/design/vocab-pass.md``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlvr_kernels._backend import max_grid, triton_interpreting

# Backward vocabulary chunks are multiples of this many columns.
COLUMN_ALIGN = 256


def _unit(t: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels index 1-D per-row tensors (targets, lse, ...) as ``ptr + i``: unit stride."""
    return t if t is None or t.stride(0) == 1 or t.numel() <= 1 else t.contiguous()


# ----------------------------------------------------------------------------------------------------------------
# One row per program (looping over rows), vocab blocks inside.


@triton.jit
def _logits_fwd_rows(
    Z,
    Tgt,
    Logp,
    Ent,
    Lse,
    N,
    V,
    stride_zn,
    inv_temp,
    ignore_index,
    Sq,
    Mean,
    Top1,
    logit_scale,
    softcap,
    BLOCK_V: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SQ: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    HAS_TOP1: tl.constexpr,
    InvT,
    HAS_ROW_T: tl.constexpr,
):
    # HAS_ROW_T: a temperature per row (InvT [N] fp32 holds 1 / T per row) instead of the scalar inv_temp
    # (_logits_fwd_rowt_kernel); off, the kernels compile as without it.
    # HAS_SOFTCAP: the logits are x = softcap * tanh(logit_scale * z / softcap) * inv_temp (TRL's fused head; without
    # softcap a logit scale folds into inv_temp). HAS_SQ / HAS_MEAN / HAS_TOP1: TRL's extra outputs log sum p^2, the
    # mean logit and whether the target is the argmax. All off: the plain pass, unchanged.
    for row64 in range(tl.program_id(0).to(tl.int64), N, tl.num_programs(0)):
        base = Z + row64 * stride_zn
        tgt = tl.load(Tgt + row64)
        if HAS_ROW_T:
            it = tl.load(InvT + row64)
        else:
            it = inv_temp
        m = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        a = tl.zeros([BLOCK_V], tl.float32)
        zt = tl.zeros([BLOCK_V], tl.float32)
        if HAS_SQ:
            q = tl.zeros([BLOCK_V], tl.float32)
        if HAS_MEAN:
            zs = tl.zeros([BLOCK_V], tl.float32)
        if HAS_TOP1:
            mb = tl.full([BLOCK_V], float("-inf"), tl.float32)
        # Lane-wise online statistics (each lane sees every BLOCK_V-th column), merged once at the end.
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = cols < V
            if HAS_SOFTCAP:
                y = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32) * (logit_scale / softcap)
                # tanh(y) = 2 sigmoid(2 y) - 1 (as TRL's kernel)
                z = tl.where(ok, softcap * (2.0 * tl.sigmoid(2.0 * y) - 1.0) * it, float("-inf"))
            else:
                z = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32) * it
            if HAS_MEAN:
                zs += tl.where(ok, z, 0.0)
            if HAS_TOP1:
                mb = tl.maximum(mb, tl.where(ok & (cols < tgt), z, float("-inf")))
            m_new = tl.maximum(m, z)
            # Shift reference: 0 while a lane has seen only -inf (-inf - -inf would be NaN); exp(-inf - 0) = 0.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_ref)
            d = tl.where(ok, z - m_ref, 0.0)
            e = tl.where(ok, tl.exp(d), 0.0)
            shift = tl.where(s > 0.0, m - m_ref, 0.0)
            a = tl.where(alpha > 0.0, alpha * (a + s * shift), 0.0) + tl.where(e > 0.0, e * d, 0.0)
            s = alpha * s + e
            if HAS_SQ:
                q = alpha * alpha * q + e * e
            m = m_new
            zt += tl.where(cols == tgt, z, 0.0)
        mx = tl.max(m, 0)
        r = tl.where(s > 0.0, tl.exp(m - mx), 0.0)
        s_tot = tl.sum(r * s, 0)
        a_tot = tl.sum(tl.where(r > 0.0, r * (a + tl.where(s > 0.0, s * (m - mx), 0.0)), 0.0), 0)
        log_s = tl.log(s_tot)
        lse = mx + log_s
        ent = log_s - a_tot / s_tot
        logp = tl.sum(zt, 0) - lse
        ignored = tgt == ignore_index
        if HAS_SQ:
            tl.store(Sq + row64, tl.log(tl.sum(r * r * q, 0)) - 2.0 * log_s)
        if HAS_MEAN:
            tl.store(Mean + row64, tl.sum(zs, 0) / V)
        if HAS_TOP1:
            z_tgt = tl.sum(zt, 0)
            tl.store(Top1 + row64, ((z_tgt >= mx) & (z_tgt > tl.max(mb, 0))).to(tl.int8))
        tl.store(Lse + row64, lse)
        tl.store(Logp + row64, tl.where(ignored, 0.0, logp))
        tl.store(Ent + row64, tl.where(ignored, 0.0, ent))


@triton.jit
def _logits_fwd_kernel(
    Z,
    Tgt,
    Logp,
    Ent,
    Lse,
    N,
    V,
    stride_zn,
    inv_temp,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    # The plain pass: every option of _logits_fwd_rows off (compiled out)
    _logits_fwd_rows(
        Z, Tgt, Logp, Ent, Lse, N, V, stride_zn, inv_temp, ignore_index, Lse, Lse, Lse, 1.0, 1.0,
        BLOCK_V, False, False, False, False, Lse, False,
    )  # fmt: skip


@triton.jit
def _logits_fwd_rowt_kernel(
    Z,
    Tgt,
    Logp,
    Ent,
    Lse,
    N,
    V,
    stride_zn,
    InvT,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    # The plain pass with a temperature per row: InvT [N] fp32 holds 1 / T
    _logits_fwd_rows(
        Z, Tgt, Logp, Ent, Lse, N, V, stride_zn, 1.0, ignore_index, Lse, Lse, Lse, 1.0, 1.0,
        BLOCK_V, False, False, False, False, InvT, True,
    )  # fmt: skip


@triton.jit
def _logits_fwd_ext_kernel(
    Z,
    Tgt,
    Logp,
    Ent,
    Lse,
    Sq,
    Mean,
    Top1,
    N,
    V,
    stride_zn,
    inv_temp,
    ignore_index,
    logit_scale,
    softcap,
    BLOCK_V: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SQ: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    HAS_TOP1: tl.constexpr,
):
    # TRL's fused-head options (the pointers of the outputs not requested are unused placeholders)
    _logits_fwd_rows(
        Z, Tgt, Logp, Ent, Lse, N, V, stride_zn, inv_temp, ignore_index, Sq, Mean, Top1, logit_scale, softcap,
        BLOCK_V, HAS_SOFTCAP, HAS_SQ, HAS_MEAN, HAS_TOP1, Lse, False,
    )  # fmt: skip


@triton.jit
def _logits_bwd_rows(
    Z,
    Tgt,
    Lse,
    Ent,
    GL,
    GH,
    CP,
    DZ,
    N,
    V,
    stride_zn,
    stride_dzn,
    col_offset,
    inv_temp,
    ignore_index,
    logit_scale,
    softcap,
    HAS_GH: tl.constexpr,
    BLOCK_V: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    InvT,
    HAS_ROW_T: tl.constexpr,
):
    for row64 in range(tl.program_id(0).to(tl.int64), N, tl.num_programs(0)):
        tgt = tl.load(Tgt + row64)
        keep = tgt != ignore_index
        if HAS_ROW_T:
            it = tl.load(InvT + row64)
        else:
            it = inv_temp
        gl = tl.where(keep, tl.load(GL + row64), 0.0)
        cp = tl.where(keep, tl.load(CP + row64), 0.0)
        lse = tl.load(Lse + row64)
        if HAS_GH:
            gh = tl.where(keep, tl.load(GH + row64), 0.0)
            ent = tl.load(Ent + row64)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = cols < V
            if HAS_SOFTCAP:
                y = tl.load(Z + row64 * stride_zn + cols, mask=ok, other=0.0).to(tl.float32) * (logit_scale / softcap)
                th = 2.0 * tl.sigmoid(2.0 * y) - 1.0
                z = softcap * th * it
            else:
                z = tl.load(Z + row64 * stride_zn + cols, mask=ok, other=0.0).to(tl.float32) * it
            logp = z - lse
            # ignored rows get exactly 0 (their lse may be -inf: a row of -inf logits, where 0 * NaN would leak)
            p = tl.where(keep, tl.exp(logp), 0.0)
            dz = tl.where(cols + col_offset == tgt, gl, 0.0) - cp * p
            if HAS_GH:
                dz -= gh * tl.where(p > 0.0, p * (logp + ent), 0.0)
            dz = dz * it
            if HAS_SOFTCAP:
                dz = dz * ((1.0 - th * th) * logit_scale)
            tl.store(DZ + row64 * stride_dzn + cols, dz.to(DZ.dtype.element_ty), mask=ok)


@triton.jit
def _logits_bwd_kernel(
    Z,
    Tgt,
    Lse,
    Ent,
    GL,
    GH,
    CP,
    DZ,
    N,
    V,
    stride_zn,
    stride_dzn,
    col_offset,
    inv_temp,
    ignore_index,
    HAS_GH: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # The plain pass: no softcap (compiled out)
    _logits_bwd_rows(
        Z, Tgt, Lse, Ent, GL, GH, CP, DZ, N, V, stride_zn, stride_dzn, col_offset, inv_temp, ignore_index, 1.0, 1.0,
        HAS_GH, BLOCK_V, False, Lse, False,
    )  # fmt: skip


@triton.jit
def _logits_bwd_rowt_kernel(
    Z,
    Tgt,
    Lse,
    Ent,
    GL,
    GH,
    CP,
    DZ,
    N,
    V,
    stride_zn,
    stride_dzn,
    col_offset,
    InvT,
    ignore_index,
    HAS_GH: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # The plain pass with a temperature per row: InvT [N] fp32 holds 1 / T
    _logits_bwd_rows(
        Z, Tgt, Lse, Ent, GL, GH, CP, DZ, N, V, stride_zn, stride_dzn, col_offset, 1.0, ignore_index, 1.0, 1.0,
        HAS_GH, BLOCK_V, False, InvT, True,
    )  # fmt: skip


@triton.jit
def _logits_bwd_softcap_kernel(
    Z,
    Tgt,
    Lse,
    Ent,
    GL,
    GH,
    CP,
    DZ,
    N,
    V,
    stride_zn,
    stride_dzn,
    col_offset,
    inv_temp,
    ignore_index,
    logit_scale,
    softcap,
    HAS_GH: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # TRL's final-logit softcap: the chain rule logit_scale (1 - tanh^2) in the same pass
    _logits_bwd_rows(
        Z, Tgt, Lse, Ent, GL, GH, CP, DZ, N, V, stride_zn, stride_dzn, col_offset, inv_temp, ignore_index,
        logit_scale, softcap, HAS_GH, BLOCK_V, True, Lse, False,
    )  # fmt: skip


#: The BLOCK_V values the row passes launch with on a GPU (the smallest that holds a short row, else 4096); the
#: offline sm_90 compile test checks each of them for register spills.
ROW_BLOCKS = (256, 1024, 4096)


#: The largest BLOCK_V of the forward row pass with TRL's options (``_logits_fwd_ext_kernel``): its three extra
#: lane-wise statistics need 247 registers per thread at 4096 (sm_90), 124 at 1024.
EXT_MAX_BLOCK = 1024


def _split_temp(inv_temp, softcap, logit_scale):
    """``(scalar inv_temp, per-row fp32 [N] or None)``: ``inv_temp`` is a number or a per-row tensor (a temperature
    per token); without softcap a logit scale folds into it."""
    if isinstance(inv_temp, torch.Tensor):
        rows = inv_temp.to(torch.float32)
        if softcap is None and logit_scale != 1.0:
            rows = rows * logit_scale
        return 1.0, _unit(rows.contiguous())
    if softcap is None and logit_scale != 1.0:
        inv_temp = inv_temp * logit_scale
    return inv_temp, None


def row_warps(block: int) -> int:
    """Warps per program of a row pass with ``BLOCK_V = block``."""
    return 4 if block <= 1024 else 8


def _row_block(v: int) -> int:
    if triton_interpreting():
        return min(256, triton.next_power_of_2(max(v, 16)))
    return next((b for b in ROW_BLOCKS if v <= b), ROW_BLOCKS[-1])


def logits_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    inv_temp: float | torch.Tensor,
    ignore_index: int,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    extras: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits ``[N, V]`` (unit stride along V), targets int64 ``[N]`` -> fp32 ``(logp, entropy, lse)``, each ``[N]``.

    TRL's fused-head options (off by default: the plain pass): ``softcap`` ``c`` turns the logits into
    ``c tanh(logit_scale z / c)`` before the temperature (without softcap, ``logit_scale`` folds into ``inv_temp``);
    ``extras``, a dict whose keys name the extra outputs to compute (``"log_sum_sq_probs"``, ``"mean_logits"``,
    ``"is_top1"``), gets their ``[N]`` values (fp32; bool for ``is_top1``) from the same pass. ``inv_temp``: a number,
    or ``[N]`` (one ``1 / T`` per row; not with the options that change the kernel: softcap, extras)."""
    n, v = logits.shape
    if v > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    targets = _unit(targets)
    logp = torch.empty(n, device=logits.device, dtype=torch.float32)
    ent = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    inv_temp, inv_rows = _split_temp(inv_temp, softcap, logit_scale)
    want = () if extras is None else tuple(extras)
    sq = torch.empty_like(logp) if "log_sum_sq_probs" in want else None
    mean = torch.empty_like(logp) if "mean_logits" in want else None
    top1 = torch.empty(n, device=logits.device, dtype=torch.int8) if "is_top1" in want else None
    if n and softcap is None and not want:
        block = _row_block(v)
        kernel = _logits_fwd_kernel if inv_rows is None else _logits_fwd_rowt_kernel
        kernel[(min(n, max_grid()),)](
            logits,
            targets,
            logp,
            ent,
            lse,
            n,
            v,
            logits.stride(0),
            inv_temp if inv_rows is None else inv_rows,
            ignore_index,
            BLOCK_V=block,
            num_warps=row_warps(block),
        )
    elif n:
        if inv_rows is not None:
            raise NotImplementedError("logits_forward: a per-row temperature with TRL's fused-head options")
        block = min(_row_block(v), EXT_MAX_BLOCK)
        _logits_fwd_ext_kernel[(min(n, max_grid()),)](
            logits,
            targets,
            logp,
            ent,
            lse,
            lse if sq is None else sq,
            lse if mean is None else mean,
            lse if top1 is None else top1,
            n,
            v,
            logits.stride(0),
            inv_temp,
            ignore_index,
            float(logit_scale),
            1.0 if softcap is None else float(softcap),
            BLOCK_V=block,
            HAS_SOFTCAP=softcap is not None,
            HAS_SQ=sq is not None,
            HAS_MEAN=mean is not None,
            HAS_TOP1=top1 is not None,
            num_warps=row_warps(block),
        )
    if extras is not None:
        for key, buf in (("log_sum_sq_probs", sq), ("mean_logits", mean), ("is_top1", top1)):
            if buf is not None:
                extras[key] = buf.bool() if key == "is_top1" else buf
    return logp, ent, lse


def logits_backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    g_logp: torch.Tensor,
    g_ent: torch.Tensor | None,
    inv_temp: float | torch.Tensor,
    ignore_index: int,
    out: torch.Tensor | None = None,
    *,
    c_p: torch.Tensor | None = None,
    col_offset: int = 0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Gradient w.r.t. the logits block ``[N, V_c]`` (columns ``col_offset ...`` of the vocabulary), written into
    ``out`` (default: a new tensor in the logits' dtype).

    ``out`` may be ``logits`` itself (each program reads a block, then overwrites it: in place) or a buffer of another
    dtype (the GEMM dtype: no separate cast pass). ``c_p`` (default ``g_logp``) multiplies the ``-p`` term.
    ``logit_scale`` / ``softcap``: as in :func:`logits_forward` (the chain rule ``logit_scale (1 - tanh^2)`` is
    applied in the same pass).
    """
    n, v = logits.shape
    if v > 1 and (logits.stride(1) != 1 or (out is not None and out.stride(1) != 1)):
        raise ValueError("logits_backward: logits and out must have unit stride along the vocabulary")
    targets, lse, entropy, g_logp, g_ent = _unit(targets), _unit(lse), _unit(entropy), _unit(g_logp), _unit(g_ent)
    c_p = g_logp if c_p is None else _unit(c_p)
    dz = torch.empty((n, v), device=logits.device, dtype=logits.dtype) if out is None else out
    inv_temp, inv_rows = _split_temp(inv_temp, softcap, logit_scale)
    if inv_rows is not None and softcap is not None:
        raise NotImplementedError("logits_backward: a per-row temperature with a softcap")
    opts = {} if softcap is None else {"logit_scale": float(logit_scale), "softcap": float(softcap)}
    if n:
        block = _row_block(v)
        kernel = _logits_bwd_kernel if softcap is None else _logits_bwd_softcap_kernel
        if inv_rows is not None:
            kernel = _logits_bwd_rowt_kernel
        kernel[(min(n, max_grid()),)](
            logits,
            targets,
            lse,
            entropy,
            g_logp,
            g_ent if g_ent is not None else g_logp,
            c_p,
            dz,
            n,
            v,
            logits.stride(0),
            dz.stride(0),
            col_offset,
            inv_temp if inv_rows is None else inv_rows,
            ignore_index,
            HAS_GH=g_ent is not None,
            BLOCK_V=block,
            num_warps=row_warps(block),
            **opts,
        )
    return dz


def backward_chunk_columns(n: int, v: int, bytes_per_element: int, chunk_bytes: int) -> int:
    """Columns per backward vocabulary chunk so that its ``[N, columns]`` buffers (``bytes_per_element`` bytes per
    logit: the fp32 logits plus the dz buffer) stay within ``chunk_bytes``; a multiple of ``COLUMN_ALIGN``."""
    cols = chunk_bytes // max(1, n * bytes_per_element)
    cols = max(COLUMN_ALIGN, (cols // COLUMN_ALIGN) * COLUMN_ALIGN)
    return min(cols, v) if v > 0 else 0


__all__ = [
    "logits_forward",
    "logits_backward",
    "backward_chunk_columns",
    "COLUMN_ALIGN",
    "ROW_BLOCKS",
    "EXT_MAX_BLOCK",
    "row_warps",
]
