"""Sequence-split rows (``seq_group=``): every rank of a real gloo group against the single-process op on whole rows.

Rank ``r`` holds the contiguous columns ``[c_r, c_r + T_r)`` of the same padded ``[B, T]`` batch (uneven widths, a
rank without columns, rows that end before a rank's columns, rows with holes, a row that starts late, an empty row,
NaN in every padded position, bf16 inputs, ties). Each rank's outputs, put side by side in rank order, must equal the
single-process op's on the whole batch: masks exactly, floats bit for bit (the split paths feed the exchanged
lengths, counts and carries into the same reference math). Errors that only one rank sees raise the same exception
on every rank, and the group stays usable after them. One launch per world size runs every case.
"""

from __future__ import annotations

import pytest
import torch

import rlvr_kernels as rk
from _gloo import run_ranks

B, T = 7, 20
WIDTHS = {2: [9, 11], 4: [6, 0, 9, 5]}


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0] = True  # full row
    mask[1, :4] = True  # ends inside the first rank's columns
    # row 2: empty
    mask[3, :15] = True
    mask[3, [2, 7, 11]] = False  # holes
    mask[4, 10:14] = True  # starts late (absolute positions)
    mask[5, :9] = True  # ends on the first boundary of the 2-rank split
    mask[6, :1] = True
    nan = torch.tensor(float("nan"))

    def pad(x):
        m = mask if x.dim() == 2 else mask[..., None]
        return torch.where(m, x, nan.to(x.dtype))

    ent = pad(torch.randint(0, 5, (B, T), generator=g).float() * 0.5)  # few distinct values: ties
    ent_c = pad(torch.rand(B, T, generator=g) * 3)
    adv = torch.randn(B, generator=g)
    adv[2] = float("nan")  # the per-row value of a row without valid tokens may hold anything
    adv_tok = pad(torch.randn(B, T, generator=g))
    lp = pad(-(torch.randint(1, 6, (B, T), generator=g).float() * 0.25))  # quantised: tied divergences
    lm = pad(lp + torch.randint(-2, 3, (B, T), generator=g).float() * 0.05).clamp(max=0.0)
    lp_c = pad(-torch.rand(B, T, generator=g) * 2)
    lm_c = pad(lp_c + 0.3 * torch.randn(B, T, generator=g))
    probs = torch.softmax(torch.randn(B, T, 4, generator=g), -1)[..., :3]  # top-3 columns, "other" mass > 0
    probs_mu = torch.softmax(torch.randn(B, T, 4, generator=g), -1)[..., :3]
    return dict(
        mask=mask,
        ent=ent,
        ent_c=ent_c,
        ent_bf16=ent_c.to(torch.bfloat16),
        adv=adv,
        adv_tok=adv_tok,
        adv_tok_bf16=adv_tok.to(torch.bfloat16),
        vals_f=pad(torch.randint(0, 4, (B, T), generator=g).float()),
        vals_i=torch.randint(0, 4, (B, T), generator=g),
        lp=lp,
        lm=lm,
        lp_c=lp_c,
        lm_c=lm_c,
        lp_bf16=lp_c.to(torch.bfloat16),
        lm_bf16=lm_c.to(torch.bfloat16),
        lp_k=pad(probs.log()),
        lm_k=pad(probs_mu.log()),
    )


def _local(batch: dict, c: int, width: int) -> dict:
    """This rank's columns of every per-token tensor; per-row tensors stay whole."""
    return {k: (v[:, c : c + width] if v.dim() >= 2 else v) for k, v in batch.items()}


def _cppo(b, g, **kw):
    r = rk.cppo_mask(b.pop("lp_"), b.pop("lm_"), b.pop("a_"), b["mask"], seq_group=g, **kw)
    return (r.mask, r.divergence, r.weight, r.delta_b, r.masked_fraction)


def _cppo_case(lp, lm, adv, **kw):
    return lambda b, g: _cppo(dict(b, lp_=b[lp], lm_=b[lm], a_=b[adv]), g, **kw)


