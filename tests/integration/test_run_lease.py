"""One run per run dir: a lease with a heartbeat (pretrain/run_lease.py), on a local directory and on a real
S3 server (moto; conditional writes), and through pretrain/main.py."""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from pretrain.run_lease import LEASE_FILE, RunDirBusy, RunLease
from tests.conftest import MAIN, run_main, tiny_args
from tests.integration.test_preemption import start


@pytest.fixture(params=["local", "s3"])
def run_dir(request, tmp_path, monkeypatch):
    """A run dir URL, on local disk or on moto's S3 (the run dir reaches S3 through the AWS environment)."""
    if request.param == "local":
        yield str(tmp_path / "run")
        return
    server = request.getfixturevalue("s3_server")
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()  # an instance cached by an earlier test knows another port
    yield server.url("runs/leased")
    s3fs.S3FileSystem.clear_instance_cache()


def read_lease(url: str) -> dict:
    import fsspec
    fs, root = fsspec.core.url_to_fs(url)
    return json.loads(fs.cat_file(f"{root}/{LEASE_FILE}"))


def write_lease(url: str, **owner) -> None:
    import fsspec
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    now = time.time()
    lease = {"token": "t0", "host": "node-elsewhere", "pid": 4242, "slurm_job": "", "started": now - 3600,
             "heartbeat": now, **owner}
    fs.pipe_file(f"{root}/{LEASE_FILE}", json.dumps(lease).encode())


def another_process(lease: RunLease, **changes) -> RunLease:
    """`lease` as if taken by another live process (this one's parent) or by a process on another host."""
    lease.owner = lease.owner.__class__(**{**lease.owner.__dict__, "pid": os.getppid(), **changes})
    return lease


def test_second_owner_is_refused_naming_the_first_and_the_heartbeat_keeps_it(run_dir):
    first = RunLease(run_dir, timeout_s=0.8)
    first.acquire()
    try:
        with pytest.raises(RunDirBusy) as err:
            another_process(RunLease(run_dir, timeout_s=0.8)).acquire()  # same host: a live pid
        line = str(err.value)
        assert "\n" not in line and f"pid {os.getpid()}" in line and "started 20" in line and run_dir in line
        beat = read_lease(run_dir)["heartbeat"]
        time.sleep(1.0)  # longer than the timeout: only the heartbeat (every 0.2 s) keeps the lease
        assert read_lease(run_dir)["heartbeat"] > beat
        with pytest.raises(RunDirBusy):
            another_process(RunLease(run_dir, timeout_s=0.8), host="node-elsewhere").acquire()
    finally:
        first.release()
    second = RunLease(run_dir, timeout_s=0.8)
    second.acquire()  # released: free again
    second.release()


def test_lapsed_heartbeat_is_taken_over_and_the_old_owner_learns_it(run_dir):
    write_lease(run_dir, heartbeat=time.time() - 10)  # an owner on another node, silent for 10 s
    lease = RunLease(run_dir, timeout_s=5)
    lease.acquire()
    try:
        assert read_lease(run_dir)["token"] == lease.owner.token
    finally:
        lease.release()
    # A live owner on another node whose heartbeat is fresh is not taken over.
    write_lease(run_dir)
    with pytest.raises(RunDirBusy, match="host node-elsewhere, pid 4242"):
        RunLease(run_dir, timeout_s=5).acquire()
    # The old owner of a lease taken over finds out at its next heartbeat, and stops (lost is set).
    write_lease(run_dir, heartbeat=time.time() - 10)
    old = RunLease(run_dir, timeout_s=5)
    old.acquire()
    old._stop.set()  # no background beats: this test beats by hand
    write_lease(run_dir, token="rival", heartbeat=time.time())
    old.heartbeat()
    assert old.lost and "taken over" in old.lost
    old.release()
    assert read_lease(run_dir)["token"] == "rival"  # releasing a lost lease leaves the new owner's alone


def test_requeued_slurm_job_takes_its_own_run_over_at_once(run_dir, monkeypatch):
    write_lease(run_dir, slurm_job="81234")  # fresh heartbeat, another node: the job before its requeue
    monkeypatch.setenv("SLURM_JOB_ID", "81234")
    lease = RunLease(run_dir, timeout_s=300)
    lease.acquire()
    assert read_lease(run_dir)["token"] == lease.owner.token
    lease.release()
    write_lease(run_dir, slurm_job="99999")
    with pytest.raises(RunDirBusy, match="SLURM job 99999"):
        RunLease(run_dir, timeout_s=300).acquire()
    # Without SLURM: torchrun's rendezvous id, when the user gives one, is the job across elastic restarts.
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "mixer-l16-7")
    write_lease(run_dir, elastic_run="mixer-l16-7")
    lease = RunLease(run_dir, timeout_s=300)
    lease.acquire()
    lease.release()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default id names no job
    write_lease(run_dir, elastic_run="none")
    with pytest.raises(RunDirBusy):
        RunLease(run_dir, timeout_s=300).acquire()


def test_two_mains_on_one_run_dir(tmp_path, demo_root):
    """The second pretrain/main.py stops at start with one line naming the first; after the first is killed
    (kill -9: no release) a new run on this host takes its run dir over at once and resumes."""
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, demo_root, 400, 10, "eval.fewshot.enabled=false", "eval.upstream.enabled=false")
    proc = start([sys.executable, MAIN] + args, tmp_path / "first.log")
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoints" / "latest").exists():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.1)
        t0 = time.monotonic()
        second = run_main(tiny_args(run_dir, demo_root, 400, 10, "model.name=mixer_t4_32"), timeout=120)
        took = time.monotonic() - t0
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr[-3000:]
        assert lines[0].startswith(f"error: run.dir {run_dir} is in use by another run: host ")
        assert f"pid {proc.pid}" in lines[0] and "started 20" in lines[0]
        assert proc.poll() is None  # the first run goes on, its staging dirs untouched
        print(f"second run refused in {took:.1f}s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert read_lease(str(run_dir))["pid"] == proc.pid  # kill -9: never released
    r = run_main(args + ["train.steps=12"],
                 timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "taking over the lease" in r.stderr and "is gone" in r.stderr
    assert not (run_dir / LEASE_FILE).exists()  # released at the end
