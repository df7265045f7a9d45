"""Training data sources: a weighted shard spec, resolved from its manifests to URLs, counts, offsets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from data_pipeline.errors import DataSpecError
from data_pipeline.shards.spec import manifest_shards, no_urls_error, spec_parts
from data_pipeline.storage import Storage


@dataclass
class DataSource:
    """One weighted source of training shards."""

    spec: str | Sequence[str]  # brace pattern, ``::`` list, manifest .json, or a list of these
    weight: float = 1.0
    name: str = ""


@dataclass
class ResolvedSource:
    """A source as the plan and the readers use it: every shard's URL, sample count and offsets."""

    name: str
    urls: list[str]
    counts: list[int]
    weight: float
    offsets: list[np.ndarray | None]  # per shard: each sample's first byte, then the end (None: stream it)


def index_command(spec: str) -> str:
    """The command that writes a manifest for shards given without one."""
    return f"python -m data_pipeline.index '{spec}' --out manifest.json"


def resolve_source(source: DataSource, index: int, storage: Storage) -> ResolvedSource:
    """Shard URLs, per-shard sample counts and byte offsets, from the source's manifests.

    Shards without a manifest stop the run at once: counting them would read the whole data set on
    one rank before the first step (days at ImageNet-21k scale); the message gives the index command.
    """
    urls: list[str] = []
    counts: list[int] = []
    offsets: list[np.ndarray | None] = []
    for part in spec_parts(source.spec):
        if not part.endswith(".json"):
            raise DataSpecError(f"data spec {part!r} is not a manifest (.json): training needs each shard's "
                                f"sample count; write one with `{index_command(part)}` and point the "
                                f"data spec at it")
        for s in manifest_shards(part, source.spec, storage):
            if "num_samples" not in s:
                raise DataSpecError(f"manifest {part!r}: shard {s['url']!r} has no num_samples; rebuild it "
                                    f"with `python -m data_pipeline.index 'SHARD_PATTERN' --out {part}`")
            urls.append(s["url"])
            counts.append(int(s["num_samples"]))
            # int64 arrays: a Python int per sample would cost ~0.5 GB per process at 14M samples
            offsets.append(np.asarray(s["offsets"], dtype=np.int64) if s.get("offsets") else None)
    if not urls:
        raise no_urls_error(source.spec)
    if sum(counts) == 0:
        raise DataSpecError(f"data spec {source.spec!r}: its {len(urls)} shard(s) hold no sample")
    return ResolvedSource(source.name or f"source{index}", urls, counts, float(source.weight), offsets)
