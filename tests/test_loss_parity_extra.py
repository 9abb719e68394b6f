"""More RLVRLoss parity against the real peer code installed from PyPI (liger-kernel 0.8.5, trl 1.16.0, verl 0.9.1),
for configurations test_loss.py / test_loss_peers.py do not cover, plus bad-input and degenerate-input behaviour.

- Liger: ``LigerFusedLinearGRPOLoss`` itself (bias-corrected KL at both IS levels, ``delta`` at sequence level,
  ``vllm_is_ratio`` of shape [B] / [B, 1] / [B, T], ``num_items_in_batch`` given or not, empty rows,
  ``use_ref_model=False``).
- TRL: ``GRPOTrainer._compute_loss`` itself, unbound, on a stand-in trainer whose
  ``_get_per_token_logps_and_entropies`` returns ``fused_linear_logprobs`` of the same hidden states: loss, gradients
  and the metrics TRL logs (entropy, kl, clip_ratio/*, cispo_clip_ratio), entropy bonus included.
- verl: ``get_policy_loss_fn`` (sapo, vanilla / cispo with rollout IS weights) and ``agg_loss`` for the entropy bonus.
Known differences are ``xfail(strict=True)`` with the reason.
"""

from __future__ import annotations

import collections
import types

import pytest
import torch

from rlvr_kernels import RLVRLoss, fused_linear_logprobs

B, T, H, V = 3, 6, 8, 40
TEMP = 0.7


def make(seed=1, empty_row=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g, dtype=dtype)
    w = torch.randn(V, H, generator=g, dtype=dtype) * 0.6
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=dtype)
    mask[0, 4:] = 0
    if empty_row:
        mask[2] = 0
    else:
        mask[2, 2:] = 0
    adv = torch.randn(B, generator=g, dtype=dtype)
    with torch.no_grad():
        lp, _ = fused_linear_logprobs(x, w, ids, temperature=TEMP, backend="torch")
    # a per-row offset moves the sequence-level ratios out of the clip range too
    old = lp + torch.randn(B, T, generator=g, dtype=dtype) * 0.4 + torch.tensor([[0.5], [-0.6], [0.4]], dtype=dtype)
    ref = lp + torch.randn(B, T, generator=g, dtype=dtype) * 0.3
    return x, w, ids, mask, adv, old, ref


def is_ratio(shape):
    if shape is None:
        return None
    g = torch.Generator().manual_seed(5)
    size = {"BT": (B, T), "B1": (B, 1), "B": (B,)}[shape]
    return torch.rand(*size, generator=g, dtype=torch.float64) + 0.5


def run(module, x, w, ids, mask, adv, **kw):
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, metrics = module(xx, ww, ids, mask, adv, **kw)
    loss.backward()
    return loss.detach(), metrics, xx.grad, ww.grad


def close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(a).double().reshape(-1), torch.as_tensor(b).double().reshape(-1), rtol=rtol, atol=atol
    )


# ----------------------------------------------------------------------------------------------------------------
# Liger


def _liger(**kw):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    return LigerFusedLinearGRPOLoss(compiled=False, **kw)


LIGER_EXTRA = [
    # (loss_type, level, beta, bias_corr_kl, delta, is_ratio shape, num_items_in_batch, empty row)
    ("dapo", "token", 0.1, True, None, "BT", None, True),
    ("dapo", "sequence", 0.1, True, 1.3, "B", 17, True),
    ("grpo", "sequence", 0.1, True, 1.3, "B1", None, True),
    ("grpo", "token", 0.1, False, 1.3, "B", None, False),
    ("bnpo", "sequence", 0.0, False, 1.3, "BT", None, True),
    ("bnpo", "token", 0.1, True, None, "B1", 17, False),
    ("dr_grpo", "sequence", 0.1, True, None, "B", None, True),
    ("cispo", "token", 0.1, True, None, "B", None, True),
    ("cispo", "token", 0.0, False, None, "BT", 17, False),
    ("sapo", "token", 0.1, True, None, "B1", None, True),
    ("vespo", "token", 0.1, True, None, "B", 17, True),
    ("vespo", "token", 0.0, False, None, "BT", None, False),
    ("luspo", "sequence", 0.0, False, 1.3, "B", None, True),
]


