"""The training step and the per-micro-batch loss context: what a verl policy loss cannot get from its 7 arguments.

This module holds the plug-in's process state, all of it but the Megatron forward's (``megatron._STATE``: the op's
backend and verl's replaced globals) (module globals: one copy per process, and verl runs one
actor per worker process; nothing here is shared between processes):

- ``_BASE``: the step declared by :func:`set_training_step` (custom loops): ``{"step", "total_steps"?, "source"}``;
- ``_STACK``: the frames of :func:`loss_context` and of the worker hook. Each frame is a complete view (a copy of the
  frame below, updated): the hook pushes one per actor update (``step``, ``total_steps``, ``source`` and, after
  TP-Schedule's cut of the batch, ``tp_q``) and one per micro-batch (``data``, ``model_output``); the losses read
  :func:`current`, i.e. ``_BASE`` overridden by the top frame;
- ``_WARNED``: the one-time log messages already emitted (one per process);
- ``_INSTALLED``: the ``(module name, hook)`` pairs registered with the import system (``hooks.install_hooks``).

The state is not thread-local: verl calls the losses on the thread that runs the update. Frames are pushed and
popped in a ``try / finally``, so an exception never leaves one behind.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
from typing import Optional

import torch

from rlvr_kernels.integrations._verl.options import DELTA_COEF_KEY, ROLLOUT_LOGP_KEY

#: The plug-in's logger: the public module's name, whichever private module logs.
logger = logging.getLogger("rlvr_kernels.integrations.verl")

_BASE: dict = {}
_STACK: list = []
_WARNED: set = set()
_INSTALLED: set = set()


def warn_once(key: str) -> bool:
    """True the first time ``key`` is seen in this process (then log the message)."""
    if key in _WARNED:
        return False
    _WARNED.add(key)
    return True


def check_step(v, name):
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1 (verl's first update is global step 1), got {v}")
    return int(v)


def set_training_step(step: Optional[int], total_steps: Optional[int] = None) -> None:
    """Declare the current 1-based training step (verl's ``global_steps``) for this process.

    For custom training loops; verl runs with the hooks installed do not need it (the step comes with the batch).
    ``total_steps`` (verl's ``total_training_steps``) is optional when ``policy_loss.rlvr.total_steps`` or
    ``actor.optim.total_training_steps`` is set. ``set_training_step(None)`` clears it.
    """
    _BASE.clear()
    if step is None:
        return
    _BASE.update(step=check_step(step, "step"), source="user")
    if total_steps is not None:
        _BASE["total_steps"] = check_step(total_steps, "total_steps")


def clear_training_step() -> None:
    """Forget the step set by :func:`set_training_step`."""
    _BASE.clear()


@contextlib.contextmanager
def pushed(frame: dict):
    """A frame on top of the current one for the duration of the block (the worker hook's update scope)."""
    _STACK.append({**(_STACK[-1] if _STACK else {}), **frame})
    try:
        yield
    finally:
        _STACK.pop()


@contextlib.contextmanager
def loss_context(
    *,
    step: Optional[int] = None,
    total_steps: Optional[int] = None,
    entropy=None,
    delta_coefficients=None,
    rollout_log_probs=None,
    data=None,
    model_output=None,
):
    """Extra inputs of the ``rlvr_*`` losses called inside the block (nested blocks inherit and override).

    The verl hooks open one around every actor update (``step``, ``total_steps``) and every micro-batch (``data``,
    ``model_output``: the entropy and the ``rlvr_delta_coef`` / ``rollout_log_probs`` fields are read from them).
    Custom loops and tests pass the tensors directly: ``entropy`` / ``delta_coefficients`` / ``rollout_log_probs``
    are ``[bs, response_len]`` like ``log_prob``.
    """
    top = dict(_STACK[-1]) if _STACK else {}
    new = {
        k: v
        for k, v in dict(
            step=step,
            total_steps=total_steps,
            entropy=entropy,
            delta_coef=delta_coefficients,
            rollout_logp=rollout_log_probs,
            data=data,
            model_output=model_output,
        ).items()
        if v is not None
    }
    if "step" in new:
        new["step"] = check_step(new["step"], "step")
        new.setdefault("source", "context")
    if "total_steps" in new:
        new["total_steps"] = check_step(new["total_steps"], "total_steps")
    if "data" in new or "model_output" in new:  # a new micro-batch: drop the previous one's tensors
        for k in ("entropy", "delta_coef", "rollout_logp"):
            if k not in new:
                top.pop(k, None)
    top.update(new)
    _STACK.append(top)
    try:
        yield
    finally:
        _STACK.pop()


def current() -> dict:
    """What the losses see now: the step of :func:`set_training_step` overridden by the innermost frame."""
    out = dict(_BASE)
    if _STACK:
        out.update(_STACK[-1])
    return out


def response_tensor(ctx: dict, name: str, like: torch.Tensor) -> Optional[torch.Tensor]:
    """A ``[bs, response_len]`` input of the losses: given to :func:`loss_context`, or read from the current
    micro-batch (``entropy`` from verl's model output, unpacked as verl unpacks ``log_probs``; the other names from
    the batch fields ``rlvr_delta_coef`` / ``rollout_log_probs``, aligned like ``advantages``)."""
    direct = {"entropy": "entropy", DELTA_COEF_KEY: "delta_coef", ROLLOUT_LOGP_KEY: "rollout_logp"}[name]
    t = ctx.get(direct)
    data = ctx.get("data")
    if t is None and name == "entropy":
        mo = ctx.get("model_output")
        t = mo.get("entropy", None) if hasattr(mo, "get") else None
        if t is not None and data is not None:
            from verl.workers.utils.padding import no_padding_2_padding

            t = no_padding_2_padding(t, data)
    elif t is None and data is not None and name in data.keys():
        t = data.get(name)
        if isinstance(t, torch.Tensor) and t.is_nested:
            t = t.to_padded_tensor(0.0)
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() == 2 and t.shape[0] == like.shape[0] and t.shape[1] < like.shape[1]:
        t = torch.nn.functional.pad(t, (0, like.shape[1] - t.shape[1]))
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(like.shape)} (that of log_prob)")
    return t.to(device=like.device)
