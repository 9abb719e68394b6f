"""The users' conditions for the public token ops (TP-Schedule, forking tokens, entropy-shaped advantages, D^3S,
trajectory percentiles, CPPO, DelTA, TemporalSchedule):

1. padding is inert: NaN / +-inf / huge values at every position that takes no part in a result (mask == 0 positions
   of every per-token input, the per-row values of rows without a valid token, the Top-K columns of padded tokens)
   leave every output bitwise equal to the same call with zero padding, and padded outputs are exactly 0 / False;
   both backends, padded and packed layouts (hypothesis);
2. numerics: finite inputs of extreme magnitude give finite results that match a float64 reference, or a ValueError
   naming the argument, the same on both backends;
3. argument fuzzing: wrong types / ranges / shapes / devices / dtypes raise TypeError or ValueError naming the
   argument (never another exception, never a silent NaN), and NumPy scalars, 0-d arrays and one-element tensors are
   accepted as numbers by every op, with the result of the equivalent Python number;
4. DelTA across ranks: DeltaEstimator(all_reduce=torch.distributed.all_reduce) on a real 2-rank gloo group gives the
   coefficients of the union of both ranks' tokens (float64 oracle), and each rank's own without all_reduce.

The oracles are written here in float64 from the specs; they do not call rlvr_kernels.reference.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import time
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlvr_kernels as rk
from rlvr_kernels.layout import cu_seqlens_from_lengths, padded_to_packed

BACKENDS = ("torch", "triton")
BLOCK = 16
F32_MAX = torch.finfo(torch.float32).max
F32_TINY = torch.finfo(torch.float32).tiny
HID = 8  # DelTA hidden size
KTOP = 3  # CPPO Top-K width
NAN, INF = float("nan"), float("inf")


def hyp(n):
    return settings(
        max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
    )


# ----------------------------------------------------------------------------------------------------------------------
# batches: clean (zero padding) and poisoned (garbage in every position that takes no part)
# ----------------------------------------------------------------------------------------------------------------------
def make_batch(lengths, pad, seed, *, holes, dtype, extra, float_mask=False):
    """Padded batch with zero padding, plus the spans of a packed layout (``extra[i]`` trailing masked tokens kept in
    row i's packed span) and the generator for the poison."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    T = max(lengths, default=0) + pad
    lens = torch.tensor(lengths, dtype=torch.long)
    mask = torch.arange(T)[None, :] < lens[:, None]
    if holes:
        mask &= torch.rand(B, T, generator=g) < 0.75
    spans = torch.tensor([min(T, l + e) for l, e in zip(lengths, extra)], dtype=torch.long)
    m3 = mask[..., None]
    z = lambda x: torch.where(mask if x.dim() == 2 else m3, x, torch.zeros((), dtype=x.dtype)).to(dtype)  # noqa
    logp = torch.log(torch.rand(B, T, generator=g) * 0.9 + 0.05)
    adv_row = torch.randn(B, generator=g)
    adv_row[torch.rand(B, generator=g) < 0.25] = 0.0
    lmu = torch.log_softmax(torch.randn(B, T, KTOP + 2, generator=g), -1)
    lpi = torch.log_softmax(torch.log(lmu.exp()) + 0.4 * torch.randn(B, T, KTOP + 2, generator=g), -1)
    direction = torch.randn(HID, generator=g)
    hidden = torch.randn(B, T, HID, generator=g) + 0.8 * torch.sign(adv_row)[:, None, None] * direction
    return dict(
        mask=mask.float() if float_mask else mask,
        spans=spans,
        cu=cu_seqlens_from_lengths(spans),
        g=g,
        dtype=dtype,
        ent=z(torch.rand(B, T, generator=g) * 3),
        adv_row=adv_row.to(dtype),
        adv_tok=z(torch.randn(B, T, generator=g)),
        logp=z(logp),
        logp_mu=z((logp + 0.3 * torch.randn(B, T, generator=g)).clamp(max=0.0)),
        tk=z(lpi[..., :KTOP]),
        tkm=z(lmu[..., :KTOP]),
        hidden=z(hidden),
    )


def poison(batch):
    """The batch with garbage at every position that takes no part: NaN, +-inf and +-huge mixed at random."""
    g, dtype, mask = batch["g"], batch["dtype"], batch["mask"] != 0
    huge = 1e300 if dtype == torch.float64 else 3e38
    pool = torch.tensor([NAN, INF, -INF, huge, -huge], dtype=dtype)

    def junk(x, invalid):
        pick = pool[torch.randint(0, len(pool), x.shape, generator=g)]
        while invalid.dim() < x.dim():
            invalid = invalid[..., None]
        return torch.where(invalid, pick, x)

    out = dict(batch)
    for k in ("ent", "adv_tok", "logp", "logp_mu", "tk", "tkm", "hidden"):
        out[k] = junk(batch[k], ~mask)
    empty = mask.sum(1) == 0  # a per-row value of a row without valid tokens takes no part either
    out["adv_row"] = junk(batch["adv_row"], empty)
    return out


def layout_args(batch, layout):
    """The batch's tensors in ``layout`` ('padded' or 'packed'), plus the cu_seqlens keyword."""
    if layout == "padded":
        return dict(batch), {}
    cu = batch["cu"]
    out = {
        k: padded_to_packed(batch[k], cu) for k in ("mask", "ent", "adv_tok", "logp", "logp_mu", "tk", "tkm", "hidden")
    }
    # a 1-D tensor of length total is read per token in the packed layout: per-row advantages as [B, 1] then
    out["adv_row"] = batch["adv_row"][:, None] if len(batch["adv_row"]) == out["mask"].numel() else batch["adv_row"]
    return out, dict(cu_seqlens=cu)


PER_TOKEN = ("out", "mask", "divergence", "weight")


def outputs(res):
    if isinstance(res, torch.Tensor):
        return {"out": res}
    if isinstance(res, rk.CPPOMask):
        return {k: getattr(res, k) for k in ("mask", "divergence", "weight", "delta_b", "masked_fraction")}
    raise TypeError(type(res))


def assert_inert(clean, dirty, valid):
    """Bitwise equal outputs, no NaN anywhere, exactly 0 / False at every padded position of per-token outputs."""
    c, d = outputs(clean), outputs(dirty)
    valid = valid != 0
    assert c.keys() == d.keys()
    for k in c:
        assert c[k].dtype == d[k].dtype and c[k].shape == d[k].shape, k
        if d[k].dtype.is_floating_point:
            assert not torch.isnan(d[k]).any(), f"{k}: NaN in the output"
        assert torch.equal(c[k], d[k]), f"{k}: the padding leaked into the result"
        if k in PER_TOKEN:
            assert d[k].shape == valid.shape, k
            assert not d[k][~valid].any(), f"{k}: non-zero at padded positions"


def assert_backends_agree(a, b, *, exact_bool=True):
    oa, ob = outputs(a), outputs(b)
    for k in oa:
        if oa[k].dtype == torch.bool:
            if exact_bool:
                assert torch.equal(oa[k], ob[k]), k
        else:
            torch.testing.assert_close(oa[k], ob[k], atol=1e-6, rtol=1e-5, msg=k)


batch_args = dict(  # at least one token and one padded column: every example has both
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=3).map(lambda ls: ls if max(ls) else ls[:-1] + [3]),
    pad=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    holes=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    extra=st.lists(st.integers(0, 2), min_size=3, max_size=3),
    float_mask=st.booleans(),
    layout=st.sampled_from(["padded", "packed"]),
    backend=st.sampled_from(BACKENDS),
)


