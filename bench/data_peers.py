"""Input throughput at real image sizes: this project against a torchvision-style loader and the peers.

Every contender does the same work per sample: JPEG decode, RandomResizedCrop(224) (torchvision's
parameters), horizontal flip with p=0.5, uint8 HWC pixels, batches of 128 from 2 DataLoader workers:

    torchvision_files  torch DataLoader over JPEG files, PIL decode + crop/flip (written with PIL + torch:
                       torchvision's own ops are not usable on this CPU torch build)
    ours               our TrainLoader over our shards + manifest (plan-based reader, crop-aware decode)
    webdataset         the webdataset library over the same tar shards, PIL decode
    mds                MosaicML Streaming (MDS shards), PIL decode
    litdata            litdata (optimize()'d chunks), PIL decode
    decode_only        the ceiling: simplejpeg full decode of the same files in one process, nothing else
                       (no crop, no batches, no loader); ``x_ceiling`` = a row's img/CPU-s over this one
    ours_transform     our per-sample work alone in one process: partial decode, crop, resize, flip of the same
                       files (no reading, batching or workers): the floor under the ``ours`` row

``--baseline DIR`` adds ``ours_baseline``: the ``ours`` row run from another checkout (e.g. a worktree of the
previous commit), interleaved with the rest, for a before/after within one run.

A consumer hands each batch back once counted (``Batch.release``), as training does once the pixels are on
the device: our workers then reuse their shared buffers. Other loaders' batches need no handing back.

Image sets, generated (smooth 1/f^1.5 fields + 1/f^0.8 texture + soft-edged shapes, quality 90, 4:2:0):
``imagenet`` 500x375 (~110 KB), ``laion`` 1024x768 (~360 KB), ``small`` 256x256.

Each measurement runs in its own process (peers under ``--peers-python``, default /work/venv-peers when
present, since they must not be installed into the project's venv); contenders are interleaved per
repetition and the median is reported. ``img_per_cpu_s`` divides by the CPU seconds of the process and
its DataLoader workers (psutil, after two warm-up batches), which stays meaningful on a shared machine.

    python bench/data_peers.py --out bench/results/data_peers_cpu.json     # the table (~20 min, 2 cores)
    python bench/data_peers.py --quick                                      # smoke run (seconds)
"""
from __future__ import annotations

import argparse
import datetime
import io
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZE, BATCH, WORKERS = 224, 128, 2
SETS = {"imagenet": (500, 375, 42.0), "laion": (1024, 768, 24.0), "small": (256, 256, 12.0)}
CONTENDERS = ("torchvision_files", "ours", "webdataset", "mds", "litdata", "decode_only", "ours_transform")
PEERS = {"webdataset": "webdataset", "mds": "streaming", "litdata": "litdata"}
DEFAULT_PEERS_PY = "/work/venv-peers/bin/python"


def natural_image(w: int, h: int, rng: np.random.Generator, detail: float) -> np.ndarray:
    """Photo-like uint8 RGB: a smooth 1/f^1.5 field, 1/f^0.8 texture of strength ``detail``, soft discs."""
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0

    def field(alpha: float) -> np.ndarray:
        spec = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** alpha
        spec[0, 0] = 0
        x = np.fft.irfft2(spec, s=(h, w))
        return x / x.std()

    lum = 45 * field(1.5) + detail * field(0.8)
    img = np.stack([lum + 20 * field(1.6) + 128, lum + 128, lum - 20 * field(1.6) + 128], -1)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * min(w, h)
        m = np.clip((r - np.hypot(xx - cx, yy - cy)) / 2.0, 0, 1)[..., None]
        img = img * (1 - m) + m * (rng.uniform(30, 220, 3) + 0.6 * (img - img.mean()))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_jpegs(kind: str, n: int, distinct: int = 32, seed: int = 0) -> list[bytes]:
    """``n`` JPEGs of set ``kind`` (``distinct`` different images, repeated), PIL quality 90."""
    from PIL import Image

    w, h, detail = SETS[kind]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(min(n, distinct)):
        buf = io.BytesIO()
        Image.fromarray(natural_image(w, h, rng, detail)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return [out[i % len(out)] for i in range(n)]


# ---------------------------------------------------------------- the per-sample work of the PIL contenders

def pil_crop_flip(img, rng: np.random.Generator):
    """RandomResizedCrop(224) in one pass (resize with box, bilinear) + flip, as uint8 torch HWC."""
    import torch
    from PIL import Image

    from data_pipeline.image.transforms import random_resized_crop_params

    img = img.convert("RGB")
    top, left, h, w = random_resized_crop_params(img.width, img.height, rng)
    img = img.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(img, dtype=np.uint8))


def _pil(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))


# ---------------------------------------------------------------- writing each contender's format

