"""The pieces of ``python -m fastjepa.eval`` (:mod:`fastjepa.eval`, which re-exports them).

* :mod:`.features`: the encoder to evaluate (a fastjepa or reference checkpoint, a
  safetensors export, or the random initialisation), the evaluation images, and their
  pooled features, cached on disk by a digest of weights, data and settings.
* :mod:`.classifiers`: the linear probe, the weighted k-NN and the effective rank.
"""
