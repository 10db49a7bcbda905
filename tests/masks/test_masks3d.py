"""3-D multi-block masks (V-JEPA 2's mask generator): ``fastjepa.masks.multiblock3d`` and the
C++ sampler ``torch.ops.fastjepa.sample_masks3d``.

* ``compat="reference"`` equals, index for index, an independent plain-Python restatement
  of V-JEPA 2's procedure (the oracle below: sets and lists, the same RNG calls).
* Invariants of every mode and backend; determinism per seed; clear errors (never a hang).
* The C++ sampler's distribution equals the Python fastjepa mode's: per-position inclusion
  frequencies, block sizes and offsets, mask lengths, each frequency within 5 standard
  errors of the other (independent batches). No fixed seeds: each run draws new ones.
* The V-JEPA 2 patch against a stand-in of its mask module written here.
"""

import math
import os
import sys
import types

import pytest
import torch

from fastjepa.masks.multiblock3d import MAX_EMPTY_DRAWS, MaskCollator3D, MaskGenerator3D
from fastjepa.ops import available

HAVE_CPP = bool(available()["cpp"])
needs_cpp = pytest.mark.skipif(not HAVE_CPP, reason=f"fastjepa._C not available: {available()['cpp'].reason}")


def new_seed():
    return int.from_bytes(os.urandom(7), "little")


# (grid kwargs, mask config): grid = num_frames / tubelet, crop / patch
VIDEO = dict(crop_size=256, num_frames=16, spatial_patch_size=16, temporal_patch_size=2)  # 8 x 16 x 16
SMALL = dict(crop_size=48, num_frames=8, spatial_patch_size=8, temporal_patch_size=2)  # 4 x 6 x 6
TINY = dict(crop_size=(24, 24), num_frames=2, spatial_patch_size=8, temporal_patch_size=2)  # 1 x 3 x 3
CFG_8 = dict(spatial_scale=(0.15, 0.15), temporal_scale=(1.0, 1.0), aspect_ratio=(0.75, 1.5), num_blocks=8)
CFG_2 = dict(spatial_scale=(0.7, 0.7), temporal_scale=(1.0, 1.0), aspect_ratio=(0.75, 1.5), num_blocks=2)
MIXED = dict(spatial_scale=(0.1, 0.5), temporal_scale=(0.25, 1.0), aspect_ratio=(0.5, 2.0), num_blocks=3,
             max_temporal_keep=0.75, max_keep=40)
# 2x2 blocks on a 3x3 frame: 4 of them cover it when all four positions are drawn (9 % of clips)
RETRY = dict(spatial_scale=(0.4, 0.6), temporal_scale=(1.0, 1.0), aspect_ratio=(1.0, 1.0), num_blocks=4)

CASES = {
    "vjepa2_8_blocks": (VIDEO, CFG_8),
    "vjepa2_2_blocks": (VIDEO, CFG_2),
    "mixed": (SMALL, MIXED),
    "full_complement": (SMALL, {**MIXED, "full_complement": True}),
    "pred_full_complement": (SMALL, {**MIXED, "pred_full_complement": True}),
    "inv_block": (SMALL, {**MIXED, "inv_block": True, "max_keep": None}),
    "retry": (TINY, RETRY),
}


def make_gen(grid, cfg, **kw):
    return MaskGenerator3D(
        **grid,
        spatial_pred_mask_scale=cfg["spatial_scale"],
        temporal_pred_mask_scale=cfg["temporal_scale"],
        aspect_ratio=cfg["aspect_ratio"],
        npred=cfg["num_blocks"],
        max_context_frames_ratio=cfg.get("max_temporal_keep", 1.0),
        max_keep=cfg.get("max_keep"),
        full_complement=cfg.get("full_complement", False),
        pred_full_complement=cfg.get("pred_full_complement", False),
        inv_block=cfg.get("inv_block", False),
        **kw,
    )


def grid_dims(grid):
    crop = grid["crop_size"] if isinstance(grid["crop_size"], tuple) else (grid["crop_size"],) * 2
    p = grid["spatial_patch_size"]
    return grid["num_frames"] // grid["temporal_patch_size"], crop[0] // p, crop[1] // p


