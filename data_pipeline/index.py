"""Build a manifest for shards that have none: sample counts and per-sample byte offsets, in parallel.

    python -m data_pipeline.index 's3://bucket/in21k/train-{000000..010239}.tar' --out train.json
    python -m data_pipeline.index '/data/a-{0..9}.tar::/data/b.tar' --out /data/train.json --threads 64
    python -m data_pipeline.index 'gs://bucket/laion/*.tar' --out gs://bucket/laion.json   # or a folder: its *.tar
    python -m data_pipeline.index 's3://laion/{00000..00099}.tar' --out s3://me/laion.json --label json:label
    python -m data_pipeline.index --convert s3://bucket/old/train.json   # format 1 -> 2, reads no shard

Training reads only manifests (format: docs/manifest.md): the counts fix each epoch's plan at once, and
the offsets let every DataLoader worker read just the byte ranges of its own samples. ``--label`` says
where the labels are; the indexer records the classes found there and refuses a shard with none.
Indexing reads every shard once, in ``--threads`` parallel streams with a progress bar. It is
resumable: each finished shard is appended to ``<out>.partial.jsonl`` (a local file), and a rerun
with the same arguments skips the shards listed there. A damaged shard keeps the samples before the
damage (a warning says so); a shard that is not there stops the indexing with one line naming it.
The work is done by ``data_pipeline.shards.index``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from data_pipeline.errors import DataSpecError
from data_pipeline.shards.index import build_index
from data_pipeline.shards.manifest import convert_manifest
from data_pipeline.storage import Storage


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.index", description=__doc__.splitlines()[0])
    p.add_argument("spec", nargs="?", help="the shards: a URL, brace pattern, glob or folder (its *.tar); '::' joins "
                   "several (any fsspec URL)")
    p.add_argument("--out", help="the manifest to write (.json, any fsspec URL)")
    p.add_argument("--label", default="cls", help="where the labels are: cls (default), txt (a class name) or "
                   "json:FIELD (img2dataset's --save_additional_columns '[\"label\"]' gives json:label)")
    p.add_argument("--convert", metavar="MANIFEST", help="rewrite a manifest of an older format as the current "
                   "one (in place, or to --out); reads no shard")
    p.add_argument("--threads", type=int, default=32, help="shards read at the same time")
    p.add_argument("--s3-endpoint", default="", help="S3-compatible endpoint (else AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--give-up-after-s", type=float, default=600.0, help="retry a failing shard this long")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    out = a.out or a.convert
    if (a.spec is None) == (a.convert is None) or not out:
        p.print_usage(sys.stderr)
        print("error: give shard URLs and --out, or --convert MANIFEST", file=sys.stderr)
        return 2
    if not out.endswith(".json"):
        print(f"error: --out {out!r} must name a .json manifest", file=sys.stderr)
        return 2
    storage = Storage(s3_endpoint=a.s3_endpoint, give_up_after_s=a.give_up_after_s)  # no config: the flags
    try:
        if a.convert:
            manifest = convert_manifest(a.convert, storage, out)
            print(f"converted {a.convert} ({manifest['num_samples']} samples in {len(manifest['shards'])} shards) "
                  f"to format {manifest['format_version']} at {out}")
            return 0
        manifest = build_index(a.spec, out, storage, a.threads, progress=not a.no_progress, label=a.label)
    except (DataSpecError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    classes = f", {manifest['num_classes']} classes from {manifest['label']}"
    print(f"indexed {manifest['num_samples']} samples in {len(manifest['shards'])} shards{classes} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