def build(lengths, pad, seed, holes, dtype, extra, float_mask=False):
    return make_batch(lengths, pad, seed, holes=holes, dtype=dtype, extra=extra, float_mask=float_mask)


# ----------------------------------------------------------------------------------------------------------------------
# 1. padding is inert
# ----------------------------------------------------------------------------------------------------------------------
def _select_op(name, a, kw, backend, p):
    if name == "percentile":
        return rk.trajectory_percentile(a["mask"], backend=backend, block_size=BLOCK, **kw)
    if name == "percentile_values":
        return rk.trajectory_percentile(a["mask"], values=a["ent"], backend=backend, block_size=BLOCK, **kw)
    if name == "tp":
        return rk.tp_schedule_mask(a["mask"], p["q"], reverse=p["reverse"], backend=backend, block_size=BLOCK, **kw)
    if name == "forking":
        return rk.forking_token_mask(a["ent"], a["mask"], p["q"], backend=backend, block_size=BLOCK, **kw)
    adv = a["adv_tok"] if p["per_token"] else a["adv_row"]
    if name == "esa":
        return rk.entropy_shaped_advantages(adv, a["ent"], a["mask"], p["q"], backend=backend, block_size=BLOCK, **kw)
    return rk.d3s_token_mask(
        adv, a["ent"], a["mask"], p["q"], scope=p["scope"], backend=backend, block_size=BLOCK, **kw
    )


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # a per-row value of an empty row
@hyp(30)
@given(
    op=st.sampled_from(["percentile", "percentile_values", "tp", "forking", "esa", "d3s"]),
    q=st.sampled_from([0.0, 0.3, 0.55, 1.0]),
    reverse=st.booleans(),
    per_token=st.booleans(),
    scope=st.sampled_from(["batch", "sequence"]),
    **batch_args,
)
def test_credit_ops_padding_is_inert(
    op, q, reverse, per_token, scope, lengths, pad, seed, holes, dtype, extra, float_mask, layout, backend
):
    batch = build(lengths, pad, seed, holes, dtype, extra, float_mask)
    p = dict(q=q, reverse=reverse, per_token=per_token, scope=scope)
    a, kw = layout_args(batch, layout)
    b, _ = layout_args(poison(batch), layout)
    clean = _select_op(op, a, kw, backend, p)
    assert_inert(clean, _select_op(op, b, kw, backend, p), a["mask"])
    if backend == "triton":
        assert_backends_agree(clean, _select_op(op, a, kw, "torch", p))


@pytest.mark.filterwarnings("ignore::rlvr_kernels.cppo.CPPOAnchorWarning")
@hyp(20)
@given(
    divergence=st.sampled_from(["binary_tv", "binary_kl", "topk_tv", "topk_kl"]),
    budget=st.sampled_from(["dynamic", "fixed", "none"]),
    per_token=st.booleans(),
    horizon=st.sampled_from([None, 4]),
    **batch_args,
)
def test_cppo_padding_is_inert(
    divergence, budget, per_token, horizon, lengths, pad, seed, holes, dtype, extra, float_mask, layout, backend
):
    batch = build(lengths, pad, seed, holes, dtype, extra, float_mask)

    def run(a, kw, be):
        extra_kw = dict(logp_topk=a["tk"], logp_mu_topk=a["tkm"]) if divergence.startswith("topk") else {}
        return rk.cppo_mask(
            a["logp"],
            a["logp_mu"],
            a["adv_tok"] if per_token else a["adv_row"],
            a["mask"],
            divergence=divergence,
            budget=budget,
            horizon=horizon,
            backend=be,
            block_size=BLOCK,
            **extra_kw,
            **kw,
        )

    a, kw = layout_args(batch, layout)
    b, _ = layout_args(poison(batch), layout)
    clean = run(a, kw, backend)
    assert_inert(clean, run(b, kw, backend), a["mask"])
    if backend == "triton":
        ref = run(a, kw, "torch")
        # the masks may differ only at exact threshold ties (fp32 rounding of the quantile / prefix sums)
        assert (clean.mask != ref.mask).sum() <= 1
        for k in ("divergence", "weight", "delta_b"):
            torch.testing.assert_close(getattr(clean, k), getattr(ref, k), atol=1e-6, rtol=1e-5)


@hyp(16)
@given(iters=st.integers(0, 2), exclude=st.booleans(), per_token=st.booleans(), **batch_args)
def test_delta_padding_is_inert(
    iters, exclude, per_token, lengths, pad, seed, holes, dtype, extra, float_mask, layout, backend
):
    batch = build(lengths, pad, seed, holes, dtype, extra, float_mask)

    def run(a, kw, be):
        return rk.delta_coefficients(
            a["hidden"],
            a["logp"],
            a["adv_tok"] if per_token else a["adv_row"],
            a["mask"],
            iters=iters,
            exclude_zero_adv=exclude,
            backend=be,
            **kw,
        )

    a, kw = layout_args(batch, layout)
    b, _ = layout_args(poison(batch), layout)
    clean = run(a, kw, backend)
    assert_inert(clean, run(b, kw, backend), a["mask"])
    if backend == "triton":
        torch.testing.assert_close(clean, run(a, kw, "torch"), atol=1e-5, rtol=1e-5)


