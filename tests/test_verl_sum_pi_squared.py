"""verl's optimal-token baseline (``actor.calculate_sum_pi_squared``) with the rlvr fused forward.

verl 0.9.1 refuses ``calculate_sum_pi_squared`` with ``use_fused_kernels`` (its fused kernels never materialise the
logits). With ``fused_kernel_options.impl_backend=rlvr*`` the plug-in computes ``sum_pi_squared`` in the same forward
(one extra chunked vocabulary pass, no ``[tokens, vocab]`` logits) and lets it through verl's check:

- FSDP: verl's own ``FSDPEngineWithLMHead.forward_step`` / ``prepare_model_inputs`` / ``prepare_model_outputs`` on a
  tiny Llama on CPU (only construction differs: :class:`CPUEngine`), fused (rlvr) against verl's non-fused path
  (logits, ``calculate_sum_pi_squared_from_logits``): fp32 and bf16 autocast, remove-padding on and off, with a
  temperature; verl's optimal-token-baseline advantage (``core_algos``) from both fields; verl's own fused backend
  still raises.
- Megatron (no Megatron-Core here): :func:`vocab_parallel_sum_pi_squared` and the hook-mode processor on 2 gloo
  ranks against verl's single-process computation on the full weight; ``forward_step``'s wrapper on a stand-in of
  verl's engine step (its refusal, ``postprocess_thd_engine`` layout).
"""

from __future__ import annotations

import copy
import sys
import types

import numpy as np
import pytest
import torch

import rlvr_kernels.integrations.verl  # noqa: F401  (installs the hooks)
from _gloo import run_ranks
from rlvr_kernels.integrations._verl import forward as vf
from rlvr_kernels.integrations._verl import megatron as vm

transformers = pytest.importorskip("transformers")
ti = pytest.importorskip("verl.workers.engine.fsdp.transformer_impl")

V = 64


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=V,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # a peaked, varied distribution (random init is nearly uniform: sum p^2 ~ 1 / V)
        model.lm_head.weight.mul_(30.0)
    return model


@pytest.fixture(scope="module")
def batch():
    """verl's no-padding micro-batch (``left_right_2_no_padding`` of a left/right padded batch), 6 sequences in 3
    groups of 2 (the uids of the advantage estimator)."""
    from tensordict import TensorDict
    from verl.workers.utils.padding import left_right_2_no_padding

    B, P, R = 6, 3, 6
    g = torch.Generator().manual_seed(0)
    plen = torch.tensor([3, 1, 2, 3, 2, 1])
    rlen = torch.tensor([6, 2, 5, 1, 4, 6])
    pmask = torch.arange(P)[None] >= (P - plen)[:, None]
    rmask = torch.arange(R)[None] < rlen[:, None]
    attn = torch.cat([pmask, rmask], 1).long()
    ids = torch.cat(
        [torch.randint(1, V, (B, P), generator=g) * pmask, torch.randint(1, V, (B, R), generator=g) * rmask], 1
    )
    td = TensorDict(
        {
            "input_ids": ids,
            "attention_mask": attn,
            "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
            "prompts": ids[:, :P],
            "responses": ids[:, P:],
            "response_mask": rmask.long(),
        },
        batch_size=[B],
    )
    return left_right_2_no_padding(td), rmask


class CPUEngine(ti.FSDPEngineWithLMHead):
    """verl's FSDP engine code (forward_step, prepare_model_inputs / prepare_model_outputs) on an unwrapped CPU
    model; only construction differs."""

    def __init__(self, model, fused, autocast_dtype=torch.float32):
        from verl.utils import torch_functional as verl_F

        self.module = model
        self.engine_config = types.SimpleNamespace(
            use_fused_kernels=fused, entropy_checkpointing=False, entropy_from_logits_with_chunking=False
        )
        self.compute_entropy_from_logits = verl_F.entropy_from_logits
        self.ulysses_sequence_parallel_size, self.use_ulysses_sp = 1, False
        self.ulysses_device_mesh = self.ulysses_parallel_group = None
        self.pad_to_length, self._autocast_dtype, self.scaler, self._qat_enabled = False, autocast_dtype, None, False

    def get_data_parallel_group(self):
        return None


