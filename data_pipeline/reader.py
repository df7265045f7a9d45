"""Raw samples from tar shards: files opened through fsspec, grouped by webdataset's tar iterators.

A shard that cannot be opened or read to the end (missing, truncated, not a tar) does not stop the
stream: it becomes one marker sample ``{"__key__": SHARD_ERROR_KEY, "__url__": url, "err": ...}``
that flows through shuffling like any sample, so it is counted at a position that is the same in an
interrupted-and-resumed run as in an uninterrupted one.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator

import fsspec
from webdataset.tariterators import group_by_keys, tar_file_iterator

log = logging.getLogger(__name__)

SHARD_ERROR_KEY = "__shard_error__"


def _log_and_continue(exn: Exception) -> bool:
    # group_by_keys reports e.g. duplicate member names; the sample keeps its first copy.
    log.warning("tar grouping problem, member ignored: %s", exn)
    return True


def _shard_members(urls: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Yield webdataset file records of each shard, then an end-of-shard marker (``{}``)."""
    for url in urls:
        try:
            with fsspec.open(url, "rb") as f:
                for member in tar_file_iterator(f):
                    member["__url__"] = url
                    yield member
        except Exception as exn:  # noqa: BLE001 - any storage or tar failure is a skipped shard
            # The name splits into key SHARD_ERROR_KEY and extension "err" in group_by_keys.
            yield {"fname": f"{SHARD_ERROR_KEY}.err", "data": f"{type(exn).__name__}: {exn}".encode(),
                   "__url__": url}
        yield {}  # end of shard: flush the last sample so keys never merge across shards


def raw_samples(urls: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Samples as dicts ``{"__key__", "__url__", "<ext>": bytes, ...}`` from the given shards, in order."""
    return group_by_keys(_shard_members(urls), handler=_log_and_continue)
