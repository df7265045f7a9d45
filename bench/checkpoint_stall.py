"""How long a checkpoint stops training: ours (sync and async_save) against a plain torch.save.

  python bench/checkpoint_stall.py [--model mixer_b16_224] [--repeat 3] [--dir /tmp/ckpt-bench]
                                   [--out bench/results/checkpoint_stall_<device>.json]

One process, the single engine, AdamW after one step (so the moments exist). Per variant, medians:

* `torch_save`: what timm's and nanoGPT's scripts do -- `torch.save({"model", "optimizer"})` in the
  training loop; the stall is the whole write. No checksums, no atomic publication.
* `ours_sync`: `Checkpointer.save` with `async_save=false`: staged write + sha256 of every file by its
  writer + rename + `latest`; the stall is all of it.
* `ours_async`: `async_save=true`: the stall is the host copy only; `background_s` is the time until
  the checkpoint is published, and `steps_during_write` compares training-step time while the
  checkpoint thread writes with the step time of an idle machine (the thread competes for cores).
* `verify_s`: reading back and hashing the whole checkpoint once (what rank 0 alone used to do
  after every save, and what restore now splits across ranks).

Files go to page cache as the OS decides (no fsync, for every variant alike).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pretrain.checkpoint import Checkpointer, capture_rng  # noqa: E402
from pretrain.dist import DistInfo  # noqa: E402
from pretrain.engines import Engine  # noqa: E402
from pretrain.models import create_model  # noqa: E402
from pretrain.optim import build_optimizer, build_scheduler  # noqa: E402

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def make_engine(model_name: str) -> Engine:
    torch.manual_seed(0)
    engine = Engine(create_model(model_name, num_classes=1000),
                    partial(build_optimizer, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05),
                    partial(build_scheduler, total_steps=100, warmup_steps=1, schedule="cosine", end_ratio=0.0),
                    dist_info=ONE)
    train_step(engine, 2)
    return engine


def train_step(engine: Engine, batch: int) -> float:
    t0 = time.perf_counter()
    size = engine.unwrapped.stem.img_size[0]
    logits = engine.model(torch.randn(batch, 3, size, size, device=engine.device))
    labels = torch.zeros(batch, dtype=torch.long, device=engine.device)
    engine.backward(torch.nn.functional.cross_entropy(logits, labels))
    engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return time.perf_counter() - t0


def ours(engine: Engine, ck: Checkpointer, step: int) -> str:
    return ck.save(step, engine, shared_state={"step": step, "scheduler": engine.scheduler_state()},
                   rank_state={"rng": capture_rng()}, metadata={"engine": "single"}, config_yaml="bench: 1\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mixer_b16_224")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--train-batch", type=int, default=2, help="batch of the training steps run during the write")
    p.add_argument("--dir", default="/tmp/ckpt-bench")
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the model and optimizer state live")
    args = p.parse_args()
    global ONE
    ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device(args.device))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # leave a core for the checkpoint thread
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    engine = make_engine(args.model)
    n_params = sum(p.numel() for p in engine.unwrapped.parameters())

    plain = []
    for i in range(args.repeat):
        path = root / "plain" / f"{i}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        torch.save({"model": engine.unwrapped.state_dict(), "optimizer": engine.optimizer.state_dict()}, path)
        plain.append(time.perf_counter() - t0)

    sync_ck = Checkpointer(str(root / "sync"), ONE, keep_last=2)
    sync = []
    for i in range(args.repeat):
        t0 = time.perf_counter()
        ours(engine, sync_ck, i + 1)
        sync.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    sync_ck.verify(args.repeat)
    verify = time.perf_counter() - t0
    size_mb = sum(f.stat().st_size for f in (root / "sync/checkpoints" / f"step_{args.repeat:07d}").rglob("*")
                  if f.is_file()) / 2**20

    idle_steps = [train_step(engine, args.train_batch) for _ in range(3)]
    async_ck = Checkpointer(str(root / "async"), ONE, keep_last=2, async_save=True)
    stall, background, busy_steps = [], [], []
    for i in range(args.repeat):
        t0 = time.perf_counter()
        ours(engine, async_ck, i + 1)
        stall.append(time.perf_counter() - t0)
        while async_ck._pending is not None and not async_ck._pending.done():
            busy_steps.append(train_step(engine, args.train_batch))
        async_ck.wait()
        background.append(time.perf_counter() - t0)

    med = statistics.median
    record = {
        "bench": "checkpoint_stall", "model": args.model, "params_m": round(n_params / 1e6, 1),
        "checkpoint_mb": round(size_mb, 1), "repeat": args.repeat,
        "torch_save_stall_s": round(med(plain), 3),
        "ours_sync_stall_s": round(med(sync), 3),
        "ours_async_stall_s": round(med(stall), 3),
        "ours_async_background_s": round(med(background), 3),
        "stall_vs_torch_save": round(med(plain) / med(stall), 1),
        "verify_whole_checkpoint_s": round(verify, 3),
        "steps_during_write": {"batch": args.train_batch, "idle_step_s": round(med(idle_steps), 3),
                               "busy_step_s": round(med(busy_steps), 3) if busy_steps else None,
                               "steps": len(busy_steps)},
        "storage": f"local disk under {args.dir} (page cache, no fsync)",
        "device": (torch.cuda.get_device_name() + ", " if ONE.device.type == "cuda" else "")
        + f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out = Path(args.out or Path(__file__).parent / "results" / "checkpoint_stall_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
