"""pretrain/main.py per engine through torchrun (the deepspeed launcher is exercised in
test_engines.py; torchrun is cheaper to start):
killed with SIGKILL after a checkpoint and resumed, it must end bit-identical to an uninterrupted
run; fsdp and deepspeed must also resume from 2 ranks onto 1 and from 1 onto 2."""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import MAIN, ROOT, free_port, tiny_args

pytestmark = pytest.mark.slow
STEPS, EVERY = 30, 10
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def torchrun(n):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port())]


def python(n):
    assert n == 1
    return [sys.executable]


ENGINES = {
    "ddp": (torchrun, ["engine.kind=ddp"]),
    "fsdp": (torchrun, ["engine.kind=fsdp"]),
    "deepspeed": (torchrun, ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=2"]),
}


def command(engine, ranks, run_dir, demo_root, steps=STEPS, launcher=None):
    default_launcher, extra = ENGINES[engine]
    launcher = launcher or default_launcher
    # No evaluation (the demo's linear probe would run at every checkpoint: ~1 s each, ~30 of them here);
    # in-process loading: less to start.
    args = tiny_args(run_dir, demo_root, steps, EVERY, "eval.mode=none", "checkpoint.keep_last=5",
                     "data.num_workers=0", *extra)
    return launcher(ranks) + [MAIN] + args


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def logged_losses(log):
    return {int(s): float(v) for s, v in re.findall(r"step (\d+)/\d+  loss ([0-9.]+)", log)}


def weights(run_dir, step):
    return load_file(run_dir / f"checkpoints/step_{step:07d}/model.safetensors")


def metadata(run_dir, step):
    return json.loads((run_dir / f"checkpoints/step_{step:07d}/metadata.json").read_text())


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory, demo_root):
    """engine -> its straight and killed-and-resumed runs, each made once per module on first use. A cache
    rather than a parametrized module fixture: pytest reorders tests so that such a fixture is built once
    per param, but under pytest-xdist (make test) they arrive in collection order, and the fsdp and
    deepspeed runs (~50 s each) were built twice."""
    cache = {}

    def get(engine):
        if engine not in cache:
            cache[engine] = _killed_and_resumed(engine, tmp_path_factory, demo_root)
        return cache[engine]
    return get


@pytest.fixture(params=list(ENGINES))
def killed_and_resumed(request, engine_runs):
    return engine_runs(request.param)


def _killed_and_resumed(engine, tmp_path_factory, demo_root):
    base = tmp_path_factory.mktemp(engine)
    straight_log = run(command(engine, 2, base / "straight", demo_root))

    killed = base / "killed"
    proc = subprocess.Popen(command(engine, 2, killed, demo_root), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (killed / "checkpoints/step_0000010").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its step-10 checkpoint"
        time.sleep(0.02)
    # The launcher, its ranks and their data-loader workers alike (torchrun starts each rank in a
    # session of its own, so killing the launcher's process group would miss them).
    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)
    assert not (killed / f"checkpoints/step_{STEPS:07d}").exists(), "killed too late"
    resumed_log = run(command(engine, 2, killed, demo_root))
    return engine, base, straight_log, resumed_log, demo_root


def test_kill_and_resume_is_bit_exact(killed_and_resumed):
    engine, base, straight_log, resumed_log, _ = killed_and_resumed
    assert "resumed from" in resumed_log and "per-rank RNG state restored" in resumed_log
    start = int(re.search(r"resumed from \S+ \(step (\d+)\)", resumed_log).group(1))
    assert start >= 10
    a, b = logged_losses(straight_log), logged_losses(resumed_log)
    after = [s for s in a if s > start]
    assert after and all(a[s] == b[s] for s in after), (a, b)
    wa, wb = weights(base / "straight", STEPS), weights(base / "killed", STEPS)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] == wb[k]).all(), f"{engine}: {k} differs after resume"
    meta = metadata(base / "killed", STEPS)
    assert meta["engine"] == engine and meta["world_size"] == 2
    assert meta["layout"]["engine"] == engine
    assert (base / "killed/checkpoints/latest").read_text() == f"step_{STEPS:07d}"


def max_change(run_dir_a, step_a, run_dir_b, step_b):
    wa, wb = weights(run_dir_a, step_a), weights(run_dir_b, step_b)
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def checkpoint_copy(base, step):
    """A run dir holding only the straight 2-rank run's checkpoint at `step`."""
    run_dir = base / "reshard"
    shutil.copytree(base / "straight", run_dir)
    for p in (run_dir / "checkpoints").glob("step_*"):
        if p.name != f"step_{step:07d}":
            shutil.rmtree(p)
    (run_dir / "checkpoints/latest").write_text(f"step_{step:07d}")
    return run_dir


