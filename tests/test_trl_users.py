"""RLVRGRPOTrainer under the conditions TRL users train in (rlvr_kernels.integrations.trl, trl 1.16.0, CPU, offline).

- TRL's defaults: ``bf16=True`` (CPU bf16 autocast through accelerate, whose fp32 output conversion rebuilds the model
  forward's returned containers) for every credit rule and trust region, and bf16 weights;
- a rollout engine's log-probs (TRL's ``sampling_per_token_logps``, from vLLM or a ``rollout_func``) are CPPO's and
  DPPO's anchor mu; without them the anchor is the policy that generated, said once in the log;
- several processes (``accelerate launch``, gloo): parity with TRL's GRPOTrainer for the defaults, every method
  trains, and the cross-rank statistics (token-count normaliser, D^3S batch scope, DelTA's estimation set) are the
  documented ones.

The tiny models train single-threaded (``torch.set_num_threads(1)``): on a shared 2-core machine that is several times
faster than two intra-op threads for 32-wide layers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import socket
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("trl")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import rlvr_kernels.integrations.trl as integ  # noqa: E402
from _trl_common import BASE, dataset, even_words, save_tiny_model, tiny_model, tokenizer  # noqa: E402
from rlvr_kernels.integrations.trl import RLVRGRPOConfig, RLVRGRPOTrainer  # noqa: E402

TESTS = pathlib.Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2-users"))


def spy_loss(monkeypatch):
    """Record every RLVRLoss call of the integration: its inputs (detached copies) and its result."""
    calls = []
    real = integ.rlvr_loss

    def spy(cfg, hidden, weight, ids, mask, adv, **kw):
        rec = dict(
            cfg=cfg,
            autocast=torch.is_autocast_enabled(hidden.device.type),
            hidden=hidden.detach().clone(),
            weight=weight.detach().clone(),
            bias=None if kw.get("bias") is None else kw["bias"].detach().clone(),
            ids=ids.clone(),
            mask=mask.clone(),
            adv=adv.detach().clone(),
            kw={k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()},
        )
        loss, metrics = real(cfg, hidden, weight, ids, mask, adv, **kw)
        rec.update(loss=float(loss.detach()), named={k: float(v) for k, v in metrics.named.items()})
        calls.append(rec)
        return loss, metrics

    monkeypatch.setattr(integ, "rlvr_loss", spy)
    return calls


def users_args(tmp_path, config_cls=RLVRGRPOConfig, **kw):
    """BASE with TRL's own bf16 default (not set here: GRPOConfig makes it True) unless ``kw`` sets it."""
    base = {k: v for k, v in BASE.items() if k != "bf16"}
    return config_cls(output_dir=str(tmp_path / config_cls.__name__), **{**base, **kw})


def run(
    tmp_path, model_dir, *, trainer_cls=RLVRGRPOTrainer, config_cls=RLVRGRPOConfig, dtype=None, trainer_kw=None, **kw
):
    args = users_args(tmp_path, config_cls, **kw)
    model = tiny_model(model_dir, dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trainer_cls(
        model=model,
        reward_funcs=even_words,
        args=args,
        train_dataset=dataset(),
        processing_class=tokenizer(),
        **(trainer_kw or {}),
    )
    trainer.train()
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == args.max_steps
    return trainer, logs, before


def assert_trained(trainer, logs, before, dtype=torch.float32):
    for row in logs:
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]), row
        assert math.isfinite(row["entropy"]), row
    after = dict(trainer.model.named_parameters())
    moved = 0.0
    for n, p0 in before.items():
        p = after[n].detach()
        assert p.dtype == dtype, (n, p.dtype)
        assert bool(torch.isfinite(p).all()), n
        moved = max(moved, float((p.float() - p0.float()).abs().max()))
    assert moved > 0.0  # the optimizer steps changed the parameters


