"""Several-process TRL runs for tests/test_trl_users.py, launched once as

    accelerate launch --multi_gpu --num_processes 2 --main_process_port PORT tests/_trl_multiproc.py MODEL_DIR OUT_DIR

on CPU (CUDA_VISIBLE_DEVICES="": accelerate's MULTI_CPU with the gloo backend; ``accelerate launch --cpu`` starts a
single process). Every configuration runs in sequence in the same two processes (one start-up); each rank writes
``OUT_DIR/rank<r>.json`` with what the test asserts:

- ``parity``: TRL's GRPOTrainer and RLVRGRPOTrainer with the defaults, same seed and data (dapo, 2 accumulation
  steps): the logged rows and the largest difference of the final parameters;
- ``methods``: every credit rule and DPPO/CPPO (two of them also with bf16 autocast), 2 optimizer steps each: the
  logged rows, and for every RLVRLoss call the normaliser it received and the tokens it kept; for TP-Schedule and
  D^3S (d3s_scope="batch") also the kept set computed here (TP-Schedule's cut; the top ceil(rho n) tokens by |A| H
  over THIS process's micro-batch, H from explicit fp64 logits) and sum(A) over it, from which the test checks the
  on-policy loss -sum(A over kept) / (N / world);
- ``methods["delta"]["oracle"]``: for every generation batch, the largest difference between the coefficients that
  reach the loss and ``delta_coefficients`` over this process's generation batch (E local), and over both
  processes' (E global).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import warnings

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
warnings.simplefilter("ignore")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import rlvr_kernels.integrations.trl as integ  # noqa: E402
from _trl_common import BASE, dataset, delta_oracle_inputs, even_words, tiny_model, tokenizer  # noqa: E402
from rlvr_kernels.integrations.trl import RLVRGRPOConfig, RLVRGRPOTrainer  # noqa: E402

MODEL_DIR, OUT_DIR = sys.argv[1], pathlib.Path(sys.argv[2])
REAL_LOSS = integ.rlvr_loss
COMMON = dict(gradient_accumulation_steps=2, schedule_end_frac=1.0)
METHODS = {
    "tp_schedule": dict(credit="tp_schedule"),
    "forking": dict(credit="forking", schedule=True),
    "entropy_adv": dict(credit="entropy_adv", schedule=True),
    "d3s": dict(credit="d3s", d3s_scope="batch", credit_rho=0.5),
    "delta": dict(credit="delta"),
    "dppo": dict(trust_region="dppo", num_iterations=2),
    "cppo": dict(trust_region="cppo", num_iterations=2),
    # TRL's default precision under DDP: bf16 autocast, accelerate's fp32 output conversion, DDP's output handling
    "forking_bf16": dict(credit="forking", schedule=True, bf16=True),
    "cppo_bf16": dict(trust_region="cppo", num_iterations=2, bf16=True),
}


def rows(trainer):
    keep = (
        "loss",
        "grad_norm",
        "entropy",
        "rlvr/active_fraction",
        "rlvr/schedule_value",
        "rlvr/trust_region_masked_fraction",
        "rlvr/cppo_delta_b_mean",
        "rlvr/delta_coef_std",
    )
    return [{k: r[k] for k in keep if k in r} for r in trainer.state.log_history if "loss" in r]


def train(trainer_cls, config_cls, name, **kw):
    args = config_cls(output_dir=str(OUT_DIR / f"run-{name}"), **{**BASE, **kw})
    model = tiny_model(MODEL_DIR)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trainer_cls(
        model=model, reward_funcs=even_words, args=args, train_dataset=dataset(), processing_class=tokenizer()
    )
    trainer.train()
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    moved = max(float((final[n] - init[n]).abs().max()) for n in init)
    checksum = float(sum(p.double().sum() for p in final.values()))
    return (
        trainer,
        final,
        dict(
            rows=rows(trainer),
            moved=moved,
            checksum=checksum,
            world=trainer.accelerator.num_processes,
            rank=trainer.accelerator.process_index,
            distributed_type=str(trainer.accelerator.distributed_type),
            backend=str(torch.distributed.get_backend()) if torch.distributed.is_initialized() else None,
        ),
    )


def explicit_entropy(hidden, weight, bias, temperature):
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    lp = torch.log_softmax(z / temperature, -1)
    return -(lp.exp() * lp).sum(-1)


def spy(records, temperature):
    real = REAL_LOSS

    def fn(cfg, hidden, weight, ids, mask, adv, **kw):
        from rlvr_kernels import d3s_token_mask
        from rlvr_kernels.credit import tp_schedule_mask

        loss, metrics = real(cfg, hidden, weight, ids, mask, adv, **kw)
        valid = mask.bool()
        step = kw["step"]
        A = adv.detach().float()
        A = A[:, None].expand(valid.shape) if A.dim() == 1 else A
        keep = None
        if cfg.credit == "tp_schedule":
            keep = tp_schedule_mask(valid, float(cfg.schedule(step)), backend="torch")
        elif cfg.credit == "d3s":
            H = explicit_entropy(hidden.detach(), weight.detach(), kw.get("bias"), temperature).float()
            keep = d3s_token_mask(A, H, valid, cfg.credit_rho, scope="batch", backend="torch")
        n = kw.get("num_items_in_batch")
        rec = dict(
            step=step,
            valid=int(valid.sum()),
            loss=float(loss.detach()),
            kept=float(metrics.named["active_fraction"]) * int(valid.sum()),
            num_items=None if n is None else float(n),
        )
        if keep is not None:
            keep = keep.bool() & valid
            rec.update(kept_ref=int(keep.sum()), sum_adv_kept=float((A * keep).sum()))
        records.append(rec)
        return loss, metrics

    return fn


class DeltaOracle(RLVRGRPOTrainer):
    """DelTA's coefficients of each generation batch recomputed here from the backbone's final hidden states and
    explicit log-probs (theta_old, right after scoring), over this process's batch and over both processes'."""

    def _generate_and_score_completions(self, inputs):
        from rlvr_kernels import delta_coefficients

        out = super()._generate_and_score_completions(inputs)
        a = self.args
        h, lp, mask = delta_oracle_inputs(self, out)
        adv = out["advantages"].float()
        kw = dict(
            iters=a.delta_coef_iters,
            lam_min=a.delta_coef_lam_min,
            lam_max=a.delta_coef_lam_max,
            exclude_zero_adv=a.delta_coef_exclude_zero_adv,
            backend="torch",
        )
        local = delta_coefficients(h, lp, adv, mask, **kw)
        acc = self.accelerator
        B, T = mask.shape
        h_all = acc.gather(acc.pad_across_processes(h.contiguous(), dim=1))
        lp_all = acc.gather(acc.pad_across_processes(lp.contiguous(), dim=1))
        m_all = acc.gather(acc.pad_across_processes(mask.contiguous(), dim=1))
        a_all = acc.gather(adv.contiguous())
        r = acc.process_index
        glob = delta_coefficients(h_all, lp_all, a_all, m_all, **kw)[r * B : (r + 1) * B, :T]
        got = out[integ.DELTA_KEY]
        self.oracle.append(
            dict(
                diff_local=float((got - local).abs().max()),
                diff_global=float((got - glob)[mask].abs().max()),
                mean_local=float(got[mask].mean()),
                tokens=int(mask.sum()),
            )
        )
        return out


def main():
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    result = {}
    base = dict(loss_type="dapo", gradient_accumulation_steps=2)
    _, stock, s = train(GRPOTrainer, GRPOConfig, "stock", **base)
    _, ours, o = train(RLVRGRPOTrainer, RLVRGRPOConfig, "ours", **base)
    result["parity"] = dict(stock=s, ours=o, param_diff=max(float((stock[n] - ours[n]).abs().max()) for n in stock))

    result["methods"] = {}
    for name, kw in METHODS.items():
        records = []
        integ.rlvr_loss = spy(records, RLVRGRPOConfig.temperature)  # the sampling temperature (TRL's default)
        cls = DeltaOracle if kw.get("credit") == "delta" else RLVRGRPOTrainer
        DeltaOracle.oracle = []
        trainer, _, info = train(cls, RLVRGRPOConfig, name, **{**COMMON, **kw})
        assert trainer.temperature == RLVRGRPOConfig.temperature
        info["mixed_precision"] = str(trainer.accelerator.mixed_precision)
        info["native_amp"] = bool(trainer.accelerator.native_amp)
        info["calls"] = records
        if cls is DeltaOracle:
            info["oracle"] = cls.oracle
        result["methods"][name] = info
    rank = int(os.environ.get("RANK", "0"))
    (OUT_DIR / f"rank{rank}.json").write_text(json.dumps(result, indent=1, allow_nan=True))


if __name__ == "__main__":
    main()
