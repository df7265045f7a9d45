"""The manifest: the one owner of its fields, how it is assembled, published and read back.

A manifest ``{prefix}.json`` lists a data set's shards::

    {"shards": [{"url", "num_samples", "sha256"?, "offsets"?}, ...],
     "num_samples": int, "classes": [names] | null, "num_classes": int, "skipped"?: int}

``url`` is relative to the manifest (or absolute); ``offsets`` are each sample's first byte in the tar,
then the end of the last sample (absent for compressed shards, which are streamed). Manifests are
published whole under a temporary name and renamed, so a reader never sees half of one.
"""
from __future__ import annotations

import json
import os
import posixpath
import uuid

import fsspec
from fsspec.core import split_protocol

from data_pipeline.errors import DataSpecError
from data_pipeline.storage import RetryBudget, Storage, is_outage, permanent_reason


def make_manifest(shards: list[dict], classes: list[str] | None = None, *, num_classes: int | None = None,
                  skipped: int | None = None) -> dict:
    """The manifest of ``shards`` (entries from ``ShardWriter.publish`` or the indexer, in order).

    ``num_classes`` defaults to ``len(classes)``; writers without class names pass max label + 1.
    """
    manifest = {
        "shards": shards,
        "num_samples": sum(s["num_samples"] for s in shards),
        "classes": list(classes) if classes is not None else None,
        "num_classes": len(classes) if classes is not None and num_classes is None else num_classes,
    }
    if skipped is not None:
        manifest["skipped"] = skipped
    return manifest


def publish_manifest(manifest: dict, fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Write ``manifest`` to ``path`` under a temporary name, then rename it into place."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "w") as f:
        json.dump(manifest, f, separators=(",", ":"))  # compact: offsets are one number per sample
    fs.mv(tmp, path)


def _absolute(base_url: str, name: str) -> str:
    """Resolve a manifest entry relative to the manifest's own URL."""
    if split_protocol(name)[0] is not None or name.startswith("/"):
        return name
    protocol, path = split_protocol(base_url)
    joined = posixpath.join(posixpath.dirname(path), name)
    if protocol is None:
        # Local paths become absolute so the shard list does not depend on the reader's cwd.
        return os.path.abspath(joined)
    return f"{protocol}://{joined}"


def read_manifest(url: str, storage: Storage) -> dict:
    """Load a manifest written by :func:`write_shards`, with shard URLs made absolute."""
    budget = RetryBudget(url, storage)
    while True:
        try:
            with storage.open(url, "r") as f:
                manifest = json.load(f)
            break
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataSpecError(f"manifest {url!r} is not valid JSON: {exc}") from None
        except FileNotFoundError as exc:
            if permanent_reason(exc) is None and not is_outage(exc):
                raise DataSpecError(f"manifest {url!r} not found") from None
            budget.failed(exc, "reading manifest")
        except Exception as exc:  # noqa: BLE001 - storage back-ends raise anything from OSError to ClientError
            budget.failed(exc, "reading manifest")  # permanent (no credentials, bad scheme): one line at once
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "url" in s for s in shards):
        raise DataSpecError(f"manifest {url!r} has no valid 'shards' list")
    for s in shards:
        offsets = s.get("offsets")
        if offsets is not None and not (isinstance(offsets, list) and len(offsets) == int(s.get("num_samples", -2)) + 1
                                         and all(isinstance(o, int) for o in offsets)
                                         and all(a < b for a, b in zip(offsets, offsets[1:]))):
            raise DataSpecError(f"manifest {url!r}: shard {s['url']!r} has 'offsets' that are not num_samples + 1 "
                                f"increasing byte offsets; rebuild it with python -m data_pipeline.index")
    manifest["shards"] = [dict(s, url=_absolute(url, s["url"])) for s in manifest["shards"]]
    return manifest
