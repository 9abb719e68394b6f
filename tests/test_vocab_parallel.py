"""Vocabulary-parallel log-probs (``tp_group=``): every rank of a real gloo group against the single-process op.

Each rank holds a contiguous vocabulary shard of the same lm_head (Megatron's layout); its outputs must equal the
unsharded op's on the whole head (float64 on the torch backend: to 1e-12; fp32 / bf16 and the Triton row kernels
under the interpreter: to fp32 rounding), its dW / db the unsharded gradient's rows of its shard, its dX the full
gradient (or, with ``grad_hidden="partial"``, a part that sums to it over the ranks). Bad layouts, ids past the last
shard and non-finite rows raise the same ``ValueError`` on every rank (no rank is left in a collective).
"""

from __future__ import annotations

import os

import pytest
import torch

import rlvr_kernels as rk
from _gloo import run_ranks

ATOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5}


def _starts(sizes):
    return [sum(sizes[:r]) for r in range(len(sizes))]


def _problem(sizes, dtype, n=14, h=16, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = sum(sizes)
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(v, generator=g, dtype=torch.float64)
    t = torch.randint(0, v, (n,), generator=g)
    t[2] = t[7] = -100  # ignored rows: their hidden states hold NaN / inf, as attention kernels leave them
    x[2] = float("nan")
    x[7, 0] = float("inf")
    t[5] = sizes[0]  # a target on the first column of the second shard, one on the last column of the first
    t[6] = sizes[0] - 1
    ids = torch.randint(0, v, (n, k), generator=g)
    up = [torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)]
    up.append(torch.randn(n, k, generator=g, dtype=torch.float64))
    return x.to(dtype), w.to(dtype), b.to(dtype), t, ids, up


def _linear(x, w, b, t, ids, up, backend, **tp):
    x, w, b = (u.clone().requires_grad_() for u in (x, w, b))
    lp, en, ga = rk.fused_linear_logprobs(x, w, t, bias=b, temperature=0.7, gather_ids=ids, backend=backend, **tp)
    ((lp * up[0].to(lp.dtype)).sum() + (en * up[1].to(lp.dtype)).sum() + (ga * up[2].to(lp.dtype)).sum()).backward()
    return [lp.detach(), en.detach(), ga.detach(), x.grad, w.grad, b.grad]


def _logits(z, t, up, backend, **tp):
    z = z.clone().requires_grad_()
    lp, en = rk.logprobs_from_logits(z, t, temperature=0.7, backend=backend, **tp)
    ((lp * up[0].to(lp.dtype)).sum() + (en * up[1].to(lp.dtype)).sum()).backward()
    return [lp.detach(), en.detach(), z.grad]


def _max_err(a, b):
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _compare_ops(rank, world, sizes, dtype, backend):
    """Per case: the largest error of each output and gradient against the unsharded op, on this rank."""
    import torch.distributed as dist

    if backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    x, w, b, t, ids, up = _problem(sizes, dtype)
    s0 = _starts(sizes)[rank]
    s1 = s0 + sizes[rank]
    full = _linear(x, w, b, t, ids, up, backend)
    out = {}
    for mode in ("full", "partial"):
        sh = _linear(x, w[s0:s1], b[s0:s1], t, ids, up, backend, tp_group=dist.group.WORLD, vocab_start=s0,
                     grad_hidden=mode)  # fmt: skip
        dx = sh[3].double().clone()
        if mode == "partial":
            dist.all_reduce(dx)  # the framework's own reduction
        out[mode] = {
            "logp": _max_err(full[0], sh[0]),
            "entropy": _max_err(full[1], sh[1]),
            "gathered": _max_err(full[2], sh[2]),
            "dx": _max_err(full[3], dx),
            "dw": _max_err(full[4][s0:s1], sh[4]),
            "db": _max_err(full[5][s0:s1], sh[5]),
            "finite": bool(torch.isfinite(sh[3]).all() and torch.isfinite(sh[4]).all()),
        }
    # the logits form on the same problem: fp32 logits (bf16 / fp64 as the inputs), this rank's columns
    z = (torch.nan_to_num(x.double()) @ w.double().T + b.double()).to(dtype)
    fl = _logits(z, t, up, backend)
    sl = _logits(z[:, s0:s1], t, up, backend, tp_group=dist.group.WORLD, vocab_start=s0)
    out["logits"] = {
        "logp": _max_err(fl[0], sl[0]),
        "entropy": _max_err(fl[1], sl[1]),
        "dz": _max_err(fl[2][:, s0:s1], sl[2]),
    }
    return out


