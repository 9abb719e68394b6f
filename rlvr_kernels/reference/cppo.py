"""Plain-torch reference of the CPPO token mask (the CPU path, and the oracle of the Triton kernel).

CPPO: Mao, Zhou, Tao et al., "Beyond Uniform Token-Level Trust Region in LLM Reinforcement Learning",
arXiv 2606.10968v2 (Eq. 8-10, Eq. 22, Alg. 1); ``docs/methods/cppo.md``. The public op, its argument checking and the
packed layout live in :mod:`rlvr_kernels.cppo`; everything here takes the PADDED layout (``[B, T]`` tensors and a
bool ``valid`` mask of the same shape), already validated, and computes in fp32 (A8).

Shared by both backends (one copy of the math): :func:`divergence` (the Triton path calls it as its elementwise
prologue for every divergence but Binary-TV, which the kernel fuses) and the budget/fallback conventions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

from rlvr_kernels.layout import row_lengths

__all__ = [
    "DIVERGENCES",
    "BUDGETS",
    "LOG_EPS",
    "divergence",
    "position_weight",
    "order_stats",
    "row_quantile",
    "budget_upper",
    "row_budget",
    "toward_mu",
    "prefix_inside",
    "cppo_mask",
]

DIVERGENCES = ("binary_tv", "binary_kl", "topk_tv", "topk_kl")
BUDGETS = ("dynamic", "fixed", "none")

#: ``log(1e-12)``: probabilities are clamped to >= 1e-12 inside every log (Stable-RL's constant).
LOG_EPS = math.log(1e-12)
_EPS = 1e-12


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0`` (Maechler's two-branch form; ``-inf`` at ``x = 0``, never NaN)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def divergence(
    kind: str,
    logp: torch.Tensor,
    logp_mu: torch.Tensor,
    logp_topk: Optional[torch.Tensor] = None,
    logp_mu_topk: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-token divergence ``D_t`` between mu (rollout/behaviour policy) and pi (current policy), fp32
    (``docs/methods/cppo.md``, section "The divergence").

    Elementwise over any shape (``logp``/``logp_mu`` of shape ``X``, the Top-K tensors ``X + (K,)``); finite inputs
    give a finite ``D >= 0``. Every log-prob is clamped to ``<= 0`` first: a value above 0 is not a log-probability
    (rounding can give a tiny positive one) and counts as probability 1, so ``exp`` never overflows.

    - ``binary_tv``: ``|pi(a) - mu(a)|`` (the TV of the Bernoulli {a_t, rest}; official code default);
    - ``binary_kl``: ``KL(Ber(mu(a)) || Ber(pi(a)))``; log-probs are clamped to ``<= 0`` and every probability to
      ``>= 1e-12`` inside the logs (``log(1 - p)`` via a stable log1mexp), so ``mu(a) = 1`` or ``pi(a) = 1`` give a
      finite value; the result is clamped at 0 (rounding);
    - ``topk_tv``: ``1/2 (sum_k |mu_k - pi_k| + |other_mu - other_pi|)`` over the K columns plus the "other" bucket,
      ``other = max(1 - sum_k p_k, 0)``;
    - ``topk_kl``: ``sum_k mu_k (log mu_k - log pi_k) + other_mu (log other_mu - log other_pi)``, probabilities
      clamped to ``>= 1e-12`` inside the logs, result clamped at 0.

    The Top-K columns are the log-probs of pi (``logp_topk``) and mu (``logp_mu_topk``) at the SAME ids, each id at
    most once (see :func:`rlvr_kernels.cppo_mask` for the id-set convention); a column of ``-inf`` in both is an
    empty bucket and contributes nothing.
    """
    if kind == "binary_tv":
        return (logp.float().clamp(max=0.0).exp() - logp_mu.float().clamp(max=0.0).exp()).abs()
    if kind == "binary_kl":
        lp = logp.float().clamp(max=0.0)
        lm = logp_mu.float().clamp(max=0.0)
        mu = lm.exp()
        one_minus_mu = -torch.expm1(lm)
        kl = mu * (lm.clamp(min=LOG_EPS) - lp.clamp(min=LOG_EPS)) + one_minus_mu * (
            _log1mexp(lm).clamp(min=LOG_EPS) - _log1mexp(lp).clamp(min=LOG_EPS)
        )
        return kl.clamp(min=0.0)
    if kind in ("topk_tv", "topk_kl"):
        # float64 over the K columns ([X, K], K small): the tail mass 1 - sum p cancels, and its log amplifies an fp32
        # rounding of the sum by 1 / tail (a tail of 1e-2 would give a relative error of 1e-5 in D)
        lp = logp_topk.double().clamp(max=0.0)
        lm = logp_mu_topk.double().clamp(max=0.0)
        p = lp.exp()
        pm = lm.exp()
        other = (1.0 - p.sum(-1)).clamp(min=0.0)
        other_mu = (1.0 - pm.sum(-1)).clamp(min=0.0)
        if kind == "topk_tv":
            return (0.5 * ((pm - p).abs().sum(-1) + (other_mu - other).abs())).float()
        kl = (pm * (lm.clamp(min=LOG_EPS) - lp.clamp(min=LOG_EPS))).sum(-1)
        kl = kl + other_mu * (other_mu.clamp(min=_EPS).log() - other.clamp(min=_EPS).log())
        return kl.clamp(min=0.0).float()
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {kind!r}")


