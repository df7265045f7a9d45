"""Decode and augmentation on the CPU."""
import io

import numpy as np
import pytest
from PIL import Image

from data_pipeline.shards.tar_write import encode_jpeg
from data_pipeline.image.transforms import (EvalTransform, TrainTransform, center_crop_resize, decode_image,
                                      random_resized_crop, random_resized_crop_params)


def _gradient(w, h):
    """An image whose red channel encodes x and green encodes y (so crops and flips are visible)."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)


@pytest.mark.parametrize("w,h", [(64, 48), (20, 90), (300, 200)])
def test_random_resized_crop_output_size(w, h):
    rng = np.random.default_rng(0)
    img = Image.fromarray(_gradient(w, h))
    for _ in range(20):
        out = random_resized_crop(img, 24, rng)
        assert out.size == (24, 24) and out.mode == "RGB"


def test_random_resized_crop_params_statistics():
    rng = np.random.default_rng(1)
    W, H = 200, 160
    params = np.array([random_resized_crop_params(W, H, rng) for _ in range(3000)], dtype=np.float64)
    top, left, h, w = params.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    area = h * w / (W * H)
    assert area.min() >= 0.07 and area.max() <= 1.0
    aspect = w / h
    assert aspect.min() >= 0.70 and aspect.max() <= 1.40  # 3/4..4/3 up to integer rounding
    # Uniform scale in [0.08, 1], minus rejected large crops: the mean area sits a little under 0.54.
    assert 0.40 < area.mean() < 0.54
    # Positions are uniform over the free range: crop centres average to the image centre.
    assert abs((left + w / 2).mean() - W / 2) < 4 and abs((top + h / 2).mean() - H / 2) < 4
    # Log-uniform aspect ratio: both orientations occur (wide ones a little more often in a wide image).
    assert 0.45 < (aspect > 1).mean() < 0.65


def test_random_resized_crop_fallback_is_centre_crop():
    rng = np.random.default_rng(0)
    # An impossible scale forces all 10 tries to fail.
    assert random_resized_crop_params(100, 100, rng, scale=(2.0, 3.0)) == (0, 0, 100, 100)
    # Too wide for the ratio range: full height, width = height * 4/3, centred.
    assert random_resized_crop_params(300, 60, rng, scale=(2.0, 3.0)) == (0, 110, 60, 80)
    # Too tall: full width, height = width / (3/4), centred.
    assert random_resized_crop_params(60, 300, rng, scale=(2.0, 3.0)) == (110, 0, 80, 60)


def test_decode_image_drafts_only_when_much_larger():
    data = encode_jpeg(_gradient(256, 256))
    assert decode_image(data).size == (256, 256)
    assert decode_image(data, min_size=32).size == (32, 32)  # 1/8 DCT scale
    assert decode_image(data, min_size=100).size == (128, 128)  # 1/2: 1/4 would undershoot 100
    assert 200 <= decode_image(data, min_size=200).size[0] <= 256  # libjpeg-turbo may scale by 7/8
    png = io.BytesIO()
    Image.fromarray(_gradient(64, 64)).convert("L").save(png, format="PNG")
    grey = decode_image(png.getvalue(), min_size=8)
    assert grey.mode == "RGB" and grey.size == (64, 64)


def test_center_crop_resize_keeps_the_centre():
    img = Image.fromarray(_gradient(200, 100))
    out = np.asarray(center_crop_resize(img, 32, crop_fraction=0.5), dtype=np.float32)
    assert out.shape == (32, 32, 3)
    # The crop spans x in [75, 125] of 200 -> red around 96..160, centred on 127.
    assert abs(out[..., 0].mean() - 127.5) < 3 and 90 < out[..., 0].min() and out[..., 0].max() < 166


def test_train_transform_flip_and_determinism():
    data = encode_jpeg(_gradient(40, 40))
    whole = TrainTransform(40, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True)  # crop = whole image
    outs = [whole(data, np.random.default_rng(s)) for s in range(40)]
    flipped = [o[:, 0, 0].mean() > o[:, -1, 0].mean() for o in outs]  # red decreases left to right
    assert 5 < sum(flipped) < 35
    no_flip = TrainTransform(40, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)
    assert not any(o[:, 0, 0].mean() > o[:, -1, 0].mean() for o in
                   (no_flip(data, np.random.default_rng(s)) for s in range(20)))
    t = TrainTransform(16)
    a, b = t(data, np.random.default_rng(7)), t(data, np.random.default_rng(7))
    assert a.dtype == np.uint8 and a.shape == (16, 16, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, t(data, np.random.default_rng(8)))


def test_eval_transform():
    data = encode_jpeg(_gradient(64, 48))
    out = EvalTransform(24, crop_fraction=0.875)(data)
    assert out.dtype == np.uint8 and out.shape == (24, 24, 3)
    assert np.array_equal(out, EvalTransform(24)(data))
    with pytest.raises(ValueError):
        EvalTransform(24, crop_fraction=1.5)


def test_train_transform_rejects_bad_ranges():
    with pytest.raises(ValueError):
        TrainTransform(32, scale=(0.0, 1.0))
    with pytest.raises(ValueError):
        TrainTransform(32, ratio=(4 / 3, 3 / 4))
