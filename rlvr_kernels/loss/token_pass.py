"""The token pass: from per-token log-probs and entropies of whole rows (or row segments) to the loss and its metric
sums, shared by both paths of :class:`rlvr_kernels.RLVRLoss` and by the verl policy losses.

Order (``docs/methods/objectives.md``): (1) the credit rule's mask that needs the current policy, (2) its advantage
shaping, (3) the trust region and the objective (``reference/loss.py``), (4) the aggregation with batch-global
divisors computed beforehand, so that any subset of rows gives its exact share of the loss.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from rlvr_kernels import methods as M
from rlvr_kernels.reference import loss as ref_loss


@dataclasses.dataclass
class Rows:
    """The token-pass inputs of some rows ``[b, T]`` (or a segment ``[b, t]`` of them), fp32 unless stated.

    ``mask``: loss weights after the credit masks known before the vocabulary pass (0 = not in the loss); ``adv``:
    advantages ``[b, T]``; ``old`` / ``ref`` / ``mu``: behaviour, reference and rollout-anchor log-probs; ``is_ratio``:
    the rollout IS correction (``[b, T]`` or per row ``[b, 1]``); ``coef``: DelTA coefficients; ``old_ent``: the
    entropy that shapes entropy-shaped advantages (default: the current policy's); ``ids``: target ids (int64, the
    fused path); ``counts``: planned active tokens of each whole row ``[b]``; ``width``: the whole rows' width T."""

    mask: torch.Tensor
    adv: torch.Tensor
    old: Optional[torch.Tensor] = None
    ref: Optional[torch.Tensor] = None
    mu: Optional[torch.Tensor] = None
    is_ratio: Optional[torch.Tensor] = None
    coef: Optional[torch.Tensor] = None
    old_ent: Optional[torch.Tensor] = None
    ids: Optional[torch.Tensor] = None
    counts: Optional[torch.Tensor] = None
    width: Optional[int] = None


@dataclasses.dataclass
class TokenSums:
    """Metric numerators of a token pass (detached fp32). Scalars are sums over the active tokens; ``row_*`` are per
    row ``[b]``; ``seq_*`` and ``rows`` exist at sequence level (GSPO: one clip indicator per sequence); the optional
    ones exist when the configuration has them."""

    active: torch.Tensor
    clipped: torch.Tensor
    low_clipped: torch.Tensor
    high_clipped: torch.Tensor
    row_low_clipped: torch.Tensor
    row_high_clipped: torch.Tensor
    row_active: torch.Tensor
    rows: Optional[torch.Tensor] = None
    seq_clipped: Optional[torch.Tensor] = None
    seq_low_clipped: Optional[torch.Tensor] = None
    seq_high_clipped: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None
    trust_masked: Optional[torch.Tensor] = None
    cppo_delta_b_sum: Optional[torch.Tensor] = None

    def add(self, other: TokenSums, rows: slice, n_rows: int) -> TokenSums:
        """``self + other`` where ``other`` covers the rows ``rows`` of an ``n_rows``-row batch (``self`` may be
        None-like: use :meth:`zeros_like` first). Per-row sums accumulate over a row's segments."""
        out = {}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if b is None:
                out[f.name] = a
            elif f.name.startswith("row_"):
                acc = a if a is not None else torch.zeros(n_rows, dtype=b.dtype, device=b.device)
                acc[rows] += b
                out[f.name] = acc
            else:
                out[f.name] = b if a is None else a + b
        return TokenSums(**out)

    @staticmethod
    def empty(n_rows: int, device) -> TokenSums:
        z = torch.zeros((), device=device)
        zr = torch.zeros(n_rows, device=device)
        return TokenSums(z, z, z, z, zr.clone(), zr.clone(), zr.clone())


#: The 0-dim fields of :class:`TokenSums`, in the order of :func:`pack_sums`; the others are per row ``[b]``.
SCALAR_SUMS = tuple(f.name for f in dataclasses.fields(TokenSums) if not f.name.startswith("row_"))
ROW_SUMS = tuple(f.name for f in dataclasses.fields(TokenSums) if f.name.startswith("row_"))


