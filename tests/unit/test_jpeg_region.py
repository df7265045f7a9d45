"""Partial JPEG decode (data_pipeline/image/_jpeg_region.c): a region's pixels equal the same region of a
whole-image decode, bit for bit, in every layout libjpeg decodes (chroma subsampling, progressive, restart
markers, greyscale, odd sizes, regions at the image's edges, DCT scales 1/2 to 1/8); bad data and bad
calls raise ValueError and never crash or print. The training transform gives the same pixels with and
without the extension."""
import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from data_pipeline.image import transforms
from data_pipeline.image.transforms import (EvalTransform, TrainTransform, center_crop_resize, decode_image,
                                            decode_region, partial_decode_missing)

needs_extension = pytest.mark.skipif(transforms._jpeg_region is None, reason=partial_decode_missing() or "built")


def _jpeg(w: int, h: int, seed: int = 0, mode: str = "RGB", **save) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(x / 7.0 + seed) * np.cos(y / 11.0) + rng.normal(0, 12, (h, w))
    rgb = np.stack([base, np.roll(base, 5, 1), 255 - base], -1)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=save.pop("quality", 90), **save)
    return buf.getvalue()


def _whole(data: bytes, d: int) -> np.ndarray:
    h, w = simplejpeg.decode_jpeg_header(data)[:2]
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-h // d), min_width=-(-w // d))


LAYOUTS = {
    "4:2:0": dict(subsampling=2),
    "4:2:2": dict(subsampling=1),
    "4:4:4": dict(subsampling=0),
    "progressive": dict(progressive=True),
    "restart markers": dict(restart_marker_blocks=4),
    "greyscale": dict(mode="L"),
}


@needs_extension  # without it, decode_region slices a whole decode: nothing to compare
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("d", [1, 2, 4, 8])
def test_region_equals_the_same_region_of_a_whole_decode(layout, d):
    save = dict(LAYOUTS[layout])
    data = _jpeg(437, 301, seed=d, mode=save.pop("mode", "RGB"), **save)
    whole = _whole(data, d)
    h, w = whole.shape[:2]
    rng = np.random.default_rng(d)
    regions = [(0, 0, w, h), (0, 0, 1, 1), (w - 1, h - 1, 1, 1), (0, h // 2, w, h - h // 2), (w // 3, 0, w // 3, h)]
    regions += [(int(x), int(y), int(rng.integers(1, w - x + 1)), int(rng.integers(1, h - y + 1)))
                for x, y in zip(rng.integers(0, w, 12), rng.integers(0, h, 12))]
    for left, top, rw, rh in regions:
        out = decode_region(data, 437, 301, d, left, top, rw, rh)
        assert out.shape == (rh, rw, 3)
        assert np.array_equal(out, whole[top:top + rh, left:left + rw]), (layout, d, left, top, rw, rh)


@needs_extension
def test_train_transform_gives_the_same_pixels_without_the_extension(monkeypatch):
    images = [_jpeg(500, 375, s) for s in range(3)] + [_jpeg(1024, 768, 7)]
    scales = [(0.08, 1.0), (0.5, 1.0), (0.08, 0.2)]  # every path: reductions, DCT-scaled, enlargements
    outs = [[TrainTransform(224, scale=sc)(b, np.random.default_rng(i)) for i, b in enumerate(images)]
            for sc in scales]
    monkeypatch.setattr(transforms, "_jpeg_region", None)
    for sc, expected in zip(scales, outs):
        for i, b in enumerate(images):
            assert np.array_equal(TrainTransform(224, scale=sc)(b, np.random.default_rng(i)), expected[i])


@pytest.mark.parametrize("w,h", [(500, 375), (375, 500), (1024, 768), (2000, 1500), (640, 200), (32, 32)])
def test_eval_transform_reads_only_the_centre_crop_and_keeps_its_pixels(w, h):
    """Evaluation numbers stay comparable across this change: bit-identical to decoding the whole image."""
    for crop_fraction in (0.875, 1.0, 0.5):
        data = _jpeg(w, h, seed=w + h)
        t = EvalTransform(224 if w > 32 else 32, crop_fraction)
        whole = center_crop_resize(decode_image(data, t.decode_size), t.image_size, crop_fraction)
        assert np.array_equal(t(data), np.asarray(whole)), (w, h, crop_fraction)


@needs_extension
def test_bad_data_and_bad_calls_raise_value_error():
    region = transforms._jpeg_region.decode_region
    data = _jpeg(200, 160)
    out = np.empty((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="outside"):
        region(data, out, 1, 190, 0)
    with pytest.raises(ValueError, match="scale_denom"):
        region(data, out, 3, 0, 0)
    with pytest.raises(ValueError, match="shape"):
        region(data, np.empty((16, 16, 4), np.uint8), 1, 0, 0)
    with pytest.raises(ValueError, match="contiguous"):
        region(data, np.empty((32, 32, 3), np.uint8)[::2, ::2], 1, 0, 0)
    with pytest.raises(BufferError):
        region(data, bytes(16 * 16 * 3), 1, 0, 0)  # read-only
    with pytest.raises(ValueError):
        region(b"\xff\xd8 not a jpeg at all", out, 1, 0, 0)
    with pytest.raises(ValueError):
        region(data[: len(data) // 2], np.empty((150, 16, 3), np.uint8), 1, 0, 10)  # truncated in the rows read
    cmyk = io.BytesIO()
    Image.new("CMYK", (64, 64), (10, 20, 30, 40)).save(cmyk, "JPEG")
    with pytest.raises(ValueError, match="CMYK"):
        region(cmyk.getvalue(), out, 1, 0, 0)


def test_cmyk_and_truncated_jpegs_take_the_pil_path_with_the_same_draws():
    cmyk = io.BytesIO()
    Image.new("CMYK", (300, 300), (10, 20, 30, 40)).save(cmyk, "JPEG")
    rng, ref = np.random.default_rng(0), np.random.default_rng(0)
    out = TrainTransform(224)(cmyk.getvalue(), rng)
    assert out.shape == (224, 224, 3)
    transforms.random_resized_crop_params(300, 300, ref)
    ref.random()
    assert rng.bit_generator.state == ref.bit_generator.state
    data = _jpeg(500, 375)
    with pytest.raises(Exception):
        TrainTransform(224, scale=(0.9, 1.0))(data[: len(data) // 3], np.random.default_rng(0))


def test_a_missing_extension_is_one_line_with_the_fix(monkeypatch):
    from cluster.envcheck import check_decode

    monkeypatch.setattr(transforms, "_NO_REGION_DECODE", "No module named 'data_pipeline.image._jpeg_region'")
    line = partial_decode_missing()
    assert "\n" not in line and "apt install libjpeg-dev" in line and "pip install -e ." in line
    check = check_decode()
    assert check.ok and check.detail.startswith("whole images: the partial JPEG decoder is not built")
    monkeypatch.setattr(transforms, "_NO_REGION_DECODE", "")
    assert partial_decode_missing() == "" and check_decode().detail.startswith("partial")
