"""Triton kernels for per-token log-probs and entropies, and their launch helpers.

Linear form (hidden states x lm_head, the logits never reach memory):
- ``linear_stats_forward``: grid (row blocks, vocab splits). Each program computes logit tiles
  ``[BLOCK_N, BLOCK_V]`` with ``tl.dot`` over H and folds them into online fp32 statistics per row: running max
  ``m``, ``s = sum exp(z - m)``, ``a = sum exp(z - m) (z - m)`` and the target logit. Partials per split are merged
  in :func:`merge_split_stats` (O(N * splits)).
- ``linear_dlogits``: recomputes the logit tiles of one vocabulary chunk and writes
  ``dz = (g_logp (onehot - p) - c_p p - g_H p (log p + H)) / T`` (``c_p`` = g_logp + the gathered gradients)
  into a ``[N, chunk]`` buffer; the caller turns it into dX, dW, db with GEMMs (no atomics: deterministic).

Logits form (logits a model already produced): one program per row (looping over rows), looping over vocab blocks.

Correctness rules kept here: columns past V are -inf, never 0; statistics in fp32 with max initialised to -inf;
int64 row offsets; no grid dimension above 65535 (programs loop over the rest). Design notes:
``docs/design/vocab-pass.md``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlvr_kernels._backend import max_grid, triton_interpreting

# Vocabulary splits are multiples of this (a multiple of every BLOCK_V we launch).
SPLIT_ALIGN = 256


def _gpu_configs():
    return [
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    ]


# Small tiles under the interpreter: the tests then cross many tile and split boundaries with small shapes.
INTERPRET_BLOCKS = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16}


@triton.jit
def _logit_tile(
    X,
    W,
    Bias,
    rows64,
    row_ok,
    cols64,
    col_ok,
    H,
    stride_xn,
    stride_xh,
    stride_wv,
    stride_wh,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Unscaled fp32 logits ``x_rows @ w_cols.T (+ bias)`` of one ``[BLOCK_N, BLOCK_V]`` tile (masked loads read 0)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        x = tl.load(
            X + rows64[:, None] * stride_xn + ks[None, :] * stride_xh,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            W + cols64[None, :] * stride_wv + ks[:, None] * stride_wh,
            mask=col_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        if UPCAST:  # the interpreter's tl.dot is wrong on half-precision operands
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(Bias + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _linear_stats_fwd_kernel(
    X,
    W,
    Bias,
    Tgt,
    Mo,
    So,
    Ao,
    Zo,
    N,
    V,
    H,
    stride_xn,
    stride_xh,
    stride_wv,
    stride_wh,
    inv_temp,
    split_size,
    n_splits,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_s = tl.program_id(1)
    v_begin = pid_s * split_size
    v_end = tl.minimum(v_begin + split_size, V)
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    for rb in range(tl.program_id(0), n_row_blocks, tl.num_programs(0)):
        rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        tgt = tl.load(Tgt + rows64, mask=row_ok, other=-1)
        # ignored rows read their hidden state as zeros: NaN/inf padding never reaches a statistic
        x_ok = row_ok & (tgt != ignore_index)
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_N], tl.float32)
        a = tl.zeros([BLOCK_N], tl.float32)
        zt = tl.zeros([BLOCK_N], tl.float32)
        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < v_end
            cols64 = cols.to(tl.int64)
            acc = _logit_tile(
                X,
                W,
                Bias,
                rows64,
                x_ok,
                cols64,
                col_ok,
                H,
                stride_xn,
                stride_xh,
                stride_wv,
                stride_wh,
                HAS_BIAS,
                UPCAST,
                DOT_PRECISION,
                BLOCK_N,
                BLOCK_V,
                BLOCK_K,
            )
            z = tl.where(col_ok[None, :], acc * inv_temp, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, 1))
            # Shift reference: 0 while every logit seen is -inf (-inf - -inf would be NaN); exp(-inf - 0) = 0.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_ref)
            d = tl.where(col_ok[None, :], z - m_ref[:, None], 0.0)
            e = tl.where(col_ok[None, :], tl.exp(d), 0.0)
            shift = tl.where(s > 0.0, m - m_ref, 0.0)
            # alpha = 0 with shift = -inf when the logits' spread exceeds the fp32 range: that part adds 0, not NaN
            a = tl.where(alpha > 0.0, alpha * (a + s * shift), 0.0) + tl.sum(tl.where(e > 0.0, e * d, 0.0), 1)
            s = alpha * s + tl.sum(e, 1)
            m = m_new
            zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
        out = rows64 * n_splits + pid_s
        tl.store(Mo + out, m, mask=row_ok)
        tl.store(So + out, s, mask=row_ok)
        tl.store(Ao + out, a, mask=row_ok)
        tl.store(Zo + out, zt, mask=row_ok)


_linear_stats_fwd_tuned = triton.autotune(configs=_gpu_configs(), key=["V", "H"])(_linear_stats_fwd_kernel)


@triton.jit
def _linear_dlogits_kernel(
    X,
    W,
    Bias,
    Tgt,
    Lse,
    Ent,
    GL,
    GH,
    CP,
    DZ,
    N,
    V,
    H,
    v_begin,
    v_end,
    stride_xn,
    stride_xh,
    stride_wv,
    stride_wh,
    stride_dzn,
    inv_temp,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    HAS_GH: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    cols = v_begin + tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < v_end
    cols64 = cols.to(tl.int64)
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    for rb in range(tl.program_id(0), n_row_blocks, tl.num_programs(0)):
        rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        tgt = tl.load(Tgt + rows64, mask=row_ok, other=-1)
        x_ok = row_ok & (tgt != ignore_index)  # as the forward: ignored rows read zeros
        acc = _logit_tile(
            X,
            W,
            Bias,
            rows64,
            x_ok,
            cols64,
            col_ok,
            H,
            stride_xn,
            stride_xh,
            stride_wv,
            stride_wh,
            HAS_BIAS,
            UPCAST,
            DOT_PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_K,
        )
        lse = tl.load(Lse + rows64, mask=row_ok, other=0.0)
        gl = tl.load(GL + rows64, mask=row_ok, other=0.0)
        cp = tl.load(CP + rows64, mask=row_ok, other=0.0)
        logp = acc * inv_temp - lse[:, None]
        p = tl.exp(logp)
        dz = tl.where(cols[None, :] == tgt[:, None], gl[:, None], 0.0) - cp[:, None] * p
        if HAS_GH:
            gh = tl.load(GH + rows64, mask=row_ok, other=0.0)
            ent = tl.load(Ent + rows64, mask=row_ok, other=0.0)
            dz -= gh[:, None] * tl.where(p > 0.0, p * (logp + ent[:, None]), 0.0)
        dz = dz * inv_temp
        tl.store(
            DZ + rows64[:, None] * stride_dzn + (cols64 - v_begin)[None, :],
            dz.to(DZ.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )


_linear_dlogits_tuned = triton.autotune(configs=_gpu_configs(), key=["V", "H"])(_linear_dlogits_kernel)


def _dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: TF32 for fp32 operands only when torch's own fp32 matmuls use it.

    (Ignored for bf16/fp16 operands.) torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision``
    (``"ieee"``/``"tf32"``/``"none"``, "none" = the default IEEE); reading the legacy ``allow_tf32`` raises a
    RuntimeError once a program set TF32 through the new API, so the new attribute is read first.
    """
    if dtype != torch.float32:
        return "tf32"
    matmul = torch.backends.cuda.matmul
    try:
        prec = matmul.fp32_precision
    except (AttributeError, RuntimeError):
        prec = None
    if prec is not None:
        return "tf32" if str(prec).lower() == "tf32" else "ieee"
    try:
        return "tf32" if matmul.allow_tf32 else "ieee"
    except RuntimeError:  # pragma: no cover - mixed legacy/new TF32 settings
        return "ieee"


