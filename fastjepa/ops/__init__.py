"""Fused ops with pure-PyTorch references beside them.

Each op lives in its own file holding the reference (``<op>_reference``), the
autograd / custom-op wrapper and the dispatch. :func:`available` says which backends
run here; ``FASTJEPA_BACKEND`` or :func:`use_backend` forces one (the environment
variables are read once per process: :func:`reread_environment` reads them again).
"""

from ._dispatch import (
    BACKENDS,
    Availability,
    ExtensionVersionWarning,
    available,
    cpp_has_cuda,
    cpp_torch_mismatch,
    cpu_has_bf16,
    current_backend,
    reread_environment,
    triton_interpret,
    use_backend,
)
from .attention import attention, attention_available, attention_reference, current_attention, use_attention
from .gather_tokens import apply_masks, gather_tokens, gather_tokens_reference
from .linear_gelu import fused_linear_gelu_applies, linear_gelu, linear_gelu_reference
from .predictor_tokens import predictor_tokens, predictor_tokens_reference
from .rope import rope_qk, rope_qk_reference
from .smooth_l1_loss import smooth_l1_loss, smooth_l1_loss_reference
from .sorted_predictor_tokens import (
    SortedOrder,
    sorted_predictor_take_targets,
    sorted_predictor_take_targets_reference,
    sorted_predictor_tokens,
    sorted_predictor_tokens_reference,
)
from .target_tokens import target_tokens, target_tokens_reference

__all__ = [
    "BACKENDS",
    "Availability",
    "ExtensionVersionWarning",
    "apply_masks",
    "attention",
    "attention_available",
    "attention_reference",
    "available",
    "cpp_has_cuda",
    "cpp_torch_mismatch",
    "cpu_has_bf16",
    "current_attention",
    "current_backend",
    "gather_tokens",
    "gather_tokens_reference",
    "fused_linear_gelu_applies",
    "linear_gelu",
    "linear_gelu_reference",
    "predictor_tokens",
    "predictor_tokens_reference",
    "reread_environment",
    "rope_qk",
    "rope_qk_reference",
    "smooth_l1_loss",
    "smooth_l1_loss_reference",
    "SortedOrder",
    "sorted_predictor_take_targets",
    "sorted_predictor_take_targets_reference",
    "sorted_predictor_tokens",
    "sorted_predictor_tokens_reference",
    "target_tokens",
    "target_tokens_reference",
    "triton_interpret",
    "use_attention",
    "use_backend",
]
