"""A whole run whose run dir is on object storage (a real S3 server on loopback): two fsdp ranks
save asynchronously (each rank stages its DCP shard locally, hashes it and uploads it; rank 0
publishes metadata, then `latest`), TensorBoard events are uploaded, and one process resumes from
the bucket, resharding the optimiser state through DCP; then `python -m pretrain.evaluate` evaluates a
checkpoint in the bucket and leaves its TensorBoard scalars there too."""
import json
import os
import subprocess
import sys

import fsspec
import pytest

from tests.conftest import MAIN, ROOT, free_port, tiny_args

pytestmark = pytest.mark.slow


def run(cmd, endpoint):
    # A run dir on S3 takes its endpoint and credentials from the standard AWS environment.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AWS_ENDPOINT_URL": endpoint}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def test_two_ranks_checkpoint_to_s3_asynchronously_and_one_resumes(s3_server, demo_root, tmp_path):
    run_dir = s3_server.url("runs/remote")
    args = lambda steps: tiny_args(run_dir, demo_root, steps, 10, "engine.kind=fsdp", "checkpoint.async_save=true",  # noqa: E731
                                   "eval.upstream.enabled=false", "eval.fewshot.enabled=false", "data.num_workers=0")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(free_port())]
    first = run(torchrun + [MAIN] + args(20), s3_server.endpoint)
    assert "files written on the checkpoint thread" in first

    fs = fsspec.filesystem("s3", endpoint_url=s3_server.endpoint)
    root = run_dir.removeprefix("s3://")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/checkpoints")) == ["latest", "step_0000010",
                                                                                  "step_0000020"]
    assert fs.cat_file(f"{root}/checkpoints/latest").decode() == "step_0000020"
    meta = json.loads(fs.cat_file(f"{root}/checkpoints/step_0000020/metadata.json"))
    assert {"engine/dcp/.metadata", "engine/dcp/__0_0.distcp", "engine/dcp/__1_0.distcp", "rank_00000.pt",
            "rank_00001.pt", "model.safetensors", "shared.pt"} <= set(meta["files"])
    assert not fs.glob(f"{root}/checkpoints/*/.stage*")
    assert any(p.rsplit("/", 1)[-1].startswith("events.out.tfevents") for p in fs.ls(f"{root}/tb"))

    second = run([sys.executable, MAIN] + args(25), s3_server.endpoint)
    assert f"resumed from {run_dir}/checkpoints/step_0000020 (step 20)" in second
    assert "optimizer state not restored" not in second
    assert fs.cat_file(f"{root}/checkpoints/latest").decode() == "step_0000025"

    # The evaluation CLI on the s3:// run dir, with an evaluator the training did not run (few-shot).
    fs.invalidate_cache()
    before = set(fs.ls(f"{root}/tb"))
    run([sys.executable, "-m", "pretrain.evaluate", run_dir, "--step", "25", "--force", "eval.fewshot.enabled=true",
         "eval.linear_probe.enabled=false"], s3_server.endpoint)
    fs.invalidate_cache()
    new = sorted(set(fs.ls(f"{root}/tb")) - before)
    assert len(new) == 1 and new[0].rsplit("/", 1)[-1].startswith("events.out.tfevents"), new
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    local = tmp_path / "tb"
    fs.get(new[0], str(local / new[0].rsplit("/", 1)[-1]))
    tb = EventAccumulator(str(local))
    tb.Reload()
    record = json.loads(fs.cat_file(f"{root}/eval/step_0000025.json"))
    assert [(e.step, round(e.value, 5)) for e in tb.Scalars("eval/fewshot/5shot")] == [
        (25, round(record["results"]["fewshot"]["5shot"], 5))]
