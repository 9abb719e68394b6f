"""The package's log-prob / entropy op inside verl's Megatron fused forward, with tensor parallelism.

verl's Megatron engine (``use_fused_kernels=True``) computes log-probs and entropies in
``verl.models.mcore.model_forward_fused``: in hook mode (Megatron-Core >= 0.18, ``GPTModel.forward`` takes
``output_processor`` / ``output_processor_context``) through ``fused_output_processor``, in legacy mode through a
patched ``GPTModel.forward`` (``_fused_GPTModel_forward``); both end in verl's Triton kernel
``linear_cross_entropy(hidden, weight, labels, temperature, "none", tp_group)``. This module puts
:func:`rlvr_kernels.fused_linear_logprobs` there, vocabulary-parallel over Megatron's tensor-parallel group:

- :func:`megatron_fused_output_processor`: the hook-mode processor, with the signature and return value of verl's
  ``fused_output_processor`` (keyword arguments from Megatron's ``GPTModel._postprocess``; returns verl's
  ``CausalLMOutputForPPO`` with ``log_probs`` and ``entropy`` fp32 ``[tokens]``);
- :func:`install_megatron_forward` (done by the ``EngineRegistry.new`` hook for
  ``fused_kernel_options.impl_backend=rlvr*`` on verl's own Megatron engine): points ``model_forward_fused``'s
  ``fused_output_processor`` at ours, and its legacy ``GPTModel.forward`` at verl's own, run with our op in place of
  ``linear_cross_entropy``. Per process and idempotent; :func:`uninstall_megatron_forward` restores verl's.

What Megatron hands the output layer, and what this module does with it:

- the weight is this tensor-parallel rank's contiguous vocabulary rows (``ColumnParallelLinear``, or the
  ``VocabParallelEmbedding`` weight for tied embeddings: the same split), ``[V_local, H]`` with rows
  ``[rank * V_local, (rank + 1) * V_local)`` (``VocabUtility.vocab_range_from_per_partition_vocab_size``);
  the group is the output layer's ``tp_group`` where it has one, else
  ``parallel_state.get_tensor_model_parallel_group()`` (what verl passes to its kernel); labels are global ids;
- hidden states ``[s, b, h]`` (labels ``[b, s]``; verl packs THD, b = 1); with ``config.sequence_parallel`` they are
  sequence-sharded and gathered first with Megatron's ``gather_from_sequence_parallel_region``, as verl does;
- d hidden: Megatron's ``ColumnParallelLinear`` reduces its input gradient itself: with sequence parallelism the
  gather's backward reduce-scatters it, without it the layer all-reduces it (``allreduce_dgrad``). The fused path
  never runs the layer, so: with sequence parallelism the op returns each rank's partial sum
  (``grad_hidden="partial"``) and the gather's reduce-scatter sums it; without, the op all-reduces it
  (``grad_hidden="full"``), as the layer would. (verl's own kernel returns the partial sum in both cases, so its
  fused path is only right under sequence parallelism, verl's default for TP > 1.)
- dW is the shard's own; non-last pipeline stages never reach the processor (Megatron and verl's legacy forward
  return the hidden states there); context parallelism needs nothing (each rank's tokens are its own rows).

verl's optimal-token baseline (``actor.calculate_sum_pi_squared``), which verl refuses on its fused path: with the
rlvr forward installed, :func:`wrap_megatron_forward_step` (hooked on ``MegatronEngineWithLMHead.forward_step``) lets
the micro-batch through verl's check, the processor (or the legacy ``linear_cross_entropy``) also computes
``sum_v p_v^2`` per token (:func:`vocab_parallel_sum_pi_squared`: each shard's ``log sum exp(2 z)`` and ``lse``,
combined exactly over the group, no logits), verl's ``postprocess_thd_engine`` lays it out as it lays out the
log-probs, and ``forward_step``'s output gets ``sum_pi_squared``. verl's own fused backends still raise.

User guide and what is tested: ``docs/integrations/verl-megatron.md`` (the optimal-token baseline has a section
there).
"""

