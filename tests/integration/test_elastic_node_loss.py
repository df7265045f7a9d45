"""A node lost mid-run, with DDP and with DeepSpeed ZeRO-2 as the engine: two torchrun agents (two
"nodes" on loopback, elastic `--nnodes 1:2`, c10d rendezvous) train one run; after a checkpoint one
node's agent and its rank are SIGKILLed. The survivor's rank fails on its next collective (the dead
peer's sockets are closed), its agent restarts it on a world of one, it resumes from the last checkpoint and finishes.

Exactness over the whole run, from what the data loader delivered (tests/drivers/elastic_train.py):
the steps a restarted attempt re-does are dropped from the attempt before it (their samples were not
checkpointed); what remains covers the epoch's samples exactly once.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.shards.tar_write import encode_jpeg, write_shards
from data_pipeline.storage import Storage
from cluster.launch import ELASTIC_RDZV_CONF
from tests.conftest import ROOT, free_port
from tests.procs import kill_node, wait_until

pytestmark = pytest.mark.slow
DRIVER = str(ROOT / "tests" / "drivers" / "elastic_train.py")
SAMPLES, BATCH, EVERY = 160, 8, 4
STEPS = SAMPLES // BATCH  # exactly one epoch


def write_epoch(root: Path, samples: int = SAMPLES, per_shard: int = 40) -> tuple[str, list[str]]:
    """`samples` random 32x32 images in shards of `per_shard` under `root`: its manifest and the sample keys
    (the runs that lose a node or a replica group count what they trained on against these keys)."""
    rng = np.random.default_rng(0)
    shard = [(f"s{i:04d}", encode_jpeg(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)), i % 10)
             for i in range(samples)]
    write_shards(shard, str(root), "train", per_shard, storage=Storage())
    return str(root / "train.json"), [k for k, _, _ in shard]


def consumed(record_dir: Path) -> tuple[list[str], list[dict]]:
    """The keys that count: each attempt's steps up to where the next attempt resumed."""
    attempts = []
    for path in record_dir.glob("keys.*.jsonl"):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        head = lines[0]
        attempts.append({**head, "pid": path.name, "steps": {head["start_step"] + 1 + i: keys
                                                             for i, keys in enumerate(lines[1:])}})
    starts = sorted({a["start_step"] for a in attempts})
    keys = []
    for a in attempts:
        later = [s for s in starts if s > a["start_step"]]
        last_valid = later[0] if later else STEPS  # a later attempt re-did the steps after its start
        keys += [k for step, batch in a["steps"].items() if step <= last_valid for k in batch]
    return keys, attempts


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_node_lost_survivor_resumes_on_smaller_world(tmp_path, engine):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e '.[deepspeed]')")
    spec, epoch = write_epoch(tmp_path / "data")
    run_dir, records = tmp_path / "run", tmp_path / "records"
    records.mkdir()
    args = ["--config", str(ROOT / "configs/demo.yaml"), f"run.dir={run_dir}", "data.prepare=none",
            f"data.train={spec}", "data.val=''", "model.name=mixer_p4_32", f"train.steps={STEPS}",
            f"train.global_batch_size={BATCH}", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=10",
            "train.log_every=1", "optim.warmup_steps=2", "eval.mode=none", "data.num_workers=1",
            "data.shuffle_buffer=40", "train.device=cpu", f"engine.kind={engine}", "engine.deepspeed.zero_stage=2"]
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "ELASTIC_RECORD_DIR": str(records),
           "PYTHONUNBUFFERED": "1",
           "ELASTIC_STEP_SLEEP_S": "0.25",
           # The backstop for a peer that vanishes without closing its sockets; a killed process
           # closes them, and the recovery below must come well before this.
           "PRETRAIN_DIST_TIMEOUT_S": "120"}

    def agent(name: str, is_host: int) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc_per_node", "1",
               "--max_restarts", "2", "--monitor_interval", "0.2", "--rdzv_backend", "c10d",
               "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "elastic-test",
               "--rdzv_conf", f"is_host={is_host},{ELASTIC_RDZV_CONF}", DRIVER, *args]
        with log.open("w") as f:
            return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                    start_new_session=True), log

    t0 = time.time()
    # b first: it waits for a's rendezvous store, and so is there when a's first round opens (an
    # elastic round with its minimum of nodes waits only briefly for more, see ELASTIC_RDZV_CONF).
    b, b_log = agent("node_b", 0)
    a, a_log = agent("node_a", 1)
    try:
        wait_until(lambda: (run_dir / f"checkpoints/step_{EVERY:07d}").exists(), 180,
                   f"checkpoint at step {EVERY}", [a_log, b_log], [a, b])
        print(f"first checkpoint after {time.time() - t0:.1f}s")
        kill_node(b.pid)
        killed = time.time()
        print(f"killed node b at {time.strftime('%H:%M:%S')}.{int(killed % 1 * 1000):03d}")
        wait_until(lambda: "with world size 1" in a_log.read_text(), 120, "resume on a world of 1", [a_log], [a])
        recovered_s = time.time() - killed
        assert a.wait(timeout=180) == 0, a_log.read_text()[-4000:]
        print(f"finished {time.time() - killed:.1f}s after the kill")
    finally:
        for p in (a, b):
            if p.poll() is None:
                kill_node(p.pid)
            p.wait()
    out = a_log.read_text()
    print(f"node killed -> survivor resumed on world 1: {recovered_s:.1f}s")
    assert recovered_s < 60, f"recovery took {recovered_s:.0f}s: it waited for the collective timeout"

    # The survivor resumed from the newest checkpoint of the 2-node world, on a world of one.
    m = re.search(r"resumed from \S+step_(\d+) \(step (\d+)\) with world size 1 \(saved by 2\)", out)
    assert m, out[-4000:]
    resumed = int(m.group(2))
    assert resumed % EVERY == 0 and 0 < resumed < STEPS
    assert f"done: {STEPS} steps" in out
    if engine == "deepspeed":  # the ZeRO-2 optimizer shards of 2 ranks, gathered into one
        assert "DeepSpeed optimizer state resharded: ZeRO-2 on 2 ranks -> ZeRO-2 on 1 ranks" in out, out[-4000:]
    meta = json.loads((run_dir / f"checkpoints/step_{STEPS:07d}/metadata.json").read_text())
    assert meta["world_size"] == 1 and meta["step"] == STEPS

    # Every sample of the epoch exactly once, counting only what was checkpointed or finished.
    keys, attempts = consumed(records)
    worlds = sorted((a["start_step"], a["world"], a["rank"]) for a in attempts)
    assert worlds == [(0, 2, 0), (0, 2, 1), (resumed, 1, 0)], worlds
    assert len(keys) == len(set(keys)), "a sample was consumed twice"
    assert sorted(keys) == sorted(epoch), "the epoch was not covered exactly"

    # The world size, as TensorBoard shows it: 2 from the start, 1 from the resumed step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run_dir / "tb"))
    tb.Reload()
    assert [(e.step, e.value) for e in tb.Scalars("dist/world_size")] == [(0, 2.0), (resumed, 1.0)]