# name -> (fn(batch, group), kind): "cols" results are [B, T]; "cppo" results are CPPOMask fields
CASES = {
    "percentile": (lambda b, g: rk.trajectory_percentile(b["mask"], seq_group=g), "cols"),
    "rank_pct_float": (lambda b, g: rk.trajectory_percentile(b["mask"], values=b["vals_f"], seq_group=g), "cols"),
    "rank_pct_int": (lambda b, g: rk.trajectory_percentile(b["mask"], values=b["vals_i"], seq_group=g), "cols"),
    "rank_pct_bf16": (
        lambda b, g: rk.trajectory_percentile(b["mask"], values=b["ent_bf16"], seq_group=g),
        "cols",
    ),
    "tp_055": (lambda b, g: rk.tp_schedule_mask(b["mask"], 0.55, seq_group=g), "cols"),
    "tp_099": (lambda b, g: rk.tp_schedule_mask(b["mask"], 0.99, seq_group=g), "cols"),
    "tp_0": (lambda b, g: rk.tp_schedule_mask(b["mask"], 0.0, seq_group=g), "cols"),
    "tp_reverse": (lambda b, g: rk.tp_schedule_mask(b["mask"], 0.3, reverse=True, seq_group=g), "cols"),
    "fork_ties": (lambda b, g: rk.forking_token_mask(b["ent"], b["mask"], 0.3, seq_group=g), "cols"),
    "fork_sched": (lambda b, g: rk.forking_token_mask(b["ent"], b["mask"], 1 - 0.7, seq_group=g), "cols"),
    "fork_0": (lambda b, g: rk.forking_token_mask(b["ent"], b["mask"], 0.0, seq_group=g), "cols"),
    "fork_1": (lambda b, g: rk.forking_token_mask(b["ent"], b["mask"], 1.0, seq_group=g), "cols"),
    "fork_bf16": (lambda b, g: rk.forking_token_mask(b["ent_bf16"], b["mask"], 0.25, seq_group=g), "cols"),
    "ent_adv_row": (
        lambda b, g: rk.entropy_shaped_advantages(b["adv"], b["ent_c"], b["mask"], 0.5, seq_group=g),
        "cols",
    ),
    "ent_adv_tok_bf16": (
        lambda b, g: rk.entropy_shaped_advantages(b["adv_tok_bf16"], b["ent_bf16"], b["mask"], 1.0, seq_group=g),
        "cols",
    ),
    "d3s_seq_ties": (
        lambda b, g: rk.d3s_token_mask(b["adv"], b["ent"], b["mask"], 0.3, scope="sequence", seq_group=g),
        "cols",
    ),
    "d3s_batch_ties": (lambda b, g: rk.d3s_token_mask(b["adv"], b["ent"], b["mask"], 0.35, seq_group=g), "cols"),
    "d3s_batch_zero_adv": (
        lambda b, g: rk.d3s_token_mask(torch.zeros(B), b["ent"], b["mask"], 0.4, seq_group=g),
        "cols",
    ),
    "d3s_batch_tok_bf16": (
        lambda b, g: rk.d3s_token_mask(b["adv_tok_bf16"], b["ent_bf16"], b["mask"], 0.25, seq_group=g),
        "cols",
    ),
    "cppo_dynamic_ties": (_cppo_case("lp", "lm", "adv", delta=0.1, delta_b=0.01), "cppo"),
    "cppo_dynamic": (_cppo_case("lp_c", "lm_c", "adv"), "cppo"),
    "cppo_fixed": (_cppo_case("lp_c", "lm_c", "adv", budget="fixed", delta_b=0.015), "cppo"),
    "cppo_dppo": (_cppo_case("lp_c", "lm_c", "adv", w_min=1.0, budget="none"), "cppo"),
    "cppo_horizon": (_cppo_case("lp_c", "lm_c", "adv_tok", budget="fixed", horizon=24), "cppo"),
    "cppo_kl": (_cppo_case("lp_c", "lm_c", "adv", divergence="binary_kl", delta=0.05, delta_b=0.005), "cppo"),
    "cppo_bf16": (_cppo_case("lp_bf16", "lm_bf16", "adv_tok_bf16", quantile=0.5), "cppo"),
    "cppo_topk": (
        lambda b, g: _cppo(
            dict(b, lp_=b["lp_c"], lm_=b["lm_c"], a_=b["adv"]),
            g,
            divergence="topk_tv",
            logp_topk=b["lp_k"],
            logp_mu_topk=b["lm_k"],
        ),
        "cppo",
    ),
}


