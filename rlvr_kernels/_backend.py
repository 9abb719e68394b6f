"""Backend selection shared by every op.

``backend="auto"`` picks Triton for CUDA tensors and the plain-torch reference for CPU tensors; the environment
variable ``RLVR_KERNELS_BACKEND`` (``auto`` | ``triton`` | ``torch``) overrides what ``"auto"`` resolves to.
``backend="triton"`` on CPU tensors needs the Triton interpreter, which Triton only enables when
``TRITON_INTERPRET=1`` is set before ``triton`` is first imported (the test suite's conftest does this).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - platforms without triton
        return False
    return True


def triton_interpreting() -> bool:
    """True when Triton kernels run under the NumPy interpreter (``TRITON_INTERPRET=1``)."""
    if not triton_available():
        return False
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:  # pragma: no cover - older triton
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``backend`` into ``"triton"`` or ``"torch"`` for tensors on ``device``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when Triton is asked for where it cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("RLVR_KERNELS_BACKEND", "auto").strip().lower() or "auto"
        if env not in BACKENDS:
            raise ValueError(f"RLVR_KERNELS_BACKEND must be one of {BACKENDS}, got {env!r}")
        backend = env
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the 'triton' package, which is not installed")
        if device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                "backend='triton' on a CPU tensor runs the Triton interpreter, which must be enabled by setting "
                "TRITON_INTERPRET=1 before triton is imported; use backend='torch' (or 'auto') on CPU otherwise"
            )
    return backend


def max_grid() -> int:
    """Largest number of programs we launch along one grid dimension (kernels loop over the rest)."""
    return 65535


def autocast_dtype(device: torch.device):
    """The autocast dtype in force for ``device``'s type, or None when autocast is off there."""
    dev = device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (RuntimeError, TypeError):  # device types autocast does not know
        return None
    return None


def autocast_inputs(*tensors):
    """Cast the floating-point GEMM operands as ``nn.Linear`` would under autocast (fp32/fp16/bf16 to the autocast
    dtype; float64 and None untouched), so an op called under ``torch.autocast`` sees what the model's ``lm_head``
    would have used. The op then runs with autocast disabled (:func:`no_autocast`) and picks its own precisions."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    dt = None if first is None else autocast_dtype(first.device)
    if dt is None:
        return tensors
    half = (torch.float32, torch.float16, torch.bfloat16)
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.dtype in half else t for t in tensors)


def no_autocast(device: torch.device):
    """A context with autocast disabled on ``device``'s type (kernels and reference math choose their dtypes)."""
    return (
        torch.autocast(device.type, enabled=False)
        if device.type in ("cpu", "cuda", "xpu", "mps")
        else contextlib.nullcontext()
    )


def first_order_backward(backward):
    """Decorator for an autograd Function's ``backward`` that computes its gradients by hand: refuse
    ``create_graph=True`` with a clear error (the result would not be differentiable again, and silently wrong second
    derivatives are worse than none), and run with autocast disabled on the gradients' device (a backward called
    inside ``torch.autocast`` must not re-cast the fp32 GEMMs)."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "rlvr_kernels: double backward (create_graph=True) is not supported through the fused log-prob/loss "
                "ops; their gradients are computed by hand and are not differentiable again"
            )
        dev = next((g.device for g in grads if isinstance(g, torch.Tensor)), None)
        if dev is None:
            return backward(ctx, *grads)
        with no_autocast(dev):
            return backward(ctx, *grads)

    return wrapper
