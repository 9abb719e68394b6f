"""The GEMMs of the vocabulary pass: ``torch.mm`` (cuBLAS on CUDA) with fp32 results, and the chunk budget.

Every ``[rows, H] x [H, columns]`` product of the log-prob ops and of the fused loss goes through here, so that it
runs at cuBLAS speed and accumulates in fp32 whatever the operand dtype (bf16 operands: fp32 accumulation inside
the GEMM and an fp32 result, ``out_dtype=torch.float32``). Design notes: ``docs/design/vocab-pass.md``.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from rlvr_kernels import _checks

#: Default bytes of the logits buffers one chunk of the vocabulary pass holds on a GPU (and on CPU tensors).
CHUNK_BYTES_GPU = 1 << 30
CHUNK_BYTES_CPU = 1 << 24
#: Environment variable that sets the chunk budget in bytes (a user setting: smaller chunks, less memory).
CHUNK_BYTES_ENV = "RLVR_KERNELS_CHUNK_BYTES"


def chunk_bytes(device: torch.device) -> int:
    """The chunk budget in bytes: ``RLVR_KERNELS_CHUNK_BYTES`` when set, else 1 GiB on CUDA, 16 MiB on CPU."""
    env = os.environ.get(CHUNK_BYTES_ENV)
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"{CHUNK_BYTES_ENV} must be an int number of bytes, got {env!r}") from None
        return _checks.integer(CHUNK_BYTES_ENV, value, low=1)
    return CHUNK_BYTES_GPU if device.type == "cuda" else CHUNK_BYTES_CPU


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as fp32 with fp32 accumulation. On CUDA, bf16/fp16 operands stay in their dtype (cuBLAS with an fp32
    result); elsewhere they are upcast (the same exact products and fp32 sums, for the CPU tests)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without mm(out_dtype=) for this dtype
            pass
    return a.float() @ b.float()


def logits_fp32(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 ``x @ w.T (+ b)``: ``x [n, H]``, ``w [V, H]`` (nn.Linear layout), ``b [V]`` -> ``[n, V]``."""
    z = mm_fp32(x, w.T)
    if b is not None:
        z += b.float()
    return z


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` in place, ``acc`` fp32, with fp32 accumulation and no ``[M, N]`` temporary where the backend
    allows it (cuBLAS with bf16/fp16 operands and an fp32 output: ``addmm.dtype_out``)."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if a.is_cuda:
        try:
            return torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
        except (RuntimeError, TypeError):  # a torch without addmm(out_dtype=) for this dtype
            pass
    return acc.add_(mm_fp32(a, b))


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out[:] = a @ b`` with fp32 accumulation: straight into ``out`` when the dtypes agree (cuBLAS accumulates in
    fp32 for bf16/fp16), else through an fp32 result."""
    if a.dtype == out.dtype and b.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    return out.copy_(mm_fp32(a, b))
