"""Sample-level selection of rollouts: D^3S's maximum-variance subset per group.

D^3S ("Learning More with Less: A Dynamic Dual-Level Down-Sampling Framework for Efficient Policy Optimization",
Wang et al., ICLR 2026, arXiv 2509.22115; ``docs/methods/d3s.md``, section "Sample level") keeps, in every group of
rollouts of one prompt, the ``k`` rollouts whose advantages have the largest variance. This module computes that
subset exactly; the trainers apply it before the loss (TRL: ``RLVRGRPOConfig(d3s_rollouts_k=k)``; verl:
:func:`rlvr_kernels.integrations.verl.d3s_rollout_mask`).
"""

from __future__ import annotations

import torch

from rlvr_kernels import _checks as C

__all__ = ["d3s_select_rollouts", "d3s_rollout_mask", "TIE_RTOL"]

# Scores (k^2 x variance) within TIE_RTOL x (k x the largest sum of squares among the candidates) of the best are
# ties: far above float64 rounding of the prefix sums, far below any difference of real data.
TIE_RTOL = 1e-12


def d3s_select_rollouts(advantages: torch.Tensor, group_ids: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, ascending) of the rollouts D^3S's sample level keeps: in every group of ``group_ids`` the ``k``
    rollouts whose advantages have the largest (population) variance; a group of at most ``k`` rollouts keeps all.

    Arguments: ``advantages`` ``[N]`` float (finite), one advantage per rollout; ``group_ids`` ``[N]`` integer
    labels (any values, groups need not be contiguous); ``k`` int >= 1. Same device for both; the result is on it.

    **Exactness.** A maximum-variance ``k``-subset of reals consists of the ``j`` smallest and the ``k - j`` largest
    values for some ``j`` in ``[0, k]``. Proof: ``k^2 var(S) = sum over pairs {x, y} of S of (x - y)^2``; replacing
    ``s`` in ``S`` by ``y`` changes it by ``g(y) - g(s)`` with ``g(y) = sum over t in S - {s} of (y - t)^2``, strictly
    convex for ``k >= 2``. If an optimal ``S`` held an ``s`` with excluded values ``a < s < b``, then
    ``g(s) < max(g(a), g(b))`` and a swap would increase the variance; so every included value is ``<=`` every
    excluded one or ``>=`` every excluded one, i.e. ``S`` is, as a multiset, the ``j`` smallest plus the ``k - j``
    largest values (``k = 1``: every subset has variance 0). The function scores the ``k + 1`` candidates of every
    group from per-group prefix sums (float64, values centred on the group's middle element) and takes the best.

    **Ties** (deterministic):

    - between candidates: scores within ``TIE_RTOL`` (1e-12) times ``k`` x the largest candidate sum of squares of
      the group are equal, and the smallest ``j`` (the fewest values from the low end) wins. ``k = 1`` and
      constant groups therefore keep the largest advantage;
    - between rollouts of equal advantage: the chosen ``j`` fixes how many copies of each value are kept; they are
      the copies with the lowest indices.

    Vectorised: one sort over the ``N`` rollouts, a ``[G, n_max]`` padded table of the sorted values (``G`` groups,
    ``n_max`` the largest group), cumulative sums along it, and an argmax over ``[G, k + 1]`` candidates; no Python
    loop over rollouts or groups.
    """
    return d3s_rollout_mask(advantages, group_ids, k).nonzero().flatten()


def d3s_rollout_mask(advantages: torch.Tensor, group_ids: torch.Tensor, k: int) -> torch.Tensor:
    """The boolean mask ``[N]`` of :func:`d3s_select_rollouts` (True = kept)."""
    adv, gid, k = _check(advantages, group_ids, k)
    n_rows = adv.numel()
    device = adv.device
    if n_rows == 0:
        return torch.zeros(0, dtype=torch.bool, device=device)
    x = adv.to(torch.float64)
    _, group = torch.unique(gid, return_inverse=True)  # dense group index 0 .. G-1
    # order: by group, then value, then index (two stable sorts)
    by_value = torch.sort(x, stable=True).indices
    order = by_value[torch.sort(group[by_value], stable=True).indices]
    g_sorted = group[order]
    v_sorted = x[order]
    n_groups = int(g_sorted[-1]) + 1
    size = torch.bincount(g_sorted, minlength=n_groups)  # [G]
    start = torch.cumsum(size, 0) - size  # first sorted position of every group
    pos = torch.arange(n_rows, device=device)
    rank = pos - start[g_sorted]  # position inside the group's sorted run

    # centre every group on its middle element (exact for small integers, and it keeps the sums small)
    centre = v_sorted[start + size // 2]
    c = v_sorted - centre[g_sorted]
    n_max = int(size.max())
    table = torch.zeros(n_groups, n_max + 1, dtype=torch.float64, device=device)
    table_sq = torch.zeros_like(table)
    table[g_sorted, rank + 1] = c
    table_sq[g_sorted, rank + 1] = c * c
    p1 = torch.cumsum(table, 1)  # p1[g, i] = sum of the i smallest (centred) values of group g
    p2 = torch.cumsum(table_sq, 1)

    j = torch.arange(k + 1, device=device)
    big = size > k
    n_g = torch.where(big, size, torch.full_like(size, k + 1))[:, None]  # small groups: any valid index (masked)
    hi = (n_g - k + j[None, :]).clamp(max=n_max)  # [G, k+1]: first sorted position of the k - j largest
    top1 = p1.gather(1, n_g.clamp(max=n_max)) - p1.gather(1, hi)
    top2 = p2.gather(1, n_g.clamp(max=n_max)) - p2.gather(1, hi)
    s1 = p1[:, : k + 1] if n_max >= k else torch.zeros(n_groups, k + 1, dtype=torch.float64, device=device)
    s2 = p2[:, : k + 1] if n_max >= k else torch.zeros_like(s1)
    s1 = s1 + top1
    s2 = s2 + top2
    score = k * s2 - s1 * s1  # k^2 var of candidate j
    best = score.max(1, keepdim=True).values
    tol = TIE_RTOL * k * s2.max(1, keepdim=True).values
    j_star = (score >= best - tol).to(torch.int64).argmax(1)  # the smallest j among the ties

    # selected sorted positions of candidate j*: rank < j* or rank >= n - (k - j*); then per run of equal values,
    # keep the same count, on the run's lowest indices (the run is sorted by index)
    js = j_star[g_sorted]
    ns = size[g_sorted]
    new_run = torch.ones(n_rows, dtype=torch.bool, device=device)
    new_run[1:] = (g_sorted[1:] != g_sorted[:-1]) | (v_sorted[1:] != v_sorted[:-1])
    run_id = torch.cumsum(new_run.to(torch.int64), 0) - 1
    run_start_pos = pos[new_run]  # [R]
    run_len = torch.bincount(run_id, minlength=run_start_pos.numel())
    s = rank[run_start_pos][run_id]  # run start, as a rank inside the group
    e = s + run_len[run_id]
    low = (torch.minimum(e, js) - s).clamp(min=0)
    high = (e - torch.maximum(s, ns - k + js)).clamp(min=0)
    keep_sorted = (rank - s) < (low + high)
    keep_sorted |= ns <= k  # groups of at most k rollouts keep all
    keep = torch.zeros(n_rows, dtype=torch.bool, device=device)
    keep[order] = keep_sorted
    return keep


def _check(advantages, group_ids, k):
    if not isinstance(advantages, torch.Tensor) or not advantages.is_floating_point():
        raise TypeError(f"advantages must be a floating-point tensor, got {_describe(advantages)}")
    if advantages.dim() != 1:
        raise ValueError(f"advantages must be 1-D [N] (one per rollout), got shape {tuple(advantages.shape)}")
    if not isinstance(group_ids, torch.Tensor) or group_ids.is_floating_point() or group_ids.is_complex():
        raise TypeError(f"group_ids must be an integer tensor, got {_describe(group_ids)}")
    if group_ids.dtype == torch.bool:
        group_ids = group_ids.to(torch.int64)
    if group_ids.shape != advantages.shape:
        raise ValueError(
            f"group_ids must have the shape of advantages {tuple(advantages.shape)}, got {tuple(group_ids.shape)}"
        )
    if group_ids.device != advantages.device:
        raise ValueError(
            f"advantages ({advantages.device}) and group_ids ({group_ids.device}) are on different devices"
        )
    k = C.integer("k", k, low=1)
    if advantages.numel() and not bool(torch.isfinite(advantages).all()):
        raise ValueError("advantages must be finite")
    return advantages.detach(), group_ids.detach(), k


def _describe(x) -> str:
    return f"{x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
