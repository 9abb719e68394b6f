"""D^3S's sample level: ``d3s_select_rollouts`` against a float64 brute force over every k-subset."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlvr_kernels import d3s_select_rollouts
from rlvr_kernels.rollouts import d3s_rollout_mask


def _var(values) -> float:
    v = torch.tensor(values, dtype=torch.float64)
    return float(((v - v.mean()) ** 2).mean())


def brute_force(adv: torch.Tensor, gid: torch.Tensor, k: int) -> tuple[set[int], dict]:
    """Every group's best variance by enumeration (float64, two-pass), and the kept set of the documented rule."""
    best = {}
    kept = set()
    for g in torch.unique(gid).tolist():
        idx = (gid == g).nonzero().flatten().tolist()
        vals = [float(adv[i]) for i in idx]
        if len(idx) <= k:
            kept.update(idx)
            best[g] = None
            continue
        best[g] = max(_var(c) for c in itertools.combinations(vals, k))
        # the documented rule, written directly: candidates j = 0..k of the sorted multiset, smallest j within the
        # tolerance of the best, copies of each value on the lowest indices
        srt = sorted(vals)
        n = len(srt)
        cands = [srt[:j] + srt[n - (k - j) :] for j in range(k + 1)]
        scores = [_var(c) for c in cands]
        top = max(scores)
        j = next(j for j, s in enumerate(scores) if s >= top - 1e-9 * max(1.0, abs(top)))
        need: dict[float, int] = {}
        for v in cands[j]:
            need[v] = need.get(v, 0) + 1
        for i in sorted(idx):
            v = float(adv[i])
            if need.get(v, 0) > 0:
                need[v] -= 1
                kept.add(i)
    return kept, best


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(-3, 3), min_size=1, max_size=9),
    st.lists(st.integers(0, 2), min_size=9, max_size=9),
    st.integers(1, 5),
)
def test_integer_values_match_brute_force_and_ties(values, labels, k):
    # small integers: every sum is exact, so the tie rules are tested exactly
    adv = torch.tensor(values, dtype=torch.float32)
    gid = torch.tensor(labels[: len(values)]) * 7 - 3  # arbitrary labels, groups interleaved
    got = d3s_select_rollouts(adv, gid, k)
    assert got.dtype == torch.int64
    assert got.tolist() == sorted(got.tolist())
    kept, best = brute_force(adv, gid, k)
    assert set(got.tolist()) == kept
    for g, b in best.items():
        sel = [float(adv[i]) for i in got.tolist() if int(gid[i]) == g]
        if b is None:
            assert len(sel) == int((gid == g).sum())
        else:
            assert len(sel) == k and _var(sel) == pytest.approx(b, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False), min_size=1, max_size=10),
    st.integers(1, 6),
    st.integers(1, 3),
)
def test_real_values_reach_the_brute_force_maximum(values, k, n_groups):
    adv = torch.tensor(values, dtype=torch.float64)
    gid = torch.arange(len(values)) % n_groups
    got = d3s_select_rollouts(adv, gid, k).tolist()
    _, best = brute_force(adv, gid, k)
    for g, b in best.items():
        sel = [float(adv[i]) for i in got if int(gid[i]) == g]
        if b is None:
            assert len(sel) == int((gid == g).sum())
        else:
            assert len(sel) == k
            assert _var(sel) >= b - 1e-9 * max(1.0, b)


def test_worked_examples():
    # [5, 1, 3, 2, 4]: k=2 keeps the extremes 1 and 5; k=3 ties {1, 2, 5} and {1, 4, 5} (var 26/9): the smallest j
    # (one value from the low end) gives {1, 4, 5}. Group 9 has 3 <= k rollouts and keeps them all.
    adv = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0, 7.0, 7.0, 7.0])
    gid = torch.tensor([0, 0, 0, 0, 0, 9, 9, 9])
    assert d3s_select_rollouts(adv, gid, 2).tolist() == [0, 1, 5, 6]
    assert d3s_select_rollouts(adv, gid, 3).tolist() == [0, 1, 4, 5, 6, 7]
    # binary rewards, three of each: j = 1 and j = 2 tie; j = 1 (one low, two high), lowest indices per value
    adv = torch.tensor([-1.0, 1.0, -1.0, 1.0, -1.0, 1.0])
    assert d3s_select_rollouts(adv, torch.zeros(6, dtype=torch.long), 3).tolist() == [0, 1, 3]
    # k = 1 and constant groups: the largest value, lowest index
    assert d3s_select_rollouts(adv, torch.zeros(6, dtype=torch.long), 1).tolist() == [1]
    assert d3s_select_rollouts(torch.zeros(5), torch.zeros(5, dtype=torch.long), 2).tolist() == [0, 1]


def test_symmetric_ties_are_robust_to_rounding():
    # GRPO-style normalised advantages of a 3/3 group: j = 1 and j = 2 differ only by rounding, the rule picks j = 1
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    adv = ((r - r.mean()) / (r.std() + 1e-4)).float()
    assert d3s_select_rollouts(adv, torch.zeros(6, dtype=torch.long), 3).tolist() == [0, 1, 2]


def test_shapes_devices_and_errors():
    assert d3s_select_rollouts(torch.zeros(0), torch.zeros(0, dtype=torch.long), 3).tolist() == []
    m = d3s_rollout_mask(torch.tensor([0.5, -0.5, 0.1]), torch.tensor([4, 4, 4]), 2)
    assert m.dtype == torch.bool and m.tolist() == [True, True, False]
    with pytest.raises(ValueError):
        d3s_select_rollouts(torch.zeros(3), torch.zeros(3, dtype=torch.long), 0)
    with pytest.raises(ValueError):
        d3s_select_rollouts(torch.tensor([0.0, float("nan")]), torch.zeros(2, dtype=torch.long), 1)
    with pytest.raises(ValueError):
        d3s_select_rollouts(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), 1)
    with pytest.raises(TypeError):
        d3s_select_rollouts(torch.zeros(3), torch.zeros(3), 1)
    with pytest.raises(ValueError):
        d3s_select_rollouts(torch.zeros(3), torch.zeros(2, dtype=torch.long), 1)


