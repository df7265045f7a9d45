"""Samples of an epoch plan by raw position: what a training DataLoader worker reads.

With the per-sample byte offsets of the manifest (read per shard when the worker starts it, see
shards/offsets.py), ``EpochReader`` reads just the byte ranges of the samples
it is asked for (contiguous ones in one request), so a worker reads only its own samples; without offsets
it streams each shard and skips the samples it does not need, undecoded.
"""
from __future__ import annotations

import bisect
import logging
import os
from collections import OrderedDict
from typing import Any, Iterable, Sequence

from data_pipeline.shards.offsets import ListOffsets, ShardOffsets
from data_pipeline.shards.tar_read import ShardSamples, error_marker, parse_sample
from fsspec.core import split_protocol

from data_pipeline.storage import Storage, read_range
from data_pipeline.storage.retry import is_local
from data_pipeline.storage.cache import CachedShard, ShardCache
from data_pipeline.stream.plan import EpochPlan

log = logging.getLogger(__name__)

# Why a range read found no sample where the manifest said one starts (a manifest of other shards, or
# shards rewritten after indexing); the run's skip-fraction stop repeats it.
OFFSETS_MISMATCH = ("the manifest's offsets do not match the shard (no tar sample at a sample's offset); rebuild "
                    "the manifest with python -m data_pipeline.index '<shards>' --out <manifest.json>")
_MAX_RUN_BYTES = 64 << 20  # one range request reads at most this much (more samples: more requests)
_OPEN_COPIES = 16  # cached shards a reader keeps open (and share-locked) at once


class _Ranges:
    """Range reads of one source's shards: remote ones through a retry budget for the shard, or with a node
    cache from the node's copy (fetched whole, once per node, on first use); local ones with ``pread`` on a
    file kept open (an fsspec open per run of samples cost more than the read itself)."""

    def __init__(self, urls: Sequence[str], storage: Storage, cache: ShardCache | None = None) -> None:
        self.urls, self.storage, self.cache = urls, storage, cache
        self.bytes_read = 0
        self._copies: dict[int, CachedShard | None] = {}  # per shard: its open copy, or None: read remotely
        self._open: OrderedDict[int, None] = OrderedDict()  # shards whose copy is open, least recent first

    def _copy(self, shard: int) -> CachedShard | None:
        if shard in self._copies:
            copy = self._copies[shard]
            if copy is not None:
                self._open.move_to_end(shard)
            return copy
        url, read = self.urls[shard], 0
        if is_local(url):  # read in place with pread: no fsspec open per run of samples
            try:
                copy = CachedShard(os.open(split_protocol(url)[1], os.O_RDONLY), url, in_place=True)
            except OSError:
                copy = None  # read_range's retry layer names what is wrong
        elif self.cache is not None:
            size = self.urls.size(shard) if hasattr(self.urls, "size") else -1
            sha = self.urls.sha256(shard) if hasattr(self.urls, "sha256") else ""
            copy, read = self.cache.open(url, size, self.storage, sha)
        else:
            copy = None
        self.bytes_read += read
        self._copies[shard] = copy
        if copy is not None:
            self._open[shard] = None
            if len(self._open) > _OPEN_COPIES:  # closed copies may be evicted; reopened if needed again
                oldest, _ = self._open.popitem(last=False)
                self._copies.pop(oldest).close()
        return copy

    def read(self, shard: int, start: int, stop: int) -> bytes:
        copy = self._copy(shard)
        if copy is not None:
            data = copy.read(start, stop)
            if copy.in_place:  # a local shard: its bytes are read from storage
                self.bytes_read += len(data)
            return data
        data, read = read_range(self.storage, self.urls[shard], start, stop)
        self.bytes_read += read
        return data

    def close(self) -> None:
        for copy in self._copies.values():
            if copy is not None:
                copy.close()
        self._copies.clear()
        self._open.clear()


