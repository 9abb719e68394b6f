"""DelTA coefficients (delta.md): one-shot op on both CPU backends and both layouts, the streaming estimator (with a
simulated all-reduce), the Triton sweeps, the spec's invariances, edge cases, bad input, and the loss end to end.

The oracle is an independent float64 transcription of delta.md section 6 with the proxy v = (1 - p) h materialised
and explicit squared distances; it does not call rlvr_kernels.reference.
"""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlvr_kernels as rk
from rlvr_kernels.kernels import delta as kdelta
from rlvr_kernels.layout import cu_seqlens_from_lengths, padded_to_packed
from rlvr_kernels.reference import delta as rdelta

BACKENDS = ("torch", "triton")
H = 40  # not a multiple of 16
HYP = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------------------------------
# independent oracle: delta.md section 6, float64, explicit v
# ----------------------------------------------------------------------------------------------------------------------
def spec_delta(h, oldlogp, adv, mask, K=1, lam_min=0.8, lam_max=1.2, eps=1e-8, exclude_zero_adv=False):
    """Flat inputs: h [N, H], oldlogp / adv / mask [N] (adv already per token). Returns float64 [N]."""
    mask = mask.bool()
    h = torch.where(mask[:, None], h.double(), 0.0)  # padding may hold NaN: never part of the set
    oldlogp = torch.where(mask, oldlogp.double(), 0.0)
    adv = torch.where(mask, adv.double(), 0.0)
    s = 1 - oldlogp.exp()
    m = mask.double()
    v = s[:, None] * h
    pos = (adv > 0) & mask
    neg = (adv < 0) & mask
    ap = adv.clamp(min=0) * m
    an = (-adv).clamp(min=0) * m

    def cent(w):
        return (w[:, None] * v).sum(0) / w.sum().clamp_min(eps)

    def margin(mp, mn):
        Dp = ((v - mp) ** 2).sum(-1)
        Dn = ((v - mn) ** 2).sum(-1)
        return torch.where(pos, Dn - Dp, Dp - Dn)

    def gam(x, sel):
        n = sel.sum().clamp_min(1)
        mu = x[sel].sum() / n
        return ((x[sel] ** 2).sum() / n - mu**2).clamp_min(eps).sqrt()

    mp, mn = cent(ap), cent(an)
    mg = margin(mp, mn)
    gp, gn = gam(mg, pos), gam(mg, neg)
    for _ in range(K):
        q = torch.sigmoid(mg / torch.where(pos, gp, gn))
        w = q * adv.abs() * (pos | neg)
        gp, gn = gam(mg, pos), gam(mg, neg)
        mp, mn = cent(w * pos), cent(w * neg)
        mg = margin(mp, mn)
    q = torch.sigmoid(mg / torch.where(pos, gp, gn))
    c = torch.where(pos | neg, lam_min + (lam_max - lam_min) * q, torch.full_like(q, lam_min)) * m
    if not exclude_zero_adv:
        return c * m.sum() / c.sum().clamp_min(eps)
    E = (pos | neg).double()
    out = c * E.sum() / (c * E).sum().clamp_min(eps)
    return torch.where(pos | neg, out, m)


