"""The users' conditions for the vocabulary-pass ops and RLVRLoss: autocast (bf16, as TRL's default), NaN/inf left in
padded positions by attention kernels, numbers at the edge of fp32, empty batches, repeated backward, and a clear
error for every argument the entry points cannot honour. The token ops have theirs in test_token_ops_inert.py,
the trainers in test_trl_users.py / test_verl_users.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlvr_kernels import RLVRLoss, TemporalSchedule, fused_linear_logprobs, logprobs_from_logits
from rlvr_kernels.loss import LossMetrics

BACKENDS = ["torch", "triton"]
POISON = [float("nan"), float("inf"), float("-inf"), 1e38]


def _data(seed=0, B=3, T=6, H=8, V=40):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.5
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        lp, _ = fused_linear_logprobs(x, w, ids)
    old = lp + 0.2 * torch.randn(B, T, generator=g)
    ref = lp + 0.1 * torch.randn(B, T, generator=g)
    return x, w, ids, mask, adv, old, ref


def _grads(fn, *leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return out, [t.grad for t in leaves]


# ----------------------------------------------------------------------------------------------------------------
# autocast (TRL's bf16=True runs the loss under torch.autocast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_logprobs_under_autocast_is_the_lm_head_in_bf16(backend):
    x, w, ids, *_ = _data()
    b = torch.randn(w.shape[0]) * 0.1

    def under_autocast(x, w, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp, ent = fused_linear_logprobs(x, w, ids, bias=b, temperature=0.7, backend=backend)
            (lp.sum() + 0.3 * ent.sum()).backward()  # backward inside the context too
        return lp, ent

    def bf16(x, w, b):
        lp, ent = fused_linear_logprobs(
            x.bfloat16(), w.bfloat16(), ids, bias=b.bfloat16(), temperature=0.7, backend=backend
        )
        (lp.sum() + 0.3 * ent.sum()).backward()
        return lp, ent

    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    got = under_autocast(*leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    want = bf16(*ref_leaves)
    for a, e in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    for a, e in zip(leaves, ref_leaves):
        assert a.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad, e.grad, rtol=0, atol=0)
    # and close to the fp32 op, within bf16 rounding of the GEMM operands
    lp32, _ = fused_linear_logprobs(x, w, ids, bias=b, temperature=0.7)
    torch.testing.assert_close(got[0], lp32, rtol=0.05, atol=0.1)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kw",
    [
        dict(loss_type="dapo", beta=0.04),
        dict(loss_type="grpo", beta=0.0, entropy_coef=0.01),
        dict(loss_type="dppo", beta=0.0),
        dict(loss_type="cppo", beta=0.0),
    ],
    ids=lambda k: k["loss_type"],
)
def test_rlvr_loss_under_autocast_equals_bf16_inputs(kw, backend, fused):
    x, w, ids, mask, adv, old, ref = _data()
    loss_fn = RLVRLoss(fused=fused, backend=backend, **kw)

    def call(x, w, cast):
        if cast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return loss_fn(x, w, ids, mask, adv, old_per_token_logps=old, ref_per_token_logps=ref)
        return loss_fn(x.bfloat16(), w.bfloat16(), ids, mask, adv, old_per_token_logps=old, ref_per_token_logps=ref)

    (l1, m1), g1 = _grads(lambda x, w: call(x, w, True), x, w)
    (l2, m2), g2 = _grads(lambda x, w: call(x, w, False), x, w)
    assert torch.isfinite(l1)
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    for a, e in zip(g1, g2):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_rlvr_loss_under_autocast_matches_liger_under_autocast():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    x, w, ids, mask, adv, old, ref = _data(B=4, T=5, H=16, V=64)
    kw = dict(beta=0.04, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28)
    out = {}
    for name, mod in (("ours", RLVRLoss(**kw)), ("liger", LigerFusedLinearGRPOLoss(**kw, compiled=False))):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = mod(xx, ww, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
        loss.backward()
        out[name] = (loss.detach().float(), xx.grad, ww.grad)
    for a, e in zip(out["ours"], out["liger"]):
        torch.testing.assert_close(a.float(), e.float(), rtol=0.05, atol=2e-3)


def test_loss_metrics_survive_a_trainer_rebuilding_them():
    """accelerate's fp32 output conversion (bf16=True) rebuilds lists as type(x)(iterable)."""
    x, w, ids, mask, adv, old, _ = _data()
    _, metrics = RLVRLoss(beta=0.0)(x, w, ids, mask, adv, old_per_token_logps=old)
    rebuilt = type(metrics)(t.float() for t in metrics)
    assert isinstance(rebuilt, LossMetrics) and len(rebuilt) == len(metrics)
    torch.testing.assert_close(rebuilt[-1], metrics[-1])
    assert set(metrics.keys()) >= {"clip_ratio", "entropy", "active_fraction"}


