"""TRL integration: ``RLVRGRPOConfig`` and ``RLVRGRPOTrainer``, drop-ins for TRL's ``GRPOConfig`` / ``GRPOTrainer``.

For a TRL user the change is two names::

    from rlvr_kernels.integrations.trl import RLVRGRPOConfig as GRPOConfig, RLVRGRPOTrainer as GRPOTrainer

With the defaults (``credit="none"``, ``trust_region="clip"``) the trainer trains exactly like TRL's: the only
difference is that the per-token log-probs and entropies come from :func:`rlvr_kernels.fused_linear_logprobs` (last
hidden states x ``lm_head.weight``, never the ``[tokens x vocab]`` logits) instead of TRL's chunked LM head. Setting
``credit`` (TP-Schedule, forking tokens, entropy-shaped advantages, D^3S, DelTA) or ``trust_region`` (DPPO, CISPO, CPPO)
switches the loss to :class:`rlvr_kernels.RLVRLoss` on the same hidden states, with TRL's normalisation.

To keep TRL's own trainer (no subclass, any TRL trainer built on ``add_fused_lm_head``), one line swaps TRL's fused-head
kernel for this package's: ``use_rlvr_kernels_in_trl()`` makes ``trl.trainer.utils.add_fused_lm_head`` call
:class:`ChunkedLogProbFunction` (TRL's ``trl.kernels.ChunkedLogProbFunction`` call and outputs, softcap and logit scale
included, on the package's vocabulary pass; ``rlvr_kernels/integrations/_trl/chunked.py``).

How the forward is routed (TRL 1.16). TRL 1.16 no longer has ``compute_liger_loss`` / ``_get_last_hidden_state`` in
GRPO: ``GRPOTrainer.__init__`` patches the policy's ``forward`` (``trl.trainer.utils.add_fused_lm_head``) so that
``model(..., labels=..., fused_lm_head=True)`` runs the backbone and the LM head *inside the model's forward*, which
is what the Liger path's ``_ForwardRedirection`` achieved (the DDP/FSDP/DeepSpeed wrapper's forward runs, so its
pre-forward and gradient hooks fire), and gathers a ZeRO-3-partitioned ``lm_head`` with
``maybe_gather_lm_head_ctx``. We wrap that patched forward once more (policy and reference model):

- ``fused_lm_head=True``: the backbone's ``last_hidden_state[:, :-1]`` (the positions whose next-token label is not
  ``-100``, i.e. the completion tokens), ``lm_head.weight`` / ``bias`` gathered under TRL's
  ``maybe_gather_lm_head_ctx`` (and ``full_tensor()`` for FSDP2 DTensors), then ``fused_linear_logprobs``; the
  result is TRL's ``FusedCausalLMOutput`` so TRL's own ``_get_per_token_logps_and_entropies`` (3-tuple return,
  micro-batching, multimodal inputs), ``_compute_loss`` (every loss type, masks, IS corrections, entropy mask and
  bonus, metrics) and the old/ref log-prob passes keep working unchanged. Under ZeRO-3 the backward gathers the
  head again (``_RegatheredLinearLogprobs``), as TRL's own chunked head does.
- ``rlvr_head_fn=fn``: the same hidden states, sliced ``[:, :-1][:, -logits_to_keep:]``, and the gathered head are
  handed to ``fn(hidden, weight, bias)`` (the ``RLVRLoss`` call) inside the forward; ``RLVRLoss``'s fused path
  computes the gradients w.r.t. hidden states and head during that forward, so the head is read only while it is
  gathered.
- a tap (``_HeadState.tap``, set only during the trainer's DelTA passes): the ``fused_lm_head=True`` forward also
  hands its final hidden states (the ``lm_head`` input) to the tap, and skips the head when the pass needs no
  log-probs.

DelTA (``credit="delta"``, ``docs/methods/delta.md``). Once per generation batch, in ``_generate_and_score_completions``
after TRL has scored it (advantages known) and before any optimizer step on it, the trainer computes the detached
coefficients ``c~ [B, T]`` (:meth:`RLVRGRPOTrainer.rlvr_delta_coefficients`): E = every loss-mask token of the
generation batch on this process (no all-reduce, as the official per-DP-rank rollout batch); theta_old = the
policy at that moment, run exactly like TRL's ``old_per_token_logps`` pass (``_get_per_token_logps_and_entropies``
on ``self.model``, no_grad, gradient checkpointing off, ``per_device_*_batch_size`` rows at a time, multimodal
inputs sliced by TRL, the backbone under ZeRO-3's own hooks); ``h_t`` = the tapped final hidden states; ``p_t`` =
``exp`` of TRL's ``old_per_token_logps`` when TRL computed them, else of the log-probs of the first DelTA pass, both
at the rollout temperature (``temperature`` divided by the model's logit scale, the temperature TRL samples and
scores with). :class:`rlvr_kernels.DeltaEstimator` streams the phases over the micro-batches; the valid tokens'
``h`` are cached between phases when they fit ``delta_coef_cache_bytes`` (one forward), otherwise every phase re-runs
the backbone (``delta_coef_iters + 3`` forwards as the official code, the head only in the first); the last phase's raw
coefficients are normalised without a further pass. The coefficients
travel in the batch dict under ``"rlvr_delta_coefficients"`` (TRL's shuffle/split carry them to each micro-batch,
stale across ``num_iterations`` like the old log-probs) and reach ``RLVRLoss(credit="delta")`` as
``delta_coefficients``: the advantage becomes ``A c~`` in the unchanged objective of ``loss_type`` / ``trust_region``.
The DelTA pass's log-probs also serve as the DPPO/CPPO behaviour log-probs when TRL skipped them.

DPPO / CPPO anchor. The mask measures the divergence against mu, the rollout engine's policy: TRL's
``sampling_per_token_logps`` (vLLM's log-probs of the sampled tokens, or a ``rollout_func``'s), passed to ``RLVRLoss``
as ``rollout_per_token_logps``; a token the engine did not score (NaN) takes the behaviour log-prob. The ratio
``rho`` stays against the behaviour log-probs (``old_per_token_logps``). When the trained model generated the batch
there are no rollout log-probs and mu is the generating policy, the behaviour log-probs: on a batch's first update
pi equals mu and nothing is masked; the trainer says so once (a ``logging`` warning on the main process) instead of
CPPO's anchor warning at every step.

Rollout correction (``rollout_is`` / ``rollout_rs``, ``docs/methods/rollout-corrections.md``; needs ``use_vllm=True``
and ``vllm_importance_sampling_correction=True``, so that TRL keeps ``old_per_token_logps`` and
``sampling_per_token_logps``). The loss runs in ``RLVRLoss`` with the correction's options and the same
``rollout_per_token_logps`` (NaN -> behaviour log-prob); it replaces TRL's ``importance_sampling_ratio``
(``vllm_importance_sampling_mode`` is then not applied). The rejected tokens leave the loss mask and the token-count
normaliser: ``num_items_in_batch`` is recounted over the kept tokens of the generation batch.

Precision. Under ``bf16=True`` / ``fp16=True`` accelerate runs the model's forward under autocast and converts its
outputs to fp32, rebuilding the returned containers (``type(x)(iterable)``). The head function runs with autocast
off on the hidden states and head cast to the autocast dtype (what ``lm_head`` would have computed in) and returns
``(loss, dict of 0-dim metric tensors)``, which that conversion and DDP keep intact.

Why ``RLVRLoss`` for the new methods (rather than masking before TRL's math): the credit masks that depend on the
current policy (forking tokens, D^3S) are only known after the vocabulary pass, TRL computes its loss mask and
normaliser before it, and TRL has no DPPO/CPPO objective; the package's composition rule
(``docs/methods/objectives.md``: every normaliser that counts tokens counts the active ones) also needs the normaliser
to follow the credit mask. ``RLVRLoss`` applies credit mask -> advantage shaping -> trust region -> aggregation in one
place and is parity-tested against TRL's loss types. The TRL normalisation is kept: per-micro-batch loss types (grpo,
bnpo, dr_grpo, sapo, luspo) are divided by the gradient-accumulation steps, and the token-count ones (dapo, cispo,
vespo, and DPPO/CPPO on a dapo config) divide by TRL's ``num_items_in_batch`` rescaled to one accumulation window,
counting the tokens the credit rule keeps over the whole generation batch on every process.

The schedule is evaluated at the 1-based optimizer step ``self.state.global_step + 1`` with
``total_steps = self.state.max_steps`` (the planned total). Metrics are logged as TRL does, under ``rlvr/...``:
``schedule_value``, ``active_fraction`` (tokens the credit rule keeps / completion tokens),
``trust_region_masked_fraction`` (DPPO/CPPO), ``cppo_delta_b_mean`` (CPPO's dynamic budget), ``delta_coef_std``
(DelTA: the std of ``c~`` over the micro-batch's loss tokens). Across processes: D^3S with ``d3s_scope="batch"``
selects over the micro-batch of one process (not all-reduced), DelTA's E is the generation batch of one process, and
the token-count normaliser counts every process's kept tokens.

Not supported (clear errors): MoE router aux loss, models with final-logit soft-capping; and, on the RLVRLoss path
only, TRL's ``top_entropy_quantile`` (use ``credit="forking"``),
``off_policy_mask_threshold``, ``use_adaptive_entropy``, and ZeRO-3 with ``d3s_scope="batch"``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Optional

import torch
from trl import GRPOConfig, GRPOTrainer

from rlvr_kernels import methods as M
from rlvr_kernels.delta import DeltaEstimator
from rlvr_kernels.integrations._trl.chunked import (
    OPTIONAL_OUTPUTS,
    ChunkedLogProbFunction,
    rlvr_kernels_in_trl,
    use_rlvr_kernels_in_trl,
)
from rlvr_kernels.integrations._trl.config import CREDITS, TRUST_REGIONS, RLVRGRPOConfig
from rlvr_kernels.integrations._trl.head import install_head, linear_logprobs, logit_scale, named_metrics, zero3_enabled
from rlvr_kernels.integrations._trl.rollouts import apply_d3s_rollouts, check_d3s_rollouts_k
from rlvr_kernels.loss import LossConfig, rlvr_loss
from rlvr_kernels.schedule import TemporalSchedule

__all__ = [
    "RLVRGRPOConfig",
    "RLVRGRPOTrainer",
    "CREDITS",
    "TRUST_REGIONS",
    "DELTA_KEY",
    "ROLLOUT_KEY",
    "linear_logprobs",
    "ChunkedLogProbFunction",
    "OPTIONAL_OUTPUTS",
    "use_rlvr_kernels_in_trl",
    "rlvr_kernels_in_trl",
]

logger = logging.getLogger(__name__)

# TRL loss types normalised by the token count of the generation batch (the others are per-micro-batch means).
_TOKEN_COUNT_TYPES = ("dapo", "cispo", "vespo")
# The batch-dict key of the DelTA coefficients [B, T]: TRL's shuffle / split carry it to every micro-batch.
DELTA_KEY = "rlvr_delta_coefficients"
# TRL's batch-dict key of the rollout engine's per-token log-probs (vLLM, or a rollout_func), NaN where unscored.
ROLLOUT_KEY = "sampling_per_token_logps"
_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


# ----------------------------------------------------------------------------------------------------------------
# the trainer


class RLVRGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose log-probs come from ``rlvr_kernels`` and whose loss can apply the package's credit rules
    and trust regions. Takes the same arguments as ``GRPOTrainer``; ``args`` may be an :class:`RLVRGRPOConfig` (a
    plain ``GRPOConfig`` means the defaults: TRL's loss with our log-probs).

    - ``credit="none"``, ``trust_region="clip"``: only the LM head changes (see the module docstring); TRL's
      ``_get_per_token_logps_and_entropies`` keeps its 3-tuple and ``_compute_loss`` runs unchanged, so every TRL
      loss type, mask, IS correction, entropy mask/bonus and metric behaves as in TRL, to float tolerance.
    - otherwise ``compute_loss`` runs :func:`rlvr_kernels.loss.rlvr_loss` on the hidden states inside the model's
      forward, with the schedule at ``state.global_step + 1`` of ``state.max_steps``, and logs ``rlvr/...`` metrics;
      so does a rollout correction (``rollout_is`` / ``rollout_rs``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        if not isinstance(a, RLVRGRPOConfig):
            defaults = {
                f: RLVRGRPOConfig.__dataclass_fields__[f].default
                for f in RLVRGRPOConfig.__dataclass_fields__
                if f not in GRPOConfig.__dataclass_fields__
            }
            for name, value in defaults.items():
                if not hasattr(a, name):
                    setattr(a, name, value)
        self._rlvr_custom = a.credit != "none" or a.trust_region != "clip" or _uses_rollout_correction(a)
        if self.aux_loss_enabled:
            raise NotImplementedError(
                "RLVRGRPOTrainer does not add the MoE router aux loss yet; set "
                "router_aux_loss_coef=0.0 or use TRL's GRPOTrainer"
            )
        if self._rlvr_custom and M.credit(a.credit).selects_over_batch(a) and zero3_enabled():
            raise ValueError(
                "credit='d3s' with d3s_scope='batch' runs RLVRLoss's composable path, whose backward "
                "reads the lm_head again; under ZeRO-3 use d3s_scope='sequence'"
            )
        from accelerate.utils import is_peft_model

        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        common = dict(temperature=self.temperature, cast_fp32=bool(a.cast_lm_head_to_fp32), backend=a.rlvr_backend)
        self._rlvr_head = install_head(policy, want_entropy=True, **common)
        self._rlvr_temperature = self.temperature / logit_scale(policy.config.get_text_config())
        if self.ref_model is not None:
            install_head(self.accelerator.unwrap_model(self.ref_model), want_entropy=False, **common)
        self._rlvr_schedule_cache: dict[int, TemporalSchedule] = {}
        self._rlvr_anchor_logged = False
        a.d3s_rollouts_k = check_d3s_rollouts_k(a.d3s_rollouts_k)  # D^3S sample level (_trl/rollouts.py)

    # -- schedule -------------------------------------------------------------------------------------------------

    def rlvr_step(self) -> int:
        """The 1-based optimizer step the current update will be (``state.global_step + 1``)."""
        return int(self.state.global_step) + 1

    def rlvr_schedule(self) -> Optional[TemporalSchedule]:
        """The schedule over the planned run (``state.max_steps``), or None when the configuration uses none."""
        a = self.args
        if not M.credit(a.credit).uses_schedule(a.schedule):
            return None
        total = int(self.state.max_steps or 0) or int(a.max_steps if a.max_steps and a.max_steps > 0 else 0)
        if total < 1:
            raise ValueError(
                "the credit schedule needs the planned number of optimizer steps (state.max_steps), "
                "which is set when training starts"
            )
        if total not in self._rlvr_schedule_cache:
            try:
                self._rlvr_schedule_cache[total] = M.make_schedule(a, total)
            except ValueError as e:
                raise ValueError(f"the schedule does not fit the planned {total} optimizer steps: {e}") from None
        return self._rlvr_schedule_cache[total]

    # -- per generation batch: DelTA coefficients, and the behaviour log-probs DPPO / CPPO need ------------------

    def _generate_and_score_completions(self, inputs):
        out = apply_d3s_rollouts(self, super()._generate_and_score_completions(inputs))  # before DelTA
        if self.args.trust_region != "clip" and out.get(ROLLOUT_KEY) is None:
            self._rlvr_log_anchor()
        need_old = self.args.trust_region != "clip" and out.get("old_per_token_logps") is None
        if self.args.credit == "delta":
            # after the advantages are known and before any optimizer step on this batch: theta_old
            out[DELTA_KEY], logps = self.rlvr_delta_coefficients(out)
            if need_old and logps is not None:  # the DelTA pass computed them: the same forward TRL would run
                out["old_per_token_logps"] = logps
                need_old = False
        if need_old:
            # TRL skips the behaviour log-probs when the batch is used on-policy once; the DPPO/CPPO masks are
            # anchored to them, so compute them here (one no-grad forward, as TRL does when num_iterations > 1).
            ids, am, bs, extra = self._rlvr_forward_args(out)
            with torch.no_grad():
                out["old_per_token_logps"], _, _ = self._get_per_token_logps_and_entropies(
                    self.model, ids, am, out["completion_ids"].size(1), batch_size=bs, **extra
                )
        return out

    def _rlvr_log_anchor(self) -> None:
        """Say once per trainer (main process) that DPPO/CPPO have no rollout log-probs to anchor to."""
        if self._rlvr_anchor_logged:
            return
        self._rlvr_anchor_logged = True
        if not self.accelerator.is_main_process:
            return
        logger.warning(
            "RLVRGRPOTrainer: trust_region=%r without rollout log-probs (TRL's %s, from vLLM or a rollout_func): the "
            "anchor mu is the policy that generated the batch, TRL's old_per_token_logps (computed by the trainer "
            "when TRL skips them). On a batch's first update pi equals mu, so the trust region masks tokens only on "
            "later updates of the same batch (num_iterations > 1 or steps_per_generation > "
            "gradient_accumulation_steps).",
            self.args.trust_region,
            ROLLOUT_KEY,
        )

    def _rlvr_forward_args(self, out: dict):
        """``(input_ids, attention_mask, batch_size, multimodal kwargs)`` of TRL's no-grad passes over ``out``."""
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        am = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        mode = "train" if self.model.training else "eval"
        bs = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        extra = {k: out[k] for k in _MULTIMODAL_KEYS if k in out}
        return ids, am, bs, extra

    def rlvr_delta_coefficients(self, out: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """DelTA coefficients ``c~ [B, T]`` (fp32, detached, 0 off the loss mask, mean 1 over it) of the generation
        batch ``out`` on this process, plus the behaviour log-probs when this pass had to compute them (else None).

        The estimation set E is every loss-mask token of ``out`` (completion mask x tool mask): the whole generation
        batch of this process, no all-reduce (the official per-DP-rank rollout batch). theta_old is the model as it
        is now (called after generation and scoring, before any optimizer step on the batch), run exactly like TRL's
        ``old_per_token_logps`` pass (``_get_per_token_logps_and_entropies`` on ``self.model`` under no_grad,
        gradient checkpointing off, micro-batches of ``per_device_{train,eval}_batch_size`` rows). ``h_t`` is the
        backbone's final hidden state (after the final norm, the ``lm_head`` input) that the installed head
        wrapper taps; ``p_t = exp(old_logp_t)`` uses TRL's ``old_per_token_logps`` when TRL computed them, else the
        log-probs of the first tap pass, both at the rollout temperature (``temperature`` / the model's logit
        scale). The streaming :class:`~rlvr_kernels.delta.DeltaEstimator` accumulates every phase over the
        micro-batches; the first pass also caches the valid tokens' ``h`` when they fit ``delta_coef_cache_bytes``, and
        then the other phases read the cache (one forward in all); otherwise each phase re-runs the backbone
        (``K + 3`` no-grad forwards for ``delta_coef_iters = K``, as the official code, the head only in the first, when
        the log-probs are needed). The last phase's raw coefficients are normalised with
        :meth:`~rlvr_kernels.delta.DeltaEstimator.normalise` (no further pass).
        """
        from trl.models.utils import disable_gradient_checkpointing

        a = self.args
        mask = self._loss_mask(out).bool()
        if a.delta_coef_lam_min == a.delta_coef_lam_max:  # c = lam_min everywhere: c~ = 1, plain token weighting
            return mask.to(torch.float32), None
        adv = out["advantages"].detach().float()
        T = out["completion_ids"].size(1)
        ids, am, bs, extra = self._rlvr_forward_args(out)
        est = DeltaEstimator(
            iters=a.delta_coef_iters,
            lam_min=a.delta_coef_lam_min,
            lam_max=a.delta_coef_lam_max,
            exclude_zero_adv=a.delta_coef_exclude_zero_adv,
            backend=a.rlvr_backend,
        )
        coef = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        st: dict[str, Any] = dict(row=0, old=out.get("old_per_token_logps"), cache=[], nbytes=0)
        if a.delta_coef_cache_bytes <= 0:
            st["cache"] = None

        def tap(hidden, logp):  # one micro-batch of one pass, rows in order
            r0 = st["row"]
            r1 = st["row"] = r0 + hidden.size(0)
            h = hidden[:, -T:]
            dev = h.device
            m = mask[r0:r1].to(dev)
            lp = (st["old"][r0:r1] if logp is None else logp[:, -T:]).detach().float().to(dev)
            av = adv[r0:r1].to(dev)
            raw = est.accumulate(h, lp, av, m)
            if raw is not None:  # the last ("normaliser") phase: raw coefficients, normalised once it is closed
                coef[r0:r1] = raw.to(coef.device)
            if st["cache"] is not None:
                hv = h[m]
                st["nbytes"] += hv.numel() * hv.element_size()
                if st["nbytes"] > a.delta_coef_cache_bytes:
                    st["cache"] = None  # over budget: stream the remaining phases
                elif hv.size(0) > 0:
                    at = av if av.dim() == 2 else av[:, None].expand(m.shape)
                    st["cache"].append((r0, r1, hv[None], lp[m][None], at[m][None]))

        def run_pass():
            st["row"] = 0
            self._rlvr_head.tap = tap
            try:
                with torch.no_grad(), disable_gradient_checkpointing(self.model, a.gradient_checkpointing_kwargs):
                    logps, _, _ = self._get_per_token_logps_and_entropies(
                        self.model, ids, am, T, batch_size=bs, **extra
                    )
            finally:
                self._rlvr_head.tap = None
            if st["row"] != mask.size(0):
                raise RuntimeError(f"DelTA pass: the head saw {st['row']} rows of a {mask.size(0)}-row batch")
            return logps

        computed = None
        tap.want_logp = st["old"] is None
        first = run_pass()  # phase "centroids" (and the cache)
        if tap.want_logp:
            computed = st["old"] = first.detach().float()
            tap.want_logp = False
        est.finish_phase()

        def cached_sweep(fn):
            for r0, r1, hv, lpv, atv in st["cache"]:
                fn(r0, r1, hv, lpv, atv, torch.ones(lpv.shape, dtype=torch.bool, device=lpv.device))

        def accumulate_cached(r0, r1, hv, lpv, atv, one):
            raw = est.accumulate(hv, lpv, atv, one)
            if raw is not None:
                view = coef[r0:r1]
                view[mask[r0:r1]] = raw[0].to(coef.device)

        while not est.done:
            if st["cache"] is not None:
                cached_sweep(accumulate_cached)
            else:
                run_pass()
            est.finish_phase()
        return est.normalise(coef, adv.to(coef.device), mask), computed

    # -- the loss -------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._rlvr_custom:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if return_outputs:
            raise ValueError("The GRPOTrainer does not support returning outputs")
        return self._compute_rlvr_loss(model, inputs)

    def _loss_mask(self, batch: dict) -> torch.Tensor:
        m = batch["completion_mask"]
        return m if "tool_mask" not in batch else m * batch["tool_mask"]

    def _planned_active(self, batch: dict, cfg: LossConfig, q: Optional[float]) -> torch.Tensor:
        """Tokens of ``batch`` the credit rule and the rollout correction will keep (fp32 0-dim); known before the
        vocabulary pass."""
        mask = self._loss_mask(batch).bool()
        keep = None
        if M.rollout_correction_active(cfg):
            old, mu = batch.get("old_per_token_logps"), _rollout_logps(batch)
            if old is not None and mu is not None:  # else the loss raises its own error
                keep, _ = M.rollout_correction(cfg, old, mu, mask)
        return M.credit(cfg.credit).planned_total(cfg, mask, q, keep=keep)

    def _token_count_normaliser(self, inputs: dict, cfg: LossConfig, q: Optional[float], mode: str) -> torch.Tensor:
        """TRL's ``num_items_in_batch`` for the tokens the credit rule keeps, rescaled to one accumulation window
        (``RLVRLoss`` then divides it by the world size, as TRL does)."""
        bufs = self._buffered_inputs if mode == "train" else None
        if bufs is not None and any(b is inputs for b in bufs):
            local = sum(self._planned_active(b, cfg, q) for b in bufs)
            items = self.accelerator.gather(local.reshape(1)).sum()
        elif mode == "train":  # an unknown buffer layout: scale TRL's count by this slice's kept fraction
            kept = self.accelerator.gather(self._planned_active(inputs, cfg, q).reshape(1)).sum()
            total = self.accelerator.gather(self._loss_mask(inputs).sum().float().reshape(1)).sum()
            items = inputs["num_items_in_batch"].float() * kept / total.clamp(min=1.0)
        else:  # eval: the batch is the whole generation batch
            items = self.accelerator.gather(self._planned_active(inputs, cfg, q).reshape(1)).sum()
        if mode == "train":
            items = items * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return items.clamp(min=1.0)

    def _rlvr_loss_config(self, mode: str, schedule: Optional[TemporalSchedule]) -> tuple[LossConfig, bool, bool]:
        """``(cfg, per_micro_batch, token_count)``: the loss settings for this call, whether the result is divided by
        the accumulation steps, and whether it takes the token-count normaliser."""
        a = self.args
        tr = a.trust_region
        lt = self.loss_type
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        kw: dict[str, Any] = {}
        if tr == "clip":
            token_count = lt in _TOKEN_COUNT_TYPES
            kw.update(loss_type=lt, delta=a.delta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high)
        else:
            # the trust region replaces the objective; loss_type picks the normaliser
            trust = M.trust_region(tr)
            token_count = lt == "dapo"
            if tr == "dppo":
                eps = dict(epsilon_low=a.trust_region_delta, epsilon_high=a.trust_region_delta)
            elif tr == "cppo":
                eps = dict(epsilon_low=self.epsilon_low, epsilon_high=a.trust_region_delta)
            else:  # cispo: TRL's clamp at epsilon_high
                eps = dict(epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high)
            kw.update(loss_type=trust.loss_type, **eps)
            kw.update({n: getattr(a, n) for n in trust.options})
            if lt == "grpo":
                kw.update(aggregation="seq-mean-token-mean")
            elif lt == "bnpo":
                kw.update(aggregation="token-mean")
            elif lt == "dr_grpo":
                kw.update(aggregation="seq-mean-token-sum-norm", loss_horizon=self.max_completion_length)
        kw.update(_rollout_correction_kwargs(a))  # rollout_is / rollout_rs (empty when inactive)
        # TRL's entropy bonus is a token mean over the kept tokens divided by the accumulation steps; RLVRLoss adds
        # it inside the loss, so the token-count types (not divided afterwards) take the division here.
        coef = float(self.entropy_coef) if self._entropy_bonus_enabled else 0.0
        credit = a.credit
        cfg = LossConfig(
            beta=self.beta,
            use_ref_model=self.beta != 0.0,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length,
            temperature=self._rlvr_temperature,
            use_bias_correction_kl=bool(a.use_bias_correction_kl),
            sapo_temperature_pos=a.sapo_temperature_pos,
            sapo_temperature_neg=a.sapo_temperature_neg,
            vespo_k_pos=a.vespo_k_pos,
            vespo_lambda_pos=a.vespo_lambda_pos,
            vespo_k_neg=a.vespo_k_neg,
            vespo_lambda_neg=a.vespo_lambda_neg,
            entropy_coef=coef / ga if token_count else coef,
            credit=credit,
            schedule=schedule,
            credit_rho=a.credit_rho,
            entropy_adv_alpha=a.entropy_adv_alpha,
            entropy_adv_kappa=a.entropy_adv_kappa,
            d3s_scope=a.d3s_scope,
            backend=a.rlvr_backend,
            **kw,
        )
        return cfg, not token_count, token_count

    def _compute_rlvr_loss(self, model, inputs):
        a = self.args
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = self._loss_mask(inputs)
        B = completion_ids.size(0)

        step = self.rlvr_step()
        schedule = self.rlvr_schedule()
        q = None if schedule is None else float(schedule(step))
        cfg, per_micro_batch, token_count = self._rlvr_loss_config(mode, schedule)
        num_items = self._token_count_normaliser(inputs, cfg, q, mode) if token_count else None
        rollout_correction = M.rollout_correction_active(cfg)
        is_ratio = None
        if self.use_vllm and self.vllm_importance_sampling_correction and not rollout_correction:
            # TRL's vLLM IS ratio (vllm_importance_sampling_mode); the package's rollout correction replaces it
            is_ratio = inputs.get("importance_sampling_ratio")
        extra = {}
        if cfg.aggregation in ("seq-mean-token-mean", "seq-mean-token-sum-norm"):
            extra["global_batch_size"] = B  # TRL's grpo / dr_grpo divide by every row of the micro-batch
        # DPPO/CPPO's anchor and the rollout correction's mu: the rollout engine's log-probs (NaN -> behaviour)
        mu = _rollout_logps(inputs) if a.trust_region != "clip" or rollout_correction else None
        if mu is not None:
            extra["rollout_per_token_logps"] = mu
        # without rollout log-probs the anchor is the generating policy (logged once at generation): CPPO's
        # "mu equals pi" warning would say nothing new at every step
        quiet_cppo = a.trust_region == "cppo" and mu is None

        def head_fn(hidden, weight, bias):  # runs inside the model's forward, with the head gathered
            loss, metrics = rlvr_loss(
                cfg,
                hidden[:, -logits_to_keep:],
                weight,
                completion_ids,
                mask,
                inputs["advantages"],
                bias=bias,
                ref_per_token_logps=inputs.get("ref_per_token_logps"),
                old_per_token_logps=inputs.get("old_per_token_logps"),
                vllm_is_ratio=is_ratio,
                num_items_in_batch=num_items,
                step=step,
                delta_coefficients=inputs.get(DELTA_KEY),
                **extra,
            )
            # A plain dict of 0-dim tensors: the wrappers around the model's forward rebuild what it returns
            # (accelerate's fp32 output conversion under bf16/fp16 autocast calls type(x)(iterable), DDP flattens
            # it), which keeps a dict's names but not LossMetrics.named.
            return loss, dict(metrics.named)

        model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        for k in (
            "pixel_values",
            "image_grid_thw",
            "pixel_attention_mask",
            "spatial_shapes",
            "image_sizes",
            "token_type_ids",
            "mm_token_type_ids",
            "image_position_ids",
        ):
            if inputs.get(k) is not None:
                model_inputs[k] = inputs[k]
        with contextlib.ExitStack() as stack:
            if quiet_cppo:
                from rlvr_kernels.cppo import CPPOAnchorWarning

                stack.enter_context(warnings.catch_warnings())
                warnings.filterwarnings("ignore", category=CPPOAnchorWarning)
            with self.accelerator.autocast():
                loss, metrics = model(**model_inputs, rlvr_head_fn=head_fn)
        if per_micro_batch and mode == "train":
            loss = loss / self.current_gradient_accumulation_steps
        self._log_rlvr_metrics(mode, metrics, q)
        return loss

    def _log_rlvr_metrics(self, mode: str, metrics, q: Optional[float]) -> None:
        m = self._metrics[mode]
        named = named_metrics(metrics)

        def gathered(name):
            return self.accelerator.gather(named[name].detach().float().reshape(1))

        def mean(name):
            return gathered(name).nanmean().item()

        def extreme(name, fn):  # TRL: nanmin / nanmax over every process's sequences
            g = gathered(name)
            g = g[~torch.isnan(g)]
            return fn(g).item() if g.numel() else float("nan")

        if self.beta != 0.0 and "kl" in named:
            m["kl"].append(mean("kl"))
        if "entropy" in named:
            m["entropy"].append(mean("entropy"))
        lt = self.args.trust_region if self.args.trust_region != "clip" else self.loss_type
        if lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            m["clip_ratio/low_mean"].append(mean("clip_ratio/low_mean"))
            m["clip_ratio/high_mean"].append(mean("clip_ratio/high_mean"))
            m["clip_ratio/region_mean"].append(mean("clip_ratio/region_mean"))
            m["clip_ratio/low_min"].append(extreme("clip_ratio/low_min", torch.min))
            m["clip_ratio/high_max"].append(extreme("clip_ratio/high_max", torch.max))
        elif lt == "cispo":
            m["cispo_clip_ratio"].append(mean("clip_ratio/high_mean"))
        m["rlvr/active_fraction"].append(mean("active_fraction"))
        if q is not None:
            m["rlvr/schedule_value"].append(float(q))
        if "trust_region/masked_fraction" in named:
            m["rlvr/trust_region_masked_fraction"].append(mean("trust_region/masked_fraction"))
        if "cppo/delta_b_mean" in named:
            m["rlvr/cppo_delta_b_mean"].append(mean("cppo/delta_b_mean"))
        if "delta/coef_std" in named:
            m["rlvr/delta_coef_std"].append(mean("delta/coef_std"))


def _uses_rollout_correction(a) -> bool:
    """Whether the trainer arguments ``a`` ask for the rollout correction (a plain ``GRPOConfig`` never does)."""
    return M.rollout_correction_active(
        dict(rollout_is=getattr(a, "rollout_is", "none"), rollout_rs=getattr(a, "rollout_rs", "none"))
    )


def _rollout_correction_kwargs(a) -> dict:
    """The ``LossConfig`` keywords of the rollout correction of ``a`` (``RLVRGRPOConfig.rollout_correction_kwargs``;
    empty when inactive)."""
    return {n: getattr(a, n) for n in M.ROLLOUT_OPTIONS} if _uses_rollout_correction(a) else {}


def _rollout_logps(batch: dict) -> Optional[torch.Tensor]:
    """The rollout engine's log-probs of ``batch`` (TRL's ``sampling_per_token_logps``), a token the engine did not
    score (NaN) taking the behaviour log-prob, as TRL's IS correction leaves such a token uncorrected; None without
    them."""
    mu = batch.get(ROLLOUT_KEY)
    if mu is None:
        return None
    old = batch["old_per_token_logps"]
    return torch.where(torch.isnan(mu), old, mu.to(old.dtype))
