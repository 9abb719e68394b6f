"""The fused forward for verl's ``use_fused_kernels`` (:func:`patch_forward_with_rlvr`) and the hooks that route
``fused_kernel_options.impl_backend=rlvr`` (``rlvr_triton``, ``rlvr_torch``) to it.

- ``verl.models.transformers.monkey_patch.patch_forward_with_backends`` accepts the ``rlvr*`` backends and then
  installs :func:`patch_forward_with_rlvr` (:func:`wrap_patch_forward_with_backends`);
- ``FSDPEngineWithLMHead.prepare_model_inputs`` / ``prepare_model_outputs`` (:func:`wrap_prepare_model_inputs`,
  :func:`wrap_prepare_model_outputs`): verl's optimal-token baseline (``calculate_sum_pi_squared``) with the rlvr
  forward: the forward also returns ``sum_pi_squared`` (:func:`log_sum_sq_rows`, no logits), which verl's fused path
  refuses for its own backends; and a per-sample temperature (a ``(bsz,)`` tensor, which verl's fused path asserts
  against for its own backends) reaches the rlvr forward per token, in the labels' layout;
- ``EngineRegistry.new`` installs the Megatron form (:mod:`.megatron`) for ``impl_backend=rlvr*`` on verl's own
  Megatron engine, and refuses it with ``use_fused_kernels`` on any other engine that never reads it (every strategy
  but ``fsdp`` / ``fsdp2``) instead of letting it be silently ignored (:func:`wrap_engine_new`).
"""

from __future__ import annotations

import functools
import types

import torch

from rlvr_kernels.integrations._verl.context import logger
from rlvr_kernels.integrations._verl.megatron import route_megatron_engine
from rlvr_kernels.integrations._verl.sum_sq import log_sum_sq_rows
from rlvr_kernels.logprobs import fused_linear_logprobs

# model types for which verl ships its own (multimodal) fused forward; ours only handles text causal LMs
_UNSUPPORTED_MODEL_TYPES = (
    "qwen2_5_vl",
    "qwen2_vl",
    "qwen3_vl",
    "qwen3_vl_moe",
    "glm4v",
    "qwen3_5",
    "qwen3_5_moe",
    "kimi_vl",
)

#: ``fused_kernel_options.impl_backend`` values of this plug-in -> the ``backend`` of the fused forward.
FORWARD_BACKENDS = {"rlvr": "auto", "rlvr_triton": "triton", "rlvr_torch": "torch"}

# verl strategies whose engine passes fused_kernel_options.impl_backend to patch_forward_with_backends (verl 0.9.1:
# FSDPEngine._build_module -> apply_monkey_patch); every other engine never reads impl_backend
_FORWARD_BACKEND_STRATEGIES = ("fsdp", "fsdp2")


#: The micro-batch flag verl's engines read for the optimal-token baseline, and the output key they return.
SUM_PI_SQUARED = "sum_pi_squared"
#: The keyword :func:`wrap_prepare_model_inputs` passes the rlvr forward to ask for ``sum_pi_squared``.
SUM_PI_SQUARED_KWARG = "rlvr_sum_pi_squared"


def _head_logprobs(head, hidden, labels, temperature, backend: str, sum_sq: bool = False):
    """``fused_linear_logprobs`` of ``hidden`` through ``head`` (its ``weight`` / ``bias``) at ``labels``; with
    ``sum_sq`` also ``sum_v p_v^2`` (fp32, hidden's leading shape, no gradient) as a third element. ``temperature``:
    a float, or a float tensor of ``labels``' shape (one per token)."""
    weight, bias = head.weight, getattr(head, "bias", None)
    dev = hidden.device.type
    # Under autocast the GEMM runs in the autocast dtype (as a plain lm_head would); our op then keeps its fp32
    # statistics and dtype checks, so autocast is disabled inside it.
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    with torch.autocast(device_type=dev, enabled=False):
        h, w, b = hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt)
        logp, ent = fused_linear_logprobs(h, w, labels, bias=b, temperature=temperature, backend=backend)
        if not sum_sq:
            return logp, ent
        lss, _ = log_sum_sq_rows(h, w, b, temperature, backend)
    return logp, ent, lss.exp().reshape(hidden.shape[:-1])


