"""DelTA token coefficients (discriminative token credit assignment), one-shot and streaming.

Paper: Zhang, Wu, Lin, "DelTA: Discriminative Token Credit Assignment for RLVR", arXiv 2605.21467; official code
RUCBM/DelTA (a verl fork), ``verl/workers/actor/dp_actor.py`` ``compute_log_prob_h``; method page
``docs/methods/delta.md``.

Each valid response token gets a detached coefficient ``c~_t > 0`` with mean 1 over the estimation set; the loss
uses the advantage ``A_t c~_t`` in the unchanged DAPO surrogate (``RLVRLoss(credit="delta")`` with the forward keyword
``delta_coefficients``), i.e. a per-token weighting. The proxy of token t's gradient is ``v_t = (1 - p_t) h_t``
(``p_t = exp(old_logp_t)``, ``h_t`` the final hidden state fed to ``lm_head`` under theta_old): advantage-weighted
side centroids ``mu+-``, margins ``m_t`` toward the token's own side (squared Euclidean distances), per-side
temperatures ``gamma`` (population std of the margins), ``iters`` soft-assignment refinements of the centroids, then
``c_t = lam_min + (lam_max - lam_min) sigmoid(m_t / gamma_side)`` (``lam_min`` when A = 0) and
``c~ = c N_E / sum_E c``. ``h`` is touched only through two skinny sweeps (``h @ [mu+, mu-]`` and
``h^T [w+, w-]``; Triton kernels in :mod:`rlvr_kernels.kernels.delta`, torch in :mod:`rlvr_kernels.reference.delta`).

Layouts as in :mod:`rlvr_kernels.credit`: padded (``hidden_old [B, T, H]``, ``old_logp``/``mask [B, T]``) or packed
(``hidden_old [N, H]``, ``old_logp``/``mask [N]`` plus ``cu_seqlens [S + 1]``); identical results either way.

Choices where the paper leaves room (``docs/methods/delta.md``, section "Choices where the paper leaves room"):

1. Paper vs code: the official code's identity metric and ``lam_w = 1`` (the diagonal-Mahalanobis metric and the
   margin weight are computed or declared there but disabled; their paper form was not available to us, so no
   ``metric`` / ``lam_w`` options are exposed).
2. Scope of E: the tokens passed in (one call = one estimation set, which is the official per-DP-rank rollout batch
   when you pass that batch). For sets that do not fit at once, :class:`DeltaEstimator` streams micro-batches with
   an optional all-reduce across ranks (the official code does NOT all-reduce: leave ``all_reduce=None`` to match
   it). Estimating per micro-batch is an approximation of either.
3. Zero-advantage tokens: by default they get ``c = lam_min`` and count in the normaliser (official);
   ``exclude_zero_adv=True`` leaves them out of ``N_E`` and ``sum c`` and gives them ``c~ = 1`` (neutral; they add
   nothing to the policy gradient either way).
4. Proxy row identity: collapsed, as in the code (one H-dim space for every token).
5. Staleness: compute once per rollout batch from theta_old's hidden states and pass the result to the loss.
6. Empty side (no A > 0 or no A < 0): its centroid is 0 and its gamma ``sqrt(eps)`` = 1e-4 (official behaviour).
7. Dtype: all statistics in fp32 (margin moments and the normaliser in float64); ``hidden_old`` may be bf16/fp16.
8. Temperature: pass ``old_logp`` computed at the rollout temperature, as the official code does.

Extreme inputs (the choice per input: compute, or refuse clearly; never NaN from finite inputs):

- positions outside ``mask`` (and the per-row advantage of a row without valid tokens) may hold anything, NaN and
  inf included: they are never read into a result;
- ``old_logp`` above 0 counts as p = 1 (``s = 0``) and below the fp32 range as p = 0 (``s = 1``): computed;
- advantages: the coefficients do not change when every advantage is scaled by the same positive factor, and the
  fp32 statistics hold any advantages whose per-side sums fit fp32; float64 advantages beyond the fp32 range, or
  sums of ``|A|`` over a side that overflow fp32, are a ``ValueError`` naming the advantages (scale them down);
- hidden states: any size whose squared distances fit fp32 (``|h|^2 H`` well below 3.4e38, i.e. ``|h|`` up to
  about 1e17 for H = 4096; a model's final hidden states are many orders below) gives the same coefficients as
  ``h`` scaled down; beyond that (e.g. 1e30) the centroids or margins overflow, which is a ``ValueError`` naming
  ``hidden_old``, as are non-finite hidden states at valid positions;
- numbers: ``lam_min``, ``lam_max``, ``eps`` in ``[C.F32_TINY, C.F32_MAX]`` (they are used in fp32, where a smaller
  value is 0 and a larger one inf), ``iters`` an int in ``[0, 1000]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Optional

import torch

from rlvr_kernels import _checks as C
from rlvr_kernels._backend import BACKENDS, resolve_backend
from rlvr_kernels.credit import _check_backend, _Rows
from rlvr_kernels.reference import delta as ref

__all__ = ["delta_coefficients", "DeltaEstimator"]

_HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------------------------------------------------
# argument checking
# ----------------------------------------------------------------------------------------------------------------------
MAX_ITERS = 1000


def _check_params(iters, lam_min, lam_max, eps, exclude_zero_adv):
    iters = C.integer("iters", iters, low=0, high=MAX_ITERS)
    lam_min = C.real("lam_min", lam_min, low=C.F32_TINY)
    lam_max = C.real("lam_max", lam_max, low=lam_min)
    eps = C.real("eps", eps, low=C.F32_TINY)
    C.flag("exclude_zero_adv", exclude_zero_adv)
    return iters, lam_min, lam_max, eps


class _Flat:
    """One validated call's inputs as flat per-token arrays: ``h [n, H]``, fp32 ``s``, ``a`` and bool ``valid [n]``."""

    def __init__(self, hidden_old, old_logp, advantages, mask, cu_seqlens, *, need_h: bool = True):
        rows = _Rows(mask, cu_seqlens)
        rows.check_token_tensor("old_logp", old_logp)
        adv, per_token = rows.check_advantages(advantages)
        self.rows = rows
        self.device = rows.device
        self.H = None
        if hidden_old is None and not need_h:  # DeltaEstimator.normalise: no hidden states involved
            self._scalars(old_logp, adv, per_token)
            self.h = None
            return
        if not isinstance(hidden_old, torch.Tensor):
            raise TypeError(f"hidden_old must be a torch.Tensor, got {type(hidden_old).__name__}")
        if hidden_old.dtype not in _HIDDEN_DTYPES:
            raise TypeError(
                f"hidden_old must be a floating-point tensor (fp32, bf16, fp16 or fp64), got {hidden_old.dtype}"
            )
        lead = rows.shape
        if hidden_old.dim() != len(lead) + 1 or tuple(hidden_old.shape[:-1]) != lead:
            want = "[B, T, H]" if not rows.packed else "[N, H]"
            raise ValueError(
                f"hidden_old must be {want} with leading shape {lead} (the shape of old_logp / mask), "
                f"got {tuple(hidden_old.shape)}"
            )
        if hidden_old.shape[-1] < 1:
            raise ValueError("hidden_old must have a hidden size H >= 1, got H = 0")
        if hidden_old.device != rows.device:
            raise ValueError(f"hidden_old is on {hidden_old.device} but mask is on {rows.device}")
        self.H = int(hidden_old.shape[-1])
        self._scalars(old_logp, adv, per_token)
        self.h = hidden_old.detach().reshape(-1, self.H) if need_h else None

    def _scalars(self, old_logp, adv, per_token: bool) -> None:
        rows = self.rows
        rows.check_finite("old_logp", old_logp)
        rows.check_finite("advantages", adv, per_token, fp32=True)
        valid = rows.valid.reshape(-1)
        if per_token:
            a = adv.reshape(-1)
        elif rows.packed:
            a = adv[rows._row_ids()]
        else:
            a = adv[:, None].expand(rows.B, rows.T).reshape(-1)
        self.valid = valid
        self.s, self.a = ref.per_token_scalars(old_logp.detach().reshape(-1), a.detach(), valid)
        self.pos, self.neg = ref.sides(self.a, valid)

    def out(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.reshape(self.rows.shape)


def _sweeps(backend: str, device: torch.device):
    """The two sweeps over ``h`` for ``backend`` on ``device``: ``(rowdot, colsum)``."""
    if resolve_backend(_check_backend(backend), device) == "torch":
        return ref.rowdot3, ref.colsum2
    from rlvr_kernels.kernels import delta as kern

    return kern.rowdot3, kern.colsum2


def _check_centroids(mass: torch.Tensor, mu: torch.Tensor) -> None:
    """The side masses and centroids are finite fp32 (one host sync; the diagnosis only on failure)."""
    mass32 = mass.to(torch.float32)
    if bool(torch.isfinite(mass32).all() & torch.isfinite(mu).all()):
        return
    if not bool(torch.isfinite(mass32).all()):
        raise ValueError(
            "advantages are too large: the sum of |A| over a side overflows float32 (DelTA's centroid "
            "masses are fp32; the coefficients do not change when every advantage is scaled by the same "
            "positive factor, so scale them down)"
        )
    raise ValueError(
        "hidden_old has non-finite values at valid positions, or values too large for DelTA's fp32 "
        "statistics (with these advantages): the side centroids are not finite"
    )


def _check_margins(m: torch.Tensor, valid: torch.Tensor) -> None:
    if m.numel() and not bool((torch.isfinite(m) | ~valid).all()):
        raise ValueError(
            "hidden_old is too large: DelTA's squared distances to the side centroids overflow float32 "
            "(|h|^2 H must stay well below 3.4e38; a model's final hidden states are far smaller)"
        )


def _check(kind: str, x, valid: torch.Tensor) -> None:
    if kind == "centroids":
        _check_centroids(*x)
    else:
        _check_margins(x, valid)


# ----------------------------------------------------------------------------------------------------------------------
# one-shot
# ----------------------------------------------------------------------------------------------------------------------
def delta_coefficients(
    hidden_old: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    iters: int = 1,
    lam_min: float = 0.8,
    lam_max: float = 1.2,
    eps: float = 1e-8,
    exclude_zero_adv: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """DelTA coefficients ``c~`` of every token of one estimation set (``docs/methods/delta.md``, sections
    "The proxy and the side centroids" to "Refinement and coefficients").

    Official algorithm (``compute_log_prob_h``, DelTA arXiv 2605.21467), proxy ``v_t = (1 - p_t) h_t``:
    side centroids ``mu+- = sum a+- v / sum a+-`` (``a+- = max(+-A, 0)``), margins ``m_t = D-_t - D+_t`` (Pos) or
    ``D+_t - D-_t`` (Neg) with ``D+-_t = ||v_t - mu+-||^2``, ``gamma_side`` = unweighted population std of the side's
    margins (``sqrt(max(var, eps))``), then ``iters`` refinements (weights ``sigmoid(m / gamma) |A|``, new
    centroids; gamma taken from the pre-update margins, exactly the official order), and finally
    ``c = lam_min + (lam_max - lam_min) sigmoid(m / gamma)`` for A != 0, ``lam_min`` for A = 0, ``c~ = c N_E / sum c``.

    Args:
        hidden_old: the final hidden states fed to ``lm_head`` under theta_old (detached; fp32, bf16, fp16 or fp64):
            ``[B, T, H]`` padded or ``[N, H]`` packed. Values at invalid positions are never read into the result.
        old_logp: ``[B, T]`` / ``[N]`` float, log-prob of the sampled token at the rollout temperature (ambiguity 8).
        advantages: per row ``[B]`` (``[B, 1]``; ``[S]`` packed) broadcast over the row, or per token like ``mask``.
            Side membership is per token: Pos = ``A > 0``, Neg = ``A < 0``. Finite on valid tokens.
        mask: bool ``[B, T]`` / ``[N]`` (or real, read as ``!= 0``), the response tokens.
        iters: K >= 0 refinement iterations (official default 1); ``h`` is read ``2 K + 2`` times.
        lam_min, lam_max: ``0 < lam_min <= lam_max``; ``lam_min == lam_max`` returns exactly 1 on every valid
            token (plain DAPO) without reading ``hidden_old``.
        eps: clamp of the centroid masses, of the margin variances and of the normaliser (official 1e-8).
        exclude_zero_adv: leave A = 0 tokens out of the normaliser (their ``c~`` is then 1); default False = official.
        cu_seqlens: int ``[S + 1]`` for the packed layout.
        backend: ``"auto"`` (Triton on CUDA, torch on CPU), ``"triton"`` (on CPU it needs ``TRITON_INTERPRET=1``)
            or ``"torch"``.

    Returns:
        fp32 detached coefficients in the layout of ``old_logp``: 0 on invalid tokens, mean exactly 1 (up to
        rounding) over the valid tokens (over the A != 0 tokens with ``exclude_zero_adv``). Never NaN for empty
        rows, an empty side, all-zero advantages (every ``c~`` is 1) or a single token. Non-finite ``hidden_old``
        on a valid token, or inputs whose statistics overflow fp32, raise ``ValueError`` naming the input (see the
        module docstring, "Extreme inputs").
    """
    iters, lam_min, lam_max, eps = _check_params(iters, lam_min, lam_max, eps, exclude_zero_adv)
    same = lam_min == lam_max
    x = _Flat(hidden_old, old_logp, advantages, mask, cu_seqlens, need_h=not same)
    rowdot, colsum = _sweeps(backend, x.device)
    with torch.no_grad():
        if same:
            return x.out(x.valid.to(torch.float32))
        c = ref.delta_coefficients_flat(
            x.h,
            x.s,
            x.a,
            x.valid,
            iters=iters,
            lam_min=lam_min,
            lam_max=lam_max,
            eps=eps,
            exclude_zero_adv=exclude_zero_adv,
            rowdot=rowdot,
            colsum=colsum,
            check=_check,
        )
    return x.out(c)


# ----------------------------------------------------------------------------------------------------------------------
# streaming
# ----------------------------------------------------------------------------------------------------------------------
class DeltaEstimator:
    """Streaming DelTA coefficients over micro-batches (``docs/methods/delta.md``, section "How the package
    computes it", and choice 2 of its section "Choices where the paper leaves room").

    Gives the same coefficients as :func:`delta_coefficients` on the concatenation of every micro-batch (of every
    rank, when ``all_reduce`` sums across ranks), without holding more than one micro-batch of hidden states. Because
    the centroids and the gammas are global statistics, the estimate runs in explicit PHASES; in each phase you feed
    every micro-batch (any order, any layout per micro-batch) to :meth:`accumulate`, then close the phase with
    :meth:`finish_phase` (the :meth:`phases` generator closes it for you if you did not)::

        est = DeltaEstimator(iters=1, all_reduce=None)          # or torch.distributed.all_reduce
        for phase in est.phases():                              # "centroids", "gamma", "refine_1", "normaliser"
            for mb in micro_batches:
                est.accumulate(mb.hidden, mb.old_logp, mb.adv, mb.mask)
            est.finish_phase()                                  # optional inside phases()
        coef = [est.coefficients(mb.hidden, mb.old_logp, mb.adv, mb.mask) for mb in micro_batches]

    or, without a further sweep over the hidden states, keep what :meth:`accumulate` returns in the last phase
    (``"normaliser"``: the raw coefficients) and finish with ``est.normalise(raw, mb.adv, mb.mask)``.

    Phases (``K = iters``), each accumulating into one float64 statistics vector that ``all_reduce`` (an in-place
    SUM, e.g. ``torch.distributed.all_reduce``) sees once, at the end of the phase:

    - ``"centroids"``: ``[sum a+ v, sum a- v]`` (``[2, H]``), masses ``[sum a+, sum a-]`` -> ``mu0``;
    - ``"gamma"``: margin moments ``(count, sum m, sum m^2)`` per side against ``mu0`` -> ``gamma0``;
    - ``"refine_k"`` (k = 1..K): margins against ``mu_{k-1}``, weights ``sigmoid(m / gamma) |A|`` -> ``[2, H]`` sums,
      ``[2]`` masses and the margin moments (the next gamma, official order) -> ``mu_k``;
    - ``"normaliser"``: ``(sum_E c, N_E)`` with the final centroids and gamma.

    Then :meth:`coefficients` gives ``c~`` for any micro-batch of the set. ``h`` is read ``2 K + 4`` times per
    micro-batch (one-shot: ``2 K + 2``; the official code: ``K + 3`` model forwards): the refinement phases sweep it
    twice because per-token margins are not kept between phases. With ``lam_min == lam_max`` there are no phases
    and every coefficient is 1.

    ``hidden_size`` and ``device`` are only needed when a rank may see no micro-batch at all in a phase while
    ``all_reduce`` is set (it must still contribute a zero vector of the right size). Other arguments as in
    :func:`delta_coefficients`. Results are detached fp32 in the layout of each micro-batch's ``old_logp``.
    """

    def __init__(
        self,
        *,
        iters: int = 1,
        lam_min: float = 0.8,
        lam_max: float = 1.2,
        eps: float = 1e-8,
        exclude_zero_adv: bool = False,
        all_reduce: Optional[Callable[[torch.Tensor], object]] = None,
        backend: str = "auto",
        hidden_size: Optional[int] = None,
        device: Optional[torch.device] = None,
    ):
        self.iters, self.lam_min, self.lam_max, self.eps = _check_params(iters, lam_min, lam_max, eps, exclude_zero_adv)
        self.exclude_zero_adv = exclude_zero_adv
        if all_reduce is not None and not callable(all_reduce):
            raise TypeError(
                f"all_reduce must be callable (e.g. torch.distributed.all_reduce), got {type(all_reduce).__name__}"
            )
        self.all_reduce = all_reduce
        if _check_backend(backend) not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = str(backend)
        self.H = None if hidden_size is None else C.integer("hidden_size", hidden_size, low=1, high=1 << 31)
        if device is None:
            self.device = None
        else:
            if not isinstance(device, (str, torch.device)) or isinstance(device, bool):
                raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
            try:
                self.device = torch.device(device)
            except (RuntimeError, ValueError) as e:
                raise ValueError(f"device must name a torch device, got {device!r} ({e})") from None
        if self.lam_min == self.lam_max:
            self._names: list[str] = []
        else:
            self._names = ["centroids", "gamma"] + [f"refine_{k}" for k in range(1, self.iters + 1)] + ["normaliser"]
        self._idx = 0
        self._stats: Optional[torch.Tensor] = None
        self.mu: Optional[torch.Tensor] = None  # current side centroids [2, H] fp32
        self.gamma: Optional[torch.Tensor] = None  # the per-side gamma the next step uses, fp32 [2]
        self._norm: Optional[torch.Tensor] = None

    # --- the phase protocol ---------------------------------------------------------------------------------------
    @property
    def phase_names(self) -> tuple:
        return tuple(self._names)

    @property
    def phase(self) -> Optional[str]:
        """The open phase, or None once every phase is finished."""
        return self._names[self._idx] if self._idx < len(self._names) else None

    @property
    def done(self) -> bool:
        return self._idx >= len(self._names)

    def phases(self) -> Iterator[str]:
        """Yield each phase's name; a phase you did not close with :meth:`finish_phase` is closed on resumption."""
        while not self.done:
            idx = self._idx
            yield self._names[idx]
            if self._idx == idx:
                self.finish_phase()

    def _stat_size(self, name: str) -> int:
        H = self.H
        if name == "centroids":
            return 2 * H + 2
        if name == "gamma":
            return 6
        if name == "normaliser":
            return 2
        return 2 * H + 8  # refine_k

    def accumulate(self, hidden_old, old_logp, advantages, mask, *, cu_seqlens=None) -> Optional[torch.Tensor]:
        """Add one micro-batch's statistics to the open phase (arguments as in :func:`delta_coefficients`).

        Returns None, except in the ``"normaliser"`` phase: there it returns the micro-batch's raw coefficients
        ``c`` (fp32, layout of ``old_logp``), which :meth:`normalise` turns into ``c~`` once the phase is finished;
        keeping them saves the sweep of :meth:`coefficients` (one model forward fewer for a caller that recomputes
        the hidden states per phase).
        """
        name = self.phase
        if name is None:
            raise RuntimeError("DeltaEstimator: every phase is finished; call coefficients(...)")
        x = self._flat(hidden_old, old_logp, advantages, mask, cu_seqlens)
        rowdot, colsum = _sweeps(self.backend, x.device)
        with torch.no_grad():
            if name == "centroids":
                w, mass = ref.initial_weights(x.a, x.s, x.pos, x.neg)
                parts = [colsum(x.h, w, x.valid).reshape(-1), mass]
            else:
                m = ref.margins(rowdot(x.h, self.mu, x.valid), x.s, self.mu, x.pos)
                _check_margins(m, x.valid)
                mom = ref.moments(m, x.pos, x.neg)
                if name == "gamma":
                    parts = [mom]
                elif name == "normaliser":
                    c = ref.raw_coefficients(m, self.gamma, x.pos, x.neg, x.valid, self.lam_min, self.lam_max)
                    parts = [ref.normaliser_stats(c, x.valid, x.pos, x.neg, self.exclude_zero_adv)]
                    raw = x.out(torch.where(x.valid, c.to(torch.float32), 0.0))
                else:
                    w, mass = ref.refine_weights(m, self.gamma, x.a, x.s, x.pos, x.neg)
                    parts = [colsum(x.h, w, x.valid).reshape(-1), mass, mom]
            vec = torch.cat([p.to(torch.float64) for p in parts])
            if self._stats is None:
                self._stats = vec
            else:
                self._stats += vec
        return raw if name == "normaliser" else None

    def finish_phase(self) -> None:
        """Close the open phase: all-reduce its statistics (if a hook is set) and derive the next phase's state."""
        name = self.phase
        if name is None:
            raise RuntimeError("DeltaEstimator: no phase is open (every phase is finished)")
        stats = self._stats
        if stats is None:
            if self.H is None or self.device is None:
                raise RuntimeError(
                    f"DeltaEstimator: no micro-batch was accumulated in phase {name!r}; pass "
                    "hidden_size= and device= to the constructor so this rank can contribute zeros"
                )
            stats = torch.zeros(self._stat_size(name), dtype=torch.float64, device=self.device)
        if self.all_reduce is not None:
            self.all_reduce(stats)
        H = self.H
        with torch.no_grad():
            if name == "centroids":
                self.mu = ref.centroids(stats[: 2 * H].reshape(2, H), stats[2 * H :], self.eps)
                _check_centroids(stats[2 * H :], self.mu)
            elif name == "gamma":
                self.gamma = ref.gamma(stats, self.eps)
            elif name == "normaliser":
                self._norm = stats.clone()
            else:
                self.mu = ref.centroids(stats[: 2 * H].reshape(2, H), stats[2 * H : 2 * H + 2], self.eps)
                _check_centroids(stats[2 * H : 2 * H + 2], self.mu)
                self.gamma = ref.gamma(stats[2 * H + 2 :], self.eps)  # from the pre-update margins (official order)
        self._stats = None
        self._idx += 1

    def coefficients(self, hidden_old, old_logp, advantages, mask, *, cu_seqlens=None) -> torch.Tensor:
        """Final ``c~`` (fp32, layout of ``old_logp``) of one micro-batch of the estimation set."""
        if not self.done:
            raise RuntimeError(f"DeltaEstimator: phase {self.phase!r} is still open; run every phase first")
        same = self.lam_min == self.lam_max
        x = self._flat(hidden_old, old_logp, advantages, mask, cu_seqlens, need_h=not same)
        if same:
            return x.out(x.valid.to(torch.float32))
        rowdot, _ = _sweeps(self.backend, x.device)
        with torch.no_grad():
            m = ref.margins(rowdot(x.h, self.mu, x.valid), x.s, self.mu, x.pos)
            _check_margins(m, x.valid)
            c = ref.raw_coefficients(m, self.gamma, x.pos, x.neg, x.valid, self.lam_min, self.lam_max)
            out = ref.normalise(c, x.valid, x.pos, x.neg, self._norm, self.eps, self.exclude_zero_adv)
        return x.out(out)

    def normalise(self, raw: torch.Tensor, advantages, mask, *, cu_seqlens=None) -> torch.Tensor:
        """``c~`` from the raw coefficients that :meth:`accumulate` returned in the ``"normaliser"`` phase (any
        micro-batch, or several concatenated in one layout), without reading the hidden states again; equal to
        :meth:`coefficients` on the same tokens. ``advantages`` / ``mask`` as for :meth:`accumulate`."""
        if not self.done:
            raise RuntimeError(f"DeltaEstimator: phase {self.phase!r} is still open; run every phase first")
        if not isinstance(raw, torch.Tensor) or not raw.dtype.is_floating_point:
            raise TypeError("raw must be the floating-point tensor that accumulate() returned in the normaliser phase")
        if isinstance(mask, torch.Tensor):
            if raw.shape != mask.shape:
                raise ValueError(f"raw must have the shape of mask {tuple(mask.shape)}, got {tuple(raw.shape)}")
            if raw.device != mask.device:
                raise ValueError(f"raw is on {raw.device} but mask is on {mask.device}")
        x = _Flat(None, torch.zeros_like(raw), advantages, mask, cu_seqlens, need_h=False)
        if self.lam_min == self.lam_max:
            return x.out(x.valid.to(torch.float32))
        out = ref.normalise(
            raw.reshape(-1), x.valid, x.pos, x.neg, self._norm.to(raw.device), self.eps, self.exclude_zero_adv
        )
        return x.out(out)

    # --- helpers --------------------------------------------------------------------------------------------------
    def _flat(self, hidden_old, old_logp, advantages, mask, cu_seqlens, *, need_h: bool = True) -> _Flat:
        x = _Flat(hidden_old, old_logp, advantages, mask, cu_seqlens, need_h=need_h)
        if self.H is None:
            self.H = x.H
        elif x.H != self.H:
            raise ValueError(f"hidden_old has hidden size H = {x.H}, but earlier micro-batches had H = {self.H}")
        if self.device is None or (self.device.index is None and self.device.type == x.device.type):
            self.device = x.device
        elif x.device != self.device:
            raise ValueError(f"hidden_old is on {x.device}, but earlier micro-batches were on {self.device}")
        return x

    def __repr__(self) -> str:
        return (
            f"DeltaEstimator(iters={self.iters}, lam_min={self.lam_min}, lam_max={self.lam_max}, "
            f"exclude_zero_adv={self.exclude_zero_adv}, phase={self.phase!r})"
        )
