"""Index shards that have no manifest: sample counts, per-sample byte offsets and classes, in parallel.

The command is ``python -m data_pipeline.index`` (data_pipeline/index.py). Training reads only manifests:
the counts fix each epoch's plan at once, and the offsets let every DataLoader worker read just the byte
ranges of its own samples. Indexing reads every shard once, in ``threads`` parallel streams. It is
resumable: each finished shard is appended to ``<out>.partial.jsonl`` (its offsets to
``<out>.partial.offsets``; local files), and a rerun with the same arguments skips the shards listed
there. Memory grows with shards, not samples. A damaged shard keeps the samples before the damage
(a warning says so); a shard that is not there stops the indexing with one line naming it.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import numpy as np
from fsspec.core import split_protocol
from tqdm import tqdm

from data_pipeline.errors import DataSpecError
from data_pipeline.shards.labels import LABEL_FORMS, BadLabel, LabelSource, parse_label_source, raw_label
from data_pipeline.shards.manifest import make_manifest, publish_manifest
from data_pipeline.shards.offsets import OFFSET_DTYPE
from data_pipeline.shards.spec import expand_urls
from data_pipeline.shards.tar_read import ShardSamples, members_note
from data_pipeline.storage import Storage
from data_pipeline.storage.claim import claim, remove_leftovers

log = logging.getLogger(__name__)
CLS = LabelSource("cls")


def index_shard(url: str, storage: Storage, label: LabelSource = CLS) -> dict[str, Any]:
    """Manifest entry of one shard: ``{"url", "num_samples", "bytes", "offsets", "min_label", "max_label", "names"}``;
    offsets are each sample's first byte, then the end of the last one (absent for compressed shards,
    which are streamed); ``max_label`` / ``names``: the class indices / class names found in ``label``;
    ``"error"`` says why a damaged shard ends early (the samples before the damage are kept).

    A shard with samples but no label in ``label`` at all raises ``DataSpecError`` naming the shard, a key
    and the members it has: training it would skip every sample."""
    shard = ShardSamples(url, storage, must_exist=True)
    offsets: list[int | None] = []
    end, min_label, max_label, names, labelled, first = None, -1, -1, set(), 0, None
    while (sample := shard.next()) is not None:
        try:
            value = raw_label(sample, label)
        except BadLabel:
            value = None  # counted as bad_label in training; the shard is still labelled
            labelled += 1
        if isinstance(value, int):
            min_label = value if max_label < 0 else min(min_label, value)
            max_label = max(max_label, value)
        elif isinstance(value, str):
            names.add(value)
        labelled += value is not None
        first = first or sample
        offsets.append(sample.get("__offset__"))
        end = sample.get("__end__")
    if first is not None and not labelled:
        raise DataSpecError(f"shard {url}: sample {first['__key__']!r} has no label in {label} "
                            f"({members_note(first)}), nor has any other sample of the shard; say where the "
                            f"labels are with --label ({LABEL_FORMS})")
    entry: dict[str, Any] = {"url": url, "num_samples": len(offsets), "min_label": min_label, "max_label": max_label,
                             "names": sorted(names)}
    if offsets and None not in offsets and end is not None:
        entry["offsets"] = offsets + [end]
    try:
        fs, path = storage.fs(url)
        entry["bytes"] = int(fs.size(path))
    except Exception:  # noqa: BLE001 - the size is informative; a store that cannot say leaves it unknown
        pass
    if shard.error:
        entry["error"] = shard.error
    return entry


def _partial_path(out: str) -> str:
    protocol = out.split("://")[0] if "://" in out else "file"
    name = posixpath.basename(out.rstrip("/"))
    return (out if protocol == "file" else name) + ".partial.jsonl"


class _Run:
    """One shard's offsets, kept in the local ``<out>.partial.offsets`` file until the manifest is published:
    the indexer's memory grows with shards, not samples (2.3 billion offsets would not fit as lists)."""

    def __init__(self, path: str, at: int, n: int) -> None:
        self.path, self.at, self.n = path, at, n

    def __len__(self) -> int:
        return self.n

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        run = np.fromfile(self.path, dtype=OFFSET_DTYPE, count=self.n, offset=self.at)
        return run if dtype is None else run.astype(dtype, copy=False)

    def __getitem__(self, i):
        return np.asarray(self)[i]