def position_weight(valid: torch.Tensor, w_min: float, horizon: Optional[int] = None) -> torch.Tensor:
    """Position weight ``w_t`` (Eq. 9), fp32 ``[B, T]``, 0 on invalid tokens.

    0-based ``t``: ``w_t = 1 - (1 - w_min) * min(t / max(H - 1, 1), 1)`` with ``H`` the row length ``L`` (last valid
    index + 1; ``horizon=None``, paper / UniRL) or the fixed ``horizon`` (verl PR, absolute positions; positions past
    it get ``w_min``). ``w_0 = 1`` always (a one-token row has ``w = 1``, as Eq. 9 and UniRL give).
    """
    B, T = valid.shape
    if horizon is None:
        H = row_lengths(valid) if T > 0 else torch.zeros(B, dtype=torch.int64, device=valid.device)
    else:
        H = torch.full((B,), int(horizon), dtype=torch.int64, device=valid.device)
    denom = (H - 1).clamp(min=1).to(torch.float32)
    t = torch.arange(T, device=valid.device, dtype=torch.float32)
    frac = (t[None, :] / denom[:, None]).clamp(max=1.0)
    w = 1.0 - (1.0 - w_min) * frac
    return torch.where(valid, w, torch.zeros((), dtype=torch.float32, device=valid.device))


