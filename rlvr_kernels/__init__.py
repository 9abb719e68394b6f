"""rlvr_kernels: fused Triton kernels for RLVR losses (public API, re-exported; nothing else lives here)."""
from rlvr_kernels.layout import check_cu_seqlens, cu_seqlens_from_lengths, packed_to_padded, padded_to_packed, row_lengths
from rlvr_kernels.logprobs import fused_linear_logprobs, logprobs_from_logits

# --- token ops (schedule / credit) ---
# --- token ops (cppo / delta) ---

__version__ = "0.1.0"
