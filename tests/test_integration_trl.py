"""TRL integration (rlvr_kernels.integrations.trl) against trl 1.16.0 from PyPI, on CPU and offline.

A tiny randomly initialised Qwen2 causal LM, a word-level tokenizer, a toy prompt set and a toy reward
(tests/_trl_common.py):
- RLVRGRPOTrainer with the defaults trains like TRL's GRPOTrainer (same seed -> same loss, grad norm and entropy at
  every step), for a dapo run with gradient accumulation and a grpo run with a reference model and two iterations;
- the RLVRLoss path with neutral settings (forking keeping every token, a zero entropy bonus on the advantage, DPPO
  on-policy) gives TRL's loss and grad norm too: the normalisation and the hidden-state routing are TRL's;
- every method runs two steps with a finite loss, logs its rlvr/ metrics, and the schedule value advances;
- DelTA (credit="delta"): the coefficients that reach the loss equal delta_coefficients(...) computed from the
  backbone's final hidden states and the old log-probs of the whole generation batch (cached and streamed), and
  delta_coef_lam_min == delta_coef_lam_max trains exactly like TRL;
- the ZeRO-3 form of the head (regathered in the backward) gives the same gradients as the direct one;
- bad configurations fail with clear errors.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from _trl_common import BASE, WORDS, dataset, delta_oracle_inputs, even_words, save_tiny_model, tiny_model, tokenizer  # noqa: E402,F401
from rlvr_kernels.integrations.trl import RLVRGRPOConfig, RLVRGRPOTrainer, linear_logprobs  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Qwen2 saved locally: TRL builds the reference model from the policy's name_or_path."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


def train(trainer_cls, config_cls, tmp_path, model_dir, **kw):
    args = config_cls(output_dir=str(tmp_path / trainer_cls.__name__), **{**BASE, **kw})
    trainer = trainer_cls(
        model=tiny_model(model_dir),
        reward_funcs=even_words,
        args=args,
        train_dataset=dataset(),
        processing_class=tokenizer(),
    )
    trainer.train()
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == args.max_steps
    return logs


def assert_same_training(ref, got, keys=("loss", "grad_norm", "entropy")):
    for step, (r, g) in enumerate(zip(ref, got), start=1):
        for k in keys:
            assert math.isclose(r[k], g[k], rel_tol=1e-4, abs_tol=1e-6), (step, k, r[k], g[k])
    # the runs did something: a non-zero gradient at some step
    assert any(abs(r["grad_norm"]) > 1e-6 for r in ref)


PARITY = {
    "dapo_ga2": dict(loss_type="dapo", gradient_accumulation_steps=2, max_steps=3),
    "grpo_ref_iters2": dict(loss_type="grpo", beta=0.04, num_iterations=2),
}


@pytest.mark.parametrize("name", list(PARITY))
def test_defaults_train_like_trl(tmp_path, model_dir, name):
    kw = PARITY[name]
    ref = train(GRPOTrainer, GRPOConfig, tmp_path, model_dir, **kw)
    got = train(RLVRGRPOTrainer, RLVRGRPOConfig, tmp_path, model_dir, **kw)
    keys = ("loss", "grad_norm", "entropy") + (("kl",) if kw.get("beta") else ())
    assert_same_training(ref, got, keys)


NEUTRAL = {
    # forking that keeps every token: the RLVRLoss path with TRL's dapo normaliser over an accumulation window
    # (and TRL's static entropy bonus, a token mean over the kept tokens / GA)
    # and a generation batch spanning two optimizer steps (TRL rescales num_items_in_batch by GA / spg)
    "forking_all_dapo_ga2_spg4": dict(
        loss_type="dapo",
        gradient_accumulation_steps=2,
        steps_per_generation=4,
        credit="forking",
        credit_rho=1.0,
        entropy_coef=0.05,
    ),
    # entropy-shaped advantages with a zero bonus scale: grpo's per-sequence mean, /GA, with a reference model
    "entropy_adv_zero_grpo": dict(
        loss_type="grpo",
        beta=0.04,
        gradient_accumulation_steps=2,
        credit="entropy_adv",
        schedule=True,
        schedule_mode="constant",
        schedule_start_value=0.0,
    ),
    # DPPO on-policy: every token kept, -A rho has the PPO-clip gradient at rho = 1
    # (the trainer computes the behaviour log-probs TRL skips); loss_type picks the normaliser
    "dppo_onpolicy_bnpo": dict(loss_type="bnpo", trust_region="dppo"),
    "dppo_onpolicy_grpo_ga2": dict(loss_type="grpo", trust_region="dppo", gradient_accumulation_steps=2),
    "dppo_onpolicy_dr_grpo": dict(loss_type="dr_grpo", trust_region="dppo"),
}


@pytest.mark.parametrize("ga", [1, 2])
def test_cispo_trust_region_is_trls_cispo(tmp_path, model_dir, ga):
    """trust_region='cispo' on a dapo config (the catalogue's trust region, offered by TRL and verl alike) trains
    exactly like TRL's own loss_type='cispo': the clamp at epsilon_high, the token-count normaliser, the metric."""
    kw = dict(epsilon_high=1.05, num_iterations=2, gradient_accumulation_steps=ga)
    ref = train(GRPOTrainer, GRPOConfig, tmp_path, model_dir, loss_type="cispo", **kw)
    got = train(RLVRGRPOTrainer, RLVRGRPOConfig, tmp_path, model_dir, loss_type="dapo", trust_region="cispo", **kw)
    assert_same_training(ref, got, ("loss", "grad_norm", "entropy", "cispo_clip_ratio"))


@pytest.mark.parametrize("name", list(NEUTRAL))
def test_rlvr_loss_path_matches_trl_when_neutral(tmp_path, model_dir, name):
    kw = NEUTRAL[name]
    base = {k: v for k, v in kw.items() if k in GRPOConfig.__dataclass_fields__}
    ref = train(GRPOTrainer, GRPOConfig, tmp_path, model_dir, **base)
    got = train(RLVRGRPOTrainer, RLVRGRPOConfig, tmp_path, model_dir, **kw)
    assert_same_training(ref, got)
    assert all(row["rlvr/active_fraction"] == pytest.approx(1.0) for row in got)


METHODS = {
    "tp_schedule": dict(credit="tp_schedule"),
    "forking": dict(credit="forking", schedule=True),
    "entropy_adv": dict(credit="entropy_adv", schedule=True),
    "d3s": dict(credit="d3s", schedule=True),
    "forking_fixed_rho": dict(credit="forking"),
    "d3s_sequence_rho": dict(credit="d3s", d3s_scope="sequence", credit_rho=0.5, loss_type="grpo"),
    "dppo": dict(trust_region="dppo", num_iterations=2),
    "cppo": dict(trust_region="cppo", num_iterations=2),
    "tp_schedule_cppo": dict(credit="tp_schedule", trust_region="cppo", loss_type="dr_grpo"),
    "forking_dppo_grpo": dict(credit="forking", schedule=True, trust_region="dppo", loss_type="grpo", num_iterations=2),
    "delta": dict(credit="delta"),
    "delta_dppo_streamed": dict(credit="delta", trust_region="dppo", num_iterations=2, delta_coef_cache_bytes=0),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_methods_train(tmp_path, model_dir, name):
    kw = METHODS[name]
    # schedule_end_frac=1.0 over 2 steps: q(1) = 0.495, q(2) = 0
    logs = train(RLVRGRPOTrainer, RLVRGRPOConfig, tmp_path, model_dir, schedule_end_frac=1.0, **kw)
    for row in logs:
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
        assert 0.0 < row["rlvr/active_fraction"] <= 1.0
        assert math.isfinite(row["entropy"])
    credit = kw.get("credit", "none")
    scheduled = credit == "tp_schedule" or kw.get("schedule") is True
    if scheduled:
        q = [row["rlvr/schedule_value"] for row in logs]
        assert q[0] == pytest.approx(0.495) and q[1] == pytest.approx(0.0)
    else:
        assert all("rlvr/schedule_value" not in row for row in logs)
    if credit in ("tp_schedule", "forking", "d3s") and scheduled:
        assert logs[0]["rlvr/active_fraction"] < 1.0  # the step-1 rule drops tokens, step 2 (q = 0) keeps all
        assert logs[1]["rlvr/active_fraction"] == pytest.approx(1.0)
    if kw.get("trust_region") in ("dppo", "cppo"):
        assert all(0.0 <= row["rlvr/trust_region_masked_fraction"] <= 1.0 for row in logs)
    if kw.get("trust_region") == "cppo":
        assert all(math.isfinite(row["rlvr/cppo_delta_b_mean"]) for row in logs)
    if credit == "delta":
        # a group with a non-zero reward std has advantages of both signs: the coefficients vary (a step without a
        # generation, num_iterations > 1, reuses the last generation batch and its coefficients)
        mixed, frac = [], 1.0
        for row in logs:
            frac = row.get("frac_reward_zero_std", frac)
            if frac < 1.0:
                mixed.append(row)
        assert mixed and all(row["rlvr/delta_coef_std"] > 0.0 for row in mixed)
    else:
        assert all("rlvr/delta_coef_std" not in row for row in logs)


def test_plain_grpo_config_trains_like_trl(tmp_path, model_dir):
    """RLVRGRPOTrainer also takes TRL's own GRPOConfig (the defaults: TRL's loss on our log-probs)."""
    ref = train(GRPOTrainer, GRPOConfig, tmp_path, model_dir)
    got = train(RLVRGRPOTrainer, GRPOConfig, tmp_path, model_dir)
    assert_same_training(ref, got)


def test_token_count_normaliser_counts_kept_tokens(tmp_path, model_dir, monkeypatch):
    """dapo + TP-Schedule with 2 accumulation steps: every micro-batch of an optimizer step divides by the tokens the
    rule keeps over the whole generation batch (both micro-batches), not by TRL's count of all completion tokens."""
    import rlvr_kernels.integrations.trl as integ

    calls = []
    real = integ.rlvr_loss

    def spy(cfg, hidden, weight, ids, mask, adv, **kw):
        loss, metrics = real(cfg, hidden, weight, ids, mask, adv, **kw)
        kept = float(metrics["active_fraction"]) * float(mask.sum())
        calls.append((float(kw["num_items_in_batch"]), kept, float(mask.sum()), kw["step"]))
        return loss, metrics

    monkeypatch.setattr(integ, "rlvr_loss", spy)
    train(
        RLVRGRPOTrainer,
        RLVRGRPOConfig,
        tmp_path,
        model_dir,
        credit="tp_schedule",
        schedule_end_frac=1.0,
        gradient_accumulation_steps=2,
    )
    assert [c[3] for c in calls] == [1, 1, 2, 2]
    first, second = calls[:2], calls[2:]
    assert first[0][0] == first[1][0] == pytest.approx(first[0][1] + first[1][1])
    assert first[0][0] < first[0][2] + first[1][2]  # q(1) = 0.495 dropped tokens
    assert second[0][0] == pytest.approx(second[0][2] + second[1][2])  # q(2) = 0 keeps them all


def test_regathered_head_matches_direct():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 16, generator=g, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(40, 16, generator=g))
    b = torch.nn.Parameter(torch.randn(40, generator=g))
    t = torch.randint(0, 40, (7,), generator=g)
    gl, ge = torch.randn(7, generator=g), torch.randn(7, generator=g)
    grads = []
    for regather in (False, True):
        lp, ent = linear_logprobs(
            h, w, b, t, dtype=torch.float32, temperature=0.7, want_entropy=True, backend="torch", regather=regather
        )
        grads.append((lp.detach(), ent.detach()) + torch.autograd.grad((lp * gl).sum() + (ent * ge).sum(), (h, w, b)))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y)


