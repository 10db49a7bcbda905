"""The imagefolder decode paths: fast (header-only box, reduced-DCT decode), reference,
uint8 hand-off finished on the device, the GPU-decode worker side and its fallback."""

import importlib
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastjepa.data import ImageFolder, batch_to_device, build_dataset, loader_options, resolve_decode
from fastjepa.data import decode as fast
from fastjepa.data.transforms import IMAGENET_MEAN, IMAGENET_STD, sample_crop_box

ROOT = Path(__file__).resolve().parents[2]


def _natural_image(h, w, rng):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("bench_data").natural_image(h, w, rng)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _psnr(a, b):
    mse = ((a.double() - b.double()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """Natural-image-like JPEGs (q90) in two class folders, portrait and landscape, one large."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(375, 500), (500, 375), (300, 401), (768, 1024), (375, 500), (257, 333)]):
        d = root / f"c{i % 2}"
        d.mkdir(exist_ok=True)
        Image.fromarray(_natural_image(h, w, rng)).save(d / f"img{i}.jpg", "JPEG", quality=90)
    Image.fromarray(_natural_image(120, 90, rng)).convert("L").save(root / "c0" / "grey.jpg", "JPEG", quality=90)
    Image.fromarray(_natural_image(100, 80, rng)).save(root / "c1" / "x.png")
    Image.fromarray(_natural_image(96, 128, rng)).convert("CMYK").save(root / "c1" / "cmyk.jpg", "JPEG", quality=90)
    return root


@pytest.fixture(params=["simplejpeg", "pillow"])
def decoder(request, monkeypatch):
    """The fast path with simplejpeg, and with Pillow's draft decode where simplejpeg is absent."""
    if request.param == "simplejpeg":
        pytest.importorskip("simplejpeg")
        monkeypatch.setattr(fast, "_simplejpeg", None)  # re-import on first use
    else:
        monkeypatch.setattr(fast, "_simplejpeg", False)
    return request.param


def _reference(path, size, scale, g, flip):
    """The reference pipeline written out: full Pillow decode, box on the full image,
    bilinear resize of the box, to [0, 1], ImageNet normalisation, then the flip draw."""
    with Image.open(path) as img:
        img = img.convert("RGB")
    top, left, h, w = sample_crop_box(img.height, img.width, scale, (3 / 4, 4 / 3), g)
    arr = np.asarray(img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h)))
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    if flip and torch.rand(1, generator=g).item() < 0.5:
        x = x.flip(-1)
    return x


@pytest.mark.parametrize("size", [64, 37])
def test_fast_decode_off_is_the_reference_bit_for_bit(jpegs, size):
    """data.fast_decode=false: the float output and the uint8 output finished by
    batch_to_device both equal the reference pipeline exactly (crops flipped or not)."""
    seed = int(torch.randint(0, 2**31, ()))
    ref = ImageFolder(jpegs, crop_size=size, fast_decode=False, output="float", hflip=True)
    u8 = ImageFolder(jpegs, crop_size=size, fast_decode=False, output="uint8", hflip=True)
    flips = seen = 0
    # each crop flips with p = 1/2, so one epoch of 9 images misses a branch 1 time in 256:
    # go on to the next epoch until both branches have run (20 epochs: 1 in 10^48 misses)
    for epoch in range(3, 23):
        for ds in (ref, u8):
            ds.set_epoch(epoch, seed=seed)
        for i in range(len(ref)):
            expected = _reference(ref.samples[i][0], size, (0.3, 1.0), ref.sample_generator(i), True)
            img, label, flip = u8[i]
            assert img.dtype == torch.uint8 and img.shape == (3, size, size) and label == ref.samples[i][1]
            flips, seen = flips + flip, seen + 1
            assert torch.equal(ref[i][0], expected), (epoch, i)
            assert torch.equal(batch_to_device([img[None], torch.tensor([label]), torch.tensor([flip])], "cpu")[0], expected), (epoch, i)
        if 0 < flips < seen:
            break
    assert 0 < flips < seen  # both branches of the flip ran


