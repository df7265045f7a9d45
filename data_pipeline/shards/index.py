"""Index shards that have no manifest: sample counts and per-sample byte offsets, in parallel.

The command is ``python -m data_pipeline.index`` (data_pipeline/index.py). Training reads only manifests:
the counts fix each epoch's plan at once, and the offsets let every DataLoader worker read just the byte
ranges of its own samples. Indexing reads every shard once, in ``threads`` parallel streams. It is
resumable: each finished shard is appended to ``<out>.partial.jsonl`` (a local file), and a rerun with
the same arguments skips the shards listed there. A damaged shard keeps the samples before the damage
(a warning says so); a shard that is not there stops the indexing with one line naming it.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from tqdm import tqdm

from data_pipeline.shards.manifest import make_manifest, publish_manifest
from data_pipeline.shards.spec import expand_urls
from data_pipeline.shards.tar_read import ShardSamples
from data_pipeline.storage import Storage

log = logging.getLogger(__name__)


def index_shard(url: str, storage: Storage) -> dict[str, Any]:
    """Manifest entry of one shard: ``{"url", "num_samples", "offsets", "max_label"}``; offsets are each
    sample's first byte, then the end of the last one (absent for compressed shards, which are streamed);
    ``"error"`` says why a damaged shard ends early (the samples before the damage are kept)."""
    shard = ShardSamples(url, storage, must_exist=True)
    offsets: list[int | None] = []
    end, max_label = None, -1
    while (sample := shard.next()) is not None:
        if "cls" in sample and sample["cls"].strip().isdigit():
            max_label = max(max_label, int(sample["cls"]))
        offsets.append(sample.get("__offset__"))
        end = sample.get("__end__")
    entry: dict[str, Any] = {"url": url, "num_samples": len(offsets), "max_label": max_label}
    if offsets and None not in offsets and end is not None:
        entry["offsets"] = offsets + [end]
    if shard.error:
        entry["error"] = shard.error
    return entry


def _partial_path(out: str) -> str:
    protocol = out.split("://")[0] if "://" in out else "file"
    name = posixpath.basename(out.rstrip("/"))
    return (out if protocol == "file" else name) + ".partial.jsonl"


def _load_partial(path: str, urls: set[str]) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line being written when the last run stopped
                if entry.get("url") in urls:
                    done[entry["url"]] = entry
    return done


def build_index(spec: str, out: str, storage: Storage, threads: int = 32, progress: bool = True) -> dict:
    """Index the shards of ``spec`` into the manifest ``out`` (any fsspec URL); return the manifest."""
    urls = expand_urls(spec, storage)
    partial = _partial_path(out)
    done = _load_partial(partial, set(urls))
    todo = [u for u in urls if u not in done]
    if done:
        log.warning("resuming: %d of %d shard(s) already indexed in %s", len(done), len(urls), partial)
    with open(partial, "a") as log_file, ThreadPoolExecutor(max(1, threads)) as pool, \
            tqdm(total=len(urls), initial=len(done), unit="shard", disable=not progress) as bar:
        futures = {pool.submit(index_shard, u, storage): u for u in todo}

        def keep(entry: dict) -> None:
            done[entry["url"]] = entry
            log_file.write(json.dumps(entry) + "\n")
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
    shards = [{k: v for k, v in done[u].items() if k not in ("max_label", "error")} for u in urls]
    manifest = make_manifest(shards, None, num_classes=max(done[u]["max_label"] for u in urls) + 1)
    fs, path = storage.fs(out, own_retries=True)
    publish_manifest(manifest, fs, path)  # published whole: a reader never sees half a manifest
    os.remove(partial)
    return manifest
