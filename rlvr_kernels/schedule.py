"""Temporal schedules: the value q(k) that a token-level credit rule uses at training step k.

Implements the step schedule of TP-Schedule ("Not only where, But when: Temporal Scheduling for RLVR", Zhang et al.,
arXiv 2605.25381; official code ``_prefix_curriculum``) and the other profiles under the same interface, as described
in ``docs/methods/tp-schedule.md``, section "The schedule". The value feeds, for example:

- TP-Schedule's cut-off ``q`` (:func:`rlvr_kernels.tp_schedule_mask`),
- the forking-token budget ``rho = 1 - q`` (:func:`rlvr_kernels.forking_token_mask`),
- the entropy-advantage bonus scale ``q`` (:func:`rlvr_kernels.entropy_shaped_advantages`),
- the D^3S keep-fraction ``rho = 1 - q`` (:func:`rlvr_kernels.d3s_token_mask`).
"""

from __future__ import annotations

import functools
import json
import math

import torch

from rlvr_kernels import _checks as C

__all__ = ["TemporalSchedule", "SCHEDULE_MODES"]

SCHEDULE_MODES = ("linear", "sigmoid", "gamma", "cosine", "rex", "step", "constant")

_SIGMOID_STEEPNESS = 8.0  # fixed in the TP-Schedule code
MAX_TOTAL_STEPS = 1 << 53  # total_steps * begin is a float product: exact below 2**53


def _sigma(x: float) -> float:
    return 1.0 / (1.0 + math.exp(_SIGMOID_STEEPNESS * (x - 0.5)))


