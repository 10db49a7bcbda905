"""Pieces the integrations share: identifying the imported codebase, fast-path checks."""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping

import torch

from ._patching import CodebaseMismatch, describe_package, imported

Check = Callable[[types.ModuleType], "str | None"]  # a problem found in the module, or None


def identify(api: str, codebase: str, package: str, checks: Mapping[str, Check], hint: str) -> dict[str, types.ModuleType]:
    """The imported modules of ``codebase`` named in ``checks``, each checked.

    Raises :class:`CodebaseMismatch` naming what was expected and what was found when none
    of them is imported or one of them is not what ``codebase`` has there.
    """
    found = imported(checks)
    if not found:
        raise CodebaseMismatch(
            f"{api}: nothing of {codebase} is imported: expected at least one of {', '.join(checks)}; "
            f"found {describe_package(package)}. {hint}"
        )
    problems = [f"{name}: {p}" for name, mod in found.items() if (p := checks[name](mod)) is not None]
    if problems:
        raise CodebaseMismatch(
            f"{api}: the imported {package!r} is not {codebase}: " + "; ".join(problems)
            + f" (found {describe_package(package)})"
        )
    return found


def has_attrs(module: types.ModuleType, *names: str) -> str | None:
    missing = [n for n in names if not hasattr(module, n)]
    return f"expected {', '.join(names)}, missing {', '.join(missing)}" if missing else None


def masks_list(masks) -> list[torch.Tensor] | None:
    """``masks`` as a list of 2-D integer tensors, or None when the fused path does not apply."""
    if isinstance(masks, torch.Tensor) or not isinstance(masks, (list, tuple)) or not masks:
        return None
    for m in masks:
        if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.dtype not in (torch.int32, torch.int64):
            return None
    return list(masks)


def masks_applies(masks, B: int, *, same_length: bool = True) -> list[torch.Tensor] | None:
    """``masks`` as a list of (B, K) index tensors (K > 0, equal unless not ``same_length``), else None."""
    masks = masks_list(masks)
    if masks is None or any(m.size(0) != B or m.size(1) == 0 for m in masks):
        return None
    if same_length and any(m.shape != masks[0].shape for m in masks):
        return None
    return masks


def gather_applies(x, masks, *, same_length: bool = True) -> list[torch.Tensor] | None:
    """The mask list when ``fastjepa.ops.gather_tokens`` computes what the reference gather does."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        return None
    return masks_applies(masks, x.size(0), same_length=same_length)


def pos_applies(pos, x: torch.Tensor) -> bool:
    """A (1, N, D) table for (B, N, D) tokens, as the fused gather's pos-embed takes."""
    return (
        isinstance(pos, torch.Tensor) and pos.dim() == 3 and pos.size(0) == 1
        and pos.size(1) == x.size(1) and pos.size(2) == x.size(2) and pos.device == x.device
    )


def repeat_interleave_batch(original):
    """``repeat_interleave_batch(x, B, repeat)`` as one ``torch.repeat_interleave`` copy."""
    from ._patching import replaces

    @replaces(original)
    def repeat_interleave_batch(x, B, repeat):
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or not isinstance(B, int) or not isinstance(repeat, int):
            return original(x, B, repeat)
        if B <= 0 or repeat <= 0 or len(x) == 0 or len(x) % B:
            return original(x, B, repeat)  # the reference's own behaviour (it drops a ragged tail)
        n = len(x) // B
        chunks = x.reshape(n, B, *x.shape[1:])  # (n, B, ...)
        return chunks.repeat_interleave(repeat, dim=0).reshape(n * repeat * B, *x.shape[1:])  # c0 c0 … c1 c1 …

    return repeat_interleave_batch


def repeat_interleave_batch_patches(mods: Mapping[str, types.ModuleType]) -> list:
    """The ``repeat_interleave_batch`` provider both reference codebases share: their
    ``src.utils.tensors`` function (and its ``from … import`` copies) -> one copy."""
    from ._patching import function_patches

    if "src.utils.tensors" not in mods:
        return []
    original = mods["src.utils.tensors"].repeat_interleave_batch
    return function_patches(original, repeat_interleave_batch(original))
