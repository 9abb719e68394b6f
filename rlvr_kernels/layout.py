"""Padded ``[B, T]`` <-> packed (``cu_seqlens``) layout helpers shared by every token op.

Padded layout: ``[B, T]`` tensors plus a boolean ``mask`` (right padding). Packed layout: 1-D ``[total]`` tensors
plus ``cu_seqlens`` (int, ``[B + 1]``, non-decreasing, ``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == total``), the
layout of verl's remove-padding and TRL's padding-free paths. Positions are 0-based indices within a row; a row's
length ``L`` is (last valid index + 1), which equals the valid count for right-padded rows.
"""

from __future__ import annotations

import torch

__all__ = [
    "check_cu_seqlens",
    "row_lengths",
    "cu_seqlens_from_lengths",
    "packed_to_padded",
    "padded_to_packed",
]


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, *, name: str = "cu_seqlens") -> torch.Tensor:
    """Validate ``cu_seqlens`` against a packed token count and return it as int64 (same device).

    Raises ``TypeError`` for a non-integer tensor and ``ValueError`` when it is not 1-D, does not start at 0, is
    decreasing somewhere, or does not end at ``total``.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool or cu_seqlens.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be 1-D with at least one entry, got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.long()
    if int(cu[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(cu[0])}")
    if cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing")
    if int(cu[-1]) != total:
        raise ValueError(f"{name} must end at the packed token count {total}, got {int(cu[-1])}")
    return cu


def row_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Row length ``L`` = last valid index + 1 (0 for a row with no valid token). ``mask [B, T]`` -> int64 ``[B]``."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    valid = mask.bool()
    T = valid.shape[1]
    pos = torch.arange(1, T + 1, device=mask.device).expand_as(valid)
    return (
        torch.where(valid, pos, torch.zeros_like(pos)).amax(dim=1)
        if T > 0
        else valid.new_zeros(valid.shape[0], dtype=torch.long)
    )


def cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """``[B]`` lengths -> int64 ``[B + 1]`` cumulative offsets starting at 0."""
    out = torch.zeros(lengths.numel() + 1, dtype=torch.long, device=lengths.device)
    out[1:] = torch.cumsum(lengths.long(), 0)
    return out


def packed_to_padded(x: torch.Tensor, cu_seqlens: torch.Tensor, *, fill: float | bool = 0) -> torch.Tensor:
    """Packed ``[total, ...]`` -> padded ``[B, T_max, ...]`` (right padding with ``fill``)."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    B = lengths.numel()
    T = int(lengths.max()) if B > 0 else 0
    out = torch.full((B, T) + tuple(x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    row = torch.repeat_interleave(torch.arange(B, device=x.device), lengths)
    col = torch.arange(x.shape[0], device=x.device) - cu[:-1][row]
    out[row, col] = x
    return out


def padded_to_packed(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Padded ``[B, T, ...]`` -> packed ``[total, ...]``: the first ``len_i`` entries of each row."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    B = lengths.numel()
    total = int(cu[-1])
    row = torch.repeat_interleave(torch.arange(B, device=x.device), lengths)
    col = torch.arange(total, device=x.device) - cu[:-1][row]
    return x[row, col]
