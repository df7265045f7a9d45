"""Accelerator-side preprocessing: a host ``Batch`` becomes the model's inputs on the device.

uint8 crosses the bus (4x fewer bytes than float32; JPEG bytes with ``data.decode: gpu``); decoding,
normalisation and mixup/cutmix run on the device, batched.
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Sequence

import torch

from data_pipeline.image.gpu_decode import decode_batch

if TYPE_CHECKING:
    from data_pipeline.image.augment import MixupCutmix
    from data_pipeline.stream.batch import Batch

# ImageNet channel statistics on the 0..255 scale (the images arrive as uint8).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per device: building these from Python lists is a pageable host->device copy that would
    # stall the host behind queued GPU work on every step.
    scale = torch.tensor([1.0 / s for s in std], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return scale, shift


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(x - mean) / std`` for uint8 ``[N, H, W, C]`` on its own device -> ``[N, C, H, W]`` of ``dtype``.

    The result keeps the input's channels-last memory layout (NCHW shape, NHWC strides), which
    convolution stems take as is; call ``.contiguous()`` where NCHW-contiguous memory is needed.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 [N, H, W, C] images, got {images.dtype} {tuple(images.shape)}")
    if not len(mean) == len(std) == images.shape[-1]:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {images.shape[-1]} channels")
    # Arithmetic in float32 even for half/bfloat16 output: 1/std and mean/std lose precision in 8-bit mantissas.
    scale, shift = _affine(tuple(map(float, mean)), tuple(map(float, std)), images.device)
    x = images.permute(0, 3, 1, 2).to(torch.float32)
    return torch.addcmul(shift, x, scale).to(dtype)


class BatchToDevice:
    """``batch -> (images, labels)`` on ``device``: float NCHW images normalised with ``mean``/``std``, and
    int64 labels, or soft ``[B, classes]`` targets where ``mix`` is enabled (``F.cross_entropy`` takes both).

    A batch of JPEG bytes (``data.decode: gpu``) is decoded and cropped on the device, resized to
    ``image_size``; a sample that does not decode is dropped with its label.
    """

    def __init__(self, device: torch.device, image_size: int, mean: Sequence[float], std: Sequence[float],
                 mix: MixupCutmix | None = None) -> None:
        self.device, self.image_size = device, image_size
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        self.mix = mix if mix is not None and mix.enabled else None

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        keys, labels = batch.keys, batch.labels
        if batch.encoded is not None:
            images, keep = decode_batch(batch.encoded, batch.crops, self.image_size, self.device)
            labels, keys = labels[keep], [k for k, ok in zip(keys, keep.tolist()) if ok]
        else:
            images = batch.images.to(self.device, non_blocking=True)
        images, labels = normalize(images, self.mean, self.std), labels.to(self.device, non_blocking=True)
        batch.release()  # the pixels are copied out: the worker may reuse their buffer
        if self.mix is not None:
            images, labels = self.mix(images, labels, keys)
        return images, labels
