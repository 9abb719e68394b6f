"""The torch backend's DelTA work as PyTorch custom ops: the two sweeps over the hidden states and the whole one-shot
estimate on flat arrays.

``rlvr_kernels::delta_token_scalars``, ``rlvr_kernels::delta_rowdot``, ``rlvr_kernels::delta_colsum`` and
``rlvr_kernels::delta_flat_coefficients`` have the plain-torch reference (:mod:`rlvr_kernels.reference.delta`) as their
implementation on every device, and the native kernels of ``csrc/delta_sweeps.cpp`` (at::vec + OpenMP, the
refinement loop in C++) registered for the CPU dispatch key once built (:mod:`rlvr_kernels._native`). Both
implementations compute in the same precision (fp32 sweeps, float64 moments and normaliser) and agree to fp32
rounding; the native ones launch no thread team for a small set (a torch op of the reference may).

Flat inputs as in the reference: ``h [N, H]`` (fp32 / fp64 / bf16 / fp16; rows that are not ``valid`` may hold
anything), fp32 ``s``, ``a`` and bool ``valid`` ``[N]``. The one-shot op reports the checks of the reference's
``check`` callback as a status code instead of raising, so that both implementations return the same pair; the public
op (:mod:`rlvr_kernels.delta`) turns a non-zero status into its ``ValueError``.
"""

from __future__ import annotations

import torch

from rlvr_kernels import _native
from rlvr_kernels.reference import delta as ref

__all__ = ["token_scalars", "rowdot", "colsum", "flat_coefficients", "centroid_status", "margin_status", "OK", "STATUS"]

_NATIVE = "delta_sweeps"

#: Status codes of :func:`flat_coefficients` (the same numbers as ``Status`` in ``csrc/delta_sweeps.cpp``).
OK = 0
STATUS = {1: "mass_overflow", 2: "centroids_non_finite", 3: "margins_overflow"}


def _native_ok(h: torch.Tensor) -> bool:
    """On a CPU tensor: build/load the native kernels (first call); True when they now serve the ops."""
    return h.device.type == "cpu" and _native.load(_NATIVE)


def centroid_status(mass: torch.Tensor, mu: torch.Tensor) -> int:
    """0, or the code of the first failing check of the side masses ``[2]`` and centroids ``[2, H]`` (one host
    sync): 1 when a mass is not finite in fp32 (``sum |A|`` overflows), 2 when a centroid is not finite."""
    if not bool(torch.isfinite(mass.to(torch.float32)).all()):
        return 1
    return 0 if bool(torch.isfinite(mu).all()) else 2


def margin_status(m: torch.Tensor, valid: torch.Tensor) -> int:
    """0, or 3 when a margin ``m [N]`` of a valid token is not finite (the squared distances overflow fp32)."""
    return 3 if m.numel() and not bool((torch.isfinite(m) | ~valid).all()) else 0


