"""verl integration (rlvr_kernels.integrations.verl) against verl 0.9.1 installed from PyPI, on CPU.

- the ``rlvr_*`` names resolve through verl's own ``get_policy_loss_fn``;
- the configurations equivalent to verl's ``vanilla`` / ``dppo_tv`` / ``cispo`` give verl's loss and its gradient
  w.r.t. ``log_prob`` for every ``loss_agg_mode`` (with ``rollout_is_weights`` and a DP ``global_batch_info``), on a
  real ``ActorConfig``, directly and through verl's ``ppo_loss`` call site;
- the schedule route: the step reaches the loss (``set_training_step``, the trainer hook's batch keys, the LR
  scheduler fallback) and q(k) follows ``TemporalSchedule``; TP-Schedule's cut is applied before verl counts tokens;
- forking / entropy-shaped advantages / DelTA read their extra inputs from the micro-batch context and match verl's
  ``vanilla`` on the masks / advantages that the package's public ops produce;
- the fused forward patch returns ``log_probs`` / ``entropy`` equal to a plain log_softmax of the model's logits.
"""

from __future__ import annotations

import copy
import functools
import os
import sys
import types

import pytest
import torch

pytest.importorskip("verl")

from omegaconf import OmegaConf, open_dict  # noqa: E402
from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import FSDPActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

import rlvr_kernels.integrations.verl as rv  # noqa: E402
from rlvr_kernels import TemporalSchedule, entropy_shaped_advantages, forking_token_mask, tp_schedule_mask  # noqa: E402
from rlvr_kernels.integrations._verl import delta_worker as vdw  # noqa: E402
from rlvr_kernels.integrations._verl import hooks as vh  # noqa: E402
from rlvr_kernels.integrations._verl import options as vo  # noqa: E402

AGG_MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
PAIRS = [("vanilla", "rlvr_clip"), ("dppo_tv", "rlvr_dppo"), ("cispo", "rlvr_cispo")]


@pytest.fixture(autouse=True)
def _no_leftover_step():
    rv.clear_training_step()
    yield
    rv.clear_training_step()


def actor_config(loss_mode="rlvr_clip", loss_agg_mode="token-mean", rlvr=None, **kw):
    """A real verl FSDPActorConfig (what the workers build), with our policy-loss config subclass."""
    kw.setdefault("clip_ratio_low", 0.2)
    kw.setdefault("clip_ratio_high", 0.28)
    pl = (
        rv.RLVRPolicyLossConfig(
            loss_mode=loss_mode, rlvr=dict(rlvr or {}), dro_beta=0.5 if loss_mode.endswith("_dro") else None
        )
        if loss_mode.startswith("rlvr_")
        else PolicyLossConfig(loss_mode=loss_mode)
    )  # verl's own losses, for parity
    return FSDPActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, loss_agg_mode=loss_agg_mode, policy_loss=pl, **kw
    )


def batch(seed=0, B=5, T=11, lens=(11, 6, 1, 9, 4), noise=0.6):
    """old/current log-probs whose ratios hit every clip branch, per-sequence advantages, a right-padded mask."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 2.5
    lp = (old + torch.randn(B, T, generator=g) * noise).clamp(max=-1e-3)
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    mask = torch.arange(T)[None, :] < torch.tensor(lens)[:, None]
    isw = torch.rand(B, T, generator=g) * 0.5 + 0.75
    return old, lp, adv, mask, isw


def metric(metrics, key):
    """A metric value, whether verl wrapped it in its ``Metric`` (ppo_loss does) or not."""
    v = metrics[key]
    return v.values[-1] if hasattr(v, "values") else v


def run(name, old, lp, adv, mask, mode, cfg, isw=None):
    x = lp.detach().clone().requires_grad_()
    loss, metrics = get_policy_loss_fn(name)(
        old_log_prob=old,
        log_prob=x,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode=mode,
        config=cfg,
        rollout_is_weights=isw,
    )
    loss.backward()
    return loss.detach(), x.grad, metrics


# ----------------------------------------------------------------------------------------------------------------
# registry and config


def test_registry_names_resolve_to_our_functions():
    expected = {
        "rlvr_clip",
        "rlvr_dppo",
        "rlvr_cispo",
        "rlvr_cppo",
        "rlvr_tp_schedule",
        "rlvr_forking",
        "rlvr_entropy_adv",
        "rlvr_d3s",
        "rlvr_delta",
        "rlvr_tp_schedule_cppo",
        "rlvr_forking_dppo",
    }
    assert expected <= set(rv.LOSS_NAMES)
    for name in rv.LOSS_NAMES:
        fn = get_policy_loss_fn(name)
        assert name.startswith("rlvr_") and fn.rlvr_spec.name == name and fn.__name__ == name
    assert get_policy_loss_fn("vanilla") is not get_policy_loss_fn("rlvr_clip")


def test_config_route_through_verl_yaml_and_hydra_target():
    """verl's own trainer yaml + the documented overrides -> the worker-side ActorConfig carries our options."""
    import verl
    from verl.utils.config import omega_conf_to_dataclass

    cfg = OmegaConf.load(os.path.join(os.path.dirname(verl.__file__), "trainer/config/_generated_ppo_trainer.yaml"))
    actor = cfg.actor_rollout_ref.actor
    actor.ppo_micro_batch_size_per_gpu = 2
    actor.policy_loss.loss_mode = "rlvr_tp_schedule"
    actor.policy_loss._target_ = "rlvr_kernels.integrations.verl.RLVRPolicyLossConfig"
    with open_dict(actor):
        actor.policy_loss.rlvr = {"schedule_mode": "sigmoid", "schedule_end_frac": 0.6}
    ac = omega_conf_to_dataclass(actor)
    assert isinstance(ac.policy_loss, rv.RLVRPolicyLossConfig)
    assert ac.policy_loss.loss_mode == "rlvr_tp_schedule"
    assert vo.options_of(ac).schedule_mode == "sigmoid" and vo.options_of(ac).schedule_end_frac == 0.6
    with open_dict(actor):
        actor.policy_loss.rlvr = {"schedul_mode": "linear"}  # typo: rejected when verl builds the config
    with pytest.raises(Exception, match="schedul_mode"):
        omega_conf_to_dataclass(actor)


DELTA_OVERRIDES = [  # the README's DelTA overrides (module docstring of rlvr_kernels.integrations.verl)
    "actor_rollout_ref.actor.policy_loss.loss_mode=rlvr_delta",
    "actor_rollout_ref.actor.policy_loss._target_=rlvr_kernels.integrations.verl.RLVRPolicyLossConfig",
    "+actor_rollout_ref.actor.policy_loss.rlvr.delta_coef_iters=2",
    "+actor_rollout_ref.actor.policy_loss.rlvr.delta_coef_lam_min=0.7",
    "+actor_rollout_ref.actor.policy_loss.rlvr.delta_coef_lam_max=1.3",
    "+actor_rollout_ref.actor.policy_loss.rlvr.delta_coef_exclude_zero_adv=true",
    "+actor_rollout_ref.actor.policy_loss.rlvr.delta_coef_all_reduce=false",
    "+actor_rollout_ref.actor.policy_loss.rlvr.delta_coef_hidden_cache=cpu",
]


def test_delta_overrides_compose_with_hydra():
    """The documented DelTA overrides through Hydra's compose on verl's own ppo_trainer config."""
    import verl
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    with initialize_config_dir(
        config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer/config"), version_base=None
    ):
        cfg = compose(
            "ppo_trainer", overrides=DELTA_OVERRIDES + ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"]
        )
    ac = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(ac.policy_loss, rv.RLVRPolicyLossConfig) and ac.policy_loss.loss_mode == "rlvr_delta"
    o = vo.options_of(ac)
    assert (
        o.delta_coef_iters,
        o.delta_coef_lam_min,
        o.delta_coef_lam_max,
        o.delta_coef_exclude_zero_adv,
        o.delta_coef_all_reduce,
        o.delta_coef_hidden_cache,
    ) == (2, 0.7, 1.3, True, False, "cpu")


