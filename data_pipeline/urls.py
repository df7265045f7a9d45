"""Turn a data spec into a flat list of shard URLs."""
from __future__ import annotations

from typing import Sequence

from braceexpand import braceexpand

from data_pipeline.errors import DataSpecError
from data_pipeline.shards import read_manifest
from data_pipeline.storage import DEFAULT_STORAGE, StorageOptions

__all__ = ["DataSpecError", "expand_urls"]


def _expand_one(part: str, spec: object, storage: StorageOptions) -> list[str]:
    if part.endswith(".json"):
        try:
            return [s["url"] for s in read_manifest(part, storage)["shards"]]
        except DataSpecError as exc:
            raise DataSpecError(f"data spec {spec!r}: {exc}") from None
    return list(braceexpand(part))


def expand_urls(spec: str | Sequence[str], storage: StorageOptions = DEFAULT_STORAGE) -> list[str]:
    """Expand a brace pattern, a ``::``-separated list, a manifest ``.json`` path/URL, or a list of these."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in parts:
        if not isinstance(item, str):
            raise DataSpecError(f"data spec {spec!r}: expected strings, got {type(item).__name__}")
        for part in item.split("::"):
            part = part.strip()
            if part:
                urls.extend(_expand_one(part, spec, storage))
    if not urls:
        raise DataSpecError(f"data spec {spec!r} expands to no shard URLs")
    return urls
