"""verl integration under the conditions users run it in (rlvr_kernels.integrations.verl, verl 0.9.1, CPU).

- non-finite inputs on loss tokens are a clear ``ValueError`` naming the argument (as ``RLVRLoss``), raised before
  any of the token math;
- padding is inert: NaN / +-inf at every ``response_mask == 0`` position of every input of every ``rlvr_*`` mode
  (hypothesis picks where) gives the loss, gradient and metrics of the same call with zero padding, and
  ``rlvr_clip`` / ``_dppo`` / ``_cispo`` keep verl's ``vanilla`` / ``dppo_tv`` / ``cispo`` numbers there;
- a misspelt ``loss_mode=rlvr_...`` fails when verl builds the actor config, naming the valid ``rlvr_*`` losses;
- ``fused_kernel_options.impl_backend=rlvr`` on an engine that ignores it (any engine but the FSDP ones and verl's own
  ``MegatronEngine``, which gets the Megatron form: tests/test_verl_megatron.py) is refused when verl builds
  the engine;
- the entropy-based credit rules switch verl's ``calculate_entropy`` on for the update (worker hook);
- bf16 ``log_prob`` (losses) and a bf16 model (fused forward) give finite results close to fp32;
- on a real 2-rank gloo group (tests/_verl_dist.py), verl's engine with dp_size 2 and the DelTA all-reduce give the
  single-process numbers over the union of both ranks' data.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import types

import pytest
import torch

pytest.importorskip("verl")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import FSDPActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

import rlvr_kernels.integrations.verl as rv  # noqa: E402
from rlvr_kernels import forking_token_mask  # noqa: E402
from rlvr_kernels.integrations._verl import hooks as vh  # noqa: E402
from rlvr_kernels.integrations._verl import losses as vl  # noqa: E402
from test_integration_verl import actor_config  # noqa: E402  (the same real verl FSDPActorConfig)

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
PAIRS = [("vanilla", "rlvr_clip"), ("dppo_tv", "rlvr_dppo"), ("cispo", "rlvr_cispo")]
ENTROPY_CREDITS = ("forking", "entropy_adv", "d3s")
# no shrinking: a failing example here would take minutes to shrink (7 lists of 35 positions); it is printed as drawn
HYP = settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
)
NAN, INF = float("nan"), float("inf")

B, T = 6, 11
LENS = (11, 6, 0, 9, 4, 1)  # an empty row and a one-token row too
MASK = torch.arange(T)[None, :] < torch.tensor(LENS)[:, None]
N_PAD = int((~MASK).sum())
# the batch tensors of a call; "delta_coef" / "rollout_log_probs" / "entropy" reach the losses via loss_context
FIELDS = ("log_prob", "old_log_prob", "advantages", "rollout_is_weights", "entropy", "rollout_log_probs", "delta_coef")


@pytest.fixture(autouse=True)
def _no_leftover_step():
    rv.clear_training_step()
    yield
    rv.clear_training_step()


def inputs(seed=0, padding="zeros"):
    """Every input of a call, ``[B, T]`` fp32; ratios hit the clip branches. ``padding``: "zeros" (what verl's
    no_padding_2_padding leaves there) or "random" (other finite values)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 2.5
    t = {
        "old_log_prob": old,
        "log_prob": (old + torch.randn(B, T, generator=g) * 0.6).clamp(max=-1e-3),
        "advantages": torch.randn(B, 1, generator=g).expand(B, T).contiguous(),
        "rollout_is_weights": torch.rand(B, T, generator=g) * 0.5 + 0.75,
        "entropy": torch.rand(B, T, generator=g) * 3,
        "rollout_log_probs": old - torch.rand(B, T, generator=g) * 0.7,
        "delta_coef": torch.rand(B, T, generator=g) * 0.4 + 0.8,
    }
    if padding == "zeros":
        t = {k: torch.where(MASK, v, torch.zeros(())) for k, v in t.items()}
    return t


def poisoned(t: dict, plan: dict) -> dict:
    """``t`` with ``plan[field][j]`` (NaN / +-inf / None: keep) written at the j-th padded position."""
    out = {k: v.clone() for k, v in t.items()}
    rows, cols = torch.nonzero(~MASK, as_tuple=True)
    for field, values in plan.items():
        for r, c, v in zip(rows.tolist(), cols.tolist(), values):
            if v is not None:
                out[field][r, c] = v
    return out