def test_bad_options_and_inputs():
    with pytest.raises(ValueError, match="unknown policy_loss.rlvr"):
        rv.RLVRPolicyLossConfig(loss_mode="rlvr_clip", rlvr={"bogus": 1})
    with pytest.raises(ValueError, match="anchor"):
        rv.RLVRPolicyLossConfig(loss_mode="rlvr_dppo", rlvr={"anchor": "ref"})
    with pytest.raises(ValueError, match="schedule options"):  # TemporalSchedule's own checks, at config time
        rv.RLVRPolicyLossConfig(
            loss_mode="rlvr_tp_schedule", rlvr={"schedule_begin_frac": 0.9, "schedule_end_frac": 0.5}
        )
    rv.set_training_step(3, total_steps=10)
    with pytest.raises(ValueError, match="schedule=true applies"):
        o, l_, a_, m_, _ = batch()
        run("rlvr_clip", o, l_, a_, m_, "token-mean", actor_config("rlvr_clip", rlvr={"schedule": True}))
    rv.clear_training_step()
    old, lp, adv, mask, _ = batch()
    cfg = actor_config()
    fn = get_policy_loss_fn("rlvr_clip")
    with pytest.raises(ValueError, match="bs, response_len"):
        fn(old_log_prob=old[:, :-1], log_prob=lp, advantages=adv, response_mask=mask, config=cfg)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, loss_agg_mode="mean", config=cfg)
    with pytest.raises(ValueError, match="config"):
        fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask)


def test_renamed_options_name_the_new_key():
    """The options renamed in the catalogue (methods.RENAMED_OPTIONS): the old key is a ValueError naming the new."""
    for old, new in (
        ("schedule_begin", "schedule_begin_frac"),
        ("schedule_end", "schedule_end_frac"),
        ("delta_iters", "delta_coef_iters"),
        ("delta_lam_min", "delta_coef_lam_min"),
        ("delta_lam_max", "delta_coef_lam_max"),
        ("delta_exclude_zero_adv", "delta_coef_exclude_zero_adv"),
        ("delta_all_reduce", "delta_coef_all_reduce"),
        ("delta_hidden_cache", "delta_coef_hidden_cache"),
    ):
        with pytest.raises(ValueError, match=rf"policy_loss\.rlvr\.{old} was renamed to policy_loss\.rlvr\.{new}\b"):
            rv.RLVRPolicyLossConfig(loss_mode="rlvr_delta", rlvr={old: 1})


# ----------------------------------------------------------------------------------------------------------------
# parity with verl's own losses


