"""The package's op in verl's Megatron fused forward (``rlvr_kernels.integrations._verl.megatron``).

What runs where:

- Always (no Megatron-Core needed): the hook-mode processor with verl's keyword contract on 2 gloo ranks, the
  lm_head split by vocabulary as Megatron's ``ColumnParallelLinear`` splits it; outputs and the gradients of the
  hidden states and of each weight shard equal verl's own single-process computation on the full weight
  (``verl.utils.torch_functional.logprobs_from_logits`` / ``entropy_from_logits``, verl's non-fused path), with and
  without sequence parallelism, with temperature, tied weights, and ``ignore_index`` rows holding NaN. The few
  Megatron objects the processor touches are stand-ins: the output layer (a module with the shard as ``weight``
  and the group as ``tp_group``, as ``ColumnParallelLinear`` has them), the config (``sequence_parallel``) and the
  sequence-parallel gather (:class:`_GatherSP`: Megatron's ``_GatherFromSequenceParallelRegion`` contract, forward
  all-gather, backward reduce-scatter, written with gloo's collectives; Megatron's own allocates on CUDA). The
  ``impl_backend`` switch is checked against stand-ins of verl's engine and ``model_forward_fused`` modules.
- With Megatron-Core importable (``pip install megatron-core``; 0.16.1 runs on CPU for this): verl's real
  ``model_forward_fused`` (its ``fused_forward_model_engine``, ``patch_fused_forward``, ``_fused_GPTModel_forward``
  and ``FusedOutputProcessorContext``) and Megatron's real ``parallel_state`` (``initialize_model_parallel`` on
  gloo), hook and legacy mode, end to end from verl's packed inputs to its per-sequence outputs; stand-ins for the
  GPTModel (:class:`_HookGPT` calls the processor with Megatron-Core 0.18+'s keywords) and the gather.
"""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch

import rlvr_kernels.integrations.verl  # noqa: F401  (installs the hooks: EngineRegistry.new among them)
from _gloo import run_ranks
from rlvr_kernels.integrations._verl import forward as vf
from rlvr_kernels.integrations._verl import megatron as vm

try:  # verl's real module: it imports megatron.core at import time
    import verl.models.mcore.model_forward_fused as MFF
except Exception:  # noqa: BLE001 - no Megatron-Core (or a Megatron that does not import on this machine)
    MFF = None

needs_mcore = pytest.mark.skipif(MFF is None, reason="megatron-core is not importable: verl's model_forward_fused")


@dataclasses.dataclass
class _StandInContext:
    """verl's ``FusedOutputProcessorContext`` (used when verl's module cannot be imported)."""

    temperature: float


Context = MFF.FusedOutputProcessorContext if MFF is not None else _StandInContext

H, V, S = 8, 24, 10  # hidden, vocabulary (2 shards of 12), tokens


def _problem(seed=0, *, pad_nan=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, 1, H, generator=g, dtype=torch.float64)  # Megatron's [s, b, h], b = 1 (verl's THD)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (1, S), generator=g)  # [b, s], global ids
    c_lp, c_ent = torch.randn(S, generator=g, dtype=torch.float64), torch.randn(S, generator=g, dtype=torch.float64)
    if pad_nan:  # ignore_index rows whose hidden states hold NaN (one on each sequence-parallel shard)
        labels[0, [3, 8]] = -100
        x[[3, 8]] = float("nan")
    return x, w, labels, c_lp, c_ent


def _verl_reference(x, w, labels, temperature, c_lp, c_ent):
    """verl's own non-fused computation on the full weight: logits, ``logprobs_from_logits``,
    ``entropy_from_logits``; ignore_index rows left out (0, no gradient)."""
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    lab = labels.reshape(-1)
    keep = lab != -100
    xs = x.reshape(-1, H)
    logits = xs[keep] @ w.T / temperature
    lp = torch.zeros(lab.shape, dtype=x.dtype).masked_scatter(keep, logprobs_from_logits(logits, lab[keep]))
    ent = torch.zeros(lab.shape, dtype=x.dtype).masked_scatter(keep, entropy_from_logits(logits))
    (c_lp * lp + c_ent * ent).sum().backward()
    return lp.detach(), ent.detach(), x.grad, w.grad


class _OutputLayer(torch.nn.Module):
    """The attributes of Megatron's ``ColumnParallelLinear`` the processor reads: ``weight`` (this rank's rows,
    ``None`` for tied embeddings) and ``tp_group``."""

    def __init__(self, weight, tp_group):
        super().__init__()
        self.weight = None if weight is None else torch.nn.Parameter(weight)
        self.tp_group = tp_group


