"""End-to-end runs of pretrain/main.py as a user launches it: one process, torchrun with 2 ranks,
and a run killed with SIGKILL then resumed, which must end bit-identical to an uninterrupted one."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import MAIN, ROOT, free_port, run_main, tiny_args

pytestmark = pytest.mark.slow


def eval_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval/results.jsonl").read_text().splitlines()]


def test_single_process_run_trains_checkpoints_and_evaluates(tmp_path, demo_root):
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, demo_root, 150, 75, batch=64)
    r = run_main(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000075", "step_0000150"]
    records = eval_records(run_dir)
    assert [rec["step"] for rec in records] == [75, 150]
    for rec in records:
        assert rec["errors"] == {}
        assert 0.0 <= rec["results"]["upstream"]["top1"] <= 1.0
        assert set(rec["results"]["fewshot"]) == {"1shot", "5shot"}
    assert json.loads((run_dir / "eval/step_0000150.json").read_text())["step"] == 150
    # Learning happened: the logged loss falls from ln(10) and the held-out top-1 on 2000 images
    # clears chance (0.1) by far more than sampling noise (~0.007).
    losses = [float(m) for m in re.findall(r"step \d+/150  loss ([0-9.]+)", r.stderr)]
    assert len(losses) == 30 and losses[0] > 2.25 and losses[-1] < losses[0] - 0.1
    assert records[-1]["results"]["upstream"]["top1"] > 0.15
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").read_text().count("mixer_p4_32") == 1
    # A second launch finds the finished run and does nothing.
    again = run_main(args)
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_torchrun_two_ranks(tmp_path, demo_root):
    run_dir = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    r = run_main(tiny_args(run_dir, demo_root, 30, 15), launcher=launcher)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((run_dir / "checkpoints/step_0000030/metadata.json").read_text())
    assert meta["world_size"] == 2 and meta["engine"] == "ddp"
    assert {"rank_00000.pt", "rank_00001.pt"} <= set(meta["files"])
    assert "2 ranks x 16 images" in r.stderr
    assert [rec["step"] for rec in eval_records(run_dir)] == [15, 30]


def test_kill_and_resume_is_bit_exact(tmp_path, demo_root):
    straight = tmp_path / "straight"
    assert run_main(tiny_args(straight, demo_root, 40, 10)).returncode == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, MAIN, *tiny_args(killed, demo_root, 40, 10)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (killed / "checkpoints/step_0000020").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its step-20 checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the data-loader workers too
    proc.wait()
    assert not (killed / "checkpoints/step_0000040").exists()

    resumed = run_main(tiny_args(killed, demo_root, 40, 10))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a = load_file(straight / "checkpoints/step_0000040/model.safetensors")
    b = load_file(killed / "checkpoints/step_0000040/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), f"{k} differs after resume"
    ra = {r["step"]: r["results"] for r in eval_records(straight)}
    rb = {r["step"]: r["results"] for r in eval_records(killed)}
    assert ra[40] == rb[40]