# -- the oracle: V-JEPA 2's procedure, restated ------------------------------------------


def oracle_batch(counter, B, grid, cfg, stats=None):
    """One batch of V-JEPA 2's 3-D masks for batch counter ``counter``; offsets from the
    global torch RNG. Plain Python sets and lists; returns (enc, pred) as V-JEPA 2 does."""
    T, H, W = grid_dims(grid)
    N = T * H * W
    g = torch.Generator()
    g.manual_seed(counter)
    draws = [torch.rand(1, generator=g).item() for _ in range(3)]  # temporal, spatial, aspect
    (t0, t1), (s0, s1), (a0, a1) = cfg["temporal_scale"], cfg["spatial_scale"], cfg["aspect_ratio"]
    t = max(1, int(T * (t0 + draws[0] * (t1 - t0))))
    n_keep = int(H * W * (s0 + draws[1] * (s1 - s0)))
    ar = a0 + draws[2] * (a1 - a0)
    h, w = min(int(round(math.sqrt(n_keep * ar))), H), min(int(round(math.sqrt(n_keep / ar))), W)
    ctx_frames = max(1, int(T * cfg.get("max_temporal_keep", 1.0)))
    contexts, targets = [], []
    for _ in range(B):
        while True:
            hidden = set(range(ctx_frames * H * W, N))
            for _ in range(cfg["num_blocks"]):
                top = int(torch.randint(0, H - h + 1, (1,)))
                left = int(torch.randint(0, W - w + 1, (1,)))
                start = int(torch.randint(0, T - t + 1, (1,)))
                hidden |= {(f * H + r) * W + c for f in range(start, start + t) for r in range(top, top + h)
                           for c in range(left, left + w)}
            context = [i for i in range(N) if i not in hidden]
            if context:
                break
            if stats is not None:
                stats["retries"] = stats.get("retries", 0) + 1
        contexts.append(context)
        targets.append(sorted(hidden))
    kc, kt = min(len(c) for c in contexts), min(len(x) for x in targets)
    if cfg.get("max_keep") is not None:
        kc = min(kc, cfg["max_keep"])
    contexts, targets = [c[:kc] for c in contexts], [x[:kt] for x in targets]
    if cfg.get("full_complement"):
        targets = [[i for i in range(N) if i not in set(c)] for c in contexts]
    elif cfg.get("pred_full_complement"):
        contexts = [[i for i in range(N) if i not in set(x)] for x in targets]
    enc = torch.tensor(contexts, dtype=torch.long).reshape(B, -1)
    pred = torch.tensor(targets, dtype=torch.long).reshape(B, -1)
    return (pred, enc) if cfg.get("inv_block") else (enc, pred)


@pytest.mark.parametrize("case", list(CASES))
def test_reference_mode_equals_the_oracle_index_for_index(case):
    grid, cfg = CASES[case]
    B, batches = (3, 2) if grid is VIDEO else (16, 6)
    gen = make_gen(grid, cfg, compat="reference", backend="python")
    seed = new_seed()
    torch.manual_seed(seed)
    got = [gen(B) for _ in range(batches)]
    state_after = torch.get_rng_state()
    torch.manual_seed(seed)
    stats = {}
    want = [oracle_batch(k, B, grid, cfg, stats) for k in range(batches)]
    for k, ((ge, gp), (we, wp)) in enumerate(zip(got, want)):
        assert ge.dtype == gp.dtype == torch.int64
        assert torch.equal(ge, we), f"batch {k}: context differs"
        assert torch.equal(gp, wp), f"batch {k}: target differs"
    if case == "retry":
        assert stats.get("retries", 0) > 0, "the retry case drew no empty context"
    assert torch.equal(torch.get_rng_state(), state_after), "the global RNG was drawn a different number of times"


