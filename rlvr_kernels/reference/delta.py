"""Plain-torch reference of the DelTA coefficients (the CPU path, and the oracle of the Triton sweeps).

DelTA (Zhang, Wu, Lin, arXiv 2605.21467; official code RUCBM/DelTA ``verl/workers/actor/dp_actor.py``
``compute_log_prob_h``); the algorithm and the skinny-product form used here are described in
``docs/methods/delta.md``, sections "Refinement and coefficients" and "How the package computes it".

Everything here works on FLAT per-token arrays of one call (already validated and laid out by
:mod:`rlvr_kernels.delta`): ``h [N, H]`` (any float dtype, last dim contiguous; rows that are not ``valid`` may hold
anything, NaN included, and never contribute), and fp32 ``[N]`` scalars ``s = 1 - p_old`` (0 on invalid tokens),
``a`` (the advantage of each token, 0 on invalid tokens), bool ``valid``. ``h`` is touched only by two sweeps:

- :func:`rowdot3` ``h @ [mu+, mu-]`` (``[N, H] x [H, 2]``), optionally with ``||h||^2`` as a third column;
- :func:`colsum2` ``h^T W`` (``[H, N] x [N, 2]``),

both with fp32 accumulation, in row chunks (bounded extra memory). The proxy ``v_t = s_t h_t`` is never built:
``v.mu = s (h.mu)`` and ``sum_t w_t v_t = h^T (w s)``. The margin toward a token's own side,
``D-_t - D+_t`` (Pos) or ``D+_t - D-_t`` (Neg), is evaluated as ``+-(2 s (h.mu+ - h.mu-) - (|mu+|^2 - |mu-|^2))``:
the ``||v_t||^2`` terms of the two squared distances cancel exactly, so ``||h||^2`` is not needed (it is still
available from :func:`rowdot3`, ``with_norm=True``), and skipping the cancellation is more accurate in fp32.

The small per-token / per-side functions below (weights, margins, moments, gamma, coefficients, normalisation) are
shared by the one-shot driver :func:`delta_coefficients_flat` (both backends: it takes the two sweeps as callables)
and by the streaming :class:`rlvr_kernels.delta.DeltaEstimator`, so there is one copy of the math.
Side statistics: masses and centroids in fp32, margin moments ``(count, sum m, sum m^2)`` in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "rowdot3",
    "colsum2",
    "per_token_scalars",
    "sides",
    "initial_weights",
    "refine_weights",
    "centroids",
    "margins",
    "moments",
    "gamma",
    "gamma_index",
    "raw_coefficients",
    "normaliser_stats",
    "normalise",
    "delta_coefficients_flat",
]

_CHUNK_ELEMS = 1 << 22  # rows per chunk * H: at most 16 MiB of fp32 per chunk in the sweeps


def _chunk_rows(H: int) -> int:
    return max(1, _CHUNK_ELEMS // max(H, 1))


def _rows_fp32(h: torch.Tensor, valid: torch.Tensor, i: int, j: int) -> torch.Tensor:
    hc = h[i:j]
    vc = valid[i:j]
    if not bool(vc.all()):
        hc = torch.where(vc[:, None], hc, torch.zeros((), dtype=hc.dtype, device=hc.device))
    return hc.to(torch.float32)


def rowdot3(h: torch.Tensor, mu: torch.Tensor, valid: torch.Tensor, *, with_norm: bool = False) -> torch.Tensor:
    """Per token ``[h.mu[0], h.mu[1]]`` (and ``||h||^2`` with ``with_norm``): fp32 ``[N, 2]`` (``[N, 3]``).

    0 on invalid rows.

    ``h [N, H]`` any float dtype, ``mu [2, H]`` fp32, ``valid [N]`` bool. fp32 accumulation, row chunks.
    """
    N, H = h.shape
    out = torch.zeros(N, 3 if with_norm else 2, dtype=torch.float32, device=h.device)
    mt = mu.to(torch.float32).t()
    step = _chunk_rows(H)
    for i in range(0, N, step):
        j = min(N, i + step)
        hc = _rows_fp32(h, valid, i, j)
        out[i:j, :2] = hc @ mt
        if with_norm:
            out[i:j, 2] = (hc * hc).sum(1)
    return out


def colsum2(h: torch.Tensor, w: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``h^T w`` over the valid rows: fp32 ``[2, H]``. ``w [N, 2]`` fp32 (its values on invalid rows are ignored)."""
    N, H = h.shape
    out = torch.zeros(2, H, dtype=torch.float32, device=h.device)
    step = _chunk_rows(H)
    for i in range(0, N, step):
        j = min(N, i + step)
        hc = _rows_fp32(h, valid, i, j)
        wc = torch.where(valid[i:j, None], w[i:j].to(torch.float32), 0.0)
        out += wc.t() @ hc
    return out