def test_fast_decode_differs_only_by_resampling(jpegs, decoder):
    """The fast path crops the same box (sampled on the full-size image) and differs from the
    full decode by resampling only: PSNR >= 30 dB on natural-image-like JPEGs, at DCT
    scales 1, 2, 4 and 8 (crop sizes that make each one happen)."""
    seed = int(torch.randint(0, 2**31, ()))
    scales, worst = set(), float("inf")
    for size in (224, 100, 48, 24):
        ref = ImageFolder(jpegs, crop_size=size, fast_decode=False, output="uint8")
        fst = ImageFolder(jpegs, crop_size=size, fast_decode=True, output="uint8")
        for epoch in range(2):
            for ds in (ref, fst):
                ds.set_epoch(epoch, seed=seed)
            for i in range(len(ref)):
                with Image.open(ref.samples[i][0]) as im:
                    box = sample_crop_box(im.height, im.width, (0.3, 1.0), (3 / 4, 4 / 3), ref.sample_generator(i))
                    if im.format == "JPEG":
                        scales.add(fast.dct_scale(box[2], box[3], size))
                a, b = ref[i][0], fst[i][0]
                assert b.dtype == torch.uint8 and b.shape == a.shape
                worst = min(worst, _psnr(a, b))
    assert scales == {1, 2, 4, 8}, scales
    assert worst >= 30, f"fast decode PSNR {worst:.1f} dB against the full decode ({decoder})"


def test_fast_float_output_is_the_uint8_output_normalised(jpegs):
    ds_f = ImageFolder(jpegs, crop_size=32, output="float", hflip=True)
    ds_u = ImageFolder(jpegs, crop_size=32, output="uint8", hflip=True)
    for i in range(len(ds_f)):
        img, _, flip = ds_u[i]
        torch.testing.assert_close(ds_f[i][0], batch_to_device([img[None], torch.tensor([0]), torch.tensor([flip])], "cpu")[0],
                                   rtol=0, atol=0)  # fmt: skip


def test_crops_are_functions_of_seed_epoch_index(jpegs):
    """Resume stays exact: a new dataset with the same seed and epoch gives the same crops."""
    a = ImageFolder(jpegs, crop_size=32, output="uint8", hflip=True)
    b = ImageFolder(jpegs, crop_size=32, output="uint8", hflip=True)
    for ds in (a, b):
        ds.set_epoch(5, seed=11)
    for i in (0, 3, 4):
        assert torch.equal(a[i][0], b[i][0]) and a[i][2] == b[i][2]
    b.set_epoch(6)
    assert any(not torch.equal(a[i][0], b[i][0]) for i in range(len(a)))


def test_gpu_worker_side_ships_the_file_and_the_cpu_paths_box(jpegs):
    """decode='gpu': a plain JPEG travels encoded with the box the CPU path would crop
    (same draws), anything else (PNG here) is decoded in the worker and travels RAW."""
    ds = ImageFolder(jpegs, crop_size=32, output="uint8", decode="gpu", hflip=True)
    cpu = ImageFolder(jpegs, crop_size=32, output="uint8", hflip=True)
    for d in (ds, cpu):
        d.set_epoch(2, seed=7)
    kinds = set()
    for i in range(len(ds)):
        payload, label, flip, box, index = ds[i]
        assert index == i and label == ds.samples[i][1] and flip == cpu[i][2]
        path = ds.samples[i][0]
        assert payload.startswith(fast.RAW) == path.endswith((".png", "cmyk.jpg")), path  # nvjpeg: YCbCr / grey JPEGs
        if payload.startswith(fast.RAW):
            kinds.add("raw")
            assert torch.equal(torch.frombuffer(bytearray(payload[len(fast.RAW):]), dtype=torch.uint8).view(3, 32, 32), cpu[i][0])
        else:
            kinds.add("jpeg")
            assert payload == Path(path).read_bytes()
            with Image.open(path) as im:
                expected = sample_crop_box(im.height, im.width, (0.3, 1.0), (3 / 4, 4 / 3), ds.sample_generator(i))
            assert tuple(box.tolist()) == expected
    assert kinds == {"raw", "jpeg"}


