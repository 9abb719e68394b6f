"""The LM head of the TRL plug-in: last hidden states x ``lm_head.weight`` inside the model's forward.

:func:`install_head` wraps the forward that TRL's ``add_fused_lm_head`` installed, so that ``fused_lm_head=True``
computes log-probs and entropies with :func:`rlvr_kernels.fused_linear_logprobs` (TRL's ``FusedCausalLMOutput``) and
``rlvr_head_fn=fn`` hands the hidden states and the gathered head to the loss; see the module docstring of
:mod:`rlvr_kernels.integrations.trl` for how the trainer routes its forwards.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable, Mapping
from typing import Optional

import torch
from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

from rlvr_kernels.logprobs import fused_linear_logprobs

# ----------------------------------------------------------------------------------------------------------------
# the LM head: hidden states x lm_head.weight, inside the model's forward


def _head_dtype(hidden: torch.Tensor, weight: torch.Tensor, cast_fp32: bool) -> torch.dtype:
    """The dtype of the head GEMM: fp32 with ``cast_lm_head_to_fp32``, the autocast dtype under autocast (what the
    ``lm_head`` module would use), else the weight's."""
    if cast_fp32:
        return torch.float32
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


class _RegatheredLinearLogprobs(torch.autograd.Function):
    """``fused_linear_logprobs`` for a ZeRO-3-partitioned head: the forward and the backward each gather the head
    (``maybe_gather_lm_head_ctx``) and the backward recomputes from the saved hidden states, since the partitioned
    parameter holds no data once the forward's gather has ended."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, dtype, temperature, want_entropy, backend):
        with maybe_gather_lm_head_ctx(weight, bias):
            logp, ent = fused_linear_logprobs(
                hidden,
                _cast(weight, dtype),
                targets,
                bias=_cast(bias, dtype),
                temperature=temperature,
                return_entropy=want_entropy,
                backend=backend,
            )
        ctx.save_for_backward(hidden, targets)
        ctx.head = (weight, bias)
        ctx.opts = (dtype, temperature, backend)
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, targets = ctx.saved_tensors
        weight, bias = ctx.head
        dtype, temperature, backend = ctx.opts
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if g_logp is None and g_ent is None:
            return None, None, None, None, None, None, None, None
        with maybe_gather_lm_head_ctx(weight, bias), torch.enable_grad():
            h = hidden.detach().requires_grad_(need_h)
            w = weight.detach().requires_grad_(need_w)
            b = None if bias is None else bias.detach().requires_grad_(bool(need_b))
            logp, ent = fused_linear_logprobs(
                h,
                _cast(w, dtype),
                targets,
                bias=_cast(b, dtype),
                temperature=temperature,
                return_entropy=g_ent is not None,
                backend=backend,
            )
            outs = [logp] + ([ent] if g_ent is not None else [])
            grads = [g_logp if g_logp is not None else torch.zeros_like(logp)] + ([g_ent] if g_ent is not None else [])
            leaves = [t for t in (h, w, b) if t is not None and t.requires_grad]
            got = iter(torch.autograd.grad(outs, leaves, grads, allow_unused=True)) if leaves else iter(())
            dh = next(got) if h.requires_grad else None
            dw = next(got) if w.requires_grad else None
            db = next(got) if b is not None and b.requires_grad else None
        return dh, dw, db, None, None, None, None, None


def zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return bool(is_deepspeed_zero3_enabled())


def linear_logprobs(hidden, weight, bias, targets, *, dtype, temperature, want_entropy, backend, regather=False):
    """Per-token ``(logp, entropy|None)`` of ``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)``
    computed in ``dtype``; ``regather=True`` is the ZeRO-3 form (the head is gathered again in the backward)."""
    hidden = hidden.to(dtype)
    if regather:
        return _RegatheredLinearLogprobs.apply(hidden, weight, bias, targets, dtype, temperature, want_entropy, backend)
    return fused_linear_logprobs(
        hidden,
        _cast(weight, dtype),
        targets,
        bias=_cast(bias, dtype),
        temperature=temperature,
        return_entropy=want_entropy,
        backend=backend,
    )


def logit_scale(text_config) -> float:
    """The factor some architectures apply to the logits before the softmax (folded into the temperature)."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        v = getattr(text_config, name, None)
        if v is not None:
            return float(v)
    v = getattr(text_config, "logits_scaling", None)
    if v is not None:
        return float(v) if getattr(text_config, "model_type", "") == "hyperclovax" else 1.0 / float(v)
    return 1.0


