"""Per-token log-probs and entropies: ``fused_linear_logprobs`` (hidden states x lm_head) and ``logprobs_from_logits``.

Both are autograd-aware. On the Triton backend the linear form never materialises the ``[N, V]`` logits: every GEMM
runs on cuBLAS over a bounded chunk of logits (``rlvr_kernels/_gemm.py``: 1 GiB by default, the user setting
``RLVR_KERNELS_CHUNK_BYTES``) and Triton row passes fold each chunk into the statistics or into ``dz``. Only the rows
whose target is not ``ignore_index`` enter the GEMMs. The forward saves 8 bytes per token (lse, entropy); the
backward recomputes the logits one block of vocabulary columns at a time and turns ``dz`` into dX, dW and db with
GEMMs: dW is written once per block by one GEMM (fp32 accumulation inside it, none across blocks) and dX accumulates
over blocks in fp32 in a fixed order, so the backward is deterministic (no atomics). The torch backend is the
plain-torch reference in ``rlvr_kernels.reference.logprobs``, chunked over tokens. This module holds the custom ops
and their autograd; the per-backend work is :mod:`rlvr_kernels.vocab_pass`, and ``tp_group=`` hands over to
:mod:`rlvr_kernels.vocab_parallel`. Design notes: ``docs/design/vocab-pass.md``.
"""

from __future__ import annotations

import torch

from rlvr_kernels import _checks, vocab_parallel
from rlvr_kernels._backend import autocast_inputs, first_order_backward, no_autocast
from rlvr_kernels.vocab_pass import (
    _out_dtype,
    linear_backward,
    linear_forward,
    logits_backward,
    logits_forward,
)
from rlvr_kernels.vocab_pass import temperature_rows as _temp_rows

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_temperature(temperature) -> float:
    """A number > 0 (Python, NumPy or one-element tensor) whose inverse is finite in fp32 -> float."""
    return _checks.temperature(temperature)


def _temperature_arg(temperature, targets: torch.Tensor) -> tuple[float, torch.Tensor | None]:
    """``temperature`` -> ``(T, None)`` for a number (or a one-element tensor of another shape than ``targets``), or
    ``(1.0, T [...])`` for a float tensor of ``targets``' shape: one temperature per token. Static checks only (type,
    shape, device); the values are checked inside the op, where the rows that count are known (:func:`_temp_rows`)."""
    if isinstance(temperature, torch.Tensor) and (
        tuple(temperature.shape) == tuple(targets.shape) or temperature.numel() != 1
    ):
        if not temperature.dtype.is_floating_point:
            raise TypeError(
                f"temperature must be a number or a float tensor of targets' shape, got {temperature.dtype}"
            )
        if tuple(temperature.shape) != tuple(targets.shape):
            raise ValueError(
                f"temperature as a tensor (one per token) must have targets' shape {tuple(targets.shape)}, "
                f"got {tuple(temperature.shape)}"
            )
        if temperature.device != targets.device:
            raise ValueError(f"temperature is on {temperature.device} but targets is on {targets.device}")
        return 1.0, temperature
    return _check_temperature(temperature), None


def _check_int_tensor(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64 token ids), got {t.dtype}")


def _check_ids_range(ids: torch.Tensor, vocab: int, name: str, ignore_index: int | None = None) -> None:
    """Every id in [0, vocab) (ids equal to ``ignore_index`` excepted); one host sync."""
    if ids.numel() == 0:
        return
    check = ids if ignore_index is None else ids[ids != ignore_index]
    if check.numel() == 0:
        return
    bad = (check < 0) | (check >= vocab)
    if bool(bad.any()):
        value = int(check[bad][0])
        extra = "" if ignore_index is None else f" (other than ignore_index={ignore_index})"
        raise ValueError(f"{name} must lie in [0, {vocab}){extra}; found {value}")


