"""A per-sample temperature with the rlvr fused forward on verl's FSDP engine.

verl 0.9.1's ``FSDPEngineWithLMHead.prepare_model_inputs`` asserts a scalar temperature with ``use_fused_kernels``;
its non-fused path takes one temperature per sample (``micro_batch["temperature"]`` a ``(bsz,)`` tensor). With
``fused_kernel_options.impl_backend=rlvr*`` the plug-in passes that temperature per token (verl's own
``temperature_rmpad`` layout with remove-padding, one per row without) to the fused forward:

- verl's own ``forward_step`` / ``prepare_model_inputs`` / ``prepare_model_outputs`` on a tiny Llama on CPU (the
  :class:`CPUEngine` of ``test_verl_sum_pi_squared``), fused (rlvr) against verl's non-fused path with the same
  per-sample temperatures: log-probs, entropy and ``sum_pi_squared`` (fp32 tight, bf16 autocast loose), the parameter
  gradients of a loss through ``forward_step``; remove-padding on and off;
- Ulysses (5 gloo ranks): the per-token temperature each rank's forward gets is the slice verl makes of its labels;
- FSDP2 (2 gloo ranks, untied ``lm_head`` as its own unit): per-sample temperatures through verl's engine;
- verl's own fused backend (``impl_backend=torch``) still asserts; the scalar path is unchanged.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

import rlvr_kernels.integrations.verl  # noqa: F401  (installs the hooks)
from _gloo import run_ranks
from rlvr_kernels.integrations._verl import forward as vf
from test_verl_sum_pi_squared import CPUEngine, V, batch, tiny_llama  # noqa: F401  (fixtures)

transformers = pytest.importorskip("transformers")
ti = pytest.importorskip("verl.workers.engine.fsdp.transformer_impl")

TEMPS = [0.6, 1.0, 1.3, 0.6, 0.8, 1.3]  # one per sample of the batch fixture (6 sequences)


@pytest.fixture(autouse=True)
def _cpu_device(monkeypatch):
    monkeypatch.setattr(ti, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(ti, "get_device_name", lambda: "cpu")


def _micro_batch(td, *, fused, rmpad, temperature, sq=False):
    from verl.utils import tensordict_utils as tu

    mb = td.copy()
    if isinstance(temperature, torch.Tensor):
        mb["temperature"] = temperature
    else:
        tu.assign_non_tensor(mb, temperature=temperature)
    tu.assign_non_tensor(
        mb, use_remove_padding=rmpad, use_fused_kernels=fused, calculate_entropy=True, calculate_sum_pi_squared=sq
    )
    return mb


def _model(model, fused, impl):
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    m = copy.deepcopy(model)
    if fused:
        patch_forward_with_backends(m, use_fused_kernels=True, fused_kernels_backend=impl)
    return m


def _forward(model, td, *, fused, rmpad, temperature, impl="rlvr_torch", autocast_dtype=torch.float32, sq=False):
    """verl's compute_log_prob step; outputs in verl's padded ``[B, R]`` layout."""
    from verl.workers.utils.padding import no_padding_2_padding

    mb = _micro_batch(td, fused=fused, rmpad=rmpad, temperature=temperature, sq=sq)
    with torch.no_grad():
        _, out = CPUEngine(_model(model, fused, impl), fused, autocast_dtype).forward_step(
            mb, loss_function=None, forward_only=True
        )
    return {k: no_padding_2_padding(v, td) for k, v in out["model_output"].items()}


def _temps():
    return torch.tensor(TEMPS)


@pytest.mark.parametrize(
    ("rmpad", "impl"), [(True, "rlvr_torch"), (False, "rlvr_torch"), (True, "rlvr"), (True, "rlvr_triton")]
)
def test_per_sample_temperature_matches_verl_non_fused(tiny_llama, batch, rmpad, impl):  # noqa: F811
    td, rmask = batch
    want = _forward(tiny_llama, td, fused=False, rmpad=rmpad, temperature=_temps(), sq=True)
    got = _forward(tiny_llama, td, fused=True, rmpad=rmpad, temperature=_temps(), impl=impl, sq=True)
    assert set(got) == {"log_probs", "entropy", "sum_pi_squared"}
    for k in ("log_probs", "entropy", "sum_pi_squared"):
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k][rmask], want[k][rmask], rtol=1e-5, atol=1e-5)
    # the temperatures matter: one scalar temperature for all samples gives other values
    scalar = _forward(tiny_llama, td, fused=False, rmpad=rmpad, temperature=1.0)
    assert float((scalar["log_probs"][rmask] - got["log_probs"][rmask]).abs().max()) > 1e-2


@pytest.mark.parametrize("rmpad", [True, False])
def test_per_sample_temperature_bf16_autocast(tiny_llama, batch, rmpad):  # noqa: F811
    td, rmask = batch
    want = _forward(tiny_llama, td, fused=False, rmpad=rmpad, temperature=_temps(), autocast_dtype=torch.bfloat16)
    got = _forward(tiny_llama, td, fused=True, rmpad=rmpad, temperature=_temps(), autocast_dtype=torch.bfloat16)
    exact = _forward(tiny_llama, td, fused=False, rmpad=rmpad, temperature=_temps())
    for k in ("log_probs", "entropy"):
        assert got[k].dtype == torch.float32
        # verl's bf16 logits (|z| ~ 10 here, divided by a bf16 temperature) are off by ~0.1
        torch.testing.assert_close(got[k][rmask].float(), want[k][rmask].float(), rtol=0, atol=0.3)
        torch.testing.assert_close(got[k][rmask], exact[k][rmask], rtol=0, atol=0.1)


def _grads(model, td, *, fused, rmpad, temperature):
    """Parameter gradients of ``sum(a * log_probs) + sum(b * entropy)`` over the tokens, through the engine's
    training ``forward_step`` (the loss function gets verl's nested ``model_output``)."""
    m = _model(model, fused, "rlvr_torch").train()
    m.zero_grad(set_to_none=True)
    mb = _micro_batch(td, fused=fused, rmpad=rmpad, temperature=temperature)

    def loss_function(model_output, data, dp_group=None):
        lp, ent = model_output["log_probs"].values(), model_output["entropy"].values()
        g = torch.Generator().manual_seed(5)
        a, b = torch.randn(lp.shape, generator=g), torch.randn(ent.shape, generator=g)
        # a sequence's last log-prob has no next token (verl's packed roll takes the next sequence's first one, the
        # padded fused path a pad id) and is never read: left out, as verl's response mask does
        a[model_output["log_probs"].offsets()[1:] - 1] = 0
        return (a * lp).sum() + (b * ent).sum(), {}

    loss, _ = CPUEngine(m, fused).forward_step(mb, loss_function=loss_function, forward_only=False)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("rmpad", [True, False])
def test_per_sample_temperature_gradients_match(tiny_llama, batch, rmpad):  # noqa: F811
    td, _ = batch
    want_loss, want = _grads(tiny_llama, td, fused=False, rmpad=rmpad, temperature=_temps())
    got_loss, got = _grads(tiny_llama, td, fused=True, rmpad=rmpad, temperature=_temps())
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert set(got) == set(want) and "lm_head.weight" in got
    for name, g in want.items():
        assert float(g.abs().max()) > 0, name
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_verl_own_fused_backend_still_asserts(tiny_llama, batch, monkeypatch):  # noqa: F811
    td, _ = batch
    monkeypatch.setattr(type(tiny_llama), "forward", type(tiny_llama).forward)  # verl patches the class
    for rmpad in (True, False):
        with pytest.raises(AssertionError, match="per sample temperature"):
            _forward(tiny_llama, td, fused=True, rmpad=rmpad, temperature=_temps(), impl="torch")


@pytest.mark.parametrize("rmpad", [True, False])
def test_scalar_path_unchanged(tiny_llama, batch, rmpad):  # noqa: F811
    """A scalar temperature still goes through verl's own fused path (a float reaches the forward); equal per-sample
    temperatures give the scalar's results."""
    td, rmask = batch
    eng = CPUEngine(_model(tiny_llama, True, "rlvr_torch"), True)
    inputs, _ = eng.prepare_model_inputs(_micro_batch(td, fused=True, rmpad=rmpad, temperature=0.8))
    assert inputs["temperature"] == 0.8 and not isinstance(inputs["temperature"], torch.Tensor)
    inputs, _ = eng.prepare_model_inputs(_micro_batch(td, fused=True, rmpad=rmpad, temperature=_temps()))
    labels = inputs["shift_labels"] if rmpad else inputs["input_ids"]
    assert inputs["temperature"].shape == labels.shape and inputs["temperature"].dtype == torch.float32
    scalar = _forward(tiny_llama, td, fused=True, rmpad=rmpad, temperature=0.8)
    same = _forward(tiny_llama, td, fused=True, rmpad=rmpad, temperature=torch.full((6,), 0.8))
    for k in ("log_probs", "entropy"):
        torch.testing.assert_close(same[k][rmask], scalar[k][rmask], rtol=1e-6, atol=1e-6)


def test_forward_temperature_forms(tiny_llama):  # noqa: F811
    """The patched model's ``temperature``: a number, one per token, or one per sample of ``(bsz, L)`` inputs."""
    model = vf.patch_forward_with_rlvr(copy.deepcopy(tiny_llama), backend="torch")
    ids = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(3))
    temps = torch.tensor([0.6, 1.0, 1.3])
    with torch.no_grad():
        logits = tiny_llama(input_ids=ids).logits.float() / temps[:, None, None]
        per_sample = model(input_ids=ids, temperature=temps, return_dict=True, rlvr_sum_pi_squared=True)
        per_token = model(input_ids=ids, temperature=temps[:, None].expand(3, 7), return_dict=True)
        scalar = model(input_ids=ids, temperature=torch.tensor(1.3), return_dict=True)
    labels = torch.roll(ids, -1, -1)
    lp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(per_sample.log_probs, lp.gather(-1, labels[..., None])[..., 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_sample.entropy, -(lp.exp() * lp).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_sample.sum_pi_squared, lp.exp().pow(2).sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_token.log_probs, per_sample.log_probs, rtol=0, atol=0)
    torch.testing.assert_close(scalar.log_probs[2], per_sample.log_probs[2], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="one temperature per token"):
        model(input_ids=ids, temperature=torch.ones(2, 7), return_dict=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the Triton interpreter's masked lanes
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_log_sum_sq_rows_per_token(backend):
    from verl.utils.torch_functional import calculate_sum_pi_squared_from_logits

    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(23, 8, generator=g), 3 * torch.randn(40, 8, generator=g)
    temp = torch.tensor([0.6, 1.0, 1.3])[torch.randint(0, 3, (23,), generator=g)]
    lss, lse = vf.log_sum_sq_rows(x, w, None, temp, backend)
    z = (x.double() @ w.double().T) / temp.double()[:, None]
    torch.testing.assert_close(lss.exp().double(), calculate_sum_pi_squared_from_logits(z), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lse.double(), torch.logsumexp(z, -1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="> 0 and finite"):
        vf.log_sum_sq_rows(x, w, None, torch.where(temp > 1.1, 0.0, temp), backend)


# ----------------------------------------------------------------------------------------------------------------
# Ulysses (5 gloo ranks): the per-token temperature is sliced with the labels


def _rank_ulysses(rank, world, model, td):
    from verl.utils.ulysses import set_ulysses_sequence_parallel_group

    ti.get_device_id = ti.get_device_name = lambda: "cpu"  # this forked rank only
    set_ulysses_sequence_parallel_group(torch.distributed.group.WORLD)
    eng = CPUEngine(_model(model, True, "rlvr_torch"), True)
    eng.ulysses_sequence_parallel_size, eng.use_ulysses_sp = world, True
    eng.ulysses_parallel_group = torch.distributed.group.WORLD
    inputs, output_args = eng.prepare_model_inputs(
        _micro_batch(td, fused=True, rmpad=True, temperature=_temps(), sq=True)
    )
    # the local shard's log-probs / sum_pi_squared from the full sequence's hidden states (Ulysses attention needs
    # flash-attention, absent on CPU: only the lm_head part of the forward runs on the shard)
    ids = td["input_ids"].values()[None]
    pos = td["position_ids"].values()[None]
    with torch.no_grad():
        hidden = model.model(input_ids=ids, position_ids=pos).last_hidden_state[0]
        pad = output_args["pad_size"]
        hidden = torch.cat([hidden, hidden.new_zeros(pad, hidden.shape[-1])])
        n = hidden.shape[0] // world
        local = hidden[rank * n : (rank + 1) * n][None]
        res = vf._head_logprobs(
            model.lm_head, local, inputs["shift_labels"], inputs["temperature"], "torch", sum_sq=True
        )
    return inputs["input_ids"], inputs["shift_labels"], inputs["temperature"], pad, res[0], res[2]


def test_ulysses_slices_temperature_with_labels(tiny_llama, batch):  # noqa: F811
    td, _ = batch
    ranks = run_ranks(_rank_ulysses, 5, tiny_llama, td)  # 36 tokens over 5 ranks: a Ulysses pad of 4
    ids = td["input_ids"].values()
    lens = td["input_ids"].offsets().diff()
    temp = torch.repeat_interleave(_temps(), lens)
    pad = ranks[0][3]
    assert pad == 4 and all(r[3] == pad for r in ranks)
    got_ids, got_labels, got_temp, got_lp, got_sq = (torch.cat([r[i][0] for r in ranks]) for i in (0, 1, 2, 4, 5))
    n = ids.numel()
    torch.testing.assert_close(got_ids[:n], ids)
    torch.testing.assert_close(got_labels[:n], torch.roll(ids, -1, 0))
    torch.testing.assert_close(got_temp[:n], temp)
    assert bool((got_temp[n:] == 1).all())  # the Ulysses pad, as verl pads temperature_rmpad
    # against verl's non-fused values (per-sample temperatures, no SP)
    from verl.utils.torch_functional import calculate_sum_pi_squared_from_logits

    with torch.no_grad():
        logits = tiny_llama(input_ids=ids[None], position_ids=td["position_ids"].values()[None]).logits[0]
    z = logits.float() / temp[:, None]
    lp = torch.log_softmax(z, -1).gather(-1, torch.roll(ids, -1, 0)[:, None])[:, 0]
    torch.testing.assert_close(got_lp[:n], lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_sq[:n], calculate_sum_pi_squared_from_logits(z), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# FSDP2 (2 gloo ranks): an untied lm_head is an FSDP2 unit; the per-token temperature is an argument of its method

FSDP2_TEMPS = [0.6, 1.0, 1.3, 0.8, 0.6, 1.3, 1.0, 0.7]  # one per row of test_verl_fsdp2_untied's data


def _rank_fsdp2(rank, world):
    from verl import DataProto
    from verl.models.transformers import monkey_patch
    from verl.utils import fsdp_utils
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import FSDPEngineConfig
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    from test_verl_fsdp2_untied import _data, _model

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
    td["temperature"] = torch.tensor(FSDP2_TEMPS)[mine]
    tu.assign_non_tensor(
        td, use_remove_padding=True, use_fused_kernels=True, calculate_entropy=True, calculate_sum_pi_squared=True
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


def test_fsdp2_untied_head_per_sample_temperature():
    from verl.utils.torch_functional import calculate_sum_pi_squared_from_logits

    from test_verl_fsdp2_untied import _data, _model

    d, model = _data(), _model(False)
    for res, rows in run_ranks(_rank_fsdp2, 2):
        assert set(res) == {"log_probs", "entropy", "sum_pi_squared"}
        for j, i in enumerate(rows):
            keep = d["attn"][i].bool()
            seq = torch.cat([d["prompts"][i], d["responses"][i]])[keep][None]
            with torch.no_grad():
                z = model(input_ids=seq).logits[0].float() / FSDP2_TEMPS[i]
            lp = torch.log_softmax(z, -1)
            p, r = int(d["attn"][i, : d["prompts"].shape[1]].sum()), int(d["rmask"][i].sum())
            s = slice(p - 1, p - 1 + r)
            want_lp = lp[s].gather(-1, seq[0, p : p + r, None])[:, 0]
            torch.testing.assert_close(res["log_probs"][j, :r], want_lp, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(res["entropy"][j, :r], -(lp.exp() * lp).sum(-1)[s], rtol=1e-5, atol=1e-5)
            want_sq = calculate_sum_pi_squared_from_logits(z)[s]
            torch.testing.assert_close(res["sum_pi_squared"][j, :r], want_sq, rtol=1e-5, atol=1e-6)
