"""DelTA's coefficients inside the verl worker: estimated at the start of each actor update, before its
mini-batch loop, from theta_old's final hidden states (method page: ``docs/methods/delta.md``).

verl 0.9.1 computes old_log_probs (RayPPOTrainer.fit -> _compute_old_log_prob; v1 PPOTrainer._step_once ->
_compute_old_log_prob) BEFORE the advantages (compute_advantage, on the driver), so the old-log-prob forward cannot
produce the coefficients, which need both. The first point where h (theta_old), old_log_probs, advantages and
response_mask are all at hand on the workers is TrainingWorker.train_mini_batch (called by
ActorRolloutRefWorker.update_actor) before its mini-batch loop: no optimizer step has run for this rollout batch, so
the actor's weights are still theta_old. There :func:`delta_for_update` runs no-grad forwards of the actor through
verl's own engine (``engine.infer_batch`` in ``engine.eval_mode()``: the engine's micro-batching, padding removal,
Ulysses SP gather and fused kernels), captures the final hidden state fed to lm_head (a forward pre-hook on lm_head,
as the official ``compute_log_prob_h``; a forward hook on the decoder when a fused forward bypasses lm_head), and
streams each micro-batch's response tokens into a :class:`rlvr_kernels.delta.DeltaEstimator`; the result becomes the
batch field ``rlvr_delta_coef``, which verl's mini-batch iterator then splits like ``advantages``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Optional

import torch

from rlvr_kernels.integrations._verl.context import logger
from rlvr_kernels.integrations._verl.options import DELTA_COEF_KEY, options_of, spec_of

_DELTA_ROW_KEY = "rlvr_delta_row"  # temporary row index of the estimation forward (micro-batches may be reordered)


def _padded_response(t: torch.Tensor) -> torch.Tensor:
    return t.to_padded_tensor(0) if t.is_nested else t


def _fit_width(t: torch.Tensor, width: int) -> torch.Tensor:
    if t.shape[1] < width:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))
    return t[:, :width]


def _as_layout_of(ref: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
    """``padded [bs, R]`` in the layout of the batch field ``ref``: dense ``[bs, R']`` (legacy trainer) or jagged
    over the responses (v1 trainer, ``response_to_nested``)."""
    if ref.is_nested:
        offsets = ref.offsets()
        lengths = offsets.diff().to(padded.device)
        width = int(lengths.max()) if lengths.numel() else 0
        p = _fit_width(padded, max(width, 1))
        sel = torch.arange(p.shape[1], device=p.device)[None, :] < lengths[:, None]
        return torch.nested.nested_tensor_from_jagged(p[sel].to(ref.device), offsets)
    return _fit_width(padded, ref.shape[1]).to(ref.device)


def _causal_lm(engine):
    """``(lm, lm_head, decoder)`` of the engine's Hugging Face causal LM (FSDP / FSDP2 / PEFT wrappers looked
    through)."""
    root = getattr(engine, "module", None)
    if isinstance(root, torch.nn.Module):
        from transformers import PreTrainedModel

        for m in root.modules():
            if not isinstance(m, PreTrainedModel) or not hasattr(m, "get_output_embeddings"):
                continue
            head = m.get_output_embeddings()
            if not isinstance(head, torch.nn.Module):
                continue
            prefix = getattr(m, "base_model_prefix", "")
            dec = getattr(m, prefix, None) if prefix else None
            if not isinstance(dec, torch.nn.Module) or dec is m:
                dec = m.get_decoder() if hasattr(m, "get_decoder") else None
            return m, head, dec if isinstance(dec, torch.nn.Module) and dec is not m else None
    raise NotImplementedError(
        f"rlvr_delta: the automatic DelTA coefficients need an engine whose .module holds a Hugging Face causal LM "
        f"with an lm_head (verl's fsdp / fsdp2 engines); got {type(engine).__name__}. Put the coefficients in the "
        f"batch field {DELTA_COEF_KEY!r} yourself (rlvr_kernels.delta_coefficients) for other engines"
    )


def _packed_hidden(engine, h: torch.Tensor, mb) -> torch.Tensor:
    """The captured hidden states of one micro-batch as ``[total_nnz, H]`` in the order of its nested ``input_ids``
    (the layout of verl's ``log_probs`` model output)."""
    ids = mb["input_ids"]
    if not (isinstance(ids, torch.Tensor) and ids.is_nested):
        raise NotImplementedError(
            "rlvr_delta: the automatic coefficients need verl's no-padding batch layout "
            "(nested input_ids, left_right_2_no_padding)"
        )
    offsets = ids.offsets()
    nnz = int(offsets[-1])
    if _tu_get(mb, "use_remove_padding", True):
        h = h.reshape(-1, h.shape[-1])  # (1, nnz_local + pad, H)
        sp = int(getattr(engine, "ulysses_sequence_parallel_size", 1) or 1)
        pad = h.shape[0] * sp - nnz
        if sp > 1 or pad:
            gather = getattr(engine, "_gather_and_unpad_packed", None)
            if gather is not None:
                h = gather(h, pad)
            elif sp == 1:
                h = h[:nnz]
            else:
                raise NotImplementedError(
                    "rlvr_delta: this engine has sequence parallelism but no "
                    "_gather_and_unpad_packed to gather the hidden states"
                )
    else:  # padded (bs, max_seq_len, H), right-padded per sequence (prepare_model_inputs)
        lens = offsets.diff().to(h.device)
        h = h[torch.arange(h.shape[1], device=h.device)[None, :] < lens[:, None]]
    if h.shape[0] != nnz:
        raise RuntimeError(
            f"rlvr_delta: captured {h.shape[0]} hidden states for {nnz} tokens (unsupported engine layout)"
        )
    return h


def _tu_get(data, key, default=None):
    from verl.utils import tensordict_utils as tu

    return tu.get_non_tensor_data(data=data, key=key, default=default)


def _delta_forward(worker, td_base, visit: Callable) -> None:
    """One no-grad forward of the actor (theta_old) over the rank's batch through verl's engine; calls
    ``visit(mb, h_packed)`` per micro-batch with the lm_head input ``[total_nnz, H]``."""
    from verl.utils import tensordict_utils as tu

    engine = worker.engine
    _, head, dec = _causal_lm(engine)
    td = td_base.copy()  # shallow: the engine writes non-tensor keys into it
    ec = getattr(worker, "engine_config", None)
    mc = getattr(worker, "model_config", None) or {}

    def cfg(name, fallback=None):
        v = getattr(ec, name, None) if ec is not None else None
        return fallback if v is None else v

    defaults = dict(  # as TrainingWorker.infer_batch
        use_remove_padding=mc.get("use_remove_padding", False) if hasattr(mc, "get") else False,
        use_dynamic_bsz=cfg("use_dynamic_bsz", False),
        max_token_len_per_gpu=cfg("infer_max_token_len_per_gpu", cfg("max_token_len_per_gpu")),
        micro_batch_size_per_gpu=cfg("infer_micro_batch_size_per_gpu", cfg("micro_batch_size_per_gpu")),
        use_fused_kernels=cfg("use_fused_kernels", False),
    )
    tu.assign_non_tensor(td, **{k: v for k, v in defaults.items() if k not in td.keys()})
    tu.assign_non_tensor(
        td,
        calculate_entropy=False,
        calculate_sum_pi_squared=False,
        distillation_use_topk=False,
        distillation_only=False,
        compute_loss=True,
        return_model_output=False,
    )
    cap: dict = {}

    def pre(_mod, args, kwargs):
        x = args[0] if args else kwargs.get("input", None)
        if isinstance(x, torch.Tensor):
            cap["head"] = x.detach()

    def post(_mod, _args, _kwargs, out):
        x = out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out
        if isinstance(x, torch.Tensor):
            cap["decoder"] = x.detach()

    def collect(model_output=None, data=None, dp_group=None, **_):
        h = cap.get("head", cap.get("decoder"))
        cap.clear()
        if h is None:
            raise RuntimeError("rlvr_delta: no hidden state was captured during the actor forward")
        visit(data, _packed_hidden(engine, h, data))
        return torch.zeros(()), {}

    hooks = [head.register_forward_pre_hook(pre, with_kwargs=True)]
    if dec is not None:
        hooks.append(dec.register_forward_hook(post, with_kwargs=True))
    try:
        with engine.eval_mode():
            engine.infer_batch(td, loss_function=collect)
    finally:
        for hk in hooks:
            hk.remove()


def delta_for_update(worker, data, config, ctx) -> Optional[str]:
    """Compute ``rlvr_delta_coef`` for the rank's rollout batch ``data`` (a ``rlvr_delta*`` loss only).

    Returns where the coefficients come from: ``"context"`` (``loss_context(delta_coefficients=)``), ``"batch"``
    (a batch field the user set: both take precedence and nothing is computed), ``"computed"``, or None."""
    spec = spec_of(config)
    if spec is None or "coefficients" not in spec.rule.needs:
        return None
    if ctx.get("delta_coef") is not None:
        return "context"
    if DELTA_COEF_KEY in data.keys():
        return "batch"
    missing = [k for k in ("advantages", "old_log_probs", "response_mask") if k not in data.keys()]
    if missing:
        raise ValueError(f"{spec.name}: the DelTA coefficients need the batch fields {missing} at update_actor")
    from rlvr_kernels.delta import DeltaEstimator

    opts = options_of(config)
    mask = (_padded_response(data.get("response_mask")) != 0).cpu()  # bookkeeping on the host
    bs, R = mask.shape
    adv = _fit_width(_padded_response(data.get("advantages")).float().cpu(), R)
    old = _fit_width(_padded_response(data.get("old_log_probs")).float().cpu(), R)
    coef = torch.zeros(bs, R, dtype=torch.float32)
    lam_min, lam_max = float(opts.delta_coef_lam_min), float(opts.delta_coef_lam_max)
    if lam_min == lam_max:  # c = 1 on every valid token: no forward needed
        data[DELTA_COEF_KEY] = _as_layout_of(data.get("advantages"), mask.to(torch.float32))
        return "computed"
    all_reduce = None
    if opts.delta_coef_all_reduce:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("policy_loss.rlvr.delta_coef_all_reduce=true needs torch.distributed (the DP group)")
        group = worker.engine.get_data_parallel_group() if hasattr(worker.engine, "get_data_parallel_group") else None
        all_reduce = functools.partial(torch.distributed.all_reduce, group=group)
    _, head, _ = _causal_lm(worker.engine)
    H = getattr(head, "in_features", None)
    est = DeltaEstimator(
        iters=int(opts.delta_coef_iters),
        lam_min=lam_min,
        lam_max=lam_max,
        exclude_zero_adv=bool(opts.delta_coef_exclude_zero_adv),
        all_reduce=all_reduce,
        backend=opts.backend,
        hidden_size=H if isinstance(H, int) else None,
    )
    td = data.copy()
    td[_DELTA_ROW_KEY] = torch.arange(bs, device=data.get("response_mask").device)
    cache = opts.delta_coef_hidden_cache

    def tokens(mb, h):
        """One micro-batch's valid response tokens: ``(rows, sel, h [n, H], old [n], adv [n])``."""
        from verl.workers.utils.padding import no_padding_2_padding

        if est.device is None:
            est.device = h.device  # lets a rank without valid tokens still take part in the all-reduce
        rows = mb[_DELTA_ROW_KEY].long().cpu()
        hr = no_padding_2_padding(h, mb)  # [b, R_mb, H], position t = the state that predicts response token t
        w = min(hr.shape[1], R)
        sel = mask[rows, :w]
        hv = hr[:, :w][sel.to(hr.device)]
        return rows, sel, hv, old[rows, :w][sel], adv[rows, :w][sel]

    def feed(mb_tokens, fn):
        rows, sel, hv, ov, av = mb_tokens
        n = hv.shape[0]
        if n == 0:
            return None
        dev = hv.device if cache != "cpu" else est.device
        hv = hv.to(dev)
        return fn(
            hv,
            ov.to(dev),
            av.to(dev),
            torch.ones(n, dtype=torch.bool, device=dev),
            cu_seqlens=torch.tensor([0, n], dtype=torch.int32, device=dev),
        )

    def write(mb_tokens, c):
        rows, sel, _, _, _ = mb_tokens
        if c is None:
            return
        block = torch.zeros(sel.shape, dtype=torch.float32)
        block[sel] = c.float().cpu()
        coef[rows, : sel.shape[1]] = block

    def accumulate(mb, h):
        t = tokens(mb, h)
        write(t, feed(t, est.accumulate))  # the last phase returns the raw coefficients (None before)

    n_forwards = 0
    if cache == "none":  # stream: one forward per phase (K + 3), never more than one micro-batch of h
        for _phase in est.phases():
            _delta_forward(worker, td, accumulate)
            n_forwards += 1
    else:  # one forward; the response tokens' hidden states are kept on the host / the device
        store: list = []

        def keep(mb, h):
            rows, sel, hv, ov, av = tokens(mb, h)
            store.append((rows, sel, hv.cpu() if cache == "cpu" else hv, ov, av))

        _delta_forward(worker, td, keep)
        n_forwards = 1
        for _phase in est.phases():
            for t in store:
                write(t, feed(t, est.accumulate))
        store.clear()
    coef = est.normalise(coef, adv, mask)
    data[DELTA_COEF_KEY] = _as_layout_of(data.get("advantages"), coef)
    logger.debug("rlvr_kernels: DelTA coefficients of %d responses from %d no-grad forward(s)", bs, n_forwards)
    return "computed"
