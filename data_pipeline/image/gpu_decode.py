"""JPEG decode + crop/flip on the accelerator (``data.decode: gpu``).

The CPU workers only read each JPEG's header (its size) and draw the crop and flip from the sample's
own generator, with the same RandomResizedCrop rule as the CPU path; the compressed bytes cross the bus
(about 10x fewer bytes than decoded uint8 pixels) and are decoded there in one batched call
(``torchvision.io.decode_jpeg`` on CUDA = nvJPEG), then cropped, resized (bilinear, antialiased like
PIL) and flipped on the device. Where CUDA or torchvision's decoder is missing, ``gpu_decode_available``
says why and the build falls back to CPU decoding with one warning.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.image.limits import open_image
from data_pipeline.image.transforms import TrainTransform, random_resized_crop_params

log = logging.getLogger(__name__)


def gpu_decode_available(device: torch.device) -> str | None:
    """None when batched JPEG decode works on ``device``, else the reason it does not."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"device is {device}, not CUDA"
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as exn:  # noqa: BLE001 - a broken torchvision build raises anything on import
        return f"torchvision.io.decode_jpeg is unavailable ({type(exn).__name__}: {exn})"
    return None


class CropPlanner:
    """``(jpeg bytes, rng) -> (bytes, [top, left, h, w, flip])``: the CPU half of the GPU path.

    Reads only the JPEG header; raises (as a decoder would) when the header is not a readable image, and
    ``ImageTooLarge`` when it asks for more than the transform's ``max_pixels``: nvJPEG would allocate them.
    """

    def __init__(self, transform: TrainTransform) -> None:
        self.transform = transform
        self.image_size = transform.image_size

    def __call__(self, data: bytes, rng: np.random.Generator) -> tuple[bytes, list[int]]:
        img = open_image(data, self.transform.max_pixels)
        if img.format != "JPEG":
            raise ValueError(f"{img.format} is not JPEG; gpu decode takes JPEG only")
        t = self.transform
        top, left, h, w = random_resized_crop_params(img.width, img.height, rng, t.scale, t.ratio)
        flip = int(t.hflip and rng.random() < 0.5)
        return data, [top, left, h, w, flip]


def crop_resize_flip(images: Sequence[torch.Tensor], crops: torch.Tensor, size: int) -> torch.Tensor:
    """Decoded CHW uint8 images + ``[B, 5]`` (top, left, h, w, flip) -> uint8 NHWC ``[B, size, size, 3]``."""
    out = []
    for img, (top, left, h, w, flip) in zip(images, crops.tolist()):
        patch = img[:3, top:top + h, left:left + w].unsqueeze(0).float()
        patch = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(patch.flip(-1) if flip else patch)
    if not out:
        return torch.zeros((0, size, size, 3), dtype=torch.uint8, device=crops.device)
    return torch.cat(out).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def decode_batch(encoded: Sequence[torch.Tensor], crops: torch.Tensor, size: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode on ``device``; returns (uint8 NHWC images, bool mask of the samples that decoded)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    keep = torch.ones(len(encoded), dtype=torch.bool)
    try:
        images = decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        # One corrupt JPEG fails the batched call: decode one by one and drop the bad ones.
        images = []
        for i, data in enumerate(encoded):
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as exn:
                keep[i] = False
                log.warning("gpu decode: skipping an undecodable JPEG (%s)", exn)
    return crop_resize_flip(images, crops.to(device)[keep.to(device)], size), keep
