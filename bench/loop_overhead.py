"""What our training loop costs over a bare PyTorch loop: Trainer.train_step against the few lines a
user would write (same model and init, same AdamW + schedule, clip at 1, same precision and loss),
on the same in-memory batches, interleaved rounds, median step time of each. Goal: bare/ours >= 0.97.

    python bench/loop_overhead.py --out bench/results/loop_overhead_cpu.json          # CPU: the demo model
    python bench/loop_overhead.py --model mixer_b16_224 --batch 128 --out bench/results/loop_overhead_h200.json

Ours includes everything a step of Trainer.train pays: the loss guard (one all-reduce + one host read
per step), the monitor (a host read on log steps), the engine's bookkeeping and the step boundary's fault check.
On CUDA both loops also run a few steps under torch.cuda.set_sync_debug_mode("warn") and report the
synchronising calls per step. Batches are uint8 NHWC on the host (pinned on CUDA), as the loader
delivers them; the data pipeline itself is not timed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.demo import ensure_demo_data  # noqa: E402
from data_pipeline.image.device import normalize  # noqa: E402
from data_pipeline.stream.batch import Batch  # noqa: E402
from data_pipeline.storage import Storage  # noqa: E402
from pretrain import build  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.optim import build_optimizer, build_scheduler  # noqa: E402
from pretrain.trainer import Trainer  # noqa: E402


def make_trainer(args: argparse.Namespace, run_dir: str, data_root: str) -> Trainer:
    # The demo shards only satisfy the config's data checks: the timed batches come from memory.
    cfg = load_config(str(ROOT / "configs/demo.yaml"), [
        f"run.dir={run_dir}", f"data.root={data_root}", f"model.name={args.model}", f"train.device={args.device}",
        f"train.precision={args.precision}", f"train.global_batch_size={args.batch * args.accum}",
        f"train.grad_accum_steps={args.accum}", f"train.steps={10**6}", f"train.log_every={args.log_every}",
        "data.prepare=none", "data.num_workers=0", "eval.mode=none", "checkpoint.every_steps=1000000",
        "checkpoint.resume=never",
        "optim.warmup_steps=100"])
    return Trainer(cfg)


def bare_loop(trainer: Trainer):
    """The loop a user writes by hand around the same model: returns `step(batches)`."""
    cfg, device = trainer.cfg, trainer.dist.device
    torch.manual_seed(cfg.train.seed)
    model = build.build_model(cfg).to(device).train()
    o = cfg.optim
    opt = build_optimizer(model, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    sched = build_scheduler(opt, total_steps=cfg.train.steps, warmup_steps=o.warmup_steps, schedule=o.schedule,
                            end_ratio=o.end_lr_ratio)
    loss_fn = build.build_train_loss(cfg)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    mean, std = list(cfg.data.mean), list(cfg.data.std)

    def step(batches) -> None:
        for _ in range(trainer.accum_steps):
            batch = next(batches)
            images = normalize(batch.images.to(device, non_blocking=True), mean, std)
            labels = batch.labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = loss_fn(model(images), labels)
            (loss / trainer.accum_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip, foreach=True)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return step


def ours(trainer: Trainer):
    def step(batches) -> None:
        trainer.train_step(batches)
        trainer.faults.at_boundary(trainer.step, health_due=False)  # the per-step boundary check of Trainer.train

    return step


def cycle(batches: list[Batch]):
    while True:
        yield from batches


def time_steps(step, batches, n: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step(batches)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def count_cuda_syncs(step, batches, n: int) -> float:
    """Synchronising CUDA calls per step, as torch's sync debug mode reports them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                step(batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="default: mixer_b16_224 on CUDA, the demo's mixer_t4_32 on CPU")
    p.add_argument("--batch", type=int, default=None, help="micro batch (default 128 on CUDA, 64 on CPU)")
    p.add_argument("--accum", type=int, default=1, help="micro batches per optimiser step")
    p.add_argument("--precision", default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--log-every", type=int, default=25, help="the monitor's log interval inside our loop")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of ours and bare")
    p.add_argument("--steps", type=int, default=10, help="timed steps per loop per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.model = args.model or ("mixer_b16_224" if cuda else "mixer_t4_32")
    args.batch = args.batch or (128 if cuda else 64)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    torch.backends.cuda.matmul.allow_tf32 = True

    with tempfile.TemporaryDirectory(prefix="loop_overhead_") as tmp:
        data_root = f"{tmp}/data"
        ensure_demo_data(data_root, Storage(), image_size=32, num_train=200, num_val=50, samples_per_shard=100)
        trainer = make_trainer(args, f"{tmp}/run", data_root)
        try:
            device = trainer.dist.device
            size = trainer.engine.unwrapped.stem.img_size[0]
            g = torch.Generator().manual_seed(0)
            batches = []
            for i in range(4):
                b = Batch(images=torch.randint(0, 256, (args.batch, size, size, 3), dtype=torch.uint8, generator=g),
                          labels=torch.randint(0, trainer.cfg.model.num_classes, (args.batch,), generator=g),
                          keys=[f"{i}-{j}" for j in range(args.batch)])
                batches.append(b.pin_memory() if cuda else b)
            data = cycle(batches)
            loops = {"ours": ours(trainer), "bare": bare_loop(trainer)}
            trainer.engine.model.train()
            for step in loops.values():
                time_steps(step, data, args.warmup, device)
            times: dict[str, list[float]] = {k: [] for k in loops}
            for _ in range(args.rounds):
                for name, step in loops.items():
                    times[name] += time_steps(step, data, args.steps, device)
            syncs = {name: count_cuda_syncs(step, data, 5) for name, step in loops.items()} if cuda else None
        finally:
            trainer.close()
    median = {k: statistics.median(v) for k, v in times.items()}
    record = {
        "bench": "loop_overhead: Trainer.train_step vs a bare loop, same model/optimizer/batches",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()})",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda},
        "command": " ".join(["bench/loop_overhead.py"] + (argv if argv is not None else sys.argv[1:])),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "step_ms": {k: round(1e3 * v, 3) for k, v in median.items()},
        "step_ms_quartiles": {k: [round(1e3 * x, 3) for x in statistics.quantiles(v, n=4)] for k, v in times.items()
                              if len(v) > 1},
        "bare_over_ours": round(median["bare"] / median["ours"], 4),
        "goal": ">= 0.97",
        "cuda_syncs_per_step": syncs,
    }
    print(json.dumps(record, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
