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
    lp_r, ent_r = ref.logprobs_from_logits(zr, t)
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