class TemporalSchedule:
    """A pure function of the 1-based training step: ``schedule(k) -> float``.

    Arguments (all but ``mode`` keyword-only; ``total_steps`` is required):

    - ``mode``: one of ``"linear"`` (default), ``"sigmoid"``, ``"gamma"``, ``"cosine"``, ``"rex"``, ``"step"``,
      ``"constant"``.
    - ``start_value`` (default 0.99, TP's ``initial_schedule_magnitude`` m0) and ``end_value`` (default 0.0): the
      values before ``k_min`` and after ``k_max``, both in ``[0, 1]`` (every consumer of q is a fraction).
      ``end_value`` may exceed ``start_value`` (an increasing schedule).
    - ``begin`` (default 0.0) and ``end`` (default 0.8): fractions of training, in ``[0, 1]``;
      ``k_min = int(total_steps * begin)``, ``k_max = int(total_steps * end)``; ``k_max <= k_min`` is a ValueError.
    - ``total_steps``: the number of optimizer steps T (int >= 1); verl's ``total_training_steps``.
    - ``gamma`` (default 2.0, > 0): exponent of ``mode="gamma"``.

    Definition (``docs/methods/tp-schedule.md``, section "Profiles"): with
    ``p = clip((k - k_min) / (k_max - k_min), 0, 1)``,

    - ``gamma``:   ``q = (start_value * (1 - p)) ** gamma``, TP's exact form (the power also applies to m0, so the
      value before ``k_min`` is ``start_value ** gamma``); it requires ``end_value == 0``;
    - all others: ``q = end_value + (start_value - end_value) * f(p)`` with
      ``linear f = 1 - p``; ``sigmoid f = (s(p) - s(1)) / (s(0) - s(1))``, ``s(x) = 1 / (1 + exp(8 (x - 0.5)))``;
      ``cosine f = (1 + cos(pi p)) / 2``; ``rex f = (1 - p) / (0.5 + 0.5 (1 - p))`` (REX, Chen et al.,
      arXiv 2107.04197); ``step f = 1`` for ``p < 1`` else 0 (a hard switch at ``k_max``); ``constant f = 1``.

    With the defaults and ``total_steps=100`` this reproduces the worked table of ``docs/methods/tp-schedule.md``,
    section "Worked values": linear q(1) = 0.977625, q(20) = 0.7425, q(40) = 0.495, q(60) = 0.2475, q(k >= 80) = 0.

    UBA ("Stepsize anything", Tang et al., arXiv 2505.24452) is NOT offered: its closed form was not available to us
    when this was written, and we do not ship a formula we cannot cite.

    The step ``k`` is 1-based (verl's ``global_steps``: the first update is k = 1); ``k < 1`` is a ValueError and a
    non-integer ``k`` a TypeError. Steps past ``total_steps`` are allowed and give ``end_value`` (or 0 for gamma).
    Numbers may be Python or NumPy scalars or one-element tensors (stored as Python floats / ints, so
    :meth:`to_dict` stays JSON-serialisable); ``total_steps`` is at most 2**53.

    The object is immutable in spirit, picklable, comparable (``==``), and round-trips through
    :meth:`to_dict` / :meth:`from_dict` for logging and checkpoints.
    """

    __slots__ = ("mode", "start_value", "end_value", "begin", "end", "total_steps", "gamma")

    def __init__(
        self,
        mode: str = "linear",
        *,
        start_value: float = 0.99,
        end_value: float = 0.0,
        begin: float = 0.0,
        end: float = 0.8,
        total_steps: int,
        gamma: float = 2.0,
    ) -> None:
        mode = C.choice("mode", mode, SCHEDULE_MODES)
        start_value = C.unit("start_value", start_value)
        end_value = C.unit("end_value", end_value)
        begin = C.unit("begin", begin)
        end = C.unit("end", end)
        total_steps = C.integer("total_steps", total_steps, low=1, high=MAX_TOTAL_STEPS)
        gamma = C.real("gamma", gamma, low=0.0, low_open=True, fp32=False)
        if mode == "gamma" and end_value != 0.0:
            raise ValueError(
                f"end_value must be 0 for mode='gamma' (q = (start_value * (1 - p)) ** gamma), got {end_value!r}"
            )
        k_min, k_max = int(total_steps * begin), int(total_steps * end)
        if k_max <= k_min:
            raise ValueError(
                f"end must come after begin: k_max = int(total_steps * end) = {k_max} <= "
                f"k_min = int(total_steps * begin) = {k_min} (begin={begin!r}, end={end!r}, total_steps={total_steps})"
            )
        for name, value in (
            ("mode", mode),
            ("start_value", start_value),
            ("end_value", end_value),
            ("begin", begin),
            ("end", end),
            ("total_steps", total_steps),
            ("gamma", gamma),
        ):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):  # keep it a value object
        raise AttributeError(f"TemporalSchedule is immutable; build a new one (cannot set {name!r})")

    # pickling with __slots__ and a blocked __setattr__
    def __getstate__(self):
        return self.to_dict()

    def __setstate__(self, state):
        other = TemporalSchedule.from_dict(state)
        for name in self.__slots__:
            object.__setattr__(self, name, getattr(other, name))

    @property
    def k_min(self) -> int:
        return int(self.total_steps * self.begin)

    @property
    def k_max(self) -> int:
        return int(self.total_steps * self.end)

    def progress(self, k: int) -> float:
        """``p = clip((k - k_min) / (k_max - k_min), 0, 1)`` for the 1-based step ``k`` (any int >= 1: Python, NumPy
        or a one-element integer tensor)."""
        try:
            k = C.integer("step", k, low=1)
        except TypeError:
            raise TypeError(f"step must be an int (1-based training step), got {type(k).__name__}") from None
        except ValueError:
            raise ValueError(f"step must be >= 1 (the first update is step 1), got {k!r}") from None
        k_min, k_max = self.k_min, self.k_max
        if k >= k_max:  # also steps too large for a float division
            return 1.0
        if k <= k_min:
            return 0.0
        return (k - k_min) / (k_max - k_min)

    def __call__(self, k: int) -> float:
        p = self.progress(k)
        m0, m1 = self.start_value, self.end_value
        if self.mode == "gamma":
            return (m0 * (1.0 - p)) ** self.gamma
        if self.mode == "linear":
            f = 1.0 - p
        elif self.mode == "sigmoid":
            if m1 == 0.0:  # TP's exact expression and evaluation order
                return m0 * (_sigma(p) - _sigma(1.0)) / (_sigma(0.0) - _sigma(1.0))
            f = (_sigma(p) - _sigma(1.0)) / (_sigma(0.0) - _sigma(1.0))
        elif self.mode == "cosine":
            f = 0.5 * (1.0 + math.cos(math.pi * p))
        elif self.mode == "rex":
            f = (1.0 - p) / (0.5 + 0.5 * (1.0 - p))
        elif self.mode == "step":
            f = 1.0 if p < 1.0 else 0.0
        else:  # constant
            f = 1.0
        if m1 == 0.0:
            return m0 * f
        return m1 + (m0 - m1) * f

    def to_dict(self) -> dict:
        """Plain-python dict of the constructor arguments (JSON-serialisable)."""
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_dict(cls, d: dict) -> TemporalSchedule:
        """Inverse of :meth:`to_dict`; unknown keys are a ValueError, missing ones take the defaults."""
        if not isinstance(d, dict):
            raise TypeError(f"d must be a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.__slots__))
        if unknown:
            raise ValueError(f"unknown TemporalSchedule keys: {unknown}")
        kwargs = dict(d)
        mode = kwargs.pop("mode", "linear")
        if "total_steps" not in kwargs:
            raise ValueError("total_steps is required")
        return cls(mode, **kwargs)

    def __eq__(self, other) -> bool:
        if not isinstance(other, TemporalSchedule):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().items()))

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"TemporalSchedule({args})"


