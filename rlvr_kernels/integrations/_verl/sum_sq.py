"""The sum of squared probabilities per token (verl's ``sum_pi_squared``, the optimal-token baseline's input) from
hidden states and an lm_head (or a vocabulary shard of it), without the logits: shared by the FSDP forward
(:mod:`.forward`) and the Megatron forward (:mod:`.megatron`)."""

from __future__ import annotations

import torch


def log_sum_sq_rows(hidden, weight, bias, temperature, backend: str):
    """``(log sum_v p_v^2, lse)`` fp32 ``[N]`` (fp64 for fp64 inputs) of ``softmax((hidden @ weight.T + bias) /
    temperature)`` for ``hidden [N, H]`` (already in the GEMM dtype): one pass of the package's chunked vocabulary
    pass with the ``log_sum_sq_probs`` extra output (the one TRL's drop-in uses); the ``[N, V]`` logits are never
    materialised. Not differentiable (verl's optimal-token baseline reads it in ``compute_log_prob`` only). With
    ``weight`` a vocabulary shard, both are the shard's (``lse`` over its columns), for the exact combination
    across shards. ``temperature``: a number, or a float tensor with one temperature per row of ``hidden`` (verl's
    per-sample temperature expanded per token): one pass per distinct value, over that value's rows."""
    if isinstance(temperature, torch.Tensor) and temperature.numel() != 1:
        return _log_sum_sq_rows_per_token(hidden, weight, bias, temperature, backend)
    if isinstance(temperature, torch.Tensor):
        temperature = float(temperature.item())
    from rlvr_kernels._backend import resolve_backend
    from rlvr_kernels.vocab_pass import linear_forward_extras

    which = resolve_backend(backend, hidden.device)
    if hidden.dtype == torch.float64:
        which = "torch"
    with torch.no_grad(), torch.autocast(device_type=hidden.device.type, enabled=False):
        x = hidden.detach().reshape(-1, hidden.shape[-1])
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # the target is irrelevant here
        b = None if bias is None else bias.detach()
        _, _, lse, ex = linear_forward_extras(
            x, weight.detach(), b, t, 1.0 / float(temperature), 1.0, None, ("log_sum_sq_probs",), which
        )
    out = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return ex["log_sum_sq_probs"].to(out), lse.to(out)


def _log_sum_sq_rows_per_token(hidden, weight, bias, temperature, backend: str):
    """:func:`log_sum_sq_rows` with one temperature per row: the rows grouped by temperature (a per-sample
    temperature has a few distinct values), one vocabulary pass per group, scattered back in row order."""
    x = hidden.reshape(-1, hidden.shape[-1])
    temp = temperature.detach().reshape(-1)
    if temp.shape[0] != x.shape[0]:
        raise ValueError(f"temperature has {temp.shape[0]} values for {x.shape[0]} rows (one per token)")
    if not bool(torch.isfinite(temp).all()) or not bool((temp > 0).all()):
        raise ValueError("temperature must be > 0 and finite on every token")
    out = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    lss = torch.empty(x.shape[0], dtype=out, device=x.device)
    lse = torch.empty_like(lss)
    values, groups = torch.unique(temp, return_inverse=True)
    for i, value in enumerate(values.tolist()):
        rows = (groups == i).nonzero().squeeze(1)
        a, b = log_sum_sq_rows(x.index_select(0, rows), weight, bias, value, backend)
        lss[rows], lse[rows] = a, b
    return lss, lse
