"""``rlvr_bypass_mode`` against verl 0.9.1's ``bypass_mode`` loss (``compute_policy_loss_bypass_mode``, the reference):
loss and gradient for ppo_clip / reinforce x no IS / token TIS / sequence TIS / token IcePop x no rejection / token_k1
/ a chain x batch normalisation (4 aggregations), verl's presets, NaN / -inf padding, empty rows, the batch mean over
two ranks; the mapping of ``policy_loss.rollout_correction``; the ``apply_bypass_mode`` guard."""

from __future__ import annotations

import itertools
import types

import pytest
import torch

pytest.importorskip("verl")

from omegaconf import OmegaConf  # noqa: E402
from verl.trainer.config.algorithm import RolloutCorrectionConfig  # noqa: E402
from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.workers.config import FSDPActorConfig, PolicyLossConfig  # noqa: E402

import rlvr_kernels.integrations.verl as rv  # noqa: E402
from rlvr_kernels.integrations._verl import bypass as bp  # noqa: E402
from rlvr_kernels.reference import loss as ref_loss  # noqa: E402

AGG = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
LENS = (10, 7, 1, 0, 9, 4)
IS = {
    "none": dict(rollout_is=None),
    "token_tis": dict(rollout_is="token", rollout_is_threshold=1.2),
    "seq_tis": dict(rollout_is="sequence", rollout_is_threshold=2.0),
    "token_icepop": dict(rollout_is="token", rollout_is_threshold="0.8_1.3"),
}
RS = {
    "none": dict(),
    "token_k1": dict(rollout_rs="token_k1", rollout_rs_threshold="0.8_1.5"),  # asymmetric: verl's band is on -log r
    "chain": dict(rollout_rs="token_k1,seq_max_k2", rollout_rs_threshold="1.5,0.1"),
}


def _cfg(pl, agg="token-mean"):
    return FSDPActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, loss_agg_mode=agg, clip_ratio_low=0.05,
        clip_ratio_high=0.08, clip_ratio_c=3.0, policy_loss=pl,
    )  # fmt: skip


def _cfgs(rc, agg="token-mean"):
    """verl's config (loss_mode=bypass_mode) and ours (rlvr_bypass_mode), the same rollout_correction."""
    verl = _cfg(PolicyLossConfig(loss_mode="bypass_mode", rollout_correction=rc), agg)
    ours = _cfg(rv.RLVRPolicyLossConfig(loss_mode="rlvr_bypass_mode", rollout_correction=rc), agg)
    return verl, ours


def _batch(seed, lens=LENS, T=10, noise=0.3):
    """old (= rollout) / current log-probs, advantages (both signs, some large: the dual clip), mask."""
    B = len(lens)
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 2.0
    lp = (old + torch.randn(B, T, generator=g) * noise).clamp(max=-1e-3)
    adv = (torch.randn(B, 1, generator=g) * 2.0).expand(B, T).contiguous()
    mask = (torch.arange(T)[None] < torch.tensor(lens)[:, None]).float()
    return old, lp, adv, mask


def _run(name, cfg, old, lp, adv, mask, agg="token-mean"):
    x = lp.clone().requires_grad_()
    loss, met = get_policy_loss_fn(name)(old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask,
                                         loss_agg_mode=agg, config=cfg, rollout_is_weights=None)  # fmt: skip
    loss.backward()
    return loss.detach(), x.grad, met


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# batch normalisation applies to an IS weight
CASES = [c for c in itertools.product(("ppo_clip", "reinforce"), IS, RS, (False, True)) if c[1] != "none" or not c[3]]