def _load_partial(path: str, urls: set[str]) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if os.path.exists(path):
        size = os.path.getsize(path + ".offsets") if os.path.exists(path + ".offsets") else 0
        with open(path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line being written when the last run stopped
                if entry.get("url") not in urls:
                    continue
                run = entry.get("offsets")
                if isinstance(run, dict):
                    if run["at"] + 8 * run["n"] > size:
                        continue  # its offsets never reached the file: index the shard again
                    entry["offsets"] = _Run(path + ".offsets", run["at"], run["n"])
                done[entry["url"]] = entry
    return done


def _absolute(url: str) -> str:
    """A relative local path means one relative to the working directory of the command that was given it."""
    return os.path.abspath(url) if split_protocol(url)[0] is None else url


def _recorded_name(url: str, out: str) -> str:
    """A shard's name in the manifest ``out``: relative to the manifest's directory where the shard lies in or
    below it (the data set moves as one folder, as the writer's manifests do), else the absolute path or URL."""
    if split_protocol(url)[0] is None and split_protocol(out)[0] is None:
        name = os.path.relpath(url, os.path.dirname(os.path.abspath(out)))
        if not name.startswith(".."):
            return name
    return url


def build_index(spec: str, out: str, storage: Storage, threads: int = 32, progress: bool = True,
                label: str = "cls") -> dict:
    """:func:`_build_index` while holding ``out``'s claim: a second indexer (or writer) of the same manifest
    is refused with one line naming the first; the temporary files of a run that was killed are removed."""
    with claim(out, storage, "indexed into"):
        fs, path = storage.fs(out, own_retries=True)
        remove_leftovers(fs, f"{path.removesuffix('.json')}.*.tmp-*")
        return _build_index(spec, out, storage, threads, progress, label)


def _build_index(spec: str, out: str, storage: Storage, threads: int = 32, progress: bool = True,
                 label: str = "cls") -> dict:
    """Index the shards of ``spec`` into the manifest ``out`` (any fsspec URL); return the manifest (its
    shard entries without offsets: ``read_manifest(out, storage, offsets=True)`` reads them back).

    ``label`` (cls, txt, json:FIELD): where the samples' labels are; class names found there become the
    manifest's sorted ``classes``, class indices give ``num_classes`` = max + 1."""
    source = parse_label_source(label)
    urls = [_absolute(u) for u in expand_urls(spec, storage)]
    partial = _partial_path(out)
    done = _load_partial(partial, set(urls))
    todo = [u for u in urls if u not in done]
    if done:
        log.warning("resuming: %d of %d shard(s) already indexed in %s", len(done), len(urls), partial)
    with open(partial, "a") as log_file, open(partial + ".offsets", "ab") as runs, \
            ThreadPoolExecutor(max(1, threads)) as pool, \
            tqdm(total=len(urls), initial=len(done), unit="shard", disable=not progress) as bar:
        futures = {pool.submit(index_shard, u, storage, source): u for u in todo}

        def keep(entry: dict) -> None:
            line = dict(entry)
            if entry.get("offsets") is not None:  # to the local file first, then the line that points at it
                at = runs.seek(0, os.SEEK_END)
                runs.write(np.asarray(entry["offsets"], dtype=OFFSET_DTYPE).tobytes())
                runs.flush()
                line["offsets"] = {"at": at, "n": len(entry["offsets"])}
                entry = dict(entry, offsets=_Run(partial + ".offsets", at, len(entry["offsets"])))
            done[entry["url"]] = entry
            log_file.write(json.dumps(line) + "\n")
            log_file.flush()
            bar.update()

        try:
            for future in as_completed(futures):
                entry = future.result()  # StorageError / DataSpecError: one line, the finished shards stay saved
                if "error" in entry:
                    log.warning("%s is damaged after %d sample(s), which are kept: %s", entry["url"],
                                entry["num_samples"], entry["error"])
                keep(entry)
        except BaseException:
            for f in futures:
                f.cancel()
            for f in futures:  # shards that finished while the error was being raised are kept too
                if f.done() and not f.cancelled() and f.exception() is None and futures[f] not in done:
                    keep(f.result())
            raise
    shards = [{k: v for k, v in done[u].items() if k not in ("min_label", "max_label", "names", "error")} for u in urls]
    for shard in shards:
        shard["url"] = _recorded_name(shard["url"], out)
    names = sorted({n for u in urls for n in done[u].get("names", ())})
    index = {n: i for i, n in enumerate(names)}
    for shard, u in zip(shards, urls):  # each shard's label range, for the table (docs/manifest.md)
        own = [index[n] for n in done[u].get("names", ())]
        shard["labels"] = [min(own), max(own)] if own else [done[u].get("min_label", min(0, done[u]["max_label"])),
                                                             done[u]["max_label"]]
    max_label = max(done[u]["max_label"] for u in urls)
    if names and max_label >= 0:
        raise DataSpecError(f"{spec}: {label} holds class indices in some samples and class names in others "
                            f"(e.g. {names[0]!r}); make them one kind")
    manifest = make_manifest(shards, names or None, num_classes=len(names) if names else max_label + 1,
                             label=str(source))
    fs, path = storage.fs(out, own_retries=True)
    publish_manifest(manifest, fs, path)  # published whole: a reader never sees half a manifest
    os.remove(partial)
    os.remove(partial + ".offsets")
    for shard in shards:  # they lived in the partial file; read_manifest(out, storage, offsets=True) has them
        shard.pop("offsets", None)
    return manifest
