"""``RLVRLoss`` and its functional form ``rlvr_loss``: input checks, the batch record, and the choice between the
composable path (``fused_linear_logprobs`` under autograd, then the token pass) and the fused path
(:mod:`rlvr_kernels.loss.fused`).

Batch-global normalisers and per-row active counts are computed before the vocabulary pass from the tokens the credit
rule will keep (:meth:`rlvr_kernels.methods.CreditRule.planned_counts`), so a chunk of the fused path needs no other
chunk.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Optional, Union

import torch
from torch import nn

from rlvr_kernels import _checks as C
from rlvr_kernels import methods as M
from rlvr_kernels._backend import autocast_inputs, no_autocast
from rlvr_kernels.logprobs import _check_float_tensor, _check_int_tensor, fused_linear_logprobs
from rlvr_kernels.loss import fused as F
from rlvr_kernels.loss.config import LossConfig
from rlvr_kernels.loss.metrics import loss_metrics
from rlvr_kernels.loss.token_pass import Batch, token_pass
from rlvr_kernels.reference import loss as ref_loss
from rlvr_kernels.schedule import schedule_value_tensor


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def _schedule_value(cfg: LossConfig, step) -> Union[None, float, torch.Tensor]:
    """q(step) of the configuration's schedule (None without one): a Python float in eager mode; under
    torch.compile a float64 0-dim CPU tensor (:func:`schedule_value_tensor`), so that the step is no constant of the
    graph (no recompilation per step) and q is read only inside the ops that need it as a number."""
    if cfg.schedule is None:
        return None
    if step is None:
        raise ValueError("this loss has a schedule: pass the 1-based optimizer step as forward(..., step=k)")
    if torch.compiler.is_compiling():
        return schedule_value_tensor(cfg.schedule, step)
    return float(cfg.schedule(step))


def _check_2d(name, t, B, T, *, dtype_kind="float", allow=(None,)):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) not in [(B, T)] + [s for s in allow if s is not None]:
        shapes = " or ".join(str(s) for s in [(B, T)] + [s for s in allow if s is not None])
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(t.shape)}")
    if dtype_kind == "float" and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


class RLVRLoss(nn.Module):
    """Drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` with more objectives and credit rules.

    Liger's constructor keywords keep their names, defaults and meaning (``compiled`` and ``chunk_size`` are
    accepted; chunking here is by memory budget). Additional keywords (all optional):

    - ``loss_type``: also ``dppo`` and ``cppo`` (``-M A rho`` with DPPO's / CPPO's direction-aware mask; for dppo,
      ``epsilon_low/high`` are the binary-TV divergence thresholds as in verl's ``dppo_tv``; for cppo
      ``epsilon_high`` is CPPO's delta and ``cppo_*`` are its parameters); ``ratio_cap`` gives the truncated-IS form
      ``-M A sg(min(rho, cap)) log p`` (verl's, cap 20). ``importance_sampling_level="sequence"`` is GSPO.
    - ``log_ratio_clip``: clamp ``log p - log p_old`` to ``[-c, c]`` before ``exp`` (verl clamps at 20 in every
      policy loss; Liger and TRL do not, hence the default None; dppo/cppo always clamp at 20).
    - ``aggregation``: one of verl's ``token-mean | token-sum | seq-mean-token-mean | seq-mean-token-sum |
      seq-mean-token-sum-norm`` (``loss_horizon`` for the last; default T) instead of the loss type's normaliser.
    - ``dual_clip`` (verl's ``clip_ratio_c``), ``cispo_min`` (verl's two-sided CISPO clamp), ``entropy_coef`` (an
      entropy bonus ``- entropy_coef * agg(H)`` with the exact entropy gradient).
    - ``credit``: ``"none" | "tp_schedule" | "forking" | "entropy_adv" | "d3s" | "delta"`` with ``schedule`` (a
      :class:`TemporalSchedule`, evaluated at the forward keyword ``step``): TP-Schedule's cut-off ``q(k)``; forking /
      D^3S keep ``rho = 1 - q(k)`` (or ``credit_rho`` without a schedule); entropy-shaped advantages use scale
      ``q(k)`` (or 1). ``delta`` multiplies A by precomputed DelTA coefficients (forward keyword
      ``delta_coefficients [B, T]``).
    - ``fused``: ``"auto"`` (fused 3-GEMM path when a gradient is needed, the configuration allows it and one
      sequence's fp32 ``[T, V]`` logits fit the chunk budget, 1 GiB on GPU, 16 MiB on CPU, or the loss is
      :func:`rlvr_kernels.methods.token_local`, whose rows are then split into segments),
      ``True``, ``False`` (composable path); ``backend`` as in :func:`fused_linear_logprobs`.

    - ``compiled_value_checks`` (default True): what the value checks do under ``torch.compile`` (below).

    Returns ``(loss, metrics)`` as Liger does: ``metrics[0]`` the KL mean when ``beta != 0``, ``metrics[-1]`` the clip
    ratio, and every metric by name (``metrics["entropy"]``, ``metrics.named``).

    ``torch.compile(..., fullgraph=True)`` of a function that calls the loss (or of the module) traces it with no
    graph break on both paths and gives the eager numbers, forward and backward: the fused path is one custom op,
    ``rlvr_kernels::fused_loss`` (its chunk loop, row compaction and host reads are inside it; its backward scales the
    gradients it computed, without a host read); the composable path is ``rlvr_kernels::linear_logprobs`` and the
    token pass in plain torch, whose credit rules are custom ops. The schedule value ``q(step)`` is computed by the
    ``rlvr_kernels::schedule_value`` op from the int ``step``, so a compiled loss called with ``step = 1, 2, 3, ...``
    is compiled at most twice (dynamo makes the int dynamic when it first changes), not once per step.

    Input checks: in eager mode every check runs before any kernel (``TypeError`` / ``ValueError`` naming the input),
    including the value checks that read the data (a finite ``attention_mask``; ``selected_token_ids`` in
    ``[0, V)``, finite advantages, log-probs, ratios, coefficients and entropies on the loss tokens; a finite,
    non-negative ``num_items_in_batch``). Under ``torch.compile`` the type, shape, dtype, device and configuration
    checks still raise while tracing (with ``fullgraph=True`` dynamo reports the error as an observed exception that
    carries the message); the value checks become device-side asserts (``torch._assert_async``: no host sync, no graph
    break) that raise ``RuntimeError`` with the same message on CPU and trigger a device-side assert on CUDA, which is
    fatal to the process. ``compiled_value_checks=False`` leaves them out of the compiled graph (for compiled training
    whose inputs are validated elsewhere, e.g. by an eager first step); the eager checks are unchanged. Ids out of
    range on loss tokens raise ``ValueError`` in either case: the ops that index by them check them in their body.
    """

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: Optional[int] = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: Optional[float] = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        **extra,
    ):
        super().__init__()
        names = {f.name for f in fields(LossConfig)}
        unknown = set(extra) - names
        if unknown:
            raise TypeError(f"RLVRLoss got unexpected keyword(s) {sorted(unknown)}")
        self.config = LossConfig(
            beta=beta,
            compiled=compiled,
            use_ref_model=use_ref_model,
            chunk_size=chunk_size,
            epsilon_low=epsilon_low,
            epsilon_high=epsilon_high,
            loss_type=loss_type,
            max_completion_length=max_completion_length,
            importance_sampling_level=importance_sampling_level,
            sapo_temperature_pos=sapo_temperature_pos,
            sapo_temperature_neg=sapo_temperature_neg,
            temperature=temperature,
            delta=delta,
            use_bias_correction_kl=use_bias_correction_kl,
            vespo_k_pos=vespo_k_pos,
            vespo_lambda_pos=vespo_lambda_pos,
            vespo_k_neg=vespo_k_neg,
            vespo_lambda_neg=vespo_lambda_neg,
            **extra,
        )

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            cfg = self.__dict__.get("config")
            if cfg is not None and hasattr(cfg, name):
                return getattr(cfg, name)
            raise

    def extra_repr(self) -> str:
        c = self.config
        return f"loss_type={c.loss_type!r}, beta={c.beta}, credit={c.credit!r}, schedule={c.schedule!r}"

    def forward(
        self,
        _input,
        lin_weight,
        selected_token_ids,
        attention_mask,
        advantages,
        bias=None,
        ref_per_token_logps=None,
        old_per_token_logps=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        vllm_is_ratio=None,
        num_items_in_batch=None,
        *,
        step: Optional[int] = None,
        rollout_per_token_logps=None,
        delta_coefficients=None,
        old_entropy=None,
        global_batch_size=None,
        batch_num_tokens=None,
        dp_size: int = 1,
        tp_group=None,
        vocab_start: Optional[int] = None,
        grad_hidden: str = "full",
        seq_group=None,
        temperature=None,
    ):
        """Loss of one micro-batch.

        Args (Liger's): ``_input [B, T, H]`` last hidden states; ``lin_weight [V, H]``; ``selected_token_ids [B, T]``;
        ``attention_mask [B, T]`` (the loss mask); ``advantages [B]`` (or per token ``[B, T]``); ``bias [V]``;
        ``ref_per_token_logps``/``old_per_token_logps [B, T]``; ``ref_input``/``ref_weight``/``ref_bias`` (the
        reference model's hidden states, used when no ref log-probs are given); ``vllm_is_ratio`` ``[B, T]``,
        ``[B, 1]`` or ``[B]``; ``num_items_in_batch`` (dapo/cispo normaliser, as TRL passes it).
        Extra: ``step`` (1-based optimizer step, for the schedule); ``rollout_per_token_logps`` (mu for dppo/cppo;
        default ``old_per_token_logps``); ``delta_coefficients [B, T]``; ``old_entropy [B, T]`` (entropy_adv's
        H, default the current policy's, detached); ``global_batch_size`` / ``batch_num_tokens`` (verl's
        ``global_batch_info`` for the verl aggregation modes) and ``dp_size`` (verl multiplies those modes by the
        data-parallel size, because DDP/FSDP average the ranks' gradients). ``tp_group`` / ``vocab_start`` /
        ``grad_hidden``: a vocabulary-sharded lm_head, as in :func:`rlvr_kernels.fused_linear_logprobs`
        (``lin_weight``, ``bias`` and ``ref_weight``/``ref_bias`` are this rank's shard; ids stay global; every rank
        gets the unsharded loss and metrics, the gradient of its own shard and, by default, the full d``_input``).
        ``seq_group``: sequence-split rows (Ulysses / context parallelism): every per-token input is this rank's
        columns of the rows (rank order; see :func:`rlvr_kernels.loss.api.rlvr_loss`).
        ``temperature``: the sampling temperature of this call, instead of the constructor's: a float tensor ``[B]``
        (one per row: vLLM / TRL sample each request with its own), ``[B, 1]``, ``[B, T]`` (one per token) or 0-dim,
        or a number; > 0 and finite on the loss tokens (``ValueError`` otherwise; other positions are not read). The
        policy's and the reference model's logits (``ref_input``) are divided by it alike; log-probs passed in
        (``old_`` / ``ref_per_token_logps``) are taken as they are. Not differentiated.
        """
        return rlvr_loss(
            self.config,
            _input,
            lin_weight,
            selected_token_ids,
            attention_mask,
            advantages,
            bias,
            ref_per_token_logps,
            old_per_token_logps,
            ref_input,
            ref_weight,
            ref_bias,
            vllm_is_ratio,
            num_items_in_batch,
            step=step,
            rollout_per_token_logps=rollout_per_token_logps,
            delta_coefficients=delta_coefficients,
            old_entropy=old_entropy,
            global_batch_size=global_batch_size,
            batch_num_tokens=batch_num_tokens,
            dp_size=dp_size,
            tp_group=tp_group,
            vocab_start=vocab_start,
            grad_hidden=grad_hidden,
            seq_group=seq_group,
            temperature=temperature,
        )


# ----------------------------------------------------------------------------------------------------------------
# entry point


def _check_inputs(
    cfg,
    x,
    w,
    ids,
    mask,
    adv,
    bias,
    ref,
    old,
    ref_input,
    ref_weight,
    is_ratio,
    mu,
    coef,
    old_ent,
    num_items_in_batch,
    global_batch_size,
    batch_num_tokens,
    sharded: bool = False,
):
    """Every tensor's type, shape, dtype and device, ids in range and finite values on the loss tokens, before any
    kernel runs. Values at positions outside the loss mask are never read (padding may hold anything). ``sharded``:
    ``w`` is one vocabulary shard, so ids are checked against the whole vocabulary by the ops (after their exchange),
    here only for being >= 0."""
    _check_float_tensor(x, "_input")
    if x.dim() != 3 or x.shape[-1] == 0:
        raise ValueError(f"_input must be [B, T, H] hidden states with H > 0, got shape {tuple(x.shape)}")
    B, T, H = x.shape
    _check_float_tensor(w, "lin_weight")
    if w.dim() != 2 or w.shape[1] != H or w.shape[0] == 0:
        raise ValueError(
            f"lin_weight must be [V, H] with V > 0 and H = {H}, the last dimension of _input "
            f"(nn.Linear layout), got {tuple(w.shape)}"
        )
    if w.dtype != x.dtype:
        raise TypeError(f"lin_weight dtype {w.dtype} does not match _input dtype {x.dtype}")
    if bias is not None:
        _check_float_tensor(bias, "bias")
        if tuple(bias.shape) != (w.shape[0],):
            raise ValueError(f"bias must have shape [V] = [{w.shape[0]}], got {tuple(bias.shape)}")
    _check_int_tensor(ids, "selected_token_ids")
    if tuple(ids.shape) != (B, T):
        raise ValueError(f"selected_token_ids must have shape {(B, T)}, got {tuple(ids.shape)}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, T):
        raise ValueError(f"attention_mask must be a tensor of shape {(B, T)}, got {tuple(getattr(mask, 'shape', ()))}")
    for name, t in (
        ("lin_weight", w),
        ("bias", bias),
        ("selected_token_ids", ids),
        ("attention_mask", mask),
        ("advantages", adv),
        ("ref_per_token_logps", ref),
        ("old_per_token_logps", old),
        ("rollout_per_token_logps", mu),
        ("delta_coefficients", coef),
        ("old_entropy", old_ent),
        ("vllm_is_ratio", is_ratio),
        ("ref_input", ref_input),
        ("ref_weight", ref_weight),
    ):
        if isinstance(t, torch.Tensor) and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but _input is on {x.device}")
    if mask.is_complex():
        raise ValueError("attention_mask must hold finite real values (1 = loss token, 0 = ignored)")
    if not isinstance(adv, torch.Tensor) or tuple(adv.shape) not in ((B,), (B, T)):
        raise ValueError(
            f"advantages must be a tensor of shape ({B},) or {(B, T)}, got {tuple(getattr(adv, 'shape', ()))}"
        )
    if not adv.dtype.is_floating_point:
        raise TypeError(f"advantages must be a floating-point tensor, got {adv.dtype}")
    for name, t in (
        ("ref_per_token_logps", ref),
        ("old_per_token_logps", old),
        ("rollout_per_token_logps", mu),
        ("delta_coefficients", coef),
        ("old_entropy", old_ent),
    ):
        _check_2d(name, t, B, T)
    _check_2d("vllm_is_ratio", is_ratio, B, T, allow=((B, 1), (B,)))
    values = dict(
        advantages=adv,
        old_per_token_logps=old,
        ref_per_token_logps=ref,
        vllm_is_ratio=is_ratio,
        rollout_per_token_logps=mu,
        delta_coefficients=coef,
        old_entropy=old_ent,
    )
    if torch.compiler.is_compiling():
        if cfg.compiled_value_checks:
            _assert_values(mask, ids, 2**62 if sharded else w.shape[0], values)
    else:
        _check_values(mask, ids, 2**62 if sharded else w.shape[0], values)
    if cfg.beta != 0.0 and cfg.use_ref_model and ref is None and ref_input is None:
        raise ValueError("beta != 0 with use_ref_model=True needs ref_per_token_logps or ref_input (and ref_weight)")
    if ref is None and ref_input is not None and ref_weight is None:
        raise ValueError("ref_input needs ref_weight")
    if cfg.loss_type in ("dppo", "cppo") and mu is None and old is None:
        raise ValueError(
            f"loss_type={cfg.loss_type!r} needs the rollout (behaviour) log-probs: pass "
            "rollout_per_token_logps or old_per_token_logps; without them every divergence is 0"
        )
    if cfg.credit == "delta" and coef is None:
        raise ValueError("credit='delta' needs delta_coefficients [B, T] (see rlvr_kernels.delta_coefficients)")
    for name, v in (
        ("num_items_in_batch", num_items_in_batch),
        ("global_batch_size", global_batch_size),
        ("batch_num_tokens", batch_num_tokens),
    ):
        if isinstance(v, torch.Tensor) and torch.compiler.is_compiling():
            if v.numel() != 1:
                raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(v.shape)}")
            if cfg.compiled_value_checks:
                ok = torch.isfinite(v.float()).all() & (v.float() >= 0).all()
                torch._assert_async(ok, f"{name} must be a finite number >= 0")
        elif v is not None:
            C.real(name, v, low=0.0)


_MASK_MESSAGE = "attention_mask must hold finite real values (1 = loss token, 0 = ignored)"


def _value_views(mask: torch.Tensor, values: dict):
    """``(name, t, on)`` for every given value tensor: ``on`` the bool mask of its entries that are read (the loss
    tokens of ``[B, T]`` tensors; the rows with a loss token of per-row ``[B]`` / ``[B, 1]`` tensors)."""
    keep = mask != 0
    rows_used = keep.any(-1)
    B = mask.shape[0]
    for name, t in values.items():
        if t is None:
            continue
        if t.shape == mask.shape:
            yield name, t, keep
        else:
            yield name, t.reshape(B, t.numel() // max(B, 1)), rows_used.unsqueeze(-1)


def _check_values(mask: torch.Tensor, ids: torch.Tensor, v: int, values: dict) -> None:
    """The eager value checks (host reads): a finite mask, ids in ``[0, v)`` and finite values on the loss tokens
    (fp32 is the token pass's precision). ValueError naming the input."""
    if mask.dtype.is_floating_point and not bool(torch.isfinite(mask).all()):
        raise ValueError(_MASK_MESSAGE)
    F.check_token_ids(ids, mask != 0, v)
    for name, t, on in _value_views(mask, values):
        if not bool((torch.isfinite(t.float()) | ~on).all()):
            raise ValueError(f"{name} has non-finite values on loss tokens (NaN, inf, or beyond the float32 range)")


def _assert_values(mask: torch.Tensor, ids: torch.Tensor, v: int, values: dict) -> None:
    """The checks of :func:`_check_values` as device-side asserts (``torch._assert_async``): no host read and no
    graph break under torch.compile. A failing one raises RuntimeError with the same message (on CPU; on CUDA a
    device-side assert, which is fatal to the process)."""
    if mask.dtype.is_floating_point:
        torch._assert_async(torch.isfinite(mask).all(), _MASK_MESSAGE)
    keep = mask != 0
    ok_ids = ((ids >= 0) & (ids < v)) | ~keep
    torch._assert_async(ok_ids.all(), f"selected_token_ids must lie in [0, {v}) on loss tokens (attention_mask != 0)")
    for name, t, on in _value_views(mask, values):
        torch._assert_async(
            (torch.isfinite(t.float()) | ~on).all(),
            f"{name} has non-finite values on loss tokens (NaN, inf, or beyond the float32 range)",
        )


def rlvr_loss(
    cfg: LossConfig,
    _input,
    lin_weight,
    selected_token_ids,
    attention_mask,
    advantages,
    bias=None,
    ref_per_token_logps=None,
    old_per_token_logps=None,
    ref_input=None,
    ref_weight=None,
    ref_bias=None,
    vllm_is_ratio=None,
    num_items_in_batch=None,
    *,
    step=None,
    rollout_per_token_logps=None,
    delta_coefficients=None,
    old_entropy=None,
    global_batch_size=None,
    batch_num_tokens=None,
    dp_size: int = 1,
    tp_group=None,
    vocab_start: Optional[int] = None,
    grad_hidden: str = "full",
    seq_group=None,
    temperature=None,
    _token_logprobs=None,
):
    """Functional form of :class:`RLVRLoss` (``cfg`` a :class:`LossConfig`). Returns ``(loss, LossMetrics)``.

    Under ``torch.autocast`` the hidden states and the head are cast as the ``lm_head`` would be (to the autocast
    dtype), and the loss then runs with autocast off: statistics and the token pass in fp32.

    ``seq_group`` (sequence-split rows): ``_input`` and every ``[B, T]`` input hold this rank's columns
    ``[c_r, c_r + T_r)`` of the same ``B`` rows, the ranks of the group in rank order. Each rank computes the
    log-probs and entropies of its own tokens (no logits leave a rank), then the group exchanges them and the per-token
    inputs (a documented gather of O(B T) values: ``rlvr_kernels.parallel.columns``), and every rank runs the token
    pass on the whole rows: the loss and metrics equal the single-process ones on the whole rows for every objective
    and credit rule (whole-row rules included), and the backward gives each rank the exact gradient of that loss with
    respect to its own tokens' hidden states and their share of dW (the shares sum to the whole dW over the group).
    Frameworks that average gradients over the sequence-parallel ranks (FSDP with Ulysses) should multiply the loss by
    the group's size, as verl's Ulysses gather does for its log-probs. Runs the composable path; eager only.
    ``temperature``: None (``cfg.temperature``), or this call's temperature as :meth:`RLVRLoss.forward` takes it
    (with ``seq_group``: ``[B]``, ``[B, 1]``, 0-dim, or this rank's columns ``[B, T_r]``).
    ``_token_logprobs``: internal (the whole rows' ``(logp, entropy)`` ``[B, T]``, already computed)."""
    if seq_group is not None:
        return _seq_split_loss(
            cfg, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias, ref_per_token_logps,
            old_per_token_logps, ref_input, ref_weight, ref_bias, vllm_is_ratio, num_items_in_batch, step=step,
            rollout_per_token_logps=rollout_per_token_logps, delta_coefficients=delta_coefficients,
            old_entropy=old_entropy, global_batch_size=global_batch_size, batch_num_tokens=batch_num_tokens,
            dp_size=dp_size, tp_group=tp_group, vocab_start=vocab_start, grad_hidden=grad_hidden, seq_group=seq_group,
            temperature=temperature,
        )  # fmt: skip
    _input, lin_weight, bias, ref_input, ref_weight, ref_bias = autocast_inputs(
        _input, lin_weight, bias, ref_input, ref_weight, ref_bias
    )
    device = _input.device if isinstance(_input, torch.Tensor) else torch.device("cpu")
    with no_autocast(device):
        mu = rollout_per_token_logps if rollout_per_token_logps is not None else old_per_token_logps
        if not cfg.use_ref_model:  # Liger: without a reference model the KL is taken against the current policy (0)
            ref_per_token_logps = ref_input = ref_weight = ref_bias = None
        _check_inputs(
            cfg,
            _input,
            lin_weight,
            selected_token_ids,
            attention_mask,
            advantages,
            bias,
            ref_per_token_logps,
            old_per_token_logps,
            ref_input,
            ref_weight,
            vllm_is_ratio,
            mu,
            delta_coefficients,
            old_entropy,
            num_items_in_batch,
            global_batch_size,
            batch_num_tokens,
            tp_group is not None,
        )
        ref_loss.check_global_batch_info(cfg, dp_size, batch_num_tokens, global_batch_size)
        B, T, H = _input.shape
        # this call's temperature: [B, T] (1 outside the loss mask), or None for the configuration's number
        temp = None if _token_logprobs is not None else _call_temperature(cfg, temperature, attention_mask, _input)
        temp_arg = cfg.temperature if temp is None else temp
        q = _schedule_value(cfg, step)
        valid = attention_mask != 0
        # The loss mask as weights; positions outside it are exactly 0 (never NaN * 0) and take no part in anything.
        rule = M.credit(cfg.credit)
        mask = M.call_hook(rule, "static_mask", cfg, torch.where(valid, _as_float(attention_mask), 0.0), q=q)
        # the rollout correction (train / rollout mismatch): known before the vocabulary pass, its rejected tokens
        # leave the mask (and every token count) as a static credit mask's do; its weight joins vllm_is_ratio
        is_ratio = _inert_ratio(vllm_is_ratio, valid, cfg)
        if M.rollout_correction_active(cfg):
            if rollout_per_token_logps is None or old_per_token_logps is None:
                raise ValueError(
                    "rollout_is / rollout_rs need old_per_token_logps (the training engine's log-probs of the "
                    "rollout) and rollout_per_token_logps (the rollout engine's)"
                )
            keep, weight = M.rollout_correction(cfg, old_per_token_logps.detach(), mu.detach(), valid)
            mask = mask * keep
            if weight is not None:
                if is_ratio is not None and is_ratio.dim() == 1:
                    is_ratio = is_ratio.unsqueeze(1)
                is_ratio = weight if is_ratio is None else is_ratio * weight
        # Positions outside the loss mask may hold any id and any hidden state (padding): they are ignore_index rows
        # of the vocabulary pass, read as zeros, with logp = entropy = 0 and no gradient.
        ids = torch.where(
            valid, selected_token_ids.long(), torch.full_like(selected_token_ids, cfg.ignore_index, dtype=torch.long)
        )
        if ref_per_token_logps is None and ref_input is not None and cfg.beta != 0.0 and cfg.use_ref_model:
            with torch.no_grad():
                ref_per_token_logps, _ = fused_linear_logprobs(
                    ref_input,
                    ref_weight,
                    ids,
                    bias=ref_bias,
                    temperature=temp_arg,
                    return_entropy=False,
                    ignore_index=cfg.ignore_index,
                    backend=cfg.backend,
                    tp_group=tp_group,
                    vocab_start=vocab_start,
                )

        def f(t):
            return None if t is None else _inert(t.detach().float(), valid)

        batch = Batch.build(
            _input,
            ids,
            torch.where(valid, _as_float(attention_mask), 0.0),
            mask,
            _inert(advantages.detach().float(), valid),
            f(old_per_token_logps),
            f(ref_per_token_logps),
            is_ratio,
            f(mu),
            f(delta_coefficients),
            f(old_entropy),
        )
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (_input, lin_weight, bias)
        )
        fused = cfg.fused
        if fused == "auto":
            # the fused path holds one chunk of logits: whole rows, or row segments when every token's term is local
            # (token_local); other configurations whose rows do not fit take the composable path (O(chunk * V) memory)
            fused = (
                needs_grad
                and not cfg.batch_selection
                and (T * lin_weight.shape[0] * 4 <= F.chunk_budget(_input.device) or M.token_local(cfg))
            )
        if B * T == 0 or _token_logprobs is not None:
            fused = False  # nothing to chunk (a zero loss connected to the inputs), or the log-probs are given
        counts = M.call_hook(rule, "planned_counts", cfg, mask, q=q)
        logp = ent = None
        if _token_logprobs is not None:
            logp, ent = _token_logprobs
        elif not fused:
            logp, ent = fused_linear_logprobs(
                _input,
                lin_weight,
                ids,
                bias=bias,
                temperature=temp_arg,
                ignore_index=cfg.ignore_index,
                backend=cfg.backend,
                tp_group=tp_group,
                vocab_start=vocab_start,
                grad_hidden=grad_hidden,
            )
        if not fused:
            logp, ent = logp.float(), ent.float()
            if counts is None:  # a selection over the batch: the rows' shares follow from the current entropies
                keep = M.call_hook(rule, "policy_mask", cfg, batch.adv, ent.detach(), mask, q=q)
                counts = (mask * keep.to(mask.dtype)).sum(-1)
        norm = ref_loss.normalizer(
            cfg,
            counts,
            T,
            num_items_in_batch=num_items_in_batch,
            global_batch_size=global_batch_size,
            batch_num_tokens=batch_num_tokens,
            dp_size=dp_size,
        )
        ent_norm = counts.sum().clamp(min=1.0) if cfg.aggregation is None else norm
        batch.counts = counts
        if fused:
            tp = None if tp_group is None else (tp_group, vocab_start, grad_hidden)
            loss, sums, active = F.fused_loss(cfg, _input, lin_weight, bias, batch, q, norm, ent_norm, tp, temp)
        else:
            loss, sums, active = token_pass(cfg, logp, ent, batch.rows(slice(None)), q, norm, ent_norm)
        # the normaliser was computed from the planned active tokens (an internal invariant: checked in eager mode,
        # where it costs one host read; the compiled graph has no host read)
        if not torch.compiler.is_compiling() and not torch.equal(active.sum(-1), counts):
            raise RuntimeError("internal error: the credit mask kept a different number of tokens than planned")
        coef = batch.coef if M.credit(cfg.credit).needs & {"coefficients"} else None
        return loss, loss_metrics(cfg, sums, batch.valid, B, q, coef)


def _seq_split_loss(
    cfg, _input, lin_weight, ids, attention_mask, advantages, bias, ref, old, ref_input, ref_weight, ref_bias,
    is_ratio, num_items_in_batch, *, seq_group, tp_group, vocab_start, grad_hidden, temperature=None, **kw,
):  # fmt: skip
    """:func:`rlvr_loss` on sequence-split rows: this rank's tokens' log-probs, gathered with every per-token input
    into whole rows, then the loss of the whole rows (see :func:`rlvr_loss`)."""
    import torch.distributed as dist

    from rlvr_kernels.parallel import columns as C
    from rlvr_kernels.parallel.collectives import check_group

    check_group("seq_group", seq_group)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError("attention_mask must be a [B, T_r] tensor (this rank's columns)")
    if not isinstance(_input, torch.Tensor) or _input.dim() != 3:
        raise ValueError("_input must be [B, T_r, H] (this rank's columns)")
    _input, lin_weight, bias, ref_input, ref_weight, ref_bias = autocast_inputs(
        _input, lin_weight, bias, ref_input, ref_weight, ref_bias
    )
    valid = attention_mask != 0
    if not isinstance(ids, torch.Tensor) or ids.shape != attention_mask.shape:
        raise ValueError("selected_token_ids must have attention_mask's shape [B, T_r]")
    local_ids = torch.where(valid, ids.long(), torch.full_like(ids, cfg.ignore_index, dtype=torch.long))
    tp = dict(tp_group=tp_group, vocab_start=vocab_start)
    temp = _call_temperature(cfg, temperature, attention_mask, _input)  # this rank's columns
    temp_arg = cfg.temperature if temp is None else temp
    with no_autocast(_input.device):
        logp, ent = fused_linear_logprobs(
            _input, lin_weight, local_ids, bias=bias, temperature=temp_arg, ignore_index=cfg.ignore_index,
            backend=cfg.backend, grad_hidden=grad_hidden, **tp,
        )  # fmt: skip
        if ref is None and ref_input is not None and cfg.beta != 0.0 and cfg.use_ref_model:
            with torch.no_grad():
                ref, _ = fused_linear_logprobs(
                    ref_input, ref_weight, local_ids, bias=ref_bias, temperature=temp_arg,
                    ignore_index=cfg.ignore_index, return_entropy=False, backend=cfg.backend, **tp,
                )  # fmt: skip
    widths = C.column_widths(attention_mask.shape[1], seq_group, attention_mask.device)
    rank = dist.get_rank(seq_group)

    def g(t):
        return C.gather_columns(t, seq_group, widths, rank) if isinstance(t, torch.Tensor) else t

    B, T, H = attention_mask.shape[0], sum(widths), _input.shape[-1]
    shapes_only = _input.new_zeros(()).expand(B, T, H)  # the loss reads no hidden state: the log-probs are given
    for key in ("rollout_per_token_logps", "delta_coefficients", "old_entropy"):
        kw[key] = g(kw.get(key))
    return rlvr_loss(
        cfg, shapes_only, lin_weight, g(ids), g(attention_mask), g(advantages), bias, g(ref), g(old), None, None,
        None, g(is_ratio), num_items_in_batch, tp_group=tp_group, vocab_start=vocab_start,
        _token_logprobs=(g(logp.float()), g(ent.float())), **kw,
    )  # fmt: skip


def _call_temperature(cfg, temperature, mask, x) -> Optional[torch.Tensor]:
    """This call's temperature (:meth:`RLVRLoss.forward`) as a ``[B, T]`` tensor of ``mask``'s shape with 1 outside
    the loss mask, or None (the configuration's number). A number, a 0-dim, ``[B]``, ``[B, 1]`` or ``[B, T]`` float
    tensor; > 0 and finite with ``1 / T`` finite in fp32 on the loss tokens: ``ValueError`` otherwise, in eager mode
    (one host read); a device-side assert under torch.compile (unless ``compiled_value_checks=False``; the ops that
    divide by it check it in their body either way)."""
    if temperature is None:
        return None
    B, T = mask.shape
    if not isinstance(temperature, torch.Tensor):
        t = C.temperature(temperature)
        return torch.full((B, T), t, dtype=torch.float32, device=mask.device)
    if not temperature.dtype.is_floating_point:
        raise TypeError(f"temperature must be a number or a floating-point tensor, got {temperature.dtype}")
    shapes = [(), (B,), (B, 1), (B, T)]
    if tuple(temperature.shape) not in shapes:
        raise ValueError(
            f"temperature must be a number or a tensor of shape [B] = {(B,)} (one per row), {(B, 1)}, {(B, T)} "
            f"(one per token) or (), got {tuple(temperature.shape)}"
        )
    if temperature.device != x.device:
        raise ValueError(f"temperature is on {temperature.device} but _input is on {x.device}")
    t = temperature.detach()
    t = (t.unsqueeze(1) if t.dim() == 1 else t).expand(B, T)
    valid = mask != 0
    t64 = t.to(torch.float64)
    ok = (torch.isfinite(t64) & (t64 > 0) & (1.0 / t64 <= C.F32_MAX)) | ~valid
    msg = "temperature must be > 0 and finite (1 / temperature finite in float32) on loss tokens (attention_mask != 0)"
    if torch.compiler.is_compiling():
        if cfg.compiled_value_checks:
            torch._assert_async(ok.all(), msg)
    elif not bool(ok.all()):
        r, c = (int(i) for i in (~ok).nonzero()[0])
        raise ValueError(f"{msg}; row {r}, token {c} has {float(t64[r, c])!r}")
    return torch.where(valid, t, torch.ones((), dtype=t.dtype, device=t.device))


def _inert(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``t`` with every position outside the loss mask set to 0 (``[B]`` per-row tensors are returned as they are;
    rows without a loss token never count)."""
    if t.shape != valid.shape:
        return torch.where(torch.isfinite(t), t, 0.0) if t.dim() == 1 else t
    return torch.where(valid, t, 0.0)


def _inert_ratio(is_ratio, valid, cfg):
    """vllm_is_ratio ``[B, T]`` / ``[B, 1]`` / ``[B]`` as fp32: 1 outside the loss mask (VESPO multiplies every
    position's ratio into its sequence weight, as Liger and TRL do, so there only non-finite values become 1)."""
    if is_ratio is None:
        return None
    r = is_ratio.detach().float()
    one = torch.ones((), dtype=r.dtype, device=r.device)
    if r.shape == valid.shape:
        keep = valid | torch.isfinite(r) if cfg.loss_type == "vespo" else valid
        return torch.where(keep, r, one)
    return torch.where(torch.isfinite(r), r, one)
