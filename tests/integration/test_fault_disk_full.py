"""A run dir on a real file system that fills up (a 16 MB tmpfs) while the run checkpoints: one line naming
the path, "no space" and the bytes needed vs free, on every rank; the previous checkpoint stays `latest`;
no evaluation record for the checkpoint that was never published. Sync save on the single engine, async
save on ddp under `python -m cluster.launch` (the failure surfaces at the next step boundary)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import MAIN, free_port, tiny_args
from tests.integration.test_preemption import checkpoint_steps, start

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs: a real file system that fills up (ENOSPC), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the CI container runs the tests as root)")
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int = 32 << 10) -> int:
    """Fill `disk` up to `leave` free bytes; returns the bytes left free."""
    free = shutil.disk_usage(disk).free
    with open(disk / "ballast", "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave))
    return shutil.disk_usage(disk).free


def run_until_full(cmd: list[str], run_dir: Path, disk: Path, log: Path) -> tuple[int, str, float]:
    """Start the run, fill the disk once the first checkpoint and its evaluation record are in, and
    return (exit code, output, seconds from the disk filling up to the exit)."""
    proc = start(cmd, log)
    deadline = time.time() + 240
    try:
        while not (run_dir / "eval" / "step_0000010.json").exists():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        fill(disk)
        filled = time.monotonic()
        code = proc.wait(timeout=180)
        return code, log.read_text(), time.monotonic() - filled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)


def check_outcome(code: int, out: str, run_dir: Path) -> str:
    errors = {line for line in out.splitlines() if line.startswith("error: ")}
    assert code == 2 and len(errors) == 1, out[-4000:]
    line = errors.pop()
    assert "no space left on the device of" in line and str(run_dir) in line, line
    need, free = (int(x.replace(",", "")) for x in re.search(r"need ([\d,]+) bytes, ([\d,]+) were free", line).groups())
    assert need > free, line
    assert "step_0000010 stays latest" in line, line
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000010"
    assert checkpoint_steps(run_dir) == [10]
    # Evaluation records only for published checkpoints (and the step-0 baseline).
    assert sorted(p.name for p in (run_dir / "eval").glob("step_*.json")) == ["step_0000000.json", "step_0000010.json"]
    assert "Traceback" not in out, out[-4000:]
    return line


def test_disk_full_sync_save_single_engine(tmp_path, demo_root, small_disk):
    run_dir = small_disk / "run"
    args = tiny_args(run_dir, demo_root, 200, 10, "engine.kind=single", "checkpoint.async_save=false",
                     "eval.fewshot.enabled=false", "train.log_every=1")
    code, out, took = run_until_full([sys.executable, MAIN] + args, run_dir, small_disk, tmp_path / "log")
    check_outcome(code, out, run_dir)
    print(f"disk full, sync save, single engine: exit {took:.1f}s after the disk filled up")


def test_disk_full_async_save_ddp_two_ranks(tmp_path, demo_root, small_disk):
    run_dir = small_disk / "run"
    args = tiny_args(run_dir, demo_root, 200, 10, "engine.kind=ddp", "checkpoint.async_save=true",
                     "eval.upstream.enabled=true", "eval.fewshot.enabled=false", "train.log_every=1")
    launch = [sys.executable, "-m", "cluster.launch", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(free_port()), "--"]
    code, out, took = run_until_full(launch + args, run_dir, small_disk, tmp_path / "log")
    line = check_outcome(code, out, run_dir)
    assert line.startswith("error: ") and "checkpoint not saved" in line
    print(f"disk full, async save, ddp x2: exit {took:.1f}s after the disk filled up")
