"""Inline evaluation on the training ranks: a failing evaluator is recorded and training goes on;
the random-init baseline is recorded as step 0; features computed data-parallel on two ranks give
the same few-shot and linear-probe results as one process."""
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, run_main, tiny_args

pytestmark = pytest.mark.slow


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "eval/results.jsonl").read_text().splitlines()]


def downstream_args(demo_root, probe_test):
    digits = f"{demo_root}/digits"
    return ["eval.linear_probe.enabled=true", f"eval.linear_probe.train={digits}/train.json",
            f"eval.linear_probe.test={probe_test}", "eval.linear_probe.l2_regs=[0.001,0.1]"]


def test_failing_evaluator_leaves_training_running(tmp_path, demo_root):
    # The linear probe's test manifest and first shard exist (the start check reads those) but its other
    # shards do not: the evaluator fails at every checkpoint, when it reads them.
    run_dir, missing = tmp_path / "run", tmp_path / "nowhere/test.json"
    digits = f"{demo_root}/digits"
    missing.parent.mkdir()
    for f in [*Path(digits).glob("test.*"), Path(digits) / "test-000000.tar"]:  # manifest + first shard
        shutil.copy(f, missing.parent / f.name)
    r = run_main(tiny_args(run_dir, demo_root, 20, 10, *downstream_args(demo_root, missing),
                           "eval.finetune.enabled=true", f"eval.finetune.train={digits}/train.json",
                           f"eval.finetune.test={digits}/test.json", "eval.finetune.steps=8",
                           "eval.finetune.batch_size=32", "eval.finetune.warmup_steps=2", "eval.finetune.hflip=false"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "done: 20 steps" in r.stderr and (run_dir / "checkpoints/step_0000020").is_dir()
    recs = records(run_dir)
    assert [rec["step"] for rec in recs] == [0, 10, 20]  # step 0: the initial weights
    assert recs[0]["checkpoint"] == "initial weights"
    for rec in recs:
        # The linear probe's test shards do not exist: its error is recorded, the others ran.
        assert list(rec["errors"]) == ["linear_probe"] and str(missing.parent) in rec["errors"]["linear_probe"]
        assert set(rec["results"]) == {"upstream", "fewshot", "finetune"}
        assert 0.0 <= rec["results"]["finetune"]["top1"] <= 1.0
        assert rec["seconds"]["linear_probe"] >= 0
    assert r.stderr.count("evaluator linear_probe failed") == 3
    # The run's last lines: wall time, steps, final loss; the last evaluation's headline; where the records are.
    done, last_eval, where = [line.split("] ", 1)[1] for line in r.stderr.strip().splitlines()[-3:]]
    assert re.fullmatch(r"done: 20 steps in [\d:]+, final loss \d+\.\d{4}", done), done
    top1 = recs[-1]["results"]["upstream"]["top1"]
    assert last_eval == (f"last evaluation (step 20): upstream top1 {top1:.4g}, fewshot 5shot "
                         f"{recs[-1]['results']['fewshot']['5shot']:.4g}, finetune top1 "
                         f"{recs[-1]['results']['finetune']['top1']:.4g}, linear_probe failed"), last_eval
    assert where == (f"records: checkpoints {run_dir}/checkpoints; evaluations {run_dir}/eval/results.jsonl "
                     f"(python -m pretrain.evaluate {run_dir} --summary); "
                     f"TensorBoard: tensorboard --logdir {run_dir}/tb")


def test_data_parallel_features_match_one_process(tmp_path, demo_root):
    probe = downstream_args(demo_root, f"{demo_root}/digits/test.json")
    one = tmp_path / "one"
    assert run_main(tiny_args(one, demo_root, 1, 1, *probe)).returncode == 0
    two = tmp_path / "two"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    r = run_main(tiny_args(two, demo_root, 2, 2, *probe), launcher=launcher)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = records(one)[0], records(two)[0]
    assert a["step"] == b["step"] == 0 and a["errors"] == b["errors"] == {}
    # Same initial weights, each rank featurising half of the shards: the same features, so the
    # same few-shot draws and the same probe.
    for task in ("fewshot", "linear_probe"):
        assert a["results"][task] == pytest.approx(b["results"][task], abs=2e-3), task
    assert a["results"]["upstream"] == pytest.approx(b["results"]["upstream"], abs=1e-4)
