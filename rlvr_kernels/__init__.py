"""rlvr_kernels: fused Triton kernels for RLVR losses (public API, re-exported; nothing else lives here)."""
from rlvr_kernels.layout import check_cu_seqlens, cu_seqlens_from_lengths, packed_to_padded, padded_to_packed, row_lengths
from rlvr_kernels.logprobs import fused_linear_logprobs, logprobs_from_logits
from rlvr_kernels.loss import LossConfig, LossMetrics, RLVRLoss, rlvr_loss

# --- token ops (schedule / credit) ---
from rlvr_kernels.credit import (
    d3s_token_mask,
    entropy_shaped_advantages,
    forking_token_mask,
    tp_schedule_mask,
    trajectory_percentile,
)
from rlvr_kernels.schedule import TemporalSchedule
# --- token ops (cppo / delta) ---
from rlvr_kernels.cppo import CPPOMask, cppo_mask
from rlvr_kernels.delta import DeltaEstimator, delta_coefficients

__version__ = "0.1.0"
