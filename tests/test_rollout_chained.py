"""Rollout corrections: ``rollout_is_batch_normalize`` and chained rejection criteria (``rollout_rs="a,b"``).

- against verl 0.9.1's ``compute_rollout_correction_and_rejection_mask``: the batch-normalised IS weights (token and
  sequence level, TIS and IcePop / sequence MIS bands, a threshold that truncates nothing) and 2-3 chained criteria
  with one shared or one threshold per criterion, on batches with empty rows, NaN / -inf padding and bf16 log-probs
  (cast to fp32 as the callers do);
- ``RLVRLoss`` (fused and composable), the verl plug-in's ``rlvr_clip`` and ``torch.compile(fullgraph=True)`` with
  the new options;
- the option checks (RLVRLoss, verl's ``policy_loss.rlvr``, TRL's config).
"""

from __future__ import annotations

import types

import pytest
import torch

from rlvr_kernels import RLVRLoss, fused_linear_logprobs
from rlvr_kernels import methods as M
from rlvr_kernels.reference import loss as ref_loss

B, T, H, V = 6, 11, 8, 24
LENS = (11, 5, 0, 7, 1, 9)


def _mask():
    return torch.arange(T)[None] < torch.tensor(LENS)[:, None]


def _data(seed=0, noise=0.4, dtype=torch.float32, pad=float("nan")):
    """old / mu log-probs (``dtype``) with ``pad`` at the padding of mu and -inf at the padding of old."""
    g = torch.Generator().manual_seed(seed)
    mask = _mask()
    old = -torch.rand(B, T, generator=g) * 2.0
    mu = old + torch.randn(B, T, generator=g) * noise
    old, mu = old.to(dtype), mu.to(dtype)
    mu = torch.where(mask, mu, torch.full_like(mu, pad))
    old = torch.where(mask, old, torch.full_like(old, float("-inf")))
    return old, mu, mask


def _ns(**opts):
    return types.SimpleNamespace(**M.check_options({**M.option_defaults(M.ROLLOUT_OPTIONS), **opts}))


def _ours(old, mu, mask, **opts):
    """Through the catalogue (checks, then ``methods.rollout_correction``: the fp32 cast the callers do)."""
    return M.rollout_correction(_ns(**opts), old, mu, mask)


def _verl(old, mu, mask, **kw):
    helper = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")
    old = torch.where(mask, old.float(), 0.0)  # verl reads every position: clean padding for it
    mu = torch.where(mask, mu.float(), old)
    w, new_mask, _ = helper.compute_rollout_correction_and_rejection_mask(old, mu, mask.float(), **kw)
    return (None if w is None else w.batch["rollout_is_weights"]), new_mask


def _check_vs_verl(old, mu, mask, vkw, okw, *, rtol=1e-5, atol=1e-6):
    wv, mv = _verl(old, mu, mask, **vkw)
    keep, w = _ours(old, mu, mask, **okw)
    keep_v = mv.bool() & mask
    if wv is not None:
        keep_v = keep_v & (wv > 0)  # verl's IcePop zeroes the weight; here the token leaves the loss
        torch.testing.assert_close((w * keep).expand(B, T), torch.where(keep_v, wv, 0.0), rtol=rtol, atol=atol)
    assert torch.equal(keep.bool(), keep_v)
    return keep, w, wv


# ----------------------------------------------------------------------------------------------------------------
# rollout_is_batch_normalize vs verl

