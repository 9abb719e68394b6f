"""Exact distributed k-th selection: top-k masks and order statistics over tokens spread across ranks, without
gathering the tokens.

Radix select on the fp32 bit pattern, as the single-process Triton select (:mod:`rlvr_kernels.kernels.select`):
every value maps to an int64 key in ``[0, 2**32)`` whose integer order is the numeric order (``-0.0`` folded onto
``+0.0``, ``-inf < finite < +inf``; NaN must not take part). Four rounds of 8-bit digits, most significant first;
in each round every rank builds, per segment, the 256-bin histogram of the digit over its tokens still in the
candidate bucket, the histograms are summed over the group(s) (one ``all_reduce`` of ``[S, 256]`` int64 per round and
group), and every rank picks the same bucket. After the fourth round every rank knows the exact key of the k-th
largest value of each segment, how many values are greater, and how many equal values the top-k takes.

Ties go to the lower GLOBAL index, as the single-process ops do: when the taken ties are not all of them (known
from the histograms, so every rank decides alike), one all-gather of per-row tie counts (``[W, R]`` int64) gives each
rank the number of ties before its tokens in the global order:

- per-row segments over ``seq_group`` (forking tokens, D^3S ``scope="sequence"``, CPPO's quantile): the row's columns
  in rank order;
- one batch segment (D^3S ``scope="batch"``): row-major order of the global batch, i.e. (data-parallel rank, row,
  sequence rank, column): the concatenation of the data-parallel ranks' batches in rank order, each of them the
  ``[B, T]`` batch assembled from its sequence ranks' columns. Over ``dp_group`` alone a rank's batch may have any
  number of rows and either layout (the packed order is the row-major order of the valid tokens).

Traffic: ``4`` all-reduces of ``S x 256 x 8`` bytes per group (``S`` rows, or 1 for the batch), plus at most one
all-gather of ``R`` int64 per group; no token crosses ranks. Exact: the result equals the single-process op on the
whole rows (or the concatenated batch), ties included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from rlvr_kernels.parallel import collectives as coll

__all__ = ["ordered_key", "key_to_float", "Selection", "radix_select", "topk_mask", "order_stats", "KEY_NONE"]

KEY_NONE = 1 << 32  # above every key: "select nothing"
_BITS = 8
_BINS = 1 << _BITS
_SHIFTS = (24, 16, 8, 0)

Budget = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def ordered_key(x: torch.Tensor) -> torch.Tensor:
    """Values (compared in fp32) -> int64 keys in ``[0, 2**32)`` in the same order; ``-0.0`` maps onto ``+0.0``."""
    x = x.to(torch.float32)
    x = torch.where(x == 0, torch.zeros((), dtype=torch.float32, device=x.device), x).contiguous()
    bits = x.view(torch.int32)
    signed = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return signed.to(torch.int64) + (1 << 31)


def key_to_float(key: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`ordered_key` for keys in ``[0, 2**32)``."""
    signed = (key - (1 << 31)).to(torch.int32)
    bits = torch.where(signed >= 0, signed, signed ^ 0x7FFFFFFF)
    return bits.contiguous().view(torch.float32)


@dataclasses.dataclass(frozen=True)
class Selection:
    """Per segment (int64 ``[S]`` each): ``key`` of the k-th largest value (``KEY_NONE`` when k = 0), ``n_take``
    values equal to it that the top-k takes, ``n_equal`` values equal to it in all (0 when k = 0), ``n`` values in
    the segment, ``k`` the budget (clamped to ``[0, n]``)."""

    key: torch.Tensor
    n_take: torch.Tensor
    n_equal: torch.Tensor
    n: torch.Tensor
    k: torch.Tensor


def radix_select(keys: torch.Tensor, seg: torch.Tensor, S: int, k: Budget, groups: Sequence[Any]) -> Selection:
    """The k-th largest key of each segment over all ranks of ``groups``.

    ``keys`` int64 ``[R, M]`` (:func:`ordered_key`; negative: not taking part), ``seg`` int64 ``[R]`` the segment of
    each local row (``S`` segments, the same on every rank), ``k`` int64 ``[S]`` or a function of the global counts
    ``n [S]`` (known after the first round, which saves a collective: e.g. ``ceil(n rho)``). The histograms are
    summed over each group of ``groups`` in turn (several orthogonal groups: over their product)."""
    dev = keys.device
    taking = keys >= 0
    seg_col = seg[:, None]
    prefix = torch.zeros(S, dtype=torch.int64, device=dev)
    n = kk = k_rem = last = prefix
    for p, shift in enumerate(_SHIFTS):
        active = taking
        if p:
            high = shift + _BITS
            active = taking & ((keys >> high) == (prefix[seg] >> high)[:, None])
        idx = seg_col * _BINS + ((keys >> shift) & (_BINS - 1))
        hist = torch.bincount(idx[active], minlength=S * _BINS)[: S * _BINS].to(torch.int64)
        coll.all_reduce(hist, groups)
        counts = hist.view(S, _BINS)
        if p == 0:
            n = counts.sum(1)
            kk = k(n) if callable(k) else k
            kk = torch.minimum(kk.to(device=dev, dtype=torch.int64).clamp(min=0), n)
            k_rem = kk
        suffix = counts.flip(1).cumsum(1).flip(1)  # suffix[d]: candidates whose digit is >= d
        d_sel = ((suffix >= k_rem[:, None]).sum(1) - 1).clamp(min=0)
        nxt = (d_sel + 1).clamp(max=_BINS - 1)[:, None]
        above = torch.where(d_sel < _BINS - 1, suffix.gather(1, nxt).squeeze(1), 0)
        k_rem = k_rem - above
        prefix = prefix + (d_sel << shift)
        last = counts.gather(1, d_sel[:, None]).squeeze(1)
    none = kk <= 0
    zero = torch.zeros_like(prefix)
    return Selection(
        key=torch.where(none, torch.full_like(prefix, KEY_NONE), prefix),
        n_take=torch.where(none, zero, k_rem),
        n_equal=torch.where(none, zero, last),
        n=n,
        k=kk,
    )