class _GatherSP(torch.autograd.Function):
    """Stand-in for Megatron's ``gather_from_sequence_parallel_region`` (``tensor_parallel_output_grad=True``):
    all-gather along dim 0, backward reduce-scatter (all-reduce, keep this rank's chunk)."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g.chunk(dist.get_world_size(ctx.group), 0)[dist.get_rank(ctx.group)].contiguous(), None


def _gather_sp(x, group=None):
    import torch.distributed as dist

    return _GatherSP.apply(x, dist.group.WORLD if group is None else group)


# ----------------------------------------------------------------------------------------------------------------
# 1. the processor on 2 ranks against verl's single-process computation (no Megatron-Core needed)

_CASES = (  # (sequence_parallel, temperature, tied weights, ignore_index rows holding NaN)
    (False, 1.0, False, False),
    (True, 0.7, False, True),
    (False, 0.7, True, True),
    (True, 1.3, True, False),
)


def _rank_processor(rank, world):
    import torch.distributed as dist

    vm._gather_sequence_parallel = _gather_sp  # this forked rank only
    out = []
    for i, (sp, temp, tied, pad) in enumerate(_CASES):
        x, w, labels, c_lp, c_ent = _problem(i, pad_nan=pad)
        vl = V // world
        shard = w[rank * vl : (rank + 1) * vl].clone()
        layer = _OutputLayer(None if tied else shard, dist.group.WORLD)
        output_weight = torch.nn.Parameter(shard) if tied else None  # tied: the embedding's shard, same rows
        # sequence parallel: this rank holds its slice of the tokens; else every rank holds them all
        hidden = (x.chunk(world, 0)[rank] if sp else x).clone().requires_grad_()
        res = vm.megatron_fused_output_processor(
            hidden_states=hidden,
            output_layer=layer,
            output_weight=output_weight,
            labels=labels,
            context=Context(temperature=temp),
            config=types.SimpleNamespace(sequence_parallel=sp),
            input_ids=labels,
            position_ids=None,
        )
        assert res.hidden_states is hidden and res.logits is None
        (c_lp * res.log_probs + c_ent * res.entropy).sum().backward()
        dw = (output_weight if tied else layer.weight).grad
        out.append((res.log_probs.detach(), res.entropy.detach(), hidden.grad, dw))
    return out


def test_processor_tp2_matches_verl_single_process():
    ranks = run_ranks(_rank_processor, 2)
    for i, (sp, temp, _tied, pad) in enumerate(_CASES):
        x, w, labels, c_lp, c_ent = _problem(i, pad_nan=pad)
        lp, ent, dx, dw = _verl_reference(x, w, labels, temp, c_lp, c_ent)
        dx = dx.reshape(S, 1, H)
        for rank, res in enumerate(ranks):
            r_lp, r_ent, r_dx, r_dw = res[i]
            assert r_lp.shape == (S,) and r_ent.shape == (S,)
            torch.testing.assert_close(r_lp, lp, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(r_ent, ent, rtol=1e-10, atol=1e-10)
            # d hidden: sp = this rank's token slice of the full gradient (the gather's reduce-scatter summed the
            # partial sums); no sp = the full gradient on every rank (grad_hidden="full")
            want_dx = dx.chunk(2, 0)[rank] if sp else dx
            torch.testing.assert_close(r_dx, want_dx, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(r_dw, dw[rank * (V // 2) : (rank + 1) * (V // 2)], rtol=1e-9, atol=1e-10)
            if pad:
                assert torch.isfinite(r_dx).all() and torch.isfinite(r_dw).all()
                assert (r_lp[[3, 8]] == 0).all() and (r_ent[[3, 8]] == 0).all()


def test_grad_hidden_mode_follows_sequence_parallel(monkeypatch):
    """partial under the sequence-parallel gather (its backward reduces), full without it (as the layer's
    all-reduce would)."""
    seen = []

    def spy(*a, **kw):
        seen.append(kw.get("grad_hidden"))
        return torch.zeros(a[2].shape), torch.zeros(a[2].shape)

    monkeypatch.setattr(vm, "fused_linear_logprobs", spy)
    monkeypatch.setattr(vm, "_world", lambda group: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    x = torch.randn(4, 1, H)
    for sp in (True, False):
        vm.vocab_parallel_logprobs(x, torch.randn(6, H), torch.zeros(1, 4, dtype=torch.long), tp_group=object(),
                                   sequence_parallel_gathered=sp)  # fmt: skip
    assert seen == ["partial", "full"]


# ----------------------------------------------------------------------------------------------------------------
# 2. one process (TP = 1): layouts, tied weights, errors


class _NoGroup:
    """Megatron's tensor-parallel group where TP = 1 and torch.distributed is not initialised."""


