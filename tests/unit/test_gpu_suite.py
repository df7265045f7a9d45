"""The prepared GPU run (bench/gpu_suite.py) in its CPU smoke mode: every step runs, at tiny sizes, and
writes the JSON the GPU run will write, so the script cannot rot before a GPU comes."""
import json
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_suite_smoke_runs_every_step(tmp_path):
    r = subprocess.run([sys.executable, "bench/gpu_suite.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    suite = json.loads((tmp_path / "00_suite.json").read_text())
    bad = {s["step"]: s.get("output_tail", s.get("reason")) for s in suite["steps"] if s["status"] != "ok"}
    assert r.returncode == 0 and not bad, (r.stdout[-2000:], bad)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00_suite.json", "01_pytest_gpu.json", "02_model_throughput.json", "03_loop_overhead.json",
                     "04_checkpoint_stall.json", "05_data_throughput.json", "06_engine_throughput.json"]
    load = {name: json.loads((tmp_path / name).read_text()) for name in files}
    # CUDA is hidden in the smoke run: every GPU test is collected and skipped with its reason.
    tests = load["01_pytest_gpu.json"]["tests"]
    assert len(tests) >= 15 and all(t["outcome"] == "skipped" and "GPU" in t["message"] for t in tests), tests
    rows = {row["impl"]: row for row in load["02_model_throughput.json"]["results"]}
    assert rows["eager"]["img_per_s"] > 0 and "skipped" in rows["fused"]
    assert load["03_loop_overhead.json"]["bare_over_ours"] > 0
    assert load["04_checkpoint_stall.json"]["ours_async_stall_s"] >= 0
    assert load["05_data_throughput.json"]["ours"]["img_s"] > 0
    assert [e["engine"] for e in load["06_engine_throughput.json"]["results"]] == ["single", "fsdp"]
