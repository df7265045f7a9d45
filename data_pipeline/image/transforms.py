"""CPU-side image decode and augmentation (PIL + numpy only; uint8 HWC out).

Normalisation is deliberately absent: it runs on the accelerator (see ``device.py``), so the
host only moves uint8 pixels.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from data_pipeline.image.augment import RandAugment
from data_pipeline.image.limits import (DEFAULT_MAX_IMAGE_PIXELS, ImageTooLarge, check_pixels,  # noqa: F401
                                        open_image)

try:  # libjpeg-turbo with DCT scaling, without PIL's per-call overhead; PIL's draft mode otherwise
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the platform's wheels
    simplejpeg = None
try:  # partial decode, only the rows and columns a crop reads: built by `pip install` where libjpeg's headers are
    from data_pipeline.image import _jpeg_region
    _NO_REGION_DECODE = ""
except ImportError as exn:  # whole-image decode with simplejpeg, the same pixels (docs/decode.md)
    _jpeg_region, _NO_REGION_DECODE = None, str(exn)


def partial_decode_missing() -> str:
    """Why JPEG crops are decoded from whole images here ("" where partial decode is in use): one line with the fix."""
    if not _NO_REGION_DECODE:
        return ""
    return (f"the partial JPEG decoder is not built ({_NO_REGION_DECODE}): input costs about 25 % more CPU at "
            "ImageNet sizes; install libjpeg's headers and a C compiler (apt install libjpeg-dev gcc), then "
            "pip install -e . again (docs/decode.md)")


_JPEG_MAGIC = b"\xff\xd8"


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a JPEG's header without decoding pixels; None if not a JPEG simplejpeg reads."""
    if simplejpeg is None or data[:2] != _JPEG_MAGIC:
        return None
    try:
        height, width = simplejpeg.decode_jpeg_header(data)[:2]
    except ValueError:
        return None
    return width, height


def dct_reduction(width: int, height: int, min_width: int, min_height: int) -> int:
    """The largest of 1, 2, 4, 8 that keeps a ``width`` x ``height`` region at least ``min_width`` x ``min_height``.

    Only powers of two: libjpeg-turbo's SIMD IDCTs cover 1/1, 1/2 and 1/4 (1/8 is DC only), while the
    other M/8 scales run scalar IDCTs and decode slower than the full image (measured in docs/decode.md).
    """
    d = 1
    while d < 8 and width >= 2 * d * min_width and height >= 2 * d * min_height:
        d *= 2
    return d


def _decode_reduced(data: bytes, width: int, height: int, d: int) -> np.ndarray:
    """RGB pixels of a JPEG decoded at 1/``d`` scale by the IDCT (``d`` in 1, 2, 4, 8)."""
    if d == 1:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    # simplejpeg picks the smallest M/8 scale whose size is >= the minimum: exactly 1/d here.
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height // d), min_width=-(-width // d))


def decode_region(data: bytes, width: int, height: int, d: int, left: int, top: int, w: int, h: int,
                  max_pixels: int | None = None) -> np.ndarray:
    """RGB pixels ``[h, w, 3]`` of the region at (``left``, ``top``) of a ``width`` x ``height`` JPEG decoded at
    1/``d`` scale (region coordinates in the scaled image, whose sides are ``ceil(side / d)``).

    With the ``_jpeg_region`` extension, rows above the region are skipped (entropy-decoded only), rows below
    it are never read and columns beside it are not transformed: the same pixels as a whole decode, for
    about 80 % of its CPU at the average RandomResizedCrop (docs/decode.md). Raises ValueError where
    libjpeg refuses the data (corrupt, CMYK); ``ImageTooLarge`` above ``max_pixels``, before anything is allocated."""
    check_pixels(width, height, max_pixels)
    if _jpeg_region is not None:
        out = np.empty((h, w, 3), np.uint8)
        _jpeg_region.decode_region(data, out, d, left, top, max_pixels or 0)  # the header checked again, in C
        return out
    return _decode_reduced(data, width, height, d)[top:top + h, left:left + w]


