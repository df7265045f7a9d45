"""Generate (once) the demo's data: synthetic shapes for pre-training, handwritten digits downstream.

Layout under ``root``::

    shapes/train.json  shapes/val.json  (+ shards)
    digits/train.json  digits/test.json (+ shards)
    DONE.json          the parameters it was generated with, written last

Everything is written in place and DONE.json last, so an interrupted generation is never mistaken for
a finished one (it is cleared and written again); no rename is needed, so ``root`` may be a local path
or an object-storage URL (``s3://bucket/demo``). Call it from one process
(rank 0) and let the others wait: concurrent generators of the same root are not coordinated.
"""
from __future__ import annotations

import argparse
import json
import posixpath
import time
from dataclasses import asdict, dataclass

from data_pipeline.errors import DataSpecError
from data_pipeline.storage import Storage

_FORMAT = 2  # bump when the generators change, so existing data are regenerated
_OURS = {"shapes", "digits", "DONE.json"}


@dataclass(frozen=True)
class DemoData:
    """Manifest URLs of the demo data sets."""

    train: str
    val: str
    digits_train: str
    digits_test: str


def _paths(root: str) -> DemoData:
    join = posixpath.join
    return DemoData(train=join(root, "shapes", "train.json"), val=join(root, "shapes", "val.json"),
                    digits_train=join(root, "digits", "train.json"), digits_test=join(root, "digits", "test.json"))


def _read_marker(fs, path: str) -> dict | None:
    try:
        with fs.open(posixpath.join(path, "DONE.json"), "r") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def ensure_demo_data(root: str, storage: Storage, *, image_size: int = 32, num_train: int = 12000,
                     num_val: int = 2000, samples_per_shard: int = 500, seed: int = 0) -> DemoData:
    """Return the demo data under ``root`` (read and written through ``storage``), generating it unless it
    exists with these parameters."""
    root = root.rstrip("/")
    params = {"format": _FORMAT, "image_size": image_size, "num_train": num_train, "num_val": num_val,
              "samples_per_shard": samples_per_shard, "seed": seed}
    fs, path = storage.fs(root, own_retries=True)
    if _read_marker(fs, path) == params:
        return _paths(root)
    if fs.exists(path):
        leftovers = {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
        if not leftovers <= _OURS:
            # Regenerating deletes `root`; never do that to a directory this module did not make.
            raise DataSpecError(f"demo data root {root!r} holds other files ({sorted(leftovers - _OURS)[:3]}); "
                                f"refusing to overwrite it, choose an empty or new directory")

    # Imported only when generating: scikit-learn alone takes seconds to import, the no-op path should not.
    from data_pipeline.demo_data.digits import write_digits
    from data_pipeline.demo_data.synthetic import write_synthetic_shapes

    # Written in place, DONE.json last: the marker, not a rename, is what makes the data complete, so this
    # works alike on local disks and on object storage (which has no directory rename).
    if fs.exists(path):
        fs.rm(path, recursive=True)
    write_synthetic_shapes(posixpath.join(root, "shapes"), storage=storage, num_train=num_train,
                           num_val=num_val, image_size=image_size, samples_per_shard=samples_per_shard, seed=seed)
    # The digits split is fixed (seed 0): the downstream benchmark must not move with the pre-training seed.
    write_digits(posixpath.join(root, "digits"), storage=storage, image_size=image_size,
                 samples_per_shard=256, seed=0)
    with fs.open(posixpath.join(path, "DONE.json"), "w") as f:
        json.dump(params, f, indent=1)
    return _paths(root)


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m data_pipeline.demo --out DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (local path or fsspec URL)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-train", type=int, default=12000)
    parser.add_argument("--num-val", type=int, default=2000)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    # No config here: --out takes the default storage settings (fsspec's, from the environment).
    data = ensure_demo_data(args.out, Storage(), image_size=args.image_size, num_train=args.num_train,
                            num_val=args.num_val, samples_per_shard=args.samples_per_shard, seed=args.seed)
    print(f"demo data ready in {time.perf_counter() - start:.1f} s:")
    for name, url in asdict(data).items():
        print(f"  {name:13s} {url}")


if __name__ == "__main__":
    main()
