"""CPPO token mask (arXiv 2606.10968v2; spec cppo.md) on both CPU backends and both layouts.

The oracle here is an independent float64 plain-Python loop over each row's tokens, written from Alg. 1 (S and W
updated at every token, threshold, mask), with the dynamic budget from ``torch.quantile`` in float64. It does not call
rlvr_kernels.reference.
"""

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlvr_kernels as rk
from rlvr_kernels import _backend
from rlvr_kernels.cppo import CPPOAnchorWarning
from rlvr_kernels.layout import cu_seqlens_from_lengths, padded_to_packed

BACKENDS = ("torch", "triton")
BUDGETS = ("dynamic", "fixed", "none")
DIVERGENCES = ("binary_tv", "binary_kl", "topk_tv", "topk_kl")
BLOCK = 16  # small blocks: short rows already cross several block boundaries in the kernel
HYP = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
V, K = 12, 4  # toy vocabulary and top-K width


# ----------------------------------------------------------------------------------------------------------------------
# independent oracle (plain Python, float64)
# ----------------------------------------------------------------------------------------------------------------------
def _log(p):
    return math.log(max(p, 1e-12))


def py_divergence(kind, lp, lm, tk=None, tkm=None):
    if kind == "binary_tv":
        return abs(math.exp(lp) - math.exp(lm))
    if kind == "binary_kl":
        mu, pi = math.exp(min(lm, 0.0)), math.exp(min(lp, 0.0))
        return max(0.0, mu * (_log(mu) - _log(pi)) + (1 - mu) * (_log(1 - mu) - _log(1 - pi)))
    p = [math.exp(x) for x in tk]
    pm = [math.exp(x) for x in tkm]
    o, om = max(1 - sum(p), 0.0), max(1 - sum(pm), 0.0)
    if kind == "topk_tv":
        return 0.5 * (sum(abs(a - b) for a, b in zip(pm, p)) + abs(om - o))
    kl = sum(b * (_log(b) - _log(a)) for a, b in zip(p, pm)) + om * (_log(om) - _log(o))
    return max(0.0, kl)


def py_cppo(
    lp,
    lm,
    adv,
    valid,
    *,
    kind="binary_tv",
    tk=None,
    tkm=None,
    delta=0.15,
    w_min=0.8,
    delta_b=0.02,
    budget="dynamic",
    quantile=0.9,
    max_mult=2.0,
    quantile_scale=1.0,
    horizon=None,
):
    """Alg. 1 literally, one row at a time. Lists in, dict of lists out (plus |Z - c| and W for tie tolerance)."""
    out = dict(mask=[], D=[], w=[], db=[], margin=[], W=[])
    for b, row in enumerate(valid):
        T = len(row)
        idx = [t for t in range(T) if row[t]]
        L = idx[-1] + 1 if idx else 0
        H = horizon if horizon is not None else L
        D = [
            py_divergence(kind, lp[b][t], lm[b][t], tk[b][t] if tk else None, tkm[b][t] if tkm else None)
            if row[t]
            else 0.0
            for t in range(T)
        ]
        if budget == "fixed":
            db = delta_b
        elif budget == "none":
            db = math.inf
        elif not idx:
            db = delta_b
        else:
            qv = torch.quantile(torch.tensor([D[t] for t in idx], dtype=torch.float64), quantile).item()
            db = min(max(quantile_scale * qv, delta_b), max_mult * delta_b)
        S = W = 0.0
        m_row, w_row, marg, W_row = [], [], [], []
        for t in range(T):
            w = 1 - (1 - w_min) * min(t / max(H - 1, 1), 1.0) if row[t] else 0.0
            z = w * D[t]
            c = delta if budget == "none" else min(delta, delta + db * W - S)
            a = adv[b][t] if isinstance(adv[b], list) else adv[b]
            rho = math.exp(min(max(lp[b][t] - lm[b][t], -20.0), 20.0)) if row[t] else 1.0
            toward = a * (rho - 1) <= 0
            m_row.append(bool(row[t]) and (toward or z <= c))
            w_row.append(w)
            marg.append(abs(z - c) if not toward else math.inf)
            W_row.append(W)
            S += z  # every token counts, whatever its mask (Alg. 1 line 9)
            W += w
        out["mask"].append(m_row)
        out["D"].append(D)
        out["w"].append(w_row)
        out["db"].append(db)
        out["margin"].append(marg)
        out["W"].append(W_row)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# batches: consistent toy distributions, so the binary and the Top-K divergences describe the same policies