def test_single_rank_layouts_and_errors():
    g = torch.Generator().manual_seed(5)
    s, b = 6, 2  # Megatron's [s, b, h] with b > 1: labels are [b, s]
    x = torch.randn(s, b, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (b, s), generator=g)
    hidden = x.clone().requires_grad_()
    emb = torch.nn.Parameter(w.clone())
    res = vm.megatron_fused_output_processor(
        hidden_states=hidden,
        output_layer=_OutputLayer(None, _NoGroup()),
        output_weight=emb,
        labels=labels,
        context=Context(temperature=0.5),
        config=types.SimpleNamespace(sequence_parallel=False),
    )
    c = torch.randn(b * s, generator=g, dtype=torch.float64)
    (c * (res.log_probs + res.entropy)).sum().backward()
    xb = x.transpose(0, 1)  # [b, s, h], the labels' order
    lp, ent, dx, dw = _verl_reference(xb, w, labels, 0.5, c, c)
    torch.testing.assert_close(res.log_probs, lp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res.entropy, ent, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hidden.grad, dx.reshape(b, s, H).transpose(0, 1))
    torch.testing.assert_close(emb.grad, dw)

    with pytest.raises(RuntimeError, match="last pipeline stage"):
        vm.megatron_fused_output_processor(
            hidden_states=hidden,
            output_layer=_OutputLayer(None, _NoGroup()),
            output_weight=None,
            labels=labels,
            context=Context(temperature=1.0),
            config=types.SimpleNamespace(sequence_parallel=False),
        )


# ----------------------------------------------------------------------------------------------------------------
# 3. the switch: impl_backend=rlvr* on verl's Megatron engine installs the processor


@pytest.fixture
def standin_megatron(monkeypatch):
    """Stand-ins for verl's Megatron engine module (``MegatronEngine``) and ``model_forward_fused`` (the three
    globals the installer replaces), and an engine class derived from it registered for a private device."""
    from verl.workers.engine.base import BaseEngine, EngineRegistry

    eng_mod = types.ModuleType(vm.ENGINE_MODULE)

    class MegatronEngine(BaseEngine):
        def __init__(self, **kw):
            pass

    eng_mod.MegatronEngine = MegatronEngine
    fused = types.ModuleType(vm.FUSED_MODULE)
    fused.fused_output_processor = lambda **kw: "verl"
    fused._fused_GPTModel_forward = lambda model, *a, **kw: "verl"
    fused.linear_cross_entropy = lambda *a: ("verl", a)
    originals = dict(vars(fused))
    monkeypatch.setitem(sys.modules, vm.ENGINE_MODULE, eng_mod)
    monkeypatch.setitem(sys.modules, vm.FUSED_MODULE, fused)

    class MegatronEngineWithLMHead(MegatronEngine):
        pass

    device = "rlvr_megatron_test_device"
    monkeypatch.setenv("VERL_ENGINE_DEVICE", device)
    EngineRegistry.register(model_type="language_model", backend="megatron", device=device)(MegatronEngineWithLMHead)
    try:
        yield EngineRegistry, fused, originals
    finally:
        vm.uninstall_megatron_forward()
        EngineRegistry._engines["language_model"]["megatron"].pop(device, None)
        if not EngineRegistry._engines["language_model"]["megatron"]:
            del EngineRegistry._engines["language_model"]["megatron"]


def _model_config(impl, use_fused_kernels=True):
    from omegaconf import OmegaConf

    return types.SimpleNamespace(
        use_fused_kernels=use_fused_kernels, fused_kernel_options=OmegaConf.create({"impl_backend": impl})
    )


