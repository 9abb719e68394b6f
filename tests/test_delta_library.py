"""DelTA as PyTorch custom ops (namespace ``rlvr_kernels``): opcheck of every op, ``torch.compile(fullgraph=True)``
of ``delta_coefficients`` and of the ``DeltaEstimator`` methods with zero graph breaks and the eager numbers, the
native CPU kernels (``csrc/delta_sweeps.cpp``) against the plain-torch reference, and the fallback without them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rlvr_kernels as rk
from rlvr_kernels import _native
from rlvr_kernels.cpu import delta_sweeps as cpu
from rlvr_kernels.layout import cu_seqlens_from_lengths, padded_to_packed
from rlvr_kernels.reference import delta as ref

BACKENDS = ("torch", "triton")
OPS = torch.ops.rlvr_kernels


def _batch(lengths=(7, 12, 0, 1, 9), T=13, H=24, seed=0, dtype=torch.float32):
    """Padded batch, NaN in the padding of hidden and old_logp, one zero advantage."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    adv = torch.randn(B, generator=g)
    adv[1] = 0.0
    direction = torch.randn(H, generator=g)
    hidden = torch.randn(B, T, H, generator=g) + 0.7 * torch.sign(adv)[:, None, None] * direction
    old_logp = torch.log(torch.rand(B, T, generator=g) * 0.94 + 0.05)
    hidden = hidden.masked_fill(~mask[..., None], float("nan")).to(dtype)
    old_logp = old_logp.masked_fill(~mask, float("nan"))
    return hidden, old_logp, adv, mask, torch.tensor(lengths)


def _packed(hidden, old_logp, adv, mask, lengths):
    cu = cu_seqlens_from_lengths(lengths)
    return padded_to_packed(hidden, cu), padded_to_packed(old_logp, cu), adv, padded_to_packed(mask, cu), cu


def _no_graph_breaks(fn, *args):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _native_or_skip():
    if not _native.load("delta_sweeps"):
        pytest.skip(f"native CPU kernels unavailable: {_native.state().get('delta_sweeps')}")