# ----------------------------------------------------------------------------------------------------------------------
def make_batch(lengths, pad, seed, *, holes=False, noise=0.5, ties=False, zero_adv=True):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    T = (max(lengths) if lengths else 0) + pad
    lens = torch.tensor(lengths, dtype=torch.long)
    mask = torch.arange(T)[None, :] < lens[:, None]
    if holes:
        mask &= torch.rand(B, T, generator=g) < 0.75
    z_mu = torch.randn(B, T, V, generator=g) * 1.5
    z_pi = z_mu + torch.randn(B, T, V, generator=g) * noise
    if ties:  # a handful of distinct policies: many equal divergences in a row
        pick = torch.randint(0, 3, (B, T), generator=g)
        z_mu, z_pi = z_mu[0, 0][None, None].expand(B, T, V).clone(), z_pi[0, :3][pick]
    logmu = torch.log_softmax(z_mu, -1)
    logpi = torch.log_softmax(z_pi, -1)
    a_t = torch.multinomial(logmu.reshape(-1, V).exp(), 1, generator=g).reshape(B, T)
    lp = logpi.gather(-1, a_t[..., None])[..., 0]
    lm = logmu.gather(-1, a_t[..., None])[..., 0]
    # Stable-RL fixed width: TopK(mu), a_t replacing the K-th id when it is not among them
    ids = logmu.topk(K, dim=-1).indices
    has = (ids == a_t[..., None]).any(-1)
    ids[..., -1] = torch.where(has, ids[..., -1], a_t)
    tk, tkm = logpi.gather(-1, ids), logmu.gather(-1, ids)
    adv_row = torch.randn(B, generator=g)
    if zero_adv and B:
        adv_row[::3] = 0.0
    adv_tok = torch.randn(B, T, generator=g)
    # garbage in the padding must not leak into any result
    nan = torch.tensor(float("nan"))
    lp = torch.where(mask, lp, nan)
    lm = torch.where(mask, lm, torch.tensor(float("inf")))
    adv_tok = torch.where(mask, adv_tok, nan)
    tk = torch.where(mask[..., None], tk, nan)
    tkm = torch.where(mask[..., None], tkm, nan)
    return dict(
        mask=mask,
        lp=lp,
        lm=lm,
        adv_row=adv_row,
        adv_tok=adv_tok,
        tk=tk,
        tkm=tkm,
        cu=cu_seqlens_from_lengths(lens),
        lens=lens,
    )


def run(batch, backend, *, per_token=False, packed=False, divergence="binary_tv", **kw):
    adv = batch["adv_tok"] if per_token else batch["adv_row"]
    extra = {}
    if divergence.startswith("topk"):
        extra = dict(logp_topk=batch["tk"], logp_mu_topk=batch["tkm"])
    args = (batch["lp"], batch["lm"], adv, batch["mask"])
    if packed:
        cu = batch["cu"]
        lp, lm, m = (padded_to_packed(x, cu) for x in (batch["lp"], batch["lm"], batch["mask"]))
        if per_token:
            adv = padded_to_packed(adv, cu)
        elif adv.numel() == int(cu[-1]):
            adv = adv[:, None]  # a 1-D tensor of length total is read per token
        args = (lp, lm, adv, m)
        extra = {k: padded_to_packed(v, cu) for k, v in extra.items()}
        extra["cu_seqlens"] = cu
    return rk.cppo_mask(*args, backend=backend, divergence=divergence, block_size=BLOCK, **extra, **kw)


