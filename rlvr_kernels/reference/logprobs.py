"""Plain-torch reference for per-token log-probs and entropies (the CPU path and the oracle of the Triton kernels).

Math, for scaled logits ``z = (x @ W.T + b) / T`` of one token with target ``y``::

    logp    = z_y - logsumexp(z)
    entropy = -sum_v p_v log p_v,  p = softmax(z)

Computed in float32, or float64 when an input is float64. Rows whose target is ``ignore_index`` give 0 for both
outputs (and no gradient). The per-chunk math is :func:`row_stats` and :func:`row_grad_`; the chunk loops below take
them as arguments (``stats=`` / ``grad=``), so that the ops can hand in the row ops of
:mod:`rlvr_kernels.cpu.vocab_rows` (native on CPU, this math elsewhere) while the reference stays plain torch. The
linear form runs over
token chunks with the analytic gradient, recomputing each chunk's logits in the backward, so it keeps memory
O(N + chunk * V), never O(N * V). Design notes: ``docs/design/vocab-pass.md``.
"""

from __future__ import annotations

import torch

from rlvr_kernels import _gemm
from rlvr_kernels._backend import first_order_backward

# Elements of one [chunk, V] fp32 buffer; the chunked linear path holds a handful of them at once.
CHUNK_ELEMENTS = 1 << 21


def temp_col(inv_temp, like: torch.Tensor | None = None):
    """``inv_temp`` (a number, or a per-row tensor ``[n]``: a temperature per token) shaped to scale ``[n, V]``
    logits (a tensor becomes ``[n, 1]``, in ``like``'s dtype)."""
    if not isinstance(inv_temp, torch.Tensor):
        return inv_temp
    return inv_temp.to(like.dtype if like is not None else inv_temp.dtype).unsqueeze(1)


def temp_rows(inv_temp, s: int, e: int):
    """Rows ``[s, e)`` of a per-row ``inv_temp`` (a number passes through)."""
    return inv_temp[s:e] if isinstance(inv_temp, torch.Tensor) else inv_temp


