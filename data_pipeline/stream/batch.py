"""The host-side batch every stream yields: uint8 images (or JPEG bytes and crops), labels, keys."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import get_worker_info

from data_pipeline.stream.batch_buffers import BatchBuffers, shared_tensor


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
    # The worker's shared buffer the images are in (batch_buffers.py): (pool, slot), handed back by `release`.
    slot: tuple[BatchBuffers, int] | None = field(default=None, repr=False)

    def pin_memory(self) -> Batch:
        """Page-locked copy (DataLoader's pin thread calls this); the worker's buffer is handed back."""
        encoded = [e.pin_memory() for e in self.encoded] if self.encoded is not None else None
        pinned = replace(self, images=self.images.pin_memory(), labels=self.labels.pin_memory(), encoded=encoded,
                         slot=None)
        self.release()
        return pinned

    def release(self) -> None:
        """Hand the images' buffer back to the worker that wrote them, once they are copied out (to pinned or
        device memory, or into the model's float input): from then on a later batch may overwrite them.
        A no-op for a batch in memory of its own."""
        if self.slot is not None:
            pool, slot = self.slot
            self.slot = None
            pool.release(slot)

    def __reduce__(self) -> tuple:
        # Crossing from a worker to the rank: images in a shared slot travel as the slot's number, labels as a
        # numpy array (a torch tensor would go through a shared-memory file and a socket of its own).
        images = None if self.slot is not None else self.images
        slot = (self.slot[0].name, self.slot[1]) if self.slot is not None else None
        return _rebuild, (images, self.labels.numpy(), self.keys, self.sources, self.encoded, self.crops, slot)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Copy the tensors to ``device`` (images stay uint8: ``device.BatchToDevice`` normalises there)."""
        return replace(self, images=self.images.to(device, non_blocking=non_blocking),
                       labels=self.labels.to(device, non_blocking=non_blocking))

    def __len__(self) -> int:
        return len(self.keys)


def _rebuild(images: torch.Tensor | None, labels: np.ndarray, keys: list[str], sources: list[int] | None,
             encoded: list[torch.Tensor] | None, crops: torch.Tensor | None, slot: tuple[str, int] | None) -> Batch:
    held = None
    if slot is not None:
        pool = BatchBuffers.find(slot[0])
        images, held = pool.view(slot[1]), (pool, slot[1])
    return Batch(images, torch.from_numpy(labels), keys, sources, encoded, crops, held)


def make_batch(images: list, labels: list[int], keys: list[str], size: int = 0,
               sources: list[int] | None = None, into: tuple[BatchBuffers, int, np.ndarray] | None = None) -> Batch:
    """A ``Batch`` from per-sample decoder outputs: uint8 HWC pixels, or (JPEG bytes, crop) pairs for
    GPU decoding. ``size``: the image side, for the shape of an empty batch. ``into``: a worker's free
    shared buffer (pool, slot, its pixels) to write the images into, instead of fresh memory."""
    if images and isinstance(images[0], tuple):  # gpu decode: (jpeg bytes, crop) pairs
        return Batch(images=torch.zeros((0, size, size, 3), dtype=torch.uint8),
                     labels=torch.tensor(labels, dtype=torch.int64), keys=list(keys), sources=sources,
                     encoded=[torch.frombuffer(bytearray(b), dtype=torch.uint8) for b, _ in images],
                     crops=torch.tensor([c for _, c in images], dtype=torch.int64))
    labels_t = torch.tensor(labels, dtype=torch.int64)
    if into is not None and images:
        pool, slot, pixels = into
        np.stack(images, out=pixels)
        return Batch(images=pool.view(slot), labels=labels_t, keys=list(keys), sources=sources, slot=(pool, slot))
    stacked = _stack(images) if images else torch.zeros((0, size, size, 3), dtype=torch.uint8)
    return Batch(images=stacked, labels=labels_t, keys=list(keys), sources=sources)


def _stack(images: list[np.ndarray]) -> torch.Tensor:
    """The images as one uint8 tensor. In a DataLoader worker it is written straight into shared memory, as
    torch's default_collate does: sending a tensor that is not there yet costs one more copy of the batch."""
    shape = (len(images), *np.shape(images[0]))
    out = torch.empty(shape, dtype=torch.uint8) if get_worker_info() is None else shared_tensor(shape, torch.uint8)
    np.stack(images, out=out.numpy())
    return out