def _is_fsdp2_unit(module) -> bool:
    """Whether ``module`` is an FSDP2 (``fully_shard``) unit: its parameters are sharded ``DTensor`` s outside its
    forward."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return False
    return isinstance(module, FSDPModule)


# the lm_head method registered as an FSDP2 forward method (see _fsdp2_head_method)
_HEAD_METHOD = "_rlvr_linear_logprobs"


def _fsdp2_head_method(head):
    """``head``'s :func:`_head_logprobs` run as an FSDP2 forward of ``head``.

    verl's ``apply_fsdp2`` (``_select_fsdp2_wrap_targets``) makes an untied ``lm_head`` an FSDP2 unit of its own; the
    fused forward reads its weight without calling it, and FSDP2 unshards a unit only around its forward. Registered
    with ``torch.distributed.fsdp.register_fsdp_forward_method``, the op runs between the unit's own pre-/post-forward
    (all-gather of the weight, reshard after the forward when ``reshard_after_forward``, re-gather before the backward,
    and the post-backward reduce-scatter of the gradient, averaged over the ranks, into the sharded ``.grad``),
    exactly as when verl's non-fused forward calls ``lm_head``. The sharding verl chose is left as it is."""
    method = head.__dict__.get(_HEAD_METHOD)
    if method is None:
        try:
            from torch.distributed.fsdp import register_fsdp_forward_method
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import register_fsdp_forward_method

        setattr(head, _HEAD_METHOD, types.MethodType(_head_logprobs, head))
        register_fsdp_forward_method(head, _HEAD_METHOD)
        method = head.__dict__[_HEAD_METHOD]
    return method


def _forward_temperature(temperature, labels):
    """The forward's ``temperature`` keyword -> a float (a number or a one-element tensor: the scalar path), or a
    float32 tensor of ``labels``' shape (one temperature per token; a ``(bsz,)`` tensor for ``(bsz, L)`` labels is
    one per sample, expanded along the sequence)."""
    if not isinstance(temperature, torch.Tensor):
        return float(temperature)
    if temperature.numel() == 1:
        return float(temperature.item())
    t = temperature.detach()
    if t.dim() == 1 and labels.dim() == 2 and t.shape[0] == labels.shape[0]:
        t = t.unsqueeze(1)  # one per sample
    try:
        t = t.expand(labels.shape)
    except RuntimeError:
        raise ValueError(
            f"the rlvr fused forward takes a number or one temperature per token (labels' shape "
            f"{tuple(labels.shape)}, or one per sample), got a tensor of shape {tuple(temperature.shape)}"
        ) from None
    return t.to(device=labels.device, dtype=torch.float32).contiguous()


def _rlvr_forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    output_attentions=None,
    output_hidden_states=None,
    return_dict=None,
    cache_position=None,
    logits_to_keep=0,
    temperature=1.0,
    shift_labels=None,
    rlvr_sum_pi_squared=False,
    **kwargs,
):
    from verl.models.transformers.dense_common import CausalLMOutputForPPO

    base = getattr(self, self.base_model_prefix, None) if getattr(self, "base_model_prefix", "") else None
    if base is None:
        base = self.get_decoder()
    extra = dict(kwargs)
    if output_attentions is not None:
        extra["output_attentions"] = output_attentions
    if output_hidden_states is not None:
        extra["output_hidden_states"] = output_hidden_states
    outputs = base(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        cache_position=cache_position,
        **extra,
    )
    hidden = outputs[0]
    # verl's convention: the label of position t is the token at t + 1 (wrapping at the end); the engine passes
    # globally rolled ``shift_labels`` on its packed path.
    if shift_labels is not None:
        rolled = shift_labels
    elif labels is not None:
        rolled = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise RuntimeError("the rlvr fused forward needs input_ids, labels or shift_labels")
    temperature = _forward_temperature(temperature, rolled)
    head = self.get_output_embeddings()
    backend = getattr(self, "_rlvr_backend", "auto")
    args = (hidden, rolled.long(), temperature, backend)
    kw = {"sum_sq": True} if rlvr_sum_pi_squared else {}
    if _is_fsdp2_unit(head):
        res = _fsdp2_head_method(head)(*args, **kw)
    else:
        res = _head_logprobs(head, *args, **kw)
    out = CausalLMOutputForPPO(
        log_probs=res[0],
        entropy=res[1],
        past_key_values=getattr(outputs, "past_key_values", None),
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
    )
    if rlvr_sum_pi_squared:  # not a field of verl's output class: an attribute, read by wrap_prepare_model_outputs
        object.__setattr__(out, SUM_PI_SQUARED, res[2])
    return out if return_dict is not False else out.to_tuple()