def _check_float_tensor(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def _check_linear_inputs(hidden, weight, targets, bias, temperature, ignore_index, gather_ids) -> None:
    _check_float_tensor(hidden, "hidden")
    _check_float_tensor(weight, "weight")
    _check_int_tensor(targets, "targets")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H]")
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden has an empty hidden size (H = 0), shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H] (nn.Linear layout), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight's hidden size {weight.shape[1]} does not match hidden's last dimension {hidden.shape[-1]}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    if bias is not None:
        _check_float_tensor(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    _temperature_arg(temperature, targets)
    _checks.integer("ignore_index", ignore_index)
    if gather_ids is not None:
        _check_int_tensor(gather_ids, "gather_ids")
        if gather_ids.dim() != targets.dim() + 1 or tuple(gather_ids.shape[:-1]) != tuple(targets.shape):
            raise ValueError(
                f"gather_ids must have shape [..., K] with leading shape {tuple(targets.shape)}, "
                f"got {tuple(gather_ids.shape)}"
            )
        if gather_ids.device != hidden.device:
            raise ValueError(f"gather_ids is on {gather_ids.device} but hidden is on {hidden.device}")


# ----------------------------------------------------------------------------------------------------------------
# The linear form as a PyTorch custom op (torch.library): opaque to torch.compile (no graph break, whatever host
# reads the kernels make), with a fake implementation for tracing and its autograd registered.


@torch.library.custom_op("rlvr_kernels::linear_logprobs", mutates_args=())
def _linear_logprobs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    gather_ids: torch.Tensor | None,
    inv_temp: float,
    ignore_index: int,
    backend: str,
    temperature: torch.Tensor | None = None,
    head_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden [N, H]``, ``weight [V, H]``, ``bias [V]``, ``targets [N]``, ``gather_ids [N, K]`` ->
    ``(logp [N], entropy [N], gathered [N, K], lse [N])`` (fp32; float64 for float64 inputs on the torch backend).
    ``temperature [N]``: one temperature per token (then ``inv_temp`` is ignored). ``head_fp32``: an fp32 lm_head;
    the forward's fp32-output GEMM is already its (exact products, fp32 sums); the flag reaches the backward. Checks
    the ids' range and the temperatures (host reads) before any kernel runs."""
    v = weight.shape[0]
    _check_ids_range(targets, v, "targets", ignore_index)
    if gather_ids is not None:
        _check_ids_range(gather_ids, v, "gather_ids")
    if temperature is not None:
        inv_temp = _temp_rows(temperature, targets, ignore_index, _out_dtype(hidden, weight, bias), True, True)
    return linear_forward(hidden, weight, bias, targets, gather_ids, inv_temp, ignore_index, backend)


@_linear_logprobs_op.register_fake
def _(hidden, weight, bias, targets, gather_ids, inv_temp, ignore_index, backend, temperature=None, head_fp32=False):
    n = hidden.shape[0]
    k = 0 if gather_ids is None else gather_ids.shape[1]
    dt = _out_dtype(hidden, weight, bias)
    return (
        hidden.new_empty(n, dtype=dt),
        hidden.new_empty(n, dtype=dt),
        hidden.new_empty((n, k), dtype=dt),
        hidden.new_empty(n, dtype=dt),
    )


@torch.library.custom_op("rlvr_kernels::linear_logprobs_backward", mutates_args=())
def _linear_logprobs_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    gather_ids: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    g_gath: torch.Tensor | None,
    inv_temp: float,
    ignore_index: int,
    backend: str,
    need: list[bool],
    temperature: torch.Tensor | None = None,
    head_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d hidden, d weight, d bias)`` in the inputs' dtypes; an empty tensor where ``need`` says no."""
    if temperature is not None:
        inv_temp = _temp_rows(temperature, targets, ignore_index, _out_dtype(hidden, weight, bias), True, False)
    dx, dw, db = linear_backward(
        hidden, weight, bias, targets, gather_ids, lse, entropy, g_logp, g_ent, g_gath, inv_temp, ignore_index,
        backend, need, head_fp32=head_fp32,
    )  # fmt: skip
    empty = hidden.new_empty(0)
    return (
        empty if dx is None else dx.to(hidden.dtype),
        empty.clone() if dw is None else dw.to(weight.dtype),
        empty.clone() if (db is None or bias is None) else db.to(bias.dtype),
    )


