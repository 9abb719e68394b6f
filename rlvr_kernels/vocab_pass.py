"""The single-device vocabulary pass behind the log-prob ops, per backend, without autograd or custom-op glue.

``linear_forward`` / ``linear_backward`` (hidden states x lm_head) and ``logits_forward`` / ``logits_backward``
(logits a model produced) pick the backend (Triton row passes over cuBLAS GEMM chunks on CUDA; the native or torch
rows over token chunks otherwise; ``rlvr_kernels.reference.logprobs`` holds the math) and return plain tensors. The
custom ops of :mod:`rlvr_kernels.logprobs` (single device) and :mod:`rlvr_kernels.vocab_parallel` (a vocabulary
shard per rank) both call them. Design notes: ``docs/design/vocab-pass.md``.
"""

from __future__ import annotations

import torch

from rlvr_kernels import _checks, _gemm
from rlvr_kernels._backend import no_autocast, resolve_backend
from rlvr_kernels.cpu import vocab_rows
from rlvr_kernels.reference import logprobs as ref

# Rows x K x H elements per chunk when gathering extra ids (CPPO's Top-K divergences).
_GATHER_CHUNK_ELEMENTS = 1 << 24


def temperature_rows(temp, targets, ignore_index: int, dtype: torch.dtype, inverse: bool, check: bool) -> torch.Tensor:
    """A per-token temperature ``temp [N]`` -> ``T`` (or ``1 / T`` with ``inverse``) ``[N]`` in ``dtype``, 1 on ignored
    rows (whatever they hold). ``check``: every row that counts must have ``T > 0`` finite with ``1 / T`` finite in
    fp32, else a ``ValueError`` naming ``temperature`` (one host sync)."""
    keep = targets != ignore_index
    t = temp.detach().to(torch.float64)
    if check and t.numel():
        bad = keep & ~(torch.isfinite(t) & (t > 0) & (1.0 / t <= _checks.F32_MAX))
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"temperature must be > 0 and finite (1 / temperature finite in float32) on every row that is not "
                f"ignore_index; row {row} has {float(t[row])!r}"
            )
    t = torch.where(keep, t, torch.ones((), dtype=t.dtype, device=t.device))
    return (1.0 / t if inverse else t).to(dtype)


