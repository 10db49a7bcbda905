"""Representation-health metrics: effective rank (RankMe), spread, prediction cosine.

Pure torch, on whatever device the features are (no host read): the trainer computes
them at its log steps from tensors the step already has and reads them with the losses;
:mod:`fastjepa.evaluation` computes the same rank on held-out features. See docs/eval.md
("Representation health").
"""

from __future__ import annotations

import math

import torch

__all__ = ["HEALTH_COLUMNS", "CollapseDetector", "effective_rank", "pooled", "pred_target_cosine", "rankme", "spread"]

# the scalars of one log step, in this order (log.csv columns, TensorBoard tags)
HEALTH_COLUMNS = ("target_rankme", "target_std", "context_rankme", "context_std", "pred_std", "pred_target_cos")


def effective_rank(x: torch.Tensor, *, center: bool = False, max_rows: int | None = None) -> torch.Tensor:
    """exp(entropy) of the normalised singular values of the (n, dim) matrix ``x``, as a
    0-dim tensor on ``x``'s device (fp64 for fp64 features, else fp32).

    ``center=False`` is RankMe (Garrido et al., ICML 2023): the features as they are.
    ``center=True`` subtracts the mean row first (Roy & Vetterli, 2007), so an offset shared
    by every row does not count as a direction. Rank-k features with equal singular values
    give k; features using every direction equally give ``min(n, dim)``; all-zero features
    (nothing spanned) give 0. ``max_rows``: only the first rows (a fixed cost: the SVD of an
    (n, dim) matrix costs O(n·dim·min(n, dim))). Non-finite features give NaN.
    """
    if x.dim() != 2 or x.size(0) < 1:
        raise ValueError(f"effective_rank: expected features of shape (n >= 1, dim), got {tuple(x.shape)}")
    if max_rows is not None:
        x = x[:max_rows]
    x = x.detach()
    x = x.double() if x.dtype == torch.float64 else x.float()
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    # non-finite features give NaN, decided on the device (the SVD would raise: a host read)
    finite = torch.isfinite(x).all()
    s = torch.linalg.svdvals(torch.where(finite, x, torch.zeros_like(x)))
    total = s.sum()
    p = s / total.clamp_min(torch.finfo(s.dtype).tiny)
    entropy = -torch.special.xlogy(p, p).sum()
    # no direction at all: 0 (the formula alone would give exp(0) = 1)
    rank = torch.where(total > 0, entropy.exp(), torch.zeros_like(entropy))
    return torch.where(finite, rank, torch.full_like(rank, float("nan")))


def rankme(x: torch.Tensor, *, max_rows: int | None = None) -> torch.Tensor:
    """RankMe of (n, dim) features: :func:`effective_rank` without centring."""
    return effective_rank(x, center=False, max_rows=max_rows)


def pooled(tokens: torch.Tensor) -> torch.Tensor:
    """(rows, tokens, dim) -> (rows, dim) fp32: the mean token, as evaluation pools features."""
    if tokens.dim() != 3:
        raise ValueError(f"pooled: expected (rows, tokens, dim), got {tuple(tokens.shape)}")
    return tokens.detach().float().mean(dim=1)


def spread(x: torch.Tensor) -> torch.Tensor:
    """The std of (n, dim) features across their rows, per dimension, averaged over the
    dimensions (0-dim fp32). 0 when every row is the same: the collapse of all inputs onto
    one output. One row has no spread to measure: NaN."""
    if x.dim() != 2 or x.size(0) < 1:
        raise ValueError(f"spread: expected features of shape (n >= 1, dim), got {tuple(x.shape)}")
    if x.size(0) < 2:
        return torch.full((), float("nan"), device=x.device)
    return x.detach().float().std(dim=0).mean()


def pred_target_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean cosine similarity between matching rows of ``pred`` and ``target`` (any
    shape, last dimension the features), 0-dim fp32."""
    if pred.shape != target.shape:
        raise ValueError(f"pred_target_cosine: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return torch.nn.functional.cosine_similarity(pred.detach().float(), target.detach().float(), dim=-1).mean()


class CollapseDetector:
    """Collapse, judged against the run's own history at each log step.

    It fires when, for ``patience`` log steps in a row, the target encoder's RankMe beyond
    its first direction (``rankme - 1``: RankMe is 1 where every image maps onto one line,
    and a ViT's pooled features share a large mean direction) is below ``rankme_fraction``
    of the highest such value the run has logged so far, or the target std is below
    ``std_floor`` (either test off at 0). It fires once per episode: a
    healthy log step re-arms it. Its state (peak, count) goes into checkpoints, so a
    resumed run keeps its history. Pure Python on values every rank holds alike (the
    log step's all-reduced read), so under torchrun every rank decides the same.
    """

    ADVICE = ("try a lower optimization.lr, a longer optimization.warmup, an EMA closer to 1 (optimization.ema), "
              "or resume from the best checkpoint (<tag>-best.pth.tar)")  # fmt: skip

    def __init__(self, rankme_fraction: float, std_floor: float, patience: int, state: dict | None = None):
        self.rankme_fraction, self.std_floor, self.patience = float(rankme_fraction), float(std_floor), int(patience)
        self.peak, self.count, self.fired = 0.0, 0, False
        if state:
            self.peak, self.count, self.fired = float(state["peak"]), int(state["count"]), bool(state["fired"])

    def state(self) -> dict:
        return {"peak": self.peak, "count": self.count, "fired": self.fired}

    def update(self, step: int, rankme: float, std: float) -> str | None:
        """Feed one log step's target RankMe and std; returns the one-line warning on the
        log step where the detector fires, else None. Non-finite values are not judged."""
        if not (math.isfinite(rankme) and math.isfinite(std)):
            return None
        self.peak = max(self.peak, rankme)
        low_rank = self.rankme_fraction > 0 and rankme - 1.0 < self.rankme_fraction * (self.peak - 1.0)
        low_std = std < self.std_floor
        if not (low_rank or low_std):
            self.count, self.fired = 0, False
            return None
        self.count += 1
        if self.count < self.patience or self.fired:
            return None
        self.fired = True
        if low_std:
            signal = f"target_std {std:.3g} below health.std_floor={self.std_floor:g}"
        else:
            signal = (f"target_rankme {rankme:.2f}: its directions beyond the first ({rankme - 1:.2f}) below "
                      f"{self.rankme_fraction:g} x their peak ({self.peak - 1:.2f}, health.rankme_fraction)")  # fmt: skip
        return f"step {step}: representation collapse: {signal} for {self.count} log steps; {self.ADVICE}"
