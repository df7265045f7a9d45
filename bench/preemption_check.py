"""Cost of the per-step boundary check (pretrain/faults.py: one SUM all-reduce over gloo of the stop
flags and skip counts, CPU tensors) for N ranks on this host.

  python bench/preemption_check.py [--ranks 2] [--calls 2000] [--out bench/results/preemption_check.json]

The trainer calls Faults.at_boundary once per step; this measures what its collective adds to a step.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_pipeline.stream.decode import SKIP_KINDS  # noqa: E402
from pretrain.faults import FLAGS  # noqa: E402


def boundary_values() -> torch.Tensor:
    """A tensor of the boundary's size: the stop flags, the skip counts per kind, the delivered count."""
    return torch.zeros(len(FLAGS) + len(SKIP_KINDS) + 1, dtype=torch.float64)


def worker(rank: int, world: int, port: int, calls: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for _ in range(50):  # warm-up
        dist.all_reduce(boundary_values())
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(calls):
        dist.all_reduce(boundary_values())
    results[rank] = (time.perf_counter() - t0) / calls
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "preemption_check.json"))
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(worker, args=(args.ranks, port, args.calls, results), nprocs=args.ranks)
    per_call_us = max(results.values()) * 1e6
    record = {"bench": "preemption_check", "ranks": args.ranks, "calls": args.calls,
              "per_step_overhead_us": round(per_call_us, 1), "backend": "gloo (loopback)",
              "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "torch": torch.__version__, "python": platform.python_version(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