def _capture_loss_inputs(monkeypatch):
    """Spy on the RLVRLoss call of the integration: records (completion ids, loss mask, DelTA coefficients)."""
    import rlvr_kernels.integrations.trl as integ

    calls = []
    real = integ.rlvr_loss

    def spy(cfg, hidden, weight, ids, mask, adv, **kw):
        coef = kw.get("delta_coefficients")
        calls.append((ids.detach().clone(), mask.detach().clone(), None if coef is None else coef.detach().clone()))
        return real(cfg, hidden, weight, ids, mask, adv, **kw)

    monkeypatch.setattr(integ, "rlvr_loss", spy)
    return calls


class OracleTrainer(RLVRGRPOTrainer):
    """Computes DelTA's coefficients of each generation batch independently of the integration: the backbone's final
    hidden states (``model.model(...).last_hidden_state``, i.e. the lm_head input) and the log-probs from explicit
    logits at the rollout temperature, right after the batch is scored (theta_old), then ``delta_coefficients``."""

    def _generate_and_score_completions(self, inputs):
        from rlvr_kernels.delta import delta_coefficients

        out = super()._generate_and_score_completions(inputs)
        a = self.args
        h, lp, mask = delta_oracle_inputs(self, out)
        want = delta_coefficients(
            h,
            lp,
            out["advantages"],
            mask,
            iters=a.delta_coef_iters,
            lam_min=a.delta_coef_lam_min,
            lam_max=a.delta_coef_lam_max,
            exclude_zero_adv=a.delta_coef_exclude_zero_adv,
            backend="torch",
        )
        self.oracle.append((out, want, lp, mask))
        return out

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        self.passes += 1  # only the no-grad passes of generation time call it on the RLVRLoss path
        return super()._get_per_token_logps_and_entropies(*args, **kwargs)


