"""The fused ops' eager path: a plain ``torch.autograd.Function`` instead of the custom op.

In eager mode each Triton-backed op calls its launchers through a small
``autograd.Function`` (``_dispatch.direct``); ``torch.compile``, dispatch modes (fake
tensors, ...), functorch transforms and tensor subclasses take the ``torch.library`` custom
op. Both run the same launchers: here each op's two paths give bit-identical forward and
backward results, and the custom op is what runs under a dispatch mode.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastjepa import ops
from fastjepa.ops import _dispatch

from ..kernels.test_launch_gpu import OPS, _calls, _fwd_bwd

pytestmark = pytest.mark.triton
MODULES = ("gather_tokens", "predictor_tokens", "target_tokens", "smooth_l1_loss", "sorted_predictor_tokens", "rope")


class _Names(TorchDispatchMode):
    """Records the name of every op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", OPS)
def test_direct_and_custom_op_paths_agree_bit_for_bit(op, monkeypatch):
    fused, _, inputs = _calls(torch.device("cpu"))[op]
    with ops.use_backend("triton"):
        out, grads = _fwd_bwd(fused, inputs)
        calls = []
        for mod in MODULES:  # the custom op this time
            monkeypatch.setattr(importlib.import_module(f"fastjepa.ops.{mod}"), "direct", lambda *t: calls.append(1) or False)
        out2, grads2 = _fwd_bwd(fused, inputs)
    assert calls, "the op never asked whether to take the direct path"
    assert torch.equal(out, out2)
    for a, b in zip(grads, grads2):
        assert torch.equal(a, b)


def test_direct_path_is_eager_only():
    x = torch.randn(2, 3)
    assert _dispatch.direct(x, None)
    with _Names():
        assert not _dispatch.direct(x)
    assert not _dispatch.direct(x.as_subclass(_Sub))  # a tensor subclass takes the custom op


class _Sub(torch.Tensor):
    pass


def test_a_dispatch_mode_sees_the_custom_op():
    fused, _, inputs = _calls(torch.device("cpu"))["gather_tokens"]
    with ops.use_backend("triton"), _Names() as mode:
        fused()
    assert any("gather_tokens_triton" in n for n in mode.names), mode.names
