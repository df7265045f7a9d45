"""The training stream's rank side: ``TrainLoader``, infinite, elastic and exactly resumable.

The order of samples is the global epoch plan of ``plan.py``: a pure function of (seed, source,
epoch, manifest counts, world size), the same for any number of DataLoader workers; the workers
build the batches (``train_worker.py``) and the loader checks their order and keeps the counters.

The saved position (``state_dict``) is global and world-size independent: per source the epoch and
the sigma ranges consumed in it, plus the mixing counters. Any world size and worker count continues
from it with every unseen sample of the epoch delivered exactly once.
"""
from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from data_pipeline.errors import DataSpecError, first_line
from data_pipeline.image.gpu_decode import CropPlanner
from data_pipeline.image.transforms import TrainTransform
from data_pipeline.storage import Storage, StorageError
from data_pipeline.storage.cache import ShardCache
from data_pipeline.stream.batch import Batch, make_batch
from data_pipeline.stream.batch_buffers import BatchBuffers
from data_pipeline.stream.decode import SKIP_KINDS
from data_pipeline.stream.plan import RankSchedule
from data_pipeline.shards.labels import parse_label_source
from data_pipeline.stream.sources import DataSource, ResolvedSource, check_label, resolve_source
from data_pipeline.stream.train_worker import TrainWorkerStream, WorkerSpec
from data_pipeline.stream.workers import as_is, outlive_preemption_signals

