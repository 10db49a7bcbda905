"""Loads ``torch.ops.fastjepa.sample_masks3d`` (the C++ 3-D mask sampler) and registers its
fake implementation, so code calling it traces under ``torch.compile`` / ``FakeTensorMode``.

The mask lengths depend on the drawn blocks, so the fake returns unbacked sizes. Import
this module only when ``fastjepa.ops.available()["cpp"]`` is true.
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401 — loads the library, registers torch.ops.fastjepa


@torch.library.register_fake("fastjepa::sample_masks3d")
def _(B, T, H, W, temporal_scale, spatial_scale, aspect, num_blocks, max_context_frames, max_keep,
      full_complement, pred_full_complement, seed, block_size=None):
    ctx = torch.library.get_ctx()
    kc, kt = ctx.new_dynamic_size(), ctx.new_dynamic_size()  # data-dependent mask lengths
    return torch.empty((B, kc), dtype=torch.int64), torch.empty((B, kt), dtype=torch.int64)
