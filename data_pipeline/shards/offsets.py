"""Per-sample byte offsets, read by the DataLoader worker that reads a shard, when it starts that shard.

A manifest's offsets file holds every shard's ``num_samples + 1`` offsets (each sample's first byte in
the tar, then the end of the last sample) as little-endian int64, shard after shard; the shard table's
``offsets_at`` says where a shard's run starts. ``ShardOffsets.get`` range-reads one shard's run (80 KB
for 10,000 samples) and keeps the last few shards' runs in a small cache bounded in bytes, so a worker
holds offsets for the shards it is reading, never for the data set. Nothing is read on the rank itself.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

from data_pipeline.shards.table import ShardTable
from data_pipeline.storage import Storage, StorageError, read_range

OFFSET_DTYPE = np.dtype("<i8")
CACHE_BYTES = 8 << 20  # per worker and source: ~100 shards of 10,000 samples, more than one shuffle window


class ShardOffsets:
    """The offsets of the shards of one or more manifests (``tables[t]`` with its offsets source
    ``sources[t]``: the offsets file URL, an in-memory int64 array (format 1 manifests), or None)."""

    def __init__(self, tables: Sequence[ShardTable], sources: Sequence[str | np.ndarray | None],
                 storage: Storage | None, cache_bytes: int = CACHE_BYTES) -> None:
        self.tables, self.sources, self.storage = list(tables), list(sources), storage
        self.starts = np.cumsum([0] + [len(t) for t in self.tables], dtype=np.int64)
        self.cache_bytes = cache_bytes
        self.bytes_read = 0  # bytes read from offsets files by this process
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached = 0

    def __getstate__(self) -> dict:
        # A spawned worker starts with an empty cache and its own counter.
        return dict(self.__dict__, _cache=OrderedDict(), _cached=0, bytes_read=0)

    def has(self, shard: int) -> bool:
        t, k = self._locate(shard)
        return self.sources[t] is not None and int(self.tables[t].offsets_at[k]) >= 0

    def _locate(self, shard: int) -> tuple[int, int]:
        t = int(np.searchsorted(self.starts, shard, side="right")) - 1
        return t, int(shard - self.starts[t])

    def get(self, shard: int) -> np.ndarray | None:
        """Shard ``shard``'s ``num_samples + 1`` offsets (int64), or None when it has none (streamed)."""
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        t, k = self._locate(shard)
        source, at = self.sources[t], int(self.tables[t].offsets_at[k])
        if source is None or at < 0:
            return None
        n = int(self.tables[t].counts[k]) + 1
        if isinstance(source, np.ndarray):
            return source[at:at + n]  # a view: format 1 offsets live in one array already
        run = self._read(source, at * OFFSET_DTYPE.itemsize, (at + n) * OFFSET_DTYPE.itemsize, self.tables[t].url(k))
        whole = len(run) - len(run) % OFFSET_DTYPE.itemsize  # a file cut inside an entry: that entry is missing
        offsets = np.frombuffer(run[:whole], dtype=OFFSET_DTYPE).astype(np.int64)
        why = _damage(offsets, n)
        if why is not None:  # the same bytes on every read: no retry heals it, a rebuild does
            raise StorageError(f"{source}: the offsets of shard {self.tables[t].url(k)} {why}: the offsets file is "
                               f"damaged or from another write; rebuild the manifest beside it with "
                               f"python -m data_pipeline.index '<shards>' --out <manifest.json>")
        self._cache[shard] = offsets
        self._cached += offsets.nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            self._cached -= self._cache.popitem(last=False)[1].nbytes
        return offsets

    def _read(self, url: str, start: int, stop: int, shard_url: str) -> bytes:
        assert self.storage is not None
        # Reading a shard's offsets is part of reading the shard: a failure names the shard (the error
        # it quotes names the offsets file), and a missing offsets file is retried like a missing shard.
        data, read = read_range(self.storage, url, start, stop, budget_url=shard_url,
                                what="reading the offsets of")
        self.bytes_read += read
        return data


def _damage(offsets: np.ndarray, n: int) -> str | None:
    """What is wrong with one shard's run of ``n`` offsets read from an offsets file (None: nothing): too few
    entries (a truncated file), or values that cannot be byte positions of samples: negative, or closer than
    one 512-byte tar header. (Plausible positions that miss the samples, e.g. shifted ones, are found by
    the reader: no sample where one should start, a counted skip.)"""
    if len(offsets) != n:
        return f"are cut short ({len(offsets)} of {n} entries)"
    if offsets[0] < 0 or (n > 1 and int(np.diff(offsets).min()) < 512):
        return "are not increasing byte positions (512 bytes apart at least)"
    return None


class ListOffsets:
    """Offsets given as a list per shard (arrays or None): tests and callers that hold them already."""

    def __init__(self, offsets: Sequence[Sequence[int] | None]) -> None:
        self.offsets = [None if o is None else np.asarray(o, dtype=np.int64) for o in offsets]
        self.bytes_read = 0

    def has(self, shard: int) -> bool:
        return self.offsets[shard] is not None

    def get(self, shard: int) -> np.ndarray | None:
        return self.offsets[shard]
