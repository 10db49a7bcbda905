"""torchrun integration: process group, rank info, data sharding, small collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .rng import derive_seed


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


def rank_device(device_type: str, local_rank: int = 0, visible: int | None = None) -> torch.device:
    """The one device this process computes on — the model, its batches, DDP's
    ``device_ids``/``output_device``, the FSDP2 mesh, ``torch.cuda.set_device`` and the
    memory statistics all take it from here.

    CUDA: ``cuda:LOCAL_RANK`` (``cuda:0`` in a single process; choose the GPU with
    ``CUDA_VISIBLE_DEVICES``). Anything else: that device type. ``visible`` (the number of
    visible GPUs), when given, must exceed ``local_rank``; otherwise a ``ValueError``
    names both.
    """
    if device_type != "cuda":
        return torch.device(device_type)
    if local_rank < 0 or (visible is not None and local_rank >= visible):
        raise ValueError(
            f"LOCAL_RANK={local_rank}, but this process sees {visible} CUDA device(s): each process trains on "
            f"cuda:LOCAL_RANK, so start at most {visible} process(es) per node (torchrun --nproc_per_node={visible}); "
            "a launcher that makes only its own GPU visible to each process should set LOCAL_RANK=0"
        )
    return torch.device("cuda", local_rank)


def ddp_device_kwargs(device: torch.device) -> dict:
    """``DistributedDataParallel``'s device arguments for a module on ``device``: its one
    GPU for CUDA (``device_ids=[i], output_device=i``), none for CPU modules (which DDP
    requires)."""
    if device.type != "cuda":
        return {}
    if device.index is None:
        raise ValueError(f"ddp_device_kwargs: {device} has no index; expected cuda:N (see rank_device)")
    return {"device_ids": [device.index], "output_device": device.index}


def init_distributed(device_type: str) -> DistInfo:
    """Join the torchrun process group if ``WORLD_SIZE`` > 1 (NCCL on CUDA, gloo on CPU).

    On CUDA the process's GPU (:func:`rank_device`) becomes the current device first, and
    the NCCL group is bound to it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            device = rank_device("cuda", local, torch.cuda.device_count())
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    return DistInfo(rank, world, local)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum over ranks of ``t`` (a copy; ``t`` itself under one process). On NCCL this
    enqueues the reduction on the device: no host sync."""
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (for coordinated stops)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


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
