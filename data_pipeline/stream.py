"""The training stream (infinite, elastic, exactly resumable) and one-pass eval batches.

The order of samples is the global epoch plan of ``plan.py``: a pure function of (seed, source,
epoch, manifest counts, world size), the same for any number of DataLoader workers. Rank batch ``i``
is built by worker ``i % num_workers``; each worker runs the rank's schedule itself (arithmetic only)
and reads, through an ``EpochReader`` per source and epoch, just the samples of its own batches;
skipped samples are never decoded.

The saved position (``state_dict``) is global and world-size independent: per source the epoch and
the sigma ranges consumed in it, plus the mixing counters. Any world size and worker count continues
from it with every unseen sample of the epoch delivered exactly once.
"""
from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.errors import DataSpecError, first_line
from data_pipeline.plan import TAG_AUGMENT, EpochPlan, RankSchedule
from data_pipeline.reader import SHARD_ERROR_KEY, EpochReader, raw_samples
from data_pipeline.storage import Storage, StorageError
from data_pipeline.transforms import EvalTransform, TrainTransform
from data_pipeline.urls import expand_urls, manifest_shards, no_urls_error, spec_parts

log = logging.getLogger(__name__)

# Why a sample was dropped. The order is part of the saved state format (lists indexed by kind).
SKIP_KINDS = ("bad_image", "bad_label", "missing_member", "bad_shard")
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_STATE_VERSION = 2
EPOCH_MODES = ("exact", "resampled")


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
        """Copy the tensors to ``device`` (images stay uint8: normalise there with ``device.normalize``)."""
        return replace(self, images=self.images.to(device, non_blocking=non_blocking),
                       labels=self.labels.to(device, non_blocking=non_blocking))

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class DataSource:
    """One weighted source of training shards."""

    spec: str | Sequence[str]  # brace pattern, ``::`` list, manifest .json, or a list of these
    weight: float = 1.0
    name: str = ""


@dataclass
class _ResolvedSource:
    name: str
    urls: list[str]
    counts: list[int]
    weight: float
    offsets: list[np.ndarray | None]  # per shard: each sample's first byte, then the end (None: stream it)


@dataclass
class _WorkerBatch:
    """A batch plus its index in the rank's stream and the samples skipped while building it."""

    batch: Batch
    index: int
    skipped: list[int]  # per SKIP_KINDS, for this batch only
    replaced: int = 0  # slots of unusable samples filled with another sample of the batch
    bytes_read: int = 0  # bytes this worker read from storage by range reads, so far (all batches)

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


def augment_rng(seed: int, source: int, epoch: int, raw: int) -> np.random.Generator:
    """Per-sample augmentation randomness: a function of the sample's place in the plan only."""
    return np.random.default_rng([TAG_AUGMENT, seed, source, epoch, raw])


def decode_sample(sample: dict[str, Any], image_fn: Callable[[bytes], np.ndarray]) -> tuple[np.ndarray, int] | str:
    """``(pixels, label)`` for a raw tar sample, or the SKIP_KINDS entry saying why it is unusable."""
    url, key = sample.get("__url__"), sample.get("__key__")
    if key == SHARD_ERROR_KEY:
        if not sample.get("__logged__"):
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
    except Exception as exn:  # noqa: BLE001 - decoders raise many types for corrupt data; never crash the run
        log.warning("skipping sample %s in %s: undecodable image (%s: %s)", key, url, type(exn).__name__, exn)
        return "bad_image"
    return pixels, label


def _make_batch(images: list, labels: list[int], keys: list[str], size: int = 0,
                sources: list[int] | None = None) -> Batch:
    if images and isinstance(images[0], tuple):  # gpu decode: (jpeg bytes, crop) pairs
        return Batch(images=torch.zeros((0, size, size, 3), dtype=torch.uint8),
                     labels=torch.tensor(labels, dtype=torch.int64), keys=list(keys), sources=sources,
                     encoded=[torch.frombuffer(bytearray(b), dtype=torch.uint8) for b, _ in images],
                     crops=torch.tensor([c for _, c in images], dtype=torch.int64))
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), dtype=np.uint8)
    return Batch(images=torch.from_numpy(stacked), labels=torch.tensor(labels, dtype=torch.int64),
                 keys=list(keys), sources=sources)


