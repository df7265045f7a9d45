"""Training data sources: a weighted shard spec, resolved from its manifests to URLs, counts, offsets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from data_pipeline.errors import DataSpecError
from data_pipeline.shards.manifest import Manifest
from data_pipeline.shards.offsets import ShardOffsets
from data_pipeline.shards.spec import manifest_index, no_urls_error, resolve_parts, spec_parts
from data_pipeline.shards.table import ShardUrls
from data_pipeline.storage import Storage


@dataclass
class DataSource:
    """One weighted source of training shards."""

    spec: str | Sequence[str]  # brace pattern, ``::`` list, manifest .json, or a list of these
    weight: float = 1.0
    name: str = ""
    label: str | None = None  # where its labels are (cls, txt, json:FIELD); None: the loader's (data.label)


@dataclass
class ResolvedSource:
    """A source as the plan and the readers use it: shard URLs, sample counts, where the offsets are.

    numpy buffers only, whatever the number of shards: forked DataLoader workers share its pages.
    """

    name: str
    urls: ShardUrls  # a sequence of str, decoded on access
    counts: np.ndarray  # int64 per shard
    weight: float
    offsets: ShardOffsets  # per shard, read by the worker that reads the shard (None: stream it)
    classes: list[str] | None = None  # the manifests' class names (labels given as names map through them)
    label: str = "cls"  # where the manifests' indexer found the labels ("": a manifest that does not say)
    reads: str = "cls"  # where this run reads them: the source's own label, else data.label
    num_classes: int | None = None  # the manifests' class count (the largest): labels at or above it are skipped


def index_command(spec: str) -> str:
    """The command that writes a manifest for shards given without one."""
    return f"python -m data_pipeline.index '{spec}' --out manifest.json"


def resolve_source(source: DataSource, index: int, storage: Storage) -> ResolvedSource:
    """Shard URLs and per-shard sample counts from the source's manifests (header and shard table only).

    Shards without a manifest stop the run at once: counting them would read the whole data set on
    one rank before the first step (days at ImageNet-21k scale); the message gives the index command.
    """
    manifests: list[Manifest] = []
    for given in spec_parts(source.spec):
        for part in resolve_parts(given, storage):  # a glob or a brace pattern may name several manifests
            if not part.endswith(".json"):
                raise DataSpecError(f"data spec {given!r} is not a manifest (.json): training needs each shard's "
                                    f"sample count; write one with `{index_command(given)}` and point the "
                                    f"data spec at it")
            manifests.append(manifest_index(part, source.spec, storage))
    tables = [m.table for m in manifests]
    counts = np.concatenate([t.counts for t in tables]) if tables else np.zeros(0, np.int64)
    if not len(counts):
        raise no_urls_error(source.spec)
    if int(counts.sum()) == 0:
        raise DataSpecError(f"data spec {source.spec!r}: its {len(counts)} shard(s) hold no sample")
    classes = next((m.classes for m in manifests if m.classes), None)
    given = [m.header.get("num_classes") or len(m.classes or ()) for m in manifests]
    num_classes = max(given) if all(isinstance(n, int) and n > 0 for n in given) else None
    for m, n in zip(manifests, given):
        check_label_range(m, n)
    return ResolvedSource(source.name or f"source{index}", ShardUrls(tables), counts, float(source.weight),
                          ShardOffsets(tables, [m.offsets for m in manifests], storage), classes,
                          recorded_label([m.header for m in manifests]), num_classes=num_classes)


def check_label_range(manifest: Manifest, num_classes: object) -> None:
    """Stop at start-up when the manifest's table records a shard holding a class index at or above the
    manifest's own ``num_classes`` (a manifest edited or assembled by hand): its head would be too small."""
    ranges = manifest.table.labels
    if ranges is None or not len(ranges) or not isinstance(num_classes, int) or num_classes <= 0:
        return
    worst = int(np.argmax(ranges[:, 1]))
    if int(ranges[worst, 1]) >= num_classes:
        raise DataSpecError(f"manifest {manifest.url}: shard {manifest.table.url(worst)} holds class index "
                            f"{int(ranges[worst, 1])}, but the manifest says num_classes {num_classes}; rebuild it "
                            f"with `python -m data_pipeline.index 'SHARDS' --out {manifest.url}`")


def recorded_label(headers: Sequence[dict]) -> str:
    """Where the manifests' indexer found the labels; "" when one of them does not say (an old manifest)."""
    labels = {h.get("label") or "" for h in headers}
    return "" if "" in labels else ",".join(sorted(labels))


def label_problem(recorded: str, reads: str, key: str, has_classes: bool) -> str | None:
    """Why reading labels from ``reads`` (set at ``key``) cannot give the labels of manifests indexed with
    ``recorded``, in one line with the fix; None when it can. Both directions are caught: labels in the JSON
    read as ``.cls`` would find none, and ``.cls`` manifests read from the JSON would skip every sample."""
    if recorded and recorded != reads:
        return (f"its manifest was indexed with --label {recorded} and {key} is {reads}: set {key}={recorded}, "
                f"or index the shards again with --label {reads}")
    if reads == "txt" and not has_classes:
        return (f"{key}={reads} maps class names through the manifest's classes and it lists none: index the "
                f"shards with `python -m data_pipeline.index SHARDS --out M.json --label {reads}`")
    return None


def check_label(source: ResolvedSource, key: str = "data.label") -> None:
    """Stop at start-up when ``source.reads`` cannot give this source's labels (see :func:`label_problem`)."""
    problem = label_problem(source.label, source.reads, key, bool(source.classes))
    if problem:
        raise DataSpecError(f"source {source.name}: {problem}")
