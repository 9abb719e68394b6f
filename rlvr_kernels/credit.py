"""Token-level credit-allocation ops for RLVR: trajectory percentiles, TP-Schedule masks, forking tokens,
entropy-shaped advantages and the D^3S token criterion.

Layouts (every op accepts both and gives identical results):

- padded: ``mask [B, T]`` (bool, or any real dtype read as ``mask != 0``; right padding) and per-token tensors
  ``[B, T]``;
- packed: ``mask [total]`` plus ``cu_seqlens`` (int ``[B + 1]``, see :func:`rlvr_kernels.check_cu_seqlens`) and
  per-token tensors ``[total]``.

Conventions: positions ``t`` are 0-based within the row; ``L`` = last valid index + 1 (the length, equal to the valid
count ``n`` for right-padded rows); statistics in fp32, per-row integers (cut-offs, budgets) in float64 on the host;
outputs are fp32 or bool, in the layout of the input. Invalid (masked) positions are 0 / False in every output, and
they take no part in any result: the inputs may hold anything there (NaN, +-inf, values beyond the fp32 range, the
per-row value of a row without valid tokens), which is what attention kernels leave in padded rows.

Numbers (``q``, ``rho``, ``scale``, ``alpha``, ``kappa``, ...) may be Python or NumPy scalars, 0-d / one-element NumPy
arrays or tensors; a non-number is a ``TypeError``, NaN, inf or a value out of range a ``ValueError`` naming the
argument. Float inputs must be finite at valid positions (``ValueError`` otherwise); the ops that compute in fp32
(forking tokens, entropy-shaped advantages, D^3S) also refuse float64 values beyond the fp32 range there, which the
fp32 cast would turn into inf (trajectory percentiles compare the values in their own dtype).
``backend="auto" | "triton" | "torch"`` as in :mod:`rlvr_kernels._backend`; ``block_size`` (Triton only, a power of
two in [16, 16384]) is the number of tokens a program handles per loop step (tests use small ones).

The Triton kernels run one program per row, looping over blocks of the row (rows of 64k+ tokens work) and over rows
(no grid dimension above 65535); see :mod:`rlvr_kernels.kernels.credit` and :mod:`rlvr_kernels.kernels.select`.
"""

from __future__ import annotations

from typing import Optional

import torch

from rlvr_kernels import _checks as C
from rlvr_kernels._backend import resolve_backend
from rlvr_kernels.cpu import token_rows
from rlvr_kernels.layout import check_cu_seqlens, packed_to_padded, padded_to_packed
from rlvr_kernels.reference import credit as ref

__all__ = [
    "trajectory_percentile",
    "tp_schedule_mask",
    "forking_token_mask",
    "entropy_shaped_advantages",
    "d3s_token_mask",
    "D3S_SCOPES",
]

D3S_SCOPES = ("batch", "sequence")


# ----------------------------------------------------------------------------------------------------------------------
# argument checking and the two layouts
# ----------------------------------------------------------------------------------------------------------------------
MAX_BLOCK_SIZE = 1 << 14


def _check_block(block_size) -> Optional[int]:
    """None, or a power of two in [16, 16384] (tokens per program and loop step; larger tiles would only spill)."""
    if block_size is None:
        return None
    b = C.integer("block_size", block_size)
    if b < 16 or b > MAX_BLOCK_SIZE or b & (b - 1):
        raise ValueError(f"block_size must be a power of two in [16, {MAX_BLOCK_SIZE}], got {b}")
    return b


def _check_backend(backend) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str ('auto', 'triton' or 'torch'), got {type(backend).__name__}")
    return backend


