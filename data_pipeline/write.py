"""Shard writer CLI: image folder / list file / existing shards -> webdataset shards + manifest, any fsspec URL.

    python -m data_pipeline.write --folder /data/imagenet/train --out s3://bucket/in1k/train \\
        --prefix train --shard-mb 256 --resize 256 --quality 90 --processes 16
    python -m data_pipeline.write --list files.tsv --out /data/shards --samples-per-shard 1000
    python -m data_pipeline.write --shards '/old/train-{000000..000099}.tar' --out /new --shard-mb 512

Each process writes whole shards (tmp name, renamed when complete); the manifest ``{prefix}.json``
(shards, sample counts, sha256, classes) is written last, and the reader uses it for exact epochs.
The samples are shuffled before sharding (seeded: ``--shuffle-seed``, default 0; ``--no-shuffle`` keeps the
input's order): the reader shuffles within a window only, so shards in class order would give each window
a few classes.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import posixpath
import re
import sys
import uuid
import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Sequence

import numpy as np
from PIL import Image

from data_pipeline.errors import DataSpecError
from data_pipeline.image.limits import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLarge, open_image
from data_pipeline.shards.labels import LABEL_FORMS, BadLabel, parse_label_source, raw_label
from data_pipeline.shards.manifest import make_manifest, publish_manifest
from data_pipeline.shards.spec import expand_urls
from data_pipeline.shards.tar_read import members_note, raw_samples
from data_pipeline.shards.tar_write import ShardWriter, check_key
from data_pipeline.storage import Storage
from data_pipeline.storage.claim import claim, remove_leftovers

log = logging.getLogger("data_pipeline.write")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

Item = tuple[str, object, int]  # key, path/URL (str) or image bytes, label


def _key(text: str) -> str:
    # Keys may not contain dots (webdataset splits member names at the first dot) nor start with "__".
    return re.sub(r"[^A-Za-z0-9_-]", "_", text).lstrip("_") or "x"


def items_from_folder(root: str, storage: Storage) -> tuple[list[Item], list[str]]:
    """``root/<class>/<image>``: classes are the sorted sub-folder names."""
    fs, base = storage.fs(root, own_retries=True)
    classes = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(base, detail=False) if fs.isdir(p))
    if not classes:
        raise DataSpecError(f"{root}: no class sub-folders")
    protocol = root.split("://")[0] + "://" if "://" in root else ""
    items = []
    seen: dict[str, str] = {}
    for label, name in enumerate(classes):
        for path in sorted(fs.find(posixpath.join(base, name))):
            if path.lower().endswith(_IMAGE_SUFFIXES):
                stem = posixpath.splitext(posixpath.relpath(path, base))[0]
                key = _check_unique(seen, _key(stem), protocol + path)
                items.append((key, protocol + path, label))
    return items, classes


def _check_unique(seen: dict[str, str], key: str, source: str) -> str:
    """``key``, unless another source already has it: two samples under one key in a shard make webdataset
    fail ("duplicate file name in tar file") and merge into one sample in our reader."""
    if key in seen:
        raise DataSpecError(f"{seen[key]} and {source} both become sample key {key!r} (characters other than "
                            f"letters, digits, '-' and '_' become '_', extensions are dropped); rename one of them")
    seen[key] = source
    return key


def items_from_list(list_url: str, storage: Storage) -> list[Item]:
    """Lines ``<path or URL> <label>`` (whitespace or tab separated; '#' comments)."""
    items = []
    with storage.open(list_url, "r", own_retries=True) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
                raise DataSpecError(f"{list_url}:{n}: expected '<path> <label>' with a label >= 0, got {line!r}")
            items.append((f"{len(items):09d}", parts[0], int(parts[1])))
    return items


def items_from_shards(spec: str, storage: Storage, label: str = "cls") -> tuple[list[Item], list[str] | None]:
    """The samples of existing shards with their labels from ``label`` (cls, txt, json:FIELD). Labels given
    as class names become indices into the sorted names found (the classes the new manifest records)."""
    source = parse_label_source(label)
    seen: dict[str, str] = {}
    found: list[tuple[str, bytes, int | str]] = []
    for sample in raw_samples(expand_urls(spec, storage), storage):
        where = f"sample {sample.get('__key__')!r} in {sample.get('__url__')}"
        image = next((sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
        if image is None:
            log.warning("re-shard: skipping %s: no image (%s)", where, members_note(sample))
            continue
        try:
            value = raw_label(sample, source)
        except BadLabel as exn:
            raise DataSpecError(f"re-shard: {where}: {exn}") from None
        if value is None:  # the label is elsewhere for every sample: one line, not one warning per sample
            raise DataSpecError(f"re-shard: {where} has no label in {source} ({members_note(sample)}); say where "
                                f"the labels are with --label ({LABEL_FORMS})")
        key = _check_unique(seen, sample["__key__"], f"{sample['__url__']} (key {sample['__key__']})")
        found.append((key, image, value))
    names = sorted({v for _, _, v in found if isinstance(v, str)})
    if names and any(isinstance(v, int) for _, _, v in found):
        raise DataSpecError(f"re-shard: {source} holds class indices in some samples and class names in others "
                            f"(e.g. {names[0]!r}); make them one kind")
    index = {n: i for i, n in enumerate(names)}
    return [(k, img, index[v] if isinstance(v, str) else v) for k, img, v in found], names or None


def prepare(data: bytes, resize: int | None, quality: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> bytes:
    """JPEG bytes, short side resized down to ``resize`` if larger; JPEGs pass through untouched otherwise.
    ``ImageTooLarge`` when the header asks for more than ``max_pixels``: training would skip it anyway."""
    img = open_image(data, max_pixels)  # the header only
    if resize is None and img.format == "JPEG" and img.mode == "RGB":
        return data
    img = img.convert("RGB")
    if resize is not None and min(img.size) > resize:
        scale = resize / min(img.size)
        img.draft("RGB", (int(img.width * scale), int(img.height * scale)))
        img = img.resize((max(resize, round(img.width * scale)), max(resize, round(img.height * scale))),
                         Image.Resampling.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _image_bytes(src: object, storage: Storage) -> bytes:
    """An item's image: the bytes it holds (re-sharding), or the file its path / URL names."""
    if isinstance(src, bytes):
        return src
    with storage.open(str(src), own_retries=True) as f:
        return f.read()