def index_command(spec: str) -> str:
    """The command that writes a manifest for shards given without one."""
    return f"python -m data_pipeline.index '{spec}' --out manifest.json"


def resolve_source(source: DataSource, index: int, storage: Storage) -> _ResolvedSource:
    """Shard URLs, per-shard sample counts and byte offsets, from the source's manifests.

    Shards without a manifest stop the run at once: counting them would read the whole data set on
    one rank before the first step (days at ImageNet-21k scale); the message gives the index command.
    """
    urls: list[str] = []
    counts: list[int] = []
    offsets: list[np.ndarray | None] = []
    for part in spec_parts(source.spec):
        if not part.endswith(".json"):
            raise DataSpecError(f"data spec {part!r} is not a manifest (.json): training needs each shard's "
                                f"sample count; write one with `{index_command(part)}` and point the "
                                f"data spec at it")
        for s in manifest_shards(part, source.spec, storage):
            if "num_samples" not in s:
                raise DataSpecError(f"manifest {part!r}: shard {s['url']!r} has no num_samples; rebuild it "
                                    f"with `python -m data_pipeline.index 'SHARD_PATTERN' --out {part}`")
            urls.append(s["url"])
            counts.append(int(s["num_samples"]))
            # int64 arrays: a Python int per sample would cost ~0.5 GB per process at 14M samples
            offsets.append(np.asarray(s["offsets"], dtype=np.int64) if s.get("offsets") else None)
    if not urls:
        raise no_urls_error(source.spec)
    if sum(counts) == 0:
        raise DataSpecError(f"data spec {source.spec!r}: its {len(urls)} shard(s) hold no sample")
    return _ResolvedSource(source.name or f"source{index}", urls, counts, float(source.weight), offsets)