# ----------------------------------------------------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_delta_coefficients(backend):
    hidden, lp, adv, mask, lengths = _batch()
    op = OPS.delta_coefficients.default
    torch.library.opcheck(op, (hidden, lp, adv, mask, None, 1, 0.8, 1.2, 1e-8, False, backend))
    ph, plp, padv, pmask, cu = _packed(hidden, lp, adv, mask, lengths)
    tok_adv = torch.randn(pmask.shape, generator=torch.Generator().manual_seed(1))
    torch.library.opcheck(op, (ph, plp, tok_adv, pmask, cu, 2, 0.5, 2.0, 1e-8, True, backend))
    torch.library.opcheck(op, (ph, plp, padv, pmask, cu, 0, 1.0, 1.0, 1e-8, False, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_estimator_ops(backend):
    hidden, lp, adv, mask, _ = _batch(seed=2)
    H = hidden.shape[-1]
    est = rk.DeltaEstimator(iters=1, backend=backend)
    states = {}
    for phase in est.phases():
        states[phase] = (est.mu, est.gamma)
        est.accumulate(hidden, lp, adv, mask)
    for phase, (mu, gamma) in states.items():
        kind = "refine" if phase.startswith("refine") else phase
        args = (hidden, lp, adv, mask, None, mu, gamma, kind, 0.8, 1.2, False, backend)
        torch.library.opcheck(OPS.delta_phase_stats.default, args)
    g = torch.Generator().manual_seed(3)
    torch.library.opcheck(
        OPS.delta_centroids.default, (torch.randn(2, H, generator=g, dtype=torch.float64), torch.rand(2).double(), 1e-8)
    )
    args = (hidden, lp, adv, mask, None, est.mu, est.gamma, est._norm, 0.8, 1.2, 1e-8, False, backend)
    torch.library.opcheck(OPS.delta_estimator_coefficients.default, args)
    none = (hidden, lp, adv, mask, None, None, None, None, 1.0, 1.0, 1e-8, False, backend)
    torch.library.opcheck(OPS.delta_estimator_coefficients.default, none)
    raw = torch.rand(mask.shape, generator=g) + 0.8
    for norm in (est._norm, None):
        torch.library.opcheck(OPS.delta_normalise.default, (raw, adv, mask, None, norm, 1e-8, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_sweep_ops(dtype):
    hidden, lp, adv, mask, _ = _batch(seed=4, dtype=dtype)
    h, valid = hidden.reshape(-1, hidden.shape[-1]), mask.reshape(-1)
    s, a = ref.per_token_scalars(lp.reshape(-1), adv[:, None].expand(mask.shape).reshape(-1), valid)
    g = torch.Generator().manual_seed(5)
    torch.library.opcheck(OPS.delta_rowdot.default, (h, torch.randn(2, h.shape[1], generator=g), valid))
    torch.library.opcheck(OPS.delta_colsum.default, (h, torch.randn(h.shape[0], 2, generator=g), valid))
    torch.library.opcheck(OPS.delta_flat_coefficients.default, (h, s, a, valid, 2, 0.8, 1.2, 1e-8, False))
    flat_adv = adv[:, None].expand(mask.shape).reshape(-1).contiguous()
    torch.library.opcheck(OPS.delta_token_scalars.default, (lp.reshape(-1).contiguous(), flat_adv, valid))


# ----------------------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): one graph, the eager numbers
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_coefficients_compiles_fullgraph(backend):
    hidden, lp, adv, mask, lengths = _batch(seed=6)

    def f(hidden, lp, adv):
        c = rk.delta_coefficients(hidden, lp, adv, mask, iters=2, backend=backend)
        return c * adv[:, None]  # what a loss does with it: A c~

    _no_graph_breaks(f, hidden, lp, adv)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(hidden, lp, adv), f(hidden, lp, adv))
    ph, plp, padv, pmask, cu = _packed(hidden, lp, adv, mask, lengths)

    def g(ph, plp):
        return rk.delta_coefficients(ph, plp, padv, pmask, cu_seqlens=cu, exclude_zero_adv=True, backend=backend)

    _no_graph_breaks(g, ph, plp)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(g, fullgraph=True)(ph, plp), g(ph, plp))


def test_compiled_delta_still_checks_values_and_structure():
    """Value checks run inside the op (the same ValueError compiled as eager); structure checks at trace time."""
    hidden, lp, adv, mask, _ = _batch(seed=7)
    bad = hidden.clone()
    bad[0, 1, 3] = float("inf")

    def f(hidden):
        return rk.delta_coefficients(hidden, lp, adv, mask, backend="torch")

    torch._dynamo.reset()
    with pytest.raises(ValueError, match="hidden_old has non-finite"):
        torch.compile(f, fullgraph=True)(bad)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="hidden_old must be"):  # raised while tracing, then again in eager
        torch.compile(f)(hidden[:, :-1])
    torch._dynamo.reset()
    with pytest.raises(Exception, match="hidden_old must be"):  # fullgraph: dynamo reports the trace-time error
        torch.compile(f, fullgraph=True)(hidden[:, :-1])
    bad_lp = lp.clone()
    bad_lp[0, 0] = float("nan")
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="old_logp has non-finite"):
        torch.compile(lambda lp: rk.delta_coefficients(hidden, lp, adv, mask), fullgraph=True)(bad_lp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_estimator_methods_compile_fullgraph(backend):
    """The methods a training loop calls, compiled: accumulate + finish_phase per phase, then coefficients and
    normalise; one graph each, the eager estimator's state and numbers."""
    hidden, lp, adv, mask, _ = _batch(seed=8)
    eager = rk.DeltaEstimator(iters=2, exclude_zero_adv=True, backend=backend)
    for _ in eager.phases():
        raw_e = eager.accumulate(hidden, lp, adv, mask)
    want = eager.coefficients(hidden, lp, adv, mask)

    est = rk.DeltaEstimator(iters=2, exclude_zero_adv=True, backend=backend)

    def phase_step(hidden, lp, adv):
        raw = est.accumulate(hidden, lp, adv, mask)
        est.finish_phase()
        return raw

    torch._dynamo.reset()
    probe = rk.DeltaEstimator(iters=2, backend=backend)  # explain() runs the function: keep est untouched
    explanation = torch._dynamo.explain(lambda h, lp, a: (probe.accumulate(h, lp, a, mask), probe.finish_phase()))(
        hidden, lp, adv
    )
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    step = torch.compile(phase_step, fullgraph=True)
    raw = None
    while not est.done:
        raw = step(hidden, lp, adv)
    torch.testing.assert_close(est.mu, eager.mu)
    torch.testing.assert_close(est.gamma, eager.gamma)
    torch.testing.assert_close(raw, raw_e)

    def coef(hidden, lp, adv):
        return est.coefficients(hidden, lp, adv, mask)

    def norm(raw, adv):
        return est.normalise(raw, adv, mask)

    _no_graph_breaks(coef, hidden, lp, adv)
    _no_graph_breaks(norm, raw, adv)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(coef, fullgraph=True)(hidden, lp, adv), want)
    torch.testing.assert_close(torch.compile(norm, fullgraph=True)(raw, adv), want)


