"""verl 0.9.1's registered policy losses against the ``rlvr_*`` modes that express them (verl's own functions as the
reference), and the inventory of the ones the package does not express yet (a new verl loss fails the inventory)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl")

from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn  # noqa: E402
from verl.workers.config import FSDPActorConfig, PolicyLossConfig  # noqa: E402

import rlvr_kernels.integrations.verl as rv  # noqa: E402

#: verl loss -> (rlvr_* mode, policy_loss.rlvr options) that gives the same loss and gradient
EXPRESSED = {
    "vanilla": ("rlvr_clip", {}),
    "dppo_tv": ("rlvr_dppo", {}),
    "dppo_kl": ("rlvr_dppo", {"dppo_divergence": "binary_kl"}),
    "cispo": ("rlvr_cispo", {}),
    "gspo": ("rlvr_gspo", {}),
    "sapo": ("rlvr_sapo", {}),
    "gpg": ("rlvr_gpg", {}),
    "dro": ("rlvr_dro", {}),
    "geo_mean": ("rlvr_geo_mean", {}),
    "kl_cov": ("rlvr_kl_cov", {}),
    "clip_cov": ("rlvr_clip_cov", {}),
}
#: verl's own keys of the objectives (read by both verl's loss and the rlvr_* mode)
VERL_KEYS = dict(dro_beta=0.3, kl_cov_ratio=0.1, ppo_kl_coef=0.7, clip_cov_ratio=0.1, clip_cov_lb=0.02, clip_cov_ub=3.0)
#: verl losses configured by policy_loss.rollout_correction (their own parity test below; tests/test_verl_bypass.py)
EXPRESSED_BY_ROLLOUT_CORRECTION = {"bypass_mode": "rlvr_bypass_mode"}
#: verl losses without an rlvr_* mode yet
NOT_EXPRESSED: set = set()
AGG = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def test_inventory_of_verl_losses():
    assert set(POLICY_LOSS_REGISTRY) - {n for n in POLICY_LOSS_REGISTRY if n.startswith("rlvr_")} == (
        set(EXPRESSED) | set(EXPRESSED_BY_ROLLOUT_CORRECTION) | NOT_EXPRESSED
    )


def _cfg(pl, agg):
    return FSDPActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, loss_agg_mode=agg, clip_ratio_low=0.05,
        clip_ratio_high=0.08, clip_ratio_c=10.0, policy_loss=pl, tau_pos=1.3, tau_neg=0.9,
    )  # fmt: skip


def _batch(seed, B=6, T=10):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 2.0  # probabilities in (0.13, 1): binary KL and TV both active
    lp = (old + torch.randn(B, T, generator=g) * 0.5).clamp(max=-1e-3)
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    mask = torch.arange(T)[None] < torch.tensor([10, 7, 1, 0, 9, 4])[:, None]
    isw = torch.rand(B, T, generator=g) * 0.5 + 0.75
    return old, lp, adv, mask, isw


def _run(name, cfg, old, lp, adv, mask, agg, isw):
    torch.manual_seed(1234)  # clip_cov draws its tokens with torch.randperm: the same draw on both sides
    x = lp.clone().requires_grad_()
    loss, met = get_policy_loss_fn(name)(old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask,
                                         loss_agg_mode=agg, config=cfg, rollout_is_weights=isw)  # fmt: skip
    loss.backward()
    return loss.detach(), x.grad, met


@pytest.mark.parametrize("agg", AGG)
@pytest.mark.parametrize("verl_name", list(EXPRESSED))
def test_rlvr_mode_matches_verl(verl_name, agg):
    ours, opts = EXPRESSED[verl_name]
    for seed, isw_on in ((0, False), (1, True)):
        old, lp, adv, mask, isw = _batch(seed)
        isw = isw if isw_on else None
        verl_cfg = _cfg(PolicyLossConfig(loss_mode=verl_name, **VERL_KEYS), agg)
        lv, gv, _ = _run(verl_name, verl_cfg, old, lp, adv, mask, agg, isw)
        cfg = _cfg(rv.RLVRPolicyLossConfig(loss_mode=ours, rlvr=opts, **VERL_KEYS), agg)
        lo, go, met = _run(ours, cfg, old, lp, adv, mask, agg, isw)
        torch.testing.assert_close(lo, lv, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(go, gv, rtol=1e-5, atol=1e-6)
        if verl_name.startswith("dppo"):
            assert 0 < met["rlvr/trust_region_masked_fraction"] < 1


@pytest.mark.parametrize("agg", AGG)
@pytest.mark.parametrize("preset", ["bypass_ppo_clip", "bypass_pg_is", "bypass_pg_token_icepop"])
def test_rlvr_bypass_mode_matches_verl(preset, agg):
    """verl's bypass mode (old_log_prob = the rollout's) with one of its presets as policy_loss.rollout_correction."""
    from verl.trainer.config.algorithm import RolloutCorrectionConfig

    rc = getattr(RolloutCorrectionConfig, preset)()
    ours = EXPRESSED_BY_ROLLOUT_CORRECTION["bypass_mode"]
    for seed in (0, 1):
        old, lp, adv, mask, isw = _batch(seed)
        lv, gv, _ = _run("bypass_mode", _cfg(PolicyLossConfig(loss_mode="bypass_mode", rollout_correction=rc), agg),
                         old, lp, adv, mask.float(), agg, isw)  # fmt: skip
        cfg = _cfg(rv.RLVRPolicyLossConfig(loss_mode=ours, rollout_correction=rc), agg)
        lo, go, _ = _run(ours, cfg, old, lp, adv, mask.float(), agg, isw)  # rollout_is_weights: ignored by both
        torch.testing.assert_close(lo, lv, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(go, gv, rtol=1e-5, atol=1e-6)


def test_binary_kl_differs_from_binary_tv():
    old, lp, adv, mask, _ = _batch(2)
    a = _run("rlvr_dppo", _cfg(rv.RLVRPolicyLossConfig(loss_mode="rlvr_dppo"), "token-mean"), old, lp, adv, mask,
             "token-mean", None)  # fmt: skip
    b = _run("rlvr_dppo", _cfg(rv.RLVRPolicyLossConfig(loss_mode="rlvr_dppo", rlvr={"dppo_divergence": "binary_kl"}),
             "token-mean"), old, lp, adv, mask, "token-mean", None)  # fmt: skip
    assert not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="dppo_divergence"):
        rv.RLVRPolicyLossConfig(loss_mode="rlvr_dppo", rlvr={"dppo_divergence": "kl"})