def assert_rlvr_metrics(logs, kw):
    credit, tr = kw.get("credit", "none"), kw.get("trust_region", "clip")
    for row in logs:
        assert 0.0 < row["rlvr/active_fraction"] <= 1.0, row
        if tr == "clip":  # TRL's clip metrics (the dppo/cppo objectives have none)
            for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
                assert 0.0 <= row[k] <= 1.0, (k, row)
        if tr in ("dppo", "cppo"):
            assert 0.0 <= row["rlvr/trust_region_masked_fraction"] <= 1.0, row
        if tr == "cppo":
            assert math.isfinite(row["rlvr/cppo_delta_b_mean"]), row
        if credit == "delta":
            assert row["rlvr/delta_coef_std"] >= 0.0, row
    scheduled = credit == "tp_schedule" or kw.get("schedule") is True
    if scheduled:  # schedule_end_frac=1.0 over 2 steps: q(1) = 0.495, q(2) = 0
        assert [row["rlvr/schedule_value"] for row in logs] == pytest.approx([0.495, 0.0])
    if credit in ("tp_schedule", "forking", "d3s"):
        assert logs[0]["rlvr/active_fraction"] < 1.0


# ------------------------------------------------------------------------------------------------------------------
# bf16: TRL's default precision (CPU autocast) and bf16 weights


BF16_METHODS = {
    "tp_schedule": dict(credit="tp_schedule"),
    "forking": dict(credit="forking", schedule=True),
    "entropy_adv": dict(credit="entropy_adv", schedule=True),
    "d3s": dict(credit="d3s", schedule=True),
    "delta": dict(credit="delta"),
    "dppo": dict(trust_region="dppo", num_iterations=2),
    "cppo": dict(trust_region="cppo", num_iterations=2),
}


@pytest.mark.parametrize("name", list(BF16_METHODS))
def test_bf16_autocast_trains(tmp_path, model_dir, monkeypatch, name):
    """TRL's default bf16=True (not set by the test): on CPU accelerate runs the forward under bf16 autocast and
    converts its outputs to fp32, rebuilding returned containers. Every method trains, logs its metrics, and the loss
    ran with autocast off on bf16 hidden states (the dtype the lm_head would have used)."""
    kw = dict(BF16_METHODS[name], schedule_end_frac=1.0)
    calls = spy_loss(monkeypatch)
    trainer, logs, before = run(tmp_path, model_dir, **kw)
    assert trainer.args.bf16 is True and trainer.accelerator.mixed_precision == "bf16"
    assert trainer.accelerator.native_amp  # CPU bf16 autocast is on
    assert_trained(trainer, logs, before)
    assert_rlvr_metrics(logs, kw)
    assert calls
    for c in calls:
        assert c["hidden"].dtype == torch.bfloat16 and c["weight"].dtype == torch.bfloat16
        assert not c["autocast"]


BF16_WEIGHTS = {
    "defaults": dict(),
    "forking": dict(credit="forking", schedule=True),
    "d3s": dict(credit="d3s", schedule=True),  # the composable path
    "delta": dict(credit="delta"),
    "cppo": dict(trust_region="cppo", num_iterations=2),
}


@pytest.mark.parametrize("name", list(BF16_WEIGHTS))
def test_bf16_weights_train(tmp_path, model_dir, monkeypatch, name):
    """A model loaded in bfloat16 (and TRL's default bf16=True): parameters stay bf16 and change, metrics are logged."""
    kw = dict(BF16_WEIGHTS[name], schedule_end_frac=1.0)
    calls = spy_loss(monkeypatch)
    trainer, logs, before = run(tmp_path, model_dir, dtype=torch.bfloat16, **kw)
    assert_trained(trainer, logs, before, dtype=torch.bfloat16)
    if name == "defaults":
        assert not calls and all("rlvr/active_fraction" not in row for row in logs)
    else:
        assert_rlvr_metrics(logs, kw)
        assert calls and all(c["hidden"].dtype == torch.bfloat16 for c in calls)