# ----------------------------------------------------------------------------------------------------------------
# NaN / inf in every position that takes no part in the result


@settings(max_examples=12, deadline=None)
@given(poison=st.sampled_from(POISON), backend=st.sampled_from(BACKENDS), seed=st.integers(0, 3), gather=st.booleans())
def test_fused_linear_logprobs_ignored_rows_are_inert(poison, backend, seed, gather):
    x, w, ids, mask, *_ = _data(seed)
    t = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    top = torch.randint(0, w.shape[0], ids.shape + (3,), generator=torch.Generator().manual_seed(seed))
    extra = dict(gather_ids=top) if gather else {}

    def fn(x, w):
        out = fused_linear_logprobs(x, w, t, temperature=0.9, backend=backend, **extra)
        loss = out[0].sum() + 0.5 * out[1].sum() + (out[2].sum() if gather else 0)
        return (loss,) + tuple(out)

    clean = x.clone()
    clean[~mask.bool()] = 0.0
    dirty = x.clone()
    dirty[~mask.bool()] = poison
    out_c, g_c = _grads(fn, clean, w)
    out_d, g_d = _grads(fn, dirty, w)
    for a, e in zip(out_d, out_c):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    for a, e in zip(g_d, g_c):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    assert (g_d[0][~mask.bool()] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_from_logits_ignored_rows_are_inert(backend):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 5, 50, generator=g)
    t = torch.randint(0, 50, (4, 5), generator=g)
    t[1, 2:] = -100
    dirty = z.clone()
    dirty[1, 2:] = float("nan")
    dirty[1, 3, 7] = float("inf")
    clean = z.clone()
    clean[1, 2:] = 0.0

    def fn(z):
        lp, ent = logprobs_from_logits(z, t, temperature=0.8, backend=backend)
        return lp.sum() + ent.sum(), lp, ent

    out_d, (g_d,) = _grads(fn, dirty)
    out_c, (g_c,) = _grads(fn, clean)
    for a, e in zip(out_d, out_c):
        torch.testing.assert_close(a, e)
    assert torch.isfinite(g_d).all() and (g_d[1, 2:] == 0).all()
    torch.testing.assert_close(g_d, g_c)


LOSS_CONFIGS = [
    dict(loss_type="dapo", beta=0.04),
    dict(loss_type="grpo", beta=0.0, importance_sampling_level="sequence"),
    dict(loss_type="bnpo", beta=0.04, entropy_coef=0.01),
    dict(loss_type="cispo", beta=0.0, epsilon_high=2.0),
    dict(loss_type="vespo", beta=0.0),
    dict(loss_type="dppo", beta=0.0),
    dict(loss_type="cppo", beta=0.0),
    dict(loss_type="dapo", beta=0.0, credit="tp_schedule", schedule=TemporalSchedule(total_steps=10)),
    dict(loss_type="dapo", beta=0.0, credit="forking", credit_rho=0.5),
    dict(loss_type="dapo", beta=0.0, credit="entropy_adv", schedule=TemporalSchedule(total_steps=10)),
    dict(loss_type="dapo", beta=0.0, credit="d3s", d3s_scope="sequence", credit_rho=0.5),
    dict(loss_type="dapo", beta=0.0, credit="delta"),
    dict(loss_type="dapo", beta=0.0, aggregation="seq-mean-token-sum-norm", loss_horizon=8),
]


