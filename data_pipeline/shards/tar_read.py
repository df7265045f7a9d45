"""Reading the shard format: tar members grouped into samples by key, as webdataset groups them.

- ``raw_samples`` streams whole shards in order (the eval pass, re-sharding, the indexer). A shard whose
  content is damaged ends early with one marker sample ``{"__key__": SHARD_ERROR_KEY, "__url__": url, "err": ...}``
  after every complete sample before the damage.
- ``ShardSamples`` is one shard streamed, reopened and skipped forward after a transient failure.
- ``parse_sample`` reads the sample held by one sample's byte range (the manifest's offsets).

Storage failures go through one :class:`RetryBudget` per shard (see data_pipeline.storage); permanent ones
and a budget run out raise ``StorageError``; content errors end the shard (the same on every rank).
"""
from __future__ import annotations

import logging
import re
import tarfile
from typing import Any, Iterable, Iterator
from zlib import adler32

from webdataset.tariterators import tar_file_iterator

from data_pipeline.storage import RetryBudget, Storage

log = logging.getLogger(__name__)

SHARD_ERROR_KEY = "__shard_error__"

# Content errors: the bytes are wrong, reading them again gives the same answer.
CONTENT_ERRORS = (tarfile.TarError, EOFError, UnicodeDecodeError, ValueError)

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


_warned_names = [0]  # member names not UTF-8 reported so far (the first few are named; a shard may hold millions)


def _name(raw: bytes) -> str:
    """A member name as text. Names that are not UTF-8 are read with the odd bytes escaped (``caf\\xe9``, one
    warning each for the first ten): the key names the sample, it needs no meaning, and refusing it would
    end the shard there."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        name = raw.decode("utf-8", errors="backslashreplace")
        if _warned_names[0] < 10:
            _warned_names[0] += 1
            log.warning("tar member name %r is not UTF-8: read as %s (its sample is kept)", raw[:120], name[:120])
        return name


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return tarfile.nti(field)
    field = field.replace(b"\0", b" ").strip()
    return int(field, 8) if field else 0


def _header_sum(header: bytes) -> int:
    """The tar checksum of ``header`` (its bytes summed, the checksum field counted as spaces). Adler-32's low
    half is 1 + the sum of its bytes while that sum stays below 65521 (257 bytes): three C calls instead of
    summing 512 bytes in Python, which was most of the parsing time of a range read."""
    return (adler32(header[:148]) & 0xFFFF) + (adler32(header[156:356]) & 0xFFFF) + (adler32(header[356:]) & 0xFFFF) \
        - 3 + 256


class _BufferReader:
    """``read(n)`` over ``data[start:end]`` without copying the range first (one sample of a run read at once)."""

    def __init__(self, data: bytes, start: int, end: int) -> None:
        self.data, self.pos, self.end = data, start, end

    def read(self, n: int) -> bytes:
        n = max(0, min(n, self.end - self.pos))
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


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
        if _number(header[148:156]) != _header_sum(header):
            raise tarfile.ReadError("bad checksum in a tar header")
        size, kind = _number(header[124:136]), header[156:157]
        data = _read_exact(f, size)
        if len(data) < size or len(_read_exact(f, -size % _BLOCK)) < -size % _BLOCK:
            raise tarfile.ReadError("unexpected end of data")
        start = pos if start is None else start
        pos += _BLOCK + size + (-size % _BLOCK)
        if kind == b"L":  # GNU long name for the next member
            long_name = _name(data.rstrip(b"\0"))
            continue
        if kind == b"x":  # PAX extended header: only the path matters here
            for record in _name(data).split("\n"):
                if " path=" in record:
                    long_name = record.split(" path=", 1)[1]
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name, start = None, None  # directories, links, global headers: nothing to read
            continue
        name = _name(header[:100].split(b"\0", 1)[0])
        if header[257:263] == b"ustar\x00" and header[345:346] != b"\0":  # POSIX prefix field
            name = _name(header[345:500].split(b"\0", 1)[0]) + "/" + name
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


def members_note(sample: dict[str, Any]) -> str:
    """``members: jpg, json`` for a sample, plus the reason when a dotted key was split (``a.b.c.jpg``
    is key ``a`` with member ``b.c.jpg``, as webdataset reads it)."""
    exts = sorted(k for k in sample if not k.startswith("__"))
    note = f"members: {', '.join(exts) or 'none'}"
    if any("." in e for e in exts):
        note += ("; a key with a dot was split at its first dot, as webdataset splits it: rewrite the shards "
                 "with keys without dots")
    return note


def error_marker(url: str, why: str, logged: bool = False) -> dict[str, Any]:
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
        except CONTENT_ERRORS as exn:
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
            yield error_marker(url, shard.error)


def parse_sample(data: bytes, url: str, start: int = 0, end: int | None = None) -> dict[str, Any] | None:
    """The sample held by one sample's byte range, ``data[start:end]``, or None when those bytes are not a
    whole sample. A range read of several samples is parsed in place, sample by sample, without copying
    each one's range out first."""
    reader = _BufferReader(data, start, len(data) if end is None else min(end, len(data)))
    members = ({**m, "__url__": url} for m in _fast_tar_members(reader))
    try:
        samples = list(group_samples(members))
    except CONTENT_ERRORS:
        return None
    return samples[0] if len(samples) == 1 else None