@pytest.mark.parametrize("mode", AGG_MODES + ["token-sum"])
@pytest.mark.parametrize("verl_name,ours", PAIRS)
@pytest.mark.parametrize("variant", ["plain", "is_weights+dp"])
def test_parity_with_verl_loss_and_grad(mode, verl_name, ours, variant):
    old, lp, adv, mask, isw = batch(seed=3)
    cfg_v = actor_config(loss_mode=verl_name, loss_agg_mode=mode)
    cfg_o = actor_config(loss_mode=ours, loss_agg_mode=mode)
    w = None
    if variant != "plain":
        w = isw
        gbi = dict(dp_size=2, batch_num_tokens=int(mask.sum()) * 2 + 3, global_batch_size=11, loss_scale_factor=16)
        cfg_v.global_batch_info.update(gbi)
        cfg_o.global_batch_info.update(gbi)
    ratio = (lp - old).exp()
    assert bool(((ratio > 1.28) & mask).any()) and bool(((ratio < 0.8) & mask).any())
    assert bool(((ratio > 3.0) & (adv < 0) & mask).any())  # the dual-clip branch is exercised
    lv, gv, _ = run(verl_name, old, lp, adv, mask, mode, cfg_v, w)
    lo, go, met = run(ours, old, lp, adv, mask, mode, cfg_o, w)
    torch.testing.assert_close(lo, lv, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(go, gv, rtol=1e-5, atol=1e-8)
    assert float(gv.abs().sum()) > 0
    assert all(k.startswith("rlvr/") for k in met) and 0.0 < met["rlvr/clip_ratio"] < 1.0


def test_dppo_thresholds_come_from_clip_ratio():
    """The DPPO mask responds to clip_ratio_low/high exactly as verl's dppo_tv does (not a constant)."""
    old, lp, adv, mask, _ = batch(seed=5, noise=1.0)
    for low, high in [(0.05, 0.05), (0.5, 0.02)]:
        cv = actor_config("dppo_tv", clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=20.0)
        co = actor_config("rlvr_dppo", clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=20.0)
        lv, gv, _ = run("dppo_tv", old, lp, adv, mask, "token-mean", cv)
        lo, go, met = run("rlvr_dppo", old, lp, adv, mask, "token-mean", co)
        torch.testing.assert_close(lo, lv)
        torch.testing.assert_close(go, gv)
        assert met["rlvr/trust_region_masked_fraction"] > 0


def test_dppo_rollout_anchor():
    """anchor=rollout measures the divergence against the rollout engine's log-probs (CPPO/DPPO's mu), so an
    on-policy update (old_log_prob == log_prob) is still masked where pi moved away from mu; anchor=old is not."""
    _, lp, adv, mask, _ = batch(seed=13)
    mu = lp - torch.rand(lp.shape, generator=torch.Generator().manual_seed(4)) * 1.5
    old = lp.clone()
    base = dict(clip_ratio_low=0.05, clip_ratio_high=0.05)
    _, _, met_old = run("rlvr_dppo", old, lp, adv, mask, "token-mean", actor_config("rlvr_dppo", **base))
    assert met_old["rlvr/trust_region_masked_fraction"] == 0.0
    cfg = actor_config("rlvr_dppo", rlvr={"anchor": "rollout"}, **base)
    with rv.loss_context(rollout_log_probs=mu):
        lo, go, met = run("rlvr_dppo", old, lp, adv, mask, "token-mean", cfg)
    assert met["rlvr/trust_region_masked_fraction"] > 0.1
    keep = torch.where(adv > 0, lp.exp() - mu.exp() <= 0.05, lp.exp() - mu.exp() >= -0.05)
    lv, gv, _ = run("vanilla", old, lp, adv, mask & keep, "token-mean", actor_config("vanilla"))
    torch.testing.assert_close(go, gv * (mask & keep).sum() / mask.sum())  # r = 1: -A log p on the kept tokens
    with pytest.raises(ValueError, match="anchor=rollout"):
        run("rlvr_dppo", old, lp, adv, mask, "token-mean", cfg)


def _micro_batch(old, lp, adv, mask, P=3, seed=0):
    """verl's actor micro-batch as ``ppo_loss`` sees it (left-padded prompts, right-padded responses) and a packed
    ``log_probs`` model output whose response slots hold ``lp`` (differentiably)."""
    g = torch.Generator().manual_seed(seed)
    B, R = lp.shape
    plen = torch.tensor([3, 1, 2, 3, 2][:B])
    prompt_mask = torch.arange(P)[None, :] >= (P - plen)[:, None]
    attn = torch.cat([prompt_mask, mask], 1).long()
    data = tu.get_tensordict(
        {
            "prompts": torch.randint(0, 50, (B, P), generator=g),
            "responses": torch.randint(0, 50, (B, R), generator=g),
            "attention_mask": attn,
            "response_mask": mask.long(),
            "old_log_probs": old,
            "advantages": adv,
        },
        {"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": B},
    )
    return data, plen


def _pack(resp, mask, plen, fill_seed=1):
    """Inverse of verl's no_padding_2_padding: per sequence [prompt tokens, response tokens], response logp at
    positions prompt_len - 1 + j."""
    g = torch.Generator().manual_seed(fill_seed)
    pieces = []
    for i in range(resp.shape[0]):
        n = int(mask[i].sum())
        seq = int(plen[i]) + n
        head = torch.randn(int(plen[i]) - 1, generator=g)
        tail = torch.randn(1, generator=g)
        pieces += [head, resp[i, :n], tail]
        assert head.numel() + n + 1 == seq
    return torch.cat(pieces)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_parity_through_verl_ppo_loss(mode):
    """verl's real actor loss entry point (workers/utils/losses.py::ppo_loss): same total loss and gradient."""
    old, lp, adv, mask, isw = batch(seed=7)
    out = {}
    for name in ("vanilla", "rlvr_clip"):
        cfg = actor_config(name, loss_agg_mode=mode)
        data, plen = _micro_batch(old, lp, adv, mask)
        data["rollout_is_weights"] = isw
        x = lp.detach().clone().requires_grad_()
        loss, metrics = ppo_loss(cfg, {"log_probs": _pack(x, mask, plen)}, data)
        loss.backward()
        out[name] = (loss.detach(), x.grad, metrics)
    torch.testing.assert_close(out["rlvr_clip"][0], out["vanilla"][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["rlvr_clip"][1], out["vanilla"][1], rtol=1e-5, atol=1e-8)
    assert "rlvr/clip_ratio" in out["rlvr_clip"][2]


# ----------------------------------------------------------------------------------------------------------------
# the schedule route


def test_schedule_value_advances_with_the_step():
    """tp-schedule.md's worked table (linear, m0 = 0.99, T = 100) through set_training_step, and the loss is verl's
    vanilla on the package's tp_schedule_mask."""
    old, lp, adv, mask, _ = batch(seed=2)
    cfg = actor_config("rlvr_tp_schedule", loss_agg_mode="seq-mean-token-mean")
    seen = []
    for k, want_q in [(1, 0.977625), (20, 0.7425), (40, 0.495), (80, 0.0)]:
        rv.set_training_step(k, total_steps=100)
        loss, grad, met = run("rlvr_tp_schedule", old, lp, adv, mask, "seq-mean-token-mean", cfg)
        assert met["rlvr/schedule_value"] == pytest.approx(want_q, abs=1e-9) and met["rlvr/step"] == k
        keep = tp_schedule_mask(mask, want_q)
        lv, gv, _ = run("vanilla", old, lp, adv, keep, "seq-mean-token-mean", actor_config("vanilla"))
        torch.testing.assert_close(loss, lv)
        torch.testing.assert_close(grad, gv)
        seen.append(met["rlvr/active_fraction"])
    assert seen == sorted(seen) and seen[0] < seen[-1] == 1.0


def test_schedule_options_and_total_steps_sources():
    old, lp, adv, mask, _ = batch()
    opts = {"schedule_mode": "gamma", "schedule_start_value": 0.9, "schedule_end_frac": 0.5}
    cfg = actor_config("rlvr_tp_schedule", loss_agg_mode="seq-mean-token-sum", rlvr=opts)
    rv.set_training_step(7, total_steps=40)
    _, _, met = run("rlvr_tp_schedule", old, lp, adv, mask, "seq-mean-token-sum", cfg)
    want = TemporalSchedule("gamma", start_value=0.9, end=0.5, total_steps=40)(7)
    assert met["rlvr/schedule_value"] == pytest.approx(want)
    # without total_steps: verl's actor.optim.total_training_steps (the trainer sets it), then the rlvr option
    rv.set_training_step(7)
    with pytest.raises(RuntimeError, match="total number of training steps"):
        run("rlvr_tp_schedule", old, lp, adv, mask, "seq-mean-token-sum", cfg)
    cfg.optim.total_training_steps = 40
    _, _, met2 = run("rlvr_tp_schedule", old, lp, adv, mask, "seq-mean-token-sum", cfg)
    assert met2["rlvr/schedule_value"] == pytest.approx(want)
    cfg3 = actor_config("rlvr_tp_schedule", loss_agg_mode="seq-mean-token-sum", rlvr={**opts, "total_steps": 20})
    _, _, met3 = run("rlvr_tp_schedule", old, lp, adv, mask, "seq-mean-token-sum", cfg3)
    assert met3["rlvr/schedule_value"] == pytest.approx(
        TemporalSchedule("gamma", start_value=0.9, end=0.5, total_steps=20)(7)
    )


def test_schedule_without_a_step_is_a_clear_error():
    old, lp, adv, mask, _ = batch()
    cfg = actor_config("rlvr_tp_schedule")
    with pytest.raises(RuntimeError, match="VERL_USE_EXTERNAL_MODULES"):
        run("rlvr_tp_schedule", old, lp, adv, mask, "token-mean", cfg)
    # inside verl (global batch_num_tokens known) token-mean needs the worker hook's cut, not an in-loss mask
    rv.set_training_step(3, total_steps=10)
    cfg.global_batch_info.update(batch_num_tokens=int(mask.sum()))
    with pytest.raises(RuntimeError, match="worker hook"):
        run("rlvr_tp_schedule", old, lp, adv, mask, "token-mean", cfg)


class _FakeEngine:
    def __init__(self, updates):
        self.lr_scheduler = types.SimpleNamespace(last_epoch=updates)


class _FakeTrainingWorker:
    """The parts of verl's TrainingWorker the hook relies on: ``loss_fn`` (a partial of ``ppo_loss`` with the actor
    config), ``engine``, and ``train_mini_batch(data)``, which here does what verl's engine does: count the global
    tokens of ``loss_mask`` and call the loss per micro-batch with ``model_output`` and ``data``."""

    def __init__(self, config, make_output, updates=0):
        self.loss_fn = functools.partial(ppo_loss, config=config)
        self.engine = _FakeEngine(updates)
        self.make_output = make_output
        self.seen = []

    def train_mini_batch(self, data):
        tu.assign_non_tensor(data, batch_num_tokens=int(data["loss_mask"].sum()), dp_size=1)
        total = 0.0
        for sl in (slice(0, 2), slice(2, None)):  # two micro-batches
            mb = data[sl]
            loss, metrics = self.loss_fn(model_output=self.make_output(sl, mb), data=mb, dp_group=None)
            loss.backward()
            total = total + loss.detach()
            self.seen.append(metrics)
        return total


def test_worker_hook_cuts_the_batch_before_verl_counts_tokens():
    """TP-Schedule in verl: the step comes with the batch (trainer hook keys), the cut is applied to response_mask
    and loss_mask, and the loss equals verl's vanilla token-mean over the active tokens of the whole mini-batch."""
    old, lp, adv, mask, _ = batch(seed=4)
    k, T = 30, 100
    q = TemporalSchedule("linear", total_steps=T)(k)
    keep = tp_schedule_mask(mask, q)
    cfg = actor_config("rlvr_tp_schedule", loss_agg_mode="token-mean")
    data, plen = _micro_batch(old, lp, adv, mask)
    data["loss_mask"] = data["response_mask"]
    tu.assign_non_tensor(data, **{rv.STEP_KEY: k, rv.TOTAL_STEPS_KEY: T})
    x = lp.detach().clone().requires_grad_()
    packed = _pack(x, mask, plen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), (plen + mask.sum(-1)).cumsum(0)])

    def make_output(sl, mb):
        idx = range(*sl.indices(len(plen)))
        return {"log_probs": torch.cat([packed[offsets[i] : offsets[i + 1]] for i in idx])}

    worker = _FakeTrainingWorker(cfg, make_output)
    orig_loss_fn = worker.loss_fn
    wrapped = vh.wrap_train_mini_batch(_FakeTrainingWorker.train_mini_batch)
    total = wrapped(worker, data)
    assert worker.loss_fn is orig_loss_fn  # restored
    torch.testing.assert_close(data["response_mask"].bool(), keep)
    torch.testing.assert_close(data["loss_mask"].bool(), keep)
    assert len(worker.seen) == 2
    assert all(
        metric(m, "rlvr/schedule_value") == pytest.approx(q) and metric(m, "rlvr/step") == k for m in worker.seen
    )
    # oracle: verl's vanilla on the cut mask, normalised by the cut mask's token count
    cv = actor_config("vanilla", loss_agg_mode="token-mean")
    cv.global_batch_info.update(batch_num_tokens=int(keep.sum()))
    lv, gv, _ = run("vanilla", old, lp, adv, keep, "token-mean", cv)
    torch.testing.assert_close(total, lv, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, gv, rtol=1e-5, atol=1e-8)
    assert int(keep.sum()) < int(mask.sum())