# ----------------------------------------------------------------------------------------------------------------
# q(k) as a tensor, for compiled callers: a custom op (opaque to torch.compile) that takes the step as a SymInt, so a
# compiled loss called with step = 1, 2, 3, ... is not recompiled for each step (dynamo makes the int argument
# dynamic after its first change) and computes q with the same Python arithmetic as ``schedule(k)``.


@functools.lru_cache(maxsize=64)
def _from_json(text: str) -> TemporalSchedule:
    return TemporalSchedule.from_dict(json.loads(text))


@torch.library.custom_op("rlvr_kernels::schedule_value", mutates_args=())
def _schedule_value_op(schedule: str, step: int) -> torch.Tensor:
    """``schedule`` (``json.dumps(TemporalSchedule.to_dict())``) at the 1-based ``step``: a float64 0-dim CPU tensor
    holding exactly ``float(schedule(step))`` (same checks and errors as :meth:`TemporalSchedule.__call__`)."""
    return torch.tensor(float(_from_json(schedule)(step)), dtype=torch.float64)


@_schedule_value_op.register_fake
def _(schedule, step):
    return torch.empty((), dtype=torch.float64)


def schedule_value_tensor(schedule: TemporalSchedule, step) -> torch.Tensor:
    """``schedule(step)`` as a float64 0-dim CPU tensor, through the ``rlvr_kernels::schedule_value`` op: no host
    read and no recompilation per step under ``torch.compile``. Consumers that need a Python float read it inside
    their own (opaque) ops; a CPU scalar costs no device synchronisation."""
    if isinstance(step, bool) or not isinstance(step, int):
        return torch.tensor(float(schedule(step)), dtype=torch.float64)  # NumPy ints, tensors: eager conversion
    return torch.ops.rlvr_kernels.schedule_value(_schedule_json(schedule), step)


@torch.compiler.assume_constant_result
def _schedule_json(schedule: TemporalSchedule) -> str:
    """``schedule`` as canonical JSON, evaluated at trace time under torch.compile (a constant of the graph)."""
    return json.dumps(schedule.to_dict(), sort_keys=True)