def test_a_jpeg_simplejpeg_refuses_after_its_header_is_cropped_by_pillow_with_the_same_box(jpegs, monkeypatch):
    """Strict simplejpeg refuses files libjpeg only warns about (Pillow reads them): the box
    drawn from the header is kept when Pillow takes over — one draw, not two."""
    sj = pytest.importorskip("simplejpeg")

    class Refuses:
        decode_jpeg_header = staticmethod(sj.decode_jpeg_header)

        @staticmethod
        def decode_jpeg(*args, **kwargs):
            raise ValueError("Corrupt JPEG data: 3 extraneous bytes before marker 0xd9")

    path = str(jpegs / "c1" / "img3.jpg")  # 768x1024: reduced scales happen at crop 64
    seed = int(torch.randint(0, 2**31, ()))
    for size in (224, 64):
        draws = []
        g = torch.Generator().manual_seed(seed)

        def sample(H, W):
            draws.append((H, W))
            return sample_crop_box(H, W, (0.3, 1.0), (3 / 4, 4 / 3), g)

        monkeypatch.setattr(fast, "_simplejpeg", Refuses)
        out = fast.read_crop(path, sample, size)
        assert draws == [(768, 1024)]
        monkeypatch.setattr(fast, "_simplejpeg", False)
        g2 = torch.Generator().manual_seed(seed)
        assert torch.equal(out, fast.read_crop(path, lambda H, W: sample_crop_box(H, W, (0.3, 1.0), (3 / 4, 4 / 3), g2), size))


