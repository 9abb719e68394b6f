"""Token-level credit ops (trajectory percentile, TP mask, forking tokens, entropy-shaped advantages, D^3S) and the
segmented radix select, on both CPU backends and both layouts.

The oracles here are independent float64 / plain-Python loops written from tp-schedule.md and schedules.md; they do
not call rlvr_kernels.reference.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlvr_kernels as rk
from rlvr_kernels.kernels import credit as kcredit
from rlvr_kernels.kernels import select as kselect
from rlvr_kernels.layout import cu_seqlens_from_lengths, padded_to_packed

BACKENDS = ("torch", "triton")
BLOCK = 16  # small blocks: short rows already cross several block boundaries in the kernels
HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------------------------------
# independent oracles (plain Python, float64)
# ----------------------------------------------------------------------------------------------------------------------
def _length(valid_row):
    idx = [i for i, v in enumerate(valid_row) if v]
    return idx[-1] + 1 if idx else 0


def py_position_percentile(valid):
    out = []
    for row in valid:
        L = _length(row)
        out.append([i / L if v else 0.0 for i, v in enumerate(row)])
    return out


def py_tp_cutoff(L, q):
    return min(int(L * q), L - 1)  # the official code's int() on a non-negative float


def py_tp_mask(valid, q, reverse=False):
    out = []
    for row in valid:
        L = _length(row)
        if L == 0:
            out.append([False] * len(row))
        elif not reverse:
            b = py_tp_cutoff(L, q)
            out.append([bool(v) and i >= b for i, v in enumerate(row)])
        else:
            e = max(math.ceil(L * (1 - q)), 1)
            out.append([bool(v) and i < e for i, v in enumerate(row)])
    return out


def py_rank_percentile(values, valid):
    out = []
    for vals, row in zip(values, valid):
        idx = [i for i, v in enumerate(row) if v]
        n = len(idx)
        r = [0.0] * len(row)
        for i in idx:
            rank = sum(1 for j in idx if vals[j] < vals[i] or (vals[j] == vals[i] and j < i))
            r[i] = rank / n
        out.append(r)
    return out


def py_top(scores, positions, k):
    """The k positions with the largest score, ties to the lower position."""
    return set(sorted(positions, key=lambda p: (-scores[p], p))[:k])


def py_forking(entropy, valid, rho):
    out = []
    for ent, row in zip(entropy, valid):
        idx = [i for i, v in enumerate(row) if v]
        keep = py_top(dict(enumerate(ent)), idx, math.ceil(len(idx) * rho))
        out.append([i in keep for i in range(len(row))])
    return out


def py_esa(adv, entropy, valid, scale, alpha, kappa):
    out = []
    for b, (ent, row) in enumerate(zip(entropy, valid)):
        r = []
        for t, v in enumerate(row):
            a = adv[b][t] if isinstance(adv[b], list) else adv[b]
            r.append((a + scale * min(alpha * ent[t], abs(a) / kappa)) if v else 0.0)
        out.append(r)
    return out


def py_d3s(adv, entropy, valid, rho, scope):
    def a_of(b, t):
        return adv[b][t] if isinstance(adv[b], list) else adv[b]

    B, T = len(valid), len(valid[0]) if valid else 0
    out = [[False] * T for _ in range(B)]
    if scope == "batch":
        pos = [(b, t) for b in range(B) for t in range(T) if valid[b][t]]  # flat row-major order
        scores = {(b, t): abs(a_of(b, t)) * entropy[b][t] for b, t in pos}
        order = {p: i for i, p in enumerate(pos)}
        keep = sorted(pos, key=lambda p: (-scores[p], order[p]))[: math.ceil(len(pos) * rho)]
        for b, t in keep:
            out[b][t] = True
    else:
        for b in range(B):
            idx = [t for t in range(T) if valid[b][t]]
            scores = {t: abs(a_of(b, t)) * entropy[b][t] for t in idx}
            for t in py_top(scores, idx, math.ceil(len(idx) * rho)):
                out[b][t] = True
    return out


# ----------------------------------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------------------------------
def make_batch(lengths, pad, seed, *, holes=False, ties=True):
    """Right-padded batch: mask [B, T], entropy [B, T] (fp32), per-row and per-token advantages, packed forms."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    T = max(lengths) + pad if lengths else pad
    lens = torch.tensor(lengths, dtype=torch.long)
    mask = torch.arange(T)[None, :] < lens[:, None]
    if holes:
        mask &= torch.rand(B, T, generator=g) < 0.8
    if ties:  # dyadic values: products exact in fp32 and fp64, many ties
        ent = torch.randint(0, 9, (B, T), generator=g).float() / 4
        adv_row = torch.randint(-4, 5, (B,), generator=g).float() / 2
        adv_tok = torch.randint(-4, 5, (B, T), generator=g).float() / 2
    else:
        ent = torch.rand(B, T, generator=g) * 3
        adv_row = torch.randn(B, generator=g)
        adv_tok = torch.randn(B, T, generator=g)
    # garbage in the padding must not leak into any result
    ent = torch.where(mask, ent, torch.full_like(ent, float("nan")))
    adv_tok = torch.where(mask, adv_tok, torch.full_like(adv_tok, float("inf")))
    cu = cu_seqlens_from_lengths(lens)
    return dict(mask=mask, ent=ent, adv_row=adv_row, adv_tok=adv_tok, cu=cu, lens=lens)


