"""The one retry layer of data reads: :class:`RetryBudget`, and which storage errors are permanent.

The readers call ``Storage.open`` once per attempt and hand every failure to their budget, which either
waits (exponential back-off) or stops the run with one line naming the URL. Errors fall in three kinds:

- permanent (no credentials, access denied, unknown scheme, bad endpoint, missing bucket): retrying
  cannot help, so the first one raises :class:`StorageError` at once;
- content (a damaged tar): the reader skips the rest of that shard, the same way on every rank;
- anything else is transient (connection refused, timeouts, 5xx, throttling, and a missing object that
  the manifest says exists: a store restoring its objects answers NoSuchKey for a while): retried until
  ``give_up_after_s`` have passed since the last success, then :class:`StorageError`.
"""
from __future__ import annotations

import logging
import socket
import time

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


def _chain(exn: BaseException):
    seen: set[int] = set()
    while exn is not None and id(exn) not in seen:
        seen.add(id(exn))
        yield exn
        exn = exn.__cause__ or exn.__context__


def is_outage(exn: BaseException) -> bool:
    """True when a connection failure is somewhere in the chain (fsspec's HTTP reports one as a missing file)."""
    return any(isinstance(e, (ConnectionError, TimeoutError)) or "Connect" in type(e).__name__ for e in _chain(exn))


def permanent_reason(exn: BaseException) -> str | None:
    """Why retrying ``exn`` cannot help (configuration or authorisation), or None if it may be transient."""
    if any(isinstance(e, socket.gaierror) or "DNS" in type(e).__name__ for e in _chain(exn)):
        return "the endpoint's host name does not resolve"  # a typo in the endpoint, not an outage
    if is_outage(exn):
        return None  # an outage, whatever it was reported as
    for e in _chain(exn):
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
        reason = permanent_reason(exn)
        if reason is None and self.missing_is_permanent and isinstance(exn, FileNotFoundError) and not is_outage(exn):
            reason = "not found"
        if reason is not None:
            raise StorageError(f"cannot read {self.url} ({reason}): {_brief(exn)}") from None
        now = time.monotonic()
        self._since = now if self._since is None else self._since
        waited = now - self._since
        budget = self.storage.give_up_after_s
        if waited >= budget:
            raise StorageError(f"gave up on {self.url} after {waited:.0f}s of failures "
                               f"(data.storage.give_up_after_s={budget:g}): {_brief(exn)}") from None
        delay = min(self.storage.wait(self.attempts), budget - waited)
        self.attempts += 1
        log.warning("%s %s failed (%s); retry %d in %.1fs (giving up %.0fs after the first failure)", what,
                    self.url, _brief(exn), self.attempts, delay, budget)
        time.sleep(delay)
