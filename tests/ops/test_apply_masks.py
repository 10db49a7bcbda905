"""apply_masks(x, masks, concat): both call forms, every backend against the reference."""

import pytest
import torch

from fastjepa.masks import apply_masks as apply_masks_reference
from fastjepa.ops import apply_masks, available, use_backend

BACKENDS = ["triton"] + (["cpp"] if available()["cpp"] else [])

# (B, N, D, Ks): B=1; D=200 with prime K; K > N forces repeats; ragged K across masks
SHAPES = [(1, 16, 32, (5,)), (3, 20, 200, (7, 7)), (2, 9, 17, (13, 13, 13)), (2, 11, 24, (3, 7, 5))]


def run(backend, x, masks, concat, grads):
    x = x.detach().clone().requires_grad_()
    if backend == "reference":
        out = apply_masks_reference(x, masks, concat=concat)
    else:
        with use_backend(backend):
            out = apply_masks(x, masks, concat=concat)
    outs = [out] if concat else out
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("concat", [True, False])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_matches_reference(backend, shape, concat, idx_dtype, poison_empty):
    B, N, D, Ks = shape
    if concat and len(set(Ks)) > 1:
        pytest.skip("concat=True needs equal mask lengths")
    x = torch.randn(B, N, D)
    masks = [torch.randint(0, N, (B, K), dtype=idx_dtype) for K in Ks]  # with replacement: repeats
    grads = [torch.randn(len(Ks) * B, Ks[0], D)] if concat else [torch.randn(B, K, D) for K in Ks]
    outs, gx = run(backend, x, masks, concat, grads)
    refs, gx_ref = run("reference", x, masks, concat, grads)
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r)
    torch.testing.assert_close(gx, gx_ref)


def test_concat_false_returns_a_list_and_a_tensor_is_a_list_of_one():
    x, m = torch.randn(2, 8, 12), torch.randint(0, 8, (2, 3))
    with use_backend("triton"):
        out = apply_masks(x, m, concat=False)
    assert isinstance(out, list) and len(out) == 1
    torch.testing.assert_close(out[0], apply_masks_reference(x, [m]))


def test_repeated_index_gradients_accumulate_across_masks():
    """Every mask the same index: one row of x.grad sums every upstream row."""
    B, N, D = 2, 6, 20
    x = torch.randn(B, N, D, requires_grad=True)
    masks = [torch.full((B, K), 4) for K in (3, 5)]
    grads = [torch.randn(B, 3, D), torch.randn(B, 5, D)]
    with use_backend("triton"):
        torch.autograd.backward(apply_masks(x, masks, concat=False), grads)
    expected = torch.zeros(B, N, D)
    expected[:, 4] = grads[0].sum(1) + grads[1].sum(1)
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("masks, match", [([], "non-empty list"), ("abc", "non-empty list")])
def test_bad_masks_raise(masks, match):
    with pytest.raises(ValueError, match=match):
        apply_masks(torch.randn(2, 8, 4), masks, concat=False)


def test_ragged_concat_true_names_the_lengths():
    x = torch.randn(2, 8, 4)
    with use_backend("triton"), pytest.raises(ValueError, match=r"masks\[1\]: shape \(2, 4\) differs"):
        apply_masks(x, [torch.randint(0, 8, (2, 3)), torch.randint(0, 8, (2, 4))])