@torch.library.custom_op("rlvr_kernels::delta_rowdot", mutates_args=())
def _rowdot_op(h: torch.Tensor, mu: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[h.mu[0], h.mu[1]]`` per row: fp32 ``[N, 2]``, 0 on invalid rows (``mu [2, H]`` fp32)."""
    if _native_ok(h):
        return torch.ops.rlvr_kernels.delta_rowdot.default(h, mu, valid)
    return ref.rowdot3(h, mu, valid)


@_rowdot_op.register_fake
def _(h, mu, valid):
    return h.new_empty((h.shape[0], 2), dtype=torch.float32)


@torch.library.custom_op("rlvr_kernels::delta_colsum", mutates_args=())
def _colsum_op(h: torch.Tensor, w: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``h^T w`` over the valid rows: fp32 ``[2, H]`` (``w [N, 2]`` fp32, ignored on invalid rows)."""
    if _native_ok(h):
        return torch.ops.rlvr_kernels.delta_colsum.default(h, w, valid)
    return ref.colsum2(h, w, valid)


@_colsum_op.register_fake
def _(h, w, valid):
    return h.new_empty((2, h.shape[1]), dtype=torch.float32)


class _Stop(Exception):
    """Raised by the reference's ``check`` callback to end the estimate with a status code."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _reference_check(kind: str, x, valid: torch.Tensor) -> None:
    code = centroid_status(*x) if kind == "centroids" else margin_status(x, valid)
    if code != OK:
        raise _Stop(code)


@torch.library.custom_op("rlvr_kernels::delta_flat_coefficients", mutates_args=())
def _flat_op(
    h: torch.Tensor,
    s: torch.Tensor,
    a: torch.Tensor,
    valid: torch.Tensor,
    iters: int,
    lam_min: float,
    lam_max: float,
    eps: float,
    exclude_zero_adv: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c~ fp32 [N], status int64 [])`` of :func:`rlvr_kernels.reference.delta.delta_coefficients_flat`; on a
    non-zero status (see :data:`STATUS`) the estimate stopped there and ``c~`` is all 0."""
    if _native_ok(h):
        return torch.ops.rlvr_kernels.delta_flat_coefficients.default(
            h, s, a, valid, iters, lam_min, lam_max, eps, exclude_zero_adv
        )
    status = torch.zeros((), dtype=torch.int64, device=h.device)
    try:
        c = ref.delta_coefficients_flat(
            h,
            s,
            a,
            valid,
            iters=iters,
            lam_min=lam_min,
            lam_max=lam_max,
            eps=eps,
            exclude_zero_adv=exclude_zero_adv,
            check=_reference_check,
        )
    except _Stop as stop:
        return torch.zeros(h.shape[0], dtype=torch.float32, device=h.device), status.fill_(stop.code)
    return c, status


@_flat_op.register_fake
def _(h, s, a, valid, iters, lam_min, lam_max, eps, exclude_zero_adv):
    return h.new_empty(h.shape[0], dtype=torch.float32), h.new_empty((), dtype=torch.int64)


@torch.library.custom_op("rlvr_kernels::delta_token_scalars", mutates_args=())
def _scalars_op(old_logp: torch.Tensor, adv: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(s, a)`` ``[N]`` of :func:`rlvr_kernels.reference.delta.per_token_scalars` (fp32 inputs)."""
    if _native_ok(old_logp):
        return torch.ops.rlvr_kernels.delta_token_scalars.default(old_logp, adv, valid)
    return ref.per_token_scalars(old_logp, adv, valid)


@_scalars_op.register_fake
def _(old_logp, adv, valid):
    return torch.empty_like(old_logp), torch.empty_like(old_logp)


def token_scalars(old_logp: torch.Tensor, adv: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = 1 - p_old`` and the advantage per token, fp32 ``[N]``, 0 on invalid tokens (the reference's
    ``per_token_scalars``, which casts both to fp32 first, as here)."""
    return torch.ops.rlvr_kernels.delta_token_scalars(
        old_logp.to(torch.float32).contiguous(), adv.to(torch.float32).contiguous(), valid.contiguous()
    )


def _rows(h: torch.Tensor) -> torch.Tensor:
    """``h`` with a contiguous last dimension (what the native kernels read; a row stride is fine)."""
    return h if h.stride(-1) == 1 else h.contiguous()


def rowdot(h: torch.Tensor, mu: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sweep 1 of the torch backend: ``h @ mu.T`` per valid row, fp32 ``[N, 2]`` (the reference's ``rowdot3``)."""
    return torch.ops.rlvr_kernels.delta_rowdot(_rows(h), mu.to(torch.float32).contiguous(), valid.contiguous())


def colsum(h: torch.Tensor, w: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sweep 2 of the torch backend: ``h^T w`` over the valid rows, fp32 ``[2, H]`` (the reference's ``colsum2``)."""
    return torch.ops.rlvr_kernels.delta_colsum(_rows(h), w.to(torch.float32).contiguous(), valid.contiguous())


def flat_coefficients(
    h: torch.Tensor,
    s: torch.Tensor,
    a: torch.Tensor,
    valid: torch.Tensor,
    *,
    iters: int,
    lam_min: float,
    lam_max: float,
    eps: float,
    exclude_zero_adv: bool,
) -> tuple[torch.Tensor, int]:
    """The one-shot estimate of the torch backend: ``(c~ fp32 [N], status)`` with a Python int status (one host read;
    :data:`OK` = 0, else a key of :data:`STATUS`)."""
    c, status = torch.ops.rlvr_kernels.delta_flat_coefficients(
        _rows(h),
        s.to(torch.float32).contiguous(),
        a.to(torch.float32).contiguous(),
        valid.contiguous(),
        int(iters),
        float(lam_min),
        float(lam_max),
        float(eps),
        bool(exclude_zero_adv),
    )
    return c, int(status)
