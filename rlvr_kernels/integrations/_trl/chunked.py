"""A drop-in for TRL 1.16's fused LM head kernel, ``trl.kernels.ChunkedLogProbFunction``, on this package's
vocabulary pass.

:class:`ChunkedLogProbFunction` has TRL's call, ``apply(hidden, weight, bias, targets, temperature, chunk_size,
final_logit_softcapping=None, logit_scale=1.0, outputs=OPTIONAL_OUTPUTS)``, and returns TRL's 5-tuple ``(logprobs,
entropy, log_sum_sq_probs, mean_logits, is_top1)`` (fp32, ``is_top1`` bool, ``None`` for an output not requested).
The logits are ``x = softcap(logit_scale * (hidden @ weight.T + bias)) / temperature`` with ``softcap(y) = c tanh(y /
c)``, in TRL's order. They are never materialised as ``[N, V]``: the forward and the backward run the package's chunked
vocabulary pass (``docs/design/vocab-pass.md``) with the transforms and the extra outputs computed per chunk, in the
same pass as the log-normaliser: Triton row kernels (``rlvr_kernels/kernels/logprobs.py``, constexpr flags) on CUDA,
on CPU the native row passes for the plain case (no softcap, no extra output beyond the entropy; a logit scale folds
into the temperature) and the torch reference rows (``rlvr_kernels/reference/logprobs.py``) otherwise.

:func:`use_rlvr_kernels_in_trl` makes a stock ``GRPOTrainer`` (and every TRL trainer built on ``add_fused_lm_head``:
RLOO, SFT, DPO, KTO, async GRPO) use it: ``add_fused_lm_head``'s forward looks ``_ChunkedLogProbFunction`` up in
``trl.trainer.utils`` at every call, and that is the name the patch swaps.
"""

from __future__ import annotations

import torch

from rlvr_kernels._backend import first_order_backward, no_autocast, resolve_backend
from rlvr_kernels.vocab_pass import linear_backward_extras, linear_forward_extras

#: TRL's per-token outputs besides the log-probabilities (``trl.kernels.chunked_logprob.OPTIONAL_OUTPUTS``).
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_EXTRAS = OPTIONAL_OUTPUTS[1:]


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """TRL's GEMM dtype: the autocast dtype of hidden's device type when autocast is on there, else hidden's."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return hidden.dtype


def _softcap(final_logit_softcapping) -> float | None:
    # As TRL: any value but None turns the softcap on, a falsy one (0.0) then caps at 1.0
    return None if final_logit_softcapping is None else float(final_logit_softcapping or 1.0)


def _targets(targets: torch.Tensor, v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clamped int64 targets, in_range bool)``: a target outside ``[0, V)`` has the target logit 0 in TRL (its
    log-prob is ``-logsumexp``, its gradient ``-p``); the pass reads a clamped id and the callers fix the rest."""
    t = targets.reshape(-1).long()
    return t.clamp(0, v - 1), (t >= 0) & (t < v)