@hyp(12)
@given(per_token=st.booleans(), **batch_args)
def test_delta_estimator_padding_is_inert(
    per_token, lengths, pad, seed, holes, dtype, extra, float_mask, layout, backend
):
    """Streamed over two micro-batches (the rows split), and ``normalise`` of raw coefficients with garbage in their
    padding: the same numbers as the clean stream, 0 at padded positions."""
    batch = build(lengths, pad, seed, holes, dtype, extra, float_mask)
    B = len(lengths)

    def micro(bt):
        mbs = []
        for rows in (slice(0, (B + 1) // 2), slice((B + 1) // 2, B)):
            sub = {
                k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() >= 1 and k != "cu" else v) for k, v in bt.items()
            }
            sub["cu"] = cu_seqlens_from_lengths(sub["spans"])
            a, kw = layout_args(sub, layout)
            mbs.append(((a["hidden"], a["logp"], a["adv_tok"] if per_token else a["adv_row"], a["mask"]), kw))
        return mbs

    def stream(mbs, raw_junk=False):
        est = rk.DeltaEstimator(iters=1, backend=backend, hidden_size=HID, device="cpu")
        raws = []
        for phase in est.phases():
            for args, kw in mbs:
                r = est.accumulate(*args, **kw)
                if phase == "normaliser":
                    raws.append(r)
        coef = [est.coefficients(*args, **kw) for args, kw in mbs]
        norm = []
        for r, (args, kw) in zip(raws, mbs):
            if raw_junk:
                r = torch.where(args[3] != 0, r, torch.full_like(r, NAN))
            norm.append(est.normalise(r, args[2], args[3], **kw))
        return coef + norm

    clean_mbs, dirty_mbs = micro(batch), micro(poison(batch))
    clean, dirty = stream(clean_mbs), stream(dirty_mbs, raw_junk=True)
    for c, d, (args, _) in zip(clean, dirty, clean_mbs + clean_mbs):
        assert_inert(c, d, args[3])
    for c, n in zip(clean[: len(clean_mbs)], clean[len(clean_mbs) :]):
        torch.testing.assert_close(c, n, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# 2. numerics: extreme but finite inputs
# ----------------------------------------------------------------------------------------------------------------------
def small(dtype=torch.float32):
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    ent = torch.tensor([[0.5, 1.5, 0.25, 0.0], [2.0, 0.75, 0.0, 0.0], [1.0, 0.5, 3.0, 0.125]], dtype=dtype)
    adv = torch.tensor([1.0, -0.5, 0.25], dtype=dtype)
    return mask, ent, adv


def esa_oracle(adv, ent, mask, scale, alpha, kappa):
    """float64: (A + scale min(alpha H, |A| / kappa)) on valid tokens."""
    A = adv.double()[:, None] if adv.dim() == 1 else adv.double()
    out = A + scale * torch.minimum(alpha * ent.double(), A.abs() / kappa)
    return torch.where(mask, out, 0.0)


def raises_naming(exc, name, fn):
    with pytest.raises(exc) as ei:
        fn()
    assert name in str(ei.value), f"{type(ei.value).__name__}: {ei.value} does not name {name!r}"


# the interpreter (NumPy) reports the fp32 overflows that these inputs are about
OVERFLOW_OK = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]


def overflow_ok(fn):
    for m in OVERFLOW_OK:
        fn = m(fn)
    return fn


@overflow_ok
@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_shaped_advantages_extremes(backend):
    mask, ent, adv = small()
    f = lambda *a, **k: rk.entropy_shaped_advantages(*a, backend=backend, block_size=BLOCK, **k)  # noqa: E731
    big = torch.tensor([1e300, -1.0, 0.5], dtype=torch.float64)
    raises_naming(ValueError, "advantages", lambda: f(big, ent, mask, 0.5))
    raises_naming(ValueError, "entropy", lambda: f(adv, ent.double() * 1e300, mask, 0.5))
    raises_naming(ValueError, "entropy", lambda: f(adv, ent.double() * 1e300, mask, 0.5, alpha=0.0))
    raises_naming(ValueError, "alpha", lambda: f(adv, ent, mask, 0.5, alpha=1e300))
    raises_naming(ValueError, "kappa", lambda: f(adv, ent, mask, 0.5, kappa=1e-50))
    raises_naming(ValueError, "kappa", lambda: f(adv, ent, mask, 0.5, kappa=1e300))
    # the shaped advantage itself overflows fp32 (|A| (1 + 1 / kappa) > max): a clear error, not inf
    huge = torch.tensor([3e38, -1.0, 0.5])
    raises_naming(ValueError, "advantages", lambda: f(huge, ent * 1e38, mask, 1.0, kappa=0.5))
    # huge but finite fp32 values that fit: the float64 value, rounded once
    cases = [
        (torch.tensor([1e38, -1e38, 0.5]), ent * 1e38, 1.0, 0.4, 2.0),
        (adv, torch.full_like(ent, 3e38), 0.7, 0.0, 2.0),  # alpha = 0: no bonus even for huge entropies
        (torch.tensor([0.0, 1.0, -2.0]), ent, 1.0, 0.4, F32_TINY),  # 0 / tiny = 0, 1 / tiny finite
        (adv, ent * 1e30, 1.0, 3e38, 1e-30),  # alpha H = inf, |A| / kappa finite
        (adv, ent, 1.0, 3e38, 2.0),  # alpha H overflows only where H > 0
    ]
    for a, h, scale, alpha, kappa in cases:
        out = f(a, h, mask, scale, alpha=alpha, kappa=kappa)
        want = esa_oracle(a, h, mask, scale, alpha, kappa)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=0)
        if backend == "triton":
            assert torch.equal(
                out, rk.entropy_shaped_advantages(a, h, mask, scale, alpha=alpha, kappa=kappa, backend="torch")
            )


@overflow_ok
@pytest.mark.parametrize("backend", BACKENDS)
def test_d3s_and_forking_extremes(backend):
    mask, ent, adv = small()
    kw = dict(backend=backend, block_size=BLOCK)
    big = torch.tensor([1e300, -1.0, 0.5], dtype=torch.float64)
    raises_naming(ValueError, "advantages", lambda: rk.d3s_token_mask(big, ent, mask, 0.5, **kw))
    raises_naming(ValueError, "entropy", lambda: rk.d3s_token_mask(adv, ent.double() * 1e300, mask, 0.5, **kw))
    raises_naming(ValueError, "entropy", lambda: rk.forking_token_mask(ent.double() * 1e300, mask, 0.5, **kw))
    # scores |A| H that overflow fp32 saturate at +inf: those tokens are selected first (ties to the lower index)
    a = torch.tensor([1e30, -1.0, -1e30])
    h = ent.clone()
    h[0, 1] = 1e30
    h[2, 2] = 1e30
    for scope in ("batch", "sequence"):
        rho = 0.2 if scope == "batch" else 0.34
        out = rk.d3s_token_mask(a, h, mask, rho, scope=scope, **kw)
        assert out[0, 1] and out[2, 2]
        assert torch.equal(out, rk.d3s_token_mask(a, h, mask, rho, scope=scope, backend="torch"))
    want = torch.zeros_like(mask)
    want[0, 1] = want[2, 2] = True
    assert torch.equal(rk.d3s_token_mask(a, h, mask, 0.2, **kw), want)
    # entropies at the top of the fp32 range
    h = ent.clone()
    h[1, 0] = 3e38
    h[2, 3] = F32_MAX
    out = rk.forking_token_mask(h, mask, 0.25, **kw)
    assert out[1, 0] and out[2, 3] and int(out.sum()) == 1 + 1 + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_trajectory_percentile_ranks_in_the_input_dtype(backend):
    """Rank percentiles compare the values themselves: float64 beyond the fp32 range and int64 beyond 2**24 keep
    their order (the fp32 cast would tie them)."""
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    for vals in ([2e300, 1e300, -1e300, 5e-324, 0.0, NAN], [2**24 + 1, 2**24, 2**53 + 2, 2**53, -(2**40), 7]):
        dt = torch.float64 if isinstance(vals[0], float) else torch.int64
        v = torch.tensor([vals], dtype=dt)
        n = 5
        want = [sum(1 for j in range(n) if vals[j] < vals[i] or (vals[j] == vals[i] and j < i)) / n for i in range(n)]
        out = rk.trajectory_percentile(mask, values=v, backend=backend)
        assert torch.equal(out[0], torch.tensor(want + [0.0], dtype=torch.float32)), (vals, out)