def test_reference_collator_structure_and_counters():
    fpcs = [16, 8]
    col = MaskCollator3D([CFG_8, MIXED], fpcs, crop_size=48, patch_size=8, tubelet_size=2, compat="reference",
                         backend="python")

    def sample(fpc, label):
        return torch.full((3, fpc, 2, 2), float(label)), label, [torch.arange(fpc)]

    batch = [sample(8, 0), sample(16, 1), sample(8, 2), sample(16, 3), sample(16, 4)]
    seed = new_seed()
    torch.manual_seed(seed)
    out = col(batch)
    assert isinstance(out, list) and len(out) == 2  # one entry per clip length present, dataset_fpcs order
    (c16, e16, p16), (c8, e8, p8) = out
    assert c16[1].tolist() == [1, 3, 4] and c8[1].tolist() == [0, 2]
    assert c16[0].shape == (3, 3, 16, 2, 2)
    assert len(e16) == len(p16) == 2 and e16[0].shape[0] == 3 and p8[1].shape[0] == 2
    # each generator is V-JEPA 2's procedure with its own counter; groups in order, configs in order
    torch.manual_seed(seed)
    grid16, grid8 = dict(SMALL, num_frames=16), SMALL
    want = [oracle_batch(0, 3, grid16, CFG_8), oracle_batch(0, 3, grid16, MIXED),
            oracle_batch(0, 2, grid8, CFG_8), oracle_batch(0, 2, grid8, MIXED)]
    got = [(e16[0], p16[0]), (e16[1], p16[1]), (e8[0], p8[0]), (e8[1], p8[1])]
    for (ge, gp), (we, wp) in zip(got, want):
        assert torch.equal(ge, we) and torch.equal(gp, wp)
    col.step()  # as V-JEPA 2's resume does once per batch done: the next call uses counter 2
    torch.manual_seed(seed)
    out = col([sample(8, 0)])
    (_, e8, p8), = out
    torch.manual_seed(seed)
    we, wp = oracle_batch(2, 1, grid8, CFG_8)
    assert torch.equal(e8[0], we) and torch.equal(p8[0], wp)
    with pytest.raises(ValueError, match="a sample of 4 frames: expected one of dataset_fpcs=\\[16, 8\\]"):
        col([sample(4, 0)])


# -- invariants -------------------------------------------------------------------------

MODES = [("reference", "python"), ("fastjepa", "python"), pytest.param("fastjepa", "cpp", marks=needs_cpp)]


def check_invariants(enc, pred, B, grid, cfg):
    T, H, W = grid_dims(grid)
    N, HW = T * H * W, H * W
    if cfg.get("inv_block"):
        enc, pred = pred, enc
    assert enc.dtype == pred.dtype == torch.int64
    assert enc.dim() == pred.dim() == 2 and enc.shape[0] == pred.shape[0] == B  # rectangular
    assert enc.size(1) >= 1, "empty context"
    for m in (enc, pred):
        if m.numel():
            assert int(m.min()) >= 0 and int(m.max()) < N
            assert bool((m[:, 1:] > m[:, :-1]).all()), "indices sorted and unique"
    ctx_frames = max(1, int(T * cfg.get("max_temporal_keep", 1.0)))
    for b in range(B):
        e, p = set(enc[b].tolist()), set(pred[b].tolist())
        assert not e & p, "context and target overlap"
        if cfg.get("full_complement") or cfg.get("pred_full_complement"):
            assert len(e | p) == N, "a complement mode leaves cells out"
    if not cfg.get("pred_full_complement"):
        assert int(enc.max()) < ctx_frames * HW, "context reaches past max_temporal_keep"
        if cfg.get("max_keep") is not None:
            assert enc.size(1) <= cfg["max_keep"]
    if not cfg.get("full_complement"):
        assert pred.size(1) >= 1, "empty target (blocks have at least one cell)"


@pytest.mark.parametrize("compat,backend", MODES)
@pytest.mark.parametrize("case", ["vjepa2_8_blocks", "mixed", "full_complement", "pred_full_complement", "inv_block", "retry"])
def test_invariants(case, compat, backend):
    grid, cfg = CASES[case]
    gen = make_gen(grid, cfg, compat=compat, backend=backend, seed=new_seed())
    assert gen.backend == backend
    for _ in range(5):
        B = int(torch.randint(1, 9, ()).item())
        enc, pred = gen(B)
        check_invariants(enc, pred, B, grid, cfg)


