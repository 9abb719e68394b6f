"""The covariance token selections of Clip-Cov and KL-Cov as custom ops (:mod:`rlvr_kernels.reference.cov` holds
the math; these wrappers make them opaque to ``torch.compile``: a batch-wide top-k / random draw over a
data-dependent number of tokens). Both return a bool ``[B, T]`` of the selected tokens, False outside ``mask``.
"""

from __future__ import annotations

import torch

from rlvr_kernels.reference import cov as ref


@torch.library.custom_op("rlvr_kernels::kl_cov_selection", mutates_args=())
def _kl_cov_op(adv: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    return ref.kl_cov_selection(adv, logp, mask, ratio)


@_kl_cov_op.register_fake
def _(adv, logp, mask, ratio):
    return torch.empty(mask.shape, dtype=torch.bool, device=mask.device)


@torch.library.custom_op("rlvr_kernels::clip_cov_selection", mutates_args=())
def _clip_cov_op(
    adv: torch.Tensor,
    logp: torch.Tensor,
    old: torch.Tensor,
    mask: torch.Tensor,
    ratio: float,
    lb: float,
    ub: float,
    clip_low: float,
    clip_high: float,
) -> torch.Tensor:
    return ref.clip_cov_selection(
        adv, logp, old, mask, ratio=ratio, lb=lb, ub=ub, clip_low=clip_low, clip_high=clip_high
    )


@_clip_cov_op.register_fake
def _(adv, logp, old, mask, ratio, lb, ub, clip_low, clip_high):
    return torch.empty(mask.shape, dtype=torch.bool, device=mask.device)


def kl_cov_selection(adv: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """KL-Cov's penalised tokens (:func:`rlvr_kernels.reference.cov.kl_cov_selection`); inputs ``[B, T]``,
    detached."""
    return _kl_cov_op(adv.detach(), logp.detach(), mask, float(ratio))


def clip_cov_selection(adv, logp, old, mask, *, ratio, lb, ub, clip_low, clip_high) -> torch.Tensor:
    """Clip-Cov's detached tokens (:func:`rlvr_kernels.reference.cov.clip_cov_selection`); inputs ``[B, T]``."""
    return _clip_cov_op(
        adv.detach(), logp.detach(), old.detach(), mask, float(ratio), float(lb), float(ub), float(clip_low),
        float(clip_high),
    )  # fmt: skip
