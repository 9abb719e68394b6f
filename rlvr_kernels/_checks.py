"""Argument checks shared by every public entry point: one notion of "a number", errors that name the argument.

A *number* is a Python or NumPy real (``bool`` is not one) or a one-element real tensor or array; it comes back as a
Python ``float`` (or ``int``). Anything else is a ``TypeError``; NaN, inf or a value outside its range is a
``ValueError`` naming the argument and the range. Nothing here launches a kernel; a one-element tensor is read
with ``.item()``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch

#: Largest finite fp32 and smallest normal fp32: scalars that the ops use in fp32 arithmetic must lie within these.
F32_MAX = 3.4028234663852886e38
F32_TINY = 1.1754943508222875e-38


def unwrap(name: str, value: Any, *, integer: bool) -> Any:
    """A one-element tensor or NumPy array -> its Python scalar (``.item()``); anything else unchanged.

    A tensor or array with more than one element is a ``ValueError``; a bool / complex one a ``TypeError`` (and a
    floating-point one, when an int is wanted).
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex() or (integer and value.dtype.is_floating_point):
            raise TypeError(f"{name} must be {'an int' if integer else 'a real number'}, got a {value.dtype} tensor")
        return value.item()
    if (
        not isinstance(value, (numbers.Number, str, bytes))
        and hasattr(value, "__array__")
        and hasattr(value, "item")
        and hasattr(value, "size")
    ):  # NumPy arrays (scalars are numbers.Number)
        if value.size != 1:
            raise ValueError(f"{name} must be a number, got an array of shape {tuple(getattr(value, 'shape', ()))}")
        return value.item()
    return value


def real(
    name: str,
    value: Any,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    fp32: bool = True,
) -> float:
    """``value`` as a finite Python float in ``[low, high]`` (``(low, high]`` with ``low_open``).

    Accepted: Python / NumPy reals (``bool`` is not a number), and one-element real tensors or arrays. ``fp32``
    (default): also ``|value| <= F32_MAX`` (the ops compute in fp32, where a larger value is inf). ``TypeError`` for
    a non-number, ``ValueError`` (naming ``name`` and the range) for NaN, inf or a value out of range.
    """
    v = unwrap(name, value, integer=False)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:  # an int too large for a float
        f = math.inf if v > 0 else -math.inf
    ok = math.isfinite(f) and (not fp32 or abs(f) <= F32_MAX)
    if ok and low is not None:
        ok = f > low if low_open else f >= low
    if ok and high is not None:
        ok = f <= high
    if not ok:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low!r}")
        if high is not None:
            parts.append(f"<= {high!r}")
        if fp32 and (high is None or high > F32_MAX):
            parts.append(f"<= {F32_MAX!r} in magnitude (it is used in fp32)")
        rng = " and ".join(parts)
        raise ValueError(f"{name} must be a finite number{' ' + rng if rng else ''}, got {v!r}")
    return f


def integer(name: str, value: Any, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` as a Python int in ``[low, high]``: Python / NumPy integers, one-element integer tensors or arrays.

    A float (even an integral one) is a ``TypeError``: it is usually a mix-up of two arguments.
    """
    v = unwrap(name, value, integer=True)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if (low is not None and v < low) or (high is not None and v > high):
        rng = " and ".join(
            s for s in ((f">= {low}" if low is not None else ""), (f"<= {high}" if high is not None else "")) if s
        )
        raise ValueError(f"{name} must be an int {rng}, got {v}")
    return v


def flag(name: str, value: Any) -> bool:
    """A Python ``bool`` (not 0/1, not a NumPy or tensor bool: flags are never computed, so a non-bool is a mix-up)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__}")
    return value


def choice(name: str, value: Any, options: tuple) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return str(value)


def unit(name: str, value: Any) -> float:
    """A number in ``[0, 1]`` (see :func:`real` for what counts as a number)."""
    return real(name, value, low=0.0, high=1.0)


def optional_real(name: str, value: Any, **kw) -> Optional[float]:
    return None if value is None else real(name, value, **kw)


def optional_integer(name: str, value: Any, **kw) -> Optional[int]:
    return None if value is None else integer(name, value, **kw)


def temperature(value: Any) -> float:
    """A sampling temperature: finite, > 0, and with ``1 / T`` finite in fp32 (the kernels scale fp32 logits)."""
    t = real("temperature", value, low=0.0, low_open=True)
    if 1.0 / t > F32_MAX:
        raise ValueError(f"temperature {t!r} is too small: 1 / temperature overflows float32")
    return t
