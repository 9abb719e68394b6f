"""Collective helpers of the parallel token ops (:mod:`rlvr_kernels.parallel.sequence`,
:mod:`rlvr_kernels.parallel.select`).

- :func:`all_gather`: ``[world, *t.shape]``, every rank's ``t`` in group-rank order. ``all_gather_single`` where torch
  has it (2.13; ``all_gather_into_tensor`` is deprecated there), ``all_gather_into_tensor`` before (torch >= 2.4),
  and the list form ``all_gather`` for a backend without a single-tensor all-gather (gloo in older torch).
- :func:`agree`: the error contract of every op that takes a group. Each rank first runs the op's LOCAL part
  (argument and value checks, token-local work) with every exception caught; then ONE all-gather of a small int64
  header per group (an error code and the message length, then what the op needs to know of its peers: rows, widths,
  flags). When a rank failed, every rank learns it from that all-gather, the first failing rank (group order)
  broadcasts its message, and every rank raises the same exception: the same type (``ValueError``, ``TypeError``;
  anything else as ``RuntimeError``) and the same text, ending ``(raised on rank R)`` (R: the global rank). No rank is
  left waiting in a later collective. The header also carries the arguments that decide which collectives follow
  (a budget fraction, a scope): ranks that disagree on one would wait in different collectives, so a difference
  raises the same ``ValueError`` everywhere; and a check of one group's headers (rows that differ between the ranks
  of a sequence group) raises on every rank of the group and travels on to the other group.

Checks of a group argument itself (not a ``ProcessGroup``, no process group initialised) raise before any
collective: without a group there is nobody to agree with.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["Peers", "check_group", "all_gather", "all_reduce", "broadcast", "agree", "float_bits"]

# Error codes in the header: 0 = ok.
_CODES = {ValueError: 1, TypeError: 2}
_TYPES = {1: ValueError, 2: TypeError, 3: RuntimeError}
_MAX_MESSAGE = 8192  # bytes of an error message broadcast to the other ranks


def check_group(name: str, group) -> Any:
    """``group`` as a process group this rank belongs to (raises before any collective)."""
    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    if not dist.is_initialized():
        raise ValueError(f"{name} needs torch.distributed initialised (torch.distributed.init_process_group)")
    if dist.get_rank(group) < 0:
        raise ValueError(f"this process is not a member of {name}")
    return group


_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_NO_SINGLE: set[str] = set()  # backends found without a single-tensor all-gather


def all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """``[world, *t.shape]``: every rank's ``t`` (same shape and dtype on every rank), in group-rank order."""
    world = dist.get_world_size(group)
    t = t.contiguous()
    out = t.new_empty((world, *t.shape))
    if t.numel() == 0:
        return out
    backend = str(dist.get_backend(group))
    if backend not in _NO_SINGLE:
        try:
            _SINGLE(out.view(-1), t.view(-1), group=group)  # the concatenated form: every backend takes it
            return out
        except (RuntimeError, NotImplementedError) as e:  # raised on every rank alike, before any data moved
            if "support" not in str(e).lower():
                raise
            _NO_SINGLE.add(backend)
    dist.all_gather(list(out.view(world, -1).unbind(0)), t.view(-1), group=group)
    return out


def all_reduce(t: torch.Tensor, groups: Sequence[Any], op=dist.ReduceOp.SUM) -> torch.Tensor:
    """``t`` reduced in place over each group in turn (over two orthogonal groups: over their product)."""
    for g in groups:
        if t.numel():
            dist.all_reduce(t, op=op, group=g)
    return t


def broadcast(t: torch.Tensor, src: int, group) -> torch.Tensor:
    """``t`` from group rank ``src`` to every rank of ``group``, in place."""
    if t.numel():
        dist.broadcast(t, src=dist.get_global_rank(group, src), group=group)
    return t


@dataclasses.dataclass(frozen=True)
class Peers:
    """One group as a call sees it: this rank, the group size and every member's header (int64 ``[world, n]`` on
    the CPU, rows in group-rank order, without the error fields)."""

    name: str
    group: Any
    rank: int
    world: int
    header: torch.Tensor