def assert_like_liger(kw, x, w, ids, mask, adv, inputs):
    """RLVRLoss(**kw) on both paths == LigerFusedLinearGRPOLoss(**kw): loss, gradients and the metrics list
    ([kl (beta != 0)], clip_ratio, in Liger's order)."""
    l1, m1, gx1, gw1 = run(_liger(**kw), x, w, ids, mask, adv, **inputs)
    for fused in (True, False):
        l2, m2, gx2, gw2 = run(RLVRLoss(fused=fused, backend="torch", **kw), x, w, ids, mask, adv, **inputs)
        close(l2, l1)
        close(gx2, gx1)
        close(gw2, gw1)
        assert len(m2) == len(m1)
        for a, b in zip(m2, m1):
            close(a, b)


@pytest.mark.parametrize("case", LIGER_EXTRA, ids=lambda c: "-".join(map(str, c)))
def test_liger_parity_extra(case):
    lt, lvl, beta, bc, delta, isr, nib, empty = case
    x, w, ids, mask, adv, old, ref = make(empty_row=empty)
    kw = dict(
        beta=beta,
        loss_type=lt,
        importance_sampling_level=lvl,
        temperature=TEMP,
        max_completion_length=9,
        epsilon_high=1.5 if lt == "cispo" else 0.28,
        delta=delta,
        use_bias_correction_kl=bc,
    )
    inputs = dict(ref_per_token_logps=ref, old_per_token_logps=old, vllm_is_ratio=is_ratio(isr), num_items_in_batch=nib)
    assert_like_liger(kw, x, w, ids, mask, adv, inputs)


def test_use_ref_model_false_ignores_ref_logps_like_liger():
    """Liger with use_ref_model=False never reads ref_per_token_logps: the KL is taken against the current policy
    (0, with a zero gradient, and a KL metric of 0). Ours used the ref log-probs it was given (fixed)."""
    x, w, ids, mask, adv, old, ref = make()
    kw = dict(beta=0.1, use_ref_model=False, loss_type="dapo", temperature=TEMP)
    inputs = dict(ref_per_token_logps=ref, old_per_token_logps=old)
    assert_like_liger(kw, x, w, ids, mask, adv, inputs)
    for fused in (True, False):
        _, m2, _, _ = run(RLVRLoss(fused=fused, backend="torch", **kw), x, w, ids, mask, adv, **inputs)
        assert float(m2[0]) == 0.0


@pytest.mark.xfail(
    strict=True,
    reason="Liger 0.8.5's luspo is TRL's old unmasked (per_token_loss * L).mean(): it "
    "sums padded positions and divides by B*T; RLVRLoss follows TRL 1.16's masked "
    "(per_token_loss * mask).sum(-1).mean() (see test_trl_luspo_token_level_is_masked)",
)
@pytest.mark.parametrize("lvl, beta", [("token", 0.0), ("sequence", 0.1)])
def test_liger_luspo_per_token_loss(lvl, beta):
    x, w, ids, mask, adv, old, ref = make()
    kw = dict(beta=beta, loss_type="luspo", importance_sampling_level=lvl, temperature=TEMP)
    inputs = dict(ref_per_token_logps=ref, old_per_token_logps=old)
    l1, _, gx1, _ = run(_liger(**kw), x, w, ids, mask, adv, **inputs)
    l2, _, gx2, _ = run(RLVRLoss(backend="torch", **kw), x, w, ids, mask, adv, **inputs)
    close(l2, l1)
    close(gx2, gx1)


# ----------------------------------------------------------------------------------------------------------------
# TRL: the real GRPOTrainer._compute_loss on a stand-in trainer


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def gather_for_metrics(self, x):
        return x


