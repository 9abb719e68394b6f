"""RLVRLoss with each credit rule / trust region, end to end against float64 oracles written from the specs.

Each oracle recomputes the log-probs and entropies in float64, builds the credit mask or shaped advantage with a
plain Python loop over the spec's definition (tp-schedule.md section 3, schedules.md "D^3S", cppo.md Algorithm 1),
and aggregates as the loss type says (dapo: token sum over the active-token count). Loss and gradients w.r.t. the
hidden states and the lm_head must match on both paths (fused and composable) and both backends.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlvr_kernels import RLVRLoss, TemporalSchedule

B, T, H, V = 3, 9, 16, 257
TEMP = 0.9
LENGTHS = (9, 6, 4)


def make(seed: int, peaked: bool = False):
    """Inputs; ``peaked``: sampled ids are mostly the argmax token and mu moves pi(a) by up to +-0.15, so that the
    probability-space divergences of DPPO/CPPO reach their thresholds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g) * (2.0 if peaked else 0.6)
    w = torch.randn(V, H, generator=g) * 0.6
    ids = torch.randint(0, V, (B, T), generator=g)
    if peaked:
        top = (x @ w.T).argmax(-1)
        ids = torch.where(torch.rand(B, T, generator=g) < 0.8, top, ids)
    mask = torch.zeros(B, T)
    for b, L in enumerate(LENGTHS):
        mask[b, :L] = 1.0
    adv = torch.tensor([0.9, -0.6, 0.4])
    with torch.no_grad():
        z = (x.double() @ w.double().T) / TEMP
        lp = torch.log_softmax(z, -1).gather(-1, ids[..., None])[..., 0]
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    if peaked:
        mu = (lp.exp() + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 0.3).clamp(1e-4, 1 - 1e-4)
        old = mu.log().float()
    return x, w, ids, mask, adv, old


def oracle_logp_entropy(x, w, ids):
    z = (x @ w.T) / TEMP
    logz = torch.log_softmax(z, -1)
    return logz.gather(-1, ids[..., None])[..., 0], -(logz.exp() * logz).sum(-1)


def top_k_lower_index(scores: list, k: int) -> set:
    """Indices of the k largest scores, ties to the lower index."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return set(order[:k])


def dapo_tokens(lp, old, A, eps_low=0.2, eps_high=0.28):
    c = torch.exp(lp - old)
    return -torch.min(c * A, c.clamp(1 - eps_low, 1 + eps_high) * A)


def run_ours(cfg, x, w, ids, mask, adv, *, fused, backend, **kw):
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, metrics = RLVRLoss(beta=0.0, temperature=TEMP, fused=fused, backend=backend, **cfg)(
        xx, ww, ids, mask, adv, **kw
    )
    loss.backward()
    return loss.detach().double(), xx.grad.double(), ww.grad.double(), metrics


def check(
    want_fn,
    cfg,
    seed,
    *,
    paths=((True, "torch"), (False, "torch"), (True, "triton"), (False, "triton")),
    peaked=False,
    **kw,
):
    x, w, ids, mask, adv, old = make(seed, peaked)
    xx, ww = x.double().requires_grad_(), w.double().requires_grad_()
    want, active = want_fn(xx, ww, ids, mask, adv, old.double())
    want.backward()
    for fused, backend in paths:
        if fused and cfg.get("credit") == "d3s" and cfg.get("d3s_scope", "batch") == "batch":
            continue  # batch-scope D^3S always takes the composable path
        loss, gx, gw, metrics = run_ours(
            cfg, x, w, ids, mask, adv, fused=fused, backend=backend, old_per_token_logps=old, **kw
        )
        torch.testing.assert_close(loss, want.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gx, xx.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gw, ww.grad, atol=1e-6, rtol=1e-5)
        assert metrics["active_fraction"].item() == pytest.approx(active / mask.sum().item())


@pytest.mark.parametrize("rho", [0.3, 0.5])
def test_forking_tokens_are_the_rows_top_entropies(rho):
    """tp-schedule.md 6.8: per row the top ceil(n rho) tokens by the current entropy; token mean over the kept."""

    def want(x, w, ids, mask, adv, old):
        lp, ent = oracle_logp_entropy(x, w, ids)
        m = torch.zeros(B, T, dtype=torch.float64)
        for b, L in enumerate(LENGTHS):
            for t in top_k_lower_index(ent[b, :L].detach().tolist(), math.ceil(L * rho)):
                m[b, t] = 1.0
        tok = dapo_tokens(lp, old, adv.double()[:, None])
        return (tok * m).sum() / m.sum(), m.sum().item()

    check(want, dict(loss_type="dapo", epsilon_high=0.28, credit="forking", credit_rho=rho), seed=1)


def test_scheduled_entropy_shaped_advantages():
    """tp-schedule.md section 3: A' = (A + q(k) min(alpha H, |A| / kappa)) * mask, H the rollout entropy."""
    sched = TemporalSchedule("sigmoid", total_steps=20)
    step = 7
    q = sched(step)
    g = torch.Generator().manual_seed(11)
    old_ent = torch.rand(B, T, generator=g) * 3.0

    def want(x, w, ids, mask, adv, old):
        lp, _ = oracle_logp_entropy(x, w, ids)
        A = torch.zeros(B, T, dtype=torch.float64)
        for b in range(B):
            a = float(adv[b])
            for t in range(LENGTHS[b]):
                A[b, t] = a + q * min(0.4 * float(old_ent[b, t]), abs(a) / 2.0)
        m = mask.double()
        tok = dapo_tokens(lp, old, A)
        return (tok * m).sum() / m.sum(), m.sum().item()

    check(
        want,
        dict(loss_type="dapo", epsilon_high=0.28, credit="entropy_adv", schedule=sched),
        seed=2,
        step=step,
        old_entropy=old_ent,
    )


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_d3s_keeps_the_top_abs_adv_times_entropy(scope):
    """schedules.md D^3S: score |A| H (current entropy), keep the top ceil(n rho) over the batch (ties to the lower
    flat index) or per row; rho = 1 - q(k) under a schedule."""
    sched = TemporalSchedule(start_value=0.6, total_steps=10)
    step = 3
    rho = 1.0 - sched(step)

    def want(x, w, ids, mask, adv, old):
        lp, ent = oracle_logp_entropy(x, w, ids)
        m = torch.zeros(B, T, dtype=torch.float64)
        if scope == "batch":
            flat = [(b, t) for b in range(B) for t in range(LENGTHS[b])]
            scores = [abs(float(adv[b])) * float(ent[b, t].detach()) for b, t in flat]
            for i in top_k_lower_index(scores, math.ceil(len(flat) * rho)):
                m[flat[i]] = 1.0
        else:
            for b, L in enumerate(LENGTHS):
                scores = [abs(float(adv[b])) * float(ent[b, t].detach()) for t in range(L)]
                for t in top_k_lower_index(scores, math.ceil(L * rho)):
                    m[b, t] = 1.0
        tok = dapo_tokens(lp, old, adv.double()[:, None])
        return (tok * m).sum() / m.sum(), m.sum().item()

    check(
        want,
        dict(loss_type="dapo", epsilon_high=0.28, credit="d3s", d3s_scope=scope, schedule=sched),
        seed=3,
        step=step,
    )


