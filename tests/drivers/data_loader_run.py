"""Test driver launched by torchrun: build a TrainLoader from shards, take some batches, write what came out.

Every rank writes ``<out>/keys.rank<R>.json`` ({"batches": [[key, ...], ...], "skipped": {...}}); rank 0
also writes ``<out>/state.pt`` (the loader's global state after the batches, via torch.save). With
``--state`` the loader first loads a saved state (from any world size / worker count).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data_pipeline.stream.sources import DataSource  # noqa: E402
from data_pipeline.storage import Storage  # noqa: E402
from data_pipeline.stream.train_loader import TrainLoader  # noqa: E402
from data_pipeline.image.transforms import TrainTransform  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sources", required=True, help='JSON list of [spec, weight]')
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--state", default="")
    p.add_argument("--out", required=True)
    p.add_argument("--s3-endpoint", default="")
    a = p.parse_args()
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("gloo")
    sources = [DataSource(spec, weight) for spec, weight in json.loads(a.sources)]
    loader = TrainLoader(sources, batch_size=a.global_batch // world, transform=TrainTransform(8), seed=7,
                         rank=rank, world_size=world, num_workers=a.workers, shuffle_buffer=a.window,
                         storage=Storage(s3_endpoint=a.s3_endpoint, retries=8, backoff_s=0.2))
    if a.state:
        loader.load_state_dict(torch.load(a.state, weights_only=True))
    it = iter(loader)
    batches = [next(it).keys for _ in range(a.steps)]
    state = loader.state_dict()  # collective: every rank calls it
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"keys.rank{rank}.json").write_text(json.dumps(
        {"batches": batches, "skipped": loader.skipped, "state": state}))
    if rank == 0:
        torch.save(state, out / "state.pt")
    del it
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