def test_worker_hook_lr_scheduler_fallback_and_passthrough():
    old, lp, adv, mask, _ = batch(seed=4)
    cfg = actor_config("rlvr_tp_schedule", loss_agg_mode="token-mean")
    cfg.optim.total_training_steps = 50
    data, plen = _micro_batch(old, lp, adv, mask)
    data["loss_mask"] = data["response_mask"]
    x = lp.detach().clone().requires_grad_()
    packed = _pack(x, mask, plen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), (plen + mask.sum(-1)).cumsum(0)])

    def make_output(sl, mb):
        return {"log_probs": torch.cat([packed[offsets[i] : offsets[i + 1]] for i in range(*sl.indices(5))])}

    worker = _FakeTrainingWorker(cfg, make_output, updates=9)  # nine updates done: this is step 10
    vh.wrap_train_mini_batch(_FakeTrainingWorker.train_mini_batch)(worker, data)
    want = TemporalSchedule("linear", total_steps=50)(10)
    assert metric(worker.seen[0], "rlvr/step") == 10
    assert metric(worker.seen[0], "rlvr/schedule_value") == pytest.approx(want)
    # a verl loss mode: the hook leaves everything alone
    cfg_v = actor_config("vanilla")
    data2, _ = _micro_batch(old, lp, adv, mask)
    data2["loss_mask"] = data2["response_mask"]
    before = data2["response_mask"].clone()
    w2 = _FakeTrainingWorker(cfg_v, make_output)
    vh.wrap_train_mini_batch(_FakeTrainingWorker.train_mini_batch)(w2, data2)
    assert torch.equal(data2["response_mask"], before) and "rlvr/step" not in w2.seen[0]


def test_tp_cut_on_v1_nested_layout():
    """The v1 trainer ships jagged response_mask / loss_mask (separate tensors): both get the same cut."""
    lens = [5, 1, 3, 8]
    rm = torch.nested.as_nested_tensor([torch.ones(n, dtype=torch.int64) for n in lens], layout=torch.jagged)
    lm = torch.nested.as_nested_tensor([torch.ones(n, dtype=torch.int64) for n in lens], layout=torch.jagged)
    td = tu.get_tensordict({"response_mask": rm, "loss_mask": lm})
    q = vh.cut_batch(td, actor_config("rlvr_tp_schedule"), {"step": 10, "total_steps": 20})
    assert q == pytest.approx(TemporalSchedule("linear", total_steps=20)(10))
    valid = torch.arange(8)[None, :] < torch.tensor(lens)[:, None]
    want = tp_schedule_mask(valid, q)
    for key in ("response_mask", "loss_mask"):
        got = td[key]
        assert got.is_nested and torch.equal(got.offsets(), rm.offsets())
        torch.testing.assert_close(got.to_padded_tensor(0)[:, :8].bool(), want)


_E2E_PRELUDE = r"""
import contextlib, copy, functools, json, os, sys, tempfile, types
import torch


class _Stub(types.ModuleType):  # rollout-server deps that verl imports eagerly but the actor update never uses
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None})


import rlvr_kernels.integrations.verl as rv  # installs the hooks before verl's trainer / worker modules load

STUBBED = []
for _target in ("verl.workers.engine_workers", "verl.trainer.ppo.ray_trainer"):
    for _ in range(12):
        try:
            __import__(_target)
            break
        except ModuleNotFoundError as e:  # only third-party top-level packages are stubbed, never verl's own
            if e.name is None or e.name.split(".")[0] in ("verl", "rlvr_kernels", "torch"):
                raise
            STUBBED.append(e.name)
            sys.modules[e.name] = _Stub(e.name)
            for m in [m for m in sys.modules if m.startswith("verl.") and sys.modules[m] is None]:
                del sys.modules[m]
"""