def oracle(batch, *, per_token=False, divergence="binary_tv", **kw):
    mask = batch["mask"]
    adv = batch["adv_tok"] if per_token else batch["adv_row"]
    tk = batch["tk"].double().tolist() if divergence.startswith("topk") else None
    tkm = batch["tkm"].double().tolist() if divergence.startswith("topk") else None
    return py_cppo(
        batch["lp"].double().tolist(),
        batch["lm"].double().tolist(),
        adv.double().tolist(),
        mask.tolist(),
        kind=divergence,
        tk=tk,
        tkm=tkm,
        **kw,
    )


def check_against(res, want, mask, *, tol=1e-5):
    """Compare a CPPOMask with the oracle; mask disagreements are allowed only at near-ties ``|Z - c| <= tol``."""
    B = mask.shape[0]
    assert res.mask.dtype == torch.bool and res.mask.shape == mask.shape
    for name in ("divergence", "weight"):
        x = getattr(res, name)
        assert x.dtype == torch.float32 and x.shape == mask.shape and not x.requires_grad
    assert res.delta_b.dtype == torch.float32 and res.delta_b.shape == (B,)
    D = torch.tensor(want["D"], dtype=torch.float64).reshape(mask.shape)
    torch.testing.assert_close(res.divergence.double(), D, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(
        res.weight.double(), torch.tensor(want["w"], dtype=torch.float64).reshape(mask.shape), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        res.delta_b.double(), torch.tensor(want["db"], dtype=torch.float64), atol=1e-7, rtol=1e-5
    )
    wm = torch.tensor(want["mask"], dtype=torch.bool).reshape(mask.shape)
    margin = torch.tensor(want["margin"], dtype=torch.float64).reshape(mask.shape)
    W = torch.tensor(want["W"], dtype=torch.float64).reshape(mask.shape)
    diff = res.mask != wm
    assert not (diff & (margin > tol + 2e-7 * W)).any(), "mask differs from the oracle away from a tie"
    assert int(diff.sum()) <= max(1, mask.numel() // 100)
    assert not res.mask[~mask].any()
    n = int(mask.sum())
    frac = (int((mask & ~res.mask).sum()) / n) if n else 0.0
    assert res.masked_fraction.shape == () and res.masked_fraction.item() == pytest.approx(frac, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# against the oracle
# ----------------------------------------------------------------------------------------------------------------------
LENGTHS = [0, 1, 2, 17, 33, 5]  # T = 35: not a multiple of the block


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_loop_oracle(backend, budget, divergence):
    i = BUDGETS.index(budget) + 3 * DIVERGENCES.index(divergence)
    per_token, horizon, holes = bool(i % 2), (None, 40, None, 8)[i % 4], i % 3 == 2
    batch = make_batch(LENGTHS, 2, seed=i, holes=holes, noise=0.4 + 0.1 * (i % 3))
    kw = dict(budget=budget, horizon=horizon, divergence=divergence, per_token=per_token)
    if divergence.endswith("kl"):
        kw.update(delta=0.1, delta_b=0.002)  # the paper's KL thresholds (A7)
    res = run(batch, backend, **kw)
    check_against(res, oracle(batch, **kw), batch["mask"])


@pytest.mark.parametrize("horizon", [None, 1, 3, 50])
@pytest.mark.parametrize("per_token", [False, True])
def test_torch_backend_horizons_and_advantages(horizon, per_token):
    batch = make_batch([0, 1, 2, 40, 23], 3, seed=7, holes=True)
    for budget in BUDGETS:
        kw = dict(budget=budget, horizon=horizon, per_token=per_token, quantile=0.75, quantile_scale=1.3, max_mult=3.0)
        check_against(run(batch, "torch", **kw), oracle(batch, **kw), batch["mask"])


def test_zero_advantages_keep_every_token_in_both_backends():
    batch = make_batch([9, 30], 1, seed=3, noise=2.0)
    batch["adv_row"] = torch.zeros(2)
    for backend in BACKENDS:
        res = run(batch, backend, budget="fixed")
        assert torch.equal(res.mask, batch["mask"])
        assert res.masked_fraction.item() == 0.0


def test_budget_binds_and_masks_more_than_the_delta_threshold():
    """Divergences near delta_b: the prefix budget, not delta, masks tokens (and both backends see it)."""
    batch = make_batch([300], 0, seed=11, noise=0.6, zero_adv=False)
    kw = dict(budget="fixed", delta_b=0.02)
    want = oracle(batch, **kw)
    loose = oracle(batch, **dict(kw, budget="none"))
    n_budget = sum(a and not b for a, b in zip(loose["mask"][0], want["mask"][0]))
    assert n_budget > 10
    for backend in BACKENDS:
        check_against(run(batch, backend, **kw), want, batch["mask"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_budget_is_the_linear_quantile(backend):
    """With a clamp that never binds, delta_b is the row's linear-interpolation quantile of D (ties included)."""
    lengths = list(range(1, 13))
    batch = make_batch(lengths, 0, seed=5, ties=True)
    for q in (0.9, 0.5, 0.0, 1.0, 0.33):
        res = run(batch, backend, quantile=q, delta_b=1e-9, max_mult=1e9)
        for b, n in enumerate(lengths):
            d = res.divergence[b, :n].double()
            want = torch.quantile(d, q).item()
            assert res.delta_b[b].item() == pytest.approx(max(want, 1e-9), rel=1e-6, abs=1e-9), (q, n)


# ----------------------------------------------------------------------------------------------------------------------
# layouts, properties
# ----------------------------------------------------------------------------------------------------------------------
def assert_same(a, b):
    for name in ("mask", "divergence", "weight", "delta_b", "masked_fraction"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.filterwarnings("ignore::rlvr_kernels.cppo.CPPOAnchorWarning")  # noise = 0 draws mu = pi
@HYP
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    pad=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
    holes=st.booleans(),
    noise=st.floats(0.0, 3.0),
    per_token=st.booleans(),
    budget=st.sampled_from(BUDGETS),
    divergence=st.sampled_from(DIVERGENCES),
    horizon=st.sampled_from([None, None, 1, 16, 45]),
    backend=st.sampled_from(BACKENDS),
)
def test_padded_and_packed_agree_with_each_other_and_the_oracle(
    lengths, pad, seed, holes, noise, per_token, budget, divergence, horizon, backend
):
    batch = make_batch(lengths, pad, seed, holes=holes, noise=noise)
    kw = dict(per_token=per_token, budget=budget, divergence=divergence, horizon=horizon)
    res = run(batch, backend, **kw)
    res_p = run(batch, backend, packed=True, **kw)
    cu = batch["cu"]
    for name in ("mask", "divergence", "weight"):
        assert torch.equal(padded_to_packed(getattr(res, name), cu), getattr(res_p, name)), name
    assert torch.equal(res.delta_b, res_p.delta_b)
    assert torch.equal(res.masked_fraction, res_p.masked_fraction)
    check_against(res, oracle(batch, **kw), batch["mask"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dppo_special_case(backend):
    """budget='none' with w_min=1 is DPPO's Binary-TV mask: keep if A (rho - 1) <= 0 or |pi(a) - mu(a)| <= delta."""
    batch = make_batch([30, 7, 0, 19], 2, seed=21, noise=1.5, holes=True)
    m, lp, lm = batch["mask"], batch["lp"], batch["lm"]
    for per_token in (False, True):
        A = batch["adv_tok"] if per_token else batch["adv_row"][:, None]
        res = run(batch, backend, per_token=per_token, budget="none", w_min=1.0, delta=0.1)
        rho = torch.exp((lp - lm).clamp(-20, 20))
        dppo = m & ((A * (rho - 1) <= 0) | ((lp.exp() - lm.exp()).abs() <= 0.1))
        assert torch.equal(res.mask, dppo)
        assert res.mask.sum() < m.sum()  # the threshold does mask something here


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_valid_tokens_and_empty_inputs(backend):
    m = torch.zeros(3, 5, dtype=torch.bool)
    x = torch.zeros(3, 5)
    res = rk.cppo_mask(x, x - 0.1, torch.ones(3), m, backend=backend)
    assert not res.mask.any() and res.masked_fraction.item() == 0.0
    assert torch.equal(res.delta_b, torch.full((3,), 0.02))
    assert torch.isfinite(res.divergence).all() and not res.divergence.any()
    for B, T in ((0, 4), (2, 0), (0, 0)):
        z = torch.zeros(B, T)
        res = rk.cppo_mask(z, z, torch.zeros(B), torch.zeros(B, T, dtype=torch.bool), backend=backend)
        assert res.mask.shape == (B, T) and res.divergence.shape == (B, T) and res.weight.shape == (B, T)
        assert torch.equal(res.delta_b, torch.full((B,), 0.02)) and res.masked_fraction.item() == 0.0
    e = torch.zeros(0)
    cu = torch.tensor([0, 0, 0])
    res = rk.cppo_mask(e, e, torch.zeros(2), e.bool(), cu_seqlens=cu, backend=backend, budget="none")
    assert res.mask.shape == (0,) and torch.equal(res.delta_b, torch.full((2,), math.inf))


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_probabilities_stay_finite(backend):
    """pi(a) or mu(a) at 0 or 1, -inf Top-K columns: every divergence finite, no NaN in any output."""
    lp = torch.tensor([[0.0, -80.0, 0.0, -1e-9, -30.0]])
    lm = torch.tensor([[-80.0, 0.0, 0.0, -60.0, -1e-9]])
    tk = torch.tensor([[0.0, float("-inf")], [-80.0, float("-inf")], [0.0, -90.0], [-1e-9, -40.0], [-30.0, -1e-9]])
    tkm = torch.tensor([[-80.0, -1e-9], [0.0, -70.0], [0.0, float("-inf")], [-60.0, -1e-9], [-1e-9, -40.0]])
    m = torch.ones(1, 5, dtype=torch.bool)
    for div in DIVERGENCES:
        extra = dict(logp_topk=tk[None], logp_mu_topk=tkm[None]) if div.startswith("topk") else {}
        res = rk.cppo_mask(lp, lm, torch.tensor([1.0]), m, divergence=div, backend=backend, **extra)
        assert torch.isfinite(res.divergence).all() and (res.divergence >= 0).all(), div
        assert torch.isfinite(res.delta_b).all()
        want = [py_divergence(div, lp[0, t].item(), lm[0, t].item(), tk[t].tolist(), tkm[t].tolist()) for t in range(5)]
        torch.testing.assert_close(
            res.divergence[0].double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-5
        )


def test_topk_conventions():
    """Top-K TV is a lower bound on the exact TV; a -inf column (the K+1 union when a_t is in the top-K) is a no-op."""
    batch = make_batch([20, 11], 0, seed=2, noise=1.0)
    res = run(batch, "torch", divergence="topk_tv")
    m = batch["mask"]
    ninf = torch.full(batch["tk"].shape[:-1] + (1,), float("-inf"))
    for div in ("topk_tv", "topk_kl"):
        a = run(batch, "torch", divergence=div)
        wider = dict(batch, tk=torch.cat([batch["tk"], ninf], -1), tkm=torch.cat([batch["tkm"], ninf], -1))
        b = run(wider, "torch", divergence=div)
        torch.testing.assert_close(a.divergence, b.divergence, atol=1e-7, rtol=1e-6)
    # exact TV from the full distributions is >= the reduced one (rebuild them: same seed, same draws)
    g = torch.Generator().manual_seed(2)
    z_mu = torch.randn(2, 20, V, generator=g) * 1.5
    z_pi = z_mu + torch.randn(2, 20, V, generator=g) * 1.0
    tv = 0.5 * (torch.softmax(z_mu, -1) - torch.softmax(z_pi, -1)).abs().sum(-1)
    assert (res.divergence[m] <= tv[m] + 1e-6).all()
    assert (res.divergence[m] > 0).all()


def test_bf16_and_fp16_inputs_match_their_fp32_values():
    batch = make_batch([25, 9], 1, seed=9)
    for dt in (torch.bfloat16, torch.float16):
        low = dict(batch, lp=batch["lp"].to(dt), lm=batch["lm"].to(dt), adv_row=batch["adv_row"].to(dt))
        up = dict(batch, lp=low["lp"].float(), lm=low["lm"].float(), adv_row=low["adv_row"].float())
        want = run(up, "torch")
        for backend in BACKENDS:
            got = run(low, backend)
            assert torch.equal(got.mask, want.mask), (dt, backend)
            torch.testing.assert_close(got.divergence, want.divergence, atol=1e-6, rtol=1e-6)


def test_outputs_are_detached_and_inputs_untouched():
    batch = make_batch([12, 5], 0, seed=4)
    lp = batch["lp"].clone().requires_grad_(True)
    before = lp.detach().clone()
    res = rk.cppo_mask(lp, batch["lm"], batch["adv_row"], batch["mask"])
    assert isinstance(res, rk.CPPOMask)
    assert not any(t.requires_grad for t in (res.mask, res.divergence, res.weight, res.delta_b, res.masked_fraction))
    torch.testing.assert_close(lp.detach(), before, atol=0, rtol=0, equal_nan=True)


def test_non_contiguous_inputs():
    batch = make_batch([14, 6, 0], 2, seed=6)
    want = run(batch, "torch", per_token=True)
    wide = {k: torch.stack([batch[k], torch.zeros_like(batch[k])], -1)[..., 0] for k in ("lp", "lm", "adv_tok")}
    assert not wide["lp"].is_contiguous()
    for backend in BACKENDS:
        got = run(dict(batch, **wide), backend, per_token=True)
        assert torch.equal(got.mask, want.mask)
        torch.testing.assert_close(got.divergence, want.divergence, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Triton specifics: long rows, grid loop
# ----------------------------------------------------------------------------------------------------------------------
def test_triton_long_row_small_block():
    """One row of 2500 tokens with block 32: the carry crosses ~80 blocks; the quantile select crosses blocks too."""
    batch = make_batch([2500, 3], 0, seed=13, noise=0.5, zero_adv=False)
    kw = dict(budget="dynamic", per_token=True, horizon=None)
    want = oracle(batch, **kw)
    adv = batch["adv_tok"]
    res = rk.cppo_mask(batch["lp"], batch["lm"], adv, batch["mask"], budget="dynamic", backend="triton", block_size=32)
    check_against(res, want, batch["mask"])
    assert 0 < res.masked_fraction.item() < 1


def test_triton_grid_loops_over_rows(monkeypatch):
    monkeypatch.setattr(_backend, "max_grid", lambda: 2)
    batch = make_batch([5, 0, 19, 1, 33, 8, 2], 1, seed=17, holes=True)
    for budget in ("dynamic", "fixed"):
        a = run(batch, "triton", budget=budget)
        check_against(a, oracle(batch, budget=budget), batch["mask"])


# ----------------------------------------------------------------------------------------------------------------------
# A9 warning, bad input
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_anchor_warns(backend):
    batch = make_batch([6, 3], 1, seed=1)
    lp = batch["lp"]
    with pytest.warns(CPPOAnchorWarning, match="logp_mu equals logp"):
        res = rk.cppo_mask(lp, lp.clone(), batch["adv_row"], batch["mask"], backend=backend)
    assert torch.equal(res.mask, batch["mask"]) and not res.divergence.any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rk.cppo_mask(lp, batch["lm"], batch["adv_row"], batch["mask"], backend=backend)


def _bad_cases():
    m = torch.ones(2, 4, dtype=torch.bool)
    x = torch.zeros(2, 4) - 1.0
    y = x - 0.1
    a = torch.ones(2)
    tk = torch.full((2, 4, 3), -2.0)
    ok = dict(logp=x, logp_mu=y, advantages=a, mask=m)
    cases = [
        (dict(delta=0.0), ValueError, "delta"),
        (dict(delta=-1.0), ValueError, "delta"),
        (dict(w_min=0.0), ValueError, "w_min"),
        (dict(w_min=1.5), ValueError, "w_min"),
        (dict(delta_b=-0.01), ValueError, "delta_b"),
        (dict(quantile=1.5), ValueError, "quantile"),
        (dict(quantile=-0.1), ValueError, "quantile"),
        (dict(max_mult=0.5), ValueError, "max_mult"),
        (dict(horizon=0), ValueError, "horizon"),
        (dict(horizon=2.5), TypeError, "horizon"),
        (dict(budget="adaptive"), ValueError, r"budget must be one of \('dynamic', 'fixed', 'none'\)"),
        (dict(divergence="tv"), ValueError, "divergence must be one of .*binary_tv.*topk_kl"),
        (dict(divergence="topk_tv"), ValueError, "logp_topk"),
        (dict(divergence="topk_kl", logp_topk=tk, logp_mu_topk=tk[..., :2]), ValueError, "same shape"),
        (dict(divergence="topk_tv", logp_topk=tk[0], logp_mu_topk=tk[0]), ValueError, "logp_topk must have shape"),
        (dict(divergence="topk_tv", logp_topk=tk.long(), logp_mu_topk=tk), TypeError, "logp_topk"),
        (dict(logp_topk=tk, logp_mu_topk=tk), ValueError, "only used by the topk"),
        (dict(logp=x.long()), TypeError, "logp must be a floating-point"),
        (dict(logp_mu=y[:, :3]), ValueError, "logp_mu must have the shape"),
        (dict(advantages=torch.ones(3)), ValueError, "advantages"),
        (
            dict(logp=x.clone().index_put_((torch.tensor([0]), torch.tensor([1])), torch.tensor(float("nan")))),
            ValueError,
            "logp has non-finite",
        ),
        (dict(mask=m[0]), ValueError, "mask"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(cu_seqlens=torch.tensor([0, 8])), ValueError, "mask must be 1-D"),
        (
            dict(
                logp=x.reshape(-1),
                logp_mu=y.reshape(-1),
                mask=m.reshape(-1),
                advantages=a,
                cu_seqlens=torch.tensor([0, 3, 7]),
            ),
            ValueError,
            "cu_seqlens must end",
        ),
        (
            dict(
                logp=x.reshape(-1),
                logp_mu=y.reshape(-1),
                mask=m.reshape(-1),
                advantages=a,
                cu_seqlens=torch.tensor([0.0, 8.0]),
            ),
            TypeError,
            "cu_seqlens must be an integer",
        ),
        (dict(logp="x"), TypeError, "logp must be a torch.Tensor"),
        (dict(block_size=24), ValueError, "block_size"),
    ]
    return [(dict(ok, **kw), exc, match) for kw, exc, match in cases]


@pytest.mark.parametrize("kwargs,exc,match", _bad_cases())
def test_bad_input(kwargs, exc, match):
    kwargs = dict(kwargs)
    args = [kwargs.pop(k) for k in ("logp", "logp_mu", "advantages", "mask")]
    with pytest.raises(exc, match=match):
        rk.cppo_mask(*args, **kwargs)


@pytest.mark.gpu
def test_gpu_matches_torch_on_long_rows_and_many_rows():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    for B, T in ((2, 70000), (70000, 5)):
        lp = -torch.rand(B, T, device=dev, generator=g) * 3
        lm = lp + torch.randn(B, T, device=dev, generator=g) * 0.05
        m = torch.rand(B, T, device=dev, generator=g) < 0.95
        A = torch.randn(B, device=dev, generator=g)
        for budget in BUDGETS:
            a = rk.cppo_mask(lp, lm, A, m, budget=budget, backend="triton")
            b = rk.cppo_mask(lp, lm, A, m, budget=budget, backend="torch")
            torch.testing.assert_close(a.delta_b, b.delta_b, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(a.weight, b.weight, atol=1e-6, rtol=1e-6)
            assert (a.mask != b.mask).float().mean().item() < 1e-4
