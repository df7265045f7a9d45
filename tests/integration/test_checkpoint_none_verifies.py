"""Every checkpoint of a run dir fails its sha256: the resume stops with one line naming each and the
ways out, and changes nothing; `checkpoint.resume=step_N` takes one anyway (through pretrain/main.py)."""
import time

from tests.conftest import ROOT, run_main


def args(run_dir, demo_root, steps, *extra):
    return ["--config", str(ROOT / "configs/demo.yaml"), f"run.dir={run_dir}", f"data.root={demo_root}",
            "model.name=mixer_p4_32", f"train.steps={steps}", "train.global_batch_size=8", "checkpoint.every_steps=3",
            "train.log_every=1", "optim.warmup_steps=1", "data.num_workers=0", "eval.mode=none", *extra]


def tree(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_no_verified_checkpoint_stops_and_erases_nothing(tmp_path, demo_root):
    run = tmp_path / "run"
    r = run_main(args(run, demo_root, 6))
    assert r.returncode == 0, r.stderr[-2000:]
    for step in (3, 6):  # one flipped byte in each: both fail verification, each still holds good files
        f = run / f"checkpoints/step_{step:07d}/shared.pt"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    before = tree(run / "checkpoints")

    t0 = time.monotonic()
    r = run_main(args(run, demo_root, 9))
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no checkpoint in") and "Traceback" not in r.stderr
    assert "step_0000003/shared.pt: checksum mismatch" in last and "step_0000006/shared.pt: checksum mismatch" in last
    assert "checkpoint.resume=step_0000006" in last and "run.dir" in last
    assert tree(run / "checkpoints") == before  # nothing deleted, nothing trained over them
    print(f"no checkpoint verifies: stopped {took:.1f}s after start")

    r = run_main(args(run, demo_root, 9, "checkpoint.resume=step_0000006"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "although it failed verification" in r.stderr and "resumed from" in r.stderr and "(step 6)" in r.stderr
    assert (run / "checkpoints/latest").read_text() == "step_0000009"