# ----------------------------------------------------------------------------------------------------------------------
# per-token and per-side pieces of the algorithm (docs/methods/delta.md), shared by the one-shot and streaming forms
# ----------------------------------------------------------------------------------------------------------------------
def per_token_scalars(old_logp: torch.Tensor, adv: torch.Tensor, valid: torch.Tensor):
    """``s = 1 - exp(old_logp)`` (as ``-expm1``, exact near p = 1) and the advantage, fp32, both 0 on invalid tokens.

    ``old_logp`` is clamped to ``<= 0`` first: a value above 0 is not a log-probability (rounding can give a tiny
    positive one) and counts as p = 1 (``s = 0``), so ``s`` always lies in ``[0, 1]`` (``-inf``, or a float64 value
    below the fp32 range, gives ``s = 1``).
    """
    zero = torch.zeros((), dtype=torch.float32, device=valid.device)
    s = torch.where(valid, -torch.expm1(old_logp.to(torch.float32).clamp(max=0.0)), zero)
    a = torch.where(valid, adv.to(torch.float32), zero)
    return s, a


def sides(a: torch.Tensor, valid: torch.Tensor):
    """Side membership per token: ``pos = valid & A > 0``, ``neg = valid & A < 0``."""
    return valid & (a > 0), valid & (a < 0)


def initial_weights(a: torch.Tensor, s: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor):
    """Weights of the initial centroids ``mu+- = sum a+- v / sum a+-``: returns ``(w [N, 2], mass [2])`` (fp32).

    ``w[:, k] = a+-_t s_t`` (so that ``h^T w = sum a+- v``), ``mass = [sum a+, sum a-]``.
    """
    ap = torch.where(pos, a, 0.0)
    an = torch.where(neg, -a, 0.0)
    mass = torch.stack([ap.sum(), an.sum()])
    return torch.stack([ap * s, an * s], 1), mass


def gamma_index(pos: torch.Tensor) -> torch.Tensor:
    """Index into the ``[2]`` per-side gamma: 0 for Pos, 1 otherwise."""
    return (~pos).to(torch.long)


def refine_weights(m, g, a, s, pos, neg):
    """Refinement weights ``omega_t = sigmoid(m_t / gamma_side) |A_t|`` per side: ``(w [N, 2], mass [2])`` (fp32)."""
    q = torch.sigmoid(m / g[gamma_index(pos)])
    om = q * a.abs()
    op = torch.where(pos, om, 0.0)
    on = torch.where(neg, om, 0.0)
    mass = torch.stack([op.sum(), on.sum()])
    return torch.stack([op * s, on * s], 1), mass


def centroids(sums: torch.Tensor, mass: torch.Tensor, eps: float) -> torch.Tensor:
    """``mu = sums / max(mass, eps)`` per side (``[2, H]`` fp32). Empty side -> zero centroid (ambiguity 6)."""
    return (sums.to(torch.float32) / mass.to(torch.float32).clamp_min(eps)[:, None]).contiguous()


