"""Normalisation on the device."""
import pytest
import torch

from data_pipeline.device import IMAGENET_MEAN, IMAGENET_STD, normalize


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
