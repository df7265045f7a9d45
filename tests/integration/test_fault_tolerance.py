"""Fault tolerance within a run (engine.fault_tolerance=torchft): replica groups on loopback, each its own
torchrun (gloo), voting a quorum at every step through torchft's lighthouse (`python -m cluster.launch
--torchft-lighthouse`).

- One group SIGKILLed mid-run: the survivors go on in the same processes, without a restart or a checkpoint
  read; a replacement started afterwards recovers live from a peer, without reading its group's checkpoint,
  and trains with them; over the run no sample is lost or consumed twice (tests/drivers/ft_train.py records
  every step each group tried). Groups of one rank (ddp) and of two (ddp, and fsdp as HSDP).
- The lighthouse SIGKILLed: every group stops with one line, and a restart resumes from the checkpoints.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, free_port
from tests.drivers.ft_train import account
from tests.integration.test_elastic_node_loss import write_epoch
from tests.procs import Procs, wait_until

pytest.importorskip("torchft", reason="torchft is not installed (pip install -e '.[torchft]')")
pytestmark = pytest.mark.slow
DRIVER = str(ROOT / "tests" / "drivers" / "ft_train.py")
SAMPLES = 400


def train_args(run_dir: Path, spec: str, steps: int, groups: int, group_batch: int, every: int,
               kind: str = "ddp") -> list[str]:
    return ["--config", str(ROOT / "configs/demo.yaml"), f"run.dir={run_dir}", "data.prepare=none",
            f"data.train={spec}", "data.val=''", "model.name=mixer_p4_32", f"train.steps={steps}",
            f"train.global_batch_size={groups * group_batch}", f"checkpoint.every_steps={every}",
            "checkpoint.keep_last=20", "train.log_every=1", "optim.warmup_steps=2", "eval.mode=none",
            "data.num_workers=1", "data.shuffle_buffer=50", "train.device=cpu", f"engine.kind={kind}",
            "engine.fault_tolerance=torchft", f"engine.torchft.replica_groups={groups}",
            "engine.torchft.quorum_timeout_s=5"]


class Cluster(Procs):
    """A lighthouse and replica groups on loopback, each a process tree of its own with its own log."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        super().__init__(tmp, env)
        self.port = free_port()

    def lighthouse(self, name: str = "lighthouse", min_replicas: int = 1) -> Path:
        log = self.start(name, [sys.executable, "-m", "cluster.launch", "--torchft-lighthouse",
                                "--lighthouse-port", str(self.port), "--min-replicas", str(min_replicas)])
        wait_until(lambda: "torchft lighthouse at" in log.read_text(), 60, "lighthouse", [log], [self.procs[name]])
        return log

    def group_torchrun(self, name: str, group: int, args: list[str], ranks: int = 1) -> Path:
        """A replica group of `ranks` processes started by torchrun directly (gloo), running the recording driver."""
        return self.torchrun(name, DRIVER, args, nproc=ranks, REPLICA_GROUP_ID=str(group),
                             TORCHFT_LIGHTHOUSE=f"http://127.0.0.1:{self.port}")

    def group_launch(self, name: str, group: int, args: list[str]) -> Path:
        """A replica group started the way a user starts one: python -m cluster.launch --replica-group N."""
        cmd = [sys.executable, "-m", "cluster.launch", "--replica-group", str(group), "--lighthouse",
               f"http://127.0.0.1:{self.port}", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "--", *args]
        return self.start(name, cmd)


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
        survivors = [c.procs["g0"], c.procs["g1"]]
        wait_until(lambda: max(committed_steps(logs[0]), default=0) >= kill_after, 180, f"step {kill_after}",
                   logs, list(c.procs.values()))
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
                   [*survivors, c.procs["g2_new"]])
        print(f"replacement started -> recovered live: {time.time() - started:.1f}s")
        pace.write_text("0.05")
        for name in ("g0", "g1", "g2_new"):
            proc, log = c.procs[name], c.logs[name]
            assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        c.stop()
    for log in logs[:2]:  # the survivors: one process each, never restarted, never read a checkpoint
        out = log.read_text()
        assert "resumed from" not in out and f"done: {steps} steps" in out
        assert "replica groups in the quorum: 2 (was 3)" in out and "replica groups in the quorum: 3 (was 2)" in out
        done = committed_steps(log)
        assert done == sorted(set(done)) and done[-1] == steps, "a survivor redid or skipped a step"
    recovered_without_checkpoint(new, kill_after, steps)

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