def prepare(kind: str, n: int, root: Path) -> None:
    """Files, our shards (which webdataset reads too) for set ``kind`` under ``root``."""
    from data_pipeline.shards.tar_write import write_shards
    from data_pipeline.storage import Storage

    images = make_jpegs(kind, n)
    (root / "files").mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(images):
        (root / "files" / f"{i:06d}.jpg").write_bytes(data)
    write_shards(((f"s{i:06d}", d, i % 10) for i, d in enumerate(images)), str(root / "shards"), "train",
                 max(1, n // 8), storage=Storage())


def prepare_peer(name: str, root: Path) -> None:
    """MDS / litdata copies of ``root/files`` (run under the peers' interpreter)."""
    files = sorted((root / "files").glob("*.jpg"))
    if name == "mds":
        from streaming import MDSWriter

        with MDSWriter(out=str(root / "mds"), columns={"jpg": "bytes", "cls": "int"}, compression=None,
                       size_limit=1 << 26) as writer:
            for i, path in enumerate(files):
                writer.write({"jpg": path.read_bytes(), "cls": i % 10})
    elif name == "litdata":
        from litdata.streaming.writer import BinaryWriter

        writer = BinaryWriter(str(root / "litdata"), chunk_bytes="64MB")
        for i, path in enumerate(files):
            writer.add_item(i, {"jpg": path.read_bytes(), "cls": i % 10})
        writer.done()
        writer.merge()


# ---------------------------------------------------------------- one measurement (in a child process)

def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its live children (the DataLoader workers)."""
    import psutil

    total = 0.0
    for proc in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _count(batch) -> int:
    """Images in one batch: a tensor or array of them, a list whose first item is one (images, labels), a
    dict of such, or a list of per-image arrays (the decode-only ceiling: not its first image's height)."""
    if isinstance(batch, dict):
        batch = batch["jpg"]
    if isinstance(batch, (list, tuple)):
        first = batch[0]
        return len(first) if isinstance(first, (list, tuple)) else first.shape[0]
    return len(batch)


def time_loader(loader, n_images: int) -> dict:
    it = iter(loader)
    for _ in range(2):
        next(it)  # start-up (worker fork, first shard open) is not throughput
    t0, c0, seen = time.perf_counter(), cpu_seconds(), 0
    # At least 5 clock ticks of CPU: a few images may all be prefetched already, and 0 CPU seconds is no rate.
    while seen < n_images or cpu_seconds() - c0 < 0.05:
        batch = next(it)
        seen += _count(batch)
        if hasattr(batch, "release"):
            batch.release()  # training hands a batch back once its pixels are on the device
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"img_s": seen / wall, "img_per_cpu_s": seen / cpu}


def _stub_torchvision() -> None:
    """mosaicml-streaming imports torchvision at import time; the registry's torchvision does not load on this
    CPU torch build, and the MDS reader needs none of it."""
    import importlib.machinery
    import types

    def mod(name: str, **attrs) -> None:
        m = types.ModuleType(name)
        m.__spec__, m.__path__ = importlib.machinery.ModuleSpec(name, None), []
        m.__dict__.update(attrs)
        sys.modules[name] = m

    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure: use the stub
        for name in [k for k in sys.modules if k.startswith("torchvision")]:
            del sys.modules[name]
        mod("torchvision")
        mod("torchvision.datasets", VisionDataset=type("VisionDataset", (), {}))
        mod("torchvision.transforms")
        mod("torchvision.transforms.functional", to_tensor=None)


def build_loader(name: str, root: Path):
    import torch

    torch.set_num_threads(1)
    if name == "torchvision_files":
        files = sorted(str(p) for p in (root / "files").glob("*.jpg"))
        return torch.utils.data.DataLoader(_FilesDataset(files * 4), batch_size=BATCH, shuffle=True,
                                           num_workers=WORKERS)
    if name == "decode_only":
        import simplejpeg

        return _per_image(root, lambda i, data: simplejpeg.decode_jpeg(data))
    if name == "ours_transform":
        from data_pipeline.image.transforms import TrainTransform
        from data_pipeline.stream.train_worker import augment_rng

        transform = TrainTransform(SIZE)
        return _per_image(root, lambda i, data: transform(data, augment_rng(0, 0, 0, i)))
    if name == "ours":
        from data_pipeline.image.transforms import TrainTransform
        from data_pipeline.storage import Storage
        from data_pipeline.stream.train_loader import TrainLoader

        return TrainLoader(str(root / "shards" / "train.json"), batch_size=BATCH, transform=TrainTransform(SIZE),
                           seed=0, num_workers=WORKERS, shuffle_buffer=1000, storage=Storage())
    if name == "webdataset":
        import webdataset as wds

        urls = sorted(str(p) for p in (root / "shards").glob("*.tar"))
        ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).repeat().decode("pil")
              .to_tuple("jpg", "cls").map(_WdsTransform()))
        return torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=WORKERS)
    if name == "mds":
        _stub_torchvision()
        from streaming import StreamingDataset

        class MDSImages(StreamingDataset):
            def __getitem__(self, i: int):
                s = super().__getitem__(i)
                return pil_crop_flip(_pil(s["jpg"]), np.random.default_rng(i)), s["cls"]

        ds = MDSImages(local=str(root / "mds"), batch_size=BATCH, shuffle=False)
        return _Looping(lambda: torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=WORKERS,
                                                            persistent_workers=True))
    if name == "litdata":
        from litdata import StreamingDataLoader, StreamingDataset

        class LitImages(StreamingDataset):
            def __getitem__(self, i):
                s = super().__getitem__(i)
                return pil_crop_flip(_pil(s["jpg"]), np.random.default_rng(s["cls"] * 7919 + 1)), s["cls"]

        return _Looping(lambda: StreamingDataLoader(LitImages(str(root / "litdata")), batch_size=BATCH,
                                                    num_workers=WORKERS, persistent_workers=True))
    raise ValueError(f"unknown contender {name!r}")