def trl_loss(
    x,
    w,
    ids,
    mask,
    adv,
    old,
    ref,
    *,
    loss_type,
    level="token",
    beta=0.0,
    bias_corr=False,
    delta=None,
    eps_low=0.2,
    eps_high=0.28,
    isr=None,
    entropy_coef=0.0,
    num_items=None,
    mcl=9,
):
    from trl import GRPOTrainer

    args = types.SimpleNamespace(
        use_bias_correction_kl=bias_corr,
        delta=delta,
        sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05,
        vespo_k_pos=2.0,
        vespo_lambda_pos=3.0,
        vespo_k_neg=3.0,
        vespo_lambda_neg=2.0,
        steps_per_generation=1,
        entropy_target=0.0,
    )
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()

    def logps(model, input_ids, attention_mask, logits_to_keep, compute_entropy=False, compute_aux_loss=False, **kw):
        lp, ent = fused_linear_logprobs(xx, ww, ids, temperature=TEMP, backend="torch")
        return lp, ent, None

    trainer = types.SimpleNamespace(
        args=args,
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=beta,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        aux_loss_enabled=False,
        use_vllm=isr is not None,
        vllm_importance_sampling_correction=isr is not None,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=_Accelerator(),
        max_completion_length=mcl,
        _entropy_bonus_enabled=entropy_coef != 0.0,
        use_adaptive_entropy=False,
        entropy_coef=entropy_coef,
        _metrics={"train": collections.defaultdict(list)},
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
        _get_per_token_logps_and_entropies=logps,
    )
    inputs = dict(
        prompt_ids=torch.zeros(B, 1, dtype=torch.long),
        prompt_mask=torch.ones(B, 1, dtype=torch.long),
        completion_ids=ids,
        completion_mask=mask,
        advantages=adv,
        old_per_token_logps=old,
        ref_per_token_logps=ref,
        num_items_in_batch=torch.tensor(float(num_items if num_items is not None else mask.sum())),
    )
    if isr is not None:
        inputs["importance_sampling_ratio"] = isr
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    return loss.detach(), {k: v[-1] for k, v in trainer._metrics["train"].items()}, xx.grad, ww.grad


TRL_CASES = [
    # (loss_type, level, beta, bias_corr_kl, delta, is_ratio shape, entropy_coef, empty row)
    ("grpo", "token", 0.1, True, 1.3, "BT", 0.05, True),
    ("grpo", "sequence", 0.1, False, None, "B1", 0.0, False),
    ("bnpo", "token", 0.0, False, 1.3, None, 0.05, False),
    ("bnpo", "sequence", 0.1, True, None, "BT", 0.0, True),
    ("dr_grpo", "token", 0.1, False, None, "B1", 0.05, True),
    ("dapo", "token", 0.1, True, 1.3, "BT", 0.05, True),
    ("dapo", "sequence", 0.0, False, 1.3, None, 0.05, False),
    ("cispo", "token", 0.1, True, None, "BT", 0.05, True),
    ("sapo", "token", 0.1, False, None, "B1", 0.05, False),
    ("vespo", "token", 0.1, True, None, "BT", 0.05, True),
    ("vespo", "token", 0.0, False, None, None, 0.0, False),
    ("luspo", "token", 0.1, True, 1.3, "BT", 0.05, True),
    ("luspo", "sequence", 0.1, False, None, "B1", 0.0, False),
]


def _trl_metric_pairs(lt, beta, level):
    pairs = [("entropy", "entropy")] + ([("kl", "kl")] if beta else [])
    if lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        pairs += [
            ("clip_ratio/low_mean", "clip_ratio/low_mean"),
            ("clip_ratio/high_mean", "clip_ratio/high_mean"),
            ("clip_ratio/region_mean", "clip_ratio/region_mean"),
            ("clip_ratio/low_min", "clip_ratio/low_min"),
            ("clip_ratio/high_max", "clip_ratio/high_max"),
        ]
    if lt == "cispo":
        pairs.append(("cispo_clip_ratio", "clip_ratio"))
    return pairs


