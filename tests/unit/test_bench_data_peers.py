"""bench/data_peers.py in its --quick mode: the table's script runs end to end and writes its JSON, and a
peer that cannot be imported is skipped with the reason instead of failing the run."""
import json
import subprocess
import sys

from tests.conftest import ROOT


def test_data_peers_quick_runs_and_skips_absent_peers(tmp_path):
    out = tmp_path / "peers.json"
    # The project's own interpreter as the peers' one: mosaicml-streaming is never installed there.
    r = subprocess.run([sys.executable, "bench/data_peers.py", "--quick", "--contenders", "torchvision_files",
                        "ours", "mds", "decode_only", "ours_transform", "--peers-python", sys.executable,
                        "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads(out.read_text())
    rows = record["results"]["small"]
    assert {"torchvision_files", "ours"} <= set(rows), record["skipped"]
    assert rows["torchvision_files"]["img_per_cpu_s"] > 0 and rows["ours"]["img_per_cpu_s"] > 0
    assert rows["ours"]["x_torchvision_cpu"] > 0 and record["versions"]["torch"]
    assert rows["decode_only"]["img_per_cpu_s"] > 0 and rows["ours"]["x_ceiling"] > 0  # the ceiling row
    assert rows["ours_transform"]["img_per_cpu_s"] > 0  # the floor under ours
    assert "mds" not in rows and "streaming not importable" in record["skipped"]["mds"]


def test_a_batch_is_counted_in_images_whatever_its_shape():
    """The decode-only ceiling yields per-image arrays: counted by the image count, not the first image's
    height (which overstated the ceiling 375/128 = 2.9x at ImageNet size)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from data_peers import _count

    images = [np.zeros((375, 500, 3), np.uint8)] * 128
    assert _count((images, None)) == 128
    assert _count([torch.zeros(128, 3, 224, 224), torch.zeros(128)]) == 128
    assert _count({"jpg": [torch.zeros(64, 3, 8, 8)]}) == 64
    assert _count(torch.zeros(32, 3, 8, 8)) == 32
