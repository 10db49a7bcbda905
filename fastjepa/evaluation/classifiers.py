"""Classifiers on frozen features: the linear probe, the weighted k-NN and the
effective rank (see :mod:`fastjepa.eval` for why these)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .. import health
from .features import cached_features, weights_fingerprint

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
KNN_K = 20
KNN_T = 0.07


# -- probes


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    C: float | None = None,
    grid: Iterable[float] = C_GRID,
    max_iter: int = 1000,
    quiet: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Logistic regression on standardised features (see the module docstring for why).

    ``C=None`` picks the L2 strength from ``grid`` on a stratified fifth of the training
    features, then refits on all of them. Returns ``{top1, C, converged, grid_scores}``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    def fit(clf, x, y):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(x, y)
        return not any(issubclass(w.category, ConvergenceWarning) for w in caught)

    grid = tuple(sorted(grid))
    scores: dict[str, float] = {}
    # One BLAS thread: the problem is small, and on a shared or busy CPU a multi-threaded
    # BLAS inside L-BFGS's many tiny steps runs 10-50x slower than one thread.
    with threadpool_limits(limits=1):
        if C is None:
            counts = np.bincount(train_y)
            stratify = train_y if counts[counts > 0].min() >= 5 else None
            a_x, b_x, a_y, b_y = train_test_split(train_x, train_y, test_size=0.2, random_state=seed, stratify=stratify)
            sc = StandardScaler().fit(a_x)
            a_x, b_x = sc.transform(a_x), sc.transform(b_x)
            path = LogisticRegression(max_iter=max_iter, warm_start=True)  # weaker to stronger fits reuse the last solution
            for c in tqdm(grid, desc="linear probe: choosing C", disable=quiet, leave=False):
                fit(path.set_params(C=c), a_x, a_y)
                scores[repr(c)] = float((path.predict(b_x) == b_y).mean())
            C = max(grid, key=lambda c: (scores[repr(c)], -c))  # ties: the stronger penalty
        sc = StandardScaler().fit(train_x)
        clf = LogisticRegression(C=C, max_iter=max_iter)
        converged = fit(clf, sc.transform(train_x), train_y)
        top1 = float((clf.predict(sc.transform(val_x)) == val_y).mean())
    return {"top1": top1, "C": float(C), "converged": converged, "grid_scores": scores}


def knn_classify(
    train_x: np.ndarray | torch.Tensor,
    train_y: np.ndarray | torch.Tensor,
    val_x: np.ndarray | torch.Tensor,
    *,
    k: int = KNN_K,
    temperature: float = KNN_T,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN predictions (n_val,): cosine similarity, the ``k`` nearest training
    features vote for their label with weight ``exp(sim / temperature)``."""
    tx = torch.nn.functional.normalize(torch.as_tensor(train_x).float(), dim=1)  # (n_train, F)
    ty = torch.as_tensor(train_y).long()  # (n_train,)
    vx = torch.nn.functional.normalize(torch.as_tensor(val_x).float(), dim=1)  # (n_val, F)
    num_classes = int(num_classes or int(ty.max()) + 1)
    k = min(k, tx.size(0))
    preds = []
    for start in range(0, vx.size(0), chunk):
        sim = vx[start : start + chunk] @ tx.T  # (c, n_train)
        top_sim, top_idx = sim.topk(k, dim=1)  # (c, k)
        weights = (top_sim / temperature).exp()  # (c, k)
        votes = torch.zeros(sim.size(0), num_classes)  # (c, classes)
        votes.scatter_add_(1, ty[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def effective_rank(features) -> float:
    """exp(entropy) of the normalised singular values of the centred features (Roy &
    Vetterli, 2007; :func:`fastjepa.health.effective_rank`, which the trainer's live RankMe
    also uses): 1 when every image maps onto one line, ``min(n, dim)`` when all directions
    are used equally, 0 when every image gives the same features. A falling value over
    training is dimensional collapse — the pooled features spanning fewer directions —
    which the probe numbers only show later.
    """
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features: expected (n >= 2, dim), got {tuple(x.shape)}")
    return float(health.effective_rank(x, center=True))


def knn_top1(train_x, train_y, val_x, val_y, **kwargs) -> float:
    pred = knn_classify(train_x, train_y, val_x, **kwargs)
    return float((pred == torch.as_tensor(val_y).long()).double().mean())


def evaluate_encoder(
    encoder: nn.Module,
    train: Dataset,
    val: Dataset,
    *,
    layers: int = 1,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    cache_dir: Path | None = None,
    C: float | None = None,
    quiet: bool = True,
    name: str = "model",
) -> dict[str, Any]:
    """Features (cached), linear probe and k-NN for one encoder."""
    t0 = time.perf_counter()
    digest = weights_fingerprint(encoder) if cache_dir is not None else None
    common = dict(layers=layers, cache_dir=cache_dir, weights_digest=digest, batch_size=batch_size, device=device, quiet=quiet)
    tx, ty, hit_a = cached_features(encoder, train, desc=f"{name}: train features", **common)
    vx, vy, hit_b = cached_features(encoder, val, desc=f"{name}: held-out features", **common)
    t1 = time.perf_counter()
    num_classes = int(max(ty.max(), vy.max())) + 1
    probe = linear_probe(tx, ty, vx, vy, C=C, quiet=quiet)
    knn = knn_top1(tx, ty, vx, vy, num_classes=num_classes)
    return {
        "linear_probe_top1": probe["top1"],
        "knn_top1": knn,
        "linear_probe_C": probe["C"],
        "linear_probe_converged": probe["converged"],
        "linear_probe_grid": probe["grid_scores"],
        "feature_dim": int(tx.shape[1]),
        "feature_effective_rank": effective_rank(vx),  # held-out images; see effective_rank()
        "features_cached": bool(hit_a and hit_b),
        "feature_time_s": round(t1 - t0, 3),
        "probe_time_s": round(time.perf_counter() - t1, 3),
    }


