"""Build a manifest for shards that have none: sample counts and per-sample byte offsets, in parallel.

    python -m data_pipeline.index 's3://bucket/in21k/train-{000000..010239}.tar' --out train.json
    python -m data_pipeline.index '/data/a-{0..9}.tar::/data/b.tar' --out /data/train.json --threads 64

Training reads only manifests: the counts fix each epoch's plan at once, and the offsets let every
DataLoader worker read just the byte ranges of its own samples. Indexing reads every shard once, in
``--threads`` parallel streams with a progress bar. It is resumable: each finished shard is appended to
``<out>.partial.jsonl`` (a local file), and a rerun with the same arguments skips the shards listed
there. A damaged shard keeps the samples before the damage (a warning says so); a shard that is not
there stops the indexing with one line naming it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Sequence

from tqdm import tqdm

from data_pipeline.errors import DataSpecError
from data_pipeline.reader import ShardSamples
from data_pipeline.storage import Storage
from data_pipeline.urls import expand_urls

log = logging.getLogger("data_pipeline.index")


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
    manifest = {"shards": shards, "num_samples": sum(s["num_samples"] for s in shards), "classes": None,
                "num_classes": max(done[u]["max_label"] for u in urls) + 1}
    fs, path = storage.fs(out, own_retries=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open(tmp, "w") as f:
        json.dump(manifest, f, separators=(",", ":"))
    fs.mv(tmp, path)  # published whole: a reader never sees half a manifest
    os.remove(partial)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.index", description=__doc__.splitlines()[0])
    p.add_argument("spec", help="shard URLs: a brace pattern, a '::'-separated list (any fsspec URL)")
    p.add_argument("--out", required=True, help="the manifest to write (.json, any fsspec URL)")
    p.add_argument("--threads", type=int, default=32, help="shards read at the same time")
    p.add_argument("--s3-endpoint", default="", help="S3-compatible endpoint (else AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--give-up-after-s", type=float, default=600.0, help="retry a failing shard this long")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if not a.out.endswith(".json"):
        print(f"error: --out {a.out!r} must name a .json manifest", file=sys.stderr)
        return 2
    storage = Storage(s3_endpoint=a.s3_endpoint, give_up_after_s=a.give_up_after_s)  # no config: the flags
    try:
        manifest = build_index(a.spec, a.out, storage, a.threads, progress=not a.no_progress)
    except DataSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"indexed {manifest['num_samples']} samples in {len(manifest['shards'])} shards into {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