# ----------------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------------
def make_batch(lengths, seed=0, T=None, h_dim=H, adv=None, dtype=torch.float32):
    """Padded batch with right padding; NaN in the padding of hidden and old_logp. Returns a dict."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    T = T if T is not None else max(max(lengths), 1)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    if adv is None:
        adv = torch.randn(B, generator=gen)
        adv[torch.rand(B, generator=gen) < 0.2] = 0.0
    adv = torch.as_tensor(adv, dtype=torch.float32)
    # hidden states with a side-dependent shift, so the discriminator has something to find
    direction = torch.randn(h_dim, generator=gen)
    hidden = torch.randn(B, T, h_dim, generator=gen) + 0.7 * torch.sign(adv)[:, None, None] * direction
    hidden = hidden + 0.3 * torch.randn(B, T, 1, generator=gen) * direction
    old_logp = torch.log(torch.rand(B, T, generator=gen) * 0.94 + 0.05)
    hidden = hidden.masked_fill(~mask[:, :, None], float("nan")).to(dtype)
    old_logp = old_logp.masked_fill(~mask, float("nan"))
    return dict(hidden=hidden, old_logp=old_logp, adv=adv, mask=mask, lengths=torch.tensor(lengths))


def packed(batch):
    cu = cu_seqlens_from_lengths(batch["lengths"])
    return dict(
        hidden=padded_to_packed(batch["hidden"], cu),
        old_logp=padded_to_packed(batch["old_logp"], cu),
        adv=batch["adv"],
        mask=padded_to_packed(batch["mask"], cu),
        cu=cu,
    )


def oracle(batch, **kw):
    B, T = batch["mask"].shape
    flat_adv = batch["adv"][:, None].expand(B, T).reshape(-1) if batch["adv"].dim() == 1 else batch["adv"].reshape(-1)
    out = spec_delta(
        batch["hidden"].reshape(B * T, -1), batch["old_logp"].reshape(-1), flat_adv, batch["mask"].reshape(-1), **kw
    )
    return out.reshape(B, T)


def run_op(batch, backend, **kw):
    return rk.delta_coefficients(batch["hidden"], batch["old_logp"], batch["adv"], batch["mask"], backend=backend, **kw)


def run_packed(batch, backend, **kw):
    p = packed(batch)
    return rk.delta_coefficients(
        p["hidden"], p["old_logp"], p["adv"], p["mask"], cu_seqlens=p["cu"], backend=backend, **kw
    )


LENGTHS = [7, 12, 0, 1, 9, 5, 12, 3]


# ----------------------------------------------------------------------------------------------------------------------
# one-shot vs the oracle
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [0, 1, 2, 3])
def test_matches_spec_oracle_padded_and_packed(backend, K):
    batch = make_batch(LENGTHS, seed=K, T=14)
    want = oracle(batch, K=K)
    got = run_op(batch, backend, iters=K)
    assert got.dtype == torch.float32 and got.shape == batch["mask"].shape
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    assert (got[~batch["mask"]] == 0).all()
    got_p = run_packed(batch, backend, iters=K)
    torch.testing.assert_close(
        got_p, padded_to_packed(got, cu_seqlens_from_lengths(batch["lengths"])), atol=1e-6, rtol=1e-6
    )
    # the coefficients are not trivial: they spread around 1 within [lam_min, lam_max] / mean(c)
    v = got[batch["mask"]]
    assert v.std() > 1e-3 and v.min() > 0.5 and v.max() < 1.6


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_and_fp16_hidden(backend):
    for dtype in (torch.bfloat16, torch.float16):
        batch = make_batch([9, 4, 13, 6], seed=11, dtype=dtype)
        got = run_op(batch, backend, iters=1)
        want = oracle(batch, K=1)  # the oracle sees the same rounded hidden values, in float64
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_advantages_and_options(backend):
    batch = make_batch([10, 6, 8, 1], seed=5)
    g = torch.Generator().manual_seed(3)
    adv_tok = batch["adv"][:, None] * (0.5 + torch.rand(batch["mask"].shape, generator=g))
    adv_tok[1, 2] = 0.0
    b2 = dict(batch, adv=adv_tok)
    got = run_op(b2, backend, iters=2, lam_min=0.5, lam_max=2.0, exclude_zero_adv=True)
    want = oracle(b2, K=2, lam_min=0.5, lam_max=2.0, exclude_zero_adv=True)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    nz = batch["mask"] & (adv_tok != 0)
    assert abs(float(got[nz].mean()) - 1.0) < 1e-5
    assert (got[batch["mask"] & (adv_tok == 0)] == 1).all()


# ----------------------------------------------------------------------------------------------------------------------
# spec invariances (delta.md section 3)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_invariances(backend):
    batch = make_batch([11, 7, 9, 4, 12, 6], seed=21)
    base = run_op(batch, backend)
    valid = batch["mask"]
    assert abs(float(base[valid].mean()) - 1.0) < 1e-6
    for transformed in (
        dict(batch, adv=batch["adv"] * 3.7),
        dict(batch, adv=-batch["adv"]),
        dict(batch, hidden=batch["hidden"] * 2.5),
    ):
        torch.testing.assert_close(run_op(transformed, backend), base, atol=1e-5, rtol=1e-5)
    ones = run_op(batch, backend, lam_min=1.1, lam_max=1.1)
    assert torch.equal(ones, valid.float())


lengths_st = st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=6)
advs_st = st.lists(st.sampled_from([-2.0, -1.0, -0.3, 0.0, 0.5, 1.0, 1.7]), min_size=6, max_size=6)


@HYP
@given(
    lengths=lengths_st, advs=advs_st, seed=st.integers(0, 2**16), K=st.integers(0, 2), backend=st.sampled_from(BACKENDS)
)
def test_property_mean_one_and_sign_flip(lengths, advs, seed, K, backend):
    adv = torch.tensor(advs[: len(lengths)])
    batch = make_batch(lengths, seed=seed, adv=adv)
    got = run_op(batch, backend, iters=K)
    valid = batch["mask"]
    assert torch.isfinite(got).all()
    assert (got[~valid] == 0).all()
    if valid.any():
        assert abs(float(got[valid].double().mean()) - 1.0) < 1e-5
        assert (got[valid] > 0).all()
    flipped = run_op(dict(batch, adv=-adv), backend, iters=K)
    torch.testing.assert_close(flipped, got, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# edge cases
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_side_reproduces_official(backend):
    """No A < 0 (and no A > 0): centroid 0 and gamma = sqrt(eps) = 1e-4 for the empty side (ambiguity 6)."""
    for adv in ([1.0, 0.0, 0.5, 2.0, 0.0], [-1.0, -0.2, 0.0, -3.0, -1.0]):
        batch = make_batch([8, 5, 9, 6, 7], seed=2, adv=adv)
        for K in (0, 1, 2):
            got = run_op(batch, backend, iters=K)
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got.double(), oracle(batch, K=K), atol=2e-5, rtol=1e-5)
        est = rk.DeltaEstimator(iters=1, backend=backend)
        for _ in est.phases():
            est.accumulate(batch["hidden"], batch["old_logp"], batch["adv"], batch["mask"])
        empty = 1 if adv[0] > 0 else 0
        assert float(est.gamma[empty]) == pytest.approx(1e-4, rel=1e-6)
        assert torch.equal(est.mu[empty], torch.zeros(H))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_advantages_rows_of_length_0_and_1(backend):
    batch = make_batch([5, 0, 1, 3], seed=4, adv=[0.0, 0.0, 0.0, 0.0])
    got = run_op(batch, backend)
    assert torch.allclose(got, batch["mask"].float(), atol=1e-6)
    got = run_op(batch, backend, exclude_zero_adv=True)
    assert torch.equal(got, batch["mask"].float())
    # rows of length 0 and 1 mixed with normal rows
    batch = make_batch([0, 1, 6, 1, 0, 8], seed=6, adv=[1.0, -1.0, 0.5, 0.7, -2.0, -0.4])
    got = run_op(batch, backend, iters=2)
    torch.testing.assert_close(got.double(), oracle(batch, K=2), atol=2e-5, rtol=1e-5)
    # a single token, and no token at all
    single = make_batch([1], seed=1, adv=[0.8])
    assert torch.allclose(run_op(single, backend), torch.ones(1, 1), atol=1e-6)
    none = make_batch([0, 0], seed=1, T=3)
    assert torch.equal(run_op(none, backend), torch.zeros(2, 3))
    empty = make_batch([2], seed=1, adv=[1.0])
    empty = {k: (v[:0] if k != "lengths" else v[:0]) for k, v in empty.items()}
    assert run_op(empty, backend).shape == (0, 2)


# ----------------------------------------------------------------------------------------------------------------------
# the Triton sweeps directly (small tiles: several column blocks, row blocks and splits)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sweeps_match_reference(dtype):
    g = torch.Generator().manual_seed(0)
    N = 45
    valid = torch.rand(N, generator=g) > 0.25
    big = torch.randn(N, 2 * H, generator=g).to(dtype)
    big[~valid] = float("nan")
    h = big[:, ::2]  # non-contiguous columns (the launchers copy), NaN on invalid rows
    mu = torch.randn(2, H, generator=g)
    w = torch.randn(N, 2, generator=g)
    hd = torch.where(valid[:, None], h.double(), 0.0)
    want_rows = torch.stack([hd @ mu[0].double(), hd @ mu[1].double(), (hd * hd).sum(1)], 1)
    want_cols = (w.double() * valid[:, None]).t() @ hd
    for kw in (dict(block_n=8, block_h=16), {}):
        got = kdelta.rowdot3(h, mu, valid, with_norm=True, **kw)
        torch.testing.assert_close(got.double(), want_rows, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(kdelta.rowdot3(h, mu, valid, **kw), got[:, :2])
        torch.testing.assert_close(
            rdelta.rowdot3(h, mu, valid, with_norm=True).double(), want_rows, atol=1e-4, rtol=1e-5
        )
        for splits in (1, 3, None):
            got = kdelta.colsum2(h, w, valid, splits=splits, **kw)
            torch.testing.assert_close(got.double(), want_cols, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(rdelta.colsum2(h, w, valid).double(), want_cols, atol=1e-4, rtol=1e-5)
    # deterministic: same bits twice
    assert torch.equal(kdelta.colsum2(h, w, valid, splits=3), kdelta.colsum2(h, w, valid, splits=3))
    assert kdelta.rowdot3(h[:0], mu, valid[:0]).shape == (0, 2)


_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rlvr_kernels.kernels import delta as kd

target = GPUTarget("cuda", 90, 32)
for dt, idx in (("*bf16", "i32"), ("*fp16", "i64"), ("*fp32", "i32")):
    sig = {"Hp": dt, "Mu": "*fp32", "Valid": "*i8", "Out": "*fp32", "N": idx, "Hdim": "i32", "stride_row": "i64",
           "n_row_blocks": "i32", "NORM": "constexpr", "NOUT": "constexpr", "BLOCK_N": "constexpr",
           "BLOCK_H": "constexpr"}
    norm = dt == "*bf16"
    const = {"NORM": norm, "NOUT": 3 if norm else 2, "BLOCK_N": kd.ROWDOT_BLOCK_N, "BLOCK_H": kd.ROWDOT_BLOCK_H}
    assert triton.compile(ASTSource(fn=kd._rowdot3_kernel, signature=sig, constexprs=const), target=target).asm["cubin"]
    sig = {"Hp": dt, "W": "*fp32", "Valid": "*i8", "Part": "*fp32", "N": idx, "Hdim": "i32", "stride_row": "i64",
           "rows_per_split": idx, "n_col_blocks": "i32", "BLOCK_N": "constexpr", "BLOCK_H": "constexpr"}
    const = {"BLOCK_N": kd.COLSUM_BLOCK_N, "BLOCK_H": kd.COLSUM_BLOCK_H}
    assert triton.compile(ASTSource(fn=kd._colsum2_kernel, signature=sig, constexprs=const), target=target).asm["cubin"]
print("compiled")
"""


