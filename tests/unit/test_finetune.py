"""The fine-tune evaluator: learns a new head on a small task, leaves the pre-trained model untouched,
and stops with a recorded error when it runs past its time budget."""
import contextlib

import numpy as np
import pytest
import torch

from data_pipeline.stream.batch import Batch
from pretrain.dist import DistInfo
from pretrain.evaluation import EvalTimeout, FineTuneEvaluator
from pretrain.evaluation.finetune import random_crop_flip
from pretrain.models import create_model

MAIN = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def to_device(b):
    return (b.images.permute(0, 3, 1, 2).float() - 127.5) / 127.5, b.labels


def finetune(train_batches, test_batches, **options):
    return FineTuneEvaluator(train_batches, test_batches, to_device, contextlib.nullcontext, dist_info=MAIN, **options)


@pytest.fixture(autouse=True)
def one_thread():
    # A model this small runs fastest on one thread; more only spin against each other on busy CI cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bright_half_batches(n, seed, size=16):
    """Class 0: bright left half; class 1: bright right half (noise elsewhere)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 60, (n, size, size, 3)).astype(np.uint8)
    half = size // 2
    for i, y in enumerate(labels):
        images[i, :, half * y:half * y + half] += 150
    return [Batch(images=torch.from_numpy(images[i:i + 32]), labels=torch.from_numpy(labels[i:i + 32]),
                  keys=[str(k) for k in range(i, min(n, i + 32))]) for i in range(0, n, 32)]


def test_finetune_learns_a_new_head_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = create_model("mixer_p4_32", num_classes=10, img_size=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ev = finetune(lambda: bright_half_batches(128, 0), lambda: bright_half_batches(96, 1),
                  num_classes=2, steps=40, batch_size=32, lr=0.05, warmup_steps=4, hflip=False)
    out = ev.run(model)
    assert out["top1"] > 0.9, out
    assert model.head.out_features == 10
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_finetune_at_twice_the_resolution_uses_resized_token_mixing():
    torch.manual_seed(0)
    model = create_model("mixer_p4_32", num_classes=10, img_size=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ev = finetune(lambda: bright_half_batches(128, 0, 32), lambda: bright_half_batches(96, 1, 32),
                  num_classes=2, steps=40, batch_size=32, lr=0.05, warmup_steps=4, hflip=False)
    out = ev.run(model)
    assert out["top1"] > 0.9, out
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # 24 px is not an integer multiple of the 16 px grid: one clear line, no silent interpolation.
    bad = finetune(lambda: bright_half_batches(32, 0, 24), lambda: bright_half_batches(32, 1, 24),
                   num_classes=2, steps=2, batch_size=32, lr=0.05, warmup_steps=1, hflip=False)
    with pytest.raises(ValueError, match=r"finetune at \(24, 24\) px"):
        bad.run(model)


def test_finetune_time_budget_raises():
    model = create_model("mixer_p4_32", num_classes=10, img_size=16)
    ev = finetune(lambda: bright_half_batches(64, 0), lambda: bright_half_batches(32, 1),
                  num_classes=2, steps=10_000, batch_size=32, lr=0.05, warmup_steps=4, hflip=False,
                  time_budget_s=0.5)
    with pytest.raises(EvalTimeout, match="time budget of 0.5 s"):
        ev.run(model)


def test_random_crop_flip_moves_pixels_only():
    images = torch.arange(2 * 8 * 8 * 3, dtype=torch.int64).reshape(2, 8, 8, 3).to(torch.uint8)
    out = random_crop_flip(images, torch.Generator().manual_seed(0), pad=2, hflip=True)
    assert out.shape == images.shape and out.dtype == torch.uint8
    # With no padding and no flip it is the identity.
    same = random_crop_flip(images, torch.Generator().manual_seed(0), pad=0, hflip=False)
    assert torch.equal(same, images)
