"""One finite, unshuffled pass over eval shards, split across ranks (and workers) by shard."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.image.transforms import EvalTransform
from data_pipeline.shards.labels import LabelReader
from data_pipeline.shards.spec import expand_urls
from data_pipeline.shards.tar_read import raw_samples
from data_pipeline.storage import Storage
from data_pipeline.stream.batch import Batch, make_batch
from data_pipeline.stream.decode import decode_sample
from data_pipeline.stream.workers import as_is


class _EvalStream(IterableDataset):
    """One unshuffled pass over this rank's (and worker's) shards, batched in the worker."""

    def __init__(self, urls: list[str], batch_size: int, transform: EvalTransform,
                 storage: Storage, num_classes: int | None = None) -> None:
        super().__init__()
        self.urls, self.batch_size, self.transform, self.storage = urls, batch_size, transform, storage
        self.label = LabelReader("cls", None, num_classes)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        urls = self.urls[info.id::info.num_workers] if info else self.urls
        images: list[np.ndarray] = []
        labels: list[int] = []
        keys: list[str] = []
        for sample in raw_samples(urls, self.storage):
            out = decode_sample(sample, self.transform, self.label)  # a bad label or image: skipped, logged
            if isinstance(out, str):
                continue
            images.append(out[0])
            labels.append(out[1])
            keys.append(sample["__key__"])
            if len(keys) == self.batch_size:
                yield make_batch(images, labels, keys)
                images, labels, keys = [], [], []
        if keys:
            yield make_batch(images, labels, keys)


def eval_batches(
    urls: str | Sequence[str],
    *,
    batch_size: int,
    transform: EvalTransform,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    storage: Storage,
    num_classes: int | None = None,
) -> Iterator[Batch]:
    """One finite, unshuffled pass; shards are split across ranks so each sample is seen exactly once.

    A rank with no shards (fewer shards than ranks) yields nothing. ``num_classes``: labels at or above it
    are skipped (logged), as unparseable ones are.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    mine = expand_urls(urls, storage)[rank::world_size]
    if not mine:
        return iter(())
    dataset = _EvalStream(mine, batch_size, transform, storage, num_classes)
    # No more workers than shards: an idle worker would only cost a process start.
    workers = min(num_workers, len(mine))
    return iter(DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=as_is))
