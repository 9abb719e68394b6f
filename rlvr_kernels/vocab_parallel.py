"""The vocabulary-parallel forms of the log-prob ops: a tensor-parallel lm_head (Megatron's layout), one shard per rank.

``fused_linear_logprobs(..., tp_group=g)`` and ``logprobs_from_logits(..., tp_group=g)`` land here. Each rank runs
the single-device op's own kernels over its shard's columns (the targets and gathered ids mapped to the shard's
rows, the finiteness check left to the combined rows), then :func:`rlvr_kernels.parallel.vocab.combine` exchanges
O(N) statistics in one all-gather and gives every rank the unsharded outputs. The backward is the single-device
backward over the shard's columns with the global ``lse`` and entropy; the one-hot parts of the outputs whose id
lies on another shard enter as the log-normaliser's gradient. dW (and db) are the shard's; dX is summed over the
group (one all-reduce, in fp32) unless ``grad_hidden="partial"`` leaves each rank its own part (Megatron's
column-parallel output layer reduces it in its region op). Both are custom ops taking the group's name, so
``torch.compile`` sees one opaque call. Design notes: ``docs/design/vocab-parallel.md``.
"""

from __future__ import annotations

import torch

from rlvr_kernels import vocab_pass as lp
from rlvr_kernels._backend import first_order_backward
from rlvr_kernels.parallel import vocab as pv

GRAD_HIDDEN = ("full", "partial")


def shard_for(group_name: str, size: int, vocab_start: int) -> pv.VocabShard:
    """This rank's :class:`~rlvr_kernels.parallel.vocab.VocabShard` of the group registered as ``group_name``."""
    group = pv.resolve_group(group_name)
    return pv.vocab_shard(group, size, vocab_start)


