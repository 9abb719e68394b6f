"""Options of the log-prob ops: a temperature per token (a tensor of ``targets``' shape) on both backends, forward and
backward against float64 autograd on the full logits, through the custom ops and ``torch.compile(fullgraph=True)``."""

from __future__ import annotations

import pytest
import torch

import rlvr_kernels  # noqa: F401  (registers the ops)
from rlvr_kernels import fused_linear_logprobs, logprobs_from_logits

BACKENDS = ["torch", "triton"]
IGN = -100


def _inputs(seed=0, n=10, h=16, v=40):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * 0.3
    b = torch.randn(v, generator=g) * 0.1
    t = torch.randint(0, v, (n,), generator=g)
    temp = torch.rand(n, generator=g) * 1.5 + 0.3
    ids = torch.randint(0, v, (n, 3), generator=g)
    t[2] = IGN
    t[7] = IGN
    x[2] = float("nan")  # padding rows may hold anything, their temperature too
    temp[2] = 0.0
    temp[7] = float("nan")
    return x, w, b, t, temp, ids


def _reference(x, w, b, t, temp, ids, head_dtype=None):
    """float64 autograd on the full logits; ignored rows' hidden state and temperature neutralised."""
    keep = t != IGN
    xd = torch.where(keep[:, None], x.double(), 0.0).requires_grad_()
    wd = w.double().requires_grad_()
    bd = b.double().requires_grad_()
    td = torch.where(keep, temp.double(), 1.0)
    logp_all = ((xd @ wd.T + bd) / td[:, None]).log_softmax(-1)
    k = keep.double()
    lp = logp_all.gather(1, t.clamp_min(0)[:, None])[:, 0] * k
    ent = -(logp_all.exp() * logp_all).sum(-1) * k
    gath = logp_all.gather(1, ids) * k[:, None]
    (1.3 * lp.sum() + 0.7 * ent.sum() + 0.5 * gath.sum()).backward()
    return lp, ent, gath, xd.grad, wd.grad, bd.grad


def _close(got, want, tol):
    got, want = got.detach(), want.detach()
    scale = max(1.0, float(want.abs().max()))
    err = float((got.double() - want).abs().max())
    assert err <= tol * scale, (err, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_temperature_linear(backend, dtype):
    x, w, b, t, temp, ids = _inputs()
    x, w, b = (u.to(dtype) for u in (x, w, b))
    leaves = [u.clone().requires_grad_() for u in (x, w, b)]
    lp, ent, gath = fused_linear_logprobs(
        *leaves[:2], t, bias=leaves[2], temperature=temp, gather_ids=ids, backend=backend
    )
    (1.3 * lp.sum() + 0.7 * ent.sum() + 0.5 * gath.sum()).backward()
    want = _reference(x, w, b, t, temp, ids)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, ref in zip((lp, ent, gath), want[:3]):
        assert got.dtype == torch.float32
        _close(got, ref, 1e-5)
    for leaf, ref in zip(leaves, want[3:]):
        assert leaf.grad.dtype == dtype
        assert torch.isfinite(leaf.grad).all()
        _close(leaf.grad, ref, tol)
    assert float(lp[2]) == 0.0 and float(ent[7]) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_temperature_matches_scalar(backend):
    """A constant tensor gives the scalar temperature's numbers; leading dimensions are kept."""
    x, w, b, t, _, ids = _inputs(1)
    x[2] = 0.0
    xs, ts, idss = x.reshape(2, 5, -1), t.reshape(2, 5), ids.reshape(2, 5, 3)
    a = fused_linear_logprobs(xs, w, ts, bias=b, temperature=0.7, gather_ids=idss, backend=backend)
    c = fused_linear_logprobs(xs, w, ts, bias=b, temperature=torch.full((2, 5), 0.7), gather_ids=idss, backend=backend)
    for u, e in zip(a, c):
        assert u.shape == e.shape
        torch.testing.assert_close(u, e)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_temperature_logits(backend, dtype):
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(2, 6, 50, generator=g) * 3).to(dtype)
    t = torch.randint(0, 50, (2, 6), generator=g)
    temp = torch.rand(2, 6, generator=g) + 0.4
    t[1, 4:] = IGN
    z[1, 5] = float("nan")
    temp[1, 4] = -1.0
    zc = z.clone().requires_grad_()
    lp, ent = logprobs_from_logits(zc, t, temperature=temp, backend=backend)
    (lp.sum() - 0.3 * ent.sum()).backward()
    keep = t != IGN
    zd = torch.where(keep[..., None], z.double(), 0.0).requires_grad_()
    la = (zd / torch.where(keep, temp.double(), 1.0)[..., None]).log_softmax(-1)
    k = keep.double()
    lpd = la.gather(-1, t.clamp_min(0)[..., None])[..., 0] * k
    entd = -(la.exp() * la).sum(-1) * k
    (lpd.sum() - 0.3 * entd.sum()).backward()
    _close(lp, lpd, 1e-5)
    _close(ent, entd, 1e-5)
    assert zc.grad.dtype == dtype
    assert torch.isfinite(zc.grad).all()
    _close(zc.grad, zd.grad, 1e-5 if dtype == torch.float32 else 1e-2)