def margins(proj: torch.Tensor, s: torch.Tensor, mu: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Margin toward each token's own side from ``proj = h @ [mu+, mu-]`` (``[N, >=2]``): fp32 ``[N]``.

    ``D-_t - D+_t = 2 s_t (h_t.mu+ - h_t.mu-) - (|mu+|^2 - |mu-|^2)`` for Pos tokens and its negative otherwise
    (the code's ``lam_w = 1``, identity metric). Equals ``2 sign(A) (w.v_t + b)`` with ``w = mu+ - mu-``.
    """
    mu = mu.to(torch.float32)
    b = (mu[0] * mu[0]).sum() - (mu[1] * mu[1]).sum()
    m = 2.0 * s * (proj[:, 0] - proj[:, 1]) - b
    return torch.where(pos, m, -m)


def moments(m: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Unweighted margin moments per side, float64 ``[6]``: ``(n+, sum m, sum m^2, n-, sum m, sum m^2)``."""
    md = m.to(torch.float64)
    out = []
    for sel in (pos, neg):
        x = torch.where(sel, md, 0.0)
        out += [sel.sum(dtype=torch.float64), x.sum(), (x * x).sum()]
    return torch.stack(out)


def gamma(mom: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-side temperature ``sqrt(max(E[m^2] - E[m]^2, eps))`` (population std, count clamped >= 1): fp32 ``[2]``.

    An empty side (or a single token, or equal margins) gives ``sqrt(eps)`` (1e-4 by default), as the official code.
    """
    mom = mom.to(torch.float64).reshape(2, 3)
    n = mom[:, 0].clamp_min(1.0)
    mean = mom[:, 1] / n
    var = (mom[:, 2] / n - mean * mean).clamp_min(eps)
    return var.sqrt().to(torch.float32)


def raw_coefficients(m, g, pos, neg, valid, lam_min: float, lam_max: float) -> torch.Tensor:
    """``c = lam_min + (lam_max - lam_min) sigmoid(m / gamma_side)`` for A != 0, ``lam_min`` for A = 0, 0 if invalid."""
    q = torch.sigmoid(m / g[gamma_index(pos)])
    c = torch.where(pos | neg, lam_min + (lam_max - lam_min) * q, torch.full_like(q, lam_min))
    return torch.where(valid, c, 0.0)


def normaliser_stats(c, valid, pos, neg, exclude_zero_adv: bool) -> torch.Tensor:
    """float64 ``[2]``: ``(sum_{E} c, N_E)`` with ``E`` = valid tokens (default) or valid tokens with A != 0."""
    E = (pos | neg) if exclude_zero_adv else valid
    return torch.stack([torch.where(E, c.to(torch.float64), 0.0).sum(), E.sum(dtype=torch.float64)])


def normalise(c, valid, pos, neg, stats: torch.Tensor, eps: float, exclude_zero_adv: bool) -> torch.Tensor:
    """``c~ = c N_E / max(sum_E c, eps)`` (fp32, product in float64); 0 on invalid tokens.

    With ``exclude_zero_adv`` the tokens with A = 0 are outside ``E`` and get ``c~ = 1`` (neutral: plain DAPO weight).
    """
    stats = stats.to(torch.float64)
    scale = stats[1] / stats[0].clamp_min(eps)
    out = (c.to(torch.float64) * scale).to(torch.float32)
    if exclude_zero_adv:
        out = torch.where(pos | neg, out, 1.0)
    return torch.where(valid, out, 0.0)


def _no_check(kind, x, valid) -> None:
    return None


def delta_coefficients_flat(
    h: torch.Tensor,
    s: torch.Tensor,
    a: torch.Tensor,
    valid: torch.Tensor,
    *,
    iters: int,
    lam_min: float,
    lam_max: float,
    eps: float,
    exclude_zero_adv: bool,
    rowdot: Callable = rowdot3,
    colsum: Callable = colsum2,
    check: Callable | None = None,
) -> torch.Tensor:
    """One-shot DelTA coefficients on flat arrays (skinny-GEMM form of ``docs/methods/delta.md``): fp32 ``[N]``.

    ``rowdot(h, mu [2, H], valid) -> [N, >=2]`` and ``colsum(h, w [N, 2], valid) -> [2, H]`` are the two sweeps
    (torch here, Triton in :mod:`rlvr_kernels.kernels.delta`). Margins are cached as ``[N]`` scalars between sweeps,
    so ``h`` is read ``2 iters + 2`` times. ``check(kind, x, valid)`` is called on every set of centroid masses and
    centroids (``kind="centroids"``, ``x = (mass, mu)``) and of margins (``kind="margins"``, ``x = m``): the caller
    turns a non-finite ``hidden_old``, or statistics that overflow fp32, into a ``ValueError`` there (a few ``[N]`` /
    ``[2, H]`` reductions, no extra pass over ``h``).
    Gamma order exactly as the official code: each refinement step uses the gamma of the previous step's margins
    (the initial margins for the first step), and the final coefficients use the gamma of the margins measured
    before the last centroid update.
    """
    if check is None:
        check = _no_check
    pos, neg = sides(a, valid)
    w, mass = initial_weights(a, s, pos, neg)
    mu = centroids(colsum(h, w, valid), mass, eps)
    check("centroids", (mass, mu), valid)
    m = margins(rowdot(h, mu, valid), s, mu, pos)
    check("margins", m, valid)
    g = gamma(moments(m, pos, neg), eps)
    for _ in range(iters):
        w, mass = refine_weights(m, g, a, s, pos, neg)
        g = gamma(moments(m, pos, neg), eps)  # gamma from the pre-update margins (official order)
        mu = centroids(colsum(h, w, valid), mass, eps)
        check("centroids", (mass, mu), valid)
        m = margins(rowdot(h, mu, valid), s, mu, pos)
        check("margins", m, valid)
    c = raw_coefficients(m, g, pos, neg, valid, lam_min, lam_max)
    return normalise(c, valid, pos, neg, normaliser_stats(c, valid, pos, neg, exclude_zero_adv), eps, exclude_zero_adv)