#: ``stats(D, valid, lo, hi) -> (v_lo, v_hi)``: the order statistics :func:`row_quantile` interpolates
#: (:func:`order_stats`, or a native kernel with its exact results).
OrderStats = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def order_stats(
    D: torch.Tensor, valid: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``lo[b]``-th and ``hi[b]``-th (0-based, int64 ``[B]``, in ``[0, T)``) entries of each row's valid values
    of ``D`` (``[B, T]``, ``T >= 1``) in ascending order, fp32 ``[B]`` each; positions past the row's valid count
    read ``+inf`` (invalid entries sort last as ``+inf``). The sort is stable, so which of two tied entries (-0.0 and
    +0.0) is picked, and with it the sign of a zero, is defined: the lower index first."""
    inf = torch.full_like(D, float("inf"), dtype=torch.float32)
    srt = torch.sort(torch.where(valid, D.float(), inf), dim=1, stable=True).values
    return srt.gather(1, lo[:, None]).squeeze(1), srt.gather(1, hi[:, None]).squeeze(1)


def row_quantile(D: torch.Tensor, valid: torch.Tensor, q: float, *, stats: OrderStats = order_stats) -> torch.Tensor:
    """Per-row ``q``-quantile of the valid entries of ``D`` (fp32 ``[B]``; NaN for a row without valid entries).

    Linear interpolation exactly as ``torch.quantile`` / ``torch.nanquantile`` compute it: fp32 rank
    ``r = q * (n - 1)``, ``lo = floor(r)``, ``hi = ceil(r)``, ``lerp(v_lo, v_hi, r - lo)`` on the ascending order
    statistics. Done by hand (:func:`order_stats`: sort + gather, or ``stats``) so that it has no input-size limit.
    """
    B, T = D.shape
    nan = torch.full((B,), float("nan"), dtype=torch.float32, device=D.device)
    if T == 0 or B == 0:
        return nan
    n = valid.sum(dim=1, dtype=torch.int64)
    qt = torch.tensor(q, dtype=torch.float32, device=D.device)
    r = qt * (n - 1).clamp(min=0).to(torch.float32)
    lo = r.to(torch.int64)
    hi = torch.minimum(r.ceil().to(torch.int64), (n - 1).clamp(min=0))
    wgt = r - lo.to(torch.float32)
    v_lo, v_hi = stats(D, valid, lo, hi)
    return torch.where(n > 0, torch.lerp(v_lo, v_hi, wgt), nan)


def budget_upper(delta_b: float, max_mult: float) -> float:
    """The dynamic budget's upper clamp ``max_mult * delta_b`` (float64), capped at the largest finite fp32."""
    return min(float(max_mult) * float(delta_b), float(torch.finfo(torch.float32).max))


def row_budget(
    D: torch.Tensor,
    valid: torch.Tensor,
    budget: str,
    delta_b: float,
    q: float,
    scale: float,
    max_mult: float,
    *,
    stats: OrderStats = order_stats,
) -> torch.Tensor:
    """The prefix budget per row, fp32 ``[B]``.

    ``fixed``: ``delta_b``. ``dynamic`` (Eq. 22, verl PR): ``clamp(scale * quantile(D_valid, q), delta_b,
    max_mult * delta_b)``; a row without valid tokens falls back to ``delta_b``. ``none``: ``+inf`` (no budget: the
    threshold is ``delta`` everywhere). The upper clamp is capped at the largest finite fp32
    (:func:`budget_upper`), so the budget of a ``fixed`` / ``dynamic`` row is always finite (``delta_b`` itself must
    fit fp32) and ``delta_b w`` never meets ``inf * 0`` at an invalid position. ``stats``: see :func:`row_quantile`.
    """
    B = D.shape[0]
    if budget == "none":
        return torch.full((B,), float("inf"), dtype=torch.float32, device=D.device)
    fixed = torch.full((B,), float(delta_b), dtype=torch.float32, device=D.device)
    if budget == "fixed":
        return fixed
    qv = row_quantile(D, valid, q, stats=stats)
    db = (scale * qv).clamp(min=float(delta_b), max=budget_upper(delta_b, max_mult))
    return torch.where(torch.isnan(qv), fixed, db)


def toward_mu(logp: torch.Tensor, logp_mu: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """``A_t (rho_t - 1) <= 0`` (Eq. 10), evaluated exactly by sign.

    ``rho - 1`` has the sign of the log-ratio ``logp - logp_mu`` (clamping it to [-20, 20] does not change the sign),
    so the update moves AWAY from mu iff ``A > 0 and log rho > 0`` or ``A < 0 and log rho < 0``; ``A = 0`` or
    ``rho = 1`` count as toward mu (kept). ``advantages`` is ``[B]`` (per row) or the shape of ``logp``.
    """
    lr = logp.float() - logp_mu.float()
    a = advantages.float()
    if a.dim() == 1 and lr.dim() == 2:
        a = a[:, None]
    away = ((a > 0) & (lr > 0)) | ((a < 0) & (lr < 0))
    return ~away


def prefix_inside(Z: torch.Tensor, w: torch.Tensor, db: torch.Tensor, delta: float) -> torch.Tensor:
    """CPPO's prefix-budget test ``Z_t <= c_t`` (bool ``[B, T]``), ``c_t = min(delta, delta + sum_{j<t} G_j)`` with
    ``G_j = db w_j - Z_j``: ``Z = w D`` and ``w`` fp32 ``[B, T]`` (0 on invalid tokens), ``db`` the finite fp32
    budget ``[B]``. One exclusive prefix sum (by shifting the inclusive one), the same number as
    ``delta_b W_{t-1} - S_{t-1}`` without the cancellation of two large fp32 sums on long rows."""
    G = db[:, None] * w - Z
    R = F.pad(G.cumsum(dim=1)[:, :-1], (1, 0))  # exclusive: shift, not cumsum - G
    c = torch.clamp(delta + R, max=delta)
    return Z <= c


def cppo_mask(
    logp: torch.Tensor,
    logp_mu: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    D: torch.Tensor,
    *,
    delta: float,
    w_min: float,
    delta_b: float,
    budget: str,
    quantile: float,
    quantile_scale: float,
    max_mult: float,
    horizon: Optional[int],
    stats: OrderStats = order_stats,
    scan: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor] = prefix_inside,
):
    """CPPO mask on the padded layout (Alg. 1). Returns ``(mask bool, D fp32, w fp32, delta_b fp32 [B])``.

    ``D`` is the per-token divergence (:func:`divergence`); it is zeroed on invalid tokens here, and so is ``w``
    (A6: absolute positions kept). With ``Z = w D`` and ``G_j = delta_b w_j - Z_j``, the effective threshold
    ``c_t = min(delta, delta + delta_b W_{t-1} - S_{t-1})`` is computed as ``min(delta, delta + sum_{j<t} G_j)``
    (one exclusive prefix sum, by shifting the inclusive one): the same number without the cancellation of two large
    fp32 sums on long rows (:func:`prefix_inside`). ``M = valid & (toward_mu | Z <= c)``; ``budget="none"`` uses
    ``c = delta``. ``stats`` and ``scan`` replace :func:`order_stats` and :func:`prefix_inside` by kernels with the
    same results (the native CPU ones of :mod:`rlvr_kernels.cpu.token_rows`).
    """
    zero = torch.zeros((), dtype=torch.float32, device=valid.device)
    D = torch.where(valid, D.float(), zero)
    w = position_weight(valid, w_min, horizon)
    db = row_budget(D, valid, budget, delta_b, quantile, quantile_scale, max_mult, stats=stats)
    Z = w * D
    inside = Z <= delta if budget == "none" or D.shape[1] == 0 else scan(Z, w, db, delta)
    keep = valid & (toward_mu(logp, logp_mu, advantages) | inside)
    return keep, D, w, db
