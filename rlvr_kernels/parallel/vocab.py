"""Vocabulary-parallel statistics: combine the per-shard row statistics of a vocabulary-sharded lm_head.

Megatron's layout: rank ``r`` of the tensor-parallel group holds the contiguous vocabulary rows
``[start_r, start_r + V_r)`` of the lm_head, the shards in rank order and covering ``[0, V)``; targets and gathered
ids are global. Each rank computes, over its own columns only, the statistics the unsharded op computes over all
of them (``lse_r``, ``entropy_r``, and the scaled logits it owns at the target and gathered ids); one all-gather
of those O(N) values gives every rank every shard's, and the combination below gives the unsharded op's outputs,
bit-identical on every rank (each rank runs the same arithmetic on the same gathered values, in rank order)::

    lse     = logsumexp_r lse_r
    w_r     = exp(lse_r - lse)                 (the probability mass of shard r)
    entropy = sum_r w_r (entropy_r - log w_r)  (the chain rule of entropy: no cancellation)
    logp    = z_y - lse,   gathered_k = z_{id_k} - lse   (z owned by exactly one shard)

The gathered block also carries each rank's ``(start_r, V_r)``, so a shard layout that is not contiguous, a target
beyond the last shard or a non-finite row (NaN on one shard makes the combined ``lse`` NaN) is found by every rank
at once: all raise the same ``ValueError`` (none is left waiting in a collective). The backward needs no collective
beyond dX's all-reduce: ``dz`` on a shard's columns uses the global ``lse`` and entropy, and the one-hot parts of
the outputs whose id lies on another shard move into the gradient of the log-normaliser
(``rlvr_kernels.reference.logprobs.upstream_coefficients``).
Design notes: ``docs/design/vocab-parallel.md``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from rlvr_kernels.parallel.collectives import all_gather, all_reduce, check_group

# Group names -> groups, registered by the public wrappers so that custom ops (which take the name) find them.
_GROUPS: dict[str, object] = {}


def group_name(group) -> str:
    """The name under which a custom op finds ``group`` again (:func:`resolve_group`)."""
    name = group.group_name
    _GROUPS[name] = group
    return name


def resolve_group(name: str):
    """The process group registered (or known to torch.distributed) under ``name``."""
    group = _GROUPS.get(name)
    if group is None:
        group = dist.distributed_c10d._resolve_process_group(name)
    return group


def all_reduce_sum_(t: torch.Tensor, group) -> torch.Tensor:
    """``t`` summed in place over ``group`` (dX's parts: fp32 or wider, summed before any cast)."""
    return all_reduce(t, [group])


def max_over(value: int, group, device: torch.device) -> int:
    """The largest ``value`` over the ranks of ``group`` (one scalar all-reduce)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    return int(all_reduce(t, [group], op=dist.ReduceOp.MAX))


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """This rank's vocabulary rows ``[start, start + size)`` of the lm_head sharded over ``group``."""

    group: object
    rank: int
    world: int
    start: int
    size: int

    def local_ids(self, ids: torch.Tensor, ignore_index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(local, owned)`` for global ``ids``: ``owned`` where the id lies on this shard, ``local`` its row in the
        shard there, 0 elsewhere (a valid row whose contribution the caller masks), and ``ignore_index`` kept."""
        owned = (ids >= self.start) & (ids < self.start + self.size)
        local = torch.where(owned, ids - self.start, torch.zeros_like(ids))
        if ignore_index is not None:
            local = torch.where(ids == ignore_index, torch.full_like(ids, ignore_index), local)
        return local, owned


def vocab_shard(group, size: int, vocab_start: int | None) -> VocabShard:
    """Check the tensor-parallel arguments (the same on every rank: they raise before any collective) and describe
    this rank's shard. ``vocab_start`` defaults to ``rank * size`` (Megatron's even split); shards of different
    sizes need it on every rank (a wrong layout is found after the exchange, on every rank alike)."""
    check_group("tp_group", group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if vocab_start is None:
        vocab_start = rank * size
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0 (this shard's first global id), got {vocab_start!r}")
    return VocabShard(group, rank, world, int(vocab_start), int(size))


def combine(
    shard: VocabShard,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    target_logit: torch.Tensor,
    gathered_logits: torch.Tensor,
    keep: torch.Tensor,
    gather_ids: torch.Tensor | None,
    what: str,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], int]:
    """``((logp [N], entropy [N], gathered [N, K], lse [N]), V)``: the unsharded outputs from this shard's row
    statistics, and the vocabulary size of all the shards; one all-gather over ``shard.group``.

    lse, entropy ``[N]``: this shard's log-normaliser and entropy of each row (its softmax over its own columns);
    target_logit ``[N]``: the scaled target logit where this shard owns the target, else 0; gathered_logits
    ``[N, K]``: the same at ``gather_ids``; keep ``[N]``: the rows that count (the others give 0). Computes in
    float64 (the exchanged values too: the layout integers stay exact) and returns ``lse``'s dtype. Raises
    ``ValueError`` on every rank alike: shards not contiguous from 0 in rank order, an id at or past the last
    shard's end, a row that counts with a non-finite normaliser.
    """
    n, k = gathered_logits.shape
    dev = lse.device
    f64 = torch.float64
    trailer = torch.tensor([shard.start, shard.size], dtype=f64, device=dev)
    packed = torch.cat(
        [
            torch.stack([lse.to(f64), entropy.to(f64), target_logit.to(f64)], 1).reshape(-1),
            gathered_logits.to(f64).reshape(-1),
            trailer,
        ]
    )
    allr = all_gather(packed, shard.group)  # [world, 3N + NK + 2]
    layout = allr[:, -2:].cpu()
    starts, sizes = layout[:, 0].long().tolist(), layout[:, 1].long().tolist()
    expected = 0
    for r, (s0, sz) in enumerate(zip(starts, sizes)):
        if s0 != expected:
            raise ValueError(
                f"{what}: the vocabulary shards must be contiguous in rank order from 0 (Megatron's layout); rank {r} "
                f"starts at {s0}, expected {expected} (pass vocab_start= to the op on each rank: the shard sizes are "
                f"{sizes})"
            )
        expected += sz
    vocab = expected
    stats = allr[:, : 3 * n].view(-1, n, 3)
    lse_r, ent_r, tgt_r = stats.unbind(2)
    out = torch.logsumexp(lse_r, dim=0)
    w = torch.exp(lse_r - out)
    mix = torch.where(w > 0, w * (ent_r + (out - lse_r)), torch.zeros_like(w))
    ent = mix.sum(0)
    logp = tgt_r.sum(0) - out
    bad = keep & ~torch.isfinite(out)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{what}: the logits of row {row} (a row that is not ignore_index) are not finite on some vocabulary "
            "shard: NaN/inf in the inputs, or logits / temperature beyond the float32 range"
        )
    zero = torch.zeros((), dtype=f64, device=dev)
    if gather_ids is not None and k:
        gl = allr[:, 3 * n : 3 * n + n * k].view(-1, n, k).sum(0) - out.unsqueeze(1)
        gathered = torch.where(keep.unsqueeze(1), gl, zero)
    else:
        gathered = torch.zeros((n, k), dtype=f64, device=dev)
    dt = lse.dtype
    return (
        torch.where(keep, logp, zero).to(dt),
        torch.where(keep, ent, zero).to(dt),
        gathered.to(dt),
        torch.where(keep, out, zero).to(dt),
    ), vocab


def check_global_ids(ids: torch.Tensor, keep: torch.Tensor, vocab: int, name: str) -> None:
    """Raise ``ValueError`` when an id that counts lies outside ``[0, vocab)`` (the union of the shards)."""
    bad = keep & ((ids < 0) | (ids >= vocab))
    if ids.numel() and bool(bad.any()):
        raise ValueError(f"{name} must lie in [0, {vocab}) (the vocabulary of all shards); found {int(ids[bad][0])}")