class _Rows:
    """The validated layout of one call: padded ``[B, T]`` or packed ``[total]`` + ``cu_seqlens``."""

    def __init__(self, mask, cu_seqlens):
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.is_complex():
            raise TypeError(f"mask must be a bool (or real) tensor, got {mask.dtype}")
        self.device = mask.device
        self.shape = tuple(mask.shape)
        if cu_seqlens is None:
            if mask.dim() != 2:
                raise ValueError(
                    f"mask must be [B, T] in the padded layout, got shape {self.shape} "
                    "(pass cu_seqlens for the packed 1-D layout)"
                )
            self.packed = False
            self.cu = None
            self.B, self.T = self.shape
        else:
            if mask.dim() != 1:
                raise ValueError(f"mask must be 1-D [total] when cu_seqlens is given, got shape {self.shape}")
            if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.device != mask.device:
                raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but mask is on {mask.device}")
            self.cu = check_cu_seqlens(cu_seqlens, mask.shape[0])
            self.packed = True
            self.B = self.cu.numel() - 1
            self.T = None
        if mask.dtype.is_floating_point and mask.numel() and bool(torch.isnan(mask).any()):
            raise ValueError("mask has NaN values: a float mask is read as mask != 0, which NaN does not answer")
        self.valid = mask if mask.dtype == torch.bool else mask != 0

    # --- checks of the other tensors ------------------------------------------------------------------------------
    def check_token_tensor(self, name: str, x, *, integer_ok: bool = False) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not (x.dtype.is_floating_point or (integer_ok and not x.is_complex() and x.dtype != torch.bool)):
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if tuple(x.shape) != self.shape:
            raise ValueError(f"{name} must have the shape of mask {self.shape}, got {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device} but mask is on {self.device}")
        return x

    def check_advantages(self, adv) -> tuple[torch.Tensor, bool]:
        """Returns (advantages, per_token). Per row: ``[B]`` or ``[B, 1]``; per token: the shape of mask. In the packed
        layout a ``[N]`` tensor with ``N == B`` (as many tokens as rows) reads as per token: pass ``[B, 1]`` there."""
        if not isinstance(adv, torch.Tensor):
            raise TypeError(f"advantages must be a torch.Tensor, got {type(adv).__name__}")
        if not adv.dtype.is_floating_point:
            raise TypeError(f"advantages must be a floating-point tensor, got {adv.dtype}")
        if adv.device != self.device:
            raise ValueError(f"advantages is on {adv.device} but mask is on {self.device}")
        shape = tuple(adv.shape)
        if shape == self.shape:
            return adv, True
        if shape in ((self.B,), (self.B, 1)):
            return adv.reshape(self.B), False
        raise ValueError(
            f"advantages must be per row [B]={(self.B,)} (or [B, 1]) or per token {self.shape}, got {shape}"
        )

    def check_finite(self, name: str, x: torch.Tensor, per_token: bool = True, *, fp32: bool = False) -> None:
        """``x`` finite at the valid positions (per row: at the rows with a valid token); with ``fp32``, also within
        the fp32 range there (a float64 value beyond it would be inf in an op that computes in fp32)."""
        if x.numel() == 0 or not x.dtype.is_floating_point:
            return
        sel = self.valid if per_token else self.counts() > 0
        if bool((~torch.isfinite(x) & sel).any()):
            raise ValueError(f"{name} has non-finite values at valid positions")
        if fp32 and x.dtype == torch.float64 and bool((~torch.isfinite(x.to(torch.float32)) & sel).any()):
            raise ValueError(
                f"{name} has values beyond the float32 range (|x| > {C.F32_MAX:.6g}) at valid positions; "
                "this op computes in fp32, where they would be inf"
            )

    # --- per-row quantities ------------------------------------------------------------------------------------
    def _row_ids(self) -> torch.Tensor:
        spans = self.cu[1:] - self.cu[:-1]
        return torch.repeat_interleave(torch.arange(self.B, device=self.device), spans)

    def lengths(self) -> torch.Tensor:
        """L = last valid index + 1 per row (int64 [B])."""
        if not self.packed:
            return ref.row_lengths(self.valid)
        total = self.shape[0]
        row = self._row_ids()
        pos = torch.arange(1, total + 1, device=self.device) - self.cu[:-1][row]
        end = torch.where(self.valid, pos, torch.zeros_like(pos))
        return torch.zeros(self.B, dtype=torch.int64, device=self.device).scatter_reduce_(
            0, row, end, reduce="amax", include_self=True
        )

    def counts(self) -> torch.Tensor:
        """n = number of valid tokens per row (int64 [B])."""
        if not self.packed:
            return ref.valid_counts(self.valid)
        cs = torch.zeros(self.shape[0] + 1, dtype=torch.int64, device=self.device)
        cs[1:] = torch.cumsum(self.valid.to(torch.int64), 0)
        return cs[self.cu[1:]] - cs[self.cu[:-1]]

    # --- the flat "rows" view of the Triton kernels ---------------------------------------------------------------
    def valid8(self) -> torch.Tensor:
        return self.valid.contiguous().reshape(-1).view(torch.int8)

    def starts_spans(self):
        if self.packed:
            return self.cu[:-1].contiguous(), (self.cu[1:] - self.cu[:-1]).contiguous()
        starts = torch.arange(self.B, device=self.device, dtype=torch.int64) * self.T
        return starts, torch.full((self.B,), self.T, dtype=torch.int64, device=self.device)

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous().reshape(-1)

    def unflat(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(self.shape)

    # --- the padded view of the torch reference --------------------------------------------------------------------
    def padded_valid(self) -> torch.Tensor:
        if not self.packed:
            return self.valid
        return packed_to_padded(self.valid, self.cu, fill=False)

    def to_padded(self, x: torch.Tensor, per_token: bool = True) -> torch.Tensor:
        if not self.packed or not per_token:
            return x
        return packed_to_padded(x, self.cu, fill=0)

    def from_padded(self, y: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return y
        return padded_to_packed(y, self.cu)


def _backend(backend: str, rows: _Rows) -> str:
    return resolve_backend(_check_backend(backend), rows.device)


# ----------------------------------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------------------------------
def _trajectory_percentile(
    mask: torch.Tensor,
    *,
    values: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
    block_size: Optional[int] = None,
) -> torch.Tensor:
    """Trajectory percentile of every token in its own row (TP-Schedule; ``docs/methods/tp-schedule.md``, section
    "Trajectory percentile").

    Without ``values``: the relative position ``t / L`` (fp32) of token ``t``, with ``L`` the row length (last valid
    index + 1); in ``[0, (L - 1) / L]``. This is TP-Schedule's criterion: a token is targeted at cut-off q iff
    its position is ``>= b = min(floor(L q), L - 1)`` (use :func:`tp_schedule_mask` for the exact integer cut-off).

    With ``values`` (float or integer, shape of ``mask``, no NaN on valid tokens; +-inf allowed): the rank
    percentile ``rank / n`` where ``rank`` is the 0-based ASCENDING rank of the token's value among the ``n`` valid
    tokens of its row, ties broken by lower index (the earlier token ranks lower); in ``[0, (n - 1) / n]``. Values
    are compared in their own dtype (float64 beyond the fp32 range and int64 beyond 2**24 keep their order). This
    path is a segmented stable sort in torch (O(L log L)) for both backends; a per-row Triton kernel would be O(L^2).

    Shapes: ``mask [B, T]`` (padded) or ``[total]`` with ``cu_seqlens``; returns fp32 of the same shape, 0 on invalid
    tokens. A row without valid tokens is all 0; a one-token row gives 0.
    """
    rows = _Rows(mask, cu_seqlens)
    block = _check_block(block_size)
    if values is not None:
        rows.check_token_tensor("values", values, integer_ok=True)
        if values.dtype.is_floating_point and bool((torch.isnan(values) & rows.valid).any()):
            raise ValueError("values has NaN at valid positions")
        _backend(backend, rows)  # validate the name even though both backends sort in torch
        v = (
            values
            if values.dtype in (torch.float32, torch.float64) or not values.dtype.is_floating_point
            else values.float()
        )
        out = token_rows.rank_percentile(rows.to_padded(v), rows.padded_valid())  # native on CPU once built
        return rows.from_padded(out)
    if _backend(backend, rows) == "torch":
        return rows.from_padded(ref.position_percentile(rows.padded_valid()))
    from rlvr_kernels.kernels import credit as kern

    starts, spans = rows.starts_spans()
    out = kern.position_percentile(rows.valid8(), rows.lengths(), starts, spans, block=block)
    return rows.unflat(out)


def _tp_schedule_mask(
    mask: torch.Tensor,
    q,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    reverse: bool = False,
    backend: str = "auto",
    block_size: Optional[int] = None,
) -> torch.Tensor:
    """TP-Schedule's targeted tokens: ``t >= b``, ``b = min(floor(L q), L - 1)`` (``docs/methods/tp-schedule.md``,
    section "The cut-off mask").

    ``q`` in ``[0, 1]`` is the schedule value ``TemporalSchedule(...)(k)`` of the current step (python float or a
    one-element tensor). The cut-off is computed per row in float64 in torch and passed to the kernel as an integer,
    so (L, q) -> b: (10, 0.55) -> 5, (10, 0.99) -> 9, (1, 0.99) -> 0, (1000, 0.99) -> 990, (7, 0.5) -> 3, (10, 0) -> 0.
    ``L`` is the row length (last valid index + 1); at least the last token of every non-empty row stays targeted;
    q = 0 targets the whole row (plain GRPO). The result is a binary loss mask: aggregate the loss over the tokens it
    keeps (``sum(m l) / sum(m)``, token-mean over active tokens, as in the official code).

    ``reverse=True`` (EXPERIMENTAL, early-first, not in the paper's experiments; ``docs/methods/tp-schedule.md``,
    section "Choices where the paper leaves room", item 6) keeps
    ``t < max(ceil(L (1 - q)), 1)`` instead, so at least the first token stays targeted.

    Returns a bool tensor of the shape of ``mask`` (False on invalid tokens and empty rows).
    """
    rows = _Rows(mask, cu_seqlens)
    q = C.unit("q", q)
    C.flag("reverse", reverse)
    block = _check_block(block_size)
    if _backend(backend, rows) == "torch":
        return rows.from_padded(ref.tp_schedule_mask(rows.padded_valid(), q, reverse=reverse))
    from rlvr_kernels.kernels import credit as kern

    lo, hi = ref.tp_bounds(rows.lengths(), q, reverse=reverse)
    starts, spans = rows.starts_spans()
    return rows.unflat(kern.range_mask(rows.valid8(), lo, hi, starts, spans, block=block))


def _forking_token_mask(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    rho,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
    block_size: Optional[int] = None,
) -> torch.Tensor:
    """Forking (high-entropy) tokens per row: the top ``ceil(n rho)`` valid tokens by entropy, ties to the lower index.

    TP-Schedule's "Forking Tok. -> Schedule" variant (``compute_entropy_topk_response_mask``), where
    ``rho = 1 - q(k)`` grows from 0.01 to 1; with a fixed ``rho = 0.2`` it is a per-row version of the 80/20
    forking-token rule (``docs/methods/forking-tokens.md``; the deterministic tie rule is its section "Choices where
    the paper leaves room"). ``n`` is the row's number of valid tokens and the budget ``ceil(n rho)`` is computed in
    float64, exactly as in the official Python code, binary floating point included: ``rho = 1 - 0.7`` is
    ``0.30000000000000004``, so a row of 10 keeps ``ceil(3.0000000000000004) = 4`` tokens (``rho = 0.3`` keeps 3).
    ``rho = 0`` keeps nothing.

    ``entropy``: float tensor of the shape of ``mask`` (any float dtype, compared in fp32; finite on valid tokens,
    and within the fp32 range there: a float64 value beyond it is a ``ValueError``, not a tie at inf).
    Returns bool of the shape of ``mask``. Triton path: a radix select of the k-th largest entropy per row on the fp32
    bit pattern, then one blocked pass with a prefix count of ties (:mod:`rlvr_kernels.kernels.select`); no sort.
    """
    rows = _Rows(mask, cu_seqlens)
    rows.check_token_tensor("entropy", entropy)
    rho = C.unit("rho", rho)
    block = _check_block(block_size)
    rows.check_finite("entropy", entropy, fp32=True)
    if _backend(backend, rows) == "torch":
        out = ref.forking_token_mask(rows.to_padded(entropy), rows.padded_valid(), rho, topk=token_rows.topk_mask)
        return rows.from_padded(out)
    from rlvr_kernels.kernels import credit as kern

    k = ref.topk_budget(rows.counts(), rho)
    starts, spans = rows.starts_spans()
    return rows.unflat(kern.topk_mask(rows.flat(entropy), rows.valid8(), starts, spans, k, block=block))


def _entropy_shaped_advantages(
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    scale,
    *,
    alpha: float = 0.4,
    kappa: float = 2.0,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
    block_size: Optional[int] = None,
) -> torch.Tensor:
    """Entropy-shaped advantages ``A' = (A + scale * min(alpha H, |A| / kappa)) * mask`` (fp32).

    The entropy-advantage rule of Cheng et al. 2025 (``scale = 1``) and its TP-Schedule variant "Entropy Adv. ->
    Schedule" with ``scale = q(k)`` (``apply_entropy_soft_weight_to_advantage``; alpha = 0.4, kappa = 2 as in the
    released scripts); see ``docs/methods/entropy-advantages.md``. The bonus is >= 0 and at most ``|A| / kappa``, so
    the sign of A is kept; a zero advantage stays exactly 0. ``H`` should be the detached old-policy entropy.

    Shapes: ``entropy`` like ``mask`` (``[B, T]``, or ``[total]`` with ``cu_seqlens``); ``advantages`` per row
    ``[B]`` (or ``[B, 1]``) broadcast over the row, or per token like ``mask`` (in the packed layout a 1-D tensor of
    length ``total`` is read per token). ``scale`` in ``[0, 1]``, ``0 <= alpha <= C.F32_MAX``, ``C.F32_TINY <= kappa <=
    C.F32_MAX`` (fp32 scalars: a smaller kappa would be 0 in fp32). Advantages and entropies must be finite on valid
    tokens and within the fp32 range there (the op computes in fp32). Returns fp32 of the shape of ``mask``, exactly 0
    on invalid tokens.

    Extreme magnitudes (the choice: compute, or refuse clearly): ``alpha H`` and ``|A| / kappa`` may overflow to inf
    on their own (the minimum takes the other, so huge entropies with ``alpha = 0`` or a large ``kappa`` are fine),
    but a shaped advantage that does not fit fp32 (``|A| (1 + scale / kappa)`` beyond ``C.F32_MAX``) is a
    ``ValueError`` naming the advantages: the result is never inf or NaN.
    """
    rows = _Rows(mask, cu_seqlens)
    adv, per_token = rows.check_advantages(advantages)
    rows.check_token_tensor("entropy", entropy)
    scale = C.unit("scale", scale)
    alpha = C.real("alpha", alpha, low=0.0)
    kappa = C.real("kappa", kappa, low=C.F32_TINY)
    block = _check_block(block_size)
    rows.check_finite("advantages", adv, per_token, fp32=True)
    rows.check_finite("entropy", entropy, fp32=True)
    if _backend(backend, rows) == "torch":
        out = ref.entropy_shaped_advantages(
            rows.to_padded(adv, per_token), rows.to_padded(entropy), rows.padded_valid(), scale, alpha, kappa
        )
        out = rows.from_padded(out)
    else:
        from rlvr_kernels.kernels import credit as kern

        starts, spans = rows.starts_spans()
        out = rows.unflat(
            kern.token_advantage_op(
                adv,
                entropy,
                rows.valid8(),
                starts,
                spans,
                per_token=per_token,
                op=kern.OP_ENTROPY_SHAPED,
                scale=scale,
                alpha=alpha,
                kappa=kappa,
                block=block,
            )
        )
    if out.numel() and not bool(torch.isfinite(out).all()):  # invalid positions are 0: only valid ones can fail
        raise ValueError(
            "entropy_shaped_advantages: the shaped advantage A + scale * min(alpha H, |A| / kappa) overflows float32 "
            f"at a valid position (scale={scale}, alpha={alpha}, kappa={kappa}): the advantages are too large for "
            "this op's fp32 result"
        )
    return out


def _d3s_token_mask(
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    rho,
    *,
    scope: str = "batch",
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
    block_size: Optional[int] = None,
) -> torch.Tensor:
    """D^3S token criterion (Wang et al., "Learning More with Less", ICLR 2026, arXiv 2509.22115;
    ``docs/methods/d3s.md``).

    Scores every valid token by ``|A| H`` (fp32; ``A`` its advantage, ``H`` the detached full-vocabulary entropy of the
    current policy) and keeps the top ``ceil(n rho)`` valid tokens by score (``n`` valid tokens in scope, budget in
    float64), ties to the lower flat index: over the whole batch (``scope="batch"``, default; flat row-major order,
    which is also the packed order) or within each row (``scope="sequence"``). Aggregate the loss over the kept tokens
    only. Tokens with a zero advantage score 0 and are kept only when the budget reaches them (lowest index first).

    Under a schedule use ``rho = 1 - q(k)``: the dynamic down-sampling starts aggressive and relaxes to keeping every
    token. Our default starting keep-fraction is ``rho_0 = 0.2`` (the 80/20 high-entropy-token convention; the paper's
    own value was not available to us), i.e. ``TemporalSchedule(start_value=0.8, end_value=0.0, total_steps=T)`` and
    ``rho = 1 - schedule(k)``.

    Shapes as in :func:`entropy_shaped_advantages` (advantages per row or per token). Returns bool like ``mask``.
    Scores are fp32: advantages and entropies must be finite and within the fp32 range at valid tokens
    (``ValueError`` otherwise); a product ``|A| H`` beyond the fp32 range saturates at +inf, so such tokens rank
    first and tie among themselves (lower index first).
    Triton path: one kernel writes the scores, then the radix select of :mod:`rlvr_kernels.kernels.select` (one
    program for ``scope="batch"``, one per row for ``"sequence"``). The sample-level D^3S step (choosing rollouts
    within a group) belongs to the data pipeline and is not provided here.
    """
    rows = _Rows(mask, cu_seqlens)
    scope = C.choice("scope", scope, D3S_SCOPES)
    adv, per_token = rows.check_advantages(advantages)
    rows.check_token_tensor("entropy", entropy)
    rho = C.unit("rho", rho)
    block = _check_block(block_size)
    rows.check_finite("advantages", adv, per_token, fp32=True)
    rows.check_finite("entropy", entropy, fp32=True)
    if _backend(backend, rows) == "torch":
        out = ref.d3s_token_mask(
            rows.to_padded(adv, per_token),
            rows.to_padded(entropy),
            rows.padded_valid(),
            rho,
            scope=scope,
            topk=token_rows.topk_mask,
        )
        return rows.from_padded(out)
    from rlvr_kernels.kernels import credit as kern

    starts, spans = rows.starts_spans()
    valid8 = rows.valid8()
    scores = kern.token_advantage_op(
        adv, entropy, valid8, starts, spans, per_token=per_token, op=kern.OP_D3S_SCORE, block=block
    )
    if scope == "sequence":
        k = ref.topk_budget(rows.counts(), rho)
    else:
        n = valid8.numel()
        starts = torch.zeros(1, dtype=torch.int64, device=rows.device)
        spans = torch.full((1,), n, dtype=torch.int64, device=rows.device)
        k = ref.topk_budget(rows.valid.sum(dtype=torch.int64).reshape(1), rho)
    return rows.unflat(kern.topk_mask(scores, valid8, starts, spans, k, block=block))


# ----------------------------------------------------------------------------------------------------------------------
# The selection ops as PyTorch custom ops (torch.library): opaque to torch.compile, so the host reads of their checks
# and of their per-row bookkeeping cost no graph break. Their results are masks and ranks: not differentiable.
# ----------------------------------------------------------------------------------------------------------------------


def _op_args(required, optional=()) -> bool:
    """Whether the arguments can go through a custom op: the ``required`` ones tensors, the ``optional`` ones tensors
    or None, all on one device, none nested (see :func:`_tensors_or_none`)."""
    return all(isinstance(x, torch.Tensor) for x in required) and _tensors_or_none(*required, *optional)


def _tensors_or_none(*xs) -> bool:
    """Whether the tensor arguments can go through a custom op: tensors (or None) on one device. Anything else takes
    the plain path, which raises its clear error for them (a custom op would dispatch a stray meta tensor to its fake
    implementation, or refuse a non-tensor with a less helpful message)."""
    if not all(x is None or (isinstance(x, torch.Tensor) and not x.is_nested) for x in xs):
        return False
    return len({x.device for x in xs if x is not None}) <= 1


@torch.library.custom_op("rlvr_kernels::trajectory_percentile", mutates_args=())
def _percentile_op(
    mask: torch.Tensor,
    values: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    backend: str,
    block_size: Optional[int],
) -> torch.Tensor:
    return _trajectory_percentile(mask, values=values, cu_seqlens=cu_seqlens, backend=backend, block_size=block_size)


@_percentile_op.register_fake
def _(mask, values, cu_seqlens, backend, block_size):
    return torch.empty(mask.shape, dtype=torch.float32, device=mask.device)


@torch.library.custom_op("rlvr_kernels::tp_schedule_mask", mutates_args=())
def _tp_op(
    mask: torch.Tensor,
    q: float,
    cu_seqlens: Optional[torch.Tensor],
    reverse: bool,
    backend: str,
    block_size: Optional[int],
) -> torch.Tensor:
    return _tp_schedule_mask(mask, q, cu_seqlens=cu_seqlens, reverse=reverse, backend=backend, block_size=block_size)


@_tp_op.register_fake
def _(mask, q, cu_seqlens, reverse, backend, block_size):
    return torch.empty(mask.shape, dtype=torch.bool, device=mask.device)


@torch.library.custom_op("rlvr_kernels::forking_token_mask", mutates_args=())
def _forking_op(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    rho: float,
    cu_seqlens: Optional[torch.Tensor],
    backend: str,
    block_size: Optional[int],
) -> torch.Tensor:
    return _forking_token_mask(entropy, mask, rho, cu_seqlens=cu_seqlens, backend=backend, block_size=block_size)


@_forking_op.register_fake
def _(entropy, mask, rho, cu_seqlens, backend, block_size):
    return torch.empty(mask.shape, dtype=torch.bool, device=mask.device)


@torch.library.custom_op("rlvr_kernels::d3s_token_mask", mutates_args=())
def _d3s_op(
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    rho: float,
    scope: str,
    cu_seqlens: Optional[torch.Tensor],
    backend: str,
    block_size: Optional[int],
) -> torch.Tensor:
    return _d3s_token_mask(
        advantages, entropy, mask, rho, scope=scope, cu_seqlens=cu_seqlens, backend=backend, block_size=block_size
    )


@_d3s_op.register_fake
def _(advantages, entropy, mask, rho, scope, cu_seqlens, backend, block_size):
    return torch.empty(mask.shape, dtype=torch.bool, device=mask.device)


def trajectory_percentile(
    mask: torch.Tensor,
    *,
    values: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
    block_size: Optional[int] = None,
    seq_group=None,
) -> torch.Tensor:
    if seq_group is not None:
        return _trajectory_percentile_split(mask, values, cu_seqlens, backend, block_size, seq_group)
    if _op_args((mask,), (values, cu_seqlens)) and isinstance(backend, str):
        return torch.ops.rlvr_kernels.trajectory_percentile(mask, values, cu_seqlens, backend, _check_block(block_size))
    return _trajectory_percentile(mask, values=values, cu_seqlens=cu_seqlens, backend=backend, block_size=block_size)


def tp_schedule_mask(
    mask: torch.Tensor,
    q,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    reverse: bool = False,
    backend: str = "auto",
    block_size: Optional[int] = None,
    seq_group=None,
) -> torch.Tensor:
    if seq_group is not None:
        return _tp_schedule_mask_split(mask, q, cu_seqlens, reverse, backend, block_size, seq_group)
    if _op_args((mask,), (cu_seqlens,)) and isinstance(backend, str):
        return torch.ops.rlvr_kernels.tp_schedule_mask(
            mask, C.unit("q", q), cu_seqlens, C.flag("reverse", reverse), backend, _check_block(block_size)
        )
    return _tp_schedule_mask(mask, q, cu_seqlens=cu_seqlens, reverse=reverse, backend=backend, block_size=block_size)


def forking_token_mask(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    rho,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
    block_size: Optional[int] = None,
    seq_group=None,
) -> torch.Tensor:
    if seq_group is not None:
        return _forking_token_mask_split(entropy, mask, rho, cu_seqlens, backend, block_size, seq_group)
    if _op_args((entropy, mask), (cu_seqlens,)) and isinstance(backend, str):
        return torch.ops.rlvr_kernels.forking_token_mask(
            entropy, mask, C.unit("rho", rho), cu_seqlens, backend, _check_block(block_size)
        )
    return _forking_token_mask(entropy, mask, rho, cu_seqlens=cu_seqlens, backend=backend, block_size=block_size)


def d3s_token_mask(
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    rho,
    *,
    scope: str = "batch",
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
    block_size: Optional[int] = None,
    seq_group=None,
    dp_group=None,
) -> torch.Tensor:
    if seq_group is not None or dp_group is not None:
        return _d3s_token_mask_groups(
            advantages, entropy, mask, rho, scope, cu_seqlens, backend, block_size, seq_group, dp_group
        )
    if _op_args((advantages, entropy, mask), (cu_seqlens,)) and isinstance(backend, str) and isinstance(scope, str):
        return torch.ops.rlvr_kernels.d3s_token_mask(
            advantages, entropy, mask, C.unit("rho", rho), scope, cu_seqlens, backend, _check_block(block_size)
        )
    return _d3s_token_mask(
        advantages, entropy, mask, rho, scope=scope, cu_seqlens=cu_seqlens, backend=backend, block_size=block_size
    )


@torch.library.custom_op("rlvr_kernels::entropy_shaped_advantages", mutates_args=())
def _entropy_adv_op(
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    alpha: float,
    kappa: float,
    cu_seqlens: Optional[torch.Tensor],
    backend: str,
    block_size: Optional[int],
) -> torch.Tensor:
    return _entropy_shaped_advantages(
        advantages,
        entropy,
        mask,
        scale,
        alpha=alpha,
        kappa=kappa,
        cu_seqlens=cu_seqlens,
        backend=backend,
        block_size=block_size,
    )


@_entropy_adv_op.register_fake
def _(advantages, entropy, mask, scale, alpha, kappa, cu_seqlens, backend, block_size):
    return torch.empty(mask.shape, dtype=torch.float32, device=mask.device)


def entropy_shaped_advantages(
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    scale,
    *,
    alpha: float = 0.4,
    kappa: float = 2.0,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
    block_size: Optional[int] = None,
    seq_group=None,
) -> torch.Tensor:
    if seq_group is not None:
        return _entropy_shaped_advantages_split(
            advantages, entropy, mask, scale, alpha, kappa, cu_seqlens, backend, block_size, seq_group
        )
    try:  # plain Python numbers for the op schema; anything else takes the plain path and its own error
        numbers = (C.unit("scale", scale), C.real("alpha", alpha, low=0.0), C.real("kappa", kappa, low=C.F32_TINY))
    except (TypeError, ValueError):
        numbers = None
    if numbers is not None and _op_args((advantages, entropy, mask), (cu_seqlens,)) and isinstance(backend, str):
        return torch.ops.rlvr_kernels.entropy_shaped_advantages(
            advantages.detach(), entropy.detach(), mask, *numbers, cu_seqlens, backend, _check_block(block_size)
        )
    return _entropy_shaped_advantages(
        advantages,
        entropy,
        mask,
        scale,
        alpha=alpha,
        kappa=kappa,
        cu_seqlens=cu_seqlens,
        backend=backend,
        block_size=block_size,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Sequence-split rows (``seq_group=``) and D^3S's data-parallel batch (``dp_group=``). Eager Python around the op: a
# process group is not an op argument, so with a group the call runs these functions (``torch.compiler.disable``:
# under torch.compile it is a graph break that runs eagerly). Each one runs the op's local part (the same checks,
# the token-local math) on every rank, agrees on errors and the layout in one header all-gather
# (:func:`rlvr_kernels.parallel.sequence.begin`), exchanges the O(rows) partials the rule needs and feeds them into
# the single-process reference (:mod:`rlvr_kernels.reference.credit`) or the distributed selection
# (:mod:`rlvr_kernels.parallel.select`). The whole-row work runs in torch on the tensors' device (the token-local
# parts with ``backend``); the results equal the single-process op on the whole rows, restricted to this rank's
# columns.
# ----------------------------------------------------------------------------------------------------------------------
def _device_of(x) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _split_rows(mask, cu_seqlens, what: str) -> _Rows:
    if cu_seqlens is not None:
        raise ValueError(
            f"{what}: seq_group with cu_seqlens (the packed layout) is not supported; pass this rank's columns of the "
            "padded batch, [B, T_local] tensors"
        )
    return _Rows(mask, None)


# dtype codes of the values gathered by the rank percentile (compared across ranks)
_VALUE_DTYPES = {torch.float32: 1, torch.float64: 2, torch.int64: 3}


@torch.compiler.disable
def _trajectory_percentile_split(mask, values, cu_seqlens, backend, block_size, seq_group) -> torch.Tensor:
    from rlvr_kernels.parallel import sequence as seq

    def local():
        rows = _split_rows(mask, cu_seqlens, "trajectory_percentile")
        _check_block(block_size)
        _backend(backend, rows)
        v = None
        if values is not None:
            rows.check_token_tensor("values", values, integer_ok=True)
            if values.dtype.is_floating_point and bool((torch.isnan(values) & rows.valid).any()):
                raise ValueError("values has NaN at valid positions")
            if values.dtype == torch.uint64:
                raise ValueError("trajectory_percentile: uint64 values are not supported with seq_group")
            # the dtypes the single-process sort compares in (token_rows.rank_percentile): exact widenings
            v = values.float() if values.dtype in (torch.float16, torch.bfloat16) else values
            v = v if v.dtype.is_floating_point else v.to(torch.int64)
        code = 0 if v is None else _VALUE_DTYPES[v.dtype]
        return (rows, v), (rows.B, rows.T, code)

    what = "trajectory_percentile: values (given or None, and their dtype)"
    (rows, v), split = seq.begin(local, device=_device_of(mask), seq_group=seq_group, extra=(what,), same=(what,))
    if v is None:  # t / L: the reference on a frame at global positions with the global row lengths
        L, _ = seq.row_partials(split, rows.valid)
        return seq.columns(split, ref.position_percentile(seq.frame(split, rows.valid, L)))
    # the rank percentile is an order statistic of every token: gather the rows (O(tokens of the row) traffic)
    whole, whole_valid = seq.gather_columns(split, v, rows.valid)
    return seq.columns(split, token_rows.rank_percentile(whole, whole_valid))


@torch.compiler.disable
def _tp_schedule_mask_split(mask, q, cu_seqlens, reverse, backend, block_size, seq_group) -> torch.Tensor:
    from rlvr_kernels.parallel import sequence as seq
    from rlvr_kernels.parallel.collectives import float_bits

    def local():
        rows = _split_rows(mask, cu_seqlens, "tp_schedule_mask")
        qv = C.unit("q", q)
        C.flag("reverse", reverse)
        _check_block(block_size)
        _backend(backend, rows)
        return (rows, qv), (rows.B, rows.T, float_bits(qv), int(bool(reverse)))

    (rows, qv), split = seq.begin(
        local, device=_device_of(mask), seq_group=seq_group, extra=("q", "reverse"), same=("q", "reverse")
    )
    L, _ = seq.row_partials(split, rows.valid)
    lo, hi = ref.tp_bounds(L, qv, reverse=bool(reverse))  # global [lo, hi) per row, then shifted to local columns
    return ref.range_mask(rows.valid, lo - split.offset, hi - split.offset)


@torch.compiler.disable
def _forking_token_mask_split(entropy, mask, rho, cu_seqlens, backend, block_size, seq_group) -> torch.Tensor:
    from rlvr_kernels.parallel import select as psel
    from rlvr_kernels.parallel import sequence as seq
    from rlvr_kernels.parallel.collectives import float_bits

    def local():
        rows = _split_rows(mask, cu_seqlens, "forking_token_mask")
        rows.check_token_tensor("entropy", entropy)
        r = C.unit("rho", rho)
        _check_block(block_size)
        rows.check_finite("entropy", entropy, fp32=True)
        _backend(backend, rows)
        return (rows, r), (rows.B, rows.T, float_bits(r))

    (rows, r), _ = seq.begin(local, device=_device_of(mask), seq_group=seq_group, extra=("rho",), same=("rho",))
    return psel.topk_mask(
        entropy.detach(), rows.valid, lambda n: ref.topk_budget(n, r), per_row=True, seq_group=seq_group
    )


@torch.compiler.disable
def _entropy_shaped_advantages_split(
    advantages, entropy, mask, scale, alpha, kappa, cu_seqlens, backend, block_size, seq_group
) -> torch.Tensor:
    from rlvr_kernels.parallel import sequence as seq

    def local():  # token-local: the op itself on this rank's columns; the exchange only agrees on errors and rows
        _split_rows(mask, cu_seqlens, "entropy_shaped_advantages")
        out = _entropy_shaped_advantages(
            advantages.detach() if isinstance(advantages, torch.Tensor) else advantages,
            entropy.detach() if isinstance(entropy, torch.Tensor) else entropy,
            mask,
            scale,
            alpha=alpha,
            kappa=kappa,
            backend=backend,
            block_size=block_size,
        )
        return out, tuple(out.shape)

    out, _ = seq.begin(local, device=_device_of(mask), seq_group=seq_group)
    return out


@torch.compiler.disable
def _d3s_token_mask_groups(
    advantages, entropy, mask, rho, scope, cu_seqlens, backend, block_size, seq_group, dp_group
) -> torch.Tensor:
    from rlvr_kernels.parallel import select as psel
    from rlvr_kernels.parallel import sequence as seq
    from rlvr_kernels.parallel.collectives import float_bits

    def local():
        rows = _split_rows(mask, cu_seqlens, "d3s_token_mask") if seq_group is not None else _Rows(mask, cu_seqlens)
        sc = C.choice("scope", scope, D3S_SCOPES)
        adv, per_token = rows.check_advantages(advantages)
        rows.check_token_tensor("entropy", entropy)
        r = C.unit("rho", rho)
        _check_block(block_size)
        rows.check_finite("advantages", adv, per_token, fp32=True)
        rows.check_finite("entropy", entropy, fp32=True)
        _backend(backend, rows)
        if sc == "sequence" and seq_group is None:  # whole rows on this rank: the op itself
            out = _d3s_token_mask(
                adv, entropy, mask, r, scope=sc, cu_seqlens=cu_seqlens, backend=backend, block_size=block_size
            )
            return (rows, sc, r, None, out), (rows.B, rows.T or 0, D3S_SCOPES.index(sc), float_bits(r))
        adv, entropy_d = adv.detach(), entropy.detach()
        scores = ref.d3s_scores(rows.to_padded(adv, per_token), rows.to_padded(entropy_d), rows.padded_valid())
        return (rows, sc, r, scores, None), (rows.B, rows.T or 0, D3S_SCOPES.index(sc), float_bits(r))

    (rows, sc, r, scores, out), _ = seq.begin(
        local,
        device=_device_of(mask),
        seq_group=seq_group,
        dp_group=dp_group,
        extra=("scope", "rho"),
        same=("scope", "rho"),
    )
    if out is not None:
        return out
    budget = lambda n: ref.topk_budget(n, r)  # noqa: E731 - ceil(n rho) of the global count, after the first round
    valid = rows.padded_valid()
    if sc == "sequence":  # rows split over seq_group; a data-parallel rank holds whole rows of its own
        out = psel.topk_mask(scores, valid, budget, per_row=True, seq_group=seq_group)
    else:
        out = psel.topk_mask(scores, valid, budget, per_row=False, seq_group=seq_group, dp_group=dp_group)
    return rows.from_padded(out)


_GROUP_NOTES = {
    "trajectory_percentile": (
        "the row lengths L (one all-gather of [W, B, 2] int64); ``t / L`` is the reference at global positions. "
        "With ``values`` the rank percentile is an order statistic of every token of the row: the rows are "
        "gathered (one all-gather of [W, B, max T_r] values and of the mask: O(tokens of the row) traffic)."
    ),
    "tp_schedule_mask": "the row lengths L (one all-gather of [W, B, 2] int64); the cut-off in float64 as always.",
    "forking_token_mask": (
        "no token: an exact distributed radix select per row (4 all-reduces of [B, 256] int64, and one all-gather "
        "of [W, B] int64 when a row's tied entropies straddle the budget); ties to the lower global column."
    ),
    "d3s_token_mask": (
        "no token: an exact distributed radix select (4 all-reduces of [B, 256] int64 for ``scope='sequence'``, of "
        "[1, 256] for ``'batch'``, and one all-gather of per-row tie counts when ties straddle the budget).\n\n    "
        "``dp_group``: with ``scope='batch'`` the selection runs over the union of every data-parallel rank's "
        "batch, equal to the single-process op on the batches concatenated in rank order (ties to the lower flat "
        "index of the concatenation); no score is gathered. Each rank may hold any number of rows, in either layout. "
        "With both groups (FSDP + Ulysses), the batch is the concatenation over ``dp_group`` of the batches each "
        "``seq_group`` assembles. ``dp_group`` does not change ``scope='sequence'`` (rows are whole on a "
        "data-parallel rank); the call still agrees on errors over it."
    ),
    "entropy_shaped_advantages": (
        "nothing but the header: the rule is token-local (each token's ``A + s min(alpha H, |A| / kappa)``), so each "
        "rank computes its columns; the group only agrees on errors and on the rows."
    ),
}
_GROUP_DOC = (
    "\n\n    Sequence parallelism (``seq_group``, a ``torch.distributed`` process group; default None): the tensors "
    "are this rank's columns ``[c_r, c_r + T_r)`` of the padded global ``[B, T]`` batch (ranks in group-rank order, "
    "the same B rows on every rank, ``T_r`` may differ; ``c_r`` comes from the ``T_r`` exchanged in the first "
    "collective). The result is the single-process op's on the whole rows, restricted to this rank's columns. "
    "Exchanged: {}\n\n    With a group the call runs eagerly in Python around the op (a graph break under "
    "``torch.compile``), and every rank must make it. An error on any rank (a bad value on one rank only included) "
    "raises the same exception on every rank: one small all-gather that the call makes anyway carries the error "
    "flags; so does a difference between ranks in the arguments that steer the exchange (``q``, ``reverse``, "
    "``rho``, ``scope``, whether ``values`` is given and its dtype). The packed layout (``cu_seqlens``) with "
    "``seq_group`` is a ``ValueError``.\n"
)

for _public, _impl in (
    (entropy_shaped_advantages, _entropy_shaped_advantages),
    (trajectory_percentile, _trajectory_percentile),
    (tp_schedule_mask, _tp_schedule_mask),
    (forking_token_mask, _forking_token_mask),
    (d3s_token_mask, _d3s_token_mask),
):
    _public.__doc__ = (
        (_impl.__doc__ or "")
        + (
            "\n\n    Registered as the PyTorch custom op ``torch.ops.rlvr_kernels." + _public.__name__ + "``: "
            "``torch.compile`` traces it without a graph break (its checks run inside the op). Its result is not "
            "differentiable (the inputs enter detached).\n"
        )
        + _GROUP_DOC.format(_GROUP_NOTES[_public.__name__])
    )
