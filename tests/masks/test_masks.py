"""Masks: apply_masks / repeat_interleave_batch by hand, the multi-block collator in both modes."""

import math

import pytest
import torch

from fastjepa.masks import MaskCollator, apply_masks, block_size, repeat_interleave_batch

PUBLISHED = dict(enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=10)


def test_apply_masks_hand_checked():
    x = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)  # x[b, n] = 4b + n
    m1 = torch.tensor([[0, 3], [1, 1]])
    m2 = torch.tensor([[2, 2], [0, 3]])
    out = apply_masks(x, [m1, m2])
    assert out.shape == (4, 2, 1)
    assert out[..., 0].tolist() == [[0, 3], [5, 5], [2, 2], [4, 7]]
    assert torch.equal(apply_masks(x, m1), out[:2])  # a single tensor is a list of one


def test_apply_masks_backward_accumulates():
    x = torch.zeros(1, 3, 2, requires_grad=True)
    out = apply_masks(x, [torch.tensor([[1, 1]]), torch.tensor([[1, 2]])])
    out.sum().backward()
    assert x.grad[0, :, 0].tolist() == [0, 3, 1]


def test_repeat_interleave_batch_hand_checked():
    x = torch.tensor([0, 1, 2, 3, 4, 5])  # chunks of B=2: [0,1] [2,3] [4,5]
    assert repeat_interleave_batch(x, 2, repeat=2).tolist() == [0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5]
    assert repeat_interleave_batch(x, 3, repeat=1).tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="multiple of B"):
        repeat_interleave_batch(x, 4, repeat=2)


