"""The training stream (infinite, sharded by rank and worker, exactly resumable) and one-pass eval batches.

Per worker and epoch the sample order is a pure function of (seed, epoch, rank, worker):

    shards permuted by (seed, epoch) -> this worker's slice -> raw tar samples
    -> shuffle buffer seeded by (seed, epoch, rank, worker) -> [skip `consumed` on resume]
    -> decode + augment (seeded by (seed, epoch, crc32(key))) -> batch

Every batch carries the worker's position (epoch, raw samples consumed in that epoch). The loader
keeps the positions of the batches it has *delivered*; resuming restarts each worker at its epoch
and drops the consumed raw samples before any decoding, so the delivered sequence continues exactly.
DataLoader hands out worker batches round robin; the loader also records which worker is next and
rotates the worker ids on resume, so the interleaving continues exactly as well.
"""
from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import zlib
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle as wds_shuffle

from data_pipeline.errors import DataSpecError
from data_pipeline.reader import SHARD_ERROR_KEY, raw_samples
from data_pipeline.transforms import EvalTransform, TrainTransform
from data_pipeline.urls import expand_urls

log = logging.getLogger(__name__)

# Why a sample was dropped. The order is part of the saved state format (lists indexed by kind).
SKIP_KINDS = ("bad_image", "bad_label", "missing_member", "bad_shard")
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_STATE_VERSION = 1
# Leading domain tags keep the three seed streams apart even when their other entries coincide.
_TAG_SHARDS, _TAG_SHUFFLE, _TAG_AUGMENT = 1, 2, 3