_images_done = None  # a writer process's share of the images-written counter the progress bar shows


def _init_worker(counter: object) -> None:
    global _images_done
    _images_done = counter


def _count_image() -> None:
    if _images_done is not None:
        with _images_done.get_lock():
            _images_done.value += 1


def _write_one(args: tuple) -> tuple[dict, int]:
    out_url, name, token, items, resize, quality, storage = args
    fs, root = storage.fs(out_url, own_retries=True)
    shard = ShardWriter(fs, root, name, token)
    bad = 0
    try:
        for key, src, label in items:
            _count_image()
            check_key(key)  # a key webdataset would split stops the write: skipping it would lose samples quietly
            try:
                shard.write(key, prepare(_image_bytes(src, storage), resize, quality), label)
            except (OSError, ValueError, ImageTooLarge) as exn:
                bad += 1
                log.warning("skipping %s (%s): %s", key, src if isinstance(src, str) else "bytes", exn)
        return shard.publish(), bad
    except BaseException:
        shard.abort()
        raise


def write(items: Sequence[Item], out_url: str, prefix: str, *, storage: Storage, samples_per_shard: int = 0,
          shard_mb: float = 0, resize: int | None = None, quality: int = 90, processes: int = 1,
          classes: list[str] | None = None, progress: bool = True) -> dict:
    """Write the items as shards in parallel; return the manifest (also written as ``{prefix}.json``)."""
    if not items:
        raise DataSpecError("nothing to write: the input holds no images")
    if not samples_per_shard:
        if shard_mb <= 0:
            raise DataSpecError("give --samples-per-shard or --shard-mb")
        sample_bytes = np.mean([len(prepare(_image_bytes(it[1], storage), resize, quality)) for it in items[:50]])
        samples_per_shard = max(1, int(shard_mb * 2**20 / (sample_bytes + 1536)))  # + tar headers
    fs, root = storage.fs(out_url, own_retries=True)
    fs.makedirs(root, exist_ok=True)
    # One writer per shard set: a second one on the same --out and --prefix is refused naming the first.
    with claim(posixpath.join(out_url, f"{prefix}.json"), storage, "written"):
        for pattern in (f"{prefix}-*.tar.tmp-*", f"{prefix}.*.tmp-*"):  # left by a writer that was killed
            remove_leftovers(fs, posixpath.join(root, pattern))
        return _write_claimed(items, out_url, prefix, fs, root, storage, samples_per_shard, resize, quality,
                              processes, classes, progress)