def _backbone_attr(model) -> str:
    import transformers
    from packaging.version import Version

    if model.config.get_text_config() is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        return "model"
    return "base_model"


class HeadState:
    """The per-model state of the installed head: ``tap``, when set (the trainer's DelTA passes), is called as
    ``tap(hidden, logp)`` by every ``fused_lm_head=True`` forward with the final hidden states fed to ``lm_head``
    (``[b, L - 1, H]``, detached) and the log-probs of the labels (``[b, L - 1]`` fp32, 0 where the label is
    -100), or ``logp=None`` when ``tap.want_logp`` is False: the head is then skipped (the returned log-probs are
    zeros) and only the backbone runs."""

    def __init__(self):
        self.tap: Optional[Callable] = None


def install_head(model, *, temperature: float, cast_fp32: bool, want_entropy: bool, backend: str) -> HeadState:
    """Wrap ``model.forward`` (TRL's fused-LM-head forward) so that ``fused_lm_head=True`` and ``rlvr_head_fn``
    compute from the last hidden states with ``rlvr_kernels``; every other call goes to the previous forward.
    Returns the :class:`HeadState` whose ``tap`` the wrapper reads."""
    state = HeadState()
    previous = model.forward
    text_config = model.config.get_text_config()
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        raise ValueError(
            "RLVRGRPOTrainer does not support models with final_logit_softcapping (the fused head has "
            "no soft-cap); use TRL's GRPOTrainer for this model"
        )
    scale = logit_scale(text_config)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"the model's logit scale must be a finite number > 0 to fold into the temperature, got {scale}"
        )
    temp = float(temperature) / scale
    backbone = _backbone_attr(model)

    @functools.wraps(type(model).forward)  # keep the signature: generate() validates its kwargs against it
    def forward(
        self,
        *args,
        fused_lm_head=False,
        rlvr_head_fn: Optional[Callable] = None,
        labels=None,
        shift_labels=None,
        num_items_in_batch=None,
        **kwargs,
    ):
        if not fused_lm_head and rlvr_head_fn is None:
            extra = {
                k: v
                for k, v in (
                    ("labels", labels),
                    ("shift_labels", shift_labels),
                    ("num_items_in_batch", num_items_in_batch),
                )
                if v is not None
            }
            return previous(*args, **extra, **kwargs)
        kwargs["use_cache"] = False
        hidden = getattr(self, backbone)(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden = hidden[:, :-1]
            labels = None if labels is None else labels[:, 1:]
        else:
            labels = shift_labels
        lm_head = self.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor: gather once for every projection
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        hidden = hidden.to(weight.device)
        dtype = _head_dtype(hidden, weight, cast_fp32)
        no_autocast = torch.autocast(hidden.device.type, enabled=False)
        if rlvr_head_fn is not None:
            with no_autocast, maybe_gather_lm_head_ctx(weight, bias):
                return rlvr_head_fn(hidden.to(dtype), _cast(weight, dtype), _cast(bias, dtype))
        if labels is None:
            raise ValueError("fused_lm_head=True needs labels (or shift_labels)")
        labels = labels.to(weight.device)
        mask = labels != -100
        tap = state.tap
        if tap is not None and not tap.want_logp:  # a DelTA pass that needs only the hidden states
            tap(hidden.detach(), None)
            logp = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
            return FusedCausalLMOutput(loss=logp.sum(), log_probs=logp, entropy=None, label_mask=mask)
        regather = zero3_enabled()  # the ZeRO-3 gather then happens inside the autograd Function, twice
        with no_autocast:
            logp, ent = linear_logprobs(
                hidden[mask],
                weight,
                bias,
                labels[mask],
                dtype=dtype,
                temperature=temp,
                want_entropy=want_entropy and tap is None,
                backend=backend,
                regather=regather,
            )
        # masked_scatter keeps the outputs connected to the graph even when no label is valid
        logp = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
        ent = None if ent is None else ent.new_zeros(mask.shape).masked_scatter(mask, ent)
        if tap is not None:
            tap(hidden.detach(), logp.detach())
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-logp.sum() / denom, log_probs=logp, entropy=ent, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    return state


def named_metrics(metrics) -> dict:
    """The metrics dict of the loss as the model's forward returned it: a mapping (what the head function returns),
    or a ``LossMetrics`` that still has its names."""
    if isinstance(metrics, Mapping):
        return dict(metrics)
    named = getattr(metrics, "named", None)
    if named:
        return dict(named)
    raise TypeError(
        f"the RLVRLoss metrics reached the trainer without their names ({type(metrics).__name__}); the "
        "head function must return (loss, dict of metrics)"
    )
