"""A store that is gone while a checkpoint is evaluated (moto stopped): one retry budget for the whole
checkpoint, not one per evaluator reading from that store, and the error recorded once."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_main, tiny_args

pytestmark = pytest.mark.slow
BUDGET = 4.0


def test_dead_store_costs_one_budget_per_checkpoint(tmp_path, demo_root, s3_server):
    run_dir = tmp_path / "run"
    r = run_main(tiny_args(run_dir, demo_root, 2, 2, "eval.mode=none"))
    assert r.returncode == 0, r.stderr[-3000:]
    s3_server.stop()  # gone for good: every read of it fails
    val, train, test = (s3_server.url(p) for p in ("shapes/val.json", "digits/train.json", "digits/test.json"))
    r = subprocess.run([sys.executable, "-m", "pretrain.evaluate", str(run_dir), "--step", "2", f"data.val={val}",
                        "eval.fewshot.enabled=true", f"eval.fewshot.train={train}", f"eval.fewshot.test={test}",
                        "eval.linear_probe.enabled=true", f"eval.linear_probe.train={train}",
                        f"eval.linear_probe.test={test}", f"data.storage.s3_endpoint={s3_server.endpoint}",
                        f"data.storage.give_up_after_s={BUDGET}", "data.storage.backoff_s=0.2"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 1, r.stderr[-3000:]  # recorded with errors
    record = json.loads((run_dir / "eval" / "step_0000002.json").read_text())
    errors = record["errors"]
    assert set(errors) == {"upstream", "fewshot", "linear_probe"}, errors
    assert "gave up on s3://" in errors["upstream"] and f"give_up_after_s={BUDGET:g}" in errors["upstream"]
    assert errors["fewshot"] == errors["linear_probe"] == "StorageError: not run, see upstream"
    assert r.stderr.count("failed at step 2") == 1, r.stderr[-3000:]  # logged once
    # One budget (plus the attempt in flight and the start of each evaluator), not three.
    assert record["seconds"]["total"] < 2 * BUDGET, record["seconds"]
    print(f"dead store during evaluation: {record['seconds']['total']:.1f}s for the checkpoint "
          f"(budget {BUDGET:g}s, 3 evaluators)")