def packed(batch, x):
    return padded_to_packed(x, batch["cu"])


def per_row_packed(batch, adv):
    # packed layout: a 1-D tensor of length total is read per token, so per-row advantages use [B, 1] when B == total
    return adv[:, None] if adv.numel() == int(batch["cu"][-1]) else adv


batches = st.builds(
    lambda lengths, pad, seed, holes, ties: make_batch(lengths, pad, seed, holes=holes, ties=ties),
    lengths=st.lists(st.integers(0, 70), min_size=1, max_size=4),
    pad=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
    holes=st.booleans(),
    ties=st.booleans(),
)
fractions = st.one_of(st.sampled_from([0.0, 1.0, 0.01, 0.2, 0.3, 0.5, 0.55, 0.99]), st.floats(0.0, 1.0))


def both_layouts(fn, batch, *args_padded, args_packed, **kw):
    """Run fn on the padded and the packed layout; check they agree; return the padded result."""
    out_pad = fn(*args_padded, **kw)
    out_pack = fn(*args_packed, cu_seqlens=batch["cu"], **kw)
    assert out_pack.shape == (int(batch["cu"][-1]),)
    assert out_pack.dtype == out_pad.dtype
    assert torch.equal(packed(batch, out_pad), out_pack)
    if batch["mask"].numel():  # padding positions are 0 / False
        assert not out_pad[~batch["mask"]].any()
    return out_pad


# ----------------------------------------------------------------------------------------------------------------------
# trajectory_percentile
# ----------------------------------------------------------------------------------------------------------------------
@HYP
@given(batch=batches, backend=st.sampled_from(BACKENDS))
def test_trajectory_percentile_position(batch, backend):
    mask = batch["mask"]
    out = both_layouts(
        rk.trajectory_percentile, batch, mask, args_packed=(packed(batch, mask),), backend=backend, block_size=BLOCK
    )
    assert out.dtype == torch.float32
    # t / L in fp64 rounded to fp32 equals the fp32 quotient (double rounding is innocuous for division)
    want = torch.tensor(py_position_percentile(mask.tolist()), dtype=torch.float64).reshape(mask.shape).float()
    assert torch.equal(out, want)


@HYP
@given(batch=batches, backend=st.sampled_from(BACKENDS))
def test_trajectory_percentile_values(batch, backend):
    mask = batch["mask"]
    vals = torch.nan_to_num(batch["ent"], nan=7.0)  # ties across valid tokens; padding ignored
    # the values form sorts in torch for both backends; padded and packed must agree
    out = rk.trajectory_percentile(mask, values=vals, backend=backend)
    out_p = rk.trajectory_percentile(
        packed(batch, mask), values=packed(batch, vals), cu_seqlens=batch["cu"], backend=backend
    )
    assert torch.equal(packed(batch, out), out_p)
    want = torch.tensor(py_rank_percentile(vals.tolist(), mask.tolist()), dtype=torch.float64)
    assert torch.equal(out, want.reshape(mask.shape).float())


