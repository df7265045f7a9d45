"""A preemption signal while the object store does not answer (moto stopped) and the reads are being
retried: every rank (2) checkpoints the last finished step -- its exact data position -- and exits 75
within 30 s, instead of waiting out the retry budget; the same while an evaluation waits on storage."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.shards.tar_write import encode_jpeg, write_shards
from data_pipeline.storage import Storage
from pretrain.exit_codes import REQUEUE_EXIT_CODE
from tests.conftest import free_port, tiny_args
from tests.integration.test_preemption import checkpoint_steps, start

pytestmark = pytest.mark.slow
BUDGET = 600  # the retry budget: far longer than the test may take


def upload(local_dir: Path, server, prefix: str) -> None:
    import s3fs
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.endpoint}).put(
        str(local_dir) + "/", server.url(prefix) + "/", recursive=True)


def launch(cmd_args: list[str], log: Path):
    return start([sys.executable, "-m", "cluster.launch", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                  "--master-port", str(free_port()), "--"] + cmd_args, log)


def wait_for(predicate, proc, log: Path, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None and time.time() < deadline, f"{what}: " + log.read_text()[-3000:]
        time.sleep(0.1)


def ranks_of(proc) -> list[int]:
    ranks = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "pretrain/main.py"], capture_output=True,
                           text=True).stdout.split()
    assert len(ranks) == 2, ranks
    return [int(r) for r in ranks]


def signal_and_time(proc, sig: signal.Signals) -> tuple[int, float]:
    """SIGTERM to the launcher's process group (torchrun passes it on to the ranks, which run in sessions of
    their own); SIGUSR1, which the launcher ignores, to every rank, as SLURM signals every task's processes."""
    ranks = ranks_of(proc)
    sent = time.monotonic()
    os.killpg(proc.pid, sig)
    if sig == signal.SIGUSR1:
        for pid in ranks:
            os.kill(pid, sig)
    try:
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return code, time.monotonic() - sent


def test_sigterm_during_training_storage_stall(tmp_path, s3_server):
    rng = np.random.default_rng(0)
    jpgs = [encode_jpeg(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    write_shards(((f"k{i:05d}", jpgs[i % 8], i % 10) for i in range(1600)), str(tmp_path / "shards"), "train", 40,
                 storage=Storage())
    upload(tmp_path / "shards", s3_server, "shards")
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    args = ["--config", str(Path(__file__).parents[2] / "configs/demo.yaml"), f"run.dir={run_dir}",
            "data.prepare=none", f"data.train={s3_server.url('shards/train.json')}", "data.val=''",
            "eval.fewshot.enabled=false", "eval.linear_probe.enabled=false", "model.name=mixer_p4_32",
            "train.steps=10000", "train.global_batch_size=16", "train.grad_accum_steps=2", "train.log_every=1",
            "checkpoint.every_steps=5", "data.num_workers=1", "data.shuffle_buffer=40",
            f"data.storage.s3_endpoint={s3_server.endpoint}", f"data.storage.give_up_after_s={BUDGET}",
            "data.storage.backoff_s=0.5"]
    proc = launch(args, log)
    wait_for(lambda: (run_dir / "checkpoints/latest").exists(), proc, log, "no first checkpoint")
    s3_server.stop()
    wait_for(lambda: "retry" in log.read_text(), proc, log, "the outage was never hit")
    time.sleep(1.0)  # well inside the retrying: the ranks wait for data
    code, took = signal_and_time(proc, signal.SIGTERM)
    out = log.read_text()
    assert code == REQUEUE_EXIT_CODE and took < 30, (code, took, out[-3000:])
    stopped = checkpoint_steps(run_dir)[-1]
    assert f"checkpoint at step {stopped} saved" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    # The last finished step: no step logged after it, and its data position is exactly that step's.
    logged = [int(line.split("step ")[1].split("/")[0]) for line in out.splitlines() if "  loss" in line]
    assert max(logged) == stopped, out[-3000:]
    shared = torch.load(run_dir / f"checkpoints/step_{stopped:07d}/shared.pt", weights_only=True)
    assert shared["data"]["total"] == stopped * 16 and shared["data"]["delivered"] == stopped * 16
    assert sorted(p.name for p in (run_dir / f"checkpoints/step_{stopped:07d}").glob("rank_*")) == [
        "rank_00000.pt", "rank_00001.pt"]
    print(f"SIGTERM during a training storage stall: exit 75 in {took:.1f}s, checkpoint at step {stopped}")


def test_sigusr1_during_evaluation_storage_stall(tmp_path, s3_server, demo_root):
    upload(Path(demo_root) / "shapes", s3_server, "shapes")
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    args = tiny_args(run_dir, demo_root, 400, 10, f"data.val={s3_server.url('shapes/val.json')}",
                     "eval.fewshot.enabled=false", "eval.linear_probe.enabled=false",
                     f"data.storage.s3_endpoint={s3_server.endpoint}", f"data.storage.give_up_after_s={BUDGET}",
                     "data.storage.backoff_s=0.5")
    proc = launch(args, log)
    wait_for(lambda: (run_dir / "eval/step_0000010.json").exists(), proc, log, "no first evaluation")
    s3_server.stop()
    wait_for(lambda: "retry" in log.read_text(), proc, log, "the evaluation never waited on storage")
    time.sleep(1.0)
    code, took = signal_and_time(proc, signal.SIGUSR1)
    out = log.read_text()
    assert code == REQUEUE_EXIT_CODE and took < 30, (code, took, out[-3000:])
    assert checkpoint_steps(run_dir)[-1] == 20 and (run_dir / "checkpoints/latest").read_text() == "step_0000020"
    assert "checkpoint at step 20 saved" in out and "evaluation abandoned" in out, out[-3000:]
    assert not (run_dir / "eval/step_0000020.json").exists()
    assert "Traceback" not in out, out[-3000:]
    print(f"SIGUSR1 during an evaluation storage stall: exit 75 in {took:.1f}s")
