"""Node-local shard caches over object storage: bytes from storage and images per second, epochs 1 and 2.

One moto S3 server (real HTTP on loopback) serves every contender's copy of the same images; a WSGI
wrapper counts the bytes of every response body it sends, so "bytes from storage" is measured the same
way for all of them (manifests, indexes and offsets included). Contenders, each in its own process:

    ours_nocache   our TrainLoader, no cache (range reads of each worker's samples)
    ours_cache     our TrainLoader with data.cache (max_bytes = the cache size)
    mds            MosaicML Streaming with cache_limit = the cache size
    litdata        litdata with max_cache_size = the cache size

each at two cache sizes: the whole set ("full") and half of it ("half"). Per epoch: the bytes served
(as a fraction of the set's bytes) and images per second. Every contender decodes each JPEG (full PIL
decode for the peers, ours its crop-aware decode) and crops 224 px, with 2 DataLoader workers.

    python bench/shard_cache.py --out bench/results/shard_cache_cpu.json      # ~3-5 min on 2 busy cores
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from data_peers import DEFAULT_PEERS_PY, _stub_torchvision, make_jpegs, pil_crop_flip, publish, versions  # noqa: E402

BATCH, WORKERS, SIZE = 32, 2, 224
PER_SHARD = 32
CONTENDERS = ("ours_nocache", "ours_cache", "mds", "litdata")


# ---------------------------------------------------------------- the S3 server, counting what it sends

class _Counted:
    """WSGI middleware: adds the length of every response body to ``sent`` (``GET /__sent__`` reads it)."""

    def __init__(self, app) -> None:
        self.app, self.sent, self.lock = app, 0, threading.Lock()

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == "/__sent__":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [str(self.sent).encode()]
        return self._count(self.app(environ, start_response))

    def _count(self, body):
        for chunk in body:
            with self.lock:
                self.sent += len(chunk)
            yield chunk


def start_s3() -> tuple[str, object]:
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    app = _Counted(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server


def sent(endpoint: str) -> int:
    import urllib.request

    with urllib.request.urlopen(f"{endpoint}/__sent__") as r:
        return int(r.read())


# ---------------------------------------------------------------- the set, in each contender's format

def prepare(root: Path, n: int, endpoint: str, peers_py: str) -> int:
    """Writes the set as our shards, MDS and litdata under ``root``, uploads them; the bytes of our shards."""
    import boto3

    from data_pipeline.shards.tar_write import write_shards
    from data_pipeline.storage import Storage

    images = make_jpegs("imagenet", n, distinct=n)
    (root / "files").mkdir(parents=True)
    for i, data in enumerate(images):
        (root / "files" / f"{i:06d}.jpg").write_bytes(data)
    write_shards(((f"s{i:06d}", d, i % 10) for i, d in enumerate(images)), str(root / "ours"), "train", PER_SHARD,
                 storage=Storage())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for peer in ("mds", "litdata"):
        done = subprocess.run([peers_py, __file__, "--child", f"prepare_{peer}", "--dir", str(root)], env=env,
                              capture_output=True, text=True, timeout=600)
        if done.returncode:
            print(f"preparing {peer} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="bench")
    for path in root.rglob("*"):
        if path.is_file() and path.parts[len(root.parts)] in ("ours", "mds", "litdata"):
            s3.upload_file(str(path), "bench", str(path.relative_to(root)))
    return sum(p.stat().st_size for p in (root / "ours").glob("*.tar"))


def prepare_peer(name: str, root: Path) -> None:
    files = sorted((root / "files").glob("*.jpg"))
    shard_bytes = PER_SHARD * files[0].stat().st_size  # about our shards' size
    if name == "prepare_mds":
        _stub_torchvision()
        from streaming import MDSWriter

        with MDSWriter(out=str(root / "mds"), columns={"jpg": "bytes", "cls": "int"}, compression=None,
                       size_limit=shard_bytes) as w:
            for i, p in enumerate(files):
                w.write({"jpg": p.read_bytes(), "cls": i % 10})
    else:
        from litdata.streaming.writer import BinaryWriter

        w = BinaryWriter(str(root / "litdata"), chunk_bytes=shard_bytes)
        for i, p in enumerate(files):
            w.add_item(i, {"jpg": p.read_bytes(), "cls": i % 10})
        w.done()
        w.merge()


# ---------------------------------------------------------------- one contender, two epochs (child process)

def _loader(name: str, root: Path, endpoint: str, cache_bytes: int, n: int):
    import torch

    torch.set_num_threads(1)
    cache = root / f"cache-{name}-{os.getpid()}"
    if name.startswith("ours"):
        from data_pipeline.image.transforms import TrainTransform
        from data_pipeline.storage import Storage
        from data_pipeline.storage.cache import ShardCache
        from data_pipeline.stream.train_loader import TrainLoader

        loader = TrainLoader("s3://bench/ours/train.json", batch_size=BATCH, transform=TrainTransform(SIZE), seed=0,
                             num_workers=WORKERS, shuffle_buffer=256, storage=Storage(s3_endpoint=endpoint),
                             cache=ShardCache(str(cache), cache_bytes) if name == "ours_cache" else None)
        it = iter(loader)
        return lambda: (next(it) for _ in range(n // BATCH))
    if name == "mds":
        os.environ["S3_ENDPOINT_URL"] = endpoint
        _stub_torchvision()
        from streaming import StreamingDataset

        class MDSImages(StreamingDataset):
            def __getitem__(self, i: int):
                s = super().__getitem__(i)
                from PIL import Image
                import io
                return pil_crop_flip(Image.open(io.BytesIO(s["jpg"])), np.random.default_rng(i)), s["cls"]

        ds = MDSImages(remote="s3://bench/mds", local=str(cache), batch_size=BATCH, shuffle=True, shuffle_seed=0,
                       cache_limit=cache_bytes)
        dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=WORKERS, persistent_workers=True)
        return lambda: iter(dl)
    if name == "litdata":
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        from litdata import StreamingDataLoader, StreamingDataset
        from litdata.streaming import downloader

        if isinstance(getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None), dict):  # its Rust client: plain http
            downloader._OBSTORE_CLIENT_OPTIONS = {**downloader._OBSTORE_CLIENT_OPTIONS, "allow_http": True}

        class LitImages(StreamingDataset):
            def __getitem__(self, i):
                s = super().__getitem__(i)
                from PIL import Image
                import io
                return pil_crop_flip(Image.open(io.BytesIO(s["jpg"])), np.random.default_rng(s["cls"])), s["cls"]

        ds = LitImages("s3://bench/litdata", cache_dir=str(cache), max_cache_size=cache_bytes, shuffle=True, seed=0)
        dl = StreamingDataLoader(ds, batch_size=BATCH, num_workers=WORKERS, persistent_workers=True)
        return lambda: iter(dl)
    raise ValueError(name)


def child(name: str, root: Path, endpoint: str, cache_bytes: int, n: int) -> dict:
    epoch = _loader(name, root, endpoint, cache_bytes, n)
    out = {}
    for e in (1, 2):
        b0, t0, seen = sent(endpoint), time.perf_counter(), 0
        for batch in epoch():
            seen += len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)
        out[f"epoch{e}"] = {"images": seen, "img_s": seen / (time.perf_counter() - t0), "bytes": sent(endpoint) - b0}
    return out


# ---------------------------------------------------------------- the driver

PACKAGES = ("torch", "moto", "s3fs", "mosaicml-streaming", "litdata")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=384, help="images in the set (ImageNet-sized JPEGs, ~110 KB)")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    p.add_argument("--peers-python", default=DEFAULT_PEERS_PY if Path(DEFAULT_PEERS_PY).exists() else sys.executable)
    p.add_argument("--out", default="")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    p.add_argument("--cache-bytes", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        if a.child.startswith("prepare_"):
            return prepare_peer(a.child, Path(a.dir))
        print(json.dumps(child(a.child, Path(a.dir), a.endpoint, a.cache_bytes, a.images)))
        return
    load0 = os.getloadavg()
    endpoint, server = start_s3()
    tmp = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    total = prepare(tmp, a.images, endpoint, a.peers_python)
    results: dict = {}
    for size_name, cache_bytes in (("full", int(total * 1.1)), ("half", total // 2)):
        for name in a.contenders:
            if name == "ours_nocache" and size_name == "half":
                results[f"{name}/{size_name}"] = results[f"{name}/full"]
                continue
            py = a.peers_python if name in ("mds", "litdata") else sys.executable
            cmd = [py, __file__, "--child", name, "--dir", str(tmp), "--endpoint", endpoint,
                   "--cache-bytes", str(cache_bytes), "--images", str(a.images)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                  timeout=900)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "error" in ln]
                tail = (errors or proc.stderr.strip().splitlines() or ["no output"])[-1]
                results[f"{name}/{size_name}"] = {"skipped": f"exit {proc.returncode}: {tail[:300]}"}
            else:
                r = json.loads(lines[-1])
                for e in r.values():
                    e["storage_fraction"] = round(e["bytes"] / total, 3)
                results[f"{name}/{size_name}"] = {"cache_bytes": cache_bytes, **r}
            print(size_name, name, json.dumps(results[f"{name}/{size_name}"]), file=sys.stderr)
    server.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    record = {"bench": "shard_cache", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg(), "python": platform.python_version(),
              "versions": versions(a.peers_python, PACKAGES), "images": a.images, "set_bytes": total, "batch": BATCH,
              "workers": WORKERS, "results": results}
    publish(record, format_table(record), a.out)


def format_table(record: dict) -> str:
    """Markdown: per cache size and contender, the storage fraction and img/s of epochs 1 and 2."""
    lines = ["| cache | pipeline | epoch 1 from storage | epoch 2 from storage | epoch 1 img/s | epoch 2 img/s |",
             "|---|---|---|---|---|---|"]
    for key, r in record["results"].items():
        name, size = key.split("/")
        if "skipped" in r:
            lines.append(f"| {size} | {name} | skipped: {r['skipped'][:80]} | | | |")
            continue
        e1, e2 = r["epoch1"], r["epoch2"]
        lines.append(f"| {size} | {name} | {e1['storage_fraction']:.0%} | {e2['storage_fraction']:.0%} | "
                     f"{e1['img_s']:.0f} | {e2['img_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
