"""GPU checks (marker ``gpu``; skipped without CUDA): the compiled Triton kernels at a realistic bf16 shape."""

from __future__ import annotations

import pytest
import torch

from rlvr_kernels import fused_linear_logprobs, logprobs_from_logits
from rlvr_kernels.reference import logprobs as ref

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("shape", [(4096, 4096, 151936), (1000, 896, 32003)])
def test_linear_bf16_matches_reference(shape):
    n, h, v = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(n, h, device="cuda", generator=gen) * 0.05).bfloat16().requires_grad_()
    w = (torch.randn(v, h, device="cuda", generator=gen) * 0.05).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda", generator=gen)
    t[::97] = -100
    g1 = torch.randn(n, device="cuda", generator=gen)
    g2 = torch.randn(n, device="cuda", generator=gen)
    lp, ent = fused_linear_logprobs(x, w, t, temperature=0.9)
    ((lp * g1).sum() + (ent * g2).sum()).backward()
    gx, gw = x.grad.float(), w.grad.float()
    x32 = x.detach().float().requires_grad_()
    w32 = w.detach().float().requires_grad_()
    lp_r, ent_r, _ = ref.linear_logprobs(x32, w32, t, temperature=0.9)
    ((lp_r * g1).sum() + (ent_r * g2).sum()).backward()
    torch.testing.assert_close(lp, lp_r, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(ent, ent_r, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(gx, x32.grad, atol=2e-2, rtol=5e-2)
    torch.testing.assert_close(gw, w32.grad, atol=2e-2, rtol=5e-2)


def test_logits_kernel_bf16():
    gen = torch.Generator(device="cuda").manual_seed(1)
    z = (torch.randn(2048, 151936, device="cuda", generator=gen) * 3).bfloat16().requires_grad_()
    t = torch.randint(0, 151936, (2048,), device="cuda", generator=gen)
    lp, ent = logprobs_from_logits(z, t)
    (lp.sum() + ent.sum()).backward()
    zr = z.detach().float().requires_grad_()
    lp_r, ent_r, _ = ref.logprobs_from_logits(zr, t)
    (lp_r.sum() + ent_r.sum()).backward()
    torch.testing.assert_close(lp, lp_r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ent, ent_r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z.grad.float(), zr.grad, atol=1e-2, rtol=1e-2)


def test_many_rows_grid_limit():
    """More rows than 65535: the logits kernel loops over rows instead of launching a larger grid."""
    n, h, v = 70000, 64, 512
    x = torch.randn(n, h, device="cuda") * 0.1
    w = torch.randn(v, h, device="cuda") * 0.1
    t = torch.randint(0, v, (n,), device="cuda")
    lp, ent = fused_linear_logprobs(x, w, t)
    lp_r, ent_r, _ = ref.linear_logprobs(x, w, t)
    torch.testing.assert_close(lp, lp_r, atol=1e-3, rtol=1e-3)
    lp2, _ = logprobs_from_logits((x @ w.T), t)
    torch.testing.assert_close(lp2, lp_r, atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Hazards the interpreter cannot show (kernel review, 2026-12): int64 offsets past 2**31 elements, grids capped at
# 65535 with programs looping, rows longer than 65535 tokens, -inf logits, torch >= 2.9 TF32 flags, strided 1-D inputs.
# Each test checks the compiled kernels against the torch reference on the same device.

DEV = "cuda"


def _ref_logits_rows(z, t, temperature=1.0):
    """Reference logp, entropy and d(logp.sum() + entropy.sum())/dz for a few rows (fp32)."""
    zr = z.detach().float().requires_grad_()
    lp, ent, _ = ref.logprobs_from_logits(zr, t, temperature=temperature)
    (lp.sum() + ent.sum()).backward()
    return lp.detach(), ent.detach(), zr.grad


def test_logits_offsets_past_2_31():
    """row * V passes 2**31 (14200 x 151936 bf16 = 4.3 GB): the rows past the int32 range must still be right."""
    n, v = 14200, 151936
    assert n * v > 2**31
    gen = torch.Generator(device=DEV).manual_seed(3)
    z = torch.randn(n, v, device=DEV, dtype=torch.bfloat16, generator=gen).mul_(3).requires_grad_()
    t = torch.randint(0, v, (n,), device=DEV, generator=gen)
    lp, ent = logprobs_from_logits(z, t)
    (lp.sum() + ent.sum()).backward()
    for rows in (slice(0, 16), slice(n - 32, n)):
        lp_r, ent_r, g_r = _ref_logits_rows(z[rows], t[rows])
        torch.testing.assert_close(lp[rows], lp_r, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ent[rows], ent_r, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(z.grad[rows].float(), g_r, atol=1e-2, rtol=1e-2)


def test_linear_offsets_past_2_31():
    """row * H passes 2**31 in the hidden states (524800 x 4096 bf16): forward and dX of the last rows."""
    n, h, v = 524800, 4096, 256
    assert n * h > 2**31
    gen = torch.Generator(device=DEV).manual_seed(4)
    x = torch.randn(n, h, device=DEV, dtype=torch.bfloat16, generator=gen).mul_(0.05).requires_grad_()
    w = torch.randn(v, h, device=DEV, dtype=torch.bfloat16, generator=gen).mul_(0.05).requires_grad_()
    t = torch.randint(0, v, (n,), device=DEV, generator=gen)
    lp, ent = fused_linear_logprobs(x, w, t, temperature=0.9)
    (lp.sum() + ent.sum()).backward()
    for rows in (slice(0, 64), slice(n - 64, n)):
        xr = x.detach()[rows].float().requires_grad_()
        lp_r, ent_r, _ = ref.linear_logprobs(xr, w.detach().float(), t[rows], temperature=0.9)
        (lp_r.sum() + ent_r.sum()).backward()
        torch.testing.assert_close(lp[rows], lp_r, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(ent[rows], ent_r, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(x.grad[rows].float(), xr.grad, atol=2e-2, rtol=5e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_minus_inf_logits_at_block_starts(dtype):
    """-inf logits a lane or a tile sees first (masked ids at the start of the vocabulary, or a whole vocabulary
    split) must not turn into NaN: -inf - -inf in the online max update."""
    gen = torch.Generator(device=DEV).manual_seed(5)
    n, h, v = 96, 256, 32003
    z = torch.randn(n, v, device=DEV, generator=gen).mul_(2)
    z[:, :5000] = float("-inf")
    z[:, 20000:26000] = float("-inf")
    t = torch.randint(5000, 20000, (n,), device=DEV, generator=gen)
    zz = z.to(dtype).requires_grad_()
    lp, ent = logprobs_from_logits(zz, t)
    (lp.sum() + ent.sum()).backward()
    lp_r, ent_r, g_r = _ref_logits_rows(z.to(dtype), t)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(zz.grad).all()
    torch.testing.assert_close(lp, lp_r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ent, ent_r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(zz.grad.float(), g_r, atol=1e-2, rtol=1e-2)
    # linear form: a -inf bias over whole row tiles and (small chunk budgets) whole backward vocabulary blocks
    x = (torch.randn(n, h, device=DEV, generator=gen) * 0.1).to(dtype)
    w = (torch.randn(v, h, device=DEV, generator=gen) * 0.1).to(dtype)
    b = torch.zeros(v, device=DEV)
    b[:5000] = float("-inf")
    b[20000:26000] = float("-inf")
    z_lin = x.float() @ w.float().T + b
    want = torch.log_softmax(z_lin, -1).gather(1, t[:, None])[:, 0]
    for budget in (None, n * 4096 * 6, n * 4 * v // 3):
        env = {} if budget is None else {"RLVR_KERNELS_CHUNK_BYTES": str(budget)}
        with pytest.MonkeyPatch.context() as mp:
            for k, val in env.items():
                mp.setenv(k, val)
            xx = x.clone().requires_grad_()
            lp, ent = fused_linear_logprobs(xx, w, t, bias=b)
            (lp.sum() + ent.sum()).backward()
        torch.testing.assert_close(lp, want, atol=2e-3, rtol=1e-3)
        assert torch.isfinite(ent).all() and torch.isfinite(xx.grad).all()
    lp, ent = fused_linear_logprobs(x, w, t, bias=b)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()


def test_fp32_with_torch_tf32_api():
    """torch >= 2.9: after ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` reading the legacy
    ``allow_tf32`` raises; the fp32 path must still pick its dot precision (TF32 here, as torch's own matmuls)."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API")
    old = matmul.fp32_precision
    gen = torch.Generator(device=DEV).manual_seed(6)
    x = torch.randn(512, 512, device=DEV, generator=gen) * 0.05
    w = torch.randn(4096, 512, device=DEV, generator=gen) * 0.05
    t = torch.randint(0, 4096, (512,), device=DEV, generator=gen)
    try:
        matmul.fp32_precision = "tf32"
        lp, ent = fused_linear_logprobs(x, w, t)
        lp_r, ent_r, _ = ref.linear_logprobs(x, w, t)
        torch.testing.assert_close(lp, lp_r, atol=5e-3, rtol=1e-3)
        torch.testing.assert_close(ent, ent_r, atol=5e-3, rtol=1e-3)
        matmul.fp32_precision = "ieee"
        lp, _ = fused_linear_logprobs(x, w, t)
        lp_r, _, _ = ref.linear_logprobs(x, w, t)
        torch.testing.assert_close(lp, lp_r, atol=1e-4, rtol=1e-4)
    finally:
        matmul.fp32_precision = old


def test_strided_targets_and_bias():
    """1-D targets / bias with a non-unit stride (a column of a [N, k] id tensor, a strided bias view)."""
    gen = torch.Generator(device=DEV).manual_seed(7)
    x = torch.randn(300, 128, device=DEV, generator=gen).bfloat16()
    w = torch.randn(5000, 128, device=DEV, generator=gen).bfloat16()
    ids = torch.randint(0, 5000, (300, 3), device=DEV, generator=gen)
    b = torch.randn(10000, device=DEV, generator=gen)[::2]
    lp, ent = fused_linear_logprobs(x, w, ids[:, 1], bias=b)
    lp_r, ent_r, _ = ref.linear_logprobs(x.float(), w.float(), ids[:, 1].contiguous(), bias=b.contiguous())
    torch.testing.assert_close(lp, lp_r, atol=2e-3, rtol=1e-3)
    z = x.float() @ w.float().T
    lp2, _ = logprobs_from_logits(z, ids[:, 1])
    lp3, _, _ = ref.logprobs_from_logits(z, ids[:, 1].contiguous())
    torch.testing.assert_close(lp2, lp3, atol=1e-5, rtol=1e-5)


def _token_batch(B, T, seed, device=DEV):
    gen = torch.Generator(device=device).manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), device=device, generator=gen)
    lengths[0] = T
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    ent = torch.rand(B, T, device=device, generator=gen) * 3
    ent = torch.where(torch.rand(B, T, device=device, generator=gen) < 0.1, ent.round(), ent)  # ties
    adv = torch.randn(B, device=device, generator=gen)
    logp = -torch.rand(B, T, device=device, generator=gen) * 4
    logp_mu = logp + torch.randn(B, T, device=device, generator=gen) * 0.3
    return mask, ent, adv, logp, logp_mu.clamp(max=0.0)


@pytest.mark.parametrize("B, T", [(70000, 8), (2, 200000)])
def test_token_ops_many_rows_and_long_rows(B, T):
    """More rows than 65535 (the grid is capped, programs loop over rows) and rows longer than 65535 tokens
    (programs loop over blocks): the Triton token ops equal the torch reference on the same GPU."""
    from rlvr_kernels import (
        cppo_mask,
        d3s_token_mask,
        entropy_shaped_advantages,
        forking_token_mask,
        tp_schedule_mask,
        trajectory_percentile,
    )

    mask, ent, adv, logp, logp_mu = _token_batch(B, T, seed=8)
    both = lambda fn, *a, **k: (fn(*a, backend="triton", **k), fn(*a, backend="torch", **k))  # noqa: E731
    for got, want in (
        both(trajectory_percentile, mask),  # t / L: IEEE division (tl.div_rn), bit-equal
        both(tp_schedule_mask, mask, 0.37),
        both(forking_token_mask, ent, mask, 0.2),
        both(d3s_token_mask, adv, ent, mask, 0.2, scope="sequence"),
        both(entropy_shaped_advantages, adv, ent, mask, 0.7, alpha=0.4, kappa=2.0),
    ):
        assert torch.equal(got, want)
    got, want = both(entropy_shaped_advantages, adv, ent, mask, 0.7, alpha=0.4, kappa=3.0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # torch divides by a scalar as x * (1 / kappa)
    for budget in ("dynamic", "fixed", "none"):
        a, b = both(cppo_mask, logp, logp_mu, adv, mask, budget=budget)
        torch.testing.assert_close(a.divergence, b.divergence, atol=1e-6, rtol=1e-5)  # exp: ex2.approx on GPU
        torch.testing.assert_close(a.weight, b.weight, atol=0, rtol=0)
        torch.testing.assert_close(a.delta_b, b.delta_b, atol=1e-6, rtol=1e-5)
        # prefix sums in a different order (tl.cumsum vs torch.cumsum) may flip a token at the threshold
        assert (a.mask != b.mask).float().mean().item() < 1e-4, budget


def test_delta_sweeps_many_row_blocks():
    """rowdot3's grid is min(row blocks, 65535): 1.1M rows (68750 blocks of 16) make programs loop."""
    from rlvr_kernels.kernels import delta as kd
    from rlvr_kernels.reference import delta as rd

    gen = torch.Generator(device=DEV).manual_seed(9)
    n, h = 1_100_000, 96
    hs = torch.randn(n, h, device=DEV, generator=gen).bfloat16()
    mu = torch.randn(2, h, device=DEV, generator=gen)
    wts = torch.randn(n, 2, device=DEV, generator=gen)
    valid = torch.rand(n, device=DEV, generator=gen) < 0.9
    torch.testing.assert_close(
        kd.rowdot3(hs, mu, valid, with_norm=True), rd.rowdot3(hs, mu, valid, with_norm=True), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(kd.colsum2(hs, wts, valid), rd.colsum2(hs, wts, valid), atol=1e-2, rtol=1e-4)


def test_ignored_row_of_minus_inf_logits_gets_zero_gradient():
    """An ignore_index row whose logits are all -inf (lse = -inf): its gradient is exactly 0, not NaN."""
    z = torch.randn(4, 1000, device=DEV)
    z[2] = float("-inf")
    t = torch.tensor([3, 4, -100, 5], device=DEV)
    zz = z.clone().requires_grad_()
    lp, ent = logprobs_from_logits(zz, t)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(zz.grad).all() and (zz.grad[2] == 0).all()
    assert lp[2] == 0 and ent[2] == 0


@pytest.mark.parametrize("fused", [True, False])
def test_rlvr_loss_bf16_autocast_nan_padding_on_gpu(fused):
    """The users' conditions on the compiled kernels: bf16 autocast over fp32 parameters, NaN hidden states and
    garbage ids at padded positions; equal to the call with clean padding, finite, zero gradient on padding."""
    from rlvr_kernels import RLVRLoss

    gen = torch.Generator(device="cuda").manual_seed(3)
    B, T, H, V = 4, 512, 1024, 32000
    x = torch.randn(B, T, H, device="cuda", generator=gen) * 0.05
    w = torch.randn(V, H, device="cuda", generator=gen) * 0.05
    ids = torch.randint(0, V, (B, T), device="cuda", generator=gen)
    mask = torch.ones(B, T, device="cuda")
    mask[1, 300:] = 0
    mask[3, 17:] = 0
    adv = torch.randn(B, device="cuda", generator=gen)
    old = -torch.rand(B, T, device="cuda", generator=gen) * 5
    pad = mask == 0
    out = []
    for poison in (0.0, float("nan")):
        xx = x.clone()
        xx[pad] = poison
        xx.requires_grad_()
        ww = w.clone().requires_grad_()
        ii = torch.where(pad, -1, ids) if poison != 0.0 else ids
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = RLVRLoss(beta=0.0, loss_type="dapo", fused=fused)(xx, ww, ii, mask, adv, old_per_token_logps=old)
        loss.backward()
        out.append((loss.detach(), xx.grad, ww.grad))
    (l0, gx0, gw0), (l1, gx1, gw1) = out
    assert torch.isfinite(l1) and torch.isfinite(gx1).all() and torch.isfinite(gw1).all()
    assert (gx1[pad] == 0).all()
    torch.testing.assert_close(l1, l0)
    torch.testing.assert_close(gx1, gx0)
    torch.testing.assert_close(gw1, gw0)


def test_gemm_helpers_on_cuda_accumulate_in_fp32():
    """The CUDA-only branches of rlvr_kernels._gemm (mm with out_dtype=fp32, addmm.dtype_out into an fp32
    accumulator, mm straight into a bf16 output) against float64."""
    from rlvr_kernels import _gemm

    gen = torch.Generator(device=DEV).manual_seed(9)
    a = torch.randn(300, 1000, device=DEV, generator=gen).bfloat16()
    b = torch.randn(1000, 260, device=DEV, generator=gen).bfloat16()
    exact = a.double() @ b.double()
    z = _gemm.mm_fp32(a, b)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.double(), exact, atol=1e-3, rtol=1e-4)
    acc = torch.ones(300, 260, device=DEV)
    _gemm.addmm_fp32_(acc, a, b)
    torch.testing.assert_close(acc.double(), exact + 1, atol=1e-3, rtol=1e-4)
    out = torch.empty(300, 260, device=DEV, dtype=torch.bfloat16)
    _gemm.mm_into(out, a, b)
    torch.testing.assert_close(out.double(), exact, atol=0.2, rtol=2**-7)
