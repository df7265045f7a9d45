"""Images/s per CPU core of the training input pipeline vs a plain PIL + DataLoader baseline.

Both pipelines do decode + RandomResizedCrop(224) + flip + collate to uint8 batches from the same
256-px JPEGs, with the same number of worker processes, in the same run:

    ours      TrainLoader over webdataset shards (simplejpeg/PIL-draft decode, plan-based reader)
    baseline  torch.utils.data.DataLoader over the JPEGs as files, PIL decode, numpy crop/flip
    ours_s3   (--s3) the same shards served by a moto S3 server on loopback

    python bench/data_throughput.py --workers 2 --images 2000 --out bench/results/data_cpu.json

With CUDA present, ``--gpu`` also times decode on the device (torchvision.io.decode_jpeg) when available.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.shards import encode_jpeg, write_shards  # noqa: E402
from data_pipeline.stream import TrainLoader  # noqa: E402
from data_pipeline.transforms import TrainTransform, random_resized_crop_params  # noqa: E402

SIZE = 224


def make_images(n: int, seed: int = 0) -> list[bytes]:
    """256-px photos-like JPEGs (smooth gradients + noise, quality 90) so decode cost is realistic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
    out = []
    for _ in range(min(n, 64)):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        img = np.stack([128 + 100 * np.sin(xx * a / 20 + yy * b / 30), 128 + 100 * np.cos(yy * c / 25),
                        (xx + yy) / 2], -1) + rng.normal(0, 12, (256, 256, 3))
        out.append(encode_jpeg(np.clip(img, 0, 255).astype(np.uint8), quality=90))
    return [out[i % len(out)] for i in range(n)]


class FilesDataset(torch.utils.data.Dataset):
    """The plain baseline: one JPEG file per sample, PIL decode, crop, flip."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        rng = np.random.default_rng(i)
        img = Image.open(self.paths[i]).convert("RGB")
        top, left, h, w = random_resized_crop_params(img.width, img.height, rng)
        img = img.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8)), 0


def time_loader(batches, n_images: int, batch: int) -> float:
    it = iter(batches)
    next(it)  # start-up (worker spawn, first shard open) is not throughput
    t0, seen = time.perf_counter(), 0
    while seen < n_images:
        b = next(it)
        seen += b[0].shape[0] if isinstance(b, (list, tuple)) else len(b)
    return seen / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--images", type=int, default=2000, help="images timed per pipeline")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--s3", action="store_true", help="also read the shards from a moto S3 server")
    p.add_argument("--out", default="")
    a = p.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    images = make_images(2000)
    files = []
    for i, data in enumerate(images):
        path = tmp / "files" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files.append(str(path))
    write_shards(((f"s{i:05d}", d, i % 10) for i, d in enumerate(images)), str(tmp / "shards"), "train", 250)
    cores = a.workers
    results = {}

    def ours(spec: str, **kw) -> float:
        loader = TrainLoader(spec, batch_size=a.batch, transform=TrainTransform(SIZE), seed=0,
                             num_workers=a.workers, shuffle_buffer=1000, **kw)
        return time_loader(loader, a.images, a.batch)

    baseline = torch.utils.data.DataLoader(FilesDataset(files * 10), batch_size=a.batch, shuffle=True,
                                           num_workers=a.workers)
    results["baseline_img_s"] = time_loader(baseline, a.images, a.batch)
    results["ours_img_s"] = ours(str(tmp / "shards" / "train.json"))
    if a.s3:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import s3fs

        from data_pipeline.storage import StorageOptions
        from tests.servers import S3Server

        server = S3Server()
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.endpoint})
        fs.put(str(tmp / "shards") + "/", server.url("shards") + "/", recursive=True)
        results["ours_s3_img_s"] = ours(server.url("shards/train.json"),
                                        storage=StorageOptions(s3_endpoint=server.endpoint))
        server.stop()
    for k in list(results):
        results[k.replace("_img_s", "_img_s_per_core")] = results[k] / cores
    results["speedup_vs_baseline"] = results["ours_img_s"] / results["baseline_img_s"]
    record = {"bench": "data_throughput", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": "cpu", "cpu": platform.processor() or platform.machine(), "cores_used": cores,
              "os_cpu_count": os.cpu_count(), "loadavg_1m_at_end": os.getloadavg()[0],
              "python": platform.python_version(), "torch": torch.__version__, "images": a.images,
              "batch": a.batch, "output_px": SIZE, "input_px": 256, **results}
    print(json.dumps(record, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