def temp_is_one(inv_temp) -> bool:
    """Whether ``inv_temp`` is the number 1 (no scaling); a per-row tensor never is."""
    return not isinstance(inv_temp, torch.Tensor) and inv_temp == 1.0


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = True,
    stats=None,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch backend of :func:`rlvr_kernels.logprobs_from_logits` on ``[N, V]`` logits (no autograd), one
    ``[chunk, V]`` row block at a time through ``stats`` (default :func:`row_stats`).

    Returns fp32 (fp64 for fp64 logits) ``logp [N]``, ``entropy [N]`` (None when not requested) and ``lse [N]``.
    ``check=False`` skips the finiteness check (a vocabulary shard's caller checks the combined rows instead).
    """
    cdt = compute_dtype(logits)
    n, v = logits.shape
    if n == 0:
        empty = logits.new_zeros((0,), dtype=cdt) + logits.sum() * 0
        return empty, (empty.clone() if return_entropy else None), empty.clone()
    chunk = max(1, CHUNK_ELEMENTS // max(v, 1))
    logp = logits.new_empty(n, dtype=cdt)
    ent = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    for s in range(0, n, chunk):
        t = targets[s : s + chunk]
        inv = temp_rows(1.0 / temperature, s, s + chunk)
        lp, en, ls = (stats or row_stats)(logits[s : s + chunk].detach().to(cdt), t, inv, ignore_index)
        logp[s : s + chunk], ent[s : s + chunk], lse[s : s + chunk] = lp, en, ls
    # a row that counts has a finite log-normaliser (NaN, +inf or all -inf logits do not)
    if check:
        check_finite_rows(lse, targets != ignore_index, "logprobs_from_logits")
    return logp, (ent if return_entropy else None), lse


def logits_backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    temperature: float | torch.Tensor,
    ignore_index: int,
    grad=None,
    g_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """The analytic gradient of :func:`logprobs_from_logits` with respect to ``logits [N, V]`` (in their dtype),
    from the forward's ``lse`` and ``entropy``, chunked over rows like the forward (``grad``: default
    :func:`row_grad_`):
    ``(g_logp (onehot - p) - g_ent p (log p + H) + g_lse p) / T``; ignored rows get 0 whatever their logits hold.
    ``g_lse`` (optional ``[N]``): the upstream gradient of the log-normaliser."""
    cdt = compute_dtype(logits)
    n, v = logits.shape
    out = torch.empty_like(logits)
    chunk = max(1, CHUNK_ELEMENTS // max(v, 1))
    gl, gh, _, cp = upstream_coefficients(targets, ignore_index, g_logp, g_ent, None, None, cdt, g_lse)
    inv_temp = 1.0 / temperature  # a number, or [N] with a temperature per row
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        z = torch.empty((e - s, v), dtype=cdt, device=logits.device).copy_(logits[s:e])  # never the caller's
        (grad or row_grad_)(
            z, targets[s:e], lse[s:e], entropy[s:e], gl[s:e], None if gh is None else gh[s:e], cp[s:e],
            temp_rows(inv_temp, s, e), ignore_index,
        )  # fmt: skip
        out[s:e] = z
    return out


def inert_rows(x: torch.Tensor, ignored: torch.Tensor) -> torch.Tensor:
    """``x [n, H]`` with the ``ignored [n]`` rows set to 0 when one of them holds a non-finite value, else ``x``
    itself (no copy). Padding rows may hold anything (attention kernels leave NaN there); a zero gradient row times
    NaN would still be NaN in ``dz.T @ x``, so they must not reach a GEMM. (Up to two host syncs.)"""
    if x.shape[0] == 0 or not bool(ignored.any()):
        return x
    if bool(torch.isfinite(x[ignored]).all()):
        return x
    return torch.where(ignored.unsqueeze(1), torch.zeros((), dtype=x.dtype, device=x.device), x)


def _scaled_logits(x, w, b, inv_temp, out: torch.Tensor | None = None):
    """``(x @ w.T + b) * inv_temp`` as one ``[n, V]`` tensor (bias and scale applied in place): the first ``n`` rows
    of ``out`` (a reused chunk buffer: no fresh allocation, hence no page faults, per chunk) or a fresh tensor."""
    x = x.to(w.dtype)
    if out is None:
        z = x @ w.T
    else:
        z = torch.mm(x, w.T, out=out[: x.shape[0]])
    if b is not None:
        z += b
    if inv_temp != 1.0:
        z *= inv_temp
    return z


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two ``[n, V]`` tensors as a batched GEMV (no ``[n, V]`` temporary)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def scaled_logit_stats(z: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100):
    """No-grad statistics of one chunk of scaled logits, overwriting ``z`` (it becomes ``z - max``).

    z ``[n, V]`` (already divided by the temperature, a buffer the caller gives up), targets int64 ``[n]``. With the
    row max ``m``, ``d = z - m``, ``s = sum exp(d)`` and ``a = sum exp(d) d``: ``lse = m + log s``,
    ``logp = d_y - log s`` and ``entropy = log s - a / s`` (relative to the max, as the Triton kernel: no
    cancellation at large logits, one ``exp`` and no ``log`` over ``[n, V]``). Returns ``(logp [n], entropy [n],
    lse [n])`` in ``z``'s dtype; ignored rows give 0 (``lse`` is kept for them). Entries with ``z = -inf`` have
    ``p = 0`` and add nothing.
    """
    m = z.amax(dim=1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    d = z.sub_(m.unsqueeze(1))
    e = d.exp()
    sum_e = e.sum(1)
    a = _rowdot(e, d)
    bad = torch.isnan(a)
    if bool(bad.any()):  # rows with -inf logits: exp(-inf) * -inf; those entries add nothing
        rows = bad.nonzero().squeeze(1)
        dr = d[rows]
        a[rows] = _rowdot(e[rows], torch.where(e[rows] > 0, dr, torch.zeros_like(dr)))
    log_s = sum_e.log()
    ignored = targets == ignore_index
    safe = torch.where(ignored, torch.zeros_like(targets), targets)
    zero = z.new_zeros(())
    logp = torch.where(ignored, zero, d.gather(1, safe.unsqueeze(1)).squeeze(1) - log_s)
    entropy = torch.where(ignored, zero, log_s - a / sum_e)
    return logp, entropy, m + log_s


def dlogits_from_scaled_logits(z, lse, entropy, targets, g_logp, g_ent, c_p):
    """``dL/dz = g_logp onehot - c_p p - g_ent p (log p + H)`` for one chunk of scaled logits ``z [n, V]`` with
    log-normalisers ``lse [n]``, written into ``z``'s storage (one ``[n, V]`` temporary, the probabilities).

    entropy, g_logp, c_p ``[n]`` (c_p = g_logp + the sum of the gathered outputs' gradients, which take their ``-p``
    part here); g_ent ``[n]`` or None. Rows to ignore carry zero gradients and must hold finite logits. The caller
    multiplies by ``1 / T`` and adds the gathered outputs' one-hot part.
    """
    logz = z.sub_(lse.unsqueeze(1))
    p = logz.exp()
    if g_ent is not None:
        # -p * (c_p + g_ent (log p + H)); log p = -inf where p = 0 (masked vocabulary) must not give 0 * inf
        dz = logz.nan_to_num_(nan=0.0, neginf=0.0).add_(entropy.unsqueeze(1)).mul_(g_ent.unsqueeze(1))
        dz.add_(c_p.unsqueeze(1)).mul_(p).neg_()
    else:
        dz = logz.copy_(p).mul_(-c_p.unsqueeze(1))
    safe = torch.where(g_logp != 0, targets, torch.zeros_like(targets)).clamp_min(0)
    dz.scatter_add_(1, safe.unsqueeze(1), g_logp.unsqueeze(1))
    return dz


def row_stats(z: torch.Tensor, targets: torch.Tensor, inv_temp: float | torch.Tensor, ignore_index: int):
    """``(logp, entropy, lse)`` ``[n]`` of the scaled logits ``z * inv_temp`` of one chunk (``z [n, V]`` unscaled, not
    modified; one scaled copy): :func:`scaled_logit_stats`."""
    return scaled_logit_stats(z * temp_col(inv_temp, z), targets, ignore_index=ignore_index)


def row_grad_(z, targets, lse, entropy, g_logp, g_ent, c_p, inv_temp, ignore_index: int) -> torch.Tensor:
    """``z [n, V]`` (unscaled logits) overwritten with ``dL/dz = inv_temp (g_logp onehot - p (c_p + g_ent (log p +
    H)))`` (:func:`dlogits_from_scaled_logits`); ignored rows become 0 whatever they (or their ``lse``) held."""
    if not temp_is_one(inv_temp):
        z.mul_(temp_col(inv_temp, z))
    dlogits_from_scaled_logits(z, lse, entropy, targets, g_logp, g_ent, c_p)
    if not temp_is_one(inv_temp):
        z.mul_(temp_col(inv_temp, z))
    return z.masked_fill_((targets == ignore_index).unsqueeze(1), 0.0)


def transform_logits_(z: torch.Tensor, logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor | None:
    """The logit transforms of TRL's fused head, in place on unscaled logits ``z [n, V]``: ``z <- logit_scale * z``,
    then (with ``softcap`` ``c``) ``z <- c tanh(z / c)``; the temperature comes after (the row functions' ``inv_temp``).
    Returns ``tanh(z / c)`` (the softcap's chain rule needs ``1 - tanh^2``), or None without softcap."""
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    if softcap is None:
        return None
    t = torch.tanh(z.div_(softcap))
    z.copy_(t).mul_(softcap)
    return t


def row_stats_ext(
    z: torch.Tensor,
    targets: torch.Tensor,
    inv_temp: float,
    ignore_index: int,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    log_sum_sq_probs: bool = False,
    mean_logits: bool = False,
    is_top1: bool = False,
):
    """:func:`row_stats` with TRL's logit transforms and extra outputs, for one chunk of unscaled logits ``z [n, V]``
    (not modified; one transformed copy). The transformed logits are ``x = softcap(logit_scale z) * inv_temp``
    (:func:`transform_logits_`). Returns ``(logp, entropy, lse, extras)`` ``[n]`` in z's dtype, ``extras`` a dict
    holding the requested ones of ``log_sum_sq_probs = log sum_v p_v^2``, ``mean_logits = mean_v x_v`` and ``is_top1``
    (bool: ``x_y`` is the row's maximum and no earlier column equals it, as ``argmax``). Ignored rows give 0 for logp
    and entropy only."""
    x = z.clone()
    transform_logits_(x, logit_scale, softcap)
    if not temp_is_one(inv_temp):
        x.mul_(temp_col(inv_temp, x))
    extras = {}
    if mean_logits:
        extras["mean_logits"] = x.mean(1)
    if is_top1:
        n, v = x.shape
        safe = targets.clamp(0, v - 1)
        xt = x.gather(1, safe.unsqueeze(1)).squeeze(1)
        before = torch.arange(v, device=x.device).unsqueeze(0) < targets.unsqueeze(1)
        max_before = x.masked_fill(~before, float("-inf")).amax(1)
        extras["is_top1"] = (xt >= x.amax(1)) & (xt > max_before)
    if log_sum_sq_probs:
        # log sum_v p_v^2 = logsumexp(2 x) - 2 lse; computed before scaled_logit_stats overwrites x
        extras["log_sum_sq_probs"] = torch.logsumexp(2 * x, 1)
    logp, ent, lse = scaled_logit_stats(x, targets, ignore_index=ignore_index)
    if log_sum_sq_probs:
        extras["log_sum_sq_probs"] = extras["log_sum_sq_probs"] - 2 * lse
    return logp, ent, lse, extras


def row_grad_ext_(
    z,
    targets,
    lse,
    entropy,
    g_logp,
    g_ent,
    c_p,
    inv_temp: float,
    ignore_index: int,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """:func:`row_grad_` through TRL's logit transforms: ``z [n, V]`` (unscaled logits) overwritten with ``dL/dz =
    logit_scale (1 - tanh^2(logit_scale z / c)) inv_temp dL/dx`` (without softcap the ``tanh`` factor is 1), where
    ``dL/dx = g_logp onehot - p (c_p + g_ent (log p + H))``; ignored rows become 0."""
    t = transform_logits_(z, logit_scale, softcap)
    row_grad_(z, targets, lse, entropy, g_logp, g_ent, c_p, inv_temp, ignore_index)
    if t is not None:
        z.mul_(t.mul_(t).neg_().add_(1.0))
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    return z


def _zero_ignored(x: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """One chunk's hidden rows with the ignored ones replaced by 0 (a chunk-sized copy): padding holding NaN/inf
    then reaches neither the statistics nor ``dz.T @ x``."""
    return torch.where((targets == ignore_index).unsqueeze(1), torch.zeros((), dtype=x.dtype, device=x.device), x)


def check_finite_rows(lse: torch.Tensor, keep: torch.Tensor, what: str) -> None:
    """Raise a ``ValueError`` naming ``what`` when a row that takes part in the result has a non-finite
    log-normaliser: NaN/inf in the inputs, or logits beyond the float32 range (one host sync)."""
    bad = keep & ~torch.isfinite(lse)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{what}: the logits of row {row} (a row that is not ignore_index) are not finite: NaN/inf in the "
            "inputs, or logits / temperature beyond the float32 range"
        )


def upstream_coefficients(targets, ignore_index, g_logp, g_ent, g_gath, gather_ids, dtype, g_lse=None):
    """Per-row gradient coefficients from the upstream gradients (None = unused output), zero on ignored rows.

    Returns ``(g_logp [N], g_ent [N] | None, g_gath [N, K] | None, c_p [N])`` in ``dtype``, where
    ``c_p = g_logp + sum_k g_gath[:, k] - g_lse`` multiplies the ``-p`` term: every log-prob output contributes
    ``-p`` through its ``-lse``, and the log-normaliser's own gradient ``g_lse`` (optional ``[N]``) adds ``+p``. The
    vocabulary-parallel ops use it for the outputs whose one-hot part lies on another rank's shard.
    """
    keep = (targets != ignore_index).to(dtype)
    gl = g_logp.to(dtype) * keep if g_logp is not None else keep * 0
    gh = g_ent.to(dtype) * keep if g_ent is not None else None
    gg = g_gath.to(dtype) * keep.unsqueeze(1) if (g_gath is not None and gather_ids is not None) else None
    cp = gl + gg.sum(1) if gg is not None else gl
    if g_lse is not None:
        cp = cp - g_lse.to(dtype) * keep
    return gl, gh, gg, cp


def chunked_linear_forward(x, w, b, targets, gather_ids, inv_temp, ignore_index, chunk, stats=None, check=True):
    """Token-chunked forward: ``x [N, H]``, ``w [V, H]`` and ``b [V]`` already in the compute dtype. Returns
    ``(logp [N], entropy [N], gathered [N, K], lse [N])``; one ``[chunk, V]`` block live at a time, its statistics
    from ``stats`` (default :func:`row_stats`). ``check=False`` skips the finiteness check of the rows."""
    n = x.shape[0]
    cdt = w.dtype
    logp = x.new_empty(n, dtype=cdt)
    ent = x.new_empty(n, dtype=cdt)
    lse = x.new_empty(n, dtype=cdt)
    k = 0 if gather_ids is None else gather_ids.shape[1]
    gathered = x.new_empty((n, k), dtype=cdt)
    buf = x.new_empty((min(n, chunk), w.shape[0]), dtype=cdt)  # the one chunk buffer
    for s in range(0, n, chunk):
        t = targets[s : s + chunk]
        z = _scaled_logits(_zero_ignored(x[s : s + chunk], t, ignore_index), w, b, 1.0, out=buf)
        inv = temp_rows(inv_temp, s, s + chunk)
        lp, en, ls = (stats or row_stats)(z, t, inv, ignore_index)
        logp[s : s + chunk], ent[s : s + chunk], lse[s : s + chunk] = lp, en, ls
        if gather_ids is not None:
            zg = z.gather(1, gather_ids[s : s + chunk]) * temp_col(inv, z) - ls.unsqueeze(1)
            gathered[s : s + chunk] = torch.where((t == ignore_index).unsqueeze(1), 0.0, zg)
    if check:
        check_finite_rows(lse, targets != ignore_index, "fused_linear_logprobs")
    return logp, ent, gathered, lse


def chunked_linear_backward(
    x, w, b, targets, ids, lse, ent, g_logp, g_ent, g_gath, inv_temp, ignore_index, chunk, need, grad=None, g_lse=None
):
    """The analytic backward of :func:`chunked_linear_forward`, recomputing each chunk's logits: ``(dx, dw, db)`` in
    the compute dtype (``w``'s), None where ``need`` (three flags) says no; ``dz`` from ``grad`` (default
    :func:`row_grad_`); ``g_lse``: the log-normaliser's upstream gradient (:func:`upstream_coefficients`)."""
    need_x, need_w, need_b = need
    n, cdt = x.shape[0], w.dtype
    gl, gh, gg, cp = upstream_coefficients(targets, ignore_index, g_logp, g_ent, g_gath, ids, cdt, g_lse)
    # every row of dx is written by its chunk's GEMM; the first chunk writes dw, later ones accumulate (no zero fill)
    dx = torch.empty(x.shape, dtype=cdt, device=x.device) if need_x else None
    dw = torch.empty(w.shape, dtype=cdt, device=w.device) if need_w else None
    if need_w and n == 0:
        dw.zero_()
    db = torch.zeros(w.shape[0], dtype=cdt, device=w.device) if need_b else None
    buf = x.new_empty((min(n, chunk), w.shape[0]), dtype=cdt)  # the one chunk buffer, dz written over the logits
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        xc = _zero_ignored(x[s:e].to(cdt), targets[s:e], ignore_index)
        z = _scaled_logits(xc, w, b, 1.0, out=buf)
        inv = temp_rows(inv_temp, s, e)
        dz = (grad or row_grad_)(
            z, targets[s:e], lse[s:e], ent[s:e], gl[s:e], None if gh is None else gh[s:e], cp[s:e], inv,
            ignore_index,
        )  # fmt: skip
        if gg is not None:
            dz.scatter_add_(1, ids[s:e], gg[s:e] * temp_col(inv, dz))
        if need_x:
            torch.mm(dz, w, out=dx[s:e])  # straight into the rows of dx (no temporary)
        if need_w:
            if s == 0:
                torch.mm(dz.T, xc, out=dw)
            else:
                dw.addmm_(dz.T, xc)
        if need_b:
            db += dz.sum(0)
    return dx, dw, db


def default_chunk(v: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> int:
    """Rows per chunk of the linear form's torch path: ``[rows, V]`` logits of ``dtype`` within the package's chunk
    budget for ``device`` (:func:`rlvr_kernels._gemm.chunk_bytes`: 16 MiB on CPU, ``RLVR_KERNELS_CHUNK_BYTES``);
    without a device, about ``CHUNK_ELEMENTS / V``. Few rows make slow GEMMs: 256 rows at ``V = 16384`` run the CPU
    GEMM about 1.4x faster than 128."""
    if device is None:
        return max(1, CHUNK_ELEMENTS // max(v, 1))
    per_row = max(v, 1) * torch.finfo(dtype).bits // 8
    return max(1, _gemm.chunk_bytes(device) // per_row)


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """Token-chunked forward and analytic backward: O(N) saved, one ``[chunk, V]`` block live at a time."""

    @staticmethod
    def forward(ctx, x, w, b, targets, gather_ids, inv_temp, ignore_index, chunk):
        logp, ent, gathered, lse = chunked_linear_forward(x, w, b, targets, gather_ids, inv_temp, ignore_index, chunk)
        ctx.save_for_backward(x, w, b, targets, gather_ids, lse, ent)
        ctx.inv_temp, ctx.ignore_index, ctx.chunk = inv_temp, ignore_index, chunk
        ctx.set_materialize_grads(False)
        return logp, ent, gathered

    @staticmethod
    @first_order_backward
    def backward(ctx, g_logp, g_ent, g_gath):
        x, w, b, targets, ids, lse, ent = ctx.saved_tensors
        dx, dw, db = chunked_linear_backward(
            x,
            w,
            b,
            targets,
            ids,
            lse,
            ent,
            g_logp,
            g_ent,
            g_gath,
            ctx.inv_temp,
            ctx.ignore_index,
            ctx.chunk,
            ctx.needs_input_grad[:3],
        )
        return dx, dw, db, None, None, None, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = True,
    gather_ids: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Reference of :func:`rlvr_kernels.fused_linear_logprobs` on flattened inputs.

    hidden ``[N, H]``, weight ``[V, H]``, targets int64 ``[N]``, bias ``[V]`` or None, gather_ids int64 ``[N, K]`` or
    None. Computes in float32 (float64 if an input is float64); the weight is cast once (a weight-sized copy when
    it is not already in that dtype). Token chunks of ``chunk_size`` rows (default: about ``CHUNK_ELEMENTS / V``);
    the forward saves O(N) values and the backward recomputes each chunk's logits, so memory stays
    O(N + chunk * V) plus the gradients. Returns ``(logp [N], entropy [N] | None, gathered [N, K] | None)``;
    the entropy output is computed either way and dropped when not requested.
    """
    cdt = compute_dtype(hidden, weight, bias)
    w = weight.to(cdt)
    b = None if bias is None else bias.to(cdt)
    chunk = chunk_size or default_chunk(weight.shape[0])
    logp, ent, gathered = _ChunkedLinearLogprobs.apply(
        hidden, w, b, targets, gather_ids, 1.0 / temperature, ignore_index, chunk
    )
    return logp, (ent if return_entropy else None), (gathered if gather_ids is not None else None)
