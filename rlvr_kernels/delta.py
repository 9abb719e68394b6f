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
The torch backend runs as the custom ops of :mod:`rlvr_kernels.cpu.delta_sweeps`: on CPU native C++ kernels
(``csrc/delta_sweeps.cpp``; the whole one-shot estimate, refinement loop included, is one call that keeps small sets
on one thread), the reference elsewhere and where no compiler is found.

Custom ops (``torch.library``, namespace ``rlvr_kernels``): ``delta_coefficients`` and, for :class:`DeltaEstimator`,
``delta_phase_stats``, ``delta_centroids``, ``delta_estimator_coefficients`` and ``delta_normalise``. The Python
wrappers check numbers, shapes, dtypes and devices (at trace time under ``torch.compile``); the value checks run
inside the ops, so ``torch.compile(fullgraph=True)`` of a caller has no graph break and raises the same errors.

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
from rlvr_kernels.cpu import delta_sweeps as cpu
from rlvr_kernels.credit import _check_backend, _Rows
from rlvr_kernels.layout import check_cu_seqlens
from rlvr_kernels.reference import delta as ref

__all__ = ["delta_coefficients", "DeltaEstimator"]

_HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------------------------------------------------
# argument checking: numbers and the structure of the tensors (shapes, dtypes, devices) in the Python wrappers, at
# trace time under torch.compile (no host read); the values (finiteness, cu_seqlens, float masks, statistics that
# overflow fp32) inside the custom ops, which are opaque to torch.compile, so their host reads cost no graph break
# ----------------------------------------------------------------------------------------------------------------------
MAX_ITERS = 1000


def _check_params(iters, lam_min, lam_max, eps, exclude_zero_adv):
    iters = C.integer("iters", iters, low=0, high=MAX_ITERS)
    lam_min = C.real("lam_min", lam_min, low=C.F32_TINY)
    lam_max = C.real("lam_max", lam_max, low=lam_min)
    eps = C.real("eps", eps, low=C.F32_TINY)
    C.flag("exclude_zero_adv", exclude_zero_adv)
    return iters, lam_min, lam_max, eps


def _integer_dtype(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex())


class _Layout:
    """The structure of one call's layout, read without touching values: ``shape``, ``device``, ``packed`` and the
    row count ``B`` (``[B, T]`` padded, ``cu_seqlens [B + 1]`` packed). Anything malformed is handed to
    :class:`rlvr_kernels.credit._Rows`, which raises its error (so the messages live in one place)."""

    def __init__(self, mask, cu_seqlens):
        ok = isinstance(mask, torch.Tensor) and not mask.is_complex() and not mask.is_nested
        if ok and cu_seqlens is None:
            ok = mask.dim() == 2
        elif ok:
            cu = cu_seqlens
            ok = mask.dim() == 1 and isinstance(cu, torch.Tensor) and _integer_dtype(cu) and cu.dim() == 1
            ok = ok and cu.numel() >= 1 and cu.device == mask.device
        if not ok:
            _Rows(mask, cu_seqlens)  # raises the clear error
            raise AssertionError("unreachable: _Rows accepted a layout that _Layout refused")  # pragma: no cover
        if cu_seqlens is not None and not torch.compiler.is_compiling():
            # eager: a malformed cu_seqlens is named before the shapes it implies (compiled: inside the op)
            check_cu_seqlens(cu_seqlens, mask.shape[0])
        self.device = mask.device
        self.shape = tuple(mask.shape)
        self.packed = cu_seqlens is not None
        self.B = cu_seqlens.shape[0] - 1 if self.packed else self.shape[0]

    # the structural checks of _Rows, which read only shape, device and B
    check_token_tensor = _Rows.check_token_tensor
    check_advantages = _Rows.check_advantages