def test_bf16_rlvr_loss_path_matches_trl(tmp_path, model_dir):
    """Under TRL's bf16 autocast the RLVRLoss path with neutral settings (forking keeping every token, dapo) trains
    exactly like the default path (TRL's _compute_loss on our log-probs), and its first step matches stock TRL's
    GRPOTrainer (its chunked bf16 LM head) to bf16 tolerance; later steps sample different completions."""
    kw = dict(loss_type="dapo", gradient_accumulation_steps=2)
    _, ref, _ = run(tmp_path, model_dir, trainer_cls=GRPOTrainer, config_cls=GRPOConfig, **kw)
    _, default, _ = run(tmp_path, model_dir, **kw)
    _, neutral, _ = run(tmp_path, model_dir, credit="forking", credit_rho=1.0, **kw)
    for d, n in zip(default, neutral):
        for k in ("loss", "grad_norm", "entropy"):
            assert n[k] == pytest.approx(d[k], rel=1e-5, abs=1e-7), k
    assert neutral[0]["loss"] == pytest.approx(ref[0]["loss"], abs=1e-6)
    assert neutral[0]["grad_norm"] == pytest.approx(ref[0]["grad_norm"], rel=5e-3)
    assert neutral[0]["entropy"] == pytest.approx(ref[0]["entropy"], rel=1e-3)
    assert ref[0]["grad_norm"] > 1e-3


# ------------------------------------------------------------------------------------------------------------------
# DPPO / CPPO anchor: the rollout engine's log-probs


class Rollout:
    """A rollout engine (TRL's ``rollout_func``, the path whose output TRL handles like vLLM's): one completion per
    prompt it is given, random words of random length (some end with EOS), and the engine's own per-token log-probs:
    the policy's at the sampling temperature times a fixed random factor in probability (another engine's numerics,
    stale weights), with one token unscored (vLLM's None, which TRL turns into NaN)."""

    def __init__(self, seed=0, noise=1.5):
        self.g = torch.Generator().manual_seed(seed)
        self.noise = noise
        self.logps = {}  # completion ids -> the engine's log-probs (NaN where unscored)
        self.calls = 0

    def __call__(self, prompts, trainer):
        tok = trainer.processing_class
        prompt_ids, completion_ids, logprobs = [], [], []
        T = trainer.max_completion_length
        for p in prompts:
            pid = tok(p, add_special_tokens=False)["input_ids"]
            n = int(torch.randint(2, T + 1, (1,), generator=self.g))
            cid = (torch.randint(3, len(tok), (n,), generator=self.g)).tolist()
            if n < T and bool(torch.rand((), generator=self.g) < 0.5):
                cid[-1] = tok.eos_token_id
            ids = torch.tensor([pid + cid])
            with torch.no_grad():
                logits = trainer.model(input_ids=ids).logits[0, len(pid) - 1 : -1].float() / trainer.temperature
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(cid)[:, None])[:, 0]
            mu = lp + self.noise * torch.randn(lp.shape, generator=self.g)
            mu = torch.minimum(mu, torch.zeros_like(mu) - 1e-4)  # a probability below 1
            out = mu.tolist()
            if self.calls == 0 and not logprobs:
                out[1] = None  # unscored by the engine
            self.logps[tuple(cid)] = torch.tensor([float("nan") if x is None else x for x in out])
            prompt_ids.append(pid)
            completion_ids.append(cid)
            logprobs.append(out)
        self.calls += 1
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}


def explicit_logps(rec, temperature):
    """Per-token log-probs of the recorded ids from explicit fp64 logits of the recorded hidden states and head."""
    z = rec["hidden"].double() @ rec["weight"].double().T
    if rec["bias"] is not None:
        z = z + rec["bias"].double()
    lp = torch.log_softmax(z / temperature, -1)
    ids = torch.where(rec["mask"].bool(), rec["ids"], torch.zeros_like(rec["ids"]))
    return lp.gather(-1, ids[..., None].long())[..., 0].float()