def test_trajectory_percentile_edges_and_dtypes():
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.int64)  # int mask is fine
    for backend in BACKENDS:
        out = rk.trajectory_percentile(mask, backend=backend, block_size=BLOCK)
        assert out.tolist() == [[0.0, 0.25, 0.5, 0.75, 0.0], [0.0] * 5, [0.0] * 5]
        vals = torch.tensor([[3, 1, 3, 2, 9], [1, 1, 1, 1, 1], [5, 0, 0, 0, 0]])  # integer values
        out = rk.trajectory_percentile(mask, values=vals, backend=backend)
        assert out.tolist() == [[0.5, 0.0, 0.75, 0.25, 0.0], [0.0] * 5, [0.0] * 5]
    # bf16 values rank like their fp32 upcast; -0.0 ties with +0.0 (lower index first)
    v = torch.tensor([[0.5, -0.0, 0.0, -1.0]], dtype=torch.bfloat16)
    out = rk.trajectory_percentile(torch.ones(1, 4, dtype=torch.bool), values=v)
    assert out.tolist() == [[0.75, 0.25, 0.5, 0.0]]


# ----------------------------------------------------------------------------------------------------------------------
# tp_schedule_mask
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_tp_spec_vectors(backend):
    # tp-schedule.md 6.1: (L, q) -> b
    for (L, q), b in {(10, 0.55): 5, (10, 0.99): 9, (1, 0.99): 0, (1000, 0.99): 990, (7, 0.5): 3, (10, 0.0): 0}.items():
        assert py_tp_cutoff(L, q) == b
        mask = torch.ones(1, L + 2, dtype=torch.bool)
        mask[0, L:] = False
        out = rk.tp_schedule_mask(mask, q, backend=backend, block_size=None if L > 100 else BLOCK)
        want = torch.zeros(1, L + 2, dtype=torch.bool)
        want[0, b:L] = True
        assert torch.equal(out, want), (L, q)


@HYP
@given(batch=batches, q=fractions, reverse=st.booleans(), backend=st.sampled_from(BACKENDS))
def test_tp_schedule_mask(batch, q, reverse, backend):
    mask = batch["mask"]
    out = both_layouts(
        rk.tp_schedule_mask,
        batch,
        mask,
        q,
        args_packed=(packed(batch, mask), q),
        reverse=reverse,
        backend=backend,
        block_size=BLOCK,
    )
    assert out.dtype == torch.bool
    assert out.tolist() == py_tp_mask(mask.tolist(), q, reverse)
    # every row with a valid last token keeps at least one token; q = 0 keeps everything (plain GRPO)
    if q == 0.0:
        assert torch.equal(out, mask)


def test_tp_q_as_tensor_and_holes():
    mask = torch.tensor([[True, False, True, True, False, True]])  # L = 6 (last valid index + 1)
    out = rk.tp_schedule_mask(mask, torch.tensor(0.5))  # b = 3
    assert out.tolist() == [[False, False, False, True, False, True]]
    rev = rk.tp_schedule_mask(mask, 0.5, reverse=True)  # keep t < ceil(6 * 0.5) = 3
    assert rev.tolist() == [[True, False, True, False, False, False]]


