"""RLVRLoss against verl's own policy losses (verl 0.9.1 from PyPI): the same hidden states and lm_head go through
``RLVRLoss`` on one side and through ``fused_linear_logprobs`` + verl's ``compute_policy_loss_*`` (with its
``agg_loss`` and ``global_batch_info``) on the other; losses and gradients w.r.t. the hidden states and the weight
must agree, for every aggregation mode, with and without DP batch info. (TRL's loss is checked end to end in
test_integration_trl.py: stock GRPOTrainer vs ours, same loss and grad norm at every step.)"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl")

from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.workers.config import FSDPActorConfig  # noqa: E402

from rlvr_kernels import RLVRLoss, fused_linear_logprobs  # noqa: E402

AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
B, T, H, V = 4, 9, 12, 97
LOW, HIGH, CLIP_C = 0.2, 0.28, 3.0

# verl loss name -> RLVRLoss keywords giving the same objective
OURS = {
    "vanilla": dict(loss_type="dapo", epsilon_low=LOW, epsilon_high=HIGH, dual_clip=CLIP_C, log_ratio_clip=20.0),
    "dppo_tv": dict(loss_type="dppo", epsilon_low=LOW, epsilon_high=HIGH, ratio_cap=CLIP_C),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=LOW, epsilon_high=HIGH),
    # verl clamps the ratio at [1 - low, 1 + high]; ours takes absolute bounds
    "cispo": dict(loss_type="cispo", epsilon_high=1.0 + HIGH, cispo_min=1.0 - LOW, log_ratio_clip=20.0),
}


def make(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7
    ids = torch.randint(0, V, (B, T), generator=g)
    lens = torch.tensor([T, 5, 1, 7])
    mask = torch.arange(T)[None, :] < lens[:, None]
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    with torch.no_grad():
        lp, _ = fused_linear_logprobs(x, w, ids, backend="torch")
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5  # ratios hit every clip branch
    return x, w, ids, mask, adv, old


def verl_side(name, mode, x, w, ids, mask, adv, old, gbi):
    cfg = FSDPActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=2,
        loss_agg_mode=mode,
        clip_ratio_low=LOW,
        clip_ratio_high=HIGH,
        clip_ratio_c=CLIP_C,
    )
    cfg.global_batch_info.update(gbi)
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    lp, _ = fused_linear_logprobs(xx, ww, ids, backend="torch", return_entropy=False)
    loss, _ = get_policy_loss_fn(name)(
        old_log_prob=old,
        log_prob=lp,
        advantages=adv[:, None].expand(B, T),
        response_mask=mask,
        loss_agg_mode=mode,
        config=cfg,
    )
    loss.backward()
    return loss.detach(), xx.grad, ww.grad


def our_side(name, mode, x, w, ids, mask, adv, old, gbi, fused):
    kw = dict(OURS[name], beta=0.0, aggregation=mode, fused=fused, backend="torch")
    if mode == "seq-mean-token-sum-norm":
        kw["loss_horizon"] = gbi.get("loss_scale_factor", T)
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, metrics = RLVRLoss(**kw)(
        xx,
        ww,
        ids,
        mask.float(),
        adv,
        old_per_token_logps=old,
        global_batch_size=gbi.get("global_batch_size"),
        batch_num_tokens=gbi.get("batch_num_tokens"),
        dp_size=gbi.get("dp_size", 1),
    )
    loss.backward()
    return loss.detach(), xx.grad, ww.grad


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("name", list(OURS))
@pytest.mark.parametrize("dp", [False, True], ids=["local", "dp2"])
def test_parity_with_verl_policy_loss(name, mode, dp):
    x, w, ids, mask, adv, old = make(seed=11)
    gbi = {}
    if dp:  # a 2-rank run: verl divides by the global counts and multiplies by dp_size
        gbi = dict(
            dp_size=2, batch_num_tokens=int(mask.sum()) * 2 + 3, global_batch_size=2 * B + 1, loss_scale_factor=16
        )
    lv, gxv, gwv = verl_side(name, mode, x, w, ids, mask, adv, old, gbi)
    assert float(gxv.abs().sum()) > 0
    for fused in (True, False):
        lo, gxo, gwo = our_side(name, mode, x, w, ids, mask, adv, old, gbi, fused)
        # the token pass runs in fp32 (verl's here in float64): fp32 tolerances
        torch.testing.assert_close(lo.double(), lv.double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gxo, gxv, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gwo, gwv, rtol=1e-5, atol=1e-7)


def test_log_ratio_clip_caps_the_ratio():
    """verl clamps log(pi/pi_old) to +-20 before exp; with log_ratio_clip=20 ours does too, without it (Liger/TRL)
    the ratio is exp(log ratio)."""
    x, w, ids, mask, adv, old = make(seed=2)
    old = old - 30.0 * (torch.arange(T) == 0).double()  # log ratio ~30 at position 0
    adv = -adv.abs()  # A < 0: the unclipped branch -A r is the max, so the ratio shows in the loss
    kw = dict(beta=0.0, loss_type="bnpo", epsilon_low=LOW, epsilon_high=HIGH, backend="torch")
    capped, _ = RLVRLoss(log_ratio_clip=20.0, **kw)(x, w, ids, mask.float(), adv, old_per_token_logps=old)
    free, _ = RLVRLoss(**kw)(x, w, ids, mask.float(), adv, old_per_token_logps=old)
    assert torch.isfinite(capped) and torch.isfinite(free)
    assert float(free) > 1e3 * float(capped) > 0
    with pytest.raises(ValueError, match="log_ratio_clip"):
        RLVRLoss(log_ratio_clip=-1.0)
    with pytest.raises(ValueError, match="dp_size"):
        RLVRLoss(beta=0.0, aggregation="token-mean", backend="torch")(
            x, w, ids, mask.float(), adv, old_per_token_logps=old, dp_size=0
        )


def test_auto_takes_the_composable_path_for_rows_over_the_chunk_budget(monkeypatch):
    """A sequence whose [T, V] fp32 block exceeds the fused path's chunk budget goes through the composable path
    under fused='auto' when the loss needs whole rows (here GSPO's sequence ratio; same numbers, O(chunk x V)
    memory). Token-local losses split the row instead (test_loss.py)."""
    import rlvr_kernels.loss as L

    x, w, ids, mask, adv, old = make(seed=4)
    kw = dict(beta=0.0, loss_type="grpo", importance_sampling_level="sequence", backend="torch")
    ref, _ = RLVRLoss(fused=True, **kw)(x.requires_grad_(), w, ids, mask.float(), adv, old_per_token_logps=old)
    monkeypatch.setenv("RLVR_KERNELS_CHUNK_BYTES", str(T * V * 4 - 1))

    def boom(*a, **k):
        raise AssertionError("the fused path ran")

    monkeypatch.setattr(L.fused, "fused_pass", boom)
    got, _ = RLVRLoss(fused="auto", **kw)(x, w, ids, mask.float(), adv, old_per_token_logps=old)
    torch.testing.assert_close(got, ref)