ORACLE = {
    # the hidden states cached after one forward; TRL skips the old log-probs (GA 2 = steps_per_generation), so the
    # DelTA pass computes them at the rollout temperature 0.7; E = 8 completions over two micro-batches
    "cached_t07_ga2": (dict(gradient_accumulation_steps=2, temperature=0.7), 2, 4, 1),
    # no cache: each of the K + 3 phases re-runs the backbone (K + 3 = 5 passes, as the official code); TRL computes
    # the old log-probs itself (GA 1 < steps_per_generation 2, one more pass), E spans two optimizer steps
    "streamed_k2_spg2": (dict(delta_coef_cache_bytes=0, delta_coef_iters=2, steps_per_generation=2), 1, 2, 1 + 5),
    "exclude_zero_adv_grpo": (
        dict(
            delta_coef_exclude_zero_adv=True,
            delta_coef_lam_min=0.5,
            delta_coef_lam_max=2.0,
            loss_type="grpo",
            gradient_accumulation_steps=2,
        ),
        2,
        4,
        1,
    ),
}


@pytest.mark.parametrize("name", list(ORACLE))
def test_delta_coefficients_match_oracle(tmp_path, model_dir, monkeypatch, name):
    # (config, generation batches and loss calls over the 2 steps, no-grad passes per generation batch)
    kw, n_generations, n_calls, n_passes = ORACLE[name]
    calls = _capture_loss_inputs(monkeypatch)
    args = cfg(tmp_path, credit="delta", **kw)
    trainer = OracleTrainer(
        model=tiny_model(model_dir),
        reward_funcs=even_words,
        args=args,
        train_dataset=dataset(),
        processing_class=tokenizer(),
    )
    trainer.oracle, trainer.passes = [], 0
    trainer.train()
    assert len(trainer.oracle) == n_generations
    assert trainer.passes == n_generations * n_passes
    rows = {}
    for out, want, lp, mask in trainer.oracle:
        got = out["rlvr_delta_coefficients"]
        assert got.dtype == torch.float32 and got.shape == mask.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert float(got[mask].mean()) == pytest.approx(1.0, abs=1e-5)
        assert bool((got[~mask] == 0).all()) and bool((got[mask] > 0).all())
        assert float(got[mask].std()) > 0.0
        if out.get("old_per_token_logps") is not None:  # TRL's own old log-probs: the same ones the oracle uses
            torch.testing.assert_close(out["old_per_token_logps"][mask], lp[mask], rtol=1e-5, atol=1e-5)
        for i in range(mask.size(0)):
            rows.setdefault(tuple(out["completion_ids"][i].tolist()), []).append(want[i])
    # what reaches the loss: every micro-batch row carries its own row's coefficients through TRL's shuffle/split
    assert len(calls) == n_calls
    for ids, _mask, coef in calls:
        assert coef is not None and coef.shape == ids.shape
        for i in range(ids.size(0)):
            cands = rows[tuple(ids[i].tolist())]
            assert any(torch.allclose(coef[i], c, rtol=1e-5, atol=1e-5) for c in cands)


