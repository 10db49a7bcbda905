"""``optimization.time_budget_s``: fit a run's epochs to a wall-time budget.

The default CPU run must finish in a few minutes on any 2-core machine, with or without
bf16 matrix units (the fp32 path is 1.5-4x slower per step). Instead of a fixed epoch
count tuned for one machine, the trainer times a few real optimizer steps before
training, on the run's own model and data, restores every piece of state those steps
touched (weights, EMA target, optimizer state, RNG), and then trains
``min(optimization.epochs, what fits the budget)`` epochs. It only ever lowers the epoch
count, and it says what it chose. When not even one epoch fits, it cuts within the first
epoch: the run trains ``optimization.budget_steps`` optimizer steps (what fits, at least
one), its schedules compressed to that length (warmup keeps its share of the run), and
the printed expectation says so.

The chosen count (epochs, and the step cut) is part of the run's resolved config
(``config.yaml``), so ``--resume`` reads it from there instead of measuring again: a
resumed run keeps its schedule.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# per-step cost the timed steps do not see: data loading, logging, the end-of-epoch checkpoint
OVERHEAD = 1.15
WARMUP_STEPS = 1  # the first step pays one-time allocation and dispatch costs
TIMED_STEPS = 2


@dataclass(frozen=True)
class Plan:
    epochs: int  # epochs the run will train
    configured_epochs: int  # optimization.epochs
    step_s: float  # measured seconds per optimizer step (0 where nothing was measured)
    steps_per_epoch: int
    budget_s: float
    steps: int | None = None  # optimizer steps of the whole run when it is cut within epoch 1 (None: whole epochs)

    @property
    def expected_s(self) -> float:
        steps = self.steps if self.steps is not None else self.epochs * self.steps_per_epoch
        return steps * self.step_s * OVERHEAD

    def describe(self) -> str:
        if self.step_s == 0:
            what = (f"{self.steps} of the {self.steps_per_epoch} steps of epoch 1" if self.steps is not None
                    else f"{self.epochs} epoch(s)")  # fmt: skip
            return (f"fastjepa: {what}, as chosen for optimization.time_budget_s={self.budget_s:g} "
                    "when the run started (from its config.yaml)")  # fmt: skip
        if self.steps is not None:
            epoch_s = self.steps_per_epoch * self.step_s * OVERHEAD
            return (
                f"fastjepa: expected training time ~{self.expected_s:.0f} s: one epoch ({self.steps_per_epoch} steps, "
                f"~{epoch_s:.0f} s) does not fit optimization.time_budget_s={self.budget_s:g}, so the run stops after "
                f"{self.steps} steps of epoch 1 at {1000 * self.step_s:.0f} ms/step (measured; schedules fitted to "
                f"{self.steps} steps)"
            )
        what = (
            f"{self.epochs} epoch(s)"
            if self.epochs == self.configured_epochs
            else f"{self.epochs} of the configured {self.configured_epochs} epochs"
        )
        return (
            f"fastjepa: expected training time ~{self.expected_s:.0f} s: {what} x {self.steps_per_epoch} steps at "
            f"{1000 * self.step_s:.0f} ms/step (measured; optimization.time_budget_s={self.budget_s:g})"
        )


def epochs_for_budget(budget_s: float, step_s: float, steps_per_epoch: int, max_epochs: int) -> int:
    """The most epochs (at least 1, at most ``max_epochs``) whose steps fit ``budget_s``."""
    if step_s <= 0 or steps_per_epoch <= 0:
        return max_epochs
    fit = math.floor(budget_s / (steps_per_epoch * step_s * OVERHEAD))
    return max(1, min(max_epochs, fit))


def steps_for_budget(budget_s: float, step_s: float, steps_per_epoch: int) -> int | None:
    """When one epoch of ``steps_per_epoch`` steps does not fit ``budget_s``: the steps that
    do (at least 1); None when an epoch fits (or nothing was measured)."""
    if step_s <= 0 or steps_per_epoch <= 0 or budget_s >= steps_per_epoch * step_s * OVERHEAD:
        return None
    return max(1, min(steps_per_epoch - 1, math.floor(budget_s / (step_s * OVERHEAD))))


def measure_step_seconds(step, dataset) -> float:
    """Seconds per optimizer step of ``step`` (a :class:`fastjepa.training.step.Step`), timed
    on a batch of the run's ``dataset``.

    Every piece of state a step touches is put back afterwards, bit for bit: the model
    (encoder, predictor, EMA target), the optimizer state, the global RNGs, the mask
    collator (a new one draws the masks) and the dataset (samples are read, not iterated).
    """
    from ..masks import MaskCollator
    from ..rng import rng_state, set_rng_state

    model_state = copy.deepcopy(step.model.state_dict())
    opt_state = copy.deepcopy(step.optimizer.state_dict())
    rng = rng_state()
    try:
        collator = MaskCollator.from_config(step.cfg, rank=step.dist.rank, world_size=step.dist.world_size)
        samples = [dataset[i % len(dataset)] for i in range(step.cfg["data"]["batch_size"])]
        imgs, masks_enc, masks_pred = step.to_device(*collator(samples))
        times = []
        with step.backend():
            for i in range(WARMUP_STEPS + TIMED_STEPS):
                if step.device.type == "cuda":
                    torch.cuda.synchronize(step.device)
                t0 = time.perf_counter()
                float(step.step(imgs, masks_enc, masks_pred, index=0).loss)  # waits for the step
                if i >= WARMUP_STEPS:
                    times.append(time.perf_counter() - t0)
    finally:
        step.model.load_state_dict(model_state)
        step.optimizer.load_state_dict(opt_state)
        step.optimizer.zero_grad(set_to_none=True)
        set_rng_state(rng)
    step_s = sum(times) / len(times)
    dist = step.dist
    if dist.enabled:  # every rank must train the same number of epochs: the slowest decides
        t = torch.tensor([step_s], dtype=torch.float64, device=step.device if step.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        step_s = float(t)
    return step_s


def resumed_epochs(out: Path) -> int | None:
    """The epoch count a budgeted run chose, from its folder's ``config.yaml`` (None if absent)."""
    return resumed_choice(out)[0]


def resumed_choice(out: Path) -> tuple[int | None, int | None]:
    """(epochs, step cut or None) a budgeted run chose, from its folder's ``config.yaml``
    ((None, None) if absent)."""
    from ..config import read_yaml

    path = Path(out) / "config.yaml"
    if not path.is_file():
        return None, None
    saved = read_yaml(path).get("optimization", {})
    if not isinstance(saved, dict):
        return None, None
    epochs, steps = saved.get("epochs"), saved.get("budget_steps")
    ok = isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1
    cut = steps if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1 else None
    return (epochs, cut) if ok else (None, None)


def plan(cfg: dict, out: Path, steps_per_epoch: int, measure, *, resume: bool) -> Plan | None:
    """Decide the run's epochs under ``optimization.time_budget_s`` (None: no budget set);
    ``measure()`` times a step (:func:`measure_step_seconds`), called only where the run
    does not resume a choice already made (``out``'s ``config.yaml``)."""
    opt = cfg["optimization"]
    budget = opt["time_budget_s"]
    if budget is None:
        return None
    configured = opt["epochs"]
    if resume:
        chosen, cut = resumed_choice(out)
        if chosen is not None:
            return Plan(chosen, configured, 0.0, steps_per_epoch, budget, cut)
    step_s = measure()
    cut = steps_for_budget(budget, step_s, steps_per_epoch)
    return Plan(epochs_for_budget(budget, step_s, steps_per_epoch, configured), configured, step_s, steps_per_epoch, budget, cut)
