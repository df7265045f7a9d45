"""Host syncs in the training step: the loss guard reads the step's losses once, after the last forward
and before the last backward, never between micro batches; the monitor reads only on log steps.

On CPU a device sync cannot be observed, so every host read of a tensor (`item`, `tolist`, `float`,
`bool`, `int`) made by the project's loop code (pretrain.*) is recorded, in order with the engine's
backwards. The preemption flag is excluded: it is a CPU tensor on a gloo group by design (no device
involved). tests/gpu/test_cuda_train.py counts real CUDA syncs with torch.cuda.set_sync_debug_mode.
"""
from __future__ import annotations

import sys

import pytest
import torch

from tests.conftest import tiny_trainer

READS = ("item", "tolist", "__float__", "__bool__", "__int__")


@pytest.fixture
def trainer(tmp_path, demo_root):
    t = tiny_trainer(tmp_path, demo_root, "train.steps=8", "train.global_batch_size=24", "train.grad_accum_steps=3",
                     "train.log_every=4")
    yield t
    t.close()


def _record(monkeypatch, trainer) -> list[str]:
    events: list[str] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def read(self, *a, _original=original, _name=name, **kw):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("pretrain.") and caller != "pretrain.preemption":
                events.append(f"read:{caller}.{_name}")
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, read)
    backward = trainer.engine.backward
    monkeypatch.setattr(trainer.engine, "backward", lambda loss: (events.append("backward"), backward(loss)))
    return events


def test_one_host_read_per_step_after_the_last_forward(trainer, monkeypatch):
    batches = iter(trainer.loader)
    events = _record(monkeypatch, trainer)
    per_step = []
    for _ in range(4):  # steps 1-3 are not log steps; step 4 is
        trainer.train_step(batches)
        per_step.append(events[:])
        events.clear()
    guard_read = "read:pretrain.loss_guard.tolist"
    for step in per_step[:3]:
        assert step == ["backward", "backward", guard_read, "backward"], step
    # The log step adds the monitor's one read of the interval's loss and grad-norm means.
    assert per_step[3] == ["backward", "backward", guard_read, "backward", "read:pretrain.monitor.tolist"], per_step[3]


def test_a_bad_micro_batch_skips_the_whole_step(trainer):
    """Semantics kept from judging each micro batch: a non-finite loss in any micro batch (here the
    first, whose backward already ran) leaves the weights untouched; max_bad_steps in a row stop the run."""
    from pretrain.loss_guard import TrainingDiverged

    batches = iter(trainer.loader)
    trainer.train_step(batches)  # a good step first: the guard has a running mean
    loss_fn, calls = trainer.loss_fn, [0]

    def first_micro_batch_nan(logits, labels):
        calls[0] += 1
        loss = loss_fn(logits, labels)
        return loss * float("nan") if calls[0] % 3 == 1 else loss

    trainer.loss_fn = first_micro_batch_nan
    before = {k: v.clone() for k, v in trainer.engine.unwrapped.state_dict().items()}
    trainer.train_step(batches)
    assert trainer.step == 2 and trainer.guard.streak == 1 and trainer.monitor.skipped == 1
    assert all(torch.equal(v, trainer.engine.unwrapped.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in trainer.engine.unwrapped.parameters())  # the NaN gradients are gone
    trainer.loss_fn = loss_fn
    trainer.train_step(batches)  # a good step afterwards trains normally and resets the streak
    assert trainer.guard.streak == 0
    assert not all(torch.equal(v, trainer.engine.unwrapped.state_dict()[k]) for k, v in before.items())
    trainer.loss_fn = first_micro_batch_nan
    with pytest.raises(TrainingDiverged):
        for _ in range(trainer.cfg.train.max_bad_steps):
            trainer.train_step(batches)
