"""RLVRLoss: parity with Liger's LigerFusedLinearGRPOLoss (installed from PyPI), fused == composable, credit rules
composed as specified, bad input. verl parity is in test_loss_peers.py, TRL parity in test_integration_trl.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlvr_kernels import RLVRLoss, TemporalSchedule, fused_linear_logprobs

B, T, H, V = 3, 7, 16, 300


def make(seed=0, b=B, t=T, h=H, v=V):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, generator=gen) * 0.5
    w = torch.randn(v, h, generator=gen) * 0.5
    ids = torch.randint(0, v, (b, t), generator=gen)
    mask = torch.ones(b, t)
    mask[0, t - 2 :] = 0
    if b > 2:
        mask[2, 3:] = 0
    adv = torch.randn(b, generator=gen)
    with torch.no_grad():
        lp, _ = fused_linear_logprobs(x, w, ids, temperature=0.8)
    old = lp + torch.randn(b, t, generator=gen) * 0.2
    ref = lp + torch.randn(b, t, generator=gen) * 0.1
    return x, w, ids, mask, adv, old, ref


def run(module, x, w, ids, mask, adv, bias=None, **kw):
    xx = x.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    bb = None if bias is None else bias.clone().requires_grad_()
    loss, metrics = module(xx, ww, ids, mask, adv, bias=bb, **kw)
    loss.backward()
    return loss.detach(), [m.detach() for m in metrics], xx.grad, ww.grad, None if bb is None else bb.grad, metrics


LIGER_CASES = [
    (lt, lvl, beta)
    for lt, lvl, beta in itertools.product(
        ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo"], ["token", "sequence"], [0.0, 0.04]
    )
    if not (lvl == "sequence" and lt in ("cispo", "sapo", "vespo"))
] + [("luspo", "sequence", 0.0)]


@pytest.mark.parametrize("case", LIGER_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("fused", [True, False])
def test_parity_with_liger(case, fused):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    lt, lvl, beta = case
    x, w, ids, mask, adv, old, ref = make()
    bias = torch.randn(V) * 0.1
    kw = dict(
        beta=beta,
        loss_type=lt,
        importance_sampling_level=lvl,
        temperature=0.8,
        max_completion_length=10,
        epsilon_high=2.0 if lt == "cispo" else 0.28,
        delta=1.5 if lt == "dapo" else None,
    )
    liger = LigerFusedLinearGRPOLoss(compiled=False, **kw)
    ours = RLVRLoss(compiled=False, fused=fused, backend="torch", **kw)
    isr = torch.rand(B, T) * 0.5 + 0.75
    if lt == "luspo":  # Liger's token-level luspo also sums padded positions (TRL masks them): use [B, 1] ratios
        isr = isr[:, :1]
    inputs = dict(
        ref_per_token_logps=ref,
        old_per_token_logps=old,
        vllm_is_ratio=isr,
        num_items_in_batch=torch.tensor(40.0) if lt in ("dapo", "cispo") else None,
    )
    l1, m1, gx1, gw1, gb1, _ = run(liger, x, w, ids, mask, adv, bias=bias, **inputs)
    l2, m2, gx2, gw2, gb2, named = run(ours, x, w, ids, mask, adv, bias=bias, **inputs)
    torch.testing.assert_close(l2, l1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx2, gx1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw2, gw1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gb2, gb1, atol=1e-6, rtol=1e-5)
    assert len(m2) == len(m1)
    for a, b in zip(m2, m1):
        torch.testing.assert_close(a, b.reshape(a.shape), atol=1e-6, rtol=1e-5)
    if beta != 0:
        torch.testing.assert_close(named[0], named["kl"])
    torch.testing.assert_close(named[-1], named["clip_ratio"])


def test_parity_with_liger_triton_backend_and_ref_input():
    """Reference log-probs from ref_input/ref_weight (Liger computes them itself), Triton kernels."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    x, w, ids, mask, adv, old, _ = make(1)
    ref_x = x + 0.05 * torch.randn_like(x)
    ref_w = w + 0.05 * torch.randn_like(w)
    kw = dict(beta=0.1, loss_type="grpo", temperature=1.3)
    l1, m1, gx1, gw1, _, _ = run(
        LigerFusedLinearGRPOLoss(compiled=False, **kw),
        x,
        w,
        ids,
        mask,
        adv,
        old_per_token_logps=old,
        ref_input=ref_x,
        ref_weight=ref_w,
    )
    for fused in (True, False):
        l2, m2, gx2, gw2, _, _ = run(
            RLVRLoss(fused=fused, backend="triton", **kw),
            x,
            w,
            ids,
            mask,
            adv,
            old_per_token_logps=old,
            ref_input=ref_x,
            ref_weight=ref_w,
        )
        torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx2, gx1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gw2, gw1, atol=1e-5, rtol=1e-5)
        for a, b in zip(m2, m1):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