class ChunkedLogProbFunction(torch.autograd.Function):
    """Per-token log-probabilities of ``hidden @ weight.T (+ bias)`` (optionally soft-capped, scaled, divided by the
    temperature), without materialising the ``[N, V]`` logits, and optionally the entropy, ``log(sum_v p_v^2)``, the
    mean logit and whether the target is the argmax: TRL 1.16's ``trl.kernels.ChunkedLogProbFunction``, same call,
    same outputs, on this package's vocabulary pass.

    Args (as TRL's): ``hidden [N, H]``, ``weight [V, H]``, ``bias [V]`` or None, ``targets [N]`` int (a target outside
    ``[0, V)`` has the target logit 0, as in TRL: log-prob ``-logsumexp``; its ``is_top1`` is False), ``temperature``,
    ``chunk_size`` (TRL's vocabulary tile width; accepted and unused: the package's chunk budget,
    ``RLVR_KERNELS_CHUNK_BYTES``, sizes the chunks), ``final_logit_softcapping`` (``c``: ``y -> c tanh(y / c)`` after
    ``logit_scale`` and before the temperature), ``logit_scale`` (multiplies the logits) and ``outputs`` (which of
    ``OPTIONAL_OUTPUTS`` to compute; other names are ignored).

    Returns ``(logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, each ``[N]`` fp32 (``is_top1`` bool) or
    None when not requested. ``logprobs`` and ``entropy`` are differentiable with respect to hidden, weight and bias
    (exact gradients, softcap chain rule included); the other three are non-differentiable, as in TRL.

    Precision, as TRL: the GEMM operands are cast to the autocast dtype when autocast is on for hidden's device, else
    to hidden's dtype; statistics and gradient accumulation in fp32; gradients returned in each input's dtype. (TRL
    rounds each logits tile to the compute dtype; here the logits stay fp32, the package's rule.) The backward gathers
    a ZeRO-3-partitioned head with TRL's ``maybe_gather_lm_head_ctx``, as TRL's does; FSDP2 DTensor heads are
    gathered by the caller (``add_fused_lm_head`` calls ``full_tensor()``), as for TRL's function.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = OPTIONAL_OUTPUTS,
    ):
        ctx.set_materialize_grads(False)
        device = hidden.device
        cdt = _compute_dtype(hidden)
        v = weight.shape[0]
        softcap = _softcap(final_logit_softcapping)
        inv_temp = 1.0 / float(temperature)
        logit_scale = float(logit_scale)
        want_entropy = "entropy" in outputs
        extras = tuple(k for k in _EXTRAS if k in outputs)
        t, in_range = _targets(targets, v)
        which = resolve_backend("auto", device)
        if cdt == torch.float64:
            which = "torch"
        with no_autocast(device):
            x = hidden.to(cdt)
            w = weight.to(cdt)
            b = None if bias is None else bias.to(cdt)
            logp, ent, lse, ex = linear_forward_extras(x, w, b, t, inv_temp, logit_scale, softcap, extras, which)
        # TRL: a target outside [0, V) has the target logit 0
        logp = torch.where(in_range, logp, -lse).float()
        entropy = ent.float() if want_entropy else None
        out = {k: ex[k].float() for k in ("log_sum_sq_probs", "mean_logits") if k in ex}
        if "is_top1" in ex:
            out["is_top1"] = ex["is_top1"] & in_range
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent if want_entropy else lse)
        ctx.cdt, ctx.which, ctx.want_entropy = cdt, which, want_entropy
        ctx.opts = (inv_temp, logit_scale, softcap)
        extra_out = tuple(out.get(k) for k in _EXTRAS)
        ctx.mark_non_differentiable(*(o for o in extra_out if o is not None))
        return (logp, entropy, *extra_out)

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_logprobs, grad_entropy, *_):
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        need = [bool(f) for f in ctx.needs_input_grad[:3]]
        if not ctx.want_entropy:
            grad_entropy = None
        if not any(need) or (grad_logprobs is None and grad_entropy is None):
            return (None,) * 9
        inv_temp, logit_scale, softcap = ctx.opts
        with maybe_gather_lm_head_ctx(weight, bias), no_autocast(hidden.device):
            v = weight.shape[0]
            t, in_range = _targets(targets, v)
            g_lse = None
            g_logp = None
            if grad_logprobs is not None:
                g = grad_logprobs.reshape(-1).float()
                # in range: g (onehot - p); outside, log-prob = -lse (the target logit is a constant 0): the
                # log-normaliser's upstream gradient is -g, which gives -g p
                g_logp = torch.where(in_range, g, 0.0)
                g_lse = torch.where(in_range, 0.0, -g)
            g_ent = None if grad_entropy is None else grad_entropy.reshape(-1).float()
            cdt = ctx.cdt
            x = hidden.to(cdt)
            w = weight.to(cdt)
            b = None if bias is None else bias.to(cdt)
            dx, dw, db = linear_backward_extras(
                x, w, b, t, lse, ent, g_logp, g_ent, g_lse, inv_temp, logit_scale, softcap, need, ctx.which
            )
        return (
            dx.to(hidden.dtype) if need[0] else None,
            dw.to(weight.dtype) if need[1] else None,
            db.to(bias.dtype) if need[2] and bias is not None else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def use_rlvr_kernels_in_trl(enabled: bool = True) -> None:
    """Make TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, used by a stock ``GRPOTrainer``, RLOO, SFT,
    DPO, KTO, async GRPO) compute with :class:`ChunkedLogProbFunction`: one line before (or after) building the
    trainer. The patched forward looks the name up at every call, so trainers built earlier switch too. Also
    re-exports it as ``trl.kernels.ChunkedLogProbFunction``. ``enabled=False`` restores TRL's own (still reachable as
    ``trl.kernels.chunked_logprob.ChunkedLogProbFunction``)."""
    import trl.kernels
    import trl.trainer.utils as trl_utils
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction as trl_function

    fn = ChunkedLogProbFunction if enabled else trl_function
    trl_utils._ChunkedLogProbFunction = fn
    trl.kernels.ChunkedLogProbFunction = fn


def rlvr_kernels_in_trl() -> bool:
    """Whether TRL's fused LM head currently uses :class:`ChunkedLogProbFunction`."""
    import trl.trainer.utils as trl_utils

    return trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction


__all__ = ["ChunkedLogProbFunction", "OPTIONAL_OUTPUTS", "use_rlvr_kernels_in_trl", "rlvr_kernels_in_trl"]
