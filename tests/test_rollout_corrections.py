"""Rollout corrections (train / rollout mismatch): ``rollout_is`` / ``rollout_rs`` and their bounds.

- the weights and masks against verl 0.9.1's own ``compute_rollout_correction_and_rejection_mask`` (every IS level,
  TIS and IcePop thresholds, every rejection criterion) and against TRL 1.16's ``vllm_importance_sampling_mode``
  code (a transcription of ``GRPOTrainer._generate_and_score_completions``, checked to still be TRL's);
- ``RLVRLoss``: the correction is the loss with ``vllm_is_ratio = weight`` and the rejected tokens out of the mask
  (and out of every token count), on the fused and the composable path; TRL's ``token_mask`` parity where TRL's
  normaliser does not count tokens (dr_grpo); no graph break under ``torch.compile(fullgraph=True)``;
- the verl plug-in: ``policy_loss.rlvr.rollout_*`` = verl's ``vanilla`` loss with verl's weights and rejection mask;
- the option checks (RLVRLoss, verl's ``policy_loss.rlvr``, TRL's config).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from rlvr_kernels import RLVRLoss, fused_linear_logprobs
from rlvr_kernels import methods as M
from rlvr_kernels.reference import loss as ref_loss

B, T, H, V = 4, 9, 8, 24
LENS = (9, 5, 0, 7)


def _data(seed=0, noise=0.4):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None] < torch.tensor(LENS)[:, None]
    old = -torch.rand(B, T, generator=g) * 2.0
    mu = old + torch.randn(B, T, generator=g) * noise
    mu = torch.where(mask, mu, torch.full_like(mu, float("nan")))  # padding may hold anything
    return old, mu, mask


def _ours(old, mu, mask, **opts):
    cfg = M.check_options({**M.option_defaults(M.ROLLOUT_OPTIONS), **opts})
    keep, weight = ref_loss.rollout_correction(
        old - mu,
        mask.float(),
        is_level=cfg["rollout_is"],
        is_mode=cfg["rollout_is_mode"],
        is_low=cfg["rollout_is_low"],
        is_high=cfg["rollout_is_high"],
        rs=cfg["rollout_rs"],
        rs_low=cfg["rollout_rs_low"],
        rs_high=cfg["rollout_rs_high"],
    )
    return keep, weight


# ----------------------------------------------------------------------------------------------------------------
# verl's rollout_corr_helper


def _verl(old, mu, mask, **kw):
    helper = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")
    mu = torch.where(mask, mu, old)  # verl reads every position of rollout_log_prob
    w, new_mask, _ = helper.compute_rollout_correction_and_rejection_mask(old, mu, mask.float(), **kw)
    return (None if w is None else w.batch["rollout_is_weights"]), new_mask


VERL_IS = [
    (dict(rollout_is="token", rollout_is_threshold=1.3), dict(rollout_is="token", rollout_is_high=1.3)),
    (dict(rollout_is="sequence", rollout_is_threshold=2.0), dict(rollout_is="sequence", rollout_is_high=2.0)),
    (  # IcePop
        dict(rollout_is="token", rollout_is_threshold="0.8_1.25"),
        dict(rollout_is="token", rollout_is_mode="mask", rollout_is_low=0.8, rollout_is_high=1.25),
    ),
    (  # sequence masked IS
        dict(rollout_is="sequence", rollout_is_threshold="0.5_2.0"),
        dict(rollout_is="sequence", rollout_is_mode="mask", rollout_is_low=0.5, rollout_is_high=2.0),
    ),
]


@pytest.mark.parametrize("case", range(len(VERL_IS)))
def test_is_weights_match_verl(case):
    vkw, okw = VERL_IS[case]
    old, mu, mask = _data(1)
    wv, _ = _verl(old, mu, mask, **vkw)
    keep, w = _ours(old, mu, mask, **okw)
    got = (w * keep).expand(B, T)
    torch.testing.assert_close(got, wv * mask, rtol=1e-6, atol=1e-7)
    if okw.get("rollout_is_mode") == "mask":  # what verl zeroes leaves our loss
        assert torch.equal(keep.bool(), mask & (wv > 0))
        assert 0 < keep.sum() < mask.sum()


RS_THRESHOLDS = {"k1": 1.5, "k2": 0.08, "k3": 0.08}
RS_SEQ = {
    "seq_sum_k1": 2.7,
    "seq_sum_k2": 0.2,
    "seq_sum_k3": 0.2,
    "seq_mean_k1": 1.17,
    "seq_mean_k2": 0.035,
    "seq_mean_k3": 0.04,
    "seq_max_k2": 0.1,
    "seq_max_k3": 0.12,
}


@pytest.mark.parametrize("rs", [m for m in ref_loss.ROLLOUT_RS_MODES if m != "none"])
def test_rejection_matches_verl(rs):
    old, mu, mask = _data(2)
    thr = RS_SEQ.get(rs, RS_THRESHOLDS[rs[-2:]])
    _, mv = _verl(old, mu, mask, rollout_is=None, rollout_rs=rs, rollout_rs_threshold=thr)
    keep, w = _ours(old, mu, mask, rollout_rs=rs, rollout_rs_high=thr)
    assert w is None
    assert torch.equal(keep.bool(), mv.bool() & mask), rs
    assert 0 < keep.sum() < mask.sum(), rs  # the thresholds reject some, not all


def test_asymmetric_k1_band_is_verls_inverse():
    """verl's k1 statistic is log(mu / pi_old): its ``"a_b"`` band is ours ``[1 / b, 1 / a]`` on pi_old / mu."""
    old, mu, mask = _data(3)
    _, mv = _verl(old, mu, mask, rollout_rs="seq_mean_k1", rollout_rs_threshold="0.9_1.2")
    keep, _ = _ours(old, mu, mask, rollout_rs="seq_mean_k1", rollout_rs_low=1 / 1.2, rollout_rs_high=1 / 0.9)
    assert torch.equal(keep.bool(), mv.bool() & mask)


