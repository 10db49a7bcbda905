"""torchrun integration: process group, rank info, data sharding, small collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .masks.multiblock import derive_seed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the torchrun process group if ``WORLD_SIZE`` > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(rank, world, local)


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (for coordinated stops)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def min_over_ranks(value: int | None, info: DistInfo, device: torch.device) -> int | None:
    """The smallest ``value`` over the ranks (``None`` where a rank has none); every rank gets it."""
    if not info.enabled:
        return value
    big = float(2**52)
    t = torch.tensor([big if value is None else float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return None if t.item() >= big else int(t.item())


class ResumableSampler(Sampler[int]):
    """Shuffled, rank-sharded indices whose order is a function of (seed, epoch) only.

    Like ``DistributedSampler`` (drop_last) and resumable mid-epoch:
    ``set_epoch(epoch, start_batch, batch_size)`` skips the batches already trained.
    """

    def __init__(self, num_samples: int, batch_size: int, info: DistInfo, seed: int = 0, shuffle: bool = True):
        self.n, self.batch_size, self.info, self.seed, self.shuffle = num_samples, batch_size, info, seed, shuffle
        self.per_rank = num_samples // info.world_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"data.batch_size={batch_size} × {info.world_size} process(es) needs at least "
                f"{batch_size * info.world_size} images per epoch, the dataset has {num_samples}"
            )
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0x5A3))
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        order = self._order()[: self.per_rank * self.info.world_size]
        mine = order[self.info.rank :: self.info.world_size][: self.batches_per_epoch * self.batch_size]
        return iter(mine[self.start_batch * self.batch_size :])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