@_linear_logprobs_backward_op.register_fake
def _(
    hidden,
    weight,
    bias,
    targets,
    gather_ids,
    lse,
    entropy,
    g_logp,
    g_ent,
    g_gath,
    inv_temp,
    ignore_index,
    backend,
    need,
    temperature=None,
    head_fp32=False,
):
    empty = hidden.new_empty(0)
    return (
        torch.empty_like(hidden) if need[0] else empty,
        torch.empty_like(weight) if need[1] else empty.clone(),
        torch.empty_like(bias) if (need[2] and bias is not None) else empty.clone(),
    )


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, gather_ids, inv_temp, ignore_index, backend, temperature, head_fp32 = inputs
    _, ent, _, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, gather_ids, lse, ent, temperature)
    ctx.args = (inv_temp, ignore_index, backend, head_fp32)
    ctx.set_materialize_grads(False)


@first_order_backward
def _linear_backward(ctx, g_logp, g_ent, g_gath, _g_lse):
    hidden, weight, bias, targets, gather_ids, lse, ent, temperature = ctx.saved_tensors
    inv_temp, ignore_index, backend, head_fp32 = ctx.args
    need = [bool(f) for f in ctx.needs_input_grad[:3]]
    if not any(need) or (g_logp is None and g_ent is None and g_gath is None):
        return (None,) * 10
    dx, dw, db = torch.ops.rlvr_kernels.linear_logprobs_backward(
        hidden,
        weight,
        bias,
        targets,
        gather_ids,
        lse,
        ent,
        g_logp,
        g_ent,
        g_gath,
        inv_temp,
        ignore_index,
        backend,
        need,
        temperature,
        head_fp32,
    )
    # no gradient with respect to the temperatures
    return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None) + (None,) * 7


_linear_logprobs_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = True,
    gather_ids: torch.Tensor | None = None,
    backend: str = "auto",
    tp_group=None,
    vocab_start: int | None = None,
    grad_hidden: str = "full",
    head_dtype: torch.dtype | None = None,
):
    """Per-token log-probs (and entropies) of ``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``[..., H]`` float32, bfloat16 or float16 (float64 on the torch backend): the last hidden states.
        weight: ``[V, H]`` lm_head weight (nn.Linear layout), same dtype and device as ``hidden``.
        targets: int64 ``[...]`` (hidden's leading shape), each in ``[0, V)`` or equal to ``ignore_index``.
        bias: optional ``[V]``.
        temperature: logits are divided by it (> 0); gradients carry the same ``1 / T``. A number, or a float tensor
            of ``targets``' shape: one temperature per token (> 0 and finite on the rows that are not
            ``ignore_index``; not differentiated).
        ignore_index: rows with this target give ``logp = 0``, ``entropy = 0`` and no gradient.
        return_entropy: also return the full-vocabulary entropy ``-sum_v p_v log p_v``.
        gather_ids: optional int64 ``[..., K]``: also return the log-probs at these ids (CPPO's Top-K divergences).
        backend: ``"auto"`` (Triton on CUDA, torch reference on CPU), ``"triton"`` or ``"torch"``.
        tp_group: a ``torch.distributed`` process group over which the lm_head is sharded by vocabulary (Megatron's
            layout): ``weight`` (and ``bias``) are then this rank's contiguous rows ``[vocab_start, vocab_start +
            V_r)``, ``targets`` and ``gather_ids`` stay global ids, and every rank gets the unsharded op's outputs.
            The ranks exchange O(N) statistics in one all-gather, never logits; dW and db are the shard's.
        vocab_start: this shard's first global id; default ``rank * V_r`` (even shards); pass it for uneven ones.
        grad_hidden: with ``tp_group``, ``"full"`` sums d hidden over the group (one all-reduce in fp32);
            ``"partial"`` leaves each rank its shard's part, for frameworks whose own op reduces it (Megatron's
            column-parallel output layer).
        head_dtype: ``torch.float32``: an fp32 lm_head (TRL's ``cast_lm_head_to_fp32``): the GEMMs see hidden and
            weight in fp32 and the gradients come back in the inputs' dtypes. The forward GEMMs already compute in
            fp32 (exact bf16/fp16 products, fp32 sums), so only the Triton backward changes: ``dz`` and the gradient
            GEMMs in fp32, the weight cast one vocabulary block at a time (never a full fp32 copy; hidden is cast
            once, ``4 N H`` bytes). The torch backend computes in fp32 either way. ``None`` (default): the inputs'.

    Returns:
        ``(logp, entropy)`` fp32 of ``targets``' shape (entropy is None when not requested), plus ``gathered``
        fp32 ``[..., K]`` as a third element when ``gather_ids`` is given. All outputs are differentiable with
        respect to hidden, weight and bias; the entropy gradient is exact, ``-p (log p + H) / T`` times its
        upstream gradient. (float64 inputs on the torch backend give float64 outputs.)

    Memory: the Triton path saves 8 bytes per token and never materialises the logits; the torch path keeps
    O(N + chunk * V). Raises ``TypeError``/``ValueError`` naming the argument on bad input, before any kernel runs.
    """
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)  # as the lm_head would compute under autocast
    _check_linear_inputs(hidden, weight, targets, bias, temperature, ignore_index, gather_ids)
    if head_dtype not in (None, torch.float32):
        raise ValueError(f"head_dtype must be None or torch.float32, got {head_dtype!r}")
    head_fp32 = head_dtype == torch.float32 and hidden.dtype in (torch.bfloat16, torch.float16)
    with no_autocast(hidden.device):
        return _fused_linear_logprobs(
            hidden,
            weight,
            targets,
            bias,
            temperature,
            ignore_index,
            return_entropy,
            gather_ids,
            backend,
            (tp_group, vocab_start, grad_hidden),
            head_fp32,
        )


