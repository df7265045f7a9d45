"""Images/s per CPU core of the training input pipeline vs a plain PIL + DataLoader baseline.

Both pipelines do decode + RandomResizedCrop(224) + flip + collate to uint8 batches from the same
256-px JPEGs, with the same number of worker processes, in the same run:

    ours      TrainLoader over webdataset shards (simplejpeg/PIL-draft decode, plan-based reader)
    baseline  torch.utils.data.DataLoader over the JPEGs as files, PIL decode, numpy crop/flip
    ours_s3   (--s3) the same shards served by a moto S3 server on loopback

    python bench/data_throughput.py --workers 2 --images 2000 --s3 --out bench/results/data_cpu.json

``img_s`` is wall-clock images/s; ``img_per_cpu_s`` divides by the CPU seconds the main process and
its workers actually used, which stays meaningful when other jobs share the machine's cores.

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

from data_pipeline.shards.tar_write import encode_jpeg, write_shards  # noqa: E402
from data_pipeline.storage import Storage  # noqa: E402
from data_pipeline.stream.train_loader import TrainLoader  # noqa: E402
from data_pipeline.image.transforms import TrainTransform, random_resized_crop_params  # noqa: E402
from bench.data_peers import cpu_seconds  # noqa: E402  (one CPU-time count for both data benches)

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


_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class FilesDataset(torch.utils.data.Dataset):
    """The plain baseline: one JPEG file per sample, PIL decode, crop, flip.

    ``recipe="torchvision"`` is the canonical ImageNet recipe written out without torchvision:
    RandomResizedCrop (crop, then resize), RandomHorizontalFlip, ToTensor (float / 255), Normalize,
    float32 batches. ``recipe="uint8"`` is a stronger baseline: one-pass crop+resize, uint8 out.
    """

    def __init__(self, paths: list[str], recipe: str) -> None:
        self.paths, self.recipe = paths, recipe

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        rng = np.random.default_rng(i)
        img = Image.open(self.paths[i]).convert("RGB")
        top, left, h, w = random_resized_crop_params(img.width, img.height, rng)
        if self.recipe == "uint8":
            img = img.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        else:
            img = img.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8))
        if self.recipe == "uint8":
            return pixels, 0
        return (pixels.permute(2, 0, 1).float().div(255) - _MEAN) / _STD, 0


def time_loader(batches, n_images: int) -> dict:
    """Wall-clock img/s and img per CPU-second (robust to other load on a shared machine)."""
    it = iter(batches)
    for _ in range(2):
        next(it)  # start-up (worker spawn, first shard open) is not throughput
    t0, c0, seen = time.perf_counter(), cpu_seconds(), 0
    while seen < n_images:
        b = next(it)
        seen += b[0].shape[0] if isinstance(b, (list, tuple)) else len(b)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    del it
    return {"img_s": seen / wall, "img_per_cpu_s": seen / cpu}


def time_gpu_path(spec: str, workers: int, n_images: int, batch: int) -> dict:
    """decode: gpu — workers plan crops from headers, the device decodes (nvJPEG) and crops."""
    from data_pipeline.image.gpu_decode import CropPlanner, decode_batch

    device = torch.device("cuda")
    loader = TrainLoader(spec, batch_size=batch, transform=CropPlanner(TrainTransform(SIZE)), seed=0,
                         num_workers=workers, shuffle_buffer=1000, pin_memory=True, storage=Storage())
    it = iter(loader)
    for _ in range(2):
        b = next(it)
        decode_batch(b.encoded, b.crops, SIZE, device)
    torch.cuda.synchronize()
    t0, seen = time.perf_counter(), 0
    while seen < n_images:
        b = next(it)
        images, keep = decode_batch(b.encoded, b.crops, SIZE, device)
        seen += int(keep.sum())
    torch.cuda.synchronize()
    return {"img_s": seen / (time.perf_counter() - t0)}


def time_b16_step(batch: int = 256, steps: int = 10) -> dict:
    """Images/s one Mixer-B/16 bf16 training step consumes on this GPU (the rate the input must beat)."""
    from pretrain.models import create_model

    model = create_model("mixer_b16_224", num_classes=1000).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, 3, SIZE, SIZE, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return {"img_s": batch * steps / (time.perf_counter() - t0), "batch": batch}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--images", type=int, default=2000, help="images timed per pipeline")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3, help="interleaved repetitions; the median is reported")
    p.add_argument("--s3", action="store_true", help="also read the shards from a moto S3 server")
    p.add_argument("--gpu", action="store_true", help="also time gpu decode and a B/16 bf16 step (CUDA)")
    p.add_argument("--files", type=int, default=2000, help="distinct JPEGs written (shards and files)")
    p.add_argument("--out", default="")
    a = p.parse_args()
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    images = make_images(a.files)
    files = []
    for i, data in enumerate(images):
        path = tmp / "files" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files.append(str(path))
    write_shards(((f"s{i:05d}", d, i % 10) for i, d in enumerate(images)), str(tmp / "shards"), "train",
                 max(10, a.files // 8), storage=Storage())
    cores = a.workers
    results = {}

    def ours(spec: str, storage: Storage) -> float:
        loader = TrainLoader(spec, batch_size=a.batch, transform=TrainTransform(SIZE), seed=0,
                             num_workers=a.workers, shuffle_buffer=1000, storage=storage)
        return time_loader(loader, a.images)

    def baseline(recipe: str) -> dict:
        loader = torch.utils.data.DataLoader(FilesDataset(files * 10, recipe), batch_size=a.batch, shuffle=True,
                                             num_workers=a.workers)
        return time_loader(loader, a.images)

    runs: dict[str, list[dict]] = {}
    for _ in range(a.repeat):  # interleaved, so load from other jobs hits every pipeline alike
        for name, fn in (("baseline_torchvision", lambda: baseline("torchvision")),
                         ("baseline_uint8", lambda: baseline("uint8")),
                         ("ours", lambda: ours(str(tmp / "shards" / "train.json"), Storage()))):
            runs.setdefault(name, []).append(fn())
    for name, rs in runs.items():
        results[name] = {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
        results[name]["runs_img_per_cpu_s"] = [round(r["img_per_cpu_s"], 1) for r in rs]
    if a.s3:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import s3fs

        from tests.servers import S3Server

        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = S3Server()
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.endpoint})
        fs.put(str(tmp / "shards") + "/", server.url("shards") + "/", recursive=True)
        results["ours_s3"] = ours(server.url("shards/train.json"), Storage(s3_endpoint=server.endpoint))
        server.stop()
    if a.gpu:
        from data_pipeline.image.gpu_decode import gpu_decode_available

        why_not = gpu_decode_available(torch.device("cuda"))
        if why_not:
            results["gpu_unavailable"] = why_not
        else:
            results["gpu_decode"] = time_gpu_path(str(tmp / "shards" / "train.json"), a.workers, a.images, a.batch)
            results["b16_bf16_train_step"] = time_b16_step()
            gpu_img_s = results["gpu_decode"]["img_s"]
            results["gpu_decode"]["vs_b16_step"] = gpu_img_s / results["b16_bf16_train_step"]["img_s"]
            results["gpu_decode"]["vs_cpu_path"] = results["gpu_decode"]["img_s"] / results["ours"]["img_s"]
    for r in (v for v in list(results.values()) if isinstance(v, dict) and "img_s" in v and "batch" not in v):
        r["img_s_per_core"] = r["img_s"] / cores
    for recipe in ("torchvision", "uint8"):
        base = results[f"baseline_{recipe}"]
        results[f"speedup_vs_baseline_{recipe}"] = {
            "per_cpu_s": results["ours"]["img_per_cpu_s"] / base["img_per_cpu_s"],
            "wall": results["ours"]["img_s"] / base["img_s"]}
    record = {"bench": "data_throughput", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": torch.cuda.get_device_name() if a.gpu and torch.cuda.is_available() else "cpu",
              "cpu": platform.processor() or platform.machine(), "cores_used": cores,
              "os_cpu_count": os.cpu_count(), "loadavg_1m_at_start": load0, "loadavg_1m_at_end": os.getloadavg()[0],
              "python": platform.python_version(), "torch": torch.__version__, "images": a.images,
              "batch": a.batch, "repeat": a.repeat, "output_px": SIZE, "input_px": 256, **results}
    print(json.dumps(record, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
