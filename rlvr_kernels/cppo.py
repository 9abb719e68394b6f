"""CPPO (cumulative prefix-divergence policy optimization) token mask.

Paper: Mao, Zhou, Tao et al., "Beyond Uniform Token-Level Trust Region in LLM Reinforcement Learning",
arXiv 2606.10968v2 (Tencent Hunyuan): Eq. 8-10 (prefix budget, position weight, mask), Eq. 22 (dynamic budget),
Alg. 1; method page ``docs/methods/cppo.md``. CPPO is only a detached token mask on the DPPO ratio-advantage surrogate
``-M_t A_t rho_t`` (use it through ``RLVRLoss(loss_type="cppo")`` or apply :attr:`CPPOMask.mask` yourself).

Layouts as in :mod:`rlvr_kernels.credit`: padded ``[B, T]`` (bool ``mask``, right padding; holes allowed) or packed
``[total]`` plus ``cu_seqlens``; both give identical results. ``backend="auto" | "triton" | "torch"`` as in
:mod:`rlvr_kernels._backend`; the Triton kernel is :mod:`rlvr_kernels.kernels.cppo` and the torch reference
:mod:`rlvr_kernels.reference.cppo`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from rlvr_kernels import _checks as C
from rlvr_kernels.cpu import token_rows
from rlvr_kernels.credit import _backend, _check_block, _op_args, _Rows
from rlvr_kernels.reference import cppo as ref
from rlvr_kernels.reference.cppo import BUDGETS, DIVERGENCES

__all__ = ["cppo_mask", "CPPOMask", "CPPOAnchorWarning", "DIVERGENCES", "BUDGETS"]


class CPPOAnchorWarning(UserWarning):
    """``logp_mu`` equals ``logp`` on every valid token: every divergence is 0 and CPPO masks nothing (choice A9 of
    ``docs/methods/cppo.md``, section "Choices where the paper leaves room")."""


@dataclass(frozen=True)
class CPPOMask:
    """Result of :func:`cppo_mask` (all tensors detached, in the layout of the input).

    - ``mask``: bool, ``True`` = keep the token's surrogate term ``-A_t rho_t``; False on invalid tokens;
    - ``divergence``: fp32 ``D_t``, 0 on invalid tokens;
    - ``weight``: fp32 position weight ``w_t`` (Eq. 9), 0 on invalid tokens;
    - ``delta_b``: fp32 ``[B]`` (``[S]`` packed), the prefix budget each row used (``+inf`` for ``budget="none"``);
    - ``masked_fraction``: fp32 scalar, the fraction of valid tokens masked out (0 when there is none).
    """

    mask: torch.Tensor
    divergence: torch.Tensor
    weight: torch.Tensor
    delta_b: torch.Tensor
    masked_fraction: torch.Tensor


#: Largest accepted ``horizon``: positions are converted to float for ``t / (H - 1)``; beyond 2**53 that is inexact.
MAX_HORIZON = 1 << 53


def _check_topk(rows: _Rows, name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != len(rows.shape) + 1 or tuple(x.shape[:-1]) != rows.shape or x.shape[-1] < 1:
        raise ValueError(
            f"{name} must have shape {rows.shape + ('K',)} (the shape of mask plus K >= 1 columns), "
            f"got {tuple(x.shape)}"
        )
    if x.device != rows.device:
        raise ValueError(f"{name} is on {x.device} but mask is on {rows.device}")
    if x.numel() and bool((torch.isnan(x) | (x == float("inf"))).any(-1).logical_and(rows.valid).any()):
        raise ValueError(f"{name} has NaN or +inf at valid positions (-inf, probability 0, is allowed)")
    return x


@dataclass(frozen=True)
class _Args:
    """The checked arguments of one :func:`cppo_mask` call."""

    rows: _Rows
    logp: torch.Tensor  # detached
    logp_mu: torch.Tensor  # detached
    adv: torch.Tensor  # sign(A), detached: only the sign enters (Eq. 10)
    per_token: bool
    divergence: str
    logp_topk: Optional[torch.Tensor]
    logp_mu_topk: Optional[torch.Tensor]
    block: Optional[int]
    use: str  # the backend
    kw: dict  # delta, w_min, delta_b, budget, quantile, quantile_scale, max_mult, horizon (checked)


def _check_args(
    logp,
    logp_mu,
    advantages,
    mask,
    *,
    delta,
    w_min,
    delta_b,
    budget,
    quantile,
    max_mult,
    quantile_scale,
    horizon,
    divergence,
    logp_topk,
    logp_mu_topk,
    cu_seqlens,
    backend,
    block_size,
) -> _Args:
    """Every check of :func:`cppo_mask` (types, shapes, numbers, finite values at valid positions)."""
    rows = _Rows(mask, cu_seqlens)
    logp = rows.check_token_tensor("logp", logp)
    logp_mu = rows.check_token_tensor("logp_mu", logp_mu)
    adv, per_token = rows.check_advantages(advantages)
    delta = C.real("delta", delta, low=0.0, low_open=True)
    w_min = C.real("w_min", w_min, low=0.0, low_open=True, high=1.0)
    delta_b = C.real("delta_b", delta_b, low=0.0)
    quantile = C.unit("quantile", quantile)
    max_mult = C.real("max_mult", max_mult, low=1.0, fp32=False)
    quantile_scale = C.real("quantile_scale", quantile_scale, low=0.0)
    if horizon is not None:
        horizon = C.integer("horizon", horizon, low=1, high=MAX_HORIZON)
    budget = C.choice("budget", budget, BUDGETS)
    divergence = C.choice("divergence", divergence, DIVERGENCES)
    if divergence.startswith("topk"):
        if logp_topk is None or logp_mu_topk is None:
            raise ValueError(
                f"divergence={divergence!r} needs logp_topk and logp_mu_topk (log-probs of pi and mu at "
                "the ids TopK(mu) ∪ {a_t}, shape mask.shape + (K,))"
            )
        _check_topk(rows, "logp_topk", logp_topk)
        _check_topk(rows, "logp_mu_topk", logp_mu_topk)
        if logp_topk.shape != logp_mu_topk.shape:
            raise ValueError(
                f"logp_topk and logp_mu_topk must have the same shape, got {tuple(logp_topk.shape)} "
                f"and {tuple(logp_mu_topk.shape)}"
            )
    elif logp_topk is not None or logp_mu_topk is not None:
        raise ValueError(f"logp_topk / logp_mu_topk are only used by the topk divergences, not {divergence!r}")
    block = _check_block(block_size)
    use = _backend(backend, rows)
    rows.check_finite("logp", logp, fp32=True)
    rows.check_finite("logp_mu", logp_mu, fp32=True)
    rows.check_finite("advantages", adv, per_token)
    return _Args(
        rows=rows,
        logp=logp.detach(),
        logp_mu=logp_mu.detach(),
        # only the sign of A enters (Eq. 10): taken in A's own dtype, so that no magnitude over- or underflows in fp32
        adv=torch.sign(adv.detach()),
        per_token=per_token,
        divergence=divergence,
        logp_topk=logp_topk,
        logp_mu_topk=logp_mu_topk,
        block=block,
        use=use,
        kw=dict(
            delta=delta,
            w_min=w_min,
            delta_b=delta_b,
            budget=budget,
            quantile=quantile,
            quantile_scale=quantile_scale,
            max_mult=max_mult,
            horizon=horizon,
        ),
    )


_ANCHOR_MESSAGE = (
    "cppo_mask: logp_mu equals logp on every valid token, so every divergence is 0 and CPPO masks nothing "
    "(docs/methods/cppo.md, choice A9). The anchor mu must be the rollout engine's log-probs, frozen for all "
    "updates of the rollout batch; a recomputed pi_old equals pi on the first update."
)


def _anchor_unmoved(logp: torch.Tensor, logp_mu: torch.Tensor, valid: torch.Tensor) -> bool:
    """``logp_mu == logp`` at every valid position (choice A9)."""
    return bool(((logp == logp_mu) | ~valid).all())


def _cppo_mask(
    logp: torch.Tensor,
    logp_mu: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    delta: float = 0.15,
    w_min: float = 0.8,
    delta_b: float = 0.02,
    budget: str = "dynamic",
    quantile: float = 0.9,
    max_mult: float = 2.0,
    quantile_scale: float = 1.0,
    horizon: Optional[int] = None,
    divergence: str = "binary_tv",
    logp_topk: Optional[torch.Tensor] = None,
    logp_mu_topk: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
    block_size: Optional[int] = None,
) -> CPPOMask:
    """CPPO's direction-aware token mask with a position-weighted cumulative prefix budget (arXiv 2606.10968v2).

    For every valid token ``t`` (0-based position in its row) with divergence ``D_t`` between the rollout policy mu
    and the current policy pi (the anchor mu is the ROLLOUT engine's log-probs, frozen for all updates of a rollout
    batch, not a recomputed pi_old), the mask is (Eq. 8-10, Alg. 1)::

        w_t = 1 - (1 - w_min) * min(t / max(H - 1, 1), 1)              (Eq. 9; H = row length, or horizon)
        Z_t = w_t D_t,  S_{t-1} = sum_{j<t} Z_j,  W_{t-1} = sum_{j<t} w_j   (exclusive; every token counts)
        c_t = min(delta, delta + delta_b W_{t-1} - S_{t-1})
        M_t = valid_t and (A_t (rho_t - 1) <= 0  or  Z_t <= c_t)

    ``A (rho - 1) <= 0`` (the update moves pi back toward mu; ``A = 0`` is kept) is evaluated exactly by the signs of
    ``A`` and of the log-ratio (the ±20 clamp of the log-ratio does not change its sign). ``budget``:
    ``"dynamic"`` (default, Eq. 22 / verl PR): per row ``delta_b_row = clamp(quantile_scale * Q_q(D), delta_b,
    max_mult * delta_b)`` with ``Q_q`` the linear-interpolation quantile (as ``torch.quantile``) of the row's UNWEIGHTED
    ``D`` over valid tokens; a row without valid tokens uses ``delta_b``. ``"fixed"``: ``delta_b`` for every row.
    ``"none"``: no prefix budget, ``c_t = delta`` (with ``w_min=1`` this is exactly DPPO's mask ``toward_mu or
    D <= delta``).

    Divergences (``divergence``, ``docs/methods/cppo.md``, section "The divergence"; KL is ``KL(mu || pi)``; see
    :func:`rlvr_kernels.reference.cppo.divergence`): ``"binary_tv"`` (default, A3: the released code's; needs only
    the sampled-token log-probs), ``"binary_kl"``, ``"topk_tv"``, ``"topk_kl"`` (the paper's main runs used Top-K TV
    with K = 20). The Top-K forms need ``logp_topk`` / ``logp_mu_topk`` of shape ``mask.shape + (K,)``: the log-probs
    of pi and of mu at the ids ``TopK(mu) ∪ {a_t}``, gathered by the caller (e.g.
    ``rlvr_kernels.fused_linear_logprobs(..., gather_ids=ids)`` for pi, the rollout engine for mu). Convention: each
    id at most once, since a duplicate would be counted twice. We recommend Stable-RL's fixed width: K columns, where
    ``a_t`` replaces the K-th top-K id when it is not already among them. The paper's K+1 union also works: K+1
    columns whose last one is ``a_t``, or ``-inf`` in both tensors when ``a_t`` is already in the top-K (a ``-inf``
    column is an empty bucket). The "other" bucket is ``max(1 - sum, 0)``, and probabilities are clamped to >= 1e-12
    inside logs. ``logp`` / ``logp_mu`` are still needed for the toward-mu test.

    Shapes and dtypes: ``logp``, ``logp_mu``: ``[B, T]`` (or ``[total]`` with ``cu_seqlens``), any float dtype,
    finite and within the fp32 range on valid tokens (``ValueError`` otherwise), computed in fp32 (A8).
    ``advantages``: per row ``[B]`` (or ``[B, 1]``; ``[S]`` packed) or per token like ``mask``, finite on valid
    tokens; only their sign is used (taken in their own dtype, so 1e300 or 1e-300 in float64 count as they are).
    ``mask``: bool (or real, read as ``!= 0``). ``cu_seqlens``: int ``[S + 1]``. Positions outside ``mask`` may hold
    anything (NaN, inf): they take no part in any output.

    Numbers: Python / NumPy scalars or one-element tensors. ``delta`` in ``(0, C.F32_MAX]``, ``delta_b`` and
    ``quantile_scale`` in ``[0, C.F32_MAX]`` (fp32 scalars), ``w_min`` in ``(0, 1]``, ``quantile`` in ``[0, 1]``,
    ``max_mult >= 1`` (finite; the upper clamp ``max_mult * delta_b`` is capped at ``C.F32_MAX`` so that the budget
    stays finite), ``horizon`` an int in ``[1, 2**53]``. Log-probabilities above 0 (not log-probabilities; rounding
    can give a tiny positive value) count as probability 1 in every divergence, as Binary-KL always did; the
    toward-mu sign test uses them as given.

    Choices where the paper leaves room (``docs/methods/cppo.md``, section "Choices where the paper leaves room"):
    A1, ``horizon=None`` uses each row's own length ``L`` = last valid index + 1 (paper, UniRL);
    ``horizon=max_response_length`` reproduces the authors' verl PR (positions beyond it get ``w_min``). In both,
    ``w_0 = 1``, so a one-token row has ``w = 1``. A2: upper clamp ``max_mult = 2``. A3: Binary-TV is the default.
    A6: for masks with holes (multi-turn), ``w`` and ``D`` are zeroed at masked positions, and positions stay absolute
    (verl semantics). A7: KL uses the same machinery; the paper's KL thresholds are
    ``delta=0.1, delta_b=0.002, budget="fixed"``. A8: fp32 everywhere. The prefix term ``delta_b W_{t-1} - S_{t-1}``
    is accumulated as a single exclusive sum of ``delta_b w_j - Z_j``, which is the same quantity without cancelling
    two large sums on long rows. A9: a :class:`CPPOAnchorWarning` is issued (once per call site, by the default
    warning filter) when ``logp_mu`` equals ``logp`` on every valid token.

    Returns a :class:`CPPOMask`. Computed under ``no_grad``; nothing is written to the inputs. ``block_size`` (Triton
    only, power of two >= 16) is the number of tokens per loop step. The kernel uses one program per row, loops over
    blocks with a running carry, and has grid ``<= 65535``, so rows of 64k+ tokens and 100k+ rows work.
    """
    a = _check_args(
        logp,
        logp_mu,
        advantages,
        mask,
        delta=delta,
        w_min=w_min,
        delta_b=delta_b,
        budget=budget,
        quantile=quantile,
        max_mult=max_mult,
        quantile_scale=quantile_scale,
        horizon=horizon,
        divergence=divergence,
        logp_topk=logp_topk,
        logp_mu_topk=logp_mu_topk,
        cu_seqlens=cu_seqlens,
        backend=backend,
        block_size=block_size,
    )
    rows, per_token, divergence, block, use, kw = a.rows, a.per_token, a.divergence, a.block, a.use, a.kw
    logp, logp_mu, adv = a.logp, a.logp_mu, a.adv

    valid = rows.valid
    n_valid = valid.sum(dtype=torch.int64)
    if valid.numel() and bool(n_valid > 0) and _anchor_unmoved(logp, logp_mu, valid):
        warnings.warn(_ANCHOR_MESSAGE, CPPOAnchorWarning, stacklevel=2)

    with torch.no_grad():
        D = None
        if divergence != "binary_tv" or use == "torch":
            D = ref.divergence(divergence, logp, logp_mu, a.logp_topk, a.logp_mu_topk)
        if use == "torch":
            keep, D, w, db = ref.cppo_mask(
                rows.to_padded(logp),
                rows.to_padded(logp_mu),
                rows.to_padded(adv, per_token),
                rows.padded_valid(),
                rows.to_padded(D),
                stats=token_rows.order_stats,  # the row scans and selections: native on CPU once built
                scan=token_rows.prefix_inside,
                **kw,
            )
            keep, D, w = rows.from_padded(keep), rows.from_padded(D), rows.from_padded(w)
        else:
            from rlvr_kernels.kernels import cppo as kern

            starts, spans = rows.starts_spans()
            keep, D, w, db = kern.cppo_mask(
                logp, logp_mu, D, adv, rows.valid8(), starts, spans, per_token=per_token, block=block, **kw
            )
            keep, D, w = rows.unflat(keep), rows.unflat(D), rows.unflat(w)
        n_masked = (valid & ~keep).sum(dtype=torch.int64)
        return CPPOMask(mask=keep, divergence=D, weight=w, delta_b=db, masked_fraction=_fraction(n_masked, n_valid))


def _fraction(n_masked: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
    """``masked_fraction``: masked over valid tokens, fp32 scalar (0 without valid tokens)."""
    return (n_masked.to(torch.float32) / n_valid.clamp(min=1).to(torch.float32)).reshape(())


# ----------------------------------------------------------------------------------------------------------------------
# cppo_mask as a PyTorch custom op (torch.library): opaque to torch.compile, so its checks and per-row bookkeeping
# (host reads) cost no graph break. Its results are detached masks and statistics.
# ----------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("rlvr_kernels::cppo_mask", mutates_args=())
def _cppo_op(
    logp: torch.Tensor,
    logp_mu: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    delta: float,
    w_min: float,
    delta_b: float,
    budget: str,
    quantile: float,
    max_mult: float,
    quantile_scale: float,
    horizon: Optional[int],
    divergence: str,
    logp_topk: Optional[torch.Tensor],
    logp_mu_topk: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    backend: str,
    block_size: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r = _cppo_mask(
        logp,
        logp_mu,
        advantages,
        mask,
        delta=delta,
        w_min=w_min,
        delta_b=delta_b,
        budget=budget,
        quantile=quantile,
        max_mult=max_mult,
        quantile_scale=quantile_scale,
        horizon=horizon,
        divergence=divergence,
        logp_topk=logp_topk,
        logp_mu_topk=logp_mu_topk,
        cu_seqlens=cu_seqlens,
        backend=backend,
        block_size=block_size,
    )
    return r.mask, r.divergence, r.weight, r.delta_b, r.masked_fraction


@_cppo_op.register_fake
def _(
    logp,
    logp_mu,
    advantages,
    mask,
    delta,
    w_min,
    delta_b,
    budget,
    quantile,
    max_mult,
    quantile_scale,
    horizon,
    divergence,
    logp_topk,
    logp_mu_topk,
    cu_seqlens,
    backend,
    block_size,
):
    rows = mask.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    f32 = dict(dtype=torch.float32, device=mask.device)
    return (
        torch.empty(mask.shape, dtype=torch.bool, device=mask.device),
        torch.empty(mask.shape, **f32),
        torch.empty(mask.shape, **f32),
        torch.empty(rows, **f32),
        torch.empty((), **f32),
    )


_CPPO_REALS = ("delta", "w_min", "delta_b", "quantile", "max_mult", "quantile_scale")


def cppo_mask(
    logp: torch.Tensor,
    logp_mu: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    delta: float = 0.15,
    w_min: float = 0.8,
    delta_b: float = 0.02,
    budget: str = "dynamic",
    quantile: float = 0.9,
    max_mult: float = 2.0,
    quantile_scale: float = 1.0,
    horizon: Optional[int] = None,
    divergence: str = "binary_tv",
    logp_topk: Optional[torch.Tensor] = None,
    logp_mu_topk: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
    block_size: Optional[int] = None,
    seq_group=None,
) -> CPPOMask:
    kw = dict(
        delta=delta, w_min=w_min, delta_b=delta_b, quantile=quantile, max_mult=max_mult, quantile_scale=quantile_scale
    )
    if seq_group is not None:
        return _cppo_mask_split(
            logp,
            logp_mu,
            advantages,
            mask,
            budget=budget,
            horizon=horizon,
            divergence=divergence,
            logp_topk=logp_topk,
            logp_mu_topk=logp_mu_topk,
            cu_seqlens=cu_seqlens,
            backend=backend,
            block_size=block_size,
            seq_group=seq_group,
            **kw,
        )
    try:  # plain Python numbers for the op schema; anything else takes the plain path and its own error
        reals = {name: C.real(name, kw[name]) for name in _CPPO_REALS}
        ok_horizon = horizon is None or C.integer("horizon", horizon, low=1, high=MAX_HORIZON) is not None
        block = _check_block(block_size)
    except (TypeError, ValueError):
        reals, ok_horizon, block = None, False, None
    tensors = (logp, logp_mu, advantages, mask, logp_topk, logp_mu_topk, cu_seqlens)
    if (
        reals is not None
        and ok_horizon
        and _op_args(tensors[:4], tensors[4:])
        and all(isinstance(x, str) for x in (budget, divergence, backend))
    ):
        detached = [None if t is None else t.detach() for t in tensors]
        out = torch.ops.rlvr_kernels.cppo_mask(
            detached[0],
            detached[1],
            detached[2],
            detached[3],
            reals["delta"],
            reals["w_min"],
            reals["delta_b"],
            budget,
            reals["quantile"],
            reals["max_mult"],
            reals["quantile_scale"],
            None if horizon is None else int(horizon),
            divergence,
            detached[4],
            detached[5],
            detached[6],
            backend,
            block,
        )
        return CPPOMask(*out)
    return _cppo_mask(
        logp,
        logp_mu,
        advantages,
        mask,
        budget=budget,
        horizon=horizon,
        divergence=divergence,
        logp_topk=logp_topk,
        logp_mu_topk=logp_mu_topk,
        cu_seqlens=cu_seqlens,
        backend=backend,
        block_size=block_size,
        **kw,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Sequence-split rows (``seq_group=``): eager Python around the op (a process group is not an op argument; under
# torch.compile the call is a graph break). The pieces of rlvr_kernels.reference.cppo.cppo_mask, each fed with the
# whole-row quantities exchanged over the group (rlvr_kernels.parallel.sequence / .select).
# ----------------------------------------------------------------------------------------------------------------------
@torch.compiler.disable
def _cppo_mask_split(
    logp, logp_mu, advantages, mask, *, cu_seqlens, backend, block_size, seq_group, **options
) -> CPPOMask:
    """:func:`cppo_mask` on this rank's columns ``[c_r, c_r + T_r)`` of sequence-split rows (see its docstring)."""
    from rlvr_kernels.parallel import collectives as coll
    from rlvr_kernels.parallel import select as psel
    from rlvr_kernels.parallel import sequence as seq

    def local():
        if cu_seqlens is not None:
            raise ValueError(
                "cppo_mask: seq_group with cu_seqlens (the packed layout) is not supported; pass this rank's columns "
                "of the padded batch, [B, T_local] tensors"
            )
        a = _check_args(
            logp, logp_mu, advantages, mask, cu_seqlens=None, backend=backend, block_size=block_size, **options
        )
        valid = a.rows.valid
        with torch.no_grad():  # token-local: the divergence and the direction test
            D = ref.divergence(a.divergence, a.logp, a.logp_mu, a.logp_topk, a.logp_mu_topk)
            D = torch.where(valid, D.float(), torch.zeros((), dtype=torch.float32, device=valid.device))
            toward = ref.toward_mu(a.logp, a.logp_mu, a.adv)
        unmoved = _anchor_unmoved(a.logp, a.logp_mu, valid)
        return (a, D, toward), (a.rows.B, a.rows.T, int(unmoved), BUDGETS.index(a.kw["budget"]))

    device = mask.device if isinstance(mask, torch.Tensor) else torch.device("cpu")
    (a, D, toward), split = seq.begin(
        local, device=device, seq_group=seq_group, extra=("anchor", "budget"), same=("budget",)
    )
    kw = a.kw
    valid = a.rows.valid
    B = valid.shape[0]
    with torch.no_grad():
        L, n = seq.row_partials(split, valid)  # one all-gather of [W, B, 2] int64
        n_valid = n.sum()
        if bool(n_valid > 0) and bool((split.extra[:, 0] != 0).all()):
            warnings.warn(_ANCHOR_MESSAGE, CPPOAnchorWarning, stacklevel=3)
        # Eq. 9 at global positions with the global row length (or the horizon): the reference on a frame
        w = seq.columns(split, ref.position_weight(seq.frame(split, valid, L), kw["w_min"], kw["horizon"]))

        # Eq. 22: the reference's budget, with the quantile's order statistics selected over the whole rows; the
        # frame [B, max n] of n True entries per row gives the reference the global counts (it reads nothing else
        # of it: the statistics come from the closure)
        n_max = int(n.max()) if B else 0
        counts = torch.arange(n_max, device=valid.device)[None, :] < n[:, None]

        def stats(_D, _valid, lo, hi):
            return psel.order_stats(D, valid, lo, hi, n, split.group)

        db = ref.row_budget(
            torch.zeros(counts.shape, dtype=torch.float32, device=valid.device),
            counts,
            kw["budget"],
            kw["delta_b"],
            kw["quantile"],
            kw["quantile_scale"],
            kw["max_mult"],
            stats=stats,
        )
        Z = w * D
        if kw["budget"] == "none" or split.total == 0:
            inside = Z <= kw["delta"]
        else:  # the exclusive prefix sum carried across ranks in rank order (exact: see carried_scan)
            inside = seq.carried_scan(split, Z, w, db, kw["delta"], token_rows.prefix_inside)
        keep = valid & (toward | inside)
        n_masked = (valid & ~keep).sum(dtype=torch.int64).reshape(1)
        coll.all_reduce(n_masked, [split.group])
        return CPPOMask(mask=keep, divergence=D, weight=w, delta_b=db, masked_fraction=_fraction(n_masked[0], n_valid))


