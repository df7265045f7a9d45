"""At start, before anything is written or generated: run.dir is a writable directory (a probe file is
written and removed), so is its checkpoint dir, and the data paths outside the demo's data.root are checked
before the demo data is generated. Each ends in one line, before any training step."""
import os
import subprocess
import time

import pytest

from pretrain.run_lease import RunDirUnusable, check_run_dir
from tests.conftest import ROOT, run_main, tiny_args


def timed(args):
    t0 = time.monotonic()
    r = run_main(args, timeout=120)
    r.took = time.monotonic() - t0
    return r


def only_line(r):
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "step 1" not in r.stderr, r.stderr[-2000:]
    return r.stderr.strip().splitlines()[-1]


def test_run_dir_that_is_a_file_or_below_one_is_one_line(tmp_path):
    demo_root = tmp_path / "no_data"  # never reached: the run dir is checked first
    afile = tmp_path / "notes.txt"
    afile.write_text("not a run dir")
    r = timed(tiny_args(afile, demo_root, 4, 2))
    line = only_line(r)
    assert line == f"error: run.dir {afile} is a file, not a directory; choose another run.dir"
    print(f"run.dir is a file: stopped {r.took:.1f}s after start")
    line = only_line(run_main(tiny_args(afile / "run", demo_root, 4, 2), timeout=120))
    assert line == f"error: run.dir {afile}/run is below the file {afile}, not a directory; choose another run.dir"
    assert afile.read_text() == "not a run dir" and not demo_root.exists()


@pytest.fixture
def read_only_checkpoints(tmp_path):
    """<run>/checkpoints on a read-only tmpfs: a real EROFS (root ignores permission bits, not this)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the CI container runs the tests as root)")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(run / "checkpoints")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield run
    subprocess.run(["umount", "-l", str(run / "checkpoints")], check=False)


def test_read_only_checkpoint_dir_stops_at_start_not_at_the_first_save(read_only_checkpoints):
    run = read_only_checkpoints
    demo_root = run.parent / "no_data"  # never reached: the run dir is checked first
    r = timed(tiny_args(run, demo_root, 4, 2, "eval.mode=none"))
    line = only_line(r)
    print(f"read-only checkpoint dir: stopped {r.took:.1f}s after start")
    assert line == (f"error: its checkpoint dir {run}/checkpoints is not writable (Read-only file system); make it "
                    "writable or choose another run.dir")
    assert not (run / "config.yaml").exists() and not demo_root.exists()  # nothing written before the check


def test_probe_leaves_nothing_behind(tmp_path):
    check_run_dir(str(tmp_path / "new" / "run"))
    assert os.listdir(tmp_path / "new" / "run") == []
    with pytest.raises(RunDirUnusable, match="is below the file"):
        (tmp_path / "f").write_text("x")
        check_run_dir(str(tmp_path / "f" / "a" / "b"))


def test_placeholder_beside_the_demo_is_found_before_the_demo_data_is_generated(tmp_path):
    root = tmp_path / "demo_data"  # empty: the demo would generate its data here first
    r = timed(tiny_args(tmp_path / "run", root, 4, 2, "data.val=s3://your-bucket/val.json"))
    line = only_line(r)
    print(f"placeholder beside the demo: stopped {r.took:.1f}s after start")
    assert line.startswith("error: data.val is still the placeholder 's3://your-bucket/val.json' in ") and \
        line.endswith(str(ROOT / "configs/demo.yaml") + "; set it or set data.val=''"), line
    assert not root.exists()  # no demo data generated