def _owned_part(values: torch.Tensor, owned: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``values + offset`` where this shard owns the id, else 0 (fp32 or wider)."""
    return torch.where(owned, values + offset, torch.zeros((), dtype=values.dtype, device=values.device))


def _split_upstream(g: torch.Tensor | None, owned: torch.Tensor, ref: torch.Tensor):
    """``(g on owned ids, g on the ids other shards own)`` of an upstream gradient (zeros when None)."""
    if g is None:
        g = torch.zeros(owned.shape, dtype=torch.float32, device=ref.device)
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    return torch.where(owned, g, zero), torch.where(owned, zero, g)


# ---------------------------------------------------------------------------------------------------------------
# hidden states x a vocabulary shard of the lm_head


@torch.library.custom_op("rlvr_kernels::vocab_parallel_linear_logprobs", mutates_args=())
def _vp_linear_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    gather_ids: torch.Tensor | None,
    inv_temp: float,
    ignore_index: int,
    backend: str,
    group: str,
    vocab_start: int,
    reduce_dx: bool,
    temperature: torch.Tensor | None = None,
    head_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden [N, H]``, this rank's ``weight [V_r, H]`` / ``bias [V_r]``, global ``targets [N]`` and ``gather_ids
    [N, K]`` -> the unsharded ``(logp [N], entropy [N], gathered [N, K], lse [N])`` (fp32; float64 for float64
    inputs on the torch backend), the same on every rank of ``group``. ``reduce_dx`` is for the backward: sum dX
    over the group, or leave each rank its part. ``temperature [N]``: one temperature per token, the same on every
    rank (then ``inv_temp`` is ignored; each shard's logits are divided by it, checked before any collective, so a
    bad value raises on every rank alike). ``head_fp32``: an fp32 lm_head, for the backward (as the single-device
    op: the forward's fp32-output GEMM is already the fp32 head's)."""
    shard = shard_for(group, weight.shape[0], vocab_start)
    if temperature is not None:
        inv_temp = lp.temperature_rows(
            temperature, targets, ignore_index, lp._out_dtype(hidden, weight, bias), True, True
        )
    keep = targets != ignore_index
    t_loc, owned = shard.local_ids(targets, ignore_index)
    ids_loc, owned_ids = (None, None) if gather_ids is None else shard.local_ids(gather_ids)
    logp_r, ent_r, gath_r, lse_r = lp.linear_forward(
        hidden, weight, bias, t_loc, ids_loc, inv_temp, ignore_index, backend, check=False
    )
    target_logit = _owned_part(logp_r, owned & keep, lse_r)
    gathered_logits = (
        gath_r if gather_ids is None else _owned_part(gath_r, owned_ids & keep.unsqueeze(1), lse_r.unsqueeze(1))
    )
    out, vocab = pv.combine(
        shard, lse_r, ent_r, target_logit, gathered_logits, keep, gather_ids, "fused_linear_logprobs"
    )
    pv.check_global_ids(targets, keep, vocab, "targets")
    if gather_ids is not None:
        pv.check_global_ids(gather_ids, torch.ones_like(gather_ids, dtype=torch.bool), vocab, "gather_ids")
    return out


@_vp_linear_op.register_fake
def _(hidden, weight, bias, targets, gather_ids, inv_temp, ignore_index, backend, group, vocab_start, reduce_dx,
      temperature=None, head_fp32=False):  # fmt: skip
    n = hidden.shape[0]
    k = 0 if gather_ids is None else gather_ids.shape[1]
    dt = lp._out_dtype(hidden, weight, bias)
    one = hidden.new_empty(n, dtype=dt)
    return one, one.clone(), hidden.new_empty((n, k), dtype=dt), one.clone()


@torch.library.custom_op("rlvr_kernels::vocab_parallel_linear_logprobs_backward", mutates_args=())
def _vp_linear_backward_op(
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
    group: str,
    vocab_start: int,
    need: list[bool],
    reduce_dx: bool,
    temperature: torch.Tensor | None = None,
    head_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d hidden, d weight shard, d bias shard)`` in the inputs' dtypes (an empty tensor where ``need`` says no);
    ``d hidden`` summed over ``group`` when ``reduce_dx``, else this shard's part. ``temperature`` / ``head_fp32``:
    as in the forward (the shard's weight cast to fp32 one vocabulary block at a time)."""
    shard = shard_for(group, weight.shape[0], vocab_start)
    if temperature is not None:
        inv_temp = lp.temperature_rows(
            temperature, targets, ignore_index, lp._out_dtype(hidden, weight, bias), True, False
        )
    t_loc, owned = shard.local_ids(targets, ignore_index)
    gl_own, gl_other = _split_upstream(g_logp, owned, lse)
    g_lse = -gl_other
    ids_loc, gg_own = None, None
    if gather_ids is not None and g_gath is not None:
        ids_loc, owned_ids = shard.local_ids(gather_ids)
        gg_own, gg_other = _split_upstream(g_gath, owned_ids, lse)
        g_lse = g_lse - gg_other.sum(1)
    dx, dw, db = lp.linear_backward(
        hidden, weight, bias, t_loc, ids_loc, lse, entropy, gl_own, g_ent, gg_own, inv_temp, ignore_index, backend,
        need, g_lse=g_lse, head_fp32=head_fp32,
    )  # fmt: skip
    if dx is not None and reduce_dx:
        pv.all_reduce_sum_(dx, shard.group)
    empty = hidden.new_empty(0)
    return (
        empty if dx is None else dx.to(hidden.dtype),
        empty.clone() if dw is None else dw.to(weight.dtype),
        empty.clone() if (db is None or bias is None) else db.to(bias.dtype),
    )


@_vp_linear_backward_op.register_fake
def _(hidden, weight, bias, targets, gather_ids, lse, entropy, g_logp, g_ent, g_gath, inv_temp, ignore_index,
      backend, group, vocab_start, need, reduce_dx, temperature=None, head_fp32=False):  # fmt: skip
    empty = hidden.new_empty(0)
    return (
        torch.empty_like(hidden) if need[0] else empty,
        torch.empty_like(weight) if need[1] else empty.clone(),
        torch.empty_like(bias) if (need[2] and bias is not None) else empty.clone(),
    )


def _vp_linear_setup_context(ctx, inputs, output):
    (hidden, weight, bias, targets, gather_ids, inv_temp, ignore_index, backend, group, vocab_start, reduce_dx,
     temperature, head_fp32) = inputs  # fmt: skip
    _, ent, _, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, gather_ids, lse, ent, temperature)
    ctx.args = (inv_temp, ignore_index, backend, group, vocab_start)
    ctx.reduce_dx = reduce_dx
    ctx.head_fp32 = head_fp32
    ctx.set_materialize_grads(False)


@first_order_backward
def _vp_linear_backward(ctx, g_logp, g_ent, g_gath, _g_lse):
    hidden, weight, bias, targets, gather_ids, lse, ent, temperature = ctx.saved_tensors
    need = [bool(f) for f in ctx.needs_input_grad[:3]]
    if not any(need) or (g_logp is None and g_ent is None and g_gath is None):
        return (None,) * 13
    dx, dw, db = torch.ops.rlvr_kernels.vocab_parallel_linear_logprobs_backward(
        hidden, weight, bias, targets, gather_ids, lse, ent, g_logp, g_ent, g_gath, *ctx.args, need, ctx.reduce_dx,
        temperature, ctx.head_fp32,
    )  # fmt: skip
    # no gradient with respect to the temperatures
    return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None) + (None,) * 10


_vp_linear_op.register_autograd(_vp_linear_backward, setup_context=_vp_linear_setup_context)


def linear_logprobs(hidden, weight, targets, bias, inv_temp, ignore_index, gather_ids, backend, tp_group,
                    vocab_start, grad_hidden, temperature=None, head_fp32=False):  # fmt: skip
    """The flattened vocabulary-parallel linear form: ``(logp [N], entropy [N], gathered [N, K])``.
    ``temperature``: None, or a per-token ``[N]`` float tensor (then ``inv_temp`` is ignored); ``head_fp32``: an
    fp32 lm_head (``head_dtype=torch.float32``)."""
    if grad_hidden not in GRAD_HIDDEN:
        raise ValueError(f"grad_hidden must be one of {GRAD_HIDDEN}, got {grad_hidden!r}")
    shard = pv.vocab_shard(tp_group, weight.shape[0], vocab_start)
    name = pv.group_name(tp_group)
    logp, ent, gathered, _ = torch.ops.rlvr_kernels.vocab_parallel_linear_logprobs(
        hidden, weight, bias, targets, gather_ids, inv_temp, ignore_index, backend, name, shard.start,
        grad_hidden == "full", temperature, bool(head_fp32),
    )  # fmt: skip
    return logp, ent, gathered