cppo_mask.__doc__ = (_cppo_mask.__doc__ or "") + (
    "\n\n    Registered as the PyTorch custom op ``torch.ops.rlvr_kernels.cppo_mask``: ``torch.compile`` traces it "
    "without a graph break (its checks run inside the op).\n"
    "\n    Sequence parallelism (``seq_group``, a ``torch.distributed`` process group; default None): the tensors are "
    "this rank's columns ``[c_r, c_r + T_r)`` of the padded global ``[B, T]`` batch (ranks in group-rank order, the "
    "same B rows on every rank, ``T_r`` may differ; ``c_r`` comes from the ``T_r`` exchanged in the first "
    "collective). ``mask``, ``divergence`` and ``weight`` are the single-process op's on the whole rows, restricted "
    "to this rank's columns; ``delta_b`` (per row) and ``masked_fraction`` (over the whole batch) are the same on "
    "every rank. Exchanged: a header all-gather (errors, B, T_r), the row lengths and valid counts (one all-gather of "
    "[W, B, 2] int64: Eq. 9's L, positions are global), the dynamic budget's two order statistics per row by an "
    "exact distributed radix select (4 all-reduces of [2B, 256] int64, no token moves), the prefix budget's running "
    "sum carried in rank order (W - 1 broadcasts of [B] float64: the single-process scan rounds its running sum "
    "sequentially, so the carry is sequential too), and one all-reduce of the masked count. The Top-K divergences "
    "are token-local. The divergences, weights and budget are computed exactly as on one process; the prefix scan "
    "reproduces the CPU op's float64 running sum exactly, so on CPU every output is the single-process op's bit for "
    "bit. On CUDA the whole-row work runs the torch pieces (a parallel fp32 cumsum) where the single-process op runs "
    "the Triton kernel (an fp32 block scan): they agree as the two backends do, to the rounding of the running sum. "
    "With a group the call runs eagerly in Python around the op (a "
    "graph break under ``torch.compile``) and every rank must make it; an error on any rank, or a ``budget`` that "
    "differs between ranks, raises the same exception on every rank. The packed layout (``cu_seqlens``) "
    "with ``seq_group`` is a ``ValueError``.\n"
)
