"""RLVRGRPOTrainer with the package's rollout correction (``rollout_is`` / ``rollout_rs``; trl 1.16.0, CPU, no vLLM).

TRL's vLLM path is exercised without vLLM: ``VLLMGeneration`` is replaced by a stub (the trainer only syncs weights
into it) and the completions come from a ``rollout_func``, whose output TRL handles exactly as vLLM's (its
``logprobs`` become ``sampling_per_token_logps``; ``use_vllm=True`` with ``vllm_importance_sampling_correction=True``
makes TRL compute ``old_per_token_logps`` and its own ``importance_sampling_ratio``). Checked:

- the trainer's loss equals ``RLVRLoss`` called directly with the same tensors and options (IcePop on dapo, Geo-RS
  ``seq_mean_k1`` + token TIS on grpo), TRL's ``importance_sampling_ratio`` is not applied, and mu is the engine's
  log-probs (NaN -> the behaviour log-prob);
- ``num_items_in_batch`` (dapo) is the count of the tokens the correction keeps;
- without the options nothing changes: the defaults run TRL's own loss (with its IS ratio), and the RLVRLoss path
  (a credit rule) passes TRL's ``importance_sampling_ratio`` and no rollout log-probs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

import trl.trainer.grpo_trainer as trl_grpo  # noqa: E402

import rlvr_kernels.integrations.trl as integ  # noqa: E402
from _trl_common import BASE, dataset, even_words, save_tiny_model, tiny_model, tokenizer  # noqa: E402
from rlvr_kernels import RLVRLoss  # noqa: E402
from rlvr_kernels import methods as M  # noqa: E402
from rlvr_kernels.integrations.trl import RLVRGRPOConfig, RLVRGRPOTrainer  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2-rollout-corr"))


class _NoVLLM:
    """Stands in for TRL's ``VLLMGeneration``: the rollout_func generates; the trainer only syncs weights."""

    def __init__(self, **kw):
        self.syncs = 0

    def sync_weights(self):
        self.syncs += 1


class Engine:
    """A rollout engine (TRL's ``rollout_func``): random completions and the policy's log-probs at the sampling
    temperature plus Gaussian noise (another engine's numerics), one token unscored (NaN in TRL)."""

    def __init__(self, seed=0, noise=0.5):
        self.g = torch.Generator().manual_seed(seed)
        self.noise = noise
        self.logps = {}
        self.calls = 0

    def __call__(self, prompts, trainer):
        tok = trainer.processing_class
        T = trainer.max_completion_length
        prompt_ids, completion_ids, logprobs = [], [], []
        for p in prompts:
            pid = tok(p, add_special_tokens=False)["input_ids"]
            n = int(torch.randint(3, T + 1, (1,), generator=self.g))
            cid = torch.randint(3, len(tok), (n,), generator=self.g).tolist()
            with torch.no_grad():
                logits = trainer.model(input_ids=torch.tensor([pid + cid])).logits[0, len(pid) - 1 : -1]
            lp = torch.log_softmax(logits.float() / trainer.temperature, -1).gather(-1, torch.tensor(cid)[:, None])
            mu = torch.minimum(lp[:, 0] + self.noise * torch.randn(n, generator=self.g), torch.tensor(-1e-4))
            out = mu.tolist()
            if self.calls == 0 and not logprobs:
                out[1] = None  # unscored by the engine (vLLM's None, TRL's NaN)
            self.logps[tuple(cid)] = torch.tensor([float("nan") if x is None else x for x in out])
            prompt_ids.append(pid)
            completion_ids.append(cid)
            logprobs.append(out)
        self.calls += 1
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}


def spy(monkeypatch):
    calls = []
    real = integ.rlvr_loss

    def fn(cfg, hidden, weight, ids, mask, adv, **kw):
        rec = dict(
            cfg=cfg,
            hidden=hidden.detach().clone(),
            weight=weight.detach().clone(),
            ids=ids.clone(),
            mask=mask.clone(),
            adv=adv.detach().clone(),
            kw={k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()},
        )
        loss, metrics = real(cfg, hidden, weight, ids, mask, adv, **kw)
        rec["loss"] = loss.detach().clone()
        calls.append(rec)
        return loss, metrics

    monkeypatch.setattr(integ, "rlvr_loss", fn)
    return calls


