"""Sequence-split rows (Ulysses / context parallelism): the whole-row quantities of the token ops, exchanged over the
sequence-parallel group as O(rows) partials, then fed into the single-process math.

Layout: padded ``[B, T_r]`` tensors; rank ``r`` of ``seq_group`` holds the contiguous columns ``[c_r, c_r + T_r)`` of
the global ``[B, T]`` batch, ranks in group-rank order, every rank the same ``B`` rows. ``T_r`` may differ between
ranks (0 too); ``c_r = T_0 + ... + T_{r-1}`` comes from the ``T_r`` every rank sends in the header all-gather that the
error agreement (:func:`rlvr_kernels.parallel.collectives.agree`) makes anyway, so there is no ``seq_offset``
argument to get wrong. Every rank must pass its own columns of the same global batch; the ops' outputs on a rank
are the single-process op's outputs on the whole rows, restricted to that rank's columns.

What is exchanged (int64 unless said; ``W`` ranks, ``B`` rows):

- :func:`begin`: one all-gather of ``[W, 4 + e + 2 s]`` (error code, message length, ``B``, ``T_r``, ``e`` op values,
  and the running min / max of the ``s`` of them that must agree: ``rho``, ``scope``, ``budget``, ...), plus one
  broadcast of the error message when a rank failed;
- :func:`row_partials`: one all-gather of ``[W, B, 2]``: each rank's last valid local index + 1 and valid count, from
  which every rank forms the row length ``L`` (last valid GLOBAL index + 1) and the valid count ``n``;
- :func:`carried_scan`: ``W - 1`` broadcasts of ``[B]`` float64, in rank order (CPPO's prefix budget, see there);
- :func:`gather_columns`: one all-gather of ``[W, B, max T_r]`` values and bytes (``O(tokens of the row)``; only the
  rank percentile of ``trajectory_percentile(values=...)``, an order statistic of every token, uses it).

Position rules reuse the reference on a FRAME (:func:`frame`): a bool mask ``[B, max(c_r + T_r, max L)]`` holding this
rank's mask at its global columns and a marker at each row's global last valid index, so that the reference's
``row_lengths`` and ``arange`` see the global ``L`` and positions; the rank keeps its columns of the result. That
is O(B T) elementwise work on each rank and no traffic (a ``[B, T]`` fp32 is small beside the ``[B, T_r, H]``
activations of the same rank).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from rlvr_kernels.layout import row_lengths
from rlvr_kernels.parallel import collectives as coll

__all__ = [
    "SeqSplit",
    "begin",
    "row_partials",
    "frame",
    "columns",
    "gather_columns",
    "carried_scan",
    "fp32_terms",
]

_F32_MAX = float(torch.finfo(torch.float32).max)


@dataclasses.dataclass(frozen=True)
class SeqSplit:
    """This rank's columns of a sequence-split batch: ``[offset, offset + width)`` of ``total``, ``rows`` rows."""

    group: Any
    rank: int
    world: int
    rows: int
    widths: tuple[int, ...]
    extra: torch.Tensor  # int64 [world, n_extra]: each rank's op flags from the header

    @property
    def offset(self) -> int:
        return sum(self.widths[: self.rank])

    @property
    def width(self) -> int:
        return self.widths[self.rank]

    @property
    def total(self) -> int:
        return sum(self.widths)

    def offsets(self, device) -> torch.Tensor:
        """int64 ``[world]``: every rank's first global column."""
        w = torch.tensor(self.widths, dtype=torch.int64, device=device)
        return torch.cumsum(w, 0) - w


def begin(
    local: Callable[[], tuple[Any, Sequence[int]]],
    *,
    device: torch.device,
    seq_group=None,
    dp_group=None,
    extra: Sequence[str] = (),
    same: Sequence[str] = (),
) -> tuple[Any, Optional[SeqSplit]]:
    """The first step of an op with groups: ``local()`` returns ``(value, (B, T_local, *extra))`` (``extra``: the
    names of the op's own header ints); one header all-gather per group (``seq_group`` first, then ``dp_group``)
    agrees on errors (every rank raises the first failing rank's exception), on the extras named in ``same`` (equal
    on every rank, else the same ``ValueError`` everywhere) and, over ``seq_group``, on the rows (every rank the same
    ``B``) and gives every rank each rank's ``T_r``. Returns ``(value, split)`` (``split`` None without
    ``seq_group``)."""
    groups = []
    if seq_group is not None:
        groups.append(("seq_group", coll.check_group("seq_group", seq_group)))
    if dp_group is not None:
        groups.append(("dp_group", coll.check_group("dp_group", dp_group)))
    names = list(extra)

    def same_rows(name: str, headers: torch.Tensor) -> None:
        rows = headers[:, 0].tolist()
        if name == "seq_group" and any(b != rows[0] for b in rows):
            raise ValueError(
                "seq_group: every rank must hold the same rows of the batch (its own columns of them), got "
                f"B = {rows} on ranks 0..{len(rows) - 1}"
            )

    value, peers = coll.agree(
        local,
        groups,
        2 + len(names),
        device,
        same=[(2 + names.index(n), n) for n in same],
        check=same_rows,
    )
    if seq_group is None:
        return value, None
    p = peers[0]
    widths = tuple(int(t) for t in p.header[:, 1].tolist())
    return value, SeqSplit(p.group, p.rank, p.world, int(p.header[0, 0]), widths, p.header[:, 2:])


