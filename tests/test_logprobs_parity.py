"""Parity of the log-prob/entropy ops with the peers' own code, installed from PyPI (the `test` extra).

TRL: ``selective_log_softmax`` + ``entropy_from_logits`` (GRPOTrainer's unfused path, on logits).
verl: torch ``FusedLinearForPPO`` (its hidden-state path without Triton); Triton ``linear_cross_entropy`` on GPU.
Liger: ``LigerFusedLinearScaledCrossEntropyFunction`` (per-token NLL + entropy; the CPU fallback here).
"""

from __future__ import annotations

import pytest
import torch

from rlvr_kernels import fused_linear_logprobs, logprobs_from_logits

BACKENDS = ["torch", "triton"]


def _data(n=24, h=32, v=700, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=gen) * 0.5
    w = torch.randn(v, h, generator=gen) * 0.5
    t = torch.randint(0, v, (n,), generator=gen)
    return x, w, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trl_selective_log_softmax_and_entropy(backend, temperature):
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 9, 777, generator=gen) * 3
    t = torch.randint(0, 777, (3, 9), generator=gen)
    want_lp = selective_log_softmax(logits / temperature, t)
    want_ent = entropy_from_logits(logits / temperature)
    logp, ent = logprobs_from_logits(logits, t, temperature=temperature, backend=backend)
    torch.testing.assert_close(logp, want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=1e-5)
    # the linear op on the same logits (as hidden = identity rows of W): same numbers
    x, w, tt = _data()
    z = x @ w.T
    logp2, ent2 = fused_linear_logprobs(x, w, tt, temperature=temperature, backend=backend)
    torch.testing.assert_close(logp2, selective_log_softmax(z / temperature, tt), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent2, entropy_from_logits(z / temperature), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trl_bf16_logits(backend):
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(4, 300, generator=gen) * 3).to(torch.bfloat16)
    t = torch.randint(0, 300, (4,), generator=gen)
    # TRL's bf16 path computes log_softmax in bf16; ours accumulates in fp32. Compare at bf16 resolution.
    want_lp = selective_log_softmax(logits, t).float()
    want_ent = entropy_from_logits(logits).float()
    logp, ent = logprobs_from_logits(logits, t, backend=backend)
    torch.testing.assert_close(logp, want_lp, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(ent, want_ent, atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_verl_fused_linear_for_ppo(backend, temperature):
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    x, w, t = _data(n=40, h=48, v=1000, seed=3)
    gen = torch.Generator().manual_seed(4)
    g1, g2 = torch.randn(40, generator=gen), torch.randn(40, generator=gen)

    def grads(fn):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent = fn(xx, ww)
        ((lp * g1).sum() + (ent * g2).sum()).backward()
        return lp.detach(), ent.detach(), xx.grad, ww.grad

    verl_out = grads(lambda xx, ww: FusedLinearForPPO(chunk_size=16)(xx, ww, t, temperature))
    ours = grads(lambda xx, ww: fused_linear_logprobs(xx, ww, t, temperature=temperature, backend=backend))
    for a, b in zip(ours, verl_out):
        torch.testing.assert_close(a, b.float(), atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_liger_fused_linear_scaled_cross_entropy(backend):
    from liger_kernel.ops.fused_linear_scaled_cross_entropy import LigerFusedLinearScaledCrossEntropyFunction

    x, w, t = _data(n=20, h=32, v=600, seed=5)
    t[3] = -100
    ids = torch.tensor([0, 5, 599])
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    nll, ent, sel = LigerFusedLinearScaledCrossEntropyFunction.apply(xx, ww, t, 0.8, -100, 1, True, ids)
    (nll.sum() + 0.5 * ent.float().sum()).backward()
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    logp, ent2, gathered = fused_linear_logprobs(
        x2, w2, t, temperature=0.8, gather_ids=ids.expand(20, 3), backend=backend
    )
    ((-logp).sum() + 0.5 * ent2.sum()).backward()
    torch.testing.assert_close(-logp, nll.float(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent2, ent.float(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(gathered, sel.float(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(x2.grad, xx.grad, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(w2.grad, ww.grad, atol=5e-5, rtol=1e-4)


@pytest.mark.gpu
def test_verl_triton_linear_cross_entropy_gpu():
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    gen = torch.Generator(device="cuda").manual_seed(0)
    n, h, v = 2048, 1024, 32000
    x = (torch.randn(n, h, device="cuda", generator=gen) * 0.05).bfloat16().requires_grad_()
    w = (torch.randn(v, h, device="cuda", generator=gen) * 0.05).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda", generator=gen)
    lp_v, ent_v = linear_cross_entropy(x, w, t, 1.0, "none")
    (lp_v.sum() + ent_v.sum()).backward()
    gx_v, gw_v = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    lp, ent = fused_linear_logprobs(x, w, t)
    (lp.sum() + ent.sum()).backward()
    torch.testing.assert_close(lp, lp_v.float(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(ent, ent_v.float(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(x.grad.float(), gx_v.float(), atol=2e-2, rtol=5e-2)
    torch.testing.assert_close(w.grad.float(), gw_v.float(), atol=2e-2, rtol=5e-2)
