"""The manifest: the one owner of its format, how it is assembled, published and read back.

Format 2 (what the writer and the indexer write; docs/manifest.md), three files under one stem, e.g. ``train``::

    train.json         small JSON header: {"format_version": 2, "num_samples", "num_shards", "classes",
                       "num_classes", "label", "skipped"?, "table": "train.shards.npz",
                       "offsets": "train.offsets" | null}
    train.shards.npz   the per-shard table (table.py): name, sample count, bytes, sha256, offsets_at
    train.offsets      every shard's per-sample byte offsets, int64, read per shard by the workers

A rank reads the header and the table: its cost grows with shards, not samples. Format 1 (one JSON
with every sample's offset) is still read, with a warning giving the one-line conversion
(``python -m data_pipeline.index --convert URL``). Files are published under temporary names and
renamed, the header last, so a reader that starts from the header never sees half a manifest.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from fsspec.core import split_protocol

from data_pipeline.errors import DataSpecError
from data_pipeline.shards.offsets import OFFSET_DTYPE
from data_pipeline.shards.table import ShardTable, absolute_url
from data_pipeline.storage import RetryBudget, Storage, is_outage, permanent_reason

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
_HEADER_KEYS = ("num_samples", "classes", "num_classes", "label", "skipped")
_warned_v1: set[str] = set()


def convert_command(url: str) -> str:
    return f"python -m data_pipeline.index --convert {url}"


def make_manifest(shards: list[dict], classes: list[str] | None = None, *, num_classes: int | None = None,
                  skipped: int | None = None, label: str = "cls") -> dict:
    """The manifest of ``shards`` (entries ``{"url", "num_samples", "bytes"?, "sha256"?, "offsets"?}`` from
    ``ShardWriter.publish`` or the indexer, in order), in memory: what the writer holds, not a rank.

    ``num_classes`` defaults to ``len(classes)``; writers without class names pass max label + 1.
    ``label``: where the samples' labels are (``cls``, ``txt``, ``json:FIELD``), as the indexer found them.
    """
    manifest = {
        "format_version": FORMAT_VERSION,
        "shards": shards,
        "num_samples": sum(s["num_samples"] for s in shards),
        "classes": list(classes) if classes is not None else None,
        "num_classes": len(classes) if classes is not None and num_classes is None else num_classes,
        "label": label,
    }
    if skipped is not None:
        manifest["skipped"] = skipped
    return manifest


def _stem(path: str) -> str:
    return path[:-len(".json")] if path.endswith(".json") else path


def _put(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def publish_manifest(manifest: dict, fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Write ``manifest`` (from :func:`make_manifest`) as format 2 at ``path`` (the ``.json`` header):
    offsets file and shard table first, each under a temporary name renamed into place, the header last."""
    stem = posixpath.basename(_stem(path))
    shards = manifest["shards"]
    offsets_at, at = [], 0
    tmp = f"{_stem(path)}.offsets.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:  # streamed shard by shard: the writer never holds one big array
        for s in shards:
            offs = s.get("offsets")
            if offs is None:
                offsets_at.append(-1)
                continue
            offsets_at.append(at)
            f.write(np.asarray(offs, dtype=OFFSET_DTYPE).tobytes())
            at += len(offs)
    if at:
        fs.mv(tmp, f"{_stem(path)}.offsets")
    else:
        fs.rm(tmp)
    _put(fs, f"{_stem(path)}.shards.npz", ShardTable.from_entries(shards, offsets_at).save())
    header = {"format_version": FORMAT_VERSION, "num_shards": len(shards),
              **{k: manifest[k] for k in _HEADER_KEYS if k in manifest},
              "table": f"{stem}.shards.npz", "offsets": f"{stem}.offsets" if at else None}
    header.setdefault("label", "cls")
    _put(fs, path, json.dumps(header, separators=(",", ":")).encode())