class _TrainStream(IterableDataset):
    """Runs inside each DataLoader worker: yields the rank batches ``i`` with ``i % workers == worker``."""

    def __init__(self, loader: TrainLoader) -> None:
        super().__init__()
        self.sources = loader.sources
        self.schedule_args = loader._schedule_args()
        self.batch_size, self.transform, self.seed = loader.batch_size, loader.transform, loader.seed
        self.window, self.resampled, self.storage = loader.window, loader.resampled, loader.storage
        self.num_workers = max(1, loader.num_workers)
        self.lookahead = loader.lookahead

    def __iter__(self) -> Iterator[_WorkerBatch]:
        info = get_worker_info()
        return self._batches(info.id if info else 0)

    def _batches(self, worker: int) -> Iterator[_WorkerBatch]:
        schedule = RankSchedule(**self.schedule_args)
        readers: dict[tuple[int, int], EpochReader] = {}
        queue: deque[tuple[int, list]] = deque()  # this worker's upcoming batches, positions announced
        next_index = 0

        def reader(s: int, epoch: int) -> EpochReader:
            if (s, epoch) not in readers:
                plan = EpochPlan(self.sources[s].counts, self.seed, s, epoch, self.window, self.resampled)
                readers[(s, epoch)] = EpochReader(self.sources[s].urls, plan, self.storage, self.sources[s].offsets)
            return readers[(s, epoch)]

        def enqueue() -> None:
            nonlocal next_index
            parts = schedule.next()
            if next_index % self.num_workers == worker:
                parts = [(s, e, reader(s, e).plan.raw(sigma)) for s, e, sigma in parts]
                for s, e, raw in parts:
                    readers[(s, e)].want(raw)
                queue.append((next_index, parts))
            next_index += 1

        last_good: tuple[dict, int] | None = None  # a sample to fill a batch with no usable sample at all
        bytes_done = 0  # bytes read by readers already closed
        while True:
            while len(queue) < self.lookahead:
                enqueue()
            index, parts = queue.popleft()
            slots: list[tuple[dict, int, np.random.Generator] | None] = []  # (raw sample, source, rng) or unusable
            skipped = [0] * len(SKIP_KINDS)
            for s, epoch, raws in parts:
                rd = reader(s, epoch)
                for raw in raws:
                    slots.append((rd.fetch(raw), s, augment_rng(self.seed, s, epoch, int(raw))))
            filled: list[tuple[Any, int, str, int] | None] = []  # (pixels, label, key, source) per slot
            for sample, s, rng in slots:
                out = decode_sample(sample, lambda b: self.transform(b, rng))
                if isinstance(out, str):
                    skipped[SKIP_KINDS.index(out)] += 1
                    filled.append(None)
                else:
                    filled.append((out[0], out[1], sample["__key__"], s))
                    last_good = (sample, s)
            # Constant batch shapes: an unusable slot takes the next usable sample of the batch (the
            # worker's last usable one if the batch has none), augmented with the slot's own randomness.
            # A pure function of the plan, so resume stays exact; the counters count it as skipped.
            good = [i for i, f in enumerate(filled) if f is not None]
            replaced = 0
            for i in [i for i, f in enumerate(filled) if f is None]:
                if good:
                    donor, s = slots[next((g for g in good if g > i), good[0])][:2]
                elif last_good is not None:
                    donor, s = last_good
                else:
                    continue  # nothing usable read yet on this worker: the batch stays short
                out = decode_sample(donor, lambda b: self.transform(b, slots[i][2]))
                filled[i] = (out[0], out[1], donor["__key__"], s)
                replaced += 1
            images, labels, keys, srcs = (list(x) for x in zip(*[f for f in filled if f is not None])) \
                if any(filled) else ([], [], [], [])
            live = {(s, e) for _, queued in queue for s, e, _ in queued}
            for key in [k for k in readers if k not in live and any(k[0] == s and k[1] < e for s, e in live)]:
                done = readers.pop(key)  # an epoch of that source this worker has finished
                bytes_done += done.bytes_read
                done.close()
            yield _WorkerBatch(_make_batch(images, labels, keys, self.transform.image_size, srcs), index, skipped,
                               replaced, bytes_done + sum(r.bytes_read for r in readers.values()))


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class TrainLoader:
    """Infinite training batches for one rank; ``state_dict``/``load_state_dict`` resume to the sample
    under any world size and worker count."""

    def __init__(
        self,
        urls: str | Sequence[str] | Sequence[DataSource],
        *,
        batch_size: int,
        transform: TrainTransform,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        pin_memory: bool = False,
        epoch_mode: str = "exact",
        storage: Storage,
        lookahead: int = 0,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy seeds), got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if epoch_mode not in EPOCH_MODES:
            raise ValueError(f"epoch_mode must be one of {EPOCH_MODES}, got {epoch_mode!r}")
        specs = [urls] if isinstance(urls, (str, DataSource)) else list(urls)
        if not specs:
            raise DataSpecError("the data spec is empty")
        if not all(isinstance(s, DataSource) for s in specs):
            if any(isinstance(s, DataSource) for s in specs):
                raise DataSpecError("mix either shard specs or DataSource entries, not both")
            specs = [DataSource(list(specs) if len(specs) > 1 else specs[0])]
        if any(s.weight <= 0 for s in specs):
            raise DataSpecError(f"source weights must be > 0, got {[s.weight for s in specs]}")
        self.storage = storage
        self.sources = self._resolve(specs)
        self.urls = [u for s in self.sources for u in s.urls]
        self.batch_size, self.transform, self.seed = batch_size, transform, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.window, self.pin_memory = max(1, shuffle_buffer), pin_memory
        self.resampled = epoch_mode == "resampled"
        # Batches a worker plans ahead: enough that it reads each window of the plan once.
        self.lookahead = lookahead or max(2, 2 * -(-self.window // batch_size) // max(1, num_workers) + 2)
        for s in self.sources:
            if sum(s.counts) < world_size:
                raise DataSpecError(f"source {s.name}: {sum(s.counts)} sample(s) cannot feed {world_size} ranks")
        self._source_state: list[dict] | None = None
        self._total = 0
        self.delivered = 0  # samples delivered to the caller on this rank (+ the saved global count on rank 0)
        self._skipped = [0] * len(SKIP_KINDS)  # this rank's share (+ the saved global counts on rank 0)
        self._schedule: RankSchedule | None = None
        self.source_counts = [0] * len(self.sources)  # samples delivered per source on this rank
        self.bytes_read = 0  # bytes read from storage by range reads in the current iteration (all workers)

    def _resolve(self, specs: list[DataSource]) -> list[_ResolvedSource]:
        # Every rank reads the manifests itself: no rank waits on another, and nothing is counted.
        return [resolve_source(s, i, self.storage) for i, s in enumerate(specs)]

    def _schedule_args(self) -> dict:
        return dict(counts=[s.counts for s in self.sources], weights=[s.weight for s in self.sources],
                    batch_size=self.batch_size, seed=self.seed, window=self.window, resampled=self.resampled,
                    rank=self.rank, world_size=self.world_size, state=self._source_state, total=self._total)

    @property
    def skipped(self) -> dict[str, int]:
        """Samples dropped so far on this rank, per kind (``SKIP_KINDS``), as of the batches delivered."""
        return dict(zip(SKIP_KINDS, self._skipped))

    @property
    def dropped_at_epoch_end(self) -> int:
        """Samples left out at epoch ends (at most world_size - 1 per epoch and source), all ranks."""
        schedule = self._schedule or RankSchedule(**self._schedule_args())
        return sum(c.dropped for c in schedule.cursors)

    def metrics(self) -> dict[str, float]:
        """TensorBoard scalars (local, no collective): per source the requested and observed share of
        the samples delivered on this rank and its current epoch, plus the samples dropped at epoch ends."""
        out: dict[str, float] = {"data/dropped_at_epoch_end": float(self.dropped_at_epoch_end)}
        total = max(1, sum(self.source_counts))
        weight_sum = sum(s.weight for s in self.sources)
        schedule = self._schedule or RankSchedule(**self._schedule_args())
        for s, n, cursor in zip(self.sources, self.source_counts, schedule.cursors):
            out[f"data/{s.name}/epoch"] = float(cursor.epoch)
            if len(self.sources) > 1:
                out[f"data/{s.name}/requested_share"] = s.weight / weight_sum
                out[f"data/{s.name}/observed_share"] = n / total
        return out

    def __iter__(self) -> Iterator[Batch]:
        dataset = _TrainStream(self)
        self._schedule = RankSchedule(**self._schedule_args())
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            pin_memory=self.pin_memory, worker_init_fn=_outlive_preemption_signals)
        workers = max(1, self.num_workers)
        worker_bytes = [0] * workers
        items = iter(loader)
        for expected in itertools.count():
            try:
                item = next(items)
            except StorageError as exc:
                # Raised in a worker, it arrives with the worker's traceback folded into the text: keep one line.
                raise StorageError(first_line(exc)) from None
            if item.index != expected:
                raise RuntimeError(f"data loader delivered batch {item.index}, expected {expected}")
            self._schedule.next()
            self._source_state, self._total = self._schedule.state(), self._schedule.total
            self._skipped = [a + b for a, b in zip(self._skipped, item.skipped)]
            self.delivered += len(item.batch) - item.replaced
            worker_bytes[expected % workers] = item.bytes_read
            self.bytes_read = sum(worker_bytes)
            for s in item.batch.sources or ():
                self.source_counts[s] += 1
            yield item.batch

    def blank_batch(self) -> Batch:
        """A full batch of black images, label 0: a stand-in while a run stops (never trained on for real)."""
        size = self.transform.image_size
        return _make_batch([np.zeros((size, size, 3), np.uint8)] * self.batch_size, [0] * self.batch_size,
                           ["__blank__"] * self.batch_size)

    def state_dict(self) -> dict:
        """The global data position; a collective call when torch.distributed is initialised.

        Every rank returns the same record: plain ints, strings and lists (``weights_only`` loadable).
        """
        counts = torch.tensor(self._skipped + [self.delivered], dtype=torch.int64)
        if _is_distributed():
            dist.all_reduce(counts)
        counts = counts.tolist()
        sources = self._source_state or RankSchedule(**self._schedule_args()).state()
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "window": self.window,
            "epoch_mode": "resampled" if self.resampled else "exact",
            "total": self._total,
            "sources": [dict(st, name=s.name, num_shards=len(s.urls), num_samples=sum(s.counts))
                        for st, s in zip(sources, self.sources)],
            "skipped": counts[:-1],
            "delivered": counts[-1],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``state_dict`` record saved under any world size and worker count."""
        if state.get("version") != _STATE_VERSION:
            raise DataSpecError(f"data loader state version {state.get('version')!r} is not supported "
                                f"(expected {_STATE_VERSION}); this checkpoint's data position cannot be used")
        mode = "resampled" if self.resampled else "exact"
        for key, now in (("seed", self.seed), ("window", self.window), ("epoch_mode", mode)):
            if state.get(key) != now:
                raise DataSpecError(f"data loader state was saved with {key} {state.get(key)!r}, now {now!r}: "
                                    f"the saved position means other samples under another {key}")
        saved = state.get("sources", [])
        if len(saved) != len(self.sources):
            raise DataSpecError(f"data loader state has {len(saved)} source(s), the config {len(self.sources)}")
        for st, s in zip(saved, self.sources):
            if st.get("num_shards") != len(s.urls) or st.get("num_samples") != sum(s.counts):
                raise DataSpecError(
                    f"data loader state of source {s.name} was saved with {st.get('num_shards')} shards / "
                    f"{st.get('num_samples')} samples, now {len(s.urls)} / {sum(s.counts)}: the data changed")
        self._source_state = [{k: st[k] for k in ("epoch", "consumed", "taken", "dropped")} for st in saved]
        self._total = int(state["total"])
        self._schedule = None
        # Counters are summed over ranks by their readers: the saved global totals go to rank 0 only.
        first = self.rank == 0
        self._skipped = [int(x) if first else 0 for x in state["skipped"]]
        self.delivered = int(state["delivered"]) if first else 0


class _EvalStream(IterableDataset):
    """One unshuffled pass over this rank's (and worker's) shards, batched in the worker."""

    def __init__(self, urls: list[str], batch_size: int, transform: EvalTransform,
                 storage: Storage) -> None:
        super().__init__()
        self.urls, self.batch_size, self.transform, self.storage = urls, batch_size, transform, storage

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        urls = self.urls[info.id::info.num_workers] if info else self.urls
        images: list[np.ndarray] = []
        labels: list[int] = []
        keys: list[str] = []
        for sample in raw_samples(urls, self.storage):
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
    storage: Storage,
) -> Iterator[Batch]:
    """One finite, unshuffled pass; shards are split across ranks so each sample is seen exactly once.

    A rank with no shards (fewer shards than ranks) yields nothing.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    mine = expand_urls(urls, storage)[rank::world_size]
    if not mine:
        return iter(())
    dataset = _EvalStream(mine, batch_size, transform, storage)
    # No more workers than shards: an idle worker would only cost a process start.
    workers = min(num_workers, len(mine))
    return iter(DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity))