def _error_cases(rank: int, world: int, b: dict, g) -> dict:
    """name -> (type name, message) of what this rank raised, or None. Each failure is on ONE rank only (or a
    disagreement between ranks) unless said."""
    last = world - 1

    def nan_entropy():  # a NaN at a valid position of the last rank with columns
        ent = b["ent_c"].clone()
        if rank == 2 if world == 4 else rank == last:
            ent[0, 0] = float("nan")
        return rk.forking_token_mask(ent, b["mask"], 0.3, seq_group=g)

    def rows_differ():
        m = b["mask"][:-1] if rank == 0 else b["mask"]
        return rk.tp_schedule_mask(m, 0.5, seq_group=g)

    def packed():  # the same on every rank
        return rk.tp_schedule_mask(
            b["mask"].reshape(-1), 0.5, cu_seqlens=torch.tensor([0, b["mask"].numel()]), seq_group=g
        )

    def q_out_of_range():
        return rk.tp_schedule_mask(b["mask"], 1.5 if rank == last else 0.5, seq_group=g)

    def cppo_inf():
        lp = b["lp_c"].clone()
        if rank == 0:
            lp[0, 0] = float("inf")
        return rk.cppo_mask(lp, b["lm_c"], b["adv"], b["mask"], seq_group=g)

    def shaped_overflow():  # the op's own check after computing: A (1 + 1 / kappa) beyond fp32
        adv, ent = b["adv_tok"].clone(), b["ent_c"].clone()
        if rank == last:
            adv[0, 0], ent[0, 0] = 3.3e38, 1e38  # A + 0.4 H = 3.7e38
        return rk.entropy_shaped_advantages(adv, ent, b["mask"], 1.0, seq_group=g)

    def dtypes_differ():
        v = b["vals_f"] if rank == 0 else b["vals_f"].double()
        return rk.trajectory_percentile(b["mask"], values=v, seq_group=g)

    def not_a_tensor():
        ent = b["ent_c"].tolist() if rank == last else b["ent_c"]
        return rk.d3s_token_mask(b["adv"], ent, b["mask"], 0.3, seq_group=g)

    def rho_differs():  # an argument that steers the exchange: ranks would wait in different collectives
        return rk.forking_token_mask(b["ent"], b["mask"], 0.4 if rank == last else 0.3, seq_group=g)

    def budget_differs():
        budget = "fixed" if rank == 0 else "dynamic"
        return rk.cppo_mask(b["lp_c"], b["lm_c"], b["adv"], b["mask"], budget=budget, seq_group=g)

    out = {}
    for name, fn in dict(
        rho_differs=rho_differs,
        budget_differs=budget_differs,
        nan_entropy=nan_entropy,
        rows_differ=rows_differ,
        packed=packed,
        q_out_of_range=q_out_of_range,
        cppo_inf=cppo_inf,
        shaped_overflow=shaped_overflow,
        dtypes_differ=dtypes_differ,
        not_a_tensor=not_a_tensor,
    ).items():
        try:
            fn()
            out[name] = None
        except Exception as e:  # noqa: BLE001 - compared across ranks by the parent
            out[name] = (type(e).__name__, str(e))
    return out


