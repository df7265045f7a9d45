"""What bf16 autocast costs on a CPU: one training step (forward, loss, backward, AdamW step) of the same
model in fp32 and in bf16, interleaved rounds, median step time of each. The figure behind
`train.precision: auto` (fp32 on a CPU) and the warning an explicit bf16 on a CPU gets.

    python bench/cpu_precision.py --rounds 3 --out bench/results/cpu_precision_amx.json
    # the same CPU restricted to AVX2 (no native bf16), as a CPU without AVX512-BF16 / AMX runs it:
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/cpu_precision.py --rounds 3 \
        --out bench/results/cpu_precision_avx2.json

Synthetic 224 px inputs already in memory; the data pipeline is not timed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.engines.base import precision_autocast  # noqa: E402
from pretrain.models import create_model  # noqa: E402
from pretrain.optim import build_optimizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mixer_s32_224")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = create_model(args.model, num_classes=1000)
    opt = build_optimizer(model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.randint(0, 1000, (args.batch,))

    def step(precision: str) -> float:
        t0 = time.perf_counter()
        with precision_autocast(device, precision):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for precision in times:  # warm-up: first-call allocations and kernel selection
        step(precision)
    for r in range(args.rounds):
        for precision in times:
            times[precision].append(step(precision))
            print(f"round {r} {precision}: {times[precision][-1]:.2f} s", flush=True)
    result = {
        "bench": "cpu_precision: one training step in fp32 vs bf16 autocast on the CPU",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})",
        "load_average": os.getloadavg(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
                        "amx": torch.cpu._is_amx_tile_supported()},
        "env": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")
                if k in os.environ},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "command": " ".join(["bench/cpu_precision.py"] + sys.argv[1:]),
        "settings": vars(args),
        "step_s": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "step_s_all": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "bf16_over_fp32": round(statistics.median(times["bf16"]) / statistics.median(times["fp32"]), 2),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