def cppo_mask_loop(lp, mu, adv, lengths, *, delta, w_min=0.8, delta_b=0.02, max_mult=2.0, q=0.9):
    """cppo.md Algorithm 1 (Binary-TV, the row's own length, dynamic budget), one token at a time, float64."""
    M = torch.zeros(lp.shape, dtype=torch.float64)
    for b, L in enumerate(lengths):
        D = [abs(math.exp(float(lp[b, t])) - math.exp(float(mu[b, t]))) for t in range(L)]
        db = min(max(float(torch.quantile(torch.tensor(D, dtype=torch.float64), q)), delta_b), max_mult * delta_b)
        S = W = 0.0
        for t in range(L):
            w_t = 1.0 - (1.0 - w_min) * t / max(L - 1, 1)
            z = w_t * D[t]
            c = min(delta, delta + db * W - S)
            ratio = math.exp(max(-20.0, min(20.0, float(lp[b, t]) - float(mu[b, t]))))
            toward = float(adv[b]) * (ratio - 1.0) <= 0.0
            M[b, t] = 1.0 if (toward or z <= c) else 0.0
            S += z
            W += w_t
    return M


@pytest.mark.parametrize("seed", [4, 24, 29])
def test_cppo_loss_is_masked_ratio_times_advantage(seed):
    """cppo.md Eq. 11: per token -M A rho (rho differentiable, log-ratio clamped to +-20), token mean over the valid
    tokens, M from Algorithm 1 against the rollout log-probs. On these seeds the mask changes if the prefix budget
    is dropped (4), if the dynamic budget's floor delta_b changes (24) or if w_min changes (29)."""
    delta = 0.05

    def want(x, w, ids, mask, adv, old):
        lp, _ = oracle_logp_entropy(x, w, ids)
        M = cppo_mask_loop(lp.detach(), old, adv, LENGTHS, delta=delta)
        assert 0 < M[mask > 0].sum() < mask.sum()  # the mask binds on this data
        rho = torch.exp((lp - old).clamp(-20, 20))
        tok = -M * adv.double()[:, None] * rho
        m = mask.double()
        return (tok * m).sum() / m.sum(), m.sum().item()

    check(want, dict(loss_type="cppo", epsilon_high=delta), seed=seed, peaked=True)


def test_dppo_binary_tv_mask():
    """DPPO (cppo.md App. A, verl dppo_tv): keep a token that moves toward mu, else |pi(a) - mu(a)| within the
    side's threshold (epsilon_high for A > 0, epsilon_low for A < 0)."""

    def want(x, w, ids, mask, adv, old):
        lp, _ = oracle_logp_entropy(x, w, ids)
        M = torch.zeros(B, T, dtype=torch.float64)
        for b, L in enumerate(LENGTHS):
            for t in range(L):
                p, mu = math.exp(float(lp[b, t].detach())), math.exp(float(old[b, t]))
                a = float(adv[b])
                M[b, t] = 1.0 if (a > 0 and p - mu <= 0.04) or (a <= 0 and mu - p <= 0.03) else 0.0
        assert 0 < M[mask > 0].sum() < mask.sum()
        rho = torch.exp((lp - old).clamp(-20, 20))
        tok = -M * adv.double()[:, None] * rho
        m = mask.double()
        return (tok * m).sum() / m.sum(), m.sum().item()

    check(want, dict(loss_type="dppo", epsilon_low=0.03, epsilon_high=0.04), seed=5, peaked=True)
