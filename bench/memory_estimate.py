"""The memory estimate (pretrain/memory.py) against the measured peak of real training runs.

  python bench/memory_estimate.py [--models mixer_s32_224,mixer_b16_224,mixer_l16_224] [--batch 4]
                                  [--steps 3] [--workers 2] [--gpu] [--out bench/results/memory_estimate_<device>.json]

Per model, one short training run (the Trainer, single engine, fp32 on CPU, an async checkpoint at step 2
so its staging copy overlaps step 3, `--workers` data-loader workers) on generated 224 px JPEG shards,
in a child process. CPU: the peak of the summed PSS of the child and its worker processes, sampled every
50 ms (PSS: a forked worker's shared pages are counted once over the tree, not once per process), next to
the child's own peak RSS (ru_maxrss, exact) and the estimate's host total. `--gpu` (CUDA present): bf16
on the GPU, torch.cuda.max_memory_allocated next to the estimate's device total. Goal: within +-35%.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GIB = 2**30


def make_data(root: Path, n: int = 48) -> str:
    import numpy as np

    from data_pipeline.shards.tar_write import encode_jpeg, write_shards
    from data_pipeline.storage import Storage

    rng = np.random.default_rng(0)
    images = [encode_jpeg(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)) for _ in range(8)]
    write_shards(((f"s{i:04d}", images[i % 8], i % 10) for i in range(n)), str(root), "train", 16, storage=Storage())
    return str(root / "train.json")


def overrides(args: argparse.Namespace, model: str, data: str, run_dir: str, gpu: bool) -> list[str]:
    return [f"model.name={model}", f"data.train={data}", "data.val=''", "eval.mode=none", f"run.dir={run_dir}",
            f"train.steps={args.steps}", f"train.global_batch_size={args.batch}", "optim.warmup_steps=1",
            f"train.precision={'bf16' if gpu else 'fp32'}", f"train.device={'cuda' if gpu else 'cpu'}",
            f"data.num_workers={args.workers}", "data.shuffle_buffer=16", "checkpoint.every_steps=2",
            "checkpoint.async_save=true", "train.log_every=1", "engine.kind=single", "train.memory_check=false"]


def child(config: str, over: list[str]) -> None:
    """Run the training in this process; print the estimate and (CUDA) the allocator's peak as JSON."""
    import torch

    from pretrain.build import memory_estimate
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    cfg = load_config(config, over)
    trainer = Trainer(cfg, config_source=config)
    try:
        trainer.train()
    finally:
        trainer.close()
    cuda = trainer.dist.device.type == "cuda"
    line, est = memory_estimate(trainer.cfg, 1, config, device_type=trainer.dist.device.type)
    print(json.dumps({"estimate_line": line, "estimate_host": est.host, "estimate_device": est.total,
                      "cuda_max_allocated": torch.cuda.max_memory_allocated() if cuda else None,
                      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)


def tree_pss(pid: int) -> int:
    import psutil

    total = 0
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def measure(args: argparse.Namespace, model: str, data: str, gpu: bool) -> dict:
    config = str(ROOT / "configs/base.yaml")
    with tempfile.TemporaryDirectory() as run_dir:
        over = overrides(args, model, data, run_dir, gpu)
        env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1), "PYTHONPATH": str(ROOT)}
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, __file__, "--child", config, *over], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_pss(proc.pid))
            time.sleep(0.05)
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{model}: training failed ({proc.returncode}):\n{err[-3000:]}")
        result = json.loads(out.strip().splitlines()[-1])
    row = {"model": model, "device": "cuda" if gpu else "cpu", "micro_batch": args.batch, "workers": args.workers,
           "steps": args.steps, "seconds": round(time.monotonic() - t0, 1), "estimate": result["estimate_line"]}
    if gpu:
        est, got = result["estimate_device"], result["cuda_max_allocated"]
        row.update(estimate_gib=est / GIB, measured_gib=got / GIB, measured="torch.cuda.max_memory_allocated")
    else:
        est, got = result["estimate_host"], peak
        row.update(estimate_gib=est / GIB, measured_gib=got / GIB, measured="peak PSS of the process tree",
                   main_process_maxrss_gib=result["maxrss"] / GIB)
    row["error"] = (est - got) / got
    return row


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mixer_s32_224,mixer_b16_224,mixer_l16_224")
    p.add_argument("--batch", type=int, default=4, help="global = micro batch (one process)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--gpu", action="store_true", help="measure on CUDA (torch.cuda.max_memory_allocated)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import torch

    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: CUDA is not available here")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data")
        for model in args.models.split(","):
            row = measure(args, model, data, args.gpu)
            rows.append(row)
            print(f"{row['model']:16s} {row['device']:4s} estimate {row['estimate_gib']:6.2f} GiB  measured "
                  f"{row['measured_gib']:6.2f} GiB  ({row['error']:+.0%})  [{row['seconds']:.0f} s]", flush=True)
    device = "gpu" if args.gpu else "cpu"
    out = Path(args.out or ROOT / f"bench/results/memory_estimate_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "bench": "memory_estimate", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if args.gpu else platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "host_memory_gib": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "goal": "estimate within +-35% of measured", "rows": rows}, indent=1) + "\n")
    print(f"written {out}")
    return 0 if all(abs(r["error"]) <= 0.35 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
