"""The token normalisers across data-parallel ranks, on a real gloo group.

Each rank holds its own rows of one global batch. DDP / FSDP average the ranks' gradients, so every normaliser is
defined such that the average over the ranks of each rank's loss gradient equals the single-process gradient of the
same loss over the union of the rows (README "Scale-out", docs/methods/objectives.md):

- TRL's ``num_items_in_batch`` (dapo, cispo, dppo, cppo): the global count of loss tokens, divided by the world size;
  without it, the loss tokens are counted and all-reduced over the default group (the same number);
- verl's ``global_batch_info``: ``batch_num_tokens`` (token-mean) / ``global_batch_size`` (seq-mean-*) are global
  counts and ``dp_size`` the number of ranks.
"""

from __future__ import annotations

import torch

import rlvr_kernels as rk
from _gloo import run_ranks

B, T, H, V = 4, 6, 8, 32


def _batch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2 * B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.5
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    am = (torch.rand(2 * B, T, generator=g) > 0.3).float()
    am[:, 0] = 1
    adv = torch.randn(2 * B, generator=g)
    old = -torch.rand(2 * B, T, generator=g) * 2
    return x, w, ids, am, adv, old


def _grad(x, w, ids, am, adv, old, cfg, **kw):
    w = w.clone().requires_grad_()
    loss, _ = rk.RLVRLoss(**cfg)(x, w, ids, am, adv, old_per_token_logps=old, **kw)
    loss.backward()
    return w.grad


CASES = [
    ("dapo, num_items_in_batch", dict(loss_type="dapo", beta=0.0), "num_items"),
    ("dapo, counted over ranks", dict(loss_type="dapo", beta=0.0), None),
    ("cispo, num_items_in_batch", dict(loss_type="cispo", beta=0.0), "num_items"),
    ("verl token-mean", dict(loss_type="grpo", beta=0.0, aggregation="token-mean"), "verl"),
    ("verl seq-mean-token-mean", dict(loss_type="grpo", beta=0.0, aggregation="seq-mean-token-mean"), "verl"),
]


def _rank(rank, world):
    import torch.distributed as dist

    x, w, ids, am, adv, old = _batch()
    rows = slice(rank * B, (rank + 1) * B)
    out = []
    for name, cfg, how in CASES:
        kw = {}
        if how == "num_items":
            kw["num_items_in_batch"] = am.sum()  # TRL: the loss tokens of every process
        elif how == "verl":
            kw = dict(batch_num_tokens=int(am.sum()), global_batch_size=2 * B, dp_size=world)
        g = _grad(x[rows], w, ids[rows], am[rows], adv[rows], old[rows], cfg, **kw)
        dist.all_reduce(g)
        out.append((name, g / world))  # what DDP / FSDP apply
    return out


def test_rank_average_equals_the_union_batch():
    ranks = run_ranks(_rank, 2)
    x, w, ids, am, adv, old = _batch()
    for i, (name, cfg, how) in enumerate(CASES):
        kw = {}
        if how == "num_items":
            kw["num_items_in_batch"] = am.sum()
        elif how == "verl":
            kw = dict(batch_num_tokens=int(am.sum()), global_batch_size=2 * B, dp_size=1)
        union = _grad(x, w, ids, am, adv, old, cfg, **kw)
        for r, res in enumerate(ranks):
            assert res[i][0] == name
            torch.testing.assert_close(res[i][1], union, rtol=1e-5, atol=1e-7, msg=f"rank {r}: {name}")