def _rank_of(group) -> int:
    return dist.get_rank(group)


def topk_mask(
    scores: torch.Tensor,
    valid: torch.Tensor,
    k: Budget,
    *,
    per_row: bool,
    seq_group=None,
    dp_group=None,
) -> torch.Tensor:
    """The ``k`` valid entries of largest score (compared in fp32), ties to the lower global index (module docstring),
    as a bool ``[R, M]`` mask of this rank's entries.

    ``per_row=True``: each row is a segment split over ``seq_group`` (``k [R]``); ``per_row=False``: one segment, the
    whole batch over ``seq_group`` and ``dp_group`` (``k [1]``). ``k`` may be a function of the global counts."""
    keys = torch.where(valid, ordered_key(scores), torch.full((), -1, dtype=torch.int64, device=scores.device))
    R = keys.shape[0]
    dev = keys.device
    if per_row:
        seg = torch.arange(R, device=dev)
        S, groups = R, [g for g in (seq_group,) if g is not None]
    else:
        seg = torch.zeros(R, dtype=torch.int64, device=dev)
        S, groups = 1, [g for g in (seq_group, dp_group) if g is not None]
    sel = radix_select(keys, seg, S, k, groups)
    kth = sel.key[seg][:, None]
    greater = keys > kth  # keys of invalid entries are -1
    equal = valid & (keys == kth)
    if bool((sel.n_take == sel.n_equal).all()):  # every tie is taken (the same answer on every rank)
        return greater | equal
    ties = equal.sum(dim=1, dtype=torch.int64)  # [R]
    if per_row:
        offset = torch.zeros_like(ties)
        if seq_group is not None:
            table = coll.all_gather(ties, seq_group)  # [W, R]
            offset = table[: _rank_of(seq_group)].sum(0)
    else:
        row_total, before = ties, torch.zeros_like(ties)
        if seq_group is not None:
            table = coll.all_gather(ties, seq_group)
            row_total, before = table.sum(0), table[: _rank_of(seq_group)].sum(0)
        offset = torch.cumsum(row_total, 0) - row_total + before
        if dp_group is not None:
            totals = coll.all_gather(row_total.sum().reshape(1), dp_group)  # [W_dp, 1]
            offset = offset + totals[: _rank_of(dp_group)].sum()
    rank_in_ties = offset[:, None] + torch.cumsum(equal, dim=1, dtype=torch.int64) - equal.to(torch.int64)
    return greater | (equal & (rank_in_ties < sel.n_take[seg][:, None]))


def order_stats(
    values: torch.Tensor,
    valid: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    n: torch.Tensor,
    group: Optional[Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``lo[r]``-th and ``hi[r]``-th (0-based) valid values of each row in ascending order, over the row's
    columns on every rank of ``group`` (``n [R]``: the rows' global valid counts), fp32 ``[R]`` each; ``+inf`` past
    the valid count (as :func:`rlvr_kernels.reference.cppo.order_stats`). One selection of ``2R`` segments (the
    ascending ``i``-th is the ``(n - i)``-th largest). A zero is returned as ``+0.0``."""
    keys = torch.where(valid, ordered_key(values), torch.full((), -1, dtype=torch.int64, device=values.device))
    R = keys.shape[0]
    both = torch.cat([keys, keys], 0)
    seg = torch.arange(2 * R, device=keys.device)
    k = torch.cat([n - lo, n - hi]).clamp(min=0)
    sel = radix_select(both, seg, 2 * R, k, [group] if group is not None else [])
    inf = torch.full((2 * R,), float("inf"), dtype=torch.float32, device=keys.device)
    v = torch.where(sel.key >= KEY_NONE, inf, key_to_float(sel.key.clamp(max=KEY_NONE - 1)))
    return v[:R], v[R:]
