"""The real cluster/slurm scripts on a real single-node SLURM (see conftest.py): a 2-rank gloo run of
the shrunk demo trains, checkpoints and evaluates; SIGUSR1 (SLURM's preemption warning) makes it
checkpoint, exit 75, requeue itself and resume from that checkpoint; eval.sbatch runs chained."""
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import pytest

from cluster.hostlist import expand_hostlist
from tests.cluster.test_hostlist import NODELISTS
from tests.conftest import ROOT, tiny_args

pytestmark = pytest.mark.slow
HAVE_EVALUATE_CLI = importlib.util.find_spec("pretrain.evaluate") is not None


def submit(slurm, script: str, args: list[str], log: Path, *sbatch_opts: str, **env: str) -> str:
    env = slurm.env(**{"PYTHON": sys.executable, "LAUNCHER": "torchrun", "NPROC_PER_NODE": "2", **env})
    r = slurm.run("sbatch", "--parsable", f"--output={log}", *sbatch_opts, str(ROOT / script), *args,
                  env=env, cwd=ROOT)
    return r.stdout.strip().split(";")[0]


def sbatch_args(run_dir: Path, demo_root: str, steps: int, every: int, *extra: str) -> list[str]:
    args = tiny_args(run_dir, demo_root, steps, every, "train.device=cpu", *extra)
    return args[1:]  # pretrain.sbatch takes CONFIG first, not --config CONFIG


def ckpt_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_???????"))


@pytest.fixture(scope="module")
def training_job(slurm, tmp_path_factory, demo_root):
    """One 2-rank training job, and (where the evaluate CLI exists) an eval job chained after it.
    Its ranks are started by srun itself (LAUNCHER=srun); the preemption test below uses torchrun."""
    tmp = tmp_path_factory.mktemp("slurm_train")
    run_dir, log = tmp / "run", tmp / "train.log"
    job = submit(slurm, "cluster/slurm/pretrain.sbatch", sbatch_args(run_dir, demo_root, 30, 15), log,
                 "--ntasks-per-node=2", LAUNCHER="srun")
    eval_job = None
    if HAVE_EVALUATE_CLI:
        eval_job = submit(slurm, "cluster/slurm/eval.sbatch", [str(run_dir)], tmp / "eval.log",
                          f"--dependency=afterok:{job}")
    info = slurm.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 240, log)
    return {"job": job, "info": info, "run_dir": run_dir, "log": log, "eval_job": eval_job, "tmp": tmp}


def test_sbatch_trains_checkpoints_and_evaluates(training_job):
    info, run_dir, log = training_job["info"], training_job["run_dir"], training_job["log"]
    out = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out[-3000:]
    # The dry-run plan and the node checks ran first, and went into the job's log.
    assert "# srun --nodes 1 --ntasks-per-node 2 starts on each node:" in out
    assert re.search(r"\[localhost\] MASTER_ADDR=localhost MASTER_PORT=\d+ .*python \S+/pretrain/main.py --config", out)
    assert out.count("ok   run dir") == 1  # envcheck: once per node, not once per rank
    assert "2 ranks x 16 images" in out
    assert ckpt_steps(run_dir) == [15, 30]
    meta = json.loads((run_dir / "checkpoints/step_0000030/metadata.json").read_text())
    assert meta["world_size"] == 2
    records = [json.loads(line) for line in (run_dir / "eval/results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 15, 30]  # 0: the random-init baseline row
    assert all(r["errors"] == {} and 0 <= r["results"]["upstream"]["top1"] <= 1 for r in records)
    assert set(records[-1]["results"]["fewshot"]) == {"1shot", "5shot"}


@pytest.mark.skipif(not HAVE_EVALUATE_CLI, reason="pretrain.evaluate CLI not available on this branch")
def test_eval_job_chained_with_dependency(slurm, training_job):
    eval_job, log = training_job["eval_job"], training_job["tmp"] / "eval.log"
    info = slurm.wait(eval_job, ("COMPLETED", "FAILED", "CANCELLED"), 180, log)
    train = training_job["info"]
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:]
    assert info["StartTime"] >= train["EndTime"]  # afterok: only once training had finished
    assert "evaluating" in log.read_text() and "at step 30" in log.read_text()


def test_preemption_signal_requeues_and_resumes(slurm, tmp_path, demo_root):
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    steps = 60
    job = submit(slurm, "cluster/slurm/pretrain.sbatch",
                 sbatch_args(run_dir, demo_root, steps, 10, "eval.fewshot.enabled=false",
                              "eval.upstream.enabled=false"), log)
    deadline = time.time() + 180
    while not ckpt_steps(run_dir):
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING") and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    # What `#SBATCH --signal=USR1@120` does before the time limit: SIGUSR1 to every process of the
    # job's steps (the batch shell itself is not signalled).
    slurm.run("scancel", "--signal=USR1", job)
    info = slurm.wait(job, ("COMPLETED", "FAILED", "CANCELLED"), 240, log)
    out = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out[-4000:]
    m = re.search(r"checkpoint at step (\d+) saved", out)
    assert m, out[-4000:]
    stopped = int(m.group(1))
    assert 10 < stopped < steps, out[-4000:]
    assert f"requeueing job {job}" in out
    assert re.search(r"\[localhost\] .*torch\.distributed\.run --nnodes 1 --nproc_per_node 2 --rdzv_backend c10d", out)
    assert f"job {job} restart 1" in out  # the same job id, started again (--open-mode=append keeps both)
    assert re.search(rf"resumed from \S+step_{stopped:07d} \(step {stopped}\)", out), out[-4000:]
    resumed_steps = [int(s) for s in re.findall(rf"step (\d+)/{steps}  loss", out.split("restart 1", 1)[1])]
    assert resumed_steps[0] == (stopped // 5 + 1) * 5  # train.log_every=5: the first logged step after it
    assert ckpt_steps(run_dir)[-1] == steps  # (the step-{stopped} one has since been purged: keep_last=3)


def test_hostlist_expands_like_scontrol(slurm):
    for nodelist, _ in NODELISTS:
        real = slurm.run("scontrol", "show", "hostnames", nodelist).stdout.split()
        assert expand_hostlist(nodelist) == real, nodelist


def test_sweep_array_gives_each_task_its_line_and_run_dir(slurm, tmp_path):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# lr sweep\noptim.lr=1e-3\n\noptim.lr=2e-3 optim.warmup_steps=7\n")
    job = submit(slurm, "cluster/slurm/sweep.sbatch", ["configs/demo.yaml", str(sweep), "train.steps=9"],
                 tmp_path / "sweep_%a.log", "--array=0-2", DRY_RUN="1", SWEEP_DIR=str(tmp_path / "runs"))
    for task in range(3):
        slurm.wait(f"{job}_{task}", ("COMPLETED", "FAILED"), 60)
    out = [(tmp_path / f"sweep_{t}.log").read_text() for t in range(3)]
    assert "optim.lr=1e-3 run.dir=" + str(tmp_path / "runs/0") in out[0], out[0]
    assert "train.steps=9 optim.lr=2e-3 optim.warmup_steps=7 run.dir=" + str(tmp_path / "runs/1") in out[1], out[1]
    assert f"{sweep} has no line for array task 2" in out[2]
    assert slurm.job(f"{job}_2")["JobState"] == "FAILED"
