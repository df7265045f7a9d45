"""Normalisation on the device, and the host batch -> device inputs step that runs it."""
import pytest
import torch

from data_pipeline.image.augment import MixupCutmix
from data_pipeline.stream.batch import Batch
from data_pipeline.image.device import IMAGENET_MEAN, IMAGENET_STD, BatchToDevice, normalize


def test_normalize_layout_and_values():
    images = torch.randint(0, 256, (3, 5, 7, 3), dtype=torch.uint8)
    out = normalize(images, IMAGENET_MEAN, IMAGENET_STD)
    assert out.shape == (3, 3, 5, 7) and out.dtype == torch.float32
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    expected = (images.permute(0, 3, 1, 2).double() - mean) / std
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # Pixel (n=1, y=2, x=4), channel 2: checks the NHWC -> NCHW mapping explicitly.
    assert out[1, 2, 2, 4].item() == pytest.approx((images[1, 2, 4, 2].item() - IMAGENET_MEAN[2]) / IMAGENET_STD[2],
                                                   rel=1e-5)


def test_normalize_dtype_and_constants():
    images = torch.full((1, 2, 2, 3), 255, dtype=torch.uint8)
    out = normalize(images, [0.0, 0.0, 0.0], [255.0, 255.0, 255.0], dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.all(out == 1)
    assert IMAGENET_MEAN[0] == pytest.approx(123.675) and IMAGENET_STD[2] == pytest.approx(57.375)


def test_normalize_rejects_float_or_wrong_channels():
    with pytest.raises(ValueError):
        normalize(torch.zeros(1, 2, 2, 3), IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError):
        normalize(torch.zeros(1, 2, 2, 4, dtype=torch.uint8), IMAGENET_MEAN, IMAGENET_STD)


def _host_batch(n=4, size=6, classes=5):
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8)
    return Batch(images=images, labels=torch.arange(n) % classes, keys=[f"k{i}" for i in range(n)])


def test_batch_to_device_normalises_and_keeps_hard_labels_without_mixing():
    batch = _host_batch()
    for mix in (None, MixupCutmix(5)):  # a mixer with both alphas 0 is off: labels stay class indices
        images, labels = BatchToDevice(torch.device("cpu"), 6, IMAGENET_MEAN, IMAGENET_STD, mix)(batch)
        torch.testing.assert_close(images, normalize(batch.images, IMAGENET_MEAN, IMAGENET_STD), rtol=0, atol=0)
        assert labels.dtype == torch.int64 and torch.equal(labels, batch.labels)


def test_batch_to_device_mixes_into_soft_targets_by_the_batch_keys():
    batch = _host_batch(n=8)
    to_device = BatchToDevice(torch.device("cpu"), 6, IMAGENET_MEAN, IMAGENET_STD, MixupCutmix(5, mixup_alpha=0.8))
    images, targets = to_device(batch)
    assert images.shape == (8, 3, 6, 6) and targets.shape == (8, 5)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert not torch.equal(images, normalize(batch.images, IMAGENET_MEAN, IMAGENET_STD))
    # The mix is a function of the keys, so a rerun (a resumed run) sees the same inputs.
    again, again_targets = to_device(batch)
    assert torch.equal(images, again) and torch.equal(targets, again_targets)