def _gathered_logits(x, w, b, ids, inv_temp) -> torch.Tensor:
    """fp32 ``[N, K]`` scaled logits at ``ids``: row-chunked dot products, O(N K H)."""
    n, h = x.shape
    k = ids.shape[1]
    out = torch.empty((n, k), device=x.device, dtype=torch.float32)
    chunk = max(1, _GATHER_CHUNK_ELEMENTS // max(1, k * h))
    for s in range(0, n, chunk):
        i = ids[s : s + chunk]
        z = torch.einsum("rh,rkh->rk", x[s : s + chunk].float(), w[i].float())
        if b is not None:
            z = z + b[i].float()
        out[s : s + chunk] = z * ref.temp_col(ref.temp_rows(inv_temp, s, s + chunk), z)
    return out


def _gathered_onehot_grads(x, w, ids, gg, inv_temp, dx, dw, db) -> None:
    """Add the ``onehot(ids)`` part of the gathered outputs' gradient to dx, dw, db (row-chunked)."""
    n, h = x.shape
    k = ids.shape[1]
    chunk = max(1, _GATHER_CHUNK_ELEMENTS // max(1, k * h))
    for s in range(0, n, chunk):
        i = ids[s : s + chunk]
        g = gg[s : s + chunk] * ref.temp_col(ref.temp_rows(inv_temp, s, s + chunk), gg)
        if dx is not None:
            dx[s : s + chunk] += torch.einsum("rk,rkh->rh", g, w[i].float()).to(dx.dtype)
        if dw is not None:
            rows = (g.unsqueeze(-1) * x[s : s + chunk].float().unsqueeze(1)).reshape(-1, h)
            dw.index_add_(0, i.reshape(-1), rows.to(dw.dtype))
        if db is not None:
            db.index_add_(0, i.reshape(-1), g.reshape(-1))


def _select_rows(inv_temp, rows):
    """A per-row ``inv_temp`` (tensor ``[N]``) at ``rows`` (None: all); a number passes through."""
    if rows is None or not isinstance(inv_temp, torch.Tensor):
        return inv_temp
    return inv_temp.index_select(0, rows)


def _torch_rows(inv_temp, native):
    """The row op of the torch backend: the native CPU rows (``rlvr_kernels.cpu.vocab_rows``) take a scalar
    temperature only; a temperature per row runs the reference rows."""
    return native if not isinstance(inv_temp, torch.Tensor) else None


def _valid_rows(ignored: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows that count (target not ``ignore_index``), or None when every row counts (one host sync).
    The GEMMs run on those rows only: padding and prompt tokens cost nothing."""
    n_ignored = int(ignored.sum())
    if n_ignored == 0:
        return None
    return (~ignored).nonzero().squeeze(1)


def _triton_linear_forward(hidden, weight, bias, targets, gather_ids, inv_temp, ignore_index, check=True):
    """Triton-backend forward on flattened ``[N, H]`` inputs: ``(logp, entropy, gathered, lse)``, fp32, each ``[N]``
    (``gathered [N, K]``), zero on ignored rows.

    Blocks of rows whose fp32 ``[rows, V]`` logits fit the chunk budget; per block one GEMM (cuBLAS, fp32 result) and
    one Triton row pass (``logits_forward``). Only the rows that count enter the GEMMs."""
    from rlvr_kernels.kernels import logprobs as K

    n, v = hidden.shape[0], weight.shape[0]
    ignored = targets == ignore_index
    rows = _valid_rows(ignored)
    x = hidden if rows is None else hidden.index_select(0, rows)
    t = targets if rows is None else targets.index_select(0, rows)
    it = _select_rows(inv_temp, rows)
    nv = x.shape[0]
    lp = torch.empty(nv, device=hidden.device, dtype=torch.float32)
    ent = torch.empty_like(lp)
    lse = torch.empty_like(lp)
    step = max(1, _gemm.chunk_bytes(hidden.device) // max(1, v * 4))
    for r0 in range(0, nv, step):
        r1 = min(nv, r0 + step)
        z = _gemm.logits_fp32(x[r0:r1], weight, bias)
        lp[r0:r1], ent[r0:r1], lse[r0:r1] = K.logits_forward(z, t[r0:r1], ref.temp_rows(it, r0, r1), ignore_index)
        del z
    if check:
        ref.check_finite_rows(lse, torch.ones_like(lse, dtype=torch.bool), "fused_linear_logprobs")
    if rows is not None:
        lp, ent, lse = (
            torch.zeros(n, device=hidden.device, dtype=torch.float32).index_copy_(0, rows, u) for u in (lp, ent, lse)
        )
    if gather_ids is not None:
        zg = _gathered_logits(ref.inert_rows(hidden, ignored), weight, bias, gather_ids, inv_temp)
        gathered = torch.where(ignored.unsqueeze(1), 0.0, zg - lse.unsqueeze(1))
    else:
        gathered = lp.new_zeros((n, 0))
    return lp, ent, gathered, lse


def _triton_linear_backward(
    hidden,
    w,
    b,
    tgt,
    ids,
    lse,
    ent,
    g_logp,
    g_ent,
    g_gath,
    inv_temp,
    ignore_index,
    need,
    g_lse=None,
    cast=True,
    logit_scale=1.0,
    softcap=None,
    head_fp32=False,
):
    """Triton-backend backward: ``(dx, dw, db)`` in the inputs' dtypes (None where ``need`` says no; ``dx`` stays
    fp32 with ``cast=False``; ``g_lse``: the log-normaliser's upstream gradient; ``logit_scale`` / ``softcap``: TRL's
    logit transforms, :func:`rlvr_kernels.kernels.logprobs.logits_backward`; ``head_fp32``: an fp32 lm_head, ``dz``
    and the gradient GEMMs in fp32, each weight block cast on its own).

    Blocks of vocabulary columns; per block one GEMM recomputes the ``[rows, columns]`` logits, a Triton row pass
    writes ``dz`` in the GEMM dtype, then ``dX += dz W_c`` (fp32 accumulation across blocks) and ``dW_c = dz^T X``
    (one GEMM per block, all rows: no accumulation of dW across blocks) and ``db_c = sum dz``."""
    from rlvr_kernels.kernels import logprobs as K

    need_x, need_w, need_b = need
    n, h = hidden.shape
    v = w.shape[0]
    gl, gh, gg, cp = ref.upstream_coefficients(tgt, ignore_index, g_logp, g_ent, g_gath, ids, torch.float32, g_lse)
    rows = _valid_rows(tgt == ignore_index)
    x, t = hidden, tgt
    it = _select_rows(inv_temp, rows)
    if rows is not None:
        x, t, gl, cp, lse, ent = (u.index_select(0, rows) for u in (hidden, tgt, gl, cp, lse, ent))
        gh = None if gh is None else gh.index_select(0, rows)
    # an fp32 head folds the gathered outputs' one-hot part into each block's fp32 dz (no bf16 accumulation of dW)
    fold = head_fp32 and gg is not None
    if fold:
        gv = gg * ref.temp_col(inv_temp, gg)
        iv = ids
        if rows is not None:
            gv, iv = gv.index_select(0, rows), ids.index_select(0, rows)
    nv = x.shape[0]
    # dz in the GEMM dtype, except fp16, whose dz would underflow small gradients, and an fp32 head (fp32, weight chunk
    # upcast, hidden states upcast once)
    dz_dtype = torch.float32 if (x.dtype == torch.float16 or head_fp32) else x.dtype
    xm = x if dz_dtype == x.dtype else x.to(dz_dtype)
    per_logit = 4 + (0 if dz_dtype == torch.float32 else torch.finfo(dz_dtype).bits // 8)
    cols = K.backward_chunk_columns(nv, v, per_logit, _gemm.chunk_bytes(x.device))
    dx_v = torch.zeros((nv, h), device=x.device, dtype=torch.float32) if need_x else None
    dw = torch.zeros_like(w) if need_w else None
    db = torch.zeros(v, device=x.device, dtype=torch.float32) if need_b else None
    if nv and (need_x or need_w or need_b):
        for v0 in range(0, v, cols):
            v1 = min(v, v0 + cols)
            z = _gemm.logits_fp32(x, w[v0:v1], None if b is None else b[v0:v1])
            out = z if dz_dtype == torch.float32 else torch.empty(z.shape, device=z.device, dtype=dz_dtype)
            dz = K.logits_backward(
                z, t, lse, ent, gl, gh, it, ignore_index, out=out, c_p=cp, col_offset=v0,
                logit_scale=logit_scale, softcap=softcap,
            )  # fmt: skip
            del z
            if fold:
                inside = (iv >= v0) & (iv < v1)
                dz.scatter_add_(1, (iv - v0).clamp(0, v1 - v0 - 1), torch.where(inside, gv, 0.0))
            wc = w[v0:v1] if dz_dtype == w.dtype else w[v0:v1].to(dz_dtype)
            if need_x:
                _gemm.addmm_fp32_(dx_v, dz, wc)
            if need_w:
                _gemm.mm_into(dw[v0:v1], dz.T, xm)
            if need_b:
                db[v0:v1] = dz.sum(0, dtype=torch.float32)
            del dz, out
    dx = None
    if need_x:
        dx = (
            dx_v
            if rows is None
            else torch.zeros((n, h), device=x.device, dtype=torch.float32).index_copy_(0, rows, dx_v)
        )
    if gg is not None and n and not fold:
        _gathered_onehot_grads(ref.inert_rows(hidden, tgt == ignore_index), w, ids, gg, inv_temp, dx, dw, db)
    return (
        None if dx is None else (dx.to(hidden.dtype) if cast else dx),
        dw,
        None if db is None else db.to(b.dtype),
    )


def _out_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def linear_forward(hidden, weight, bias, targets, gather_ids, inv_temp, ignore_index, backend, check=True):
    """The body of ``rlvr_kernels::linear_logprobs`` after the ids' check, on the chosen backend (``check=False``:
    no finiteness check of the rows; a vocabulary shard's caller checks the combined rows)."""
    which = resolve_backend(backend, hidden.device)
    if which == "triton" and hidden.dtype == torch.float64:
        raise TypeError(
            "backend='triton' supports float32, bfloat16 and float16 inputs; use backend='torch' for float64"
        )
    with no_autocast(hidden.device):
        if which == "triton" and hidden.shape[0] > 0:
            return _triton_linear_forward(hidden, weight, bias, targets, gather_ids, inv_temp, ignore_index, check)
        cdt = ref.compute_dtype(hidden, weight, bias)
        w = weight.to(cdt)
        b = None if bias is None else bias.to(cdt)
        return ref.chunked_linear_forward(
            hidden,
            w,
            b,
            targets,
            gather_ids,
            inv_temp,
            ignore_index,
            ref.default_chunk(weight.shape[0], hidden.device, cdt),
            stats=_torch_rows(inv_temp, vocab_rows.row_stats),
            check=check,
        )


def linear_backward(
    hidden, weight, bias, targets, gather_ids, lse, entropy, g_logp, g_ent, g_gath, inv_temp, ignore_index, backend,
    need, g_lse=None, head_fp32=False,
):  # fmt: skip
    """``(dx, dw, db)`` on the chosen backend, None where ``need`` says no; dx in fp32 (float64 for float64 inputs on
    the torch backend), dw and db in the compute dtype. ``g_lse``: the log-normaliser's upstream gradient.
    ``head_fp32``: an fp32 lm_head (TRL's ``cast_lm_head_to_fp32``): Triton computes ``dz`` and the gradient GEMMs in
    fp32; the torch backend always does (its forward's fp32-output GEMM is already the fp32 head's on both)."""
    which = resolve_backend(backend, hidden.device)
    with no_autocast(hidden.device):
        if which == "triton" and hidden.shape[0] > 0:
            return _triton_linear_backward(
                hidden, weight, bias, targets, gather_ids, lse, entropy, g_logp, g_ent, g_gath, inv_temp,
                ignore_index, need, g_lse=g_lse, cast=False, head_fp32=head_fp32,
            )  # fmt: skip
        cdt = ref.compute_dtype(hidden, weight, bias)
        w = weight.to(cdt)
        b = None if bias is None else bias.to(cdt)
        return ref.chunked_linear_backward(
            hidden, w, b, targets, gather_ids, lse, entropy, g_logp, g_ent, g_gath, inv_temp, ignore_index,
            ref.default_chunk(weight.shape[0], hidden.device, cdt), need,
            grad=_torch_rows(inv_temp, vocab_rows.row_grad_), g_lse=g_lse,
        )  # fmt: skip


def logits_forward(logits, targets, temperature, ignore_index, backend, check=True):
    """The body of ``rlvr_kernels::logprobs_from_logits`` after the ids' check: ``(logp, entropy, lse)``
    (``check=False``: no finiteness check of the rows)."""
    which = resolve_backend(backend, logits.device)
    if which == "triton" and logits.dtype == torch.float64:
        raise TypeError(
            "backend='triton' supports float32, bfloat16 and float16 logits; use backend='torch' for float64"
        )
    with no_autocast(logits.device):
        if which == "triton" and logits.shape[0] > 0:
            from rlvr_kernels.kernels import logprobs as K

            z = logits if logits.stride(-1) == 1 else logits.contiguous()
            logp, ent, lse = K.logits_forward(z, targets, 1.0 / temperature, ignore_index)
            if check:
                ref.check_finite_rows(lse, targets != ignore_index, "logprobs_from_logits")
            return logp, ent, lse
        logp, ent, lse = ref.logprobs_from_logits(
            logits.detach(), targets, temperature=temperature, ignore_index=ignore_index,
            stats=_torch_rows(temperature, vocab_rows.row_stats), check=check,
        )  # fmt: skip
        return logp, ent, lse


def logits_backward(logits, targets, lse, entropy, g_logp, g_ent, temperature, ignore_index, backend, g_lse=None):
    """The body of ``rlvr_kernels::logprobs_from_logits_backward``; ``g_lse``: the log-normaliser's upstream
    gradient (:func:`rlvr_kernels.reference.logprobs.upstream_coefficients`)."""
    which = resolve_backend(backend, logits.device)
    with no_autocast(logits.device):
        if which == "triton" and logits.shape[0] > 0:
            from rlvr_kernels.kernels import logprobs as K

            z = logits if logits.stride(-1) == 1 else logits.contiguous()
            gl, gh, _, cp = ref.upstream_coefficients(
                targets, ignore_index, g_logp, g_ent, None, None, torch.float32, g_lse
            )
            return K.logits_backward(z, targets, lse, entropy, gl, gh, 1.0 / temperature, ignore_index, c_p=cp)
        return ref.logits_backward(
            logits, targets, lse, entropy, g_logp, g_ent, temperature, ignore_index,
            grad=_torch_rows(temperature, vocab_rows.row_grad_), g_lse=g_lse,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# the pass with extra outputs (softcap, logit scale, log sum p^2, mean logit, is_top1): TRL's chunked head
# (rlvr_kernels.integrations.trl.ChunkedLogProbFunction) and verl's sum_pi_squared

# Never a clamped target (every row of the pass counts; the callers mask)
_NO_IGNORE = -1


def linear_forward_extras(x, w, b, t, inv_temp, logit_scale, softcap, extras, which):
    """One vocabulary pass over ``x [N, H]`` (compute dtype), ``w [V, H]``, ``b [V]``, targets ``t [N]`` (every row
    counts), with a logit scale and an optional final-logit softcap: ``(logp, entropy, lse)`` ``[N]``
    in the pass's precision (fp32; fp64 for fp64 inputs on the torch backend) and ``extras`` filled with the requested
    extra outputs. One chunk of logits at a time (the package's chunk budget)."""
    n, v = x.shape[0], w.shape[0]
    plain = softcap is None and not extras
    if softcap is None:  # a scale without softcap is a temperature
        inv_temp, logit_scale = inv_temp * logit_scale, 1.0
    parts = []
    if which == "triton":
        from rlvr_kernels.kernels import logprobs as K

        step = max(1, _gemm.chunk_bytes(x.device) // max(1, v * 4))
        for r0 in range(0, n, step):
            z = _gemm.logits_fp32(x[r0 : r0 + step], w, b)
            ex = dict.fromkeys(extras) if extras else None
            out = K.logits_forward(
                z, t[r0 : r0 + step], inv_temp, _NO_IGNORE, logit_scale=logit_scale, softcap=softcap, extras=ex
            )
            parts.append((*out, ex or {}))
            del z
        cdt = torch.float32
    else:
        cdt = ref.compute_dtype(x, w, b)
        w, b = w.to(cdt), (None if b is None else b.to(cdt))
        step = ref.default_chunk(v, x.device, cdt)
        buf = x.new_empty((min(n, step), v), dtype=cdt)
        for r0 in range(0, n, step):
            z = ref._scaled_logits(x[r0 : r0 + step], w, b, 1.0, out=buf)
            tc = t[r0 : r0 + step]
            if plain:
                parts.append((*vocab_rows.row_stats(z, tc, inv_temp, _NO_IGNORE), {}))
            else:
                flags = dict.fromkeys(extras, True)
                parts.append(
                    ref.row_stats_ext(z, tc, inv_temp, _NO_IGNORE, logit_scale=logit_scale, softcap=softcap, **flags)
                )
    if not parts:
        empty = x.new_zeros((0,), dtype=cdt)
        return empty, empty.clone(), empty.clone(), {k: (empty > 0 if k == "is_top1" else empty) for k in extras}
    logp, ent, lse = (torch.cat([p[i] for p in parts]) for i in range(3))
    return logp, ent, lse, {k: torch.cat([p[3][k] for p in parts]) for k in extras}


def linear_backward_extras(x, w, b, t, lse, ent, g_logp, g_ent, g_lse, inv_temp, logit_scale, softcap, need, which):
    """The analytic backward of :func:`linear_forward_extras` (recomputing the logits chunk by chunk): ``(dx, dw,
    db)``, None where ``need`` says no. ``g_lse``: the log-normaliser's own upstream gradient."""
    if softcap is None:
        inv_temp, logit_scale = inv_temp * logit_scale, 1.0
    if which == "triton":
        return _triton_linear_backward(
            x, w, b, t, None, lse, ent, g_logp, g_ent, None, inv_temp, _NO_IGNORE, need, g_lse=g_lse, cast=False,
            logit_scale=logit_scale, softcap=softcap,
        )  # fmt: skip
    cdt = ref.compute_dtype(x, w, b)
    w, b = w.to(cdt), (None if b is None else b.to(cdt))
    if softcap is None:
        grad = vocab_rows.row_grad_
    else:

        def grad(z, tc, ls, en, gl, gh, cp, inv_t, ignore_index):
            return ref.row_grad_ext_(
                z, tc, ls, en, gl, gh, cp, inv_t, ignore_index, logit_scale=logit_scale, softcap=softcap
            )

    return ref.chunked_linear_backward(
        x, w, b, t, None, lse.to(cdt), ent.to(cdt), g_logp, g_ent, None, inv_temp, _NO_IGNORE,
        ref.default_chunk(w.shape[0], x.device, cdt), need, grad=grad, g_lse=g_lse,
    )  # fmt: skip
