"""Frozen-feature evaluation, run by ``python -m fastjepa.eval`` and at the end of training
(docs/eval.md). The encoder to evaluate comes from :mod:`fastjepa.encoder`.

* :mod:`.features`: the evaluation images and their pooled features, cached on disk by a
  digest of weights, data and settings.
* :mod:`.classifiers`: the linear probe, the weighted k-NN and the effective rank.
* :mod:`.probe`: the score table, ``eval.json`` and the end-of-training quick probe.
"""