# ---------------------------------------------------------------------------------------------------------------
# a vocabulary shard of the logits


@torch.library.custom_op("rlvr_kernels::vocab_parallel_logprobs_from_logits", mutates_args=())
def _vp_logits_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
    group: str,
    vocab_start: int,
    temperature_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's ``logits [N, V_r]`` (its vocabulary columns) and global ``targets [N]`` -> the unsharded
    ``(logp [N], entropy [N], lse [N])``, the same on every rank of ``group``. ``temperature_rows [N]``: one
    temperature per token, the same on every rank (then ``temperature`` is ignored)."""
    shard = shard_for(group, logits.shape[1], vocab_start)
    if temperature_rows is not None:
        temperature = lp.temperature_rows(temperature_rows, targets, ignore_index, lp._out_dtype(logits), False, True)
    keep = targets != ignore_index
    t_loc, owned = shard.local_ids(targets, ignore_index)
    logp_r, ent_r, lse_r = lp.logits_forward(logits, t_loc, temperature, ignore_index, backend, check=False)
    target_logit = _owned_part(logp_r, owned & keep, lse_r)
    (logp, ent, _, lse), vocab = pv.combine(
        shard, lse_r, ent_r, target_logit, lse_r.new_zeros((lse_r.shape[0], 0)), keep, None, "logprobs_from_logits"
    )
    pv.check_global_ids(targets, keep, vocab, "targets")
    return logp, ent, lse


@_vp_logits_op.register_fake
def _(logits, targets, temperature, ignore_index, backend, group, vocab_start, temperature_rows=None):
    dt = lp._out_dtype(logits)
    n = logits.shape[0]
    return logits.new_empty(n, dtype=dt), logits.new_empty(n, dtype=dt), logits.new_empty(n, dtype=dt)


@torch.library.custom_op("rlvr_kernels::vocab_parallel_logprobs_from_logits_backward", mutates_args=())
def _vp_logits_backward_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    backend: str,
    group: str,
    vocab_start: int,
    temperature_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gradient with respect to this rank's logits shard, in its dtype (no collective)."""
    shard = shard_for(group, logits.shape[1], vocab_start)
    if temperature_rows is not None:
        temperature = lp.temperature_rows(temperature_rows, targets, ignore_index, lp._out_dtype(logits), False, False)
    t_loc, owned = shard.local_ids(targets, ignore_index)
    gl_own, gl_other = _split_upstream(g_logp, owned, lse)
    return lp.logits_backward(
        logits, t_loc, lse, entropy, gl_own, g_ent, temperature, ignore_index, backend, g_lse=-gl_other
    )


@_vp_logits_backward_op.register_fake
def _(logits, targets, lse, entropy, g_logp, g_ent, temperature, ignore_index, backend, group, vocab_start,
      temperature_rows=None):  # fmt: skip
    return torch.empty_like(logits)


def _vp_logits_setup_context(ctx, inputs, output):
    logits, targets, temperature, ignore_index, backend, group, vocab_start, temperature_rows = inputs
    _, ent, lse = output
    ctx.save_for_backward(logits, targets, lse, ent, temperature_rows)
    ctx.args = (temperature, ignore_index, backend, group, vocab_start)
    ctx.set_materialize_grads(False)


@first_order_backward
def _vp_logits_backward(ctx, g_logp, g_ent, _g_lse):
    logits, targets, lse, ent, temperature_rows = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or (g_logp is None and g_ent is None):
        return (None,) * 8
    dz = torch.ops.rlvr_kernels.vocab_parallel_logprobs_from_logits_backward(
        logits, targets, lse, ent, g_logp, g_ent, *ctx.args, temperature_rows
    )
    return (dz,) + (None,) * 7


_vp_logits_op.register_autograd(_vp_logits_backward, setup_context=_vp_logits_setup_context)


def logprobs_from_logits(logits, targets, temperature, ignore_index, backend, tp_group, vocab_start,
                         temperature_rows=None):  # fmt: skip
    """The flattened vocabulary-parallel logits form: ``(logp [N], entropy [N])`` (``temperature_rows``: None or a
    per-token ``[N]`` float tensor, then ``temperature`` is ignored)."""
    shard = pv.vocab_shard(tp_group, logits.shape[1], vocab_start)
    logp, ent, _ = torch.ops.rlvr_kernels.vocab_parallel_logprobs_from_logits(
        logits, targets, temperature, ignore_index, backend, pv.group_name(tp_group), shard.start, temperature_rows
    )
    return logp, ent