def patch_forward_with_rlvr(model, *, backend: str = "auto"):
    """Make ``model(...)`` (a Hugging Face causal LM) return verl's ``CausalLMOutputForPPO(log_probs, entropy)``.

    Same contract as verl's ``use_fused_kernels`` forwards (``verl.models.transformers.dense_common``): keyword
    ``temperature`` (a float; or, unlike verl's, a float tensor with one temperature per token of the labels' shape,
    or one per sample for ``(bsz, L)`` inputs, as :func:`wrap_prepare_model_inputs` passes verl's per-sample
    temperature), labels rolled by -1 (``shift_labels`` when given, else ``labels``, else
    ``input_ids``), ``log_probs`` and ``entropy`` fp32 with the leading shape of ``input_ids``, both differentiable;
    computed by :func:`rlvr_kernels.fused_linear_logprobs` from the last hidden states and ``lm_head`` without the
    ``[tokens, vocab]`` logits (on the Triton backend). With ``rlvr_sum_pi_squared=True`` the output also has the
    attribute ``sum_pi_squared`` (``sum_v p_v^2`` at the same temperature, fp32, same shape, no gradient) for verl's
    optimal-token baseline. Patches this instance only; returns ``model``.
    ``backend`` as in :func:`rlvr_kernels.fused_linear_logprobs`.
    """
    from rlvr_kernels._backend import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype in _UNSUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"the rlvr fused forward handles text causal LMs; {mtype!r} has its own multimodal "
            "forward in verl (use fused_kernel_options.impl_backend=triton|torch for it)"
        )
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise ValueError("patch_forward_with_rlvr needs a causal LM with an lm_head (get_output_embeddings())")
    model.forward = types.MethodType(_rlvr_forward, model)
    model._rlvr_backend = backend
    model._verl_fused_kernels_backend = "rlvr"
    return model


def wrap_patch_forward_with_backends(orig):
    """``patch_forward_with_backends``: the ``rlvr*`` backends install :func:`patch_forward_with_rlvr`."""
    if getattr(orig, "_rlvr_wrapped", False):
        return orig

    @functools.wraps(orig)
    def patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend=None, *args, **kwargs):
        if use_fused_kernels and fused_kernels_backend in FORWARD_BACKENDS:
            patch_forward_with_rlvr(model, backend=FORWARD_BACKENDS[fused_kernels_backend])
            logger.info("rlvr_kernels: fused log-prob/entropy forward installed on %s", type(model).__name__)
            return None
        return orig(model, use_fused_kernels, fused_kernels_backend, *args, **kwargs)

    patch_forward_with_backends._rlvr_wrapped = True
    return patch_forward_with_backends


def _check_forward_backend(backend, model_config, engine_name: str) -> None:
    opts = getattr(model_config, "fused_kernel_options", None)
    impl = opts.get("impl_backend", None) if hasattr(opts, "get") else None
    if impl not in FORWARD_BACKENDS or backend in _FORWARD_BACKEND_STRATEGIES:
        return
    setting = f"actor_rollout_ref.model.fused_kernel_options.impl_backend={impl}"
    if bool(getattr(model_config, "use_fused_kernels", False)):
        raise NotImplementedError(
            f"{setting} is not supported by verl's {backend!r} engine ({engine_name}), which never reads "
            f"impl_backend and would silently ignore it. The rlvr fused forward needs "
            f"actor_rollout_ref.actor.strategy=fsdp or fsdp2, or verl's own Megatron engine (MegatronEngine); on "
            f"{backend!r} drop the override (or use verl's own impl_backend)"
        )
    logger.warning(
        "rlvr_kernels: %s has no effect on verl's %r engine (%s), which never reads impl_backend "
        "(and use_fused_kernels is off); the rlvr fused forward needs strategy=fsdp or fsdp2 or verl's Megatron engine",
        setting,
        backend,
        engine_name,
    )


