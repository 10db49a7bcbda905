"""The rooms of the training loop; :class:`fastjepa.trainer.Trainer` joins them.

* :mod:`.setup`: the device, the model, the optimizer, autocast, seeds and RNG state.
* :mod:`.step`: one optimizer step (schedules, micro-batches, the ``nan_policy=skip``
  decision on the device, the EMA update) and its gradient statistics.
* :mod:`.logs`: the console lines, ``log.csv``, TensorBoard / W&B scalars.
* :mod:`.faults`: checkpoints and resume, signals, non-finite losses, ranks that disagree.
"""
