"""Inline evaluation under the engines that shard the weights (fsdp, ZeRO-3): every forward of the
live model is a collective there, so rank-uneven eval data or a rank-0-only evaluator would hang.
The trainer evaluates a replica built from the consolidated weights instead; the run must finish,
with records equal in shape to a single-process run's, and the replica must be the trained model."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import MAIN, ROOT, free_port, tiny_args

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


@pytest.mark.parametrize("engine", [["engine.kind=fsdp"], ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=3"]],
                         ids=["fsdp", "zero3"])
def test_inline_eval_with_sharded_weights_finishes(tmp_path, demo_root, engine):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), MAIN,
           *tiny_args(run_dir, demo_root, 10, 5, "data.num_workers=0", "eval.linear_probe.enabled=false", *engine)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "eval/results.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [0, 5, 10]
    for rec in records:
        assert rec["errors"] == {}, rec["errors"]
        assert 0.0 <= rec["results"]["upstream"]["top1"] <= 1.0 and set(rec["results"]["fewshot"]) == {"1shot", "5shot"}
    # The replica evaluated at step 10 is the checkpointed model: its upstream loss matches a fresh
    # single-process evaluation of model.safetensors (`python -m pretrain.evaluate --step 10 --force`).
    weights = load_file(run_dir / "checkpoints/step_0000010/model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    again = subprocess.run([sys.executable, "-m", "pretrain.evaluate", str(run_dir), "--step", "10", "--force"],
                           capture_output=True, text=True, timeout=240, env=ENV, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    redo = json.loads((run_dir / "eval/step_0000010.json").read_text())
    assert abs(redo["results"]["upstream"]["loss"] - records[-1]["results"]["upstream"]["loss"]) < 1e-3