def _check_hidden(hidden_old, lead: tuple, packed: bool, device: torch.device) -> int:
    """``hidden_old`` is a float ``[*lead, H]`` tensor with ``H >= 1`` on ``device``; returns ``H``."""
    if not isinstance(hidden_old, torch.Tensor):
        raise TypeError(f"hidden_old must be a torch.Tensor, got {type(hidden_old).__name__}")
    if hidden_old.dtype not in _HIDDEN_DTYPES:
        raise TypeError(
            f"hidden_old must be a floating-point tensor (fp32, bf16, fp16 or fp64), got {hidden_old.dtype}"
        )
    if hidden_old.dim() != len(lead) + 1 or tuple(hidden_old.shape[:-1]) != lead:
        want = "[B, T, H]" if not packed else "[N, H]"
        raise ValueError(
            f"hidden_old must be {want} with leading shape {lead} (the shape of old_logp / mask), "
            f"got {tuple(hidden_old.shape)}"
        )
    if hidden_old.shape[-1] < 1:
        raise ValueError("hidden_old must have a hidden size H >= 1, got H = 0")
    if hidden_old.device != device:
        raise ValueError(f"hidden_old is on {hidden_old.device} but mask is on {device}")
    return int(hidden_old.shape[-1])


def _check_structure(
    hidden_old, old_logp, advantages, mask, cu_seqlens, *, with_hidden: bool = True
) -> tuple[_Layout, Optional[int]]:
    """Trace-time checks of one call's tensors (the order and messages of :class:`_Flat`); returns the layout and
    ``H`` (None without ``with_hidden``: :meth:`DeltaEstimator.normalise`, which reads no hidden states)."""
    layout = _Layout(mask, cu_seqlens)
    layout.check_token_tensor("old_logp", old_logp)
    layout.check_advantages(advantages)
    H = _check_hidden(hidden_old, layout.shape, layout.packed, layout.device) if with_hidden else None
    return layout, H


