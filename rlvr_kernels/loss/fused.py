"""The fused path of :class:`rlvr_kernels.RLVRLoss`: loss and gradients in one pass over sequence-aligned chunks.

Per chunk the logits block is computed once; its statistics give log-probs and entropies, the token pass gives the
per-token gradient coefficients through autograd on ``[rows, T]`` tensors only, ``dz`` is formed in place and dX,
dW, db follow by GEMMs (3 GEMM-equivalents, one chunk buffer; ``docs/design/vocab-pass.md``). Chunks are blocks of
whole rows, or segments of a row when the configuration is token-local (:func:`rlvr_kernels.methods.token_local`).
Backward only scales the gradients computed here. The whole pass is one custom op, ``rlvr_kernels::fused_loss``
(:func:`fused_loss`), so ``torch.compile(fullgraph=True)`` traces a caller without a graph break.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from rlvr_kernels import _gemm
from rlvr_kernels import methods as M
from rlvr_kernels._backend import first_order_backward, resolve_backend
from rlvr_kernels.cpu import vocab_rows
from rlvr_kernels.loss.token_pass import (
    ROW_SUMS,
    SCALAR_SUMS,
    Batch,
    TokenSums,
    pack_sums,
    present_sums,
    token_pass,
    unpack_sums,
)
from rlvr_kernels.parallel import vocab as pv
from rlvr_kernels.reference import logprobs as ref_lp
from rlvr_kernels.vocab_pass import temperature_rows


def cdt_of(x, w, b, use_triton: bool) -> torch.dtype:
    """The dtype of the fused pass's GEMM operands: the weight's on Triton, else fp32 (float64 for float64)."""
    return w.dtype if use_triton else ref_lp.compute_dtype(x, w, b)


def chunk_budget(device: torch.device) -> int:
    """Bytes of the fp32 ``[rows * T, V]`` logits block the fused path holds at a time (the package's chunk budget,
    ``rlvr_kernels._gemm.chunk_bytes``: 1 GiB on CUDA, 16 MiB on CPU, ``RLVR_KERNELS_CHUNK_BYTES`` to change it)."""
    return _gemm.chunk_bytes(device)


def chunks(cfg, B: int, T: int, V: int, device: torch.device) -> list[tuple[slice, slice]]:
    """``(rows, cols)`` slices of the fused path: blocks of whole rows whose fp32 ``[rows * T, V]`` logits fit the
    chunk budget, or, when one row does not fit and the configuration is token-local, segments of a row."""
    budget = chunk_budget(device)
    if T * V * 4 <= budget or not M.token_local(cfg):
        step = max(1, min(B, budget // max(1, T * V * 4)))
        return [(slice(r0, min(B, r0 + step)), slice(None)) for r0 in range(0, B, step)]
    seg = max(1, budget // max(1, V * 4))
    return [(slice(r, r + 1), slice(c0, min(T, c0 + seg))) for r in range(B) for c0 in range(0, T, seg)]


@dataclasses.dataclass
class FusedResult:
    """What one fused pass produces: the loss value (fp32 0-dim, detached), the gradients of the loss w.r.t. the
    hidden states, weight and bias (None where not wanted), the summed metric numerators and the ``[B, T]`` mask of
    the tokens that took part."""

    loss: torch.Tensor
    grads: tuple
    sums: TokenSums
    active: torch.Tensor


def fused_pass(
    cfg,
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor],
    batch,
    q: Optional[float],
    norm,
    ent_norm,
    need: tuple[bool, bool, bool],
    shard: Optional[pv.VocabShard] = None,
    reduce_dx: bool = True,
    temperature: Optional[torch.Tensor] = None,
) -> FusedResult:
    """Loss, gradients and metric sums of the batch ``batch`` (``rlvr_kernels.loss.api.Batch``) over chunks.

    ``x [B, T, H]``, ``w [V, H]``, ``b [V]``; ``need``: which of (dx, dw, db) to compute. The torch path computes in
    fp32 (float64 for float64 inputs); the Triton path keeps the GEMM operands in the input dtype with fp32 logits.
    With ``shard`` (a vocabulary-sharded head: ``w``/``b`` are this rank's rows, the ids global) each chunk's row
    statistics are combined over the shard's group (:func:`rlvr_kernels.parallel.vocab.combine`: one all-gather of
    O(rows) values) before the token pass, which every rank then runs alike; dW/db are the shard's and each chunk's
    dX is summed over the group (one all-reduce in fp32) unless ``reduce_dx`` is False. ``temperature``: a
    ``[B, T]`` float tensor, one temperature per token (> 0 and finite where the id is not ``ignore_index``; the
    others are not read), instead of ``cfg.temperature``; every shard's logits are divided by it alike.
    """
    B, T, H = x.shape
    V = w.shape[0]
    # every rank must cut the same chunks (its collectives pair with the others'): plan for the largest shard
    v_plan = V if shard is None else pv.max_over(V, shard.group, x.device)
    use_triton = resolve_backend(cfg.backend, x.device) == "triton"
    inv_temp = 1.0 / cfg.temperature
    inv_all = None  # a temperature per token: 1 / T [B, T] in the dtype of the row statistics (1 on ignored tokens)
    if temperature is not None:
        stat_dtype = torch.float64 if cdt_of(x, w, b, use_triton) == torch.float64 else torch.float32
        inv_all = temperature_rows(temperature, batch.ids, cfg.ignore_index, stat_dtype, True, False)
    need_x, need_w, need_b = need
    need_b = need_b and b is not None
    cdt = cdt_of(x, w, b, use_triton)
    w_mm = w if use_triton else w.to(cdt)
    # dz in the GEMM dtype (fp16: fp32, small gradients would underflow)
    dz_dtype = torch.float32 if (use_triton and w.dtype == torch.float16) else cdt
    plan = chunks(cfg, B, T, v_plan, x.device)
    dx = torch.zeros((B, T, H), device=x.device, dtype=x.dtype) if need_x else None
    # dW sums over the chunks: in fp32 when there are several (bf16 sums across chunks bias the update)
    dw_dtype = torch.float32 if (len(plan) > 1 and w_mm.dtype in (torch.bfloat16, torch.float16)) else w_mm.dtype
    dw = torch.empty(w.shape, device=w.device, dtype=dw_dtype) if need_w else None
    dw_written = False  # the first chunk writes dW (no zero-filled [V, H] to add to), later ones accumulate
    db = torch.zeros(V, device=w.device, dtype=torch.float32) if need_b else None
    loss = x.new_zeros((), dtype=torch.float32)
    sums = TokenSums.empty(B, x.device)
    active_all = torch.zeros((B, T), device=x.device, dtype=torch.float32)
    lse_all = torch.zeros((B, T), device=x.device, dtype=torch.float32)  # checked once, after the last chunk
    # torch path: the one chunk buffer, reused (a fresh [rows, V] block per chunk costs page faults on CPU)
    rows_max = max((len(range(B)[sl]) * len(range(T)[cols]) for sl, cols in plan), default=0)
    buf = None if use_triton else torch.empty((rows_max, V), device=x.device, dtype=cdt)
    for sl, cols in plan:
        rows = batch.rows(sl, cols)
        nr, nc = rows.mask.shape
        tc_all = rows.ids.reshape(-1)
        # only the rows that count enter the GEMMs (padding and prompt tokens cost nothing, and NaN/inf there reaches
        # neither the logits nor dW); the others get logp = entropy = 0
        keep = (tc_all != cfg.ignore_index).nonzero().squeeze(1)
        tc = tc_all.index_select(0, keep)
        tc_loc, own = (tc, None) if shard is None else shard.local_ids(tc)
        xc = x[sl, cols].reshape(-1, H).index_select(0, keep).to(cdt)
        it = inv_temp if inv_all is None else inv_all[sl, cols].reshape(-1).index_select(0, keep)
        if use_triton:
            from rlvr_kernels.kernels import logprobs as K

            z = _gemm.logits_fp32(xc, w, b)
            lp_k, ent_k, lse_k = K.logits_forward(z, tc_loc, it, cfg.ignore_index)
        else:
            z = ref_lp._scaled_logits(xc, w_mm, None if b is None else b.to(cdt), 1.0, out=buf)
            # the native rows take one scalar temperature; a temperature per token runs the reference rows
            stats = vocab_rows.row_stats if inv_all is None else ref_lp.row_stats
            lp_k, ent_k, lse_k = stats(z, tc_loc, it, cfg.ignore_index)
        if shard is not None:  # this shard's statistics -> the whole vocabulary's, on every rank alike
            every = torch.ones_like(tc, dtype=torch.bool)
            target_logit = torch.where(own, lp_k + lse_k, torch.zeros_like(lp_k))
            (lp_k, ent_k, _, lse_k), vocab = pv.combine(
                shard, lse_k, ent_k, target_logit, lp_k.new_zeros((lp_k.shape[0], 0)), every, None, "RLVRLoss"
            )
            pv.check_global_ids(tc, every, vocab, "selected_token_ids")
        lp = _scatter_rows(lp_k, keep, nr * nc)
        ent = _scatter_rows(ent_k, keep, nr * nc)
        # per-token gradient coefficients of the loss, from a small autograd graph over [rows, T] only
        lp_leaf = lp.view(nr, nc).float().requires_grad_()
        ent_leaf = ent.view(nr, nc).float().requires_grad_()
        with torch.enable_grad():
            chunk_loss, chunk_sums, active = token_pass(cfg, lp_leaf, ent_leaf, rows, q, norm, ent_norm)
            g_lp, g_ent = torch.autograd.grad(chunk_loss, [lp_leaf, ent_leaf], allow_unused=True)
        g_lp = g_lp.reshape(-1).index_select(0, keep) if g_lp is not None else torch.zeros_like(lp_k)
        g_ent = g_ent.reshape(-1).index_select(0, keep) if g_ent is not None else None
        # on a shard, the one-hot part of a target another shard owns moves into the normaliser's gradient
        g_own, g_lse = (g_lp, None) if shard is None else (torch.where(own, g_lp, 0.0), torch.where(own, 0.0, -g_lp))
        if use_triton:
            out = z if dz_dtype == torch.float32 else torch.empty(z.shape, device=z.device, dtype=dz_dtype)
            dz = K.logits_backward(
                z, tc_loc, lse_k, ent_k, g_own, g_ent, it, cfg.ignore_index, out=out, c_p=g_lp.float()
            )
        else:
            gl, gh, _, cp = ref_lp.upstream_coefficients(tc_loc, cfg.ignore_index, g_own, g_ent, None, None, cdt, g_lse)
            grad = vocab_rows.row_grad_ if inv_all is None else ref_lp.row_grad_
            dz = grad(z, tc_loc, lse_k, ent_k, gl, gh, cp, it, cfg.ignore_index)
        del z
        loss += chunk_loss.detach().float()
        active_all[sl, cols] = active.detach()
        lse_all[sl, cols] = _scatter_rows(lse_k, keep, nr * nc).view(nr, nc)
        sums = sums.add(chunk_sums, sl, B)
        w_dz = w_mm if dz.dtype == w_mm.dtype else w_mm.to(dz.dtype)
        if need_x:
            dx_k = _gemm.mm_fp32(dz, w_dz)
            if shard is not None and reduce_dx:
                pv.all_reduce_sum_(dx_k, shard.group)
            dx_c = _scatter_rows(dx_k, keep, nr * nc)
            dx[sl, cols] = dx_c.view(nr, nc, H).to(x.dtype)
        if need_w:
            xd = xc if xc.dtype == dz.dtype else xc.to(dz.dtype)
            if not dw_written and dw.dtype == dz.dtype:
                torch.mm(dz.T, xd, out=dw)
            else:
                if not dw_written:
                    dw.zero_()
                if dw.dtype == torch.float32:
                    _gemm.addmm_fp32_(dw, dz.T, xd)
                else:  # one chunk, or every operand in dw's dtype
                    dw.addmm_(dz.T, xd)
            dw_written = True
        if need_b:
            db += dz.sum(0, dtype=torch.float32)
        del dz
    # one host sync for the whole batch (not one per chunk): a row that counts has finite logits
    ref_lp.check_finite_rows(lse_all.view(-1), batch.ids.reshape(-1) != cfg.ignore_index, "RLVRLoss")
    if need_w and not dw_written:  # no chunk ran
        dw.zero_()
    grads = (dx, None if dw is None else dw.to(w.dtype), None if db is None else db.to(b.dtype))
    return FusedResult(loss, grads, sums, active_all)


# ----------------------------------------------------------------------------------------------------------------
# The fused pass as one PyTorch custom op (torch.library): opaque to torch.compile, so its chunk loop, row compaction
# (nonzero), per-chunk autograd graph and finiteness check (host reads) cost no graph break. The configuration travels
# as canonical JSON (LossConfig.to_json), the batch as tensors; the gradients are computed in the forward and the
# registered backward only scales them by the upstream gradient.

_AUTOGRAD_KEYS = (
    torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality)
    | torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradOther)
    | torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradNestedTensor)
    | torch._C.DispatchKeySet(torch._C.DispatchKey.ADInplaceOrView)
)


@contextlib.contextmanager
def _autograd_inside_op():
    """Autograd for the body of a custom op: the dispatcher runs an op's implementation with the autograd keys
    excluded (below autograd), which would make the token pass's small graph (``torch.autograd.grad`` per chunk)
    record nothing; this re-includes them for the block (grad mode stays as it is)."""
    tls = torch._C
    include, exclude = tls._dispatch_tls_local_include_set(), tls._dispatch_tls_local_exclude_set()
    with tls._ForceDispatchKeyGuard(include, exclude - _AUTOGRAD_KEYS):
        yield


def check_token_ids(ids: torch.Tensor, keep: torch.Tensor, v: int) -> None:
    """``ids`` in ``[0, v)`` where ``keep`` (the loss tokens) is True, one host read: the vocabulary kernels index rows
    by them. The loss's eager checks and the fused op (compiled callers) share it."""
    bad = keep & ((ids < 0) | (ids >= v))
    if ids.numel() and bool(bad.any()):
        raise ValueError(
            f"selected_token_ids must lie in [0, {v}) on loss tokens (attention_mask != 0); found {int(ids[bad][0])}"
        )