def train(tmp_path, model_dir, monkeypatch, **kw):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL 1.16
    monkeypatch.setattr(trl_grpo, "VLLMGeneration", _NoVLLM)
    batches = []
    real_gen = RLVRGRPOTrainer._generate_and_score_completions

    def gen(self, inputs):
        out = real_gen(self, inputs)
        batches.append({k: v.detach().clone() for k, v in out.items() if isinstance(v, torch.Tensor)})
        return out

    monkeypatch.setattr(RLVRGRPOTrainer, "_generate_and_score_completions", gen)
    opts = dict(BASE, max_steps=1, use_vllm=True, vllm_mode="colocate", vllm_importance_sampling_correction=True)
    args = RLVRGRPOConfig(output_dir=str(tmp_path / "out"), **{**opts, **kw})
    engine = Engine()
    trainer = RLVRGRPOTrainer(
        model=tiny_model(model_dir),
        reward_funcs=even_words,
        args=args,
        train_dataset=dataset(),
        processing_class=tokenizer(),
        rollout_func=engine,
    )
    calls = spy(monkeypatch)
    trainer.train()
    assert engine.calls >= 1 and trainer.vllm_generation.syncs >= 1
    return trainer, calls, batches, engine


def expected_mu(rec, engine):
    mask = rec["mask"].bool()
    old = rec["kw"]["old_per_token_logps"]
    mu = torch.zeros_like(old)
    for i in range(mask.size(0)):
        row = engine.logps[tuple(rec["ids"][i][mask[i]].tolist())]
        mu[i, : row.numel()] = row
    return torch.where(torch.isnan(mu), old, mu), bool(torch.isnan(mu[mask]).any())


def rows_of(rec, batch):
    """The generation-batch row of each micro-batch row (same completion ids)."""
    ids = batch["completion_ids"]
    return torch.tensor([int((ids == row).all(-1).nonzero()[0, 0]) for row in rec["ids"]])


CASES = {
    # IcePop (token-level masked IS) on TRL's dapo: num_items_in_batch counts the kept tokens
    "icepop_dapo": dict(loss_type="dapo", **M.ROLLOUT_CORRECTIONS["icepop"]),
    # two micro-batches of one generation batch: num_items_in_batch is the kept tokens of both
    "icepop_dapo_ga2": dict(loss_type="dapo", gradient_accumulation_steps=2, **M.ROLLOUT_CORRECTIONS["icepop"]),
    # Geo-RS (sequence geometric-mean rejection) + token TIS on TRL's grpo (per-sequence token means)
    "geo_rs_tis_grpo": dict(
        loss_type="grpo",
        rollout_is="token",
        rollout_is_high=1.5,
        rollout_rs="seq_mean_k1",
        rollout_rs_high=1.15,
    ),
}


def direct_loss(args, loss_type, correction=True):
    """``RLVRLoss`` built from the trainer's arguments and the options (not from the trainer's ``LossConfig``)."""
    opts = {n: getattr(args, n) for n in M.ROLLOUT_OPTIONS} if correction else {}
    return RLVRLoss(
        loss_type=loss_type,
        beta=args.beta,
        epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        temperature=args.temperature,
        max_completion_length=args.max_completion_length,
        backend="torch",
        **opts,
    )