class _Flat:
    """One validated call's inputs as flat per-token arrays: ``h [n, H]``, fp32 ``s``, ``a`` and bool ``valid [n]``.

    Runs every check, the value checks included (host reads): used inside the custom ops."""

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
        self.H = _check_hidden(hidden_old, rows.shape, rows.packed, rows.device)
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
        self.s, self.a = cpu.token_scalars(old_logp.detach().reshape(-1), a.detach(), valid)
        self.pos, self.neg = ref.sides(self.a, valid)

    def out(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.reshape(self.rows.shape)


def _use_torch(backend: str, device: torch.device) -> bool:
    return resolve_backend(_check_backend(backend), device) == "torch"


def _sweeps(backend: str, device: torch.device):
    """The two sweeps over ``h`` for ``backend`` on ``device``: ``(rowdot, colsum)``. The torch backend's are custom
    ops (:mod:`rlvr_kernels.cpu.delta_sweeps`): native kernels on CPU, the plain-torch reference elsewhere."""
    if _use_torch(backend, device):
        return cpu.rowdot, cpu.colsum
    from rlvr_kernels.kernels import delta as kern

    return kern.rowdot3, kern.colsum2


def _raise_status(code: int) -> None:
    """The ``ValueError`` of a failed statistics check (codes of :mod:`rlvr_kernels.cpu.delta_sweeps`); 0 passes."""
    if code == cpu.OK:
        return
    if cpu.STATUS[code] == "mass_overflow":
        raise ValueError(
            "advantages are too large: the sum of |A| over a side overflows float32 (DelTA's centroid "
            "masses are fp32; the coefficients do not change when every advantage is scaled by the same "
            "positive factor, so scale them down)"
        )
    if cpu.STATUS[code] == "centroids_non_finite":
        raise ValueError(
            "hidden_old has non-finite values at valid positions, or values too large for DelTA's fp32 "
            "statistics (with these advantages): the side centroids are not finite"
        )
    raise ValueError(
        "hidden_old is too large: DelTA's squared distances to the side centroids overflow float32 "
        "(|h|^2 H must stay well below 3.4e38; a model's final hidden states are far smaller)"
    )


def _check_centroids(mass: torch.Tensor, mu: torch.Tensor) -> None:
    """The side masses and centroids are finite fp32 (one host sync; the diagnosis only on failure)."""
    _raise_status(cpu.centroid_status(mass, mu))


def _check_margins(m: torch.Tensor, valid: torch.Tensor) -> None:
    _raise_status(cpu.margin_status(m, valid))


def _check(kind: str, x, valid: torch.Tensor) -> None:
    if kind == "centroids":
        _check_centroids(*x)
    else:
        _check_margins(x, valid)


def _detach(*xs):
    return tuple(None if x is None else x.detach() for x in xs)


# ----------------------------------------------------------------------------------------------------------------------
# one-shot
# ----------------------------------------------------------------------------------------------------------------------
def _delta_coefficients(
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
    """The body of ``rlvr_kernels::delta_coefficients``: every check (values included), then the estimate."""
    iters, lam_min, lam_max, eps = _check_params(iters, lam_min, lam_max, eps, exclude_zero_adv)
    same = lam_min == lam_max
    x = _Flat(hidden_old, old_logp, advantages, mask, cu_seqlens, need_h=not same)
    use_torch = _use_torch(backend, x.device)
    if same:
        return x.out(x.valid.to(torch.float32))
    params = dict(iters=iters, lam_min=lam_min, lam_max=lam_max, eps=eps, exclude_zero_adv=exclude_zero_adv)
    with torch.no_grad():
        if use_torch:  # one op for the whole estimate: the native kernel on CPU, the reference elsewhere
            c, status = cpu.flat_coefficients(x.h, x.s, x.a, x.valid, **params)
            _raise_status(status)
        else:
            rowdot, colsum = _sweeps(backend, x.device)
            c = ref.delta_coefficients_flat(
                x.h, x.s, x.a, x.valid, rowdot=rowdot, colsum=colsum, check=_check, **params
            )
    return x.out(c)


@torch.library.custom_op("rlvr_kernels::delta_coefficients", mutates_args=())
def _delta_op(
    hidden_old: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    iters: int,
    lam_min: float,
    lam_max: float,
    eps: float,
    exclude_zero_adv: bool,
    backend: str,
) -> torch.Tensor:
    return _delta_coefficients(
        hidden_old,
        old_logp,
        advantages,
        mask,
        iters=iters,
        lam_min=lam_min,
        lam_max=lam_max,
        eps=eps,
        exclude_zero_adv=exclude_zero_adv,
        cu_seqlens=cu_seqlens,
        backend=backend,
    )


@_delta_op.register_fake
def _(hidden_old, old_logp, advantages, mask, cu_seqlens, iters, lam_min, lam_max, eps, exclude_zero_adv, backend):
    return torch.empty(mask.shape, dtype=torch.float32, device=mask.device)


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

    Registered as the PyTorch custom op ``torch.ops.rlvr_kernels.delta_coefficients`` (fake implementation for
    tracing): ``torch.compile(fullgraph=True)`` traces a caller without a graph break. The numbers and the shapes,
    dtypes and devices are checked here, at trace time; the value checks (non-finite inputs at valid positions,
    ``cu_seqlens``, statistics that overflow fp32) run inside the op, in compiled code as in eager. On CPU the torch
    backend's estimate is one native kernel (``csrc/delta_sweeps.cpp``; the plain-torch reference where it cannot be
    built). The result is not differentiable (the inputs enter detached).
    """
    iters, lam_min, lam_max, eps = _check_params(iters, lam_min, lam_max, eps, exclude_zero_adv)
    _check_structure(hidden_old, old_logp, advantages, mask, cu_seqlens)
    _check_backend(backend)
    hidden_old, old_logp, advantages, mask = _detach(hidden_old, old_logp, advantages, mask)
    return torch.ops.rlvr_kernels.delta_coefficients(
        hidden_old, old_logp, advantages, mask, cu_seqlens, iters, lam_min, lam_max, eps, exclude_zero_adv, backend
    )


# ----------------------------------------------------------------------------------------------------------------------
# streaming: the tensor work of each DeltaEstimator method is one custom op (the value checks inside), so a compiled
# training step that calls accumulate / finish_phase / coefficients / normalise has no graph break
# ----------------------------------------------------------------------------------------------------------------------
_PHASE_KINDS = ("centroids", "gamma", "refine", "normaliser")


def _phase_kind(name: str) -> str:
    return "refine" if name.startswith("refine_") else name


def _stat_size(kind: str, H: int) -> int:
    """Length of a phase's float64 statistics vector (see :class:`DeltaEstimator`)."""
    return {"centroids": 2 * H + 2, "gamma": 6, "normaliser": 2, "refine": 2 * H + 8}[kind]


def _margins(x: _Flat, mu: torch.Tensor, backend: str) -> torch.Tensor:
    """Margins of a micro-batch's tokens against the centroids ``mu [2, H]`` (checked finite on valid tokens)."""
    rowdot, _ = _sweeps(backend, x.device)
    m = ref.margins(rowdot(x.h, mu, x.valid), x.s, mu, x.pos)
    _check_margins(m, x.valid)
    return m


@torch.library.custom_op("rlvr_kernels::delta_phase_stats", mutates_args=())
def _phase_op(
    hidden_old: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    mu: Optional[torch.Tensor],
    gamma: Optional[torch.Tensor],
    kind: str,
    lam_min: float,
    lam_max: float,
    exclude_zero_adv: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch's statistics of a phase ``kind`` (float64, :func:`_stat_size` long) and, in the normaliser
    phase, its raw coefficients (fp32, layout of ``mask``; ``[0]`` in the other phases)."""
    x = _Flat(hidden_old, old_logp, advantages, mask, cu_seqlens)
    raw = torch.zeros(0, dtype=torch.float32, device=x.device)
    if kind == "centroids":
        _, colsum = _sweeps(backend, x.device)
        w, mass = ref.initial_weights(x.a, x.s, x.pos, x.neg)
        parts = [colsum(x.h, w, x.valid).reshape(-1), mass]
    else:
        m = _margins(x, mu, backend)
        mom = ref.moments(m, x.pos, x.neg)
        if kind == "gamma":
            parts = [mom]
        elif kind == "normaliser":
            c = ref.raw_coefficients(m, gamma, x.pos, x.neg, x.valid, lam_min, lam_max)
            parts = [ref.normaliser_stats(c, x.valid, x.pos, x.neg, exclude_zero_adv)]
            raw = x.out(torch.where(x.valid, c.to(torch.float32), 0.0))
        else:
            _, colsum = _sweeps(backend, x.device)
            w, mass = ref.refine_weights(m, gamma, x.a, x.s, x.pos, x.neg)
            parts = [colsum(x.h, w, x.valid).reshape(-1), mass, mom]
    return torch.cat([p.to(torch.float64) for p in parts]), raw


@_phase_op.register_fake
def _(hidden_old, old_logp, advantages, mask, cu_seqlens, mu, gamma, kind, lam_min, lam_max, exclude_zero_adv, backend):
    stats = hidden_old.new_empty(_stat_size(kind, hidden_old.shape[-1]), dtype=torch.float64)
    raw_shape = mask.shape if kind == "normaliser" else (0,)
    return stats, torch.empty(raw_shape, dtype=torch.float32, device=mask.device)


@torch.library.custom_op("rlvr_kernels::delta_centroids", mutates_args=())
def _centroids_op(sums: torch.Tensor, mass: torch.Tensor, eps: float) -> torch.Tensor:
    """Side centroids ``[2, H]`` fp32 from a phase's summed statistics (``sums [2, H]``, ``mass [2]``), checked."""
    mu = ref.centroids(sums, mass, eps)
    _check_centroids(mass, mu)
    return mu


@_centroids_op.register_fake
def _(sums, mass, eps):
    return torch.empty(sums.shape, dtype=torch.float32, device=sums.device)


@torch.library.custom_op("rlvr_kernels::delta_estimator_coefficients", mutates_args=())
def _est_coef_op(
    hidden_old: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    mu: Optional[torch.Tensor],
    gamma: Optional[torch.Tensor],
    norm: Optional[torch.Tensor],
    lam_min: float,
    lam_max: float,
    eps: float,
    exclude_zero_adv: bool,
    backend: str,
) -> torch.Tensor:
    """Final ``c~`` of one micro-batch from the finished estimator's state (``mu`` None: ``lam_min == lam_max``, every
    valid token gets 1)."""
    x = _Flat(hidden_old, old_logp, advantages, mask, cu_seqlens, need_h=mu is not None)
    if mu is None:
        return x.out(x.valid.to(torch.float32))
    m = _margins(x, mu, backend)
    c = ref.raw_coefficients(m, gamma, x.pos, x.neg, x.valid, lam_min, lam_max)
    return x.out(ref.normalise(c, x.valid, x.pos, x.neg, norm, eps, exclude_zero_adv))


@_est_coef_op.register_fake
def _(hidden_old, old_logp, advantages, mask, cu_seqlens, mu, gamma, norm, lam_min, lam_max, eps, exclude, backend):
    return torch.empty(mask.shape, dtype=torch.float32, device=mask.device)


@torch.library.custom_op("rlvr_kernels::delta_normalise", mutates_args=())
def _normalise_op(
    raw: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    norm: Optional[torch.Tensor],
    eps: float,
    exclude_zero_adv: bool,
) -> torch.Tensor:
    """``c~`` from raw coefficients and the normaliser statistics (``norm`` None: every valid token gets 1)."""
    x = _Flat(None, torch.zeros_like(raw), advantages, mask, cu_seqlens, need_h=False)
    if norm is None:
        return x.out(x.valid.to(torch.float32))
    out = ref.normalise(raw.reshape(-1), x.valid, x.pos, x.neg, norm.to(raw.device), eps, exclude_zero_adv)
    return x.out(out)


@_normalise_op.register_fake
def _(raw, advantages, mask, cu_seqlens, norm, eps, exclude_zero_adv):
    return torch.empty(mask.shape, dtype=torch.float32, device=mask.device)


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

    def accumulate(self, hidden_old, old_logp, advantages, mask, *, cu_seqlens=None) -> Optional[torch.Tensor]:
        """Add one micro-batch's statistics to the open phase (arguments as in :func:`delta_coefficients`).

        Returns None, except in the ``"normaliser"`` phase: there it returns the micro-batch's raw coefficients
        ``c`` (fp32, layout of ``old_logp``), which :meth:`normalise` turns into ``c~`` once the phase is finished;
        keeping them saves the sweep of :meth:`coefficients` (one model forward fewer for a caller that recomputes
        the hidden states per phase). The tensor work is the custom op ``rlvr_kernels::delta_phase_stats``.
        """
        name = self.phase
        if name is None:
            raise RuntimeError("DeltaEstimator: every phase is finished; call coefficients(...)")
        self._check_micro_batch(hidden_old, old_logp, advantages, mask, cu_seqlens)
        kind = _phase_kind(name)
        stats, raw = torch.ops.rlvr_kernels.delta_phase_stats(
            *_detach(hidden_old, old_logp, advantages, mask),
            cu_seqlens,
            self.mu,
            self.gamma,
            kind,
            self.lam_min,
            self.lam_max,
            self.exclude_zero_adv,
            self.backend,
        )
        self._stats = stats if self._stats is None else self._stats + stats
        return raw if kind == "normaliser" else None

    def finish_phase(self) -> None:
        """Close the open phase: all-reduce its statistics (if a hook is set) and derive the next phase's state."""
        name = self.phase
        if name is None:
            raise RuntimeError("DeltaEstimator: no phase is open (every phase is finished)")
        kind = _phase_kind(name)
        stats = self._stats
        if stats is None:
            if self.H is None or self.device is None:
                raise RuntimeError(
                    f"DeltaEstimator: no micro-batch was accumulated in phase {name!r}; pass "
                    "hidden_size= and device= to the constructor so this rank can contribute zeros"
                )
            stats = torch.zeros(_stat_size(kind, self.H), dtype=torch.float64, device=self.device)
        if self.all_reduce is not None:
            self.all_reduce(stats)
        H = self.H
        centroids = torch.ops.rlvr_kernels.delta_centroids  # checked inside the op: no graph break when compiled
        if kind == "centroids":
            self.mu = centroids(stats[: 2 * H].reshape(2, H), stats[2 * H :], self.eps)
        elif kind == "gamma":
            self.gamma = ref.gamma(stats, self.eps)
        elif kind == "normaliser":
            self._norm = stats.clone()
        else:
            self.mu = centroids(stats[: 2 * H].reshape(2, H), stats[2 * H : 2 * H + 2], self.eps)
            self.gamma = ref.gamma(stats[2 * H + 2 :], self.eps)  # from the pre-update margins (official order)
        self._stats = None
        self._idx += 1

    def coefficients(self, hidden_old, old_logp, advantages, mask, *, cu_seqlens=None) -> torch.Tensor:
        """Final ``c~`` (fp32, layout of ``old_logp``) of one micro-batch of the estimation set (the custom op
        ``rlvr_kernels::delta_estimator_coefficients``)."""
        if not self.done:
            raise RuntimeError(f"DeltaEstimator: phase {self.phase!r} is still open; run every phase first")
        self._check_micro_batch(hidden_old, old_logp, advantages, mask, cu_seqlens)
        return torch.ops.rlvr_kernels.delta_estimator_coefficients(
            *_detach(hidden_old, old_logp, advantages, mask),
            cu_seqlens,
            self.mu,  # None with lam_min == lam_max (no phases): every valid token gets 1
            self.gamma,
            self._norm,
            self.lam_min,
            self.lam_max,
            self.eps,
            self.exclude_zero_adv,
            self.backend,
        )

    def normalise(self, raw: torch.Tensor, advantages, mask, *, cu_seqlens=None) -> torch.Tensor:
        """``c~`` from the raw coefficients that :meth:`accumulate` returned in the ``"normaliser"`` phase (any
        micro-batch, or several concatenated in one layout), without reading the hidden states again; equal to
        :meth:`coefficients` on the same tokens. ``advantages`` / ``mask`` as for :meth:`accumulate`. The tensor work
        is the custom op ``rlvr_kernels::delta_normalise``."""
        if not self.done:
            raise RuntimeError(f"DeltaEstimator: phase {self.phase!r} is still open; run every phase first")
        if not isinstance(raw, torch.Tensor) or not raw.dtype.is_floating_point:
            raise TypeError("raw must be the floating-point tensor that accumulate() returned in the normaliser phase")
        if isinstance(mask, torch.Tensor):
            if raw.shape != mask.shape:
                raise ValueError(f"raw must have the shape of mask {tuple(mask.shape)}, got {tuple(raw.shape)}")
            if raw.device != mask.device:
                raise ValueError(f"raw is on {raw.device} but mask is on {mask.device}")
        _check_structure(None, raw, advantages, mask, cu_seqlens, with_hidden=False)
        raw, advantages, mask = _detach(raw, advantages, mask)
        norm = None if self.lam_min == self.lam_max else self._norm
        return torch.ops.rlvr_kernels.delta_normalise(
            raw, advantages, mask, cu_seqlens, norm, self.eps, self.exclude_zero_adv
        )

    # --- helpers --------------------------------------------------------------------------------------------------
    def _check_micro_batch(self, hidden_old, old_logp, advantages, mask, cu_seqlens) -> None:
        """Trace-time checks of a micro-batch (shapes, dtypes, devices) and of its agreement with earlier ones."""
        layout, H = _check_structure(hidden_old, old_logp, advantages, mask, cu_seqlens)
        if self.H is None:
            self.H = H
        elif H != self.H:
            raise ValueError(f"hidden_old has hidden size H = {H}, but earlier micro-batches had H = {self.H}")
        device = layout.device
        if self.device is None or (self.device.index is None and self.device.type == device.type):
            self.device = device
        elif device != self.device:
            raise ValueError(f"hidden_old is on {device}, but earlier micro-batches were on {self.device}")

    def __repr__(self) -> str:
        return (
            f"DeltaEstimator(iters={self.iters}, lam_min={self.lam_min}, lam_max={self.lam_max}, "
            f"exclude_zero_adv={self.exclude_zero_adv}, phase={self.phase!r})"
        )