def wrap_engine_new(orig):
    """``EngineRegistry.new`` (TrainingWorker builds every engine through it): install the Megatron form of the
    rlvr forward for verl's Megatron engine, refuse ``impl_backend=rlvr`` for an engine that would ignore it."""
    func = orig.__func__ if isinstance(orig, classmethod) else orig
    if getattr(func, "_rlvr_wrapped", False):
        return orig

    @functools.wraps(func)
    def new(cls, model_type, backend, *args, **kwargs):
        mc = kwargs.get("model_config", None)
        if mc is not None and hasattr(getattr(mc, "fused_kernel_options", None), "get"):
            try:
                engine_cls = cls.get_engine_cls(model_type, backend)
            except Exception:  # no such engine: verl's own error comes from func below
                engine_cls = None
            ec = kwargs.get("engine_config", None)
            if engine_cls is not None and not route_megatron_engine(engine_cls, mc, FORWARD_BACKENDS, ec):
                _check_forward_backend(backend, mc, engine_cls.__name__)
        return func(cls, model_type, backend, *args, **kwargs)

    new._rlvr_wrapped = True
    return classmethod(new)


# ----------------------------------------------------------------------------------------------------------------
# verl's optimal-token baseline (actor.calculate_sum_pi_squared) on the FSDP engine


def _flag(micro_batch, key: str, default):
    from verl.utils import tensordict_utils as tu

    return tu.get_non_tensor_data(data=micro_batch, key=key, default=default)


def _is_rlvr_module(module) -> bool:
    """Whether the engine's module (FSDP1 forwards attribute look-ups to the wrapped model; FSDP2 keeps the
    instance) carries the rlvr fused forward (:func:`patch_forward_with_rlvr`)."""
    for _ in range(4):
        if not isinstance(module, torch.nn.Module):
            return False
        if getattr(module, "_verl_fused_kernels_backend", None) == "rlvr":
            return True
        inner = module._modules
        module = inner.get("_fsdp_wrapped_module", None) or inner.get("module", None)
    return False


def _temperature_of(micro_batch):
    try:
        return micro_batch["temperature"]
    except KeyError:  # verl's own code raises its error
        return None


def _with_flags(micro_batch, **flags):
    """A shallow copy of the micro-batch with these non-tensor flags (the caller's is left as it is)."""
    from verl.utils import tensordict_utils as tu

    copy = micro_batch.copy()
    tu.assign_non_tensor(copy, **flags)
    return copy


def _per_sample_temperature_inputs(self, orig, micro_batch, args, kwargs):
    """verl's ``prepare_model_inputs`` for a per-sample temperature with the rlvr forward. verl asserts a scalar
    temperature with ``use_fused_kernels``; its non-fused path already lays the per-sample temperature out per token
    (``output_args["temperature_rmpad"]``: expanded over the packed sequence, padded with 1, Ulysses-sliced exactly
    like ``input_ids_rmpad_rolled``). So verl's own code runs with ``use_fused_kernels=False`` (the flag only decides
    that assertion and these extra arguments), and the arguments verl's fused path adds are added here, the scalar
    ``temperature`` replaced by the per-token tensor aligned with the labels."""
    model_inputs, output_args = orig(self, _with_flags(micro_batch, use_fused_kernels=False), *args, **kwargs)
    if _flag(micro_batch, "use_remove_padding", True):
        labels = output_args["input_ids_rmpad_rolled"].unsqueeze(0)  # (1, total_nnz (+ pad) [/ sp])
        temperature = output_args["temperature_rmpad"].unsqueeze(0)
        model_inputs["shift_labels"] = labels
    else:
        labels = model_inputs["input_ids"]  # (bsz, max_seq_len), rolled inside the forward
        temperature = output_args["temperature"].unsqueeze(1).expand(labels.shape)
    if temperature.shape != labels.shape:  # a layout this verl does not build: never a silent misalignment
        raise RuntimeError(
            f"rlvr_kernels: per-token temperature {tuple(temperature.shape)} does not match the labels "
            f"{tuple(labels.shape)}"
        )
    model_inputs["temperature"] = temperature.to(torch.float32).contiguous()
    model_inputs["return_dict"] = True
    return model_inputs, output_args