@pytest.mark.parametrize("name", list(CASES))
def test_trainer_loss_is_rlvr_loss_with_the_correction(tmp_path, model_dir, monkeypatch, name):
    kw = CASES[name]
    trainer, calls, batches, engine = train(tmp_path, model_dir, monkeypatch, **kw)
    args = trainer.args
    assert args.uses_rollout_correction and trainer._rlvr_custom
    assert len(calls) == args.gradient_accumulation_steps and len(batches) == 1
    batch = batches[0]
    assert "importance_sampling_ratio" in batch  # TRL computed its own ratio ...
    direct, plain = direct_loss(args, kw["loss_type"]), direct_loss(args, kw["loss_type"], correction=False)
    nan_seen, kept_total = False, 0
    for rec in calls:
        cfg = rec["cfg"]
        for n in M.ROLLOUT_OPTIONS:
            assert getattr(cfg, n) == getattr(args, n), n
        assert rec["kw"]["vllm_is_ratio"] is None  # ... which the correction replaces
        mask = rec["mask"].bool()
        mu, had_nan = expected_mu(rec, engine)
        nan_seen |= had_nan
        got_mu = rec["kw"]["rollout_per_token_logps"]
        torch.testing.assert_close(got_mu[mask], mu[mask], rtol=0, atol=0)
        old = rec["kw"]["old_per_token_logps"]
        perm = rows_of(rec, batch)  # TRL shuffles the generation batch before splitting it
        torch.testing.assert_close(old, batch["old_per_token_logps"][perm])

        keep, _ = M.rollout_correction(cfg, old, got_mu, mask)
        kept_total += int((mask.float() * keep).sum())

        # RLVRLoss called directly with the same tensors and the options
        extra = {k: rec["kw"][k] for k in ("global_batch_size",) if k in rec["kw"]}
        num_items = rec["kw"].get("num_items_in_batch")
        args_ = (rec["hidden"], rec["weight"], rec["ids"], rec["mask"], rec["adv"])
        want = direct(
            *args_, old_per_token_logps=old, num_items_in_batch=num_items, rollout_per_token_logps=mu, **extra
        )
        torch.testing.assert_close(rec["loss"], want[0].detach(), rtol=1e-5, atol=1e-6)
        if kw["loss_type"] != "dapo":
            assert num_items is None
            without = plain(*args_, old_per_token_logps=old, **extra)[0]
            assert not torch.allclose(without, want[0])  # the correction changed the loss
    assert nan_seen  # the unscored token fell back to the behaviour log-prob
    assert 0 < kept_total < int(batch["completion_mask"].sum())  # the correction rejects some tokens, not all

    if kw["loss_type"] == "dapo":  # the normaliser: the kept tokens of the whole generation batch
        b_old, b_mu, b_mask = batch["old_per_token_logps"], batch["sampling_per_token_logps"], batch["completion_mask"]
        b_keep, _ = M.rollout_correction(
            calls[0]["cfg"], b_old, torch.where(torch.isnan(b_mu), b_old, b_mu), b_mask.bool()
        )
        b_kept = float((b_mask.float() * b_keep).sum())
        assert b_kept == kept_total
        for rec in calls:
            assert float(rec["kw"]["num_items_in_batch"]) == pytest.approx(b_kept)
            # TRL's count (every completion token) would give another loss
            full = float(b_mask.sum())
            old = rec["kw"]["old_per_token_logps"]
            args_ = (rec["hidden"], rec["weight"], rec["ids"], rec["mask"], rec["adv"])
            mu = rec["kw"]["rollout_per_token_logps"]
            other = direct(*args_, old_per_token_logps=old, num_items_in_batch=full, rollout_per_token_logps=mu)[0]
            if float(rec["loss"]) != 0.0:
                assert not torch.allclose(other, rec["loss"])


def test_without_the_options_trl_is_ratio_is_used(tmp_path, model_dir, monkeypatch):
    """No rollout correction: the RLVRLoss path (a neutral credit rule) takes TRL's importance_sampling_ratio and no
    rollout log-probs (trust_region='clip'), and num_items_in_batch counts every completion token."""
    trainer, calls, batches, _ = train(
        tmp_path, model_dir, monkeypatch, loss_type="dapo", credit="forking", credit_rho=1.0
    )
    assert not trainer.args.uses_rollout_correction and trainer.args.rollout_correction_kwargs() == {}
    assert len(calls) == 1
    rec, batch = calls[0], batches[0]
    assert not M.rollout_correction_active(rec["cfg"])
    torch.testing.assert_close(rec["kw"]["vllm_is_ratio"], batch["importance_sampling_ratio"][rows_of(rec, batch)])
    assert rec["kw"].get("rollout_per_token_logps") is None
    assert float(rec["kw"]["num_items_in_batch"]) == float(batch["completion_mask"].sum())


def test_defaults_run_trls_loss(tmp_path, model_dir, monkeypatch):
    """The defaults keep TRL's own loss (and its vLLM IS ratio): RLVRLoss is never called."""
    trainer, calls, _, _ = train(tmp_path, model_dir, monkeypatch)
    assert not trainer._rlvr_custom and not calls


def test_config_accepts_the_options():
    kw = dict(output_dir="/tmp/rlvr-rc-trl", use_cpu=True, bf16=False, report_to=[])
    c = RLVRGRPOConfig(**kw, use_vllm=True, **M.ROLLOUT_CORRECTIONS["geo_rs_token_mis"])
    assert c.uses_rollout_correction and c.uses_rlvr_loss
    assert c.rollout_correction_kwargs() == {n: getattr(c, n) for n in M.ROLLOUT_OPTIONS}
    with pytest.raises(ValueError, match="vllm_importance_sampling_correction"):
        RLVRGRPOConfig(**kw, use_vllm=True, vllm_importance_sampling_correction=False, rollout_is="token")