NORM = {
    "token_tis": (dict(rollout_is="token", rollout_is_threshold=1.3), dict(rollout_is="token", rollout_is_high=1.3)),
    "token_untruncated": (
        dict(rollout_is="token", rollout_is_threshold=1e4),
        dict(rollout_is="token", rollout_is_high=1e4),
    ),
    "sequence_tis": (
        dict(rollout_is="sequence", rollout_is_threshold=2.0),
        dict(rollout_is="sequence", rollout_is_high=2.0),
    ),
    "sequence_untruncated": (
        dict(rollout_is="sequence", rollout_is_threshold=1e4),
        dict(rollout_is="sequence", rollout_is_high=1e4),
    ),
    "icepop": (
        dict(rollout_is="token", rollout_is_threshold="0.8_1.25"),
        dict(rollout_is="token", rollout_is_mode="mask", rollout_is_low=0.8, rollout_is_high=1.25),
    ),
    "sequence_mis": (
        dict(rollout_is="sequence", rollout_is_threshold="0.5_2.0"),
        dict(rollout_is="sequence", rollout_is_mode="mask", rollout_is_low=0.5, rollout_is_high=2.0),
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(NORM))
def test_batch_normalize_matches_verl(name, dtype):
    vkw, okw = NORM[name]
    noise = 0.2 if "sequence" in name else 0.4
    old, mu, mask = _data(1, noise=noise, dtype=dtype)
    keep, w, wv = _check_vs_verl(
        old, mu, mask, dict(vkw, rollout_is_batch_normalize=True), dict(okw, rollout_is_batch_normalize=True)
    )
    # mean 1 over the batch: the loss tokens (token level) or the non-empty rows (sequence level), removed ones as 0
    rows = mask.any(-1)
    if okw["rollout_is"] == "token":
        mean = (w * keep)[mask].mean()
    else:
        mean = (w * keep.amax(-1, keepdim=True))[rows].mean()
        assert w.shape == (B, 1)
    torch.testing.assert_close(mean, torch.tensor(1.0), rtol=1e-5, atol=1e-6)
    # not the unnormalised weights (the normalisation did something), and those still match verl's
    keep0, w0 = _ours(old, mu, mask, **okw)
    assert torch.equal(keep0, keep)
    assert not torch.allclose(w0 * keep0, w * keep)


def test_batch_normalize_with_a_chained_rejection_matches_verl():
    """The rejection does not enter the mean (verl computes both from the original response_mask)."""
    old, mu, mask = _data(2, noise=0.3)
    _check_vs_verl(
        old, mu, mask,
        dict(rollout_is="token", rollout_is_threshold=1.5, rollout_is_batch_normalize=True,
             rollout_rs="seq_mean_k1,token_k2", rollout_rs_threshold="1.1,0.08"),
        dict(rollout_is="token", rollout_is_high=1.5, rollout_is_batch_normalize=True,
             rollout_rs="seq_mean_k1,token_k2", rollout_rs_high=(1.1, 0.08)),
    )  # fmt: skip


def test_batch_normalize_inert_cases():
    old, mu, mask = _data(3)
    # an empty batch: nothing to normalise by, the weights stay as they are (no NaN)
    empty = torch.zeros_like(mask)
    keep, w = _ours(old, mu, empty, rollout_is="token", rollout_is_batch_normalize=True)
    assert keep.sum() == 0 and torch.isfinite(w).all()
    # all weights removed by the band: mean 0 -> left alone (verl's guard), removed tokens keep the inert 1
    keep, w = _ours(old, mu, mask, rollout_is="token", rollout_is_mode="mask", rollout_is_low=50.0,
                    rollout_is_high=60.0, rollout_is_batch_normalize=True)  # fmt: skip
    assert keep.sum() == 0 and torch.equal(w[mask], torch.ones(int(mask.sum())))
    # every weight 1: unchanged
    keep, w = _ours(old, old, mask, rollout_is="sequence", rollout_is_batch_normalize=True)
    torch.testing.assert_close(w, torch.ones(B, 1))
    # detached, whatever the inputs
    o = old.clone().requires_grad_()
    _, w = _ours(o, mu, mask, rollout_is="token", rollout_is_batch_normalize=True)
    assert not w.requires_grad


# ----------------------------------------------------------------------------------------------------------------
# chained rejection criteria vs verl

CHAINS = {
    # verl's spec -> ours; a shared threshold, one per criterion, an asymmetric k1 band (verl's "a_b" is ours
    # [1 / b, 1 / a]), three criteria
    "token_k1,seq_max_k2": ("1.5,0.1", dict(rollout_rs_high=(1.5, 0.1))),
    "token_k2,seq_max_k3": (0.08, dict(rollout_rs_high=0.08)),
    "seq_mean_k1,token_k3,seq_sum_k2": (
        "0.9_1.2,0.08,0.3",
        dict(rollout_rs_low=(1 / 1.2, None, None), rollout_rs_high=(1 / 0.9, 0.08, 0.3)),
    ),
    "seq_sum_k1,token_k1": ("2.7,1.5", dict(rollout_rs_high="2.7, 1.5")),
    "token_k1,seq_mean_k1": ("0.7_1.6,1.2", dict(rollout_rs_low=(1 / 1.6, None), rollout_rs_high=(1 / 0.7, 1.2))),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chain", list(CHAINS))
def test_chained_rejection_matches_verl(chain, dtype):
    spec, okw = CHAINS[chain]
    old, mu, mask = _data(4, noise=0.3, dtype=dtype, pad=float("-inf"))
    keep, w, _ = _check_vs_verl(
        old, mu, mask, dict(rollout_is=None, rollout_rs=chain, rollout_rs_threshold=spec), dict(okw, rollout_rs=chain)
    )
    assert w is None
    assert 0 < keep.sum() < mask.sum(), chain
    # every criterion keeps the token: the chain is the AND of the single criteria, and it removes more than each
    bands = ref_loss.rollout_rs_bands(chain, okw.get("rollout_rs_low"), okw["rollout_rs_high"])
    assert [c for c, _, _ in bands] == chain.split(",")
    singles = [_ours(old, mu, mask, rollout_rs=c, rollout_rs_low=lo, rollout_rs_high=hi)[0]
               for c, lo, hi in bands]  # fmt: skip
    assert torch.equal(keep, torch.stack(singles).amin(0))
    assert any(not torch.equal(keep, s) for s in singles)


def test_chain_with_icepop_and_normalize_matches_verl():
    old, mu, mask = _data(5, noise=0.3, dtype=torch.bfloat16)
    _check_vs_verl(
        old, mu, mask,
        dict(rollout_is="token", rollout_is_threshold="0.6_2.0", rollout_is_batch_normalize=True,
             rollout_rs="seq_mean_k1,seq_max_k2,token_k1", rollout_rs_threshold="1.1,0.15,1.8"),
        dict(rollout_is="token", rollout_is_mode="mask", rollout_is_low=0.6, rollout_is_high=2.0,
             rollout_is_batch_normalize=True, rollout_rs="seq_mean_k1, seq_max_k2, token_k1",
             rollout_rs_high=[1.1, 0.15, 1.8]),
    )  # fmt: skip


def test_single_criterion_unchanged():
    old, mu, mask = _data(6)
    a = _ours(old, mu, mask, rollout_rs="seq_mean_k1", rollout_rs_high=1.1)
    b = _ours(old, mu, mask, rollout_rs=" seq_mean_k1 ", rollout_rs_high="1.1")
    c = _ours(old, mu, mask, rollout_rs="seq_mean_k1", rollout_rs_high=[1.1])
    assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0])
    assert _ns(rollout_rs=" seq_mean_k1 ", rollout_rs_high="1.1").rollout_rs_high == 1.1
    assert _ns(rollout_rs="token_k1 ,seq_max_k2", rollout_rs_high="1.5,0.1").rollout_rs == "token_k1,seq_max_k2"


