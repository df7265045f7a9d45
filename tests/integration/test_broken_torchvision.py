"""Training with a broken torchvision installed next to torch (the registry's wheel for another torch, pulled
in by `pip install timm`): torchmetrics imports torchvision whenever it is installed, and the import fails
with the error below. A fake package on PYTHONPATH fails the same way; the shared environment is untouched."""
import json
import os
import subprocess
import sys

from tests.conftest import MAIN, ROOT, tiny_args

ERROR = "operator torchvision::nms does not exist"


def broken_torchvision(where):
    """A torchvision that is installed (package metadata, as pip leaves it) and raises on import."""
    (where / "torchvision").mkdir(parents=True)
    (where / "torchvision" / "__init__.py").write_text(f"raise RuntimeError({ERROR!r})\n")
    (where / "torchvision-0.99.0.dist-info").mkdir()
    (where / "torchvision-0.99.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: torchvision\nVersion: 0.99.0\n")
    return where


def test_training_and_upstream_eval_run_with_a_broken_torchvision(tmp_path, demo_root):
    fake = broken_torchvision(tmp_path / "site")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(fake), str(ROOT)])}
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], env=env, capture_output=True, text=True)
    assert ERROR in probe.stderr  # the fake is what the run sees
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, demo_root, 4, 4, "eval.fewshot.enabled=false", "eval.linear_probe.enabled=false")
    r = subprocess.run([sys.executable, MAIN, *args], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "eval" / "results.jsonl").read_text().splitlines()]
    assert [(rec["step"], rec["errors"]) for rec in records] == [(0, {}), (4, {})], records
    assert all("top1" in rec["results"]["upstream"] for rec in records), records
