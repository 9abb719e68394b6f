"""D^3S's sample level for verl's data pipeline: which rollouts of a ``DataProto`` take part in the update.

verl's GRPO batch carries the token-level advantages ``batch["advantages"] [B, T]`` (the sequence advantage broadcast
over the response), ``batch["response_mask"] [B, T]`` and the prompt-group labels ``non_tensor_batch["uid"]``. Call
the helper in the trainer loop after ``compute_advantage`` and before ``update_actor``::

    from rlvr_kernels.integrations.verl import apply_d3s_rollouts

    batch = compute_advantage(batch, ...)
    apply_d3s_rollouts(batch, k=4)  # zeroes response_mask outside the kept rollouts; returns the bool mask [B]

or :func:`d3s_rollout_mask` / ``.nonzero()`` on the raw fields to drop or reorder rows yourself. The selection is
:func:`rlvr_kernels.d3s_select_rollouts` (exact, deterministic ties; ``docs/methods/d3s.md``). A zeroed
``response_mask`` row adds nothing to the loss and is not counted by ``token-mean``; the ``seq-mean-*`` aggregations
still count it as a row (drop the rows instead if that matters). This module does not import verl.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from rlvr_kernels.rollouts import d3s_rollout_mask as _mask

__all__ = ["d3s_rollout_mask", "apply_d3s_rollouts"]


def d3s_rollout_mask(
    advantages: torch.Tensor, uid: Any, k: int, response_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Bool mask ``[B]`` of the rollouts to keep: per ``uid`` group the ``k`` whose sequence advantages have the
    largest variance (groups of at most ``k`` keep all).

    ``advantages``: ``[B]``, or verl's token-level ``[B, T]`` together with ``response_mask`` (the sequence advantage
    is the mean over the response tokens, which for GRPO is the broadcast value; a row without response tokens
    counts as 0). ``uid``: ``B`` group labels, any hashable sortable values (verl's numpy object array of strings, a
    list, or an integer tensor).
    """
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages must be a tensor, got {type(advantages).__name__}")
    adv = advantages.detach()
    if adv.dim() == 2:
        if response_mask is None:
            raise ValueError("token-level advantages [B, T] need response_mask to form the sequence advantage")
        m = response_mask.detach().to(device=adv.device, dtype=torch.float64)
        if m.shape != adv.shape:
            raise ValueError(f"response_mask {tuple(m.shape)} must have the shape of advantages {tuple(adv.shape)}")
        adv = (adv.to(torch.float64) * m).sum(1) / m.sum(1).clamp(min=1.0)
    elif adv.dim() != 1:
        raise ValueError(f"advantages must be [B] or [B, T], got shape {tuple(adv.shape)}")
    return _mask(adv, _group_ids(uid, adv), k)


def apply_d3s_rollouts(data: Any, k: int) -> torch.Tensor:
    """On a verl ``DataProto`` (or anything with ``.batch["advantages"]``, ``.batch["response_mask"]`` and
    ``.non_tensor_batch["uid"]``): zero ``response_mask`` on the rollouts D^3S drops, in place; returns the bool
    mask ``[B]`` of the kept ones."""
    batch = data.batch
    rm = batch["response_mask"]
    keep = d3s_rollout_mask(batch["advantages"], data.non_tensor_batch["uid"], k, response_mask=rm)
    batch["response_mask"] = rm * keep.to(device=rm.device, dtype=rm.dtype)[:, None]
    return keep


def _group_ids(uid: Any, adv: torch.Tensor) -> torch.Tensor:
    if isinstance(uid, torch.Tensor) and not uid.is_floating_point():
        gid = uid.to(adv.device)
    else:
        labels = np.asarray(uid.cpu() if isinstance(uid, torch.Tensor) else uid)
        if labels.ndim != 1:
            raise ValueError(f"uid must be one label per rollout, got shape {labels.shape}")
        _, inverse = np.unique(labels, return_inverse=True)
        gid = torch.from_numpy(inverse.astype(np.int64).reshape(-1)).to(adv.device)
    if gid.shape != adv.shape[:1]:
        raise ValueError(f"uid has {gid.shape[0] if gid.dim() else 0} labels for {adv.shape[0]} rollouts")
    return gid
