"""The GPU design on CPU tensors: every GEMM through rlvr_kernels._gemm (cuBLAS on a GPU), Triton row passes under
the interpreter, only the rows that count in the GEMMs, the chunk budget as a user setting, fp32 accumulation of dW
across the fused loss's chunks."""

from __future__ import annotations

import pytest
import torch

from rlvr_kernels import RLVRLoss, _gemm, fused_linear_logprobs


def _count_gemm_rows(monkeypatch):
    """Spy on the logits GEMMs: the rows of every x that enters one."""
    seen = []
    real = _gemm.logits_fp32

    def spy(x, w, b):
        seen.append(x.shape[0])
        return real(x, w, b)

    monkeypatch.setattr(_gemm, "logits_fp32", spy)
    return seen


def _oracle(x, w, t, ignore_index=-100):
    z = x.double() @ w.double().T
    logz = torch.log_softmax(z, -1)
    keep = t != ignore_index
    lp = torch.where(keep, logz.gather(1, t.clamp_min(0)[:, None])[:, 0], 0.0)
    ent = torch.where(keep, -(logz.exp() * logz).sum(-1), 0.0)
    return lp, ent


def test_only_counted_rows_enter_the_gemms(monkeypatch):
    """Rows whose target is ignore_index never reach a GEMM, forward or backward, and hold NaN without harm."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 40, 16, 300
    x = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    t[::3] = -100
    x[::3] = float("nan")  # padding rows may hold anything
    counted = int((t != -100).sum())
    seen = _count_gemm_rows(monkeypatch)
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = fused_linear_logprobs(xx, ww, t, backend="triton")
    (lp.sum() + ent.sum()).backward()
    assert seen and all(r == counted for r in seen), (seen, counted)
    want_lp, want_ent = _oracle(torch.nan_to_num(x), w, t)
    torch.testing.assert_close(lp.double(), want_lp, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ent.double(), want_ent, atol=2e-5, rtol=1e-4)
    assert torch.isfinite(xx.grad).all() and torch.isfinite(ww.grad).all()
    assert (xx.grad[::3] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_loss_gemms_see_only_loss_tokens(monkeypatch, backend):
    """The fused loss computes the head only on positions in the loss mask (a ragged batch: 60% of positions)."""
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 4, 10, 8, 64
    x = torch.randn(B, T, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor([10, 6, 5, 3])[:, None]).float()
    adv = torch.randn(B, generator=g)
    old = -torch.rand(B, T, generator=g)
    want, _ = RLVRLoss(beta=0.0, fused=False, backend=backend)(x, w, ids, mask, adv, old_per_token_logps=old)
    gx_want, gw_want = torch.autograd.grad(want, [x, w])
    seen = []
    if backend == "triton":
        seen = _count_gemm_rows(monkeypatch)
    else:
        import rlvr_kernels.reference.logprobs as ref_lp

        real = ref_lp._scaled_logits

        def spy(xc, *a, **kw):
            seen.append(xc.shape[0])
            return real(xc, *a, **kw)

        monkeypatch.setattr(ref_lp, "_scaled_logits", spy)
    got, _ = RLVRLoss(beta=0.0, fused=True, backend=backend)(x, w, ids, mask, adv, old_per_token_logps=old)
    gx, gw = torch.autograd.grad(got, [x, w])
    assert sum(seen) == int(mask.sum()), (seen, int(mask.sum()))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx, gx_want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, gw_want, atol=1e-6, rtol=1e-5)


def test_chunk_budget_is_a_user_setting(monkeypatch):
    assert _gemm.chunk_bytes(torch.device("cpu")) == _gemm.CHUNK_BYTES_CPU
    assert _gemm.chunk_bytes(torch.device("cuda")) == _gemm.CHUNK_BYTES_GPU
    monkeypatch.setenv(_gemm.CHUNK_BYTES_ENV, "4096")
    assert _gemm.chunk_bytes(torch.device("cuda")) == 4096
    for bad in ("lots", "0", "-5"):
        monkeypatch.setenv(_gemm.CHUNK_BYTES_ENV, bad)
        with pytest.raises(ValueError, match=_gemm.CHUNK_BYTES_ENV):
            _gemm.chunk_bytes(torch.device("cpu"))


def test_gemm_helpers_accumulate_in_fp32():
    """bf16 operands: fp32 results equal to the fp32 product of the same values (the CPU stand-in for cuBLAS with an
    fp32 output), in place for the accumulator and straight into a bf16 output for dW."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(33, 70, generator=g).bfloat16()
    b = torch.randn(70, 21, generator=g).bfloat16()
    exact = a.double() @ b.double()
    z = _gemm.mm_fp32(a, b)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.double(), exact, atol=1e-4, rtol=1e-5)
    acc = torch.ones(33, 21)
    _gemm.addmm_fp32_(acc, a, b)
    torch.testing.assert_close(acc.double(), exact + 1, atol=1e-4, rtol=1e-5)
    out = torch.empty(33, 21, dtype=torch.bfloat16)
    _gemm.mm_into(out, a, b)
    torch.testing.assert_close(out.double(), exact, atol=0.05, rtol=2**-7)


def test_fused_loss_accumulates_dw_in_fp32_across_chunks(monkeypatch):
    """bf16 weights and many chunks (one row each): dW is summed in fp32 and rounded to bf16 once, so it equals the
    one-chunk dW to within one bf16 rounding, and the float64 dW as closely as the one-chunk result does."""
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 12, 8, 16, 96
    x = torch.randn(B, T, H, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.3).bfloat16().requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    adv = torch.randn(B, generator=g)
    old = -torch.rand(B, T, generator=g) - 3.0
    kw = dict(beta=0.0, fused=True, backend="triton")
    loss1, _ = RLVRLoss(**kw)(x, w, ids, mask, adv, old_per_token_logps=old)
    (gw1,) = torch.autograd.grad(loss1, [w])
    monkeypatch.setenv(_gemm.CHUNK_BYTES_ENV, str(T * V * 4))  # one row per chunk: 12 chunks
    loss2, _ = RLVRLoss(**kw)(x, w, ids, mask, adv, old_per_token_logps=old)
    (gw2,) = torch.autograd.grad(loss2, [w])
    assert gw2.dtype == torch.bfloat16
    torch.testing.assert_close(loss2, loss1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw2.float(), gw1.float(), atol=1e-5, rtol=2**-7)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss64, _ = RLVRLoss(beta=0.0, fused=False, backend="torch")(x64, w64, ids, mask, adv, old_per_token_logps=old)
    (gw64,) = torch.autograd.grad(loss64, [w64])
    err1 = (gw1.double() - gw64).abs().max()
    err2 = (gw2.double() - gw64).abs().max()
    assert err2 <= 2 * err1 + 1e-6, (float(err1), float(err2))
