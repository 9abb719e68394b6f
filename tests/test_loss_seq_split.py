"""``RLVRLoss(..., seq_group=g)`` on sequence-split rows (Ulysses / context parallelism), on real gloo groups.

Rank ``r`` holds the columns ``[c_r, c_r + T_r)`` of every row. Every rank's loss and metrics must equal the
single-process loss on the whole rows, its d hidden the whole gradient's columns of its tokens, and the ranks' dW
summed over the group the whole dW: for every objective and credit rule, whole-row rules included (GSPO's sequence
ratio, CPPO's prefix budget, TP-Schedule's percentiles, forking and D^3S selections), with padding holding NaN, uneven
column blocks (one rank's block is all padding on some rows) and bf16; and on a 2 x 2 grid of sequence- and
vocabulary-parallel groups.
"""

from __future__ import annotations

import pytest
import torch

import rlvr_kernels as rk
from _gloo import run_ranks

CONFIGS = [
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="bnpo", beta=0.0, entropy_coef=0.01),
    dict(loss_type="dr_grpo", beta=0.0, max_completion_length=9),
    dict(loss_type="dapo", beta=0.0, credit="forking", credit_rho=0.5),
    dict(loss_type="dapo", beta=0.0, credit="d3s", credit_rho=0.5),
    dict(loss_type="dapo", beta=0.0, credit="tp_schedule", schedule=rk.TemporalSchedule(total_steps=10)),
    dict(loss_type="dapo", beta=0.0, credit="entropy_adv"),
    dict(loss_type="dapo", beta=0.0, credit="delta"),
    dict(loss_type="grpo", beta=0.0, importance_sampling_level="sequence"),
    dict(loss_type="cispo", beta=0.0),
    dict(loss_type="dppo", beta=0.0),
    dict(loss_type="cppo", beta=0.0),
    dict(loss_type="grpo", beta=0.0, aggregation="seq-mean-token-mean"),
]


def _batch(T, dtype, B=3, H=8, V=40):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.5
    ids = torch.randint(0, V, (B, T), generator=g)
    am = torch.ones(B, T)
    am[1, 5:] = 0  # row 1 ends inside the second block, row 2 inside the first: a block of padding only
    am[2, 2:] = 0
    x[1, 6] = float("nan")  # padding holds NaN
    x[2, T - 1] = float("inf")
    adv = torch.randn(B, T, generator=g)  # per-token advantages (entropy-shaped ones read them per token)
    old = -torch.rand(B, T, generator=g) * 2
    ref = -torch.rand(B, T, generator=g) * 2
    coef = 0.8 + 0.4 * torch.rand(B, T, generator=g)
    return x.to(dtype), w.to(dtype), ids, am, adv, old, ref, coef


def _run(cfg, x, w, ids, am, adv, old, ref, coef, cols, vocab=slice(None), **groups):
    xx = x[:, cols].clone().requires_grad_()
    ww = w[vocab].clone().requires_grad_()
    kw = dict(delta_coefficients=coef[:, cols]) if cfg.get("credit") == "delta" else {}
    loss, m = rk.RLVRLoss(**cfg)(
        xx, ww, ids[:, cols], am[:, cols], adv[:, cols], ref_per_token_logps=ref[:, cols],
        old_per_token_logps=old[:, cols], step=4, **kw, **groups,
    )  # fmt: skip
    loss.backward()
    return float(loss), xx.grad, ww.grad, {k: float(v) for k, v in m.named.items()}


def _rel(a, b):
    return abs(a - b) / max(1.0, abs(a))


