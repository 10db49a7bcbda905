"""``IJEPA``: encoder, predictor and EMA target encoder, with the loss of docs/design.md §5."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn

from .. import ops
from .vision_transformer import VisionTransformer, VisionTransformerPredictor

EMA_MODES = ("foreach", "reference")


def _reshard(net: nn.Module) -> None:
    """FSDP2 keeps a root module's parameters gathered after forward (it expects a
    backward); the target encoder never has one, so shard it back explicitly."""
    if hasattr(net, "reshard"):
        net.reshard()


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), else the tensor itself. Duck-typed, so that
    importing the model does not import ``torch.distributed``."""
    return t.to_local() if hasattr(t, "to_local") else t


class IJEPA(nn.Module):
    """I-JEPA's three networks and one training objective.

    ``forward(imgs, masks_enc, masks_pred)`` returns the scalar smooth-L1 loss between
    the predictor's output for the target blocks and the layer-normed target-encoder
    tokens at those blocks. ``update_target(momentum)`` moves the target encoder towards
    the encoder (``target = m·target + (1 − m)·encoder``); call it after the optimizer step.
    """

    def __init__(self, encoder: VisionTransformer, predictor: VisionTransformerPredictor, target_encoder: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor
        self.target_encoder = copy.deepcopy(encoder) if target_encoder is None else target_encoder
        for p in self.target_encoder.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def forward_target(self, imgs: torch.Tensor, masks_pred: Sequence[torch.Tensor], nenc: int) -> torch.Tensor:
        h = self.target_encoder(imgs)  # (B, N, D)
        _reshard(self.target_encoder)
        return ops.target_tokens(h, masks_pred, nenc)  # (npred·nenc·B, Kt, D)

    def forward_context(self, imgs: torch.Tensor, masks_enc: Sequence[torch.Tensor], masks_pred: Sequence[torch.Tensor]) -> torch.Tensor:
        z = self.encoder(imgs, masks_enc)  # (nenc·B, Kc, D)
        return self.predictor(z, masks_enc, masks_pred)  # (npred·nenc·B, Kt, D)

    def forward(
        self,
        imgs: torch.Tensor,
        masks_enc: torch.Tensor | Sequence[torch.Tensor],
        masks_pred: torch.Tensor | Sequence[torch.Tensor],
    ) -> torch.Tensor:
        masks_enc = [masks_enc] if isinstance(masks_enc, torch.Tensor) else list(masks_enc)
        masks_pred = [masks_pred] if isinstance(masks_pred, torch.Tensor) else list(masks_pred)
        h = self.forward_target(imgs, masks_pred, len(masks_enc))
        z = self.forward_context(imgs, masks_enc, masks_pred)
        # the targets as they come (fp32 from the layer norm under CUDA autocast), never
        # rounded to the predictions' bf16: the loss promotes, as the reference's does
        return ops.smooth_l1_loss(z, h)

    @torch.no_grad()
    def update_target(self, momentum: float, mode: str = "foreach", *, skip: torch.Tensor | None = None) -> None:
        """EMA of the encoder into the target encoder, as one foreach update.

        ``mode="reference"`` is the reference's per-parameter Python loop (same values to
        rounding; kept for the benchmarks' baseline). ``skip``: an optional one-element
        tensor on the parameters' device; where it is nonzero the target stays exactly as
        it is, decided on the device (no host sync; the trainer's ``nan_policy=skip``).
        """
        if mode not in EMA_MODES:
            raise ValueError(f"update_target: mode={mode!r}, expected one of {', '.join(EMA_MODES)}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"update_target: momentum={momentum!r}, expected a value in [0, 1]")
        # under FSDP2 both networks are sharded alike: lerp the matching local shards
        _reshard(self.encoder)
        _reshard(self.target_encoder)
        q = [local_shard(p.detach()) for p in self.encoder.parameters()]
        k = [local_shard(p.detach()) for p in self.target_encoder.parameters()]
        if len(q) != len(k):
            raise RuntimeError(f"update_target: encoder has {len(q)} parameters, target {len(k)}")
        if skip is not None:
            if skip.numel() != 1:
                raise ValueError(f"update_target: skip has {skip.numel()} elements, expected one (a flag)")
            keep = skip.reshape(()) != 0
        if mode == "reference":
            for pq, pk in zip(q, k):
                if skip is None:
                    pk.mul_(momentum).add_((1.0 - momentum) * pq)
                else:
                    pk.copy_(torch.where(keep, pk, pk * momentum + (1.0 - momentum) * pq))
        elif skip is None:
            torch._foreach_lerp_(k, q, 1.0 - float(momentum))
        elif k:
            # the same lerp with the weight as a tensor: 1 - m, or 0 (k + 0·(q - k) == k)
            w = torch.where(keep, 0.0, torch.full((), 1.0 - float(momentum), dtype=k[0].dtype, device=k[0].device))
            torch._foreach_lerp_(k, q, [w] * len(k))
