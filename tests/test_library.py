"""The log-prob ops as PyTorch custom ops (torch.library, namespace ``rlvr_kernels``): opcheck, and
``torch.compile(fullgraph=True)`` with the eager numbers, forward and backward, on both backends."""

from __future__ import annotations

import pytest
import torch

import rlvr_kernels  # noqa: F401  (registers the ops)
from rlvr_kernels import fused_linear_logprobs, logprobs_from_logits

BACKENDS = ["torch", "triton"]


def _linear_inputs(seed=0, n=12, h=16, v=50, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(dtype)
    w = torch.randn(v, h, generator=g).to(dtype)
    b = torch.randn(v, generator=g).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    t[3] = -100
    ids = torch.randint(0, v, (n, 2), generator=g)
    return x, w, b, t, ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_extras", [True, False])
def test_opcheck_linear_logprobs(backend, with_extras):
    x, w, b, t, ids = _linear_inputs()
    x, w, b = (u.requires_grad_() for u in (x, w, b))
    args = (x, w, b if with_extras else None, t, ids if with_extras else None, 1.0 / 0.7, -100, backend)
    torch.library.opcheck(torch.ops.rlvr_kernels.linear_logprobs.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_logprobs_from_logits(backend):
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(9, 70, generator=g) * 3).requires_grad_()
    t = torch.randint(0, 70, (9,), generator=g)
    t[2] = -100
    torch.library.opcheck(torch.ops.rlvr_kernels.logprobs_from_logits.default, (z, t, 0.8, -100, True, backend))


def test_opcheck_backward_ops():
    x, w, b, t, ids = _linear_inputs(2)
    lp, ent, gath, lse = torch.ops.rlvr_kernels.linear_logprobs(x, w, b, t, ids, 1.0, -100, "torch")
    g = torch.ones_like(lp)
    args = (x, w, b, t, ids, lse, ent, g, g, torch.ones_like(gath), 1.0, -100, "torch", [True, True, True])
    torch.library.opcheck(
        torch.ops.rlvr_kernels.linear_logprobs_backward.default, args, test_utils=("test_schema", "test_faketensor")
    )
    z = torch.randn(5, 30)
    tt = torch.randint(0, 30, (5,))
    lp, ent, lse = torch.ops.rlvr_kernels.logprobs_from_logits(z, tt, 1.0, -100, True, "torch")
    torch.library.opcheck(
        torch.ops.rlvr_kernels.logprobs_from_logits_backward.default,
        (z, tt, lse, ent, torch.ones_like(lp), None, 1.0, -100, "torch"),
        test_utils=("test_schema", "test_faketensor"),
    )


def _no_graph_breaks(fn, *args):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_logprobs_compiles_fullgraph(backend):
    x, w, b, t, ids = _linear_inputs(3)

    def f(x, w, b):
        lp, ent, gath = fused_linear_logprobs(x, w, t, bias=b, temperature=0.9, gather_ids=ids, backend=backend)
        return (lp * 2.0).sum() + (ent * 0.5).sum() + gath.sum()

    _no_graph_breaks(f, x, w, b)
    leaves_c = [u.clone().requires_grad_() for u in (x, w, b)]
    leaves_e = [u.clone().requires_grad_() for u in (x, w, b)]
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(*leaves_c)
    got.backward()
    want = f(*leaves_e)
    want.backward()
    torch.testing.assert_close(got, want)
    for a, e in zip(leaves_c, leaves_e):
        torch.testing.assert_close(a.grad, e.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_from_logits_compiles_fullgraph(backend):
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 6, 40, generator=g) * 3
    t = torch.randint(0, 40, (2, 6), generator=g)
    t[1, 4:] = -100

    def f(z):
        lp, ent = logprobs_from_logits(z, t, temperature=0.7, backend=backend)
        return lp.sum() - 0.1 * ent.sum()

    _no_graph_breaks(f, z)
    zc, ze = z.clone().requires_grad_(), z.clone().requires_grad_()
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(zc)
    got.backward()
    want = f(ze)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(zc.grad, ze.grad)


def test_compiled_op_still_checks_values():
    """Value checks run inside the op, so a compiled caller gets the same clear error as an eager one."""
    x, w, _, t, _ = _linear_inputs(5)
    t[0] = 10_000

    def f(x):
        return fused_linear_logprobs(x, w, t, backend="torch")[0].sum()

    torch._dynamo.reset()
    with pytest.raises(ValueError, match="targets must lie in"):
        torch.compile(f, fullgraph=True)(x)


def _token_inputs(seed=6, B=3, T=9):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None] < torch.tensor([9, 5, 0])[:, None]
    ent = torch.rand(B, T, generator=g) * 3
    adv = torch.randn(B, generator=g)
    vals = torch.randn(B, T, generator=g)
    return mask, ent, adv, vals


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_token_selection_ops(backend):
    mask, ent, adv, vals = _token_inputs()
    ops = torch.ops.rlvr_kernels
    cases = [
        (ops.trajectory_percentile.default, (mask, None, None, backend, None)),
        (ops.trajectory_percentile.default, (mask, vals, None, backend, None)),
        (ops.tp_schedule_mask.default, (mask, 0.55, None, False, backend, None)),
        (ops.forking_token_mask.default, (ent, mask, 0.3, None, backend, None)),
        (ops.d3s_token_mask.default, (adv, ent, mask, 0.4, "batch", None, backend, None)),
        (ops.d3s_token_mask.default, (adv, ent, mask, 0.4, "sequence", None, backend, None)),
    ]
    packed = mask.reshape(-1)[mask.reshape(-1)]  # the packed layout: cu_seqlens over the valid tokens
    cu = torch.tensor([0, 9, 14, 14], dtype=torch.int32)
    cases.append((ops.tp_schedule_mask.default, (torch.ones_like(packed), 0.3, cu, True, backend, None)))
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_selection_ops_compile_fullgraph(backend):
    """The credit masks a loss applies, composed in one compiled function: one graph, the eager result."""
    from rlvr_kernels import d3s_token_mask, forking_token_mask, tp_schedule_mask, trajectory_percentile

    mask, ent, adv, _ = _token_inputs(7)

    def f(ent, adv):
        keep = tp_schedule_mask(mask, 0.4, backend=backend)
        keep = keep & forking_token_mask(ent, mask, 0.5, backend=backend)
        keep = keep | d3s_token_mask(adv, ent, mask, 0.3, backend=backend)
        return keep.float() * (1.0 + trajectory_percentile(mask, backend=backend))

    _no_graph_breaks(f, ent, adv)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(ent, adv)
    torch.testing.assert_close(got, f(ent, adv))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cppo_mask_op(backend):
    """cppo_mask as a custom op: opcheck (padded and packed), and a compiled caller gets the eager record."""
    from rlvr_kernels import cppo_mask

    mask, _, adv, _ = _token_inputs(8)
    g = torch.Generator().manual_seed(8)
    lp = -torch.rand(mask.shape, generator=g) * 3
    mu = lp + 0.4 * torch.randn(mask.shape, generator=g)
    op = torch.ops.rlvr_kernels.cppo_mask.default
    torch.library.opcheck(
        op,
        (
            lp,
            mu,
            adv,
            mask,
            0.15,
            0.8,
            0.02,
            "dynamic",
            0.9,
            2.0,
            1.0,
            None,
            "binary_tv",
            None,
            None,
            None,
            backend,
            None,
        ),
    )
    flat = mask.reshape(-1)
    cu = torch.tensor([0, 9, 14, 14], dtype=torch.int32)
    packed = [t.reshape(-1)[flat] for t in (lp, mu)]
    torch.library.opcheck(
        op,
        (
            packed[0],
            packed[1],
            adv,
            torch.ones(14, dtype=torch.bool),
            0.15,
            0.8,
            0.02,
            "fixed",
            0.9,
            2.0,
            1.0,
            8,
            "binary_kl",
            None,
            None,
            cu,
            backend,
            None,
        ),
    )

    def f(lp):
        r = cppo_mask(lp, mu, adv, mask, backend=backend)
        return r.mask.float() * r.divergence + r.weight + r.delta_b.sum() + r.masked_fraction

    _no_graph_breaks(f, lp)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(lp), f(lp))


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_shaped_advantages_op(backend):
    from rlvr_kernels import entropy_shaped_advantages

    mask, ent, adv, _ = _token_inputs(9)
    torch.library.opcheck(
        torch.ops.rlvr_kernels.entropy_shaped_advantages.default,
        (adv, ent, mask, 0.7, 0.4, 2.0, None, backend, None),
    )
    a = adv.clone().requires_grad_()
    out = entropy_shaped_advantages(a, ent, mask, 0.7, backend=backend)
    assert not out.requires_grad  # documented: the shaped advantages are a detached input of the objective

    def f(ent):
        return entropy_shaped_advantages(adv, ent, mask, 0.5, backend=backend).sum(-1)

    _no_graph_breaks(f, ent)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(ent), f(ent))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_under_bf16_autocast_with_nan_padding(backend):
    """Users' conditions for the compiled op: bf16 autocast (TRL's default) and NaN left in padded rows by the
    attention kernel: one graph, the eager values and gradients, finite everywhere, zero gradient on padding."""
    x, w, _, t, _ = _linear_inputs(11)
    t[::4] = -100
    x[::4] = float("nan")

    def f(x, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp, ent = fused_linear_logprobs(x, w, t, backend=backend)
        return lp.sum() + 0.1 * ent.sum()

    _no_graph_breaks(f, x, w)
    xc, wc = x.clone().requires_grad_(), w.clone().requires_grad_()
    xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(xc, wc)
    got.backward()
    want = f(xe, we)
    want.backward()
    assert torch.isfinite(got) and torch.isfinite(wc.grad).all() and (xc.grad[::4] == 0).all()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(wc.grad, we.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_logprob_ops_compile_fullgraph_on_cuda(dtype):
    """The compiled Triton kernels under torch.compile(fullgraph=True): one graph, the eager numbers and gradients,
    with NaN hidden states in ignored rows (attention kernels leave them in padding)."""
    dev = torch.device("cuda")
    x, w, b, t, ids = (u.to(dev) for u in _linear_inputs(9, n=64, h=128, v=1000, dtype=dtype))
    x[3] = float("nan")  # t[3] is ignore_index

    z = torch.randn(64, 1000, device=dev, dtype=dtype) * 3
    z[3] = float("nan")

    def f(x, w, b, z):
        lp, ent, gath = fused_linear_logprobs(x, w, t, bias=b, temperature=0.9, gather_ids=ids)
        lp2, ent2 = logprobs_from_logits(z, t, temperature=0.9)
        return (lp * 2.0).sum() + ent.sum() + gath.sum() + lp2.sum() - 0.5 * ent2.sum()

    _no_graph_breaks(f, x, w, b, z)
    leaves_c = [u.clone().requires_grad_() for u in (x, w, b, z)]
    leaves_e = [u.clone().requires_grad_() for u in (x, w, b, z)]
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(*leaves_c)
    got.backward()
    want = f(*leaves_e)
    want.backward()
    torch.testing.assert_close(got, want)
    for a, e in zip(leaves_c, leaves_e):
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad, e.grad)
