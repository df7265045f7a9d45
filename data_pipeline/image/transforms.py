"""CPU-side image decode and augmentation (PIL + numpy only; uint8 HWC out).

Normalisation is deliberately absent: it runs on the accelerator (see ``device.py``), so the
host only moves uint8 pixels.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from data_pipeline.image.augment import RandAugment

try:  # libjpeg-turbo with DCT scaling, without PIL's per-call overhead; PIL's draft mode otherwise
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the platform's wheels
    simplejpeg = None

_JPEG_MAGIC = b"\xff\xd8"


def decode_image(data: bytes, min_size: int | None = None) -> Image.Image:
    """Decode image bytes to RGB; JPEGs at least twice ``min_size`` are DCT-downscaled while decoding."""
    if simplejpeg is not None and data[:2] == _JPEG_MAGIC:
        try:
            # min_height/min_width: the largest 1/2, 1/4, 1/8 DCT scale that keeps both sides >= min_size,
            # as PIL's draft(); strict (the default) raises on corrupt or truncated data.
            kw = {"min_height": min_size, "min_width": min_size} if min_size else {}
            return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB", **kw), "RGB")
        except ValueError:
            pass  # e.g. CMYK or progressive oddities simplejpeg refuses: let PIL decide
    img = Image.open(io.BytesIO(data))
    if min_size is not None:
        # draft() picks the largest 1/2, 1/4, 1/8 DCT scale that keeps both sides >= min_size;
        # it is a no-op for non-JPEG formats and for images smaller than 2 * min_size.
        img.draft("RGB", (min_size, min_size))
    return img.convert("RGB")


def random_resized_crop_params(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Return ``(top, left, h, w)`` exactly as torchvision's ``RandomResizedCrop.get_params`` does."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the largest centred crop whose aspect ratio lies within `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    img: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """Crop a random area/aspect region and resize it to ``size`` x ``size`` (bilinear)."""
    top, left, h, w = random_resized_crop_params(img.width, img.height, rng, scale, ratio)
    # resize(box=...) crops and resamples in one pass instead of copying the crop first.
    return img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))


def center_crop_resize(img: Image.Image, size: int, crop_fraction: float = 0.875) -> Image.Image:
    """Centre square crop covering ``crop_fraction`` of the short side, resized to ``size`` (the usual eval view)."""
    side = min(img.width, img.height) * crop_fraction
    left = (img.width - side) / 2
    top = (img.height - side) / 2
    return img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))


def horizontal_flip(img: Image.Image) -> Image.Image:
    """Mirror left-right."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


class TrainTransform:
    """``(jpeg_bytes, rng) -> uint8 [H, W, 3]``: decode, random resized crop, optional random flip."""

    def __init__(
        self,
        image_size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        randaugment: RandAugment | None = None,
    ) -> None:
        if not 0 < scale[0] <= scale[1] or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}")
        self.image_size = int(image_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = bool(hflip)
        self.randaugment = randaugment
        # Draft only as far as keeps even the smallest possible crop at >= image_size pixels,
        # so reduced-size decoding never costs resolution in the output.
        min_side = math.sqrt(self.scale[0] * min(self.ratio[0], 1 / self.ratio[1]))
        self.decode_size = math.ceil(self.image_size / min_side)

    def __call__(self, data: bytes, rng: np.random.Generator) -> np.ndarray:
        img = decode_image(data, self.decode_size)
        img = random_resized_crop(img, self.image_size, rng, self.scale, self.ratio)
        if self.hflip and rng.random() < 0.5:
            img = horizontal_flip(img)
        if self.randaugment is not None:
            img = self.randaugment(img, rng)
        return np.asarray(img, dtype=np.uint8)

    def __repr__(self) -> str:
        return (f"TrainTransform(image_size={self.image_size}, scale={self.scale}, ratio={self.ratio}, "
                f"hflip={self.hflip}, randaugment={self.randaugment})")


class EvalTransform:
    """``jpeg_bytes -> uint8 [H, W, 3]``: decode and centre crop."""

    def __init__(self, image_size: int, crop_fraction: float = 0.875) -> None:
        if not 0 < crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        self.image_size = int(image_size)
        self.crop_fraction = float(crop_fraction)
        self.decode_size = math.ceil(self.image_size / self.crop_fraction)

    def __call__(self, data: bytes) -> np.ndarray:
        img = center_crop_resize(decode_image(data, self.decode_size), self.image_size, self.crop_fraction)
        return np.asarray(img, dtype=np.uint8)

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size}, crop_fraction={self.crop_fraction})"
