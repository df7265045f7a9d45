"""The one retry layer of data reads: :class:`RetryBudget`, and which storage errors are permanent.

The readers call ``Storage.open`` once per attempt and hand every failure to their budget, which either
waits (exponential back-off) or stops the run with one line naming the URL. Errors fall in three kinds:

- permanent (no credentials, access denied, unknown scheme, bad endpoint, missing bucket): retrying
  cannot help, so the first one raises :class:`StorageError` at once;
- content (a damaged tar): the reader skips the rest of that shard, the same way on every rank;
- anything else is transient (connection refused, resets, timeouts, 5xx, throttling, and a missing object
  that the manifest says exists: a store restoring its objects answers NoSuchKey for a while): retried until
  ``give_up_after_s`` have passed since the last success, then :class:`StorageError`. A missing *local*
  file (a plain path or ``file://``) is permanent: no local disk restores its files by waiting; so are
  the local errors a wait cannot heal (EINVAL from an offset out of range, ENOTDIR, EACCES, EROFS, ...),
  and a MemoryError anywhere (a read sized by a damaged index asks the same impossible amount each time).

Two process-wide switches, set by the process that owns the reads (the trainer, the evaluation runner):

- ``interrupt_retries_when(check)``: a back-off wait ends with :class:`RetryInterrupted` as soon as
  ``check()`` names a reason (a preemption signal), instead of sleeping on through the budget;
- ``one_budget_per_store()``: within it, a store that was given up on once fails every later read at
  once (one budget for one dead store, not one per evaluator reading from it).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import socket
import time
from typing import Callable, Iterator

from fsspec.core import split_protocol

from data_pipeline.errors import DataSpecError
from data_pipeline.storage.handle import Storage

log = logging.getLogger(__name__)


class StorageError(DataSpecError):
    """Shard storage cannot be read (permanently, or not within the retry budget); the message names the URL."""


# S3 error codes that no amount of waiting fixes (the rest, e.g. SlowDown, 5xx, NoSuchKey, are retried).
_PERMANENT_CODES = {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "AllAccessDisabled", "InvalidBucketName", "AuthorizationHeaderMalformed", "InvalidToken",
                    "ExpiredToken", "AccountProblem"}
# botocore exception class names for missing / unusable credentials and malformed endpoints.
_PERMANENT_NAMES = {"NoCredentialsError", "PartialCredentialsError", "ProfileNotFound", "NoRegionError",
                    "InvalidEndpointError", "UnknownCredentialError", "CredentialRetrievalError"}

# OSError numbers that a local file system gives the same way on every attempt: what went wrong is the
# path, the permissions or the arguments (an offset out of range from a damaged index), not an outage.
_LOCAL_PERMANENT_ERRNOS = {
    errno.EINVAL: "invalid argument: an offset or length out of range, e.g. from a damaged index",
    errno.ENOTDIR: "a path component is not a directory", errno.EISDIR: "a directory, not a file",
    errno.EACCES: "access denied", errno.EPERM: "operation not permitted", errno.EROFS: "read-only file system",
    errno.ENAMETOOLONG: "file name too long", errno.ELOOP: "too many symbolic links",
    errno.EFBIG: "offset beyond the largest file size", errno.EOVERFLOW: "offset or size too large"}


class RetryInterrupted(BaseException):
    """A back-off wait cut short because the process was asked to stop (a preemption signal). A
    BaseException, like KeyboardInterrupt: the per-sample and per-evaluator ``except Exception`` handlers
    let it through to the one place that stops the run."""


_stop_check: Callable[[], str | None] | None = None
_dead_stores: dict[str, str] | None = None  # store -> the error it was given up with (inside one_budget_per_store)
_SLICE_S = 0.2  # how often a back-off wait looks at the stop check


def interrupt_retries_when(check: Callable[[], str | None] | None) -> None:
    """Back-off waits of this process end with RetryInterrupted once ``check()`` returns a reason (None: never)."""
    global _stop_check
    _stop_check = check


@contextlib.contextmanager
def one_budget_per_store() -> Iterator[None]:
    """Inside: once a store (scheme and bucket/host) is given up on, later reads from it fail at once."""
    global _dead_stores
    outer, _dead_stores = _dead_stores, {}
    try:
        yield
    finally:
        _dead_stores = outer


def store_of(url: str) -> str:
    """The store a URL lives in: ``s3://bucket``, ``http://host:port``; local paths are one store, ``file``."""
    protocol, path = split_protocol(url)
    if protocol in (None, "file", "local"):
        return "file"
    return f"{protocol}://{path.split('/', 1)[0]}"


def is_local(url: str) -> bool:
    return store_of(url) == "file"


def _chain(exn: BaseException):
    seen: set[int] = set()
    while exn is not None and id(exn) not in seen:
        seen.add(id(exn))
        yield exn
        exn = exn.__cause__ or exn.__context__


def is_outage(exn: BaseException) -> bool:
    """True when a connection failure is somewhere in the chain (fsspec's HTTP reports one as a missing file)."""
    return any(isinstance(e, (ConnectionError, TimeoutError)) or "Connect" in type(e).__name__ for e in _chain(exn))


