"""Turn a data spec into a flat list of shard URLs."""
from __future__ import annotations

from typing import Sequence

from braceexpand import braceexpand

from data_pipeline.errors import DataSpecError
from data_pipeline.shards.manifest import Manifest, read_index
from data_pipeline.storage import Storage

__all__ = ["DataSpecError", "expand_urls", "manifest_index", "spec_parts"]


def spec_parts(spec: str | Sequence[str]) -> list[str]:
    """The non-empty parts of a data spec: a string, a ``::``-separated list, or a list of these."""
    items = [spec] if isinstance(spec, str) else list(spec)
    parts: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise DataSpecError(f"data spec {spec!r}: expected strings, got {type(item).__name__}")
        parts.extend(p.strip() for p in item.split("::") if p.strip())
    return parts


def manifest_index(part: str, spec: object, storage: Storage) -> Manifest:
    """The manifest ``part`` (header, shard table); an error names the whole data spec it came from."""
    try:
        return read_index(part, storage)
    except DataSpecError as exc:
        raise type(exc)(f"data spec {spec!r}: {exc}") from None


def no_urls_error(spec: object) -> DataSpecError:
    return DataSpecError(f"data spec {spec!r} expands to no shard URLs")


def expand_urls(spec: str | Sequence[str], storage: Storage) -> list[str]:
    """Expand a brace pattern, a ``::``-separated list, a manifest ``.json`` path/URL, or a list of these."""
    urls: list[str] = []
    for part in spec_parts(spec):
        if part.endswith(".json"):
            table = manifest_index(part, spec, storage).table
            urls.extend(table.url(i) for i in range(len(table)))
        else:
            urls.extend(braceexpand(part))
    if not urls:
        raise no_urls_error(spec)
    return urls
