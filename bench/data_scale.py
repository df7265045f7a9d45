"""Data pipeline at scale, on a moto S3 server on loopback: start-up, bytes read, planning and state size.

    python bench/data_scale.py --out bench/results/data_scale_cpu.json

1. Time to first batch with a manifest of ``--shards`` (10,240) small shards vs one of 10 shards, same
   loader settings (goal: <= 2x): start-up reads the manifest, never the shards.
2. Bytes read from storage per byte of the samples delivered, at 1, 2 and 4 DataLoader workers (goal:
   <= 1.1): with the manifest's offsets each worker range-reads only its own samples.
3. Planning and ``state_dict`` for 512 simulated ranks x 8 workers over 14.2M samples in 10,240 shards:
   the time one rank's workers need to plan their first batches, and the size of the saved data position
   after 1,000 steps (goals: < 1 s, < 1 MB).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.stream.plan import RankSchedule  # noqa: E402
from data_pipeline.shards.tar_write import encode_jpeg, write_shards  # noqa: E402
from data_pipeline.storage import Storage  # noqa: E402
from data_pipeline.stream.train_loader import TrainLoader  # noqa: E402
from data_pipeline.image.transforms import TrainTransform  # noqa: E402


def _server():
    from moto.server import ThreadedMotoServer
    import boto3
    import socket

    for k, v in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                 ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(k, v)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request log lines
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    return server, endpoint


def _upload(endpoint: str, local: Path, prefix: str) -> None:
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).put(str(local) + "/", f"s3://bench/{prefix}/",
                                                                     recursive=True)


def _loader(spec: str, storage: Storage, workers: int, batch: int = 32) -> TrainLoader:
    return TrainLoader(spec, batch_size=batch, transform=TrainTransform(32), seed=0, num_workers=workers,
                       shuffle_buffer=1000, storage=storage)


def first_batch_s(spec: str, storage: Storage) -> float:
    t0 = time.perf_counter()
    it = iter(_loader(spec, storage, workers=2))
    next(it)
    took = time.perf_counter() - t0
    del it
    return took


def bytes_per_sample(spec: str, storage: Storage, sizes: dict[str, int], workers: int, batches: int) -> dict:
    loader = _loader(spec, storage, workers)
    it = iter(loader)
    wanted = 0
    for _ in range(batches):
        wanted += sum(sizes[k] for k in next(it).keys)
    got = loader.bytes_read
    del it
    # bytes_read includes what the workers prefetched for batches not yet delivered: an upper bound.
    return {"workers": workers, "samples": batches * 32, "bytes_read": got, "sample_bytes": wanted,
            "ratio": round(got / wanted, 4)}


def planning(ranks: int, workers: int, shards: int, per_shard: int, batch: int, steps: int) -> dict:
    counts = [[per_shard] * shards]
    args = dict(counts=counts, weights=[1.0], batch_size=batch, seed=0, window=10000, resampled=False,
                world_size=ranks)
    t0 = time.perf_counter()
    for w in range(workers):  # what each worker of the last rank does before its first batch
        schedule = RankSchedule(rank=ranks - 1, **args)
        for _ in range(w + 1):
            schedule.next()
    plan_s = time.perf_counter() - t0
    schedule = RankSchedule(rank=0, **args)
    for _ in range(steps):
        schedule.next()
    t0 = time.perf_counter()
    state = schedule.state()
    state_s = time.perf_counter() - t0
    size = len(json.dumps(state))
    return {"ranks": ranks, "workers_per_rank": workers, "samples": shards * per_shard, "steps": steps,
            "plan_first_batches_s": round(plan_s, 4), "state_dict_s": round(state_s, 4), "state_dict_bytes": size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=10240)
    p.add_argument("--out", default="bench/results/data_scale_cpu.json")
    a = p.parse_args()
    server, endpoint = _server()
    storage = Storage(s3_endpoint=endpoint)
    rng = np.random.default_rng(0)
    jpgs = [encode_jpeg(rng.integers(0, 255, (32 + i, 32, 3), dtype=np.uint8)) for i in range(16)]
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        many = write_shards(((f"m{i:07d}", jpgs[i % 16], i % 10) for i in range(a.shards * 2)), f"{tmp}/many",
                            "train", 2, storage=Storage())
        few = write_shards(((f"f{i:07d}", jpgs[i % 16], i % 10) for i in range(20)), f"{tmp}/few", "train", 2,
                           storage=Storage())
        mid = write_shards(((f"d{i:07d}", jpgs[i % 16], i % 10) for i in range(64 * 40)), f"{tmp}/mid", "train", 40,
                           storage=Storage())
        for name in ("many", "few", "mid"):
            _upload(endpoint, Path(tmp) / name, name)
        setup_s = time.perf_counter() - t0
        few_s = [first_batch_s("s3://bench/few/train.json", storage) for _ in range(2)]
        many_s = [first_batch_s("s3://bench/many/train.json", storage) for _ in range(2)]
        results["time_to_first_batch"] = {
            "shards_small": len(few["shards"]), "shards_large": len(many["shards"]),
            "small_s": round(min(few_s), 3), "large_s": round(min(many_s), 3),
            "ratio": round(min(many_s) / min(few_s), 3), "goal": "<= 2"}
        sizes = {f"d{i:07d}": s["offsets"][j + 1] - s["offsets"][j]
                 for n, s in enumerate(mid["shards"]) for j, i in enumerate(range(n * 40, n * 40 + 40))}
        results["bytes_per_sample"] = [bytes_per_sample("s3://bench/mid/train.json", storage, sizes, w, 200)
                                       for w in (1, 2, 4)]
        results["bytes_per_sample_goal"] = "<= 1.1"
    results["planning_512x8"] = planning(512, 8, 10240, 1387, 8, 1000)
    results["planning_goal"] = "< 1 s, < 1 MB"
    server.stop()
    record = {"bench": "data_scale", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "torch": torch.__version__, "setup_s": round(setup_s, 1),
              **results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
