"""One run owns its run dir: `<run.dir>/lease.json`, taken at start, kept alive by a heartbeat, released at exit.

The lease names its owner (host, pid, SLURM job id, start time) and the time of its last heartbeat.
A second run on the same run dir stops at start with one line naming that owner. The lease is taken
over, at start, when:

- its heartbeat is older than `run.lease_timeout_s` (the owner died without releasing it; a node
  that lost power, a SIGKILL on another host);
- it names this SLURM job (same SLURM_JOB_ID): a requeued job continues its own run at once; likewise
  this torchrun job (same rendezvous id, when one is given): an elastic restart after a node loss;
- it names a process of this host that no longer exists (kill -9 and start again on a workstation).

Taking and taking over are atomic, so two runs that start together cannot both win:

- local and network file systems: exclusive create (O_EXCL); a stale lease is first renamed aside,
  and only one contender's rename of it succeeds;
- S3: conditional writes. A new lease is a PUT with `If-None-Match: *` (fails with 412 if any lease
  exists); a take-over and each heartbeat are a PUT with `If-Match: <ETag of the lease as read>`, so a
  writer that lost a race, or an owner whose lease was taken over, gets 412 instead of overwriting.
  AWS S3 has had both since 2024; moto's server (the tests' S3) implements both, and s3fs passes them
  (`pipe_file(mode="create")`, extra `IfMatch=`). Chosen over a lock table or a rename (S3 has no
  atomic rename) because it needs nothing beside the bucket.
- other object stores: no conditional write through fsspec here, so check-then-write (a warning says
  so): two runs started in the same second could both start.

Only rank 0 holds the lease; its answer is broadcast so that every rank stops with the same line.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from data_pipeline.storage.claim import create_exclusive, precondition_failed

log = logging.getLogger("pretrain")
LEASE_FILE = "lease.json"


class RunDirBusy(RuntimeError):
    """Another live run owns the run dir; the message names it."""


class RunDirUnusable(RuntimeError):
    """The run dir (or its checkpoint dir) is not a writable directory; the message names the path and why."""


PROBE_PREFIX = ".write-probe-"


def _file_above(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """`path` itself or the nearest of its parents that exists, when that is a file (None otherwise)."""
    while path and path not in ("/", "."):
        if fs.exists(path):
            return path if fs.isfile(path) else None
        parent = path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else ""
        if parent == path:
            return None
        path = parent
    return None


def check_run_dir(run_dir: str) -> None:
    """`run_dir` is a directory (created if missing) where this process can write, and so is its checkpoint
    dir when it exists: each tested by writing and removing a probe file through fsspec (local and object
    storage alike), before anything else is written or generated. RunDirUnusable names the path otherwise
    (a file, a path below a file, a read-only or foreign directory), instead of a traceback at the first save."""
    fs, root = fsspec.core.url_to_fs(run_dir)
    root = root.rstrip("/") or "/"
    url = run_dir if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(root)
    above = _file_above(fs, root)
    if above is not None:
        where = "is a file" if above == root else f"is below the file {above}"
        raise RunDirUnusable(f"run.dir {url} {where}, not a directory; choose another run.dir")
    for path, what in ((root, "run.dir"), (f"{root}/checkpoints", "its checkpoint dir")):
        if path != root and not fs.exists(path):
            continue  # created at the first save, in the run dir just probed
        probe = f"{path}/{PROBE_PREFIX}{secrets.token_hex(4)}"
        try:
            fs.makedirs(path, exist_ok=True)
            fs.pipe_file(probe, b"probe")
            fs.rm_file(probe)
        except Exception as e:  # noqa: BLE001 -- PermissionError, EROFS, a bucket that refuses: each is the answer
            name = url if path == root else f"{url}/checkpoints"
            why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
            raise RunDirUnusable(f"{what} {name} is not writable ({why}); make it writable or choose another "
                                 "run.dir") from None


@dataclass(frozen=True)
class Owner:
    token: str
    host: str
    pid: int
    slurm_job: str
    started: float
    heartbeat: float
    elastic_run: str = ""  # torchrun's --rdzv_id when set by the user (the same across elastic restarts)

    @classmethod
    def me(cls) -> Owner:
        now = time.time()
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
        return cls(secrets.token_hex(8), socket.gethostname(), os.getpid(), os.environ.get("SLURM_JOB_ID", ""),
                   now, now, "" if run_id in ("none", "local") else run_id)  # torchrun's and our default ids

    @classmethod
    def parse(cls, data: bytes) -> Owner | None:
        try:
            d = json.loads(data)
            return cls(str(d["token"]), str(d["host"]), int(d["pid"]), str(d.get("slurm_job", "")),
                       float(d["started"]), float(d["heartbeat"]), str(d.get("elastic_run", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def encode(self) -> bytes:
        return json.dumps(self.__dict__, indent=1).encode()

    def describe(self) -> str:
        who = f"SLURM job {self.slurm_job} (host {self.host}, pid {self.pid})" if self.slurm_job else \
            f"host {self.host}, pid {self.pid}"
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"{who}, started {started}, last heartbeat {max(0.0, time.time() - self.heartbeat):.0f}s ago"


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class _Store:
    """The lease file's atomic operations on one kind of storage. `version` is whatever `replace`
    needs to be sure it replaces what `read` returned."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path

    def read(self) -> tuple[bytes, Any] | None: ...
    def create(self, data: bytes) -> bool: ...  # False: a lease exists
    def replace(self, data: bytes, version: Any) -> tuple[bool, Any]: ...  # False: it changed since read
    def delete(self, version: Any) -> None: ...