class EpochReader:
    """Samples of one source's epoch by raw position, for one worker.

    ``want`` announces positions the worker will ask for soon. With byte offsets (``offsets[shard]``,
    from the manifest), a fetch reads the announced positions contiguous with it in one range request;
    without, the shard is streamed, announced positions are kept when the reader passes them and the
    rest is skipped undecoded (asking for a position behind the reader reopens its shard: correct, only
    slower). ``bytes_read`` counts what was read from storage by range reads. With ``cache`` (the node's
    shard cache), range reads of remote shards come from the node's copies.
    """

    def __init__(self, urls: Sequence[str], plan: EpochPlan, storage: Storage,
                 offsets: ShardOffsets | ListOffsets | Sequence[Sequence[int] | None] | None = None,
                 cache: ShardCache | None = None) -> None:
        self.urls, self.plan, self.storage = urls, plan, storage
        if offsets is None or isinstance(offsets, (list, tuple)):
            offsets = ListOffsets(offsets or [None] * len(urls))
        self.offsets = offsets  # per shard, read when the shard is first needed (ShardOffsets: its own cache)
        self.cursor = 0  # next raw position the open shard would deliver (streaming)
        self._cache: dict[int, dict[str, Any]] = {}
        self._pending: list[int] = []  # sorted announced positions not yet read
        self._pending_set: set[int] = set()
        self._shard: ShardSamples | None = None
        self._shard_j = -1
        self._reported: set[int] = set()
        self._ranges = _Ranges(urls, storage, cache)

    @property
    def bytes_read(self) -> int:
        return self._ranges.bytes_read

    def want(self, raws: Iterable[int]) -> None:
        for r in raws:
            r = int(r)
            if r not in self._cache and r not in self._pending_set:
                bisect.insort(self._pending, r)
                self._pending_set.add(r)

    def _forget(self, raw: int) -> None:
        if raw in self._pending_set:
            self._pending_set.discard(raw)
            del self._pending[bisect.bisect_left(self._pending, raw)]

    def fetch(self, raw: int) -> dict[str, Any]:
        """The sample at ``raw``, or a shard-error marker if its shard is damaged or ends before it."""
        raw = int(raw)
        if raw in self._cache:
            return self._cache.pop(raw)
        j, idx = self.plan.locate(raw)
        if self.offsets.has(int(self.plan.shards[j])):
            return self._fetch_range(raw, j, idx)
        return self._fetch_stream(raw)

    # ---- range reads (manifest with offsets)
    def _fetch_range(self, raw: int, j: int, idx: int) -> dict[str, Any]:
        shard = int(self.plan.shards[j])
        before = self.offsets.bytes_read
        offsets, url = self.offsets.get(shard), self.urls[shard]
        self._ranges.bytes_read += self.offsets.bytes_read - before  # the offsets read count as read bytes
        first = int(self.plan.offsets[j])  # raw position of the shard's sample 0
        n = max(0, len(offsets) - 1)
        if idx >= n:  # the manifest promised more samples than its offsets cover
            return self._missing(j, url, idx, f"the manifest lists {n} offsets for it")
        lo, hi = idx, idx + 1  # merge announced neighbours into one request
        while lo > 0 and first + lo - 1 in self._pending_set and offsets[idx] - offsets[lo - 1] < _MAX_RUN_BYTES:
            lo -= 1
        while hi < n and first + hi in self._pending_set and offsets[hi + 1] - offsets[lo] < _MAX_RUN_BYTES:
            hi += 1
        data = self._ranges.read(shard, offsets[lo], offsets[hi])
        base = offsets[lo]
        for k in range(lo, hi):
            self._forget(first + k)
            start, end = offsets[k] - base, offsets[k + 1] - base
            short = end > len(data)
            sample = None if short else parse_sample(data, url, start, end)
            if sample is None:
                why = "the shard is shorter than its manifest says" if short else OFFSETS_MISMATCH
                sample = self._missing(j, url, k, why)
            if k != idx:
                self._cache[first + k] = sample
            else:
                found = sample
        return found

    def _missing(self, j: int, url: str, idx: int, why: str) -> dict[str, Any]:
        if j not in self._reported:
            self._reported.add(j)
            log.warning("skipping sample %d of shard %s (and any other of its samples like it): %s", idx, url, why)
        return error_marker(url, why, logged=True)

    # ---- streaming (no offsets: compressed shards, old manifests)
    def _fetch_stream(self, raw: int) -> dict[str, Any]:
        if raw < self.cursor:
            self._forget(raw)
            return self._read_at(raw)
        while True:
            i = bisect.bisect_left(self._pending, self.cursor)
            for r in self._pending[:i]:  # announced positions already passed (fetched directly)
                self._pending_set.discard(r)
            del self._pending[:i]
            target = self._pending[0] if self._pending and self._pending[0] < raw else raw
            self._forget(target)
            sample = self._read_at(target)
            if target == raw:
                return sample
            self._cache[target] = sample

    def _read_at(self, raw: int) -> dict[str, Any]:
        j, idx = self.plan.locate(raw)
        url = self.urls[int(self.plan.shards[j])]
        if j != self._shard_j or self._shard is None or self._shard.index > idx:
            if self._shard is not None:
                self._shard.close()
            self._shard, self._shard_j = ShardSamples(url, self.storage), j
        sample = None
        while self._shard.index <= idx:
            sample = self._shard.next()
            if sample is None:
                break
        self.cursor = raw + 1
        if sample is None:
            why = self._shard.error or f"the shard ends after {self._shard.index} samples"
            return self._missing(j, url, idx, why)
        return sample

    def close(self) -> None:
        self._ranges.close()
        if self._shard is not None:
            self._shard.close()
