import pytest
import torch

from pretrain.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def test_linear_warmup_then_linear_decay():
    f = [lr_factor(s, total_steps=110, warmup_steps=10) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.5)
    assert f[109] == pytest.approx(0.01)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_cosine_and_end_ratio():
    assert lr_factor(10, 110, 10, "cosine", end_ratio=0.1) == pytest.approx(1.0)
    assert lr_factor(60, 110, 10, "cosine", end_ratio=0.1) == pytest.approx(0.55)
    assert lr_factor(110, 110, 10, "linear", end_ratio=0.1) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_and_biases():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(m, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_scheduler_drives_optimizer_lr():
    m = torch.nn.Linear(2, 2)
    opt = build_optimizer(m, lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = build_scheduler(opt, total_steps=4, warmup_steps=2, schedule="linear", end_ratio=0.0)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.5])