def test_geo_rs_token_mis_matches_verl_chain():
    """AReaL's Geo-RS + token MIS = verl's seq_mean_k1 rejection and its token IcePop weight, together."""
    old, mu, mask = _data(4, noise=0.3)
    opts = dict(M.ROLLOUT_CORRECTIONS["geo_rs_token_mis"], rollout_rs_high=1.08, rollout_is_low=0.6)
    wv, mv = _verl(
        old, mu, mask, rollout_is="token", rollout_is_threshold="0.6_2.0", rollout_rs="seq_mean_k1",
        rollout_rs_threshold=1.08,
    )  # fmt: skip
    keep, w = _ours(old, mu, mask, **opts)
    assert torch.equal(keep.bool(), mv.bool() & (wv > 0) & mask)
    torch.testing.assert_close(w * keep, wv * mv, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# TRL's vllm_importance_sampling_mode


def _trl_is_ratio(old, mu, mask, mode, cmin, cmax):
    """TRL 1.16 ``GRPOTrainer._generate_and_score_completions`` (vLLM IS correction), transcribed."""
    per_token_logps_diff = (old - mu) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    if mode in ["sequence_mask", "sequence_truncate"]:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    r = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        r = torch.clamp(r, min=cmin, max=cmax)
    else:
        lo = cmin if cmin is not None else -math.inf
        hi = cmax if cmax is not None else math.inf
        r = r.masked_fill((r < lo) | (r > hi), value=0.0)
    return r


def test_trl_transcription_is_trls_code():
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    src = inspect.getsource(trl_grpo.GRPOTrainer._generate_and_score_completions)
    for line in (
        "per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask",
        'sequence_level_is = self.vllm_importance_sampling_mode in ["sequence_mask", "sequence_truncate"]',
        "vllm_importance_sampling_ratio = torch.exp(logps_diff)",
        "invalid_mis_mask, value=0.0",
    ):
        assert line in src, line


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("how", ["truncate", "mask"])
@pytest.mark.parametrize("bounds", [(None, 1.3), (0.7, 1.3)])
def test_is_weights_match_trl(level, how, bounds):
    old, mu, mask = _data(5, noise=0.2 if level == "sequence" else 0.4)
    lo, hi = bounds
    want = _trl_is_ratio(old, torch.where(mask, mu, float("nan")), mask.float(), f"{level}_{how}", lo, hi)
    keep, w = _ours(old, mu, mask, rollout_is=level, rollout_is_mode=how, rollout_is_low=lo, rollout_is_high=hi)
    if level == "sequence":  # [B, 1]; TRL's weight of an empty row is moot
        keep, m = keep.amax(-1, keepdim=True), mask.any(-1, keepdim=True)
    else:
        m = mask
    got = w * keep if how == "mask" else w
    torch.testing.assert_close(torch.where(m, got, 0.0), torch.where(m, want, 0.0))
    if how == "mask":
        assert 0 < keep[m].sum() < m.sum()


# ----------------------------------------------------------------------------------------------------------------
# RLVRLoss


def _loss_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g) * 0.7
    w = torch.randn(V, H, generator=g) * 0.7
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor(LENS)[:, None]).float()
    adv = torch.tensor([0.8, -0.5, 0.3, -1.1])
    with torch.no_grad():
        lp, _ = fused_linear_logprobs(x, w, ids, backend="torch")
    old = lp + 0.15 * torch.randn(B, T, generator=g)
    mu = old + 0.35 * torch.randn(B, T, generator=g)
    return x, w, ids, mask, adv, old, mu


