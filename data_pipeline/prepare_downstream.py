"""Write standard downstream (transfer) sets to shards, from files the user already has.

  python -m data_pipeline.prepare_downstream cifar10    ~/data/cifar-10-python.tar.gz  s3://b/down/cifar10
  python -m data_pipeline.prepare_downstream cifar100   ~/data/cifar-100-binary/        /data/down/cifar100
  python -m data_pipeline.prepare_downstream pets       ~/data/oxford-iiit-pet/         /data/down/pets
  python -m data_pipeline.prepare_downstream flowers102 ~/data/flowers102/              /data/down/flowers102
  python -m data_pipeline.prepare_downstream imagefolder ~/data/mine/ /data/down/mine   # SRC/<split>/<class>/*

Nothing is downloaded. Sources and their layouts:
  cifar10 / cifar100  the official archives, as the .tar.gz or extracted: the binary version
                      (`data_batch_N.bin`, `test_batch.bin` / `train.bin`, `test.bin`) or the python
                      version. The python version is a pickle: it is read with an unpickler that only
                      lets numpy arrays through (anything else is refused, never run) -- still, only
                      give it files from the official archive, on local disk.
  pets                Oxford-IIIT Pet: `images/*.jpg` + `annotations/{trainval,test}.txt`
  flowers102          Oxford Flowers-102: `jpg/image_NNNNN.jpg` + `imagelabels.mat` + `setid.mat`
  imagefolder         `<split>/<class name>/<image>` for any split names (e.g. train/, test/)

Output under OUT (any fsspec URL): `<split>.json` manifests (with class names) plus tar shards,
ready for `eval.fewshot.train` / `.test` and the other evaluators. Unreadable images are skipped
and counted; a missing file or unknown layout stops with one line naming it.
"""
from __future__ import annotations

import argparse
import io
import logging
import pickle
import sys
import tarfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from data_pipeline.errors import DataSpecError
from data_pipeline.image.limits import DEFAULT_MAX_IMAGE_PIXELS, open_image
from data_pipeline.shards.tar_write import encode_jpeg, write_shards
from data_pipeline.storage import Storage

log = logging.getLogger(__name__)
Samples = Iterator[tuple[str, bytes, int]]


