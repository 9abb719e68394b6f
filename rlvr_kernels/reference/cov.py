"""Plain-torch token selections of the covariance objectives (Clip-Cov and KL-Cov, "The Entropy Mechanism of
Reinforcement Learning for Reasoning Language Models", Cui et al., arXiv 2505.22617).

Both rank a batch's loss tokens by the centred product of advantage and log-prob,
``cov_t = (A_t - mean A) (log p_t - mean log p)`` (means over the batch's loss tokens), the per-token share of the
covariance that drives the policy's entropy down, and treat a small fraction of the tokens differently:

- KL-Cov: the ``max(1, int(n kl_cov_ratio))`` tokens of largest ``cov_t`` take a KL penalty;
- Clip-Cov: among the tokens the PPO clip does not already clip whose ``cov_t`` lies in ``(clip_cov_lb, clip_cov_ub)``,
  a uniformly random subset of ``max(1, int(n clip_cov_ratio))`` (or all of them, if fewer) loses its gradient.

The batch is the tokens the call sees (verl: one micro-batch). The selections are detached; ties and the random draw
follow verl 0.9.1's ``compute_policy_loss_kl_cov`` / ``compute_policy_loss_clip_cov`` exactly (same candidate order,
one ``torch.randperm`` from the default generator), so a seeded run selects the same tokens.
"""

from __future__ import annotations

import torch


def kl_cov_selection(adv: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool ``[B, T]``: the KL-Cov tokens. ``adv`` / ``logp`` ``[B, T]`` (read only where ``mask != 0``), ``ratio``
    in (0, 1]."""
    with torch.no_grad():
        valid = mask != 0
        sel = torch.zeros_like(valid)
        a = adv[valid].float()
        lp = logp[valid].float()
        n = a.numel()
        if n == 0:
            return sel
        cov = (a - a.mean()) * (lp - lp.mean())
        k = max(1, int(n * ratio))
        top = torch.topk(cov, k, largest=True).indices
        flat = torch.nonzero(valid.reshape(-1), as_tuple=True)[0][top]
        sel.view(-1)[flat] = True
        return sel


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x, 0.0).sum() / (valid.sum() + 1e-8)


def clip_cov_selection(
    adv: torch.Tensor,
    logp: torch.Tensor,
    old: torch.Tensor,
    mask: torch.Tensor,
    *,
    ratio: float,
    lb: float,
    ub: float,
    clip_low: float,
    clip_high: float,
) -> torch.Tensor:
    """Bool ``[B, T]``: the Clip-Cov tokens (their gradient is dropped). ``old``: the behaviour log-probs of the PPO
    ratio; ``clip_low`` / ``clip_high``: the PPO clip ``[1 - clip_low, 1 + clip_high]`` (its clipped tokens are never
    candidates); ``(lb, ub)``: the open band of ``cov_t``; ``ratio`` in (0, 1]."""
    with torch.no_grad():
        valid = mask != 0
        a = torch.where(valid, adv.float(), 0.0)
        lp = torch.where(valid, logp.float(), 0.0)
        r = torch.exp(lp - torch.where(valid, old.float(), 0.0))
        l1 = -a * r
        l2 = -a * r.clamp(1.0 - clip_low, 1.0 + clip_high)
        clipped = (l2 > l1) & valid
        cov = (a - _masked_mean(a, valid)) * (lp - _masked_mean(lp, valid))
        cov = torch.where(valid & ~clipped, cov, -torch.inf)
        n_clip = max(int(ratio * float(valid.sum().item())), 1)
        cand = torch.nonzero((cov < ub) & (cov > lb) & valid)
        sel = torch.zeros_like(valid)
        if len(cand) > 0:
            cand = cand[torch.randperm(len(cand))[: min(n_clip, len(cand))]]
            sel[cand[:, 0], cand[:, 1]] = True
        return sel
