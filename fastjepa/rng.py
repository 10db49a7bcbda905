"""Seeds and random-number state: one seed mixer for every stream (masks, augmentation,
sampler order) and the global RNG states that a checkpoint stores and a resume restores."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

MAX_SEED = 2**63 - 1


def derive_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 steps); stable across runs."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & MAX_SEED


def numpy_rng_to_plain(state: Any) -> dict[str, Any]:
    """NumPy's legacy global RNG state (``np.random.get_state()``, a tuple holding a uint32
    array, or its dict form) as weights-only types: the 624-word key as an int64 tensor."""
    if isinstance(state, Mapping):
        name, key, pos = state["bit_generator"], state["state"]["key"], state["state"]["pos"]
        has_gauss, gauss = state["has_gauss"], state["gauss"]
    else:
        name, key, pos, has_gauss, gauss = state
    key = torch.as_tensor(np.asarray(key, dtype=np.uint32).astype(np.int64))
    return {"bit_generator": str(name), "state": {"key": key, "pos": int(pos)}, "has_gauss": int(has_gauss), "gauss": float(gauss)}


def numpy_rng_from_plain(state: Any) -> Any:
    """The inverse of :func:`numpy_rng_to_plain`, for ``np.random.set_state`` (a legacy
    tuple from an older checkpoint is passed through)."""
    if not isinstance(state, Mapping):
        return state
    key = state["state"]["key"]
    key = key.numpy() if torch.is_tensor(key) else np.asarray(key)
    return {
        "bit_generator": state["bit_generator"],
        "state": {"key": key.astype(np.uint32), "pos": int(state["state"]["pos"])},
        "has_gauss": int(state["has_gauss"]),
        "gauss": float(state["gauss"]),
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global RNG states of Python, NumPy and torch (and CUDA), in types a
    weights-only load accepts (NumPy's key as a tensor; Python's state is a tuple of ints)."""
    state = {"python": random.getstate(), "numpy": numpy_rng_to_plain(np.random.get_state()), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(numpy_rng_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
