"""D^3S batch scope over data-parallel ranks (``dp_group=``), alone and with sequence-split rows (``seq_group=``).

Each rank holds its own batch (any number of rows, padded or packed, NaN in padding); the batch-scope selection
runs over the union of every rank's tokens by the distributed radix select of ``rlvr_kernels.parallel.select``
(histograms only, no score gathered) and must equal the single-process op on the batches concatenated in rank
order, exactly, ties included (lower flat index of the concatenation first): heavy ties straddling ranks, all-zero
scores, -0.0 against +0.0, +inf scores, bf16, budgets 0 and all. With a 2 x 2 mesh (two replicas, each split over a
sequence group of two), the batch is the replicas' whole batches concatenated. A bad value on one rank raises the
same exception on every rank.
"""

from __future__ import annotations

import pytest
import torch

import rlvr_kernels as rk
from _gloo import run_ranks

NAN = float("nan")


def _tensors(valid: torch.Tensor, rows: int, g: torch.Generator, shape: tuple) -> dict:
    """Per-token and per-row inputs of one rank, NaN at every invalid position."""

    def pad(x):
        return torch.where(valid, x, torch.tensor(NAN, dtype=x.dtype))

    ent_q = torch.randint(0, 4, shape, generator=g).float() * 0.5  # few values: ties across ranks
    zeros = torch.randint(0, 2, shape, generator=g).float() * 0.7
    zeros = torch.where(torch.rand(shape, generator=g) < 0.5, -zeros * 0.0, zeros)  # -0.0 and +0.0 mixed in
    big = torch.rand(shape, generator=g) * 3
    big = torch.where(torch.rand(shape, generator=g) < 0.2, torch.full(shape, 1e20), big)  # |A| H overflows to inf
    adv = torch.randint(-2, 3, (rows,), generator=g).float()  # |A| in {0, 1, 2}: more ties
    return dict(
        mask=valid,
        ent_q=pad(ent_q),
        ent_z=pad(zeros),
        ent_big=pad(big),
        ent_bf16=pad(torch.rand(shape, generator=g) * 2).to(torch.bfloat16),
        adv=adv,
        adv_big=torch.where(adv == 0, torch.ones(()), adv) * 1e30,
        adv_tok=pad(torch.randn(shape, generator=g)),
    )


def _padded(lengths: list, width: int, g) -> dict:
    valid = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    if len(lengths) and width > 3:
        valid[0, 1] = False  # a hole
    return dict(_tensors(valid, len(lengths), g, tuple(valid.shape)), cu=None)


def _packed(lengths: list, g) -> dict:
    cu = torch.tensor([0, *lengths]).cumsum(0)
    valid = torch.rand(int(cu[-1]), generator=g) < 0.85
    return dict(_tensors(valid, len(lengths), g, tuple(valid.shape)), cu=cu)