from __future__ import annotations

import contextvars
import inspect
import sys
from collections import OrderedDict
from typing import Optional

import torch

from rlvr_kernels.integrations._verl.context import logger, warn_once
from rlvr_kernels.logprobs import fused_linear_logprobs

#: The module whose globals the fused forward looks up at call time.
FUSED_MODULE = "verl.models.mcore.model_forward_fused"
#: The module of verl's Megatron engine (imported when the engine is registered).
ENGINE_MODULE = "verl.workers.engine.megatron.transformer_impl"

# process state of this module (one copy per worker process): the op's backend and verl's replaced globals
_STATE: dict = {"backend": "auto", "originals": None}
# set while verl's legacy GPTModel.forward runs under install_megatron_forward: what its linear_cross_entropy
# call needs beyond its six arguments (sequence parallelism decides grad_hidden)
_LEGACY_SCOPE: contextvars.ContextVar = contextvars.ContextVar("rlvr_megatron_legacy_scope", default=None)
# set by wrap_megatron_forward_step around verl's forward_step: {"want": bool, "pending": [tokens] or None,
# "result": verl's layout or None}
_SUM_SQ_SCOPE: contextvars.ContextVar = contextvars.ContextVar("rlvr_megatron_sum_sq_scope", default=None)
#: The micro-batch flag / output key of verl's optimal-token baseline.
SUM_PI_SQUARED = "sum_pi_squared"


# ----------------------------------------------------------------------------------------------------------------
# the computation


def _tp_group(output_layer):
    group = getattr(output_layer, "tp_group", None)
    if group is not None:
        return group
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _gather_sequence_parallel(hidden_states, group):
    """Megatron's ``gather_from_sequence_parallel_region`` (forward all-gather, backward reduce-scatter)."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region as gather

    if "group" in inspect.signature(gather).parameters:
        return gather(hidden_states, group=group)
    return gather(hidden_states)


def _world(group) -> int:
    if group is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(group)


def _label_order(hidden_states, labels):
    """Hidden states in the labels' token order: Megatron's ``[s, b, h]`` to ``[b, s, h]``; flattened to
    ``[tokens, h]`` (labels ``[tokens]``) when the shapes still differ."""
    h = hidden_states
    if h.dim() == 3 and labels.dim() == 2 and tuple(labels.shape) == (h.shape[1], h.shape[0]):
        h = h.transpose(0, 1)  # Megatron's [s, b, h] to the labels' [b, s]
    if tuple(h.shape[:-1]) != tuple(labels.shape):
        h = h.reshape(-1, h.shape[-1])
        labels = labels.reshape(-1)
    return h, labels


def vocab_parallel_sum_pi_squared(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    *,
    tp_group=None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``sum_v p_v^2`` fp32 ``[tokens]`` (fp64 for fp64 inputs; the labels' order, as
    :func:`vocab_parallel_logprobs`) of ``softmax(hidden @ W.T / temperature)`` over the full vocabulary, from this
    rank's shard ``weight`` ``[V_local, H]``: verl's ``vocab_parallel_sum_pi_squared`` without the logits. Each shard's
    ``log sum_v exp(2 z_v)`` and ``lse`` (one chunked pass, :func:`.sum_sq.log_sum_sq_rows`) are all-gathered
    (``2 N`` floats per rank) and combined exactly: ``logsumexp_r(log S2_r) - 2 logsumexp_r(lse_r)``. Identical on
    every rank; no gradient (verl reads it in ``compute_log_prob`` only). ``labels`` only fix the token order."""
    from rlvr_kernels.integrations._verl.sum_sq import log_sum_sq_rows

    h, labels = _label_order(hidden_states, labels)
    if isinstance(temperature, torch.Tensor):
        temperature = float(temperature.item())
    dev = h.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    lss, lse = log_sum_sq_rows(h.to(dt), weight.to(dt), None, float(temperature), backend or _STATE["backend"])
    world = _world(tp_group)
    if world > 1:
        with torch.no_grad():
            mine = torch.stack([lse, lss + 2.0 * lse])  # [2, N]: this shard's lse and log sum exp(2 z)
            parts = [torch.empty_like(mine) for _ in range(world)]
            torch.distributed.all_gather(parts, mine.contiguous(), group=tp_group)
            both = torch.stack(parts)  # [world, 2, N]
            lss = torch.logsumexp(both[:, 1], 0) - 2.0 * torch.logsumexp(both[:, 0], 0)
    return lss.exp().reshape(-1)