def _fused_linear_logprobs(
    hidden, weight, targets, bias, temperature, ignore_index, return_entropy, gather_ids, backend, tp=(None,) * 3,
    head_fp32=False,
):  # fmt: skip
    lead = tuple(targets.shape)
    h = hidden.shape[-1]
    x = hidden.reshape(-1, h)
    t = targets.reshape(-1).long()
    ids = None if gather_ids is None else gather_ids.reshape(x.shape[0], gather_ids.shape[-1]).long()
    tp_group, vocab_start, grad_hidden = tp
    temperature, temp = _temperature_arg(temperature, targets)
    temp = None if temp is None else temp.reshape(-1)
    if tp_group is not None:
        logp, ent, gathered = vocab_parallel.linear_logprobs(
            x, weight, t, bias, 1.0 / float(temperature), int(ignore_index), ids, backend, tp_group, vocab_start,
            grad_hidden, temp, bool(head_fp32),
        )  # fmt: skip
    else:
        logp, ent, gathered, _ = torch.ops.rlvr_kernels.linear_logprobs(
            x, weight, bias, t, ids, 1.0 / float(temperature), int(ignore_index), backend, temp, bool(head_fp32)
        )
    logp = logp.reshape(lead)
    ent = ent.reshape(lead) if return_entropy else None
    if gather_ids is None:
        return logp, ent
    return logp, ent, gathered.reshape(lead + (gather_ids.shape[-1],))


@torch.library.custom_op("rlvr_kernels::logprobs_from_logits", mutates_args=())
def _logits_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    backend: str,
    temperature_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logits [N, V]``, ``targets [N]`` -> ``(logp [N], entropy [N], lse [N])`` (fp32; float64 for float64 logits
    on the torch backend; the entropy is computed either way). ``temperature_rows [N]``: one temperature per token
    (then ``temperature`` is ignored). Checks the ids' range and the temperatures (host reads) before any kernel
    runs."""
    _check_ids_range(targets, logits.shape[-1], "targets", ignore_index)
    if temperature_rows is not None:
        temperature = _temp_rows(temperature_rows, targets, ignore_index, _out_dtype(logits), False, True)
    return logits_forward(logits, targets, temperature, ignore_index, backend)


@_logits_op.register_fake
def _(logits, targets, temperature, ignore_index, return_entropy, backend, temperature_rows=None):
    dt = _out_dtype(logits)
    n = logits.shape[0]
    return logits.new_empty(n, dtype=dt), logits.new_empty(n, dtype=dt), logits.new_empty(n, dtype=dt)


@torch.library.custom_op("rlvr_kernels::logprobs_from_logits_backward", mutates_args=())
def _logits_backward_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    backend: str,
    temperature_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gradient with respect to ``logits``, in the logits' dtype. Triton: one row pass from the saved ``lse`` and
    entropy. Torch: the reference's analytic backward, recomputed one ``[chunk, V]`` block at a time."""
    if temperature_rows is not None:
        temperature = _temp_rows(temperature_rows, targets, ignore_index, _out_dtype(logits), False, False)
    return logits_backward(logits, targets, lse, entropy, g_logp, g_ent, temperature, ignore_index, backend)