@pytest.mark.parametrize("loss_type,is_name,rs_name,normalize", CASES)
def test_matches_verl_bypass_mode(loss_type, is_name, rs_name, normalize):
    rc = RolloutCorrectionConfig(loss_type=loss_type, rollout_is_batch_normalize=normalize, bypass_mode=True,
                                 **IS[is_name], **RS[rs_name])  # fmt: skip
    for seed in (0, 1):
        old, lp, adv, mask = _batch(seed)
        for agg in AGG:
            verl_cfg, cfg = _cfgs(rc, agg)
            lv, gv, mv = _run("bypass_mode", verl_cfg, old, lp, adv, mask, agg)
            lo, go, mo = _run("rlvr_bypass_mode", cfg, old, lp, adv, mask, agg)
            _close(lo, lv)
            _close(go, gv)
        # the cases do something: rejection removes some tokens (not all), IcePop zeroes some weights, TIS clips
        if rs_name != "none":
            assert 0 < mo["rlvr/rollout_rs_masked_fraction"] < 1
            _close(torch.tensor(mo["rlvr/rollout_rs_masked_fraction"]),
                   torch.tensor(mv["rollout_corr/rollout_rs_masked_fraction"]))  # fmt: skip
        if is_name == "token_icepop":
            assert 0 < mo["rlvr/rollout_is_zeroed_fraction"] < 1
        if is_name == "token_tis":
            assert mv["rollout_corr/rollout_is_ratio_fraction_high"] > 0
        if normalize:
            _close(torch.tensor(mo["rlvr/rollout_is_batch_norm_factor"]),
                   torch.tensor(mv["rollout_corr/rollout_is_batch_norm_factor"]))  # fmt: skip
        if loss_type == "ppo_clip":
            assert mo["rlvr/clip_ratio"] > 0


def test_k1_band_is_verls_not_the_packages():
    """verl's ``"a_b"`` k1 band bounds ``-log r``: taken as the package's ``[a, b]`` it would keep other tokens."""
    old, lp, _, mask = _batch(0)
    corr = bp.correction_of(_cfgs(RolloutCorrectionConfig(rollout_is=None, **RS["token_k1"]))[1])
    assert corr.rs == "token_k1" and corr.rs_low == pytest.approx((1 / 1.5,)) and corr.rs_high == (1 / 0.8,)
    keep, _, _ = bp.bypass_correction(corr, lp - old, mask)
    naive, _ = ref_loss.rollout_correction(lp - old, mask, rs="token_k1", rs_low=0.8, rs_high=1.5)
    assert not torch.equal(keep, naive)


PRESETS = [
    n for n, v in vars(RolloutCorrectionConfig).items() if n.startswith("bypass_") and isinstance(v, classmethod)
]


@pytest.mark.parametrize("preset", PRESETS)
def test_verl_presets(preset):
    rc = getattr(RolloutCorrectionConfig, preset)()
    assert rc.bypass_mode
    old, lp, adv, mask = _batch(3, noise=0.002)  # Geo-RS keeps geometric means within 0.1%
    for agg in ("token-mean", "seq-mean-token-sum"):
        verl_cfg, cfg = _cfgs(rc, agg)
        lv, gv, _ = _run("bypass_mode", verl_cfg, old, lp, adv, mask, agg)
        lo, go, _ = _run("rlvr_bypass_mode", cfg, old, lp, adv, mask, agg)
        _close(lo, lv)
        _close(go, gv)


def test_everything_rejected():
    """verl divides 0 by 0 tokens (NaN) when the rejection removes every token and global_batch_info is empty; ours
    is 0. With verl's global token count (as inside its trainer) both are 0."""
    rc = RolloutCorrectionConfig.bypass_pg_geo_rs()
    old, lp, adv, mask = _batch(3, noise=0.3)
    verl_cfg, cfg = _cfgs(rc)
    lv, _, _ = _run("bypass_mode", verl_cfg, old, lp, adv, mask)
    lo, go, met = _run("rlvr_bypass_mode", cfg, old, lp, adv, mask)
    assert torch.isnan(lv) and lo == 0 and torch.all(go == 0) and met["rlvr/rollout_rs_masked_fraction"] == 1
    for c in (verl_cfg, cfg):
        c.global_batch_info.update(batch_num_tokens=int(mask.sum()), dp_size=1)
    lv, gv, _ = _run("bypass_mode", verl_cfg, old, lp, adv, mask)
    lo, go, _ = _run("rlvr_bypass_mode", cfg, old, lp, adv, mask)
    _close(lo, lv)
    _close(go, gv)