def cppo_small():
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    g = torch.Generator().manual_seed(3)
    lp = torch.log(torch.rand(3, 5, generator=g) * 0.9 + 0.05)
    lm = (lp + 0.5 * torch.randn(3, 5, generator=g)).clamp(max=0.0)
    return mask, lp, lm


@overflow_ok
@pytest.mark.parametrize("backend", BACKENDS)
def test_cppo_extremes(backend):
    mask, lp, lm = cppo_small()
    adv = torch.tensor([1.0, -1.0, 0.5])
    f = lambda *a, **k: rk.cppo_mask(*a, backend=backend, block_size=BLOCK, **k)  # noqa: E731
    base = f(lp, lm, torch.tensor([1.0, -1.0, 1.0]), mask)
    # advantages only enter by their sign: beyond the fp32 range, or below its smallest subnormal, still count
    tiny_big = f(lp, lm, torch.tensor([1e300, -1e-300, 1e-310], dtype=torch.float64), mask)
    for k in ("mask", "divergence", "weight", "delta_b", "masked_fraction"):
        assert torch.equal(getattr(tiny_big, k), getattr(base, k)), k
    raises_naming(ValueError, "logp", lambda: f(lp.double() * 1e300, lm, adv, mask))
    raises_naming(ValueError, "logp_mu", lambda: f(lp, lm.double() - 1e300, adv, mask))
    raises_naming(ValueError, "delta_b", lambda: f(lp, lm, adv, mask, delta_b=1e300))
    raises_naming(ValueError, "delta", lambda: f(lp, lm, adv, mask, delta=1e300))
    raises_naming(ValueError, "quantile_scale", lambda: f(lp, lm, adv, mask, quantile_scale=1e300))
    raises_naming(ValueError, "horizon", lambda: f(lp, lm, adv, mask, horizon=10**30))
    # log-probs above 0 (not log-probabilities) count as probability 1 in the divergence: finite, no NaN
    pos = lp.clone()
    pos[0, :2] = 100.0
    for div in ("binary_tv", "binary_kl"):
        res = f(pos, lm, adv, mask, divergence=div)
        ref = f(torch.where(pos > 0, 0.0, pos), lm, adv, mask, divergence=div)
        assert torch.isfinite(res.divergence).all() and torch.equal(res.divergence, ref.divergence)
    tk = torch.log_softmax(torch.randn(3, 5, KTOP + 1), -1)[..., :KTOP]
    tkp = tk.clone()
    tkp[0, 0] = 60.0
    for div in ("topk_tv", "topk_kl"):
        res = f(lp, lm, adv, mask, divergence=div, logp_topk=tkp, logp_mu_topk=tk)
        assert torch.isfinite(res.divergence).all()
    # huge budgets that fit: finite delta_b, the clamp at max_mult * delta_b, no NaN in the prefix sums
    res = f(lp, lm, adv, mask, quantile_scale=3e38, max_mult=1e300, delta_b=0.02)
    assert torch.isfinite(res.delta_b).all() and (res.delta_b > 1e30).all()
    res2 = f(lp, lm, adv, mask, delta_b=F32_MAX, budget="fixed")  # never binds: the threshold is delta
    assert torch.equal(res2.mask, f(lp, lm, adv, mask, budget="none").mask)
    assert not torch.isnan(res2.divergence).any()
    res3 = f(lp, lm, adv, mask, horizon=2**40)  # w = 1 - 0.2 t / (2**40 - 1) rounds to 1 in fp32
    assert torch.equal(res3.weight, mask.float())
    if backend == "triton":
        for r, kw in ((res, dict(quantile_scale=3e38, max_mult=1e300, delta_b=0.02)), (res3, dict(horizon=2**40))):
            t = rk.cppo_mask(lp, lm, adv, mask, backend="torch", **kw)
            for k in ("mask", "weight", "delta_b"):
                torch.testing.assert_close(getattr(r, k), getattr(t, k), atol=0, rtol=1e-6)


def delta_oracle(h, logp, adv, mask, K=1, lam_min=0.8, lam_max=1.2, eps=1e-8):
    """DelTA (delta.md section 6) in float64 with v = (1 - p) h materialised; flat [N, H] / [N] inputs."""
    m = mask.bool()
    h = torch.where(m[:, None], h.double(), 0.0)
    s = torch.where(m, -torch.expm1(logp.double().clamp(max=0.0)), 0.0)
    a = torch.where(m, adv.double(), 0.0)
    v = s[:, None] * h
    pos, neg = m & (a > 0), m & (a < 0)

    def cent(w):
        return (w[:, None] * v).sum(0) / w.sum().clamp_min(eps)

    def margin(mp, mn):
        dp, dn = ((v - mp) ** 2).sum(-1), ((v - mn) ** 2).sum(-1)
        return torch.where(pos, dn - dp, dp - dn)

    def gam(x, sel):
        n = sel.sum().clamp_min(1)
        mu = x[sel].sum() / n
        return ((x[sel] ** 2).sum() / n - mu**2).clamp_min(eps).sqrt()

    mg = margin(cent(a.clamp(min=0)), cent((-a).clamp(min=0)))
    gp, gn = gam(mg, pos), gam(mg, neg)
    for _ in range(K):
        om = torch.sigmoid(mg / torch.where(pos, gp, gn)) * a.abs()
        gp, gn = gam(mg, pos), gam(mg, neg)
        mg = margin(cent(torch.where(pos, om, 0.0)), cent(torch.where(neg, om, 0.0)))
    c = torch.where(
        pos | neg,
        lam_min + (lam_max - lam_min) * torch.sigmoid(mg / torch.where(pos, gp, gn)),
        torch.full_like(mg, lam_min),
    )
    c = torch.where(m, c, 0.0)
    return c * m.sum() / c[m].sum().clamp_min(eps)


def delta_small(seed=0):
    b = make_batch([6, 3, 7], 1, seed, holes=False, dtype=torch.float32, extra=[0, 0, 0])
    return b["hidden"], b["logp"], torch.tensor([1.0, -0.5, 0.75]), b["mask"]