# ----------------------------------------------------------------------------------------------------------------------
# forking_token_mask
# ----------------------------------------------------------------------------------------------------------------------
@HYP
@given(batch=batches, rho=fractions, backend=st.sampled_from(BACKENDS))
def test_forking_token_mask(batch, rho, backend):
    mask, ent = batch["mask"], batch["ent"]
    out = both_layouts(
        rk.forking_token_mask,
        batch,
        ent,
        mask,
        rho,
        args_packed=(packed(batch, ent), packed(batch, mask), rho),
        backend=backend,
        block_size=BLOCK,
    )
    assert out.tolist() == py_forking(ent.tolist(), mask.tolist(), rho)
    assert torch.equal(out.sum(1), torch.tensor([math.ceil(int(n) * rho) for n in mask.sum(1)]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forking_ties_edges_dtypes(backend):
    ent = torch.tensor([[1.0, 2.0, 2.0, 0.5, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 6])
    mask = torch.tensor([[1] * 6, [1, 0, 0, 0, 0, 0], [0] * 6], dtype=torch.bool)
    out = rk.forking_token_mask(ent, mask, 0.5, backend=backend, block_size=BLOCK)  # budget 3, 1, 0
    assert out.tolist() == [[False, True, True, False, True, False], [True] + [False] * 5, [False] * 6]
    out = rk.forking_token_mask(ent, mask, 0.3, backend=backend, block_size=BLOCK)  # ceil(6 * 0.3) = 2
    assert out.tolist()[0] == [False, True, True, False, False, False]
    out = rk.forking_token_mask(ent.to(torch.bfloat16), mask, 0.01, backend=backend, block_size=BLOCK)
    assert out.tolist()[0] == [False, True, False, False, False, False]
    assert not rk.forking_token_mask(ent, mask, 0.0, backend=backend).any()


# ----------------------------------------------------------------------------------------------------------------------
# entropy_shaped_advantages
# ----------------------------------------------------------------------------------------------------------------------
@HYP
@given(
    batch=batches,
    scale=fractions,
    per_token=st.booleans(),
    backend=st.sampled_from(BACKENDS),
    alpha=st.sampled_from([0.4, 0.0, 1.0, 2.5]),
    kappa=st.sampled_from([2.0, 1.0, 0.5]),
)
def test_entropy_shaped_advantages(batch, scale, per_token, backend, alpha, kappa):
    mask, ent = batch["mask"], batch["ent"]
    adv = batch["adv_tok"] if per_token else batch["adv_row"]
    adv_p = packed(batch, adv) if per_token else per_row_packed(batch, adv)
    kw = dict(alpha=alpha, kappa=kappa, backend=backend, block_size=BLOCK)
    out = both_layouts(
        rk.entropy_shaped_advantages,
        batch,
        adv,
        ent,
        mask,
        scale,
        args_packed=(adv_p, packed(batch, ent), packed(batch, mask), scale),
        **kw,
    )
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    want = torch.tensor(py_esa(adv.tolist(), ent.tolist(), mask.tolist(), scale, alpha, kappa), dtype=torch.float64)
    torch.testing.assert_close(out.double(), want.reshape(mask.shape), rtol=1e-6, atol=1e-6)
    # the bonus is >= 0 and at most |A| / kappa (so the sign of A is kept when kappa >= 1)
    a = adv if per_token else adv[:, None].expand_as(ent)
    m = mask
    assert bool((out[m] - a[m] >= 0).all())
    if kappa >= 1:
        assert bool((out[m] * a[m] >= 0).all())
    assert bool(((out[m] - a[m]).abs() <= a[m].abs() / kappa + 1e-6).all())


def test_entropy_shaped_advantages_values():
    adv = torch.tensor([1.0, -2.0, 0.0])
    ent = torch.tensor([[0.5, 3.0, 0.0], [1.0, 10.0, 2.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    for backend in BACKENDS:
        out = rk.entropy_shaped_advantages(adv, ent, mask, 0.5, backend=backend, block_size=BLOCK)
        # row 0: A=1: min(0.2, 0.5) -> 1 + 0.1; min(1.2, 0.5) -> 1.25 ; row 1: A=-2: min(0.4, 1) -> -1.8;
        # min(4, 1) -> -1.5; min(0.8, 1) -> -1.6 ; row 2: A=0 -> exactly 0
        torch.testing.assert_close(out, torch.tensor([[1.1, 1.25, 0.0], [-1.8, -1.5, -1.6], [0.0, 0.0, 0.0]]))
        per_row_col = rk.entropy_shaped_advantages(adv[:, None], ent, mask, 0.5, backend=backend)
        assert torch.equal(per_row_col, out)


# ----------------------------------------------------------------------------------------------------------------------
# d3s_token_mask
# ----------------------------------------------------------------------------------------------------------------------
@HYP
@given(
    batch=batches,
    rho=fractions,
    per_token=st.booleans(),
    scope=st.sampled_from(["batch", "sequence"]),
    backend=st.sampled_from(BACKENDS),
)
def test_d3s_token_mask(batch, rho, per_token, scope, backend):
    mask, ent = batch["mask"], batch["ent"]
    adv = batch["adv_tok"] if per_token else batch["adv_row"]
    adv_p = packed(batch, adv) if per_token else per_row_packed(batch, adv)
    out = both_layouts(
        rk.d3s_token_mask,
        batch,
        adv,
        ent,
        mask,
        rho,
        args_packed=(adv_p, packed(batch, ent), packed(batch, mask), rho),
        scope=scope,
        backend=backend,
        block_size=BLOCK,
    )
    # fp32 scores: compare against the oracle on the same fp32 inputs (dyadic batches are exact in both)
    a32 = adv.tolist()
    e32 = ent.tolist()
    if not batch_has_ties(batch):  # continuous values: score in fp32 like the op, compare the order in Python
        sc = (adv.abs()[:, None] if not per_token else adv.abs()) * ent
        e32 = sc.tolist()
        a32 = [1.0] * len(a32)
    assert out.tolist() == py_d3s(a32, e32, mask.tolist(), rho, scope)


def batch_has_ties(batch):
    e = batch["ent"][batch["mask"]]
    return bool(((e * 4) == (e * 4).round()).all())


def test_d3s_scope_differs():
    adv = torch.tensor([1.0, 0.0])
    ent = torch.tensor([[1.0, 2.0, 3.0, 4.0], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    for backend in BACKENDS:
        b = rk.d3s_token_mask(adv, ent, mask, 0.5, backend=backend, block_size=BLOCK)
        s = rk.d3s_token_mask(adv, ent, mask, 0.5, scope="sequence", backend=backend, block_size=BLOCK)
        # batch: 4 of 8 -> the four nonzero scores; sequence: 2 per row, row 1 all zero -> its first two tokens
        assert b.tolist() == [[True] * 4, [False] * 4]
        assert s.tolist() == [[False, False, True, True], [True, True, False, False]]


# ----------------------------------------------------------------------------------------------------------------------
# the segmented select (contract of kernels/select.py) and the grid loop over rows
# ----------------------------------------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, 70), ks=st.lists(st.integers(0, 80), min_size=3, max_size=3))
def test_segmented_kth_largest(seed, n, ks):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-6, 7, (n,), generator=g).float() / 3  # negatives, ties
    special = [float("inf"), float("-inf"), -0.0, 0.0, -1e-30, 1e30]
    for i in range(min(n, len(special))):
        x[(i * 7) % n] = special[i]
    valid = torch.rand(n, generator=g) < 0.85
    c = sorted([0, n // 3, n // 2, n])
    starts, lengths = torch.tensor(c[:3]), torch.tensor([c[1] - c[0], c[2] - c[1], c[3] - c[2]])
    k = torch.tensor(ks)
    val, n_gt, n_take = kselect.segmented_kth_largest(x, starts, lengths, k, valid=valid, block=BLOCK)
    mask = kselect.segmented_topk_mask(x, starts, lengths, k, valid=valid, block=BLOCK)
    for s in range(3):
        lo, hi = int(starts[s]), int(starts[s] + lengths[s])
        idx = [i for i in range(lo, hi) if valid[i]]
        xs = [float(x[i]) + 0.0 for i in idx]  # -0.0 == 0.0 in Python too
        kk = min(ks[s], len(idx))
        order = sorted(range(len(idx)), key=lambda j: (-xs[j], j))
        if not idx:
            assert val[s] == float("-inf") and n_gt[s] == 0 and n_take[s] == 0
        elif kk == 0:
            assert val[s] == float("inf") and n_gt[s] == 0 and n_take[s] == 0
        else:
            v = xs[order[kk - 1]]
            assert float(val[s]) == v
            assert int(n_gt[s]) == sum(1 for y in xs if y > v)
            assert int(n_take[s]) == kk - int(n_gt[s])
        keep = {idx[j] for j in order[:kk]}
        assert [bool(mask[i]) for i in range(lo, hi)] == [i in keep for i in range(lo, hi)]


def test_rows_loop_when_grid_is_capped(monkeypatch):
    # the kernels loop over rows when there are more rows than programs (65535 on a GPU; 2 here)
    monkeypatch.setattr(kcredit, "max_grid", lambda: 2)
    monkeypatch.setattr(kselect, "max_grid", lambda: 2)
    batch = make_batch([5, 0, 17, 33, 1, 20, 9], 2, seed=3)
    mask, ent, adv = batch["mask"], batch["ent"], batch["adv_row"]
    kw = dict(block_size=BLOCK)
    pairs = [
        (rk.trajectory_percentile, (mask,), {}),
        (rk.tp_schedule_mask, (mask, 0.4), {}),
        (rk.forking_token_mask, (ent, mask, 0.3), {}),
        (rk.entropy_shaped_advantages, (adv, ent, mask, 0.7), {}),
        (rk.d3s_token_mask, (adv, ent, mask, 0.3), {"scope": "sequence"}),
    ]
    for fn, args, extra in pairs:
        assert torch.equal(fn(*args, backend="triton", **kw, **extra), fn(*args, backend="torch", **extra)), fn


def test_noncontiguous_inputs():
    big = make_batch([12, 7, 0], 4, seed=11, ties=False)
    wide = torch.stack([big["ent"], torch.rand_like(big["ent"])], dim=2).reshape(3, -1)  # interleave columns
    ent_nc = wide[:, ::2]
    assert torch.allclose(ent_nc, big["ent"], equal_nan=True)
    assert not ent_nc.is_contiguous()
    for backend in BACKENDS:
        got = rk.forking_token_mask(ent_nc, big["mask"], 0.4, backend=backend, block_size=BLOCK)
        assert got.tolist() == py_forking(ent_nc.tolist(), big["mask"].tolist(), 0.4)


# ----------------------------------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_naming_the_argument():
    mask = torch.ones(2, 5, dtype=torch.bool)
    ent = torch.rand(2, 5)
    adv = torch.randn(2)
    for bad in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="q"):
            rk.tp_schedule_mask(mask, bad)
        with pytest.raises(ValueError, match="rho"):
            rk.forking_token_mask(ent, mask, bad)
        with pytest.raises(ValueError, match="rho"):
            rk.d3s_token_mask(adv, ent, mask, bad)
        with pytest.raises(ValueError, match="scale"):
            rk.entropy_shaped_advantages(adv, ent, mask, bad)
    with pytest.raises(TypeError, match="q"):
        rk.tp_schedule_mask(mask, "0.5")
    with pytest.raises(ValueError, match="q"):
        rk.tp_schedule_mask(mask, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="kappa"):
        rk.entropy_shaped_advantages(adv, ent, mask, 0.5, kappa=0.0)
    with pytest.raises(ValueError, match="alpha"):
        rk.entropy_shaped_advantages(adv, ent, mask, 0.5, alpha=-1.0)
    # shapes
    with pytest.raises(ValueError, match="entropy"):
        rk.forking_token_mask(torch.rand(2, 4), mask, 0.5)
    with pytest.raises(ValueError, match="advantages"):
        rk.entropy_shaped_advantages(torch.randn(3), ent, mask, 0.5)
    with pytest.raises(ValueError, match="mask"):
        rk.tp_schedule_mask(torch.ones(2, 3, 4, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match="values"):
        rk.trajectory_percentile(mask, values=torch.rand(5, 2))
    # dtypes
    with pytest.raises(TypeError, match="entropy"):
        rk.forking_token_mask(torch.ones(2, 5, dtype=torch.long), mask, 0.5)
    with pytest.raises(TypeError, match="advantages"):
        rk.d3s_token_mask(torch.ones(2, dtype=torch.long), ent, mask, 0.5)
    with pytest.raises(TypeError, match="mask"):
        rk.tp_schedule_mask([[True]], 0.5)
    # device mismatch (meta tensors: no data is read before the check)
    with pytest.raises(ValueError, match="entropy"):
        rk.forking_token_mask(torch.empty(2, 5, device="meta"), mask, 0.5)
    with pytest.raises(ValueError, match="advantages"):
        rk.entropy_shaped_advantages(torch.empty(2, device="meta"), ent, mask, 0.5)
    # names
    with pytest.raises(ValueError, match="scope"):
        rk.d3s_token_mask(adv, ent, mask, 0.5, scope="group")
    with pytest.raises(ValueError, match="backend"):
        rk.tp_schedule_mask(mask, 0.5, backend="cuda")
    with pytest.raises(ValueError, match="block_size"):
        rk.tp_schedule_mask(mask, 0.5, block_size=24)
    # non-finite values where they would poison the result (the padding may hold anything)
    bad_ent = ent.clone()
    bad_ent[0, 1] = float("nan")
    with pytest.raises(ValueError, match="entropy"):
        rk.forking_token_mask(bad_ent, mask, 0.5)
    with pytest.raises(ValueError, match="values"):
        rk.trajectory_percentile(mask, values=bad_ent)
    bad_adv = adv.clone()
    bad_adv[1] = float("inf")
    with pytest.raises(ValueError, match="advantages"):
        rk.d3s_token_mask(bad_adv, ent, mask, 0.5)


def test_bad_cu_seqlens():
    m = torch.ones(6, dtype=torch.bool)
    e = torch.rand(6)
    with pytest.raises(ValueError, match="cu_seqlens"):
        rk.tp_schedule_mask(m, 0.5, cu_seqlens=torch.tensor([1, 6]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        rk.forking_token_mask(e, m, 0.5, cu_seqlens=torch.tensor([0, 4, 2, 6]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        rk.trajectory_percentile(m, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="cu_seqlens"):
        rk.trajectory_percentile(m, cu_seqlens=torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match="mask"):
        rk.tp_schedule_mask(torch.ones(2, 3, dtype=torch.bool), 0.5, cu_seqlens=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        rk.tp_schedule_mask(m, 0.5, cu_seqlens=torch.tensor([0, 6], device="meta"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_empty_rows(backend):
    mask = torch.zeros(0, 5, dtype=torch.bool)
    assert rk.tp_schedule_mask(mask, 0.5, backend=backend).shape == (0, 5)
    assert rk.forking_token_mask(torch.zeros(0, 5), mask, 0.5, backend=backend).shape == (0, 5)
    # rows of width 0
    m0, e0, a0 = torch.zeros(3, 0, dtype=torch.bool), torch.zeros(3, 0), torch.zeros(3)
    assert rk.trajectory_percentile(m0, backend=backend).shape == (3, 0)
    assert rk.trajectory_percentile(m0, values=e0, backend=backend).shape == (3, 0)
    assert rk.d3s_token_mask(a0, e0, m0, 0.5, scope="sequence", backend=backend).shape == (3, 0)
    # packed: all rows empty
    m = torch.zeros(0, dtype=torch.bool)
    cu = torch.tensor([0, 0, 0])
    out = rk.d3s_token_mask(torch.zeros(2), torch.zeros(0), m, 1.0, cu_seqlens=cu, backend=backend)
    assert out.shape == (0,)
    out = rk.entropy_shaped_advantages(torch.zeros(2), torch.zeros(0), m, 1.0, cu_seqlens=cu, backend=backend)
    assert out.shape == (0,) and out.dtype == torch.float32