def spec_of(name):
    return get_policy_loss_fn(name).rlvr_spec


def call(name, t, mode="token-mean", rlvr=None, gbi=None, mask=MASK, log_prob_dtype=None, **cfg_kw):
    """One call of the registered loss ``name`` (verl's signature) with the context inputs of the rlvr modes;
    returns ``(loss, grad w.r.t. log_prob, metrics)``."""
    cfg = actor_config(name, loss_agg_mode=mode, rlvr=rlvr, **cfg_kw)
    cfg.global_batch_info.update(gbi or {})
    lp = t["log_prob"].detach().clone()
    if log_prob_dtype is not None:
        lp = lp.to(log_prob_dtype)
    x = lp.requires_grad_()
    ctx = {}
    if name.startswith("rlvr_"):
        ctx = dict(
            step=3,
            total_steps=10,
            entropy=t["entropy"],
            delta_coefficients=t["delta_coef"],
            rollout_log_probs=t["rollout_log_probs"],
        )
    torch.manual_seed(0)  # clip_cov draws its tokens at random: the same draw in every call
    with rv.loss_context(**ctx):
        loss, metrics = get_policy_loss_fn(name)(
            old_log_prob=t["old_log_prob"],
            log_prob=x,
            advantages=t["advantages"],
            response_mask=mask,
            loss_agg_mode=mode,
            config=cfg,
            rollout_is_weights=t["rollout_is_weights"],
        )
    loss.backward()
    grad = x.grad if x.grad is not None else torch.zeros_like(x)
    return loss.detach(), grad, metrics


# ----------------------------------------------------------------------------------------------------------------
# 1. non-finite inputs on loss tokens


CHECKED = [  # (argument as the error names it, field, loss names that read it, rlvr options)
    ("old_log_prob", "old_log_prob", rv.LOSS_NAMES, None),
    ("advantages", "advantages", rv.LOSS_NAMES, None),
    ("rollout_is_weights", "rollout_is_weights", rv.LOSS_NAMES, None),
    ("entropy", "entropy", [n for n in rv.LOSS_NAMES if spec_of(n).credit in ENTROPY_CREDITS], None),
    (rv.DELTA_COEF_KEY, "delta_coef", [n for n in rv.LOSS_NAMES if spec_of(n).credit == "delta"], None),
    (
        rv.ROLLOUT_LOGP_KEY,
        "rollout_log_probs",
        [n for n in rv.LOSS_NAMES if spec_of(n).trust in ("dppo", "cppo")],
        {"anchor": "rollout"},
    ),
]


@pytest.mark.parametrize("arg,field,names,rlvr", CHECKED, ids=[c[0] for c in CHECKED])
@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_nonfinite_on_loss_tokens_is_a_value_error(arg, field, names, rlvr, bad, monkeypatch):
    """RLVRLoss raises ``ValueError("<arg> has non-finite values on loss tokens")``; the verl losses used to return
    NaN. The check comes before the token math (token_pass is never reached)."""
    t = inputs(seed=1)
    t[field][3, 2] = bad  # a valid token (row 3 has 9)
    assert MASK[3, 2]

    def no_math(*a, **k):
        raise AssertionError("token_pass ran on non-finite inputs")

    monkeypatch.setattr(vl._loss, "token_pass", no_math)
    for name in names:
        with pytest.raises(ValueError, match=rf"{name}: {arg} has non-finite values on loss tokens"):
            call(name, t, rlvr=rlvr)
    # the same value on a padded position is fine (the check looks at response_mask == 1 only)
    monkeypatch.undo()
    t = inputs(seed=1)
    t[field][2, 0] = bad
    loss, grad, _ = call(names[0], t, rlvr=rlvr)
    assert torch.isfinite(loss) and bool(torch.isfinite(grad).all())


def test_nonfinite_check_costs_one_host_sync(monkeypatch):
    """One cheap check: a single device-to-host transfer for all the arguments together."""
    t = inputs(seed=2)
    calls = []
    real = vl._nonfinite_flags

    def counting(*a, **k):
        out = real(*a, **k)
        calls.append(out)
        return out

    monkeypatch.setattr(vl, "_nonfinite_flags", counting)
    call("rlvr_delta_dppo", t, rlvr={"anchor": "rollout"})
    assert len(calls) == 1 and len(calls[0]) == 5  # old_log_prob, advantages, rollout_is_weights, coef, mu