def _bad_folder(root):
    rng = np.random.default_rng(1)
    for i in range(6):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_natural_image(60, 80, rng)).save(d / f"a{i}.jpg", "JPEG", quality=90)
    (root / "c0" / "b_garbage.jpg").write_bytes(b"this is not an image")
    data = (root / "c0" / "a0.jpg").read_bytes()
    (root / "c1" / "b_truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "c1" / "b_noeoi.jpg").write_bytes(data[:-2])  # only the end marker missing
    Image.fromarray(_natural_image(20, 20, rng)).save(root / "c1" / "c.png")
    png = (root / "c1" / "c.png").read_bytes()
    (root / "c1" / "b_truncated.png").write_bytes(png[: len(png) // 3])


@pytest.mark.filterwarnings("ignore:skipping unreadable image")  # the comparison datasets meet the bad files again
@pytest.mark.parametrize("mode", ["reference-float", "reference-uint8", "fast-simplejpeg", "fast-pillow", "gpu-worker"])
def test_unreadable_files_skipped_warned_once_counted_on_every_path(tmp_path, mode, monkeypatch):
    """Four bad files, every index read twice: each warned about once and counted once, and
    a bad index yields the next readable file, cropped with the bad index's draws."""
    _bad_folder(tmp_path)
    if mode == "fast-pillow":
        monkeypatch.setattr(fast, "_simplejpeg", False)
    kw = dict(crop_size=16, hflip=True, fast_decode=not mode.startswith("reference"),
              output="float" if mode == "reference-float" else "uint8", decode="gpu" if mode == "gpu-worker" else "cpu")  # fmt: skip
    ds = ImageFolder(tmp_path, **kw)
    cpu = ImageFolder(tmp_path, **{**kw, "decode": "cpu"})
    bad = [i for i, (p, _) in enumerate(ds.samples) if "/b_" in p]
    assert len(bad) == 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            items = [ds[i] for i in range(len(ds))]
    msgs = [str(w.message) for w in caught if "skipping unreadable image" in str(w.message)]
    assert ds.num_skipped == 4 and len(msgs) == 4, msgs
    assert sorted(m.split(":")[0].rsplit("/", 1)[-1] for m in msgs) == sorted(Path(ds.samples[i][0]).name for i in bad)
    box_of = lambda i: lambda H, W: sample_crop_box(H, W, (0.3, 1.0), (3 / 4, 4 / 3), ds.sample_generator(i))  # noqa: E731
    for i in bad:
        nxt = next(j for j in range(i + 1, len(ds) + i) if j % len(ds) not in bad) % len(ds)
        assert items[i][1] == ds.samples[nxt][1]  # the next readable file's label
        path = ds.samples[nxt][0]
        if mode == "reference-float":
            assert torch.equal(items[i][0], _reference(path, 16, (0.3, 1.0), ds.sample_generator(i), True))
        elif mode == "reference-uint8":
            with Image.open(path) as im:
                top, left, h, w = box_of(i)(im.height, im.width)
                arr = np.asarray(im.convert("RGB").resize((16, 16), Image.BILINEAR, box=(left, top, left + w, top + h)))
            assert torch.equal(items[i][0], torch.from_numpy(arr.copy()).permute(2, 0, 1))
        elif mode.startswith("fast"):
            assert torch.equal(items[i][0], fast.read_crop(path, box_of(i), 16))
        if mode == "gpu-worker":
            payload, box, index = items[i][0], items[i][3], items[i][4]
            assert index == i
            if not payload.startswith(fast.RAW):  # encoded: the next file, with sample i's box
                assert payload == Path(ds.samples[nxt][0]).read_bytes()
                with Image.open(ds.samples[nxt][0]) as im:
                    assert tuple(box.tolist()) == sample_crop_box(im.height, im.width, (0.3, 1.0), (3 / 4, 4 / 3), ds.sample_generator(i))
            else:
                assert torch.equal(torch.frombuffer(bytearray(payload[len(fast.RAW):]), dtype=torch.uint8).view(3, 16, 16), cpu[i][0])


def test_decode_choice_and_cpu_fallback(capsys, monkeypatch):
    assert resolve_decode("cpu", "cuda") == "cpu"
    assert resolve_decode("auto", "cpu") == "cpu" and capsys.readouterr().err == ""  # nothing to say off CUDA
    assert resolve_decode("gpu", "cpu") == "cpu"
    assert "data.decode=gpu: decoding on the CPU: the training device is cpu, not CUDA" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as where torchvision is not installed
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    assert resolve_decode("auto", "cuda") == "cpu"
    assert "data.decode=auto: decoding on the CPU: torchvision.io.decode_jpeg is not importable" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"data.decode='nvjpeg': expected 'cpu', 'gpu' or 'auto'"):
        resolve_decode("nvjpeg", "cpu")
    with pytest.raises(ValueError, match=r"decode='gpu' ships encoded files to the device: it needs output='uint8'"):
        ImageFolder(ROOT / "tests", decode="gpu")
    with pytest.raises(ValueError, match=r"output='half': expected one of 'float', 'uint8'"):
        ImageFolder(ROOT / "tests", output="half")


def test_build_dataset_for_the_trainer_ships_uint8(jpegs):
    cfg = {"dataset": "imagefolder", "root_path": str(jpegs), "image_folder": "", "crop_size": 32, "decode": "gpu"}
    ds = build_dataset(cfg, device="cpu")  # gpu asked for, CPU device: the CPU path
    assert ds.output == "uint8" and ds.decode == "cpu" and ds.fast_decode
    assert build_dataset(cfg).output == "float"
    assert not build_dataset({**cfg, "fast_decode": False}, device="cpu").fast_decode
    mnist = build_dataset({"dataset": "embedded", "crop_size": 32}, device="cpu")
    img = mnist[0][0]
    assert img.dtype == torch.float32 and batch_to_device([img[None], torch.tensor([0])], "cpu").dtype == torch.float32


def test_loader_options_from_the_machine(jpegs, monkeypatch):
    folder = ImageFolder(jpegs, crop_size=32)
    mnist = build_dataset({"dataset": "embedded", "crop_size": 32})
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun, 4 processes on the node: 4 cores each
    opts = loader_options({"num_workers": "auto", "pin_mem": True}, folder, torch.device("cuda"))
    assert opts == {"num_workers": 3, "pin_memory": True, "prefetch_factor": 3, "persistent_workers": False}
    assert loader_options({"num_workers": "auto"}, mnist, "cuda") == {"num_workers": 0, "pin_memory": True}
    assert loader_options({"num_workers": 2, "pin_mem": True}, folder, "cpu")["pin_memory"] is False
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert loader_options({"num_workers": "auto"}, folder, "cpu")["num_workers"] == 15
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert loader_options({"num_workers": "auto"}, folder, "cpu") == {"num_workers": 0, "pin_memory": False}


def test_config_num_workers_auto_and_new_keys():
    from fastjepa.config import ConfigError, load_config

    from .._tiny import TINY

    cfg = load_config(None, [*TINY])
    assert cfg["data"]["fast_decode"] is True and cfg["data"]["decode"] == "cpu"
    assert load_config(None, [*TINY, "data.num_workers=auto"])["data"]["num_workers"] == "auto"
    with pytest.raises(ConfigError, match=r"data.num_workers: got 'many' \(str\), expected an integer or 'auto'"):
        load_config(None, [*TINY, "data.num_workers=many"])
    with pytest.raises(ConfigError, match=r"data.num_workers, got -1, expected an integer >= 0|data.num_workers: got -1, expected an integer >= 0"):
        load_config(None, [*TINY, "data.num_workers=-1"])
    with pytest.raises(ConfigError, match=r"data.decode: got 'nvjpeg'"):
        load_config(None, [*TINY, "data.decode=nvjpeg"])


def test_training_loss_of_a_fixed_batch_is_the_same_either_way(jpegs):
    """The trainer's uint8 hand-off (finished by batch_to_device) and the reference float
    pipeline give the same loss on one fixed batch (bit-identical images on the CPU)."""
    from fastjepa.config import load_config
    from fastjepa.training.trainer import Trainer

    from .._tiny import TINY

    cfg = load_config(None, [*TINY, "data.dataset=imagefolder", f"data.root_path={jpegs}", "data.image_folder=",
                             "data.fast_decode=false", "data.batch_size=4", "data.use_horizontal_flip=true"])  # fmt: skip
    t = Trainer(cfg, jpegs.parent / "run-loss", quiet=True)
    assert t.dataset.output == "uint8"
    idx = list(range(4))
    udata, masks_enc, masks_pred = t.collator([t.dataset[i] for i in idx])
    ref = ImageFolder(jpegs, crop_size=16, fast_decode=False, output="float", hflip=True)
    ref.set_epoch(0, seed=cfg["meta"]["seed"])
    imgs_ref = torch.stack([ref[i][0] for i in idx])
    imgs = batch_to_device(udata, t.device, t.dataset)
    assert torch.equal(imgs, imgs_ref)
    with torch.no_grad():
        a = t.model(imgs, masks_enc, masks_pred)
        b = t.model(imgs_ref, masks_enc, masks_pred)
    assert torch.equal(a, b) and torch.isfinite(a)


@pytest.mark.gpu
def test_gpu_decode_matches_the_cpu_path(jpegs, tmp_path):
    """nvjpeg decode + crop + resize on the device: the CPU path's boxes and flips, pixels
    within the resampling bound of the full decode; nvjpeg's refusals go to the CPU path."""
    pytest.importorskip("torchvision.io")
    device = torch.device("cuda")
    assert resolve_decode("gpu", device) == "gpu"
    _bad_folder(tmp_path / "bad")
    from fastjepa.data.decode import gpu_decode_counts

    for root, size in ((jpegs, 224), (jpegs, 48), (tmp_path / "bad", 16)):
        before = gpu_decode_counts()
        gpu = ImageFolder(root, crop_size=size, output="uint8", decode="gpu", hflip=True)
        ref = ImageFolder(root, crop_size=size, output="uint8", fast_decode=False, hflip=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.utils.data import default_collate

            udata = default_collate([gpu[i] for i in range(len(gpu))])
            out = batch_to_device(udata, device, gpu)
            expected = batch_to_device(default_collate([ref[i] for i in range(len(ref))]), "cpu")
        assert out.device.type == "cuda" and out.shape == expected.shape and out.dtype == torch.float32
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        to255 = lambda x: (x.cpu() * std + mean) * 255  # noqa: E731
        for i in range(len(gpu)):
            assert _psnr(to255(out)[i], to255(expected)[i]) >= 30, (root, size, i)
        counts = {k: v - before[k] for k, v in gpu_decode_counts().items()}
        assert sum(counts.values()) == len(gpu), counts
        if root == jpegs:  # every plain JPEG decoded by nvjpeg: a fallback would compare the CPU against itself
            assert counts["cpu_fallback"] == 0 and counts["nvjpeg"] > 0, counts


@pytest.mark.slow
def test_imagefolder_resume_mid_epoch_with_workers_is_exact(jpegs, tmp_path):
    """Fast decode, flips, two loader workers: stopping mid-epoch and resuming gives the
    uninterrupted run's losses (each crop is a function of (seed, epoch, index))."""
    import csv

    from fastjepa.config import load_config
    from fastjepa.training.trainer import Trainer

    from .._tiny import TINY

    base = [*TINY, "data.dataset=imagefolder", f"data.root_path={jpegs}", "data.image_folder=", "data.batch_size=2",
            "data.use_horizontal_flip=true", "data.num_workers=2", "optimization.epochs=2"]  # fmt: skip

    def losses(run):
        with open(run / "log.csv", newline="") as f:
            return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]

    full = Trainer(load_config(None, base), tmp_path / "full", quiet=True).fit()
    part = Trainer(load_config(None, [*base, "meta.max_steps=3"]), tmp_path / "part", quiet=True).fit()
    rest = Trainer(load_config(None, base), tmp_path / "part", resume=True, quiet=True).fit()
    assert full["status"] == rest["status"] == "done" and part["step"] == 3 and full["step"] == rest["step"] == 8
    assert losses(tmp_path / "full") == losses(tmp_path / "part")


def test_gpu_decode_counts_nvjpeg_images_cpu_fallbacks_and_raw_payloads(jpegs, monkeypatch):
    """The GPU path's tally, with a stand-in for torchvision's nvjpeg decode on the CPU: the
    batched call fails, one file is then refused and decoded on the CPU, the rest decode;
    PNG / CMYK files arrive RAW. Every image is counted once, in the right column."""
    import types

    from torch.utils.data import default_collate

    ds = ImageFolder(jpegs, crop_size=32, output="uint8", decode="gpu")
    items = [ds[i] for i in range(len(ds))]
    raw = sum(p.startswith(fast.RAW) for p, *_ in items)
    refused = next(i for i, (p, *_) in enumerate(items) if not p.startswith(fast.RAW))

    def decode_jpeg(data, mode=None, device=None):
        if isinstance(data, list):
            raise RuntimeError("batched decode failed")
        if bytes(data.numpy()) == items[refused][0]:
            raise RuntimeError("nvjpeg: unsupported")
        import io

        img = np.asarray(Image.open(io.BytesIO(bytes(data.numpy()))).convert("RGB"))
        return torch.from_numpy(img.copy()).permute(2, 0, 1)

    io_mod = types.SimpleNamespace(decode_jpeg=decode_jpeg, ImageReadMode=types.SimpleNamespace(RGB="RGB"))
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(io=io_mod))
    monkeypatch.setitem(sys.modules, "torchvision.io", io_mod)
    before = fast.gpu_decode_counts()
    out = batch_to_device(default_collate(items), "cpu", ds)
    counts = {k: v - before[k] for k, v in fast.gpu_decode_counts().items()}
    assert out.shape == (len(ds), 3, 32, 32)
    assert counts == {"nvjpeg": len(ds) - raw - 1, "cpu_fallback": 1, "raw": raw}, counts
    assert raw > 0  # the fixture has files nvjpeg is never given
