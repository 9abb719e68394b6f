"""D^3S's sample level in the TRL plug-in: ``RLVRGRPOConfig(d3s_rollouts_k=k)``.

After TRL has generated and scored a generation batch (``GRPOTrainer._generate_and_score_completions``: the
advantages are known), :func:`apply_d3s_rollouts` keeps, in every group of ``num_generations`` completions of one
prompt, the ``k`` whose advantages have the largest variance (:func:`rlvr_kernels.d3s_select_rollouts`, exact,
deterministic ties), and zeroes the ``completion_mask`` (and ``tool_mask``) rows of the others, the way TRL's own
``mask_truncated_completions`` drops a completion: the row stays in the batch (shapes, shuffling and the split into
micro-batches are unchanged) but none of its tokens is in the loss or attended to. TRL's ``num_items_in_batch`` is
recounted over the kept tokens.

- The groups are TRL's: ``num_generations`` consecutive completions of the batch gathered over every process (TRL's
  advantages are normalised over the same groups), so a group split across processes is selected as a whole; every
  process computes the same selection and keeps its own slice.
- Only training batches are down-sampled; evaluation scores every completion.
- ``k >= num_generations`` (or None, the default) keeps every completion.
- Loss types whose normaliser counts rows (``grpo``'s mean over the micro-batch's completions, ``dr_grpo``'s
  ``B x max_completion_length``) still count a dropped row, as they do for TRL's masked truncated completions; the
  token-count ones (``bnpo``, ``dapo``, ...) count only the kept tokens.
- With ``credit="delta"`` the selection comes first: DelTA's estimation set is the kept tokens.
"""

from __future__ import annotations

from typing import Optional

import torch

from rlvr_kernels import _checks as C
from rlvr_kernels.rollouts import d3s_rollout_mask

__all__ = ["check_d3s_rollouts_k", "apply_d3s_rollouts", "KEPT_METRIC"]

# the fraction of the generation batch's completions that take part in the loss (logged per generation batch)
KEPT_METRIC = "rlvr/d3s_rollouts_kept_fraction"


def check_d3s_rollouts_k(value) -> Optional[int]:
    """``None`` (off) or an int >= 1; a bad value is a ValueError, as TRL's own options."""
    try:
        return C.optional_integer("d3s_rollouts_k", value, low=1)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def apply_d3s_rollouts(trainer, out: dict) -> dict:
    """Apply ``trainer.args.d3s_rollouts_k`` to the scored generation batch ``out`` (TRL's output dict, this process's
    slice) in place, and return it."""
    k = check_d3s_rollouts_k(getattr(trainer.args, "d3s_rollouts_k", None))
    if k is None or not trainer.model.training:
        return out
    n_gen = int(trainer.num_generations)
    if k >= n_gen:
        return out
    adv = out["advantages"]
    if adv.dim() != 1:
        raise ValueError(
            f"d3s_rollouts_k selects completions by their sequence advantage: advantages must be [B], got "
            f"{tuple(adv.shape)}"
        )
    acc = trainer.accelerator
    everyone = acc.gather(adv.detach().float())  # every process's slice, in process order: TRL's grouping
    if everyone.numel() % n_gen:
        raise ValueError(
            f"d3s_rollouts_k: the gathered batch of {everyone.numel()} completions is not a whole number of groups "
            f"of num_generations={n_gen}"
        )
    groups = torch.arange(everyone.numel(), device=everyone.device) // n_gen
    keep_all = d3s_rollout_mask(everyone, groups, k)
    b = adv.size(0)
    keep = keep_all[acc.process_index * b : (acc.process_index + 1) * b].to(out["completion_mask"].device)
    out["completion_mask"] = out["completion_mask"] * keep[:, None].to(out["completion_mask"].dtype)
    if out.get("tool_mask") is not None:
        out["tool_mask"] = out["tool_mask"] * keep[:, None].to(out["tool_mask"].dtype)
    loss_mask = out["completion_mask"] if out.get("tool_mask") is None else out["completion_mask"] * out["tool_mask"]
    out["num_items_in_batch"] = acc.gather(loss_mask.sum()).sum()
    metrics = getattr(trainer, "_metrics", None)
    if metrics is not None:
        metrics["train"][KEPT_METRIC].append(keep_all.float().mean().item())
    return out
