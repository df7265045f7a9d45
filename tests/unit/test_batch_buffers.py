"""Shared batch buffers: workers write into slots the rank hands back, and nothing a consumer holds is overwritten."""
import pickle

import numpy as np
import pytest
import torch

from data_pipeline.image.device import BatchToDevice
from data_pipeline.stream.batch import Batch, make_batch
from data_pipeline.stream.batch_buffers import BatchBuffers
from tests.unit.test_data_stream import _loader, _same, _take, dataset  # noqa: F401 -- the fixture


def _released_stream(loader, n):
    """``n`` batches as a trainer consumes them: each copied out (cloned) and then released."""
    it = iter(loader)
    out = []
    for _ in range(n):
        batch = next(it)
        out.append((batch.slot is not None, batch.images.data_ptr(),
                    Batch(batch.images.clone(), batch.labels.clone(), list(batch.keys))))
        batch.release()
    it.close()
    return out


def test_released_slots_are_reused_and_pixels_stay_exact(dataset):  # noqa: F811
    reference = _take(_loader(dataset, num_workers=0), 30)
    got = _released_stream(_loader(dataset, num_workers=2), 30)
    assert all(_same(g, want) for (_, _, g), want in zip(got, reference))
    in_slots = [s for s, _, _ in got]
    assert all(in_slots), "with every batch handed back, every batch comes from a worker's shared slot"
    # A consumer that hands each batch back before taking the next needs 3 slots per worker (2 in flight, 1 held):
    # the spare's pages are never touched.
    assert len({ptr for _, ptr, _ in got}) <= 6


def test_batches_kept_by_the_consumer_are_never_overwritten(dataset):  # noqa: F811
    reference = _take(_loader(dataset, num_workers=0), 20)
    it = iter(_loader(dataset, num_workers=2))
    kept = [next(it) for _ in range(20)]  # nothing handed back: the workers must fall back to fresh memory
    it.close()
    assert any(b.slot is not None for b in kept) and any(b.slot is None for b in kept)
    assert all(_same(k, want) for k, want in zip(kept, reference))


def test_batch_to_device_hands_the_slot_back():
    pool = BatchBuffers(workers=1, slots=2, batch=2, size=4)
    images = [np.full((4, 4, 3), v, np.uint8) for v in (10, 20)]
    slot, pixels = pool.take(0, (2, 4, 4, 3))
    batch = make_batch(images, [1, 2], ["a", "b"], 4, into=(pool, slot, pixels))
    other = pool.take(0, (2, 4, 4, 3))
    assert other is not None and other[0] != slot
    assert pool.take(0, (2, 4, 4, 3)) is None, "both slots are out: none free until one is handed back"
    to_device = BatchToDevice(torch.device("cpu"), 4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    x, y = to_device(batch)
    assert x[:, 0, 0, 0].tolist() == [10.0, 20.0] and y.tolist() == [1, 2]
    assert batch.slot is None
    assert pool.take(0, (2, 4, 4, 3))[0] == slot, "the handed-back slot is free again"
    assert pool.take(0, (3, 4, 4, 3)) is None, "a batch of another shape never goes into a slot"


def test_a_slot_batch_crosses_processes_as_its_number():
    pool = BatchBuffers(workers=1, slots=1, batch=2, size=4)
    slot, pixels = pool.take(0, (2, 4, 4, 3))
    batch = make_batch([np.full((4, 4, 3), 7, np.uint8)] * 2, [3, 4], ["a", "b"], 4, into=(pool, slot, pixels))
    wire = pickle.dumps(batch)
    assert len(wire) < 1000, "the pixels do not travel: the rank reads them from the shared slot"
    back = pickle.loads(wire)
    assert torch.equal(back.images, batch.images) and back.labels.tolist() == [3, 4] and back.slot[1] == slot
    back.release()
    assert pool.take(0, (2, 4, 4, 3)) is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device (runs in the GPU suite)")
def test_pinning_hands_the_slot_back():
    pool = BatchBuffers(workers=1, slots=1, batch=2, size=4)
    slot, pixels = pool.take(0, (2, 4, 4, 3))
    batch = make_batch([np.full((4, 4, 3), 5, np.uint8)] * 2, [0, 1], ["a", "b"], 4, into=(pool, slot, pixels))
    pinned = batch.pin_memory()
    assert pinned.images.is_pinned() and pinned.slot is None and batch.slot is None
    assert pool.take(0, (2, 4, 4, 3)) is not None