# ----------------------------------------------------------------------------------------------------------------
# 2. padding is inert


VALUES = st.sampled_from([None, NAN, INF, -INF])


def plans(fields):
    return st.fixed_dictionaries({f: st.lists(VALUES, min_size=N_PAD, max_size=N_PAD) for f in fields})


def assert_same_call(got, want, tag):
    (lg, gg, mg), (lw, gw, mw) = got, want
    assert torch.isfinite(lg), (tag, lg)
    assert bool(torch.isfinite(gg).all()), (tag, gg)
    assert bool((gg[~MASK] == 0).all()), (tag, gg[~MASK])
    torch.testing.assert_close(lg, lw, rtol=1e-6, atol=1e-7, msg=lambda m: f"{tag}: loss {m}")
    torch.testing.assert_close(gg, gw, rtol=1e-5, atol=1e-8, msg=lambda m: f"{tag}: grad {m}")
    assert set(mg) == set(mw), tag
    for k in mw:
        assert math.isfinite(mg[k]), (tag, k, mg[k])
        assert mg[k] == pytest.approx(mw[k], rel=1e-5, abs=1e-7), (tag, k, mg[k], mw[k])


@pytest.mark.parametrize("name", rv.LOSS_NAMES)
@HYP
@given(plan=plans(FIELDS), anchor=st.sampled_from(["old", "rollout"]), seed=st.integers(0, 3), dp=st.booleans())
def test_padding_is_inert_in_every_rlvr_mode(name, plan, anchor, seed, dp):
    """NaN / +-inf anywhere in the padding of log_prob, old_log_prob, advantages, rollout_is_weights, entropy,
    rollout log-probs and DelTA coefficients, every loss_agg_mode: the loss, its gradient w.r.t. log_prob (0 on
    padding) and the metrics are those of the same call with zero padding (the other, finite, values in the padding
    do not matter either)."""
    spec = spec_of(name)
    rlvr = {"anchor": anchor} if spec.trust in ("dppo", "cppo") else None
    gbi = None
    if dp and spec.credit != "tp_schedule":  # a DP-style global_batch_info (tp_schedule needs the worker hook then)
        gbi = dict(
            dp_size=2, batch_num_tokens=2 * int(MASK.sum()) + 3, global_batch_size=2 * B - 1, loss_scale_factor=16
        )
    dirty_inputs = poisoned(inputs(seed, padding="random"), plan)
    for mode in AGG_MODES:
        clean = call(name, inputs(seed), mode, rlvr, gbi)
        dirty = call(name, dirty_inputs, mode, rlvr, gbi)
        assert_same_call(dirty, clean, f"{name} {mode}")
        assert float(clean[1].abs().sum()) > 0


