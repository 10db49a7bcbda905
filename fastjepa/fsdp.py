"""FSDP2 (``fully_shard``) for I-JEPA: encoder, predictor and the EMA target sharded alike.

Each transformer block and each network's root is a ``fully_shard`` unit. The target
encoder is sharded with the same mesh and placements as the encoder, so the EMA is a
local foreach lerp over matching shards — no gather, no communication (the reference's
per-parameter ``.data`` update does not survive sharding; this does).

Checkpoints gather full (unsharded) state dicts on every rank with
``torch.distributed.checkpoint.state_dict`` and rank 0 writes the usual reference-format
file; loading scatters a full state dict back into the shards.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _shard_network(net: nn.Module, blocks: nn.ModuleList, mesh) -> None:
    for blk in blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(net, mesh=mesh)


def shard_ijepa(model: nn.Module, device: torch.device) -> None:
    """Shard ``model`` (an IJEPA) in place over all ranks. ``device``: this rank's device
    (``cuda:LOCAL_RANK``, see :func:`fastjepa.distributed.rank_device`). FSDP2 puts the
    shards on the mesh type's *current* device, so it is made current first."""
    world = torch.distributed.get_world_size()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    _shard_network(model.encoder, model.encoder.blocks, mesh)
    _shard_network(model.predictor, model.predictor.predictor_blocks, mesh)
    _shard_network(model.target_encoder, model.target_encoder.blocks, mesh)
    model._fsdp = True


def is_sharded(model: nn.Module) -> bool:
    return bool(getattr(model, "_fsdp", False))


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Full CPU state dicts of the three networks (and the optimizer); a collective."""
    out = {name: get_model_state_dict(getattr(model, name), options=FULL) for name in ("encoder", "predictor", "target_encoder")}
    if optimizer is not None:
        out["opt"] = get_optimizer_state_dict(model, optimizer, options=FULL)
    return out


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, ckpt: dict) -> None:
    from .checkpoint import strip_module_prefix

    for name in ("encoder", "predictor", "target_encoder"):
        set_model_state_dict(getattr(model, name), strip_module_prefix(ckpt[name]), options=StateDictOptions(full_state_dict=True))
    if optimizer is not None and ckpt.get("opt") is not None:
        set_optimizer_state_dict(model, optimizer, ckpt["opt"], options=StateDictOptions(full_state_dict=True))