def recovered_without_checkpoint(log: Path, kill_after: int, steps: int) -> None:
    """A replacement group's log: it took a peer's state at a step past the kill, read no checkpoint (its
    group's directory holds some), and its first step is the one after the peer's."""
    out = log.read_text()
    m = re.search(r"recovered live from a peer at step (\d+): no checkpoint read", out)
    assert m and int(m.group(1)) > kill_after, out[-3000:]
    assert "resumed from" not in out and "RNG state" not in out, out[-3000:]  # the checkpoint read's own lines
    assert committed_steps(log)[0] == int(m.group(1)) + 1, out[-3000:]
    assert f"done: {steps} steps" in out


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_groups_of_two_ranks_lose_one_and_a_replacement_recovers_live(tmp_path, env, kind):
    """2 groups x 2 ranks (fsdp: HSDP, the shards of each rank averaged across groups, live recovery rank by
    rank); then, for fsdp, a full restart in which each group resumes from its own DCP checkpoint."""
    spec, epoch = write_epoch(tmp_path / "data", SAMPLES, 100)
    steps, groups, batch, kill_after = 30, 2, 4, 6  # at most 240 samples: the run stays in the first epoch
    args = train_args(tmp_path / "run", spec, steps, groups, batch, every=5, kind=kind)
    c = Cluster(tmp_path, {**env, "FT_STEP_SLEEP_S": "0.1"})
    try:
        c.lighthouse()
        logs = [c.group_torchrun(f"g{g}", g, args, ranks=2) for g in range(groups)]
        saved = tmp_path / "run/replica_1/checkpoints"  # the replacement will find (and not read) one there
        wait_until(lambda: max(committed_steps(logs[0]), default=0) >= kill_after and any(saved.glob("step_*")), 180,
                   f"step {kill_after}", logs, list(c.procs.values()))
        pace = Path(env["FT_RECORD_DIR"]) / "step_sleep_s"
        pace.write_text("1")  # the survivor's run lasts until the replacement has joined
        c.kill("g1")
        last = max(committed_steps(logs[0]))
        wait_until(lambda: max(committed_steps(logs[0])) > last + 1, 60, "a step after the kill", logs[:1],
                   [c.procs["g0"]])
        new = c.group_torchrun("g1_new", 1, args, ranks=2)
        wait_until(lambda: "recovered live from a peer" in new.read_text(), 120, "live recovery", [new, logs[0]],
                   [c.procs["g0"], c.procs["g1_new"]])
        pace.write_text("0")
        for name in ("g0", "g1_new"):
            proc, log = c.procs[name], c.logs[name]
            assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
        out = logs[0].read_text()
        assert "resumed from" not in out and f"done: {steps} steps" in out
        assert "replica groups in the quorum: 1 (was 2)" in out and "replica groups in the quorum: 2 (was 1)" in out
        done = committed_steps(logs[0])  # from step 1, or later when group 1 started first and trained alone
        assert done == list(range(done[0], steps + 1)), "the survivor redid or skipped a step"
        recovered_without_checkpoint(new, kill_after, steps)
        record = account(Path(env["FT_RECORD_DIR"]))
        keys = record["keys"]
        assert record["steps"] == list(range(1, steps + 1))
        assert len(keys) == len(set(keys)) and set(keys) <= set(epoch), "a sample consumed twice"
        final = [consumed(tmp_path / f"run/replica_{g}/checkpoints/step_{steps:07d}") for g in range(groups)]
        assert final == [len(keys)] * groups, (final, len(keys))  # none lost, and both groups' positions agree
        weights = [load_file(tmp_path / f"run/replica_{g}/checkpoints/step_{steps:07d}/model.safetensors")
                   for g in range(groups)]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "the replicas' weights differ"
        if kind == "fsdp":
            full_restart_resumes_each_group_from_its_own_checkpoint(c, tmp_path, spec, steps, batch, pace)
    finally:
        c.stop()


