"""The node-local shard cache (``data.cache``): remote shards written once per node to a local disk.

Every process of a node (its ranks and their DataLoader workers) shares one cache directory and
coordinates through the file system only, with no collective:

- A shard is fetched by whichever process first creates its lock file (``O_EXCL``); the others wait for
  it (the owner touches the lock while it writes; a lock left by a dead process goes stale and is taken
  over). The copy is written under a temporary name and renamed into place when complete, so no reader
  ever sees half a shard.
- A finished copy is marked by setting its modification time to a fixed stamp: a copy changed in place
  afterwards (any write moves the mtime) or of another size than the manifest says is fetched again.
  With a sha256 in the manifest, the download is checked against it before it is renamed into place.
- A reader holds ``flock(LOCK_SH)`` on the copy while it reads it; eviction takes ``LOCK_EX | LOCK_NB``
  and skips a busy copy, so a shard being read is never removed. Each use sets the copy's access time.
- Eviction is least-recently-used within ``max_bytes``, among copies not used since ``protect_since``
  (the training workers set it to the start of the previous epoch): a data set larger than the cache keeps
  a stable part of itself cached instead of thrashing, where plain LRU over a shuffled pass would evict
  each shard just before its next use. A shard that does not fit is read remotely, as without a cache.
- A full or unwritable cache disk is one warning per node; the run goes on reading from storage.

Local shards (plain paths, ``file://``) are never copied.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import math
import os
import socket
import time
from typing import TYPE_CHECKING

from data_pipeline.storage.retry import is_local, read_range

if TYPE_CHECKING:
    from data_pipeline.storage.handle import Storage

log = logging.getLogger(__name__)

_STAMP_NS = 1_000_000_000 * 10**9  # the mtime of a complete, checked copy (2001-09-09): any write moves it
_CHUNK = 16 << 20  # one range request of a download
_STALE_S = 60.0  # a lock not touched for this long belongs to a dead process
_POLL_S = 0.05
_FULL_MARK = "cache-disk-full"  # created (O_EXCL) by the process that warns, so a node warns once
_STARTED = time.time()  # when this run's process (the rank; its forked workers inherit it) imported this


class CachedShard:
    """An open, share-locked local copy of a shard: ``read(start, stop)`` is one ``pread``. ``in_place``: a
    local shard opened where it is (not a copy, not locked)."""

    def __init__(self, fd: int, path: str, in_place: bool = False) -> None:
        self.fd, self.path, self.in_place = fd, path, in_place

    def read(self, start: int, stop: int) -> bytes:
        return os.pread(self.fd, stop - start, start)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the LOCK_SH
            self.fd = -1


class ShardCache:
    """A node-local cache of remote shards in ``dir``, at most ``max_bytes`` (plus downloads in flight).

    Picklable: DataLoader workers receive a copy; ``protect_since`` and the disk-full state are per process.
    """

    def __init__(self, dir: str, max_bytes: int) -> None:
        self.dir, self.max_bytes = os.path.abspath(dir), int(max_bytes)
        self.protect_since = math.inf  # copies last used at or after this (time.time()) are not evicted
        self.unusable: str | None = None  # why this process stopped writing new copies (full disk)
        self.evicted = 0  # copies this process removed

    def __getstate__(self) -> dict:
        return {"dir": self.dir, "max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["dir"], state["max_bytes"])

    def path(self, url: str, sha256: str = "") -> str:
        """Where the copy of ``url`` lives; a rewritten shard (another sha256) gets another name."""
        digest = hashlib.sha256(f"{url}\0{sha256}".encode()).hexdigest()[:32]
        return os.path.join(self.dir, f"{digest}.shard")

    def open(self, url: str, size: int, storage: Storage, sha256: str = "") -> tuple[CachedShard | None, int]:
        """The node's copy of ``url`` (fetched now if the node has none), and the bytes read from storage.

        None: read ``url`` remotely instead (a local shard, a size the manifest does not give, a shard that
        does not fit, a full disk, a download that did not match the manifest).
        """
        if is_local(url) or size < 0:
            return None, 0
        path = self.path(url, sha256)
        read = 0
        for _ in range(3):  # a copy evicted or found damaged between the steps: look again
            copy = self._open_copy(path, size, url)
            if copy is not None:
                return copy, read
            if self.unusable is not None or size > self.max_bytes:
                return None, read
            fetched = self._fetch(url, size, storage, sha256, path)
            if fetched is None:
                return None, read
            read += fetched
        return None, read

    # ---- reading a copy
    def _open_copy(self, path: str, size: int, url: str) -> CachedShard | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        st = os.fstat(fd)
        if st.st_nlink == 0:  # evicted between the open and the lock
            os.close(fd)
            return None
        if st.st_size == size and st.st_mtime_ns == _STAMP_NS:
            try:
                os.utime(fd, ns=(time.time_ns(), _STAMP_NS))  # the LRU clock: last use
            except OSError:
                pass  # a copy another user owns: still readable
            return CachedShard(fd, path)
        os.close(fd)
        why = f"{st.st_size} bytes, the manifest says {size}" if st.st_size != size else "changed after it was written"
        if self._remove(path):
            log.warning("cached copy of %s is damaged (%s): fetching it again", url, why)
        return None

    def _remove(self, path: str) -> bool:
        """Remove a copy unless a reader holds it; True if removed."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            if os.fstat(fd).st_nlink:
                os.unlink(path)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)

    # ---- fetching a copy, once per node
    def _fetch(self, url: str, size: int, storage: Storage, sha256: str, path: str) -> int | None:
        """Download ``url`` to ``path`` if this process gets its lock, else wait for the process that has it.
        The bytes read from storage (0 after waiting), or None: read remotely."""
        lock = path + ".lock"
        try:
            os.makedirs(self.dir, exist_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return self._wait(lock, path)
        except OSError as exn:
            self._disable(exn)
            return None
        os.close(fd)
        try:
            if not self._make_room(size):
                return None
            return self._download(url, size, storage, sha256, path, lock)
        finally:
            try:
                os.unlink(lock)
            except FileNotFoundError:
                pass

    def _wait(self, lock: str, path: str) -> int | None:
        while True:
            if os.path.exists(path):
                return 0
            try:
                touched = os.stat(lock).st_mtime
            except FileNotFoundError:  # the owner finished (or gave up): look at the copy again
                return 0 if os.path.exists(path) else None
            if time.time() - touched > _STALE_S:  # its owner died: take the lock over (rename is atomic)
                stale = f"{lock}.stale.{socket.gethostname()}.{os.getpid()}"
                try:
                    os.rename(lock, stale)
                    os.unlink(stale)
                except FileNotFoundError:
                    pass
                return 0
            time.sleep(_POLL_S)

    def _download(self, url: str, size: int, storage: Storage, sha256: str, path: str, lock: str) -> int | None:
        tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"
        read, hasher = 0, hashlib.sha256() if sha256 else None
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError as exn:
            self._disable(exn)
            return None
        try:
            try:
                os.posix_fallocate(fd, 0, size)  # claims the space now: a full disk fails here, not mid-way
            except OSError as exn:
                if exn.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            at = 0
            while at < size:
                data, n = read_range(storage, url, at, min(size, at + _CHUNK))
                read += n
                if not data:
                    break
                os.pwrite(fd, data, at)
                if hasher is not None:
                    hasher.update(data)
                at += len(data)
                os.utime(lock)  # still alive: waiters keep waiting
            why = (f"the shard has {at} bytes, the manifest says {size}" if at != size else
                   "its sha256 is not the manifest's" if hasher is not None and hasher.hexdigest() != sha256 else "")
            if why:
                log.warning("not caching %s: %s", url, why)
                return None
            os.utime(fd, ns=(time.time_ns(), _STAMP_NS))
            os.rename(tmp, path)
            tmp = ""
            self._clear_full_mark()
            return read
        except OSError as exn:
            self._disable(exn)
            return None
        finally:
            os.close(fd)
            if tmp:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass

    def _make_room(self, size: int) -> bool:
        """Evict least-recently-used copies (not busy, not used since ``protect_since``) until ``size`` fits."""
        copies, total = [], 0
        with os.scandir(self.dir) as entries:
            for e in entries:
                if ".lock" in e.name:
                    continue
                try:
                    st = e.stat()
                    if ".tmp." in e.name and time.time() - st.st_mtime > _STALE_S:
                        os.unlink(e.path)  # the download of a process that died: written to no more
                        continue
                except FileNotFoundError:
                    continue
                total += st.st_size  # copies and downloads in flight
                if e.name.endswith(".shard"):
                    copies.append((st.st_atime, e.path, st.st_size))
        for atime, path, n in sorted(copies):
            if total + size <= self.max_bytes or atime >= self.protect_since:
                break
            if self._remove(path):
                total -= n
                self.evicted += 1
        return total + size <= self.max_bytes

    # ---- a full disk
    def _disable(self, exn: OSError) -> None:
        self.unusable = f"{type(exn).__name__}: {exn}"
        mark = os.path.join(self.dir, _FULL_MARK)
        try:
            os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            try:
                if os.stat(mark).st_mtime >= _STARTED:
                    return  # another process of this node warned already in this run
                os.utime(mark)  # a mark left by an earlier run: this run warns once too
            except OSError:
                pass
        except OSError:
            pass
        log.warning("the shard cache %s cannot take more shards (%s): reading from storage instead; free space "
                    "or lower data.cache.max_bytes", self.dir, self.unusable)

    def _clear_full_mark(self) -> None:
        try:
            os.unlink(os.path.join(self.dir, _FULL_MARK))
        except FileNotFoundError:
            pass