CONFIGS = [
    dict(loss_type="dapo"),
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="dapo", aggregation="seq-mean-token-sum-norm", loss_horizon=12, entropy_coef=0.01),
    dict(loss_type="bnpo", aggregation="seq-mean-token-mean", dual_clip=3.0),
    dict(loss_type="dppo", epsilon_low=0.1, epsilon_high=0.15),
    dict(loss_type="dppo", epsilon_low=0.1, epsilon_high=0.15, ratio_cap=20.0),
    dict(loss_type="dapo", entropy_coef=0.05),
    dict(loss_type="dapo", credit="tp_schedule", schedule=TemporalSchedule(total_steps=10)),
    dict(loss_type="dapo", credit="forking", credit_rho=0.4, entropy_coef=0.02),
    dict(loss_type="grpo", credit="forking", schedule=TemporalSchedule(total_steps=10, start_value=0.7)),
    dict(loss_type="dapo", credit="entropy_adv", schedule=TemporalSchedule(total_steps=10)),
    dict(loss_type="dapo", credit="d3s", d3s_scope="sequence", credit_rho=0.5),
    dict(loss_type="dapo", credit="delta"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k != "schedule"))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_equals_composable(cfg, backend):
    x, w, ids, mask, adv, old, ref = make(2)
    kw = dict(ref_per_token_logps=ref, old_per_token_logps=old, step=4, delta_coefficients=torch.rand(B, T) + 0.5)
    outs = []
    for fused in (True, False):
        outs.append(run(RLVRLoss(fused=fused, backend=backend, temperature=0.9, **cfg), x, w, ids, mask, adv, **kw))
    (l1, m1, gx1, gw1, _, n1), (l2, m2, gx2, gw2, _, n2) = outs
    torch.testing.assert_close(l1, l2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx1, gx2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw1, gw2, atol=1e-6, rtol=1e-5)
    assert set(n1.keys()) == set(n2.keys())
    for k in n1.keys():
        torch.testing.assert_close(n1[k], n2[k], atol=1e-6, rtol=1e-5)
    assert torch.isfinite(gx1).all() and gx1.abs().sum() > 0


SEGMENT_CONFIGS = [
    dict(loss_type="dapo", entropy_coef=0.02),
    dict(loss_type="grpo", beta=0.04),  # per-sequence token mean: whole-row counts across segments
    dict(loss_type="dapo", aggregation="seq-mean-token-sum-norm", loss_horizon=12, entropy_coef=0.01),
    dict(loss_type="bnpo", aggregation="seq-mean-token-mean", dual_clip=3.0, entropy_coef=0.01),
    dict(loss_type="dr_grpo", max_completion_length=9),
    dict(loss_type="luspo"),
    dict(loss_type="sapo"),
    dict(loss_type="cispo", epsilon_high=2.0),
    dict(loss_type="dppo", epsilon_low=0.1, epsilon_high=0.15, ratio_cap=20.0),
    dict(loss_type="dapo", aggregation="token-sum"),
    dict(loss_type="dapo", credit="tp_schedule", schedule=TemporalSchedule(total_steps=10)),
    dict(loss_type="grpo", credit="entropy_adv", schedule=TemporalSchedule(total_steps=10)),
    dict(loss_type="dapo", credit="delta"),
]


@pytest.mark.parametrize(
    "cfg", SEGMENT_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k != "schedule")
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_path_splits_rows_for_token_local_losses(monkeypatch, cfg, backend):
    """When one row's logits exceed the chunk budget, token-local losses keep the fused path and split each row
    into segments (3 tokens here): same loss, gradients and metrics as the composable path."""
    import rlvr_kernels.loss as L

    x, w, ids, mask, adv, old, ref = make(11)
    kw = dict(
        ref_per_token_logps=ref,
        old_per_token_logps=old,
        step=4,
        delta_coefficients=torch.rand(B, T) + 0.5,
        vllm_is_ratio=torch.rand(B, T) * 0.5 + 0.75,
    )
    want = run(RLVRLoss(fused=False, backend=backend, temperature=0.9, **cfg), x, w, ids, mask, adv, **kw)
    budget = 3 * V * 4
    monkeypatch.setenv("RLVR_KERNELS_CHUNK_BYTES", str(budget))
    seen = []
    real = L.fused.chunks

    def spy(*a):
        out = real(*a)
        seen.extend(out)
        return out

    monkeypatch.setattr(L.fused, "chunks", spy)
    got = run(RLVRLoss(fused="auto", backend=backend, temperature=0.9, **cfg), x, w, ids, mask, adv, **kw)
    assert L.token_local(L.LossConfig(**cfg))
    assert len(seen) == B * math.ceil(T / 3) and all(c.stop - c.start <= 3 for _, c in seen)
    (l1, _, gx1, gw1, _, n1), (l2, _, gx2, gw2, _, n2) = want, got
    torch.testing.assert_close(l2, l1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx2, gx1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw2, gw1, atol=1e-6, rtol=1e-5)
    assert set(n1.keys()) == set(n2.keys())
    for k in n1.keys():
        torch.testing.assert_close(n2[k], n1[k], atol=1e-6, rtol=1e-5, equal_nan=True)


