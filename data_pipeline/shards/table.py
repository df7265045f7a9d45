"""The per-shard table of a manifest: one numpy column per field, saved as an ``.npz`` (no pickle).

A table costs a rank a few numpy buffers whatever the number of shards: no Python object per shard, so
forked DataLoader workers share its pages (a list of 230,000 ``str`` URLs would be copied page by page
as reference counts are touched). Columns, all of length ``n`` (the number of shards) unless said:

    names       uint8, the shards' names (relative to the manifest, or absolute URLs) back to back, UTF-8
    name_ends   int64, the end of each name in ``names``
    counts      int64, samples per shard
    sizes       int64, bytes per shard (-1: unknown)
    offsets_at  int64, where the shard's ``counts + 1`` sample offsets start in the offsets file, in
                entries of 8 bytes (-1: none, the shard is streamed: compressed tars)
    sha256      uint8 (n, 32), optional: present when every shard has one
    labels      int64 (n, 2), optional: each shard's smallest and largest class index (-1, -1: no label),
                present when every shard has one (the writer and the indexer record them)
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from fsspec.core import split_protocol

_COLUMNS = ("names", "name_ends", "counts", "sizes", "offsets_at")


def absolute_url(base: str, name: str) -> str:
    """``name`` resolved against the directory URL ``base`` (absolute names are kept)."""
    if not base or split_protocol(name)[0] is not None or name.startswith("/"):
        return name
    return f"{base}/{name}"


@dataclass(frozen=True)
class ShardTable:
    """Per-shard columns of one manifest; ``base``: the directory relative names are resolved against."""

    names: np.ndarray
    name_ends: np.ndarray
    counts: np.ndarray
    sizes: np.ndarray
    offsets_at: np.ndarray
    sha256: np.ndarray | None = None
    base: str = ""
    labels: np.ndarray | None = None  # (n, 2) int64: each shard's label range

    def __len__(self) -> int:
        return len(self.counts)

    def name(self, i: int) -> str:
        start = int(self.name_ends[i - 1]) if i > 0 else 0
        return self.names[start:int(self.name_ends[i])].tobytes().decode("utf-8")

    def url(self, i: int) -> str:
        return absolute_url(self.base, self.name(i))

    @classmethod
    def from_entries(cls, shards: Sequence[dict], offsets_at: Sequence[int] | None = None,
                     base: str = "") -> ShardTable:
        """The table of manifest entries ``{"url", "num_samples", "bytes"?, "sha256"?}`` (writer side)."""
        encoded = [s["url"].encode("utf-8") for s in shards]
        sha = [s.get("sha256") for s in shards]
        ranges = [s.get("labels") for s in shards]
        return cls(
            names=np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(),
            name_ends=np.cumsum([len(e) for e in encoded], dtype=np.int64),
            counts=np.array([int(s["num_samples"]) for s in shards], dtype=np.int64),
            sizes=np.array([int(s.get("bytes", -1)) for s in shards], dtype=np.int64),
            offsets_at=np.asarray(offsets_at if offsets_at is not None else [-1] * len(shards), dtype=np.int64),
            sha256=np.array([np.frombuffer(bytes.fromhex(h), np.uint8) for h in sha]).reshape(len(sha), 32)
            if sha and all(sha) else None,
            base=base,
            labels=np.array(ranges, dtype=np.int64).reshape(len(ranges), 2)
            if ranges and all(r is not None for r in ranges) else None)

    def save(self) -> bytes:
        """The table as ``.npz`` bytes (uncompressed: a rank loads it with one read and no inflate)."""
        buf = io.BytesIO()
        columns = {c: getattr(self, c) for c in _COLUMNS}
        if self.sha256 is not None:
            columns["sha256"] = self.sha256
        if self.labels is not None:
            columns["labels"] = self.labels
        np.savez(buf, **columns)
        return buf.getvalue()

    @classmethod
    def load(cls, data: bytes, base: str) -> ShardTable:
        """A table from ``.npz`` bytes; ``ValueError`` names what is wrong (never unpickles)."""
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            missing = [c for c in _COLUMNS if c not in z.files]
            if missing:
                raise ValueError(f"the shard table has no column {', '.join(missing)}")
            cols = {c: z[c] for c in _COLUMNS}
            sha = z["sha256"] if "sha256" in z.files else None
            labels = z["labels"] if "labels" in z.files else None
        n = len(cols["counts"])
        if any(cols[c].ndim != 1 or len(cols[c]) != n for c in _COLUMNS if c != "names") or \
                (n and int(cols["name_ends"][-1]) != len(cols["names"])) or \
                (sha is not None and sha.shape != (n, 32)) or (labels is not None and labels.shape != (n, 2)):
            raise ValueError("the shard table's columns disagree in length")
        if (cols["counts"] < 0).any():
            raise ValueError("the shard table has negative sample counts")
        # A sample takes at least one 512-byte tar header: more samples than that in a shard of known size
        # is a damaged table, whose counts would size the plan and the offsets reads (MemoryError, not data).
        sizes = cols["sizes"].astype(np.int64, copy=False)
        if ((sizes >= 0) & (cols["counts"].astype(np.int64, copy=False) > sizes // 512)).any():
            i = int(np.flatnonzero((sizes >= 0) & (cols["counts"] > sizes // 512))[0])
            raise ValueError(f"the shard table says shard {i} holds {int(cols['counts'][i])} samples in "
                             f"{int(sizes[i])} bytes (a sample takes 512 bytes at least)")
        return cls(**{c: cols[c].astype(np.uint8 if c == "names" else np.int64, copy=False) for c in _COLUMNS},
                   sha256=sha, base=base, labels=None if labels is None else labels.astype(np.int64, copy=False))

    def entries(self) -> list[dict]:
        """Manifest entries (Python dicts, one per shard): for small manifests and tools, not for training."""
        out = []
        for i in range(len(self)):
            e = {"url": self.url(i), "num_samples": int(self.counts[i])}
            if self.sizes[i] >= 0:
                e["bytes"] = int(self.sizes[i])
            if self.sha256 is not None:
                e["sha256"] = self.sha256[i].tobytes().hex()
            if self.labels is not None:
                e["labels"] = [int(x) for x in self.labels[i]]
            out.append(e)
        return out


class ShardUrls(Sequence[str]):
    """The shard URLs of one or more tables as one sequence, decoded on access (nothing per shard held)."""

    def __init__(self, tables: Sequence[ShardTable]) -> None:
        self.tables = list(tables)
        self.starts = np.cumsum([0] + [len(t) for t in self.tables], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(table index, shard index inside that table) of shard ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        t = int(np.searchsorted(self.starts, i, side="right")) - 1
        return t, int(i - self.starts[t])

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        t, k = self.locate(int(i))
        return self.tables[t].url(k)

    def size(self, i: int) -> int:
        """Bytes of shard ``i`` as its manifest gives them (-1: unknown)."""
        t, k = self.locate(int(i))
        return int(self.tables[t].sizes[k])

    def sha256(self, i: int) -> str:
        """The manifest's sha256 of shard ``i`` in hex ("" when its manifest has none)."""
        t, k = self.locate(int(i))
        sha = self.tables[t].sha256
        return sha[k].tobytes().hex() if sha is not None else ""

    def __iter__(self) -> Iterator[str]:
        for t in self.tables:
            for k in range(len(t)):
                yield t.url(k)