def test_sweeps_compile_for_sm90(tmp_path):
    """The interpreter runs the kernels as NumPy; this compiles them for an H100 (sm_90) down to a cubin, with the
    bundled LLVM and ptxas, so compiled-mode-only errors (types, loop bounds) show up without a GPU."""
    import os
    import subprocess
    import sys

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is not available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------------------
# streaming
# ----------------------------------------------------------------------------------------------------------------------
def _micro_batches(seed=0):
    """Three micro-batches (two padded with different T, one packed), their packed forms and each one's cu_seqlens
    for unpacking results (None for the packed one)."""
    a = make_batch([7, 3, 0, 9], seed=seed)
    b = make_batch([5, 11], seed=seed + 1, T=13)
    c = packed(make_batch([4, 1, 8], seed=seed + 2))
    mbs = [
        dict(args=(a["hidden"], a["old_logp"], a["adv"], a["mask"]), kw={}),
        dict(args=(b["hidden"], b["old_logp"], b["adv"], b["mask"]), kw={}),
        dict(args=(c["hidden"], c["old_logp"], c["adv"], c["mask"]), kw=dict(cu_seqlens=c["cu"])),
    ]
    pa, pb = packed(a), packed(b)
    return mbs, [pa, pb, c], [pa["cu"], pb["cu"], None]