def test_impl_backend_installs_on_verl_megatron_engine(standin_megatron):
    registry, fused, originals = standin_megatron
    assert getattr(registry.new, "_rlvr_wrapped", False)  # the plug-in's EngineRegistry.new hook
    # without use_fused_kernels: nothing installed (a warning says so), and no refusal either
    registry.new(model_type="language_model", backend="megatron", model_config=_model_config("rlvr", False))
    assert fused.fused_output_processor is originals["fused_output_processor"] and not vm.megatron_forward_installed()
    # verl's own backends on megatron: untouched
    registry.new(model_type="language_model", backend="megatron", model_config=_model_config("triton"))
    assert not vm.megatron_forward_installed()
    # the engine config's flag wins (verl's TrainingWorker copies the model config's into it; the engine reads it)
    off = types.SimpleNamespace(use_fused_kernels=False)
    registry.new(model_type="language_model", backend="megatron", model_config=_model_config("rlvr"), engine_config=off)
    assert not vm.megatron_forward_installed()
    for impl, backend in vf.FORWARD_BACKENDS.items():
        registry.new(model_type="language_model", backend="megatron", model_config=_model_config(impl))
        assert fused.fused_output_processor is vm.megatron_fused_output_processor
        assert fused._fused_GPTModel_forward is vm._legacy_gpt_forward
        assert vm._STATE["backend"] == backend
    # outside the legacy forward, model_forward_fused's linear_cross_entropy is verl's
    assert fused.linear_cross_entropy(1, 2, 3, 1.0, "none", None)[0] == "verl"
    vm.uninstall_megatron_forward()
    assert {k: getattr(fused, k) for k in originals} == originals


def test_recipe_overrides_compose_on_verl_megatron_config():
    """The documented overrides (docs/integrations/verl-megatron.md) exist in verl's ppo_megatron_trainer config."""
    import os

    import verl
    from hydra import compose, initialize_config_dir

    overrides = [
        "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2",
        "actor_rollout_ref.model.use_fused_kernels=True",
        "actor_rollout_ref.model.fused_kernel_options.impl_backend=rlvr",
    ]
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer/config"),
                               version_base=None):  # fmt: skip
        cfg = compose("ppo_megatron_trainer", overrides=overrides).actor_rollout_ref
    assert cfg.actor.strategy == "megatron" and cfg.actor.use_fused_kernels is True
    assert cfg.actor.megatron.sequence_parallel is True  # verl's default: grad_hidden="partial"
    assert cfg.model.fused_kernel_options.impl_backend in vf.FORWARD_BACKENDS


@needs_mcore
def test_real_verl_megatron_engine_is_recognised():
    from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead

    assert vm.is_verl_megatron_engine(MegatronEngineWithLMHead)
    assert not vm.is_verl_megatron_engine(object)


# ----------------------------------------------------------------------------------------------------------------
# 4. verl's real model_forward_fused (needs Megatron-Core), hook and legacy mode, 2 ranks

_SEQS = ((5, 3, 7), (4, 6, 2))  # token lengths of the batch's sequences (verl's nested input_ids), per case


def _gpt_classes():
    from megatron.core.models.gpt.gpt_model import GPTModel

    class _Base(GPTModel):
        """A ``GPTModel`` (verl checks isinstance) with only what verl's fused path reads: ``pre_process``,
        ``post_process``, ``config``, ``output_layer``; its "decoder" is an embedding lookup of the (packed)
        input ids, so the reference does not depend on verl's packing."""

        def __init__(self, table, shard, sp):
            torch.nn.Module.__init__(self)
            self.config = types.SimpleNamespace(sequence_parallel=sp, fp8=None, config_logger_dir="")
            self.pre_process = self.post_process = True
            self.table = torch.nn.Parameter(table)
            self.output_layer = torch.nn.Module()
            self.output_layer.weight = torch.nn.Parameter(shard)  # no tp_group: parallel_state's group

        def _hidden(self, input_ids):
            import torch.distributed as dist

            h = self.table[input_ids].transpose(0, 1)  # [1, t] ids -> [t, 1, h]
            return h.chunk(dist.get_world_size(), 0)[dist.get_rank()] if self.config.sequence_parallel else h

    class HookGPT(_Base):
        def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None,
                    inference_context=None, packed_seq_params=None, extra_block_kwargs=None,
                    runtime_gather_output=None, *, inference_params=None, loss_mask=None, padding_mask=None,
                    output_processor=None, output_processor_context=None):  # fmt: skip
            hidden = self._hidden(input_ids)
            return output_processor(  # Megatron-Core 0.18+'s GPTModel._postprocess call
                hidden_states=hidden,
                output_layer=self.output_layer,
                output_weight=None,
                labels=labels,
                loss_mask=loss_mask,
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=attention_mask,
                decoder_input=None,
                inference_context=inference_context,
                packed_seq_params=packed_seq_params,
                runtime_gather_output=runtime_gather_output,
                context=output_processor_context,
                compute_language_model_loss=None,
                scale_logits=None,
                config=self.config,
            )

    class LegacyGPT(_Base):  # GPTModel.forward without output_processor: verl patches it (legacy mode)
        def _preprocess(self, input_ids, **kw):
            return (input_ids, None, None, None, None)

        def decoder(self, hidden_states, **kw):
            return self._hidden(hidden_states)

    return HookGPT, LegacyGPT