def _check(results, dtype):
    tol = ATOL[dtype]
    for r, res in enumerate(results):
        for case, errs in res.items():
            for name, err in errs.items():
                if name == "finite":
                    assert err, f"rank {r} {case}: non-finite gradients"
                    continue
                # dX / dW sum H or N terms of O(1): a few ulps more
                scale = 1.0 if name in ("logp", "entropy", "gathered") else 8.0
                if dtype == torch.bfloat16 and name in ("dx", "dw", "db", "dz"):
                    scale = 2e4  # gradients in bf16: one bf16 rounding of the unsharded and of the sharded value
                assert err <= tol * scale, f"rank {r} {case} {name}: error {err:.3g} > {tol * scale:.3g}"


@pytest.mark.parametrize("sizes", [[20, 20], [23, 17], [10, 11, 9, 7]], ids=["even2", "uneven2", "uneven4"])
def test_linear_and_logits_float64_match_the_unsharded_op(sizes):
    _check(run_ranks(_compare_ops, len(sizes), sizes, torch.float64, "torch"), torch.float64)


def test_float32_and_bfloat16_torch_backend():
    sizes = [23, 17]
    _check(run_ranks(_compare_ops, 2, sizes, torch.float32, "torch"), torch.float32)
    _check(run_ranks(_compare_ops, 2, sizes, torch.bfloat16, "torch"), torch.bfloat16)


def test_triton_row_kernels_under_the_interpreter():
    _check(run_ranks(_compare_ops, 2, [23, 17], torch.float32, "triton"), torch.float32)


def _identical_on_every_rank(rank, world):
    import torch.distributed as dist

    x, w, b, t, ids, up = _problem([20, 20], torch.float32)
    sh = _linear(x, w[rank * 20 : (rank + 1) * 20], b[rank * 20 : (rank + 1) * 20], t, ids, up, "torch",
                 tp_group=dist.group.WORLD)  # fmt: skip
    return [u.tolist() for u in sh[:4]]


def test_outputs_and_dx_are_bit_identical_across_ranks():
    a, b = run_ranks(_identical_on_every_rank, 2)
    assert a == b


def _errors(rank, world, case):
    import torch.distributed as dist

    x, w, b, t, ids, up = _problem([20, 20], torch.float32)
    start = rank * 20
    kw = dict(tp_group=dist.group.WORLD)
    if case == "layout":
        kw["vocab_start"] = 0  # both ranks claim the first rows
    elif case == "target":
        t = t.clone()
        t[0] = 40  # past the last shard (each shard alone would not know)
    elif case == "nan":
        w = w.clone()
        w[rank * 20 + 3, 0] = float("nan") if rank == 1 else w[3, 0]  # NaN on rank 1's shard only
    elif case == "logits_target":
        z = torch.randn(4, 20)
        try:
            rk.logprobs_from_logits(z, torch.tensor([0, 1, 45, 2]), tp_group=dist.group.WORLD)
        except ValueError as e:
            return str(e)
        return "no error"
    try:
        _linear(x, w[start : start + 20], b[start : start + 20], t, ids, up, "torch", **kw)
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize(
    "case, words",
    [
        ("layout", "contiguous in rank order"),
        ("target", "targets must lie in [0, 40)"),
        ("nan", "not finite"),
        ("logits_target", "targets must lie in [0, 40)"),
    ],
)
def test_errors_are_raised_on_every_rank(case, words):
    msgs = run_ranks(_errors, 2, case, timeout=60)
    assert all(words in m for m in msgs), msgs


def _bad_arguments(rank, world):
    import torch.distributed as dist

    x, w, b, t, ids, up = _problem([20, 20], torch.float32)
    msgs = []
    for kw in (dict(tp_group="world"), dict(tp_group=dist.group.WORLD, grad_hidden="some"),
               dict(tp_group=dist.group.WORLD, vocab_start=-1)):  # fmt: skip
        try:
            rk.fused_linear_logprobs(x, w[:20], t, **kw)
            msgs.append("no error")
        except (TypeError, ValueError) as e:
            msgs.append(f"{type(e).__name__}: {e}")
    return msgs


def test_bad_tp_arguments_raise_before_any_collective():
    for msgs in run_ranks(_bad_arguments, 2, timeout=60):
        assert msgs[0].startswith("TypeError") and "ProcessGroup" in msgs[0]
        assert msgs[1].startswith("ValueError") and "grad_hidden" in msgs[1]
        assert msgs[2].startswith("ValueError") and "vocab_start" in msgs[2]


def test_tp_group_that_is_no_process_group_is_a_clear_error():
    x, w, b, t, ids, up = _problem([20, 20], torch.float32)
    with pytest.raises(TypeError, match="tp_group must be a torch.distributed ProcessGroup"):
        rk.fused_linear_logprobs(x, w, t, tp_group=object())