def test_whole_row_losses_are_not_token_local():
    import rlvr_kernels.loss as L

    for cfg in (
        dict(importance_sampling_level="sequence"),
        dict(loss_type="vespo"),
        dict(loss_type="cppo"),
        dict(credit="forking"),
        dict(credit="d3s", d3s_scope="sequence"),
    ):
        assert not L.token_local(L.LossConfig(**cfg))


def _manual(x, w, ids, temperature=0.9):
    """float64 per-token log-probs and entropies, differentiable."""
    z = (x.double() @ w.double().T) / temperature
    logz = torch.log_softmax(z, -1)
    return logz.gather(-1, ids[..., None])[..., 0], -(logz.exp() * logz).sum(-1)


def test_tp_schedule_is_masked_dapo_over_active_tokens():
    """tp-schedule.md section 3: binary mask t >= min(floor(L q), L - 1), token-mean over the active tokens."""
    x, w, ids, mask, adv, old, _ = make(3)
    sched = TemporalSchedule(total_steps=10)  # q(3) = 0.99 * (1 - 3/8)
    q = sched(3)
    loss_fn = RLVRLoss(
        beta=0.0, loss_type="dapo", epsilon_high=0.28, credit="tp_schedule", schedule=sched, temperature=0.9
    )
    l1, _, gx1, gw1, _, named = run(loss_fn, x, w, ids, mask, adv, old_per_token_logps=old, step=3)
    xx, ww = x.double().requires_grad_(), w.double().requires_grad_()
    lp, _ = _manual(xx, ww, ids)
    m = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        L = int(mask[b].sum())
        cut = min(math.floor(L * q), L - 1)
        m[b, cut:L] = 1.0
    c = torch.exp(lp - old.double())
    A = adv.double()[:, None]
    tok = -torch.min(c * A, c.clamp(0.8, 1.28) * A)
    want = (tok * m).sum() / m.sum()
    want.backward()
    torch.testing.assert_close(l1.double(), want.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx1.double(), xx.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw1.double(), ww.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(named["active_fraction"].double(), m.sum() / mask.sum())
    assert named["schedule_value"].item() == pytest.approx(q)


def test_entropy_bonus_exact_gradient_and_delta_weights():
    """Entropy bonus (TRL: token mean over the mask) and DelTA weighting (A * c per token), against float64."""
    x, w, ids, mask, adv, old, _ = make(4)
    coef = torch.rand(B, T) + 0.5
    loss_fn = RLVRLoss(beta=0.0, loss_type="bnpo", entropy_coef=0.1, credit="delta", temperature=0.9)
    for fused in (True, False):
        loss_fn.config.fused = fused
        l1, _, gx1, gw1, _, _ = run(loss_fn, x, w, ids, mask, adv, old_per_token_logps=old, delta_coefficients=coef)
        xx, ww = x.double().requires_grad_(), w.double().requires_grad_()
        lp, ent = _manual(xx, ww, ids)
        c = torch.exp(lp - old.double())
        A = adv.double()[:, None] * coef.double()
        tok = -torch.min(c * A, c.clamp(0.8, 1.2) * A)
        m = mask.double()
        want = (tok * m).sum() / m.sum() - 0.1 * (ent * m).sum() / m.sum()
        want.backward()
        torch.testing.assert_close(l1.double(), want.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gx1.double(), xx.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gw1.double(), ww.grad, atol=1e-6, rtol=1e-5)


def test_d3s_batch_scope_uses_composable_path():
    x, w, ids, mask, adv, old, _ = make(5)
    loss_fn = RLVRLoss(beta=0.0, credit="d3s", credit_rho=0.3, temperature=0.9)
    l1, _, gx1, _, _, named = run(loss_fn, x, w, ids, mask, adv, old_per_token_logps=old)
    n_valid = int(mask.sum())
    assert named["active_fraction"].item() == pytest.approx(math.ceil(n_valid * 0.3) / n_valid)
    with pytest.raises(ValueError, match="d3s"):
        RLVRLoss(credit="d3s", fused=True)


def test_cppo_loss_runs_both_paths():
    pytest.importorskip("rlvr_kernels.cppo")
    x, w, ids, mask, adv, old, _ = make(6)
    outs = [
        run(
            RLVRLoss(beta=0.0, loss_type="cppo", epsilon_high=0.15, fused=f, temperature=0.9),
            x,
            w,
            ids,
            mask,
            adv,
            rollout_per_token_logps=old,
        )
        for f in (True, False)
    ]
    torch.testing.assert_close(outs[0][2], outs[1][2], atol=1e-6, rtol=1e-5)
    assert "trust_region/masked_fraction" in outs[0][5].keys()


@pytest.mark.parametrize("fused", [True, False])
def test_all_zero_mask_gives_zero_loss_and_grads(fused):
    x, w, ids, mask, adv, old, ref = make(7)
    for lt in ("grpo", "bnpo", "dapo", "dr_grpo"):
        l1, m1, gx, gw, _, _ = run(
            RLVRLoss(loss_type=lt, max_completion_length=8, fused=fused),
            x,
            w,
            ids,
            torch.zeros(B, T),
            adv,
            ref_per_token_logps=ref,
            old_per_token_logps=old,
        )
        assert l1.item() == 0.0 and torch.count_nonzero(gx) == 0 and torch.count_nonzero(gw) == 0
        assert all(torch.isfinite(m) for m in m1)


def test_padding_ids_outside_mask_are_ignored():
    x, w, ids, mask, adv, old, _ = make(8)
    ids_pad = ids.clone()
    ids_pad[mask == 0] = -100
    a = run(RLVRLoss(beta=0.0), x, w, ids, mask, adv, old_per_token_logps=old)
    b = run(RLVRLoss(beta=0.0), x, w, ids_pad, mask, adv, old_per_token_logps=old)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[2], b[2])