def _write_claimed(items: Sequence[Item], out_url: str, prefix: str, fs, root: str, storage: Storage,
                   samples_per_shard: int, resize: int | None, quality: int, processes: int,
                   classes: list[str] | None, progress: bool) -> dict:
    token = uuid.uuid4().hex[:8]
    groups = [items[i:i + samples_per_shard] for i in range(0, len(items), samples_per_shard)]
    jobs = [(out_url, f"{prefix}-{i:06d}.tar", token, g, resize, quality, storage) for i, g in enumerate(groups)]
    counter = multiprocessing.Value("q", 0)
    with ProcessPoolExecutor(max(1, processes), initializer=_init_worker, initargs=(counter,)) as pool:
        futures = [pool.submit(_write_one, job) for job in jobs]
        _follow(futures, counter, len(items), f"writing {out_url}" if progress else "")
        results = [f.result() for f in futures]  # in shard order: the manifest lists shards by name
    shards, bad = [entry for entry, _ in results], sum(n for _, n in results)
    labels = [label for _, _, label in items]
    manifest = make_manifest(shards, classes or None, num_classes=None if classes else max(labels) + 1, skipped=bad)
    publish_manifest(manifest, fs, posixpath.join(root, f"{prefix}.json"))
    return manifest


def _follow(futures: list, counter: object, total: int, desc: str) -> None:
    """Wait for the shards; with ``desc``, a progress bar of images (a shard of 256 MB holds thousands)."""
    bar = None
    if desc:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="img", desc=desc)
        except ImportError:
            pass
    pending = set(futures)
    while pending:
        finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
        if any(f.exception() is not None for f in finished):
            break  # the caller's result() raises it; the pool's exit cancels the rest
        if bar is not None:
            bar.update(counter.value - bar.n)
    if bar is not None:
        bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.write", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="image folder with one sub-folder per class (any fsspec URL)")
    src.add_argument("--list", help="text file of '<path or URL> <label>' lines")
    src.add_argument("--shards", help="existing shards to re-shard: a URL, brace pattern, glob, folder (its *.tar) "
                     "or manifest; '::' joins several")
    p.add_argument("--label", default=None, help="with --shards: where the labels are: cls (default), txt (a class "
                   "name) or json:FIELD (img2dataset's --save_additional_columns '[\"label\"]' gives json:label)")
    p.add_argument("--out", required=True, help="output directory URL (local, s3://, gs://, ...)")
    p.add_argument("--prefix", default="train")
    p.add_argument("--samples-per-shard", type=int, default=0)
    p.add_argument("--shard-mb", type=float, default=0, help="target shard size (default 256 MB)")
    p.add_argument("--resize", type=int, default=None, help="resize the short side down to this many px")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the shuffle before sharding (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the input's order (folder: class by class)")
    p.add_argument("--s3-endpoint", default="", help="S3-compatible endpoint (else AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.label is not None and not a.shards:
        p.error("--label reads labels from existing shards: give it with --shards")
    try:
        parse_label_source(a.label or "cls")
    except ValueError as exc:
        p.error(f"--label: {exc}")
    storage = Storage(s3_endpoint=a.s3_endpoint)  # no config here: the flags; the pool's processes get it too
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        classes = None
        if a.folder:
            items, classes = items_from_folder(a.folder, storage)
        elif a.list:
            items = items_from_list(a.list, storage)
        else:
            items, classes = items_from_shards(a.shards, storage, a.label or "cls")
        if not a.no_shuffle:
            order = np.random.default_rng(a.shuffle_seed).permutation(len(items))
            items = [items[i] for i in order]
        manifest = write(items, a.out, a.prefix, storage=storage, samples_per_shard=a.samples_per_shard,
                         shard_mb=a.shard_mb or (0 if a.samples_per_shard else 256), resize=a.resize,
                         quality=a.quality, processes=a.processes, classes=classes, progress=not a.no_progress)
    except (DataSpecError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to {a.out}/{a.prefix}.json"
          + (f" ({manifest['skipped']} unreadable images skipped)" if manifest["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
