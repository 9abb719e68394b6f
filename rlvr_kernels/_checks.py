"""Argument checks shared by the public entry points: numbers and flags, with errors that name the argument.

A *number* is a Python int/float, a NumPy scalar or a one-element real tensor (``bool`` is never a number); it
comes back as a Python ``float`` (or ``int``). Everything else raises ``TypeError``; a number outside its range
(NaN included) raises ``ValueError``. No function here launches a kernel or touches a tensor's storage beyond
``.item()`` of a one-element tensor.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch


def _scalar(name: str, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        return value.item()
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:
        value = value.item()  # NumPy scalars and 0-d arrays
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return value


def real(name: str, value: Any, *, low: Optional[float] = None, high: Optional[float] = None,
         low_open: bool = False, high_open: bool = False, finite: bool = True) -> float:
    """``value`` as a float in ``[low, high]`` (``(low, ...`` with ``low_open``); finite unless ``finite=False``."""
    v = float(_scalar(name, value))
    ok = not math.isnan(v) and (math.isfinite(v) or not finite)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else (f"< {high}" if high_open else f"<= {high}")
        rng = " and ".join(s for s in (lo, hi) if s)
        raise ValueError(f"{name} must be a {'finite ' if finite else ''}number{' ' + rng if rng else ''}, "
                         f"got {value!r}")
    return v


def optional_real(name: str, value: Any, **kw) -> Optional[float]:
    return None if value is None else real(name, value, **kw)


def integer(name: str, value: Any, *, low: Optional[int] = None) -> int:
    """``value`` as an int (Python/NumPy integers; an integral float is refused: it is usually a mix-up)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an int, got a {value.dtype} tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    v = int(value)
    if low is not None and v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v}")
    return v


def optional_integer(name: str, value: Any, **kw) -> Optional[int]:
    return None if value is None else integer(name, value, **kw)


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def choice(name: str, value: Any, options: tuple) -> Any:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def temperature(value: Any) -> float:
    """A sampling temperature: finite, > 0, and with ``1 / T`` finite in fp32 (the kernels scale fp32 logits)."""
    t = real("temperature", value, low=0.0, low_open=True)
    if 1.0 / t > torch.finfo(torch.float32).max:
        raise ValueError(f"temperature {t!r} is too small: 1 / temperature overflows float32")
    return t
