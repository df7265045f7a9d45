"""Peers at ImageNet-21k size (10,240 shards x 1,400 samples = 14.3M): MosaicML Streaming and litdata.

Run by bench/data_scale.py with an interpreter that has them (the optional ``bench`` extra); prints one
JSON line. Each index is written by the library's own writer for one real shard / chunk of 1,400 samples,
then its entry is repeated 10,240 times (files symlinked), so the index a rank reads is full size and the
first sample is real. Measured in a fresh process per library, as bench/data_scale_probe.py does: from
the dataset built to the first sample (where both compute their epoch's sample partition), CPU seconds,
peak RSS added (VmHWM reset after the imports), bytes read (rchar).
"""
from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

SHARDS, PER_SHARD = 10_240, 1_400
_STANDIN = "torchvision stand-in (streaming.vision imports it; the registry build does not load on this CPU torch)"


def _torchvision_standin() -> str | None:
    """streaming/__init__ imports streaming.vision, which imports torchvision; where that fails to load
    (a registry build against another torch), a stand-in with the two names it imports (never called)."""
    try:
        import torchvision  # noqa: F401

        return None
    except Exception:  # noqa: BLE001 - a torchvision built for another torch raises RuntimeError
        for k in [k for k in sys.modules if k.startswith("torchvision")]:
            del sys.modules[k]
    names = ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.transforms.functional")
    mods = {}
    for name in names:
        m = types.ModuleType(name)
        m.__spec__, m.__path__ = importlib.machinery.ModuleSpec(name, None), []
        mods[name] = m
    mods["torchvision.datasets"].VisionDataset = type("VisionDataset", (), {})
    mods["torchvision.datasets"].CIFAR10 = mods["torchvision.datasets"].VisionDataset
    mods["torchvision.transforms.functional"].to_tensor = lambda x: x
    mods["torchvision"].datasets = mods["torchvision.datasets"]
    mods["torchvision"].transforms = mods["torchvision.transforms"]
    mods["torchvision.transforms"].functional = mods["torchvision.transforms.functional"]
    sys.modules.update(mods)
    return _STANDIN


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def write_streaming(root: Path) -> Path:
    _torchvision_standin()
    from streaming import MDSWriter

    out = root / "mds"
    with MDSWriter(out=str(out), columns={"jpg": "bytes", "cls": "int"}, size_limit=1 << 30) as w:
        for i in range(PER_SHARD):
            w.write({"jpg": b"x" * 600, "cls": i % 10})
    index = json.loads((out / "index.json").read_text())
    entry = index["shards"][0]
    real = out / entry["raw_data"]["basename"]
    shards = []
    for i in range(SHARDS):
        name = f"shard.{i:05d}.mds"
        if not (out / name).exists():
            (out / name).symlink_to(real)
        shards.append({**entry, "raw_data": {**entry["raw_data"], "basename": name}})
    (out / "index.json").write_text(json.dumps({**index, "shards": shards}))
    return out


def write_litdata(root: Path) -> Path:
    from litdata.streaming.writer import BinaryWriter

    out = root / "lit"
    w = BinaryWriter(str(out), chunk_size=PER_SHARD)
    for i in range(PER_SHARD):
        w[i] = {"jpg": b"x" * 600, "cls": i % 10}
    w.done()
    w.merge()
    index = json.loads((out / "index.json").read_text())
    entry = index["chunks"][0]
    chunks = []
    for i in range(SHARDS):
        name = f"chunk-0-{i}.bin"
        if not (out / name).exists():
            (out / name).symlink_to(out / entry["filename"])
        chunks.append({**entry, "filename": name})
    (out / "index.json").write_text(json.dumps({**index, "chunks": chunks}))
    return out


def measure(lib: str, path: str) -> dict:
    note = None
    if lib == "streaming":
        note = _torchvision_standin()
        from streaming import StreamingDataset as Dataset

        def build():
            return Dataset(local=path, shuffle=True, batch_size=32, shuffle_seed=0)
    else:
        from litdata import StreamingDataset as Dataset

        def build():
            return Dataset(path, shuffle=True, seed=0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS: the imports' peak is not the index's
    rss0, cpu0, io0, t0 = _status_mib("VmRSS"), _cpu(), _rchar(), time.perf_counter()
    ds = build()
    next(iter(ds))
    out = {"startup_cpu_s": round(_cpu() - cpu0, 3), "startup_wall_s": round(time.perf_counter() - t0, 3),
           "peak_rss_added_mib": round(_status_mib("VmHWM") - rss0, 1), "bytes_read": _rchar() - io0}
    if note:
        out["note"] = note
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tmp", required=True)
    p.add_argument("--measure", choices=("streaming", "litdata"))
    p.add_argument("--path")
    a = p.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure, a.path)))
        return
    root = Path(a.tmp) / "peers"
    root.mkdir(parents=True, exist_ok=True)
    results: dict = {"shards": SHARDS, "samples": SHARDS * PER_SHARD}
    for lib, module, write in (("streaming", "streaming", write_streaming), ("litdata", "litdata", write_litdata)):
        try:
            if lib == "streaming":
                _torchvision_standin()
            mod = __import__(module)
        except ImportError as exc:
            results[lib] = {"skipped": f"{module} is not installed ({exc}); pip install '.[bench]'"}
            continue
        path = write(root)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, __file__, "--tmp", a.tmp, "--measure", lib, "--path", str(path)],
                              capture_output=True, text=True, env=env, timeout=1800, cwd=str(root))
        row = {"version": getattr(mod, "__version__", "?"),
               "index_bytes": (path / "index.json").stat().st_size}
        if done.returncode == 0:
            row.update(json.loads(done.stdout.strip().splitlines()[-1]))
        else:
            row["error"] = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"
        results[lib] = row
    print(json.dumps(results))


if __name__ == "__main__":
    main()