_E2E = (
    _E2E_PRELUDE
    + r"""
from omegaconf import OmegaConf
from verl import DataProto
from verl.single_controller.base.decorator import MAGIC_ATTR
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.trainer.ppo.ray_trainer import RayPPOTrainer
from verl.utils import tensordict_utils as tu
from verl.workers.config import FSDPActorConfig
from verl.workers.engine_workers import TrainingWorker
from verl.workers.utils.losses import ppo_loss
from rlvr_kernels import TemporalSchedule, tp_schedule_mask

assert getattr(TrainingWorker.train_mini_batch, "_rlvr_wrapped", False)
assert hasattr(TrainingWorker.train_mini_batch, MAGIC_ATTR)  # verl's dispatch metadata survives the wrap
assert getattr(RayPPOTrainer._update_actor, "_rlvr_wrapped", False)

B, P, R = 6, 3, 8
g = torch.Generator().manual_seed(0)
plen = torch.tensor([3, 1, 2, 3, 2, 1])
rlen = torch.tensor([8, 5, 1, 7, 3, 6])
pmask = torch.arange(P)[None] >= (P - plen)[:, None]
rmask = torch.arange(R)[None] < rlen[:, None]
attn = torch.cat([pmask, rmask], 1).long()
old = -torch.rand(B, R, generator=g) * 2
lp0 = (old + torch.randn(B, R, generator=g) * 0.5).clamp(max=-1e-3)
adv = torch.randn(B, 1, generator=g).expand(B, R).contiguous()


def pack(resp, rows):
    pieces = []
    for i in rows:
        pieces += [torch.zeros(int(plen[i]) - 1), resp[i, : int(rlen[i])], torch.zeros(1)]
    return torch.cat(pieces)


class Engine:
    def __init__(self, leaf):
        self.leaf, self.losses = leaf, []
        self.lr_scheduler = types.SimpleNamespace(last_epoch=0)

    def get_data_parallel_size(self): return 1
    def get_data_parallel_rank(self): return 0
    def get_data_parallel_group(self): return None
    def is_mp_src_rank_with_outputs(self): return False
    def train_mode(self, **kw): return contextlib.nullcontext()
    def lr_scheduler_step(self):
        self.lr_scheduler.last_epoch += 1
        return 1e-6

    def train_batch(self, data, loss_function):  # what FSDPEngine.forward_backward_batch does, on CPU
        tu.assign_non_tensor(data, batch_num_tokens=int(data["loss_mask"].sum()), dp_size=1)
        for mb in tu.chunk_tensordict(data, 2):
            rows = mb["row_id"].tolist()
            out = {"log_probs": pack(self.leaf, rows)}
            loss, metrics = loss_function(model_output=out, data=mb, dp_group=None)
            loss.backward()
            self.losses.append((loss.detach(), metrics))
        return {"loss": 0.0, "metrics": {}, "model_output": {}}


def make_worker(actor_cfg, leaf):
    w = object.__new__(TrainingWorker)
    w.engine = Engine(leaf)
    w.loss_fn = __import__("functools").partial(ppo_loss, config=actor_cfg)
    w.engine_config = types.SimpleNamespace(forward_only=False, use_dynamic_bsz=False, max_token_len_per_gpu=None,
                                            micro_batch_size_per_gpu=3, use_fused_kernels=False)
    w.model_config = {"use_remove_padding": True}
    w.profiler = types.SimpleNamespace(step=lambda: None, rank=0, check_enable=lambda: False,
                                       check_this_step=lambda: False, check_this_rank=lambda: False)
    return w


def trainer(worker, k, T):
    cfg = OmegaConf.create({"actor_rollout_ref": {
        "rollout": {"multi_turn": {"enable": False}, "temperature": 1.0, "n": 1},
        "actor": {"calculate_entropy": False, "entropy_coeff": 0.0, "ppo_mini_batch_size": B, "ppo_epochs": 1,
                  "data_loader_seed": 0, "shuffle": False}}})

    def update_actor(td):
        worker.train_mini_batch(data=td)  # what ActorRolloutRefWorker.update_actor does
        return tu.get_tensordict({}, {"metrics": {"mfu": 0.0}})

    return types.SimpleNamespace(config=cfg, global_steps=k, total_training_steps=T,
                                 actor_rollout_wg=types.SimpleNamespace(update_actor=update_actor))


import os, tempfile
torch.distributed.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "pg"),
                                     rank=0, world_size=1)  # verl all-gathers token counts over the DP group
results = {}
for k, T in ((5, 50), (30, 50)):
    actor_cfg = FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=3, clip_ratio_high=0.28,
                                policy_loss=rv.RLVRPolicyLossConfig(loss_mode="rlvr_tp_schedule"))
    leaf = lp0.clone().requires_grad_()
    worker = make_worker(actor_cfg, leaf)
    batch = DataProto.from_single_dict({
        "input_ids": torch.randint(0, 50, (B, P + R), generator=g), "attention_mask": attn,
        "position_ids": (attn.cumsum(-1) - 1).clamp(min=0), "prompts": torch.randint(0, 50, (B, P), generator=g),
        "responses": torch.randint(0, 50, (B, R), generator=g), "response_mask": rmask.long(),
        "old_log_probs": old, "advantages": adv, "row_id": torch.arange(B)})
    RayPPOTrainer._update_actor(trainer(worker, k, T), batch)  # the real legacy trainer method (hooked)
    total = sum(l for l, _ in worker.engine.losses)
    q = TemporalSchedule("linear", total_steps=T)(k)
    keep = tp_schedule_mask(rmask, q)
    vc = FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=3, clip_ratio_high=0.28)
    vc.global_batch_info.update(batch_num_tokens=int(keep.sum()))
    x = lp0.clone().requires_grad_()
    lv, _ = get_policy_loss_fn("vanilla")(old_log_prob=old, log_prob=x, advantages=adv, response_mask=keep,
                                          loss_agg_mode="token-mean", config=vc)
    lv.backward()
    steps = [m["rlvr/step"].values[-1] for _, m in worker.engine.losses]
    qs = [m["rlvr/schedule_value"].values[-1] for _, m in worker.engine.losses]
    assert steps == [k, k] and all(abs(v - q) < 1e-12 for v in qs), (steps, qs, q)
    assert torch.allclose(total, lv, rtol=1e-6, atol=1e-7), (float(total), float(lv))
    assert torch.allclose(leaf.grad, x.grad, rtol=1e-5, atol=1e-8)
    assert worker.engine.lr_scheduler.last_epoch == 1 and worker.loss_fn.func is ppo_loss
    results[k] = {"q": q, "active": int(keep.sum()), "loss": float(total)}
assert results[5]["active"] < results[30]["active"] < int(rmask.sum())
print("RESULT", json.dumps({"results": results, "stubbed": STUBBED}))
"""
)


def _run_e2e_script(path, source: str) -> dict:
    """Run an end-to-end script in a fresh interpreter (torch backend); returns its last ``RESULT {json}`` line."""
    import json
    import subprocess

    path.write_text(source)
    env = dict(os.environ, RLVR_KERNELS_BACKEND="torch")
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def test_end_to_end_through_real_verl_trainer_and_worker(tmp_path):
    """verl's own RayPPOTrainer._update_actor -> DataProto.to_tensordict -> left_right_2_no_padding ->
    TrainingWorker.train_mini_batch -> train_batch -> ppo_loss, all hooked by this module (a fake CPU engine does
    what FSDPEngine.forward_backward_batch does: count loss_mask tokens, micro-batch, call the loss). Runs in a
    subprocess because three rollout-server packages that verl imports eagerly (uvicorn, fastapi, cachetools) are
    not installed here and get stubbed there."""
    res = _run_e2e_script(tmp_path / "e2e.py", _E2E)["results"]
    assert res["5"]["q"] > res["30"]["q"] and res["5"]["active"] < res["30"]["active"]