@overflow_ok
@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_extremes(backend):
    h, lp, adv, mask = delta_small()
    f = lambda *a, **k: rk.delta_coefficients(*a, backend=backend, **k)  # noqa: E731
    B, T = mask.shape
    flat = lambda x: x.reshape(B * T, *x.shape[2:])  # noqa: E731

    def oracle(hh, ll, aa):
        aa = aa[:, None].expand(B, T) if aa.dim() == 1 else aa
        return delta_oracle(flat(hh), flat(ll), flat(aa), flat(mask)).reshape(B, T)

    base = f(h, lp, adv, mask)
    torch.testing.assert_close(base.double(), oracle(h, lp, adv), atol=1e-5, rtol=1e-5)
    # hidden states far beyond what a model produces: a clear error, never NaN
    raises_naming(ValueError, "hidden_old", lambda: f(h * 1e30, lp, adv, mask))
    raises_naming(ValueError, "hidden_old", lambda: f(h.double() * 1e300, lp, adv, mask))
    # ... while large ones that fit give the same coefficients (they are invariant to scaling h)
    torch.testing.assert_close(f(h * 2.0**40, lp, adv, mask), base, atol=1e-6, rtol=1e-6)
    # advantages: the coefficients are invariant to a positive scale of A; beyond fp32 a clear error
    torch.testing.assert_close(f(h, lp, adv * 2.0**100, mask), base, atol=1e-6, rtol=1e-6)
    raises_naming(ValueError, "advantages", lambda: f(h, lp, adv.double() * 1e300, mask))
    raises_naming(ValueError, "advantages", lambda: f(h, lp, torch.full((B, T), 3e38), mask))
    # old log-probs: above 0 means probability 1 (s = 0), below the fp32 range probability 0 (s = 1)
    lp_pos = lp.clone()
    lp_pos[0, :2] = 5.0
    torch.testing.assert_close(
        f(h, lp_pos, adv, mask), f(h, torch.where(lp_pos > 0, 0.0, lp_pos), adv, mask), atol=0, rtol=0
    )
    lp_neg = lp.double().clone()
    lp_neg[2, :3] = -1e300
    torch.testing.assert_close(
        f(h, lp_neg, adv, mask), f(h, torch.where(lp_neg < -1e3, -200.0, lp), adv, mask), atol=0, rtol=0
    )
    torch.testing.assert_close(f(h, lp_neg, adv, mask).double(), oracle(h, lp_neg, adv), atol=1e-5, rtol=1e-5)
    raises_naming(ValueError, "eps", lambda: f(h, lp, adv, mask, eps=1e-300))
    raises_naming(ValueError, "lam_max", lambda: f(h, lp, adv, mask, lam_max=1e300))
    raises_naming(ValueError, "lam_min", lambda: f(h, lp, adv, mask, lam_min=1e-300))
    # the streaming estimator raises the same errors
    est = rk.DeltaEstimator(iters=1, backend=backend)
    with pytest.raises(ValueError, match="hidden_old"):
        for _ in est.phases():
            est.accumulate(h * 1e30, lp, adv, mask)
    est = rk.DeltaEstimator(iters=1, backend=backend)
    with pytest.raises(ValueError, match="advantages"):
        for _ in est.phases():
            est.accumulate(h, lp, torch.full((B, T), 3e38), mask)


# ----------------------------------------------------------------------------------------------------------------------
# 3. argument fuzzing
# ----------------------------------------------------------------------------------------------------------------------
def fuzz_inputs():
    mask, ent, adv = small()
    mask5, lp, lm = cppo_small()
    h, dlp, dadv, dmask = delta_small()
    tk = torch.log_softmax(torch.randn(3, 5, KTOP + 1, generator=torch.Generator().manual_seed(1)), -1)[..., :KTOP]
    return dict(mask=mask, ent=ent, adv=adv, mask5=mask5, lp=lp, lm=lm, h=h, dlp=dlp, dadv=dadv, dmask=dmask, tk=tk)


X = fuzz_inputs()

# op -> callable(**overrides) on small fixed inputs (torch backend)
OPS = {
    "tp_schedule_mask": lambda **k: rk.tp_schedule_mask(**{"mask": X["mask"], "q": 0.5, **k}),
    "trajectory_percentile": lambda **k: rk.trajectory_percentile(**{"mask": X["mask"], **k}),
    "forking_token_mask": lambda **k: rk.forking_token_mask(
        **{"entropy": X["ent"], "mask": X["mask"], "rho": 0.5, **k}
    ),
    "entropy_shaped_advantages": lambda **k: rk.entropy_shaped_advantages(
        **{"advantages": X["adv"], "entropy": X["ent"], "mask": X["mask"], "scale": 0.5, **k}
    ),
    "d3s_token_mask": lambda **k: rk.d3s_token_mask(
        **{"advantages": X["adv"], "entropy": X["ent"], "mask": X["mask"], "rho": 0.5, **k}
    ),
    "cppo_mask": lambda **k: rk.cppo_mask(
        **{"logp": X["lp"], "logp_mu": X["lm"], "advantages": torch.tensor([1.0, -1.0, 0.5]), "mask": X["mask5"], **k}
    ),
    "delta_coefficients": lambda **k: rk.delta_coefficients(
        **{"hidden_old": X["h"], "old_logp": X["dlp"], "advantages": X["dadv"], "mask": X["dmask"], **k}
    ),
    "TemporalSchedule": lambda **k: rk.TemporalSchedule(**{"total_steps": 10, **k})(3),
    "TemporalSchedule.__call__": lambda step: rk.TemporalSchedule("linear", total_steps=10)(step),
}

# (op, argument, a valid value, numbers out of its range)
REAL_ARGS = [
    ("tp_schedule_mask", "q", 0.55, [-0.1, 1.1]),
    ("forking_token_mask", "rho", 0.3, [-0.1, 1.1]),
    ("d3s_token_mask", "rho", 0.3, [-0.5, 2.0]),
    ("entropy_shaped_advantages", "scale", 0.7, [-0.1, 1.5]),
    ("entropy_shaped_advantages", "alpha", 0.4, [-1.0, 1e300]),
    ("entropy_shaped_advantages", "kappa", 2.0, [0.0, -2.0, 1e-50, 1e300]),
    ("cppo_mask", "delta", 0.15, [0.0, -0.1, 1e300]),
    ("cppo_mask", "w_min", 0.8, [0.0, 1.5, -0.2]),
    ("cppo_mask", "delta_b", 0.02, [-0.01, 1e300]),
    ("cppo_mask", "quantile", 0.9, [-0.1, 1.1]),
    ("cppo_mask", "max_mult", 2.0, [0.5, -1.0]),
    ("cppo_mask", "quantile_scale", 1.0, [-1.0, 1e300]),
    ("delta_coefficients", "lam_min", 0.8, [0.0, -1.0, 1e300, 1e-300]),
    ("delta_coefficients", "lam_max", 1.25, [0.5, 1e300]),
    ("delta_coefficients", "eps", 1e-6, [0.0, -1.0, 1e-300, 1e300]),
    ("TemporalSchedule", "start_value", 0.5, [-0.1, 1.5]),
    ("TemporalSchedule", "end_value", 0.25, [-0.1, 1.5]),
    ("TemporalSchedule", "begin", 0.25, [-0.1, 1.5]),
    ("TemporalSchedule", "end", 0.75, [-0.1, 1.5, 0.0]),
    ("TemporalSchedule", "gamma", 2.0, [0.0, -1.0]),
]
INT_ARGS = [
    ("cppo_mask", "horizon", 8, [0, -3, 2**60, 10**400]),
    ("delta_coefficients", "iters", 2, [-1, 10**400]),
    ("TemporalSchedule", "total_steps", 20, [0, -5, 10**400]),
    ("TemporalSchedule.__call__", "step", 4, [0, -1]),
    ("forking_token_mask", "block_size", 32, [8, 24, 2**30, 10**400]),
    ("cppo_mask", "block_size", 64, [0, 48]),
]
# the argument each op must name when its block_size / tensors are wrong
NOT_NUMBERS = [
    ("0.5", TypeError),
    (b"1", TypeError),
    (None, TypeError),
    ([0.5], TypeError),
    ((0.5,), TypeError),
    ({"x": 1}, TypeError),
    (1j, TypeError),
    (object(), TypeError),
    (True, TypeError),
    (False, TypeError),
    (np.bool_(True), TypeError),
    (torch.tensor(True), TypeError),
    (torch.tensor(1 + 0j), TypeError),
    (Decimal("0.5"), TypeError),
    (np.array("0.5"), TypeError),
    (torch.tensor([0.5, 0.5]), ValueError),
    (np.array([0.5, 0.5]), ValueError),
    (NAN, ValueError),
    (INF, ValueError),
    (-INF, ValueError),
]