@torch.library.custom_op("rlvr_kernels::fused_loss", mutates_args=())
def _fused_loss_op(
    config: str,
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor],
    ids: torch.Tensor,
    valid: torch.Tensor,
    mask: torch.Tensor,
    adv: torch.Tensor,
    old: Optional[torch.Tensor],
    ref: Optional[torch.Tensor],
    is_ratio: Optional[torch.Tensor],
    mu: Optional[torch.Tensor],
    coef: Optional[torch.Tensor],
    old_ent: Optional[torch.Tensor],
    counts: torch.Tensor,
    q: Optional[torch.Tensor],
    norm: torch.Tensor,
    ent_norm: torch.Tensor,
    need: list[bool],
    tp_group: str = "",
    vocab_start: int = 0,
    reduce_dx: bool = True,
    temperature: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fused_pass` of ``config`` (:meth:`LossConfig.to_json`) on the batch tensors (:class:`Batch`'s fields;
    ``q``: the schedule value, a 0-dim tensor, or None; ``norm`` / ``ent_norm``: fp32 0-dim divisors; ``need``:
    which of dx, dw, db to compute).

    Returns ``(loss, dx, dw, db, active, scalar_sums, row_sums)``: the fp32 0-dim loss, the gradients in the
    inputs' dtypes (an empty tensor where not computed), the ``[B, T]`` fp32 mask of the tokens that took part and
    the metric numerators packed by :func:`rlvr_kernels.loss.token_pass.pack_sums`. Checks the ids' range first.
    ``tp_group``: the name of the process group over which ``w``/``b`` are vocabulary shards starting at
    ``vocab_start`` ("" for none; ``reduce_dx``: sum dX over it). ``temperature``: None (``config``'s), or a
    ``[B, T]`` float tensor, one temperature per token (checked on the loss tokens: > 0, finite, ``1 / T`` finite in
    fp32; ValueError otherwise)."""
    from rlvr_kernels.loss.config import config_from_json

    cfg = config_from_json(config)
    shard = None
    if tp_group:
        shard = pv.vocab_shard(pv.resolve_group(tp_group), w.shape[0], vocab_start)
        check_token_ids(ids, ids != cfg.ignore_index, 2**62)  # the upper bound: after the shards' layout is known
    else:
        check_token_ids(ids, ids != cfg.ignore_index, w.shape[0])
    if temperature is not None:
        temperature_rows(temperature.reshape(-1), ids.reshape(-1), cfg.ignore_index, torch.float64, True, True)
    batch = Batch(x, ids, valid, mask, adv, old, ref, is_ratio, mu, coef, old_ent, counts)
    qf = None if q is None else float(q)
    with _autograd_inside_op(), torch.no_grad():
        res = fused_pass(cfg, x, w, b, batch, qf, norm, ent_norm, tuple(need), shard, reduce_dx, temperature)
    got = frozenset(f.name for f in dataclasses.fields(res.sums) if getattr(res.sums, f.name) is not None)
    if got != present_sums(cfg):
        raise RuntimeError(f"internal error: the token pass gave the sums {sorted(got)}, not those planned")
    empty = x.new_empty(0)
    dx, dw, db = (empty.clone() if g is None else g for g in res.grads)
    return (res.loss, dx, dw, db, res.active, *pack_sums(res.sums))


@_fused_loss_op.register_fake
def _(config, x, w, b, ids, valid, mask, adv, old, ref, is_ratio, mu, coef, old_ent, counts, q, norm, ent_norm, need,
      tp_group="", vocab_start=0, reduce_dx=True, temperature=None):  # fmt: skip
    f32 = dict(dtype=torch.float32, device=x.device)
    empty = x.new_empty(0)
    B, T = mask.shape
    return (
        torch.empty((), **f32),
        torch.empty_like(x) if need[0] else empty,
        torch.empty_like(w) if need[1] else empty.clone(),
        torch.empty_like(b) if (need[2] and b is not None) else empty.clone(),
        torch.empty((B, T), **f32),
        torch.empty(len(SCALAR_SUMS), **f32),
        torch.empty((len(ROW_SUMS), B), **f32),
    )


def _fused_setup_context(ctx, inputs, output):
    _, dx, dw, db = output[:4]
    ctx.save_for_backward(dx, dw, db)


@first_order_backward
def _fused_backward(ctx, g_loss, *_unused):
    """The stored gradients times the upstream gradient. In eager mode an upstream gradient of exactly 1
    (``loss.backward()``) hands them over as they are, without a scaled copy (one host read of the scalar); a compiled
    backward always scales (no host read). They are kept until the graph is freed, so a second backward
    (``retain_graph=True``) gets the same ones; that is also why they are never scaled in place."""
    dx, dw, db = ctx.saved_tensors
    want = ctx.needs_input_grad
    traced = torch.compiler.is_compiling() or is_fake(g_loss)
    as_is = not traced and bool(g_loss == 1)

    def scale(t, i):
        if not want[i] or t.numel() == 0:
            return None
        return t if as_is else t * g_loss.to(t.dtype)

    return (None, scale(dx, 1), scale(dw, 2), scale(db, 3)) + (None,) * 19


_fused_loss_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)


def fused_loss(
    cfg, x, w, b, batch: Batch, q, norm, ent_norm, tp=None, temperature=None
) -> tuple[torch.Tensor, TokenSums, torch.Tensor]:
    """The fused path of :class:`rlvr_kernels.RLVRLoss` through ``rlvr_kernels::fused_loss``: ``(loss, sums,
    active)`` with ``loss`` differentiable w.r.t. ``x``, ``w``, ``b`` (gradients computed in the forward), the
    detached metric numerators and the ``[B, T]`` mask of active tokens. ``q``: a float, a 0-dim tensor or None.
    ``tp``: ``(tp_group, vocab_start, grad_hidden)`` for a vocabulary-sharded head, or None. ``temperature``: None
    (``cfg.temperature``) or a ``[B, T]`` float tensor, one temperature per token."""
    tp_args = ("", 0, True)
    if tp is not None and tp[0] is not None:
        group, start, grad_hidden = tp
        shard = pv.vocab_shard(group, w.shape[0], start)
        tp_args = (pv.group_name(group), shard.start, grad_hidden == "full")
    grad_on = torch.is_grad_enabled()
    need = [grad_on and x.requires_grad, grad_on and w.requires_grad, grad_on and b is not None and b.requires_grad]
    if q is not None and not isinstance(q, torch.Tensor):
        q = torch.tensor(q, dtype=torch.float64)
    out = torch.ops.rlvr_kernels.fused_loss(
        cfg.to_json(),
        x,
        w,
        b,
        batch.ids,
        batch.valid,
        batch.mask,
        batch.adv,
        batch.old,
        batch.ref,
        batch.is_ratio,
        batch.mu,
        batch.coef,
        batch.old_ent,
        batch.counts,
        q,
        norm,
        ent_norm,
        need,
        *tp_args,
        temperature,
    )
    loss, _, _, _, active, scalars, rows = out
    return loss, unpack_sums(cfg, scalars.detach(), rows.detach()), active.detach()


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """``values`` (``[k, ...]``, one per row in ``rows``) placed into ``n`` zero rows."""
    if values.shape[0] == n:
        return values
    out = torch.zeros((n,) + tuple(values.shape[1:]), device=values.device, dtype=values.dtype)
    return out.index_copy_(0, rows, values)
