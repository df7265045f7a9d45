"""Opening shard URLs through fsspec: per-scheme options from the config, retries with back-off.

Credentials never pass through here as values: s3fs/gcsfs take them from the environment or the
cloud SDK's chain (profiles, instance roles); only the endpoint, profile name and anonymous flag are
configured, and nothing here logs an option value.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
from fsspec.core import split_protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StorageOptions:
    """What the config says about object storage; turned into fsspec keyword arguments per scheme."""

    s3_endpoint: str = ""  # e.g. http://127.0.0.1:9000 for MinIO / moto; "" = AWS
    s3_profile: str = ""  # a profile of ~/.aws/config; "" = the default credential chain
    s3_anon: bool = False  # public buckets without credentials
    retries: int = 5  # further attempts after a failed open/read of one shard
    backoff_s: float = 0.5  # first wait; doubles per attempt, capped at 30 s
    extra: dict = field(default_factory=dict)  # further fsspec options per scheme {"gs": {...}}

    def fsspec_kwargs(self, url: str) -> dict[str, Any]:
        protocol = split_protocol(url)[0] or "file"
        kwargs: dict[str, Any] = dict(self.extra.get(protocol, {}))
        if protocol in ("s3", "s3a"):
            if self.s3_endpoint:
                kwargs.setdefault("client_kwargs", {})["endpoint_url"] = self.s3_endpoint
            if self.s3_profile:
                kwargs["profile"] = self.s3_profile
            if self.s3_anon:
                kwargs["anon"] = True
        return kwargs

    def wait(self, attempt: int) -> float:
        return min(30.0, self.backoff_s * 2**attempt)


DEFAULT_STORAGE = StorageOptions()

# Errors that say the object is not there (or not ours): retrying cannot help.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _transient_cause(exn: BaseException) -> bool:
    # fsspec's HTTP back-end reports "connection refused" as FileNotFoundError(url) raised from the
    # connection error; look through the chain so an outage is retried, not mistaken for a missing file.
    seen = exn.__cause__ or exn.__context__
    while seen is not None:
        if isinstance(seen, (ConnectionError, TimeoutError)) or "Connect" in type(seen).__name__:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def is_permanent(exn: BaseException) -> bool:
    """True when retrying cannot help: the object is missing or forbidden (and not because of an outage)."""
    return isinstance(exn, _PERMANENT) and not _transient_cause(exn)


def open_url(url: str, storage: StorageOptions = DEFAULT_STORAGE, mode: str = "rb") -> IO:
    """Open ``url`` for reading, retrying transient failures with exponential back-off."""
    for attempt in range(storage.retries + 1):
        try:
            return fsspec.open(url, mode, **storage.fsspec_kwargs(url)).open()
        except Exception as exn:  # noqa: BLE001 - storage back-ends raise anything from OSError to ClientError
            if is_permanent(exn) or attempt == storage.retries:
                raise
            delay = storage.wait(attempt)
            log.warning("opening %s failed (%s: %s); retry %d/%d in %.1fs", url, type(exn).__name__,
                        str(exn)[:200], attempt + 1, storage.retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