@pytest.fixture(autouse=True)
def _cpu_device(monkeypatch):
    monkeypatch.setattr(ti, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(ti, "get_device_name", lambda: "cpu")


def _forward(model, td, *, fused, rmpad, impl="rlvr_torch", temperature=0.7, autocast_dtype=torch.float32, sq=True):
    """verl's compute_log_prob micro-batch (``_compute_old_log_prob``'s flags) through the engine's forward_step;
    outputs back in verl's padded ``[B, R]`` layout (``no_padding_2_padding``, as the trainer does)."""
    from verl.models.transformers.monkey_patch import patch_forward_with_backends
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding

    m = copy.deepcopy(model)
    if fused:
        patch_forward_with_backends(m, use_fused_kernels=True, fused_kernels_backend=impl)
    mb = td.copy()
    tu.assign_non_tensor(
        mb,
        use_remove_padding=rmpad,
        use_fused_kernels=fused,
        calculate_entropy=True,
        calculate_sum_pi_squared=sq,
        temperature=temperature,
    )
    with torch.no_grad():
        _, out = CPUEngine(m, fused, autocast_dtype).forward_step(mb, loss_function=None, forward_only=True)
    res = {k: no_padding_2_padding(v, td) for k, v in out["model_output"].items()}
    assert tu.get_non_tensor_data(mb, "calculate_sum_pi_squared", None) == sq  # the caller's batch is left alone
    return res


@pytest.mark.parametrize("rmpad", [True, False])
@pytest.mark.parametrize("impl", ["rlvr_torch", "rlvr", "rlvr_triton"])
def test_fsdp_engine_sum_pi_squared_matches_verl_non_fused(tiny_llama, batch, rmpad, impl):
    td, rmask = batch
    want = _forward(tiny_llama, td, fused=False, rmpad=rmpad)
    got = _forward(tiny_llama, td, fused=True, rmpad=rmpad, impl=impl)
    assert set(got) == {"log_probs", "entropy", "sum_pi_squared"}
    sq = got["sum_pi_squared"]
    assert sq.shape == want["sum_pi_squared"].shape == rmask.shape and sq.dtype == torch.float32
    assert not sq.requires_grad
    s = want["sum_pi_squared"][rmask]
    assert float(s.std()) > 0.05 and float(s.min()) > 1.0 / V  # a varied, non-uniform baseline input
    for k in ("log_probs", "entropy", "sum_pi_squared"):
        torch.testing.assert_close(got[k][rmask], want[k][rmask], rtol=1e-5, atol=1e-5)
    # the log-probs / entropies do not change when sum_pi_squared is asked for
    plain = _forward(tiny_llama, td, fused=True, rmpad=rmpad, impl=impl, sq=False)
    assert "sum_pi_squared" not in plain
    for k in ("log_probs", "entropy"):
        torch.testing.assert_close(got[k], plain[k], rtol=0, atol=0)


@pytest.mark.parametrize("rmpad", [True, False])
def test_fsdp_engine_sum_pi_squared_bf16_autocast(tiny_llama, batch, rmpad):
    """verl's engine under bf16 autocast (fp32 parameters): both paths run the decoder and the lm_head GEMM in bf16;
    verl's then computes sum_pi_squared from bf16 logits, ours from fp32 GEMM results with fp32 statistics (closer to
    the fp32 engine's value)."""
    td, rmask = batch
    want = _forward(tiny_llama, td, fused=False, rmpad=rmpad, autocast_dtype=torch.bfloat16)
    got = _forward(tiny_llama, td, fused=True, rmpad=rmpad, autocast_dtype=torch.bfloat16)
    exact = _forward(tiny_llama, td, fused=False, rmpad=rmpad)
    assert got["sum_pi_squared"].dtype == torch.float32
    a, b, e = (d["sum_pi_squared"][rmask].float() for d in (got, want, exact))
    # verl's bf16 logits round z (|z| ~ 10 here) to ~0.05: its sum_pi_squared is off the fp32 value by up to ~0.05
    torch.testing.assert_close(a, b, rtol=0, atol=0.08)
    torch.testing.assert_close(a, e, rtol=0, atol=0.01)  # ours: only the bf16 decoder / GEMM operands differ
    assert float((a - e).abs().max()) < float((b - e).abs().max())


def test_optimal_token_baseline_advantage_matches(tiny_llama, batch):
    """verl's compute_optimal_token_baseline_advantage (and its multi-turn form) from our field equals the one from
    verl's non-fused field."""
    from verl.trainer.ppo import core_algos

    td, rmask = batch
    want = _forward(tiny_llama, td, fused=False, rmpad=True)
    got = _forward(tiny_llama, td, fused=True, rmpad=True)
    g = torch.Generator().manual_seed(1)
    rewards = torch.zeros(rmask.shape)
    last = rmask.sum(-1) - 1
    rewards[torch.arange(rmask.shape[0]), last] = torch.randn(rmask.shape[0], generator=g)
    index = np.array(["a", "a", "b", "b", "c", "c"], dtype=object)
    mask = rmask.float()
    for fn in (
        core_algos.compute_optimal_token_baseline_advantage,
        core_algos.compute_multi_turn_optimal_token_baseline_advantage,
    ):
        outs = [
            fn(
                token_level_rewards=rewards,
                response_mask=mask,
                index=index,
                old_log_probs=d["log_probs"].float(),
                sum_pi_squared=d["sum_pi_squared"].float(),
            )
            for d in (want, got)
        ]
        assert float(outs[0][0].abs().max()) > 0.01
        for a, b in zip(outs[1], outs[0]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_verl_own_fused_backend_still_raises(tiny_llama, batch, monkeypatch):
    td, _ = batch
    # verl's own patch replaces the model class's forward: give it back after this test
    monkeypatch.setattr(type(tiny_llama), "forward", type(tiny_llama).forward)
    for rmpad in (True, False):
        with pytest.raises(NotImplementedError, match="calculate_sum_pi_squared=True is not supported"):
            _forward(tiny_llama, td, fused=True, rmpad=rmpad, impl="torch")
    # and a plain model flagged as fused is not ours either: no extra keyword reaches it
    eng = CPUEngine(copy.deepcopy(tiny_llama), True)
    assert not vf._is_rlvr_module(eng.module)
    assert vf._is_rlvr_module(vf.patch_forward_with_rlvr(copy.deepcopy(tiny_llama), backend="torch"))


def test_hooks_installed_on_verl_engine_classes():
    for name in ("prepare_model_inputs", "prepare_model_outputs"):
        assert getattr(ti.FSDPEngineWithLMHead.__dict__[name], "_rlvr_wrapped", False)


def test_forward_sum_pi_squared_no_grad_with_grad_enabled(tiny_llama):
    """In a training forward (grad on) the log-probs keep their gradient; sum_pi_squared is a constant (verl reads it
    in compute_log_prob only)."""
    model = vf.patch_forward_with_rlvr(copy.deepcopy(tiny_llama).train(), backend="torch")
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(2))
    out = model(input_ids=ids, temperature=1.3, return_dict=True, rlvr_sum_pi_squared=True)
    assert out.log_probs.requires_grad and not out.sum_pi_squared.requires_grad
    assert out.sum_pi_squared.shape == ids.shape
    logits = tiny_llama(input_ids=ids).logits.float() / 1.3
    want = torch.softmax(logits, -1).pow(2).sum(-1)
    torch.testing.assert_close(out.sum_pi_squared, want.detach(), rtol=1e-5, atol=1e-6)
    assert getattr(model(input_ids=ids, return_dict=True), "sum_pi_squared", None) is None  # not asked: absent


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the Triton interpreter on the NaN rows
@pytest.mark.parametrize(
    ("dtype", "backend"),
    [(torch.float32, "torch"), (torch.bfloat16, "torch"), (torch.float64, "torch"), (torch.float32, "triton")],
)
def test_log_sum_sq_rows_against_verl_and_nan_rows(dtype, backend):
    from verl.utils.torch_functional import calculate_sum_pi_squared_from_logits

    g = torch.Generator().manual_seed(4)
    x = torch.randn(37, 8, generator=g).to(dtype)
    w = (3 * torch.randn(50, 8, generator=g)).to(dtype)
    b = torch.randn(50, generator=g).to(dtype)
    x[[5, 20]] = float("nan")  # padded rows holding NaN stay in their rows
    lss, lse = vf.log_sum_sq_rows(x, w, b, 0.6, backend)
    assert lss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and lss.shape == (37,)
    z = (x.double() @ w.double().T + b.double()) / 0.6
    want = calculate_sum_pi_squared_from_logits(z)
    keep = torch.ones(37, dtype=torch.bool)
    keep[[5, 20]] = False
    assert torch.isnan(lss[~keep]).all() and torch.isfinite(lss[keep]).all()
    torch.testing.assert_close(lss.exp()[keep].double(), want[keep], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lse[keep].double(), torch.logsumexp(z, -1)[keep], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Megatron: vocabulary-parallel sum_pi_squared on 2 gloo ranks (no Megatron-Core needed)

H, S = 8, 10
VM = 24  # 2 shards of 12


def _mproblem(seed, *, pad_nan=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, 1, H, generator=g, dtype=torch.float64)
    w = 2 * torch.randn(VM, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, VM, (1, S), generator=g)
    if pad_nan:
        labels[0, [3, 8]] = -100
        x[[3, 8]] = float("nan")
    return x, w, labels


def _verl_sum_sq(x, w, temperature):
    """verl's non-fused computation on the full weight (``calculate_sum_pi_squared_from_logits``)."""
    from verl.utils.torch_functional import calculate_sum_pi_squared_from_logits

    return calculate_sum_pi_squared_from_logits(x.reshape(-1, H) @ w.T / temperature)


#: Megatron's tensor-parallel group at TP = 1 without torch.distributed (the processor then runs unsharded).
_NO_GROUP = object()

_MCASES = ((False, 1.0, False), (True, 0.7, True), (False, 1.3, True))  # (sequence parallel, temperature, NaN rows)


def _rank_sum_sq(rank, world):
    import torch.distributed as dist

    from test_verl_megatron import _gather_sp

    vm._gather_sequence_parallel = _gather_sp  # this forked rank only
    out = []
    for i, (sp, temp, pad) in enumerate(_MCASES):
        x, w, labels = _mproblem(i, pad_nan=pad)
        vl = VM // world
        shard = w[rank * vl : (rank + 1) * vl].clone()
        direct = vm.vocab_parallel_sum_pi_squared(x, shard, labels, temp, tp_group=dist.group.WORLD)
        x32, shard32 = x.float(), shard.float()
        direct32 = vm.vocab_parallel_sum_pi_squared(x32, shard32, labels, temp, tp_group=dist.group.WORLD)
        # the hook-mode processor inside forward_step's scope
        scope = {"want": True, "pending": None, "result": None}
        token = vm._SUM_SQ_SCOPE.set(scope)
        try:
            hidden = (x.chunk(world, 0)[rank] if sp else x).clone()
            res = vm.megatron_fused_output_processor(
                hidden_states=hidden,
                output_layer=types.SimpleNamespace(weight=torch.nn.Parameter(shard), tp_group=dist.group.WORLD),
                output_weight=None,
                labels=labels,
                context=types.SimpleNamespace(temperature=temp),
                config=types.SimpleNamespace(sequence_parallel=sp),
            )
        finally:
            vm._SUM_SQ_SCOPE.reset(token)
        out.append((direct, direct32, res.sum_pi_squared, scope["pending"]))
    return out


def test_vocab_parallel_sum_pi_squared_tp2_matches_verl():
    ranks = run_ranks(_rank_sum_sq, 2)
    for i, (_sp, temp, pad) in enumerate(_MCASES):
        x, w, _ = _mproblem(i, pad_nan=pad)
        want = _verl_sum_sq(x, w, temp)
        keep = torch.isfinite(want)
        assert int(keep.sum()) == (S - 2 if pad else S)
        for direct, direct32, proc, pending in (r[i] for r in ranks):
            assert direct.shape == (S,) and proc.shape == (S,) and pending is proc
            assert torch.isnan(direct[~keep]).all() and torch.isfinite(direct[keep]).all()  # NaN stays in its rows
            torch.testing.assert_close(direct[keep].double(), want[keep], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(proc[keep].double(), want[keep], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(direct32[keep].double(), want[keep], rtol=2e-5, atol=1e-6)


def test_processor_without_scope_computes_nothing():
    x, w, labels = _mproblem(0)
    res = vm.megatron_fused_output_processor(
        hidden_states=x,
        output_layer=types.SimpleNamespace(weight=torch.nn.Parameter(w), tp_group=_NO_GROUP),
        output_weight=None,
        labels=labels,
        context=types.SimpleNamespace(temperature=1.0),
        config=types.SimpleNamespace(sequence_parallel=False),
    )
    assert getattr(res, "sum_pi_squared", None) is None
    torch.testing.assert_close(
        vm.vocab_parallel_sum_pi_squared(x, w, labels, 0.9), _verl_sum_sq(x, w, 0.9), rtol=1e-12, atol=1e-14
    )


@pytest.fixture
def standin_fused(monkeypatch):
    """A stand-in of verl's ``model_forward_fused`` (the globals the installer replaces, and
    ``postprocess_thd_engine``: here a recognisable layout step), and an engine step that does what verl's
    ``MegatronEngineWithLMHead.forward_step`` does on the fused path: refuse sum_pi_squared, call the processor,
    lay out the log-probs with ``postprocess_thd_engine``."""
    from verl.utils import tensordict_utils as tu

    fused = types.ModuleType(vm.FUSED_MODULE)
    fused.fused_output_processor = lambda **kw: "verl"
    fused._fused_GPTModel_forward = lambda model, *a, **kw: "verl"
    fused.linear_cross_entropy = lambda *a: ("verl", a)
    fused.postprocess_thd_engine = lambda t, packed, *a, **kw: t.squeeze(0) * packed  # the "layout"
    monkeypatch.setitem(sys.modules, vm.FUSED_MODULE, fused)
    x, w, labels = _mproblem(1)

    class Engine:
        engine_config = types.SimpleNamespace(use_fused_kernels=True)

        def forward_step(self, batch_iter, model, logits_processor_func, postprocess_micro_batch_func):
            batch = next(batch_iter)
            if (
                tu.get_non_tensor_data(batch, "calculate_sum_pi_squared", False)
                and self.engine_config.use_fused_kernels
            ):
                raise NotImplementedError("calculate_sum_pi_squared=True is not supported with use_fused_kernels=True")
            mod = sys.modules[vm.FUSED_MODULE]
            out = mod.fused_output_processor(
                hidden_states=x,
                output_layer=types.SimpleNamespace(weight=torch.nn.Parameter(w), tp_group=_NO_GROUP),
                output_weight=None,
                labels=labels,
                context=types.SimpleNamespace(temperature=0.8),
                config=types.SimpleNamespace(sequence_parallel=False),
            )
            lp = mod.postprocess_thd_engine(out.log_probs.unsqueeze(0), 2.0, labels)
            return {"log_probs": lp}, "post"

    Engine.forward_step = vm.wrap_megatron_forward_step(Engine.forward_step)
    try:
        yield Engine, (x, w, labels)
    finally:
        vm.uninstall_megatron_forward()


def _mbatch(sq):
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    td = TensorDict({"input_ids": torch.zeros(1, S, dtype=torch.long)}, batch_size=[1])
    tu.assign_non_tensor(td, calculate_sum_pi_squared=sq)
    return td


def test_megatron_forward_step_wrapper(standin_fused):
    from verl.utils import tensordict_utils as tu

    Engine, (x, w, labels) = standin_fused
    eng = Engine()
    # verl's own fused backend (ours not installed): verl's refusal stands
    with pytest.raises(NotImplementedError, match="calculate_sum_pi_squared"):
        eng.forward_step(iter([_mbatch(True)]), None, None, None)
    vm.install_megatron_forward(backend="torch")
    mb = _mbatch(True)
    out, post = eng.forward_step(iter([mb]), None, None, None)
    assert post == "post" and set(out) == {"log_probs", "sum_pi_squared"}
    torch.testing.assert_close(out["sum_pi_squared"], 2.0 * _verl_sum_sq(x, w, 0.8), rtol=1e-12, atol=1e-14)
    assert tu.get_non_tensor_data(mb, "calculate_sum_pi_squared", None) is True  # the caller's batch is left alone
    out, _ = eng.forward_step(iter([_mbatch(False)]), None, None, None)  # not asked: nothing extra
    assert set(out) == {"log_probs"}
    # legacy mode (Megatron-Core < 0.18): verl's GPTModel.forward calls linear_cross_entropy, ours in its scope
    scope = {"want": True, "pending": None, "result": None}
    tokens = (vm._SUM_SQ_SCOPE.set(scope), vm._LEGACY_SCOPE.set({"sequence_parallel": False}))
    try:
        lp, _ = sys.modules[vm.FUSED_MODULE].linear_cross_entropy(x, w, labels, 0.8, "none", _NO_GROUP)
    finally:
        vm._LEGACY_SCOPE.reset(tokens[1])
        vm._SUM_SQ_SCOPE.reset(tokens[0])
    assert lp.shape == (S,)
    torch.testing.assert_close(scope["pending"], _verl_sum_sq(x, w, 0.8), rtol=1e-12, atol=1e-14)
    vm.uninstall_megatron_forward()
    assert sys.modules[vm.FUSED_MODULE].postprocess_thd_engine.__module__ != vm.__name__  # verl's given back


# ----------------------------------------------------------------------------------------------------------------
# FSDP2 (2 gloo ranks): an untied lm_head is an FSDP2 unit of its own; sum_pi_squared runs inside its forward method


def _rank_fsdp2(rank, world):
    from verl import DataProto
    from verl.models.transformers import monkey_patch
    from verl.utils import fsdp_utils
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import FSDPEngineConfig
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    from test_verl_fsdp2_untied import TEMPERATURE, _data, _model

    ti.get_device_id = ti.get_device_name = fsdp_utils.get_device_id = lambda: "cpu"
    d = _data()
    n = d["prompts"].shape[0]
    mine = list(range(rank * n // world, (rank + 1) * n // world))
    fields = {
        "input_ids": torch.cat([d["prompts"], d["responses"]], 1),
        "attention_mask": d["attn"],
        "position_ids": (d["attn"].cumsum(-1) - 1).clamp(min=0),
        "prompts": d["prompts"],
        "responses": d["responses"],
        "response_mask": d["rmask"].long(),
    }
    td = left_right_2_no_padding(DataProto.from_single_dict({k: v[mine] for k, v in fields.items()}).to_tensordict())
    tu.assign_non_tensor(
        td,
        use_remove_padding=True,
        use_fused_kernels=True,
        calculate_entropy=True,
        calculate_sum_pi_squared=True,
        temperature=TEMPERATURE,
    )
    ec = FSDPEngineConfig(
        strategy="fsdp2",
        mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
        use_torch_compile=False,
    )

    class Engine(ti.FSDPEngineWithLMHead):
        def __init__(self):
            self.engine_config = ec
            self.model_config = types.SimpleNamespace(lora_rank=0, enable_activation_offload=False)
            self.device_mesh = torch.distributed.init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
            self.ulysses_sequence_parallel_size, self.use_ulysses_sp = 1, False
            self.ulysses_device_mesh = self.ulysses_parallel_group = None
            self._is_offload_param = self._is_offload_optimizer = False
            self._uses_fsdp2_cpu_offload_policy, self._qat_enabled, self.pad_to_length = False, False, False
            self._autocast_dtype = torch.float32

    engine, model = Engine(), _model(False)
    monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="rlvr_torch")
    engine.module = engine._build_fsdp_module(model)
    engine.module.eval()
    with torch.no_grad():
        _, out = engine.forward_step(td, loss_function=None, forward_only=True)
    assert vf._HEAD_METHOD in engine.module.lm_head.__dict__  # ran as the lm_head unit's FSDP2 forward method
    return {k: no_padding_2_padding(v, td) for k, v in out["model_output"].items()}, mine


def test_fsdp2_untied_head_sum_pi_squared():
    from verl.utils.torch_functional import calculate_sum_pi_squared_from_logits

    from test_verl_fsdp2_untied import TEMPERATURE, _data, _model

    d, model = _data(), _model(False)
    ranks = run_ranks(_rank_fsdp2, 2)
    for res, rows in ranks:
        assert set(res) == {"log_probs", "entropy", "sum_pi_squared"}
        for j, i in enumerate(rows):
            keep = d["attn"][i].bool()
            seq = torch.cat([d["prompts"][i], d["responses"][i]])[keep][None]
            with torch.no_grad():
                logits = model(input_ids=seq).logits[0].float() / TEMPERATURE
            want = calculate_sum_pi_squared_from_logits(logits)
            p, r = int(d["attn"][i, : d["prompts"].shape[1]].sum()), int(d["rmask"][i].sum())
            torch.testing.assert_close(res["sum_pi_squared"][j, :r], want[p - 1 : p - 1 + r], rtol=1e-5, atol=1e-6)