class _LocalStore(_Store):
    def read(self) -> tuple[bytes, Any] | None:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                return f.read(), (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> bool:
        return create_exclusive(self.fs, self.path, data)  # a hard link: atomic, fails if the lease exists

    def _same(self, version: Any) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_ino, st.st_mtime_ns) == version

    def replace(self, data: bytes, version: Any) -> tuple[bool, Any]:
        if not self._same(version):
            return False, None
        tmp = f"{self.path}.{secrets.token_hex(4)}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path)
        st = os.stat(self.path)
        return True, (st.st_ino, st.st_mtime_ns)

    def take_over(self, data: bytes, version: Any) -> bool:
        """Rename the stale lease aside (only one contender's rename of it succeeds), then create."""
        if not self._same(version):
            return False
        aside = f"{self.path}.{secrets.token_hex(4)}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        os.unlink(aside)
        return self.create(data)

    def delete(self, version: Any) -> None:
        if self._same(version):
            os.unlink(self.path)


class _S3Store(_Store):
    _precondition_failed = staticmethod(precondition_failed)  # a 412: the If-None-Match / If-Match did not hold

    def read(self) -> tuple[bytes, Any] | None:
        try:
            info = self.fs.info(self.path, refresh=True)
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, info.get("ETag")

    def _etag(self) -> Any:
        return self.fs.info(self.path, refresh=True).get("ETag")

    def create(self, data: bytes) -> bool:
        return create_exclusive(self.fs, self.path, data)  # a PUT with If-None-Match: *

    def replace(self, data: bytes, version: Any) -> tuple[bool, Any]:
        try:
            out = self.fs.pipe_file(self.path, data, IfMatch=version)
        except Exception as e:  # noqa: BLE001
            if self._precondition_failed(e) or isinstance(e, FileNotFoundError):
                return False, None
            raise
        etag = out.get("ETag") if isinstance(out, dict) else None
        return True, etag or self._etag()

    def take_over(self, data: bytes, version: Any) -> bool:
        return self.replace(data, version)[0]

    def delete(self, version: Any) -> None:
        current = self.read()
        if current is not None and current[1] == version:
            self.fs.rm_file(self.path)


class _BestEffortStore(_LocalStore):
    """Object stores without a conditional write through fsspec: check, then write."""

    def read(self) -> tuple[bytes, Any] | None:
        try:
            return self.fs.cat_file(self.path), None
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> bool:
        return create_exclusive(self.fs, self.path, data)  # check, then write

    def replace(self, data: bytes, version: Any) -> tuple[bool, Any]:
        self.fs.pipe_file(self.path, data)
        return True, None

    def take_over(self, data: bytes, version: Any) -> bool:
        return self.replace(data, version)[0]

    def delete(self, version: Any) -> None:
        self.fs.rm_file(self.path)


