"""The sample read path alone: CPU per sample of ``EpochReader`` (range reads + tar parsing) on local shards.

Compares this checkout's reader with another checkout's (``--baseline DIR``, e.g. a worktree of the previous
commit), interleaved, median of ``--repeat``; no decode. Each measurement is its own process reading every
sample of one epoch of 768 ImageNet-size samples in the worker's order (announced a window ahead).

    python bench/read_path.py --baseline ../previous-checkout --out bench/results/read_path_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def child(shards: Path) -> dict:
    from data_pipeline.shards.manifest import read_index
    from data_pipeline.shards.offsets import ShardOffsets
    from data_pipeline.shards.table import ShardUrls
    from data_pipeline.storage import Storage
    from data_pipeline.stream.epoch_reader import EpochReader
    from data_pipeline.stream.plan import EpochPlan

    m = read_index(str(shards / "train.json"), Storage())
    urls = ShardUrls([m.table])
    plan = EpochPlan(m.table.counts, 0, 0, 0, 256, False)
    reader = EpochReader(urls, plan, Storage(), ShardOffsets([m.table], [m.offsets], Storage()))
    n = int(m.table.counts.sum())
    t0, w0 = time.process_time(), time.perf_counter()
    for start in range(0, n, 128):
        raws = [int(r) for r in plan.raw(np.arange(start, min(n, start + 128)))]
        reader.want(raws)
        for r in raws:
            reader.fetch(r)
    return {"us_per_sample_cpu": 1e6 * (time.process_time() - t0) / n,
            "us_per_sample_wall": 1e6 * (time.perf_counter() - w0) / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", default="", help="another checkout to compare with")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default="")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(Path(a.child))))
        return
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from data_peers import make_jpegs

    from data_pipeline.shards.tar_write import write_shards
    from data_pipeline.storage import Storage

    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench_read_"))
    write_shards(((f"s{i:06d}", d, i % 10) for i, d in enumerate(make_jpegs("imagenet", 768))), str(tmp), "train",
                 96, storage=Storage())
    trees = {"this": ROOT, **({"baseline": Path(a.baseline).resolve()} if a.baseline else {})}
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    for _ in range(a.repeat):
        for name, tree in trees.items():
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(tmp)], cwd=tree,
                                 env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = {k: {m: float(np.median([r[m] for r in v])) for m in v[0]} for k, v in runs.items()}
    record = {"bench": "read_path", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg(), "repeat": a.repeat, "samples": 768,
              "results": result, "runs": runs}
    print(json.dumps(record, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