def _compiled(rank, world):
    import torch._dynamo.testing
    import torch.distributed as dist

    x, w, b, t, ids, up = _problem([20, 20], torch.float32)
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0)
    g = dist.group.WORLD

    def fn(x, w):
        lp, en = rk.fused_linear_logprobs(x, w, t, tp_group=g, temperature=0.7)
        return (lp * up[0].float()).sum() + (en * up[1].float()).sum()

    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    grads = []
    for f in (compiled, fn):
        xx = x.clone().requires_grad_()
        ww = w[rank * 20 : (rank + 1) * 20].clone().requires_grad_()
        loss = f(xx, ww)
        loss.backward()
        grads.append((float(loss), xx.grad, ww.grad))
    (lc, xc, wc), (le, xe, we) = grads
    return abs(lc - le), _max_err(xc, xe), _max_err(wc, we), counter.frame_count


def test_compiles_fullgraph_with_a_tp_group():
    for dl, dx, dw, frames in run_ranks(_compiled, 2, timeout=120):
        assert frames == 1
        assert dl == 0.0 and dx == 0.0 and dw == 0.0


# ---------------------------------------------------------------------------------------------------------------
# the loss: both paths, every rank against the single-process loss on the whole head


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(1.0, abs(a))


def _loss_case(rank, world, sizes, dtype, configs):
    import torch.distributed as dist

    g = torch.Generator().manual_seed(1)
    B, T, H = 3, 7, 8
    V = sum(sizes)
    x = torch.randn(B, T, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    am = torch.ones(B, T)
    am[1, 4:] = 0
    x[1, 5] = float("nan")  # padding
    adv = torch.randn(B, generator=g)
    old = -torch.rand(B, T, generator=g) * 2
    ref = -torch.rand(B, T, generator=g) * 2
    s0 = _starts(sizes)[rank]
    s1 = s0 + sizes[rank]
    out = []
    for kw in configs:

        def run(ww, **tp):
            xx = x.clone().requires_grad_()
            ww = ww.clone().requires_grad_()
            loss, m = rk.RLVRLoss(**kw)(xx, ww, ids, am, adv, ref_per_token_logps=ref, old_per_token_logps=old,
                                        step=3, **tp)  # fmt: skip
            loss.backward()
            return loss.detach(), xx.grad, ww.grad, m.named

        a = run(w)
        c = run(w[s0:s1], tp_group=dist.group.WORLD, vocab_start=s0)
        # relative errors (the metrics reach O(100): a KL of random heads)
        metrics = max((_rel(float(a[3][k]), float(c[3][k])) for k in a[3]), default=0.0)
        out.append((kw, _rel(float(a[0]), float(c[0])), _max_err(a[1], c[1]) / max(1.0, float(a[1].abs().max())),
                    _max_err(a[2][s0:s1], c[2]) / max(1.0, float(a[2].abs().max())), metrics))  # fmt: skip
    return out


_LOSS_CONFIGS = [
    dict(loss_type=lt, fused=fused, beta=beta, temperature=0.9, **extra)
    for fused in (True, False)
    for lt, beta, extra in [
        ("grpo", 0.04, {}),
        ("dapo", 0.0, dict(credit="forking", credit_rho=0.5)),
        ("cppo", 0.0, {}),
        ("dr_grpo", 0.0, dict(entropy_coef=0.01, max_completion_length=7)),
        ("bnpo", 0.0, dict(credit="tp_schedule", schedule=rk.TemporalSchedule(total_steps=10))),
    ]
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_matches_the_unsharded_loss_on_both_paths(dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for r, res in enumerate(run_ranks(_loss_case, 2, [23, 17], dtype, _LOSS_CONFIGS)):
        for kw, dl, dx, dw, dm in res:
            assert dl <= tol and dm <= tol and dx <= tol and dw <= tol, (r, kw, dl, dx, dw, dm)


def test_loss_four_ranks_float32():
    configs = [c for c in _LOSS_CONFIGS if c["loss_type"] in ("grpo", "dapo")]
    for r, res in enumerate(run_ranks(_loss_case, 4, [10, 10, 10, 7], torch.float32, configs)):
        for kw, dl, dx, dw, dm in res:
            assert max(dl, dx, dw, dm) <= 1e-5, (r, kw, dl, dx, dw, dm)


# ---------------------------------------------------------------------------------------------------------------
# NCCL on GPUs (the gpu marker; never in CI)


def _nccl_case(rank, world):
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    x, w, b, t, ids, up = _problem([64, 64], torch.bfloat16, n=256, h=64)
    x, w, b, t, ids = (u.cuda() for u in (x, w, b, t, ids))
    up = [u.cuda() for u in up]
    full = _linear(x, w, b, t, ids, up, "triton")
    sh = _linear(x, w[rank * 64 : (rank + 1) * 64], b[rank * 64 : (rank + 1) * 64], t, ids, up, "triton",
                 tp_group=dist.group.WORLD)  # fmt: skip
    return [_max_err(full[i], sh[i]) for i in range(4)]


@pytest.mark.gpu
def test_nccl_two_gpus():
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    from _gloo import run_ranks_nccl

    for errs in run_ranks_nccl(_nccl_case, 2):
        assert max(errs[:3]) <= 2e-5 and errs[3] <= 5e-2