def float_bits(x: float) -> int:
    """A Python float as the int64 of its float64 bits (to compare numbers exactly in an int64 header)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _code(e: BaseException) -> int:
    for t, c in _CODES.items():
        if isinstance(e, t):
            return c
    return 3


def agree(
    local: Callable[[], tuple[Any, Sequence[int]]],
    groups: Sequence[tuple[str, Any]],
    n_header: int,
    device: torch.device,
    *,
    same: Sequence[tuple[int, str]] = (),
    check: Optional[Callable[[str, torch.Tensor], None]] = None,
) -> tuple[Any, list[Peers]]:
    """Run ``local()`` (returns ``(value, header)``, ``header`` ``n_header`` ints), then one all-gather of
    ``[error code, message length, *header, *min, *max]`` (int64, on ``device``) per group of ``groups``
    (``(name, group)`` pairs, in that order). Returns ``(value, peers)`` with one :class:`Peers` per group, or raises
    the first failing rank's exception on every rank (see the module docstring).

    ``same``: ``(index into header, name)`` of the values that must be equal on every rank of every group (the
    arguments that decide which collectives follow, e.g. a budget fraction or a scope: ranks that disagreed would
    wait in different collectives). Their running minimum and maximum travel through the exchanges, so a difference
    anywhere is seen by every rank, which all raise the same ``ValueError``. ``check(name, headers)`` may raise a
    ``ValueError`` about one group's headers (``int64 [world, n_header]``, e.g. rows that differ between the ranks of
    a sequence group); every rank of that group raises it, and it travels on like a local failure.

    With two groups (a sequence group and a data-parallel group orthogonal to it, the ranks of a 2-D mesh) a failure
    seen in the first exchange travels on in the second, so it reaches every rank of the product."""
    origin: Optional[BaseException] = None
    code, message = 0, ""
    try:
        value, header = local()
        header = [int(h) for h in header]
        if len(header) != n_header:
            raise RuntimeError(f"internal: header of {len(header)} ints, expected {n_header}")
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        origin = e
        code = _code(e)
        text = str(e) if code != 3 else f"{type(e).__name__}: {e}"
        message = f"{text} (raised on rank {dist.get_rank()})"
        value, header = None, [0] * n_header
    ns = len(same)
    low = [header[i] for i, _ in same]
    high = list(low)
    peers = []
    for name, group in groups:
        data = message.encode("utf-8")[:_MAX_MESSAGE]
        row = torch.tensor([code, len(data), *header, *low, *high], dtype=torch.int64, device=device)
        table = all_gather(row, group).cpu()
        me, world = dist.get_rank(group), dist.get_world_size(group)
        failed = torch.nonzero(table[:, 0]).flatten()
        if failed.numel():
            src = int(failed[0])
            n = int(table[src, 1])
            if me == src:
                buf = torch.tensor(list(data), dtype=torch.uint8, device=device)
            else:
                buf = torch.empty(n, dtype=torch.uint8, device=device)
            broadcast(buf, src, group)
            code = int(table[src, 0])
            message = bytes(buf.cpu().tolist()).decode("utf-8", errors="replace")
            if me != src:
                origin = None
        headers = table[:, 2 : 2 + n_header]
        ok = table[:, 0] == 0  # the ranks that failed sent zeros
        if ns and bool(ok.any()):
            low = table[ok, 2 + n_header : 2 + n_header + ns].amin(0).tolist()
            high = table[ok, 2 + n_header + ns :].amax(0).tolist()
        if not code and check is not None:
            try:
                check(name, headers)
            except ValueError as e:
                code, message, origin = 1, str(e), e
        peers.append(Peers(name, group, me, world, headers))
    if code:
        raise _TYPES[code](message) from origin
    for (_, what), lo, hi in zip(same, low, high):
        if lo != hi:
            names = " and ".join(name for name, _ in groups)
            raise ValueError(f"{what} must be the same on every rank of {names}")
    return value, peers
