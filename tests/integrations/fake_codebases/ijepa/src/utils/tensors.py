"""Stand-in for I-JEPA's src/utils/tensors.py."""

import torch


def repeat_interleave_batch(x, B, repeat):
    """Chunks of B rows, each repeated ``repeat`` times in place: c0 c0 … c1 c1 …"""
    chunks = [x[i * B : (i + 1) * B] for i in range(len(x) // B)]
    return torch.cat([c for c in chunks for _ in range(repeat)], dim=0)
