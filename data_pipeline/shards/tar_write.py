"""Writing the shard format: webdataset tar shards of ``<key>.jpg`` + ``<key>.cls`` samples.

Layout written under a directory URL (any fsspec URL)::

    {prefix}-000000.tar  {prefix}-000001.tar ...  {prefix}.json

Shards are written under a temporary name and renamed when complete; the manifest (``manifest.py``)
is published last, so a reader that starts from the manifest never sees a half-written shard.
"""
from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
import uuid
from typing import BinaryIO, Iterable

import fsspec
import numpy as np
from PIL import Image
from webdataset import TarWriter

from data_pipeline.errors import DataSpecError
from data_pipeline.shards.manifest import make_manifest, publish_manifest
from data_pipeline.storage import Storage

# Fixed member mtime so that the same samples always give byte-identical shards (stable sha256).
_MTIME = 0  # an int: a float mtime makes tarfile add a PAX header to every member


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """Encode an HWC uint8 RGB array as JPEG bytes."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 array, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    # 4:4:4 (no chroma subsampling): at the demo's 32 px, 4:2:0 halves colour resolution and roughly
    # doubles the pixel error for ~30 % smaller files, a bad trade for tiny images.
    Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


class _HashingWriter:
    """File-like wrapper that hashes what passes through, so the shard is not read twice."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        self._f.write(data)
        return len(data)


def check_key(key: str) -> None:
    """Refuse keys webdataset would read back as another sample: it splits member names at the first dot
    of the basename (``a.b.c.jpg`` is key ``a`` with member ``b.c.jpg``) and skips ``__x__`` as metadata."""
    base = key.rsplit("/", 1)[-1]
    if not base or "." in base or base.startswith("__"):
        raise DataSpecError(f"sample key {key!r} must be non-empty, contain no '.' and not start with '__' "
                         f"(webdataset splits member names at the basename's first dot); rename it, e.g. "
                         f"{key.replace('.', '_').lstrip('_') or 'x'!r}")


class ShardWriter:
    """One shard written under a temporary name; ``publish`` renames it and returns its manifest entry."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, name: str, token: str) -> None:
        self.fs, self.name = fs, name
        self.final = posixpath.join(root, name)
        self.tmp = f"{self.final}.tmp-{token}"
        self.count = 0
        self.offsets: list[int] = []  # byte offset of each sample, then the end of the last one
        self.labels = [-1, -1]  # the smallest and largest label written (the manifest table records them)
        self._file = fs.open(self.tmp, "wb")
        self._hasher = _HashingWriter(self._file)
        self._tar = TarWriter(self._hasher, encoder=False, mtime=_MTIME)
        # webdataset 1.0.2 accepts `format` but never hands it to tarfile, which then defaults to PAX
        # and builds a PAX header dict per member (a third of the write time for small images).
        # GNU format needs no PAX records and still stores long names; every tar reader handles it.
        self._tar.tarstream.format = tarfile.GNU_FORMAT

    def write(self, key: str, data: bytes, label: int) -> None:
        check_key(key)  # every writer comes through here: the CLI's re-shard path included
        self.offsets.append(self._tar.tarstream.offset)  # where this sample's first header starts
        self._tar.write({"__key__": key, "jpg": bytes(data), "cls": str(label).encode("ascii")})
        self.labels = [label, label] if self.count == 0 else [min(self.labels[0], label), max(self.labels[1], label)]
        self.count += 1

    def publish(self) -> dict:
        self.offsets.append(self._tar.tarstream.offset)
        self._tar.close()  # writes the end-of-archive blocks, through the hasher
        self._file.close()
        self.fs.mv(self.tmp, self.final)
        return {"url": self.name, "num_samples": self.count, "bytes": self._hasher.size,
                "sha256": self._hasher.sha256.hexdigest(), "offsets": self.offsets, "labels": self.labels}

    def abort(self) -> None:
        self._tar.close()  # else tarfile's finaliser later writes to the closed file
        self._file.close()
        self.fs.rm(self.tmp)


def write_shards(
    samples: Iterable[tuple[str, bytes, int]],
    out_url: str,
    prefix: str,
    samples_per_shard: int,
    classes: list[str] | None = None,
    *,
    storage: Storage,
) -> dict:
    """Write ``(key, jpeg_bytes, label)`` samples as tar shards plus ``{prefix}.json``; return the manifest."""
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    fs, root = storage.fs(out_url, own_retries=True)
    fs.makedirs(root, exist_ok=True)
    token = uuid.uuid4().hex[:8]  # unique temp names: two writers never clobber each other's partial files
    shards: list[dict] = []
    max_label = -1
    pending: ShardWriter | None = None
    try:
        for key, data, label in samples:
            check_key(key)
            label = int(label)
            if label < 0 or (classes is not None and label >= len(classes)):
                raise ValueError(f"sample {key!r}: label {label} outside [0, {len(classes) if classes else 'inf'})")
            max_label = max(max_label, label)
            if pending is None:
                pending = ShardWriter(fs, root, f"{prefix}-{len(shards):06d}.tar", token)
            pending.write(key, data, label)
            if pending.count == samples_per_shard:
                shards.append(pending.publish())
                pending = None
        if pending is not None:
            shards.append(pending.publish())
            pending = None
    finally:
        if pending is not None:  # an exception mid-shard: drop the partial file, publish nothing more
            pending.abort()

    manifest = make_manifest(shards, classes, num_classes=None if classes is not None else max_label + 1)
    publish_manifest(manifest, fs, posixpath.join(root, f"{prefix}.json"))
    return manifest
