import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.loss import build_loss


def test_softmax_int_labels_and_one_hot_agree():
    logits = torch.randn(6, 5)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = build_loss("softmax")
    assert loss(logits, labels) == pytest.approx(float(F.cross_entropy(logits, labels)), abs=1e-6)
    assert loss(logits, F.one_hot(labels, 5).float()) == pytest.approx(float(loss(logits, labels)), abs=1e-6)
    smoothed = build_loss("softmax", 0.1)
    assert smoothed(logits, labels) == pytest.approx(smoothed(logits, F.one_hot(labels, 5).float()).item(), abs=1e-6)


def test_sigmoid_is_summed_binary_ce():
    logits = torch.zeros(2, 4)
    # Every class at logit 0: -log(sigmoid(0)) = ln 2 per class, summed over 4 classes.
    assert build_loss("sigmoid")(logits, torch.tensor([1, 3])).item() == pytest.approx(4 * math.log(2))
    soft = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.25, 0.75]])
    logits = torch.randn(2, 4)
    expected = F.binary_cross_entropy_with_logits(logits, soft, reduction="sum") / 2
    assert build_loss("sigmoid")(logits, soft).item() == pytest.approx(expected.item(), abs=1e-6)


def test_bf16_logits_computed_in_fp32():
    logits = torch.randn(4, 3).bfloat16()
    assert build_loss("sigmoid")(logits, torch.tensor([0, 1, 2, 0])).dtype == torch.float32


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        build_loss("hinge")


def test_loss_guard_skips_non_finite_and_spikes_then_stops():
    from pretrain.loss_guard import LossGuard, TrainingDiverged
    guard = LossGuard(spike_factor=3.0, max_bad_steps=2)
    assert guard.check(torch.tensor(2.0)) is None
    assert guard.check(torch.tensor(5.0)) is None  # below 3 x 2.0
    assert "non-finite" in guard.check(torch.tensor(float("nan")))
    assert "non-finite" in guard.check(torch.tensor(float("inf")))
    assert "spike" in guard.check(torch.tensor(100.0))
    guard.end_step(1, None)
    guard.end_step(2, "loss spike")
    guard.end_step(3, None)  # a good step resets the streak
    guard.end_step(4, "non-finite loss (nan)")
    with pytest.raises(TrainingDiverged, match="2 bad steps in a row up to step 5"):
        guard.end_step(5, "non-finite loss (nan)")


def test_skip_step_leaves_weights_untouched():
    from functools import partial

    from pretrain.dist import DistInfo
    from pretrain.engines import Engine
    from pretrain.optim import build_optimizer, build_scheduler
    one = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    engine = Engine(torch.nn.Linear(3, 2), partial(build_optimizer, lr=0.1, betas=(0.9, 0.999), eps=1e-8,
                                                   weight_decay=0.1),
                    partial(build_scheduler, total_steps=10, warmup_steps=0, schedule="linear", end_ratio=0.0),
                    dist_info=one)
    before = {k: v.clone() for k, v in engine.unwrapped.state_dict().items()}
    engine.backward(engine.model(torch.randn(4, 3)).sum())
    lr = engine.lr
    engine.skip_step()
    assert all(torch.equal(v, engine.unwrapped.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in engine.unwrapped.parameters())
    assert engine.lr < lr  # the schedule moved on with the step count