@pytest.mark.parametrize("compat,backend", MODES)
def test_one_block_is_a_whole_box_of_the_batch_size(compat, backend):
    """num_blocks=1 over all frames: no cut (all targets one size), each target a t x h x w box."""
    cfg = dict(spatial_scale=(0.1, 0.6), temporal_scale=(0.2, 1.0), aspect_ratio=(0.5, 2.0), num_blocks=1)
    gen = make_gen(SMALL, cfg, compat=compat, backend=backend, seed=new_seed())
    T, H, W = grid_dims(SMALL)
    for _ in range(10):
        enc, pred = gen(6)
        f, r, c = pred // (H * W), pred // W % H, pred % W
        ext = [(x.amax(1) - x.amin(1) + 1) for x in (f, r, c)]
        assert bool((ext[0] * ext[1] * ext[2] == pred.size(1)).all()), "a target is not a box"
        assert all(bool((e == e[0]).all()) for e in ext), "block size differs within a batch"
        assert enc.size(1) == T * H * W - pred.size(1)


@pytest.mark.parametrize("backend", ["python", pytest.param("cpp", marks=needs_cpp)])
def test_deterministic_per_seed(backend):
    grid, cfg = CASES["mixed"]
    seed = new_seed()
    a = make_gen(grid, cfg, seed=seed, backend=backend)(8)
    gen = make_gen(grid, cfg, seed=seed, backend=backend)
    b = gen(8)
    c = gen(8)  # the next batch: a new seed from the counter
    d = make_gen(grid, cfg, seed=seed + 1, backend=backend)(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1]) or not torch.equal(a[0], c[0])
    assert not torch.equal(a[1], d[1]) or not torch.equal(a[0], d[0])


@needs_cpp
def test_cpp_is_independent_of_threads():
    gen = make_gen(VIDEO, CFG_8, seed=new_seed(), backend="cpp")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = gen.sample_cpp(300, 12345)
        torch.set_num_threads(max(threads, 2))
        b = gen.sample_cpp(300, 12345)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@needs_cpp
def test_cpp_given_block_size_is_used():
    gen = make_gen(SMALL, dict(MIXED, num_blocks=1, max_temporal_keep=1.0, max_keep=None), backend="cpp")
    enc, pred = gen.sample_cpp(5, new_seed(), block_size=(3, 2, 4))
    assert pred.size(1) == 3 * 2 * 4 and enc.size(1) == 4 * 36 - 24


@needs_cpp
def test_cpp_cut_and_complements_are_of_the_same_draws():
    """The options change only the output assembly, not the draws: with one seed, the cut
    context / target of the plain call give every option's output exactly."""
    from fastjepa.ops import cpp  # noqa: F401

    T, H, W = 4, 6, 6
    N = T * H * W

    def call(max_keep=None, full=False, pred_full=False, seed=None):
        return torch.ops.fastjepa.sample_masks3d(9, T, H, W, [0.25, 1.0], [0.1, 0.5], [0.5, 2.0], 3, 3, max_keep, full,
                                                 pred_full, seed, None)

    def complement(m):
        keep = torch.ones(m.size(0), N, dtype=torch.bool)
        keep.scatter_(1, m, False)
        return torch.stack([torch.nonzero(k).flatten() for k in keep])

    for _ in range(10):
        seed = new_seed()
        enc, pred = call(seed=seed)
        mk = int(torch.randint(1, enc.size(1) + 3, ()).item())
        enc_mk, pred_mk = call(max_keep=mk, seed=seed)
        assert torch.equal(enc_mk, enc[:, :mk]) and torch.equal(pred_mk, pred)
        enc_fc, pred_fc = call(max_keep=mk, full=True, seed=seed)
        assert torch.equal(enc_fc, enc[:, :mk]) and torch.equal(pred_fc, complement(enc[:, :mk]))
        enc_pf, pred_pf = call(max_keep=mk, pred_full=True, seed=seed)  # max_keep has no say: the context is replaced
        assert torch.equal(pred_pf, pred) and torch.equal(enc_pf, complement(pred))
        assert all(torch.equal(a, b) for a, b in zip(call(full=True, pred_full=True, seed=seed), call(full=True, seed=seed)))


