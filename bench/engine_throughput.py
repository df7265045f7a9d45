"""Training throughput of each engine on one device: img/s and MFU, recorded as JSON.

  python bench/engine_throughput.py                       # B/16, bf16, batch 128, on the GPU
  python bench/engine_throughput.py --model mixer_p4_32 --img-size 32 --batch 8 --steps 3   # CPU smoke

Synthetic images on the device (engine cost only, no data pipeline), the same model and optimiser
as training (pretrain.build's factories), `warmup` untimed steps then `steps` timed ones. With one
rank the engines differ in their wrapping and bookkeeping, not in communication. Results go to
bench/results/engine_throughput_<device>_<date>.json with the device, versions and settings.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pretrain.config import DeepSpeedOptions  # noqa: E402
from pretrain.dist import init_distributed  # noqa: E402
from pretrain.engines import build_engine  # noqa: E402
from pretrain.loss import build_loss  # noqa: E402
from pretrain.models import create_model  # noqa: E402
from pretrain.monitor import peak_tflops  # noqa: E402
from pretrain.optim import build_optimizer, build_scheduler  # noqa: E402

ENGINES = {"single": ("single", None), "fsdp": ("fsdp", None),
           **{f"zero{s}": ("deepspeed", DeepSpeedOptions(zero_stage=s)) for s in (1, 2, 3)}}


def measure(name: str, args: argparse.Namespace, info) -> dict:
    kind, options = ENGINES[name]
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=args.num_classes, img_size=args.img_size)
    flops = model.flops_per_image()
    engine = build_engine(kind, model, info, optimizer_factory=partial(build_optimizer, lr=1e-3, betas=(0.9, 0.999),
                                                                       eps=1e-8, weight_decay=0.1),
                          scheduler_factory=partial(build_scheduler, total_steps=10**6, warmup_steps=100,
                                                    schedule="linear", end_ratio=0.0),
                          precision=args.precision, grad_clip=1.0, accum_steps=1, micro_batch_size=args.batch,
                          options=options)
    loss_fn = build_loss("softmax")
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=info.device)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=info.device)
    cuda = info.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with engine.autocast():
            loss = loss_fn(engine.model(images), labels)
        engine.backward(loss)
        engine.step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    img_s = args.steps * args.batch / seconds
    tflops = 3 * flops * img_s / 1e12
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_tflops(device_name, args.precision)
    result = {"engine": name, "img_per_s": img_s, "tflops": tflops, "mfu": tflops / peak if peak else None,
              "step_ms": 1000 * seconds / args.steps, "final_loss": float(loss.detach()),
              "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    print(json.dumps(result), flush=True)
    del engine, model
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mixer_b16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="a folder, or a .json path")
    p.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = p.parse_args()
    info = init_distributed("auto", "auto", args.local_rank)
    results = [measure(name, args, info) for name in args.engines.split(",")]
    if info.is_main:
        from importlib.metadata import version
        device = torch.cuda.get_device_name() if info.device.type == "cuda" else platform.processor() or "cpu"
        record = {"bench": "engine_throughput", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  "device": device, "torch": torch.__version__, "deepspeed": version("deepspeed"),
                  "cuda": torch.version.cuda, "settings": vars(args), "world_size": info.world_size,
                  "results": results}
        tag = device.replace(" ", "_").replace("/", "_")
        path = Path(args.out) if args.out.endswith(".json") else (
            Path(args.out) / f"engine_throughput_{tag}_{record['date'][:10]}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
