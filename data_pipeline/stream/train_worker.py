"""The training stream's worker side: what each DataLoader worker runs to build its rank batches.

Rank batch ``i`` is built by worker ``i % num_workers``; each worker runs the rank's schedule itself
(arithmetic only) and reads, through an ``EpochReader`` per source and epoch, just the samples of its
own batches; skipped samples are never decoded.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.image.gpu_decode import CropPlanner
from data_pipeline.image.transforms import TrainTransform
from data_pipeline.shards.labels import LabelReader
from data_pipeline.shards.tar_write import encode_jpeg
from data_pipeline.storage import Storage
from data_pipeline.storage.cache import ShardCache
from data_pipeline.stream.batch import Batch, make_batch
from data_pipeline.stream.batch_buffers import BatchBuffers
from data_pipeline.stream.decode import SKIP_KINDS, decode_sample
from data_pipeline.stream.epoch_reader import EpochReader
from data_pipeline.stream.plan import TAG_AUGMENT, EpochPlan, RankSchedule
from data_pipeline.stream.sources import ResolvedSource


@dataclass
class WorkerBatch:
    """A batch plus its index in the rank's stream and the samples skipped while building it."""

    batch: Batch
    index: int
    skipped: list[int]  # per SKIP_KINDS, for this batch only
    replaced: int = 0  # slots of unusable samples filled with another sample of the batch (or a blank)
    bytes_read: int = 0  # bytes this worker read from storage by range reads, so far (all batches)
    causes: dict[str, str] = field(default_factory=dict)  # per skip kind of this batch: one sample and why

    def pin_memory(self) -> WorkerBatch:
        return replace(self, batch=self.batch.pin_memory())


def augment_rng(seed: int, source: int, epoch: int, raw: int) -> np.random.Generator:
    """Per-sample augmentation randomness: a function of the sample's place in the plan only."""
    return np.random.default_rng([TAG_AUGMENT, seed, source, epoch, raw])


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a DataLoader worker needs from its rank's loader, picklable (spawned workers get a copy)."""

    sources: list[ResolvedSource]
    schedule_args: dict  # RankSchedule(**schedule_args): the rank's schedule from the current position
    transform: TrainTransform
    seed: int
    window: int
    resampled: bool
    storage: Storage
    num_workers: int  # >= 1: batch i is built by worker i % num_workers
    lookahead: int  # batches a worker plans ahead
    label: str = "cls"  # where the labels are (data.label): cls, txt, json:FIELD
    cache: ShardCache | None = None  # the node's shard cache (data.cache), None: off
    num_classes: int | None = None  # the model head's class count (None: the manifests' alone bound labels)
    buffers: BatchBuffers | None = None  # the rank's shared batch buffers (None: each batch in fresh memory)


def _bound(*counts: int | None) -> int | None:
    """The smallest known class count: a label must fit both its manifest and the head."""
    known = [n for n in counts if n]
    return min(known) if known else None


def _blank(transform: TrainTransform, size: int) -> Any:
    """A stand-in for a sample when nothing usable has been read: black pixels, or for GPU decoding
    (a CropPlanner) a tiny black JPEG with a whole-image crop."""
    pixels = np.zeros((size, size, 3), np.uint8)
    if isinstance(transform, CropPlanner):
        return encode_jpeg(pixels), [0, 0, size, size, 0]
    return pixels


