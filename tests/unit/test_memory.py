"""The memory estimate against numbers worked out by hand for a tiny Mixer, against a measured run, and
the check that stops a run which cannot fit."""
import pytest

from pretrain.memory import activation_elements_per_image, backward_elements_per_image, estimate_memory
from pretrain.models.mixer import MlpMixer


@pytest.fixture(scope="module")
def tiny():
    # 8 px, patch 4 -> N = 4 tokens; C = 4; D_S = 0.5 * 4 = 2; D_C = 4 * 4 = 16; 2 blocks; 10 classes.
    return MlpMixer(num_classes=10, img_size=8, patch_size=4, num_blocks=2, embed_dim=4, mlp_ratio=(0.5, 4.0))


def test_hand_count_of_parameters_and_activations(tiny):
    # stem 3*4*4*4 + 4 = 196; per block: norms 2*8, token MLP (4*2+2) + (2*4+4) = 22,
    # channel MLP (4*16+16) + (16*4+4) = 148 -> 186; final norm 8; head 4*10+10 = 50.
    assert sum(p.numel() for p in tiny.parameters()) == 196 + 2 * 186 + 8 + 50 == 626
    # Per block 4*N*C + 2*C*D_S + 2*N*D_C = 64 + 16 + 128 = 208; two blocks 416.
    assert activation_elements_per_image(tiny) == 416
    # Checkpointed: the 2 block inputs (N*C = 16 each) + one block recomputed (208).
    assert activation_elements_per_image(tiny, checkpointing=True) == 2 * 16 + 208
    # Backward: the gradients in and out of the largest activation, N*D_C = 64.
    assert backward_elements_per_image(tiny) == 2 * 64


def test_ddp_holds_everything_in_fp32(tiny):
    m = estimate_memory(tiny, engine="ddp", world_size=4, micro_batch_size=8, precision="bf16")
    assert (m.params, m.grads, m.optimizer, m.gathered) == (626 * 4, 626 * 4, 626 * 8, 0)
    # bf16 activations + backward workspace, and autocast's bf16 copy of the weights.
    assert m.activations == 8 * (416 + 128) * 2 + 626 * 2
    assert m.step_temp == 626 * 4  # foreach AdamW's sqrt(v)
    assert m.total == 626 * 16 + max(m.activations, m.step_temp)


def test_fsdp_shards_all_three(tiny):
    m = estimate_memory(tiny, engine="fsdp", world_size=4, micro_batch_size=8, precision="fp32")
    # 626*4 = 2504 B / 4 ranks = 626; Adam 5008 / 4 = 1252; two gathered blocks 2 * 186 * 4 B.
    assert (m.params, m.grads, m.optimizer, m.gathered) == (626, 626, 1252, 2 * 186 * 4)
    assert m.activations == 8 * (416 + 128) * 4 and m.step_temp == 626