# ----------------------------------------------------------------------------------------------------------------
# RLVRLoss, the verl plug-in, torch.compile


def _loss_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g) * 0.7
    w = torch.randn(V, H, generator=g) * 0.7
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = _mask().float()
    adv = torch.tensor([0.8, -0.5, 0.3, -1.1, 0.6, -0.2])
    with torch.no_grad():
        lp, _ = fused_linear_logprobs(x, w, ids, backend="torch")
    old = lp + 0.15 * torch.randn(B, T, generator=g)
    mu = old + 0.3 * torch.randn(B, T, generator=g)
    return x, w, ids, mask, adv, old, mu


def _run(module, x, w, *args, **kw):
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, metrics = module(xx, ww, *args, **kw)
    loss.backward()
    return loss.detach(), xx.grad, ww.grad, metrics


OPTS = {
    "token_tis_norm_chain": dict(
        rollout_is="token",
        rollout_is_high=1.3,
        rollout_is_batch_normalize=True,
        rollout_rs="seq_mean_k1,token_k2",
        rollout_rs_high=(1.1, 0.1),
    ),
    "sequence_mis_norm": dict(
        rollout_is="sequence",
        rollout_is_mode="mask",
        rollout_is_low=0.5,
        rollout_is_high=2.0,
        rollout_is_batch_normalize=True,
    ),
    "chain3": dict(rollout_rs="token_k1,seq_max_k3,seq_sum_k2", rollout_rs_high="1.6,0.15,0.4"),
}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
@pytest.mark.parametrize("name", list(OPTS))
def test_loss_is_weight_and_reduced_mask(name, loss_type, fused):
    x, w, ids, mask, adv, old, mu = _loss_inputs(1)
    opts = OPTS[name]
    keep, weight = M.rollout_correction(_ns(**opts), old, mu, mask)
    assert 0 < keep.sum() < mask.sum()
    kw = dict(loss_type=loss_type, beta=0.04, fused=fused, backend="torch")
    ref = torch.randn(B, T, generator=torch.Generator().manual_seed(9)) * 0.05 + old
    got = _run(RLVRLoss(**kw, **opts), x, w, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old,
               rollout_per_token_logps=mu)  # fmt: skip
    want = _run(RLVRLoss(**kw), x, w, ids, mask * keep, adv, ref_per_token_logps=ref, old_per_token_logps=old,
                vllm_is_ratio=weight.expand(B, T) if weight is not None else None)  # fmt: skip
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_compiled_no_graph_break(fused):
    x, w, ids, mask, adv, old, mu = _loss_inputs(4)
    module = RLVRLoss(loss_type="dapo", beta=0.0, fused=fused, backend="torch", **OPTS["token_tis_norm_chain"])

    def f(x, w):
        loss, metrics = module(x, w, ids, mask, adv, old_per_token_logps=old, rollout_per_token_logps=mu)
        return loss

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(f)(x.clone().requires_grad_(), w.clone().requires_grad_())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(xx, ww)
    got.backward()
    want = _run(module, x, w, ids, mask, adv, old_per_token_logps=old, rollout_per_token_logps=mu)
    torch.testing.assert_close(got.detach(), want[0])
    torch.testing.assert_close(xx.grad, want[1])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize(
    "rlvr, verl_kw",
    [
        (
            dict(rollout_is="token", rollout_is_high=1.5, rollout_is_batch_normalize=True,
                 rollout_rs="seq_mean_k1,seq_max_k2", rollout_rs_high=[1.1, 0.12]),
            dict(rollout_is="token", rollout_is_threshold=1.5, rollout_is_batch_normalize=True,
                 rollout_rs="seq_mean_k1,seq_max_k2", rollout_rs_threshold="1.1,0.12"),
        ),
        (
            dict(rollout_is="sequence", rollout_is_mode="mask", rollout_is_low=0.5, rollout_is_high=2.0,
                 rollout_is_batch_normalize=True, rollout_rs="token_k1,token_k3", rollout_rs_high="1.6,0.1"),
            dict(rollout_is="sequence", rollout_is_threshold="0.5_2.0", rollout_is_batch_normalize=True,
                 rollout_rs="token_k1,token_k3", rollout_rs_threshold="1.6,0.1"),
        ),
    ],
)  # fmt: skip
def test_verl_plugin_matches_verl(rlvr, verl_kw, agg):
    """``policy_loss.rlvr`` with the new options = verl's vanilla loss given verl's (normalised) weights and its
    chained rejection mask (the loss call's batch is verl's batch here)."""
    pytest.importorskip("verl")
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    import rlvr_kernels.integrations.verl as rv

    def cfg(pl):
        return FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, loss_agg_mode=agg,
                               clip_ratio_low=0.2, clip_ratio_high=0.28, policy_loss=pl)  # fmt: skip

    old, mu, mask = _data(6, noise=0.25)
    old = torch.where(mask, old, 0.0)
    g = torch.Generator().manual_seed(7)
    lp = old + torch.randn(B, T, generator=g) * 0.2
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    wv, mv = _verl(old, mu, mask, **verl_kw)
    mv = mv.bool() & (wv > 0) & mask

    def run(name, c, m, isw, **ctx):
        x = lp.clone().requires_grad_()
        with rv.loss_context(**ctx):
            loss, met = get_policy_loss_fn(name)(old_log_prob=old, log_prob=x, advantages=adv, response_mask=m,
                                                 loss_agg_mode=agg, config=c, rollout_is_weights=isw)  # fmt: skip
        loss.backward()
        return loss.detach(), x.grad, met

    lo, go, met = run("rlvr_clip", cfg(rv.RLVRPolicyLossConfig(loss_mode="rlvr_clip", rlvr=rlvr)), mask, None,
                      rollout_log_probs=torch.where(mask, mu, old))  # fmt: skip
    lv, gv, _ = run("vanilla", cfg(PolicyLossConfig(loss_mode="vanilla")), mv, torch.where(mask, wv, 0.0))
    torch.testing.assert_close(lo, lv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(go, gv, rtol=1e-5, atol=1e-6)
    assert met["rlvr/active_fraction"] < 1.0


# ----------------------------------------------------------------------------------------------------------------
# option checks


BAD = [
    (dict(rollout_rs="token_k1,tok_k2", rollout_rs_high=1.5), "not a rejection criterion"),
    (dict(rollout_rs="token_k1,none", rollout_rs_high=1.5), "not a rejection criterion"),
    (dict(rollout_rs="token_k1,,token_k2", rollout_rs_high=1.5), "not a rejection criterion"),
    (dict(rollout_rs="token_k1,seq_max_k2,token_k1", rollout_rs_high=1.5), "twice"),
    (dict(rollout_rs="token_k1,seq_max_k2", rollout_rs_high=(1.5, 0.1, 0.2)), "3 values for the 2 criteria"),
    (dict(rollout_rs="token_k1,seq_max_k2,token_k3", rollout_rs_high="1.5,0.1"), "2 values for the 3 criteria"),
    (dict(rollout_rs="token_k1,seq_max_k2", rollout_rs_high=1.5, rollout_rs_low=(0.5, None, None)), "low has 3"),
    (dict(rollout_rs="token_k1,seq_max_k2", rollout_rs_high="1.5,abc"), "not a number"),
    (dict(rollout_rs="token_k1,seq_max_k2", rollout_rs_high=(1.5, -0.1)), "rollout_rs_high"),
    (dict(rollout_rs="token_k1,seq_max_k2", rollout_rs_high=(1.5, None)), "rollout_rs_high"),
    (dict(rollout_rs="token_k1,seq_max_k2", rollout_rs_high=(1.5, 0.1), rollout_rs_low=(0.5, 0.05)), "\\*_k1"),
    (dict(rollout_rs="token_k2,seq_max_k2", rollout_rs_high=0.1, rollout_rs_low=0.05), "rollout_rs_low"),
    (dict(rollout_rs="token_k1,seq_max_k2", rollout_rs_high=(1.5, 0.1), rollout_rs_low=(2.0, None)), "<="),
    (dict(rollout_rs="token_k1,seq_max_k2"), "rollout_rs_high"),
    (dict(rollout_is_batch_normalize=True), "rollout_is_batch_normalize"),
    (dict(rollout_is="token", rollout_is_batch_normalize=1), "rollout_is_batch_normalize"),
]


@pytest.mark.parametrize("kw, match", BAD)
def test_option_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        try:
            RLVRLoss(**kw)
        except TypeError as exc:  # a flag of the wrong type is a TypeError in RLVRLoss (as every flag)
            raise ValueError(str(exc)) from None
    with pytest.raises(ValueError, match=match):  # the reference checks a raw chain too
        if "rollout_is_batch_normalize" in kw:
            raise ValueError("rollout_is_batch_normalize")
        ref_loss.rollout_correction(
            torch.zeros(2, 3), torch.ones(2, 3), rs=kw["rollout_rs"], rs_low=kw.get("rollout_rs_low"),
            rs_high=kw.get("rollout_rs_high")
        )  # fmt: skip


def test_verl_options_checked():
    pytest.importorskip("verl")
    import rlvr_kernels.integrations.verl as rv

    with pytest.raises(ValueError, match="policy_loss.rlvr.rollout_rs_high has 3 values"):
        rv.RLVRPolicyLossConfig(
            loss_mode="rlvr_clip", rlvr=dict(rollout_rs="token_k1,seq_max_k2", rollout_rs_high=[1.5, 0.1, 0.2])
        )
    with pytest.raises(ValueError, match="twice"):
        rv.RLVRPolicyLossConfig(loss_mode="rlvr_clip", rlvr=dict(rollout_rs="token_k1,token_k1", rollout_rs_high=1))
    with pytest.raises(ValueError, match="policy_loss.rlvr.rollout_is_batch_normalize"):
        rv.RLVRPolicyLossConfig(loss_mode="rlvr_clip", rlvr=dict(rollout_is_batch_normalize=True))
    rv.RLVRPolicyLossConfig(loss_mode="rlvr_clip", rlvr=OPTS["token_tis_norm_chain"])
    opts = rv.options_of({"policy_loss": {"rlvr": dict(rollout_rs="token_k1,seq_max_k2", rollout_rs_high=[1.5, 0.1])}})
    assert opts.rollout_rs == "token_k1,seq_max_k2" and opts.rollout_rs_high == (1.5, 0.1)
    assert not opts.rollout_is_batch_normalize


def test_trl_config_fields():
    pytest.importorskip("trl")
    from rlvr_kernels.integrations._trl import config as tc

    kw = dict(output_dir="/tmp/rlvr-rc-chain", use_cpu=True, bf16=False, report_to=[], use_vllm=True)
    c = tc.RLVRGRPOConfig(**kw, rollout_is="token", rollout_is_batch_normalize=True,
                          rollout_rs="token_k1, seq_max_k2", rollout_rs_high="1.5,0.1")  # fmt: skip
    assert c.rollout_rs == "token_k1,seq_max_k2" and c.rollout_rs_high == (1.5, 0.1)
    assert c.rollout_correction_kwargs()["rollout_is_batch_normalize"] is True
    assert tc.RLVRGRPOConfig(**kw, rollout_rs="seq_mean_k1", rollout_rs_high="1.1").rollout_rs_high == 1.1
    with pytest.raises(ValueError, match="2 values for the 3 criteria"):
        tc.RLVRGRPOConfig(**kw, rollout_rs="token_k1,seq_max_k2,token_k3", rollout_rs_high="1.5,0.1")
    with pytest.raises(ValueError, match="rollout_is_batch_normalize"):
        tc.RLVRGRPOConfig(**kw, rollout_is_batch_normalize=True)
