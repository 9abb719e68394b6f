"""Options of the vocabulary-parallel log-prob ops (``tp_group=``) on a real gloo group: a temperature per token (a
float tensor of ``targets``' shape, the same on every rank) and an fp32 lm_head (``head_dtype=torch.float32``).

Every rank holds a contiguous vocabulary shard of the same head; its outputs must equal the single-device op's on the
whole head with the same options, its dW / db the rows of its shard of the unsharded gradient, its dX the full one.
Ignored rows hold NaN hidden states and a temperature of 0 / NaN (they are never read). A bad temperature on a row
that counts raises the same ``ValueError`` on every rank (no rank is left in a collective).
"""

from __future__ import annotations

import os

import pytest
import torch

import rlvr_kernels as rk
from _gloo import run_ranks

SIZES = [23, 17]
STARTS = [0, 23]


def _problem(dtype, n=14, h=16, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = sum(SIZES)
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(v, generator=g, dtype=torch.float64)
    t = torch.randint(0, v, (n,), generator=g)
    temp = torch.rand(n, generator=g, dtype=torch.float64) * 1.5 + 0.3
    t[2] = t[7] = -100
    x[2] = float("nan")
    x[7, 0] = float("inf")
    temp[2], temp[7] = 0.0, float("nan")
    t[5], t[6] = SIZES[0], SIZES[0] - 1  # targets on both sides of the shard boundary
    ids = torch.randint(0, v, (n, k), generator=g)
    up = [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(2)]
    up.append(torch.randn(n, k, generator=g, dtype=torch.float64))
    return x.to(dtype), w.to(dtype), b.to(dtype), t, temp, ids, up


def _linear(x, w, b, t, ids, up, backend, **kw):
    x, w, b = (u.clone().requires_grad_() for u in (x, w, b))
    lp, en, ga = rk.fused_linear_logprobs(x, w, t, bias=b, gather_ids=ids, backend=backend, **kw)
    ((lp * up[0].to(lp.dtype)).sum() + (en * up[1].to(lp.dtype)).sum() + (ga * up[2].to(lp.dtype)).sum()).backward()
    return [lp.detach(), en.detach(), ga.detach(), x.grad, w.grad, b.grad]


def _logits(z, t, up, backend, **kw):
    z = z.clone().requires_grad_()
    lp, en = rk.logprobs_from_logits(z, t, backend=backend, **kw)
    ((lp * up[0].to(lp.dtype)).sum() + (en * up[1].to(lp.dtype)).sum()).backward()
    return [lp.detach(), en.detach(), z.grad]


def _err(a, b):
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _compare(rank, world, dtype, backend, per_token, head_fp32):
    import torch.distributed as dist

    if backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    x, w, b, t, temp, ids, up = _problem(dtype)
    s0, s1 = STARTS[rank], STARTS[rank] + SIZES[rank]
    kw = dict(temperature=temp.to(torch.float32 if dtype != torch.float64 else dtype) if per_token else 0.7)
    if head_fp32:
        kw["head_dtype"] = torch.float32
    full = _linear(x, w, b, t, ids, up, backend, **kw)
    sh = _linear(x, w[s0:s1], b[s0:s1], t, ids, up, backend, tp_group=dist.group.WORLD, vocab_start=s0, **kw)
    errs = {
        "logp": _err(full[0], sh[0]),
        "entropy": _err(full[1], sh[1]),
        "gathered": _err(full[2], sh[2]),
        "dx": _err(full[3], sh[3]),
        "dw": _err(full[4][s0:s1], sh[4]),
        "db": _err(full[5][s0:s1], sh[5]),
    }
    finite = all(bool(torch.isfinite(u).all()) for u in sh[3:])
    dtypes = [str(u.dtype) for u in sh[3:]]
    if not head_fp32:  # the logits form on the same problem
        z = (torch.nan_to_num(x.double()) @ w.double().T + b.double()).to(dtype)
        lkw = dict(temperature=kw["temperature"])
        fl = _logits(z, t, up, backend, **lkw)
        sl = _logits(z[:, s0:s1], t, up, backend, tp_group=dist.group.WORLD, vocab_start=s0, **lkw)
        errs.update(logits_logp=_err(fl[0], sl[0]), logits_entropy=_err(fl[1], sl[1]), dz=_err(fl[2][:, s0:s1], sl[2]))
    return errs, finite, dtypes, [sh[0].tolist(), sh[1].tolist(), sh[3].double().tolist()]


def _check(results, dtype):
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5}[dtype]
    for r, (errs, finite, dtypes, _) in enumerate(results):
        assert finite, f"rank {r}: non-finite gradients"
        assert dtypes == [str(dtype)] * 3
        for name, err in errs.items():
            scale = 1.0 if name in ("logp", "entropy", "gathered", "logits_logp", "logits_entropy") else 8.0
            if dtype == torch.bfloat16 and name in ("dx", "dw", "db", "dz"):
                scale = 2e4  # one bf16 rounding of the unsharded and of the sharded gradient
            assert err <= tol * scale, f"rank {r} {name}: error {err:.3g} > {tol * scale:.3g}"
    # every rank gets the same outputs and dX, bit for bit
    assert all(res[3] == results[0][3] for res in results)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_per_token_temperature_torch_backend(dtype):
    _check(run_ranks(_compare, 2, dtype, "torch", True, False, timeout=120), dtype)