def test_delta_equal_lams_trains_like_trl(tmp_path, model_dir, monkeypatch):
    """delta_coef_lam_min == delta_coef_lam_max: every coefficient is 1 and the RLVRLoss path trains exactly like
    TRL."""
    kw = dict(loss_type="dapo", gradient_accumulation_steps=2)
    ref = train(GRPOTrainer, GRPOConfig, tmp_path, model_dir, **kw)
    calls = _capture_loss_inputs(monkeypatch)
    got = train(
        RLVRGRPOTrainer,
        RLVRGRPOConfig,
        tmp_path,
        model_dir,
        credit="delta",
        delta_coef_lam_min=0.9,
        delta_coef_lam_max=0.9,
        **kw,
    )
    assert_same_training(ref, got)
    assert len(calls) == 4
    for _, mask, coef in calls:
        assert torch.equal(coef, mask.float())
    assert all(row["rlvr/delta_coef_std"] == 0.0 for row in got)


def cfg(tmp_path, **kw):
    return RLVRGRPOConfig(output_dir=str(tmp_path), **{**BASE, **kw})


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(credit="delta", delta_coef_iters=-1), "delta_coef_iters"),
        (dict(credit="delta", delta_coef_iters=1.5), "delta_coef_iters"),
        (dict(credit="delta", delta_coef_lam_min=0.0), "delta_coef_lam_min must be a finite number > 0"),
        (
            dict(credit="delta", delta_coef_lam_min=1.2, delta_coef_lam_max=0.8),
            "delta_coef_lam_max must be a finite number >= ",
        ),
        (dict(credit="delta", delta_coef_lam_max=float("inf")), "delta_coef_lam_max"),
        (dict(credit="delta", delta_coef_exclude_zero_adv="yes"), "delta_coef_exclude_zero_adv must be a bool"),
        (dict(credit="delta", delta_coef_cache_bytes=-1), "delta_coef_cache_bytes"),
        (dict(credit="delta", top_entropy_quantile=0.2), "top_entropy_quantile"),
        (dict(credit="nope"), "credit must be one of"),
        (dict(trust_region="ppo"), "trust_region must be one of"),
        (dict(trust_region="dppo", loss_type="sapo"), "loss_type then only picks the normaliser"),
        (dict(trust_region="dppo", importance_sampling_level="sequence"), "importance_sampling_level"),
        (dict(trust_region="dppo", delta=2.0), "delta"),
        (dict(credit="tp_schedule", schedule=False), "schedule cannot be False"),
        (dict(credit="forking", credit_rho=1.5), "credit_rho"),
        (dict(credit="delta", schedule=True), "schedule=True applies"),
        (dict(credit="forking", top_entropy_quantile=0.2), "top_entropy_quantile"),
        (dict(credit="forking", off_policy_mask_threshold=0.5), "off_policy_mask_threshold"),
        (dict(credit="tp_schedule", schedule_begin_frac=0.9, schedule_end_frac=0.5), "schedule"),
        (dict(credit="tp_schedule", schedule_mode="zigzag"), "schedule"),
        (dict(ratio_cap=10.0), "ratio_cap"),
    ],
)
def test_bad_configs(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        cfg(tmp_path, **kw)


def test_defaults_leave_trl_unchanged(tmp_path):
    c = cfg(tmp_path)
    assert c.credit == "none" and c.trust_region == "clip" and not c.uses_rlvr_loss
    stock = GRPOConfig(output_dir=str(tmp_path), **BASE)
    for name in GRPOConfig.__dataclass_fields__:
        if name not in ("logging_dir",):
            assert getattr(c, name) == getattr(stock, name), name


def test_schedule_must_fit_the_run(tmp_path, model_dir):
    # end * max_steps = int(0.8 * 1) = 0 = k_min: the schedule has no room, a clear error at the first step
    args = cfg(tmp_path, credit="tp_schedule", max_steps=1)
    trainer = RLVRGRPOTrainer(
        model=tiny_model(model_dir),
        reward_funcs=even_words,
        args=args,
        train_dataset=dataset(),
        processing_class=tokenizer(),
    )
    with pytest.raises(ValueError, match="planned 1 optimizer steps"):
        trainer.train()