def wrap_prepare_model_inputs(orig):
    """``FSDPEngineWithLMHead.prepare_model_inputs`` with ``use_fused_kernels`` and the rlvr forward on the module:

    - a per-sample temperature (a ``(bsz,)`` tensor, which verl's fused path asserts against) reaches the forward
      as a per-token tensor in the labels' layout (:func:`_per_sample_temperature_inputs`); a scalar one goes
      through verl's code unchanged;
    - when the micro-batch asks for ``calculate_sum_pi_squared``, ask that forward for ``sum_pi_squared`` too.

    Anything else (verl's own fused backends included) is verl's code as it is."""
    if getattr(orig, "_rlvr_wrapped", False):
        return orig

    @functools.wraps(orig)
    def prepare_model_inputs(self, micro_batch, *args, **kwargs):
        rlvr = _flag(micro_batch, "use_fused_kernels", False) and _is_rlvr_module(getattr(self, "module", None))
        if rlvr and isinstance(_temperature_of(micro_batch), torch.Tensor):
            model_inputs, output_args = _per_sample_temperature_inputs(self, orig, micro_batch, args, kwargs)
        else:
            model_inputs, output_args = orig(self, micro_batch, *args, **kwargs)
        if rlvr and _flag(micro_batch, "calculate_sum_pi_squared", False):
            model_inputs[SUM_PI_SQUARED_KWARG] = True
        return model_inputs, output_args

    prepare_model_inputs._rlvr_wrapped = True
    return prepare_model_inputs


def _without_sum_pi_squared(micro_batch):
    """A shallow copy of the micro-batch with ``calculate_sum_pi_squared=False`` (the caller's is left as it is)."""
    return _with_flags(micro_batch, calculate_sum_pi_squared=False)


def _sum_pi_squared_layout(self, value, output_args, micro_batch):
    """The rlvr forward's ``sum_pi_squared`` laid out as verl's ``prepare_model_outputs`` lays out ``log_probs`` on
    its fused path: nested/jagged ``(bsz, j1)`` over the micro-batch's sequences."""
    input_ids = micro_batch["input_ids"]
    cu_seqlens = input_ids.offsets()
    if _flag(micro_batch, "use_remove_padding", True):
        # packed [1, total_nnz (+ pad, / sp)]: gather across the Ulysses group and drop the packing pad, as verl does
        v = self._gather_and_unpad_packed(value.squeeze(0), output_args["pad_size"])
    else:
        seq_lengths = cu_seqlens.diff()
        mask = torch.arange(value.shape[1], device=value.device) < seq_lengths.unsqueeze(1)
        v = value[mask]
    return torch.nested.nested_tensor_from_jagged(v.float(), cu_seqlens)


def wrap_prepare_model_outputs(orig):
    """``FSDPEngineWithLMHead.prepare_model_outputs``: verl refuses ``calculate_sum_pi_squared`` with
    ``use_fused_kernels`` (its fused kernels never materialise the logits). When the forward's output carries
    ``sum_pi_squared`` (only the rlvr forward puts it there, asked by :func:`wrap_prepare_model_inputs`), verl's
    own processing runs without the flag and ``model_output["sum_pi_squared"]`` is ours; otherwise (verl's own fused
    backends) verl's check raises as before."""
    if getattr(orig, "_rlvr_wrapped", False):
        return orig

    @functools.wraps(orig)
    def prepare_model_outputs(self, output, output_args, micro_batch, *args, **kwargs):
        value = getattr(output, SUM_PI_SQUARED, None)
        if (
            value is None
            or not _flag(micro_batch, "calculate_sum_pi_squared", False)
            or not _flag(micro_batch, "use_fused_kernels", False)
        ):
            return orig(self, output, output_args, micro_batch, *args, **kwargs)
        model_output = orig(self, output, output_args, _without_sum_pi_squared(micro_batch), *args, **kwargs)
        model_output[SUM_PI_SQUARED] = _sum_pi_squared_layout(self, value, output_args, micro_batch)
        return model_output

    prepare_model_outputs._rlvr_wrapped = True
    return prepare_model_outputs