def _rank_verl_engine(rank, world):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    vm._gather_sequence_parallel = _gather_sp  # Megatron's gather allocates on CUDA
    MFF.gather_from_sequence_parallel_region = _gather_sp  # (verl's legacy forward calls it directly)
    vm.install_megatron_forward(backend="torch")
    hook_cls, legacy_cls = _gpt_classes()
    engine_fn = MFF.fused_forward_model_engine(False)
    out = []
    try:
        for i, (cls, sp) in enumerate(((hook_cls, True), (legacy_cls, True), (hook_cls, False))):
            table, w, seqs, temp = _engine_problem(i)
            vl = V // world
            model = cls(table.clone(), w[rank * vl : (rank + 1) * vl].clone(), sp)
            MFF.patch_fused_forward(model)
            assert MFF._get_fused_forward_mode(model) == ("hook" if cls is hook_cls else "legacy")
            ids = torch.nested.nested_tensor(list(seqs), layout=torch.jagged)
            res = engine_fn(model, input_ids=ids, labels=ids, multi_modal_inputs={}, temperature=temp,
                            calculate_entropy=True, pad_token_id=0)  # fmt: skip
            lp, ent = res["log_probs"], res["entropy"]
            lp_rows, ent_rows = [t.detach() for t in lp.unbind()], [t.detach() for t in ent.unbind()]
            (lp.values().sum() + 0.5 * ent.values().sum()).backward()
            out.append((lp_rows, ent_rows, model.table.grad, model.output_layer.weight.grad))
    finally:
        vm.uninstall_megatron_forward()
        ps.destroy_model_parallel()
    return out


def _engine_problem(i):
    g = torch.Generator().manual_seed(100 + i)
    table = torch.randn(V, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    seqs = [torch.randint(1, V, (n,), generator=g) for n in _SEQS[i % 2]]
    return table, w, seqs, (0.7, 1.0, 1.3)[i]


def _verl_packed_labels(seqs, align):
    """The label of each token as verl's THD packing gives it (``preprocess_thd_engine(need_roll=True)``, no context
    parallelism): the next row of the packed buffer, each sequence padded with 0 to a multiple of ``align`` (the TP
    size); the last token of a sequence thus gets a pad id or the next sequence's first (masked out by verl)."""
    padded = [torch.nn.functional.pad(s, (0, -len(s) % align)) for s in seqs]
    rolled = torch.roll(torch.cat(padded), -1).split([len(p) for p in padded])
    return [r[: len(s)] for r, s in zip(rolled, seqs)]


@needs_mcore
def test_verl_fused_forward_engine_tp2_hook_and_legacy():
    """verl's ``fused_forward_model_engine`` (packing, our processor / verl's legacy forward with our op, unpacking)
    on 2 ranks equals verl's non-fused computation per sequence (with verl's labels, :func:`_verl_packed_labels`),
    and the gradients of the embedding (summed over ranks under sequence parallelism) and of each
    weight shard equal the single-process ones."""
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    ranks = run_ranks(_rank_verl_engine, 2)
    for i, sp in enumerate((True, True, False)):
        table, w, seqs, temp = _engine_problem(i)
        table, w = table.requires_grad_(), w.requires_grad_()
        lps, ents, total = [], [], 0
        for ids, labels in zip(seqs, _verl_packed_labels(seqs, align=2)):
            logits = table[ids] @ w.T / temp
            lps.append(logprobs_from_logits(logits, labels))
            ents.append(entropy_from_logits(logits))
            total = total + lps[-1].sum() + 0.5 * ents[-1].sum()
        total.backward()
        for rank, res in enumerate(ranks):
            r_lp, r_ent, _, r_dw = res[i]
            for a, b in zip(r_lp, lps):
                torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-10)
            for a, b in zip(r_ent, ents):
                torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(r_dw, w.grad[rank * (V // 2) : (rank + 1) * (V // 2)])
        d_table = [res[i][2] for res in ranks]
        if sp:  # each rank's embedding saw its own token slice: the ranks' gradients sum to the full one
            torch.testing.assert_close(d_table[0] + d_table[1], table.grad)
        else:  # replicated tokens, d hidden all-reduced: every rank has the full gradient
            for d in d_table:
                torch.testing.assert_close(d, table.grad)