def real_wrappings(v):
    """Ways to pass the number v that every op must accept, each with the Python number it stands for."""
    out = [
        (v, v),
        (np.float64(v), v),
        (np.float32(v), float(np.float32(v))),
        (np.array(v), v),
        (torch.tensor(v, dtype=torch.float64), v),
        (torch.tensor(v), float(torch.tensor(v))),
        (torch.tensor([v]), float(torch.tensor([v]))),
        (Fraction(v), v),
    ]
    if float(v).is_integer():
        out += [(int(v), int(v)), (np.int64(int(v)), int(v)), (torch.tensor(int(v)), int(v))]
    return out


def int_wrappings(v):
    return [
        (v, v),
        (np.int64(v), v),
        (np.int32(v), v),
        (np.array(v), v),
        (torch.tensor(v), v),
        (torch.tensor(v, dtype=torch.int32), v),
    ]


def same(a, b):
    if isinstance(a, float):
        return a == b
    oa, ob = outputs(a), outputs(b)
    return all(torch.equal(oa[k], ob[k]) for k in oa)


def call(op, name, value):
    fn = OPS[op]
    return fn(value) if op == "TemporalSchedule.__call__" else fn(**{name: value})


def check_no_nan(res):
    if isinstance(res, float):
        assert math.isfinite(res)
        return
    for t in outputs(res).values():
        if t.dtype.is_floating_point:
            assert not torch.isnan(t).any()


@pytest.mark.parametrize("op,name,good,bad", REAL_ARGS, ids=[f"{a}-{b}" for a, b, _, _ in REAL_ARGS])
def test_fuzz_real_arguments(op, name, good, bad):
    want = call(op, name, good)
    check_no_nan(want)
    for wrapped, number in real_wrappings(good):
        got = call(op, name, wrapped)  # accepted ...
        assert same(got, call(op, name, number)), (name, wrapped)  # ... as the number it stands for
    for value, exc in NOT_NUMBERS + [(b, ValueError) for b in bad + [10**400, -(10**400)]]:
        with pytest.raises((TypeError, ValueError)) as ei:
            call(op, name, value)
        assert name in str(ei.value), (value, str(ei.value))
        assert issubclass(ei.type, exc), (value, ei.type, str(ei.value))


@pytest.mark.parametrize("op,name,good,bad", INT_ARGS, ids=[f"{a}-{b}" for a, b, _, _ in INT_ARGS])
def test_fuzz_int_arguments(op, name, good, bad):
    check_no_nan(call(op, name, good))
    for wrapped, number in int_wrappings(good):
        assert same(call(op, name, wrapped), call(op, name, number)), (name, wrapped)
    floats = [(float(good), TypeError), (np.float64(good), TypeError), (torch.tensor(float(good)), TypeError)]
    for value, exc in NOT_NUMBERS + [(b, ValueError) for b in bad] + floats:
        if value is None and name in ("horizon", "block_size"):
            continue  # optional
        if isinstance(value, float) or (isinstance(value, (np.ndarray, torch.Tensor)) and np.asarray(value).size > 1):
            exc = (TypeError, ValueError)  # a float where an int belongs: either names the argument
        with pytest.raises((TypeError, ValueError)) as ei:
            call(op, name, value)
        assert name in str(ei.value), (value, str(ei.value))
        assert issubclass(ei.type, exc), (value, ei.type, str(ei.value))
    if name == "step":  # steps past total_steps, however large, give end_value
        assert call(op, name, 10**400) == 0.0


CHOICES = [
    ("d3s_token_mask", "scope"),
    ("cppo_mask", "budget"),
    ("cppo_mask", "divergence"),
    ("TemporalSchedule", "mode"),
]
FLAGS = [("tp_schedule_mask", "reverse"), ("delta_coefficients", "exclude_zero_adv")]
ALL_OPS = [k for k in OPS if not k.startswith("TemporalSchedule")]


def test_fuzz_choices_flags_and_backend():
    for op, name in CHOICES:
        for value in (None, 3, "nope", b"batch", ["batch"], np.array("x"), torch.tensor(1)):
            raises_naming(ValueError, name, lambda: call(op, name, value))
    assert same(call("d3s_token_mask", "scope", np.str_("sequence")), call("d3s_token_mask", "scope", "sequence"))
    for op, name in FLAGS:
        for value in (1, 0, "True", None, np.bool_(True), torch.tensor(True), 1.0):
            raises_naming(TypeError, name, lambda: call(op, name, value))
    for op in ALL_OPS:
        for value in (None, 3, "cuda", ["torch"], b"torch", torch.tensor(1), np.array("torch")):
            with pytest.raises((TypeError, ValueError)) as ei:
                OPS[op](backend=value)
            assert "backend" in str(ei.value), (op, value, str(ei.value))
        assert same(OPS[op](backend=np.str_("torch")), OPS[op](backend="torch"))


