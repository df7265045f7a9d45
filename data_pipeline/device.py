"""Accelerator-side preprocessing: uint8 NHWC batches become normalised float NCHW where they already are."""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch

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
