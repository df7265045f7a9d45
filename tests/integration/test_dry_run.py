"""`main.py --dry-run`: the command line's run built and one step taken on one batch, nothing written, the memory
estimate next to the measured peak; an explicit bf16 on a CPU without native bf16 gets one warning of its cost."""
import os
import re
import subprocess
import sys

from tests.conftest import MAIN, ROOT, tiny_args


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def dry_run(tmp_path, demo_root, *extra, env=None):
    args = [*tiny_args(tmp_path / "run", demo_root, 5, 5, *extra), "--dry-run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, MAIN, *args], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)


def test_dry_run_takes_one_step_writes_nothing_and_measures_the_estimate(tmp_path, demo_root):
    from pathlib import Path
    data_before = files_under(Path(demo_root))
    r = dry_run(tmp_path, demo_root, "monitor.wandb=true", "train.profile=[1]", env={"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-3000:]
    estimate, done, memory = r.stdout.strip().splitlines()
    assert estimate.startswith("memory estimate: mixer_p4_32 on ddp, 1 ranks, micro batch 32 x 1, cpu: ")
    assert re.fullmatch(r"dry run: built in [\d.]+s; one step of 1 x 32 x 1 images in [\d.]+s \(its data loading "
                        r"included\), loss \d+\.\d{4}; nothing was written", done), done
    m = re.fullmatch(r"memory: estimate ([\d.]+) GiB \(model states and activations [\d.]+ GiB \+ runtime "
                     r"[\d.]+ GiB\), measured peak ([\d.]+) GiB \(this process's peak RSS\); not exercised by one "
                     r"step: data workers [\d.]+ GiB, checkpoint copies [\d.]+ GiB \((\d+)% of the estimate\)", memory)
    assert m, memory
    assert 0.3 < float(m.group(2)) / float(m.group(1)) < 3  # the same order: an estimate, measured
    assert not (tmp_path / "run").exists() and files_under(tmp_path) == []  # no run dir, lease, TB, W&B, profile
    assert files_under(Path(demo_root)) == data_before


def test_dry_run_of_the_demo_before_its_data_exists_is_one_line(tmp_path):
    r = dry_run(tmp_path, str(tmp_path / "no_demo_yet"), "data.prepare=demo")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "data.prepare is demo but the demo data under" in r.stderr and "run once without --dry-run" in r.stderr
    assert not (tmp_path / "no_demo_yet").exists()


def test_explicit_bf16_on_a_cpu_without_native_bf16_warns_once(tmp_path, demo_root):
    # torch's own switches hold its kernels (and oneDNN's) to AVX2, as on a CPU without AVX512-BF16 or AMX.
    avx2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    r = dry_run(tmp_path, demo_root, "train.precision=bf16", env=avx2)
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if "'train.precision' is bf16" in line]
    assert len(warnings) == 1 and "on a CPU without AVX512-BF16 or AMX, where autocast costs 10 to 20x" in warnings[0]
    assert "set train.precision=auto (fp32 here)" in warnings[0]
    r = dry_run(tmp_path, demo_root, "train.precision=auto", env=avx2)
    assert r.returncode == 0 and "precision fp32 (train.precision auto: the CPU default" in r.stderr, r.stderr[-2000:]
    assert "'train.precision' is" not in r.stderr