def _tensor_args():
    """(op, argument, its good value, accepted variants, rejected variants with the exception type)."""
    m, ent, adv = X["mask"], X["ent"], X["adv"]
    meta = lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")  # noqa: E731

    def bad_float(t):
        return [
            ("x", TypeError),
            (t.tolist(), TypeError),
            (t.numpy(), TypeError),
            (None, TypeError),
            (t > 0, TypeError),
            (t.to(torch.complex64), TypeError),
            (t[..., :-1], ValueError),
            (t.reshape(-1)[:-1], ValueError),
            (meta(t), ValueError),
        ]

    def int_ok(t):  # an integer tensor where floats belong is refused, not silently converted
        return [(t.long(), TypeError)]

    nan_mask = m.float().clone()
    nan_mask[0, 3] = NAN
    mask_bad = [
        ("x", TypeError),
        (m.tolist(), TypeError),
        (m.numpy(), TypeError),
        (None, TypeError),
        (m.to(torch.complex64), TypeError),
        (m[None], ValueError),
        (nan_mask, ValueError),
    ]
    mask_ok = [(m.float(), True), (m.long(), True), (m.to(torch.uint8), True), (m.double() * 3.0, True)]
    out = []
    for op in ("forking_token_mask", "entropy_shaped_advantages", "d3s_token_mask"):
        out.append(
            (
                op,
                "entropy",
                ent,
                [(ent.double(), True), (ent.half(), False), (ent.t().contiguous().t(), True)],
                bad_float(ent) + int_ok(ent),
            )
        )
        out.append((op, "mask", m, mask_ok, mask_bad))
    for op in ("entropy_shaped_advantages", "d3s_token_mask"):
        out.append(
            (
                op,
                "advantages",
                adv,
                [(adv[:, None], True), (adv.double(), True), (adv[:, None].expand(3, 4).contiguous(), True)],
                bad_float(adv) + int_ok(adv) + [(torch.randn(3, 5), ValueError)],
            )
        )
    out.append(("tp_schedule_mask", "mask", m, mask_ok, mask_bad))
    out.append(
        (
            "trajectory_percentile",
            "values",
            ent,
            [(ent.double(), True), ((ent * 8).long(), False)],
            [
                ("x", TypeError),
                (ent > 0.5, TypeError),
                (ent[:, :2], ValueError),
                (meta(ent), ValueError),
                (ent.to(torch.complex64), TypeError),
            ],
        )
    )
    lp, lm = X["lp"], X["lm"]
    for name, t in (("logp", lp), ("logp_mu", lm)):
        out.append(("cppo_mask", name, t, [(t.double(), True), (t.bfloat16(), False)], bad_float(t) + int_ok(t)))
    cadv = torch.tensor([1.0, -1.0, 0.5])
    out.append(
        (
            "cppo_mask",
            "advantages",
            cadv,
            [(cadv.double(), True), (cadv[:, None], True)],
            bad_float(cadv) + int_ok(cadv) + [(torch.ones(2), ValueError)],
        )
    )
    h, dlp, dadv = X["h"], X["dlp"], X["dadv"]
    out.append(
        (
            "delta_coefficients",
            "hidden_old",
            h,
            [(h.double(), True), (h.bfloat16(), False)],
            [
                ("x", TypeError),
                (h.numpy(), TypeError),
                (h.long(), TypeError),
                (h > 0, TypeError),
                (h[:, :-1], ValueError),
                (h[..., :0], ValueError),
                (h[0], ValueError),
                (meta(h), ValueError),
            ],
        )
    )
    out.append(("delta_coefficients", "old_logp", dlp, [(dlp.double(), True)], bad_float(dlp) + int_ok(dlp)))
    out.append(
        (
            "delta_coefficients",
            "advantages",
            dadv,
            [(dadv.double(), True), (dadv[:, None], True)],
            bad_float(dadv) + int_ok(dadv),
        )
    )
    return out


TENSOR_ARGS = _tensor_args()


@pytest.mark.parametrize("op,name,good,ok,bad", TENSOR_ARGS, ids=[f"{a}-{b}" for a, b, *_ in TENSOR_ARGS])
def test_fuzz_tensor_arguments(op, name, good, ok, bad):
    want = OPS[op](**{name: good})
    check_no_nan(want)
    for value, must_equal in ok:
        got = OPS[op](**{name: value})
        check_no_nan(got)
        if must_equal:
            assert same(got, want), (name, value.dtype)
    for value, exc in bad:
        with pytest.raises((TypeError, ValueError)) as ei:
            OPS[op](**{name: value})
        assert name in str(ei.value), (name, type(value), str(ei.value))
        assert ei.type is exc or issubclass(ei.type, exc), (name, type(value), ei.type, str(ei.value))