_STATE_VERSION = 2
EPOCH_MODES = ("exact", "resampled")
_PREFETCH = 2  # batches each DataLoader worker has in flight (its prefetch_factor)
# Shared buffers per worker: its batches in flight, the one the rank trains on, and a spare for a consumer that
# holds one more (touched only then).
_SLOTS_PER_WORKER = _PREFETCH + 2


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
        label: str = "cls",
        cache: ShardCache | None = None,
        num_classes: int | None = None,
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
        self.storage, self.cache = storage, cache
        self.num_classes = num_classes  # the model head's: labels at or above it are bad_label skips
        self.label = str(parse_label_source(label))  # ValueError: one line naming the accepted forms
        self.sources = self._resolve(specs)
        for i, (spec, s) in enumerate(zip(specs, self.sources)):  # each source's own label, else data.label
            s.reads = str(parse_label_source(spec.label)) if spec.label else self.label
            check_label(s, f"data.sources.{i}.label" if spec.label else "data.label")
        self.batch_size, self.transform, self.seed = batch_size, transform, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.window, self.pin_memory = max(1, shuffle_buffer), pin_memory
        self.resampled = epoch_mode == "resampled"
        # Batches a worker plans ahead: enough that it reads each window of the plan once.
        self.lookahead = lookahead or max(2, 2 * -(-self.window // batch_size) // max(1, num_workers) + 2)
        for s in self.sources:
            if int(s.counts.sum()) < world_size:
                raise DataSpecError(f"source {s.name}: {int(s.counts.sum())} sample(s) cannot feed {world_size} ranks")
        self._source_state: list[dict] | None = None
        self._total = 0
        self.delivered = 0  # samples delivered to the caller on this rank (+ the saved global count on rank 0)
        self._skipped = [0] * len(SKIP_KINDS)  # this rank's share (+ the saved global counts on rank 0)
        self._schedule: RankSchedule | None = None
        self.source_counts = [0] * len(self.sources)  # samples delivered per source on this rank
        self.bytes_read = 0  # bytes read from storage by range reads in the current iteration (all workers)
        self.skip_causes: dict[str, str] = {}  # per skip kind, the first sample skipped for it on this rank, and why
        self._mark: tuple | None = None
        self._restart = False  # the live iterator continues from the current position and layout (restart)

    def _resolve(self, specs: list[DataSource]) -> list[ResolvedSource]:
        # Every rank reads the manifests itself: no rank waits on another, and nothing is counted.
        return [resolve_source(s, i, self.storage) for i, s in enumerate(specs)]

    def schedule_args(self) -> dict:
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
        schedule = self._schedule or RankSchedule(**self.schedule_args())
        return sum(c.dropped for c in schedule.cursors)

    def metrics(self) -> dict[str, float]:
        """TensorBoard scalars (local, no collective): per source the requested and observed share of
        the samples delivered on this rank and its current epoch, plus the samples dropped at epoch ends."""
        out: dict[str, float] = {"data/dropped_at_epoch_end": float(self.dropped_at_epoch_end)}
        total = max(1, sum(self.source_counts))
        weight_sum = sum(s.weight for s in self.sources)
        schedule = self._schedule or RankSchedule(**self.schedule_args())
        for s, n, cursor in zip(self.sources, self.source_counts, schedule.cursors):
            out[f"data/{s.name}/epoch"] = float(cursor.epoch)
            if len(self.sources) > 1:
                out[f"data/{s.name}/requested_share"] = s.weight / weight_sum
                out[f"data/{s.name}/observed_share"] = n / total
        return out

    def worker_spec(self, buffers: BatchBuffers | None = None) -> WorkerSpec:
        """What the DataLoader workers need, from the current position (``schedule_args``)."""
        return WorkerSpec(self.sources, self.schedule_args(), self.transform, self.seed, self.window,
                          self.resampled, self.storage, max(1, self.num_workers), self.lookahead, self.label,
                          self.cache, self.num_classes, buffers)

    def __iter__(self) -> Iterator[Batch]:
        while True:  # once per layout: a ``restart`` (new layout, rewound position) rebuilds the workers
            self._restart = False
            yield from self._iter_layout()

    def _iter_layout(self) -> Iterator[Batch]:
        buffers = None
        if self.num_workers > 0 and not isinstance(self.transform, CropPlanner):  # pixels cross processes
            buffers = BatchBuffers(self.num_workers, _SLOTS_PER_WORKER, self.batch_size, self.transform.image_size)
        dataset = TrainWorkerStream(self.worker_spec(buffers))
        self._schedule = RankSchedule(**self.schedule_args())
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=as_is,
                            pin_memory=self.pin_memory, worker_init_fn=outlive_preemption_signals,
                            prefetch_factor=_PREFETCH if self.num_workers > 0 else None)
        workers = max(1, self.num_workers)
        worker_bytes = [0] * workers
        items = iter(loader)
        for expected in itertools.count():
            if self._restart:
                return
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
            for kind, why in item.causes.items():
                self.skip_causes.setdefault(kind, why)
            self.delivered += len(item.batch) - item.replaced
            worker_bytes[expected % workers] = item.bytes_read
            self.bytes_read = sum(worker_bytes)
            for s in item.batch.sources or ():
                self.source_counts[s] += 1
            yield item.batch

    def restart(self, rank: int | None = None, world_size: int | None = None) -> None:
        """The live iterator's next batch comes from the current position (after ``rewind`` or
        ``load_position``), under a new layout if given: this rank's slot ``rank`` of ``world_size``.
        Fault-tolerant training calls it when replica groups leave or join, or a step is not committed;
        the samples not consumed so far are shared out again, so none is lost or taken twice."""
        if rank is not None and world_size is not None:
            if not 0 <= rank < world_size:
                raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
            self.rank, self.world_size = rank, world_size
        self._restart = True

    def mark(self) -> None:
        """Remember the position (a step boundary) that ``rewind`` goes back to; cheap, local."""
        self._mark = (self._source_state, self._total, list(self._skipped), self.delivered, list(self.source_counts))

    def rewind(self) -> None:
        """Back to the position of the last ``mark``: the batches delivered since then count as never read
        (a step cut short by a preemption signal is saved as the step boundary before it)."""
        if self._mark is not None:
            self._source_state, self._total, skipped, self.delivered, counts = self._mark
            self._skipped, self.source_counts = list(skipped), list(counts)
            self._restart = True  # a live iterator goes on from the mark, not from where its workers are

    def blank_batch(self) -> Batch:
        """A full batch of black images, label 0: a stand-in while a run stops (never trained on for real)."""
        size = self.transform.image_size
        return make_batch([np.zeros((size, size, 3), np.uint8)] * self.batch_size, [0] * self.batch_size,
                          ["__blank__"] * self.batch_size)

    def state_dict(self) -> dict:
        """The global data position; a collective call when torch.distributed is initialised.

        Every rank returns the same record: plain ints, strings and lists (``weights_only`` loadable).
        """
        counts = torch.tensor(self._skipped + [self.delivered], dtype=torch.int64)
        if _is_distributed():
            dist.all_reduce(counts)
        counts = counts.tolist()
        return self._record(counts[:-1], counts[-1])

    def _record(self, skipped: list[int], delivered: int) -> dict:
        sources = self._source_state or RankSchedule(**self.schedule_args()).state()
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "window": self.window,
            "epoch_mode": "resampled" if self.resampled else "exact",
            "total": self._total,
            "sources": [dict(st, name=s.name, num_shards=len(s.urls), num_samples=int(s.counts.sum()))
                        for st, s in zip(sources, self.sources)],
            "skipped": list(skipped),
            "delivered": int(delivered),
        }

    def position(self) -> dict:
        """The global data position without the counters: no collective, so a peer's recovery thread may
        read it at a step boundary (live recovery of a replica group, `pretrain/engines/ft.py`)."""
        return self._record(self._skipped, 0)

    def load_position(self, state: dict) -> None:
        """Continue from a peer's ``position()``; this rank's counters stay its own."""
        skipped, delivered = list(self._skipped), self.delivered
        self.load_state_dict(state)
        self._skipped, self.delivered = skipped, delivered
        self._restart = True

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
            if st.get("num_shards") != len(s.urls) or st.get("num_samples") != int(s.counts.sum()):
                raise DataSpecError(
                    f"data loader state of source {s.name} was saved with {st.get('num_shards')} shards / "
                    f"{st.get('num_samples')} samples, now {len(s.urls)} / {int(s.counts.sum())}: the data changed")
        self._source_state = [{k: st[k] for k in ("epoch", "consumed", "taken", "dropped")} for st in saved]
        self._total = int(state["total"])
        self._schedule = None
        # Counters are summed over ranks by their readers: the saved global totals go to rank 0 only.
        first = self.rank == 0
        self._skipped = [int(x) if first else 0 for x in state["skipped"]]
        self.delivered = int(state["delivered"]) if first else 0