@needs_cpp
@pytest.mark.slow
def test_opcheck_sample_masks3d():
    from fastjepa.ops import cpp  # noqa: F401 — registers the fake

    args = (4, 4, 6, 6, [0.25, 1.0], [0.1, 0.5], [0.5, 2.0], 3, 3, 40, False, False, new_seed(), None)
    torch.library.opcheck(torch.ops.fastjepa.sample_masks3d, args)
    torch.library.opcheck(torch.ops.fastjepa.sample_masks3d, args[:-1] + ([2, 3, 3],))


# -- errors (and no hang) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(spatial_pred_mask_scale=(0.0, 0.2)), r"spatial_scale=\(0.0, 0.2\): expected 0 < low"),
        (dict(spatial_pred_mask_scale=(0.3, 0.2)), r"spatial_scale=\(0.3, 0.2\)"),
        (dict(spatial_pred_mask_scale=(0.3,)), r"spatial_scale=\(0.3,\): expected two numbers"),
        (dict(temporal_pred_mask_scale=(0.5, 1.5)), r"temporal_scale=\(0.5, 1.5\): expected 0 <= low <= high <= 1"),
        (dict(aspect_ratio=(-1.0, 2.0)), r"aspect_ratio=\(-1.0, 2.0\)"),
        (dict(npred=0), "num_blocks=0: expected an int >= 1"),
        (dict(max_context_frames_ratio=0.0), "max_temporal_keep=0.0"),
        (dict(max_keep=0), "max_keep=0: expected None or an int >= 1"),
        (dict(compat="vjepa"), "compat='vjepa'"),
        (dict(backend="cuda"), "backend='cuda'"),
        (dict(compat="reference", backend="cpp"), "compat='reference' needs backend='python'"),
        (dict(num_frames=1), "0x16x16 token grid"),
        (dict(spatial_pred_mask_scale=(0.001, 0.1)), "empty blocks"),
        # a block of the whole grid: V-JEPA 2 retries the empty context forever
        (dict(spatial_pred_mask_scale=(1.0, 1.0), aspect_ratio=(1.0, 1.0)), "covering the whole 8x16x16 grid"),
    ],
)
def test_bad_configuration_raises_naming_the_value(kw, match):
    args = dict(crop_size=256, num_frames=16, spatial_patch_size=16, temporal_patch_size=2,
                spatial_pred_mask_scale=(0.15, 0.15), temporal_pred_mask_scale=(1.0, 1.0), aspect_ratio=(0.75, 1.5), npred=8)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        MaskGenerator3D(**args)


@pytest.mark.parametrize("compat,backend", MODES)
def test_a_context_that_is_nearly_always_empty_raises_instead_of_hanging(compat, backend):
    # a 1x1x3 grid, 1x1x2 blocks: 40 of them cover it unless all sit at one place (2^-39)
    gen = MaskGenerator3D(crop_size=(16, 48), num_frames=2, spatial_patch_size=16, spatial_pred_mask_scale=(0.67, 0.67),
                          temporal_pred_mask_scale=(1.0, 1.0), aspect_ratio=(0.5, 0.5), npred=40, compat=compat,
                          backend=backend)
    with pytest.raises(ValueError, match=f"context came out empty {MAX_EMPTY_DRAWS} times in a row.*num_blocks=40"):
        gen(2)


@needs_cpp
@pytest.mark.parametrize(
    "i,value,match",
    [
        (0, 0, "B=0"),
        (1, 0, "0x6x6 token grid"),
        (4, [0.5, 1.5], r"temporal_scale=\(0.5, 1.5\)"),
        (5, [0.0, 0.5], r"spatial_scale=\(0, 0.5\)"),
        (6, [2.0, 1.0], r"aspect_ratio=\(2, 1\)"),
        (7, 0, "num_blocks=0"),
        (8, 5, "max_context_frames=5: expected 1 <= value <= T=4"),
        (9, 0, "max_keep=0"),
        (13, [4, 6, 6], "covers the whole token grid"),
        (13, [5, 1, 1], r"block_size=\(5, 1, 1\)"),
        (13, [1, 1], "block_size has 2 values"),
    ],
)
def test_cpp_bad_arguments_raise(i, value, match):
    from fastjepa.ops import cpp  # noqa: F401

    args = [4, 4, 6, 6, [0.25, 1.0], [0.1, 0.5], [0.5, 2.0], 3, 3, 40, False, False, 0, None]
    args[i] = value
    with pytest.raises(ValueError, match=match):
        torch.ops.fastjepa.sample_masks3d(*args)