@pytest.mark.parametrize("stage, expected", [
    # bf16: weights 2 B, grads 2 B, optimiser 12 B (fp32 master + m + v) per parameter, 2 ranks.
    (1, (626 * 2, 626 * 2, 626 * 12 // 2, 0)),
    (2, (626 * 2, 626 * 2 // 2, 626 * 12 // 2, 0)),
    (3, (626 * 2 // 2, 626 * 2 // 2, 626 * 12 // 2, 2 * 186 * 2)),
])
def test_zero_stages(tiny, stage, expected):
    m = estimate_memory(tiny, engine="deepspeed", world_size=2, micro_batch_size=1, precision="bf16", zero_stage=stage)
    assert (m.params, m.grads, m.optimizer, m.gathered) == expected


def test_offload_moves_optimizer_to_host(tiny):
    m = estimate_memory(tiny, engine="deepspeed", world_size=2, micro_batch_size=1, precision="bf16", zero_stage=2,
                        offload_optimizer=True)
    assert m.optimizer == 0 and m.optimizer_host == 626 * 12 // 2
    assert "host memory" in m.describe()


def test_h14_line_is_printed_in_gib():
    from pretrain.models import create_model
    import torch
    with torch.device("meta"):  # shapes only: no 1.7 GB allocation
        h14 = create_model("mixer_h14_224", num_classes=21843)
    m = estimate_memory(h14, engine="deepspeed", world_size=8, micro_batch_size=32, precision="bf16", zero_stage=3)
    n = sum(p.numel() for p in h14.parameters())
    assert m.params == -(-n * 2 // 8)
    assert "GiB host memory per rank" in m.describe()
    gpu = estimate_memory(h14, engine="deepspeed", world_size=8, micro_batch_size=32, precision="bf16", zero_stage=3,
                          device_type="cuda")
    assert "GiB per device; host: " in gpu.describe() and gpu.host < m.host  # model states on the GPU


def test_host_memory_counts_workers_checkpoint_copies_and_the_runtime(tiny):
    from pretrain.memory import PREFETCH_BATCHES, RUNTIME_BYTES, WORKER_BYTES

    sync = estimate_memory(tiny, engine="ddp", world_size=1, micro_batch_size=8, num_workers=2, image_size=8)
    assert sync.workers == 2 * (WORKER_BYTES + PREFETCH_BATCHES * 8 * 3 * 8 * 8)
    assert sync.checkpoint == 626 * 4  # the consolidated fp32 weights
    assert sync.host == max(sync.total, 626 * 12 + sync.checkpoint) + sync.workers + RUNTIME_BYTES
    asynchronous = estimate_memory(tiny, engine="ddp", world_size=1, micro_batch_size=8, async_checkpoint=True)
    assert asynchronous.checkpoint == 626 * 4 + 626 * 8  # + the optimiser state staged while training goes on
    assert asynchronous.host == asynchronous.total + asynchronous.checkpoint + RUNTIME_BYTES


def test_h14_estimate_is_printed_from_the_command_line(capsys):
    from pretrain.main import main
    from tests.conftest import ROOT
    assert main(["--config", str(ROOT / "configs/h14.yaml"), "--estimate-memory", "64", "train.device=cuda"]) == 0
    line, verdict = capsys.readouterr().out.strip().splitlines()
    line = line.removeprefix("memory estimate: ")
    assert line.startswith("mixer_h14_224 on deepspeed ZeRO-3, 64 ranks, micro batch 64 x 1, cuda: ")
    # H/14 at 224 px: N = 256 tokens, C = 1280, D_S = 640, D_C = 5120, 32 blocks, checkpointed:
    # 32 * 256 * 1280 block inputs + one block (4*256*1280 + 2*1280*640 + 2*256*5120 = 5,570,560)
    # + backward 2 * 256 * 5120 = 18,677,760 elements/image x 64 images x 2 B (bf16) = 2.23 GiB.
    assert "activations 2.23," in line and "GiB per device; host: " in line
    # data.train is the placeholder: the head is counted for 1000 classes, and the line says so.
    assert line.endswith("(head counted for 1000 classes: model.num_classes is auto and data.train is not readable)")


def test_estimate_is_within_a_factor_of_two_of_a_measured_run(tmp_path, demo_root):
    """A short run (an async checkpoint overlapping a step, one data worker): the logged host estimate
    against the peak PSS of the process tree, sampled. bench/memory_estimate.py does S/32..L/16."""
    import os
    import re
    import subprocess
    import sys
    import time

    from bench.memory_estimate import tree_pss  # the bench's own measurement, one definition
    from tests.conftest import MAIN, ROOT, tiny_args

    args = tiny_args(tmp_path / "run", demo_root, 6, 3, "eval.mode=none", "checkpoint.async_save=true")
    proc = subprocess.Popen([sys.executable, MAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_pss(proc.pid))  # 0 once the process is gone
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    estimate = float(re.search(r"= ([0-9.]+) GiB host memory per rank", err).group(1)) * 2**30
    # For this tiny model the fixed per-process term dominates, and PSS depends on what else maps the same
    # libraries: here it came within 35 %, in a fresh clone's own venv 0.40 vs 0.68 GiB. The +-35 % goal is
    # bench/memory_estimate.py's (S/32..L/16); this test catches an estimate off by a factor, as 3.5 vs 8.1 GB was.
    assert 0.5 * peak <= estimate <= 2 * peak, (estimate / 2**30, peak / 2**30)


def test_a_run_that_cannot_fit_stops_before_step_1_with_one_line(tmp_path, demo_root):
    """A million ranks sharing this host: each one's share is what it holds already, below the estimate of
    a B/16 (60M parameters, at 32 px here); the check runs before the model is built."""
    import os
    import subprocess
    import sys

    from tests.conftest import MAIN, ROOT, tiny_args

    r = subprocess.run([sys.executable, MAIN, *tiny_args(tmp_path / "run", demo_root, 4, 2, "eval.mode=none"),
                        "model.name=mixer_b16_224", "model.img_size=32"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "1000000"})
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {ROOT / 'configs/demo.yaml'}: the run needs about "), r.stderr[-2000:]
    assert "GiB of host memory (1000000 ranks on this host) per rank (memory estimate above) but " in last
    assert "engine.activation_checkpointing=true" in last
    assert last.endswith("or train.memory_check=false to start anyway")
    assert "Traceback" not in r.stderr and not (tmp_path / "run" / "checkpoints").exists()


def test_estimate_is_for_the_command_lines_run_and_ends_with_a_verdict(capsys):
    """The overrides of the run (its batch) reach the estimate; train.device auto estimates for the device this
    machine would train on; the last line says whether it fits against what that device has."""
    import torch

    from pretrain.main import main
    from tests.conftest import ROOT
    s32 = str(ROOT / "configs/s32.yaml")
    assert main(["--config", s32, "--estimate-memory", "1", "train.global_batch_size=16"]) == 0
    line, verdict = capsys.readouterr().out.strip().splitlines()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert line.startswith(f"memory estimate: mixer_s32_224 on ddp, 1 ranks, micro batch 16 x 1, {device}: "), line
    if device == "cpu":
        assert line.endswith("GiB host memory per rank (head counted for 1000 classes: model.num_classes is auto "
                             "and data.train is not readable)"), line
        assert verdict.startswith("verdict: fits: ") and "GiB of host memory (1 rank on this host) available" in verdict
    # For GPUs from a machine that may have none: the visible GPU, else an assumed size, said so.
    assert main(["--config", s32, "--estimate-memory", "8", "train.device=cuda", "--gpu-memory-gib", "2"]) == 0
    line, verdict = capsys.readouterr().out.strip().splitlines()
    assert "micro batch 512 x 1, cuda: " in line  # 4096 over 8 ranks
    assert "activations 4.58," in line  # bf16 (auto on a GPU with bf16): half of fp32's 9.09
    assert verdict.startswith("verdict: does not fit: ")
    assert "GiB per device against a 2 GiB GPU (given; --gpu-memory-gib sets it)" in verdict
    assert "a smaller train.micro_batch_size" in verdict, verdict


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="VmHWM is Linux's /proc")
def test_peak_rss_is_this_processes_not_its_parents():
    """ru_maxrss survives exec: a child of a large parent (a launcher, a test runner) would report the parent's
    peak as its own, as `--dry-run` once did (1.21 GiB measured against a 0.34 GiB estimate)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    big = bytearray(600 << 20)
    big[::4096] = b"\1" * len(big[::4096])  # touched: resident in this process
    code = ("import resource; from pretrain.monitor import max_rss_gib; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, max_rss_gib())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    inherited, own = map(float, out.split())
    del big
    assert inherited > 0.55, "the premise: ru_maxrss carries the parent's peak over exec"
    assert own < inherited - 0.3