def _base(url: str) -> str:
    """The directory URL relative names in a manifest at ``url`` are resolved against."""
    protocol, path = split_protocol(url)
    if protocol is None:
        # Local paths become absolute so the shard list does not depend on the reader's cwd.
        return os.path.dirname(os.path.abspath(path))
    return f"{protocol}://{posixpath.dirname(path)}"


def _read_bytes(url: str, storage: Storage, what: str) -> bytes:
    budget = RetryBudget(url, storage)
    while True:
        try:
            with storage.open(url, "rb") as f:
                return f.read()
        except FileNotFoundError as exc:
            if permanent_reason(exc) is None and not is_outage(exc):
                raise DataSpecError(f"{what} {url!r} not found") from None
            budget.failed(exc, f"reading {what}")
        except Exception as exc:  # noqa: BLE001 - storage back-ends raise anything from OSError to ClientError
            budget.failed(exc, f"reading {what}")  # permanent (no credentials, bad scheme): one line at once


def _parse_json(url: str, storage: Storage) -> dict:
    try:
        # Decoded first, the bytes dropped: a format 1 manifest is 100+ MB and json.loads(bytes) holds both.
        manifest = json.loads(_read_bytes(url, storage, "manifest").decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataSpecError(f"manifest {url!r} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise DataSpecError(f"manifest {url!r} has no valid 'shards' list")
    return manifest


@dataclass(frozen=True)
class Manifest:
    """A manifest as a rank holds it: the header, the shard table, where the offsets are (numpy only).

    ``offsets``: the offsets file's URL (format 2), one int64 array of every shard's offsets (format 1,
    parsed from the JSON), or None (no shard has offsets: all streamed).
    """

    url: str
    header: dict
    table: ShardTable
    offsets: str | np.ndarray | None

    @property
    def num_samples(self) -> int:
        return int(self.header["num_samples"])

    @property
    def classes(self) -> list[str] | None:
        return self.header.get("classes")

    @property
    def label(self) -> str:
        return self.header.get("label") or "cls"


def _legacy(url: str, manifest: dict) -> Manifest:
    """A format 1 manifest (every sample's offset in the JSON), as the same compact ``Manifest``."""
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "url" in s for s in shards):
        raise DataSpecError(f"manifest {url!r} has no valid 'shards' list")
    total = sum(len(s["offsets"]) for s in shards if isinstance(s, dict) and isinstance(s.get("offsets"), list))
    flat = np.empty(total, dtype=np.int64)  # filled in place: no second copy at the peak
    offsets_at, at = [], 0
    for s in shards:
        if "num_samples" not in s:
            raise DataSpecError(f"manifest {url!r}: shard {s['url']!r} has no num_samples; rebuild it "
                                f"with `python -m data_pipeline.index 'SHARD_PATTERN' --out {url}`")
        offsets = s.get("offsets")
        if offsets is not None and not (isinstance(offsets, list) and len(offsets) == int(s["num_samples"]) + 1
                                         and all(isinstance(o, int) for o in offsets)
                                         and all(a < b for a, b in zip(offsets, offsets[1:]))):
            raise DataSpecError(f"manifest {url!r}: shard {s['url']!r} has 'offsets' that are not num_samples + 1 "
                                f"increasing byte offsets; rebuild it with python -m data_pipeline.index")
        if offsets:
            flat[at:at + len(offsets)] = offsets
            offsets_at.append(at)
            at += len(offsets)
        else:
            offsets_at.append(-1)
        s.pop("offsets", None)  # freed as we go
    table = ShardTable.from_entries(shards, offsets_at, base=_base(url))
    header = {k: manifest.get(k) for k in _HEADER_KEYS if k in manifest}
    header.setdefault("num_samples", int(table.counts.sum()))
    header.update(format_version=1, num_shards=len(table))
    return Manifest(url, header, table, flat if at else None)


def read_index(url: str, storage: Storage) -> Manifest:
    """The manifest at ``url`` as a rank needs it: header, shard table, where the offsets are.

    Reads the JSON header and the ``.npz`` table (format 2), never the offsets; a format 1 manifest is
    parsed whole (its cost grows with samples) with one warning giving the conversion command.
    """
    manifest = _parse_json(url, storage)
    version = manifest.get("format_version", 1)
    if version == 1 or "shards" in manifest:
        if url not in _warned_v1:
            _warned_v1.add(url)
            log.warning("manifest %s is format 1: every rank parses every sample's offset (start-up and memory "
                        "grow with samples); convert it once with `%s`", url, convert_command(url))
        return _legacy(url, manifest)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DataSpecError(f"manifest {url!r} has format_version {version!r}; this data_pipeline reads formats 1 "
                            f"to {FORMAT_VERSION}: update it")
    base = _base(url)
    if not isinstance(manifest.get("table"), str):
        raise DataSpecError(f"manifest {url!r} has no 'table'; rebuild it with python -m data_pipeline.index")
    table_url = absolute_url(base, manifest["table"])
    try:
        table = ShardTable.load(_read_bytes(table_url, storage, "shard table"), base)
    except DataSpecError:
        raise
    except Exception as exc:  # noqa: BLE001 - ValueError, zipfile.BadZipFile, numpy format errors
        raise DataSpecError(f"shard table {table_url!r} of manifest {url!r} is unreadable ({type(exc).__name__}: "
                            f"{exc}); rebuild it with python -m data_pipeline.index") from None
    if len(table) != manifest.get("num_shards") or int(table.counts.sum()) != manifest.get("num_samples"):
        raise DataSpecError(f"shard table {table_url!r} holds {len(table)} shards / {int(table.counts.sum())} "
                            f"samples, its manifest {url!r} says {manifest.get('num_shards')} / "
                            f"{manifest.get('num_samples')}: they come from different writes; rebuild it")
    offsets = manifest.get("offsets")
    header = {k: manifest.get(k) for k in ("format_version", "num_shards", *_HEADER_KEYS) if k in manifest}
    return Manifest(url, header, table, absolute_url(base, offsets) if isinstance(offsets, str) else None)


def read_manifest(url: str, storage: Storage, offsets: bool = False) -> dict:
    """The manifest at ``url`` as one dict ``{"shards": [{"url", "num_samples", ...}], "num_samples",
    "classes", "num_classes", "label", ...}`` with shard URLs made absolute: for small manifests and tools
    (a training rank uses :func:`read_index`). ``offsets``: add each shard's ``"offsets"`` list (reads them)."""
    m = read_index(url, storage)
    shards = m.table.entries()
    if offsets:
        from data_pipeline.shards.offsets import ShardOffsets

        reader = ShardOffsets([m.table], [m.offsets], storage)
        for i, s in enumerate(shards):
            o = reader.get(i)
            if o is not None:
                s["offsets"] = o.tolist()
    return {**m.header, "shards": shards}


def convert_manifest(url: str, storage: Storage, out: str | None = None) -> dict:
    """Rewrite the manifest at ``url`` (any format) as format 2 at ``out`` (default: in place); return it.

    Shard names stay as they were written (relative names are resolved against ``url``'s directory, so
    ``out`` elsewhere gets absolute URLs)."""
    out = out or url
    m = read_index(url, storage)
    from data_pipeline.shards.offsets import ShardOffsets

    reader = ShardOffsets([m.table], [m.offsets], storage)
    same_dir = _base(out) == m.table.base
    shards: list[dict[str, Any]] = []
    for i, e in enumerate(m.table.entries()):
        if same_dir:
            e["url"] = m.table.name(i)
        o = reader.get(i)
        if o is not None:
            e["offsets"] = o
        shards.append(e)
    manifest = make_manifest(shards, m.classes, num_classes=m.header.get("num_classes"),
                             skipped=m.header.get("skipped"), label=m.label)
    fs, path = storage.fs(out, own_retries=True)
    publish_manifest(manifest, fs, path)
    return manifest