# ----------------------------------------------------------------------------------------------------------------------
# native kernels vs the plain-torch reference
# ----------------------------------------------------------------------------------------------------------------------
def _flat(dtype, seed, N=300, H=37, zero_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(N, generator=g) > 0.2
    adv = torch.randn(N, generator=g)
    adv[torch.rand(N, generator=g) < zero_frac] = 0.0
    h = torch.randn(N, H, generator=g) + 0.5 * torch.sign(adv)[:, None] * torch.randn(H, generator=g)
    h = h.masked_fill(~valid[:, None], float("nan")).to(dtype)
    s, a = ref.per_token_scalars(torch.log(torch.rand(N, generator=g) * 0.9 + 0.05), adv, valid)
    return h, s, a, valid


def _reference(h, s, a, valid, **kw):
    """The reference one-shot with the op's status convention."""
    try:
        return ref.delta_coefficients_flat(h, s, a, valid, check=cpu._reference_check, **kw), 0
    except cpu._Stop as stop:
        return torch.zeros(h.shape[0]), stop.code


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("iters,exclude", [(0, False), (1, False), (3, True)])
def test_native_one_shot_matches_reference(dtype, iters, exclude):
    _native_or_skip()
    for seed, H in ((0, 37), (1, 256), (2, 1)):
        h, s, a, valid = _flat(dtype, seed, H=H)
        kw = dict(iters=iters, lam_min=0.6, lam_max=1.5, eps=1e-8, exclude_zero_adv=exclude)
        got, status = cpu.flat_coefficients(h, s, a, valid, **kw)
        want, want_status = _reference(h, s, a, valid, **kw)
        assert status == want_status == 0
        torch.testing.assert_close(got, want, atol=3e-6, rtol=3e-6)  # fp32 rounding (accumulation order)
        assert (got[~valid] == 0).all()


def test_native_sweeps_match_reference():
    _native_or_skip()
    g = torch.Generator().manual_seed(8)
    lp = torch.cat([torch.tensor([0.0, 1e-7, 3.0, -1e-9, -float("inf"), float("nan")]), -torch.rand(200, generator=g)])
    valid = torch.ones(lp.shape, dtype=torch.bool)
    valid[5] = False  # NaN where invalid never reaches the result
    adv = torch.randn(lp.shape, generator=g)
    got, want = cpu.token_scalars(lp, adv, valid), ref.per_token_scalars(lp, adv, valid)
    torch.testing.assert_close(got, want, atol=0, rtol=2e-7)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        h, _, _, valid = _flat(dtype, 3, N=200, H=70)
        wide = torch.zeros(200, 140, dtype=dtype)
        wide[:, ::2] = h
        strided = wide[:, ::2]  # non-contiguous columns: the wrapper copies
        rowstride = torch.cat([h, h], 1)[:, :70]  # contiguous rows with a row stride of 140
        g = torch.Generator().manual_seed(4)
        mu, w = torch.randn(2, 70, generator=g), torch.randn(200, 2, generator=g)
        for x in (h, strided, rowstride):
            torch.testing.assert_close(cpu.rowdot(x, mu, valid), ref.rowdot3(h, mu, valid), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cpu.colsum(x, w, valid), ref.colsum2(h, w, valid), atol=1e-4, rtol=1e-5)
    empty = torch.zeros(0, 5)
    assert cpu.rowdot(empty, torch.zeros(2, 5), torch.zeros(0, dtype=torch.bool)).shape == (0, 2)
    assert torch.equal(cpu.colsum(empty, torch.zeros(0, 2), torch.zeros(0, dtype=torch.bool)), torch.zeros(2, 5))


def test_native_status_codes_match_reference():
    """Non-finite hidden states, advantage sums beyond fp32 and squared distances beyond fp32 stop the estimate with
    the reference's status (the public op turns it into its ValueError)."""
    _native_or_skip()
    h, s, a, valid = _flat(torch.float32, 5)
    i = int(valid.nonzero()[0])
    inf_h = h.clone()
    inf_h[i, 2] = float("inf")
    big_a = torch.where(valid, a.sign() * 3e38, 0.0)
    cases = {2: (inf_h, s, a), 1: (h, s, big_a), 3: (h * 1e19, s, a)}
    for code, (hh, ss, aa) in cases.items():
        kw = dict(iters=1, lam_min=0.8, lam_max=1.2, eps=1e-8, exclude_zero_adv=False)
        got, status = cpu.flat_coefficients(hh, ss, aa, valid, **kw)
        want, want_status = _reference(hh, ss, aa, valid, **kw)
        assert status == want_status == code, cpu.STATUS[code]
        assert torch.equal(got, want)


def test_native_colsum_independent_of_thread_count():
    """colsum sums fixed row chunks in a fixed order: the same bits with one thread or several."""
    _native_or_skip()
    h, _, _, valid = _flat(torch.float32, 6, N=20000, H=256)  # > 2**22 elements: several chunks
    w = torch.randn(20000, 2, generator=torch.Generator().manual_seed(7))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.colsum(h, w, valid)
        rows_one = cpu.rowdot(h, one, valid)
        torch.set_num_threads(max(2, before))
        assert torch.equal(cpu.colsum(h, w, valid), one)
        assert torch.equal(cpu.rowdot(h, one, valid), rows_one)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, ref.colsum2(h, w, valid), atol=2e-3, rtol=1e-5)