@dataclass
class Batch:
    """A batch as produced on the host: uint8 NHWC images, int64 labels and the sample keys."""

    images: torch.Tensor  # uint8 [B, H, W, 3]
    labels: torch.Tensor  # int64 [B]
    keys: list[str]

    def pin_memory(self) -> Batch:
        """Page-locked copy (DataLoader's pin thread calls this)."""
        return replace(self, images=self.images.pin_memory(), labels=self.labels.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Copy the tensors to ``device`` (images stay uint8: normalise there with ``device.normalize``)."""
        return replace(self, images=self.images.to(device, non_blocking=non_blocking),
                       labels=self.labels.to(device, non_blocking=non_blocking))

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class _WorkerBatch:
    """A batch plus the producing worker's stream position after it."""

    batch: Batch
    worker: int
    epoch: int
    consumed: int
    skipped: list[int]  # cumulative per SKIP_KINDS for this worker

    def pin_memory(self) -> _WorkerBatch:
        return replace(self, batch=self.batch.pin_memory())


def _outlive_preemption_signals(_worker_id: int) -> None:
    """A scheduler's SIGTERM / SIGUSR1 reaches every process of the job. The rank checkpoints on it
    (pretrain/preemption.py) and then shuts its workers down; a worker that died of it first would
    fail the rank before the save. So a worker ignores SIGUSR1, and SIGTERM from anyone but its own
    rank; the rank's SIGTERM (DataLoader shutdown, interpreter exit) still ends it at once."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # not on macOS: keep PyTorch's default there
        return
    rank_pid = os.getppid()
    # Blocked here, in the worker's only thread so far, and so in every thread it starts later:
    # SIGTERM is then taken only by sigwaitinfo below, which tells who sent it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_the_rank() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != rank_pid:
            pass
        os._exit(0)

    threading.Thread(target=wait_for_the_rank, name="sigterm-from-rank", daemon=True).start()


def _identity(x: Any) -> Any:
    return x


class _NumpyRandint:
    """Adapter giving webdataset's shuffle (which wants ``random.Random.randint``) a numpy Generator."""

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng

    def randint(self, a: int, b: int) -> int:
        return int(self._rng.integers(a, b + 1))


def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """Permutation of shard indices for ``epoch`` (identical on every rank and worker)."""
    return np.random.default_rng([_TAG_SHARDS, seed, epoch]).permutation(num_shards)


def worker_shards(urls: Sequence[str], seed: int, epoch: int, slot: int, num_slots: int) -> list[str]:
    """Shards of global worker ``slot`` (= rank * workers + worker) of ``num_slots`` for ``epoch``."""
    order = shard_order(len(urls), seed, epoch)
    return [urls[j] for i, j in enumerate(order) if i % num_slots == slot]


def augment_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """Per-sample augmentation randomness, independent of sample order and of skipped samples."""
    return np.random.default_rng([_TAG_AUGMENT, seed, epoch, zlib.crc32(key.encode("utf-8"))])


def decode_sample(sample: dict[str, Any], image_fn: Callable[[bytes], np.ndarray]) -> tuple[np.ndarray, int] | str:
    """``(pixels, label)`` for a raw tar sample, or the SKIP_KINDS entry saying why it is unusable."""
    url, key = sample.get("__url__"), sample.get("__key__")
    if key == SHARD_ERROR_KEY:
        log.warning("skipping unreadable shard %s: %s", url, sample.get("err", b"").decode(errors="replace"))
        return "bad_shard"
    image = next((sample[e] for e in _IMAGE_EXTS if e in sample), None)
    if image is None or "cls" not in sample:
        log.warning("skipping sample %s in %s: missing %s member", key, url, "image" if image is None else ".cls")
        return "missing_member"
    try:
        label = int(sample["cls"].decode("ascii").strip())
        if label < 0:
            raise ValueError("negative")
    except (ValueError, UnicodeDecodeError):
        log.warning("skipping sample %s in %s: bad label %r", key, url, sample["cls"][:20])
        return "bad_label"
    try:
        pixels = image_fn(image)
    except Exception as exn:  # noqa: BLE001 - PIL raises many types for corrupt data; never crash the run
        log.warning("skipping sample %s in %s: undecodable image (%s: %s)", key, url, type(exn).__name__, exn)
        return "bad_image"
    return pixels, label


def _make_batch(images: list[np.ndarray], labels: list[int], keys: list[str]) -> Batch:
    return Batch(images=torch.from_numpy(np.stack(images)), labels=torch.tensor(labels, dtype=torch.int64),
                 keys=list(keys))


class _TrainStream(IterableDataset):
    """Runs inside each DataLoader worker: yields that worker's batches forever."""

    def __init__(self, urls: list[str], batch_size: int, transform: TrainTransform, seed: int, rank: int,
                 world_size: int, num_workers: int, shuffle_buffer: int, epochs: list[int],
                 consumed: list[int], skipped: list[list[int]], first_worker: int) -> None:
        super().__init__()
        self.urls, self.batch_size, self.transform, self.seed = urls, batch_size, transform, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle_buffer = shuffle_buffer
        self.epochs, self.consumed, self.skipped = epochs, consumed, skipped
        self.first_worker = first_worker

    def __iter__(self) -> Iterator[_WorkerBatch]:
        info = get_worker_info()
        # DataLoader starts its round robin at process 0; rotating ids makes the logical worker
        # that was next when the state was saved deliver first.
        worker = ((info.id if info else 0) + self.first_worker) % self.num_workers
        return self._batches(worker)

    def _epoch_samples(self, epoch: int, worker: int) -> Iterator[dict[str, Any]]:
        slot = self.rank * self.num_workers + worker
        shards = worker_shards(self.urls, self.seed, epoch, slot, self.world_size * self.num_workers)
        samples = raw_samples(shards)
        if self.shuffle_buffer > 1:
            rng = np.random.default_rng([_TAG_SHUFFLE, self.seed, epoch, self.rank, worker])
            samples = wds_shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=_NumpyRandint(rng))(samples)
        return samples

    def _batches(self, worker: int) -> Iterator[_WorkerBatch]:
        epoch, consumed = self.epochs[worker], self.consumed[worker]
        skipped = list(self.skipped[worker])
        images: list[np.ndarray] = []
        labels: list[int] = []
        keys: list[str] = []
        while True:
            samples = self._epoch_samples(epoch, worker)
            fresh_epoch = consumed == 0
            if consumed:
                # Resume: drop raw samples already consumed, before any decoding.
                samples = itertools.islice(samples, consumed, None)
            usable = 0
            for sample in samples:
                consumed += 1
                key = sample["__key__"]
                out = decode_sample(sample, lambda b: self.transform(b, augment_rng(self.seed, epoch, key)))
                if isinstance(out, str):
                    skipped[SKIP_KINDS.index(out)] += 1
                    continue
                usable += 1
                images.append(out[0])
                labels.append(out[1])
                keys.append(key)
                if len(keys) == self.batch_size:
                    yield _WorkerBatch(_make_batch(images, labels, keys), worker, epoch, consumed, list(skipped))
                    images, labels, keys = [], [], []
            if fresh_epoch and usable == 0:
                # Without this, a worker whose shards are all unreadable would spin through epochs forever.
                raise DataSpecError(f"rank {self.rank} worker {worker}: no usable sample in its shards for "
                                    f"epoch {epoch} (see the warnings above); check the data spec")
            epoch, consumed = epoch + 1, 0