def test_omegaconf_rollout_correction_and_global_batch_info():
    """The driver's form (a DictConfig put in by apply_bypass_mode) and verl's global token count."""
    old, lp, adv, mask = _batch(4)
    rc = dict(loss_type="reinforce", rollout_is="sequence", rollout_is_threshold="0.5_3.0",
              rollout_rs="seq_mean_k3,token_k1", rollout_rs_threshold="0.02,0.8_1.4")  # fmt: skip
    verl_cfg, cfg = (_cfg(OmegaConf.create(dict(loss_mode=m, rollout_correction=rc)))
                     for m in ("bypass_mode", "rlvr_bypass_mode"))  # fmt: skip
    for c in (verl_cfg, cfg):
        c.global_batch_info.update(batch_num_tokens=60, dp_size=2)
    lv, gv, _ = _run("bypass_mode", verl_cfg, old, lp, adv, mask)
    lo, go, _ = _run("rlvr_bypass_mode", cfg, old, lp, adv, mask)
    _close(lo, lv)
    _close(go, gv)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("loss_type", ["ppo_clip", "reinforce"])
def test_poisoned_padding(loss_type, agg):
    """NaN / -inf at response_mask == 0 (log-probs, rollout log-probs, advantages): verl's own loss is NaN there in
    some modes, so ours on poisoned padding must be finite and equal to verl's on clean padding."""
    rc = RolloutCorrectionConfig(loss_type=loss_type, rollout_is="sequence", rollout_is_batch_normalize=True,
                                 **RS["chain"])  # fmt: skip
    verl_cfg, cfg = _cfgs(rc, agg)
    old, lp, adv, mask = _batch(5)
    on = mask > 0
    lp_p = torch.where(on, lp, float("nan"))
    old_p = torch.where(on, old, float("-inf"))
    adv_p = torch.where(on, adv, float("nan"))
    lc, gc, _ = _run("bypass_mode", verl_cfg, old, lp, adv, mask, agg)
    lo, go, met = _run("rlvr_bypass_mode", cfg, old_p, lp_p, adv_p, mask, agg)
    assert torch.isfinite(lo) and torch.isfinite(go).all() and all(v == v for v in met.values())
    _close(lo, lc)
    _close(go, gc)
    assert torch.all(go[~on] == 0)


def test_empty_rows_and_empty_batch():
    rc = RolloutCorrectionConfig(loss_type="reinforce", rollout_is="token", rollout_is_batch_normalize=True)
    verl_cfg, cfg = _cfgs(rc)
    old, lp, adv, mask = _batch(6, lens=(0, 3, 0, 0))
    for agg in AGG:
        verl_cfg, cfg = _cfgs(rc, agg)
        lv, gv, _ = _run("bypass_mode", verl_cfg, old, lp, adv, mask, agg)
        lo, go, _ = _run("rlvr_bypass_mode", cfg, old, lp, adv, mask, agg)
        _close(lo, lv)
        _close(go, gv)
    # a micro-batch without a loss token: verl raises, ours is 0 with a zero gradient
    empty = torch.zeros_like(mask)
    with pytest.raises(ValueError, match="at least one valid token"):
        _run("bypass_mode", verl_cfg, old, lp, adv, empty)
    lo, go, _ = _run("rlvr_bypass_mode", cfg, old, lp, adv, empty)
    assert lo == 0 and torch.all(go == 0)