def present_sums(cfg, entropy: bool = True) -> frozenset:
    """The fields of the :class:`TokenSums` that :func:`token_pass` gives for ``cfg`` (known before any value is
    read: the packed form of :func:`pack_sums` needs it at trace time); ``entropy``: whether the pass gets one."""
    names = {"active", "clipped", "low_clipped", "high_clipped"} | set(ROW_SUMS)
    if cfg.importance_sampling_level == "sequence":
        names |= {"rows", "seq_clipped", "seq_low_clipped", "seq_high_clipped"}
    if entropy:
        names.add("entropy")
    if cfg.beta != 0.0:
        names.add("kl")
    if type(M.trust_region_of_loss_type(cfg.loss_type)).mask is not M.TrustRegion.mask:
        names.add("trust_masked")
    if cfg.loss_type == "cppo":
        names.add("cppo_delta_b_sum")
    return frozenset(names)


def pack_sums(sums: TokenSums) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scalars, rows)``: fp32 ``[len(SCALAR_SUMS)]`` (0 for an absent field) and ``[len(ROW_SUMS), b]``."""
    ref = sums.active
    scalars = [getattr(sums, n) if getattr(sums, n) is not None else ref.new_zeros(()) for n in SCALAR_SUMS]
    return torch.stack([t.float().reshape(()) for t in scalars]), torch.stack([getattr(sums, n) for n in ROW_SUMS])


def unpack_sums(cfg, scalars: torch.Tensor, rows: torch.Tensor) -> TokenSums:
    """Inverse of :func:`pack_sums` for ``cfg`` (the absent fields, :func:`present_sums`, are None)."""
    present = present_sums(cfg)
    out = {n: (scalars[i] if n in present else None) for i, n in enumerate(SCALAR_SUMS)}
    out.update({n: rows[i] for i, n in enumerate(ROW_SUMS)})
    return TokenSums(**out)


class Batch:
    """The checked ``[B, T]`` inputs of one loss call, fp32 except ``x`` (hidden states) and ``ids`` (int64, the
    ignore index outside the loss mask): ``valid`` (the caller's loss mask as weights), ``mask`` (after the credit
    masks known before the vocabulary pass), ``adv [B, T]``, ``old`` / ``ref`` / ``mu`` / ``coef`` / ``old_ent``
    ``[B, T]`` or None, ``is_ratio`` ``[B, T]`` / ``[B, 1]`` or None; ``counts [B]``: each row's planned active
    tokens (set once known). ``rows(sl, cols)`` gives a slice of it (whole rows, or a segment of rows for
    token-local configurations)."""

    def __init__(self, x, ids, valid, mask, adv, old, ref, is_ratio, mu, coef, old_ent, counts=None):
        self.B, self.T = mask.shape
        self.x, self.ids, self.valid, self.mask, self.adv = x, ids, valid, mask, adv
        self.old, self.ref, self.mu, self.is_ratio = old, ref, mu, is_ratio
        self.coef, self.old_ent = coef, old_ent
        self.counts: Optional[torch.Tensor] = counts

    @classmethod
    def build(cls, x, ids, valid, mask, adv, old, ref, is_ratio, mu, coef, old_ent) -> Batch:
        """From the caller's tensors: ``valid`` / ``mask`` / ``adv`` (``[B]`` or ``[B, T]``) as fp32 ``[B, T]``,
        ``is_ratio`` ``[B]`` as ``[B, 1]``."""
        B, T = mask.shape
        f32 = torch.float32
        adv = adv.to(f32).unsqueeze(1).expand(B, T) if adv.dim() == 1 else adv.to(f32)
        if is_ratio is not None:
            is_ratio = is_ratio.to(f32)
            is_ratio = is_ratio.unsqueeze(1) if is_ratio.dim() == 1 else is_ratio
        return cls(x, ids, valid.to(f32), mask.to(f32), adv, old, ref, is_ratio, mu, coef, old_ent)

    def rows(self, sl: slice, cols: slice = slice(None)) -> Rows:
        T = self.T

        def pick(t):
            if t is None:
                return None
            return t[sl, cols] if t.shape[-1] == T or t.shape[-1] == 0 else t[sl]  # [B, 1] ratios: per row

        return Rows(
            mask=pick(self.mask),
            adv=pick(self.adv),
            old=pick(self.old),
            ref=pick(self.ref),
            mu=pick(self.mu),
            is_ratio=pick(self.is_ratio),
            coef=pick(self.coef),
            old_ent=pick(self.old_ent),
            ids=pick(self.ids),
            counts=None if self.counts is None else self.counts[sl],
            width=T,
        )


def token_pass(
    cfg, logp: torch.Tensor, entropy: Optional[torch.Tensor], rows: Rows, q, norm, ent_norm
) -> tuple[torch.Tensor, TokenSums, torch.Tensor]:
    """Loss contribution and metric sums of whole sequences (or token-local segments of them).

    ``logp`` / ``entropy`` ``[b, T]`` fp32 (differentiable); ``rows``: the matching slice of the batch; ``q``: the
    schedule value (a float; a float64 0-dim CPU tensor under torch.compile; None without a schedule); ``norm`` /
    ``ent_norm``: the batch-global divisors of the policy term and of the entropy bonus. Returns
    ``(loss, sums, active_mask)``: this slice's share of the loss, the metric numerators, and the ``[b, T]`` mask of
    active tokens.
    """
    rule = M.credit(cfg.credit)
    mask = rows.mask
    # positions outside the mask take no part: selected to 0 (forward 0, gradient exactly 0, even from NaN/-inf)
    live = mask > 0
    logp = torch.where(live, logp, 0.0)
    entropy = torch.where(live, entropy, 0.0) if entropy is not None else None
    ent_d = entropy.detach() if entropy is not None else None
    # (1) credit masks that need the current policy's entropy
    keep = M.call_hook(rule, "policy_mask", cfg, rows.adv, ent_d, mask, q=q)
    if keep is not None:
        mask = mask * keep.to(mask.dtype)
    # (2) advantage shaping
    h = rows.old_ent if rows.old_ent is not None else ent_d
    adv = M.call_hook(rule, "shape", cfg, rows.adv, h, mask, rows.coef, q=q)
    rows = dataclasses.replace(rows, mask=mask, adv=adv)
    # (3) trust region + objective
    old = rows.old if rows.old is not None else logp.detach()
    ref = rows.ref if rows.ref is not None else logp.detach()
    tmask, delta_b_sum = M.trust_region_of_loss_type(cfg.loss_type).mask(cfg, logp, rows)
    per_tok, aux = ref_loss.policy_token_loss(
        cfg, logp, old, adv, mask, ref_logp=ref, is_ratio=rows.is_ratio, trust_mask=tmask
    )
    # (4) aggregation (row counts of whole rows: the slice may be a segment of each row)
    mode, horizon = ref_loss.aggregation_mode(cfg, rows.width if rows.width is not None else mask.shape[1])
    loss = ref_loss.aggregate(per_tok, mask, mode, norm, horizon, rows.counts)
    if cfg.entropy_coef != 0.0:
        # TRL: a token mean over the active tokens; verl: agg_loss(entropy) in the loss's own mode.
        emode, ehorizon = ("token-sum-over-norm", None) if cfg.aggregation is None else (mode, horizon)
        loss = loss - cfg.entropy_coef * ref_loss.aggregate(entropy, mask, emode, ent_norm, ehorizon, rows.counts)
    return loss, _sums(cfg, mask, aux, ent_d, tmask, delta_b_sum), mask


def _sums(cfg, mask, aux, ent_d, tmask, delta_b_sum) -> TokenSums:
    def tok(x):
        return (x.float() * mask).sum()

    seq = cfg.importance_sampling_level == "sequence"
    if seq:  # one clip indicator per sequence (GSPO): TRL averages them over the sequences, empty ones included
        row_low, row_high = aux["low_clipped"][:, 0].float(), aux["high_clipped"][:, 0].float()
    else:  # clipped tokens of each row (over its active tokens, row_active)
        row_low = (aux["low_clipped"].float() * mask).sum(-1)
        row_high = (aux["high_clipped"].float() * mask).sum(-1)
    s = TokenSums(
        active=mask.sum(),
        clipped=tok(aux["clipped"]),
        low_clipped=tok(aux["low_clipped"]),
        high_clipped=tok(aux["high_clipped"]),
        row_low_clipped=row_low,
        row_high_clipped=row_high,
        row_active=mask.sum(-1),
        rows=mask.new_tensor(float(mask.shape[0])) if seq else None,
        seq_clipped=aux["clipped"][:, 0].float().sum() if seq else None,
        seq_low_clipped=aux["low_clipped"][:, 0].float().sum() if seq else None,
        seq_high_clipped=aux["high_clipped"][:, 0].float().sum() if seq else None,
        entropy=(ent_d * mask).sum() if ent_d is not None else None,
        kl=(aux["kl"].detach() * mask).sum() if aux["kl"] is not None else None,
        trust_masked=((1.0 - tmask) * mask).sum() if tmask is not None else None,
        cppo_delta_b_sum=delta_b_sum,
    )
    return TokenSums(
        **{f.name: (None if getattr(s, f.name) is None else getattr(s, f.name).detach()) for f in dataclasses.fields(s)}
    )