def _run(module, x, w, *args, **kw):
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, metrics = module(xx, ww, *args, **kw)
    loss.backward()
    return loss.detach(), xx.grad, ww.grad, metrics


OPTS = {
    "token_tis": dict(rollout_is="token", rollout_is_high=1.2),
    "icepop": M.ROLLOUT_CORRECTIONS["icepop"] | dict(rollout_is_low=0.8, rollout_is_high=1.25),
    "sequence_mask": dict(rollout_is="sequence", rollout_is_mode="mask", rollout_is_low=0.6, rollout_is_high=1.6),
    "geo_rs_token_mis": M.ROLLOUT_CORRECTIONS["geo_rs_token_mis"] | dict(rollout_rs_high=1.1, rollout_is_low=0.7),
    "token_k3": dict(rollout_rs="token_k3", rollout_rs_high=0.05),
}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo"])
@pytest.mark.parametrize("name", list(OPTS))
def test_loss_is_weight_and_reduced_mask(name, loss_type, fused):
    """The correction = the same loss with vllm_is_ratio = weight and the rejected tokens out of the mask: they
    leave the normaliser too (bnpo / dapo: token counts; grpo: per-sequence token means)."""
    x, w, ids, mask, adv, old, mu = _loss_inputs(1)
    opts = OPTS[name]
    keep, weight = M.rollout_correction(
        types_ns(**(M.option_defaults(M.ROLLOUT_OPTIONS) | opts)), old, mu, mask
    )  # fmt: skip
    assert 0 < keep.sum() < mask.sum() or name == "token_tis"
    kw = dict(loss_type=loss_type, beta=0.04, fused=fused, backend="torch")
    ref = torch.randn(B, T, generator=torch.Generator().manual_seed(9)) * 0.05 + old
    got = _run(RLVRLoss(**kw, **opts), x, w, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old,
               rollout_per_token_logps=mu)  # fmt: skip
    want = _run(RLVRLoss(**kw), x, w, ids, mask * keep, adv, ref_per_token_logps=ref, old_per_token_logps=old,
                vllm_is_ratio=weight.expand(B, T) if weight is not None else None)  # fmt: skip
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def types_ns(**kw):
    import types

    return types.SimpleNamespace(**kw)


def test_trl_token_mask_parity_dr_grpo():
    """TRL multiplies its masked ratio (0) into the loss and keeps the token in the mask: with dr_grpo's constant
    normaliser that is our loss (the rejected tokens' terms are 0 either way); the caller's vllm_is_ratio
    multiplies too."""
    x, w, ids, mask, adv, old, mu = _loss_inputs(2)
    r = _trl_is_ratio(old, mu, mask, "token_mask", 0.8, 1.25)
    assert (r[mask > 0] == 0).any()
    kw = dict(loss_type="dr_grpo", max_completion_length=T, beta=0.0, backend="torch")
    got = _run(RLVRLoss(**kw, **OPTS["icepop"]), x, w, ids, mask, adv, old_per_token_logps=old,
               rollout_per_token_logps=mu)  # fmt: skip
    want = _run(RLVRLoss(**kw), x, w, ids, mask, adv, old_per_token_logps=old, vllm_is_ratio=r)
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_loss_needs_both_log_probs():
    x, w, ids, mask, adv, old, mu = _loss_inputs(3)
    module = RLVRLoss(rollout_is="token", beta=0.0, backend="torch")
    with pytest.raises(ValueError, match="rollout_per_token_logps"):
        module(x, w, ids, mask, adv, old_per_token_logps=old)
    with pytest.raises(ValueError, match="old_per_token_logps"):
        module(x, w, ids, mask, adv, rollout_per_token_logps=mu)


@pytest.mark.parametrize("fused", [True, False])
def test_compiled_no_graph_break(fused):
    x, w, ids, mask, adv, old, mu = _loss_inputs(4)
    module = RLVRLoss(loss_type="dapo", beta=0.0, fused=fused, backend="torch", **OPTS["geo_rs_token_mis"])

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


