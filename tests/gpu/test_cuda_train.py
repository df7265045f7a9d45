"""Runs only where CUDA exists (skipped with that reason elsewhere): the real training path on a GPU."""
import json

import pytest
import torch

from tests.conftest import run_main, tiny_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible here")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_mixed_precision_run(tmp_path, demo_root, precision):
    run_dir = tmp_path / precision
    r = run_main(tiny_args(run_dir, demo_root, 150, 150, "train.device=cuda", f"train.precision={precision}",
                           batch=64))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "device cuda:0" in r.stderr
    rec = json.loads((run_dir / "eval/step_0000150.json").read_text())
    assert rec["errors"] == {} and rec["results"]["upstream"]["top1"] > 0.15


def test_normalize_on_device_matches_cpu():
    from data_pipeline.device import normalize

    x = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    mean, std = [120.0, 110.0, 100.0], [60.0, 50.0, 40.0]
    torch.testing.assert_close(normalize(x.cuda(), mean, std).cpu(), normalize(x, mean, std))