def _split_case(rank, world, widths, dtype, configs):
    import torch.distributed as dist

    data = _batch(sum(widths), dtype)
    c0 = sum(widths[:rank])
    out = []
    for cfg in configs:
        whole = _run(cfg, *data, slice(None))
        part = _run(cfg, *data, slice(c0, c0 + widths[rank]), seq_group=dist.group.WORLD)
        dw = part[2].double()
        dist.all_reduce(dw)
        out.append(
            (
                cfg,
                _rel(whole[0], part[0]),
                float((whole[1][:, c0 : c0 + widths[rank]].double() - part[1].double()).abs().max()),
                # relative to the largest entry: in bf16 the whole dW and each rank's share are rounded apart
                float((whole[2].double() - dw).abs().max()) / max(1.0, float(whole[2].abs().max())),
                max(_rel(whole[3][k], part[3][k]) for k in whole[3]),
                bool(torch.isfinite(part[1]).all()),
            )
        )
    return out


def _check(results, tol):
    for r, res in enumerate(results):
        for cfg, dl, dx, dw, dm, finite in res:
            assert finite, (r, cfg)
            assert max(dl, dx, dw, dm) <= tol, (r, cfg, dl, dx, dw, dm)


@pytest.mark.parametrize("widths", [[5, 4], [3, 2, 2, 2]], ids=["2ranks", "4ranks"])
def test_every_objective_and_credit_rule_equals_the_whole_rows(widths):
    _check(run_ranks(_split_case, len(widths), widths, torch.float32, CONFIGS), 1e-6)


def test_bfloat16():
    configs = [c for c in CONFIGS if c.get("credit") in ("forking", "tp_schedule") or c["loss_type"] == "cppo"]
    _check(run_ranks(_split_case, 2, [5, 4], torch.bfloat16, configs), 4e-3)  # a bf16 ulp at 1: 7.8e-3


def _grid_case(rank, world):
    """4 ranks: sequence groups {0, 1} and {2, 3}, vocabulary groups {0, 2} and {1, 3} (a 2 x 2 grid)."""
    import torch.distributed as dist

    seq_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    tp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    s, t = rank % 2, rank // 2  # sequence rank (which columns), vocabulary rank (which rows of the head)
    widths, v_sizes = [5, 4], [23, 17]
    data = _batch(sum(widths), torch.float32)
    c0 = sum(widths[:s])
    v0 = sum(v_sizes[:t])
    out = []
    for cfg in (CONFIGS[0], CONFIGS[3], CONFIGS[11]):
        whole = _run(cfg, *data, slice(None))
        part = _run(cfg, *data, slice(c0, c0 + widths[s]), vocab=slice(v0, v0 + v_sizes[t]),
                    seq_group=seq_groups[t], tp_group=tp_groups[s], vocab_start=v0)  # fmt: skip
        dw = part[2].double()
        dist.all_reduce(dw, group=seq_groups[t])
        out.append(
            (
                cfg,
                _rel(whole[0], part[0]),
                float((whole[1][:, c0 : c0 + widths[s]].double() - part[1].double()).abs().max()),
                float((whole[2][v0 : v0 + v_sizes[t]].double() - dw).abs().max()),
                max(_rel(whole[3][k], part[3][k]) for k in whole[3]),
                bool(torch.isfinite(part[1]).all()),
            )
        )
    return out


def test_sequence_and_vocabulary_parallel_together():
    _check(run_ranks(_grid_case, 4), 1e-5)


def _bad(rank, world):
    import torch.distributed as dist

    x, w, ids, am, adv, old, ref, coef = _batch(9, torch.float32)
    msgs = []
    for kw in (dict(seq_group="world"), dict(seq_group=dist.group.WORLD, attention_mask=am[0])):
        mask = kw.pop("attention_mask", am[:, :4])
        try:
            rk.RLVRLoss(beta=0.0)(x[:, :4], w, ids[:, :4], mask, adv[:, :4], old_per_token_logps=old[:, :4], **kw)
            msgs.append("no error")
        except (TypeError, ValueError) as e:
            msgs.append(f"{type(e).__name__}: {e}")
    return msgs


def test_bad_seq_group_arguments_raise_before_any_collective():
    for msgs in run_ranks(_bad, 2, timeout=60):
        assert msgs[0].startswith("TypeError") and "seq_group" in msgs[0]
        assert msgs[1].startswith("ValueError") and "attention_mask" in msgs[1]
