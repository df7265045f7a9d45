"""One rank's start-up, measured in a fresh process: run by bench/data_scale.py, one probe per manifest.

    PYTHONPATH=<code to measure> python bench/data_scale_probe.py SPEC [--workers N --batches K --s3-endpoint URL]

Prints one JSON line. Only the ``TrainLoader`` API common to every version is used, so the same probe
measures today's code (an export of an older commit on PYTHONPATH) and this branch. Start-up is the
loader built, the workers' spec made and the first step planned (what a rank does before its DataLoader
starts); CPU seconds are the process's user + system time; "added" RSS is the peak over start-up (VmHWM,
reset after the imports) minus the RSS after the imports; index bytes are what the process read through
read syscalls meanwhile (/proc/self/io rchar: local files; for S3 the caller counts the objects' sizes).
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import time


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _reset_peak() -> None:
    # Linux: "5" resets the peak RSS (VmHWM) to the current RSS, so the peak of the imports is not counted.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _uss_mib(pid: int) -> float:
    private = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                private += int(line.split()[1])
    return private / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("spec")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--batches", type=int, default=0)
    p.add_argument("--s3-endpoint", default="")
    p.add_argument("--label", default="")
    a = p.parse_args()

    import psutil
    import torch  # noqa: F401 - imported before the baseline, as a trainer has it

    from data_pipeline.image.transforms import TrainTransform
    from data_pipeline.storage import Storage
    from data_pipeline.stream.plan import RankSchedule
    from data_pipeline.stream.train_loader import TrainLoader

    storage = Storage(s3_endpoint=a.s3_endpoint) if a.s3_endpoint else Storage()
    gc.collect()
    _reset_peak()
    rss0, cpu0, io0, t0 = _status_mib("VmRSS"), _cpu(), _rchar(), time.perf_counter()
    kw = {"label": a.label} if a.label else {}
    loader = TrainLoader(a.spec, batch_size=32, transform=TrainTransform(32), seed=0, num_workers=a.workers,
                         shuffle_buffer=10_000, storage=storage, **kw)
    loader.worker_spec()
    RankSchedule(**loader.schedule_args()).next()
    out = {"startup_cpu_s": round(_cpu() - cpu0, 3), "startup_wall_s": round(time.perf_counter() - t0, 3),
           "peak_rss_added_mib": round(_status_mib("VmHWM") - rss0, 1), "index_bytes_read": _rchar() - io0}
    if a.batches:
        it = iter(loader)
        next(it)
        out["first_batch_s"] = round(time.perf_counter() - t0, 3)
        for _ in range(a.batches - 1):
            next(it)
        children = psutil.Process().children()
        out["worker_uss_mib"] = [round(_uss_mib(c.pid), 1) for c in children]
        out["rank_rss_mib"] = round(psutil.Process().memory_info().rss / 2**20, 1)
        out["bytes_read_by_workers"] = loader.bytes_read
        del it
    print(json.dumps(out))


if __name__ == "__main__":
    main()