def _dp_batches(world: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    if world == 2:
        return [_padded([12, 5, 0], 12, g), _packed([7, 0, 9, 4], g)]
    return [_padded([10, 3], 10, g), _padded([], 6, g), _packed([6, 11], g), _padded([5, 5, 2, 4], 5, g)]


CASES = {  # name -> fn(b, group): advantages key, entropy key, rho, extra keywords
    "ties": ("adv", "ent_q", 0.3, {}),
    "ties_more": ("adv", "ent_q", 0.55, {}),
    "zero_adv": (None, "ent_q", 0.45, {}),
    "signed_zero": ("adv", "ent_z", 0.5, {}),
    "inf_scores": ("adv_big", "ent_big", 0.2, {}),
    "bf16_tok": ("adv_tok", "ent_bf16", 0.25, {}),
    "rho_0": ("adv", "ent_q", 0.0, {}),
    "rho_1": ("adv", "ent_q", 1.0, {}),
    "sequence": ("adv", "ent_q", 0.3, {"scope": "sequence"}),
}


def _call(b: dict, name: str, **groups) -> torch.Tensor:
    a_key, e_key, rho, kw = CASES[name]
    adv = torch.zeros(b["adv"].shape) if a_key is None else b[a_key]
    return rk.d3s_token_mask(adv, b[e_key], b["mask"], rho, cu_seqlens=b["cu"], **kw, **groups)


def _concat(batches: list) -> dict:
    """The batches concatenated in rank order, as one packed batch (padded rows become packed rows of their width)."""
    out, lengths = {}, []
    for b in batches:
        lengths += b["cu"].diff().tolist() if b["cu"] is not None else [b["mask"].shape[1]] * b["mask"].shape[0]
    for k in batches[0]:
        if k != "cu":
            out[k] = torch.cat([b[k].reshape(-1) for b in batches])
    out["cu"] = torch.tensor([0, *lengths]).cumsum(0)
    return out


def _dp_worker(rank: int, world: int, batches: list):
    import torch.distributed as dist

    g = dist.group.WORLD
    b = batches[rank]
    got = {name: _call(b, name, dp_group=g) for name in CASES}
    errors = {}
    for name, fn in dict(
        nan=lambda: _call(
            dict(b, ent_q=b["ent_q"].masked_fill(b["mask"], NAN) if rank == world - 1 else b["ent_q"]),
            "ties",
            dp_group=g,
        ),
        rho=lambda: rk.d3s_token_mask(
            b["adv"], b["ent_q"], b["mask"], 2.0 if rank == 0 else 0.5, cu_seqlens=b["cu"], dp_group=g
        ),
        scope_differs=lambda: rk.d3s_token_mask(
            b["adv"],
            b["ent_q"],
            b["mask"],
            0.5,
            scope="sequence" if rank == 1 else "batch",
            cu_seqlens=b["cu"],
            dp_group=g,
        ),
        scope=lambda: rk.d3s_token_mask(
            b["adv"], b["ent_q"], b["mask"], 0.5, scope="rows" if rank == 1 else "batch", cu_seqlens=b["cu"], dp_group=g
        ),
    ).items():
        try:
            fn()
            errors[name] = None
        except Exception as e:  # noqa: BLE001 - compared across ranks by the parent
            errors[name] = (type(e).__name__, str(e))
    return got, errors


@pytest.mark.parametrize("world", [2, 4])
def test_batch_scope_over_dp_ranks_is_the_op_on_the_concatenated_batch(world):
    batches = _dp_batches(world)
    whole = _concat(batches)
    want = {name: _call(whole, name) for name in CASES}
    sizes = [b["mask"].numel() for b in batches]
    outs = run_ranks(_dp_worker, world, batches, timeout=120)
    for name in CASES:
        for r, (got, _) in enumerate(outs):
            start = sum(sizes[:r])
            if name == "sequence":  # per row: whole rows on every data-parallel rank, the op on its own batch
                expect = _call(batches[r], name)
            else:
                expect = want[name][start : start + sizes[r]].reshape(batches[r]["mask"].shape)
            assert torch.equal(got[name], expect), (name, r, got[name], expect)
    n = int(whole["mask"].sum())
    assert int(want["ties"].sum()) == -(-n * 3 // 10) and int(want["rho_1"].sum()) == n and not want["rho_0"].any()
    expected = {
        "nan": ("ValueError", "entropy has non-finite values at valid positions"),
        "rho": ("ValueError", "rho"),
        "scope": ("ValueError", "scope"),
        "scope_differs": ("ValueError", "scope must be the same on every rank of dp_group"),
    }
    for name, (kind, text) in expected.items():
        seen = [o[1][name] for o in outs]
        assert seen[0] is not None and all(s == seen[0] for s in seen), (name, seen)
        assert seen[0][0] == kind and text in seen[0][1], (name, seen[0])


# ----------------------------------------------------------------------------------------------------------------------
# 2 x 2 mesh: replicas {0, 1} and {2, 3} (sequence groups), data-parallel groups {0, 2} and {1, 3}
# ----------------------------------------------------------------------------------------------------------------------
MESH_T = 14
MESH_WIDTHS = ([5, 9], [8, 6])  # each replica splits its columns its own way


def _mesh_batches(seed: int = 3) -> list:
    g = torch.Generator().manual_seed(seed)
    return [_padded([14, 9, 0], MESH_T, g), _padded([4, 13], MESH_T, g)]


def _cols(b: dict, c: int, w: int) -> dict:
    return {k: (v[:, c : c + w] if isinstance(v, torch.Tensor) and v.dim() == 2 else v) for k, v in b.items()}


def _mesh_worker(rank: int, world: int, replicas: list):
    import torch.distributed as dist

    groups = [dist.new_group(r) for r in ([0, 1], [2, 3], [0, 2], [1, 3])]  # every rank creates every group
    replica, j = divmod(rank, 2)
    sp, dp = groups[replica], groups[2 + j]
    widths = MESH_WIDTHS[replica]
    b = _cols(replicas[replica], sum(widths[:j]), widths[j])
    got = {}
    for name in ("ties", "ties_more", "zero_adv", "signed_zero", "inf_scores", "bf16_tok"):
        got[name] = _call(b, name, seq_group=sp, dp_group=dp)
        got[name + "/seq_only"] = _call(b, name, seq_group=sp)
    got["sequence"] = _call(b, "sequence", seq_group=sp, dp_group=dp)
    errs = []
    try:  # a NaN on one rank of the four: every rank raises it
        bad = b["ent_q"].masked_fill(b["mask"], NAN) if rank == 3 else b["ent_q"]
        _call(dict(b, ent_q=bad), "ties", seq_group=sp, dp_group=dp)
        errs.append(None)
    except ValueError as e:
        errs.append(str(e))
    try:  # a budget fraction that differs on one rank of the four (seen by one sequence and one dp group only)
        rho = 0.31 if rank == 2 else 0.3
        rk.d3s_token_mask(b["adv"], b["ent_q"], b["mask"], rho, seq_group=sp, dp_group=dp)
        errs.append(None)
    except ValueError as e:
        errs.append(str(e))
    return got, errs


def test_batch_scope_over_a_dp_by_sequence_mesh():
    replicas = _mesh_batches()
    both = {k: (torch.cat([r[k] for r in replicas]) if k != "cu" else None) for k in replicas[0]}
    outs = run_ranks(_mesh_worker, 4, replicas, timeout=120)
    for rank, (got, _) in enumerate(outs):
        replica, j = divmod(rank, 2)
        rows = slice(0, 3) if replica == 0 else slice(3, 5)
        c, w = sum(MESH_WIDTHS[replica][:j]), MESH_WIDTHS[replica][j]
        for name, out in got.items():
            case = name.split("/")[0]
            if name.endswith("/seq_only") or case == "sequence":  # the replica's own batch
                expect = _call(replicas[replica], case)[:, c : c + w]
            else:
                expect = _call(both, case)[rows, c : c + w]
            assert torch.equal(out, expect), (name, rank, out, expect)
    nan, rho = ([o[1][i] for o in outs] for i in (0, 1))
    assert nan[0] is not None and all(e == nan[0] for e in nan) and "raised on rank 3" in nan[0], nan
    assert all(e == "rho must be the same on every rank of seq_group and dp_group" for e in rho), rho
