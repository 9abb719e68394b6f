"""The 2-rank gloo check of tests/test_verl_users.py::test_two_ranks_match_the_union.

``launch(out_dir)`` forks two ranks from the calling process (torch.multiprocessing, start method "fork", so that
torch / transformers / verl, already imported, are not imported again: that alone costs ~15 s per process here);
they meet in a gloo group through a file store in ``out_dir`` and each returns a JSON-able result. Standalone:
``python tests/_verl_dist.py OUT_DIR``.

Both ranks build the same tiny Llama and the same global rollout batch of 8 sequences; rank r owns rows
[4r, 4r + 4). Every number a rank computes through verl's engine code in the process group is compared, on that
rank, with a single-process computation over the union of both ranks' rows (no communication):

- losses: verl's ``FSDPEngineWithLMHead.forward_backward_batch`` (it all-reduces ``batch_num_tokens`` over the DP
  group and sets ``dp_size`` = 2; micro-batches of 2) with verl's ``ppo_loss`` and an ``rlvr_*`` loss, in every
  ``loss_agg_mode``; the DP gradient (the ranks' gradients averaged, as FSDP does) and the mean of the ranks' losses
  equal the gradient / loss of the same ``rlvr_*`` loss over the union batch with ``dp_size`` 1;
- DelTA: the worker hook's ``delta_for_update`` (no-grad forwards through verl's ``infer_batch``) with
  ``delta_coef_all_reduce=true`` equals ``rlvr_kernels.delta_coefficients`` over both ranks' tokens, without it
  ``delta_coefficients`` over the rank's own tokens; the all-reduced coefficients then feed ``rlvr_delta``.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import time
import types


def launch(out_dir: str, world: int = 2, timeout: float = 240.0) -> list:
    """Run the ranks (forked) and return their results; a rank's exception is raised here with its traceback."""
    import torch
    import torch.multiprocessing as mp

    init = "file://" + os.path.join(out_dir, "pg_store")
    # a process that has initialised CUDA cannot fork children that might touch it: spawn then (slower: the ranks
    # import torch / transformers / verl again)
    method = "spawn" if torch.cuda.is_available() and torch.cuda.is_initialized() else "fork"
    ctx = mp.start_processes(rank_main, args=(world, init, out_dir), nprocs=world, join=False, start_method=method)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the {world} ranks did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    out = []
    for rank in range(world):
        with open(os.path.join(out_dir, f"result{rank}.json")) as f:
            out.append(json.load(f))
    return out


def rank_main(rank: int, world: int, init: str, out_dir: str) -> None:
    import torch

    torch.set_num_threads(1)  # forked from a process that may have used the intra-op thread pool
    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=180)
    )
    try:
        result = run(rank, world)
    finally:
        torch.distributed.destroy_process_group()
    with open(os.path.join(out_dir, f"result{rank}.json"), "w") as f:
        json.dump(result, f)