class _Source:
    """Files of a dataset given as a directory or a .tar/.tar.gz archive, found by base name
    (the archives wrap everything in one top-level folder whose name varies)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise DataSpecError(f"{path}: no such file or directory")
        self.tar = tarfile.open(self.path) if self.path.is_file() else None
        if self.tar is not None:
            self.members = {m.name: m for m in self.tar.getmembers() if m.isfile()}

    def find(self, relative: str) -> str | None:
        """The full name of the file whose path ends with `relative`, or None."""
        if self.tar is not None:
            hits = [n for n in self.members if n == relative or n.endswith("/" + relative)]
        else:
            direct = self.path / relative
            hits = ([str(direct)] if direct.is_file()
                    else [str(p) for p in self.path.glob(f"*/{relative}") if p.is_file()])
        return sorted(hits, key=len)[0] if hits else None

    def read(self, name: str) -> bytes:
        if self.tar is not None:
            return self.tar.extractfile(self.members[name]).read()
        return Path(name).read_bytes()

    def need(self, relative: str, what: str) -> str:
        name = self.find(relative)
        if name is None:
            raise DataSpecError(f"{self.path}: no '{relative}' found ({what})")
        return name


# ---- CIFAR -------------------------------------------------------------------------------------

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Lets through only what the CIFAR python batches hold (dicts, lists, bytes, numpy arrays);
    any other global in the stream is refused before it can be called."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how protocol-2 pickles written by Python 3 spell bytes: pure, harmless

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")
        return super().find_class(module, name)


def _load_cifar_pickle(data: bytes, name: str) -> dict:
    try:
        # encoding="bytes": the official batches were pickled by Python 2.
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataSpecError(f"{name}: not a CIFAR python batch: {e}") from None


def _cifar_rows(rows: np.ndarray, labels: np.ndarray, prefix: str) -> Samples:
    images = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planes R, G, B -> HWC
    for i, (image, label) in enumerate(zip(images, labels)):
        yield f"{prefix}_{i:05d}", encode_jpeg(np.ascontiguousarray(image), quality=95), int(label)


def cifar(src: _Source, fine: bool) -> tuple[dict[str, Callable[[], Samples]], list[str]]:
    """CIFAR-10 (fine=False) or CIFAR-100 (fine labels): splits and class names."""
    if not fine:
        binary = src.find("data_batch_1.bin")
        files = ({"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]} if binary else
                 {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]})
        meta_name = "batches.meta.txt" if binary else "batches.meta"
        label_key, names_key, record = b"labels", b"label_names", 1 + 3072
    else:
        binary = src.find("train.bin")
        files = {"train": ["train.bin"], "test": ["test.bin"]} if binary else {"train": ["train"], "test": ["test"]}
        meta_name = "fine_label_names.txt" if binary else "meta"
        label_key, names_key, record = b"fine_labels", b"fine_label_names", 2 + 3072
    meta = src.read(src.need(meta_name, "class names"))
    if binary:
        classes = [line.strip() for line in meta.decode().splitlines() if line.strip()]
    else:
        classes = [n.decode() for n in _load_cifar_pickle(meta, meta_name)[names_key]]

    def split(names: list[str], prefix: str) -> Samples:
        for part, name in enumerate(names):
            data = src.read(src.need(name, "a CIFAR batch"))
            if binary:
                if len(data) % record:
                    raise DataSpecError(f"{name}: {len(data)} bytes is not a whole number of {record}-byte records")
                arr = np.frombuffer(data, np.uint8).reshape(-1, record)
                labels, rows = arr[:, record - 3073], arr[:, record - 3072:]
            else:
                batch = _load_cifar_pickle(data, name)
                rows, labels = np.asarray(batch[b"data"], np.uint8), np.asarray(batch[label_key])
            yield from _cifar_rows(rows, labels, f"{prefix}{part}")

    return {s: (lambda s=s, names=names: split(names, s)) for s, names in files.items()}, classes


# ---- image files -------------------------------------------------------------------------------

def _reencode(data: bytes, name: str, max_size: int, skipped: list[str]) -> bytes | None:
    """Decoded, converted to RGB (Pets holds some CMYK and palette images), optionally shrunk, JPEG."""
    try:
        with open_image(data, DEFAULT_MAX_IMAGE_PIXELS) as img:  # the size from the header, before decoding
            img = img.convert("RGB")
            if max_size and min(img.size) > max_size:
                scale = max_size / min(img.size)
                img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
            return encode_jpeg(np.asarray(img), quality=95)
    except Exception as e:  # a corrupt file is skipped, counted and named, never fatal
        log.warning("skipping unreadable image %s: %s", name, e)
        skipped.append(name)
        return None


def pets(src: _Source, max_size: int, skipped: list[str]) -> tuple[dict[str, Callable[[], Samples]], list[str]]:
    lists = {split: src.read(src.need(f"annotations/{split}.txt", "Oxford-IIIT Pet split list")).decode()
             for split in ("trainval", "test")}
    entries = {split: [(ln.split()[0], int(ln.split()[1]) - 1) for ln in text.splitlines()
                       if ln.strip() and not ln.startswith("#")] for split, text in lists.items()}
    names: dict[int, str] = {}
    for stem, label in entries["trainval"] + entries["test"]:
        names[label] = stem.rsplit("_", 1)[0]  # "Abyssinian_100" -> "Abyssinian"
    classes = [names[i] for i in range(len(names))]

    def split(rows: list[tuple[str, int]]) -> Samples:
        for stem, label in rows:
            name = src.need(f"images/{stem}.jpg", "an image listed in the annotations")
            data = _reencode(src.read(name), name, max_size, skipped)
            if data is not None:
                yield stem.replace(".", "_"), data, label

    return {"train": lambda: split(entries["trainval"]), "test": lambda: split(entries["test"])}, classes


def flowers102(src: _Source, max_size: int, skipped: list[str]) -> tuple[dict[str, Callable[[], Samples]], list[str]]:
    from scipy.io import loadmat  # MATLAB v5 files: plain arrays, no code

    labels = loadmat(io.BytesIO(src.read(src.need("imagelabels.mat", "Flowers-102 labels"))))["labels"].ravel()
    setid = loadmat(io.BytesIO(src.read(src.need("setid.mat", "Flowers-102 splits"))))
    classes = [f"flower_{i:03d}" for i in range(1, int(labels.max()) + 1)]

    def split(ids: np.ndarray) -> Samples:
        for i in ids.ravel():
            name = src.need(f"jpg/image_{int(i):05d}.jpg", "an image listed in setid.mat")
            data = _reencode(src.read(name), name, max_size, skipped)
            if data is not None:
                yield f"image_{int(i):05d}", data, int(labels[int(i) - 1]) - 1

    return {s: (lambda key=key: split(setid[key])) for s, key in (("train", "trnid"), ("val", "valid"),
                                                                  ("test", "tstid"))}, classes


def imagefolder(src: _Source, max_size: int, skipped: list[str]) -> tuple[dict[str, Callable[[], Samples]], list[str]]:
    if src.tar is not None:
        raise DataSpecError(f"{src.path}: imagefolder needs an extracted directory, not an archive")
    splits = sorted(p for p in src.path.iterdir() if p.is_dir())
    if not splits:
        raise DataSpecError(f"{src.path}: no split folders (expected <split>/<class>/<image>)")
    classes = sorted({c.name for s in splits for c in s.iterdir() if c.is_dir()})
    index = {c: i for i, c in enumerate(classes)}

    def split(root: Path) -> Samples:
        for c in sorted(p for p in root.iterdir() if p.is_dir()):
            for f in sorted(p for p in c.iterdir() if p.is_file()):
                data = _reencode(f.read_bytes(), str(f), max_size, skipped)
                if data is not None:
                    yield f"{c.name}_{f.stem}".replace(".", "_").replace("/", "_"), data, index[c.name]

    return {s.name: (lambda s=s: split(s)) for s in splits}, classes


KINDS = ("cifar10", "cifar100", "pets", "flowers102", "imagefolder")


def prepare(kind: str, src_path: str, out_url: str, storage: Storage, samples_per_shard: int = 1000,
            max_size: int = 0) -> dict[str, dict]:
    """Write every split of dataset `kind` from `src_path` to `out_url`; returns the manifests."""
    src, skipped = _Source(src_path), []
    if kind in ("cifar10", "cifar100"):
        splits, classes = cifar(src, fine=kind == "cifar100")
    elif kind == "pets":
        splits, classes = pets(src, max_size, skipped)
    elif kind == "flowers102":
        splits, classes = flowers102(src, max_size, skipped)
    elif kind == "imagefolder":
        splits, classes = imagefolder(src, max_size, skipped)
    else:
        raise DataSpecError(f"unknown dataset kind {kind!r}; choose one of {', '.join(KINDS)}")
    manifests = {name: write_shards(samples(), out_url, name, samples_per_shard, classes=classes, storage=storage)
                 for name, samples in splits.items()}
    if skipped:
        log.warning("%d unreadable image(s) skipped, first: %s", len(skipped), skipped[0])
    return manifests


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.prepare_downstream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=KINDS)
    p.add_argument("src", help="the dataset as the user has it: a directory or the official .tar(.gz)")
    p.add_argument("out", help="output directory (local path or fsspec URL)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--max-size", type=int, default=0,
                   help="shrink images whose shorter side is larger than this (0: keep sizes)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        # No config here: the output URL takes the default storage settings (fsspec's, from the environment).
        manifests = prepare(args.kind, args.src, args.out, Storage(), args.samples_per_shard, args.max_size)
    except DataSpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out.rstrip("/")
    for name, m in manifests.items():
        print(f"{name:6s} {m['num_samples']:7d} images, {m['num_classes']} classes -> {out}/{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