_E2E_DELTA = (
    _E2E_PRELUDE
    + r'''
import transformers
from omegaconf import OmegaConf
from verl import DataProto
from verl.trainer.ppo.ray_trainer import RayPPOTrainer
from verl.workers.config import FSDPActorConfig
from verl.workers.engine.fsdp import transformer_impl as ti
from verl.utils import tensordict_utils as tu
from verl.workers.engine_workers import TrainingWorker
from verl.workers.utils.losses import ppo_loss
from rlvr_kernels import delta_coefficients

ti.get_device_id = ti.get_device_name = lambda: "cpu"  # the CPU stands in for the accelerator
torch.distributed.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "pg"),
                                     rank=0, world_size=1)

B, P, R, V = 8, 3, 7, 64
g = torch.Generator().manual_seed(0)
plen = torch.tensor([3, 1, 2, 3, 2, 1, 3, 2])
rlen = torch.tensor([7, 5, 1, 6, 3, 7, 4, 2])
pmask = torch.arange(P)[None] >= (P - plen)[:, None]
rmask = torch.arange(R)[None] < rlen[:, None]
attn = torch.cat([pmask, rmask], 1).long()
prompts = torch.randint(1, V, (B, P), generator=g) * pmask
responses = torch.randint(1, V, (B, R), generator=g) * rmask
input_ids = torch.cat([prompts, responses], 1)
adv = torch.tensor([1.2, -0.7, 0.0, 0.9, -1.5, 0.4, -0.3, 0.0])[:, None].expand(B, R).contiguous()

torch.manual_seed(0)
MODEL = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    vocab_size=V, max_position_embeddings=32)).float()
with torch.no_grad():
    MODEL.lm_head.weight.mul_(30.0)

# oracle inputs: each sequence alone through theta_old; h = the decoder output (= lm_head input for Llama)
H_OLD = torch.zeros(B, R, 16)
OLD = torch.zeros(B, R)
with torch.no_grad():
    for i in range(B):
        seq = input_ids[i][attn[i].bool()][None]
        hid = MODEL.model(input_ids=seq).last_hidden_state[0]
        lp = torch.log_softmax(MODEL.lm_head(hid).float(), -1)
        s, n = int(plen[i]) - 1, int(rlen[i])
        H_OLD[i, :n] = hid[s:s + n]
        OLD[i, :n] = lp[s:s + n].gather(-1, seq[0, s + 1:s + 1 + n, None])[:, 0]


class CPUEngine(ti.FSDPEngineWithLMHead):
    """verl's FSDP engine code (forward_backward_batch, prepare_model_inputs/outputs, forward_step, infer_batch,
    train_batch, eval/train mode contexts) on an unwrapped CPU model; only construction and the optimizer step
    differ (the step records the gradients, then takes a plain SGD step)."""

    def __init__(self, model, ec):
        self.module, self.engine_config = model, ec
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        self.lr_scheduler = types.SimpleNamespace(last_epoch=0)
        self._is_offload_param = self._is_offload_optimizer = False
        self.ulysses_sequence_parallel_size, self.use_ulysses_sp = 1, False
        self.ulysses_device_mesh = self.ulysses_parallel_group = None
        self.pad_to_length, self._autocast_dtype, self.scaler, self._qat_enabled = False, torch.float32, None, False
        self.grads, self.infer_forwards = [], 0

    def to(self, *a, **k): pass
    def is_mp_src_rank_with_outputs(self): return False

    def infer_batch(self, data, loss_function=None):
        self.infer_forwards += 1
        return super().infer_batch(data, loss_function)

    def optimizer_step(self):
        self.grads.append({n: p.grad.clone() for n, p in self.module.named_parameters() if p.grad is not None})
        self.optimizer.step()
        return 0.0

    def lr_scheduler_step(self):
        self.lr_scheduler.last_epoch += 1
        return 0.5


def run(loss_mode, rlvr=None, advantages=adv, extra=None, rmpad=True, fused=False):
    model = copy.deepcopy(MODEL)
    if fused:  # fused_kernel_options.impl_backend=rlvr_torch: lm_head is not called, the decoder hook is used
        rv.patch_forward_with_rlvr(model, backend="torch")
    ec = types.SimpleNamespace(forward_only=False, use_dynamic_bsz=False, max_token_len_per_gpu=None,
                               infer_max_token_len_per_gpu=None, micro_batch_size_per_gpu=2,
                               infer_micro_batch_size_per_gpu=4 if rmpad else 2, use_fused_kernels=fused,
                               fsdp_size=1, entropy_checkpointing=False, entropy_from_logits_with_chunking=False)
    pl = rv.RLVRPolicyLossConfig(loss_mode=loss_mode, rlvr=dict(rlvr or {})) if loss_mode.startswith("rlvr") else \
        {"loss_mode": loss_mode}
    actor_cfg = FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, clip_ratio_high=0.28,
                                policy_loss=pl)
    seen = []

    def recording_loss(config, model_output, data, dp_group=None):
        c = data[rv.DELTA_COEF_KEY] if rv.DELTA_COEF_KEY in data.keys() else None
        seen.append((data["row_id"].tolist(), None if c is None else c.clone()))
        return ppo_loss(config, model_output, data, dp_group)

    w = object.__new__(TrainingWorker)
    w.engine = CPUEngine(model, ec)
    w.engine_config = ec
    w.loss_fn = functools.partial(recording_loss, config=actor_cfg)
    w.model_config = {"use_remove_padding": rmpad}
    w.profiler = types.SimpleNamespace(step=lambda: None, rank=0, check_enable=lambda: False,
                                       check_this_step=lambda: False, check_this_rank=lambda: False)
    fields = {"input_ids": input_ids, "attention_mask": attn, "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
              "prompts": prompts, "responses": responses, "response_mask": rmask.long(), "old_log_probs": OLD,
              "advantages": advantages, "row_id": torch.arange(B), **(extra or {})}
    cfg = OmegaConf.create({"actor_rollout_ref": {
        "rollout": {"multi_turn": {"enable": False}, "temperature": 1.0, "n": 1},
        "actor": {"calculate_entropy": False, "entropy_coeff": 0.0, "ppo_mini_batch_size": B // 2, "ppo_epochs": 1,
                  "data_loader_seed": 0, "shuffle": False}}})

    def update_actor(td):
        w.train_mini_batch(data=td)  # what ActorRolloutRefWorker.update_actor does
        return tu.get_tensordict({}, {"metrics": {"mfu": 0.0}})

    trainer = types.SimpleNamespace(config=cfg, global_steps=3, total_training_steps=10,
                                    actor_rollout_wg=types.SimpleNamespace(update_actor=update_actor))
    RayPPOTrainer._update_actor(trainer, DataProto.from_single_dict(fields))  # legacy trainer -> worker (hooked)
    coef = torch.full((B, R), float("nan"))
    for rows, c in seen:
        if c is not None:
            coef[rows] = (c.to_padded_tensor(0) if c.is_nested else c)[:, :R]
    assert not model.lm_head._forward_pre_hooks and not model.model._forward_hooks  # hooks removed
    assert len(w.engine.grads) == 2 and len(seen) == 4  # 2 mini-batches (optimizer steps) x 2 micro-batches
    return {"coef": coef, "grads": w.engine.grads, "forwards": w.engine.infer_forwards}


def close(a, b, **kw):
    torch.testing.assert_close(a, b, **kw)
    return True


out = {}
want = delta_coefficients(H_OLD, OLD, adv, rmask)
assert float(want[rmask].std()) > 0.02
base = run("rlvr_delta")
close(base["coef"][rmask], want[rmask], rtol=1e-5, atol=1e-5)
assert abs(float(base["coef"][rmask].mean()) - 1.0) < 1e-5 and float(base["coef"][~rmask].abs().max()) == 0.0
assert base["forwards"] == 1 + 3, base["forwards"]  # K + 3 streaming forwards (as the official code), K = 1
# theta_old's coefficients reach both mini-batches (the second one runs after an optimizer step); the gradient of
# the first step is verl's vanilla loss on A * c
van = run("vanilla", advantages=adv * want)
for n, gv in van["grads"][0].items():
    close(base["grads"][0][n], gv, rtol=1e-4, atol=1e-7)
out["delta"] = {"std": float(want[rmask].std()), "forwards": base["forwards"]}
# a host cache (one forward), the all-reduce hook (world size 1), the rlvr fused forward; K = 2 with the
# padded (no remove-padding) layout
cached = run("rlvr_delta", rlvr={"delta_coef_hidden_cache": "cpu", "delta_coef_all_reduce": True}, fused=True)
close(cached["coef"][rmask], want[rmask], rtol=1e-5, atol=1e-5)
assert cached["forwards"] == 1
k2 = run("rlvr_delta", rlvr={"delta_coef_iters": 2, "delta_coef_hidden_cache": "device",
                             "delta_coef_exclude_zero_adv": True},
         rmpad=False)
close(k2["coef"][rmask], delta_coefficients(H_OLD, OLD, adv, rmask, iters=2, exclude_zero_adv=True)[rmask],
      rtol=1e-5, atol=1e-5)
# lam_min == lam_max: every coefficient is 1 and the update is rlvr_clip's, without any extra forward
same = run("rlvr_delta", rlvr={"delta_coef_lam_min": 1.0, "delta_coef_lam_max": 1.0})
clip = run("rlvr_clip")
assert torch.equal(same["coef"][rmask], torch.ones(int(rmask.sum()))) and same["forwards"] == 0
for step in range(2):
    for n, gv in clip["grads"][step].items():
        close(same["grads"][step][n], gv, rtol=1e-6, atol=1e-8)
# a user-given batch field takes precedence: nothing is computed, the loss reads it
user = torch.rand(B, R, generator=g) + 0.5
given = run("rlvr_delta", extra={rv.DELTA_COEF_KEY: user})
assert given["forwards"] == 0 and torch.equal(given["coef"][rmask], user[rmask])
print("RESULT", json.dumps(out))
'''
)