def full_restart_resumes_each_group_from_its_own_checkpoint(c: Cluster, tmp: Path, spec: str, steps: int,
                                                             batch: int, pace: Path) -> None:
    """Both groups stopped, group 0's newer checkpoints removed, then restarted, group 1 once group 0 trains:
    each resumes from its own (DCP) checkpoint; group 1, whose checkpoint is newer than group 0's live step,
    keeps it, and group 0 then recovers from group 1 (its step in flight fails on the cross-group timeout)."""
    for step in (20, 25, 30):
        shutil.rmtree(tmp / f"run/replica_0/checkpoints/step_{step:07d}")
    c.kill("lighthouse")  # the new one takes its port
    c.lighthouse("lighthouse2")
    pace.write_text("1.5")  # group 0 is still behind step 30 when group 1 joins
    args = train_args(tmp / "run", spec, steps + 10, 2, batch, every=5, kind="fsdp") + [
        "engine.torchft.timeout_s=5", "engine.torchft.quorum_timeout_s=30"]
    g0 = c.group_torchrun("g0_again", 0, args, ranks=2)
    wait_until(lambda: max(committed_steps(g0), default=0) >= 16, 120, "group 0 training", [g0], [c.procs["g0_again"]])
    g1 = c.group_torchrun("g1_again", 1, args, ranks=2)
    wait_until(lambda: "resumed from" in g1.read_text(), 120, "group 1 resumed", [g1, g0],
               [c.procs["g0_again"], c.procs["g1_again"]])
    pace.write_text("0")
    for name, log in (("g0_again", g0), ("g1_again", g1)):
        assert c.procs[name].wait(timeout=180) == 0, log.read_text()[-3000:]
    out0, out1 = g0.read_text(), g1.read_text()
    assert re.search(r"resumed from \S+step_0000015 \(step 15\)", out0), out0[-3000:]
    assert "recovered live from a peer at step 30" in out0, out0[-3000:]
    assert re.search(r"peers are at step (1[6-9]|2\d), this group's checkpoint at step 30", out1), out1[-3000:]
    assert re.search(r"resumed from \S+step_0000030 \(step 30\)", out1), out1[-3000:]
    assert committed_steps(g1) == list(range(31, steps + 11)) == committed_steps(g0)[-10:]


def latest_step(run_dir: Path) -> int:
    return max(int(p.name.split("_")[1]) for p in run_dir.glob("replica_*/checkpoints/step_*"))


def test_lighthouse_lost_stops_in_one_line_and_the_run_resumes(tmp_path, env):
    """Through `python -m cluster.launch` (lighthouse and groups) running pretrain/main.py itself."""
    spec, _ = write_epoch(tmp_path / "data", SAMPLES, 100)
    groups, run_dir = 2, tmp_path / "run"
    args = train_args(run_dir, spec, 1500, groups, 2, every=50)  # long enough to lose the lighthouse mid-run
    c = Cluster(tmp_path, env)
    try:
        c.lighthouse(min_replicas=groups)  # no group trains alone (and past step 50) before the other has started
        logs = [c.group_launch(f"g{g}", g, args) for g in range(groups)]
        saved = [run_dir / f"replica_{g}/checkpoints/step_0000050" for g in range(groups)]
        wait_until(lambda: all(p.exists() for p in saved), 180, "a checkpoint", logs, list(c.procs.values()))
        c.kill("lighthouse")
        killed = time.time()
        codes = [c.procs[f"g{g}"].wait(timeout=120) for g in range(groups)]
        print(f"lighthouse killed -> groups stopped: {time.time() - killed:.1f}s")
        for code, log in zip(codes, logs):
            out = log.read_text()
            errors = [line for line in out.splitlines() if line.startswith("error:")]
            assert code == 2 and len(errors) == 1, out[-3000:]
            assert "torchft quorum failed" in errors[0] and "lighthouse" in errors[0], errors
            assert "Traceback" not in out, out[-3000:]
        steps = latest_step(run_dir) + 6  # a few steps past the newest checkpoint
        c.lighthouse("lighthouse2", min_replicas=groups)  # the first quorum waits for both: neither is ahead
        args = train_args(run_dir, spec, steps, groups, 2, every=50)
        logs = [c.group_launch(f"g{g}_again", g, args) for g in range(groups)]
        for g in range(groups):
            proc, log = c.procs[f"g{g}_again"], c.logs[f"g{g}_again"]
            assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
            out = log.read_text()
            assert re.search(r"resumed from \S+step_\d+ \(step [1-9]\d*\)", out), out[-3000:]
            assert f"done: {steps} steps" in out
    finally:
        c.stop()