def _stash_sum_sq(hidden_states, weight, labels, temperature, group) -> Optional[torch.Tensor]:
    """Inside :func:`wrap_megatron_forward_step` with the baseline asked for: compute ``sum_pi_squared`` and keep it
    for verl's ``postprocess_thd_engine``; else nothing."""
    scope = _SUM_SQ_SCOPE.get()
    if scope is None or not scope.get("want"):
        return None
    value = vocab_parallel_sum_pi_squared(hidden_states, weight, labels, temperature, tp_group=group)
    scope["pending"] = value
    return value


def vocab_parallel_logprobs(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    *,
    tp_group=None,
    sequence_parallel_gathered: bool = False,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_probs, entropy)`` fp32 ``[tokens]`` of verl's Megatron fused path, from this rank's vocabulary shard.

    ``hidden_states`` ``[s, b, h]`` (as Megatron's decoder returns them, already gathered when sequence parallel)
    or ``[tokens, h]``; ``weight`` this rank's ``[V_local, H]`` rows, starting at global id
    ``rank * V_local``; ``labels`` global ids, ``[b, s]`` (or hidden's leading shape); outputs are flattened in
    the labels' order, as verl's ``linear_cross_entropy`` returns them (identical for verl's b = 1).
    ``sequence_parallel_gathered``: the hidden states came through ``gather_from_sequence_parallel_region``, whose
    backward reduce-scatters d hidden, so the op leaves each rank its partial sum; otherwise it all-reduces it.
    """
    h, labels = _label_order(hidden_states, labels)
    if isinstance(temperature, torch.Tensor):
        temperature = float(temperature.item())
    world = _world(tp_group)
    tp = {}
    if world > 1:
        rank = torch.distributed.get_rank(tp_group)
        tp = dict(
            tp_group=tp_group,
            vocab_start=rank * weight.shape[0],  # VocabUtility.vocab_range_from_per_partition_vocab_size
            grad_hidden="partial" if sequence_parallel_gathered else "full",
        )
    dev = h.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    with torch.autocast(device_type=dev, enabled=False):
        logp, ent = fused_linear_logprobs(
            h.to(dt),
            weight.to(dt),
            labels.long(),
            temperature=float(temperature),
            backend=backend or _STATE["backend"],
            **tp,
        )
    return logp.reshape(-1), ent.reshape(-1)


def _output_weight(output_layer, output_weight):
    # Megatron passes the shared embedding as output_weight for tied models; untied ones keep it on output_layer.
    if output_weight is not None:
        return output_weight
    weight = getattr(output_layer, "weight", None)
    if weight is None:
        raise RuntimeError(
            "rlvr_kernels: the Megatron output processor got neither output_weight nor output_layer.weight "
            "(it runs only on the last pipeline stage, where GPTModel has its output layer)"
        )
    return weight


def megatron_fused_output_processor(
    *,
    hidden_states,
    output_layer,
    output_weight,
    labels,
    context,
    config,
    **_ignored,
):
    """verl's ``fused_output_processor`` (hook mode) computed by :func:`rlvr_kernels.fused_linear_logprobs`.

    Same keywords (Megatron's ``GPTModel._postprocess`` passes them; ``context`` is verl's
    ``FusedOutputProcessorContext``, read for ``temperature``) and the same output: verl's ``CausalLMOutputForPPO``
    with ``hidden_states`` as given (before the sequence-parallel gather), ``log_probs`` and ``entropy`` fp32
    ``[tokens]``, identical on every tensor-parallel rank. See the module docstring for the group, the vocabulary
    range and the gradient of the hidden states.
    """
    from verl.utils.model import CausalLMOutputForPPO

    output = CausalLMOutputForPPO(
        loss=None, logits=None, past_key_values=None, hidden_states=hidden_states, attentions=None
    )
    weight = _output_weight(output_layer, output_weight)
    group = _tp_group(output_layer)
    sp = bool(getattr(config, "sequence_parallel", False)) and _world(group) > 1
    if sp:
        hidden_states = _gather_sequence_parallel(hidden_states, group)
    logprobs, entropy = vocab_parallel_logprobs(
        hidden_states,
        weight,
        labels,
        float(context.temperature),
        tp_group=group,
        sequence_parallel_gathered=sp,
    )
    sum_sq = _stash_sum_sq(hidden_states, weight, labels, float(context.temperature), group)
    _log_config(config, _ignored, logprobs, entropy)
    output.entropy = entropy
    output.log_probs = logprobs
    if sum_sq is not None:  # not a field of verl's output class: an attribute
        object.__setattr__(output, SUM_PI_SQUARED, sum_sq)
    return output


def _log_config(config, extra: dict, logprobs, entropy) -> None:
    """Megatron's config logger, as verl's processor feeds it (only when the user enabled it)."""
    try:
        from megatron.core.config_logger import has_config_logger_enabled, log_config_to_disk
    except ImportError:
        return
    if not has_config_logger_enabled(config):
        return
    payload = OrderedDict(
        {k: extra.get(k) for k in ("input_ids", "position_ids", "attention_mask", "decoder_input")}
        | {"logprobs": logprobs, "entropy": entropy}
    )
    log_config_to_disk(config, payload, prefix="input_and_logits")


# ----------------------------------------------------------------------------------------------------------------
# legacy mode: verl's own patched GPTModel.forward, with our op in place of linear_cross_entropy


def _legacy_gpt_forward(model, *args, **kwargs):
    """verl's ``_fused_GPTModel_forward`` (Megatron-Core < 0.18), its ``linear_cross_entropy`` call served by
    :func:`vocab_parallel_logprobs` (the only thing that call lacks is whether the hidden states were gathered:
    verl gathers them exactly when ``model.config.sequence_parallel``)."""
    verl_forward = _STATE["originals"]["_fused_GPTModel_forward"]
    token = _LEGACY_SCOPE.set({"sequence_parallel": bool(getattr(model.config, "sequence_parallel", False))})
    try:
        return verl_forward(model, *args, **kwargs)
    finally:
        _LEGACY_SCOPE.reset(token)


def _linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
    """``linear_cross_entropy`` as ``model_forward_fused`` calls it: ours inside the legacy forward above, verl's
    anywhere else."""
    scope = _LEGACY_SCOPE.get()
    if scope is None:
        return _STATE["originals"]["linear_cross_entropy"](
            hidden, weight, labels, temperature, reduction, dist_process_group
        )
    if reduction != "none":
        raise NotImplementedError(f"rlvr_kernels' Megatron forward computes per-token values (reduction={reduction!r})")
    sp = scope["sequence_parallel"] and _world(dist_process_group) > 1
    out = vocab_parallel_logprobs(
        hidden, weight, labels, temperature, tp_group=dist_process_group, sequence_parallel_gathered=sp
    )
    _stash_sum_sq(hidden, weight, labels, temperature, dist_process_group)
    return out


def _postprocess_thd_engine(tensor, *args, **kwargs):
    """verl's ``postprocess_thd_engine`` (packed per-token values to verl's per-sequence layout, context-parallel
    gather included); the first call after our processor stashed ``sum_pi_squared`` (verl's, of the log-probs)
    lays that out the same way."""
    orig = _STATE["originals"]["postprocess_thd_engine"]
    out = orig(tensor, *args, **kwargs)
    scope = _SUM_SQ_SCOPE.get()
    if scope is not None and scope.get("pending") is not None:
        pending, scope["pending"] = scope["pending"], None
        scope["result"] = orig(pending.unsqueeze(0) if pending.dim() == 1 else pending, *args, **kwargs)
    return out


# ----------------------------------------------------------------------------------------------------------------
# installation

_REPLACED = {
    "fused_output_processor": megatron_fused_output_processor,
    "_fused_GPTModel_forward": _legacy_gpt_forward,
    "linear_cross_entropy": _linear_cross_entropy,
}
# replaced where verl's module has them (its engine forward's layout step, for sum_pi_squared)
_OPTIONAL = {"postprocess_thd_engine": _postprocess_thd_engine}


def install_megatron_forward(backend: str = "auto") -> None:
    """Make verl's Megatron fused forward (this process) compute log-probs / entropies with this package's op.

    Replaces, in ``verl.models.mcore.model_forward_fused``, ``fused_output_processor`` (hook mode) and
    ``_fused_GPTModel_forward`` (legacy mode: verl's forward, our op inside); both are looked up when verl's engine
    builds (legacy: ``patch_fused_forward`` at engine initialisation) or calls (hook) the model, so install before
    the engine initialises (the ``EngineRegistry.new`` hook does). ``backend`` as in
    :func:`rlvr_kernels.fused_linear_logprobs`. Idempotent (a second call only changes the backend).
    """
    from rlvr_kernels._backend import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    import importlib

    mod = importlib.import_module(FUSED_MODULE)
    _STATE["backend"] = backend
    if _STATE["originals"] is None:
        _STATE["originals"] = {name: getattr(mod, name) for name in _REPLACED}
        _STATE["originals"].update({name: getattr(mod, name) for name in _OPTIONAL if hasattr(mod, name)})
    for name, fn in {**_REPLACED, **_OPTIONAL}.items():
        if name in _STATE["originals"]:
            setattr(mod, name, fn)
    logger.info("rlvr_kernels: verl's Megatron fused forward uses the rlvr op (backend=%s)", backend)


def uninstall_megatron_forward() -> None:
    """Give ``model_forward_fused`` verl's functions back (models already patched in legacy mode keep ours)."""
    originals = _STATE["originals"]
    if originals is None:
        return
    mod = sys.modules.get(FUSED_MODULE)
    if mod is not None:
        for name, fn in originals.items():
            setattr(mod, name, fn)
    _STATE["originals"] = None
    _STATE["backend"] = "auto"


def megatron_forward_installed() -> bool:
    mod = sys.modules.get(FUSED_MODULE)
    return mod is not None and getattr(mod, "fused_output_processor", None) is megatron_fused_output_processor


def is_verl_megatron_engine(engine_cls) -> bool:
    """Whether ``engine_cls`` is (derived from) verl's ``MegatronEngine``, whose fused forward is the one above."""
    mod = sys.modules.get(ENGINE_MODULE)
    base = getattr(mod, "MegatronEngine", None)
    return isinstance(engine_cls, type) and isinstance(base, type) and issubclass(engine_cls, base)


def route_megatron_engine(engine_cls, model_config, backends: dict, engine_config=None) -> bool:
    """``EngineRegistry.new`` hook: ``fused_kernel_options.impl_backend`` in ``backends`` on verl's Megatron engine
    installs :func:`install_megatron_forward` (with ``use_fused_kernels``: the engine config's, which the Megatron
    engine reads, else the model config's) or warns that it does nothing (without). Returns whether it handled the
    engine (False: not verl's Megatron engine, or not an ``rlvr*`` backend)."""
    opts = getattr(model_config, "fused_kernel_options", None)
    impl = opts.get("impl_backend", None) if hasattr(opts, "get") else None
    if impl not in backends or not is_verl_megatron_engine(engine_cls):
        return False
    fused = getattr(engine_config, "use_fused_kernels", None)
    if fused is None:
        fused = getattr(model_config, "use_fused_kernels", False)
    if not bool(fused):
        if warn_once("megatron_impl_without_fused"):
            logger.warning(
                "rlvr_kernels: actor_rollout_ref.model.fused_kernel_options.impl_backend=%s has no effect on verl's "
                "Megatron engine without actor_rollout_ref.model.use_fused_kernels=True",
                impl,
            )
        return True
    install_megatron_forward(backend=backends[impl])
    return True


# ----------------------------------------------------------------------------------------------------------------
# verl's optimal-token baseline (actor.calculate_sum_pi_squared)


class _SumSqBatches:
    """``forward_step``'s ``batch_iter``: the next micro-batch, taken out of verl's ``calculate_sum_pi_squared`` +
    ``use_fused_kernels`` refusal (a shallow copy with the flag off) and recorded in ``scope`` as wanting it."""

    def __init__(self, it, scope, fused_default):
        self._it, self._scope, self._fused_default = it, scope, fused_default

    def __iter__(self):
        return self

    def __next__(self):
        from verl.utils import tensordict_utils as tu

        batch = next(self._it)
        want = tu.get_non_tensor_data(batch, key="calculate_sum_pi_squared", default=False)
        fused = tu.get_non_tensor_data(batch, key="use_fused_kernels", default=self._fused_default)
        if want and fused:
            batch = batch.copy()
            tu.assign_non_tensor(batch, calculate_sum_pi_squared=False)
            self._scope["want"] = True
        return batch


def wrap_megatron_forward_step(orig):
    """``MegatronEngineWithLMHead.forward_step``: with the rlvr forward installed (:func:`install_megatron_forward`)
    and the micro-batch asking for ``calculate_sum_pi_squared`` with fused kernels, verl's forward step runs without
    the flag (its refusal is for kernels that cannot compute it), our processor computes ``sum_pi_squared``
    (:func:`vocab_parallel_sum_pi_squared`) and the output dict gets it in verl's layout (last pipeline stage).
    Without the rlvr forward (verl's own fused backends) verl's check raises as before."""
    if getattr(orig, "_rlvr_wrapped", False):
        return orig

    import functools

    @functools.wraps(orig)
    def forward_step(self, batch_iter, model, logits_processor_func, postprocess_micro_batch_func, *args, **kwargs):
        if not megatron_forward_installed():
            return orig(self, batch_iter, model, logits_processor_func, postprocess_micro_batch_func, *args, **kwargs)
        scope = {"want": False, "pending": None, "result": None}
        fused_default = getattr(getattr(self, "engine_config", None), "use_fused_kernels", False)
        batches = _SumSqBatches(batch_iter, scope, fused_default)
        token = _SUM_SQ_SCOPE.set(scope)
        try:
            output, post = orig(
                self, batches, model, logits_processor_func, postprocess_micro_batch_func, *args, **kwargs
            )
        finally:
            _SUM_SQ_SCOPE.reset(token)
        if scope["want"] and isinstance(output, dict) and "log_probs" in output:
            if scope["result"] is None:
                raise RuntimeError(
                    "rlvr_kernels: calculate_sum_pi_squared was asked for, but verl's fused Megatron forward did not "
                    "lay out sum_pi_squared (unsupported verl version?)"
                )
            output[SUM_PI_SQUARED] = scope["result"]
        return output, post

    forward_step._rlvr_wrapped = True
    return forward_step
