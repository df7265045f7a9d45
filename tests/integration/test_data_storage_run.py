"""A training run whose object store goes away for good: every rank stops together, in one line, in time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from data_pipeline.shards.tar_write import encode_jpeg, write_shards
from data_pipeline.storage import Storage
from tests.conftest import MAIN, ROOT, free_port

pytestmark = pytest.mark.slow


def test_store_gone_for_good_stops_every_rank_within_the_budget_keeping_the_last_checkpoint(tmp_path, s3_server):
    import s3fs

    rng = np.random.default_rng(0)
    jpgs = [encode_jpeg(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    write_shards(((f"k{i:05d}", jpgs[i % 8], i % 10) for i in range(1600)), str(tmp_path / "shards"), "train", 40,
                 storage=Storage())
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint}).put(
        str(tmp_path / "shards") + "/", s3_server.url("shards") + "/", recursive=True)
    run_dir, budget = tmp_path / "run", 3.0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), MAIN, "--config", str(ROOT / "configs/demo.yaml"),
           f"run.dir={run_dir}", "data.prepare=none", f"data.train={s3_server.url('shards/train.json')}",
           "data.val=''", "eval.fewshot.enabled=false", "eval.linear_probe.enabled=false",
           "model.name=mixer_p4_32", "train.steps=10000",
           "train.global_batch_size=16", "train.log_every=5", "checkpoint.every_steps=5", "data.num_workers=1",
           f"data.storage.s3_endpoint={s3_server.endpoint}", f"data.storage.give_up_after_s={budget}",
           "data.storage.backoff_s=0.2", "data.shuffle_buffer=40"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "checkpoints/latest").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        s3_server.stop()
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=120)  # a rank left waiting in a collective would hang here
        took = time.monotonic() - stopped
    finally:
        proc.kill()
    errors = {line for line in err.splitlines() if line.startswith("error: ")}
    assert proc.returncode != 0 and len(errors) == 1, err[-3000:]
    line = errors.pop()
    assert "gave up on s3://" in line and "give_up_after_s=3" in line and "the last checkpoint is kept" in line
    # Within the budget plus the steps trained on batches read before the stop (and process exit).
    assert took < budget + 60, took
    stopped_at = int(line.split("stopped at step ")[1].split(";")[0])
    latest = (run_dir / "checkpoints/latest").read_text().strip()
    assert int(latest.split("_")[1]) < stopped_at  # nothing saved from the step that used stand-in batches
    meta = json.loads((run_dir / "checkpoints" / latest / "metadata.json").read_text())
    assert meta["step"] == int(latest.split("_")[1])
