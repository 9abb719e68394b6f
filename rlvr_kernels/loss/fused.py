"""The fused path of :class:`rlvr_kernels.RLVRLoss`: loss and gradients in one pass over sequence-aligned chunks.

Per chunk the logits block is computed once; its statistics give log-probs and entropies, the token pass gives the
per-token gradient coefficients through autograd on ``[rows, T]`` tensors only, ``dz`` is formed in place and dX,
dW, db follow by GEMMs (3 GEMM-equivalents, one chunk buffer; ``docs/design/vocab-pass.md``). Chunks are blocks of
whole rows, or segments of a row when the configuration is token-local (:func:`rlvr_kernels.methods.token_local`).
Backward only scales the gradients computed here.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from rlvr_kernels import methods as M
from rlvr_kernels._backend import first_order_backward, resolve_backend
from rlvr_kernels.loss.token_pass import TokenSums, token_pass
from rlvr_kernels.reference import logprobs as ref_lp

# Bytes of one fused-path logits block (fp32 [rows, V]); on CPU a smaller block keeps the reference path lean.
FUSED_CHUNK_BYTES = 1 << 30
FUSED_CHUNK_BYTES_CPU = 1 << 24


def chunk_budget(device: torch.device) -> int:
    """Bytes of the fp32 ``[rows * T, V]`` logits block the fused path holds at a time."""
    return FUSED_CHUNK_BYTES if device.type == "cuda" else FUSED_CHUNK_BYTES_CPU


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
) -> FusedResult:
    """Loss, gradients and metric sums of the batch ``batch`` (``rlvr_kernels.loss.api.Batch``) over chunks.

    ``x [B, T, H]``, ``w [V, H]``, ``b [V]``; ``need``: which of (dx, dw, db) to compute. The torch path computes in
    fp32 (float64 for float64 inputs); the Triton path keeps the GEMM operands in the input dtype with fp32 logits.
    """
    B, T, H = x.shape
    V = w.shape[0]
    use_triton = resolve_backend(cfg.backend, x.device) == "triton"
    inv_temp = 1.0 / cfg.temperature
    need_x, need_w, need_b = need
    need_b = need_b and b is not None
    cdt = w.dtype if use_triton else ref_lp.compute_dtype(x, w, b)
    w_mm = w if use_triton else w.to(cdt)
    dx = torch.zeros((B, T, H), device=x.device, dtype=x.dtype) if need_x else None
    dw = torch.zeros(w.shape, device=w.device, dtype=w_mm.dtype) if need_w else None
    db = torch.zeros(V, device=w.device, dtype=torch.float32) if need_b else None
    loss = x.new_zeros((), dtype=torch.float32)
    sums = TokenSums.empty(B, x.device)
    active_all = torch.zeros((B, T), device=x.device, dtype=torch.float32)
    lse_all = torch.zeros((B, T), device=x.device, dtype=torch.float32)  # checked once, after the last chunk
    for sl, cols in chunks(cfg, B, T, V, x.device):
        rows = batch.rows(sl, cols)
        nr, nc = rows.mask.shape
        tc = rows.ids.reshape(-1)
        # padding rows (ignore_index) read as zeros: NaN/inf there reaches neither the logits nor dW
        ignored = tc == cfg.ignore_index
        xc = torch.where(
            ignored.unsqueeze(1), torch.zeros((), dtype=cdt, device=x.device), x[sl, cols].reshape(-1, H).to(cdt)
        )
        if use_triton:
            from rlvr_kernels.kernels import logprobs as K

            z = _logits_fp32(xc, w, b)
            lp, ent, lse = K.logits_forward(z, tc, inv_temp, cfg.ignore_index)
        else:
            z = ref_lp._scaled_logits(xc, w_mm, None if b is None else b.to(cdt), inv_temp)
            lp, ent, lse, _, (logz, probs) = ref_lp.scaled_logit_stats(
                z, tc, ignore_index=cfg.ignore_index, probs=True
            )  # logz is z
        # per-token gradient coefficients of the loss, from a small autograd graph over [rows, T] only
        lp_leaf = lp.view(nr, nc).float().requires_grad_()
        ent_leaf = ent.view(nr, nc).float().requires_grad_()
        with torch.enable_grad():
            chunk_loss, chunk_sums, active = token_pass(cfg, lp_leaf, ent_leaf, rows, q, norm, ent_norm)
            g_lp, g_ent = torch.autograd.grad(chunk_loss, [lp_leaf, ent_leaf], allow_unused=True)
        g_lp = g_lp.reshape(-1).contiguous() if g_lp is not None else torch.zeros_like(lp, dtype=torch.float32)
        g_ent = g_ent.reshape(-1).contiguous() if g_ent is not None else None
        if use_triton:
            dz = K.logits_backward(z, tc, lse, ent, g_lp, g_ent, inv_temp, cfg.ignore_index, out=z).to(w.dtype)
        else:
            gl, gh, _, cp = ref_lp.upstream_coefficients(tc, cfg.ignore_index, g_lp, g_ent, None, None, cdt)
            dz = ref_lp.dlogits_from_probs(logz, probs, ent, tc, gl, gh, cp)
            del logz, probs
            dz *= inv_temp
        loss += chunk_loss.detach().float()
        active_all[sl, cols] = active.detach()
        lse_all[sl, cols] = lse.view(nr, nc)
        sums = sums.add(chunk_sums, sl, B)
        if need_x:
            dx[sl, cols] = (dz @ w_mm).view(nr, nc, H).to(x.dtype)
        if need_w:
            dw.addmm_(dz.T, xc)
        if need_b:
            db += dz.sum(0, dtype=torch.float32)
        del z, dz
    # one host sync for the whole batch (not one per chunk): a row that counts has finite logits
    ref_lp.check_finite_rows(lse_all.view(-1), batch.ids.reshape(-1) != cfg.ignore_index, "RLVRLoss")
    grads = (dx, None if dw is None else dw.to(w.dtype), None if db is None else db.to(b.dtype))
    return FusedResult(loss, grads, sums, active_all)


class PrecomputedGradLoss(torch.autograd.Function):
    """``loss`` as a function of ``(x, w, b)`` whose gradients were computed in the forward (:func:`fused_pass`):
    backward scales them by the upstream gradient. The gradients are kept until the graph is freed, so a second
    backward (``retain_graph=True``) gets the same ones."""

    @staticmethod
    def forward(ctx, loss, x, w, b, grads):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    @first_order_backward
    def backward(ctx, g_loss):
        def scale(t):
            return None if t is None else t * g_loss.to(t.dtype)

        dx, dw, db = ctx.grads
        return None, scale(dx), scale(dw), scale(db), None


def _logits_fp32(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 ``x @ w.T (+ b)`` (one GEMM; bf16/fp16 inputs accumulate in fp32 and are stored in fp32)."""
    if x.dtype == torch.float32:
        z = x @ w.T
    else:
        try:
            z = torch.mm(x, w.T, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            z = (x @ w.T).float()
    if b is not None:
        z += b.float()
    return z