def test_fuzz_cu_seqlens():
    m = torch.tensor([1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    e = torch.rand(7)
    cu = torch.tensor([0, 3, 7])
    h7 = torch.randn(7, 4, generator=torch.Generator().manual_seed(5))
    packed = {
        "tp_schedule_mask": lambda c: rk.tp_schedule_mask(m, 0.5, cu_seqlens=c),
        "forking_token_mask": lambda c: rk.forking_token_mask(e, m, 0.5, cu_seqlens=c),
        "d3s_token_mask": lambda c: rk.d3s_token_mask(torch.ones(2), e, m, 0.5, cu_seqlens=c),
        "cppo_mask": lambda c: rk.cppo_mask(-e, -e - 0.1, torch.ones(2), m, cu_seqlens=c),
        "delta_coefficients": lambda c: rk.delta_coefficients(h7, -e, torch.tensor([1.0, -1.0]), m, cu_seqlens=c),
    }
    bad = [
        (cu.tolist(), TypeError),
        (cu.numpy(), TypeError),
        ("0,3,7", TypeError),
        (cu.float(), TypeError),
        (cu > 0, TypeError),
        (cu.to(torch.complex64), TypeError),
        (cu[None], ValueError),
        (torch.tensor([], dtype=torch.long), ValueError),
        (torch.tensor([1, 3, 7]), ValueError),
        (torch.tensor([0, 5, 3, 7]), ValueError),
        (torch.tensor([0, 3, 8]), ValueError),
        (torch.tensor([0, -1, 7]), ValueError),
        (torch.tensor(7), ValueError),
        (torch.empty(3, dtype=torch.long, device="meta"), ValueError),
    ]
    for op, fn in packed.items():
        want = fn(cu)
        for ok in (cu.int(), cu.to(torch.uint8), cu.to(torch.int16)):
            assert same(fn(ok), want)
        for value, exc in bad:
            with pytest.raises((TypeError, ValueError)) as ei:
                fn(value)
            assert "cu_seqlens" in str(ei.value), (op, value, str(ei.value))
            assert issubclass(ei.type, exc), (op, value, ei.type)
    # the padded layout with cu_seqlens, and a 1-D mask without it
    raises_naming(ValueError, "mask", lambda: rk.tp_schedule_mask(m.reshape(1, 7), 0.5, cu_seqlens=cu))
    raises_naming(ValueError, "mask", lambda: rk.tp_schedule_mask(m, 0.5))


def test_fuzz_topk_and_estimator_arguments():
    lp, lm, m = X["lp"], X["lm"], X["mask5"]
    tk = X["tk"]
    adv = torch.tensor([1.0, -1.0, 0.5])
    f = lambda **k: rk.cppo_mask(lp, lm, adv, m, divergence="topk_tv", **k)  # noqa: E731
    assert torch.isfinite(f(logp_topk=tk, logp_mu_topk=tk - 0.1).divergence).all()
    pinf = tk.clone()
    pinf[0, 0, 0] = INF
    for name in ("logp_topk", "logp_mu_topk"):
        other = "logp_mu_topk" if name == "logp_topk" else "logp_topk"
        for value, exc in (
            ("x", TypeError),
            (tk.long(), TypeError),
            (tk > 0, TypeError),
            (tk[..., 0], ValueError),
            (tk[:, :-1], ValueError),
            (pinf, ValueError),
            (tk.to("meta"), ValueError),
        ):
            with pytest.raises((TypeError, ValueError)) as ei:
                f(**{name: value, other: tk})
            assert name in str(ei.value) and issubclass(ei.type, exc), (name, str(ei.value))
    # DeltaEstimator's constructor
    E = rk.DeltaEstimator
    for kw, exc, name in [
        (dict(iters=1.0), TypeError, "iters"),
        (dict(iters="1"), TypeError, "iters"),
        (dict(iters=-1), ValueError, "iters"),
        (dict(lam_min=NAN), ValueError, "lam_min"),
        (dict(lam_max="1"), TypeError, "lam_max"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(exclude_zero_adv=1), TypeError, "exclude_zero_adv"),
        (dict(all_reduce=3), TypeError, "all_reduce"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(backend=3), TypeError, "backend"),
        (dict(hidden_size=0), ValueError, "hidden_size"),
        (dict(hidden_size="4"), TypeError, "hidden_size"),
        (dict(hidden_size=4.0), TypeError, "hidden_size"),
        (dict(device="nonsense"), ValueError, "device"),
        (dict(device=3.5), TypeError, "device"),
    ]:
        with pytest.raises((TypeError, ValueError)) as ei:
            E(**kw)
        assert name in str(ei.value) and issubclass(ei.type, exc), (kw, ei.type, str(ei.value))
    for kw in (
        dict(iters=np.int64(2)),
        dict(iters=torch.tensor(2)),
        dict(lam_min=np.float32(0.5)),
        dict(lam_min=torch.tensor(0.5)),
        dict(eps=np.array(1e-6)),
        dict(hidden_size=np.int64(4)),
        dict(hidden_size=torch.tensor(4)),
        dict(device=torch.device("cpu")),
        dict(device="cpu"),
    ):
        est = E(**kw)
        assert isinstance(est.iters, int) and isinstance(est.lam_min, float)
    # normalise: raw of the wrong shape / type names raw
    h, dlp, dadv, dm = X["h"], X["dlp"], X["dadv"], X["dmask"]
    est = E(iters=0, backend="torch")
    for _ in est.phases():
        raw = est.accumulate(h, dlp, dadv, dm)
    raises_naming(ValueError, "raw", lambda: est.normalise(raw[:, :-1], dadv, dm))
    raises_naming(TypeError, "raw", lambda: est.normalise(raw.tolist(), dadv, dm))
    raises_naming(TypeError, "raw", lambda: est.normalise(raw > 0, dadv, dm))


# ----------------------------------------------------------------------------------------------------------------------
# 4. DelTA across two real ranks (gloo)
# ----------------------------------------------------------------------------------------------------------------------
def _dist_data(seed=11):
    """Two ranks' micro-batches (rank 0: a padded and a packed one; rank 1: one padded, mostly negative advantages),
    with garbage in the padding."""
    a = make_batch([5, 0, 7], 2, seed, holes=True, dtype=torch.float32, extra=[0, 0, 0])
    b = make_batch([4, 6], 1, seed + 1, holes=False, dtype=torch.float32, extra=[1, 0, 0])
    c = make_batch([8, 3, 6], 0, seed + 2, holes=True, dtype=torch.float32, extra=[0, 0, 0])
    c["adv_row"] = -c["adv_row"].abs() - 0.1
    c["adv_row"][1] = 0.7
    pa, pb, pc = (poison(x) for x in (a, b, c))
    pb_args, pb_kw = layout_args(pb, "packed")
    mbs = [
        [
            ((pa["hidden"], pa["logp"], pa["adv_row"], pa["mask"]), {}),
            ((pb_args["hidden"], pb_args["logp"], pb_args["adv_row"], pb_args["mask"]), pb_kw),
        ],
        [((pc["hidden"], pc["logp"], pc["adv_row"], pc["mask"]), {})],
    ]
    return mbs


def _flat_mb(args, kw):
    h, lp, adv, m = args
    if "cu_seqlens" in kw:
        cu = kw["cu_seqlens"]
        adv = torch.repeat_interleave(adv.reshape(-1), cu.diff())
        return h, lp, adv, m
    B, T = m.shape
    adv = adv.reshape(B, 1).expand(B, T)
    return h.reshape(B * T, -1), lp.reshape(-1), adv.reshape(-1), m.reshape(-1)


def _dist_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        mine = _dist_data()[rank]
        res = {}
        for key in ("global", "local"):
            calls = [0]

            def counted(t):
                calls[0] += 1
                return dist.all_reduce(t)

            est = rk.DeltaEstimator(
                iters=1, all_reduce=counted if key == "global" else None, backend="torch", hidden_size=HID, device="cpu"
            )
            for _ in est.phases():
                for args, kw in mine:
                    est.accumulate(*args, **kw)
            res[key] = [est.coefficients(*args, **kw) for args, kw in mine]
            res[key + "_calls"] = calls[0]
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_delta_estimator_all_reduce_on_two_gloo_ranks(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    for attempt in range(3):  # a free port can be taken between the probe and the bind: retry with another one
        ctx = mp.spawn(_dist_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
        deadline = time.monotonic() + 120
        try:
            while not ctx.join(timeout=1):  # a failed rank terminates the other one and raises here
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        if p.is_alive():
                            p.kill()
                    pytest.fail("the two gloo ranks did not finish within 120 s")
            break
        except mp.ProcessRaisedException as e:
            if attempt == 2 or "address already in use" not in str(e).lower():
                raise
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    mbs = _dist_data()
    flat = [[_flat_mb(*mb) for mb in rank] for rank in mbs]

    def oracle(pieces):
        h, lp, adv, m = (torch.cat([p[i] for p in pieces]) for i in range(4))
        return delta_oracle(h, lp, adv, m)

    def unflat(outs, rank):
        return torch.cat([o.reshape(-1) for o in outs])

    union = oracle([p for rank in flat for p in rank])
    n0 = sum(p[3].numel() for p in flat[0])
    want_global = [union[:n0], union[n0:]]
    for r in range(2):
        assert got[r]["global_calls"] == 4 and got[r]["local_calls"] == 0  # centroids, gamma, refine_1, normaliser
        g = unflat(got[r]["global"], r).double()
        loc = unflat(got[r]["local"], r).double()
        torch.testing.assert_close(g, want_global[r], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loc, oracle(flat[r]), atol=1e-5, rtol=1e-5)
        assert (g - loc).abs().max() > 1e-3  # the union really differs from the rank's own set
    # the union's coefficients have mean 1 over all valid tokens of both ranks
    m = torch.cat([p[3] for rank in flat for p in rank])
    allc = torch.cat([unflat(got[r]["global"], r) for r in range(2)]).double()
    assert allc[m].mean().item() == pytest.approx(1.0, abs=1e-5)
