"""LR, weight-decay and EMA-momentum schedules (docs/design.md §5).

All three are pure functions of the global step, so a resumed run recomputes them from
the restored step counter; the small classes hold the constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosineLR:
    """Linear warmup ``start_lr → ref_lr`` over ``warmup_steps``, then cosine to ``final_lr``.

    ``value(step)`` with the step counter starting at 1 (the reference steps its scheduler
    before each optimizer step).
    """

    start_lr: float
    ref_lr: float
    final_lr: float
    warmup_steps: int
    T_max: int  # total steps, warmup included

    def value(self, step: int) -> float:
        if step < self.warmup_steps:
            progress = step / max(1, self.warmup_steps)
            return self.start_lr + progress * (self.ref_lr - self.start_lr)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.T_max - self.warmup_steps))  # past T_max: final_lr
        return max(self.final_lr, self.final_lr + (self.ref_lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class CosineWD:
    """Cosine from ``ref_wd`` to ``final_wd`` over ``T_max`` steps (increases in published configs)."""

    ref_wd: float
    final_wd: float
    T_max: int

    def value(self, step: int) -> float:
        progress = min(1.0, step / max(1, self.T_max))
        wd = self.final_wd + (self.ref_wd - self.final_wd) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.final_wd <= self.ref_wd:
            return max(self.final_wd, wd)
        return min(self.final_wd, wd)


@dataclass(frozen=True)
class LinearMomentum:
    """EMA momentum ``ema[0] → ema[1]`` linearly over ``T_max`` steps; step 0 is exactly
    ``ema[0]``, and past ``T_max`` (a resumed run whose step count outgrew its schedule) it
    stays ``ema[1]``: a momentum above 1 would push the target away from the encoder."""

    start: float
    end: float
    T_max: int

    def value(self, step: int) -> float:
        return self.start + min(step, max(1, self.T_max)) * (self.end - self.start) / max(1, self.T_max)
