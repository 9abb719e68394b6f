"""The rlvr fused forward under verl's FSDP2 engine on 2 gloo ranks (CPU), with an untied and a tied lm_head.

verl 0.9.1's ``apply_fsdp2`` (``verl.utils.fsdp_utils._select_fsdp2_wrap_targets``) shards an untied ``lm_head`` as
its own FSDP2 unit. A fused forward that reads ``lm_head.weight`` without calling ``lm_head`` gets the sharded
``DTensor`` (FSDP2 unshards a unit around its forward only) and fails ("got mixed torch.Tensor and DTensor"); the
rlvr forward runs its op as an FSDP2 forward method of that unit instead.

Each rank runs verl's own code: ``patch_forward_with_backends`` (how ``FSDPEngine._build_module``'s
``apply_monkey_patch`` ends; ``impl_backend=rlvr_torch`` is routed to the rlvr forward), ``FSDPEngine.
_build_fsdp_module`` (strategy fsdp2: ``apply_fsdp2`` + ``fsdp2_load_full_state_dict``) and
``FSDPEngineWithLMHead.forward_backward_batch`` (2 micro-batches of 2 rows; with and without verl's deferred gradient
sync on the first); only ``FSDPEngine.__init__`` is a CPU stand-in. The losses and the full gradients of
``lm_head``, the embeddings, a decoder layer and the final norm (FSDP2 averages and reduce-scatters them into the
shards) equal those of the plain (non-fused, lm_head called) model on one process over both ranks' rows.
"""

from __future__ import annotations

import types

import pytest
import torch

from _gloo import run_ranks

pytest.importorskip("verl")
transformers = pytest.importorskip("transformers")

B, P, R, V, H = 8, 3, 6, 96, 16
WORLD = 2
COEF_ENT = 0.1
TEMPERATURE = 0.8
CHECKED = ("lm_head.weight", "model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight")


def _data():
    g = torch.Generator().manual_seed(0)
    plen = torch.tensor([3, 1, 2, 3, 2, 1, 3, 2])
    rlen = torch.tensor([6, 5, 1, 6, 3, 4, 4, 2])
    pmask = torch.arange(P)[None] >= (P - plen)[:, None]
    rmask = torch.arange(R)[None] < rlen[:, None]
    attn = torch.cat([pmask, rmask], 1).long()
    prompts = torch.randint(1, V, (B, P), generator=g) * pmask
    responses = torch.randint(1, V, (B, R), generator=g) * rmask
    adv = torch.randn(B, generator=g)[:, None].expand(B, R).contiguous()
    return dict(
        plen=plen, rlen=rlen, pmask=pmask, rmask=rmask, attn=attn, prompts=prompts, responses=responses, adv=adv
    )


def _model(tied: bool):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        hidden_size=H,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=V,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
    )
    model = transformers.Qwen2ForCausalLM(cfg).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # sharper distributions: larger, more varied gradients
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


def _reference(tied: bool):
    """One process, the plain Hugging Face forward (lm_head called) over all B rows: loss and full gradients."""
    d, model = _data(), _model(tied)
    n_tok = int(d["rmask"].sum())
    loss = 0.0
    for i in range(B):
        seq = torch.cat([d["prompts"][i], d["responses"][i]])[d["attn"][i].bool()][None]
        logits = model(input_ids=seq).logits[0].float() / TEMPERATURE
        logp_all = torch.log_softmax(logits, -1)
        s, n = int(d["plen"][i]) - 1, int(d["rlen"][i])
        lp = logp_all[s : s + n].gather(-1, seq[0, s + 1 : s + 1 + n, None])[:, 0]
        ent = -(logp_all[s : s + n].exp() * logp_all[s : s + n]).sum(-1)
        loss = loss - (d["adv"][i, :n] * lp + COEF_ENT * ent).sum() / n_tok
    loss.backward()
    loss = loss.detach()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if n in CHECKED}
    if tied:
        grads["lm_head.weight"] = grads["model.embed_tokens.weight"]
    return float(loss), grads


