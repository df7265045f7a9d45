"""Shared-memory image buffers that DataLoader workers write batches into, reused once the rank hands them back.

Without them each worker batch goes to fresh shared memory: a new shm file, the kernel zeroing and faulting in
every page as the worker writes it (~37 pages per 224 px image) and again as the rank maps it, and a file
descriptor passed over a socket per tensor. With them, each worker owns a few slots of one mapping made by
the rank before the workers start; a batch crosses the process boundary as its slot number, and the rank
hands the slot back once it has copied the pixels out (into pinned memory, or into the model's float input:
``Batch.release``). A worker that finds none of its slots handed back writes to fresh memory as before, so a
consumer that keeps its batches costs speed, never correctness.

Handing back is a counter per slot in shared memory: the worker counts the batches it wrote to a slot, the
rank counts those it released; equal counts mean the slot is free. Each counter has one writer, so no lock.
"""
from __future__ import annotations

import itertools
import os
import weakref

import numpy as np
import torch

_POOLS: weakref.WeakValueDictionary[str, BatchBuffers] = weakref.WeakValueDictionary()  # the rank's, by name
_names = itertools.count()


def shared_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory: pages are only committed where they are written."""
    elem = torch.empty(0, dtype=dtype)
    numel = int(np.prod(shape))
    return elem.new(elem._typed_storage()._new_shared(numel, device=elem.device)).resize_(shape)


class BatchBuffers:
    """``slots`` image batches ``[batch, size, size, 3]`` per worker, in one shared mapping made by the rank."""

    def __init__(self, workers: int, slots: int, batch: int, size: int) -> None:
        self.name = f"{os.getpid()}-{next(_names)}"
        self.workers, self.slots, self.shape = workers, slots, (batch, size, size, 3)
        self.images = shared_tensor((workers * slots, *self.shape), torch.uint8)
        self.returned = shared_tensor((workers * slots,), torch.int64)  # written by the rank only
        self.returned.zero_()
        self._written = [0] * (workers * slots)  # worker side: batches written into each slot by this process
        _POOLS[self.name] = self

    # ---- worker side
    def take(self, worker: int, shape: tuple[int, ...]) -> tuple[int, np.ndarray] | None:
        """A free slot of ``worker`` and its pixels to write into, or None (none handed back yet, or a batch of
        another shape): the caller then writes to fresh memory."""
        if tuple(shape) != self.shape:
            return None
        returned = self.returned.numpy()
        for slot in range(worker * self.slots, (worker + 1) * self.slots):  # the lowest free one: a spare slot
            if self._written[slot] == returned[slot]:  # is only ever touched (and its pages used) when needed
                self._written[slot] += 1
                return slot, self.images[slot].numpy()
        return None

    # ---- rank side
    def view(self, slot: int) -> torch.Tensor:
        return self.images[slot]

    def release(self, slot: int) -> None:
        self.returned[slot] += 1

    @staticmethod
    def find(name: str) -> BatchBuffers:
        """The rank's pool ``name`` (a batch that names it is being unpickled in the rank)."""
        try:
            return _POOLS[name]
        except KeyError:
            raise RuntimeError(f"batch buffers {name} are not in this process: a batch written to a worker's "
                               "shared buffer can only be read by the rank that made it") from None
