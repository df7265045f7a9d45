"""Turn a data spec into a flat list of shard URLs (or manifests): the one resolver of the indexer, the
writer's ``--shards``, ``data.train`` / ``data.sources`` and the start check.

A spec is one or more parts joined by ``::`` (or a list of them); each part is one of

    s3://b/train-000000.tar                  a shard URL (any fsspec URL)
    s3://b/train-{000000..000099}.tar        a brace pattern
    s3://b/train-*.tar, /data/*/train-?.tar  a glob (fsspec's ``glob``: local, s3://, gs://, ...), sorted
    /data/shards                             a folder: its ``*.tar``, sorted
    s3://b/train.json                        a manifest (training reads only these: docs/manifest.md)

Braces are expanded first, so a part may combine them with a glob.
"""
from __future__ import annotations

import posixpath
from typing import Sequence

from braceexpand import braceexpand
from fsspec.core import split_protocol

from data_pipeline.errors import DataSpecError
from data_pipeline.shards.manifest import Manifest, read_index
from data_pipeline.storage import Storage

__all__ = ["DataSpecError", "SPEC_FORMS", "expand_urls", "manifest_index", "resolve_parts", "spec_parts"]

SPEC_FORMS = ("a shard URL, a brace pattern (train-{000000..000099}.tar), a glob (train-*.tar), a folder (its "
              "*.tar) or a manifest (.json), several joined by '::'")
_GLOB = set("*?[")


def spec_parts(spec: str | Sequence[str]) -> list[str]:
    """The non-empty parts of a data spec: a string, a ``::``-separated list, or a list of these."""
    items = [spec] if isinstance(spec, str) else list(spec)
    parts: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise DataSpecError(f"data spec {spec!r}: expected strings, got {type(item).__name__}")
        parts.extend(p.strip() for p in item.split("::") if p.strip())
    return parts


def is_pattern(part: str) -> bool:
    """Whether ``part`` names files by a glob (braces alone are expanded without listing anything)."""
    return bool(_GLOB & set(part))


def _with_protocol(part: str, path: str) -> str:
    protocol = split_protocol(part)[0]
    return f"{protocol}://{path}" if protocol else path


def _matches_nothing(part: str, what: str) -> DataSpecError:
    return DataSpecError(f"data spec {part!r} {what}; a part is {SPEC_FORMS}")


def _resolve_one(part: str, storage: Storage) -> list[str]:
    """One brace-free part as URLs: a glob's sorted matches, a folder's sorted ``*.tar``, else itself."""
    if is_pattern(part):
        fs, path = storage.fs(part, own_retries=True)
        found = sorted(p for p, info in fs.glob(path, detail=True).items() if info.get("type") != "directory")
        if not found:
            raise _matches_nothing(part, "matches no file")
        return [_with_protocol(part, p) for p in found]
    if part.endswith((".tar", ".json")):
        return [part]  # a file named outright: no listing (a list of 10k shards stays 10k names, no calls)
    fs, path = storage.fs(part, own_retries=True)
    if fs.isdir(path):
        found = sorted(fs.glob(posixpath.join(path.rstrip("/"), "*.tar")))
        if not found:
            raise _matches_nothing(part, "is a folder without .tar files")
        return [_with_protocol(part, p) for p in found]
    if not fs.exists(path):
        raise _matches_nothing(part, "matches no file or folder")
    return [part]


def resolve_parts(spec: str | Sequence[str], storage: Storage) -> list[str]:
    """The spec's parts with braces, globs and folders resolved: shard URLs and manifest paths, in order."""
    out: list[str] = []
    for part in spec_parts(spec):
        for one in braceexpand(part):
            out.extend(_resolve_one(one, storage))
    return out


def manifest_index(part: str, spec: object, storage: Storage) -> Manifest:
    """The manifest ``part`` (header, shard table); an error names the whole data spec it came from."""
    try:
        return read_index(part, storage)
    except DataSpecError as exc:
        raise type(exc)(f"data spec {spec!r}: {exc}") from None


def no_urls_error(spec: object) -> DataSpecError:
    return DataSpecError(f"data spec {spec!r} expands to no shard URLs; give {SPEC_FORMS}")


def expand_urls(spec: str | Sequence[str], storage: Storage) -> list[str]:
    """The shard URLs of a spec: its parts resolved, each manifest replaced by the shards it lists."""
    urls: list[str] = []
    for part in resolve_parts(spec, storage):
        if part.endswith(".json"):
            table = manifest_index(part, spec, storage).table
            urls.extend(table.url(i) for i in range(len(table)))
        else:
            urls.append(part)
    if not urls:
        raise no_urls_error(spec)
    return urls