def expected_mu(rec, rollout):
    """The anchor the loss must use: the engine's log-probs of each row, the behaviour log-probs where unscored."""
    mask = rec["mask"].bool()
    old = rec["kw"]["old_per_token_logps"]
    mu = torch.zeros_like(old)
    for i in range(mask.size(0)):
        row = rollout.logps[tuple(rec["ids"][i][mask[i]].tolist())]
        mu[i, : row.numel()] = row
    return torch.where(torch.isnan(mu), old, mu), bool(torch.isnan(mu[mask]).any())


def reference_masked(tr, args, logp, mu, adv, mask):
    """Tokens of the loss mask that the trust region drops, from the trainer's arguments (not the loss config)."""
    from rlvr_kernels import cppo_mask

    adv = adv[:, None].expand(mask.shape) if adv.dim() == 1 else adv
    if tr == "cppo":
        keep = cppo_mask(
            logp,
            mu,
            adv,
            mask,
            delta=args.trust_region_delta,
            w_min=args.cppo_w_min,
            delta_b=args.cppo_delta_b,
            budget=args.cppo_budget,
            quantile=args.cppo_quantile,
            max_mult=args.cppo_max_mult,
            horizon=args.cppo_horizon,
            backend="torch",
        ).mask
    else:  # DPPO Binary-TV: a move toward mu is kept, else |pi(a) - mu(a)| within trust_region_delta
        diff = logp.exp() - mu.exp()
        keep = torch.where(adv > 0, diff <= args.trust_region_delta, diff >= -args.trust_region_delta)
    return int((mask & ~keep.bool()).sum())


@pytest.mark.parametrize("tr", ["cppo", "dppo"])
def test_rollout_logprobs_anchor_trust_region(tmp_path, model_dir, monkeypatch, caplog, tr):
    """With a rollout engine's log-probs (TRL's sampling_per_token_logps) DPPO/CPPO measure the divergence against
    them: the mask and the loss equal cppo_mask / the DPPO rule / RLVRLoss with the engine's log-probs as mu (an
    unscored token falls back to the behaviour log-prob), and differ from the anchor-less result, which on-policy
    masks nothing."""
    from rlvr_kernels.loss import rlvr_loss

    caplog.set_level(logging.INFO, logger=integ.__name__)
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL 1.16
    calls = spy_loss(monkeypatch)
    rollout = Rollout()
    trainer, logs, _ = run(tmp_path, model_dir, bf16=False, trust_region=tr, trainer_kw=dict(rollout_func=rollout))
    args = trainer.args
    assert rollout.calls == 2 and len(calls) == 2
    masked_any = nan_seen = False
    for rec in calls:
        mask = rec["mask"].bool()
        mu, had_nan = expected_mu(rec, rollout)
        nan_seen |= had_nan
        got_mu = rec["kw"].get("rollout_per_token_logps")
        assert got_mu is not None
        torch.testing.assert_close(got_mu[mask], mu[mask], rtol=0, atol=0)
        logp = explicit_logps(rec, trainer.temperature)
        n_masked = reference_masked(tr, args, logp, mu, rec["adv"], mask)
        got_masked = rec["named"]["trust_region/masked_fraction"] * int(mask.sum())
        assert got_masked == pytest.approx(n_masked, abs=1e-3)
        masked_any |= n_masked > 0
        kw = {k: v for k, v in rec["kw"].items() if k != "rollout_per_token_logps"}
        anchored, m1 = rlvr_loss(
            rec["cfg"],
            rec["hidden"],
            rec["weight"],
            rec["ids"],
            rec["mask"],
            rec["adv"],
            rollout_per_token_logps=mu,
            **kw,
        )
        assert float(anchored) == pytest.approx(rec["loss"], rel=1e-5, abs=1e-7)
        with warnings.catch_warnings(record=True) as caught:  # CPPO says it: mu == pi on every token
            warnings.simplefilter("always")
            free, m0 = rlvr_loss(rec["cfg"], rec["hidden"], rec["weight"], rec["ids"], rec["mask"], rec["adv"], **kw)
        assert (tr == "cppo") == any(type(w.message).__name__ == "CPPOAnchorWarning" for w in caught)
        assert float(m0["trust_region/masked_fraction"]) == 0.0  # on-policy: pi == pi_old, every divergence 0
        if n_masked:
            assert abs(float(free) - rec["loss"]) > 1e-6
    assert masked_any and nan_seen
    assert all(0.0 <= row["rlvr/trust_region_masked_fraction"] <= 1.0 for row in logs)
    assert any(row["rlvr/trust_region_masked_fraction"] > 0.0 for row in logs)
    assert not [r for r in caplog.records if r.name == integ.__name__ and "anchor" in r.getMessage()]


