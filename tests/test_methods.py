"""The method catalogue (rlvr_kernels/methods.py) is the one place that lists methods and their options.

Checks: every consumer (RLVRLoss, the TRL and verl plug-ins, the benchmark) offers exactly the catalogue's methods with
the catalogue's option defaults; no other module keeps a list of method names; each credit rule's planned
active-token count (the normaliser, known before the vocabulary pass) is the count its masks then keep.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlvr_kernels import TemporalSchedule
from rlvr_kernels import methods as M
from rlvr_kernels.loss import LossConfig
from rlvr_kernels.loss.config import LOSS_METHOD_OPTIONS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_loss_config_takes_the_catalogue_defaults():
    cfg = LossConfig()
    for name in LOSS_METHOD_OPTIONS:
        assert getattr(cfg, name) == M.OPTIONS[name].default, name


def test_loss_config_accepts_every_credit_rule_and_trust_region():
    for name, rule in M.CREDITS.items():
        kw = dict(schedule=TemporalSchedule(total_steps=10)) if rule.schedule == "required" else {}
        assert LossConfig(credit=name, **kw).credit == name
    for trust in M.TRUST_REGIONS.values():
        extra = dict(dro_beta=0.1) if trust.loss_type == "dro" else {}
        if trust.loss_type is not None:
            assert LossConfig(loss_type=trust.loss_type, **extra, **trust.settings).loss_type == trust.loss_type
        for key, value in trust.settings.items():  # GSPO-token: a setting of the PPO clip types
            assert getattr(LossConfig(**trust.settings), key) == value
    with pytest.raises(ValueError, match="credit must be one of"):
        LossConfig(credit="nope")


def test_loss_config_checks_method_options_with_the_catalogue():
    for name, bad in (
        ("credit_rho", 1.5),
        ("d3s_scope", "row"),
        ("cppo_max_mult", 0.5),
        ("cppo_horizon", 0),
        ("entropy_adv_alpha", 0.0),
        ("cppo_budget", "static"),
    ):
        with pytest.raises((ValueError, TypeError), match=name):
            LossConfig(**{name: bad})


def test_trl_config_fields_are_the_catalogue_options():
    pytest.importorskip("trl")
    from rlvr_kernels.integrations import trl as integ

    fields = {f.name: f for f in dataclasses.fields(integ.RLVRGRPOConfig)}
    for name, opt in M.OPTIONS.items():
        assert name in fields, name
        assert fields[name].default == opt.default, name
        assert fields[name].metadata["help"] == opt.help, name
    assert tuple(integ.CREDITS) == tuple(M.CREDITS)
    assert tuple(integ.TRUST_REGIONS) == tuple(n for n, t in M.TRUST_REGIONS.items() if t.trl)
    assert {"clip", "dppo", "cispo", "cppo"} <= set(integ.TRUST_REGIONS)
    for old in M.RENAMED_OPTIONS:
        assert old not in fields, old


def test_verl_options_and_losses_come_from_the_catalogue():
    pytest.importorskip("verl")
    from rlvr_kernels.integrations import verl as rv

    for name, opt in M.OPTIONS.items():
        assert name in rv.RLVR_OPTION_DEFAULTS, name
        assert rv.RLVR_OPTION_DEFAULTS[name] == opt.default, name
    want = {f"rlvr_{t}" for t in M.TRUST_REGIONS}
    want |= {f"rlvr_{c}" if t == "clip" else f"rlvr_{c}_{t}" for c in M.CREDITS if c != "none" for t in M.TRUST_REGIONS}
    assert set(rv.LOSS_NAMES) == want
    for old, new in M.RENAMED_OPTIONS.items():
        if new in rv.RLVR_OPTION_DEFAULTS:
            assert old not in rv.RLVR_OPTION_DEFAULTS


def test_renamed_options_name_their_new_name():
    for old, new in M.RENAMED_OPTIONS.items():
        err = M.unknown_option_error(old, M.OPTIONS, prefix="policy_loss.rlvr.")
        assert f"policy_loss.rlvr.{new}" in str(err)


_METHOD_NAMES = sorted(set(M.CREDITS) | set(M.TRUST_REGIONS))
# two or more method names in one literal sequence: a list of methods kept outside the catalogue
_LIST_OF_METHODS = re.compile(r"[(\[{]\s*(?:\"(?:" + "|".join(_METHOD_NAMES) + r")\",\s*){2,}")


def test_no_module_outside_the_catalogue_lists_methods():
    offenders = []
    for path in sorted((ROOT / "rlvr_kernels").rglob("*.py")):
        if path.name == "methods.py" and path.parent.name == "rlvr_kernels":
            continue
        text = path.read_text()
        for m in _LIST_OF_METHODS.finditer(text):
            line = text[: m.start()].count("\n") + 1
            if text.splitlines()[line - 1].startswith("LOSS_TYPES = ") and path.name == "loss.py":
                continue  # the objectives of the per-token math (reference/loss.py), which the trust regions name

            offenders.append(f"{path.relative_to(ROOT)}:{line}: {m.group(0)!r}")
    assert not offenders, "method lists outside rlvr_kernels/methods.py:\n" + "\n".join(offenders)


def _batch(seed, B, T):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    adv = torch.randn(B, generator=g)[:, None].expand(B, T).contiguous()
    ent = torch.rand(B, T, generator=g) * 3
    return mask, adv, ent


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 5),
    T=st.integers(1, 12),
    credit=st.sampled_from(sorted(M.CREDITS)),
    rho=st.floats(0.0, 1.0),
    q=st.none() | st.floats(0.0, 1.0),
    scope=st.sampled_from(["batch", "sequence"]),
)
def test_planned_counts_are_the_tokens_the_masks_keep(seed, B, T, credit, rho, q, scope):
    """The normaliser is computed before the vocabulary pass from planned_counts / planned_total; the masks applied
    after it must keep exactly that many tokens (per row, or over the batch for a batch-wide selection)."""
    rule = M.credit(credit)
    if rule.schedule == "required" and q is None:
        q = 0.5
    cfg = LossConfig(
        credit=credit,
        credit_rho=rho,
        d3s_scope=scope,
        backend="torch",
        schedule=TemporalSchedule(total_steps=10) if rule.schedule == "required" else None,
    )
    valid, adv, ent = _batch(seed, B, T)
    mask = rule.static_mask(cfg, valid, q)
    keep = rule.policy_mask(cfg, adv, ent, mask, q)
    kept = mask * keep.float() if keep is not None else mask
    planned = rule.planned_counts(cfg, mask, q)
    if rule.selects_over_batch(cfg):
        assert planned is None
    else:
        torch.testing.assert_close(planned, kept.sum(-1))
    total = rule.planned_total(cfg, valid.bool(), q)
    assert float(total) == float(kept.sum())


class _FirstHalf(M.CreditRule):
    """A made-up credit rule, known before the vocabulary pass: keep the first half of each row's loss tokens."""

    name = "first_half"

    def static_mask(self, cfg, mask, q):
        rank = torch.cumsum((mask != 0).to(torch.int64), -1)
        n = (mask != 0).sum(-1, keepdim=True)
        return torch.where(rank <= (n + 1) // 2, mask, torch.zeros((), dtype=mask.dtype))


def test_a_new_catalogue_entry_is_all_the_loss_needs(monkeypatch):
    """Adding a method is one catalogue entry (plus its op): RLVRLoss accepts it, plans its normaliser from it and
    gives the same loss and gradients on both paths, equal to masking the loss tokens by hand."""
    from rlvr_kernels import RLVRLoss

    monkeypatch.setitem(M.CREDITS, "first_half", _FirstHalf())
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 3, 6, 8, 32
    x = torch.randn(B, T, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor([6, 3, 1])[:, None]).float()
    adv = torch.randn(B, generator=g)
    old = -torch.rand(B, T, generator=g)
    kw = dict(beta=0.0, loss_type="dapo", backend="torch")
    out = {}
    for fused in (True, False):
        loss, metrics = RLVRLoss(credit="first_half", fused=fused, **kw)(x, w, ids, mask, adv, old_per_token_logps=old)
        out[fused] = (loss, *torch.autograd.grad(loss, [x, w]), metrics["active_fraction"])
    by_hand = _FirstHalf().static_mask(None, mask, None)
    loss, _ = RLVRLoss(fused=False, **kw)(x, w, ids, by_hand, adv, old_per_token_logps=old)
    want = (loss, *torch.autograd.grad(loss, [x, w]))
    for got in out.values():
        for a, b in zip(got[:3], want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert float(got[3]) == pytest.approx(float(by_hand.sum() / mask.sum()))
