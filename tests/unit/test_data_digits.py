"""The downstream digits set."""
import collections
import tarfile

import numpy as np

from data_pipeline.demo_data.digits import digit_images, write_digits
from data_pipeline.shards.manifest import read_manifest
from data_pipeline.storage import Storage

LOCAL = Storage()  # local paths: no object storage settings


def _labels_and_keys(manifest):
    labels, keys = collections.Counter(), set()
    for shard in manifest["shards"]:
        with tarfile.open(shard["url"]) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".cls"):
                    labels[int(tar.extractfile(m).read())] += 1
                    keys.add(m.name.split(".")[0])
    return labels, keys


def test_counts_labels_and_split(tmp_path):
    write_digits(str(tmp_path / "d"), image_size=16, samples_per_shard=300, storage=LOCAL)
    train, test = (read_manifest(str(tmp_path / "d" / f"{split}.json"), LOCAL) for split in ("train", "test"))
    assert train["num_samples"] == 1000 and test["num_samples"] == 797
    assert train["classes"] == [str(i) for i in range(10)]
    train_labels, train_keys = _labels_and_keys(train)
    test_labels, test_keys = _labels_and_keys(test)
    assert set(train_labels) == set(test_labels) == set(range(10))
    assert not train_keys & test_keys and len(train_keys | test_keys) == 1797
    # Stratified: every class holds ~1000/1797 of its samples in train.
    for digit in range(10):
        share = train_labels[digit] / (train_labels[digit] + test_labels[digit])
        assert abs(share - 1000 / 1797) < 0.02

    write_digits(str(tmp_path / "e"), image_size=16, samples_per_shard=300, seed=1, storage=LOCAL)
    assert _labels_and_keys(read_manifest(str(tmp_path / "e" / "train.json"), LOCAL))[1] != train_keys


def test_digit_images_are_scaled_strokes():
    images, labels = digit_images(32)
    assert images.shape == (1797, 32, 32, 3) and images.dtype == np.uint8
    assert labels.min() == 0 and labels.max() == 9
    assert np.array_equal(images[..., 0], images[..., 2])  # grey in RGB
    # Averaging each 4x4 block back to 8x8 recovers sklearn's 0..16 ink, scaled to 0..255 (white on black).
    from sklearn.datasets import load_digits
    original = load_digits().images * (255.0 / 16.0)
    pooled = images[..., 0].astype(float).reshape(1797, 8, 4, 8, 4).mean(axis=(2, 4))
    assert np.abs(pooled - original).mean() < 25 and images.max() == 255  # ~18 (bilinear blur); a flip gives ~50