def test_delta_coefficients_computed_inside_real_verl_update(tmp_path):
    """DelTA end to end with verl's own code on CPU: RayPPOTrainer._update_actor -> TrainingWorker.train_mini_batch
    (hooked) -> FSDPEngineWithLMHead's real forward_backward_batch / prepare_model_inputs / prepare_model_outputs /
    forward_step / infer_batch / train_batch on a tiny Llama (only construction and the optimizer step are replaced,
    the CPU stands in for the accelerator), two mini-batches, i.e. two optimizer steps.

    - ``rlvr_delta`` computes ``rlvr_delta_coef`` itself (K + 3 streaming no-grad forwards), the loss of both
      mini-batches sees ``rlvr_kernels.delta_coefficients`` of theta_old's final hidden states (each sequence run
      alone), old log-probs, advantages and response mask; mean 1 over the valid tokens; the first step's gradient
      is verl's ``vanilla`` on ``A * c``;
    - the host cache (one forward) with the all-reduce hook and the rlvr fused forward (decoder hook), and K = 2 with
      ``delta_coef_exclude_zero_adv`` on the padded (no remove-padding) layout, give the direct function's numbers;
    - ``delta_coef_lam_min == delta_coef_lam_max``: all-ones coefficients, no extra forward, ``rlvr_clip``'s gradients;
    - a user-given ``rlvr_delta_coef`` batch field takes precedence (nothing computed)."""
    res = _run_e2e_script(tmp_path / "e2e_delta.py", _E2E_DELTA)["delta"]
    assert res["forwards"] == 4 and res["std"] > 0.02


def test_trainer_hook_ships_the_step_to_the_worker():
    from verl import DataProto

    calls = []

    class Trainer:
        global_steps, total_training_steps = 12, 345

        def _update_actor(self, batch, metrics=None):
            calls.append(batch)
            return batch

    Trainer._update_actor = vh.wrap_update_actor(Trainer._update_actor)
    assert vh.wrap_update_actor(Trainer._update_actor) is Trainer._update_actor  # idempotent
    dp = DataProto.from_single_dict({"x": torch.zeros(2, 3)}, meta_info={"temperature": 1.0})
    Trainer()._update_actor(dp)
    td = dp.to_tensordict()  # what verl sends to update_actor (legacy trainer)
    assert vh.step_from_worker(types.SimpleNamespace(engine=None), td) == {
        "step": 12,
        "total_steps": 345,
        "source": "trainer",
    }
    kv = types.SimpleNamespace(extra_info={"temperature": 1.0})  # v1 trainer's KVBatchMeta
    Trainer()._update_actor(kv, metrics={})
    assert kv.extra_info[rv.STEP_KEY] == 12 and kv.extra_info[rv.TOTAL_STEPS_KEY] == 345