ERRORS = {  # name -> (type, text the message contains)
    "nan_entropy": ("ValueError", "entropy has non-finite values at valid positions"),
    "rows_differ": ("ValueError", "every rank must hold the same rows"),
    "packed": ("ValueError", "cu_seqlens (the packed layout) is not supported"),
    "q_out_of_range": ("ValueError", "q"),
    "cppo_inf": ("ValueError", "logp has non-finite values at valid positions"),
    "shaped_overflow": ("ValueError", "overflows float32"),
    "dtypes_differ": ("ValueError", "values (given or None, and their dtype) must be the same on every rank"),
    "rho_differs": ("ValueError", "rho must be the same on every rank of seq_group"),
    "budget_differs": ("ValueError", "budget must be the same on every rank of seq_group"),
    "not_a_tensor": ("TypeError", "entropy must be a torch.Tensor"),
}


def _worker(rank: int, world: int, widths: list, batch: dict):
    import torch.distributed as dist

    g = dist.group.WORLD
    c = sum(widths[:rank])
    b = _local(batch, c, widths[rank])
    results = {name: fn(dict(b), g) for name, (fn, _) in CASES.items()}
    errors = _error_cases(rank, world, b, g)
    after = rk.forking_token_mask(b["ent"], b["mask"], 0.3, seq_group=g)  # the group is still in step
    none = {k: (v[:0] if isinstance(v, torch.Tensor) else v) for k, v in b.items()}  # a batch without rows
    empty = {name: CASES[name][0](dict(none), g) for name in ("tp_055", "fork_ties", "d3s_batch_ties", "cppo_dynamic")}
    return results, errors, after, empty


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_matches_the_single_process_op(world):
    batch = _batch()
    want = {name: fn(dict(batch), None) for name, (fn, _) in CASES.items()}  # also builds the native kernels once
    outs = run_ranks(_worker, world, WIDTHS[world], batch, timeout=120)
    for name, (_, kind) in CASES.items():
        got = [o[0][name] for o in outs]
        if kind == "cols":
            whole = torch.cat(got, 1)
            assert _same(whole, want[name]), (name, whole, want[name])
            continue
        for field, i in (("mask", 0), ("divergence", 1), ("weight", 2)):
            whole = torch.cat([r[i] for r in got], 1)
            assert _same(whole, want[name][i]), (name, field, whole, want[name][i])
        for r in got:  # per-row budgets and the batch's masked fraction: the same on every rank
            assert _same(r[3], want[name][3]), (name, "delta_b", r[3], want[name][3])
            assert _same(r[4], want[name][4]), (name, "masked_fraction", r[4], want[name][4])
    assert bool(want["cppo_dynamic_ties"][0].logical_not().logical_and(batch["mask"]).any())  # the cases mask tokens
    assert bool((want["cppo_dynamic"][3] > 0.02).any())  # a dynamic budget above its floor: the quantile counts
    for name, (kind, text) in ERRORS.items():
        seen = [o[1][name] for o in outs]
        assert seen[0] is not None, (name, "did not raise")
        assert all(s == seen[0] for s in seen), (name, seen)  # same type and message on every rank
        assert seen[0][0] == kind and text in seen[0][1], (name, seen[0])
    assert torch.equal(torch.cat([o[2] for o in outs], 1), want["fork_ties"])
    none = {k: (v[:0] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    for name, got in outs[0][3].items():
        expect = CASES[name][0](dict(none), None)
        if CASES[name][1] == "cppo":
            got, expect = got[0], expect[0]
        assert got.shape == (0, WIDTHS[world][0]) and expect.shape == (0, T), name


def test_a_group_must_be_a_process_group():
    with pytest.raises(TypeError, match="seq_group must be a torch.distributed ProcessGroup"):
        rk.tp_schedule_mask(torch.ones(2, 3, dtype=torch.bool), 0.5, seq_group="not a group")
    with pytest.raises(TypeError, match="dp_group must be a torch.distributed ProcessGroup"):
        rk.d3s_token_mask(torch.ones(2), torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), 0.5, dp_group=1)