def _grid_rc(idx, W):
    return [(int(i) // W, int(i) % W) for i in idx]


def _collate(col, B):
    return col([torch.zeros(1) for _ in range(B)])


@pytest.mark.parametrize("compat", ["fastjepa", "reference"])
def test_collator_invariants(compat):
    col = MaskCollator(input_size=224, patch_size=16, compat=compat, backend="python", **PUBLISHED)
    H = W = 14
    for _ in range(3):
        _, menc, mpred = _collate(col, 6)
        assert len(menc) == 1 and len(mpred) == 4
        kc, kt = menc[0].size(1), mpred[0].size(1)
        assert kc > 10 and kt > 10
        for m in menc + mpred:
            assert m.dtype == torch.int64 and m.shape[0] == 6
            assert int(m.min()) >= 0 and int(m.max()) < H * W
        for b in range(6):
            ctx = set(menc[0][b].tolist())
            for m in mpred:
                assert not ctx & set(m[b].tolist()), "context and targets must be disjoint"
                assert m[b].tolist() == sorted(m[b].tolist())
            assert menc[0][b].tolist() == sorted(menc[0][b].tolist())


def test_rectangular_truncation_keeps_first_indices():
    """Targets are whole h×w rectangles; contexts are truncated to the batch's shortest
    by keeping each mask's first (smallest) indices."""
    col = MaskCollator(input_size=64, patch_size=8, enc_mask_scale=(0.4, 0.9), pred_mask_scale=(0.1, 0.3), aspect_ratio=(0.5, 2.0), nenc=2, npred=3, min_keep=2)
    full = []
    original = col._block

    def recording_block(h, w, corner, regions):
        idx, comp = original(h, w, corner, regions)
        full.append(idx)
        return idx, comp

    col._block = recording_block
    menc, mpred = col.sample(5, torch.Generator().manual_seed(3))
    assert all(m.shape == menc[0].shape for m in menc) and all(m.shape == mpred[0].shape for m in mpred)
    per_image = 3 + 2  # npred targets, then nenc contexts
    ke = min(len(full[b * per_image + 3 + i]) for b in range(5) for i in range(2))
    assert menc[0].size(1) == ke
    for b in range(5):
        for j in range(3):
            idx = full[b * per_image + j]
            rows, cols = idx // 8, idx % 8
            h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
            assert len(idx) == h * w, "a target is a whole rectangle"
            assert torch.equal(mpred[j][b], idx[: mpred[j].size(1)])
        for i in range(2):
            assert torch.equal(menc[i][b], full[b * per_image + 3 + i][:ke])


def test_corner_range_default_reaches_last_row_reference_never():
    H = W = 8
    seen_default, seen_ref = set(), set()
    col = MaskCollator(input_size=64, patch_size=8, enc_mask_scale=(0.2, 0.3), pred_mask_scale=(0.1, 0.15), aspect_ratio=(1.0, 1.0), nenc=1, npred=4, min_keep=1, generator=torch.Generator().manual_seed(0))
    ref = MaskCollator(input_size=64, patch_size=8, enc_mask_scale=(0.2, 0.3), pred_mask_scale=(0.1, 0.15), aspect_ratio=(1.0, 1.0), nenc=1, npred=4, min_keep=1, compat="reference")
    for _ in range(40):
        for c, seen in ((col, seen_default), (ref, seen_ref)):
            _, menc, mpred = _collate(c, 4)
            for m in mpred:
                for row in m:
                    seen |= {r for r, _ in _grid_rc(row, W)} | {H + cc for _, cc in _grid_rc(row, W)}
    assert (H - 1) in seen_default and (H + W - 1) in seen_default  # last row and last column reached
    assert (H - 1) not in seen_ref and (H + W - 1) not in seen_ref  # the reference never reaches them


def _reference_transcription(B, H, W, seed, p_scale, e_scale, aspect, nenc, npred, min_keep, allow_overlap):
    """docs/design.md §4's reference procedure, transcribed line by line."""
    g = torch.Generator()
    g.manual_seed(seed)

    def size(scale, ar_range):
        u = torch.rand(1, generator=g).item()
        s = scale[0] + u * (scale[1] - scale[0])
        max_keep = int(H * W * s)
        ar = ar_range[0] + u * (ar_range[1] - ar_range[0])
        h = int(round(math.sqrt(max_keep * ar)))
        w = int(round(math.sqrt(max_keep / ar)))
        while h >= H:
            h -= 1
        while w >= W:
            w -= 1
        return h, w

    p_size = size(p_scale, aspect)
    e_size = size(e_scale, (1.0, 1.0))

    def block(h, w, regions=None):
        tries, left_before_relax = 0, 20
        while True:
            top = torch.randint(0, H - h, (1,))
            left = torch.randint(0, W - w, (1,))
            m = torch.zeros((H, W), dtype=torch.int32)
            m[top : top + h, left : left + w] = 1
            if regions:
                for k in range(max(len(regions) - tries, 0)):
                    m *= regions[k]
            idx = torch.nonzero(m.flatten()).squeeze()
            if len(idx) > min_keep:
                break
            left_before_relax -= 1
            if left_before_relax == 0:
                tries += 1
                left_before_relax = 20
        comp = torch.ones((H, W), dtype=torch.int32)
        comp[top : top + h, left : left + w] = 0
        return idx, comp

    preds, encs = [], []
    for _ in range(B):
        t, c = zip(*[block(*p_size) for _ in range(npred)])
        preds.append(list(t))
        encs.append([block(*e_size, None if allow_overlap else list(c))[0] for _ in range(nenc)])
    kp = min(len(m) for ms in preds for m in ms)
    ke = min(len(m) for ms in encs for m in ms)
    return [torch.stack([encs[b][i][:ke] for b in range(B)]) for i in range(nenc)], [torch.stack([preds[b][j][:kp] for b in range(B)]) for j in range(npred)]


@pytest.mark.parametrize("allow_overlap", [False, True])
def test_reference_compat_matches_transcription_index_for_index(allow_overlap):
    kw = dict(PUBLISHED, allow_overlap=allow_overlap)
    col = MaskCollator(input_size=224, patch_size=14, compat="reference", **kw)
    for call in range(3):
        state = torch.get_rng_state()
        _, menc, mpred = _collate(col, 5)
        torch.set_rng_state(state)
        renc, rpred = _reference_transcription(5, 16, 16, call, kw["pred_mask_scale"], kw["enc_mask_scale"], kw["aspect_ratio"], 1, 4, 10, allow_overlap)
        for a, b in zip(menc + mpred, renc + rpred):
            assert torch.equal(a, b)


def test_reference_compat_deterministic():
    a = MaskCollator(input_size=224, patch_size=16, compat="reference", **PUBLISHED)
    b = MaskCollator(input_size=224, patch_size=16, compat="reference", **PUBLISHED)
    torch.manual_seed(7)
    out_a = [_collate(a, 3)[1:] for _ in range(2)]
    torch.manual_seed(7)
    out_b = [_collate(b, 3)[1:] for _ in range(2)]
    for (ea, pa), (eb, pb) in zip(out_a, out_b):
        assert all(torch.equal(x, y) for x, y in zip(ea + pa, eb + pb))


def test_default_mode_seeded_per_batch_not_by_global_rng():
    a = MaskCollator(input_size=224, patch_size=16, seed=5, backend="python", **PUBLISHED)
    b = MaskCollator(input_size=224, patch_size=16, seed=5, backend="python", **PUBLISHED)
    torch.manual_seed(1)
    ea, pa = _collate(a, 4)[1:]
    torch.manual_seed(2)
    eb, pb = _collate(b, 4)[1:]
    assert all(torch.equal(x, y) for x, y in zip(ea + pa, eb + pb))
    b.set_epoch(1)
    ec, pc = _collate(b, 4)[1:]
    assert not all(torch.equal(x, y) for x, y in zip(ea + pa, ec + pc))


def test_impossible_configuration_raises_at_construction():
    # 32 px / patch 8 -> 4x4 grid: target blocks of 15-20 % are 2-3 patches, never more than min_keep=10
    with pytest.raises(ValueError, match="can never produce a valid mask"):
        MaskCollator(input_size=32, patch_size=8, **PUBLISHED)
    with pytest.raises(ValueError, match="min_keep"):
        MaskCollator(input_size=64, patch_size=8, enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.01, 0.02), aspect_ratio=(0.75, 1.5), min_keep=4)


@pytest.mark.parametrize("kw,match", [
    (dict(pred_mask_scale=(0.3, 0.2)), "low <= high"),
    (dict(nenc=0), "nenc"),
    (dict(compat="nope"), "compat"),
    (dict(aspect_ratio=(0.0, 1.0)), "aspect_ratio"),
    (dict(backend="gpu"), "backend"),
])  # fmt: skip
def test_bad_arguments_raise(kw, match):
    base = dict(input_size=224, patch_size=16, **PUBLISHED)
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        MaskCollator(**base)


def test_block_size_matches_spec():
    # u=0 on a 16x16 grid with pred scale 0.15 and aspect 0.75: max_keep = int(256*0.15) = 38
    assert block_size(0.0, (0.15, 0.2), (0.75, 1.5), 16, 16) == (round(math.sqrt(38 * 0.75)), round(math.sqrt(38 / 0.75)))
    assert block_size(1.0, (0.85, 1.0), (1.0, 1.0), 16, 16) == (15, 15)  # reduced until < H, W


@pytest.mark.parametrize("kwargs, message", [
    (dict(enc_mask_scale=(0.9, 0.5)), r"enc_mask_scale=\(0.9, 0.5\): expected low <= high"),
    (dict(enc_mask_scale=(0.85, 1.2)), r"enc_mask_scale=\(0.85, 1.2\): expected 0 < low <= high <= 1"),
    (dict(enc_mask_scale=(0.85,)), r"enc_mask_scale=\(0.85,\): expected two numbers \(low, high\)"),
    (dict(input_size=4), r"input_size=\(4, 4\) with patch_size=4 gives a 1x1 grid; expected at least 2x2"),
    (dict(min_keep=2.5), r"min_keep=2.5: expected an int >= 0"),
    (dict(rank=2, world_size=2), r"rank=2: expected 0 <= rank < world_size=2"),
    (dict(compat="bogus"), r"compat='bogus': expected one of fastjepa, reference"),
])  # fmt: skip
def test_collator_mistakes_say_what_is_wrong(kwargs, message):
    args = dict(input_size=32, patch_size=4, enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5))
    with pytest.raises(ValueError, match=message):
        MaskCollator(**{**args, **kwargs})
