"""The objectives that came from verl's policy losses (GSPO-token, SAPO, GPG, DRO, GMPO, KL-Cov, Clip-Cov) as
``RLVRLoss`` loss types, end to end from hidden states: against verl's own functions applied to float64 log-probs
(the peer as oracle), under bf16 with NaN in padded rows, compiled (fullgraph), and their selections' properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlvr_kernels import RLVRLoss
from rlvr_kernels.reference import cov as ref_cov

verl_core = pytest.importorskip("verl.trainer.ppo.core_algos")
from verl.workers.config import FSDPActorConfig, PolicyLossConfig  # noqa: E402

B, T, H, V = 4, 7, 16, 48
LOW, HIGH = 0.15, 0.25
VERL_KEYS = dict(dro_beta=0.3, kl_cov_ratio=0.1, ppo_kl_coef=0.7, clip_cov_ratio=0.15, clip_cov_lb=0.0, clip_cov_ub=4.0)
OURS_KEYS = dict(dro_beta=0.3, kl_cov_ratio=0.1, kl_cov_coef=0.7, clip_cov_ratio=0.15, clip_cov_lb=0.0, clip_cov_ub=4.0)

#: verl loss -> RLVRLoss settings with the same per-token math and aggregation
CASES = {
    "gspo": dict(loss_type="dapo", importance_sampling_level="sequence_token", aggregation="token-mean"),
    "sapo": dict(loss_type="sapo", aggregation="seq-mean-token-mean", log_ratio_clip=20.0),
    "gpg": dict(loss_type="gpg", aggregation="token-mean"),
    "dro": dict(loss_type="dro", aggregation="token-mean"),
    "geo_mean": dict(loss_type="geo_mean"),
    "kl_cov": dict(loss_type="kl_cov", aggregation="token-mean"),
    "clip_cov": dict(loss_type="clip_cov", aggregation="token-mean"),
}


def _batch(seed: int, dtype=torch.float32, token_adv: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g) * 0.6
    w = torch.randn(V, H, generator=g) * 0.6
    ids = torch.randint(0, V, (B, T), generator=g)
    lens = torch.tensor([7, 5, 0, 3])
    mask = (torch.arange(T)[None] < lens[:, None]).float()
    adv = torch.randn(B, T, generator=g) if token_adv else torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    with torch.no_grad():
        lp = torch.log_softmax(x.double() @ w.double().T, -1).gather(-1, ids[..., None])[..., 0].float()
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    return x.to(dtype), w.to(dtype), ids, mask, adv, old


def _verl(name: str, x, w, ids, mask, adv, old, agg: str):
    """verl's loss and d/dx, d/dw on float64 log-probs from explicit logits."""
    xx, ww = x.double().requires_grad_(), w.double().requires_grad_()
    lp = torch.log_softmax(xx @ ww.T, -1).gather(-1, ids[..., None])[..., 0]
    cfg = FSDPActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, loss_agg_mode=agg, clip_ratio_low=LOW,
        clip_ratio_high=HIGH, clip_ratio_c=10.0, tau_pos=1.2, tau_neg=0.8,
        policy_loss=PolicyLossConfig(loss_mode=name, **VERL_KEYS),
    )  # fmt: skip
    torch.manual_seed(7)  # clip_cov's draw
    loss, _ = verl_core.get_policy_loss_fn(name)(
        old_log_prob=old.double(), log_prob=lp, advantages=adv.double(), response_mask=mask.bool(),
        loss_agg_mode=agg, config=cfg,
    )  # fmt: skip
    loss.backward()
    return loss.detach(), xx.grad, ww.grad


def _ours(kw, x, w, ids, mask, adv, old, fused="auto", compiled=False):
    module = RLVRLoss(
        beta=0.0, epsilon_low=LOW, epsilon_high=HIGH, backend="torch", fused=fused,
        sapo_temperature_pos=1.2, sapo_temperature_neg=0.8, **OURS_KEYS, **kw,
    )  # fmt: skip
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()

    def f(a, b):
        return module(a, b, ids, mask, adv, old_per_token_logps=old)[0]

    if compiled:
        torch._dynamo.reset()
        f = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(7)
    loss = f(xx, ww)
    loss.backward()
    return loss.detach(), xx.grad, ww.grad


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("token_adv", [False, True])
def test_loss_type_matches_verl_from_hidden_states(name, token_adv):
    x, w, ids, mask, adv, old = _batch(3, token_adv=token_adv)
    agg = CASES[name].get("aggregation") or "token-mean"  # geo_mean: verl ignores it
    lv, xv, wv = _verl(name, x, w, ids, mask, adv, old, agg)
    lo, xo, wo = _ours(CASES[name], x, w, ids, mask, adv, old)
    torch.testing.assert_close(lo.double(), lv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xo.double(), xv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wo.double(), wv, rtol=1e-4, atol=1e-5)


def test_gspo_token_caps_the_sequence_log_ratio_as_verl():
    """A row whose mean log-ratio is beyond 10: verl's cap (a constant ratio, no gradient through it)."""
    x, w, ids, mask, adv, old = _batch(4, token_adv=True)
    old = old.clone()
    old[0] -= 12.0  # row 0: mean log-ratio ~ +12
    lv, xv, wv = _verl("gspo", x, w, ids, mask, adv, old, "token-mean")
    lo, xo, wo = _ours(CASES["gspo"], x, w, ids, mask, adv, old)
    torch.testing.assert_close(lo.double(), lv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xo.double(), xv, rtol=1e-4, atol=1e-5)
    # TRL's GSPO (one ratio per sequence, every token the mean's gradient) differs with per-token advantages
    lt, xt, _ = _ours(dict(loss_type="dapo", importance_sampling_level="sequence"), x, w, ids, mask, adv, old)
    assert not torch.allclose(xt, xo, atol=1e-4)