def box_resize(data: bytes, width: int, height: int, d: int, box: tuple[float, float, float, float],
               size: int, max_pixels: int | None = None) -> Image.Image:
    """``Image.resize((size, size), BILINEAR, box=box)`` of a JPEG decoded at 1/``d`` (``box`` in full-size
    pixels), decoding only the pixels PIL's filter taps reach: the box plus their reach, within the image."""
    x0, y0, x1, y1 = (c / d for c in box)
    scaled_w, scaled_h = -(-width // d), -(-height // d)
    reach = math.ceil(max((x1 - x0) / size, (y1 - y0) / size, 1.0)) + 1  # PIL's support, rounded up
    left, top = max(0, math.floor(x0) - reach), max(0, math.floor(y0) - reach)
    right, bottom = min(scaled_w, math.ceil(x1) + reach), min(scaled_h, math.ceil(y1) + reach)
    if _vertical_first(right - left, bottom - top, size) != _vertical_first(scaled_w, scaled_h, size):
        # Pillow picks its pass order from the input's size, and each pass rounds to uint8: decode the
        # whole height (or width), which gives the region the whole image's order and so its pixels.
        if _vertical_first(scaled_w, scaled_h, size):
            top, bottom = 0, scaled_h
        else:
            left, right = 0, scaled_w
    pixels = decode_region(data, width, height, d, left, top, right - left, bottom - top, max_pixels)
    return Image.fromarray(pixels, "RGB").resize((size, size), Image.Resampling.BILINEAR,
                                                 box=(x0 - left, y0 - top, x1 - left, y1 - top))


def _vertical_first(width: int, height: int, size: int) -> bool:
    """Whether Pillow (>= 13, python-pillow/Pillow#9549) resizes a ``width`` x ``height`` image to ``size`` x ``size``
    vertical pass first: when the height shrinks more than twice as much as the width."""
    return height - size > 0 and height - size > 2 * (width - size)


def decode_image(data: bytes, min_size: int | None = None,
                 max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes to RGB; JPEGs at least twice ``min_size`` are DCT-downscaled (1/2, 1/4, 1/8) while
    decoding, keeping both sides >= ``min_size``. ``ImageTooLarge`` when the header's size exceeds
    ``max_pixels``, before any pixel buffer is allocated."""
    size = jpeg_size(data)
    if size is not None:
        check_pixels(*size, max_pixels)
        try:
            d = dct_reduction(*size, min_size, min_size) if min_size else 1
            return Image.fromarray(_decode_reduced(data, *size, d), "RGB")
        except ValueError:
            pass  # e.g. CMYK or progressive oddities simplejpeg refuses: let PIL decide
    img = open_image(data, max_pixels)  # the header only
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


def resize_bilinear(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 HWC ``pixels`` -> ``size`` x ``size``, bilinear, antialiased where it reduces.

    The filter of ``Image.resize(BILINEAR)``, differing only at the border: PIL's taps may reach outside
    a ``box``, here they stop at the edge of ``pixels`` (as in torchvision, which crops, then resizes).
    """
    # Channels-last in, so channels-last out: the HWC result is contiguous (a strided one costs more to
    # batch than the resize itself) and the SIMD kernel needs no layout copy (0.15 vs 0.27 ms at 300 px).
    # torch recognises channels-last only with a whole-image batch stride: unsqueeze before the permute.
    x = torch.from_numpy(pixels).unsqueeze(0).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    out = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())  # a no-op, unless torch changes its mind


def center_crop_box(width: int, height: int, crop_fraction: float) -> tuple[float, float, float, float]:
    """The centre square covering ``crop_fraction`` of the short side, as a PIL box (left, top, right, bottom)."""
    side = min(width, height) * crop_fraction
    left = (width - side) / 2
    top = (height - side) / 2
    return left, top, left + side, top + side


def center_crop_resize(img: Image.Image, size: int, crop_fraction: float = 0.875) -> Image.Image:
    """Centre square crop covering ``crop_fraction`` of the short side, resized to ``size`` (the usual eval view)."""
    box = center_crop_box(img.width, img.height, crop_fraction)
    return img.resize((size, size), Image.Resampling.BILINEAR, box=box)


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
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if not 0 < scale[0] <= scale[1] or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}")
        self.image_size = int(image_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = bool(hflip)
        self.randaugment = randaugment
        self.max_pixels = max_pixels
        # Draft only as far as keeps even the smallest possible crop at >= image_size pixels,
        # so reduced-size decoding never costs resolution in the output.
        min_side = math.sqrt(self.scale[0] * min(self.ratio[0], 1 / self.ratio[1]))
        self.decode_size = math.ceil(self.image_size / min_side)

    def __call__(self, data: bytes, rng: np.random.Generator) -> np.ndarray:
        img = self._crop_jpeg(data, rng)
        if img is None:  # not a JPEG simplejpeg reads: decode (PIL draft) first, then crop
            img = decode_image(data, self.decode_size, self.max_pixels)
            img = random_resized_crop(img, self.image_size, rng, self.scale, self.ratio)
        if self.hflip and rng.random() < 0.5:
            # torch.flip copies 15x faster than numpy's negative-stride copy of a 3-byte-pixel array
            img = torch.from_numpy(img).flip(1).numpy() if isinstance(img, np.ndarray) else horizontal_flip(img)
        if self.randaugment is not None:
            img = self.randaugment(img if isinstance(img, Image.Image) else Image.fromarray(img), rng)
        return np.asarray(img, dtype=np.uint8)

    def _crop_jpeg(self, data: bytes, rng: np.random.Generator) -> Image.Image | np.ndarray | None:
        """Decode only as much as the crop needs: the crop box is drawn from the header's size (the same
        draws from ``rng`` as cropping a decoded image), then the IDCT scales by the largest 1/2, 1/4, 1/8
        that keeps the crop at >= ``image_size`` on both sides, so the resize never upsamples."""
        size = jpeg_size(data)
        if size is None:
            return None
        width, height = size
        check_pixels(width, height, self.max_pixels)  # before the crop draws: a bomb costs no randomness either
        state = rng.bit_generator.state
        top, left, h, w = random_resized_crop_params(width, height, rng, self.scale, self.ratio)
        d = dct_reduction(w, h, self.image_size, self.image_size)
        try:
            if d == 1:
                # The crop of full-size pixels, resized as torchvision resizes a cropped tensor: torch's uint8
                # antialiased bilinear (SIMD), PIL's filter at about a third of PIL's cost (docs/decode.md).
                return resize_bilinear(decode_region(data, width, height, 1, left, top, w, h, self.max_pixels),
                                       self.image_size)
            # DCT-scaled pixels: PIL's resize takes the exact fractional box (DCT scaling maps edges x -> x / d).
            return box_resize(data, width, height, d, (left, top, left + w, top + h), self.image_size,
                              self.max_pixels)
        except ValueError:  # libjpeg refuses it (e.g. CMYK): PIL decides, with the same draws
            rng.bit_generator.state = state
            return None

    def __repr__(self) -> str:
        return (f"TrainTransform(image_size={self.image_size}, scale={self.scale}, ratio={self.ratio}, "
                f"hflip={self.hflip}, randaugment={self.randaugment}, max_pixels={self.max_pixels})")


class EvalTransform:
    """``jpeg_bytes -> uint8 [H, W, 3]``: decode and centre crop."""

    def __init__(self, image_size: int, crop_fraction: float = 0.875,
                 max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        if not 0 < crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        self.image_size = int(image_size)
        self.crop_fraction = float(crop_fraction)
        self.max_pixels = max_pixels
        self.decode_size = math.ceil(self.image_size / self.crop_fraction)

    def __call__(self, data: bytes) -> np.ndarray:
        size = jpeg_size(data)
        if size is not None:  # decode_image's DCT scale, then only the rows and columns of the centre crop
            width, height = size
            check_pixels(width, height, self.max_pixels)
            d = dct_reduction(width, height, self.decode_size, self.decode_size)
            # The box decode_image's scaled image would be cropped with, in full-size pixels (exact: d is a
            # power of two), so the pixels are those of center_crop_resize(decode_image(...)).
            scaled = center_crop_box(-(-width // d), -(-height // d), self.crop_fraction)
            box = tuple(c * d for c in scaled)
            try:
                return np.asarray(box_resize(data, width, height, d, box, self.image_size, self.max_pixels),
                                  dtype=np.uint8)
            except ValueError:  # libjpeg refuses it (e.g. CMYK): PIL decides
                pass
        img = center_crop_resize(decode_image(data, self.decode_size, self.max_pixels), self.image_size,
                                 self.crop_fraction)
        return np.asarray(img, dtype=np.uint8)

    def __repr__(self) -> str:
        return (f"EvalTransform(image_size={self.image_size}, crop_fraction={self.crop_fraction}, "
                f"max_pixels={self.max_pixels})")
