"""The native CPU kernels of the token ops' row scans and selections (``csrc/token_rows.cpp``, the low-level ops of
:mod:`rlvr_kernels.cpu.token_rows`) against the plain-torch reference, which is their oracle: masks bit-identical and
floats equal bit for bit, on random shapes, masks and ties, NaN/inf outside the mask, empty and all-masked rows, long
rows and many rows (the parallel path); opcheck of each op; the public ops' torch branches, padded and packed, against
the reference functions; and the fallback when the native kernels are off.

The native-specific tests skip when ``_native.load("token_rows")`` is False (no compiler).
"""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlvr_kernels as rk
from rlvr_kernels import _native
from rlvr_kernels.cpu import token_rows as tr
from rlvr_kernels.layout import cu_seqlens_from_lengths, padded_to_packed
from rlvr_kernels.reference import cppo as ref_cppo
from rlvr_kernels.reference import credit as ref_credit

HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NATIVE = _native.load("token_rows")
native = pytest.mark.skipif(not NATIVE, reason="the native token_rows kernels could not be built here")
OPS = torch.ops.rlvr_kernels
INF, NAN = float("inf"), float("nan")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (so -0.0 differs from 0.0 and NaN equals NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        view = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
        return torch.equal(a.view(view), b.view(view))
    return torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------------------
# random rows: shapes, masks (empty and all-masked rows included), tied values, junk outside the mask
# ----------------------------------------------------------------------------------------------------------------------
@st.composite
def rows_case(draw, max_rows=6, max_len=70):
    R = draw(st.integers(0, max_rows))
    M = draw(st.integers(0, max_len))
    p = draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(R, M, generator=g) < p
    if R and draw(st.booleans()):
        valid[draw(st.integers(0, R - 1))] = False  # an all-masked row
    return valid, g


def _floats(valid: torch.Tensor, g: torch.Generator, dtype: torch.dtype, *, specials: bool) -> torch.Tensor:
    """Few distinct values (ties), signed zeros, optionally +-inf at valid positions; NaN / inf outside the mask."""
    pool = torch.tensor([-2.5, -1.0, -0.0, 0.0, 0.5, 1.0, 3.0, 1e30] + ([INF, -INF] if specials else []), dtype=dtype)
    x = pool[torch.randint(0, pool.numel(), valid.shape, generator=g)]
    junk = torch.tensor([NAN, INF, -INF], dtype=dtype)[torch.randint(0, 3, valid.shape, generator=g)]
    return torch.where(valid, x, junk)


# ----------------------------------------------------------------------------------------------------------------------
# the kernels against the reference
# ----------------------------------------------------------------------------------------------------------------------
@native
@HYP
@given(case=rows_case(), dtype=st.sampled_from([torch.float32, torch.float64, torch.int64]))
def test_rank_percentile_matches_reference(case, dtype):
    valid, g = case
    if dtype == torch.int64:
        v = torch.randint(-3, 4, valid.shape, generator=g) * (1 << 40)  # ties, and values beyond 2**24
    else:
        v = _floats(valid, g, dtype, specials=True)
    got = OPS.row_rank_percentile.default(v, valid)
    assert _same(got, ref_credit.rank_percentile(v, valid))


@native
@HYP
@given(case=rows_case(), kmode=st.sampled_from(["random", "zero", "all", "over"]))
def test_topk_mask_matches_reference(case, kmode):
    valid, g = case
    s = _floats(valid, g, torch.float32, specials=True)
    n = valid.sum(1)
    k = {
        "random": (torch.rand(valid.shape[0], generator=g) * (n + 1)).long(),
        "zero": torch.zeros_like(n),
        "all": n,
        "over": n + 5,
    }[kmode]
    got = OPS.row_topk_mask.default(s, valid, k)
    assert _same(got, ref_credit.topk_mask(s, valid, k))


@native
@HYP
@given(case=rows_case(), q=st.floats(0.0, 1.0))
def test_order_stats_matches_reference(case, q):
    valid, g = case
    R, M = valid.shape
    if M == 0:
        return  # the reference's quantile returns before selecting on empty rows
    D = _floats(valid, g, torch.float32, specials=False).abs() * torch.where(torch.rand(R, M, generator=g) < 0.5, -1, 1)
    n = valid.sum(1)
    r = torch.tensor(q, dtype=torch.float32) * (n - 1).clamp(min=0).float()
    lo = r.long()
    hi = torch.minimum(r.ceil().long(), (n - 1).clamp(min=0))
    got = OPS.row_order_stats.default(D, valid, lo, hi)
    want = ref_cppo.order_stats(D, valid, lo, hi)
    assert all(_same(a, b) for a, b in zip(got, want))  # the picked entry's own sign of zero, too
    # positions past the valid count read +inf, as the reference's +inf-filled sort
    far = torch.full_like(lo, M - 1)
    got = OPS.row_order_stats.default(D, valid, far, far)
    want = ref_cppo.order_stats(D, valid, far, far)
    assert all(_same(a, b) for a, b in zip(got, want))


def _prefix_inputs(valid: torch.Tensor, g: torch.Generator, scale: float):
    w = ref_cppo.position_weight(valid, 0.8)
    D = torch.where(valid, torch.rand(valid.shape, generator=g) * scale, torch.zeros(()))
    db = torch.rand(valid.shape[0], generator=g) * 0.04
    return w * D, w, db


def _last_threshold(Z, w, db, delta):
    """The threshold c of each row's last position, computed op by op as the reference does (its Z takes no part
    in any threshold, so setting Z there to c, or just above, probes c's exact rounding)."""
    G = db[:, None] * w - Z
    R = G[:, :-1].cumsum(dim=1)[:, -1] if Z.shape[1] > 1 else torch.zeros(Z.shape[0])
    return torch.clamp(delta + R, max=delta)


@native
@HYP
@given(case=rows_case(max_len=300), scale=st.sampled_from([0.01, 0.1, 0.5]), delta=st.sampled_from([0.15, 0.1, 0.3]))
def test_prefix_inside_matches_reference(case, scale, delta):
    valid, g = case
    Z, w, db = _prefix_inputs(valid, g, scale)
    assert _same(OPS.cppo_prefix_inside.default(Z, w, db, delta), ref_cppo.prefix_inside(Z, w, db, delta))
    if Z.shape[0] and Z.shape[1]:
        c = _last_threshold(Z, w, db, delta)
        for probe in (c, torch.nextafter(c, torch.full_like(c, INF)), torch.nextafter(c, torch.full_like(c, -INF))):
            Z2 = Z.clone()
            Z2[:, -1] = probe
            got = OPS.cppo_prefix_inside.default(Z2, w, db, delta)
            assert _same(got, ref_cppo.prefix_inside(Z2, w, db, delta))


@native
def test_long_rows_and_many_rows():
    """Rows of 2**17 tokens (the radix sort of each key width, the scan's fp32 rounding over long sums) and 300
    rows on two threads (the parallel split)."""
    g = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for R, M in ((2, 1 << 17), (300, 700)):
            valid = torch.rand(R, M, generator=g) < 0.9
            v = torch.randint(-25, 25, (R, M), generator=g).float()
            for x in (v, v.double() * 1e200, v.long() * (1 << 50)):  # the radix sort of each key width
                assert _same(OPS.row_rank_percentile.default(x, valid), ref_credit.rank_percentile(x, valid))
            k = (valid.sum(1) * 0.2).long()
            assert _same(OPS.row_topk_mask.default(v, valid, k), ref_credit.topk_mask(v, valid, k))
            lo = (valid.sum(1) // 2).clamp(max=M - 1)
            got, want = OPS.row_order_stats.default(v, valid, lo, lo), ref_cppo.order_stats(v, valid, lo, lo)
            assert all(_same(a, b) for a, b in zip(got, want))
            Z, w, db = _prefix_inputs(valid, g, 0.05)
            assert _same(OPS.cppo_prefix_inside.default(Z, w, db, 0.15), ref_cppo.prefix_inside(Z, w, db, 0.15))
    finally:
        torch.set_num_threads(threads)


@native
def test_kernels_refuse_what_they_do_not_take():
    v, valid = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="float32, float64 or int64"):
        OPS.row_rank_percentile.default(v.half(), valid)
    with pytest.raises(RuntimeError, match="valid must be"):
        OPS.row_topk_mask.default(v, valid.int(), torch.zeros(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="out of range"):
        OPS.row_order_stats.default(v, valid, torch.tensor([0, 3]), torch.tensor([0, 0]))


# ----------------------------------------------------------------------------------------------------------------------
# the ops as custom ops, and the wrappers' casts
# ----------------------------------------------------------------------------------------------------------------------
def _opcheck_cases():
    g = torch.Generator().manual_seed(2)
    valid = torch.rand(3, 9, generator=g) < 0.7
    valid[1] = False
    x = torch.where(valid, torch.randint(0, 4, (3, 9), generator=g).float(), torch.full((3, 9), NAN))
    lo = torch.tensor([0, 0, 2])
    Z, w, db = _prefix_inputs(valid, g, 0.3)
    return [
        (OPS.row_rank_percentile.default, (x, valid)),
        (OPS.row_rank_percentile.default, (torch.randint(0, 5, (3, 9), generator=g), valid)),
        (OPS.row_topk_mask.default, (x, valid, torch.tensor([2, 1, 9]))),
        (OPS.row_order_stats.default, (x, valid, lo, lo + 1)),
        (OPS.cppo_prefix_inside.default, (Z, w, db, 0.15)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8, torch.int32, torch.uint8])
def test_rank_wrapper_casts_keep_the_order(dtype):
    g = torch.Generator().manual_seed(3)
    valid = torch.rand(4, 33, generator=g) < 0.8
    v = torch.randint(0, 100, (4, 33), generator=g).to(dtype)
    assert _same(tr.rank_percentile(v, valid), ref_credit.rank_percentile(v, valid))
    s = torch.randn(4, 33, generator=g).to(torch.float64)
    k = torch.tensor([0, 3, 40, 7])
    assert _same(tr.topk_mask(s, valid, k), ref_credit.topk_mask(s, valid, k))


# ----------------------------------------------------------------------------------------------------------------------
# the public ops' torch branches: padded and packed, against the reference functions (with their own selections)
# ----------------------------------------------------------------------------------------------------------------------
@st.composite
def right_padded(draw):
    B = draw(st.integers(1, 5))
    lengths = draw(st.lists(st.integers(0, 40), min_size=B, max_size=B))
    T = max(lengths + [1])
    seed = draw(st.integers(0, 2**31 - 1))
    valid = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return valid, torch.tensor(lengths), torch.Generator().manual_seed(seed)


def _packed(x: torch.Tensor, lengths: torch.Tensor):
    cu = cu_seqlens_from_lengths(lengths)
    return padded_to_packed(x, cu), cu


@HYP
@given(case=right_padded(), rho=st.sampled_from([0.0, 0.2, 1 - 0.7, 0.5, 1.0]))
def test_public_selections_padded_and_packed(case, rho):
    valid, lengths, g = case
    junk = torch.full(valid.shape, NAN)
    ent = torch.where(valid, torch.randint(0, 5, valid.shape, generator=g).float() / 4, junk)
    adv = torch.randint(-2, 3, (valid.shape[0],), generator=g).float()
    want = {
        "pct": ref_credit.rank_percentile(torch.where(valid, ent, torch.zeros(())), valid),
        "fork": ref_credit.forking_token_mask(torch.where(valid, ent, torch.zeros(())), valid, rho),
        "d3s_b": ref_credit.d3s_token_mask(adv, torch.where(valid, ent, torch.zeros(())), valid, rho),
        "d3s_s": ref_credit.d3s_token_mask(adv, torch.where(valid, ent, torch.zeros(())), valid, rho, scope="sequence"),
    }
    got = {
        "pct": rk.trajectory_percentile(valid, values=ent, backend="torch"),
        "fork": rk.forking_token_mask(ent, valid, rho, backend="torch"),
        "d3s_b": rk.d3s_token_mask(adv, ent, valid, rho, backend="torch"),
        "d3s_s": rk.d3s_token_mask(adv, ent, valid, rho, scope="sequence", backend="torch"),
    }
    for name in want:
        assert _same(got[name], want[name]), name
    pe, cu = _packed(ent, lengths)
    pm = padded_to_packed(valid, cu)
    packed = {
        "pct": rk.trajectory_percentile(pm, values=pe, cu_seqlens=cu, backend="torch"),
        "fork": rk.forking_token_mask(pe, pm, rho, cu_seqlens=cu, backend="torch"),
        # per-row advantages as [B, 1]: a packed [N] with N == B would read as per token
        "d3s_b": rk.d3s_token_mask(adv[:, None], pe, pm, rho, cu_seqlens=cu, backend="torch"),
        "d3s_s": rk.d3s_token_mask(adv[:, None], pe, pm, rho, scope="sequence", cu_seqlens=cu, backend="torch"),
    }
    for name in want:
        assert _same(packed[name], padded_to_packed(want[name], cu)), name


@HYP
@given(case=right_padded(), budget=st.sampled_from(["dynamic", "fixed", "none"]), horizon=st.sampled_from([None, 16]))
def test_public_cppo_padded_and_packed(case, budget, horizon):
    valid, lengths, g = case
    shape = valid.shape
    logp = torch.where(valid, -torch.rand(shape, generator=g) * 3, torch.full(shape, NAN))
    logp_mu = torch.where(valid, logp - (torch.rand(shape, generator=g) - 0.5), torch.full(shape, INF))
    adv = torch.randint(-1, 2, (shape[0],), generator=g).float()
    kw = dict(delta=0.15, w_min=0.8, delta_b=0.02, budget=budget, quantile=0.9, quantile_scale=1.0, max_mult=2.0)
    D = ref_cppo.divergence("binary_tv", logp, logp_mu)
    keep, D_ref, w_ref, db_ref = ref_cppo.cppo_mask(logp, logp_mu, adv, valid, D, horizon=horizon, **kw)
    r = rk.cppo_mask(logp, logp_mu, adv, valid, horizon=horizon, backend="torch", **kw)
    for a, b in ((r.mask, keep), (r.divergence, D_ref), (r.weight, w_ref), (r.delta_b, db_ref)):
        assert _same(a, b)
    pl, cu = _packed(logp, lengths)
    pmu, _ = _packed(logp_mu, lengths)
    pv, _ = _packed(valid, lengths)
    rp = rk.cppo_mask(pl, pmu, adv, pv, horizon=horizon, cu_seqlens=cu, backend="torch", **kw)
    assert _same(rp.mask, padded_to_packed(keep, cu)) and _same(rp.delta_b, db_ref)


def test_fallback_without_native_kernels():
    """``RLVR_KERNELS_NATIVE=0``: the ops run their plain-torch bodies (no build, no warning) and give the results
    of this process (native when built)."""
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "import torch, rlvr_kernels as rk\n"
        "from rlvr_kernels import _native\n"
        "g = torch.Generator().manual_seed(4)\n"
        "valid = torch.rand(3, 50, generator=g) < 0.8\n"
        "e = torch.randint(0, 6, (3, 50), generator=g).float()\n"
        "print(rk.forking_token_mask(e, valid, 0.3, backend='torch').nonzero().tolist())\n"
        "print(rk.trajectory_percentile(valid, values=e, backend='torch').tolist())\n"
        "print(rk.cppo_mask(-e / 5, -e / 4, torch.ones(3), valid, backend='torch').mask.nonzero().tolist())\n"
        "print(_native.state()['token_rows'])\n"
    )
    env = dict(os.environ, RLVR_KERNELS_NATIVE="0")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[-1] == "disabled"
    g = torch.Generator().manual_seed(4)
    valid = torch.rand(3, 50, generator=g) < 0.8
    e = torch.randint(0, 6, (3, 50), generator=g).float()
    here = [
        rk.forking_token_mask(e, valid, 0.3, backend="torch").nonzero().tolist(),
        rk.trajectory_percentile(valid, values=e, backend="torch").tolist(),
        rk.cppo_mask(-e / 5, -e / 4, torch.ones(3), valid, backend="torch").mask.nonzero().tolist(),
    ]
    assert lines[:-1] == [str(x) for x in here]
