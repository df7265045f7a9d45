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
                        "ours", "mds", "decode_only", "--peers-python", sys.executable, "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads(out.read_text())
    rows = record["results"]["small"]
    assert rows["torchvision_files"]["img_per_cpu_s"] > 0 and rows["ours"]["img_per_cpu_s"] > 0
    assert rows["ours"]["x_torchvision_cpu"] > 0 and record["versions"]["torch"]
    assert rows["decode_only"]["img_per_cpu_s"] > 0 and rows["ours"]["x_ceiling"] > 0  # the ceiling row
    assert "mds" not in rows and "streaming not importable" in record["skipped"]["mds"]
