"""rlvr_kernels: fused Triton kernels for RLVR losses (public API, re-exported; nothing else lives here)."""

# Three sections, imported in this order (layout, log-probs and the loss; then the token ops); `isort: split` keeps
# the import sorter from merging them.
from rlvr_kernels.layout import (
    check_cu_seqlens,
    cu_seqlens_from_lengths,
    packed_to_padded,
    padded_to_packed,
    row_lengths,
)
from rlvr_kernels.logprobs import fused_linear_logprobs, logprobs_from_logits
from rlvr_kernels.loss import LossConfig, LossMetrics, RLVRLoss, rlvr_loss

# isort: split
# --- token ops (schedule / credit) ---
from rlvr_kernels.credit import (
    d3s_token_mask,
    entropy_shaped_advantages,
    forking_token_mask,
    tp_schedule_mask,
    trajectory_percentile,
)
from rlvr_kernels.rollouts import d3s_select_rollouts
from rlvr_kernels.schedule import TemporalSchedule

# isort: split
# --- token ops (cppo / delta) ---
from rlvr_kernels.cppo import CPPOMask, cppo_mask
from rlvr_kernels.delta import DeltaEstimator, delta_coefficients

# isort: split
# --- the installation: versions, backends, native kernels ---
from rlvr_kernels._info import info

__version__ = "0.1.0"

# Every public name, in the order of the imports above; `from rlvr_kernels import *` gives exactly these.
__all__ = [
    # layout helpers (padded <-> packed, cu_seqlens)
    "check_cu_seqlens",
    "cu_seqlens_from_lengths",
    "packed_to_padded",
    "padded_to_packed",
    "row_lengths",
    # log-probs and entropies
    "fused_linear_logprobs",
    "logprobs_from_logits",
    # the loss
    "LossConfig",
    "LossMetrics",
    "RLVRLoss",
    "rlvr_loss",
    # token ops: schedule and credit
    "d3s_token_mask",
    "entropy_shaped_advantages",
    "forking_token_mask",
    "tp_schedule_mask",
    "trajectory_percentile",
    "d3s_select_rollouts",
    "TemporalSchedule",
    # token ops: CPPO and DelTA
    "CPPOMask",
    "cppo_mask",
    "DeltaEstimator",
    "delta_coefficients",
    # the installation
    "info",
]
