"""The demo's downstream set: scikit-learn's bundled 8x8 handwritten digits as RGB shards.

The 1797 images ship inside scikit-learn (no download). They are upscaled to ``image_size``
(bilinear, ink 0..16 -> 0..255, white strokes on black) and split, stratified and deterministically,
into ``train`` (1000) and ``test`` (the remaining 797).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from data_pipeline.shards.tar_write import encode_jpeg, write_shards
from data_pipeline.storage import Storage

CLASSES = tuple(str(d) for d in range(10))
NUM_TRAIN = 1000


def digit_images(image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All digits as ``(N, image_size, image_size, 3)`` uint8 RGB and their labels ``(N,)``."""
    digits = load_digits()
    images = []
    for img in digits.images:
        grey = Image.fromarray(np.round(img * (255.0 / 16.0)).astype(np.uint8), "L")
        images.append(np.asarray(grey.resize((image_size, image_size), Image.Resampling.BILINEAR).convert("RGB")))
    return np.stack(images), digits.target.astype(np.int64)


def _samples(images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> Iterator[tuple[str, bytes, int]]:
    for i in indices:
        # Keys are the index into sklearn's array, so any sample can be traced back to its source.
        yield f"{int(i):05d}", encode_jpeg(images[i], quality=95), int(labels[i])


def write_digits(out_url: str, *, storage: Storage, image_size: int = 32, samples_per_shard: int = 256,
                 seed: int = 0) -> None:
    """Write ``train``/``test`` shards (+ manifests) of the upscaled digits to ``out_url``."""
    images, labels = digit_images(image_size)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), train_size=NUM_TRAIN, stratify=labels,
                                           random_state=seed)
    for prefix, idx in (("train", np.sort(train_idx)), ("test", np.sort(test_idx))):
        write_shards(_samples(images, labels, idx), out_url, prefix, samples_per_shard, classes=list(CLASSES),
                     storage=storage)
