"""The parts of the training loop; :class:`fastjepa.trainer.Trainer` joins them.

* :mod:`.optim`: the optimizer and the autocast dtype.
* :mod:`.step`: one optimizer step (schedules, micro-batches, the ``nan_policy=skip``
  decision on the device, the EMA update) and its gradient statistics.
* :mod:`.logs`: the console lines, ``log.csv``, TensorBoard / W&B scalars.
* :mod:`.checkpointing`: checkpoints and resume, signals, non-finite losses, ranks that disagree.
* :mod:`.time_budget`: the measured plan for ``optimization.time_budget``.
"""
