"""The parts of the training loop; :class:`fastjepa.training.trainer.Trainer` has one of each.

* :mod:`.optim`: the optimizer and the autocast dtype.
* :mod:`.step`: :class:`~.step.Step`, one optimizer step (schedules, micro-batches, the
  ``nan_policy=skip`` decision on the device, the EMA update, gradient statistics, health tensors).
* :mod:`.checkpointing`: :class:`~.checkpointing.Checkpointer`, checkpoints and resume.
* :mod:`.stopping`: :class:`~.stopping.Stopper`, signals, the NaN policy, the collapse
  detector and the cross-rank stop agreement.
* :mod:`.logs`: :class:`~.logs.RunLog`, the console lines, ``log.csv``, TensorBoard / W&B scalars.
* :mod:`.time_budget`: the measured plan for ``optimization.time_budget``.
* :mod:`.runfolder`, :mod:`.cpu`: the output folder's lock; threads for the free cores.
"""


def __getattr__(name: str):
    # ``fastjepa.training.Trainer`` without loading torch on ``import fastjepa.training.cpu``
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