def run(rank: int, world: int) -> dict:
    import torch
    import transformers
    from verl import DataProto
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import FSDPActorConfig
    from verl.workers.engine.fsdp import transformer_impl as ti
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import left_right_2_no_padding

    import rlvr_kernels.integrations.verl as rv
    from rlvr_kernels import delta_coefficients
    from rlvr_kernels.integrations._verl.delta_worker import delta_for_update

    ti.get_device_id = ti.get_device_name = lambda: "cpu"  # the CPU stands in for the accelerator

    B, P, R, V, H = 8, 3, 7, 64, 16
    g = torch.Generator().manual_seed(0)
    plen = torch.tensor([3, 1, 2, 3, 2, 1, 3, 2])
    rlen = torch.tensor([7, 5, 1, 6, 3, 7, 4, 2])  # rank 0: 19 tokens, rank 1: 16
    pmask = torch.arange(P)[None] >= (P - plen)[:, None]
    rmask = torch.arange(R)[None] < rlen[:, None]
    attn = torch.cat([pmask, rmask], 1).long()
    prompts = torch.randint(1, V, (B, P), generator=g) * pmask
    responses = torch.randint(1, V, (B, R), generator=g) * rmask
    input_ids = torch.cat([prompts, responses], 1)
    adv = torch.tensor([1.2, -0.7, 0.0, 0.9, -1.5, 0.4, -0.3, 0.6])[:, None].expand(B, R).contiguous()
    mine = list(range(rank * B // world, (rank + 1) * B // world))

    torch.manual_seed(0)
    model0 = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=H,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=V,
            max_position_embeddings=32,
        )
    ).float()
    with torch.no_grad():
        model0.lm_head.weight.mul_(30.0)

    def per_sequence(model, grad: bool):
        """Each sequence alone through ``model``: response log-probs [B, R] and final hidden states [B, R, H]."""
        hs = torch.zeros(B, R, H)
        rows_lp = []
        with torch.set_grad_enabled(grad):
            for i in range(B):
                seq = input_ids[i][attn[i].bool()][None]
                hid = model.model(input_ids=seq).last_hidden_state[0]
                lp = torch.log_softmax(model.lm_head(hid).float(), -1)
                s, n = int(plen[i]) - 1, int(rlen[i])
                hs[i, :n] = hid[s : s + n].detach()
                rows_lp.append(
                    torch.nn.functional.pad(lp[s : s + n].gather(-1, seq[0, s + 1 : s + 1 + n, None])[:, 0], (0, R - n))
                )
        return torch.stack(rows_lp), hs

    with torch.no_grad():
        lp_old, h_old = per_sequence(model0, grad=False)
    # old log-probs a little away from the current policy, so that the trust regions clip
    old = (lp_old + torch.randn(B, R, generator=g) * 0.4).clamp(max=-1e-3) * rmask

    class CPUEngine(ti.FSDPEngineWithLMHead):
        """verl's FSDP engine code on an unwrapped CPU model (only construction differs)."""

        def __init__(self, model, ec):
            self.module, self.engine_config = model, ec
            self.optimizer, self.lr_scheduler = None, None
            self._is_offload_param = self._is_offload_optimizer = False
            self.ulysses_sequence_parallel_size, self.use_ulysses_sp = 1, False
            self.ulysses_device_mesh = self.ulysses_parallel_group = None
            self.pad_to_length, self._autocast_dtype, self.scaler, self._qat_enabled = False, torch.float32, None, False

        def to(self, *a, **k):
            pass

        def is_mp_src_rank_with_outputs(self):
            return False

    ec = types.SimpleNamespace(
        forward_only=False,
        use_dynamic_bsz=False,
        max_token_len_per_gpu=None,
        infer_max_token_len_per_gpu=None,
        micro_batch_size_per_gpu=2,
        infer_micro_batch_size_per_gpu=2,
        use_fused_kernels=False,
        fsdp_size=1,
        entropy_checkpointing=False,
        entropy_from_logits_with_chunking=False,
    )

    def rank_batch():
        """This rank's shard as verl's legacy trainer sends it (DataProto -> TensorDict -> no padding)."""
        fields = {
            "input_ids": input_ids,
            "attention_mask": attn,
            "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
            "prompts": prompts,
            "responses": responses,
            "response_mask": rmask.long(),
            "old_log_probs": old,
            "advantages": adv,
        }
        td = left_right_2_no_padding(
            DataProto.from_single_dict({k: v[mine] for k, v in fields.items()}).to_tensordict()
        )
        tu.assign_non_tensor(
            td,
            use_remove_padding=True,
            use_dynamic_bsz=False,
            micro_batch_size_per_gpu=2,
            max_token_len_per_gpu=None,
            use_fused_kernels=False,
            calculate_entropy=False,
            compute_loss=True,
            temperature=1.0,
            global_batch_size=B,
        )
        return td

    checks, seen = [], {"dp_size": set(), "batch_num_tokens": set()}

    def check(label, got, want, rtol, atol):
        diff = float((got - want).abs().max())
        checks.append((label, diff, atol + rtol * float(want.abs().max())))

    # ---- DelTA coefficients through the worker hook ------------------------------------------------------------
    worker = types.SimpleNamespace(
        engine=CPUEngine(copy.deepcopy(model0), ec), engine_config=ec, model_config={"use_remove_padding": True}
    )
    union_coef = delta_coefficients(h_old, old, adv, rmask)
    own_coef = delta_coefficients(h_old[mine], old[mine], adv[mine], rmask[mine])
    coef_of = {}
    for all_reduce in (True, False):
        for cache in ("none", "cpu"):
            cfg = FSDPActorConfig(
                strategy="fsdp",
                rollout_n=1,
                ppo_micro_batch_size_per_gpu=2,
                policy_loss=(
                    rv.RLVRPolicyLossConfig(
                        loss_mode="rlvr_delta",
                        rlvr={"delta_coef_all_reduce": all_reduce, "delta_coef_hidden_cache": cache},
                    )
                ),
            )
            td = rank_batch()
            assert delta_for_update(worker, td, cfg, {}) == "computed"
            c = td[rv.DELTA_COEF_KEY]
            c = (c.to_padded_tensor(0.0) if c.is_nested else c)[:, :R]
            want = union_coef[mine] if all_reduce else own_coef
            m = rmask[mine]
            check(f"delta all_reduce={all_reduce} cache={cache}", c[m], want[m], 1e-5, 1e-5)
            coef_of[all_reduce] = c
    m = rmask[mine]
    delta_union_vs_own = float((union_coef[mine][m] - own_coef[m]).abs().max())

    # ---- losses through verl's engine with dp_size 2 -----------------------------------------------------------
    # the union's log-probs, each sequence alone, with one graph for every loss below
    ref = copy.deepcopy(model0)
    ref_names, ref_params = zip(*ref.named_parameters())
    lp_u, _ = per_sequence(ref, grad=True)
    modes = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
    runs = [(name, mode) for name in ("rlvr_clip", "rlvr_delta") for mode in modes]
    runs += [(name, mode) for name in ("rlvr_dppo", "rlvr_cispo") for mode in ("token-mean", "seq-mean-token-mean")]
    for name, mode in runs:
        cfg = FSDPActorConfig(
            strategy="fsdp",
            rollout_n=1,
            ppo_micro_batch_size_per_gpu=2,
            loss_agg_mode=mode,
            clip_ratio_low=0.2,
            clip_ratio_high=0.28,
            policy_loss=rv.RLVRPolicyLossConfig(loss_mode=name),
        )
        model = copy.deepcopy(model0)
        engine = CPUEngine(model, ec)
        td = rank_batch()
        if name == "rlvr_delta":
            td[rv.DELTA_COEF_KEY] = coef_of[True]
        losses = []

        def loss_fn(model_output, data, dp_group=None, cfg=cfg):
            seen["dp_size"].add(int(data["dp_size"]))
            seen["batch_num_tokens"].add(int(data["batch_num_tokens"]))
            with rv.loss_context(data=data, model_output=model_output):  # what the worker hook does
                loss, metrics = ppo_loss(cfg, model_output, data, dp_group)
            losses.append(loss.detach())
            return loss, metrics

        engine.forward_backward_batch(td, loss_fn)
        loss = torch.stack(losses).sum()
        torch.distributed.all_reduce(loss)
        loss = loss / world
        grads = []
        for p in model.parameters():
            gr = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            torch.distributed.all_reduce(gr)  # FSDP / DDP: the ranks' gradients averaged
            grads.append(gr / world)
        # the union, one process, dp_size 1
        ucfg = FSDPActorConfig(
            strategy="fsdp",
            rollout_n=1,
            ppo_micro_batch_size_per_gpu=2,
            loss_agg_mode=mode,
            clip_ratio_low=0.2,
            clip_ratio_high=0.28,
            policy_loss=rv.RLVRPolicyLossConfig(loss_mode=name),
        )
        ucfg.global_batch_info.update(dp_size=1, batch_num_tokens=int(rmask.sum()), global_batch_size=B)
        with rv.loss_context(delta_coefficients=union_coef):
            lu, _ = get_policy_loss_fn(name)(
                old_log_prob=old, log_prob=lp_u, advantages=adv, response_mask=rmask, loss_agg_mode=mode, config=ucfg
            )
        want = torch.autograd.grad(lu, ref_params, retain_graph=True, allow_unused=True)
        check(f"{name} {mode} loss", loss, lu.detach(), 1e-5, 1e-6)
        for pn, gr, gw in zip(ref_names, grads, want):
            check(f"{name} {mode} grad {pn}", gr, torch.zeros_like(gr) if gw is None else gw, 1e-4, 1e-6)
        assert float(sum(gr.abs().sum() for gr in grads)) > 0

    return {
        "rank": rank,
        "world": torch.distributed.get_world_size(),
        "checks": checks,
        "dp_size_seen": sorted(seen["dp_size"]),
        "batch_num_tokens_seen": sorted(seen["batch_num_tokens"]),
        "union_tokens": int(rmask.sum()),
        "local_tokens": int(rmask[mine].sum()),
        "delta_union_vs_own": delta_union_vs_own,
    }


if __name__ == "__main__":
    import transformers  # noqa: F401  (imported once, before the fork)
    from verl.workers.engine.fsdp import transformer_impl  # noqa: F401

    import rlvr_kernels.integrations.verl  # noqa: F401

    print(json.dumps(launch(sys.argv[1]))[:2000])