@settings(max_examples=18, deadline=None)
@given(
    cfg=st.sampled_from(LOSS_CONFIGS),
    poison=st.sampled_from(POISON),
    fused=st.booleans(),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2),
    per_token_adv=st.booleans(),
)
def test_rlvr_loss_padding_is_inert(cfg, poison, fused, backend, seed, per_token_adv):
    """Hidden states, ids, advantages, old/ref/rollout log-probs, IS ratios, DelTA coefficients and old entropies
    hold NaN/inf/huge values or out-of-range ids wherever attention_mask == 0: loss, metrics and gradients equal the
    call with clean padding, and the padded positions get exactly zero gradient."""
    if fused and cfg.get("credit") == "d3s" and cfg.get("d3s_scope") == "batch":
        return
    x, w, ids, mask, adv, old, ref = _data(seed)
    B, T = mask.shape
    pad = ~mask.bool()
    g = torch.Generator().manual_seed(seed + 10)
    kw = dict(
        old_per_token_logps=old,
        ref_per_token_logps=ref,
        rollout_per_token_logps=old + 0.05,
        vllm_is_ratio=torch.rand(B, T, generator=g) + 0.5,
        delta_coefficients=torch.rand(B, T, generator=g) + 0.5,
        old_entropy=torch.rand(B, T, generator=g),
        step=3,
    )
    kw["vllm_is_ratio"][pad] = 1.0  # VESPO multiplies every position's ratio in (Liger, TRL): clean padding is 1
    if cfg.get("credit") != "delta":
        kw.pop("delta_coefficients")
    if cfg.get("credit") != "entropy_adv":
        kw.pop("old_entropy")
    if per_token_adv:
        adv = adv[:, None].expand(B, T).clone()
    loss_fn = RLVRLoss(fused=fused, backend=backend, **cfg)

    def poisoned(t, value):
        t = t.clone()
        t[pad] = value
        return t

    dirty_kw = {k: (poisoned(v, poison) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    if cfg["loss_type"] == "vespo" and math.isfinite(poison):
        dirty_kw["vllm_is_ratio"] = kw["vllm_is_ratio"]  # a finite padded ratio counts in VESPO (Liger, TRL)
    dirty_ids = poisoned(ids, -7 if poison != poison else 10**6)
    dirty_adv = poisoned(adv, poison) if per_token_adv else adv
    (lc, mc), gc = _grads(lambda x, w: loss_fn(x, w, ids, mask, adv, **kw), poisoned(x, 0.0), w)
    (ld, md), gd = _grads(lambda x, w: loss_fn(x, w, dirty_ids, mask, dirty_adv, **dirty_kw), poisoned(x, poison), w)
    assert torch.isfinite(ld)
    torch.testing.assert_close(ld, lc, rtol=1e-6, atol=1e-7)
    for k in mc.keys():
        torch.testing.assert_close(md[k], mc[k], rtol=1e-6, atol=1e-7, equal_nan=True)
    for a, e in zip(gd, gc):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)
    assert (gd[0][pad] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# RLVRLoss edges


@pytest.mark.parametrize("fused", ["auto", True, False])
@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batch_gives_zero_loss_and_zero_grads(fused, shape):
    B, T = shape
    x = torch.randn(B, T, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    loss, metrics = RLVRLoss(beta=0.0, fused=fused)(
        x, w, torch.zeros(B, T, dtype=torch.long), torch.ones(B, T), torch.zeros(B)
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(metrics["clip_ratio"])
    assert x.grad.shape == x.shape and (w.grad == 0).all()


@pytest.mark.parametrize("fused", [True, False])
def test_second_backward_with_retain_graph_gives_the_same_gradients(fused):
    x, w, ids, mask, adv, old, _ = _data()
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = RLVRLoss(beta=0.0, fused=fused)(xx, ww, ids, mask, adv, old_per_token_logps=old)
    loss.backward(retain_graph=True)
    g1 = (xx.grad.clone(), ww.grad.clone())
    loss.backward()
    torch.testing.assert_close(xx.grad, 2 * g1[0])
    torch.testing.assert_close(ww.grad, 2 * g1[1])


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_instead_of_wrong_second_derivatives(fused, backend):
    x, w, ids, mask, adv, old, _ = _data()
    xx = x.clone().requires_grad_()
    loss, _ = RLVRLoss(beta=0.0, fused=fused, backend=backend)(xx, w, ids, mask, adv, old_per_token_logps=old)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, xx, create_graph=True)
    (gx,) = torch.autograd.grad(loss, xx)  # first order still works afterwards
    assert torch.isfinite(gx).all()


def test_double_backward_of_the_op_raises():
    x, w, ids, *_ = _data()
    xx = x.clone().requires_grad_()
    lp, _ = fused_linear_logprobs(xx, w, ids)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(lp.sum(), xx, create_graph=True)


NUMBER_ARGS = {
    # name: (valid value, values that must be refused)
    "beta": (0.04, [-0.1, float("nan"), float("inf")]),
    "epsilon_low": (0.2, [-0.1, float("nan")]),
    "epsilon_high": (0.28, [-0.1, float("nan"), float("inf")]),
    "temperature": (0.7, [0.0, -1.0, float("nan"), float("inf"), 1e-40]),
    "delta": (1.5, [0.0, float("nan")]),
    "dual_clip": (3.0, [1.0, float("nan"), float("inf")]),
    "entropy_coef": (0.01, [float("nan"), float("inf")]),
    "sapo_temperature_pos": (1.0, [0.0, float("nan")]),
    "credit_rho": (0.3, [-0.1, 1.5, float("nan")]),
    "ratio_cap": (5.0, [0.0, float("nan")]),
    "log_ratio_clip": (20.0, [0.0, float("nan")]),
    "loss_horizon": (16, [0, float("nan")]),
    "max_completion_length": (16, [0, 2.5]),
    "chunk_size": (1, [0]),
    "cppo_w_min": (0.8, [1.5, float("nan")]),
    "cppo_delta_b": (0.02, [-0.1, float("nan")]),
    "cppo_max_mult": (2.0, [0.5, float("nan")]),
    "cppo_horizon": (64, [0, 3.5]),
}
EXTRA_CONTEXT = {"dual_clip": dict(loss_type="dapo"), "ratio_cap": dict(loss_type="dppo")}


@pytest.mark.parametrize("name", sorted(NUMBER_ARGS))
def test_constructor_refuses_every_bad_number_and_names_it(name):
    good, bads = NUMBER_ARGS[name]
    ctx = EXTRA_CONTEXT.get(name, {})
    RLVRLoss(**{name: good}, **ctx)
    RLVRLoss(**{name: np.float64(good) if isinstance(good, float) else np.int64(good)}, **ctx)  # NumPy scalars
    for bad in bads + ["0.5", True, [1.0]]:
        with pytest.raises((TypeError, ValueError), match=name):
            RLVRLoss(**{name: bad}, **ctx)


@pytest.mark.parametrize(
    "name,bad",
    [
        ("loss_type", "ppo"),
        ("aggregation", "mean"),
        ("credit", "tp"),
        ("d3s_scope", "global"),
        ("cppo_budget", "auto"),
        ("backend", "cuda"),
        ("importance_sampling_level", "seq"),
        ("fused", "yes"),
        ("compiled", "no"),
        ("use_ref_model", 1),
        ("schedule", 0.5),
        ("ignore_index", -100.0),
    ],
)
def test_constructor_refuses_bad_choices(name, bad):
    with pytest.raises((TypeError, ValueError), match=name):
        RLVRLoss(**{name: bad})


def test_forward_refuses_what_it_cannot_honour():
    x, w, ids, mask, adv, old, _ = _data()
    loss_fn = RLVRLoss(beta=0.0)

    def call(**kw):
        base = dict(_input=x, lin_weight=w, selected_token_ids=ids, attention_mask=mask, advantages=adv)
        return loss_fn(**{**base, **kw})

    bad_ids = ids.clone()
    bad_ids[0, 0] = -100  # ignore_index on a loss token
    big = ids.clone()
    big[1, 2] = w.shape[0]
    pad_ids = ids.clone()
    pad_ids[~mask.bool()] = -5  # anything outside the loss mask is fine
    call(selected_token_ids=pad_ids)
    cases = [
        (dict(selected_token_ids=ids.float()), TypeError, "selected_token_ids"),
        (dict(selected_token_ids=bad_ids), ValueError, "selected_token_ids"),
        (dict(selected_token_ids=big), ValueError, "selected_token_ids"),
        (dict(advantages=adv > 0), TypeError, "advantages"),
        (dict(advantages=torch.tensor([1e300, 0.0, 1.0], dtype=torch.float64)), ValueError, "advantages"),
        (dict(advantages=adv[:2]), ValueError, "advantages"),
        (dict(num_items_in_batch=float("nan")), ValueError, "num_items_in_batch"),
        (dict(num_items_in_batch=-3), ValueError, "num_items_in_batch"),
        (dict(num_items_in_batch="12"), TypeError, "num_items_in_batch"),
        (dict(old_per_token_logps=old.double() * 1e300), ValueError, "old_per_token_logps"),
        (dict(lin_weight=w.double()), TypeError, "lin_weight"),
        (dict(lin_weight=w[:, :5]), ValueError, "lin_weight"),
        (dict(_input=x[..., :0], lin_weight=w[:, :0]), ValueError, "_input"),
        (dict(_input=x.numpy()), TypeError, "_input"),
        (dict(attention_mask=mask[:, :3]), ValueError, "attention_mask"),
        (dict(attention_mask=mask * float("nan")), ValueError, "attention_mask"),
        (dict(bias=torch.zeros(3)), ValueError, "bias"),
    ]
    for kw, exc, name in cases:
        with pytest.raises(exc, match=name):
            call(**kw)


def test_non_finite_hidden_on_a_loss_token_is_a_clear_error():
    x, w, ids, mask, adv, old, _ = _data()
    x = x.clone()
    x[1, 0, 3] = float("nan")
    for fused in (True, False):
        with pytest.raises(ValueError, match="not finite"):
            RLVRLoss(beta=0.0, fused=fused)(x.clone().requires_grad_(), w, ids, mask, adv, old_per_token_logps=old)


# ----------------------------------------------------------------------------------------------------------------
# numerics at the edges of fp32


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_overflow_and_number_types(backend):
    x, w, ids, *_ = _data()
    for t in (1e-39, 1e-300, 0.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            fused_linear_logprobs(x, w, ids, temperature=t, backend=backend)
    with pytest.raises(TypeError, match="temperature"):
        fused_linear_logprobs(x, w, ids, temperature="0.7", backend=backend)
    want = fused_linear_logprobs(x, w, ids, temperature=0.7, backend=backend)
    for t in (np.float32(0.7), np.float64(0.7), torch.tensor(0.7, dtype=torch.float64)):
        got = fused_linear_logprobs(x, w, ids, temperature=t, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    z = torch.randn(3, 20)
    t = torch.randint(0, 20, (3,))
    torch.testing.assert_close(
        logprobs_from_logits(z, t, temperature=np.float32(2.0), backend=backend),
        logprobs_from_logits(z, t, temperature=2.0, backend=backend),
    )


def test_empty_hidden_size_is_a_clear_error():
    with pytest.raises(ValueError, match="H = 0"):
        fused_linear_logprobs(torch.randn(2, 3, 0), torch.randn(10, 0), torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_spread_beyond_fp32_range_gives_no_nan_and_backends_agree(backend):
    """Finite logits near the fp32 limit: z - max overflows to -inf for the small ones. They have probability 0
    (logp = -inf, the correctly rounded value), the entropy is finite, and nothing is NaN."""
    big = torch.finfo(torch.float32).max / 2
    z = torch.tensor([[big, -big, 0.0, big / 2], [1.0, 2.0, -big, 3.0]])
    t = torch.tensor([0, 3])
    lp, ent = logprobs_from_logits(z, t, backend=backend)
    want_lp = torch.log_softmax(z.double(), -1).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(lp.double(), want_lp, rtol=1e-6, atol=1e-6)
    p = torch.softmax(z.double(), -1)
    want_ent = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-6)
    zz = z.clone().requires_grad_()
    lp, ent = logprobs_from_logits(zz, t, backend=backend)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(zz.grad).all()


@pytest.mark.parametrize("scale", [1e30, 1e36])
def test_extreme_hidden_states_finite_or_clear_error_same_on_both_backends(scale):
    x, w, ids, *_ = _data()
    results = {}
    for backend in BACKENDS:
        try:
            lp, ent = fused_linear_logprobs(x * scale, w, ids, backend=backend)
            assert not torch.isnan(lp).any() and torch.isfinite(ent).all()
            results[backend] = (lp, ent)
        except ValueError as e:
            assert "not finite" in str(e)
            results[backend] = "error"
    assert (results["torch"] == "error") == (results["triton"] == "error")
    if results["torch"] != "error":
        torch.testing.assert_close(results["torch"], results["triton"], rtol=1e-4, atol=0)


def test_linear_row_with_huge_logit_spread_has_no_nan():
    # a bias that puts columns 3e38 apart: z - max overflows to -inf for column 1 (probability exactly 0)
    x = torch.zeros(2, 4)
    w = torch.zeros(5, 4)
    b = torch.tensor([3e38, -3e38, 0.0, 1.0, -1.0])
    t = torch.tensor([1, 2])
    for bk in BACKENDS:
        lp, ent = fused_linear_logprobs(x, w, t, bias=b, backend=bk)
        assert lp[0] == -math.inf and lp[1] == -3e38 and (ent == 0).all(), bk


FORWARD_TENSOR_ARGS = [
    "_input",
    "lin_weight",
    "selected_token_ids",
    "attention_mask",
    "advantages",
    "bias",
    "ref_per_token_logps",
    "old_per_token_logps",
    "vllm_is_ratio",
    "rollout_per_token_logps",
    "delta_coefficients",
    "old_entropy",
]


@pytest.mark.parametrize("name", FORWARD_TENSOR_ARGS)
def test_forward_fuzz_every_tensor_argument(name):
    """Wrong type, shape, dtype or device in any forward tensor: a TypeError/ValueError naming the argument,
    before any kernel runs; never another exception, never a silent result."""
    x, w, ids, mask, adv, old, ref = _data()
    B, T, H = x.shape
    base = dict(
        _input=x,
        lin_weight=w,
        selected_token_ids=ids,
        attention_mask=mask,
        advantages=adv,
        bias=torch.zeros(w.shape[0]),
        ref_per_token_logps=ref,
        old_per_token_logps=old,
        vllm_is_ratio=torch.ones(B, T),
        rollout_per_token_logps=old,
        delta_coefficients=torch.ones(B, T),
        old_entropy=torch.rand(B, T),
    )
    loss_fn = RLVRLoss(beta=0.04, loss_type="cppo", credit="delta")
    loss_fn(**base)  # the valid call runs
    good = base[name]
    wrong = [
        "text",
        [1.0, 2.0],
        3.0,
        good[..., :1].clone() if good.dim() > 1 and name != "vllm_is_ratio" else good[:1],
        good.to("meta"),
        good.unsqueeze(0),
    ]
    if good.dtype.is_floating_point:
        wrong.append(good.to(torch.complex64) if name not in ("_input", "lin_weight", "bias") else good.long())
    else:
        wrong.append(good.float())
    for bad in wrong:
        with pytest.raises((TypeError, ValueError), match=name):
            loss_fn(**{**base, name: bad})


@pytest.mark.parametrize(
    "name,bad",
    [
        ("step", "3"),
        ("step", 0),
        ("step", 2.5),
        ("dp_size", 0),
        ("dp_size", "2"),
        ("global_batch_size", float("nan")),
        ("batch_num_tokens", -1),
    ],
)
def test_forward_fuzz_scalar_arguments(name, bad):
    x, w, ids, mask, adv, old, _ = _data()
    loss_fn = RLVRLoss(
        beta=0.0, credit="tp_schedule", schedule=TemporalSchedule(total_steps=10), aggregation="token-mean"
    )
    loss_fn(x, w, ids, mask, adv, old_per_token_logps=old, step=3)
    kw = dict(step=3)
    kw[name] = bad
    with pytest.raises((TypeError, ValueError), match=name):
        loss_fn(x, w, ids, mask, adv, old_per_token_logps=old, **kw)
