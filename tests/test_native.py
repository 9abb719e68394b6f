"""The native CPU kernels of the vocabulary pass (``csrc/vocab_rows.cpp``) against the plain-torch reference, their
custom-op registration, and the fallback when they are turned off or cannot be built."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlvr_kernels
from rlvr_kernels import _native
from rlvr_kernels.cpu import vocab_rows
from rlvr_kernels.reference import logprobs as ref

IGN = -100
HAVE_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None
native = pytest.mark.skipif(
    not (_native.enabled() and HAVE_COMPILER), reason="no C++ compiler, or RLVR_KERNELS_NATIVE=0"
)


def _loaded() -> bool:
    return _native.load("vocab_rows")


@native
def test_native_kernels_build_and_load_where_a_compiler_exists():
    assert _loaded(), rlvr_kernels.info()["native"]
    assert rlvr_kernels.info()["native"]["vocab_rows"] == "loaded"


def _inputs(n, v, dtype, seed, *, special=True):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * 4).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    if special and n >= 4:
        t[1] = IGN
        z[1] = float("nan")  # padding: anything, ignored
        z[2, : max(1, v // 3)] = float("-inf")  # masked vocabulary entries
        t[2] = v - 1
        z[2, v - 1] = 0.5
        t[3] = IGN
        z[3] = float("-inf")  # an ignored row of -inf only
    return z, t


def _reference_stats(z, t, inv_temp):
    return ref.scaled_logit_stats(z * inv_temp, t, ignore_index=IGN)


def _reference_grad(z, t, lse, ent, gl, gh, cp, inv_temp):
    dz = ref.dlogits_from_scaled_logits(z * inv_temp, lse, ent, t, gl, gh, cp) * inv_temp
    return torch.where((t == IGN).unsqueeze(1), 0.0, dz)


def _coefficients(n, t, dtype, seed, with_ent):
    g = torch.Generator().manual_seed(seed + 1)
    gl, gh, gg = (torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    keep = (t != IGN).to(dtype)
    gl, gh, cp = gl * keep, gh * keep, (gl + gg) * keep
    return gl, (gh if with_ent else None), cp


@native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("v", [1, 7, 8, 9, 1000])
@pytest.mark.parametrize("inv_temp", [1.0, 1 / 0.7])
def test_row_stats_match_reference(dtype, v, inv_temp):
    assert _loaded()
    z, t = _inputs(6, v, dtype, v)
    got = vocab_rows.row_stats(z, t, inv_temp, IGN)
    want = _reference_stats(z, t, inv_temp)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-6, rtol=2e-6)
    keep = t != IGN
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a[keep], b[keep], **tol)
    assert (got[0][~keep] == 0).all() and (got[1][~keep] == 0).all()


@native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("v", [1, 9, 1000])
@pytest.mark.parametrize("with_ent", [True, False])
def test_row_grad_matches_reference(dtype, v, with_ent):
    assert _loaded()
    inv_temp = 1 / 0.8
    z, t = _inputs(6, v, dtype, 10 + v)
    _, ent, lse = _reference_stats(z.double(), t, inv_temp)
    ent, lse = ent.to(dtype), lse.to(dtype)
    gl, gh, cp = _coefficients(6, t, dtype, v, with_ent)
    want = _reference_grad(z.clone(), t, lse, ent, gl, gh, cp, inv_temp)
    got = vocab_rows.row_grad_(z.clone(), t, lse, ent, gl, gh, cp, inv_temp, IGN)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(got, want, **tol)
    assert (got[t == IGN] == 0).all()  # NaN / -inf padding rows give exactly 0


@native
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 9),
    v=st.integers(1, 70),
    temp=st.sampled_from([0.5, 1.0, 1.7]),
    seed=st.integers(0, 10_000),
)
def test_row_ops_properties(n, v, temp, seed):
    """float64: native equals the reference to rounding; p sums to 1, so each kept row's gradient (without the
    entropy term) sums to inv_temp (g_logp - c_p)."""
    assert _loaded()
    z, t = _inputs(n, v, torch.float64, seed, special=False)
    lp, ent, lse = vocab_rows.row_stats(z, t, 1 / temp, IGN)
    want = _reference_stats(z, t, 1 / temp)
    for a, b in zip((lp, ent, lse), want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert (lp <= 1e-12).all() and (ent >= -1e-12).all()
    gl, _, cp = _coefficients(n, t, torch.float64, seed, False)
    dz = vocab_rows.row_grad_(z.clone(), t, lse, ent, gl, None, cp, 1 / temp, IGN)
    torch.testing.assert_close(dz.sum(1), (gl - cp) / temp, atol=1e-10, rtol=1e-10)


@native
def test_row_ops_opcheck():
    assert _loaded()
    z, t = _inputs(5, 33, torch.float32, 3)
    z = torch.nan_to_num(z, nan=0.0)  # opcheck compares runs; keep every row finite
    torch.library.opcheck(torch.ops.rlvr_kernels.vocab_row_stats.default, (z, t, 1.25, IGN))
    _, ent, lse = vocab_rows.row_stats(z, t, 1.25, IGN)
    gl, gh, cp = _coefficients(5, t, torch.float32, 3, True)
    torch.library.opcheck(
        torch.ops.rlvr_kernels.vocab_row_grad_.default, (z.clone(), t, lse, ent, gl, gh, cp, 1.25, IGN)
    )


_SCRIPT = textwrap.dedent(
    """
    import json, warnings
    import torch, rlvr_kernels
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 40, (12,), generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            lp, ent = rlvr_kernels.fused_linear_logprobs(x, w, t, backend="torch")
            (lp.sum() + ent.sum()).backward()
        z = torch.randn(5, 40, generator=g)
        z[1] = float("nan")  # a padded row: ignored, whatever it holds
        z.requires_grad_()
        tz = torch.randint(0, 40, (5,), generator=g)
        tz[1] = -100
        lpz, entz = rlvr_kernels.logprobs_from_logits(z, tz, temperature=0.7, backend="torch")
        (lpz.sum() + entz.sum()).backward()
    assert torch.isfinite(z.grad).all() and (z.grad[1] == 0).all()
    said = [str(c.message) for c in caught if "native CPU kernels" in str(c.message)]
    out = {"lp": lp.tolist(), "ent": ent.tolist(), "gx": x.grad.tolist(), "gz": z.grad.tolist(), "said": said}
    print(json.dumps({**out, "native": rlvr_kernels.info()["native"]["vocab_rows"]}))
    """
)


def _run(env_extra):
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fallback_when_turned_off_gives_the_same_numbers():
    off = _run({"RLVR_KERNELS_NATIVE": "0"})
    assert off["native"] == "disabled" and off["said"] == []
    on = _run({})
    if HAVE_COMPILER:
        assert on["native"] == "loaded"
    for k in ("lp", "ent", "gx", "gz"):
        torch.testing.assert_close(torch.tensor(on[k]), torch.tensor(off[k]), atol=1e-5, rtol=1e-5)


def test_failed_build_is_said_once_and_falls_back(tmp_path):
    res = _run({"CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert res["native"].startswith("failed: "), res["native"]
    assert len(res["said"]) == 1 and "plain-torch path" in res["said"][0]
    off = _run({"RLVR_KERNELS_NATIVE": "0"})
    torch.testing.assert_close(torch.tensor(res["lp"]), torch.tensor(off["lp"]), atol=0, rtol=0)


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """A process killed mid-build leaves torch's lock file behind, and torch waits on it without end: a lock older
    than STALE_LOCK_S is removed (said once), a younger one (a live build) is left to torch."""
    import pathlib
    import time

    from torch.utils import cpp_extension

    from rlvr_kernels import _native

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = pathlib.Path(cpp_extension._get_build_directory("rlvr_kernels_stale_test", verbose=False)) / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    _native._clear_stale_lock("rlvr_kernels_stale_test")
    assert lock.exists()  # a live build's lock
    old = time.time() - _native.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        _native._clear_stale_lock("rlvr_kernels_stale_test")
    assert not lock.exists()