def _per_image(root: Path, fn):
    """One process, no loader: batches of ``fn(i, jpeg bytes)`` over the set's files, round and round."""
    data = [p.read_bytes() for p in sorted((root / "files").glob("*.jpg"))]
    for i in itertools.count(0, BATCH):
        yield [fn(i + k, data[(i + k) % len(data)]) for k in range(BATCH)], None


class _Looping:
    """Epochs back to back (a loader whose iterator ends at the end of its data set)."""

    def __init__(self, make) -> None:
        self.loader = make()

    def __iter__(self):
        while True:
            yield from self.loader


class _FilesDataset:
    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        return pil_crop_flip(Image.open(self.paths[i]), np.random.default_rng(i)), 0


class _WdsTransform:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, sample):
        self.n += 1
        return pil_crop_flip(sample[0], np.random.default_rng(self.n)), int(sample[1])


def child(args: argparse.Namespace) -> None:
    """Run one contender once on one image set; print one JSON line (or the reason it cannot run)."""
    sys.path.insert(0, str(ROOT))
    root = Path(args.dir)
    try:
        if args.contender in PEERS:
            if args.contender == "mds":
                _stub_torchvision()
            __import__(PEERS[args.contender])
    except Exception as exn:  # noqa: BLE001 - a missing or broken peer is skipped with the reason
        print(json.dumps({"skipped": f"{PEERS[args.contender]} not importable: {type(exn).__name__}: {exn}"}))
        return
    if args.prepare:
        prepare_peer(args.contender, root)
        print(json.dumps({"prepared": True}))
        return
    print(json.dumps(time_loader(build_loader(args.contender, root), args.images)))


# ---------------------------------------------------------------- the driver

def _run_child(py: str, contender: str, root: Path, images: int, prepare_only: bool = False,
               tree: Path = ROOT) -> dict:
    """One measurement in its own process; ``tree``: the checkout whose code (and copy of this script) runs."""
    cmd = [py, str(tree / "bench" / "data_peers.py"), "--child", contender, "--dir", str(root), "--images",
           str(images)]
    if prepare_only:
        cmd.append("--prepare")
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"{contender} failed (exit {proc.returncode}): {tail[:300]}"}
    return json.loads(lines[-1])


PEER_PACKAGES = ("torch", "numpy", "pillow", "simplejpeg", "webdataset", "mosaicml-streaming", "litdata")