@pytest.mark.parametrize("case", TRL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_trl_compute_loss_parity(case):
    """Same loss, gradients and logged metrics as TRL's own _compute_loss (one process, no accumulation): every
    loss type's normaliser, the IS ratio, the (bias-corrected) KL, delta, and TRL's entropy bonus."""
    pytest.importorskip("trl")
    lt, lvl, beta, bc, delta, isr_shape, ent, empty = case
    x, w, ids, mask, adv, old, ref = make(empty_row=empty)
    isr = is_ratio(isr_shape)
    eh = 1.5 if lt == "cispo" else 0.28
    nib = int(mask.sum()) + 3  # a generation batch with more tokens than this micro-batch
    l1, m1, gx1, gw1 = trl_loss(
        x,
        w,
        ids,
        mask,
        adv,
        old,
        ref,
        loss_type=lt,
        level=lvl,
        beta=beta,
        bias_corr=bc,
        delta=delta,
        eps_high=eh,
        isr=isr,
        entropy_coef=ent,
        num_items=nib,
    )
    kw = dict(
        beta=beta,
        loss_type=lt,
        importance_sampling_level=lvl,
        temperature=TEMP,
        max_completion_length=9,
        epsilon_high=eh,
        delta=delta,
        use_bias_correction_kl=bc,
        entropy_coef=ent,
    )
    for fused in (True, False):
        l2, m2, gx2, gw2 = run(
            RLVRLoss(fused=fused, backend="torch", **kw),
            x,
            w,
            ids,
            mask,
            adv,
            ref_per_token_logps=ref,
            old_per_token_logps=old,
            vllm_is_ratio=isr,
            num_items_in_batch=nib if lt in ("dapo", "cispo", "vespo") else None,
        )
        close(l2, l1)
        close(gx2, gx1)
        close(gw2, gw1)
        for trl_name, ours in _trl_metric_pairs(lt, beta, lvl):
            close(m2[ours], m1[trl_name])


def test_trl_luspo_token_level_is_masked():
    """TRL 1.16 masks luspo before aggregating (padded positions carry KL / IS terms); ours does too."""
    pytest.importorskip("trl")
    x, w, ids, mask, adv, old, ref = make()
    l1, _, gx1, _ = trl_loss(x, w, ids, mask, adv, old, ref, loss_type="luspo", beta=0.1)
    ours = RLVRLoss(beta=0.1, loss_type="luspo", epsilon_high=0.28, temperature=TEMP, backend="torch")
    l2, _, gx2, _ = run(ours, x, w, ids, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
    close(l2, l1)
    close(gx2, gx1)


@pytest.mark.parametrize("empty", [True, False])
def test_trl_sequence_level_clip_metrics(empty):
    """At importance_sampling_level='sequence' TRL's clip_ratio/{low,high,region}_mean are means over the sequences
    (empty rows included); metrics[-1] stays Liger's token-weighted clip ratio."""
    pytest.importorskip("trl")
    x, w, ids, mask, adv, old, ref = make(empty_row=empty)
    _, m1, _, _ = trl_loss(x, w, ids, mask, adv, old, ref, loss_type="grpo", level="sequence")
    _, m2, _, _ = run(
        RLVRLoss(
            beta=0.0,
            loss_type="grpo",
            importance_sampling_level="sequence",
            epsilon_high=0.28,
            temperature=TEMP,
            backend="torch",
        ),
        x,
        w,
        ids,
        mask,
        adv,
        old_per_token_logps=old,
    )
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        close(m2[name], m1[name])


# ----------------------------------------------------------------------------------------------------------------
# verl


def _verl_cfg(mode, gbi):
    from verl.workers.config import FSDPActorConfig

    cfg = FSDPActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=2,
        loss_agg_mode=mode,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
    )
    cfg.global_batch_info.update(gbi)
    return cfg


VB, VT = 4, 9


def make_verl(seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(VB, VT, 12, generator=g, dtype=torch.float64)
    w = torch.randn(97, 12, generator=g, dtype=torch.float64) * 0.7
    ids = torch.randint(0, 97, (VB, VT), generator=g)
    mask = torch.arange(VT)[None, :] < torch.tensor([VT, 5, 0, 7])[:, None]  # an empty row
    adv = torch.randn(VB, generator=g, dtype=torch.float64)
    with torch.no_grad():
        lp, _ = fused_linear_logprobs(x, w, ids, backend="torch")
    old = lp + torch.randn(VB, VT, generator=g, dtype=torch.float64) * 0.5
    isw = torch.rand(VB, VT, generator=g, dtype=torch.float64) + 0.5
    return x, w, ids, mask, adv, old, isw


VERL_OURS = {
    "vanilla": dict(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, dual_clip=3.0, log_ratio_clip=20.0),
    "cispo": dict(loss_type="cispo", epsilon_high=1.28, cispo_min=0.8, log_ratio_clip=20.0),
    # verl's sapo always aggregates with seq-mean-token-mean (whatever loss_agg_mode says)
    "sapo": dict(loss_type="sapo", log_ratio_clip=20.0),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=0.2, epsilon_high=0.28),
}
DP2 = dict(dp_size=2, batch_num_tokens=50, global_batch_size=9, loss_scale_factor=16)


def verl_and_ours(name, mode, gbi, *, rollout_weights, entropy_coef=0.0, horizon="gbi"):
    from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn

    x, w, ids, mask, adv, old, isw = make_verl()
    isw = isw if rollout_weights else None
    cfg = _verl_cfg(mode, gbi)
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = fused_linear_logprobs(xx, ww, ids, backend="torch")
    loss, _ = get_policy_loss_fn(name)(
        old_log_prob=old,
        log_prob=lp,
        advantages=adv[:, None].expand(VB, VT),
        response_mask=mask,
        loss_agg_mode=mode,
        config=cfg,
        rollout_is_weights=isw,
    )
    if entropy_coef:  # verl.workers.utils.losses.ppo_loss: policy_loss -= entropy_coeff * agg_loss(entropy, ...)
        loss = loss - entropy_coef * agg_loss(loss_mat=ent, loss_mask=mask, loss_agg_mode=mode, **cfg.global_batch_info)
    loss.backward()
    agg = "seq-mean-token-mean" if name == "sapo" else mode
    outs = []
    for fused in (True, False):
        kw = dict(VERL_OURS[name], beta=0.0, aggregation=agg, entropy_coef=entropy_coef, fused=fused, backend="torch")
        if agg == "seq-mean-token-sum-norm" and horizon == "gbi" and "loss_scale_factor" in gbi:
            kw["loss_horizon"] = gbi["loss_scale_factor"]
        outs.append(
            run(
                RLVRLoss(**kw),
                x,
                w,
                ids,
                mask.double(),
                adv,
                old_per_token_logps=old,
                vllm_is_ratio=isw,
                global_batch_size=gbi.get("global_batch_size"),
                batch_num_tokens=gbi.get("batch_num_tokens"),
                dp_size=gbi.get("dp_size", 1),
            )
        )
    return (loss.detach(), xx.grad, ww.grad), outs


def _assert_verl_close(ref, outs):
    lv, gxv, gwv = ref
    for lo, _, gxo, gwo in outs:
        close(lo, lv)
        close(gxo, gxv, atol=1e-7)
        close(gwo, gwv, atol=1e-7)


@pytest.mark.parametrize("gbi", [{}, DP2], ids=["local", "dp2"])
@pytest.mark.parametrize("rw", [False, True], ids=["no_is", "rollout_is"])
def test_verl_sapo_parity(gbi, rw):
    pytest.importorskip("verl")
    _assert_verl_close(*verl_and_ours("sapo", "seq-mean-token-mean", gbi, rollout_weights=rw))


@pytest.mark.parametrize(
    "mode", ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
@pytest.mark.parametrize("name", ["vanilla", "cispo"])
def test_verl_rollout_is_weights_and_entropy_bonus(name, mode):
    """rollout_is_weights (our vllm_is_ratio) and verl's entropy bonus, which is agg_loss(entropy) in the loss's own
    mode with the same global_batch_info, with dp_size=2 batch info."""
    pytest.importorskip("verl")
    _assert_verl_close(*verl_and_ours(name, mode, DP2, rollout_weights=True, entropy_coef=0.03))


def test_verl_seq_mean_token_sum_norm_default_horizon():
    """Without loss_scale_factor verl divides by the padded width T; so does loss_horizon=None."""
    pytest.importorskip("verl")
    _assert_verl_close(*verl_and_ours("vanilla", "seq-mean-token-sum-norm", {}, rollout_weights=False, horizon=None))


@pytest.mark.parametrize(
    "mode, need",
    [
        ("token-mean", "batch_num_tokens"),
        ("seq-mean-token-mean", "global_batch_size"),
        ("seq-mean-token-sum", "global_batch_size"),
    ],
)
def test_verl_dp_size_needs_global_batch_info(mode, need):
    """verl's agg_loss refuses dp_size > 1 without the global count (a local count times dp_size is wrong);
    ours silently used the local count (fixed: ValueError naming the argument)."""
    pytest.importorskip("verl")
    from verl.trainer.ppo.core_algos import agg_loss

    x, w, ids, mask, adv, old, _ = make_verl()
    with pytest.raises(ValueError, match=need):
        agg_loss(loss_mat=old, loss_mask=mask, loss_agg_mode=mode, dp_size=2)
    with pytest.raises(ValueError, match=need):
        RLVRLoss(beta=0.0, aggregation=mode, backend="torch")(
            x, w, ids, mask.double(), adv, old_per_token_logps=old, dp_size=2
        )


@pytest.mark.xfail(
    strict=True,
    reason="verl's gspo uses the GSPO-token ratio sg(s_i) * pi_t / sg(pi_t), so a "
    "token-level rollout_is_weights w_t scales token t's gradient by its own w_t; Liger/TRL GSPO "
    "(and RLVRLoss, importance_sampling_level='sequence') differentiate through the sequence mean, "
    "which spreads the row's mean w over its tokens. Same loss value, different gradient.",
)
def test_verl_gspo_with_token_rollout_is_weights():
    pytest.importorskip("verl")
    _assert_verl_close(*verl_and_ours("gspo", "token-mean", {}, rollout_weights=True))


# ----------------------------------------------------------------------------------------------------------------
# degenerate input: non-finite values outside the loss mask


@pytest.mark.parametrize("lt, lvl", [("dapo", "token"), ("grpo", "sequence"), ("vespo", "token"), ("dppo", "token")])
@pytest.mark.parametrize("where", ["old", "old_neginf", "ref", "is_ratio", "adv"])
def test_non_finite_padding_is_inert(where, lt, lvl):
    """The input check allows anything outside the loss mask (padding), but NaN * 0 = NaN: a NaN / -inf padded old or
    ref log-prob, IS ratio or per-token advantage made the loss and gradients NaN (vespo silently dropped the row).
    Fixed: the same numbers as with finite padding, on both paths."""
    x, w, ids, mask, adv, old, ref = make(dtype=torch.float32)
    pad = mask == 0
    base = dict(ref_per_token_logps=ref, old_per_token_logps=old, vllm_is_ratio=torch.ones(B, T))
    bad = {k: v.clone() for k, v in base.items()}
    a_bad = adv
    if where == "old":
        bad["old_per_token_logps"][pad] = float("nan")
    elif where == "old_neginf":
        bad["old_per_token_logps"][pad] = float("-inf")
    elif where == "ref":
        bad["ref_per_token_logps"][pad] = float("nan")
    elif where == "is_ratio":
        bad["vllm_is_ratio"][pad] = float("nan")
    else:
        a_bad = adv[:, None].expand(B, T).clone()
        a_bad[pad] = float("nan")
    kw = dict(beta=0.1, loss_type=lt, importance_sampling_level=lvl, temperature=TEMP)
    for fused in (True, False):
        l1, m1, gx1, gw1 = run(RLVRLoss(fused=fused, **kw), x, w, ids, mask, adv, **base)
        l2, m2, gx2, gw2 = run(RLVRLoss(fused=fused, **kw), x, w, ids, mask, a_bad, **bad)
        assert torch.isfinite(l2) and torch.isfinite(gx2).all() and torch.isfinite(gw2).all()
        close(l2, l1)
        close(gx2, gx1)
        close(gw2, gw1)
        for k in m1.keys():
            close(m2[k], m1[k])
