"""Row passes of the torch backend's vocabulary pass as PyTorch custom ops, one GEMM'd ``[n, V]`` logits chunk at a
time: softmax statistics, and the logits gradient written in place.

``rlvr_kernels::vocab_row_stats`` and ``rlvr_kernels::vocab_row_grad_`` have the plain-torch reference
(``rlvr_kernels.reference.logprobs``) as their implementation on every device, and the native kernels of
``csrc/vocab_rows.cpp`` (one sweep over each row, at::vec + OpenMP) registered for the CPU dispatch key once built
(:mod:`rlvr_kernels._native`). The chunk loops of the torch backend (composable and fused) call :func:`row_stats` and
:func:`row_grad_`; the Triton backend has its own row kernels (``kernels/logprobs.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from rlvr_kernels import _native
from rlvr_kernels.reference import logprobs as ref

_NATIVE = "vocab_rows"


@torch.library.custom_op("rlvr_kernels::vocab_row_stats", mutates_args=())
def _stats_op(
    z: torch.Tensor, targets: torch.Tensor, inv_temp: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``z [n, V]`` unscaled logits (float32/float64, contiguous), ``targets [n]`` int64 -> ``(logp, entropy, lse)``
    ``[n]`` in z's dtype for the scaled logits ``z * inv_temp``; ignored rows give logp = entropy = 0."""
    if z.device.type == "cpu" and _native.load(_NATIVE):  # first CPU call: the native kernel is registered now
        return torch.ops.rlvr_kernels.vocab_row_stats.default(z, targets, inv_temp, ignore_index)
    return ref.row_stats(z, targets, inv_temp, ignore_index)


@_stats_op.register_fake
def _(z, targets, inv_temp, ignore_index):
    n = z.shape[0]
    return z.new_empty(n), z.new_empty(n), z.new_empty(n)


@torch.library.custom_op("rlvr_kernels::vocab_row_grad_", mutates_args=("z",))
def _grad_op(
    z: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    g_logp: torch.Tensor,
    g_ent: Optional[torch.Tensor],
    c_p: torch.Tensor,
    inv_temp: float,
    ignore_index: int,
) -> None:
    """Overwrite ``z [n, V]`` (unscaled logits) with ``dL/dz = inv_temp (g_logp onehot - p (c_p + g_ent (log p +
    H)))``; every ``[n]`` argument in z's dtype; ignored rows become 0 whatever they held."""
    if z.device.type == "cpu" and _native.load(_NATIVE):
        torch.ops.rlvr_kernels.vocab_row_grad_.default(
            z, targets, lse, entropy, g_logp, g_ent, c_p, inv_temp, ignore_index
        )
        return
    ref.row_grad_(z, targets, lse, entropy, g_logp, g_ent, c_p, inv_temp, ignore_index)


@_grad_op.register_fake
def _(z, targets, lse, entropy, g_logp, g_ent, c_p, inv_temp, ignore_index):
    return None


def row_stats(
    z: torch.Tensor, targets: torch.Tensor, inv_temp: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax statistics of one logits chunk (see :func:`_stats_op`); ``z`` is not modified."""
    return torch.ops.rlvr_kernels.vocab_row_stats(z.contiguous(), targets.contiguous(), float(inv_temp), ignore_index)


def row_grad_(
    z: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    g_logp: torch.Tensor,
    g_ent: Optional[torch.Tensor],
    c_p: torch.Tensor,
    inv_temp: float,
    ignore_index: int,
) -> torch.Tensor:
    """``z`` (contiguous ``[n, V]``) overwritten with its gradient; returns it. The ``[n]`` vectors are cast to z's
    dtype."""
    if not z.is_contiguous():
        raise ValueError("row_grad_ writes in place: z must be contiguous")
    dt = z.dtype

    def vec(t):
        return None if t is None else t.to(dt).contiguous()

    torch.ops.rlvr_kernels.vocab_row_grad_(
        z,
        targets.contiguous(),
        vec(lse),
        vec(entropy),
        vec(g_logp),
        vec(g_ent),
        vec(c_p),
        float(inv_temp),
        ignore_index,
    )
    return z