@pytest.mark.parametrize("verl_name,ours", PAIRS)
@HYP
@given(plan=plans(("log_prob", "old_log_prob", "advantages", "rollout_is_weights")), seed=st.integers(0, 3))
def test_poisoned_padding_keeps_verls_numbers(verl_name, ours, plan, seed):
    """rlvr_clip / _dppo / _cispo with NaN / +-inf in the padding give verl's vanilla / dppo_tv / cispo on the
    clean batch (loss, gradient, ppo_kl) in every loss_agg_mode; where verl's own loss stays finite on a poisoned
    batch (token-mean / token-sum, poisoned log-probs only: verl selects there), ours equals it on that batch."""
    clean, dirty = inputs(seed), poisoned(inputs(seed, padding="random"), plan)
    dirty_logp = poisoned(inputs(seed, padding="random"), {k: plan[k] for k in ("log_prob", "old_log_prob")})
    for mode in AGG_MODES:
        lv, gv, mv = call(verl_name, clean, mode)
        lo, go, mo = call(ours, dirty, mode)
        torch.testing.assert_close(lo, lv, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(go, gv, rtol=1e-5, atol=1e-8)
        assert bool((go[~MASK] == 0).all()) and float(go.abs().sum()) > 0
        if verl_name == "vanilla":
            assert mo["rlvr/ppo_kl"] == pytest.approx(mv["actor/ppo_kl"], rel=1e-5, abs=1e-7)
        assert all(math.isfinite(v) for v in mo.values()), mo
        if mode in ("token-mean", "token-sum"):
            lvd, gvd, _ = call(verl_name, dirty_logp, mode)
            lod, god, _ = call(ours, dirty_logp, mode)
            torch.testing.assert_close(lod, lvd, rtol=1e-6, atol=1e-7)
            # (verl's dppo_tv gradient is NaN at such padded positions; on the loss tokens the two agree)
            torch.testing.assert_close(god[MASK], gvd[MASK], rtol=1e-5, atol=1e-8)
            assert bool(torch.isfinite(god).all()) and bool((god[~MASK] == 0).all())


# ----------------------------------------------------------------------------------------------------------------
# 3. a misspelt rlvr_* loss mode fails at config time


def _compose(overrides):
    import verl
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(
        config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer/config"), version_base=None
    ):
        return compose(
            "ppo_trainer",
            overrides=list(overrides)
            + [
                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
                "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2",
                "data.train_batch_size=8",
                "actor_rollout_ref.actor.ppo_mini_batch_size=4",
                "trainer.n_gpus_per_node=1",
            ],
        )


def test_misspelt_rlvr_loss_mode_fails_at_config_validation():
    """verl's own validate_config (main_ppo, on the driver, before any worker or rollout starts) used to pass a
    misspelt rlvr_* loss mode, which then failed at the first actor update."""
    from verl.utils.config import validate_config

    target = "actor_rollout_ref.actor.policy_loss._target_=rlvr_kernels.integrations.verl.RLVRPolicyLossConfig"
    typo = "actor_rollout_ref.actor.policy_loss.loss_mode=rlvr_tp_schedul"
    # with our policy-loss config (the documented recipe) and with verl's own (ActorConfig hook)
    for overrides in ([typo, target], [typo]):
        with pytest.raises(Exception, match="rlvr_tp_schedul") as info:  # Hydra wraps it in InstantiationException
            validate_config(_compose(overrides), use_reference_policy=False, use_critic=False)
        msg = str(info.value)
        assert "did you mean 'rlvr_tp_schedule'" in msg and "actor_rollout_ref.actor.policy_loss.loss_mode" in msg
        assert all(n in msg for n in rv.LOSS_NAMES)
    with pytest.raises(ValueError, match="rlvr_dppo"):
        rv.RLVRPolicyLossConfig(loss_mode="rlvr_ddpo")
    with pytest.raises(ValueError, match="rlvr_clip"):
        FSDPActorConfig(
            strategy="fsdp",
            rollout_n=1,
            ppo_micro_batch_size_per_gpu=2,
            policy_loss=PolicyLossConfig(loss_mode="rlvr_clipp"),
        )
    # valid names (ours and verl's) pass
    validate_config(
        _compose([target, "actor_rollout_ref.actor.policy_loss.loss_mode=rlvr_tp_schedule"]),
        use_reference_policy=False,
        use_critic=False,
    )
    validate_config(
        _compose(["actor_rollout_ref.actor.policy_loss.loss_mode=dppo_tv"]),
        use_reference_policy=False,
        use_critic=False,
    )
    actor_config("rlvr_delta_cispo")


def test_misspelt_loss_mode_fails_at_the_worker_before_any_work():
    """A config that skipped validation (a plain DictConfig) still fails with the list, before the update runs."""
    cfg = OmegaConf.create({"policy_loss": {"loss_mode": "rlvr_forkin"}})
    worker = types.SimpleNamespace(loss_fn=functools.partial(ppo_loss, config=cfg), engine=None)
    ran = []
    wrapped = vh.wrap_train_mini_batch(lambda self, data: ran.append(data))
    with pytest.raises(ValueError, match="did you mean 'rlvr_forking'"):
        wrapped(worker, tu.get_tensordict({"x": torch.zeros(2, 3)}))
    assert ran == []


# ----------------------------------------------------------------------------------------------------------------
# 4. impl_backend=rlvr on an engine that ignores it


@pytest.fixture
def fake_engines(monkeypatch):
    """Registers a Megatron-like engine and an FSDP-derived engine for a private device name."""
    from verl.workers.engine.base import BaseEngine, EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    built = []

    class FakeMegatronEngineWithLMHead(BaseEngine):
        def __init__(self, **kw):
            built.append(("megatron", kw))

    class FakeFSDPEngine(FSDPEngineWithLMHead):
        def __init__(self, **kw):
            built.append(("fsdp2", kw))

    device = "rlvr_test_device"
    monkeypatch.setenv("VERL_ENGINE_DEVICE", device)
    added = []
    for backend, cls in (("megatron", FakeMegatronEngineWithLMHead), ("fsdp2", FakeFSDPEngine)):
        EngineRegistry.register(model_type="language_model", backend=backend, device=device)(cls)
        added.append(backend)
    yield EngineRegistry, built
    for backend in added:
        EngineRegistry._engines["language_model"][backend].pop(device, None)
        if not EngineRegistry._engines["language_model"][backend]:
            del EngineRegistry._engines["language_model"][backend]


def _model_config(impl_backend, use_fused_kernels=True):
    return types.SimpleNamespace(
        use_fused_kernels=use_fused_kernels, fused_kernel_options=OmegaConf.create({"impl_backend": impl_backend})
    )


def test_rlvr_forward_backend_refused_on_megatron(fake_engines, caplog):
    """verl's Megatron engine never reads fused_kernel_options.impl_backend (it has its own fused forward): asking
    for impl_backend=rlvr there is an error when verl builds the engine (TrainingWorker -> EngineRegistry.new)."""
    registry, built = fake_engines
    for impl in ("rlvr", "rlvr_triton", "rlvr_torch"):
        with pytest.raises(NotImplementedError, match=rf"impl_backend={impl}.*megatron") as info:
            registry.new(
                model_type="language_model", backend="megatron", model_config=_model_config(impl), engine_config=None
            )
        assert "fsdp" in str(info.value)
    assert built == []
    # what stays allowed: verl's own backends on megatron, ours on the FSDP engines
    registry.new(model_type="language_model", backend="megatron", model_config=_model_config("triton"))
    registry.new(model_type="language_model", backend="fsdp2", model_config=_model_config("rlvr"))
    registry.new(model_type="language_model", backend="megatron", model_config=types.SimpleNamespace())
    assert [b for b, _ in built] == ["megatron", "fsdp2", "megatron"]
    # without use_fused_kernels nothing would run either way: a warning naming the setting
    with caplog.at_level("WARNING", logger=rv.__name__):
        registry.new(
            model_type="language_model", backend="megatron", model_config=_model_config("rlvr", use_fused_kernels=False)
        )
    assert "impl_backend=rlvr" in caplog.text and "megatron" in caplog.text
    assert getattr(registry.new, "_rlvr_wrapped", False)


# ----------------------------------------------------------------------------------------------------------------
# 5. the entropy-based credit rules need verl's calculate_entropy


class _RecordingWorker:
    """verl's TrainingWorker loop as far as calculate_entropy goes: the trainer's flag travels as non-tensor data
    into verl's mini-batch iterator and micro-batch chunks, where the engine reads it (fsdp transformer_impl)."""

    def __init__(self, config):
        self.loss_fn = functools.partial(ppo_loss, config=config)
        self.engine = types.SimpleNamespace(lr_scheduler=None)
        self.flags = []

    def train_mini_batch(self, data):
        for mini in tu.make_iterator(data, mini_batch_size=2, epochs=1, seed=0, dataloader_kwargs={}):
            for mb in tu.chunk_tensordict(mini, 2):
                self.flags.append(bool(tu.get_non_tensor_data(data=mb, key="calculate_entropy", default=False)))


@pytest.mark.parametrize(
    "name,want",
    [
        ("rlvr_forking", True),
        ("rlvr_entropy_adv_cispo", True),
        ("rlvr_d3s_dppo", True),
        ("rlvr_clip", False),
        ("rlvr_tp_schedule", False),
        ("vanilla", False),
    ],
)
def test_entropy_losses_switch_calculate_entropy_on(name, want):
    cfg = actor_config(name)
    data = tu.get_tensordict(
        {"response_mask": MASK[:4].long(), "x": torch.zeros(4, 2)},
        {"calculate_entropy": False, rv.STEP_KEY: 3, rv.TOTAL_STEPS_KEY: 10},
    )
    w = _RecordingWorker(cfg)
    vh.wrap_train_mini_batch(_RecordingWorker.train_mini_batch)(w, data)
    assert w.flags and all(f is want for f in w.flags), w.flags


def test_missing_entropy_error_names_the_override():
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.actor\.calculate_entropy=True"):
        t = inputs()
        get_policy_loss_fn("rlvr_d3s")(
            old_log_prob=t["old_log_prob"],
            log_prob=t["log_prob"],
            advantages=t["advantages"],
            response_mask=MASK,
            config=actor_config("rlvr_d3s"),
        )


def test_forking_through_the_worker_hook_without_calculate_entropy_in_the_config():
    """The recipe without ``calculate_entropy=True`` (the trainer sends ``calculate_entropy=False``): the hook asks
    the engine for the entropy, the engine's model output carries it (only when asked, as verl's engines do), and
    verl's ppo_loss with rlvr_forking gives verl's vanilla on forking_token_mask."""
    import test_integration_verl as tv

    old, lp, adv, mask, _ = tv.batch(seed=8)
    ent = torch.rand(lp.shape, generator=torch.Generator().manual_seed(9)) * 3
    cfg = actor_config("rlvr_forking", rlvr={"credit_rho": 0.3})
    data, plen = tv._micro_batch(old, lp, adv, mask)
    tu.assign_non_tensor(data, calculate_entropy=False)
    x = lp.detach().clone().requires_grad_()

    class Engine:
        def train_batch(self, td, loss_function):
            out = {"log_probs": tv._pack(x, mask, plen)}
            if tu.get_non_tensor_data(data=td, key="calculate_entropy", default=False):
                out["entropy"] = tv._pack(ent, mask, plen, fill_seed=3)
            return loss_function(model_output=out, data=td, dp_group=None)

    worker = types.SimpleNamespace(loss_fn=functools.partial(ppo_loss, config=cfg), engine=Engine())
    loss, _ = vh.wrap_train_mini_batch(lambda self, d: self.engine.train_batch(d, self.loss_fn))(worker, data)
    loss.backward()
    keep = forking_token_mask(ent, mask, 0.3)
    cv = actor_config("vanilla")
    cv.global_batch_info.update(batch_num_tokens=int(mask.sum()))
    xv = lp.detach().clone().requires_grad_()
    lv, _ = get_policy_loss_fn("vanilla")(
        old_log_prob=old, log_prob=xv, advantages=adv, response_mask=keep, loss_agg_mode="token-mean", config=cv
    )
    lv.backward()
    torch.testing.assert_close(loss.detach(), lv.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, xv.grad, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------------------------------------------
# 6. bf16


@pytest.mark.parametrize("name", rv.LOSS_NAMES)
def test_losses_with_bf16_inputs(name):
    """verl may hand bf16 log-probs (and bf16 old log-probs / advantages from a bf16 rollout): finite, the gradient
    comes back in bf16, and the numbers are fp32's on the same (bf16-rounded) values, close to fp32's on the
    unrounded ones."""
    spec = spec_of(name)
    rlvr = {"anchor": "rollout"} if spec.trust in ("dppo", "cppo") else None
    for mode in AGG_MODES:
        t32 = inputs(seed=5)
        t16 = {k: v.to(torch.bfloat16) for k, v in t32.items()}
        rounded = {k: v.float() for k, v in t16.items()}
        l16, g16, m16 = call(name, t16, mode, rlvr, log_prob_dtype=torch.bfloat16)
        lr, gr, _ = call(name, rounded, mode, rlvr)
        l32, _, _ = call(name, t32, mode, rlvr)
        assert g16.dtype == torch.bfloat16 and torch.isfinite(l16) and bool(torch.isfinite(g16).all())
        assert all(math.isfinite(v) for v in m16.values())
        torch.testing.assert_close(l16.float(), lr, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g16.float(), gr, rtol=1e-2, atol=1e-5)  # bf16 gradient storage
        torch.testing.assert_close(l16.float(), l32, rtol=5e-2, atol=2e-2)  # bf16 rounding of the inputs


@pytest.mark.parametrize("impl_backend", ["rlvr_torch", "rlvr_triton"])
def test_fused_forward_with_a_bf16_model(impl_backend):
    """The rlvr fused forward (through verl's patch_forward_with_backends) on a bf16 model: fp32 outputs, finite,
    close to the fp32 model's log_softmax (bf16 tolerances), bf16 gradients reach the weights, in the direction of
    the fp32 model's."""
    transformers = pytest.importorskip("transformers")
    import verl.models.transformers.monkey_patch as mp

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
    ref = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        ref.lm_head.weight.mul_(40.0)
    model = copy.deepcopy(ref).to(torch.bfloat16)
    mp.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=impl_backend)
    assert model._rlvr_backend == impl_backend[len("rlvr_") :]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (1, 13), generator=g)  # verl's packed path: position ids per sequence
    pos = torch.cat([torch.arange(6), torch.arange(7)])[None]
    out = model(
        input_ids=ids,
        position_ids=pos,
        shift_labels=torch.roll(ids, -1, -1),
        temperature=0.7,
        return_dict=True,
        use_cache=False,
    )
    assert out.log_probs.dtype == torch.float32 and out.entropy.dtype == torch.float32
    assert bool(torch.isfinite(out.log_probs).all()) and bool(torch.isfinite(out.entropy).all())
    logsm = torch.log_softmax(ref(input_ids=ids, position_ids=pos, use_cache=False).logits.float() / 0.7, -1)
    want_lp = logsm.gather(-1, torch.roll(ids, -1, -1).unsqueeze(-1)).squeeze(-1)
    want_ent = -(logsm.exp() * logsm).sum(-1)
    assert float(want_ent.detach().std()) > 0.05 and float(want_lp.detach().abs().max()) > 2.0
    torch.testing.assert_close(out.log_probs, want_lp.detach(), rtol=3e-2, atol=0.15)
    torch.testing.assert_close(out.entropy, want_ent.detach(), rtol=3e-2, atol=0.1)
    (out.log_probs.sum() + 0.5 * out.entropy.sum()).backward()
    gw = model.lm_head.weight.grad
    assert gw.dtype == torch.bfloat16 and bool(torch.isfinite(gw).all()) and float(gw.abs().sum()) > 0
    (want_lp.sum() + 0.5 * want_ent.sum()).backward()
    gref = ref.lm_head.weight.grad
    cos = torch.nn.functional.cosine_similarity(gw.float().flatten(), gref.flatten(), dim=0)
    assert float(cos) > 0.99, float(cos)


