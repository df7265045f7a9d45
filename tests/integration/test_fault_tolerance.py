"""Fault tolerance within a run (engine.fault_tolerance=torchft): replica groups on loopback, each its own
torchrun (gloo), voting a quorum at every step through torchft's lighthouse (`python -m cluster.launch
--torchft-lighthouse`).

- One group SIGKILLed mid-run: the survivors go on in the same processes, without a restart or a checkpoint
  read; a replacement started afterwards recovers live from a peer and trains with them; over the run no
  sample is lost or consumed twice (tests/drivers/ft_train.py records every step each group tried).
- The lighthouse SIGKILLed: every group stops with one line, and a restart resumes from the checkpoints.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, free_port
from tests.drivers.ft_train import account
from tests.integration.test_elastic_node_loss import kill_node, wait_until, write_epoch

pytest.importorskip("torchft", reason="torchft is not installed (pip install -e '.[torchft]')")
pytestmark = pytest.mark.slow
DRIVER = str(ROOT / "tests" / "drivers" / "ft_train.py")
SAMPLES = 400


def train_args(run_dir: Path, spec: str, steps: int, groups: int, group_batch: int, every: int) -> list[str]:
    return ["--config", str(ROOT / "configs/demo.yaml"), f"run.dir={run_dir}", "data.prepare=none",
            f"data.train={spec}", "data.val=''", "model.name=mixer_p4_32", f"train.steps={steps}",
            f"train.global_batch_size={groups * group_batch}", f"checkpoint.every_steps={every}",
            "checkpoint.keep_last=20", "train.log_every=1", "optim.warmup_steps=2", "eval.mode=none",
            "data.num_workers=1", "data.shuffle_buffer=50", "train.device=cpu", "engine.kind=ddp",
            "engine.fault_tolerance=torchft", f"engine.torchft.replica_groups={groups}",
            "engine.torchft.quorum_timeout_s=5"]


class Cluster:
    """A lighthouse and replica groups on loopback, each a process tree of its own with its own log."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp, self.env, self.port = tmp, env, free_port()
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}

    def start(self, name: str, cmd: list[str], **env: str) -> Path:
        log = self.tmp / f"{name}.log"
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**self.env, **env}, cwd=ROOT,
                                    start_new_session=True)
        self.procs[name] = (proc, log)
        return log

    def lighthouse(self, name: str = "lighthouse") -> Path:
        log = self.start(name, [sys.executable, "-m", "cluster.launch", "--torchft-lighthouse",
                                "--lighthouse-port", str(self.port)])
        wait_until(lambda: "torchft lighthouse at" in log.read_text(), 60, "lighthouse", [log], [self.procs[name][0]])
        return log

    def group_torchrun(self, name: str, group: int, args: list[str]) -> Path:
        """A replica group started by torchrun directly, running the recording driver."""
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", name,
               DRIVER, *args]
        return self.start(name, cmd, REPLICA_GROUP_ID=str(group), TORCHFT_LIGHTHOUSE=f"http://127.0.0.1:{self.port}")

    def group_launch(self, name: str, group: int, args: list[str]) -> Path:
        """A replica group started the way a user starts one: python -m cluster.launch --replica-group N."""
        cmd = [sys.executable, "-m", "cluster.launch", "--replica-group", str(group), "--lighthouse",
               f"http://127.0.0.1:{self.port}", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "--", *args]
        return self.start(name, cmd)

    def kill(self, name: str) -> None:
        kill_node(self.procs[name][0].pid)
        self.procs[name][0].wait()

    def stop(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                kill_node(proc.pid)
            proc.wait()


def committed_steps(log: Path) -> list[int]:
    return [int(m) for m in re.findall(r"\bstep (\d+)/\d+ ", log.read_text())]


def consumed(checkpoint: Path) -> int:
    """Samples the data position of a checkpoint counts as consumed (one source, within its first epoch)."""
    data = torch.load(checkpoint / "shared.pt", weights_only=True)["data"]["sources"][0]
    assert data["epoch"] == 0
    c = data["consumed"]
    return sum(c[i + 1] - c[i] for i in range(0, len(c), 2))


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    records = tmp_path / "records"
    records.mkdir()
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "FT_RECORD_DIR": str(records),
            "PYTHONPATH": str(ROOT)}