# -- distribution: C++ against the Python fastjepa mode ----------------------------------


def _stats(enc, pred, T, H, W):
    """Per-batch statistics from the masks alone (B = 1: the batch is the independent unit)."""
    f, r, c = pred // (H * W), pred // W % H, pred % W
    inside = torch.zeros(T * H * W)
    inside[enc[0]] = 1.0
    return {
        "Kc": [enc.size(1)],
        "Kt": [pred.size(1)],
        "t": [int(f.amax() - f.amin() + 1)],
        "h": [int(r.amax() - r.amin() + 1)],
        "w": [int(c.amax() - c.amin() + 1)],
        "start": [int(f.amin())],
        "top": [int(r.amin())],
        "left": [int(c.amin())],
    }, inside


def _compare(a: list, b: list, name: str, z: float = 5.0):
    """Each value's frequency agrees within z standard errors of the difference."""
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    for v in torch.cat([a, b]).unique().tolist():
        pa, pb = (a == v).double().mean().item(), (b == v).double().mean().item()
        se = math.sqrt(pa * (1 - pa) / len(a) + pb * (1 - pb) / len(b)) + 1e-12
        assert abs(pa - pb) <= z * se, f"frequency of {name}={v:g}: cpp {pa:.4f} vs python {pb:.4f} (se {se:.4f})"


DIST_CASES = {
    # one block over all frames: the target is the box, its size and offsets read off it
    "one_block": dict(spatial_scale=(0.1, 0.6), temporal_scale=(0.2, 1.0), aspect_ratio=(0.5, 2.0), num_blocks=1),
    # several blocks, a context over the first 3 of 4 frames, complements off
    "three_blocks": MIXED,
    "retry": RETRY,
}


@needs_cpp
@pytest.mark.parametrize("case", list(DIST_CASES))
def test_cpp_distribution_equals_python_fastjepa_mode(case):
    cfg = DIST_CASES[case]
    grid = TINY if case == "retry" else SMALL
    T, H, W = grid_dims(grid)
    n = 3000
    gen = make_gen(grid, cfg, backend="python")
    g = torch.Generator()
    g.manual_seed(new_seed())
    seed0 = new_seed()
    runs = {
        "cpp": (gen.sample_cpp(1, seed0 + i) for i in range(n)),
        "python": (gen.sample(1, g) for _ in range(n)),
    }
    stats, inclusion = {}, {}
    for name, batches in runs.items():
        acc, inc = {}, []
        for enc, pred in batches:
            s, inside = _stats(enc, pred, T, H, W)
            for k, v in s.items():
                acc.setdefault(k, []).extend(v)
            inc.append(inside)
        stats[name], inclusion[name] = acc, torch.stack(inc)  # (n, N)
    keys = ["Kc", "Kt"] + (["t", "h", "w", "start", "top", "left"] if case == "one_block" else [])
    for k in keys:
        _compare(stats["cpp"][k], stats["python"][k], k)
    # per-position inclusion in the context
    pa, pb = inclusion["cpp"].mean(0), inclusion["python"].mean(0)
    se = (pa * (1 - pa) / n + pb * (1 - pb) / n).sqrt() + 1e-12
    worst = int(((pa - pb).abs() / se).argmax())
    assert bool(((pa - pb).abs() <= 5 * se).all()), (
        f"context inclusion of cell {worst}: cpp {pa[worst]:.4f} vs python {pb[worst]:.4f} (se {se[worst]:.4f})")


# -- the V-JEPA 2 patch, on a stand-in of its mask module --------------------------------