def test_public_op_uses_native_on_cpu():
    _native_or_skip()
    hidden, lp, adv, mask, _ = _batch(seed=9, H=64)
    got = rk.delta_coefficients(hidden, lp, adv, mask, iters=2, backend="torch")
    want = rk.delta_coefficients(hidden, lp, adv, mask, iters=2, backend="triton")  # the reference driver
    torch.testing.assert_close(got, want, atol=3e-6, rtol=3e-6)
    assert _native.state()["delta_sweeps"] == "loaded"


# ----------------------------------------------------------------------------------------------------------------------
# fallback: without the native kernels (no compiler, or RLVR_KERNELS_NATIVE=0) the ops run the reference
# ----------------------------------------------------------------------------------------------------------------------
_FALLBACK = textwrap.dedent(
    """
    import sys, torch
    import rlvr_kernels as rk
    from rlvr_kernels import _native
    sys.path.insert(0, sys.argv[2])
    from test_delta_library import _batch, _flat
    from rlvr_kernels.cpu import delta_sweeps as cpu

    hidden, lp, adv, mask, _ = _batch(seed=10)
    out = {"one_shot": rk.delta_coefficients(hidden, lp, adv, mask, iters=2, backend="torch")}
    h, s, a, valid = _flat(torch.float32, 11)
    out["flat"], out["status"] = cpu.flat_coefficients(h, s, a, valid, iters=1, lam_min=0.8, lam_max=1.2, eps=1e-8,
                                                       exclude_zero_adv=False)
    mu = torch.randn(2, h.shape[1], generator=torch.Generator().manual_seed(1))
    out["rowdot"] = cpu.rowdot(h, mu, valid)
    try:
        bad = hidden.clone(); bad[0, 1, 3] = float("inf")
        rk.delta_coefficients(bad, lp, adv, mask, backend="torch")
    except ValueError as e:
        out["error"] = str(e)
    out["state"] = _native.state()["delta_sweeps"]
    torch.save(out, sys.argv[1])
    """
)


def test_fallback_without_native_kernels(tmp_path):
    path = tmp_path / "fallback.pt"
    env = dict(os.environ, RLVR_KERNELS_NATIVE="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, "-c", _FALLBACK, str(path), os.path.join(root, "tests")],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = torch.load(path)
    assert out["state"] == "disabled"
    assert "hidden_old has non-finite" in out["error"]
    hidden, lp, adv, mask, _ = _batch(seed=10)
    torch.testing.assert_close(
        out["one_shot"], rk.delta_coefficients(hidden, lp, adv, mask, iters=2, backend="triton"), atol=3e-6, rtol=3e-6
    )
    h, s, a, valid = _flat(torch.float32, 11)
    want, status = _reference(h, s, a, valid, iters=1, lam_min=0.8, lam_max=1.2, eps=1e-8, exclude_zero_adv=False)
    assert out["status"] == status == 0
    assert torch.equal(out["flat"], want)  # the fallback is the reference itself
    if _native.load("delta_sweeps"):  # and the native kernels agree with it
        got, _ = cpu.flat_coefficients(
            h, s, a, valid, iters=1, lam_min=0.8, lam_max=1.2, eps=1e-8, exclude_zero_adv=False
        )
        torch.testing.assert_close(got, out["flat"], atol=3e-6, rtol=3e-6)
        mu = torch.randn(2, h.shape[1], generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(cpu.rowdot(h, mu, valid), out["rowdot"], atol=1e-5, rtol=1e-5)