def test_per_token_temperature_float64():
    backend = "torch"  # float64 runs on the torch backend only
    x, w, b, t, temp, ids = _inputs(4)
    leaves = [u.double().clone().requires_grad_() for u in (x, w, b)]
    lp, ent, gath = fused_linear_logprobs(
        *leaves[:2], t, bias=leaves[2], temperature=temp.double(), gather_ids=ids, backend=backend
    )
    (1.3 * lp.sum() + 0.7 * ent.sum() + 0.5 * gath.sum()).backward()
    want = _reference(x.double(), w.double(), b.double(), t, temp.double(), ids)
    for got, ref in zip((lp, ent, gath, *(u.grad for u in leaves)), want):
        _close(got, ref, 1e-10)


def test_per_token_temperature_checks():
    x, w, b, t, temp, _ = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprobs(x, w, t, temperature=torch.ones(3))
    with pytest.raises(TypeError, match="temperature"):
        fused_linear_logprobs(x, w, t, temperature=torch.ones(t.shape, dtype=torch.int64))
    for bad in (0.0, -1.0, float("inf"), float("nan"), 1e-40):
        tt = temp.clone()
        tt[4] = bad
        with pytest.raises(ValueError, match="temperature .* row 4"):
            fused_linear_logprobs(x, w, t, temperature=tt, backend="torch")
        with pytest.raises(ValueError, match="temperature .* row 4"):
            logprobs_from_logits(torch.randn(10, 7), t.clamp_max(6), temperature=tt, backend="torch")
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(torch.randn(10, 7), t.clamp_max(6), temperature=torch.ones(2, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_temperature_compiles_fullgraph(backend):
    x, w, b, t, temp, ids = _inputs(5)
    x[2] = 0.0

    def f(x, w, b, temp):
        lp, ent, gath = fused_linear_logprobs(x, w, t, bias=b, temperature=temp, gather_ids=ids, backend=backend)
        lz, ez = logprobs_from_logits(x @ w.T, t, temperature=temp, backend=backend)
        return (lp * 2.0).sum() + (ent * 0.5).sum() + gath.sum() + lz.sum() - 0.1 * ez.sum()

    leaves_c = [u.clone().requires_grad_() for u in (x, w, b)]
    leaves_e = [u.clone().requires_grad_() for u in (x, w, b)]
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(*leaves_c, temp)
    got.backward()
    want = f(*leaves_e, temp)
    want.backward()
    torch.testing.assert_close(got, want)
    for a, e in zip(leaves_c, leaves_e):
        torch.testing.assert_close(a.grad, e.grad)


# ----------------------------------------------------------------------------------------------------------------
# head_dtype=torch.float32: an fp32 lm_head (TRL's cast_lm_head_to_fp32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_token", [False, True])
def test_fp32_head(backend, per_token):
    x, w, b, t, temp, ids = _inputs(6, n=12, h=32, v=64)
    x, w, b = (u.to(torch.bfloat16) for u in (x, w, b))
    temperature = temp if per_token else 0.8
    leaves = [u.clone().requires_grad_() for u in (x, w, b)]
    lp, ent, gath = fused_linear_logprobs(
        *leaves[:2], t, bias=leaves[2], temperature=temperature, gather_ids=ids, backend=backend,
        head_dtype=torch.float32,
    )  # fmt: skip
    (1.3 * lp.sum() + 0.7 * ent.sum() + 0.5 * gath.sum()).backward()
    want = _reference(x, w, b, t, temp if per_token else torch.full_like(temp, 0.8), ids)
    for got, ref in zip((lp, ent, gath), want[:3]):
        _close(got, ref, 1e-5)
    for leaf, ref in zip(leaves, want[3:]):
        assert leaf.grad.dtype == torch.bfloat16
        assert torch.isfinite(leaf.grad).all()
        # fp32 gradient GEMMs: only the final rounding to bf16 (2^-8 relative) is left
        err = (leaf.grad.double() - ref).abs()
        assert bool((err <= 2.0**-8 * ref.abs() + 1e-5 * max(1.0, float(ref.abs().max()))).all()), float(err.max())


def test_fp32_head_checks():
    x, w, _, t, _, _ = _inputs()
    with pytest.raises(ValueError, match="head_dtype"):
        fused_linear_logprobs(x, w, t, head_dtype=torch.float16)


def test_fp32_head_compiles_fullgraph():
    x, w, b, t, temp, _ = _inputs(7)
    x[2] = 0.0
    x, w, b = (u.to(torch.bfloat16) for u in (x, w, b))

    def f(x, w, b):
        lp, ent = fused_linear_logprobs(x, w, t, bias=b, temperature=temp, backend="triton", head_dtype=torch.float32)
        return lp.sum() + 0.5 * ent.sum()

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


_COMPILE_ROWT = r"""
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
for block in K.ROW_BLOCKS:
    warps = K.row_warps(block)
    for z in ("*fp32", "*bf16"):
        sig = {"Z": z, "Tgt": "*i64", "Logp": "*fp32", "Ent": "*fp32", "Lse": "*fp32", "N": "i32", "V": "i32",
               "stride_zn": "i64", "InvT": "*fp32", "ignore_index": "i64", "BLOCK_V": "constexpr"}
        k = triton.compile(ASTSource(fn=K._logits_fwd_rowt_kernel, signature=sig, constexprs={"BLOCK_V": block}),
                           target=target, options=dict(num_warps=warps))
        out.append(("fwd", z, block, usage(k)))
        sig = {"Z": z, "Tgt": "*i64", "Lse": "*fp32", "Ent": "*fp32", "GL": "*fp32", "GH": "*fp32", "CP": "*fp32",
               "DZ": "*bf16", "N": "i32", "V": "i32", "stride_zn": "i64", "stride_dzn": "i64", "col_offset": "i64",
               "InvT": "*fp32", "ignore_index": "i64", "HAS_GH": "constexpr", "BLOCK_V": "constexpr"}
        k = triton.compile(ASTSource(fn=K._logits_bwd_rowt_kernel, signature=sig,
                                     constexprs={"HAS_GH": True, "BLOCK_V": block}),
                           target=target, options=dict(num_warps=warps))
        out.append(("bwd", z, block, usage(k)))
print(json.dumps(out))
"""


def test_per_row_temperature_kernels_compile_for_sm90_without_spills(tmp_path):
    """The per-row-temperature row kernels compile for sm_90 (Triton's bundled toolchain) without register spills."""
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
    r = subprocess.run([sys.executable, "-c", _COMPILE_ROWT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for kind, z, block, use in json.loads(r.stdout.strip().splitlines()[-1]):
        assert use.get("REG", 0) > 0, (kind, z, block)
        assert use.get("LOCAL", 0) == 0 and use.get("STACK", 0) == 0, ("spills", kind, z, block, use)
