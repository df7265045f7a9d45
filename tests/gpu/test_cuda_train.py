"""Runs only where CUDA exists (skipped with that reason elsewhere): the real training path on a GPU."""
import json
import warnings

import pytest
import torch

from tests.conftest import run_main, tiny_args, tiny_trainer

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
    # The same run goes on from its checkpoint (weights, optimiser, loss scaler, data position) on the GPU.
    r = run_main(tiny_args(run_dir, demo_root, 180, 150, "train.device=cuda", f"train.precision={precision}",
                           batch=64))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(step 150)" in r.stderr and "resumed from" in r.stderr, r.stderr[-3000:]
    rec = json.loads((run_dir / "eval/step_0000180.json").read_text())
    assert rec["errors"] == {} and rec["results"]["upstream"]["top1"] > 0.15


def test_one_cuda_sync_per_step(tmp_path, demo_root):
    """The loop's only synchronising CUDA call between log steps is the loss guard's one read per
    optimiser step (after the last micro batch's forward), as torch's sync debug mode reports them."""
    trainer = tiny_trainer(tmp_path, demo_root, "train.device=cuda", "train.precision=bf16",
                           "train.global_batch_size=64", "train.grad_accum_steps=2", "train.log_every=50")
    try:
        batches = iter(trainer.loader)
        for _ in range(3):  # warm-up: allocator, first-step lazy state
            trainer.train_step(batches)
        torch.cuda.synchronize()
        per_step = []
        for _ in range(4):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    trainer.train_step(batches)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            per_step.append([f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)])
        assert all(len(s) == 1 for s in per_step), per_step
    finally:
        trainer.close()


def test_normalize_on_device_matches_cpu():
    from data_pipeline.image.device import normalize

    x = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    mean, std = [120.0, 110.0, 100.0], [60.0, 50.0, 40.0]
    torch.testing.assert_close(normalize(x.cuda(), mean, std).cpu(), normalize(x, mean, std))


def test_async_snapshot_reuses_pinned_host_buffers(tmp_path):
    """An asynchronous checkpoint's optimiser snapshot lands in page-locked buffers that the next save
    reuses, and holds the state of the step it was taken at."""
    from functools import partial

    from pretrain.dist import DistInfo
    from pretrain.engines import Engine
    from pretrain.optim import build_optimizer, build_scheduler

    engine = Engine(torch.nn.Linear(64, 32), partial(build_optimizer, lr=0.1, betas=(0.9, 0.999), eps=1e-8,
                                                     weight_decay=0.1),
                    partial(build_scheduler, total_steps=10, warmup_steps=0, schedule="linear", end_ratio=0.0),
                    dist_info=DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda")))

    def step_and_snapshot():
        engine.backward(engine.model(torch.randn(8, 64, device="cuda")).square().mean())
        engine.step()
        writer = engine.snapshot_state(str(tmp_path), background=True)
        return writer.jobs[0].args[0]["optimizer"]["state"], engine.optimizer.state_dict()["state"]

    def moments(state):
        return [state[i][k] for i in sorted(state) for k in ("exp_avg", "exp_avg_sq")]

    first, live = step_and_snapshot()
    assert all(t.is_pinned() for t in moments(first))
    assert all(torch.equal(a, b.cpu()) for a, b in zip(moments(first), moments(live)))
    pointers = [t.data_ptr() for t in moments(first)]
    second, live = step_and_snapshot()
    assert [t.data_ptr() for t in moments(second)] == pointers  # the same buffers, refilled
    assert all(torch.equal(a, b.cpu()) for a, b in zip(moments(second), moments(live)))