def _union(pieces):
    """Concatenate packed pieces into one packed batch."""
    cat = lambda k: torch.cat([p[k] for p in pieces])  # noqa: E731
    lens = torch.cat([p["cu"].diff() for p in pieces])
    return dict(
        hidden=cat("hidden"),
        old_logp=cat("old_logp"),
        adv=cat("adv"),
        mask=cat("mask"),
        cu=cu_seqlens_from_lengths(lens),
    )


def _one_shot(u, **kw):
    return rk.delta_coefficients(u["hidden"], u["old_logp"], u["adv"], u["mask"], cu_seqlens=u["cu"], **kw)


def _stream(est, mbs, explicit_finish=True):
    for _phase in est.phases():
        for mb in mbs:
            est.accumulate(*mb["args"], **mb["kw"])
        if explicit_finish:
            est.finish_phase()
    return [est.coefficients(*mb["args"], **mb["kw"]) for mb in mbs]


def _to_packed(outs, cus):
    return torch.cat([o if cu is None else padded_to_packed(o, cu) for o, cu in zip(outs, cus)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K,exclude", [(0, False), (1, False), (2, True)])
def test_streaming_equals_one_shot(backend, K, exclude):
    mbs, pieces, cus = _micro_batches()
    want = _one_shot(_union(pieces), iters=K, exclude_zero_adv=exclude, backend=backend)
    est = rk.DeltaEstimator(iters=K, exclude_zero_adv=exclude, backend=backend)
    assert est.phase_names == ("centroids", "gamma") + tuple(f"refine_{k}" for k in range(1, K + 1)) + ("normaliser",)
    outs = _stream(est, mbs, explicit_finish=(K != 1))
    assert est.done and est.phase is None
    for o, mb in zip(outs, mbs):
        assert o.shape == mb["args"][1].shape and o.dtype == torch.float32
    torch.testing.assert_close(_to_packed(outs, cus), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K,exclude", [(1, False), (2, True)])
def test_normalise_the_last_phase_raw_coefficients(backend, K, exclude):
    """accumulate() returns the raw coefficients in the "normaliser" phase; normalise() gives c~ from them without
    another sweep over the hidden states, equal to coefficients() and to the one-shot result."""
    mbs, pieces, cus = _micro_batches(seed=3)
    want = _one_shot(_union(pieces), iters=K, exclude_zero_adv=exclude, backend=backend)
    est = rk.DeltaEstimator(iters=K, exclude_zero_adv=exclude, backend=backend)
    raws = None
    for phase in est.phases():
        got = [est.accumulate(*mb["args"], **mb["kw"]) for mb in mbs]
        if phase == "normaliser":
            raws = got
        else:
            assert all(r is None for r in got)
    with pytest.raises(RuntimeError, match="open"):
        rk.DeltaEstimator(iters=K).normalise(raws[0], *mbs[0]["args"][2:])
    outs = [est.normalise(r, mb["args"][2], mb["args"][3], **mb["kw"]) for r, mb in zip(raws, mbs)]
    for o, r, mb in zip(outs, raws, mbs):
        assert o.shape == r.shape == mb["args"][1].shape and o.dtype == torch.float32
        torch.testing.assert_close(o, est.coefficients(*mb["args"], **mb["kw"]), atol=0, rtol=0)
    torch.testing.assert_close(_to_packed(outs, cus), want, atol=1e-5, rtol=1e-5)


class FakeGroup:
    """A SUM all-reduce across ``n`` threads (simulated ranks), in rank order on every rank."""

    def __init__(self, n):
        self.slots = [None] * n
        self.barrier = threading.Barrier(n, timeout=60)
        self.calls = [0] * n

    def hook(self, rank):
        def all_reduce(t):
            self.calls[rank] += 1
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = self.slots[0].clone()
            for x in self.slots[1:]:
                total += x
            self.barrier.wait()
            t.copy_(total)

        return all_reduce


@pytest.mark.parametrize("rank1_empty", [False, True])
def test_streaming_all_reduce_two_ranks_equals_union(rank1_empty):
    mbs, pieces, cus = _micro_batches(seed=7)
    shards = [mbs[:2], [] if rank1_empty else mbs[2:]]
    group = FakeGroup(2)
    results, errors = [None, None], []

    def rank_main(r):
        try:
            est = rk.DeltaEstimator(iters=1, all_reduce=group.hook(r), backend="torch", hidden_size=H, device="cpu")
            results[r] = _stream(est, shards[r], explicit_finish=False)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert group.calls == [4, 4]  # centroids, gamma, refine_1, normaliser
    if rank1_empty:
        want = _one_shot(_union(pieces[:2]), backend="torch")
        got = _to_packed(results[0], cus[:2])
    else:
        want = _one_shot(_union(pieces), backend="torch")
        got = torch.cat([_to_packed(results[0], cus[:2]), _to_packed(results[1], cus[2:])])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_streaming_protocol_errors_and_constant_lambda():
    mbs, _, _ = _micro_batches()
    est = rk.DeltaEstimator(iters=1, backend="torch")
    with pytest.raises(RuntimeError, match="still open"):
        est.coefficients(*mbs[0]["args"])
    est.accumulate(*mbs[0]["args"])
    with pytest.raises(ValueError, match="hidden size H = 8"):
        est.accumulate(torch.zeros(2, 3, 8), torch.zeros(2, 3), torch.ones(2), torch.ones(2, 3, dtype=torch.bool))
    est2 = rk.DeltaEstimator(iters=0, backend="torch")
    with pytest.raises(RuntimeError, match="no micro-batch"):
        est2.finish_phase()
    for _ in est.phases():
        pass
    with pytest.raises(RuntimeError, match="every phase is finished"):
        est.accumulate(*mbs[0]["args"])
    same = rk.DeltaEstimator(lam_min=1.0, lam_max=1.0)
    assert list(same.phases()) == [] and same.done
    assert torch.equal(same.coefficients(*mbs[0]["args"]), mbs[0]["args"][3].float())


# ----------------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_bad_input():
    b = make_batch([5, 3], seed=0)
    hid, lp, adv, mask = b["hidden"], b["old_logp"], b["adv"], b["mask"]
    f = rk.delta_coefficients
    with pytest.raises(ValueError, match="lam_min"):
        f(hid, lp, adv, mask, lam_min=0.0)
    with pytest.raises(ValueError, match="lam_max"):
        f(hid, lp, adv, mask, lam_min=1.0, lam_max=0.9)
    with pytest.raises(ValueError, match="iters"):
        f(hid, lp, adv, mask, iters=-1)
    with pytest.raises(TypeError, match="iters"):
        f(hid, lp, adv, mask, iters=1.5)
    with pytest.raises(ValueError, match="eps"):
        f(hid, lp, adv, mask, eps=0.0)
    with pytest.raises(TypeError, match="exclude_zero_adv"):
        f(hid, lp, adv, mask, exclude_zero_adv=1)
    with pytest.raises(ValueError, match="hidden_old"):
        f(hid[:, :-1], lp, adv, mask)
    with pytest.raises(ValueError, match="hidden_old"):
        f(hid[0], lp, adv, mask)
    with pytest.raises(ValueError, match="old_logp"):
        f(hid, lp[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        f(hid, lp, adv[:1], mask)
    with pytest.raises(TypeError, match="hidden_old"):
        f(hid.to(torch.int32), lp, adv, mask)
    with pytest.raises(TypeError, match="hidden_old"):
        f(hid.numpy(), lp, adv, mask)
    with pytest.raises(ValueError, match="hidden_old is on meta"):
        f(hid.to("meta"), lp, adv, mask)
    with pytest.raises(ValueError, match="hidden size H >= 1"):
        f(hid[..., :0], lp, adv, mask)
    with pytest.raises(ValueError, match="backend"):
        f(hid, lp, adv, mask, backend="cuda")
    bad = hid.clone()
    bad[0, 1, 3] = float("inf")
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="hidden_old has non-finite"):
            f(bad, lp, adv, mask, backend=backend)
    bad_lp = lp.clone()
    bad_lp[1, 0] = float("nan")
    with pytest.raises(ValueError, match="old_logp has non-finite"):
        f(hid, bad_lp, adv, mask)
    p = packed(b)
    with pytest.raises(ValueError, match="cu_seqlens"):
        f(p["hidden"], p["old_logp"], p["adv"], p["mask"], cu_seqlens=p["cu"] + 1)
    with pytest.raises(TypeError, match="cu_seqlens"):
        f(p["hidden"], p["old_logp"], p["adv"], p["mask"], cu_seqlens=p["cu"].float())
    with pytest.raises(ValueError, match="hidden_old must be \\[N, H\\]"):
        f(p["hidden"][1:], p["old_logp"], p["adv"], p["mask"], cu_seqlens=p["cu"])
    with pytest.raises(ValueError, match="lam_min"):
        rk.DeltaEstimator(lam_min=-1.0)
    with pytest.raises(TypeError, match="all_reduce"):
        rk.DeltaEstimator(all_reduce=3)


# ----------------------------------------------------------------------------------------------------------------------
# end to end: RLVRLoss(credit="delta") == DAPO with A * c~ per token == delta.md's delta_loss
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_loss_end_to_end(fused):
    gen = torch.Generator().manual_seed(0)
    B, T, Hh, V = 4, 6, 24, 97
    x = torch.randn(B, T, Hh, generator=gen) * 0.5
    W = torch.randn(V, Hh, generator=gen) * 0.5
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    adv = torch.tensor([1.2, -0.7, 0.0, 0.4])
    with torch.no_grad():
        lp_now = torch.log_softmax(x @ W.t(), -1).gather(-1, ids[..., None])[..., 0]
    old = lp_now + torch.randn(B, T, generator=gen) * 0.3
    h_old = x + 0.05 * torch.randn(B, T, Hh, generator=gen)  # theta_old's hidden states
    coef = rk.delta_coefficients(h_old, old, adv, mask)
    assert abs(float(coef[mask].mean()) - 1) < 1e-6
    kw = dict(
        loss_type="dapo", beta=0.0, epsilon_low=0.2, epsilon_high=0.28, dual_clip=10.0, log_ratio_clip=20.0, fused=fused
    )

    def run(module, advantages, **extra):
        xx, ww = x.clone().requires_grad_(), W.clone().requires_grad_()
        loss, _ = module(xx, ww, ids, mask.float(), advantages, old_per_token_logps=old, **extra)
        loss.backward()
        return loss.detach(), xx.grad, ww.grad

    got = run(rk.RLVRLoss(credit="delta", **kw), adv, delta_coefficients=coef)
    dapo = run(rk.RLVRLoss(**kw), adv[:, None] * coef)
    for a, b in zip(got, dapo):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # delta.md section 6's delta_loss, float64, plain autograd
    xx, ww = x.double().requires_grad_(), W.double().requires_grad_()
    logp = torch.log_softmax(xx @ ww.t(), -1).gather(-1, ids[..., None])[..., 0]
    A = adv.double()[:, None] * coef.double()
    r = (logp - old.double()).clamp(-20, 20).exp()
    tok = torch.maximum(-A * r, -A * r.clamp(1 - 0.2, 1 + 0.28))
    tok = torch.where(A < 0, torch.minimum(tok, -A * 10.0), tok)
    m = mask.double()
    want = (tok * m).sum() / m.sum()
    want.backward()
    torch.testing.assert_close(got[0].double(), want.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1].double(), xx.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[2].double(), ww.grad, atol=1e-6, rtol=1e-5)