class TrainWorkerStream(IterableDataset):
    """Runs inside each DataLoader worker: yields the rank batches ``i`` with ``i % workers == worker``."""

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[WorkerBatch]:
        info = get_worker_info()
        return self._batches(info.id if info else 0)

    def _batches(self, worker: int) -> Iterator[WorkerBatch]:
        spec = self.spec
        schedule = RankSchedule(**spec.schedule_args)
        readers: dict[tuple[int, int], EpochReader] = {}
        label_of = [LabelReader(src.reads, src.classes, _bound(spec.num_classes, src.num_classes))
                    for src in spec.sources]  # per source: its own label, within its manifest and the head
        queue: deque[tuple[int, list]] = deque()  # this worker's upcoming batches, positions announced
        next_index = 0
        started: dict[tuple[int, int], float] = {}  # when this worker started each (source, epoch)

        def reader(s: int, epoch: int) -> EpochReader:
            if (s, epoch) not in readers:
                plan = EpochPlan(spec.sources[s].counts, spec.seed, s, epoch, spec.window, spec.resampled)
                readers[(s, epoch)] = EpochReader(spec.sources[s].urls, plan, spec.storage, spec.sources[s].offsets,
                                                  spec.cache)
                started.setdefault((s, epoch), time.time())
                if spec.cache is not None:  # what was used this epoch or the one before stays cached
                    spec.cache.protect_since = min(started.get((k, e - 1), started[(k, e)]) for k, e in readers)
            return readers[(s, epoch)]

        def enqueue() -> None:
            nonlocal next_index
            parts = schedule.next()
            if next_index % spec.num_workers == worker:
                parts = [(s, e, reader(s, e).plan.raw(sigma)) for s, e, sigma in parts]
                for s, e, raw in parts:
                    readers[(s, e)].want(raw)
                queue.append((next_index, parts))
            next_index += 1

        last_good: tuple[dict, int] | None = None  # a sample to fill a batch with no usable sample at all
        bytes_done = 0  # bytes read by readers already closed
        while True:
            while len(queue) < spec.lookahead:
                enqueue()
            index, parts = queue.popleft()
            slots: list[tuple[dict, int, np.random.Generator] | None] = []  # (raw sample, source, rng) or unusable
            skipped = [0] * len(SKIP_KINDS)
            causes: dict[str, str] = {}
            for s, epoch, raws in parts:
                rd = reader(s, epoch)
                for raw in raws:
                    slots.append((rd.fetch(raw), s, augment_rng(spec.seed, s, epoch, int(raw))))
            filled: list[tuple[Any, int, str, int] | None] = []  # (pixels, label, key, source) per slot
            for sample, s, rng in slots:
                out = decode_sample(sample, lambda b: spec.transform(b, rng), label_of[s])
                if isinstance(out, str):
                    skipped[SKIP_KINDS.index(out)] += 1
                    causes.setdefault(str(out), getattr(out, "detail", str(out)))
                    filled.append(None)
                else:
                    filled.append((out[0], out[1], sample["__key__"], s))
                    last_good = (sample, s)
            # Constant batch shapes: an unusable slot takes the next usable sample of the batch (the
            # worker's last usable one if the batch has none), augmented with the slot's own randomness;
            # before this worker has read any usable sample, a blank (black, label 0). A pure function of
            # the plan, so resume stays exact; the counters count it as skipped, and the run's
            # data.max_skip_fraction stop names the cause: never a short or empty batch (a NaN loss).
            good = [i for i, f in enumerate(filled) if f is not None]
            replaced = 0
            for i in [i for i, f in enumerate(filled) if f is None]:
                if good:
                    donor, s = slots[next((g for g in good if g > i), good[0])][:2]
                elif last_good is not None:
                    donor, s = last_good
                else:
                    size = spec.transform.image_size
                    filled[i] = (_blank(spec.transform, size), 0, "__blank__", slots[i][1])
                    replaced += 1
                    continue
                out = decode_sample(donor, lambda b: spec.transform(b, slots[i][2]), label_of[s])
                filled[i] = (out[0], out[1], donor["__key__"], s)
                replaced += 1
            images, labels, keys, srcs = (list(x) for x in zip(*[f for f in filled if f is not None])) \
                if any(filled) else ([], [], [], [])
            live = {(s, e) for _, queued in queue for s, e, _ in queued}
            for key in [k for k in readers if k not in live and any(k[0] == s and k[1] < e for s, e in live)]:
                done = readers.pop(key)  # an epoch of that source this worker has finished
                bytes_done += done.bytes_read
                done.close()
            into = None
            if spec.buffers is not None and images and isinstance(images[0], np.ndarray):
                free = spec.buffers.take(worker, (len(images), *images[0].shape))
                into = (spec.buffers, *free) if free is not None else None
            yield WorkerBatch(make_batch(images, labels, keys, spec.transform.image_size, srcs, into), index,
                              skipped, replaced, bytes_done + sum(r.bytes_read for r in readers.values()), causes)