def test_per_token_temperature_triton_under_the_interpreter():
    _check(run_ranks(_compare, 2, torch.float32, "triton", True, False, timeout=180), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("per_token", [False, True])
def test_fp32_head(backend, per_token):
    _check(run_ranks(_compare, 2, torch.bfloat16, backend, per_token, True, timeout=180), torch.bfloat16)


def _float64_oracle(rank, world):
    """A per-token temperature against float64 autograd on the full logits (independent of the package's ops)."""
    import torch.distributed as dist

    x, w, b, t, temp, ids, up = _problem(torch.float64)
    s0, s1 = STARTS[rank], STARTS[rank] + SIZES[rank]
    sh = _linear(
        x, w[s0:s1], b[s0:s1], t, ids, up, "torch", tp_group=dist.group.WORLD, vocab_start=s0, temperature=temp
    )
    keep = t != -100
    xd = torch.where(keep[:, None], x, 0.0).requires_grad_()
    wd, bd = w.clone().requires_grad_(), b.clone().requires_grad_()
    logp_all = ((xd @ wd.T + bd) / torch.where(keep, temp, 1.0)[:, None]).log_softmax(-1)
    k = keep.double()
    lp = logp_all.gather(1, t.clamp_min(0)[:, None])[:, 0] * k
    en = -(logp_all.exp() * logp_all).sum(-1) * k
    ga = logp_all.gather(1, ids) * k[:, None]
    ((lp * up[0]).sum() + (en * up[1]).sum() + (ga * up[2]).sum()).backward()
    want = [lp, en, ga, xd.grad, wd.grad[s0:s1], bd.grad[s0:s1]]
    return max(_err(g, wv) for g, wv in zip(sh, want))


def test_per_token_temperature_float64_oracle():
    assert max(run_ranks(_float64_oracle, 2, timeout=120)) < 1e-11


def _bad_temperature(rank, world, value, form):
    import torch.distributed as dist

    x, w, b, t, temp, ids, up = _problem(torch.float32)
    temp = temp.float()
    temp[4] = value
    s0, s1 = STARTS[rank], STARTS[rank] + SIZES[rank]
    try:
        if form == "linear":
            rk.fused_linear_logprobs(x, w[s0:s1], t, temperature=temp, tp_group=dist.group.WORLD, vocab_start=s0)
        else:
            z = torch.randn(t.shape[0], SIZES[rank])
            rk.logprobs_from_logits(z, t, temperature=temp, tp_group=dist.group.WORLD, vocab_start=s0)
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("form", ["linear", "logits"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_raises_on_every_rank(value, form):
    msgs = run_ranks(_bad_temperature, 2, value, form, timeout=60)
    assert all("temperature must be > 0" in m and "row 4" in m for m in msgs), msgs
