"""The pixel limit every decoder path checks from the header before it allocates (``data.max_image_pixels``).

Separate from ``transforms`` so the writer and the indexer use it without importing torch.
"""
from __future__ import annotations

import io
import warnings

from PIL import Image

# data.max_image_pixels' default: Pillow's own refusal threshold (twice its warning level), above the largest
# photos cameras take (150 MP medium format) and far below what a 430-byte header can claim (4 G pixels).
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970


class ImageTooLarge(Exception):
    """The header asks for more pixels than the limit; raised before any decoder allocates. Not a ValueError:
    the fallbacks that retry a JPEG libjpeg refused with PIL must not retry this one."""


def check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    """``ImageTooLarge`` when ``width`` x ``height`` (from a header) exceeds ``max_pixels`` (None: no limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"the header says {width}x{height} = {width * height} pixels, above "
                            f"data.max_image_pixels={max_pixels}")


def open_image(data: bytes, max_pixels: int | None) -> Image.Image:
    """``Image.open`` (the header only, no pixels yet) checked against ``max_pixels``; Pillow's own bomb
    refusal (above twice ``Image.MAX_IMAGE_PIXELS``) is the same ``ImageTooLarge``."""
    try:
        with warnings.catch_warnings():  # Pillow's warning above half its limit: the check below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exn:
        raise ImageTooLarge(str(exn)) from None
    check_pixels(img.width, img.height, max_pixels)
    return img