def test_large_batch_is_vectorised_and_keeps_k_per_group():
    g = torch.Generator().manual_seed(0)
    n_groups, size, k = 512, 16, 4
    adv = torch.randn(n_groups * size, generator=g)
    gid = torch.randperm(n_groups * size, generator=g) % n_groups  # scattered groups
    got = d3s_select_rollouts(adv, gid, k)
    assert torch.bincount(gid[got], minlength=n_groups).eq(k).all()


# ---------------------------------------------------------------------------------------------------------------
# the TRL plug-in option: RLVRGRPOConfig(d3s_rollouts_k=k)


@pytest.mark.parametrize("kw", [dict(loss_type="dapo"), dict(credit="d3s", loss_type="bnpo")], ids=["trl", "rlvr"])
def test_trl_option_keeps_k_completions_per_group(tmp_path, monkeypatch, kw):
    pytest.importorskip("trl")
    import math

    from trl import GRPOTrainer

    from _trl_common import BASE, dataset, even_words, save_tiny_model, tiny_model, tokenizer
    from rlvr_kernels.integrations._trl.rollouts import KEPT_METRIC
    from rlvr_kernels.integrations.trl import RLVRGRPOConfig, RLVRGRPOTrainer

    masks = []  # TRL's completion masks, before the selection
    real = GRPOTrainer._generate_and_score_completions

    def trl_generate(self, inputs):
        out = real(self, inputs)
        masks.append(out["completion_mask"].clone())
        return out

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", trl_generate)

    class Spy(RLVRGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            self.seen.append((masks[-1], out))
            return out

    Spy.seen = []
    model_dir = save_tiny_model(tmp_path / "tiny")
    args = RLVRGRPOConfig(output_dir=str(tmp_path / "out"), **{**BASE, "d3s_rollouts_k": 2, **kw})
    trainer = Spy(
        model=tiny_model(model_dir),
        reward_funcs=even_words,
        args=args,
        train_dataset=dataset(),
        processing_class=tokenizer(),
    )
    trainer.train()
    assert trainer.seen
    for before, out in trainer.seen:
        adv = out["advantages"]
        want = d3s_rollout_mask(adv.float(), torch.arange(adv.numel()) // args.num_generations, 2)
        rows = out["completion_mask"].sum(1) > 0
        assert rows.tolist() == (want & (before.sum(1) > 0)).tolist()
        assert torch.equal(out["completion_mask"][want], before[want])
        assert int(out["num_items_in_batch"]) == int(out["completion_mask"].sum())
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert logs and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in logs)
    assert all(r[KEPT_METRIC] == pytest.approx(0.5) for r in logs)


def test_trl_option_checks():
    pytest.importorskip("trl")
    from rlvr_kernels.integrations._trl.rollouts import check_d3s_rollouts_k

    assert check_d3s_rollouts_k(None) is None and check_d3s_rollouts_k(3) == 3
    for bad in (0, -1, 2.5, "2"):
        with pytest.raises(ValueError):
            check_d3s_rollouts_k(bad)


# ---------------------------------------------------------------------------------------------------------------
# the verl helper (rlvr_kernels/integrations/_verl/rollouts.py; exported by rlvr_kernels.integrations.verl)


def test_verl_helper_on_dataproto_fields():
    from types import SimpleNamespace

    import numpy as np

    from rlvr_kernels.integrations._verl.rollouts import apply_d3s_rollouts
    from rlvr_kernels.integrations._verl.rollouts import d3s_rollout_mask as verl_mask

    seq = torch.tensor([5.0, 1.0, 3.0, 2.0, 0.5, -0.5, 0.1, 9.0])
    uid = np.array(["b", "b", "b", "b", "a", "a", "a", "c"], dtype=object)
    rm = torch.ones(8, 6, dtype=torch.int64)
    rm[:, 4:] = 0  # right padding
    rm[7] = 0  # a row without response tokens: sequence advantage 0, alone in its group
    adv = seq[:, None] * rm  # verl's token-level advantages, 0 off the response
    want = d3s_rollout_mask(
        torch.tensor([5.0, 1.0, 3.0, 2.0, 0.5, -0.5, 0.1, 0.0]), torch.tensor([1] * 4 + [0] * 3 + [2]), 2
    )
    assert want.tolist() == [True, True, False, False, True, True, False, True]
    assert verl_mask(adv, uid, 2, response_mask=rm).tolist() == want.tolist()
    assert verl_mask(seq, list(uid), 2).tolist()[:7] == want.tolist()[:7]
    data = SimpleNamespace(batch={"advantages": adv, "response_mask": rm.clone()}, non_tensor_batch={"uid": uid})
    keep = apply_d3s_rollouts(data, 2)
    assert keep.tolist() == want.tolist()
    assert torch.equal(data.batch["response_mask"], rm * want[:, None])
    with pytest.raises(ValueError):
        verl_mask(adv, uid, 2)  # token-level advantages need the response mask
    with pytest.raises(ValueError):
        verl_mask(seq, uid[:3], 2)


def test_verl_module_exports_the_helper():
    pytest.importorskip("verl")
    from rlvr_kernels.integrations import verl as plugin

    assert callable(plugin.apply_d3s_rollouts) and callable(plugin.d3s_rollout_mask)