@pytest.mark.parametrize("killed_and_resumed", ["fsdp"], indirect=True)
def test_resume_two_ranks_onto_one_and_back(killed_and_resumed):
    engine, base, _, _, demo_root = killed_and_resumed
    run_dir = checkpoint_copy(base, 20)
    one = run(command(engine, 1, run_dir, demo_root, steps=21, launcher=python))  # plain python: 1 process
    assert "resumed from" in one and "(step 20)" in one
    assert "per-rank RNG state not restored: saved by 2 ranks, this run has 1" in one
    assert "optimizer state not restored" not in one  # DCP reshards the optimiser state
    assert metadata(run_dir, 21)["world_size"] == 1
    # The weights carried over: one late-schedule step (lr 1/16 of the peak) moves them far less
    # than ten early steps did; a fresh initialisation would be further away than that.
    ten_steps = max_change(base / "straight", 20, base / "straight", 10)
    assert 0 < max_change(run_dir, 21, run_dir, 20) < 0.25 * ten_steps

    two = run(command(engine, 2, run_dir, demo_root, steps=22))
    assert "(step 21)" in two and "per-rank RNG state not restored: saved by 1 ranks, this run has 2" in two
    assert metadata(run_dir, 22)["world_size"] == 2
    assert 0 < max_change(run_dir, 22, run_dir, 21) < 0.25 * ten_steps


def zero_state(run_dir, step):
    from pretrain.engines.deepspeed import _load_weights_only
    from pretrain.engines.zero_reshard import read_zero_checkpoint

    return read_zero_checkpoint(str(run_dir / f"checkpoints/step_{step:07d}/engine/state"), _load_weights_only)


def assert_same_optimizer_state(a, b):
    assert a.tensors.keys() == b.tensors.keys() == {"fp32", "exp_avg", "exp_avg_sq"}
    for key in a.tensors:
        assert a.tensors[key].keys() == b.tensors[key].keys()
        for name, t in a.tensors[key].items():
            assert torch.equal(t, b.tensors[key][name]), f"{key} of {name} differs after resharding"
    assert int(a.step) == int(b.step) and a.global_steps == b.global_steps


def assert_deepspeed_tools_read(run_dir, step):
    """DeepSpeed's own reader, as documented (no tag: it follows engine/latest), gives model.safetensors
    bit for bit; the `latest` file is covered by the checkpoint's sha256 list like every other file."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = run_dir / f"checkpoints/step_{step:07d}"
    theirs, ours = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "engine")), weights(run_dir, step)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert "engine/latest" in metadata(run_dir, step)["files"]
    assert not list(ckpt.glob("engine/*.py"))  # DeepSpeed's script copies (their CLI needs huggingface_hub)


@pytest.mark.parametrize("killed_and_resumed", ["deepspeed"], indirect=True)
def test_deepspeed_reshards_optimizer_state_across_world_size_and_stage(killed_and_resumed):
    """ZeRO-2 on 2 ranks -> ZeRO-2 on 1 -> ZeRO-3 on 3 (uneven partitions: 64-element biases over 3
    ranks) -> training on 2 ranks. Each hop resumes and re-saves the same step at once, through
    DeepSpeed's own save on the new layout: the full fp32 masters, both Adam moments and the step
    count must come out bit-identical."""
    engine, base, _, _, demo_root = killed_and_resumed
    run_dir = checkpoint_copy(base, 20)
    saved = zero_state(run_dir, 20)
    assert int(saved.step) == 20 and saved.stage == 2 and saved.world_size == 2
    assert_deepspeed_tools_read(run_dir, 20)  # ZeRO-2, 2 ranks
    # The rebuilt masters are the consolidated weights DeepSpeed gathered itself at save time.
    assert all(torch.equal(v, saved.tensors["fp32"][k]) for k, v in weights(run_dir, 20).items())

    resave = [str(ROOT / "tests/drivers/resave_checkpoint.py")]
    cmd = command(engine, 1, run_dir, demo_root)
    args = cmd[cmd.index(MAIN) + 1:]  # the config and overrides
    one = run(python(1) + resave + args)
    assert "resharded: ZeRO-2 on 2 ranks -> ZeRO-2 on 1 ranks" in one and "step 20 restored" in one
    assert metadata(run_dir, 20)["world_size"] == 1
    assert_same_optimizer_state(saved, zero_state(run_dir, 20))

    three = run(torchrun(3) + resave + args + ["engine.deepspeed.zero_stage=3", "train.global_batch_size=48"])
    assert "resharded: ZeRO-2 on 1 ranks -> ZeRO-3 on 3 ranks" in three
    assert metadata(run_dir, 20)["layout"] == {"engine": "deepspeed", "world_size": 3, "zero_stage": 3}
    assert_deepspeed_tools_read(run_dir, 20)  # ZeRO-3, 3 ranks (uneven partitions); training resumes from it below
    assert_same_optimizer_state(saved, zero_state(run_dir, 20))

    two = run(command(engine, 2, run_dir, demo_root, steps=21))
    assert "resharded: ZeRO-3 on 3 ranks -> ZeRO-2 on 2 ranks" in two and "(step 20)" in two
    ten_steps = max_change(base / "straight", 20, base / "straight", 10)
    assert 0 < max_change(run_dir, 21, base / "straight", 20) < 0.25 * ten_steps
    after = zero_state(run_dir, 21)
    assert int(after.step) == 21  # Adam's bias correction continues; a restart would say 1
    # v_21 = b2 * v_20 + (1 - b2) * g^2 >= b2 * v_20 everywhere; restarted moments would be ~(1 - b2) g^2.
    for name, v20 in saved.tensors["exp_avg_sq"].items():
        assert (after.tensors["exp_avg_sq"][name] >= 0.999 * v20 * (1 - 1e-6)).all(), name
