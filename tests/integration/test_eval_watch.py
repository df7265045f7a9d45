"""`python -m pretrain.evaluate`: a run trained with eval.mode=external is evaluated by watchers,
each checkpoint exactly once, even with two watchers at once, one that died holding a claim, and a
restart; then the summary table and plots."""
import collections
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, run_main, tiny_args

pytestmark = pytest.mark.slow


def evaluate(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pretrain.evaluate", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=env, **kw)


def test_watchers_evaluate_each_checkpoint_once_across_restarts(tmp_path, demo_root):
    run_dir = tmp_path / "run"
    r = run_main(tiny_args(run_dir, demo_root, 30, 15, "eval.mode=external"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (run_dir / "eval").exists(), "eval.mode=external must leave evaluation to the watcher"

    # A watcher that died while evaluating step 15 left its claim behind (its pid is gone).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claims = run_dir / "eval/claims"
    claims.mkdir(parents=True)
    (claims / "step_0000015.claim").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": int(dead.stdout), "time": time.time()}))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    watchers = [subprocess.Popen([sys.executable, "-m", "pretrain.evaluate", str(run_dir), "--watch", "--poll", "0.2"],
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for _ in range(2)]
    outs = [w.communicate(timeout=300)[0] for w in watchers]
    assert [w.returncode for w in watchers] == [0, 0], outs
    history = [json.loads(line) for line in (run_dir / "eval/results.jsonl").read_text().splitlines()]
    assert collections.Counter(rec["step"] for rec in history) == {0: 1, 15: 1, 30: 1}, outs
    assert all(rec["errors"] == {} for rec in history)
    assert not list(claims.iterdir()), "claims must be released"
    assert {rec["step"]: rec["checkpoint"] for rec in history}[0] == "initial weights"

    # Restarted: nothing left to do, nothing evaluated twice.
    before = (run_dir / "eval/results.jsonl").read_text()
    again = evaluate(run_dir, "--watch", "--once")
    assert again.returncode == 0 and "0 checkpoint(s) evaluated" in again.stderr, again.stderr[-2000:]
    single = evaluate(run_dir, "--step", 30)
    assert single.returncode == 0 and "already evaluated" in single.stderr
    assert (run_dir / "eval/results.jsonl").read_text() == before

    # The TensorBoard scalars are at the training steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(run_dir / "tb"))
    tb.Reload()
    assert sorted(e.step for e in tb.Scalars("eval/fewshot/5shot")) == [0, 15, 30]

    s = evaluate(run_dir, "--summary")
    assert s.returncode == 0, s.stderr[-2000:]
    lines = s.stdout.splitlines()
    assert lines[0].split()[:3] == ["step", "upstream/top1", "upstream/loss"] and "fewshot/5shot" in lines[0]
    assert [line.split()[0] for line in lines[1:4]] == ["0", "15", "30"] and "(init)" in lines[1]
    record30 = json.loads((run_dir / "eval/step_0000030.json").read_text())
    assert f"{record30['results']['fewshot']['5shot']:.4f}" in lines[3]
    png = run_dir / "eval/plots/fewshot_5shot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_bad_run_dir_and_unloadable_checkpoint_give_one_line(tmp_path, demo_root):
    r = evaluate(tmp_path / "nothing", "--step", 5)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert str(tmp_path / "nothing") in r.stderr and "Traceback" not in r.stderr

    run_dir = tmp_path / "run"
    assert run_main(tiny_args(run_dir, demo_root, 5, 5, "eval.mode=none")).returncode == 0
    # Another checkpoint format version is refused as in a resume.
    meta_path = run_dir / "checkpoints/step_0000005/metadata.json"
    meta = meta_path.read_text()
    meta_path.write_text(json.dumps({**json.loads(meta), "format_version": 1}))
    no_eval = ("eval.fewshot.enabled=false", "eval.upstream.enabled=false")
    old = evaluate(run_dir, "--step", 5, *no_eval)
    assert old.returncode == 1 and "step_0000005: format_version 1 != 2" in old.stderr, old.stderr[-2000:]
    meta_path.write_text(meta)
    blob = run_dir / "checkpoints/step_0000005/model.safetensors"
    blob.write_bytes(blob.read_bytes()[:-10] + b"0" * 10)
    bad = evaluate(run_dir, "--step", 5, "--force", *no_eval)
    assert bad.returncode == 1 and "checksum mismatch" in bad.stderr
    # Recorded, so that a watcher does not try it again and again.
    assert "checksum mismatch" in json.loads((run_dir / "eval/step_0000005.json").read_text())["errors"]["checkpoint"]
