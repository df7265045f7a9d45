"""Data pipeline at scale: the manifest's cost per rank and per worker, time to first batch on moto S3,
bytes read per delivered byte, planning and state size; today's format and code beside this branch's,
and MosaicML Streaming and litdata at the same size.

    python bench/data_scale.py --out bench/results/data_scale_cpu.json

Synthetic manifests, generated here (the shards need not all exist): a table of N shards x S samples
whose rows are full size (names, counts, sizes, checksums), all of whose shards are one real shard of S
samples (symlinked / uploaded under the names the first batches read; every row shares its one run of
offsets). So what a rank reads at start-up is the real size, and the first batches read real bytes.

1. Start-up per rank, in a fresh process per case (bench/data_scale_probe.py): CPU seconds, peak RSS
   added, index bytes read, for 1M (1,000 x 1,000), ImageNet-21k (10,240 x 1,400) and LAION-2B
   (230,000 x 10,000) shapes; format 1 read by today's code (``git archive`` of --before, default
   aa352b7) and format 1 and 2 read by this branch. Format 1 at LAION-2B shape (21.6 GB of JSON) is
   not generated: its figures are extrapolated linearly in samples from the ImageNet-21k ones.
2. Private memory (USS) of each DataLoader worker after 20 batches (2 workers), LAION-2B shape vs a
   10-shard manifest (the difference is what the manifest's size adds per worker).
3. Time to first batch through moto S3, LAION-2B shape vs 10 shards (goal: <= 2x).
4. Bytes read from storage per byte of the samples delivered, at 1, 2 and 4 DataLoader workers (goal:
   <= 1.1): each worker range-reads only its own samples, plus the offsets of the shards it starts.
5. Planning and ``state_dict`` for 4,096 simulated ranks x 8 workers over the LAION-2B shape: the time
   one rank's workers need to plan their first batches, and the size of the saved data position after
   1,000 steps (goals: < 1 s, < 1 MB).
6. Peers at 14.3M samples (bench/data_scale_peers.py, run with --peers-python, default
   /work/venv-peers/bin/python): MosaicML Streaming and litdata, index bytes, start-up CPU seconds up to
   the first sample, peak RSS added; skipped with the reason where absent.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.shards.offsets import OFFSET_DTYPE  # noqa: E402
from data_pipeline.shards.table import ShardTable  # noqa: E402
from data_pipeline.stream.plan import EpochPlan, RankSchedule  # noqa: E402
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
    counts = [np.full(shards, per_shard, dtype=np.int64)]
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
    size = len(json.dumps(state))  # the sources part of state_dict: the only part that grows
    return {"ranks": ranks, "workers_per_rank": workers, "samples": shards * per_shard, "steps": steps,
            "plan_first_batches_s": round(plan_s, 4), "state_dict_s": round(state_s, 4), "state_dict_bytes": size}




ROOT = Path(__file__).resolve().parents[1]
PROBE = str(ROOT / "bench" / "data_scale_probe.py")
SHAPES = {"1M": (1_000, 1_000), "imagenet21k": (10_240, 1_400), "laion2b": (230_000, 10_000)}


def real_shard(root: Path, per_shard: int, jpg: bytes) -> dict:
    """One real shard of ``per_shard`` tiny samples: its path, size, offsets."""
    m = write_shards(((f"r{i:07d}", jpg, i % 10) for i in range(per_shard)), str(root), "real", per_shard,
                     storage=Storage())
    e = m["shards"][0]
    return {"path": root / e["url"], "bytes": e["bytes"], "offsets": list(e["offsets"]), "sha256": e["sha256"]}


def _names(n: int) -> list[str]:
    return [f"{i:06d}.tar" for i in range(n)]


def read_first(n_shards: int, per_shard: int, k: int = 16) -> list[int]:
    """Shard indices the first batches of epoch 0 read (seed 0, source 0: the probe's loader)."""
    return [int(i) for i in EpochPlan(np.full(n_shards, per_shard), 0, 0, 0, 10_000).shards[:k]]


def synth_v2(root: Path, n_shards: int, per_shard: int, shard: dict) -> Path:
    """A format 2 manifest of ``n_shards`` rows of ``per_shard`` samples, every row's offsets the one run."""
    root.mkdir(parents=True, exist_ok=True)
    encoded = "".join(_names(n_shards)).encode()
    rng = np.random.default_rng(0)
    table = ShardTable(names=np.frombuffer(encoded, np.uint8).copy(),
                       name_ends=np.arange(1, n_shards + 1, dtype=np.int64) * 10,
                       counts=np.full(n_shards, per_shard, np.int64), sizes=np.full(n_shards, shard["bytes"], np.int64),
                       offsets_at=np.zeros(n_shards, np.int64),
                       sha256=rng.integers(0, 256, (n_shards, 32), dtype=np.uint8))
    (root / "train.shards.npz").write_bytes(table.save())
    (root / "train.offsets").write_bytes(np.asarray(shard["offsets"], OFFSET_DTYPE).tobytes())
    header = {"format_version": 2, "num_shards": n_shards, "num_samples": n_shards * per_shard, "classes": None,
              "num_classes": 10, "label": "cls", "table": "train.shards.npz", "offsets": "train.offsets"}
    (root / "train.json").write_text(json.dumps(header))
    return root / "train.json"


def synth_v1(root: Path, n_shards: int, per_shard: int, shard: dict) -> Path:
    """Today's format: one JSON with every sample's offset (what the writer and indexer wrote before)."""
    root.mkdir(parents=True, exist_ok=True)
    offsets = json.dumps(shard["offsets"], separators=(",", ":"))
    rng = np.random.default_rng(0)
    with open(root / "train.json", "w") as f:
        f.write('{"shards":[')
        for i, name in enumerate(_names(n_shards)):
            f.write(("," if i else "") + f'{{"url":"{name}","num_samples":{per_shard},'
                    f'"sha256":"{rng.bytes(32).hex()}","offsets":{offsets}}}')
        f.write(f'],"num_samples":{n_shards * per_shard},"classes":null,"num_classes":10}}')
    return root / "train.json"


def link_real(root: Path, shard: dict, indices: list[int]) -> None:
    for i in indices:
        link = root / _names(i + 1)[-1]
        if not link.exists():
            link.symlink_to(shard["path"])


def probe(spec: str, code: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, PROBE, spec, *args], capture_output=True, text=True, env=env,
                          timeout=1800, cwd=str(code))
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def export_before(commit: str, dest: Path) -> Path | None:
    """Today's code (``commit``) exported next to this branch, for the "before" column."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "data_pipeline"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return dest
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


def startup(tmp: Path, before: Path | None, jpgs: list[bytes]) -> tuple[list[dict], dict]:
    rows, shards = [], {}
    for shape, (n, per) in SHAPES.items():
        shards[per] = shards.get(per) or real_shard(tmp / f"real{per}", per, jpgs[0])
        v2 = synth_v2(tmp / f"{shape}-v2", n, per, shards[per])
        row = {"shape": shape, "shards": n, "samples": n * per, "format": 2, "code": "this branch",
               "manifest_bytes": sum(f.stat().st_size for f in v2.parent.glob("train.*")),
               "rank_reads_bytes": v2.stat().st_size + (v2.parent / "train.shards.npz").stat().st_size,
               **probe(str(v2), ROOT)}
        rows.append(row)
        if shape == "laion2b":
            continue  # 21.6 GB of JSON: extrapolated below
        v1 = synth_v1(tmp / f"{shape}-v1", n, per, shards[per])
        size = v1.stat().st_size
        if before is not None:
            rows.append({"shape": shape, "shards": n, "samples": n * per, "format": 1, "code": "today (before)",
                         "manifest_bytes": size, **probe(str(v1), before)})
        rows.append({"shape": shape, "shards": n, "samples": n * per, "format": 1, "code": "this branch (compat)",
                     "manifest_bytes": size, **probe(str(v1), ROOT)})
    ref = next((r for r in rows if r["shape"] == "imagenet21k" and r["code"] == "today (before)"
                and "error" not in r), None)
    if ref is not None:
        n, per = SHAPES["laion2b"]
        k = n * per / ref["samples"]
        rows.append({"shape": "laion2b", "shards": n, "samples": n * per, "format": 1, "code": "today (before)",
                     "extrapolated": f"linear in samples from imagenet21k (x{k:.0f})",
                     "manifest_bytes": int(ref["manifest_bytes"] * k),
                     "startup_cpu_s": round(ref["startup_cpu_s"] * k, 1),
                     "peak_rss_added_mib": round(ref["peak_rss_added_mib"] * k),
                     "index_bytes_read": int(ref["index_bytes_read"] * k)})
    return rows, shards


def worker_memory(tmp: Path, shards: dict, before: Path | None) -> list[dict]:
    """USS of each of 2 DataLoader workers after 20 batches: LAION-2B shape vs 10 shards (and today's
    format 1 at ImageNet-21k shape with today's code, for the before column)."""
    out = []
    cases = [("laion2b", 230_000, 10_000, 2, ROOT), ("10 shards", 10, 10_000, 2, ROOT)]
    if before is not None:
        cases.append(("imagenet21k", 10_240, 1_400, 1, before))
    for label, n, per, fmt, code in cases:
        root = tmp / f"uss-{label.replace(' ', '')}-v{fmt}"
        spec = (synth_v2 if fmt == 2 else synth_v1)(root, n, per, shards[per])
        link_real(root, shards[per], read_first(n, per))
        r = probe(str(spec), code, "--workers", "2", "--batches", "20")
        out.append({"case": label, "shards": n, "samples": n * per, "format": fmt,
                    "code": "this branch" if code == ROOT else "today (before)", **r})
    base = next((r for r in out if r["case"] == "10 shards" and "worker_uss_mib" in r), None)
    for r in out:
        if base is not None and "worker_uss_mib" in r:
            r["worker_uss_added_mib"] = round(max(r["worker_uss_mib"]) - max(base["worker_uss_mib"]), 1)
    return out


def first_batch_s3(tmp: Path, shards: dict, endpoint: str) -> dict:
    """Time to first batch through moto S3: LAION-2B shape vs 10 shards, 2 workers, best of 2."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    per = 10_000
    res = {}
    for label, n in (("large", 230_000), ("small", 10)):
        root = tmp / f"s3-{label}"
        synth_v2(root, n, per, shards[per])
        for name in ("train.json", "train.shards.npz", "train.offsets"):
            fs.put(str(root / name), f"bench/s3-{label}/{name}")
        for i in read_first(n, per, 2):  # the shards the first batch reads; the others need not exist
            fs.put(str(shards[per]["path"]), f"bench/s3-{label}/{_names(i + 1)[-1]}")
        runs = [probe(f"s3://bench/s3-{label}/train.json", ROOT, "--workers", "2", "--batches", "1",
                      "--s3-endpoint", endpoint) for _ in range(2)]
        ok = [r for r in runs if "first_batch_s" in r]
        res[label] = {"shards": n, "first_batch_s": min(r["first_batch_s"] for r in ok) if ok else None,
                      "startup_cpu_s": min(r["startup_cpu_s"] for r in ok) if ok else None,
                      "index_bytes_read": fs.size(f"bench/s3-{label}/train.json")
                      + fs.size(f"bench/s3-{label}/train.shards.npz"),
                      **({"error": runs[-1].get("error")} if not ok else {})}
    if res["large"]["first_batch_s"] and res["small"]["first_batch_s"]:
        res["ratio"] = round(res["large"]["first_batch_s"] / res["small"]["first_batch_s"], 3)
    res["goal"] = "<= 2"
    return res


def peers(python: str, tmp: Path) -> dict:
    script = str(ROOT / "bench" / "data_scale_peers.py")
    if not Path(python).exists():
        return {"skipped": f"no interpreter at {python} (install the optional 'bench' extra there)"}
    done = subprocess.run([python, script, "--tmp", str(tmp)], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"
        return {"skipped": f"peer bench failed: {why}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _versions() -> dict:
    out = {"numpy": np.__version__, "torch": torch.__version__}
    try:
        import fsspec
        import webdataset

        out.update(fsspec=fsspec.__version__, webdataset=webdataset.__version__)
    except ImportError:
        pass
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/data_scale_cpu.json")
    p.add_argument("--before", default="aa352b7", help="the commit whose code reads today's format")
    p.add_argument("--peers-python", default="/work/venv-peers/bin/python")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: startup,workers,s3,bytes,plan,peers")
    a = p.parse_args()
    skip = set(a.skip.split(","))
    rng = np.random.default_rng(0)
    jpgs = [encode_jpeg(rng.integers(0, 255, (32 + i, 32, 3), dtype=np.uint8)) for i in range(16)]
    tiny = encode_jpeg(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    results: dict = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "before").mkdir()
        before = export_before(a.before, tmp / "before")
        results["before_code"] = a.before if before else f"not measured: cannot export {a.before} with git"
        shards: dict = {}
        if "startup" not in skip:
            results["startup"], shards = startup(tmp, before, [tiny])
            results["startup_goals"] = {"laion2b": "<= 2 CPU-s, <= 256 MiB RSS added, <= 32 MB index read",
                                        "imagenet21k": "<= 0.5 CPU-s, <= 64 MiB RSS added"}
        for per in (1_400, 10_000):
            shards[per] = shards.get(per) or real_shard(tmp / f"real{per}", per, tiny)
        if "workers" not in skip:
            results["worker_memory"] = worker_memory(tmp, shards, before)
            results["worker_memory_goal"] = "USS added per DataLoader worker <= 64 MiB (laion2b vs 10 shards)"
        if not {"s3", "bytes"} <= skip:
            server, endpoint = _server()
            storage = Storage(s3_endpoint=endpoint)
            if "s3" not in skip:
                results["time_to_first_batch_s3"] = first_batch_s3(tmp, shards, endpoint)
            if "bytes" not in skip:
                mid = write_shards(((f"d{i:07d}", jpgs[i % 16], i % 10) for i in range(64 * 40)), f"{tmp}/mid",
                                   "train", 40, storage=Storage())
                _upload(endpoint, tmp / "mid", "mid")
                sizes = {f"d{i:07d}": s["offsets"][j + 1] - s["offsets"][j]
                         for n, s in enumerate(mid["shards"]) for j, i in enumerate(range(n * 40, n * 40 + 40))}
                results["bytes_per_sample"] = [bytes_per_sample("s3://bench/mid/train.json", storage, sizes, w, 200)
                                               for w in (1, 2, 4)]
                results["bytes_per_sample_goal"] = "<= 1.1 (offset reads included; prefetched batches too)"
            server.stop()
        if "plan" not in skip:
            results["planning_4096x8"] = planning(4096, 8, 230_000, 10_000, 8, 1000)
            results["planning_goal"] = "< 1 s, < 1 MB"
        if "peers" not in skip:
            results["peers_14.3M"] = peers(a.peers_python, tmp)
    record = {"bench": "data_scale", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "versions": _versions(),
              "total_s": round(time.perf_counter() - t_all, 1), **results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