def _store_for(run_dir: str) -> _Store:
    fs, root = fsspec.core.url_to_fs(run_dir)
    fs.makedirs(root, exist_ok=True)
    path = f"{root.rstrip('/')}/{LEASE_FILE}"
    if isinstance(fs, LocalFileSystem):
        return _LocalStore(fs, path)
    if "s3" in fs.protocol or "s3a" in fs.protocol:
        return _S3Store(fs, path)
    log.warning("%s: no conditional write on this storage; the run-dir lease is check-then-write (two runs "
                "started at the same moment could both start)", run_dir)
    return _BestEffortStore(fs, path)


class RunLease:
    """The lease of one run dir, held by this process from `acquire` to `release`, kept alive by a
    heartbeat thread every `timeout_s / 4`."""

    def __init__(self, run_dir: str, timeout_s: float) -> None:
        self.run_dir, self.timeout_s = run_dir, timeout_s
        self.store = _store_for(run_dir)
        self.owner = Owner.me()
        self.lost: str | None = None  # set when another run took the lease over (we were thought dead)
        self._version: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _takeover_reason(self, other: Owner | None) -> str | None:
        if other is None:
            return "its lease file is unreadable"
        if other.token == self.owner.token:
            return "it is ours"
        if self.owner.slurm_job and other.slurm_job == self.owner.slurm_job:
            return f"SLURM job {other.slurm_job} was requeued"
        if self.owner.elastic_run and other.elastic_run == self.owner.elastic_run:
            return f"torchrun job {other.elastic_run} restarted its ranks"
        if other.host == self.owner.host and (other.pid == self.owner.pid or _pid_gone(other.pid)):
            return f"its owner (pid {other.pid} on this host) is gone"
        if time.time() - other.heartbeat > self.timeout_s:
            return f"its heartbeat lapsed {time.time() - other.heartbeat:.0f}s ago (run.lease_timeout_s=" \
                   f"{self.timeout_s:g})"
        return None

    def acquire(self) -> None:
        """Take the lease, or raise RunDirBusy naming the live owner."""
        for _ in range(5):  # each pass loses only to a rival that changed the lease meanwhile
            self.owner = Owner(**{**self.owner.__dict__, "heartbeat": time.time()})
            if self.store.create(self.owner.encode()):
                break
            current = self.store.read()
            if current is None:
                continue  # released meanwhile
            data, version = current
            other = Owner.parse(data)
            why = self._takeover_reason(other)
            if why is None:
                raise RunDirBusy(f"run.dir {self.run_dir} is in use by another run: {other.describe()}; stop "
                                 "that run or choose another run.dir (a lease whose heartbeat is older than "
                                 f"run.lease_timeout_s={self.timeout_s:g} is taken over)")
            if self.store.take_over(self.owner.encode(), version):
                log.warning("run.dir %s: taking over the lease of %s: %s", self.run_dir,
                            other.describe() if other else "an unknown run", why)
                break
        else:
            raise RunDirBusy(f"run.dir {self.run_dir}: could not take its lease (another run keeps changing it)")
        current = self.store.read()
        self._version = current[1] if current else None
        self._thread = threading.Thread(target=self._beat, name="run-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            try:
                self.heartbeat()
            except Exception as e:  # noqa: BLE001 -- a missed beat is not fatal; a lapsed lease is
                log.warning("run.dir %s: lease heartbeat failed (%s: %s); retrying", self.run_dir,
                            type(e).__name__, e)

    def heartbeat(self) -> None:
        if self.lost:
            return
        self.owner = Owner(**{**self.owner.__dict__, "heartbeat": time.time()})
        ok, version = self.store.replace(self.owner.encode(), self._version)
        if ok:
            self._version = version
            return
        current = self.store.read()
        other = Owner.parse(current[0]) if current else None
        if other is not None and other.token == self.owner.token:  # ours after all (a version we did not see)
            self._version = current[1]
            return
        self.lost = (f"run.dir {self.run_dir}: this run's lease was taken over by "
                     f"{other.describe() if other else 'another run'}; stopping so that two runs do not write "
                     "one run dir")
        log.error("%s", self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.lost or self._version is None and not isinstance(self.store, _BestEffortStore):
            return
        try:
            self.store.delete(self._version)
        except Exception as e:  # noqa: BLE001 -- the next run takes a stale lease over anyway
            log.warning("run.dir %s: lease not released (%s); the next run takes it over once it lapses",
                        self.run_dir, e)
        self._version = None
