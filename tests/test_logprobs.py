"""fused_linear_logprobs / logprobs_from_logits: values and gradients against a float64 oracle, both backends.

The oracle below materialises the full float64 logits: it is written here, independently of the package.
Triton cases run under TRITON_INTERPRET=1 on CPU (see conftest.py), so their shapes stay small.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlvr_kernels
from rlvr_kernels import fused_linear_logprobs, logprobs_from_logits
from rlvr_kernels.reference import logprobs as ref_mod

IGN = -100


def oracle(x, w, t, b=None, temperature=1.0, ignore_index=IGN, ids=None):
    """float64 (logp, entropy, gathered) from full logits; differentiable."""
    z = x.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    z = z / temperature
    logz = torch.log_softmax(z, -1)
    ign = t == ignore_index
    tt = torch.where(ign, 0, t)
    logp = logz.gather(-1, tt[..., None])[..., 0].masked_fill(ign, 0.0)
    ent = (-(logz.exp() * logz).sum(-1)).masked_fill(ign, 0.0)
    g = None if ids is None else logz.gather(-1, ids).masked_fill(ign[..., None], 0.0)
    return logp, ent, g


def make(n, h, v, *, seed=0, lead=None, bias=False, scale=0.5, n_ignore=0, k=0):
    gen = torch.Generator().manual_seed(seed)
    lead = lead or (n,)
    x = torch.randn(*lead, h, generator=gen, dtype=torch.float64) * scale
    w = torch.randn(v, h, generator=gen, dtype=torch.float64) * scale
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    t = torch.randint(0, v, lead, generator=gen)
    if n_ignore:
        flat = t.view(-1)
        flat[torch.randperm(flat.numel(), generator=gen)[:n_ignore]] = IGN
    ids = torch.randint(0, v, lead + (k,), generator=gen) if k else None
    return x, w, b, t, ids


def run(backend, dtype, x, w, b, t, ids, temperature, upstream_seed=1, with_entropy_grad=True):
    xx = x.to(dtype).detach().requires_grad_()
    ww = w.to(dtype).detach().requires_grad_()
    bb = None if b is None else b.to(dtype).detach().requires_grad_()
    out = fused_linear_logprobs(xx, ww, t, bias=bb, temperature=temperature, gather_ids=ids, backend=backend)
    gen = torch.Generator().manual_seed(upstream_seed)
    loss = (out[0].double() * torch.randn(out[0].shape, generator=gen, dtype=torch.float64)).sum()
    if with_entropy_grad:
        loss = loss + (out[1].double() * torch.randn(out[1].shape, generator=gen, dtype=torch.float64)).sum()
    if ids is not None:
        loss = loss + (out[2].double() * torch.randn(out[2].shape, generator=gen, dtype=torch.float64)).sum()
    loss.backward()
    grads = (xx.grad, ww.grad, None if bb is None else bb.grad)
    return [o.detach() for o in out], grads


def expected(x, w, b, t, ids, temperature, upstream_seed=1, with_entropy_grad=True):
    """Oracle outputs and gradients for the same random upstream gradients as :func:`run`."""
    xx = x.detach().clone().requires_grad_()
    ww = w.detach().clone().requires_grad_()
    bb = None if b is None else b.detach().clone().requires_grad_()
    logp, ent, g = oracle(xx, ww, t, bb, temperature, IGN, ids)
    gen = torch.Generator().manual_seed(upstream_seed)
    loss = (logp * torch.randn(logp.shape, generator=gen, dtype=torch.float64)).sum()
    if with_entropy_grad:
        loss = loss + (ent * torch.randn(ent.shape, generator=gen, dtype=torch.float64)).sum()
    if ids is not None:
        loss = loss + (g * torch.randn(g.shape, generator=gen, dtype=torch.float64)).sum()
    loss.backward()
    outs = [logp.detach(), ent.detach()] + ([g.detach()] if ids is not None else [])
    return outs, (xx.grad, ww.grad, None if bb is None else bb.grad)


def assert_close(got, want, atol, rtol=0.0):
    for a, e in zip(got, want):
        if e is None:
            assert a is None
            continue
        torch.testing.assert_close(a.double(), e, atol=atol, rtol=rtol)


CASES = [
    # (n, h, v, lead, bias, temperature, n_ignore, k)
    (1, 16, 1000, None, False, 1.0, 0, 0),
    (37, 40, 1000, None, True, 0.7, 3, 4),
    (6, 23, 4099, (2, 3), True, 1.3, 1, 0),
    (64, 24, 300, (4, 16), False, 1.0, 5, 2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}-h{c[1]}-v{c[2]}")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_values_and_grads_fp32(case, backend):
    n, h, v, lead, bias, temp, n_ign, k = case
    x, w, b, t, ids = make(n, h, v, lead=lead, bias=bias, n_ignore=n_ign, k=k)
    got_out, got_grads = run(backend, torch.float32, x, w, b, t, ids, temp)
    want_out, want_grads = expected(x, w, b, t, ids, temp)
    assert all(o.dtype == torch.float32 for o in got_out)
    assert got_out[0].shape == t.shape and got_out[1].shape == t.shape
    assert_close(got_out, want_out, atol=2e-5, rtol=1e-5)
    assert_close(got_grads, want_grads, atol=5e-5, rtol=1e-4)
    ign = t == IGN
    assert (got_out[0][ign] == 0).all() and (got_out[1][ign] == 0).all()
    assert (got_out[0][~ign] <= 0).all()


def test_torch_backend_float64_exact():
    x, w, b, t, ids = make(9, 12, 257, bias=True, n_ignore=2, k=3)
    got_out, got_grads = run("torch", torch.float64, x, w, b, t, ids, 0.9)
    want_out, want_grads = expected(x, w, b, t, ids, 0.9)
    assert_close(got_out, want_out, atol=1e-12)
    assert_close(got_grads, want_grads, atol=1e-12)


def test_ignored_rows_get_no_gradient():
    x, w, b, t, _ = make(8, 16, 200, bias=True)
    t[2] = IGN
    for backend in ("torch", "triton"):
        _, (dx, dw, db) = run(backend, torch.float32, x, w, b, t, None, 1.0)
        assert torch.count_nonzero(dx[2]) == 0
        # only the ignored row: its hidden state must not contribute to dW either
        t_all = torch.full_like(t, IGN)
        _, (dx2, dw2, db2) = run(backend, torch.float32, x, w, b, t_all, None, 1.0)
        assert torch.count_nonzero(dx2) == 0 and torch.count_nonzero(dw2) == 0 and torch.count_nonzero(db2) == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logp_only_grad_skips_entropy_term(backend):
    """Entropy returned but not used by the loss: gradient equals the logp-only oracle gradient."""
    x, w, b, t, _ = make(12, 20, 333, bias=False)
    got_out, got_grads = run(backend, torch.float32, x, w, b, t, None, 0.8, with_entropy_grad=False)
    want_out, want_grads = expected(x, w, b, t, None, 0.8, with_entropy_grad=False)
    assert_close(got_grads, want_grads, atol=5e-5, rtol=1e-4)


def test_entropy_only_grad():
    x, w, _, t, _ = make(10, 16, 300)
    for backend in ("torch", "triton"):
        ww = w.float().requires_grad_()
        _, ent = fused_linear_logprobs(x.float(), ww, t, backend=backend)
        ent.sum().backward()
        w2 = w.clone().requires_grad_()
        _, ent2, _ = oracle(x, w2, t)
        ent2.sum().backward()
        torch.testing.assert_close(ww.grad.double(), w2.grad, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_triton(dtype):
    x, w, b, t, ids = make(24, 32, 700, bias=True, n_ignore=2, k=2)
    # Round the inputs to the half dtype first so that the oracle sees the same numbers.
    x, w, b = (a.to(dtype).double() for a in (x, w, b))
    got_out, got_grads = run("triton", dtype, x, w, b, t, ids, 1.0)
    want_out, want_grads = expected(x, w, b, t, ids, 1.0)
    assert_close(got_out, want_out, atol=2e-4, rtol=1e-4)  # fp32 accumulation of exact half inputs
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    assert_close(got_grads, want_grads, atol=tol, rtol=tol)
    assert got_grads[0].dtype == dtype and got_grads[1].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_chunk_backward(monkeypatch, dtype):
    """A small chunk budget (the user setting RLVR_KERNELS_CHUNK_BYTES) forces several row blocks in the forward and
    several vocabulary blocks in the backward; the result must not change."""
    from rlvr_kernels.kernels import logprobs as K

    x, w, b, t, ids = make(16, 24, 1100, bias=True, k=2)
    x, w, b = (a.to(dtype).double() for a in (x, w, b))
    want_out, want_grads = run("triton", dtype, x, w, b, t, ids, 0.9)
    calls = {"fwd": 0, "bwd": 0}
    real_fwd, real_bwd = K.logits_forward, K.logits_backward

    def fwd(*a, **k):
        calls["fwd"] += 1
        return real_fwd(*a, **k)

    def bwd(*a, **k):
        calls["bwd"] += 1
        return real_bwd(*a, **k)

    monkeypatch.setattr(K, "logits_forward", fwd)
    monkeypatch.setattr(K, "logits_backward", bwd)
    monkeypatch.setenv("RLVR_KERNELS_CHUNK_BYTES", str(16 * 256 * 4))
    got_out, got_grads = run("triton", dtype, x, w, b, t, ids, 0.9)
    assert calls["fwd"] >= 2 and calls["bwd"] >= 2, calls
    assert_close(got_out, [o.double() for o in want_out], atol=1e-6, rtol=1e-6)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # fp32: dX sums the blocks in another order
    assert_close(got_grads, [g.double() for g in want_grads], atol=tol + 1e-6, rtol=tol)


def test_triton_backward_is_deterministic():
    x, w, b, t, _ = make(40, 24, 900, bias=True)
    _, g1 = run("triton", torch.float32, x, w, b, t, None, 1.0)
    _, g2 = run("triton", torch.float32, x, w, b, t, None, 1.0)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_extreme_logits_stay_finite(backend):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 16, generator=gen) * 30
    w = torch.randn(500, 16, generator=gen) * 30  # |z| ~ 1e4
    t = torch.randint(0, 500, (8,), generator=gen)
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    logp, ent = fused_linear_logprobs(xx, ww, t, backend=backend)
    (logp.sum() + ent.sum()).backward()
    for a in (logp, ent, xx.grad, ww.grad):
        assert torch.isfinite(a).all()
    assert (logp <= 0).all() and (ent >= -1e-3).all()
    want_lp, want_ent, _ = oracle(x.double(), w.double(), t)
    torch.testing.assert_close(logp.double(), want_lp, atol=2e-2, rtol=1e-5)
    torch.testing.assert_close(ent.double(), want_ent, atol=2e-2, rtol=0)


def test_columns_past_v_do_not_leak():
    """Small negative logits: a padded column read as 0 would dominate the softmax (verl #2656)."""
    v = 33  # far from any tile multiple
    x = torch.ones(4, 16)
    w = -torch.ones(v, 16)  # every logit = -16
    t = torch.arange(4)
    for backend in ("torch", "triton"):
        logp, ent = fused_linear_logprobs(x, w, t, backend=backend)
        torch.testing.assert_close(logp, torch.full((4,), -torch.log(torch.tensor(33.0)).item()))
        torch.testing.assert_close(ent, torch.full((4,), torch.log(torch.tensor(33.0)).item()))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_inputs(backend):
    x, w, b, t, _ = make(10, 20, 257, bias=True)
    xt = x.float().T.contiguous().T  # column-major view
    wt = w.float().T.contiguous().T
    logp, ent = fused_linear_logprobs(xt, wt, t, bias=b.float(), backend=backend)
    want_lp, want_ent, _ = oracle(x, w, t, b)
    torch.testing.assert_close(logp.double(), want_lp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), want_ent, atol=2e-5, rtol=1e-5)
    x3 = x.float().reshape(2, 5, 20)[:, ::2]  # strided leading dims
    logp3, _ = fused_linear_logprobs(x3, w.float(), t.reshape(2, 5)[:, ::2], bias=b.float(), backend=backend)
    torch.testing.assert_close(logp3.double(), want_lp.reshape(2, 5)[:, ::2], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(backend):
    x = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    logp, ent = fused_linear_logprobs(x, w, torch.zeros(0, dtype=torch.long), backend=backend)
    assert logp.shape == (0,) and ent.shape == (0,)
    logp, ent, g = fused_linear_logprobs(
        x.reshape(2, 0, 8),
        w,
        torch.zeros(2, 0, dtype=torch.long),
        gather_ids=torch.zeros(2, 0, 3, dtype=torch.long),
        backend=backend,
    )
    assert logp.shape == (2, 0) and g.shape == (2, 0, 3)
    lp, en = logprobs_from_logits(torch.randn(0, 7), torch.zeros(0, dtype=torch.long), backend=backend)
    assert lp.shape == (0,) and en.shape == (0,)


def test_return_entropy_false():
    x, w, _, t, _ = make(5, 8, 100)
    logp, ent = fused_linear_logprobs(x.float(), w.float(), t, return_entropy=False)
    assert ent is None and logp.shape == (5,)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 20),
    h=st.integers(1, 33),
    v=st.integers(2, 300),
    temp=st.sampled_from([0.5, 1.0, 1.7]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    backend=st.sampled_from(["torch", "triton"]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes(n, h, v, temp, dtype, backend, seed):
    x, w, b, t, _ = make(n, h, v, seed=seed, bias=seed % 2 == 0, n_ignore=seed % 3 if n > 2 else 0)
    x, w = x.to(dtype).double(), w.to(dtype).double()
    b = None if b is None else b.to(dtype).double()
    got_out, got_grads = run(backend, dtype, x, w, b, t, None, temp)
    want_out, want_grads = expected(x, w, b, t, None, temp)
    assert_close(got_out, want_out, atol=1e-4, rtol=1e-4)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert_close(got_grads, want_grads, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------------------------------
# logprobs_from_logits


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_values_and_grads(backend, dtype):
    gen = torch.Generator().manual_seed(5)
    z = (torch.randn(3, 7, 1001, generator=gen) * 4).to(dtype)
    t = torch.randint(0, 1001, (3, 7), generator=gen)
    t[0, 0] = IGN
    zz = z.detach().clone().requires_grad_()
    logp, ent = logprobs_from_logits(zz, t, temperature=0.8, backend=backend)
    g1 = torch.randn(3, 7, generator=gen)
    g2 = torch.randn(3, 7, generator=gen)
    ((logp * g1).sum() + (ent * g2).sum()).backward()
    zd = z.double().requires_grad_()
    logz = torch.log_softmax(zd / 0.8, -1)
    ign = t == IGN
    want_lp = logz.gather(-1, torch.where(ign, 0, t)[..., None])[..., 0].masked_fill(ign, 0)
    want_ent = (-(logz.exp() * logz).sum(-1)).masked_fill(ign, 0)
    ((want_lp * g1.double()).sum() + (want_ent * g2.double()).sum()).backward()
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    torch.testing.assert_close(logp.double(), want_lp.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), want_ent.detach(), atol=2e-5, rtol=1e-5)
    assert zz.grad.dtype == dtype
    # fp32: the gradient carries the rounding of the fp32 log-normaliser (|lse| ~ 20 here, ulp ~ 2e-6); over 20 seeds
    # the largest error is 7e-6 on the plain-torch path and 5e-6 on the native one
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(zz.grad.double(), zd.grad, atol=tol, rtol=tol)
    assert torch.equal(zz.detach(), z)  # the caller's logits are untouched


def test_logits_non_contiguous_and_masked_vocab():
    z = torch.randn(1001, 6).T  # [6, 1001], stride along V != 1
    z[:, 500:] = float("-inf")  # a logits processor masked half the vocabulary
    t = torch.randint(0, 500, (6,))
    for backend in ("torch", "triton"):
        zz = z.detach().clone().requires_grad_()
        logp, ent = logprobs_from_logits(zz, t, backend=backend)
        (logp.sum() + ent.sum()).backward()
        logz = torch.log_softmax(z[:, :500].double(), -1)
        torch.testing.assert_close(logp.double(), logz.gather(-1, t[:, None])[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent.double(), -(logz.exp() * logz).sum(-1), atol=1e-5, rtol=1e-5)
        assert torch.isfinite(zz.grad).all() and (zz.grad[:, 500:] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# bad input


def _good():
    return torch.randn(4, 8), torch.randn(30, 8), torch.randint(0, 30, (4,))


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda x, w, t: dict(targets=t.float()), TypeError, "targets"),
        (lambda x, w, t: dict(targets=torch.tensor([0, 1, 2, 30])), ValueError, "targets"),
        (lambda x, w, t: dict(targets=torch.tensor([0, 1, -1, 3])), ValueError, "targets"),
        (lambda x, w, t: dict(targets=t[:3]), ValueError, "targets"),
        (lambda x, w, t: dict(weight=torch.randn(30, 9)), ValueError, "hidden size"),
        (lambda x, w, t: dict(weight=w.double()), TypeError, "dtype"),
        (lambda x, w, t: dict(weight=w[None]), ValueError, "weight"),
        (lambda x, w, t: dict(bias=torch.randn(29)), ValueError, "bias"),
        (lambda x, w, t: dict(temperature=0.0), ValueError, "temperature"),
        (lambda x, w, t: dict(temperature=-1.0), ValueError, "temperature"),
        (lambda x, w, t: dict(temperature=float("nan")), ValueError, "temperature"),
        (lambda x, w, t: dict(hidden=x.long()), TypeError, "hidden"),
        (lambda x, w, t: dict(gather_ids=torch.full((4, 2), 30)), ValueError, "gather_ids"),
        (lambda x, w, t: dict(gather_ids=torch.zeros(4, dtype=torch.long)), ValueError, "gather_ids"),
        (lambda x, w, t: dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_input(mutate, exc, match):
    x, w, t = _good()
    kw = dict(hidden=x, weight=w, targets=t)
    kw.update(mutate(x, w, t))
    hidden, weight, targets = kw.pop("hidden"), kw.pop("weight"), kw.pop("targets")
    with pytest.raises(exc, match=match):
        fused_linear_logprobs(hidden, weight, targets, **kw)


def test_bad_logits_input():
    with pytest.raises(ValueError, match="targets"):
        logprobs_from_logits(torch.randn(3, 10), torch.tensor([0, 10, 1]))
    with pytest.raises(ValueError, match="targets"):
        logprobs_from_logits(torch.randn(3, 10), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="logits"):
        logprobs_from_logits(torch.randint(0, 3, (3, 10)), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(torch.randn(3, 10), torch.tensor([0, 1, 2]), temperature=0)


def test_ignore_index_is_allowed_out_of_range():
    x, w, t = _good()
    t[1] = -1
    logp, ent = fused_linear_logprobs(x, w, t, ignore_index=-1)
    assert logp[1] == 0 and ent[1] == 0


def test_env_override(monkeypatch):
    monkeypatch.setenv("RLVR_KERNELS_BACKEND", "bogus")
    x, w, t = _good()
    with pytest.raises(ValueError, match="RLVR_KERNELS_BACKEND"):
        fused_linear_logprobs(x, w, t)


def test_public_api_exports():
    assert rlvr_kernels.fused_linear_logprobs is fused_linear_logprobs
    assert rlvr_kernels.logprobs_from_logits is logprobs_from_logits


# ----------------------------------------------------------------------------------------------------------------
# memory of the CPU (torch) path


MEMORY_SCRIPT = r"""
import resource, sys, torch
torch.set_num_threads(2)
from rlvr_kernels import fused_linear_logprobs
N, H, V = 4096, 256, 65536
x = torch.randn(N, H) * 0.05
w = torch.randn(V, H) * 0.05
t = torch.randint(0, V, (N,))
x.requires_grad_(); w.requires_grad_()
# gradients are outputs of the computation, allocate them up front so that they count as inputs
x.grad = torch.zeros_like(x); w.grad = torch.zeros_like(w)
fused_linear_logprobs(x[:8], w[:1024], t[:8] % 1024, backend="torch")  # warm up allocator and kernels
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
logp, ent = fused_linear_logprobs(x, w, t, backend="torch")
(logp.sum() + 0.1 * ent.sum()).backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) / 1024.0)
"""


@pytest.mark.slow
def test_torch_path_memory_is_o_n_plus_chunk_v(tmp_path):
    """fwd+bwd at N=4096, H=256, V=65536 fp32 adds well under a quarter of the 1 GiB the logits would take."""
    import subprocess
    import sys

    script = tmp_path / "mem.py"
    script.write_text(MEMORY_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    extra_mib = float(out.stdout.strip().splitlines()[-1])
    assert extra_mib < 256, f"torch path added {extra_mib:.0f} MiB"


def test_reference_chunking_does_not_change_results():
    x, w, b, t, ids = make(50, 12, 97, bias=True, k=2)
    full = ref_mod.linear_logprobs(x, w, t, bias=b, gather_ids=ids, chunk_size=1000)
    small = ref_mod.linear_logprobs(x, w, t, bias=b, gather_ids=ids, chunk_size=7)
    for a, c in zip(full, small):
        torch.testing.assert_close(a, c, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_minus_inf_bias_masks_vocabulary_entries(backend):
    """A -inf bias entry (a masked-out vocabulary id) gets p = 0 and adds nothing to the entropy or gradients."""
    x, w, b, t, _ = make(9, 12, 70, seed=5, bias=True)
    b[10:25] = float("-inf")
    b[40] = float("-inf")
    t = torch.where((t >= 10) & (t < 25) | (t == 40), 0, t)
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    z = (xx @ ww.T + b) / 0.8
    logz = torch.log_softmax(z, -1)
    logp = logz.gather(-1, t[:, None])[:, 0]
    ent = -(logz.exp() * torch.where(torch.isfinite(logz), logz, 0.0)).sum(-1)
    gen = torch.Generator().manual_seed(2)
    g1, g2 = torch.randn(9, generator=gen, dtype=torch.float64), torch.randn(9, generator=gen, dtype=torch.float64)
    ((logp * g1).sum() + (ent * g2).sum()).backward()
    x32, w32 = x.float().requires_grad_(), w.float().requires_grad_()
    lp, en = fused_linear_logprobs(x32, w32, t, bias=b.float(), temperature=0.8, backend=backend)
    ((lp.double() * g1).sum() + (en.double() * g2).sum()).backward()
    for got, want in ((lp, logp), (en, ent), (x32.grad, xx.grad), (w32.grad, ww.grad)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want.detach(), atol=2e-5, rtol=1e-4)


# Regressions from the kernel review (2026-12): -inf logits a lane/tile/split sees first, strided 1-D inputs, and
# ignored rows of -inf logits. The interpreter shows all of them (they also held on GPU).


def _logits_oracle(z, t, temperature=1.0):
    """float64 logp, entropy and d(sum logp + sum entropy)/dz; -inf logits have p = 0; ignored rows give 0."""
    zz = z.detach().double().requires_grad_()
    logz = torch.log_softmax(zz / temperature, -1)
    ign = t == IGN
    tt = torch.where(ign, 0, t)
    lp = logz.gather(-1, tt[:, None])[:, 0].masked_fill(ign, 0.0)
    ent = (-(logz.exp() * torch.where(torch.isfinite(logz), logz, 0.0)).sum(-1)).masked_fill(ign, 0.0)
    (lp.sum() + ent.sum()).backward()
    return lp.detach(), ent.detach(), zz.grad.nan_to_num(0.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_minus_inf_first_in_block_and_ignored_minus_inf_row(backend):
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(6, 300, generator=gen) * 2
    z[:, :70] = float("-inf")  # the first blocks of every lane: -inf - -inf must not become NaN
    z[:, 150:230] = float("-inf")
    t = torch.randint(70, 150, (6,), generator=gen)
    z[4] = float("-inf")  # an ignored row of -inf logits: zero gradient, not NaN
    t[4] = IGN
    zz = z.clone().requires_grad_()
    lp, ent = logprobs_from_logits(zz, t, temperature=0.9, backend=backend)
    (lp.sum() + ent.sum()).backward()
    want = _logits_oracle(z, t, 0.9)
    for got, exp in zip((lp, ent, zz.grad), want):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), exp, atol=1e-5, rtol=1e-4)
    assert torch.count_nonzero(zz.grad[4]) == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("chunk_bytes", [None, 10 * 256 * 4])
def test_linear_minus_inf_bias_over_whole_tiles_and_blocks(backend, chunk_bytes, monkeypatch):
    """-inf bias over whole row tiles and (with a small chunk budget) over whole backward vocabulary blocks."""
    if chunk_bytes is not None:
        monkeypatch.setenv("RLVR_KERNELS_CHUNK_BYTES", str(chunk_bytes))
    x, w, b, t, _ = make(10, 16, 700, seed=12, bias=True)
    b[:160] = float("-inf")  # whole tiles first in a row, and (small budget) the first vocabulary block
    b[400:650] = float("-inf")
    t = torch.randint(160, 400, (10,), generator=torch.Generator().manual_seed(1))
    xx, ww = x.float().requires_grad_(), w.float().requires_grad_()
    lp, ent = fused_linear_logprobs(xx, ww, t, bias=b.float(), backend=backend)
    (lp.sum() + ent.sum()).backward()
    xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
    logz = torch.log_softmax(xo @ wo.T + b, -1)
    lp_o = logz.gather(-1, t[:, None])[:, 0]
    ent_o = -(logz.exp() * torch.where(torch.isfinite(logz), logz, 0.0)).sum(-1)
    (lp_o.sum() + ent_o.sum()).backward()
    for got, exp in ((lp, lp_o), (ent, ent_o), (xx.grad, xo.grad), (ww.grad, wo.grad)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), exp.detach(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_targets_and_bias(backend):
    x, w, b, _, _ = make(9, 12, 130, seed=13)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 130, (9, 3), generator=gen)
    b2 = torch.randn(260, generator=gen, dtype=torch.float64)[::2]  # a strided bias view
    lp, ent = fused_linear_logprobs(x.float(), w.float(), ids[:, 1], bias=b2.float(), backend=backend)
    want = oracle(x, w, ids[:, 1].contiguous(), b2.contiguous())
    torch.testing.assert_close(lp.double(), want[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ent.double(), want[1], atol=2e-5, rtol=1e-4)
    z = (x @ w.T).float()
    lp2, _ = logprobs_from_logits(z, ids[:, 2], backend=backend)
    torch.testing.assert_close(
        lp2.double(), torch.log_softmax(z.double(), -1).gather(1, ids[:, 2:3])[:, 0], atol=2e-5, rtol=1e-4
    )


_COMPILE_SCRIPT = r"""
import json, os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlvr_kernels.kernels import logprobs as K

target = GPUTarget("cuda", 90, 32)
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def usage(k):
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    return {key: int(val) for key, val in re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", text)}


out = []
for block in K.ROW_BLOCKS:  # every BLOCK_V the launchers pick on a GPU, with their warp count
    warps = K.row_warps(block)
    for z in ("*fp32", "*bf16"):  # fp32: the GEMM's logits; bf16: logits a model produced
        sig = {"Z": z, "Tgt": "*i64", "Logp": "*fp32", "Ent": "*fp32", "Lse": "*fp32", "N": "i32", "V": "i32",
               "stride_zn": "i64", "inv_temp": "fp32", "ignore_index": "i64", "BLOCK_V": "constexpr"}
        k = triton.compile(ASTSource(fn=K._logits_fwd_kernel, signature=sig, constexprs={"BLOCK_V": block}),
                           target=target, options=dict(num_warps=warps))
        out.append(("fwd", z, "-", block, warps, usage(k)))
        for dz in ("*bf16", "*fp32"):
            sig = {"Z": z, "Tgt": "*i64", "Lse": "*fp32", "Ent": "*fp32", "GL": "*fp32", "GH": "*fp32", "CP": "*fp32",
                   "DZ": dz, "N": "i32", "V": "i32", "stride_zn": "i64", "stride_dzn": "i64", "col_offset": "i64",
                   "inv_temp": "fp32", "ignore_index": "i64", "HAS_GH": "constexpr", "BLOCK_V": "constexpr"}
            k = triton.compile(ASTSource(fn=K._logits_bwd_kernel, signature=sig,
                                         constexprs={"HAS_GH": True, "BLOCK_V": block}),
                               target=target, options=dict(num_warps=warps))
            out.append(("bwd", z, dz, block, warps, usage(k)))
print(json.dumps(out))
"""


def test_row_kernels_compile_for_sm90_without_spills(tmp_path):
    """Every row-pass kernel configuration the launchers can pick compiles for an H100/H200 (sm_90) down to a cubin
    with Triton's bundled toolchain, with no register spills (no local memory, no stack): the resource usage of
    each cubin is read with the bundled cuobjdump and printed (registers per thread)."""
    import json
    import os
    import subprocess
    import sys

    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(bin_dir, b)) for b in ("ptxas", "cuobjdump")):
        pytest.skip("triton's bundled ptxas / cuobjdump are not available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    from rlvr_kernels.kernels import logprobs as K

    assert len(rows) == 6 * len(K.ROW_BLOCKS)
    for kind, z, dz, block, warps, use in rows:
        print(kind, z, dz, f"BLOCK_V={block}", f"warps={warps}", use)
        assert use.get("REG", 0) > 0, (kind, z, dz, block)
        assert use.get("LOCAL", 0) == 0 and use.get("STACK", 0) == 0, ("spills", kind, z, dz, block, use)
