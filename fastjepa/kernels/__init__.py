"""fastjepa's Triton kernels and their launchers (no autograd; see ``fastjepa.ops``).

Each module holds ``@triton.jit`` kernels and plain launchers that allocate outputs and
pick tile sizes. ``fastjepa.ops`` imports this package on first use, so that
``import fastjepa`` does not import Triton.
"""

from .gather_tokens import gather_tokens_bwd, gather_tokens_fwd
from .predictor_tokens import predictor_tokens_bwd, predictor_tokens_fwd
from .smooth_l1_loss import smooth_l1_loss_bwd, smooth_l1_loss_fwd
from .sorted_predictor_tokens import (
    sorted_predictor_take_bwd,
    sorted_predictor_take_fwd,
    sorted_predictor_tokens_bwd,
    sorted_predictor_tokens_fwd,
)
from .target_tokens import target_tokens_fwd

__all__ = [
    "gather_tokens_bwd",
    "gather_tokens_fwd",
    "predictor_tokens_bwd",
    "predictor_tokens_fwd",
    "smooth_l1_loss_bwd",
    "smooth_l1_loss_fwd",
    "sorted_predictor_take_bwd",
    "sorted_predictor_take_fwd",
    "sorted_predictor_tokens_bwd",
    "sorted_predictor_tokens_fwd",
    "target_tokens_fwd",
]