def row_partials(split: SeqSplit, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, n)``, int64 ``[B]`` each: the row length (last valid GLOBAL index + 1, 0 for a row without valid
    tokens) and the valid count of the whole rows. One all-gather of ``[W, B, 2]`` int64."""
    local = torch.stack([row_lengths(valid), valid.sum(dim=1, dtype=torch.int64)], 1)
    table = coll.all_gather(local, split.group)  # [W, B, 2]
    ends = torch.where(table[..., 0] > 0, split.offsets(valid.device)[:, None] + table[..., 0], 0)
    return ends.amax(0), table[..., 1].sum(0)


def frame(split: SeqSplit, valid: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A bool mask at global positions: ``valid`` at this rank's columns, and (with the global ``lengths``) True at
    each row's last valid global index, so that :func:`rlvr_kernels.layout.row_lengths` of the frame is ``lengths``.
    Width ``max(offset + width, max(lengths))``. The columns of this rank are exactly ``valid``: a row's last valid
    index either lies in them (already True) or outside them."""
    B, Tr = valid.shape
    c = split.offset
    width = c + Tr
    if lengths is not None and B:
        width = max(width, int(lengths.max()))
    f = torch.zeros(B, width, dtype=torch.bool, device=valid.device)
    f[:, c : c + Tr] = valid
    if lengths is not None:
        rows = torch.nonzero(lengths > 0).flatten()
        f[rows, lengths[rows] - 1] = True
    return f


def columns(split: SeqSplit, x: torch.Tensor) -> torch.Tensor:
    """This rank's columns of a result computed on a :func:`frame` (or on gathered whole rows)."""
    return x[:, split.offset : split.offset + split.width].contiguous()


def gather_columns(split: SeqSplit, *xs: torch.Tensor) -> list[torch.Tensor]:
    """The whole rows ``[B, T]`` of each ``[B, T_r]`` tensor (bool ones travel as uint8), in one all-gather each of
    ``[W, B, max T_r]``: ``O(tokens of the row)`` traffic."""
    from rlvr_kernels.parallel.columns import whole_rows

    return [whole_rows(x, split.group, list(split.widths)) for x in xs]


def fp32_terms(carry: torch.Tensor) -> torch.Tensor:
    """fp32 ``[B, m]`` terms whose sequential float64 sum from 0.0 (``((0 + t_0) + t_1) + ...``) is exactly the
    float64 ``carry [B]`` (``m = 0`` for a zero carry; usually at most 3 terms, one per 24 bits of the 53; every term
    lies within the fp32 range, so a carry beyond it, from a ``delta_b`` near the fp32 maximum, takes more)."""
    acc = torch.zeros_like(carry)
    terms = []
    big = float(carry.abs().max()) / _F32_MAX if carry.numel() else 0.0
    for _ in range(8 + int(big)):
        rest = carry - acc
        if not bool((rest != 0).any()):
            break
        t = rest.clamp(-_F32_MAX, _F32_MAX).to(torch.float32)
        terms.append(t)
        acc = acc + t.to(torch.float64)
    else:
        raise RuntimeError("fp32_terms: the carry of the prefix scan could not be written as fp32 terms")
    if not terms:
        return carry.new_zeros((carry.shape[0], 0), dtype=torch.float32)
    return torch.stack(terms, 1)


def carried_scan(
    split: SeqSplit,
    Z: torch.Tensor,
    w: torch.Tensor,
    db: torch.Tensor,
    delta: float,
    scan: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor],
) -> torch.Tensor:
    """CPPO's prefix-budget test (``scan``: :func:`rlvr_kernels.cpu.token_rows.prefix_inside`, the single-process
    scan) on this rank's columns, with the running sum of the earlier ranks' columns carried in.

    The single-process scan accumulates ``G_j = db w_j - Z_j`` in float64 (``torch.cumsum``'s CPU accumulator for
    fp32, and the native kernel's) and rounds the running sum to fp32 at every position; floating-point addition is
    not associative, so the exact carry at column ``c_r`` is the SEQUENTIAL sum over all earlier columns, not a sum
    of per-rank partial sums. It is therefore passed along in rank order: rank ``s`` folds its columns into the carry
    it received and broadcasts the result (``W - 1`` broadcasts of ``[B]`` float64). The carry enters the unchanged
    scan as leading columns with ``w = 0`` and ``Z = -t`` (so ``G = t``, the fp32 terms of :func:`fp32_terms`),
    which puts the scan's accumulator exactly where the single-process scan has it at column ``c_r``; the leading
    columns' results are dropped. Exact on CPU. On CUDA ``cumsum`` is a parallel fp32 scan (and the single-process op
    runs the Triton kernel's fp32 block scan), so there the two agree to the rounding of the running sum.
    """
    B = Z.shape[0]
    dev = Z.device
    carry = torch.zeros(B, dtype=torch.float64, device=dev)
    if B:
        G = db[:, None] * w - Z  # the summand of rlvr_kernels.reference.cppo.prefix_inside
        for s in range(split.world - 1):
            if split.rank == s:
                buf = torch.cat([carry[:, None], G.to(torch.float64)], 1).cumsum(1)[:, -1].contiguous()
            else:
                buf = torch.empty(B, dtype=torch.float64, device=dev)
            coll.broadcast(buf, s, split.group)
            if split.rank == s + 1:
                carry = buf
    terms = fp32_terms(carry)
    m = terms.shape[1]
    if m == 0:
        return scan(Z, w, db, delta)
    Zc = torch.cat([-terms, Z.to(torch.float32)], 1)
    wc = torch.cat([torch.zeros_like(terms), w.to(torch.float32)], 1)
    return scan(Zc, wc, db, delta)[:, m:]