def _standin_module():
    """A minimal stand-in of V-JEPA 2's ``src.masks.multiseq_multiblock3d`` (its interface
    and procedure, written here from the semantics)."""
    m = types.ModuleType("src.masks.multiseq_multiblock3d")

    class _MaskGenerator:
        def __init__(self, crop_size=(224, 224), num_frames=16, spatial_patch_size=(16, 16), temporal_patch_size=2,
                     spatial_pred_mask_scale=(0.2, 0.8), temporal_pred_mask_scale=(1.0, 1.0), aspect_ratio=(0.3, 3.0),
                     npred=1, max_context_frames_ratio=1.0, max_keep=None, inv_block=False, full_complement=False,
                     pred_full_complement=False):
            self.height, self.width = crop_size[0] // spatial_patch_size[0], crop_size[1] // spatial_patch_size[1]
            self.duration = num_frames // temporal_patch_size
            self.spatial_pred_mask_scale, self.temporal_pred_mask_scale = spatial_pred_mask_scale, temporal_pred_mask_scale
            self.aspect_ratio, self.npred, self.max_keep = aspect_ratio, npred, max_keep
            self.max_context_duration = max(1, int(self.duration * max_context_frames_ratio))
            self.inv_block, self.full_complement, self.pred_full_complement = inv_block, full_complement, pred_full_complement
            self.counter = -1

        def step(self):
            self.counter += 1
            return self.counter

        def _sample_block_size(self, generator, temporal_scale, spatial_scale, aspect_ratio_scale):
            u = [torch.rand(1, generator=generator).item() for _ in range(3)]
            t = max(1, int(self.duration * (temporal_scale[0] + u[0] * (temporal_scale[1] - temporal_scale[0]))))
            keep = int(self.height * self.width * (spatial_scale[0] + u[1] * (spatial_scale[1] - spatial_scale[0])))
            ar = aspect_ratio_scale[0] + u[2] * (aspect_ratio_scale[1] - aspect_ratio_scale[0])
            return t, min(int(round(math.sqrt(keep * ar))), self.height), min(int(round(math.sqrt(keep / ar))), self.width)

        def __call__(self, batch_size):
            cfg = dict(spatial_scale=self.spatial_pred_mask_scale, temporal_scale=self.temporal_pred_mask_scale,
                       aspect_ratio=self.aspect_ratio, num_blocks=self.npred, max_keep=self.max_keep,
                       max_temporal_keep=self.max_context_duration / self.duration, full_complement=self.full_complement,
                       pred_full_complement=self.pred_full_complement, inv_block=self.inv_block)
            grid = dict(crop_size=(self.height, self.width), spatial_patch_size=1, num_frames=self.duration,
                        temporal_patch_size=1)
            return oracle_batch(self.step(), batch_size, grid, cfg)

    class MaskCollator:
        def __init__(self, cfgs_mask, dataset_fpcs, crop_size=(224, 224), patch_size=(16, 16), tubelet_size=2):
            self.mask_generators = {
                fpc: [_MaskGenerator(crop_size, fpc, patch_size, tubelet_size, c["spatial_scale"], c["temporal_scale"],
                                     c["aspect_ratio"], c["num_blocks"], c.get("max_temporal_keep", 1.0),
                                     c.get("max_keep"), c.get("inv_block", False), c.get("full_complement", False),
                                     c.get("pred_full_complement", False)) for c in cfgs_mask]
                for fpc in dataset_fpcs
            }

        def __call__(self, batch):
            out = []
            for fpc, gens in self.mask_generators.items():
                samples = [s for s in batch if len(s[-1][-1]) == fpc]
                if samples:
                    pairs = [gen(len(samples)) for gen in gens]
                    out.append((torch.utils.data.default_collate(samples), [p[0] for p in pairs], [p[1] for p in pairs]))
            return out

    m._MaskGenerator, m.MaskCollator = _MaskGenerator, MaskCollator
    return m


def test_patches_are_empty_without_the_module_and_refuse_another_codebase():
    from fastjepa.integrations._vjepa2_masks import masks_patches

    assert masks_patches({}) == []
    other = types.ModuleType("src.masks.multiseq_multiblock3d")
    other.MaskCollator = type("MaskCollator", (), {})
    with pytest.raises(ValueError, match="expected a class _MaskGenerator"):
        masks_patches({"src.masks.multiseq_multiblock3d": other})


