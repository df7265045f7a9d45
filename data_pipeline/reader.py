"""Raw samples from tar shards: files opened through fsspec, members grouped into samples by key.

Two readers:
- ``raw_samples`` streams whole shards in order (the eval pass, re-sharding). A shard whose content is
  damaged ends early with one marker sample ``{"__key__": SHARD_ERROR_KEY, "__url__": url, "err": ...}``
  after every complete sample before the damage.
- ``EpochReader`` fetches samples of an epoch plan by raw position for the training stream. With the
  per-sample byte offsets of the manifest it reads just the byte ranges of the samples it is asked for
  (contiguous ones in one request), so a worker reads only its own samples; without offsets it streams
  each shard and skips the samples it does not need, undecoded.

Storage failures go through one :class:`RetryBudget` per shard (see storage.py): permanent ones and
a budget run out raise ``StorageError``; content errors end the shard (the same on every rank).
"""
from __future__ import annotations

import bisect
import io
import logging
import re
import tarfile
from typing import Any, Iterable, Iterator, Sequence

from webdataset.tariterators import tar_file_iterator

from data_pipeline.plan import EpochPlan
from data_pipeline.storage import RetryBudget, Storage

log = logging.getLogger(__name__)

SHARD_ERROR_KEY = "__shard_error__"

# Content errors: the bytes are wrong, reading them again gives the same answer.
_CONTENT_ERRORS = (tarfile.TarError, EOFError, UnicodeDecodeError, ValueError)
_MAX_RUN_BYTES = 64 << 20  # one range request reads at most this much (more samples: more requests)

_BLOCK = 512
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as it does
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's split: key = up to the basename's first dot


def _read_exact(f, n: int) -> bytes:
    # Streaming back-ends (HTTP) may return fewer bytes than asked for before the end.
    chunks, left = [], n
    while left > 0:
        chunk = f.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return tarfile.nti(field)
    field = field.replace(b"\0", b" ").strip()
    return int(field, 8) if field else 0