def test_rank_batch_mean_all_reduce():
    """With torch.distributed initialised (one rank here) the batch mean goes through all_reduce, as verl's
    distributed_masked_mean; two ranks: test_two_ranks_batch_normalize."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        test_matches_verl_bypass_mode("reinforce", "token_icepop", "chain", True)
        test_matches_verl_bypass_mode("reinforce", "seq_tis", "none", True)
    finally:
        dist.destroy_process_group()


TWO_RANK_CASES = (("token", "0.8_1.3"), ("sequence", 2.0))


def _rank_batch(rank):
    return _batch(10 + rank, lens=((10, 2, 0) if rank == 0 else (3, 8, 5, 9)))


def _rc_norm(level, thr):
    return RolloutCorrectionConfig(loss_type="reinforce", rollout_is=level, rollout_is_threshold=thr,
                                   rollout_is_batch_normalize=True)  # fmt: skip


def _two_ranks_fn(rank, world):
    out = []
    for level, thr in TWO_RANK_CASES:
        verl_cfg, cfg = _cfgs(_rc_norm(level, thr))
        data = _rank_batch(rank)
        lv, gv, _ = _run("bypass_mode", verl_cfg, *data)
        lo, go, met = _run("rlvr_bypass_mode", cfg, *data)
        out.append((lv.item(), gv.tolist(), lo.item(), go.tolist(), met["rlvr/rollout_is_batch_norm_factor"]))
    return out


def test_two_ranks_batch_normalize():
    """Two gloo ranks with different batches: verl's distributed_masked_mean, i.e. the mean over the union of the
    ranks' batches (not each rank's own)."""
    from _gloo import run_ranks

    results = run_ranks(_two_ranks_fn, 2)
    for rank in (0, 1):
        for lv, gv, lo, go, _ in results[rank]:
            _close(torch.tensor(lo), torch.tensor(lv))
            _close(torch.tensor(go), torch.tensor(gv))
    both = [torch.cat(t) for t in zip(_rank_batch(0), _rank_batch(1))]
    for i, (level, thr) in enumerate(TWO_RANK_CASES):
        cfg = _cfgs(_rc_norm(level, thr))[1]
        union = _run("rlvr_bypass_mode", cfg, *both)[2]["rlvr/rollout_is_batch_norm_factor"]
        for rank in (0, 1):
            assert results[rank][i][4] == pytest.approx(union, rel=1e-5)
            own = _run("rlvr_bypass_mode", cfg, *_rank_batch(rank))[2]["rlvr/rollout_is_batch_norm_factor"]
            assert own != pytest.approx(union, rel=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# the config mapping and its errors


def test_mapping_of_rollout_correction():
    c = bp.correction_of(_cfgs(RolloutCorrectionConfig())[1])  # verl's defaults: sequence TIS at 2, ppo_clip
    assert c == bp.BypassCorrection(loss_type="ppo_clip", is_level="sequence", is_low=None, is_high=2.0)
    c = bp.correction_of(_cfgs(RolloutCorrectionConfig(
        loss_type="reinforce", rollout_is="token", rollout_is_threshold="0.5_2.0", rollout_is_batch_normalize=True,
        rollout_rs="token_k1, seq_max_k2,token_k1", rollout_rs_threshold="1.5,0.1"))[1])  # fmt: skip
    assert (c.is_level, c.is_low, c.is_high, c.batch_normalize, c.icepop) == ("token", 0.5, 2.0, True, True)
    assert c.rs == "token_k1,seq_max_k2" and c.rs_low[1] is None and c.rs_high[1] == 0.1
    assert c.rs_low[0] == pytest.approx(1 / 1.5) and c.rs_high[0] == pytest.approx(1.5)
    c = bp.correction_of(_cfgs(RolloutCorrectionConfig(rollout_is="token", rollout_is_threshold=None))[1])
    assert c.is_level == "none"  # verl: no IS weight without a threshold


@pytest.mark.parametrize(
    "rc,match",
    [
        (dict(loss_type="ppo"), "loss_type"),
        (dict(rollout_is="tok"), "rollout_is"),
        (dict(rollout_rs="token_k1"), "rollout_rs_threshold"),
        (dict(rollout_rs="token_k9", rollout_rs_threshold=2.0), "token_k9"),
        (dict(rollout_rs="token_k2", rollout_rs_threshold="0.5_2.0"), "single upper bound"),
        (dict(rollout_is_threshold="2.0_0.5"), "lower bound"),
    ],
)
def test_bad_rollout_correction_raises_as_verl(rc, match):
    verl_cfg, cfg = _cfgs(RolloutCorrectionConfig(**rc))
    old, lp, adv, mask = _batch(0)
    with pytest.raises(ValueError):
        _run("bypass_mode", verl_cfg, old, lp, adv, mask)
    with pytest.raises(ValueError, match=match):
        _run("rlvr_bypass_mode", cfg, old, lp, adv, mask)


def test_missing_config_and_double_correction():
    old, lp, adv, mask = _batch(0)
    cfg = _cfg(OmegaConf.create({"loss_mode": "rlvr_bypass_mode"}))
    with pytest.raises(ValueError, match="rollout_correction is not set"):
        _run("rlvr_bypass_mode", cfg, old, lp, adv, mask)
    pl = rv.RLVRPolicyLossConfig(loss_mode="rlvr_bypass_mode", rlvr={"rollout_is": "token"})
    with pytest.raises(ValueError, match="policy_loss.rlvr.rollout_is"):
        _run("rlvr_bypass_mode", _cfg(pl), old, lp, adv, mask)


def test_loss_name_is_known():
    rv.check_loss_mode("rlvr_bypass_mode")
    assert rv.RLVRPolicyLossConfig(loss_mode="rlvr_bypass_mode").loss_mode == "rlvr_bypass_mode"
    with pytest.raises(ValueError, match="did you mean 'rlvr_bypass_mode'"):
        rv.check_loss_mode("rlvr_bypass_mod")
    assert "rlvr_bypass_mode" not in rv.LOSS_NAMES  # the catalogue's losses; bypass has no LossSpec
    assert get_policy_loss_fn("rlvr_bypass_mode") is bp.bypass_mode_loss


# ----------------------------------------------------------------------------------------------------------------
# apply_bypass_mode


def _driver(loss_mode):
    from verl.trainer.ppo import rollout_corr_helper as H

    mu = torch.randn(2, 3)
    batch = types.SimpleNamespace(batch={"rollout_log_probs": mu, "old_log_probs": torch.zeros(2, 3)})
    pl = OmegaConf.structured(PolicyLossConfig(loss_mode=loss_mode))
    rc = OmegaConf.structured(RolloutCorrectionConfig.bypass_pg_is())
    return bp.wrap_apply_bypass_mode(H.apply_bypass_mode), batch, rc, pl, mu


def test_apply_bypass_mode_keeps_rlvr_bypass_mode():
    apply, batch, rc, pl, mu = _driver("rlvr_bypass_mode")
    apply(batch=batch, rollout_corr_config=rc, policy_loss_config=pl)
    assert pl.loss_mode == "rlvr_bypass_mode" and pl.rollout_correction.loss_type == "reinforce"
    assert batch.batch["old_log_probs"] is mu


def test_apply_bypass_mode_leaves_verl_losses_to_verl():
    apply, batch, rc, pl, mu = _driver("vanilla")
    apply(batch, rc, pl)
    assert pl.loss_mode == "bypass_mode" and batch.batch["old_log_probs"] is mu


def test_apply_bypass_mode_refuses_other_rlvr_losses():
    apply, batch, rc, pl, mu = _driver("rlvr_clip")
    old = batch.batch["old_log_probs"]
    with pytest.raises(ValueError, match="rlvr_bypass_mode"):
        apply(batch=batch, rollout_corr_config=rc, policy_loss_config=pl)
    assert pl.loss_mode == "rlvr_clip" and batch.batch["old_log_probs"] is old


def test_hook_wraps_once():
    from verl.trainer.ppo import rollout_corr_helper as H

    assert H.apply_bypass_mode._rlvr_wrapped  # install_hooks (importing the plug-in) wrapped verl's function
    verl_fn = H.apply_bypass_mode.__wrapped__
    assert not getattr(verl_fn, "_rlvr_wrapped", False)
    mod = types.SimpleNamespace(__name__="fake", apply_bypass_mode=verl_fn)
    bp.hook_rollout_corr_helper(mod)
    first = mod.apply_bypass_mode
    assert first is not verl_fn and first._rlvr_wrapped
    bp.hook_rollout_corr_helper(mod)
    assert mod.apply_bypass_mode is first
    bp.hook_rollout_corr_helper(types.SimpleNamespace(__name__="empty"))  # logged, nothing raised