def versions(peers_py: str, packages: tuple[str, ...] = PEER_PACKAGES) -> dict:
    """The installed versions of ``packages``, in this interpreter or else the peers' (None: in neither)."""
    code = ("import json, importlib.metadata as m\nout = {}\n"
            f"for d in {list(packages)!r}:\n"
            "    try:\n        out[d] = m.version(d)\n    except m.PackageNotFoundError:\n        out[d] = None\n"
            "print(json.dumps(out))")
    out = {}
    for py in dict.fromkeys([sys.executable, peers_py]):
        r = subprocess.run([py, "-c", code], capture_output=True, text=True)
        for k, v in (json.loads(r.stdout) if r.returncode == 0 else {}).items():
            out[k] = out.get(k) or v
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    p.add_argument("--images", type=int, default=768, help="images timed per measurement")
    p.add_argument("--repeat", type=int, default=3, help="interleaved repetitions; the median is reported")
    p.add_argument("--peers-python", default=DEFAULT_PEERS_PY if Path(DEFAULT_PEERS_PY).exists() else sys.executable)
    p.add_argument("--quick", action="store_true", help="smoke run: small set, few images, one repetition")
    p.add_argument("--out", default="")
    p.add_argument("--baseline", default="", help="another checkout whose `ours` row is measured too (ours_baseline)")
    p.add_argument("--child", choices=list(CONTENDERS), dest="contender", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.contender:
        return child(a)
    if a.quick:
        a.sets, a.images, a.repeat = ["small"], BATCH, 1
    sys.path.insert(0, str(ROOT))
    from data_pipeline.image.transforms import partial_decode_missing

    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench_peers_"))
    n_files = a.images + 3 * BATCH
    skipped: dict[str, str] = {}
    for kind in a.sets:
        prepare(kind, n_files, tmp / kind)
        for name in [c for c in a.contenders if c in ("mds", "litdata") and c not in skipped]:
            r = _run_child(a.peers_python, name, tmp / kind, a.images, prepare_only=True)
            if "skipped" in r:
                skipped[name] = r["skipped"]
    runs: dict[str, dict[str, list[dict]]] = {k: {} for k in a.sets}
    names = [*a.contenders, *(["ours_baseline"] if a.baseline else [])]
    for _ in range(a.repeat):  # interleaved, so load from other jobs hits every contender alike
        for kind in a.sets:
            for name in [c for c in names if c not in skipped]:
                py = a.peers_python if name in ("mds", "litdata") else sys.executable
                if name == "ours_baseline":
                    r = _run_child(py, "ours", tmp / kind, a.images, tree=Path(a.baseline).resolve())
                else:
                    r = _run_child(py, name, tmp / kind, a.images)
                if "skipped" in r:
                    skipped[name] = r["skipped"]
                else:
                    runs[kind].setdefault(name, []).append(r)
                print(kind, name, {k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()},
                      file=sys.stderr)
    results: dict[str, dict] = {}
    for kind in a.sets:
        table = {}
        for name, rs in runs[kind].items():
            table[name] = {k: float(np.median([r[k] for r in rs])) for k in ("img_s", "img_per_cpu_s")}
            table[name]["runs_img_per_cpu_s"] = [round(r["img_per_cpu_s"], 1) for r in rs]
        base = table.get("torchvision_files")
        peers = [table[n] for n in PEERS if n in table]
        for row in table.values():
            if base:
                row["x_torchvision_cpu"] = row["img_per_cpu_s"] / base["img_per_cpu_s"]
                row["x_torchvision_wall"] = row["img_s"] / base["img_s"]
        ceiling = table.get("decode_only")
        for row in table.values():
            if ceiling:
                row["x_ceiling"] = row["img_per_cpu_s"] / ceiling["img_per_cpu_s"]
        if "ours" in table and peers:
            table["ours"]["x_best_peer_cpu"] = table["ours"]["img_per_cpu_s"] / max(r["img_per_cpu_s"] for r in peers)
        w, h, _ = SETS[kind]
        sizes = [len(b) for b in make_jpegs(kind, 8)]
        results[kind] = {"image_px": [w, h], "mean_jpeg_kb": round(float(np.mean(sizes)) / 1000, 1), **table}
    record = {"bench": "data_peers", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "cpu": platform.processor() or platform.machine(), "os_cpu_count": os.cpu_count(),
              "workers": WORKERS, "batch": BATCH, "output_px": SIZE, "images_timed": a.images, "repeat": a.repeat,
              "loadavg_1m_at_start": load0, "loadavg_1m_at_end": os.getloadavg()[0],
              "python": platform.python_version(), "versions": versions(a.peers_python),
              "ours_partial_decode": not partial_decode_missing(),  # the _jpeg_region extension was built
              "baseline": a.baseline, "skipped": skipped, "results": results}
    shutil.rmtree(tmp, ignore_errors=True)
    publish(record, format_table(record), a.out)


def publish(record: dict, table: str, out: str) -> None:
    """A bench's result: the JSON on stdout (and in ``out``, when given), its table on stderr."""
    print(json.dumps(record, indent=1))
    print(table, file=sys.stderr)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(record, indent=1) + "\n")


def format_table(record: dict) -> str:
    """The markdown table: per-CPU-second ratio to the torchvision-style loader (absolute img/CPU-s)."""
    kinds = list(record["results"])
    lines = ["| pipeline | " + " | ".join(f"{k} {record['results'][k]['image_px'][0]}x"
                                          f"{record['results'][k]['image_px'][1]}" for k in kinds) + " |",
             "|---" * (len(kinds) + 1) + "|"]
    for name in [*CONTENDERS, "ours_baseline"]:
        if not any(name in record["results"][k] for k in kinds):
            continue
        cells = []
        for k in kinds:
            row = record["results"][k].get(name)
            cells.append(f"{row.get('x_torchvision_cpu', float('nan')):.2f} ({row['img_per_cpu_s']:.0f}; "
                         f"{row.get('x_ceiling', float('nan')):.2f} of the ceiling)" if row else "skipped")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
