"""A tiny bf16 Trainer on cuda:0 and a batch on its device, for the training step's `gpu` cases."""

from fastjepa.config import load_config
from fastjepa.training.trainer import Trainer

from .._tiny import TINY


def cuda_trainer(out, *overrides) -> Trainer:
    cfg = load_config(None, [*TINY, "meta.device=cuda", "meta.use_bfloat16=true", *overrides])
    return Trainer(cfg, out, quiet=True)


def cuda_batch(t: Trainer, first: int = 0):
    """A collated batch of 8 on the trainer's device (the masks drawn once, by ``t``'s collator)."""
    udata, masks_enc, masks_pred = t.collator([t.dataset[i] for i in range(first, first + 8)])
    return t.stepper.to_device(udata, masks_enc, masks_pred)