def _rank(rank: int, world: int, tied: bool):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from verl import DataProto
    from verl.models.transformers import monkey_patch
    from verl.utils import fsdp_utils
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import FSDPEngineConfig
    from verl.workers.engine.fsdp import transformer_impl as ti
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    import rlvr_kernels.integrations.verl  # noqa: F401  (installs the hooks)
    from rlvr_kernels.integrations._verl.forward import _HEAD_METHOD

    ti.get_device_id = ti.get_device_name = fsdp_utils.get_device_id = lambda: "cpu"  # CPU for the accelerator
    d = _data()
    mine = list(range(rank * B // world, (rank + 1) * B // world))
    fields = {
        "input_ids": torch.cat([d["prompts"], d["responses"]], 1),
        "attention_mask": d["attn"],
        "position_ids": (d["attn"].cumsum(-1) - 1).clamp(min=0),
        "prompts": d["prompts"],
        "responses": d["responses"],
        "response_mask": d["rmask"].long(),
        "advantages": d["adv"],
    }

    def rank_batch():
        """This rank's rows as verl's trainer sends them (no padding), 2 micro-batches of 2."""
        td = left_right_2_no_padding(
            DataProto.from_single_dict({k: v[mine] for k, v in fields.items()}).to_tensordict()
        )
        tu.assign_non_tensor(
            td,
            use_remove_padding=True,
            use_dynamic_bsz=False,
            micro_batch_size_per_gpu=2,
            max_token_len_per_gpu=None,
            use_fused_kernels=True,
            calculate_entropy=True,
            compute_loss=True,
            temperature=TEMPERATURE,
            global_batch_size=B,
        )
        return td

    def loss_fn(model_output, data, dp_group=None):
        lp = no_padding_2_padding(model_output["log_probs"], data)
        ent = no_padding_2_padding(model_output["entropy"], data)
        pad = data.select("response_mask", "advantages").to_padded_tensor()
        mask = pad["response_mask"].to(lp.dtype)
        # verl's global-token normalisation: each rank scales by dp_size, FSDP averages the ranks' gradients
        loss = -((pad["advantages"] * lp + COEF_ENT * ent) * mask).sum() / data["batch_num_tokens"] * data["dp_size"]
        return loss, {}

    out = {}
    for defer_sync in (True, False):  # verl's use_no_sync_for_gradient_accumulation: skip the first reduce-scatter
        ec = FSDPEngineConfig(
            strategy="fsdp2",
            mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
            use_dynamic_bsz=False,
            micro_batch_size_per_gpu=2,
            use_no_sync_for_gradient_accumulation=defer_sync,
            use_torch_compile=False,
        )

        class CPUEngine(ti.FSDPEngineWithLMHead):
            """verl's FSDP engine code; only ``__init__`` (device mesh, configs) is a CPU stand-in."""

            def __init__(self):
                self.engine_config = ec
                self.model_config = types.SimpleNamespace(lora_rank=0, enable_activation_offload=False)
                self.device_mesh = torch.distributed.init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
                self.ulysses_sequence_parallel_size, self.use_ulysses_sp = 1, False
                self.ulysses_device_mesh = self.ulysses_parallel_group = None
                self._is_offload_param = self._is_offload_optimizer = False
                self._uses_fsdp2_cpu_offload_policy, self._qat_enabled, self.pad_to_length = False, False, False

        engine, model = CPUEngine(), _model(tied)
        # what FSDPEngine._build_module's apply_monkey_patch ends with (its other patches: Ulysses SP, VLMs)
        monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="rlvr_torch")
        engine.module = engine._build_fsdp_module(model)  # verl's apply_fsdp2 + fsdp2_load_full_state_dict
        head = engine.module.lm_head
        # verl's sharding is kept: untied, lm_head is an FSDP2 unit of its own; tied, it is in the root unit
        assert isinstance(head, FSDPModule) != tied and isinstance(head.weight, DTensor)
        engine.module.train()
        res = engine.forward_backward_batch(rank_batch(), loss_fn)
        assert isinstance(head.weight, DTensor)  # resharded after the step
        assert (_HEAD_METHOD in head.__dict__) != tied  # the FSDP2 route is taken for an lm_head unit only
        grads = {}
        for n, p in engine.module.named_parameters():
            if n in CHECKED:
                assert isinstance(p.grad, DTensor), n  # reduce-scattered into the shard
                grads[n] = p.grad.full_tensor().clone()
        if tied:
            grads["lm_head.weight"] = grads["model.embed_tokens.weight"]
        out[defer_sync] = {"losses": [float(x) for x in res["loss"]], "grads": grads}
    return out


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fused_forward_under_verl_fsdp2_matches_the_union(tied):
    """impl_backend=rlvr_torch under verl's FSDP2 engine on 2 ranks: the losses and the gradients (lm_head, the
    embeddings, a decoder layer, the final norm) equal those of the plain model on one process over both ranks'
    rows, with and without verl's deferred gradient sync."""
    ref_loss, ref_grads = _reference(tied)
    ranks = run_ranks(_rank, WORLD, tied)
    for defer_sync in (True, False):
        # each rank's loss is scaled by dp_size: the mean over ranks of the summed micro-batch losses is the loss
        total = sum(sum(r[defer_sync]["losses"]) for r in ranks) / WORLD
        assert len(ranks[0][defer_sync]["losses"]) == 2  # 2 micro-batches per rank
        assert total == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
        for rank, r in enumerate(ranks):
            for n, g in ref_grads.items():
                assert float(g.abs().max()) > 0, n
                torch.testing.assert_close(
                    r[defer_sync]["grads"][n], g, rtol=1e-5, atol=1e-6, msg=lambda m, n=n, k=rank: f"rank {k} {n}: {m}"
                )