def test_no_rollout_logprobs_anchor_is_logged_once(tmp_path, model_dir, monkeypatch, caplog):
    """Generation by the trained model (no rollout log-probs): the anchor is the policy that generated the batch
    (TRL's old_per_token_logps, computed by the trainer when TRL skips them); the trainer says so once, in the log,
    instead of CPPO's anchor warning at every call."""
    caplog.set_level(logging.INFO, logger=integ.__name__)
    calls = spy_loss(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _, _ = run(tmp_path, model_dir, bf16=False, trust_region="cppo", max_steps=3)
    records = [r for r in caplog.records if r.name == integ.__name__ and "anchor" in r.getMessage()]
    assert len(records) == 1 and "old_per_token_logps" in records[0].getMessage()
    assert not [w for w in caught if type(w.message).__name__ == "CPPOAnchorWarning"]
    assert len(calls) == 3
    for rec in calls:
        mask = rec["mask"].bool()
        assert rec["kw"].get("rollout_per_token_logps") is None
        # the behaviour log-probs are the generating policy's: on-policy they equal the current log-probs
        old = rec["kw"]["old_per_token_logps"]
        torch.testing.assert_close(old[mask], explicit_logps(rec, trainer.temperature)[mask], rtol=1e-4, atol=1e-4)
        assert rec["named"]["trust_region/masked_fraction"] == 0.0


# ------------------------------------------------------------------------------------------------------------------
# several processes: one `accelerate launch` of tests/_trl_multiproc.py runs every configuration in sequence


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def multiproc(tmp_path_factory):
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU (no CUDA device visible: accelerate's MULTI_CPU,
    gloo), the way a user runs TRL on several processes; returns each rank's JSON."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    root = tmp_path_factory.mktemp("trl-multiproc")
    model = save_tiny_model(root / "model")
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        HF_HOME=str(root / "hf"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TRL_EXPERIMENTAL_SILENCE="1",
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH")) if p)
    for attempt in range(3):  # a port taken between free_port() and the launch: try another
        out = root / f"out{attempt}"
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            str(TESTS / "_trl_multiproc.py"),
            model,
            str(out),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode == 0 or "address already in use" not in (proc.stdout + proc.stderr).lower():
            break
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_multiprocess_defaults_match_trl(multiproc):
    """credit='none', trust_region='clip' in 2 processes (dapo, 2 accumulation steps): the same losses, grad norms and
    entropies as TRL's GRPOTrainer run the same way, and the same final parameters (to the float noise Adam's
    normalisation gives tiny gradients: the single-process runs differ as much)."""
    for r, res in enumerate(multiproc):
        p = res["parity"]
        for run_ in (p["stock"], p["ours"]):
            assert run_["world"] == 2 and run_["rank"] == r
            assert run_["distributed_type"] == "DistributedType.MULTI_CPU" and run_["backend"] == "gloo"
        assert len(p["stock"]["rows"]) == len(p["ours"]["rows"]) == 2
        for s, o in zip(p["stock"]["rows"], p["ours"]["rows"]):
            assert o["loss"] == pytest.approx(s["loss"], rel=1e-5, abs=1e-7)
            assert o["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4)
            assert o["entropy"] == pytest.approx(s["entropy"], rel=1e-5)
        assert any(s["grad_norm"] > 1e-3 for s in p["stock"]["rows"])
        assert p["stock"]["moved"] > 1e-2
        assert p["param_diff"] <= 1e-4
    # both ranks log the same (all-reduced) numbers and hold the same parameters
    a, b = multiproc
    assert a["parity"]["ours"]["rows"] == b["parity"]["ours"]["rows"]
    assert a["parity"]["ours"]["checksum"] == b["parity"]["ours"]["checksum"]
    assert a["parity"]["param_diff"] == b["parity"]["param_diff"]


MULTI_METHODS = ("tp_schedule", "forking", "entropy_adv", "d3s", "delta", "dppo", "cppo", "forking_bf16", "cppo_bf16")


@pytest.mark.parametrize("name", MULTI_METHODS)
def test_multiprocess_methods_train(multiproc, name):
    a, b = (res["methods"][name] for res in multiproc)
    assert a["world"] == b["world"] == 2
    bf16 = name.endswith("_bf16")
    assert a["mixed_precision"] == ("bf16" if bf16 else "no") and a["native_amp"] == bf16
    for res in (a, b):
        assert len(res["rows"]) == 2 and res["calls"]
        for row in res["rows"]:
            assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) and math.isfinite(row["entropy"])
            assert 0.0 < row["rlvr/active_fraction"] <= 1.0
            if name in ("dppo", "cppo"):
                assert 0.0 <= row["rlvr/trust_region_masked_fraction"] <= 1.0
        assert res["moved"] > 0.0
        assert all(math.isfinite(c["loss"]) for c in res["calls"])
    assert a["checksum"] == b["checksum"]  # the replicas stayed in sync
    assert a["rows"] == b["rows"]


@pytest.mark.parametrize("name", ["tp_schedule", "d3s"])
def test_multiprocess_token_count_normaliser(multiproc, name):
    """dapo's num_items_in_batch counts the tokens the credit rule keeps over the generation batch of EVERY process
    (here 2 micro-batches x 2 processes per optimizer step), and the on-policy loss of each micro-batch is
    -sum(A over its kept tokens) / (num_items / world size), TRL's normalisation."""
    calls = [(r, c) for r, res in enumerate(multiproc) for c in res["methods"][name]["calls"]]
    steps = sorted({c["step"] for _, c in calls})
    assert steps == [1, 2]
    dropped = False
    for k in steps:
        at = [c for _, c in calls if c["step"] == k]
        assert len(at) == 4 and {r for r, c in calls if c["step"] == k} == {0, 1}
        n = sum(c["kept_ref"] for c in at)
        assert all(c["num_items"] == pytest.approx(n) for c in at)
        dropped |= n < sum(c["valid"] for c in at)
        for c in at:
            assert c["kept"] == pytest.approx(c["kept_ref"], abs=1e-4)
            assert c["loss"] == pytest.approx(-c["sum_adv_kept"] / (n / 2), rel=1e-5, abs=1e-6)
    assert dropped


def test_multiprocess_d3s_batch_scope_is_the_local_micro_batch(multiproc):
    """d3s_scope='batch' selects over the micro-batch on one process: each RLVRLoss call keeps ceil(rho n) of its own
    n loss tokens (not a share of a cross-process top-k), and the kept set is that micro-batch's top-rho by |A| H
    (the loss check of test_multiprocess_token_count_normaliser uses this set, entropies from explicit logits)."""
    for res in multiproc:
        for c in res["methods"]["d3s"]["calls"]:
            assert c["kept_ref"] == math.ceil(0.5 * c["valid"])
            assert c["kept"] == pytest.approx(c["kept_ref"], abs=1e-4)


def test_multiprocess_delta_estimation_set_is_the_process_batch(multiproc):
    """DelTA's E is the generation batch on this process (no all-reduce): the coefficients that reach the loss equal
    delta_coefficients over this process's tokens, and differ from those over both processes' tokens."""
    for res in multiproc:
        oracle = res["methods"]["delta"]["oracle"]
        assert len(oracle) == 2  # one generation batch per optimizer step (GA = steps_per_generation = 2)
        for o in oracle:
            assert o["diff_local"] <= 1e-5
            assert o["diff_global"] > 1e-3
            assert o["mean_local"] == pytest.approx(1.0, abs=1e-5)