# ----------------------------------------------------------------------------------------------------------------
# 7. several processes


def test_two_ranks_match_the_union(tmp_path):
    """A real 2-rank gloo group (two forked processes, tests/_verl_dist.py): verl's FSDP engine code
    (forward_backward_batch all-reduces batch_num_tokens, dp_size 2) with the rlvr losses in every aggregation mode
    gives the single-process loss and DP-averaged gradient over the union of both ranks' data; the DelTA worker hook
    with delta_coef_all_reduce=true gives rlvr_kernels.delta_coefficients over both ranks' tokens, without it each
    rank's own."""
    pytest.importorskip("transformers")
    from verl.workers.engine.fsdp import transformer_impl  # noqa: F401  (imported before the fork)

    import _verl_dist

    res = _verl_dist.launch(str(tmp_path), world=2, timeout=240.0)
    assert sorted(r["rank"] for r in res) == [0, 1]
    for r in res:
        assert r["world"] == 2 and r["dp_size_seen"] == [2] and r["batch_num_tokens_seen"] == [r["union_tokens"]]
        assert r["local_tokens"] < r["union_tokens"]
        labels = [c[0] for c in r["checks"]]
        assert sum(lab.endswith(" loss") for lab in labels) == 14
        assert sum(lab.startswith("delta all_reduce") for lab in labels) == 4
        for label, diff, tol in r["checks"]:
            assert diff <= tol, (r["rank"], label, diff, tol)
        # non-vacuous: the all-reduced DelTA coefficients differ from the rank's own
        assert r["delta_union_vs_own"] > 1e-3


@pytest.mark.parametrize(
    "mode, rlvr, match",
    [
        ("rlvr_delta", {"schedule": True}, "schedule=true applies only"),
        ("rlvr_clip", {"schedule": True}, "schedule=true applies only"),
        ("rlvr_tp_schedule_cppo", {"schedule": False}, "schedule=false is not allowed"),
    ],
)
def test_schedule_flag_is_checked_when_verl_builds_the_config(mode, rlvr, match):
    """A schedule flag the loss cannot honour fails when verl builds the actor config, before any rollout."""
    from rlvr_kernels.integrations.verl import RLVRPolicyLossConfig

    with pytest.raises(ValueError, match=match):
        RLVRPolicyLossConfig(loss_mode=mode, rlvr=rlvr)
    RLVRPolicyLossConfig(loss_mode="rlvr_forking", rlvr={"schedule": True})  # a scheduled variant exists