def test_group_killed_survivors_go_on_and_a_replacement_recovers_live(tmp_path, env):
    spec, epoch = write_epoch(tmp_path / "data", SAMPLES, 100)
    steps, groups, batch, kill_after = 60, 3, 2, 8  # at most 360 samples: the run stays in the first epoch
    args = train_args(tmp_path / "run", spec, steps, groups, batch, every=10)
    c = Cluster(tmp_path, {**env, "FT_STEP_SLEEP_S": "0.2"})
    try:
        c.lighthouse()
        logs = [c.group_torchrun(f"g{g}", g, args) for g in range(groups)]
        survivors = [c.procs["g0"][0], c.procs["g1"][0]]
        wait_until(lambda: max(committed_steps(logs[0]), default=0) >= kill_after, 180, f"step {kill_after}",
                   logs, [p for p, _ in c.procs.values()])
        pace = Path(env["FT_RECORD_DIR"]) / "step_sleep_s"
        pace.write_text("0.5")  # the survivors' run lasts until the replacement has joined
        c.kill("g2")
        killed = time.time()
        last = max(committed_steps(logs[0]))
        wait_until(lambda: max(committed_steps(logs[0])) > last + 1, 60, "a step after the kill", logs[:2], survivors)
        print(f"group killed -> survivors' next steps: {time.time() - killed:.1f}s")
        started = time.time()
        new = c.group_torchrun("g2_new", 2, args)
        wait_until(lambda: "recovered live from a peer" in new.read_text(), 120, "live recovery", [new, logs[0]],
                   [*survivors, c.procs["g2_new"][0]])
        print(f"replacement started -> recovered live: {time.time() - started:.1f}s")
        pace.write_text("0.05")
        for name in ("g0", "g1", "g2_new"):
            proc, log = c.procs[name]
            assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        c.stop()
    for log in logs[:2]:  # the survivors: one process each, never restarted, never read a checkpoint
        out = log.read_text()
        assert "resumed from" not in out and f"done: {steps} steps" in out
        assert "replica groups in the quorum: 2 (was 3)" in out and "replica groups in the quorum: 3 (was 2)" in out
        done = committed_steps(log)
        assert done == sorted(set(done)) and done[-1] == steps, "a survivor redid or skipped a step"
    out = new.read_text()
    m = re.search(r"recovered live from a peer at step (\d+)", out)
    assert m and int(m.group(1)) > kill_after, out[-3000:]
    assert f"done: {steps} steps" in out

    # Exactness: what the committed steps consumed, each sample once, is what the data position says.
    record = account(Path(env["FT_RECORD_DIR"]))
    keys = record["keys"]
    assert record["steps"] == list(range(1, steps + 1))
    assert len(keys) == len(set(keys)), f"{len(keys) - len(set(keys))} sample(s) consumed twice"
    assert set(keys) <= set(epoch)
    final = [consumed(tmp_path / f"run/replica_{g}/checkpoints/step_{steps:07d}") for g in range(groups)]
    assert final == [len(keys)] * groups, (final, len(keys))  # none lost, and every group's position agrees
    print(f"{len(keys)} samples consumed over {steps} steps, 0 twice, 0 lost; "
          f"attempts not committed: {len(record['not_committed'])}")


def latest_step(run_dir: Path) -> int:
    return max(int(p.name.split("_")[1]) for p in run_dir.glob("replica_*/checkpoints/step_*"))


def test_lighthouse_lost_stops_in_one_line_and_the_run_resumes(tmp_path, env):
    """Through `python -m cluster.launch` (lighthouse and groups) running pretrain/main.py itself."""
    spec, _ = write_epoch(tmp_path / "data", SAMPLES, 100)
    groups, run_dir = 2, tmp_path / "run"
    args = train_args(run_dir, spec, 1500, groups, 2, every=50)  # long enough to lose the lighthouse mid-run
    c = Cluster(tmp_path, env)
    try:
        c.lighthouse()
        logs = [c.group_launch(f"g{g}", g, args) for g in range(groups)]
        saved = [run_dir / f"replica_{g}/checkpoints/step_0000050" for g in range(groups)]
        wait_until(lambda: all(p.exists() for p in saved), 180, "a checkpoint", logs, [p for p, _ in c.procs.values()])
        c.kill("lighthouse")
        killed = time.time()
        codes = [c.procs[f"g{g}"][0].wait(timeout=120) for g in range(groups)]
        print(f"lighthouse killed -> groups stopped: {time.time() - killed:.1f}s")
        for code, log in zip(codes, logs):
            out = log.read_text()
            errors = [line for line in out.splitlines() if line.startswith("error:")]
            assert code == 2 and len(errors) == 1, out[-3000:]
            assert "torchft quorum failed" in errors[0] and "lighthouse" in errors[0], errors
            assert "Traceback" not in out, out[-3000:]
        steps = latest_step(run_dir) + 6  # a few steps past the newest checkpoint
        c.lighthouse("lighthouse2")
        args = train_args(run_dir, spec, steps, groups, 2, every=50)
        logs = [c.group_launch(f"g{g}_again", g, args) for g in range(groups)]
        for g in range(groups):
            proc, log = c.procs[f"g{g}_again"]
            assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
            out = log.read_text()
            assert re.search(r"resumed from \S+step_\d+ \(step [1-9]\d*\)", out), out[-3000:]
            assert f"done: {steps} steps" in out
    finally:
        c.stop()
