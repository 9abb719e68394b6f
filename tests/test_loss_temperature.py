"""``RLVRLoss(...)(..., temperature=t)``: this call's sampling temperature, one per row ``[B]`` (vLLM / TRL sample each
request with its own) or per token ``[B, T]``, on both paths (fused and composable), both backends (Triton under the
interpreter), fp32 and bf16 with NaN in the padded positions, under ``torch.compile(fullgraph=True)``, and with
``tp_group=`` / ``seq_group=`` on a gloo group.

The oracle is independent of the temperature plumbing: with ``x' = [x, 1] / t`` and ``W' = [W, b]`` the logits
``x' W'^T`` are exactly ``(x W^T + b) / t`` per token, so the same loss at temperature 1 on ``(x', W')`` in float64
(composable path, torch backend) gives the loss, the metrics and, through autograd, the gradients with respect to
``x``, ``W`` and ``b``. The reference model's hidden states are transformed alike.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from _gloo import run_ranks
from rlvr_kernels import RLVRLoss

B, T, H, V = 3, 6, 8, 40

CASES = {
    "grpo_kl": dict(loss_type="grpo", beta=0.04, entropy_coef=0.01),
    "dapo": dict(loss_type="dapo", beta=0.0),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.0),
}


def make(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g) * 0.7
    w = torch.randn(V, H, generator=g) * 0.7
    b = torch.randn(V, generator=g) * 0.2
    rx = x + 0.1 * torch.randn(B, T, H, generator=g)
    rw = w + 0.05 * torch.randn(V, H, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor([6, 4, 2])[:, None]).float()
    x[1, 4:] = float("nan")  # padded positions as attention kernels leave them
    rx[2, 3] = float("nan")
    adv = torch.tensor([0.8, -0.5, 0.3])
    old = -2.0 - torch.rand(B, T, generator=g)
    temp_rows = torch.tensor([0.7, 1.3, 0.45])
    temp_tok = 0.4 + torch.rand(B, T, generator=g)
    temp_tok[1, 4] = 0.0  # never read (padding)
    temp_tok[2, 5] = float("nan")
    cast = [u.to(dtype) for u in (x, w, b, rx, rw)]
    return (*cast, ids, mask, adv, old, temp_rows, temp_tok)


def _loss(module, x, w, b, rx, rw, rb, ids, mask, adv, old, **kw):
    loss, metrics = module(
        x, w, ids, mask, adv, bias=b, old_per_token_logps=old, ref_input=rx, ref_weight=rw, ref_bias=rb, **kw
    )
    return loss, dict(metrics.named)


def _run(module, x, w, b, rx, rw, ids, mask, adv, old, temp, compiled=False):
    leaves = [u.clone().requires_grad_() for u in (x, w, b)]

    def f(x_, w_, b_, t_):
        return _loss(module, x_, w_, b_, rx, rw, b.detach(), ids, mask, adv, old, temperature=t_)

    if compiled:
        torch._dynamo.reset()
        f = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss, named = f(*leaves, temp)
    (loss * 0.5).backward()
    return loss.detach(), {k: v.detach() for k, v in named.items()}, [u.grad for u in leaves]


def _oracle(kw, x, w, b, rx, rw, ids, mask, adv, old, temp):
    """float64, temperature 1, on ``([x, 1] / t, [W, b])``: the loss, metrics and d(x, W, b) through autograd."""
    t = temp.double()
    t = t.reshape(B, -1).expand(B, T)
    t = torch.where(mask != 0, t, 1.0)[..., None]
    xd, wd, bd = (u.double().clone().requires_grad_() for u in (x, w, b))

    def aug(h):
        return torch.cat([h, torch.ones_like(h[..., :1])], -1) / t

    module = RLVRLoss(fused=False, backend="torch", **kw)
    loss, named = _loss(
        module, aug(xd), torch.cat([wd, bd[:, None]], 1), None, aug(rx.double()),
        torch.cat([rw.double(), b.double()[:, None]], 1), None, ids, mask, adv, old,
    )  # fmt: skip
    (loss * 0.5).backward()
    return loss.detach(), {k: v.detach() for k, v in named.items()}, [xd.grad, wd.grad, bd.grad]


def _close(got, want, tol, name):
    valid_rows = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), valid_rows), name
    err = float((got.double() - want.double()).nan_to_num().abs().max()) if got.numel() else 0.0
    scale = max(1.0, float(want.double().nan_to_num().abs().max())) if want.numel() else 1.0
    assert err <= tol * scale, f"{name}: error {err:.3g} > {tol * scale:.3g}"


def _assert_matches(got, want, dtype, grad_tol=None):
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    grad_tol = grad_tol or tol
    (lg, mg, gg), (lw, mw, gw) = got, want
    _close(lg, lw, tol, "loss")
    for k in mw:
        _close(mg[k], mw[k], tol, k)
    for name, a, e in zip(("dx", "dw", "db"), gg, gw):
        assert a.dtype == dtype, name
        _close(a, e, grad_tol, name)


@pytest.mark.parametrize("form", ["rows", "tokens"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_float64_oracle(case, fused, form):
    x, w, b, rx, rw, ids, mask, adv, old, trow, ttok = make(0)
    temp = trow if form == "rows" else ttok
    kw = CASES[case]
    module = RLVRLoss(fused=fused, backend="torch", temperature=0.9, **kw)  # the call's temperature replaces 0.9
    got = _run(module, x, w, b, rx, rw, ids, mask, adv, old, temp)
    _assert_matches(got, _oracle(kw, x, w, b, rx, rw, ids, mask, adv, old, temp), torch.float32)
    assert torch.isnan(got[2][0][1, 4:]).sum() == 0  # no NaN leaks from the padding into dX


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False])
def test_backends_and_dtypes(backend, dtype, fused):
    x, w, b, rx, rw, ids, mask, adv, old, trow, _ = make(1, dtype)
    kw = CASES["grpo_kl"]
    module = RLVRLoss(fused=fused, backend=backend, **kw)
    got = _run(module, x, w, b, rx, rw, ids, mask, adv, old, trow)
    want = _oracle(kw, x, w, b, rx, rw, ids, mask, adv, old, trow)
    _assert_matches(got, want, dtype, grad_tol=None if dtype == torch.float32 else 5e-2)


@pytest.mark.parametrize("fused", [True, False])
def test_float64(fused):
    x, w, b, rx, rw, ids, mask, adv, old, trow, ttok = make(2, torch.float64)
    kw = CASES["grpo_kl"]
    got = _run(RLVRLoss(fused=fused, backend="torch", **kw), x, w, b, rx, rw, ids, mask, adv, old, ttok.double())
    want = _oracle(kw, x, w, b, rx, rw, ids, mask, adv, old, ttok)
    (lg, mg, gg), (lw, mw, gw) = got, want
    torch.testing.assert_close(lg.double(), lw.double(), atol=1e-6, rtol=1e-6)
    for k in mw:
        torch.testing.assert_close(mg[k].double(), mw[k].double(), atol=1e-6, rtol=1e-6, equal_nan=True, msg=k)
    for a, e in zip(gg, gw):  # the fused path's dX GEMM accumulates in fp32
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("fused", [True, False])
def test_constant_tensor_equals_the_constructor_temperature(fused):
    x, w, b, rx, rw, ids, mask, adv, old, _, _ = make(3)
    a = _run(RLVRLoss(fused=fused, backend="torch", temperature=0.7), x, w, b, rx, rw, ids, mask, adv, old, None)
    for t in (torch.full((B,), 0.7), torch.full((B, 1), 0.7), torch.full((B, T), 0.7), torch.tensor(0.7), 0.7):
        c = _run(RLVRLoss(fused=fused, backend="torch"), x, w, b, rx, rw, ids, mask, adv, old, t)
        torch.testing.assert_close(c[0], a[0], atol=1e-6, rtol=1e-6)
        for u, v in zip(c[2], a[2]):
            torch.testing.assert_close(u, v, atol=1e-6, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("fused", [True, False])
def test_checks(fused):
    x, w, b, rx, rw, ids, mask, adv, old, trow, ttok = make(4)
    module = RLVRLoss(fused=fused, backend="torch")

    def call(t):
        return _loss(module, x, w, b, rx, rw, b, ids, mask, adv, old, temperature=t)

    for bad in (torch.tensor([0.7, 0.0, 1.0]), torch.tensor([0.7, -1.0, 1.0]), torch.tensor([0.7, float("nan"), 1.0]),
                torch.tensor([0.7, float("inf"), 1.0]), torch.tensor([0.7, 1e-39, 1.0])):  # fmt: skip
        with pytest.raises(ValueError, match="temperature must be > 0 and finite"):
            call(bad)
    for bad in (torch.ones(B + 1), torch.ones(B, T + 1), torch.ones(T)):
        with pytest.raises(ValueError, match="temperature must be a number or a tensor of shape"):
            call(bad)
    with pytest.raises(TypeError, match="floating-point"):
        call(torch.ones(B, dtype=torch.long))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            call(bad)
    tok = ttok.clone()
    tok[0, 0] = -1.0
    with pytest.raises(ValueError, match="row 0, token 0"):
        call(tok)
    call(ttok)  # 0 and NaN on padded tokens are not read


def _count_graph_breaks(fn, *args):
    torch._dynamo.reset()
    explain = torch._dynamo.explain(fn)(*args)
    return explain.graph_break_count, explain.graph_count


@pytest.mark.parametrize("fused", [True, False])
def test_compiled_fullgraph_matches_eager(fused):
    x, w, b, rx, rw, ids, mask, adv, old, trow, _ = make(5)
    module = RLVRLoss(fused=fused, backend="torch", **CASES["grpo_kl"])
    want = _run(module, x, w, b, rx, rw, ids, mask, adv, old, trow)
    got = _run(module, x, w, b, rx, rw, ids, mask, adv, old, trow, compiled=True)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k], atol=1e-6, rtol=1e-5, equal_nan=True)
    for u, v in zip(got[2], want[2]):
        torch.testing.assert_close(u, v, atol=1e-6, rtol=1e-5, equal_nan=True)

    def f(x_, t_):
        return module(x_, w, ids, mask, adv, bias=b, old_per_token_logps=old, ref_input=rx, ref_weight=rw,
                      ref_bias=b, temperature=t_)[0]  # fmt: skip

    breaks, graphs = _count_graph_breaks(f, x.clone().requires_grad_(), trow)
    assert (breaks, graphs) == (0, 1)
    # new temperatures are new tensor values, not a new graph
    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    for t in (trow, trow * 1.1, trow * 0.5):
        eager = f(x, t)
        torch.testing.assert_close(cf(x, t), eager, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_compiled_value_check(fused):
    x, w, b, rx, rw, ids, mask, adv, old, trow, _ = make(6)
    module = RLVRLoss(fused=fused, backend="torch", beta=0.0)

    def f(x_, t_):
        return module(x_, w, ids, mask, adv, bias=b, old_per_token_logps=old, temperature=t_)[0]

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    cf(x.clone().requires_grad_(), trow)
    with pytest.raises((RuntimeError, ValueError), match="temperature must be > 0"):
        cf(x.clone().requires_grad_(), torch.tensor([0.7, -1.0, 1.0]))


# ---------------------------------------------------------------------------------------------------------------
# tp_group / seq_group on 2 gloo ranks: every rank's loss, metrics and gradients equal the single-process ones


def _tp_rank(rank, world, fused, form):
    import torch.distributed as dist

    x, w, b, rx, rw, ids, mask, adv, old, trow, ttok = make(7)
    temp = trow if form == "rows" else ttok
    kw = CASES["grpo_kl"]
    full = _run(RLVRLoss(fused=fused, backend="torch", **kw), x, w, b, rx, rw, ids, mask, adv, old, temp)
    s0, s1 = rank * (V // 2), (rank + 1) * (V // 2)
    leaves = [u.clone().requires_grad_() for u in (x, w[s0:s1], b[s0:s1])]
    module = RLVRLoss(fused=fused, backend="torch", **kw)
    loss, named = _loss(
        module, *leaves, rx, rw[s0:s1], b[s0:s1].detach(), ids, mask, adv, old, temperature=temp,
        tp_group=dist.group.WORLD,
    )  # fmt: skip
    (loss * 0.5).backward()
    errs = {"loss": float((loss.detach() - full[0]).abs())}
    for k in full[1]:
        errs[k] = float((named[k].detach() - full[1][k]).nan_to_num().abs().max())
    errs["dx"] = float((leaves[0].grad - full[2][0]).nan_to_num().abs().max())
    errs["dw"] = float((leaves[1].grad - full[2][1][s0:s1]).abs().max())
    errs["db"] = float((leaves[2].grad - full[2][2][s0:s1]).abs().max())
    return errs


@pytest.mark.parametrize("form", ["rows", "tokens"])
@pytest.mark.parametrize("fused", [True, False])
def test_tp_group(fused, form):
    for errs in run_ranks(_tp_rank, 2, fused, form, timeout=120):
        for k, e in errs.items():
            assert e <= 2e-5, (k, e)


def _seq_rank(rank, world, form):
    import torch.distributed as dist

    x, w, b, rx, rw, ids, mask, adv, old, trow, ttok = make(8)
    temp = trow if form == "rows" else ttok
    kw = CASES["grpo_kl"]
    full = _run(RLVRLoss(fused=False, backend="torch", **kw), x, w, b, rx, rw, ids, mask, adv, old, temp)
    c = slice(rank * (T // 2), (rank + 1) * (T // 2))
    leaves = [u.clone().requires_grad_() for u in (x[:, c], w, b)]
    module = RLVRLoss(fused=False, backend="torch", **kw)
    loss, named = _loss(
        module, *leaves, rx[:, c], rw, b.detach(), ids[:, c], mask[:, c], adv, old[:, c],
        temperature=temp if form == "rows" else temp[:, c], seq_group=dist.group.WORLD,
    )  # fmt: skip
    (loss * 0.5).backward()
    dw, db = leaves[1].grad.clone(), leaves[2].grad.clone()
    dist.all_reduce(dw)
    dist.all_reduce(db)
    errs = {"loss": float((loss.detach() - full[0]).abs())}
    for k in full[1]:
        errs[k] = float((named[k].detach() - full[1][k]).nan_to_num().abs().max())
    errs["dx"] = float((leaves[0].grad - full[2][0][:, c]).nan_to_num().abs().max())
    errs["dw"] = float((dw - full[2][1]).abs().max())
    errs["db"] = float((db - full[2][2]).abs().max())
    return errs


@pytest.mark.parametrize("form", ["rows", "tokens"])
def test_seq_group(form):
    for errs in run_ranks(_seq_rank, 2, form, timeout=120):
        for k, e in errs.items():
            assert e <= 2e-5, (k, e)


def test_opcheck_fused_loss_with_temperature():
    """The fused op's schema takes the temperatures as an optional trailing tensor (old callers are unchanged)."""
    from test_loss_compile import _fused_op_args

    args = _fused_op_args()
    temp = 0.5 + torch.rand(args[1].shape[:2])
    op = torch.ops.rlvr_kernels.fused_loss.default
    torch.library.opcheck(op, args + ("", 0, True, temp))
    torch.library.opcheck(op, _fused_op_args(need=(True, False, False)) + ("", 0, True, temp))
    assert op._schema.arguments[-1].name == "temperature"
    assert str(op._schema.arguments[-1].type) == "Optional[Tensor]"