def permanent_reason(exn: BaseException, local: bool = False) -> str | None:
    """Why retrying ``exn`` cannot help (configuration, authorisation, or with ``local`` a local file system's
    answer that a wait does not change), or None if it may be transient."""
    if any(isinstance(e, socket.gaierror) or "DNS" in type(e).__name__ for e in _chain(exn)):
        return "the endpoint's host name does not resolve"  # a typo in the endpoint, not an outage
    if is_outage(exn):
        return None  # an outage, whatever it was reported as
    for e in _chain(exn):
        if isinstance(e, MemoryError):
            return "the read is larger than this process can hold: a damaged index (sample count or offsets)?"
        if local and isinstance(e, OSError) and e.errno in _LOCAL_PERMANENT_ERRNOS:
            return _LOCAL_PERMANENT_ERRNOS[e.errno]
        response = getattr(e, "response", None)
        code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
        if code in _PERMANENT_CODES:
            return code
        if type(e).__name__ in _PERMANENT_NAMES:
            return type(e).__name__
        if isinstance(e, PermissionError):
            return "access denied"
        if isinstance(e, ImportError):
            return "the fsspec back-end for this scheme is not installed"
        if isinstance(e, ValueError) and ("Protocol not known" in str(e) or "endpoint" in str(e).lower()):
            return "unknown URL scheme" if "Protocol" in str(e) else "bad endpoint"
        if isinstance(e, (IsADirectoryError, NotADirectoryError)):
            return "not a file"
    return None


def _brief(exn: BaseException) -> str:
    return f"{type(exn).__name__}: {' '.join(str(exn).split())[:200]}"


class RetryBudget:
    """The retry policy of one URL: back-off between attempts, a total time budget since the last success.

    ``failed`` either sleeps and returns (try again) or raises :class:`StorageError`; ``succeeded``
    resets the budget, so a long run survives any number of short outages.
    """

    def __init__(self, url: str, storage: Storage, missing_is_permanent: bool = False) -> None:
        self.url, self.storage, self.missing_is_permanent = url, storage, missing_is_permanent
        self.attempts = 0
        self._since: float | None = None  # monotonic time of the first failure since the last success

    def succeeded(self) -> None:
        self.attempts, self._since = 0, None

    def failed(self, exn: BaseException, what: str = "reading") -> None:
        reason = permanent_reason(exn, local=is_local(self.url))
        missing = isinstance(exn, FileNotFoundError) and not is_outage(exn)
        if reason is None and missing and (self.missing_is_permanent or is_local(self.url)):
            reason = "not found"
        if reason is not None:
            raise StorageError(f"cannot read {self.url} ({reason}): {_brief(exn)}") from None
        store = store_of(self.url)
        if _dead_stores is not None and store in _dead_stores:
            raise StorageError(f"not retried: {store} was given up on already ({_dead_stores[store]})") from None
        now = time.monotonic()
        self._since = now if self._since is None else self._since
        waited = now - self._since
        budget = self.storage.give_up_after_s
        if waited >= budget:
            error = (f"gave up on {self.url} after {waited:.0f}s of failures "
                     f"(data.storage.give_up_after_s={budget:g}): {_brief(exn)}")
            if _dead_stores is not None:
                _dead_stores[store] = error
            raise StorageError(error) from None
        delay = min(self.storage.wait(self.attempts), budget - waited)
        self.attempts += 1
        log.warning("%s %s failed (%s); retry %d in %.1fs (giving up %.0fs after the first failure)", what,
                    self.url, _brief(exn), self.attempts, delay, budget)
        self._sleep(delay)

    def _sleep(self, delay: float) -> None:
        """The back-off wait, in slices: a stop request (see interrupt_retries_when) ends it at once."""
        end = time.monotonic() + delay
        while (left := end - time.monotonic()) > 0:
            why = _stop_check() if _stop_check is not None else None
            if why:
                raise RetryInterrupted(f"{why} while retrying {self.url}")
            time.sleep(min(_SLICE_S, left))


def read_range(storage: Storage, url: str, start: int, stop: int, *, budget_url: str | None = None,
               what: str = "reading") -> tuple[bytes, int]:
    """Bytes ``[start, stop)`` of ``url`` through a fresh :class:`RetryBudget`, and the bytes read from storage.

    The budget names ``budget_url`` (default ``url``): reading a shard's offsets is part of reading the shard.
    A budget is reset by every success, so a fresh one per read keeps a worker's memory from growing with the
    shards it visits. A server without range requests (Python's http.server) sends the whole object: it is
    sliced here and counted whole.
    """
    budget = RetryBudget(budget_url or url, storage)
    while True:
        try:
            fs, path = storage.fs(url)
            data = fs.cat_file(path, start=start, end=stop)
        except Exception as exn:  # noqa: BLE001 - storage back-ends raise many types
            budget.failed(exn, what)
            continue
        return (data[start:stop] if len(data) > stop - start else data), len(data)


def exists(storage: Storage, url: str) -> bool:
    """Whether ``url`` is there, through a :class:`RetryBudget`: a store that does not answer (connection
    refused, reset, timeouts) is retried within the budget and then raises :class:`StorageError`, where a
    bare ``fs.exists`` would answer False and call an outage a missing file."""
    budget = RetryBudget(url, storage)
    while True:
        try:
            fs, path = storage.fs(url)
            fs.info(path)
            return True
        except FileNotFoundError as exn:
            if not is_outage(exn):
                return False
            budget.failed(exn, "looking for")
        except Exception as exn:  # noqa: BLE001 - storage back-ends raise many types
            budget.failed(exn, "looking for")
