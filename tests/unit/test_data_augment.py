"""RandAugment (CPU, PIL) and batch mixup / cutmix (device side)."""
import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.image.augment import MixupCutmix, RandAugment
from data_pipeline.shards.tar_write import encode_jpeg
from data_pipeline.image.transforms import TrainTransform


def _image():
    yy, xx = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1).astype(np.uint8))


def test_randaugment_is_seeded_and_changes_images():
    ra = RandAugment(2, 9)
    a = np.asarray(ra(_image(), np.random.default_rng(1)))
    b = np.asarray(ra(_image(), np.random.default_rng(1)))
    assert np.array_equal(a, b) and a.shape == (64, 64, 3)
    changed = sum(not np.array_equal(np.asarray(ra(_image(), np.random.default_rng(s))), np.asarray(_image()))
                  for s in range(20))
    assert changed >= 15  # Identity twice (or no-op draws) is rare
    assert np.array_equal(np.asarray(RandAugment(2, 0)(_image(), np.random.default_rng(0)))[..., 0].shape, (64, 64))
    with pytest.raises(ValueError):
        RandAugment(2, 31)


def test_train_transform_applies_randaugment_after_the_crop():
    data = encode_jpeg(np.asarray(_image()))
    plain = TrainTransform(32)(data, np.random.default_rng(0))
    ra = TrainTransform(32, randaugment=RandAugment(3, 15))(data, np.random.default_rng(0))
    assert plain.shape == ra.shape == (32, 32, 3) and not np.array_equal(plain, ra)


def test_mixup_targets_are_convex_and_match_the_pixels():
    mix = MixupCutmix(5, mixup_alpha=0.8, seed=0)
    images = torch.stack([torch.full((3, 4, 4), float(i)) for i in range(4)])
    labels = torch.tensor([0, 1, 2, 3])
    out, targets = mix(images, labels, ["a", "b", "c", "d"])
    assert targets.shape == (4, 5) and torch.allclose(targets.sum(1), torch.ones(4))
    lam = targets[0, 0].item()
    assert torch.allclose(out[0], lam * images[0] + (1 - lam) * images[3])
    again, _ = mix(images, labels, ["a", "b", "c", "d"])
    assert torch.equal(out, again), "the same batch mixes the same way (exact resume)"


def test_cutmix_label_weight_is_the_pasted_area():
    mix = MixupCutmix(3, cutmix_alpha=1.0, seed=0)
    images = torch.cat([torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16)])
    for k in range(10):
        out, targets = mix(images, torch.tensor([0, 1]), [f"x{k}", "y"])
        pasted = out[0, 0].mean().item()  # ones pasted into the zero image
        assert targets[0, 1].item() == pytest.approx(pasted)
        assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_disabled_mixing_gives_one_hot():
    out, targets = MixupCutmix(4)(torch.zeros(2, 3, 2, 2), torch.tensor([1, 3]), ["a", "b"])
    assert targets.tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]