def _fast_tar_members(f) -> Iterator[dict[str, Any]]:
    """Regular members of an uncompressed tar as ``{"fname", "data", "__offset__", "__end__"}``.

    About 10x less Python per member than ``tarfile``'s stream mode (which the profile showed as the
    largest cost after decode and resize); handles ustar prefixes, GNU long names and PAX paths, and
    raises ``tarfile.ReadError`` for truncated archives or damaged headers. ``__offset__``/``__end__``
    are the member's byte range in the archive (its long-name or PAX headers included), for the index.
    """
    long_name, pos, start = None, 0, None
    while True:
        header = _read_exact(f, _BLOCK)
        if not header or header == b"\0" * _BLOCK:
            return  # end of archive (a missing end-of-archive marker is tolerated, as tarfile does)
        if len(header) < _BLOCK:
            raise tarfile.ReadError("unexpected end of data")
        if _number(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
            raise tarfile.ReadError("bad checksum in a tar header")
        size, kind = _number(header[124:136]), header[156:157]
        data = _read_exact(f, size)
        if len(data) < size or len(_read_exact(f, -size % _BLOCK)) < -size % _BLOCK:
            raise tarfile.ReadError("unexpected end of data")
        start = pos if start is None else start
        pos += _BLOCK + size + (-size % _BLOCK)
        if kind == b"L":  # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode("utf-8")
            continue
        if kind == b"x":  # PAX extended header: only the path matters here
            for record in data.decode("utf-8").split("\n"):
                if " path=" in record:
                    long_name = record.split(" path=", 1)[1]
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name, start = None, None  # directories, links, global headers: nothing to read
            continue
        name = header[:100].split(b"\0", 1)[0].decode("utf-8")
        if header[257:263] == b"ustar\x00" and header[345:346] != b"\0":  # POSIX prefix field
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
        fname, long_name, offset, start = long_name or name, None, start, None
        if not _META.match(fname):
            yield {"fname": fname, "data": data, "__offset__": offset, "__end__": pos}


def tar_members(f, url: str) -> Iterator[dict[str, Any]]:
    """Members of the shard at ``url``: the fast reader for plain tars, webdataset's for compressed ones."""
    if url.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        return tar_file_iterator(f)
    return _fast_tar_members(f)


def group_samples(members: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Consecutive members with the same key as one sample ``{"__key__", "__url__", ext: bytes}``, split
    as webdataset splits them; ``__offset__``/``__end__`` give the sample's byte range when known."""
    current: dict[str, Any] | None = None
    for m in members:
        match = _KEY_EXT.match(m["fname"])
        if not match:
            continue
        key, ext = match.group(1), match.group(2).lower()
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": m.get("__url__"), "__offset__": m.get("__offset__")}
        if ext in current:  # webdataset drops the sample's later copy too (after an error it may skip)
            log.warning("%s: duplicate member %s in %s, later copy ignored", current["__url__"], m["fname"], key)
            continue
        current[ext], current["__end__"] = m["data"], m.get("__end__")
    if current is not None:
        yield current


def _error_marker(url: str, why: str, logged: bool = False) -> dict[str, Any]:
    return {"__key__": SHARD_ERROR_KEY, "__url__": url, "err": why.encode(), "__logged__": logged}


class ShardSamples:
    """The samples of one shard in file order, streamed; reopen-and-skip after a transient failure.

    A content error (damaged or truncated tar) ends the shard after the last complete sample before it
    (``error`` says why); storage failures are retried within the budget, then raise ``StorageError``.
    """

    def __init__(self, url: str, storage: Storage, must_exist: bool = False) -> None:
        self.url, self.storage = url, storage
        self.index = 0  # index of the next sample
        self.error: str | None = None  # why the shard ended early (None: not cut short)
        self.ended = False
        # A shard a manifest lists may be missing for a while (a store restoring its objects): retried.
        # One named by a pattern (the indexer's input) that is not there is a wrong pattern: stop at once.
        self.budget = RetryBudget(url, storage, missing_is_permanent=must_exist)
        self._file = None
        self._samples: Iterator[dict[str, Any]] | None = None
        self._exts: set[str] = set()  # member extensions of the last sample

    def _members(self) -> Iterator[dict[str, Any]]:
        try:
            for m in tar_members(self._file, self.url):
                m["__url__"] = self.url
                yield m
        except _CONTENT_ERRORS as exn:
            # Ending cleanly lets the grouping hand out the last sample it holds (complete if the cut
            # fell between samples; a sample missing a member is counted as such by the caller).
            self.error = f"{type(exn).__name__}: {str(exn)[:300]}"

    def _open(self) -> None:
        self._file = self.storage.open(self.url)
        self._samples = group_samples(self._members())
        for _ in range(self.index):  # after a reopen: skip what was already delivered, undecoded
            next(self._samples)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may raise; nothing to save
                pass
        self._file, self._samples = None, None

    def next(self) -> dict[str, Any] | None:
        """The next sample, or None at the end of the shard (see ``error`` for a damaged one)."""
        while not self.ended:
            try:
                if self._samples is None:
                    self._open()
                sample = next(self._samples, None)
            except Exception as exn:  # noqa: BLE001 - storage back-ends raise many types
                self.close()
                self.budget.failed(exn)  # raises StorageError when retrying cannot help
                continue
            self.budget.succeeded()
            if sample is not None and self.error is not None and not self._exts <= sample.keys():
                sample = None  # the sample the cut fell into: fewer members than the one before it
            if sample is None:
                self.ended = True
                self.close()
                return None
            self.index += 1
            self._exts = {k for k in sample if not k.startswith("__")}
            return sample
        return None


def raw_samples(urls: Iterable[str], storage: Storage) -> Iterator[dict[str, Any]]:
    """Samples as dicts ``{"__key__", "__url__", "<ext>": bytes, ...}`` from the given shards, in order."""
    for url in urls:
        shard = ShardSamples(url, storage)
        while (sample := shard.next()) is not None:
            yield sample
        if shard.error:
            yield _error_marker(url, shard.error)


class _Ranges:
    """Range reads of one source's shards, each through its shard's retry budget."""

    def __init__(self, urls: Sequence[str], storage: Storage) -> None:
        self.urls, self.storage = urls, storage
        self.budgets: dict[int, RetryBudget] = {}
        self.bytes_read = 0

    def read(self, shard: int, start: int, stop: int) -> bytes:
        url = self.urls[shard]
        budget = self.budgets.setdefault(shard, RetryBudget(url, self.storage))
        while True:
            try:
                fs, path = self.storage.fs(url)
                data = fs.cat_file(path, start=start, end=stop)
            except Exception as exn:  # noqa: BLE001 - storage back-ends raise many types
                budget.failed(exn)
                continue
            budget.succeeded()
            self.bytes_read += len(data)
            return data


def _parse_one(data: bytes, url: str) -> dict[str, Any] | None:
    """The sample held by one sample's byte range, or None when those bytes are not a whole sample."""
    members = ({**m, "__url__": url} for m in _fast_tar_members(io.BytesIO(data)))
    try:
        samples = list(group_samples(members))
    except _CONTENT_ERRORS:
        return None
    return samples[0] if len(samples) == 1 else None


class EpochReader:
    """Samples of one source's epoch by raw position, for one worker.

    ``want`` announces positions the worker will ask for soon. With byte offsets (``offsets[shard]``,
    from the manifest), a fetch reads the announced positions contiguous with it in one range request;
    without, the shard is streamed, announced positions are kept when the reader passes them and the
    rest is skipped undecoded (asking for a position behind the reader reopens its shard: correct, only
    slower). ``bytes_read`` counts what was read from storage by range reads.
    """

    def __init__(self, urls: Sequence[str], plan: EpochPlan, storage: Storage,
                 offsets: Sequence[Sequence[int] | None] | None = None) -> None:
        self.urls, self.plan, self.storage = urls, plan, storage
        self.offsets = offsets or [None] * len(urls)
        self.cursor = 0  # next raw position the open shard would deliver (streaming)
        self._cache: dict[int, dict[str, Any]] = {}
        self._pending: list[int] = []  # sorted announced positions not yet read
        self._pending_set: set[int] = set()
        self._shard: ShardSamples | None = None
        self._shard_j = -1
        self._reported: set[int] = set()
        self._ranges = _Ranges(urls, storage)

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
        if self.offsets[int(self.plan.shards[j])] is not None:
            return self._fetch_range(raw, j, idx)
        return self._fetch_stream(raw)

    # ---- range reads (manifest with offsets)
    def _fetch_range(self, raw: int, j: int, idx: int) -> dict[str, Any]:
        shard = int(self.plan.shards[j])
        offsets, url = self.offsets[shard], self.urls[shard]
        first = int(self.plan.offsets[j])  # raw position of the shard's sample 0
        n = len(offsets) - 1
        if idx >= n:  # the manifest promised more samples than its offsets cover
            return self._missing(j, url, idx, f"the manifest lists {n} offsets")
        lo, hi = idx, idx + 1  # merge announced neighbours into one request
        while lo > 0 and first + lo - 1 in self._pending_set and offsets[idx] - offsets[lo - 1] < _MAX_RUN_BYTES:
            lo -= 1
        while hi < n and first + hi in self._pending_set and offsets[hi + 1] - offsets[lo] < _MAX_RUN_BYTES:
            hi += 1
        data = self._ranges.read(shard, offsets[lo], offsets[hi])
        base = offsets[lo]
        for k in range(lo, hi):
            self._forget(first + k)
            chunk = data[offsets[k] - base:offsets[k + 1] - base]
            sample = _parse_one(chunk, url) if len(chunk) == offsets[k + 1] - offsets[k] else None
            if sample is None:
                why = "the shard is shorter than its manifest says" if len(chunk) < offsets[k + 1] - offsets[k] \
                    else "the bytes at this sample's offset are not one tar sample"
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
        return _error_marker(url, why, logged=True)

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
        if self._shard is not None:
            self._shard.close()
