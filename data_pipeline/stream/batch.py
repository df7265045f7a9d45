"""The host-side batch every stream yields: uint8 images (or JPEG bytes and crops), labels, keys."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass
class Batch:
    """A batch as produced on the host: uint8 NHWC images, int64 labels and the sample keys."""

    images: torch.Tensor  # uint8 [B, H, W, 3]
    labels: torch.Tensor  # int64 [B]
    keys: list[str]
    sources: list[int] | None = None  # index of the source of each sample (mixing statistics)
    # decode "gpu": JPEG bytes (uint8 1-D tensors) and [B, 5] (top, left, h, w, flip) instead of pixels
    encoded: list[torch.Tensor] | None = None
    crops: torch.Tensor | None = None

    def pin_memory(self) -> Batch:
        """Page-locked copy (DataLoader's pin thread calls this)."""
        encoded = [e.pin_memory() for e in self.encoded] if self.encoded is not None else None
        return replace(self, images=self.images.pin_memory(), labels=self.labels.pin_memory(), encoded=encoded)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Copy the tensors to ``device`` (images stay uint8: ``device.BatchToDevice`` normalises there)."""
        return replace(self, images=self.images.to(device, non_blocking=non_blocking),
                       labels=self.labels.to(device, non_blocking=non_blocking))

    def __len__(self) -> int:
        return len(self.keys)


def make_batch(images: list, labels: list[int], keys: list[str], size: int = 0,
               sources: list[int] | None = None) -> Batch:
    """A ``Batch`` from per-sample decoder outputs: uint8 HWC pixels, or (JPEG bytes, crop) pairs for
    GPU decoding. ``size``: the image side, for the shape of an empty batch."""
    if images and isinstance(images[0], tuple):  # gpu decode: (jpeg bytes, crop) pairs
        return Batch(images=torch.zeros((0, size, size, 3), dtype=torch.uint8),
                     labels=torch.tensor(labels, dtype=torch.int64), keys=list(keys), sources=sources,
                     encoded=[torch.frombuffer(bytearray(b), dtype=torch.uint8) for b, _ in images],
                     crops=torch.tensor([c for _, c in images], dtype=torch.int64))
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), dtype=np.uint8)
    return Batch(images=torch.from_numpy(stacked), labels=torch.tensor(labels, dtype=torch.int64),
                 keys=list(keys), sources=sources)