# ----------------------------------------------------------------------------------------------------------------
# option checks


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(rollout_is="tok"), "rollout_is"),
        (dict(rollout_rs="seq_mean_k1"), "rollout_rs_high"),
        (dict(rollout_is_low=2.0, rollout_is_high=1.0), "rollout_is_low"),
        (dict(rollout_rs="token_k2", rollout_rs_high=0.1, rollout_rs_low=0.05), "rollout_rs_low"),
        (dict(rollout_is="token", rollout_is_mode="mask", rollout_is_high=None), "rollout_is_mode"),
        (dict(rollout_is_high=-1.0), "rollout_is_high"),
    ],
)
def test_option_checks(kw, match):
    with pytest.raises(ValueError, match=match):
        RLVRLoss(**kw)


# ----------------------------------------------------------------------------------------------------------------
# verl plug-in


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize(
    "rlvr, verl_kw",
    [
        (
            dict(rollout_is="token", rollout_is_mode="mask", rollout_is_low=0.8, rollout_is_high=1.25),
            dict(rollout_is="token", rollout_is_threshold="0.8_1.25"),
        ),
        (
            dict(rollout_is="token", rollout_is_high=1.5, rollout_rs="seq_mean_k1", rollout_rs_high=1.1),
            dict(rollout_is="token", rollout_is_threshold=1.5, rollout_rs="seq_mean_k1", rollout_rs_threshold=1.1),
        ),
    ],
)
def test_verl_plugin_matches_verl_rollout_correction(rlvr, verl_kw, agg):
    """``policy_loss.rlvr.rollout_*`` with the rollout log-probs = verl's vanilla loss given verl's weights and its
    rejection mask, the tokens verl's IcePop weight zeroes out of the mask as well."""
    pytest.importorskip("verl")
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    import rlvr_kernels.integrations.verl as rv

    def cfg(pl):
        return FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, loss_agg_mode=agg,
                               clip_ratio_low=0.2, clip_ratio_high=0.28, policy_loss=pl)  # fmt: skip

    old, mu, mask = _data(6, noise=0.3)
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
    lv, gv, _ = run("vanilla", cfg(PolicyLossConfig(loss_mode="vanilla")), mv, wv)
    torch.testing.assert_close(lo, lv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(go, gv, rtol=1e-5, atol=1e-6)
    assert met["rlvr/active_fraction"] < 1.0
    with pytest.raises(ValueError, match="rollout_is / rollout_rs"):  # no rollout log-probs
        run("rlvr_clip", cfg(rv.RLVRPolicyLossConfig(loss_mode="rlvr_clip", rlvr=rlvr)), mask, None)


def test_verl_options_checked():
    pytest.importorskip("verl")
    import rlvr_kernels.integrations.verl as rv

    with pytest.raises(ValueError, match="rollout_rs_high"):
        rv.RLVRPolicyLossConfig(loss_mode="rlvr_clip", rlvr=dict(rollout_rs="seq_mean_k1"))
    rv.RLVRPolicyLossConfig(loss_mode="rlvr_clip", rlvr=M.ROLLOUT_CORRECTIONS["geo_rs_token_mis"])


def test_trl_config_fields():
    pytest.importorskip("trl")
    from rlvr_kernels.integrations._trl import config as tc

    kw = dict(output_dir="/tmp/rlvr-rc", use_cpu=True, bf16=False, report_to=[])
    c = tc.RLVRGRPOConfig(**kw)
    assert not c.uses_rollout_correction and c.rollout_correction_kwargs() == {}
    for n in M.ROLLOUT_OPTIONS:
        assert getattr(c, n) == M.OPTIONS[n].default
    with pytest.raises(ValueError, match="rollout_rs_high"):
        tc.RLVRGRPOConfig(**kw, rollout_rs="seq_mean_k1", use_vllm=True)
    with pytest.raises(ValueError, match="use_vllm"):
        tc.RLVRGRPOConfig(**kw, rollout_is="token")


def test_planned_total_counts_the_kept_tokens():
    """The trainers' planned token counts (TRL's num_items_in_batch) with the rollout correction's keep mask."""
    old, mu, mask = _data(8)
    keep, _ = _ours(old, mu, mask, rollout_rs="token_k1", rollout_rs_high=1.3)
    assert 0 < keep.sum() < mask.sum()
    cfg = types_ns(credit_rho=0.3, d3s_scope="batch", backend="torch")
    assert M.credit(None).planned_total(cfg, mask, None, keep) == keep.sum()
    want = math.ceil(float(keep.sum()) * 0.3)
    assert M.credit("d3s").planned_total(cfg, mask, None, keep) == want
    cfg.d3s_scope = "sequence"
    per_row = sum(math.ceil(float(n) * 0.3) for n in keep.sum(-1))
    assert M.credit("forking").planned_total(cfg, mask, None, keep) == per_row
