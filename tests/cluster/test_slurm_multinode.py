"""cluster/slurm/pretrain.sbatch across the two nodes of a real SLURM cluster (n1, n2: see conftest.py),
one rank per node, for each launcher; signals to the batch shell; a master address no node reaches.

The node names do not resolve: the rendezvous runs at n1's NodeAddr from `scontrol show node`. To keep
the suite short the signal checks ride on the launcher runs: the torchrun job gets
`scancel --signal=USR1 --full` (batch shell and every step), the srun job `scancel --signal=USR1
--batch` (the batch shell only, as `#SBATCH --signal=B:USR1@120` does), so its ranks hear of it only
through the script's trap."""
import json
import re
import time

import pytest

from tests.cluster.test_slurm import ckpt_steps, sbatch_args, submit

pytestmark = pytest.mark.slow
ENDS = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
QUIET = ("eval.mode=none",)  # training and checkpoints only: evaluation is tested elsewhere


def submit2(slurm2, run_dir, log, demo_root, steps, every, launcher, *extra, **env):
    return submit(slurm2, "cluster/slurm/pretrain.sbatch",
                  sbatch_args(run_dir, demo_root, steps, every, *QUIET, *extra), log, "--nodes=2",
                  LAUNCHER=launcher, NPROC_PER_NODE="1", **env)


def check_two_node_run(out: str, run_dir, steps: int) -> None:
    """Both nodes checked once, met at n1's address, trained as one group of 2, checkpointed."""
    assert re.search(r"rendezvous 127\.0\.0\.1:\d+", out), out[-3000:]  # n1 does not resolve: its NodeAddr
    for node in ("n1", "n2"):
        assert out.count(f"envcheck [{node}] ok   run dir") >= 1, out[-3000:]
    assert "reached by all 2 nodes" in out
    # The ranks of both nodes in one process group (the rendezvous may number the nodes either way).
    assert re.search(r"process group: 2 rank\(s\) on 2 node\(s\): n[12] \[0\], n[12] \[1\]", out), out[-3000:]
    assert "2 ranks x " in out
    assert ckpt_steps(run_dir)[-1] == steps
    assert json.loads((run_dir / f"checkpoints/step_{steps:07d}/metadata.json").read_text())["world_size"] == 2


def signal_after_first_checkpoint(slurm2, job, run_dir, log, *scancel_opts: str) -> None:
    deadline = time.time() + 120
    while not ckpt_steps(run_dir):
        assert slurm2.job(job)["JobState"] in ("PENDING", "RUNNING") and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    slurm2.run("scancel", "--signal=USR1", *scancel_opts, job)


def check_requeued_and_resumed(info: dict, out: str, job: str, steps: int) -> None:
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out[-4000:]
    assert "batch script: SIGUSR1 received; passing it on to the ranks" in out
    m = re.search(r"checkpoint at step (\d+) saved", out)
    assert m, out[-4000:]
    stopped = int(m.group(1))
    assert 0 < stopped < steps, out[-4000:]
    assert f"requeueing job {job}" in out and f"job {job} restart 1" in out
    assert re.search(rf"resumed from \S+step_{stopped:07d} \(step {stopped}\) with world size 2", out), out[-4000:]


@pytest.mark.parametrize("launcher,scancel", [("torchrun", "--full"), ("srun", "--batch")])
def test_two_nodes_train_and_usr1_to_batch_shell_requeues(slurm2, tmp_path, demo_root, launcher, scancel):
    run_dir, log, steps = tmp_path / "run", tmp_path / "job.log", 24
    job = submit2(slurm2, run_dir, log, demo_root, steps, 4, launcher, "train.global_batch_size=16")
    signal_after_first_checkpoint(slurm2, job, run_dir, log, scancel)
    info = slurm2.wait(job, ENDS, 240, log)
    out = log.read_text()
    check_requeued_and_resumed(info, out, job, steps)
    check_two_node_run(out, run_dir, steps)


def test_two_nodes_deepspeed_launcher(slurm2, tmp_path, demo_root):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e '.[deepspeed]')")
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    job = submit2(slurm2, run_dir, log, demo_root, 2, 2, "deepspeed", "engine.kind=deepspeed",
                  "train.global_batch_size=8")
    info = slurm2.wait(job, ENDS, 240, log)
    out = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out[-4000:]
    assert "deepspeed.launcher.runner" in out and "--no_ssh" in out
    check_two_node_run(out, run_dir, 2)


def test_unreachable_master_fails_in_seconds_with_one_line(slurm2, tmp_path, demo_root):
    # 192.0.2.1 (TEST-NET-1) is no address of n1: the pre-flight check cannot listen there, and n2
    # could not connect to it. Without that check the ranks would wait for the rendezvous timeout.
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    t0 = time.time()
    job = submit2(slurm2, run_dir, log, demo_root, 4, 2, "torchrun", MASTER_ADDR="192.0.2.1")
    info = slurm2.wait(job, ENDS, 60, log)
    took = time.time() - t0
    out = log.read_text()
    assert info["JobState"] == "FAILED", out[-3000:]
    lines = [line for line in out.splitlines() if "FAIL master" in line]
    assert len(lines) >= 1 and "192.0.2.1" in lines[0] and "cannot be bound on node n1" in lines[0], out[-3000:]
    assert "Traceback" not in out and "process group" not in out  # no rank ever started
    assert took < 45, f"took {took:.0f}s"  # the rendezvous timeout would be 30 min
