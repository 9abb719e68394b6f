"""RLVRLoss: GRPO-family objectives with credit allocation on top, from hidden states; a drop-in for Liger's
``LigerFusedLinearGRPOLoss`` (same constructor and forward keywords, same ``(loss, metrics)`` return).

Order of composition (``docs/methods/objectives.md``): (1) the credit **mask** (TP-Schedule, forking tokens, D^3S)
shrinks the loss mask; (2) the **advantage shaping** (entropy-shaped advantages, DelTA coefficients) rescales A per
token; (3) the **trust region** of the objective (PPO clip, CISPO, DPPO, CPPO mask); (4) the **aggregation** over the
tokens that remain: every normaliser that counts tokens counts the active ones. The methods are entries of the
catalogue :mod:`rlvr_kernels.methods`.

Two paths, one set of numbers:
- composable: ``fused_linear_logprobs`` under autograd, the token pass in plain torch (4 GEMM-equivalents);
- fused (default when the loss needs a gradient): sequence-aligned token chunks (or row segments for token-local
  losses whose rows do not fit a chunk), loss and gradients in one pass (3 GEMM-equivalents, one chunk buffer), as
  one custom op (``rlvr_kernels::fused_loss``).
Both trace under ``torch.compile(fullgraph=True)`` without a graph break (see :class:`RLVRLoss` for the value checks
under compile).

Modules: ``config`` (LossConfig), ``token_pass`` (the per-token math and its records), ``fused`` (the fused path),
``metrics`` (LossMetrics), ``api`` (RLVRLoss, rlvr_loss, input checks); the objectives' math is
``rlvr_kernels/reference/loss.py``.
"""

from rlvr_kernels.loss.api import RLVRLoss, rlvr_loss
from rlvr_kernels.loss.config import LossConfig, token_local
from rlvr_kernels.loss.metrics import LossMetrics
from rlvr_kernels.loss.token_pass import Rows, TokenSums, token_pass

__all__ = ["LossConfig", "LossMetrics", "RLVRLoss", "Rows", "TokenSums", "rlvr_loss", "token_local", "token_pass"]
