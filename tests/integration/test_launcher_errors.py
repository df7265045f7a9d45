"""Under a launcher a bad value is still one line: `python -m cluster.launch` (what the sbatch scripts
and the README run) with a real torchrun of 2 ranks prints the rank's error and nothing of torchrun's
ChildFailedError report."""
import os
import subprocess
import sys

from tests.conftest import ROOT, free_port


def test_two_rank_torchrun_bad_config_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_RANK", "RANK")}
    r = subprocess.run([sys.executable, "-m", "cluster.launch", "--nproc-per-node", "2", "--master-port",
                        str(free_port()), "--", "--config", str(ROOT / "configs/demo.yaml"), f"run.dir={tmp_path}",
                        "optim.label_smoothing=1.5"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [
        "error: command line: 'optim.label_smoothing' must be in [0, 1), got 1.5"], r.stderr[-3000:]
    assert r.stdout.strip() == ""
