"""Augmentations beyond crop + flip: RandAugment on the CPU workers, mixup / cutmix on the device.

RandAugment follows torchvision's op set and magnitude scale (Cubuk et al. 2020; 14 ops, magnitude
0..30 bins, ``num_ops`` ops per image, each with a random sign), written with PIL only so that the
CPU path needs no torchvision. Randomness comes from the sample's own numpy generator, so resumed
runs augment exactly as uninterrupted ones.

Mixup / cutmix run per batch on the accelerator (timm's "batch" mode): one lambda per batch, the
batch mixed with its reverse. Their randomness is seeded by the batch's sample keys, so the same
batch is mixed the same way after a restart, with no extra state to checkpoint.
"""
from __future__ import annotations

import math
import zlib
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

_FILL = (128, 128, 128)
_TAG_MIX = 4


def _affine(img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, Image.Resampling.NEAREST, fillcolor=_FILL)


def _rotate(img: Image.Image, deg: float) -> Image.Image:
    return img.rotate(deg, Image.Resampling.NEAREST, fillcolor=_FILL)


# name -> (op(img, value), magnitude -> value at the top of the scale, signed)
_OPS = {
    "Identity": (lambda img, v: img, 0.0, False),
    "ShearX": (lambda img, v: _affine(img, (1, v, 0, 0, 1, 0)), 0.3, True),
    "ShearY": (lambda img, v: _affine(img, (1, 0, 0, v, 1, 0)), 0.3, True),
    "TranslateX": (lambda img, v: _affine(img, (1, 0, v * img.width, 0, 1, 0)), 150 / 331, True),
    "TranslateY": (lambda img, v: _affine(img, (1, 0, 0, 0, 1, v * img.height)), 150 / 331, True),
    "Rotate": (_rotate, 30.0, True),
    "Brightness": (lambda img, v: ImageEnhance.Brightness(img).enhance(1 + v), 0.9, True),
    "Color": (lambda img, v: ImageEnhance.Color(img).enhance(1 + v), 0.9, True),
    "Contrast": (lambda img, v: ImageEnhance.Contrast(img).enhance(1 + v), 0.9, True),
    "Sharpness": (lambda img, v: ImageEnhance.Sharpness(img).enhance(1 + v), 0.9, True),
    "Posterize": (lambda img, v: ImageOps.posterize(img, int(v)), None, False),
    "Solarize": (lambda img, v: ImageOps.solarize(img, int(v)), None, False),
    "AutoContrast": (lambda img, v: ImageOps.autocontrast(img), 0.0, False),
    "Equalize": (lambda img, v: ImageOps.equalize(img), 0.0, False),
}
NUM_BINS = 31


class RandAugment:
    """``(PIL image, rng) -> PIL image``: ``num_ops`` random ops at ``magnitude`` (0..30)."""

    def __init__(self, num_ops: int = 2, magnitude: int = 9) -> None:
        if num_ops < 0 or not 0 <= magnitude < NUM_BINS:
            raise ValueError(f"RandAugment needs num_ops >= 0 and 0 <= magnitude < {NUM_BINS}, "
                             f"got {num_ops}, {magnitude}")
        self.num_ops, self.magnitude = int(num_ops), int(magnitude)
        self.names = list(_OPS)

    def _value(self, name: str) -> float:
        top = _OPS[name][1]
        frac = self.magnitude / (NUM_BINS - 1)
        if name == "Posterize":
            return 8 - int(round(4 * frac))  # 8 bits (no-op) .. 4 bits
        if name == "Solarize":
            return 255.0 * (1 - frac)  # threshold 255 (no-op) .. 0
        return top * frac

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        for _ in range(self.num_ops):
            name = self.names[int(rng.integers(len(self.names)))]
            op, _, signed = _OPS[name]
            value = self._value(name)
            if signed and rng.random() < 0.5:
                value = -value
            img = op(img, value)
        return img

    def __repr__(self) -> str:
        return f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude})"


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, num_classes).to(torch.float32)


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box covering about ``1 - lam`` of the image, centred uniformly (clipped at the borders)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    left, right = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    return top, bottom, left, right


class MixupCutmix:
    """Batch-wise mixup or cutmix on the device; returns mixed images and soft targets ``[B, C]``.

    Targets are mixed one-hot vectors; label smoothing stays with the loss (``F.cross_entropy``
    applies ``label_smoothing`` to probability targets as well).
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, seed: int = 0) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= prob <= 1 or not 0 <= switch_prob <= 1:
            raise ValueError("mixup/cutmix alphas must be >= 0 and probabilities in [0, 1]")
        self.num_classes, self.seed = num_classes, seed
        self.mixup_alpha, self.cutmix_alpha, self.prob, self.switch_prob = mixup_alpha, cutmix_alpha, prob, switch_prob

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def rng(self, keys: Sequence[str]) -> np.random.Generator:
        return np.random.default_rng([_TAG_MIX, self.seed, zlib.crc32("\n".join(keys).encode("utf-8"))])

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` float [B, C, H, W] (any device), ``labels`` int64 [B] -> (mixed images, targets [B, classes])."""
        targets = one_hot(labels, self.num_classes)
        rng = self.rng(keys)
        if not self.enabled or len(keys) < 2 or rng.random() >= self.prob:
            return images, targets
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        flipped = images.flip(0)
        if use_cutmix:
            top, bottom, left, right = cutmix_box(images.shape[-2], images.shape[-1], lam, rng)
            images = images.clone()
            images[..., top:bottom, left:right] = flipped[..., top:bottom, left:right]
            # The label weight is the area actually pasted (the box may be clipped at the border).
            lam = 1.0 - (bottom - top) * (right - left) / (images.shape[-2] * images.shape[-1])
        else:
            images = images.mul(lam).add_(flipped, alpha=1.0 - lam)
        return images, targets.mul(lam).add_(targets.flip(0), alpha=1.0 - lam)