@needs_cpp
def test_patched_standin_collator_keeps_structure_and_distribution():
    from fastjepa.integrations._vjepa2_masks import masks_patches

    m = _standin_module()
    cfgs = [CFG_8, dict(MIXED, spatial_scale=(0.3, 0.3), temporal_scale=(0.5, 0.5), max_keep=None)]
    before = m.MaskCollator(cfgs, [16, 8], crop_size=(48, 48), patch_size=(8, 8), tubelet_size=2)
    (patch,) = masks_patches({"src.masks.multiseq_multiblock3d": m})
    owner, attr, new = patch
    assert owner is m._MaskGenerator and attr == "__call__" and new.__fastjepa_original__ is m._MaskGenerator.__call__
    original = m._MaskGenerator.__dict__["__call__"]
    batch = [(torch.zeros(2, fpc), 0, [torch.arange(fpc)]) for fpc in (16, 8, 16, 16)]

    def collect(col, batches):
        lengths = []
        for _ in range(batches):
            out = col(batch)
            assert [len(x) for x in out] == [3, 3] and [x[0][0].shape[0] for x in out] == [3, 1]
            for _, enc, pred in out:
                assert len(enc) == len(pred) == 2
                for e, p in zip(enc, pred):
                    assert e.dtype == p.dtype == torch.int64 and e.shape[0] == p.shape[0]
                    assert not set(e[0].tolist()) & set(p[0].tolist())
            lengths.append([x.size(1) for _, enc, pred in out for x in enc + pred])
        return torch.tensor(lengths, dtype=torch.float64)  # (batches, 8)

    torch.manual_seed(new_seed())
    want = collect(before, 150)
    setattr(owner, attr, new)
    try:
        after = m.MaskCollator(cfgs, [16, 8], crop_size=(48, 48), patch_size=(8, 8), tubelet_size=2)
        got_before, got_after = collect(before, 150), collect(after, 150)  # instances made before and after
    finally:
        setattr(owner, attr, original)
    assert m._MaskGenerator.__call__ is original
    # fixed block sizes: the mask lengths' means agree (independent batches, 5 standard errors)
    for got in (got_before, got_after):
        se = (want.var(0) / len(want) + got.var(0) / len(got)).sqrt() + 1e-9
        assert bool(((want.mean(0) - got.mean(0)).abs() <= 5 * se).all()), (want.mean(0), got.mean(0), se)


@needs_cpp
def test_patched_standin_uses_the_originals_block_size_and_counter():
    from fastjepa.integrations._vjepa2_masks import masks_patches

    m = _standin_module()
    cfg = dict(spatial_scale=(0.1, 0.6), temporal_scale=(0.2, 1.0), aspect_ratio=(0.5, 2.0), num_blocks=1)
    (owner, attr, new), = masks_patches({"src.masks.multiseq_multiblock3d": m})
    gen = m._MaskGenerator((48, 48), 8, (8, 8), 2, cfg["spatial_scale"], cfg["temporal_scale"], cfg["aspect_ratio"], 1)
    for k in range(5):
        _, pred = new(gen, 4)
        assert gen.counter == k
        g = torch.Generator()
        g.manual_seed(k)
        t, h, w = gen._sample_block_size(g, cfg["temporal_scale"], cfg["spatial_scale"], cfg["aspect_ratio"])
        assert pred.size(1) == t * h * w  # one block, all frames: the target is the original's box


@needs_cpp
def test_vjepa2_apply_patches_the_mask_generator_and_reverts_it(monkeypatch):
    """integrations.vjepa2.apply() wires this patch in (the masks flag) and revert() restores it."""
    from fastjepa.integrations import vjepa2

    m = _standin_module()
    monkeypatch.setitem(sys.modules, "src.masks.multiseq_multiblock3d", m)
    original = m._MaskGenerator.__dict__["__call__"]
    try:
        assert vjepa2.apply(masks=False) == []
        (name,) = vjepa2.apply()  # the stand-in's class is defined in this file, so named after it
        assert name.endswith("._MaskGenerator.__call__")
        assert m._MaskGenerator.__dict__["__call__"].__fastjepa_original__ is original
    finally:
        vjepa2.revert()
    assert m._MaskGenerator.__dict__["__call__"] is original
    other = types.ModuleType("src.masks.multiseq_multiblock3d")  # not V-JEPA 2's mask module
    monkeypatch.setitem(sys.modules, "src.masks.multiseq_multiblock3d", other)
    from fastjepa.integrations._patching import CodebaseMismatch

    with pytest.raises(CodebaseMismatch, match="expected a class _MaskGenerator"):
        vjepa2.apply()