class TrainLoader:
    """Infinite training batches for one rank; ``state_dict``/``load_state_dict`` resume to the sample."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        batch_size: int,
        transform: TrainTransform,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        pin_memory: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy seeds), got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.urls = expand_urls(urls)
        self.batch_size, self.transform, self.seed = batch_size, transform, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle_buffer, self.pin_memory = shuffle_buffer, pin_memory
        # num_workers=0 runs the single logical worker in-process: same stream as num_workers=1.
        self._slots = max(1, num_workers)
        needed = world_size * self._slots
        if len(self.urls) < needed:
            raise DataSpecError(
                f"data spec {urls!r} has {len(self.urls)} shard(s) but world_size {world_size} x "
                f"{self._slots} worker(s) needs at least {needed}; write more, smaller shards or use fewer workers")
        self._epochs = [0] * self._slots
        self._consumed = [0] * self._slots
        self._skipped = [[0] * len(SKIP_KINDS) for _ in range(self._slots)]
        self._next_worker = 0
        self.delivered = 0  # samples delivered to the caller (for skip-fraction checks)

    @property
    def skipped(self) -> dict[str, int]:
        """Samples dropped so far, per kind (``SKIP_KINDS``), as of the batches delivered."""
        return {kind: sum(w[i] for w in self._skipped) for i, kind in enumerate(SKIP_KINDS)}

    def __iter__(self) -> Iterator[Batch]:
        dataset = _TrainStream(
            self.urls, self.batch_size, self.transform, self.seed, self.rank, self.world_size, self._slots,
            self.shuffle_buffer, list(self._epochs), list(self._consumed), [list(s) for s in self._skipped],
            self._next_worker)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            pin_memory=self.pin_memory, worker_init_fn=_outlive_preemption_signals)
        for item in loader:
            w = item.worker
            self._epochs[w], self._consumed[w], self._skipped[w] = item.epoch, item.consumed, item.skipped
            self._next_worker = (w + 1) % self._slots
            self.delivered += len(item.batch)
            yield item.batch

    def state_dict(self) -> dict:
        """Position of the delivered stream: JSON-serialisable ints and lists of ints only."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "num_shards": len(self.urls),
            "next_worker": self._next_worker,
            "epoch": list(self._epochs),
            "consumed": list(self._consumed),
            "skipped": [list(s) for s in self._skipped],
            "delivered": self.delivered,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` on the next iteration (same seed and rank/worker layout required)."""
        if state.get("version") != _STATE_VERSION:
            raise DataSpecError(f"data loader state version {state.get('version')!r} is not supported "
                                f"(expected {_STATE_VERSION})")
        saved_slots = max(1, int(state["num_workers"]))
        if state["world_size"] != self.world_size or saved_slots != self._slots:
            raise DataSpecError(
                f"data loader state was saved with world_size {state['world_size']} x num_workers "
                f"{state['num_workers']}, now {self.world_size} x {self.num_workers}: resume across a different "
                f"worker/rank layout is not supported yet")
        if state["rank"] != self.rank:
            raise DataSpecError(f"data loader state belongs to rank {state['rank']}, not rank {self.rank}; "
                                f"save and load one state per rank")
        if state["seed"] != self.seed:
            raise DataSpecError(f"data loader state was saved with seed {state['seed']}, now {self.seed}: "
                                f"the saved position is meaningless under another seed")
        if state.get("num_shards") != len(self.urls):
            log.warning("data loader state was saved with %s shards, now %d: resume will not be exact",
                        state.get("num_shards"), len(self.urls))
        epochs, consumed, skipped = state["epoch"], state["consumed"], state["skipped"]
        if not (len(epochs) == len(consumed) == len(skipped) == self._slots) or any(
                len(s) != len(SKIP_KINDS) for s in skipped):
            raise DataSpecError("data loader state is malformed: per-worker lists do not match num_workers")
        self._epochs = [int(e) for e in epochs]
        self._consumed = [int(c) for c in consumed]
        self._skipped = [[int(x) for x in s] for s in skipped]
        self._next_worker = int(state["next_worker"]) % self._slots
        self.delivered = int(state.get("delivered", 0))


class _EvalStream(IterableDataset):
    """One unshuffled pass over this rank's (and worker's) shards, batched in the worker."""

    def __init__(self, urls: list[str], batch_size: int, transform: EvalTransform) -> None:
        super().__init__()
        self.urls, self.batch_size, self.transform = urls, batch_size, transform

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        urls = self.urls[info.id::info.num_workers] if info else self.urls
        images: list[np.ndarray] = []
        labels: list[int] = []
        keys: list[str] = []
        for sample in raw_samples(urls):
            out = decode_sample(sample, self.transform)
            if isinstance(out, str):
                continue
            images.append(out[0])
            labels.append(out[1])
            keys.append(sample["__key__"])
            if len(keys) == self.batch_size:
                yield _make_batch(images, labels, keys)
                images, labels, keys = [], [], []
        if keys:
            yield _make_batch(images, labels, keys)


def eval_batches(
    urls: str | Sequence[str],
    *,
    batch_size: int,
    transform: EvalTransform,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> Iterator[Batch]:
    """One finite, unshuffled pass; shards are split across ranks so each sample is seen exactly once.

    A rank with no shards (fewer shards than ranks) yields nothing.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    mine = expand_urls(urls)[rank::world_size]
    if not mine:
        return iter(())
    dataset = _EvalStream(mine, batch_size, transform)
    # No more workers than shards: an idle worker would only cost a process start.
    workers = min(num_workers, len(mine))
    return iter(DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity))