def _unit(t: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels index 1-D per-row/per-column tensors (targets, bias, lse, ...) as ``ptr + i``: unit stride."""
    return t if t is None or t.stride(0) == 1 or t.numel() <= 1 else t.contiguous()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def linear_stats_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_temp: float,
    *,
    n_splits: int | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward vocab pass. x ``[N, H]``, w ``[V, H]`` (any strides), targets int64 ``[N]``; rows whose
    target is ``ignore_index`` are computed from a zero hidden state (their x is never read).

    Returns fp32 partials ``(m, s, a, z_target)``, each ``[N, n_splits]``, for :func:`merge_split_stats`.
    """
    n, h = x.shape
    v = w.shape[0]
    targets, bias = _unit(targets), _unit(bias)
    interp = triton_interpreting()
    if n_splits is None:
        row_blocks = triton.cdiv(n, 128 if not interp else INTERPRET_BLOCKS["BLOCK_N"])
        n_splits = max(1, min(triton.cdiv(2 * _num_sms(x.device), row_blocks), triton.cdiv(v, SPLIT_ALIGN)))
    split_size = triton.cdiv(triton.cdiv(v, n_splits), SPLIT_ALIGN) * SPLIT_ALIGN
    n_splits = triton.cdiv(v, split_size)
    parts = torch.empty((4, n, n_splits), device=x.device, dtype=torch.float32)
    args = (
        x,
        w,
        bias if bias is not None else x,
        targets,
        parts[0],
        parts[1],
        parts[2],
        parts[3],
        n,
        v,
        h,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        inv_temp,
        split_size,
        n_splits,
        ignore_index,
    )
    flags = dict(HAS_BIAS=bias is not None, UPCAST=interp, DOT_PRECISION=_dot_precision(x.dtype))
    if interp:
        grid = (min(triton.cdiv(n, INTERPRET_BLOCKS["BLOCK_N"]), max_grid()), n_splits)
        _linear_stats_fwd_kernel[grid](*args, **flags, **INTERPRET_BLOCKS)
    else:
        grid = lambda meta: (min(triton.cdiv(n, meta["BLOCK_N"]), max_grid()), n_splits)  # noqa: E731
        _linear_stats_fwd_tuned[grid](*args, **flags)
    return parts[0], parts[1], parts[2], parts[3]


def merge_split_stats(
    m: torch.Tensor, s: torch.Tensor, a: torch.Tensor, zt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge per-split online statistics ``[N, S]`` into ``(lse, entropy, target_logit)``, each fp32 ``[N]``.

    With ``M = max_i m_i`` and ``r_i = exp(m_i - M)``: ``sum exp(z - M) = sum_i r_i s_i``,
    ``sum exp(z - M)(z - M) = sum_i r_i (a_i + s_i (m_i - M))``; ``lse = M + log S``, ``H = log S - A / S``.
    """
    mx = m.amax(dim=1, keepdim=True)
    r = torch.exp(m - mx)
    s_tot = (r * s).sum(1)
    # a split whose logits are all -inf has m = -inf and s = 0: its shift is 0, not 0 * -inf = NaN
    # and a split whose max lies beyond the fp32 range below the overall one has r = 0 and m - M = -inf
    a_tot = torch.where(r > 0, r * (a + torch.where(s > 0, s * (m - mx), 0.0)), 0.0).sum(1)
    lse = mx.squeeze(1) + torch.log(s_tot)
    entropy = torch.log(s_tot) - a_tot / s_tot
    return lse, entropy, zt.sum(1)


def linear_dlogits(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    g_logp: torch.Tensor,
    g_ent: torch.Tensor | None,
    c_p: torch.Tensor,
    inv_temp: float,
    v_begin: int,
    v_end: int,
    out: torch.Tensor,
    *,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Write ``dL/dz`` for vocabulary columns ``[v_begin, v_end)`` into ``out [N, v_end - v_begin]``; rows whose
    target is ``ignore_index`` read a zero hidden state, as in :func:`linear_stats_forward`.

    g_logp, c_p, g_ent: fp32 ``[N]`` (g_ent None compiles the entropy term out); rows with zero coefficients get 0.
    """
    n, h = x.shape
    v = w.shape[0]
    bias, targets, lse, entropy = _unit(bias), _unit(targets), _unit(lse), _unit(entropy)
    g_logp, g_ent, c_p = _unit(g_logp), _unit(g_ent), _unit(c_p)
    if out.stride(1) != 1 and out.shape[1] > 1:
        raise ValueError("linear_dlogits: out must have unit stride along the vocabulary")
    interp = triton_interpreting()
    args = (
        x,
        w,
        bias if bias is not None else x,
        targets,
        lse,
        entropy,
        g_logp,
        g_ent if g_ent is not None else g_logp,
        c_p,
        out,
        n,
        v,
        h,
        v_begin,
        v_end,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        inv_temp,
        ignore_index,
    )
    flags = dict(
        HAS_BIAS=bias is not None, HAS_GH=g_ent is not None, UPCAST=interp, DOT_PRECISION=_dot_precision(x.dtype)
    )
    width = v_end - v_begin
    if interp:
        b = INTERPRET_BLOCKS
        grid = (min(triton.cdiv(n, b["BLOCK_N"]), max_grid()), triton.cdiv(width, b["BLOCK_V"]))
        _linear_dlogits_kernel[grid](*args, **flags, **b)
    else:
        grid = lambda meta: (  # noqa: E731
            min(triton.cdiv(n, meta["BLOCK_N"]), max_grid()),
            triton.cdiv(width, meta["BLOCK_V"]),
        )
        _linear_dlogits_tuned[grid](*args, **flags)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Logits form: one row per program (looping over rows), vocab blocks inside.


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
    for row64 in range(tl.program_id(0).to(tl.int64), N, tl.num_programs(0)):
        base = Z + row64 * stride_zn
        tgt = tl.load(Tgt + row64)
        m = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        a = tl.zeros([BLOCK_V], tl.float32)
        zt = tl.zeros([BLOCK_V], tl.float32)
        # Lane-wise online statistics (each lane sees every BLOCK_V-th column), merged once at the end.
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = cols < V
            z = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, z)
            # Shift reference: 0 while a lane has seen only -inf (-inf - -inf would be NaN); exp(-inf - 0) = 0.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_ref)
            d = tl.where(ok, z - m_ref, 0.0)
            e = tl.where(ok, tl.exp(d), 0.0)
            shift = tl.where(s > 0.0, m - m_ref, 0.0)
            a = tl.where(alpha > 0.0, alpha * (a + s * shift), 0.0) + tl.where(e > 0.0, e * d, 0.0)
            s = alpha * s + e
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
        tl.store(Lse + row64, lse)
        tl.store(Logp + row64, tl.where(ignored, 0.0, logp))
        tl.store(Ent + row64, tl.where(ignored, 0.0, ent))


@triton.jit
def _logits_bwd_kernel(
    Z,
    Tgt,
    Lse,
    Ent,
    GL,
    GH,
    DZ,
    N,
    V,
    stride_zn,
    stride_dzn,
    inv_temp,
    ignore_index,
    HAS_GH: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    for row64 in range(tl.program_id(0).to(tl.int64), N, tl.num_programs(0)):
        tgt = tl.load(Tgt + row64)
        keep = tgt != ignore_index
        gl = tl.where(keep, tl.load(GL + row64), 0.0)
        lse = tl.load(Lse + row64)
        if HAS_GH:
            gh = tl.where(keep, tl.load(GH + row64), 0.0)
            ent = tl.load(Ent + row64)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = cols < V
            z = tl.load(Z + row64 * stride_zn + cols, mask=ok, other=0.0).to(tl.float32) * inv_temp
            logp = z - lse
            # ignored rows get exactly 0 (their lse may be -inf: a row of -inf logits, where 0 * NaN would leak)
            p = tl.where(keep, tl.exp(logp), 0.0)
            dz = tl.where(cols == tgt, gl, 0.0) - gl * p
            if HAS_GH:
                dz -= gh * tl.where(p > 0.0, p * (logp + ent), 0.0)
            tl.store(DZ + row64 * stride_dzn + cols, (dz * inv_temp).to(DZ.dtype.element_ty), mask=ok)


def _row_block(v: int) -> int:
    if triton_interpreting():
        return min(256, triton.next_power_of_2(max(v, 16)))
    return min(4096, triton.next_power_of_2(max(v, 16)))


def logits_forward(
    logits: torch.Tensor, targets: torch.Tensor, inv_temp: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits ``[N, V]`` (unit stride along V), targets int64 ``[N]`` -> fp32 ``(logp, entropy, lse)``, each ``[N]``."""
    n, v = logits.shape
    if v > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    targets = _unit(targets)
    logp = torch.empty(n, device=logits.device, dtype=torch.float32)
    ent = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    if n:
        block = _row_block(v)
        _logits_fwd_kernel[(min(n, max_grid()),)](
            logits,
            targets,
            logp,
            ent,
            lse,
            n,
            v,
            logits.stride(0),
            inv_temp,
            ignore_index,
            BLOCK_V=block,
            num_warps=4 if block <= 1024 else 8,
        )
    return logp, ent, lse


def logits_backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    g_logp: torch.Tensor,
    g_ent: torch.Tensor | None,
    inv_temp: float,
    ignore_index: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient w.r.t. ``logits [N, V]``, in the logits' dtype (no fp32 copy of the logits).

    ``out`` may be ``logits`` itself: each program reads a block and then overwrites the same block (in place).
    """
    n, v = logits.shape
    if v > 1 and (logits.stride(1) != 1 or (out is not None and out.stride(1) != 1)):
        raise ValueError("logits_backward: logits and out must have unit stride along the vocabulary")
    targets, lse, entropy, g_logp, g_ent = _unit(targets), _unit(lse), _unit(entropy), _unit(g_logp), _unit(g_ent)
    dz = torch.empty((n, v), device=logits.device, dtype=logits.dtype) if out is None else out
    if n:
        block = _row_block(v)
        _logits_bwd_kernel[(min(n, max_grid()),)](
            logits,
            targets,
            lse,
            entropy,
            g_logp,
            g_ent if g_ent is not None else g_logp,
            dz,
            n,
            v,
            logits.stride(0),
            dz.stride(0),
            inv_temp,
            ignore_index,
            HAS_GH=g_ent is not None,
            BLOCK_V=block,
            num_warps=4 if block <= 1024 else 8,
        )
    return dz


def backward_chunk_columns(n: int, v: int, elem_bytes: int, chunk_bytes: int) -> int:
    """Columns per backward vocab chunk so that the ``[N, chunk]`` dz buffer stays within ``chunk_bytes``."""
    cols = chunk_bytes // max(1, n * elem_bytes)
    cols = max(SPLIT_ALIGN, (cols // SPLIT_ALIGN) * SPLIT_ALIGN)
    return min(cols, v) if v > 0 else 0


__all__ = [
    "linear_stats_forward",
    "merge_split_stats",
    "linear_dlogits",
    "logits_forward",
    "logits_backward",
    "backward_chunk_columns",
]
