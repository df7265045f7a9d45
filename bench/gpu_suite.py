"""One prepared run on a GPU machine: the GPU tests and every benchmark, each step under its own timeout,
each writing its JSON into one folder as soon as it finishes (7 files), about 8 minutes on one H200.

    # on a machine with network, once: the wheels the GPU machine lacks into .gpu-wheels/ (docs/gpu.md)
    python3 bench/gpu_suite.py --out $OUT          # there, from the checkout (installs .gpu-wheels/ first)
    python bench/gpu_suite.py --smoke --out /tmp/s # CPU, tiny sizes, seconds: tests/unit/test_gpu_suite.py

Files: 00_suite.json (environment, wheel install, per step: status, seconds, command, output tail; rewritten
after every step, so a run cut short still says how far it got), then per step
01_pytest_gpu.json (tests/gpu: fused kernels vs eager at the paper's shapes, GPU decode, a CUDA run with
checkpoint + resume, host syncs per step), 02_model_throughput.json (B/16 and L/16, eager / compile / fused /
fused_noln / timm, MFU, the autotuned Triton configs), 03_loop_overhead.json (Trainer step vs a bare loop),
04_checkpoint_stall.json (L/16 async stall vs torch.save), 05_data_throughput.json (nvJPEG vs the CPU cores
vs a B/16 step), 06_engine_throughput.json (single, FSDP2, ZeRO-1/2 on one GPU). A step that fails or
times out is recorded as such and the next one runs; steps that no longer fit the --budget are skipped
with that reason. Only the standard library is imported here, so the wheels can be installed first.
"""
from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


PYTEST = ["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "bench.pytest_jsonl",
          "tests/gpu/test_fused_gpu.py", "tests/gpu/test_gpu_decode.py", "tests/gpu/test_cuda_train.py"]


class Step(NamedTuple):
    name: str  # also the JSON file's stem
    timeout_s: int
    full: list[str]  # argv after the python executable; {out} is this step's JSON path, {tmp} a scratch dir
    smoke: list[str]


STEPS = [
    # The kernels first: the long CUDA training runs last, where a timeout costs least.
    Step("01_pytest_gpu", 170, PYTEST, PYTEST),
    Step("02_model_throughput", 190,
         ["bench/model_throughput.py", "--model", "mixer_b16_224", "--model", "mixer_l16_224", "--batch", "128", "256",
          "--steps", "8", "--warmup", "3", "--out", "{out}"],
         ["bench/model_throughput.py", "--device", "cpu", "--model", "mixer_p4_32", "--img-size", "32", "--batch", "2",
          "--steps", "1", "--warmup", "1", "--impl", "eager", "fused", "timm", "--out", "{out}"]),
    Step("03_loop_overhead", 60,
         ["bench/loop_overhead.py", "--model", "mixer_b16_224", "--batch", "128", "--rounds", "3", "--steps", "8",
          "--out", "{out}"],
         ["bench/loop_overhead.py", "--device", "cpu", "--model", "mixer_p4_32", "--batch", "4", "--rounds", "1",
          "--steps", "1", "--warmup", "1", "--out", "{out}"]),
    Step("04_checkpoint_stall", 90,
         ["bench/checkpoint_stall.py", "--device", "cuda", "--model", "mixer_l16_224", "--repeat", "2",
          "--train-batch", "32", "--dir", "{tmp}/ckpt", "--out", "{out}"],
         ["bench/checkpoint_stall.py", "--device", "cpu", "--model", "mixer_p4_32", "--repeat", "1",
          "--dir", "{tmp}/ckpt", "--out", "{out}"]),
    Step("05_data_throughput", 90,
         ["bench/data_throughput.py", "--gpu", "--workers", "16", "--images", "2000", "--repeat", "1",
          "--batch", "128", "--out", "{out}"],
         ["bench/data_throughput.py", "--workers", "1", "--images", "32", "--files", "40", "--repeat", "1",
          "--batch", "8", "--out", "{out}"]),
    Step("06_engine_throughput", 100,
         ["bench/engine_throughput.py", "--model", "mixer_b16_224", "--batch", "128", "--steps", "8", "--warmup", "3",
          "--engines", "single,fsdp,zero1,zero2", "--out", "{out}"],
         ["bench/engine_throughput.py", "--model", "mixer_p4_32", "--img-size", "32", "--num-classes", "10",
          "--batch", "4", "--steps", "1", "--warmup", "1", "--engines", "single,fsdp", "--out", "{out}"]),
]