def test_no_grad_forward_and_metrics_by_name():
    x, w, ids, mask, adv, old, ref = make(9)
    with torch.no_grad():
        loss, metrics = RLVRLoss(beta=0.04)(x, w, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
    assert loss.dim() == 0 and len(metrics) == 2
    assert {"kl", "clip_ratio", "entropy", "active_fraction"} <= set(metrics.keys())


@pytest.mark.parametrize(
    "ctor, match",
    [
        (dict(loss_type="ppo"), "loss_type"),
        (dict(credit="magic"), "credit"),
        (dict(aggregation="mean"), "aggregation"),
        (dict(loss_type="dr_grpo"), "max_completion_length"),
        (dict(loss_type="cispo", importance_sampling_level="sequence"), "sequence"),
        (dict(credit="tp_schedule"), "schedule"),
        (dict(ratio_cap=10.0), "ratio_cap"),
        (dict(dual_clip=0.5), "dual_clip"),
        (dict(temperature=0.0), "temperature"),
        (dict(fused="yes"), "fused"),
    ],
)
def test_bad_config(ctor, match):
    with pytest.raises((ValueError, TypeError), match=match):
        RLVRLoss(**ctor)


def test_bad_forward_inputs():
    x, w, ids, mask, adv, old, ref = make(10)
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        RLVRLoss(beta=0.04)(x, w, ids, mask, adv)
    with pytest.raises(ValueError, match="advantages"):
        RLVRLoss(beta=0.0)(x, w, ids, mask, adv[:2])
    with pytest.raises(ValueError, match="attention_mask"):
        RLVRLoss(beta=0.0)(x, w, ids, mask[:, :3], adv)
    with pytest.raises(ValueError, match="old_per_token_logps"):
        RLVRLoss(beta=0.0)(x, w, ids, mask, adv, old_per_token_logps=old[:, :2])
    with pytest.raises(ValueError, match="rollout"):
        RLVRLoss(beta=0.0, loss_type="dppo")(x, w, ids, mask, adv)
    with pytest.raises(ValueError, match="step"):
        RLVRLoss(beta=0.0, credit="tp_schedule", schedule=TemporalSchedule(total_steps=5))(x, w, ids, mask, adv)
    with pytest.raises(ValueError, match="delta_coefficients"):
        RLVRLoss(beta=0.0, credit="delta")(x, w, ids, mask, adv)
    bad = adv.clone()
    bad[0] = float("nan")
    with pytest.raises(ValueError, match="advantages"):
        RLVRLoss(beta=0.0)(x, w, ids, mask, bad)
    with pytest.raises(TypeError, match="unexpected"):
        RLVRLoss(bogus=1)
