"""A rank that dies under `python -m cluster.launch` (torchrun, 2 ranks over gloo): one line naming the
rank, its node and how it died -- not the survivor's gloo traceback and torchrun's `error: <NONE>`."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, free_port, tiny_args
from tests.integration.test_preemption import start, wait_for_first_checkpoint

pytestmark = pytest.mark.slow


def launch_cmd() -> list[str]:
    return [sys.executable, "-m", "cluster.launch", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "--"]


def test_sigkilled_rank_is_one_line(tmp_path, demo_root):
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    proc = start(launch_cmd() + tiny_args(run_dir, demo_root, 400, 10, "eval.fewshot.enabled=false"), log)
    try:
        wait_for_first_checkpoint(proc, run_dir)
        time.sleep(1.0)  # in training, past the checkpoint and its evaluation
        ranks = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "pretrain/main.py"], capture_output=True,
                               text=True).stdout.split()
        assert len(ranks) == 2, ranks
        killed = time.monotonic()
        os.kill(int(ranks[1]), signal.SIGKILL)  # as the kernel's OOM killer does
        code = proc.wait(timeout=120)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert code != 0 and errors == [
        f"error: rank 1 (local rank 1) on node {socket.gethostname()} was killed by SIGKILL (out of memory? the "
        "kernel's OOM killer sends SIGKILL; see dmesg)"], out[-3000:]
    assert "Traceback" not in out and "<NONE>" not in out, out[-3000:]
    print(f"SIGKILLed rank: launcher exit {took:.1f}s after the kill")


def test_rank_that_dies_on_import_is_one_line(tmp_path):
    """Rank 1 cannot import a dependency (a broken install on its node): rank 0, waiting for it in the
    rendezvous, is stopped by torchrun, and the launcher names rank 1 and its exit code."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    # Shadows omegaconf on rank 1 only; every other process gets the real one.
    (shadow / "omegaconf.py").write_text(
        "import os, sys\n"
        "if os.environ.get('LOCAL_RANK') == '1':\n"
        "    raise ImportError('libyaml.so.0: cannot open shared object file (broken install on this node)')\n"
        "here = os.path.dirname(os.path.abspath(__file__))\n"
        "sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != here]\n"
        "del sys.modules['omegaconf']\n"
        "import omegaconf  # noqa: E402,F401 -- the real one replaces this module\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{shadow}{os.pathsep}{ROOT}"}
    t0 = time.monotonic()
    r = subprocess.run(launch_cmd() + ["--config", str(ROOT / "configs/demo.yaml"), f"run.dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    took = time.monotonic() - t0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 1 and errors == [
        f"error: rank 1 (local rank 1) on node {socket.gethostname()} exited with code 1 without reporting an error "
        "(e.g. on import); see its output above"], r.stderr[-3000:]
    assert "<NONE>" not in r.stderr
    assert "libyaml.so.0" in r.stderr  # the rank's own output says why
    print(f"rank dead on import: launcher exit {took:.1f}s after start")