@pytest.mark.parametrize("name", ["kl_cov", "clip_cov", "geo_mean", "gspo", "dro"])
def test_compiled_fullgraph_matches_eager(name):
    x, w, ids, mask, adv, old = _batch(5, token_adv=True)
    eager = _ours(CASES[name], x, w, ids, mask, adv, old)
    comp = _ours(CASES[name], x, w, ids, mask, adv, old, compiled=True)
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_with_nan_in_padding(name):
    """bf16 hidden states with NaN where attention kernels leave it (padded positions, the empty row): finite loss,
    finite gradients, zero gradient at the padded positions, close to the fp32 loss."""
    x, w, ids, mask, adv, old = _batch(6, dtype=torch.bfloat16)
    x = x.clone()
    x[mask == 0] = float("nan")
    old = torch.where(mask > 0, old, torch.full_like(old, float("-inf")))
    adv = torch.where(mask > 0, adv, torch.full_like(adv, float("nan")))
    lo, xo, wo = _ours(CASES[name], x, w, ids, mask, adv, old)
    assert torch.isfinite(lo) and torch.isfinite(xo.float()).all() and torch.isfinite(wo.float()).all()
    assert (xo[mask == 0] == 0).all()
    x32 = torch.where(mask[..., None] > 0, x.float(), 0.0)
    l32, _, _ = _ours(CASES[name], x32, w.float(), ids, mask, torch.nan_to_num(adv), old)
    torch.testing.assert_close(lo.float(), l32, rtol=3e-2, atol=3e-2)


def test_batch_wide_objectives_take_the_composable_path():
    x, w, ids, mask, adv, old = _batch(8)
    for lt in ("kl_cov", "clip_cov"):
        with pytest.raises(ValueError, match="covariance selection"):
            RLVRLoss(loss_type=lt, fused=True)
        a = _ours(dict(loss_type=lt), x, w, ids, mask, adv, old, fused="auto")
        b = _ours(dict(loss_type=lt), x, w, ids, mask, adv, old, fused=False)
        torch.testing.assert_close(a[0], b[0])


def test_option_errors():
    with pytest.raises(ValueError, match="dro_beta"):
        RLVRLoss(loss_type="dro")
    with pytest.raises(ValueError, match="dro_beta"):
        RLVRLoss(loss_type="dro", dro_beta=-1.0)
    with pytest.raises(ValueError, match="sequence_token"):
        RLVRLoss(loss_type="cispo", importance_sampling_level="sequence_token")
    with pytest.raises(ValueError, match="clip_cov_lb"):
        RLVRLoss(loss_type="clip_cov", clip_cov_lb=2.0, clip_cov_ub=1.0)
    with pytest.raises(ValueError, match="kl_cov_ratio"):
        RLVRLoss(loss_type="kl_cov", kl_cov_ratio=0.0)


@settings(max_examples=40, deadline=None)
@given(
    n_rows=st.integers(1, 5),
    width=st.integers(1, 9),
    ratio=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
)
def test_kl_cov_selects_the_top_covariance_tokens(n_rows, width, ratio, seed):
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(n_rows, width, generator=g)
    logp = -torch.rand(n_rows, width, generator=g) * 3
    mask = torch.rand(n_rows, width, generator=g) < 0.7
    sel = ref_cov.kl_cov_selection(adv, logp, mask.float(), ratio)
    n = int(mask.sum())
    assert not (sel & ~mask).any()
    if n == 0:
        assert not sel.any()
        return
    assert int(sel.sum()) == max(1, int(n * ratio))
    a, lp = adv[mask].double(), logp[mask].double()
    cov = torch.zeros(n_rows, width, dtype=torch.float64)
    cov[mask] = (a - a.mean()) * (lp - lp.mean())
    if (~sel & mask).any():  # every selected token's covariance >= every unselected one's (fp32 ties aside)
        assert cov[sel].min() >= cov[~sel & mask].max() - 1e-6


def test_clip_cov_selection_bounds_and_draw():
    x, w, ids, mask, adv, old = _batch(9, token_adv=True)
    lp = torch.log_softmax(x @ w.T, -1).gather(-1, ids[..., None])[..., 0]
    kw = dict(ratio=0.2, lb=0.0, ub=4.0, clip_low=LOW, clip_high=HIGH)
    torch.manual_seed(0)
    a = ref_cov.clip_cov_selection(adv, lp, old, mask, **kw)
    torch.manual_seed(0)
    b = ref_cov.clip_cov_selection(adv, lp, old, mask, **kw)
    assert torch.equal(a, b) and not (a & (mask == 0)).any()
    assert 0 < int(a.sum()) <= max(1, int(0.2 * mask.sum()))
    ratio = torch.exp(lp - old)
    clipped = (-adv * ratio.clamp(1 - LOW, 1 + HIGH)) > (-adv * ratio)
    assert not (a & clipped).any()  # the PPO clip's own tokens are never drawn