def test_hooks_run_when_their_module_is_imported(tmp_path, monkeypatch):
    import verl.models.transformers.monkey_patch as mp

    assert getattr(mp.patch_forward_with_backends, "_rlvr_wrapped", False)  # installed on import
    name = "rlvr_fake_verl_target_mod"
    (tmp_path / f"{name}.py").write_text("class W:\n    def f(self):\n        return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    hits = []
    vh._when_imported(name, lambda mod: hits.append(mod.W))
    try:
        assert hits == []
        import importlib

        mod = importlib.import_module(name)
        assert hits == [mod.W]
    finally:
        vh._HOOKS.pop(name, None)
        sys.modules.pop(name, None)


# ----------------------------------------------------------------------------------------------------------------
# credit rules with context inputs


def test_forking_reads_entropy_from_verl_model_output():
    """rlvr_forking through verl's ppo_loss + the micro-batch hook: verl's vanilla on forking_token_mask, with the
    token-mean divisor verl hands over (batch_num_tokens)."""
    old, lp, adv, mask, _ = batch(seed=8)
    g = torch.Generator().manual_seed(9)
    ent = torch.rand(lp.shape, generator=g) * 3
    cfg = actor_config("rlvr_forking", rlvr={"credit_rho": 0.3})
    data, plen = _micro_batch(old, lp, adv, mask)
    data["loss_mask"] = data["response_mask"]
    x = lp.detach().clone().requires_grad_()
    out = {"log_probs": _pack(x, mask, plen), "entropy": _pack(ent, mask, plen, fill_seed=3)}
    worker = _FakeTrainingWorker(cfg, lambda sl, mb: None)
    worker.train_mini_batch = types.MethodType(
        lambda self, d: self.loss_fn(model_output=out, data=d, dp_group=None), worker
    )
    loss, met = vh.wrap_train_mini_batch(lambda self, d: self.train_mini_batch(d))(worker, data)
    loss.backward()
    keep = forking_token_mask(ent, mask, 0.3)
    cv = actor_config("vanilla")
    cv.global_batch_info.update(batch_num_tokens=int(mask.sum()))
    lv, gv, _ = run("vanilla", old, lp, adv, keep, "token-mean", cv)
    torch.testing.assert_close(loss.detach(), lv, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, gv, rtol=1e-5, atol=1e-8)
    assert metric(met, "rlvr/active_fraction") == pytest.approx(float(keep.sum() / mask.sum()))
    with pytest.raises(ValueError, match="calculate_entropy"):
        run("rlvr_forking", old, lp, adv, mask, "token-mean", cfg)


def test_entropy_adv_scheduled_matches_shaped_advantages():
    old, lp, adv, mask, _ = batch(seed=10)
    ent = torch.rand(lp.shape, generator=torch.Generator().manual_seed(1)) * 2
    cfg = actor_config("rlvr_entropy_adv", loss_agg_mode="seq-mean-token-mean", rlvr={"schedule": True})
    with rv.loss_context(step=20, total_steps=100, entropy=ent):
        lo, go, met = run("rlvr_entropy_adv", old, lp, adv, mask, "seq-mean-token-mean", cfg)
    q = TemporalSchedule("linear", total_steps=100)(20)
    assert met["rlvr/schedule_value"] == pytest.approx(q)
    shaped = entropy_shaped_advantages(adv, ent, mask, q)
    lv, gv, _ = run("vanilla", old, lp, shaped, mask, "seq-mean-token-mean", actor_config("vanilla"))
    torch.testing.assert_close(lo, lv)
    torch.testing.assert_close(go, gv)
    assert not torch.allclose(shaped[mask], adv[mask])


def test_delta_coefficients_scale_the_advantage():
    """DelTA = verl's vanilla with A * c (c > 0); coefficients from loss_context or the batch field."""
    old, lp, adv, mask, _ = batch(seed=11)
    c = torch.rand(lp.shape, generator=torch.Generator().manual_seed(2)) * 0.4 + 0.8
    cfg = actor_config("rlvr_delta", loss_agg_mode="token-mean")
    with rv.loss_context(delta_coefficients=c):
        lo, go, met = run("rlvr_delta", old, lp, adv, mask, "token-mean", cfg)
    lv, gv, _ = run("vanilla", old, lp, adv * c, mask, "token-mean", actor_config("vanilla"))
    torch.testing.assert_close(lo, lv)
    torch.testing.assert_close(go, gv)
    assert met["rlvr/delta_coef_std"] > 0
    data, _ = _micro_batch(old, lp, adv, mask)
    data[rv.DELTA_COEF_KEY] = c
    with rv.loss_context(data=data):
        lo2, go2, _ = run("rlvr_delta", old, lp, adv, mask, "token-mean", cfg)
    torch.testing.assert_close(go2, gv)
    with pytest.raises(ValueError, match=rv.DELTA_COEF_KEY):
        run("rlvr_delta", old, lp, adv, mask, "token-mean", cfg)


def test_delta_worker_options_precedence_and_layouts():
    """The worker-side DelTA pass: option checks at config time, the explicit routes win (nothing is computed),
    clear errors for missing fields / unsupported engines, and the v1 trainer's jagged field layout."""
    for bad, match in [
        ({"delta_coef_iters": -1}, "delta_coef_iters"),
        ({"delta_coef_iters": True}, "delta_coef_iters"),
        ({"delta_coef_lam_min": 0.0}, "delta_coef_lam_min"),
        ({"delta_coef_lam_max": 0.5}, "delta_coef_lam_max"),
        ({"delta_coef_lam_min": float("nan")}, "delta_coef_lam_min"),
        ({"delta_coef_exclude_zero_adv": "yes"}, "delta_coef_exclude_zero_adv"),
        ({"delta_coef_all_reduce": 1}, "delta_coef_all_reduce"),
        ({"delta_coef_hidden_cache": "gpu"}, "cache"),
    ]:
        with pytest.raises(ValueError, match=match):
            rv.RLVRPolicyLossConfig(loss_mode="rlvr_delta", rlvr=bad)
    old, lp, adv, mask, _ = batch(seed=11)
    cfg = actor_config("rlvr_delta")
    no_engine = types.SimpleNamespace(engine=types.SimpleNamespace(module=None))
    data, _ = _micro_batch(old, lp, adv, mask)
    assert vdw.delta_for_update(no_engine, data, actor_config("rlvr_clip"), {}) is None  # not a DelTA loss
    assert vdw.delta_for_update(no_engine, data, cfg, {"delta_coef": torch.ones_like(lp)}) == "context"
    with pytest.raises(NotImplementedError, match="Hugging Face causal LM"):
        vdw.delta_for_update(no_engine, data, cfg, {})
    data[rv.DELTA_COEF_KEY] = torch.full_like(lp, 2.0)
    assert vdw.delta_for_update(no_engine, data, cfg, {}) == "batch"
    assert torch.equal(data[rv.DELTA_COEF_KEY], torch.full_like(lp, 2.0))  # left as given
    del data["old_log_probs"], data[rv.DELTA_COEF_KEY]
    with pytest.raises(ValueError, match="old_log_probs"):
        vdw.delta_for_update(no_engine, data, cfg, {})
    # lam_min == lam_max needs no forward; the v1 trainer's fields are jagged over the responses: same layout out
    lens = [5, 1, 3]
    nested = lambda rows: torch.nested.as_nested_tensor(rows, layout=torch.jagged)  # noqa: E731
    td = tu.get_tensordict(
        {
            "response_mask": nested([torch.ones(n, dtype=torch.int64) for n in lens]),
            "advantages": nested([torch.full((n,), 0.5) for n in lens]),
            "old_log_probs": nested([-torch.ones(n) for n in lens]),
        }
    )
    ones = actor_config("rlvr_delta", rlvr={"delta_coef_lam_min": 1.1, "delta_coef_lam_max": 1.1})
    assert vdw.delta_for_update(no_engine, td, ones, {}) == "computed"
    c = td[rv.DELTA_COEF_KEY]
    assert c.is_nested and torch.equal(c.offsets(), td["advantages"].offsets())
    assert torch.equal(c.values(), torch.ones(sum(lens)))


def test_cppo_wiring():
    pytest.importorskip("rlvr_kernels.cppo")
    old, lp, adv, mask, _ = batch(seed=12, noise=1.0)
    # a delta no divergence can reach keeps every token: then CPPO is verl's dppo_tv with no mask
    lo, go, _ = run("rlvr_cppo", old, lp, adv, mask, "token-mean", actor_config("rlvr_cppo", clip_ratio_high=50.0))
    lv, gv, _ = run(
        "dppo_tv", old, lp, adv, mask, "token-mean", actor_config("dppo_tv", clip_ratio_low=2.0, clip_ratio_high=2.0)
    )
    torch.testing.assert_close(lo, lv)
    torch.testing.assert_close(go, gv)
    _, _, met = run("rlvr_cppo", old, lp, adv, mask, "token-mean", actor_config("rlvr_cppo", clip_ratio_high=0.05))
    assert met["rlvr/trust_region_masked_fraction"] > 0


# ----------------------------------------------------------------------------------------------------------------
# fused forward


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # a non-trivial head: random init gives nearly uniform logits
        model.lm_head.weight.mul_(40.0)
    return model


@pytest.mark.parametrize("impl_backend", ["rlvr_torch", "rlvr_triton"])
@pytest.mark.parametrize("packed", [False, True])
def test_fused_forward_patch_matches_log_softmax(tiny_llama, impl_backend, packed):
    import verl.models.transformers.monkey_patch as mp
    from verl.models.transformers.dense_common import CausalLMOutputForPPO

    ref = tiny_llama
    model = copy.deepcopy(ref)
    mp.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=impl_backend)
    g = torch.Generator().manual_seed(3)
    temp = 0.7 if packed else 1.0
    if packed:  # verl's remove-padding path: [1, nnz] with per-sequence position ids and rolled shift_labels
        ids = torch.randint(0, 64, (1, 13), generator=g)
        pos = torch.cat([torch.arange(6), torch.arange(7)])[None]
        kw = dict(input_ids=ids, position_ids=pos, shift_labels=torch.roll(ids, -1, -1))
    else:
        ids = torch.randint(0, 64, (2, 9), generator=g)
        kw = dict(input_ids=ids)
    out = model(**kw, temperature=temp, return_dict=True, use_cache=False)
    assert isinstance(out, CausalLMOutputForPPO) and out.log_probs.shape == ids.shape
    logits = ref(input_ids=ids, position_ids=kw.get("position_ids"), use_cache=False).logits.float() / temp
    logsm = torch.log_softmax(logits, -1)
    want_lp = logsm.gather(-1, torch.roll(ids, -1, -1).unsqueeze(-1)).squeeze(-1)
    want_ent = -(logsm.exp() * logsm).sum(-1)
    assert float(want_ent.detach().std()) > 0.05  # a peaked, varied distribution, not uniform
    torch.testing.assert_close(out.log_probs, want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, want_ent, rtol=1e-5, atol=1e-5)
    # gradients (what the actor update uses): w.r.t. lm_head and the embeddings
    (out.log_probs.sum() + 0.5 * out.entropy.sum()).backward()
    (want_lp.sum() + 0.5 * want_ent.sum()).backward()
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        a = dict(model.named_parameters())[name].grad
        b = dict(ref.named_parameters())[name].grad
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6 * float(b.abs().max()))
    ref.zero_grad(set_to_none=True)


def test_fused_forward_patch_under_autocast(tiny_llama):
    """verl's FSDP engine runs the forward under bf16 autocast with fp32 parameters: the GEMM runs in bf16, the
    outputs stay fp32 and the gradients reach the fp32 parameters."""
    model = rv.patch_forward_with_rlvr(copy.deepcopy(tiny_llama), backend="torch")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, temperature=1.0, return_dict=True)
        logits = tiny_llama(input_ids=ids).logits
    assert out.log_probs.dtype == torch.float32 and out.entropy.dtype == torch.float32
    want = torch.log_softmax(logits.float(), -1).gather(-1, torch.roll(ids, -1, -1).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.log_probs, want, atol=0.15, rtol=0.02)
    out.log_probs.sum().backward()
    assert model.lm_head.weight.grad.dtype == torch.float32 and bool(model.lm_head.weight.grad.abs().sum() > 0)


def test_fused_forward_patch_leaves_other_backends_to_verl(tiny_llama):
    import verl.models.transformers.monkey_patch as mp

    model = copy.deepcopy(tiny_llama)
    mp.patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend="rlvr")
    assert "forward" not in model.__dict__  # not requested: untouched
    with pytest.raises(ValueError, match="backend"):
        rv.patch_forward_with_rlvr(model, backend="cuda")
