"""Training-step throughput of our Mixer (eager, compile, fused, fused_noln) against timm's mlp_mixer.

One training step = forward under bf16 autocast + cross-entropy + backward + AdamW step, on
synthetic images already on the device (this measures the model, not the data pipeline). Every
implementation runs under the same loop, one after another, in one process, for each batch size.

    # on a GPU node (the numbers the issue asks for):
    python bench/model_throughput.py --model mixer_b16_224 --model mixer_l16_224 --batch 64 128 256
    # CPU smoke test (proves the script works; the numbers mean nothing for GPUs):
    python bench/model_throughput.py --device cpu --model mixer_s32_224 --batch 8 --steps 3 \\
        --out bench/results/model_throughput_cpu_smoke.json

``fused_noln`` is ``fused`` with the LayerNorms left eager (``use_fused_mlp(fuse_layernorm=False)``):
``fused_vs_fused_noln`` in the speedups says whether fusing the residual adds into the norms pays.

MFU = 3 x analytic forward FLOPs per image (``MlpMixer.flops_per_image``) x img/s / the device's
dense bf16 peak (table below; unknown devices and CPUs get no MFU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pretrain.models import apply_mlp_impl, create_model  # noqa: E402
from pretrain.models.fused_mlp import fused_unavailable_reason, use_fused_mlp  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s.
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,  # also "H100 80GB HBM3"
    "H100 80GB HBM3": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "A100": 312.0,
}
IMPLS = ("eager", "compile", "fused", "fused_noln", "timm")


def peak_tflops(device_name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    if "H100" in device_name:  # other H100 spellings: assume SXM
        return PEAK_BF16_TFLOPS["H100 SXM"]
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _timm_or_reason():
    try:
        import timm

        return timm, None
    except Exception as e:  # timm needs torchvision, which is broken in some CPU environments
        return None, f"timm not importable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def build(name: str, impl: str, device: torch.device, timm_module, img_size: int = 224) -> torch.nn.Module:
    if impl == "timm":
        model = timm_module.create_model(name, pretrained=False, num_classes=1000)
    else:
        model = create_model(name, num_classes=1000, img_size=img_size)
    model = model.to(device)
    if impl in ("compile", "fused"):
        apply_mlp_impl(model, impl)
    elif impl == "fused_noln":  # not a config choice: only this comparison needs it
        use_fused_mlp(model, fuse_layernorm=False)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(model, device, batch: int, steps: int, warmup: int,
                  img_size: int = 224) -> tuple[float, float | None]:
    """Seconds per step (median of ``steps``), and peak memory in GiB on CUDA."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):  # compilation, autotuning, allocator warm-up
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return sorted(times)[len(times) // 2], mem


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", action="append", help="repeatable; default mixer_b16_224 and mixer_l16_224")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--impl", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--steps", type=int, default=20, help="timed steps per point (median reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--out", default=None, help="JSON path; default bench/results/model_throughput_<device>_<date>.json")
    args = p.parse_args(argv)
    models = args.model or ["mixer_b16_224", "mixer_l16_224"]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    cpu_name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name
    peak = peak_tflops(device_name) if device.type == "cuda" else None
    timm_module, timm_reason = _timm_or_reason()
    fused_reason = fused_unavailable_reason()
    report = {
        "benchmark": "model_throughput: forward+backward+AdamW step, bf16 autocast, synthetic 224px images",
        "device": device_name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "triton": _version("triton"),
                     "timm": _version("timm") if timm_module else timm_reason},
        "peak_bf16_tflops": peak,
        "steps": args.steps, "warmup": args.warmup,
        "results": [],
    }
    out = Path(args.out or f"bench/results/model_throughput_{device.type}_{dt.date.today():%Y%m%d}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in models:
        flops = create_model(name, num_classes=1000, img_size=args.img_size).flops_per_image()
        for batch in args.batch:
            for impl in args.impl:
                row = {"model": name, "impl": impl, "batch": batch, "flops_per_image": flops}
                if impl == "timm" and timm_module is None:
                    row["skipped"] = timm_reason
                elif impl == "timm" and not timm_module.is_model(name):
                    row["skipped"] = f"timm has no model {name!r}"
                elif impl.startswith("fused") and fused_reason is not None:
                    row["skipped"] = f"fused unavailable: {fused_reason}"  # never time eager as "fused"
                else:
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            model = build(name, impl, device, timm_module, args.img_size)
                        sec, mem = time_training(model, device, batch, args.steps, args.warmup, args.img_size)
                        ips = batch / sec
                        row |= {"step_ms": round(1e3 * sec, 2), "img_per_s": round(ips, 1),
                                "tflops": round(3 * flops * ips / 1e12, 2),
                                "mfu": round(3 * flops * ips / (peak * 1e12), 4) if peak else None,
                                "max_mem_gib": round(mem, 2) if mem is not None else None}
                    except torch.cuda.OutOfMemoryError:
                        row["skipped"] = "out of memory"
                    finally:
                        model = None
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                report["results"].append(row)
                out.write_text(json.dumps(report, indent=2) + "\n")  # after every row: a timeout keeps what ran
    report["speedups"] = _speedups(report["results"])
    if fused_reason is None and any(i.startswith("fused") for i in args.impl):
        from pretrain.models.triton_kernels import tuned_configs

        report["triton_autotuned"] = tuned_configs()  # what this GPU picked, per kernel and shape
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _speedups(rows: list[dict]) -> dict:
    """fused vs timm, eager, compile and fused_noln, at the same model and batch."""
    speed = {(r["model"], r["batch"], r["impl"]): r.get("img_per_s") for r in rows}
    out = {}
    for (model, batch, impl), ips in speed.items():
        if impl != "fused" or not ips:
            continue
        for base in ("timm", "eager", "compile", "fused_noln"):
            ref = speed.get((model, batch, base))
            if ref:
                out[f"{model}/b{batch}/fused_vs_{base}"] = round(ips / ref, 3)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