@_logits_backward_op.register_fake
def _(logits, targets, lse, entropy, g_logp, g_ent, temperature, ignore_index, backend, temperature_rows=None):
    return torch.empty_like(logits)


def _logits_setup_context(ctx, inputs, output):
    logits, targets, temperature, ignore_index, _, backend, temperature_rows = inputs
    _, ent, lse = output
    ctx.save_for_backward(logits, targets, lse, ent, temperature_rows)
    ctx.args = (temperature, ignore_index, backend)
    ctx.set_materialize_grads(False)


@first_order_backward
def _logits_backward(ctx, g_logp, g_ent, _g_lse):
    logits, targets, lse, ent, temperature_rows = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or (g_logp is None and g_ent is None):
        return (None,) * 7
    temperature, ignore_index, backend = ctx.args
    dz = torch.ops.rlvr_kernels.logprobs_from_logits_backward(
        logits, targets, lse, ent, g_logp, g_ent, temperature, ignore_index, backend, temperature_rows
    )
    return (dz,) + (None,) * 6


_logits_op.register_autograd(_logits_backward, setup_context=_logits_setup_context)


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = True,
    backend: str = "auto",
    tp_group=None,
    vocab_start: int | None = None,
):
    """Per-token log-probs and entropies from logits a model already produced (TRL's default path).

    Args:
        logits: ``[..., V]`` float32, bfloat16 or float16 (float64 on the torch backend); not modified.
        targets: int64 ``[...]`` (logits' leading shape), in ``[0, V)`` or ``ignore_index``.
        temperature, ignore_index, return_entropy, backend: as in :func:`fused_linear_logprobs` (``temperature``: a
            number or a float tensor of ``targets``' shape).
        tp_group, vocab_start: vocabulary-sharded logits (a tensor-parallel lm_head's output, Megatron's layout):
            ``logits`` are this rank's columns ``[vocab_start, vocab_start + V_r)``, ``targets`` global ids; every
            rank gets the unsharded outputs (one all-gather of O(N) statistics) and the gradient of its own shard.

    Returns:
        ``(logp, entropy)`` fp32 of ``targets``' shape (entropy None when not requested), differentiable with
        respect to ``logits``. The Triton backward writes the gradient in the logits' dtype directly (no fp32 copy
        of the logits is made); the forward reads them once, row by row.
    """
    _check_float_tensor(logits, "logits")
    _check_int_tensor(targets, "targets")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V > 0, got {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal logits' leading shape {tuple(logits.shape[:-1])}"
        )
    if targets.device != logits.device:
        raise ValueError(f"targets is on {targets.device} but logits is on {logits.device}")
    temperature, temp = _temperature_arg(temperature, targets)
    _checks.integer("ignore_index", ignore_index)
    v = logits.shape[-1]
    lead = tuple(targets.shape)
    if tp_group is not None:
        logp, ent = vocab_parallel.logprobs_from_logits(
            logits.reshape(-1, v), targets.reshape(-1).long(), float(temperature), int(ignore_index), backend,
            tp_group, vocab_start, None if temp is None else temp.reshape(-1),
        )  # fmt: skip
        return logp.reshape(lead), (ent.reshape(lead) if return_entropy else None)
    logp, ent, _ = torch.ops.rlvr_kernels.logprobs_from_logits(
        logits.reshape(-1, v),
        targets.reshape(-1).long(),
        float(temperature),
        int(ignore_index),
        bool(return_entropy),
        backend,
        None if temp is None else temp.reshape(-1),
    )
    return logp.reshape(lead), (ent.reshape(lead) if return_entropy else None)
