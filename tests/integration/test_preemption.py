"""Preemption: SIGTERM (or SLURM's SIGUSR1) makes a run checkpoint at the next step boundary and exit
with the requeue code; launching it again continues from that checkpoint to the end."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.exit_codes import REQUEUE_EXIT_CODE
from tests.conftest import MAIN, ROOT, free_port, tiny_args

pytestmark = pytest.mark.slow
STEPS = 400  # far more than the run reaches before the signal: it must stop early


def checkpoint_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step_???????")) if root.exists() else []


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_first_checkpoint(proc: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.time() + 180
    while not checkpoint_steps(run_dir):
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)


def test_sigterm_to_torchrun_job_exits_with_requeue_code_and_resumes(tmp_path, demo_root):
    """SIGTERM to the whole process group (launcher, 2 ranks, data workers), as a scheduler sends it;
    cluster.launch runs torchrun and keeps the ranks' requeue code as the job's exit code."""
    cmd_prefix = [sys.executable, "-m", "cluster.launch", "--launcher", "torchrun", "--nproc-per-node", "2",
                  "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--"]
    sig = signal.SIGTERM
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, demo_root, STEPS, 10, "eval.fewshot.enabled=false", "train.log_every=1")
    log = tmp_path / "first.log"
    proc = start(cmd_prefix + args, log)
    wait_for_first_checkpoint(proc, run_dir)
    time.sleep(0.5)  # inside training, past the checkpoint and its evaluation
    sent = time.time()
    os.killpg(proc.pid, sig)
    code = proc.wait(timeout=120)
    took = time.time() - sent
    out = log.read_text()
    assert code == REQUEUE_EXIT_CODE, out[-3000:]
    assert took < 30, f"exit took {took:.1f}s after the signal"
    steps = checkpoint_steps(run_dir)
    stopped = steps[-1]
    assert 10 < stopped < STEPS, f"the run did not stop early: {steps}"
    # Within one step: the step during which the signal arrived is the last one taken.
    after = [int(n) for n in re.findall(fr"{signal.Signals(sig).name} received (\d+) step\(s\) ago", out)]
    assert after and max(after) <= 1, out[-2000:]
    assert f"checkpoint at step {stopped} saved" in out
    logged = [int(s) for s in re.findall(rf"step (\d+)/{STEPS}  loss", out)]
    assert max(logged) == stopped, "a step was taken after the preemption checkpoint"

    # The requeued run: same command; it resumes there and finishes (shortened to keep the test quick).
    resumed_args = [a if not a.startswith("train.steps=") else f"train.steps={stopped + 5}" for a in args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd_prefix + resumed_args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(rf"resumed from \S+step_{stopped:07d} \(step {stopped}\)", r.stderr), r.stderr[-2000:]
    first_logged = int(re.search(r"step (\d+)/\d+  loss", r.stderr).group(1))
    assert first_logged == stopped + 1
    assert checkpoint_steps(run_dir)[-1] == stopped + 5


def test_sigusr1_to_one_rank_stops_all(tmp_path, demo_root):
    """SLURM's warning signal reaching a single rank is enough: the ranks agree and all save the same step."""
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, demo_root, STEPS, 10, "eval.fewshot.enabled=false")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(free_port()), MAIN]
    log = tmp_path / "run.log"
    proc = start(launcher + args, log)
    wait_for_first_checkpoint(proc, run_dir)
    ranks = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "pretrain/main.py"], capture_output=True,
                           text=True).stdout.split()
    assert len(ranks) == 2, ranks
    os.kill(int(ranks[1]), signal.SIGUSR1)
    proc.wait(timeout=120)
    out = log.read_text()
    stopped = checkpoint_steps(run_dir)[-1]
    assert 10 < stopped < STEPS, out[-3000:]
    assert "signal received by another rank" in out and "SIGUSR1 received" in out, out[-3000:]
    assert sorted(p.name for p in (run_dir / f"checkpoints/step_{stopped:07d}").iterdir()) == [
        "config.yaml", "engine", "metadata.json", "model.safetensors", "rank_00000.pt", "rank_00001.pt",
        "shared.pt"]