def install_wheels(wheels: Path) -> dict:
    """pip-install the carried wheels (the GPU machine has no network)."""
    found = sorted(glob.glob(str(wheels / "*.whl")))
    if not found:
        return {"status": "skipped", "reason": f"no wheels in {wheels} (docs/gpu.md, 'The prepared GPU run', says how "
                                                  "to build them)"}
    cmd = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *found]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode and "externally-managed" in r.stderr:  # a distribution's Python (PEP 668)
        r = subprocess.run(cmd + ["--break-system-packages"], capture_output=True, text=True, timeout=300)
    return {"status": "ok" if r.returncode == 0 else "failed", "wheels": [Path(w).name for w in found],
            "output_tail": (r.stdout + r.stderr)[-2000:]}


def pytest_summary(jsonl: Path) -> dict:
    """bench/pytest_jsonl.py's lines as one JSON: counts, and each test's outcome with its message."""
    tests = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped")}
    return {"counts": counts, "seconds": round(sum(t["seconds"] for t in tests), 1), "tests": tests}


def environment() -> dict:
    probe = ("import json, platform, torch\n"
             "try:\n import triton; tv = triton.__version__\nexcept Exception as e: tv = repr(e)\n"
             "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, 'triton': tv,"
             " 'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name() if torch.cuda.is_available()"
             " else 'cpu', 'gpus': torch.cuda.device_count()}))")
    r = subprocess.run([PY, "-c", probe], capture_output=True, text=True, timeout=120)
    try:
        env = json.loads(r.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        env = {"probe_failed": r.stderr[-1000:]}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {**env, "host": platform.node(), "cpus": os.cpu_count(), "commit": commit or "unknown"}


def run_step(step: Step, smoke: bool, out_dir: Path, timeout: float) -> dict:
    out = out_dir / f"{step.name}.json"
    with tempfile.TemporaryDirectory(prefix=f"{step.name}_") as tmp:
        argv = [a.format(out=out, tmp=tmp) for a in (step.smoke if smoke else step.full)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "PYTEST_JSONL": f"{tmp}/tests.jsonl"}
        if smoke:  # the CPU path everywhere, also where a GPU is visible (tests/gpu then skip, with their reason)
            env |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        t0 = time.monotonic()
        try:
            r = subprocess.run([PY, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            rc, output = r.returncode, r.stdout + r.stderr
        except subprocess.TimeoutExpired as e:
            rc = None
            output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                             for x in (e.stdout, e.stderr))
        seconds = time.monotonic() - t0
        if (Path(tmp) / "tests.jsonl").exists():  # the pytest step: its JSON sums up the plugin's lines
            out.write_text(json.dumps(pytest_summary(Path(tmp) / "tests.jsonl"), indent=1) + "\n")
    status = "timeout" if rc is None else ("ok" if rc == 0 else "failed")
    return {"step": step.name, "status": status, "rc": rc, "seconds": round(seconds, 1), "timeout_s": round(timeout),
            "command": " ".join(["python", *argv]), "json": out.name if out.exists() else None,
            "output_tail": output[-3000:] if status != "ok" else output[-600:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_suite_out", help="folder for the JSON files")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: proves every step runs")
    p.add_argument("--budget", type=float, default=480, help="seconds for all steps; a step gets what is left")
    p.add_argument("--only", nargs="+", help="step names (or prefixes such as 02) to run")
    p.add_argument("--wheels", default=str(ROOT / ".gpu-wheels"))
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    suite = {"suite": "bench/gpu_suite.py" + (" --smoke" if args.smoke else ""),
             "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
             "wheels": ({"status": "skipped", "reason": "smoke run"} if args.smoke
                        else install_wheels(Path(args.wheels))),
             "environment": environment(), "budget_s": args.budget, "steps": []}
    summary = out_dir / "00_suite.json"
    summary.write_text(json.dumps(suite, indent=1) + "\n")
    steps = [s for s in STEPS if not args.only or any(s.name.startswith(o) or s.name[3:] == o for o in args.only)]
    for step in steps:
        left = args.budget - (time.monotonic() - start)
        if left < 20:
            result = {"step": step.name, "status": "skipped", "reason": f"only {left:.0f}s of the budget left"}
        else:
            print(f"[gpu_suite] {step.name} (timeout {min(step.timeout_s, left):.0f}s)", flush=True)
            result = run_step(step, args.smoke, out_dir, min(step.timeout_s, left))
        print(f"[gpu_suite] {step.name}: {result['status']} {result.get('seconds', '')}s", flush=True)
        suite["steps"].append(result)
        suite["seconds"] = round(time.monotonic() - start, 1)
        summary.write_text(json.dumps(suite, indent=1) + "\n")
    failed = [s["step"] for s in suite["steps"] if s["status"] != "ok"]
    print(f"[gpu_suite] done in {suite['seconds']}s; {'not ok: ' + ', '.join(failed) if failed else 'all ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
